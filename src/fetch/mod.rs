//! Per-layer chunk reader behind FUSE: on-demand reads first, then prefetch, then background fill;
//! singleflight per chunk, coalesced ranges, deadlines, decompression and digest verification.
//!
//! [`LayerReader`] implements [`lazysnap_fuse::ContentSource`]. A read whose chunks are all cached
//! is answered on the calling (FUSE) thread with no task hop; otherwise the reply moves to a tokio
//! task and the FUSE thread returns at once. Missing chunks are claimed through the scheduler's
//! claim table (chunk identity is the digest, so readers in other layers share a fetch),
//! adjacent ones are coalesced into one range request whose body streams in: each chunk is decoded
//! and verified ([`ChunkDecoder`]) as soon as its bytes are in, stored in the cache and only then
//! served. Every read has a deadline; the fetch behind it retries transient failures a bounded
//! number of times, for the chunks still missing.
//!
//! [`LayerReader::start_prefetch`] queues the prioritized range with the node-wide
//! [`FetchScheduler`] and then fills the rest of the layer in the background; both stream in
//! requests the scheduler sizes and admits (see its module for the priorities). Claims on chunks
//! being fetched are the scheduler's ([`ClaimTable`]): an on-demand read overtakes a chunk a
//! lower-priority stream holds.
//!
//! Here: the reader, its settings and statistics. The read path is `read.rs`, streamed range
//! requests and chunk decoding `stream.rs`, fetching ahead of reads (startup files, libraries,
//! prefetch plans, background fill) `prefetch.rs`, passthrough assembly `assembly.rs`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use lazysnap_fuse::{ContentId, ContentSource};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::blob::BlobSource;
use crate::cache::ChunkCache;
use crate::estargz::{ChunkCoding, ChunkDigest, ChunkInfo, PrefetchPlan};
use crate::metrics::FetchKind;

mod assembly;
mod claims;
pub(crate) mod elf_deps;
mod layer_files;
mod prefetch;
mod read;
mod scheduler;
mod stream;

pub use claims::{ClaimTable, Claimed, FillError, FillGuard, FillWaiter};
pub use layer_files::{LayerFiles, LayerFilesFull};
pub use scheduler::{FetchScheduler, OnDemandGuard, Reservation, SchedulerOptions};

use assembly::Assembly;
pub use prefetch::STARTUP_WHOLE_FILE_MAX;

/// Settings of a [`LayerReader`].
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Longest time a read may wait for the network before it fails with EIO.
    pub deadline: Duration,
    /// Longest time a range request may go without receiving a byte (before its first, or between
    /// two) before it is retried.
    pub attempt_timeout: Duration,
    /// Retries of a failed or stalled range request (transient failures only); none is started
    /// once `deadline` has passed since a chunk last arrived.
    pub retries: u32,
    /// Fetch the prioritized range when [`LayerReader::start_prefetch`] is called.
    pub prefetch: bool,
    /// Fill the rest of the layer in the background after the prefetch.
    pub background: bool,
    /// Largest coalesced request for on-demand reads (lower priorities are sized by the
    /// scheduler).
    pub max_request_bytes: u64,
    /// On a miss, also fetch the chunks that follow in the blob, within
    /// [`FetchScheduler::readahead_bytes`].
    pub readahead: bool,
    /// When an ELF file's first chunk is read, fetch the libraries it names (see
    /// [`LayerReader::set_lower_layers`]) at prefetch priority.
    pub library_prefetch: bool,
    /// The node-wide scheduler: claims, priorities, the link estimate.
    pub scheduler: Arc<FetchScheduler>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            retries: 3,
            prefetch: true,
            background: true,
            max_request_bytes: 16 << 20,
            readahead: true,
            library_prefetch: true,
            scheduler: FetchScheduler::global(),
        }
    }
}

/// What a layer has fetched and served, for `lazysnap status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerFetchStats {
    /// Compressed bytes fetched for reads a process waited on.
    pub on_demand_bytes: u64,
    /// Compressed bytes fetched by the prefetch of the prioritized range.
    pub prefetch_bytes: u64,
    /// Compressed bytes fetched by background fill.
    pub background_bytes: u64,
    /// Range requests sent.
    pub requests: u64,
    /// Chunk lookups answered by the cache.
    pub cache_hits: u64,
    /// Chunk lookups the cache could not answer.
    pub cache_misses: u64,
    /// Distinct chunks of this layer now in the cache.
    pub fetched_chunks: u64,
    /// Distinct chunks of this layer.
    pub total_chunks: u64,
    /// Chunks whose bytes failed verification.
    pub verify_failures: u64,
    /// Reads answered with an error.
    pub read_errors: u64,
    /// The prefetch has finished (or was not asked for).
    pub prefetch_done: bool,
    /// Background fill has finished.
    pub background_done: bool,
    /// Files of several chunks assembled into one cache file for FUSE passthrough.
    pub files_assembled: u64,
}

#[derive(Default)]
struct Counters {
    on_demand_bytes: AtomicU64,
    prefetch_bytes: AtomicU64,
    background_bytes: AtomicU64,
    requests: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    verify_failures: AtomicU64,
    read_errors: AtomicU64,
    prefetch_done: AtomicBool,
    background_done: AtomicBool,
    files_assembled: AtomicU64,
}

/// Position of a chunk in the layer's chunk array ([`LayerFiles`] holds at most `u32::MAX`).
type ChunkRef = usize;

/// Reads a layer's files chunk by chunk from a blob through the shared cache.
pub struct LayerReader {
    inner: Arc<Inner>,
}

struct Inner {
    layer: String,
    blob: Arc<dyn BlobSource>,
    coding: ChunkCoding,
    files: LayerFiles,
    /// Why a file's chunk list is unusable (its reads fail with EIO), by file index, sorted;
    /// nearly always empty.
    file_errors: Vec<(usize, String)>,
    /// Distinct chunks of the layer in blob order, as [`ChunkRef`]s (stored in 4 bytes each).
    layer_chunks: Vec<u32>,
    cache: Arc<ChunkCache>,
    opts: FetchOptions,
    runtime: Handle,
    counters: Counters,
    prefetch_started: AtomicBool,
    /// The prioritized range the layer prefetches, when it holds file chunks (an optimized
    /// image's record of what startup reads): library and startup prefetch then leave the files
    /// it lists to it, which holds just the parts read, where they would fetch them whole.
    plan: OnceLock<PrefetchPlan>,
    /// Notified when the prefetch [`LayerReader::start_prefetch`] began has finished.
    prefetch_finished: tokio::sync::Notify,
    cancel: CancellationToken,
    /// Passthrough of files of several chunks: the file being assembled (one at a time per
    /// layer) and the files whose chunks were shown to make their assembled cache file.
    assembly: Mutex<Assembly>,
    /// The layers below this one, nearest first, where the libraries its programs name are
    /// looked for after this layer (set once at mount; unpacked layers are not among them).
    lower: OnceLock<Vec<Weak<Inner>>>,
    /// The files in library directories, by file name (built at the first lookup).
    library_files: OnceLock<Vec<u32>>,
    /// ELF files whose libraries were already asked for.
    libraries_asked: Mutex<HashSet<u32>>,
}

/// Largest decompressed chunk accepted (decoding allocates this much up front). Writers chunk
/// files at a few MiB; a TOC declaring more is refused rather than trusted with memory.
const MAX_CHUNK_LEN: u64 = 1 << 30;

/// Checks that `chunks` (sorted by file offset) cover bytes `stream_offset..stream_offset + size`
/// of the sequence they make without a gap (exactly `0..size` for a file's own chunks), each
/// within the blob and the chunk size limit.
fn check_file(
    size: u64,
    stream_offset: u64,
    chunks: &[ChunkInfo],
    blob_size: u64,
) -> Result<(), String> {
    if size == 0 {
        return Ok(());
    }
    let end = stream_offset
        .checked_add(size)
        .ok_or_else(|| "file end overflows".to_string())?;
    // A file's own chunks start at 0; spans start at or before the file.
    let first = match chunks.first() {
        Some(c) if stream_offset > 0 && c.file_offset <= stream_offset => c.file_offset,
        Some(_) if stream_offset > 0 => {
            return Err(format!(
                "no chunk holds the file's first byte at {stream_offset}"
            ))
        }
        _ => 0,
    };
    let mut expected = first;
    for c in chunks {
        if c.file_offset != expected {
            return Err(format!(
                "chunk at file offset {} does not follow the previous one ending at {expected}",
                c.file_offset
            ));
        }
        if c.len == 0 {
            return Err(format!("empty chunk at file offset {}", c.file_offset));
        }
        if c.len > MAX_CHUNK_LEN {
            return Err(format!(
                "chunk at file offset {} declares {} bytes, more than the {MAX_CHUNK_LEN} a chunk may hold",
                c.file_offset, c.len
            ));
        }
        if c.compressed.start >= c.compressed.end || c.compressed.end > blob_size {
            return Err(format!(
                "chunk at file offset {} has compressed range {}..{} outside the blob of {blob_size} bytes",
                c.file_offset, c.compressed.start, c.compressed.end
            ));
        }
        expected = expected
            .checked_add(c.len)
            .ok_or_else(|| "chunk lengths overflow".to_string())?;
    }
    // Spans may run past the file's end; a file's own chunks end with it.
    if expected < end || (stream_offset == 0 && expected != end) {
        return Err(format!(
            "chunks cover {first}..{expected} but the file is {stream_offset}..{end}"
        ));
    }
    Ok(())
}

/// The chunks of the usable, non-empty files, each digest once (its first occurrence), in blob
/// order: what prefetch and background fill walk.
fn distinct_chunks_in_blob_order(files: &LayerFiles, file_errors: &[(usize, String)]) -> Vec<u32> {
    let mut seen = HashSet::new();
    let mut distinct = Vec::new();
    for (index, record) in files.records().iter().enumerate() {
        if record.size == 0
            || file_errors
                .binary_search_by_key(&index, |(i, _)| *i)
                .is_ok()
        {
            continue;
        }
        let positions = record.first_chunk..record.first_chunk.saturating_add(record.chunk_count);
        for (at, chunk) in positions.zip(files.chunks_of(record)) {
            if seen.insert(&chunk.digest) {
                distinct.push(at);
            }
        }
    }
    let chunks = files.all_chunks();
    distinct.sort_by_key(|&at| chunks.get(at as usize).map_or(0, |c| c.compressed.start));
    distinct.shrink_to_fit();
    distinct
}

impl LayerReader {
    /// A reader for `files` (a [`ContentId`] is a file index in it) of the layer stored in `blob`.
    /// Files whose chunk lists are inconsistent are logged and read as EIO. Tasks run on
    /// `runtime`; `layer_name` names the layer in logs and metrics.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        blob: Arc<dyn BlobSource>,
        coding: impl Into<ChunkCoding>,
        mut files: LayerFiles,
        cache: Arc<ChunkCache>,
        opts: FetchOptions,
        runtime: Handle,
        layer_name: impl Into<String>,
    ) -> Arc<LayerReader> {
        let layer = layer_name.into();
        let blob_size = blob.size();
        files.shrink_to_fit();
        files.sort_chunks();
        let mut file_errors = Vec::new();
        for (index, record) in files.records().iter().enumerate() {
            if let Err(e) = check_file(
                record.size,
                record.stream_offset,
                files.chunks_of(record),
                blob_size,
            ) {
                let name = files.name(index).unwrap_or_default();
                tracing::error!(layer = %layer, file = %name, error = %e, "file has an unusable chunk list; its reads fail");
                file_errors.push((index, e));
            }
        }
        let layer_chunks = distinct_chunks_in_blob_order(&files, &file_errors);
        Arc::new(LayerReader {
            inner: Arc::new(Inner {
                layer,
                blob,
                coding: coding.into(),
                files,
                file_errors,
                layer_chunks,
                cache,
                opts,
                runtime,
                counters: Counters::default(),
                prefetch_started: AtomicBool::new(false),
                plan: OnceLock::new(),
                prefetch_finished: tokio::sync::Notify::new(),
                cancel: CancellationToken::new(),
                assembly: Mutex::new(Assembly::default()),
                lower: OnceLock::new(),
                library_files: OnceLock::new(),
                libraries_asked: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// Starts, once, the prefetch `plan` asks for (`None` when the layer has no prioritized
    /// files) followed by background fill, as the options allow. The prefetch is queued with the
    /// scheduler at once, behind the layers mounted before; the call returns at once and the
    /// work runs on the runtime until done or [`LayerReader::shutdown`].
    pub fn start_prefetch(&self, plan: Option<PrefetchPlan>) {
        if self.inner.prefetch_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let scheduler = &self.inner.opts.scheduler;
        scheduler.note_activity();
        let ticket = plan
            .filter(|_| self.inner.opts.prefetch)
            .map(|plan| (plan, scheduler.queue_prefetch()));
        // For library and startup prefetch: a plan of no file chunks (a converter gives layers
        // without listed files a landmark too) leaves the layer unplanned.
        if let Some((plan, _)) = &ticket {
            let holds_files = self
                .inner
                .layer_chunks
                .iter()
                .any(|&at| plan.wants(self.inner.chunk(at as ChunkRef).compressed.start));
            if holds_files {
                let _ = self.inner.plan.set(plan.clone());
            }
        }
        let inner = Arc::clone(&self.inner);
        self.inner.runtime.spawn(async move {
            if let Some((plan, ticket)) = ticket {
                inner.prefetch(&plan, ticket).await;
            }
            inner.counters.prefetch_done.store(true, Ordering::SeqCst);
            inner.prefetch_finished.notify_waiters();
            if inner.opts.background && !inner.cancel.is_cancelled() {
                inner.background_fill().await;
            }
        });
    }

    /// Fetches files `names` of this layer (paths as its TOC names them) at prefetch priority, in
    /// that order: what every container of the image reads first (see `layer::startup`), asked
    /// for at mount. Each file's first chunk comes first, then an ELF file's libraries (with library
    /// prefetch on) beside the rest of the file (up to [`STARTUP_WHOLE_FILE_MAX`]). Files the
    /// layer's prefetch plan lists are left to that plan; call after
    /// [`start_prefetch`](Self::start_prefetch).
    pub fn prefetch_startup_files(&self, names: &[String]) {
        let inner = &self.inner;
        if names.is_empty() || !inner.opts.prefetch {
            return;
        }
        let listed = |file: usize| {
            let plan = inner.plan.get();
            let chunks = inner.files.chunks(file).unwrap_or_default();
            plan.is_some_and(|plan| chunks.iter().any(|c| plan.wants(c.compressed.start)))
        };
        // In the order of `names` (the program first: it is the long one).
        let mut files: Vec<(usize, usize)> = (0..inner.files.len())
            .filter_map(|file| {
                let name = inner.files.name(file)?;
                let rank = names.iter().position(|wanted| wanted == name)?;
                (!listed(file)).then_some((rank, file))
            })
            .collect();
        files.sort_unstable();
        let files: Vec<usize> = files.into_iter().map(|(_, file)| file).collect();
        if files.is_empty() {
            return;
        }
        let inner = Arc::clone(inner);
        self.inner
            .runtime
            .spawn(async move { inner.prefetch_startup(files).await });
    }

    /// The layers below this one, nearest first: where the libraries of this layer's programs
    /// are looked for after this layer itself. Set once, at mount (later calls are ignored).
    pub fn set_lower_layers(&self, lower: &[Arc<LayerReader>]) {
        let _ = self
            .inner
            .lower
            .set(lower.iter().map(|l| Arc::downgrade(&l.inner)).collect());
    }

    /// The cache keys this layer's reads use, each once: its distinct chunks, and its files of
    /// several chunks (assembled for passthrough once all are in).
    pub fn cache_keys(&self) -> Vec<ChunkDigest> {
        let inner = &self.inner;
        let mut keys: Vec<ChunkDigest> = inner
            .all_chunk_refs()
            .into_iter()
            .map(|at| inner.chunk(at).digest)
            .chain((0..inner.files.len()).filter_map(|file| inner.files.file_digest(file)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Returns once the prefetch [`start_prefetch`](Self::start_prefetch) began has finished
    /// (at once when it was not asked for), or the reader was shut down.
    pub async fn prefetch_finished(&self) {
        let finished = self.inner.prefetch_finished.notified();
        tokio::pin!(finished);
        // Registered before the check, so a notification between the two is not lost.
        finished.as_mut().enable();
        if self.inner.counters.prefetch_done.load(Ordering::SeqCst) {
            return;
        }
        tokio::select! {
            _ = finished => {}
            _ = self.inner.cancel.cancelled() => {}
        }
    }

    /// Fetches every chunk of the layer not yet cached, now and at prefetch priority (what
    /// `lazysnap warm --all` asks for: no container waits, so no quiet period). Returns when
    /// each chunk is in the cache or its fetch gave up; [`stats`](Self::stats) tells which.
    pub async fn fill_all(&self) {
        let inner = Arc::clone(&self.inner);
        let chunks = inner.all_chunk_refs();
        let span = tracing::info_span!("fill_all", layer = %inner.layer, chunks = chunks.len());
        async {
            inner.stream_lower(&chunks, FetchKind::Prefetch).await;
            // The stream passes over chunks another fetch holds (a startup prefetch, a layer
            // sharing them): wait for those, or fetch them if that fetch gives up.
            for at in chunks {
                if !inner.cache.contains(&inner.chunk(at).digest) {
                    // A failure is counted and shown by `stats`.
                    let _ = inner.obtain_chunk_as(at, FetchKind::Prefetch).await;
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// Stops prefetch and background fill and fails pending fetches of this layer. Also done on
    /// drop.
    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
    }

    /// Counters for `lazysnap status`.
    pub fn stats(&self) -> LayerFetchStats {
        let c = &self.inner.counters;
        let fetched_chunks = self
            .inner
            .layer_chunks
            .iter()
            .filter(|&&at| {
                let chunk = self.inner.chunk(at as ChunkRef);
                self.inner.cache.contains(&chunk.digest)
            })
            .count() as u64;
        LayerFetchStats {
            on_demand_bytes: c.on_demand_bytes.load(Ordering::Relaxed),
            prefetch_bytes: c.prefetch_bytes.load(Ordering::Relaxed),
            background_bytes: c.background_bytes.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_misses: c.cache_misses.load(Ordering::Relaxed),
            fetched_chunks,
            total_chunks: self.inner.layer_chunks.len() as u64,
            verify_failures: c.verify_failures.load(Ordering::Relaxed),
            read_errors: c.read_errors.load(Ordering::Relaxed),
            prefetch_done: c.prefetch_done.load(Ordering::SeqCst),
            background_done: c.background_done.load(Ordering::SeqCst),
            files_assembled: c.files_assembled.load(Ordering::Relaxed),
        }
    }

    /// The layer's name as given at construction.
    pub fn layer_name(&self) -> &str {
        &self.inner.layer
    }

    /// Reads `size` bytes of file `content` at `offset` and waits for the result (tests, tools;
    /// FUSE uses [`ContentSource::read`]).
    pub async fn read_async(
        &self,
        content: ContentId,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, i32> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.read(
            content,
            offset,
            size,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Err(libc::EIO))
    }
}

impl Drop for LayerReader {
    fn drop(&mut self) {
        self.inner.cancel.cancel();
    }
}

impl Inner {
    /// Every distinct chunk of the layer, in blob order.
    fn all_chunk_refs(&self) -> Vec<ChunkRef> {
        self.layer_chunks.iter().map(|&at| at as ChunkRef).collect()
    }

    fn chunk(&self, at: ChunkRef) -> &ChunkInfo {
        &self.files.all_chunks()[at]
    }

    /// Why file `index` cannot be read, if it cannot.
    fn file_error(&self, index: usize) -> Option<&str> {
        let found = self
            .file_errors
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()?;
        self.file_errors.get(found).map(|(_, e)| e.as_str())
    }

    /// Whether the chunks are gzip spans of the layer's stream (a SOCI zTOC).
    fn reads_gzip_spans(&self) -> bool {
        matches!(self.coding, ChunkCoding::GzipSpans(_))
    }

    /// Name of file `index`, for messages.
    fn file_name(&self, index: usize) -> &str {
        self.files.name(index).unwrap_or("<unknown file>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Range;

    use crate::estargz::ChunkDigest;

    fn chunk(off: u64, len: u64, compressed: Range<u64>) -> ChunkInfo {
        ChunkInfo {
            digest: ChunkDigest::of(&compressed.start.to_le_bytes()),
            compressed,
            inner_offset: 0,
            file_offset: off,
            len,
        }
    }

    #[test]
    fn chunk_lists_are_checked() {
        assert!(check_file(10, 0, &[chunk(0, 4, 0..5), chunk(4, 6, 5..9)], 100).is_ok());
        assert!(check_file(10, 0, &[chunk(0, 4, 0..5)], 100).is_err());
        assert!(check_file(10, 0, &[chunk(0, 4, 0..5), chunk(5, 5, 5..9)], 100).is_err());
        assert!(check_file(4, 0, &[chunk(0, 4, 0..500)], 100).is_err());
        assert!(check_file(0, 0, &[], 100).is_ok());
        // A file inside gzip spans: the spans must hold all of it, starting at or before it.
        let spans = [chunk(1000, 500, 10..20), chunk(1500, 500, 20..30)];
        assert!(check_file(600, 1200, &spans, 100).is_ok());
        assert!(check_file(900, 1200, &spans, 100).is_err());
        assert!(check_file(100, 1600, &spans[..1], 100).is_err());
        assert!(check_file(100, 900, &spans, 100).is_err());
    }

    #[test]
    fn distinct_chunks_skip_repeats_empty_and_unusable_files_in_blob_order() {
        let mut files = LayerFiles::new();
        let shared = chunk(0, 4, 50..60);
        files
            .push("late", 8, &[chunk(0, 4, 70..80), chunk(4, 4, 80..90)])
            .unwrap();
        files.push("empty", 0, &[]).unwrap();
        files
            .push("shared-a", 4, std::slice::from_ref(&shared))
            .unwrap();
        files.push("broken", 4, &[chunk(0, 4, 10..20)]).unwrap();
        files.push("shared-b", 4, &[shared]).unwrap();
        let errors = vec![(3, "broken chunk list".to_string())];
        // Positions in the flat chunk array: late = 0, 1; shared-a = 2; broken = 3; shared-b = 4.
        assert_eq!(distinct_chunks_in_blob_order(&files, &errors), [2, 0, 1]);
    }
}
