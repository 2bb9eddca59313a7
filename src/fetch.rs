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

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use lazysnap_fuse::{ContentId, ContentSource, ReadDone};
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::blob::{BlobError, BlobSource};
use crate::buffer_pool::POOL;
use crate::cache::{ChunkCache, LargeChunkFile};
use crate::estargz::{
    self, ChunkDecoder, ChunkDigest, ChunkInfo, Compression, Decoded, PrefetchPlan,
};
use crate::metrics::{self, FetchKind};

mod claims;
pub(crate) mod elf_deps;
mod layer_files;
mod scheduler;

pub use claims::{ClaimTable, Claimed, FillError, FillGuard, FillWaiter};
use layer_files::FileRecord;
pub use layer_files::{LayerFiles, LayerFilesFull};
pub use scheduler::{FetchScheduler, OnDemandGuard, Reservation, SchedulerOptions};

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

/// How a streamed run request ended.
enum Streamed {
    /// Every chunk of the run got its verdict (its fill is completed).
    Done,
    /// The request failed before these chunks had all their bytes, or some arrived and failed
    /// verification.
    Unfinished {
        chunks: Vec<(ChunkRef, FillGuard)>,
        failure: StreamFailure,
        /// Some chunks of the run got their verdict before the failure.
        progressed: bool,
    },
    /// The reader is shutting down.
    Cancelled,
}

/// A chunk whose bytes failed verification: not served, not cached, its fill still open so that
/// it is fetched again (the bytes came over the network; the next response may be right).
struct Rejected {
    at: ChunkRef,
    guard: FillGuard,
    message: String,
}

impl Rejected {
    /// Ends the chunk's fill with the verification error (for failures no refetch can mend).
    fn fail(self) {
        self.guard.complete(Err(FillError::Verify(self.message)));
    }
}

/// Why a chunk's decoding could not start.
enum StartError {
    Format(estargz::FormatError),
    Cache(crate::cache::CacheError),
}

impl From<estargz::FormatError> for StartError {
    fn from(e: estargz::FormatError) -> Self {
        StartError::Format(e)
    }
}

impl From<crate::cache::CacheError> for StartError {
    fn from(e: crate::cache::CacheError) -> Self {
        StartError::Cache(e)
    }
}

/// Why a streamed request failed.
struct StreamFailure {
    message: String,
    /// Metric label (see [`metrics::record_fetch_error`]).
    reason: &'static str,
    /// Worth another request (the source is unavailable, slow, or sent bad bytes).
    retryable: bool,
}

impl From<BlobError> for StreamFailure {
    fn from(e: BlobError) -> StreamFailure {
        StreamFailure {
            reason: error_reason(&e),
            retryable: matches!(e, BlobError::Unavailable(_) | BlobError::Corrupt(_)),
            message: e.to_string(),
        }
    }
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
    compression: Compression,
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

#[derive(Default)]
struct Assembly {
    running: bool,
    /// Sorted.
    proven: Vec<u32>,
    /// Files that cannot be assembled (a lying file digest, too large): not tried again. Sorted.
    refused: Vec<u32>,
}

/// Calls a [`ReadDone`] exactly once: with the result, or with EIO if dropped unanswered (a task
/// cancelled at shutdown must still answer the kernel).
struct Reply(Option<ReadDone>);

impl Reply {
    fn send(mut self, result: Result<Bytes, i32>) {
        if let Some(done) = self.0.take() {
            done(result);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(libc::EIO));
        }
    }
}

/// Bytes between two chunks that read-ahead still takes as adjacent (tar headers of entries
/// without content).
const READ_AHEAD_MAX_GAP: u64 = 4096;

/// The directory part of a layer path (`""` for a file at the root).
fn parent_dir(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Largest file (uncompressed) the startup prefetch fetches whole; of a larger one, only the
/// first chunk (a program that big reads a small part of itself at start).
pub const STARTUP_WHOLE_FILE_MAX: u64 = 32 << 20;

/// Chunks larger than this are decoded straight into their cache file, not into memory.
const LARGE_CHUNK: u64 = 16 << 20;

/// Most bytes of chunks being decoded in memory at once, node-wide; past it, chunks are decoded
/// into their cache files as large ones are. With [`LARGE_CHUNK`] this bounds what a layer of
/// small compressed chunks that inflate to a lot (a decompression bomb) can make the daemon hold.
const DECODE_MEMORY_MAX: u64 = 256 << 20;

static DECODE_MEMORY: AtomicU64 = AtomicU64::new(0);

/// A share of [`DECODE_MEMORY_MAX`] held while a chunk is decoded in memory.
struct DecodeMemory(u64);

impl DecodeMemory {
    fn take(len: u64) -> Option<DecodeMemory> {
        DECODE_MEMORY
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(len)
                    .filter(|&total| total <= DECODE_MEMORY_MAX)
            })
            .ok()
            .map(|_| DecodeMemory(len))
    }
}

impl Drop for DecodeMemory {
    fn drop(&mut self) {
        DECODE_MEMORY.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// A chunk being decoded: into memory (holding its share of the node-wide decode memory) or
/// into its cache file.
struct Decoding {
    decoder: ChunkDecoder,
    into: DecodeInto,
}

enum DecodeInto {
    /// Holds its share of the decode memory until the chunk is decoded.
    Memory {
        _share: DecodeMemory,
    },
    File(LargeChunkFile),
}

/// Largest decompressed chunk accepted (decoding allocates this much up front). Writers chunk
/// files at a few MiB; a TOC declaring more is refused rather than trusted with memory.
const MAX_CHUNK_LEN: u64 = 1 << 30;

/// Checks that `chunks` (sorted by file offset) cover a file of `size` bytes exactly, each within
/// the blob and the chunk size limit.
fn check_file(size: u64, chunks: &[ChunkInfo], blob_size: u64) -> Result<(), String> {
    if size == 0 {
        return Ok(());
    }
    let mut expected = 0u64;
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
    if expected != size {
        return Err(format!(
            "chunks cover {expected} bytes but the file has {size}"
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
        compression: Compression,
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
            if let Err(e) = check_file(record.size, files.chunks_of(record), blob_size) {
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
                compression,
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

impl ContentSource for LayerReader {
    fn read(&self, content: ContentId, offset: u64, size: u32, done: ReadDone) {
        let reply = Reply(Some(done));
        let inner = &self.inner;
        let Some((index, file)) = usize::try_from(content)
            .ok()
            .and_then(|i| Some((i, inner.files.record(i)?)))
        else {
            tracing::error!(layer = %inner.layer, content, "read of an unknown content id");
            inner.counters.read_errors.fetch_add(1, Ordering::Relaxed);
            reply.send(Err(libc::EIO));
            return;
        };
        if let Some(e) = inner.file_error(index) {
            tracing::error!(layer = %inner.layer, file = %inner.file_name(index), error = %e, "read of a file with an unusable chunk list");
            inner.counters.read_errors.fetch_add(1, Ordering::Relaxed);
            reply.send(Err(libc::EIO));
            return;
        }
        let end = offset.saturating_add(u64::from(size)).min(file.size);
        if offset >= end {
            reply.send(Ok(Bytes::new()));
            return;
        }
        let found = match inner.read_cached(&file, offset, end) {
            Ok(data) => {
                if offset == 0 {
                    inner.note_first_bytes(index, &data);
                }
                reply.send(Ok(data));
                return;
            }
            Err(found) => found,
        };
        let activity = inner.opts.scheduler.on_demand();
        let task_inner = Arc::clone(inner);
        inner.runtime.spawn(async move {
            let deadline = task_inner.opts.deadline;
            let result = match tokio::time::timeout(
                deadline,
                task_inner.read_slow(index, file, offset, end, found),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(
                        layer = %task_inner.layer,
                        file = %task_inner.file_name(index),
                        offset,
                        ?deadline,
                        "read missed its deadline"
                    );
                    Err(libc::EIO)
                }
            };
            match &result {
                Ok(data) if offset == 0 => task_inner.note_first_bytes(index, data),
                Ok(_) => {}
                Err(_) => {
                    task_inner
                        .counters
                        .read_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(activity);
            reply.send(result);
        });
    }

    fn local_file(&self, content: ContentId) -> Option<std::fs::File> {
        let index = usize::try_from(content).ok()?;
        let file = self.inner.files.record(index)?;
        match self.inner.files.chunks_of(&file) {
            [only] if only.file_offset == 0 && only.len == file.size && file.size > 0 => {
                self.inner.cache.open_file(&only.digest)
            }
            [] | [_] => None,
            chunks => {
                let whole = self.inner.files.file_digest(index)?;
                if self.inner.assembled(index) {
                    if let Some(backing) = self.inner.cache.open_file(&whole) {
                        return Some(backing);
                    }
                }
                // Once every chunk is here, assemble the file (or check the assembled file
                // another layer left) so that later opens pass through.
                if chunks.iter().all(|c| self.inner.cache.contains(&c.digest)) {
                    self.inner.start_assembly(index, whole);
                }
                None
            }
        }
    }
}

/// The byte range of chunk `c` that a read of `[offset, end)` needs, relative to the chunk.
fn part_of(c: &ChunkInfo, offset: u64, end: u64) -> (u64, usize) {
    let start = offset.max(c.file_offset) - c.file_offset;
    let stop = end.min(c.file_offset + c.len) - c.file_offset;
    (start, usize::try_from(stop - start).unwrap_or(usize::MAX))
}

fn concat(parts: Vec<Bytes>) -> Bytes {
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    // Pooled: a fresh buffer of a read's size costs page faults on every read.
    let mut out = POOL.take(parts.iter().map(Bytes::len).sum());
    for p in parts {
        out.extend_from_slice(&p);
    }
    POOL.into_bytes(out)
}

/// A coalesced request: its range and the chunks (with their ranges) it carries.
type Run<T> = (Range<u64>, Vec<(Range<u64>, T)>);

/// Groups chunks (sorted by compressed start) into runs fetched by one request each: a chunk
/// joins the run if it overlaps it or starts at most `max_gap` bytes after it, and the run stays
/// within `max_bytes` (an overlapping chunk always joins).
fn build_runs<T>(items: Vec<(Range<u64>, T)>, max_bytes: u64, max_gap: u64) -> Vec<Run<T>> {
    let mut runs: Vec<Run<T>> = Vec::new();
    for (range, item) in items {
        if let Some((run, members)) = runs.last_mut() {
            let overlaps = range.start < run.end;
            let close = range.start.saturating_sub(run.end) <= max_gap;
            let fits = range.end.max(run.end) - run.start <= max_bytes;
            if overlaps || (close && fits) {
                run.end = run.end.max(range.end);
                members.push((range, item));
                continue;
            }
        }
        runs.push((range.clone(), vec![(range, item)]));
    }
    runs
}

fn error_reason(e: &BlobError) -> &'static str {
    match e {
        BlobError::NotFound(_) => "not_found",
        BlobError::Auth(_) => "auth",
        BlobError::Unavailable(_) => "unavailable",
        BlobError::Corrupt(_) => "corrupt",
        BlobError::Invalid(_) => "invalid",
    }
}

impl Inner {
    fn assembly(&self) -> std::sync::MutexGuard<'_, Assembly> {
        crate::sync::lock(&self.assembly)
    }

    /// Whether file `index`'s chunks were shown to make its assembled cache file.
    fn assembled(&self, index: usize) -> bool {
        u32::try_from(index).is_ok_and(|i| self.assembly().proven.binary_search(&i).is_ok())
    }

    /// Assembles file `index` (all of whose chunks are cached) into the cache entry `whole` on
    /// the blocking pool, unless this layer is already assembling one.
    fn start_assembly(self: &Arc<Self>, index: usize, whole: ChunkDigest) {
        let Ok(file) = u32::try_from(index) else {
            return;
        };
        {
            let mut assembly = self.assembly();
            if assembly.running || assembly.refused.binary_search(&file).is_ok() {
                return;
            }
            assembly.running = true;
        }
        let inner = Arc::clone(self);
        self.runtime.spawn_blocking(move || {
            let parts: Vec<ChunkDigest> = inner
                .files
                .chunks(index)
                .unwrap_or_default()
                .iter()
                .map(|c| c.digest)
                .collect();
            let size = inner.files.size(index).unwrap_or(0);
            let result = inner.cache.assemble(&whole, &parts, size);
            {
                let mut assembly = inner.assembly();
                assembly.running = false;
                let list = match &result {
                    Ok(true) => Some(&mut assembly.proven),
                    Ok(false) => None,
                    Err(_) => Some(&mut assembly.refused),
                };
                if let Some(list) = list {
                    if let Err(at) = list.binary_search(&file) {
                        list.insert(at, file);
                    }
                }
            }
            match result {
                Ok(true) => {
                    inner
                        .counters
                        .files_assembled
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(layer = %inner.layer, file = %inner.file_name(index), size, "file assembled for passthrough");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(layer = %inner.layer, file = %inner.file_name(index), error = %e, "cannot assemble a file for passthrough; reading it through its chunks")
                }
            }
        });
    }

    /// The work of [`LayerReader::prefetch_startup_files`] for file indexes `files`.
    async fn prefetch_startup(self: Arc<Self>, files: Vec<usize>) {
        let records: Vec<(usize, FileRecord)> = files
            .iter()
            .filter_map(|&file| Some((file, self.files.record(file)?)))
            .collect();
        let span = tracing::info_span!(
            "startup_prefetch",
            layer = %self.layer,
            files = ?files.iter().map(|&file| self.file_name(file)).collect::<Vec<_>>()
        );
        async {
            // Chunks cached or being fetched already are passed over by the stream.
            let firsts: Vec<ChunkRef> = records
                .iter()
                .filter_map(|(_, record)| {
                    let range = record.chunk_range();
                    (!range.is_empty()).then_some(range.start)
                })
                .collect();
            self.stream_lower(&firsts, FetchKind::Prefetch).await;
            if self.opts.library_prefetch {
                for &(file, _) in &records {
                    let elf = self
                        .files
                        .chunks(file)
                        .and_then(<[ChunkInfo]>::first)
                        .and_then(|first| self.cache.get(&first.digest))
                        .is_some_and(|head| elf_deps::is_elf(&head));
                    if elf {
                        self.prefetch_libraries_once(file);
                    }
                }
            }
            let rest: Vec<ChunkRef> = records
                .iter()
                .filter(|(_, record)| record.size <= STARTUP_WHOLE_FILE_MAX)
                .flat_map(|(_, record)| record.chunk_range().skip(1))
                .collect();
            self.stream_lower(&rest, FetchKind::Prefetch).await;
        }
        .instrument(span)
        .await;
    }

    /// Called with the first bytes of file `index` a read returned: if they start an ELF file
    /// and library prefetch is on, fetches the libraries it names (once per file).
    fn note_first_bytes(self: &Arc<Self>, index: usize, first: &[u8]) {
        if self.opts.library_prefetch && elf_deps::is_elf(first) {
            self.prefetch_libraries_once(index);
        }
    }

    /// Starts [`prefetch_libraries_of`](Self::prefetch_libraries_of) for file `index` unless it
    /// was started before.
    fn prefetch_libraries_once(self: &Arc<Self>, index: usize) {
        let Ok(file) = u32::try_from(index) else {
            return;
        };
        let first_time = crate::sync::lock(&self.libraries_asked).insert(file);
        if first_time {
            let inner = Arc::clone(self);
            self.runtime
                .spawn(async move { inner.prefetch_libraries_of(index).await });
        }
    }

    /// Fetches, at prefetch priority, the libraries ELF file `index` names that are not cached
    /// yet: each from the nearest layer providing it, this one first, then those below; then,
    /// likewise, the libraries those name (the loader loads the whole closure). A library of a
    /// layer with a prefetch plan is left to that plan.
    async fn prefetch_libraries_of(self: Arc<Self>, index: usize) {
        // The whole first chunk (the read that led here may have returned only its start).
        let Some(first) = self.files.chunks(index).and_then(<[ChunkInfo]>::first) else {
            return;
        };
        let Some(head) = self.cache.get(&first.digest) else {
            return;
        };
        let names = elf_deps::needed_libraries(&head);
        drop(head);
        if names.is_empty() {
            return;
        }
        let mut layers = vec![Arc::clone(&self)];
        layers.extend(
            self.lower
                .get()
                .into_iter()
                .flatten()
                .filter_map(Weak::upgrade),
        );
        let mut wanted: Vec<Vec<ChunkRef>> = vec![Vec::new(); layers.len()];
        let mut found = Vec::new();
        for name in &names {
            let provider = layers
                .iter()
                .enumerate()
                .find_map(|(at, layer)| Some((at, layer.library_file(name)?)));
            if let Some((at, file)) = provider {
                let layer = &layers[at];
                if layer.plan.get().is_some() {
                    continue;
                }
                found.push((at, file));
                if let Some(record) = layer.files.record(file) {
                    let all = layer.files.all_chunks();
                    let chunks = record.chunk_range().filter(|&c| {
                        all.get(c)
                            .is_some_and(|chunk| !layer.cache.contains(&chunk.digest))
                    });
                    wanted[at].extend(chunks);
                }
            }
        }
        let span = tracing::info_span!(
            "library_prefetch",
            layer = %self.layer,
            file = %self.file_name(index),
            libraries = ?found.iter().map(|&(at, file)| layers[at].file_name(file)).collect::<Vec<_>>(),
            chunks = wanted.iter().map(Vec::len).sum::<usize>()
        );
        let fetches = layers
            .iter()
            .zip(&wanted)
            .filter(|(_, chunks)| !chunks.is_empty())
            .map(|(layer, chunks)| layer.stream_lower(chunks, FetchKind::Prefetch));
        futures::future::join_all(fetches).instrument(span).await;
        for (at, file) in found {
            layers[at].prefetch_libraries_once(file);
        }
    }

    /// The regular file of this layer that provides library `name` (see
    /// [`elf_deps::provides`]) in a library directory: the exact name before a longer version.
    fn library_file(&self, name: &str) -> Option<usize> {
        let by_name = self.library_files.get_or_init(|| {
            let mut files: Vec<u32> = (0..self.files.len())
                .filter(|&file| {
                    self.files.name(file).is_some_and(elf_deps::in_library_dir)
                        && self.file_error(file).is_none()
                })
                .filter_map(|file| u32::try_from(file).ok())
                .collect();
            files.sort_by(|&a, &b| self.base_name(a as usize).cmp(self.base_name(b as usize)));
            files
        });
        let start = by_name.partition_point(|&f| self.base_name(f as usize) < name);
        by_name[start..]
            .iter()
            .map(|&f| f as usize)
            .take_while(|&f| self.base_name(f).starts_with(name))
            .find(|&f| elf_deps::provides(self.base_name(f), name))
    }

    fn base_name(&self, file: usize) -> &str {
        let name = self.files.name(file).unwrap_or_default();
        name.rsplit('/').next().unwrap_or(name)
    }

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

    /// Name of file `index`, for messages.
    fn file_name(&self, index: usize) -> &str {
        self.files.name(index).unwrap_or("<unknown file>")
    }

    /// The chunks of `file` that `[offset, end)` touches, as positions in the layer's chunk array.
    fn span(&self, file: &FileRecord, offset: u64, end: u64) -> Range<ChunkRef> {
        let chunks = self.files.chunks_of(file);
        let first = chunks.partition_point(|c| c.file_offset + c.len <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        let base = file.chunk_range().start;
        base + first..base + last.max(first)
    }

    /// Answers from the cache alone; when a chunk is missing, the parts found before it (for
    /// [`read_slow`](Self::read_slow), which goes on from there).
    fn read_cached(&self, file: &FileRecord, offset: u64, end: u64) -> Result<Bytes, Vec<Bytes>> {
        let span = self.span(file, offset, end);
        let mut parts = Vec::with_capacity(span.len());
        for c in self.files.all_chunks().get(span).unwrap_or_default() {
            let (start, len) = part_of(c, offset, end);
            match self.cache.read_at(&c.digest, start, len) {
                Some(b) if b.len() == len => {
                    self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                    parts.push(b);
                }
                _ => return Err(parts),
            }
        }
        Ok(concat(parts))
    }

    /// Fetches what is missing (coalesced, singleflight) and assembles the answer. `found`: the
    /// first parts, already read from the cache by [`read_cached`](Self::read_cached), which
    /// missed the chunk right after them.
    async fn read_slow(
        self: &Arc<Self>,
        index: usize,
        file: FileRecord,
        offset: u64,
        end: u64,
        found: Vec<Bytes>,
    ) -> Result<Bytes, i32> {
        let span = self.span(&file, offset, end);
        let known_missing = found.len();
        let mut parts: Vec<Option<Bytes>> = found.into_iter().map(Some).collect();
        parts.resize(span.len(), None);
        let mut waits = Vec::new();
        let mut leaders = Vec::new();
        for (slot, at) in span.enumerate().skip(known_missing) {
            let c = self.chunk(at);
            let (start, len) = part_of(c, offset, end);
            // The chunk read_cached just missed is not looked up again: the claim below rechecks.
            let cached = if slot == known_missing {
                None
            } else {
                self.cache
                    .read_at(&c.digest, start, len)
                    .filter(|b| b.len() == len)
            };
            if let Some(b) = cached {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                parts[slot] = Some(b);
                continue;
            }
            self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
            match self.claims().claim(&c.digest, FetchKind::OnDemand) {
                Claimed::Leader(guard, waiter) => {
                    // Another reader may have stored it between the lookup and the claim.
                    match self.cache.get(&c.digest) {
                        Some(data) => guard.complete(Ok(data)),
                        None => leaders.push((at, guard)),
                    }
                    waits.push((slot, at, waiter));
                }
                // A prefetch or background stream has it but has not delivered it yet: follow
                // it, and fetch the chunk itself if the stream does not deliver in time.
                Claimed::Overtake(guard, waiter) => {
                    self.overtake_if_late(at, guard);
                    waits.push((slot, at, waiter));
                }
                Claimed::Follower(waiter) => waits.push((slot, at, waiter)),
            }
        }
        if !leaders.is_empty() {
            // Read-ahead chunks may sit a tar header apart: they still share the request.
            let max_gap = if self.opts.readahead {
                self.read_ahead(&mut leaders);
                READ_AHEAD_MAX_GAP
            } else {
                0
            };
            // Detached: the fetch completes (and fills the cache) even if this read gives up.
            let inner = Arc::clone(self);
            self.runtime
                .spawn(async move { inner.fetch_on_demand(leaders, max_gap).await });
        }
        for (slot, at, waiter) in waits {
            let c = self.chunk(at);
            let data = match waiter.wait().await {
                Ok(data) => data,
                // The fetching task went away (another layer shut down): fetch it ourselves.
                Err(FillError::Abandoned) => self.obtain_chunk(at).await?,
                Err(e) => {
                    tracing::error!(layer = %self.layer, file = %self.file_name(index), chunk = %c.digest, error = %e, "read failed");
                    return Err(libc::EIO);
                }
            };
            let (start, len) = part_of(c, offset, end);
            let start = usize::try_from(start).unwrap_or(usize::MAX);
            match data.get(start..start.saturating_add(len)) {
                Some(_) => parts[slot] = Some(data.slice(start..start + len)),
                None => {
                    tracing::error!(layer = %self.layer, chunk = %c.digest, "chunk shorter than its TOC length");
                    return Err(libc::EIO);
                }
            }
        }
        Ok(concat(parts.into_iter().flatten().collect()))
    }

    /// Fetches chunk `at`, which a lower-priority stream holds, with an on-demand request of its
    /// own unless that stream delivers it within the scheduler's patience.
    fn overtake_if_late(self: &Arc<Self>, at: ChunkRef, guard: FillGuard) {
        let c = &self.chunk(at).compressed;
        let patience = self.opts.scheduler.overtake_patience(c.end - c.start);
        let inner = Arc::clone(self);
        self.runtime.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(patience) => {}
                _ = inner.cancel.cancelled() => return,
            }
            if guard.is_pending() {
                tracing::debug!(layer = %inner.layer, chunk = %guard.digest(), ?patience, "a lower-priority stream is late with a chunk a read waits for; fetching it on demand");
                inner.fetch_on_demand(vec![(at, guard)], 0).await;
            }
        });
    }

    /// [`fetch_chunks`](Self::fetch_chunks) for reads a process waits on.
    async fn fetch_on_demand(self: &Arc<Self>, claimed: Vec<(ChunkRef, FillGuard)>, max_gap: u64) {
        self.fetch_chunks(
            claimed,
            FetchKind::OnDemand,
            max_gap,
            self.opts.max_request_bytes,
            None,
        )
        .await;
    }

    /// Extends a miss's request with the chunks that follow it in the blob (the next files of
    /// its directory in TOC order, which were packed together and are often opened together: a
    /// package's modules, a locale's files), up to about one bandwidth-delay product of
    /// compressed bytes: on a slow link a round trip saved is worth that many bytes. Stops at the
    /// first chunk cached, claimed, not adjacent, or of a file in another directory (the next
    /// directory's files are seldom wanted: on the python3 app at 10 Mbit/s crossing into them
    /// sent 0.7 MB more for no fewer misses).
    fn read_ahead(&self, leaders: &mut Vec<(ChunkRef, FillGuard)>) {
        let Some(mut end) = leaders
            .iter()
            .map(|(at, _)| self.chunk(*at).compressed.end)
            .max()
        else {
            return;
        };
        let budget = self.opts.scheduler.readahead_bytes();
        let directory_of_chunk =
            |at: ChunkRef| parent_dir(self.file_name(self.files.file_of_chunk(at)));
        let directory = leaders.first().map(|&(at, _)| directory_of_chunk(at));
        let chunks = self.files.all_chunks();
        let start = self.layer_chunks.partition_point(|&at| {
            chunks
                .get(at as usize)
                .is_some_and(|c| c.compressed.start < end)
        });
        let mut added = 0u64;
        for &at in &self.layer_chunks[start..] {
            let at = at as ChunkRef;
            let c = self.chunk(at);
            let len = c.compressed.end - c.compressed.start;
            if c.compressed.start > end.saturating_add(READ_AHEAD_MAX_GAP)
                || added + len > budget
                || self.cache.contains(&c.digest)
                || directory != Some(directory_of_chunk(at))
            {
                break;
            }
            let Some(guard) = self.claims().try_lead(&c.digest, FetchKind::OnDemand) else {
                break;
            };
            leaders.push((at, guard));
            added += len;
            end = c.compressed.end;
        }
    }

    /// One chunk, whoever fetches it; retries leadership if a fetch is abandoned.
    async fn obtain_chunk(self: &Arc<Self>, at: ChunkRef) -> Result<Bytes, i32> {
        self.obtain_chunk_as(at, FetchKind::OnDemand).await
    }

    /// [`obtain_chunk`](Self::obtain_chunk) at priority `kind`: a fetch of the same or higher
    /// priority that holds the chunk is followed, a lower one overtaken.
    async fn obtain_chunk_as(
        self: &Arc<Self>,
        at: ChunkRef,
        kind: FetchKind,
    ) -> Result<Bytes, i32> {
        let digest = &self.chunk(at).digest;
        loop {
            if let Some(data) = self.cache.get(digest) {
                return Ok(data);
            }
            let waiter = match self.claims().claim(digest, kind) {
                Claimed::Leader(guard, waiter) | Claimed::Overtake(guard, waiter) => {
                    let inner = Arc::clone(self);
                    let max = self.opts.max_request_bytes;
                    self.runtime.spawn(async move {
                        inner
                            .fetch_chunks(vec![(at, guard)], kind, 0, max, None)
                            .await
                    });
                    waiter
                }
                Claimed::Follower(waiter) => waiter,
            };
            match waiter.wait().await {
                Ok(data) => return Ok(data),
                Err(FillError::Abandoned) if !self.cancel.is_cancelled() => continue,
                Err(e) => {
                    tracing::error!(layer = %self.layer, chunk = %digest, error = %e, "read failed");
                    return Err(libc::EIO);
                }
            }
        }
    }

    /// Fetches the claimed chunks, coalesced into runs streamed in one request each, and decodes,
    /// verifies and stores each and completes its guard. Failed requests are retried (transient
    /// failures only, `retries` times, with backoff) for the chunks still missing; a retry is
    /// given up once `deadline` passes without any chunk arriving. Returns when every guard is
    /// completed (or dropped, if this reader shuts down: waiters then fetch it themselves).
    async fn fetch_chunks(
        self: &Arc<Self>,
        claimed: Vec<(ChunkRef, FillGuard)>,
        kind: FetchKind,
        max_gap: u64,
        max_bytes: u64,
        reservation: Option<Reservation>,
    ) {
        let mut pending = claimed;
        let mut attempt = 0;
        let mut give_up_at = Instant::now() + self.opts.deadline;
        while !pending.is_empty() {
            let streamed = futures::future::join_all(
                self.runs_of(pending, max_bytes, max_gap)
                    .into_iter()
                    .map(|(run, members)| {
                        self.stream_run(run, members, kind, attempt, reservation.as_ref())
                    }),
            )
            .await;
            let mut left = Vec::new();
            let mut last_failure = None;
            let mut retryable = true;
            for outcome in streamed {
                match outcome {
                    Streamed::Done => give_up_at = Instant::now() + self.opts.deadline,
                    Streamed::Cancelled => return,
                    Streamed::Unfinished {
                        chunks,
                        failure,
                        progressed,
                    } => {
                        if progressed {
                            give_up_at = Instant::now() + self.opts.deadline;
                        }
                        retryable &= failure.retryable;
                        left.extend(chunks);
                        last_failure = Some(failure.message);
                    }
                }
            }
            pending = left;
            let Some(message) = last_failure.filter(|_| !pending.is_empty()) else {
                break;
            };
            attempt += 1;
            let backoff = Duration::from_millis(100u64 << attempt.min(6));
            let now = Instant::now();
            if !retryable || attempt > self.opts.retries || now + backoff >= give_up_at {
                tracing::warn!(layer = %self.layer, kind = kind.as_str(), attempts = attempt, chunks = pending.len(), error = %message, "giving up on these chunks");
                for (_, guard) in pending {
                    guard.complete(Err(FillError::Fetch(message.clone())));
                }
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.cancel.cancelled() => return,
            }
        }
    }

    /// The claimed chunks in blob order, coalesced into runs (see [`build_runs`]).
    fn runs_of(
        &self,
        mut claimed: Vec<(ChunkRef, FillGuard)>,
        max_bytes: u64,
        max_gap: u64,
    ) -> Vec<Run<(ChunkRef, FillGuard)>> {
        claimed.sort_by_key(|(at, _)| self.chunk(*at).compressed.start);
        let items = claimed
            .into_iter()
            .map(|(at, guard)| (self.chunk(at).compressed.clone(), (at, guard)))
            .collect();
        build_runs(items, max_bytes, max_gap)
    }

    /// Fetches a run of chunks with one request whose body is decoded as it arrives: each chunk
    /// is decoded and verified as soon as its last byte is in, on the blocking pool, so chunks
    /// decode in parallel with the transfer and with each other. The last chunk of an on-demand
    /// run is decoded right here, its reader being the one waiting. A request fails when no byte
    /// arrives for `attempt_timeout` (so a slow link that keeps sending never times out); chunks
    /// still short of bytes then are returned for another attempt.
    async fn stream_run(
        self: &Arc<Self>,
        run: Range<u64>,
        members: Vec<(Range<u64>, (ChunkRef, FillGuard))>,
        kind: FetchKind,
        attempt: u32,
        reservation: Option<&Reservation>,
    ) -> Streamed {
        let first_file = members
            .first()
            .map(|(_, (at, _))| self.file_name(self.files.file_of_chunk(*at)));
        let span = tracing::info_span!(
            "fetch",
            layer = %self.layer,
            file = first_file.unwrap_or(""),
            kind = kind.as_str(),
            requests = 1,
            chunks = members.len(),
            bytes = run.end - run.start,
            first = run.start,
            attempt
        );
        let started = Instant::now();
        // Members (sorted by start) not yet begun, those receiving bytes, and, for an on-demand
        // run, the last one complete, decoded after the transfer.
        let mut waiting: std::collections::VecDeque<_> = members.into();
        // (range, chunk, guard, decoding, bytes fed up to): chunks receiving bytes.
        let mut receiving: Vec<(Range<u64>, ChunkRef, FillGuard, Decoding, u64)> = Vec::new();
        let mut last: Option<(ChunkRef, FillGuard, Decoding)> = None;
        let mut decodes = JoinSet::new();
        let mut verdicts = 0usize;
        let mut rejected: Vec<Rejected> = Vec::new();
        let stall = self.opts.attempt_timeout;
        let stalled = || StreamFailure {
            message: format!("no data for {stall:?}"),
            reason: "timeout",
            retryable: true,
        };
        let mut probe = self.opts.scheduler.request(kind);
        let request = async {
            let mut body = tokio::time::timeout(stall, self.blob.read_range_stream(run.clone()))
                .await
                .map_err(|_| stalled())??;
            let mut at = run.start;
            while let Some(piece) = tokio::time::timeout(stall, futures::StreamExt::next(&mut body))
                .await
                .map_err(|_| stalled())?
            {
                let piece: Bytes = piece?;
                let end = at + piece.len() as u64;
                probe.received(piece.len() as u64);
                if let Some(reservation) = reservation {
                    reservation.received(piece.len() as u64);
                }
                // Chunks this piece completes are finished before chunks starting in it begin
                // (which may wait for the cache room the finished ones free), then fed.
                loop {
                    let mut i = 0;
                    while let Some((range, _, _, Decoding { decoder, .. }, fed_to)) =
                        receiving.get_mut(i)
                    {
                        let from = range.start.max(at).max(*fed_to);
                        let to = range.end.min(end);
                        let within = (from - at) as usize..to.saturating_sub(at) as usize;
                        let fed = match piece.get(within) {
                            Some(bytes) if from < to => decoder.feed(bytes),
                            _ => Ok(()),
                        };
                        *fed_to = to.max(*fed_to);
                        let complete = range.end <= end;
                        if fed.is_err() || complete {
                            let (_, chunk_at, guard, decoder, _) = receiving.swap_remove(i);
                            if let Err(e) = fed {
                                rejected.push(self.reject(chunk_at, e, guard));
                                continue;
                            }
                            verdicts += 1;
                            if kind == FetchKind::OnDemand
                                && waiting.is_empty()
                                && receiving.is_empty()
                            {
                                last = Some((chunk_at, guard, decoder));
                            } else {
                                let inner = Arc::clone(self);
                                decodes.spawn_blocking_on(
                                    move || match inner.finish(chunk_at, decoder, guard) {
                                        Ok(Some(data)) => {
                                            inner.persist(chunk_at, data);
                                            None
                                        }
                                        Ok(None) => None,
                                        Err(rejected) => Some(rejected),
                                    },
                                    &self.runtime,
                                );
                            }
                            continue;
                        }
                        i += 1;
                    }
                    if waiting.front().is_none_or(|(range, _)| range.start >= end) {
                        break;
                    }
                    while waiting.front().is_some_and(|(range, _)| range.start < end) {
                        let Some((range, (chunk_at, guard))) = waiting.pop_front() else {
                            break;
                        };
                        match self.start_decoding(chunk_at).await {
                            Ok(decoding) => receiving.push((
                                range.clone(),
                                chunk_at,
                                guard,
                                decoding,
                                range.start,
                            )),
                            Err(StartError::Format(e)) => {
                                verdicts += 1;
                                self.reject(chunk_at, e, guard).fail();
                            }
                            Err(StartError::Cache(e)) => {
                                verdicts += 1;
                                self.fail_uncacheable(chunk_at, e, guard);
                            }
                        }
                    }
                }
                at = end;
            }
            if waiting.is_empty() && receiving.is_empty() {
                Ok(())
            } else {
                Err(StreamFailure::from(BlobError::Corrupt(format!(
                    "range response ended at byte {at} of {}..{}",
                    run.start, run.end
                ))))
            }
        };
        let outcome = tokio::select! {
            r = request.instrument(span) => r,
            _ = self.cancel.cancelled() => return Streamed::Cancelled,
        };
        if let Some((chunk_at, guard, decoder)) = last {
            // Readers are answered here; the disk write goes to the blocking pool.
            match self.finish(chunk_at, decoder, guard) {
                Ok(Some(data)) => {
                    let inner = Arc::clone(self);
                    self.runtime
                        .spawn_blocking(move || inner.persist(chunk_at, data));
                }
                Ok(None) => {}
                Err(chunk) => rejected.push(chunk),
            }
        }
        let failure = match outcome {
            Ok(()) => {
                self.count_fetched(kind, run.end - run.start, started.elapsed());
                None
            }
            Err(failure) => {
                metrics::record_fetch_error(failure.reason);
                Some(failure)
            }
        };
        while let Some(joined) = decodes.join_next().await {
            if let Ok(Some(chunk)) = joined {
                verdicts = verdicts.saturating_sub(1);
                rejected.push(chunk);
            }
        }
        let failure = failure.or_else(|| {
            rejected.first().map(|chunk| StreamFailure {
                message: format!("chunk failed verification: {}", chunk.message),
                reason: "corrupt",
                retryable: true,
            })
        });
        let unfinished: Vec<_> = waiting
            .into_iter()
            .map(|(_, member)| member)
            .chain(
                receiving
                    .into_iter()
                    .map(|(_, at, guard, _, _)| (at, guard)),
            )
            .chain(rejected.into_iter().map(|chunk| (chunk.at, chunk.guard)))
            .collect();
        match failure {
            None => Streamed::Done,
            Some(failure) => {
                tracing::warn!(layer = %self.layer, kind = kind.as_str(), attempt, error = %failure.message, retryable = failure.retryable, chunks = unfinished.len(), "range request failed");
                Streamed::Unfinished {
                    chunks: unfinished,
                    failure,
                    progressed: verdicts > 0,
                }
            }
        }
    }

    /// A decoder for chunk `at`: into memory when it is small and the node-wide decode memory
    /// has room, otherwise into its cache file.
    async fn start_decoding(&self, at: ChunkRef) -> Result<Decoding, StartError> {
        let chunk = self.chunk(at);
        let file = self.file_name(self.files.file_of_chunk(at));
        if chunk.len <= LARGE_CHUNK {
            if let Some(memory) = DecodeMemory::take(chunk.len) {
                let decoder = ChunkDecoder::new(self.compression, file, chunk)?;
                return Ok(Decoding {
                    decoder,
                    into: DecodeInto::Memory { _share: memory },
                });
            }
        }
        let large = self.cache.begin_large(&chunk.digest, chunk.len).await?;
        let writer = large.writer()?;
        let decoder = ChunkDecoder::into_writer(self.compression, file, chunk, writer)?;
        Ok(Decoding {
            decoder,
            into: DecodeInto::File(large),
        })
    }

    /// Fails a chunk's fill that cannot be decoded because the cache cannot hold it.
    fn fail_uncacheable(&self, at: ChunkRef, error: crate::cache::CacheError, guard: FillGuard) {
        let chunk = self.chunk(at);
        tracing::error!(layer = %self.layer, chunk = %chunk.digest, file = %self.file_name(self.files.file_of_chunk(at)), error = %error, "cannot decode a chunk into the cache; its reads fail");
        guard.complete(Err(FillError::Fetch(error.to_string())));
    }

    /// Finishes decoding and verifying a chunk whose bytes are all in (CPU work: a `decode`
    /// span) and completes its fill: with [`store_decoded`](Self::store_decoded), or, for a
    /// chunk decoded into its cache file, by installing that file and serving its mapping. A
    /// chunk that fails verification is handed back, its fill open, to be fetched again.
    fn finish(
        &self,
        at: ChunkRef,
        decoding: Decoding,
        guard: FillGuard,
    ) -> Result<Option<Bytes>, Rejected> {
        let chunk = self.chunk(at);
        let decoded = tracing::debug_span!("decode", chunk = %chunk.digest, bytes = chunk.len)
            .in_scope(|| decoding.decoder.finish());
        match (decoded, decoding.into) {
            (Ok(Decoded::Written), DecodeInto::File(large)) => {
                match self.cache.finish_large(&chunk.digest, large) {
                    Ok(mapped) => guard.complete(Ok(mapped)),
                    Err(e) => self.fail_uncacheable(at, e, guard),
                }
                Ok(None)
            }
            (Ok(Decoded::Memory(data)), _) => Ok(self.store_decoded(at, data, guard)),
            (Ok(Decoded::Written), DecodeInto::Memory { .. }) => {
                guard.complete(Err(FillError::Fetch(
                    "a chunk decoded into memory reported it was written to a file".into(),
                )));
                Ok(None)
            }
            (Err(e), _) => Err(self.reject(at, e, guard)),
        }
    }

    /// Completes a chunk's fill with its verified bytes: they go to the memory tier and to the
    /// waiting readers, and are returned to be written to disk after, off the readers' path, by
    /// [`persist`](Self::persist).
    fn store_decoded(&self, at: ChunkRef, data: Vec<u8>, guard: FillGuard) -> Option<Bytes> {
        let chunk = self.chunk(at);
        let data = POOL.into_bytes(data);
        if self.cache.remember(&chunk.digest, data.clone()) {
            guard.complete(Ok(data.clone()));
            return Some(data);
        }
        // Not held in memory: on disk before the fill ends, so that no reader arriving between
        // the two fetches it again.
        self.persist(at, data.clone());
        guard.complete(Ok(data));
        None
    }

    /// Counts and logs a chunk whose bytes failed verification and hands it back (its fill
    /// open) to be fetched again or failed.
    fn reject(&self, at: ChunkRef, error: estargz::FormatError, guard: FillGuard) -> Rejected {
        let chunk = self.chunk(at);
        self.counters
            .verify_failures
            .fetch_add(1, Ordering::Relaxed);
        metrics::record_verify_failure(&self.layer, error.chunk_failure_reason());
        tracing::error!(
            layer = %self.layer,
            chunk = %chunk.digest,
            file = %self.file_name(self.files.file_of_chunk(at)),
            error = %error,
            "chunk failed verification; not served, not cached"
        );
        Rejected {
            at,
            guard,
            message: error.to_string(),
        }
    }

    /// Writes a verified chunk to the disk cache (blocking I/O).
    fn persist(&self, at: ChunkRef, data: Bytes) {
        let chunk = self.chunk(at);
        if let Err(e) = self.cache.insert(&chunk.digest, data) {
            tracing::warn!(layer = %self.layer, chunk = %chunk.digest, error = %e, "cannot store a chunk in the cache; serving it anyway");
        }
    }

    fn count_fetched(&self, kind: FetchKind, bytes: u64, latency: Duration) {
        let counter = match kind {
            FetchKind::OnDemand => &self.counters.on_demand_bytes,
            FetchKind::Prefetch => &self.counters.prefetch_bytes,
            FetchKind::Background => &self.counters.background_bytes,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        metrics::record_fetch(kind, bytes, latency);
    }

    fn claims(&self) -> &Arc<ClaimTable> {
        self.opts.scheduler.claims()
    }

    /// Claims, for a fetch of `kind`, the chunks that are neither cached nor being fetched.
    fn claim(&self, chunks: &[ChunkRef], kind: FetchKind) -> Vec<(ChunkRef, FillGuard)> {
        let mut claimed = Vec::new();
        for &at in chunks {
            let digest = &self.chunk(at).digest;
            if self.cache.contains(digest) {
                continue;
            }
            if let Some(guard) = self.claims().try_lead(digest, kind) {
                // A chunk cached between the check and the claim needs no fetch.
                if let Some(data) = self.cache.get(digest) {
                    guard.complete(Ok(data));
                } else {
                    claimed.push((at, guard));
                }
            }
        }
        claimed
    }

    /// The next batch of `chunks` from `*i` for one lower-priority request: consecutive chunks
    /// neither cached nor being fetched, spanning at most `max` compressed bytes (at least one
    /// chunk), each within [`READ_AHEAD_MAX_GAP`] of the batch's end in the blob (a request
    /// spans its batch, so a wider gap, such as the unread part of a file an optimized image's
    /// plan skips, would be sent for nothing). Advances `*i` past it.
    fn next_batch(&self, chunks: &[ChunkRef], i: &mut usize, max: u64) -> Vec<ChunkRef> {
        let mut batch: Vec<ChunkRef> = Vec::new();
        // The compressed range the batch spans so far.
        let mut span = 0..0;
        while let Some(&at) = chunks.get(*i) {
            let c = self.chunk(at);
            if self.cache.contains(&c.digest) || self.claims().is_claimed(&c.digest) {
                *i += 1;
                if batch.is_empty() {
                    continue;
                }
                break;
            }
            if batch.is_empty() {
                span = c.compressed.clone();
            } else if c.compressed.end.saturating_sub(span.start) > max
                || c.compressed.start > span.end.saturating_add(READ_AHEAD_MAX_GAP)
            {
                break;
            } else {
                span.end = span.end.max(c.compressed.end);
            }
            batch.push(at);
            *i += 1;
        }
        batch
    }

    /// Streams `chunks` (in order) at priority `kind`: batches sized by the scheduler, each
    /// admitted before its chunks are claimed, several in flight as the window allows.
    async fn stream_lower(self: &Arc<Self>, chunks: &[ChunkRef], kind: FetchKind) {
        let scheduler = Arc::clone(&self.opts.scheduler);
        let mut tasks = JoinSet::new();
        let mut i = 0;
        while i < chunks.len() && !self.cancel.is_cancelled() {
            let max = scheduler.lower_request_bytes();
            let batch = self.next_batch(chunks, &mut i, max);
            if batch.is_empty() {
                continue;
            }
            // What the request spans: from the batch's first chunk to its furthest end.
            let first = self.chunk(batch[0]).compressed.start;
            let bytes = batch
                .iter()
                .map(|&at| self.chunk(at).compressed.end)
                .max()
                .unwrap_or(first)
                .saturating_sub(first);
            let reservation = tokio::select! {
                r = scheduler.admit(kind, bytes) => r,
                _ = self.cancel.cancelled() => break,
            };
            let claimed = self.claim(&batch, kind);
            if claimed.is_empty() {
                continue;
            }
            let inner = Arc::clone(self);
            tasks.spawn_on(
                async move {
                    inner
                        .fetch_chunks(claimed, kind, u64::MAX, max, Some(reservation))
                        .await;
                },
                &self.runtime,
            );
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Fetches the chunks `plan` wants, in blob (landmark) order, once the prefetches queued
    /// before it are done.
    async fn prefetch(self: &Arc<Self>, plan: &PrefetchPlan, ticket: scheduler::PrefetchTicket) {
        let wanted: Vec<ChunkRef> = self
            .layer_chunks
            .iter()
            .map(|&at| at as ChunkRef)
            .filter(|&at| plan.wants(self.chunk(at).compressed.start))
            .collect();
        let span = tracing::info_span!("prefetch", layer = %self.layer, start = plan.range.start, end = plan.range.end, chunks = wanted.len());
        async {
            let _turn = tokio::select! {
                turn = ticket.turn() => turn,
                _ = self.cancel.cancelled() => return,
            };
            self.stream_lower(&wanted, FetchKind::Prefetch).await;
            tracing::info!("prefetch finished");
        }
        .instrument(span)
        .await;
        drop(ticket);
    }

    /// Fetches every chunk not yet cached, lowest priority (the scheduler admits each request
    /// only after the node's startup has gone quiet, within the node-wide concurrency and
    /// bandwidth limits).
    async fn background_fill(self: &Arc<Self>) {
        let span = tracing::info_span!("background_fill", layer = %self.layer, chunks = self.layer_chunks.len());
        async {
            self.stream_lower(&self.all_chunk_refs(), FetchKind::Background)
                .await;
            if !self.cancel.is_cancelled() {
                self.counters.background_done.store(true, Ordering::SeqCst);
                tracing::info!("background fill finished");
            }
        }
        .instrument(span)
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::ChunkDigest;

    #[test]
    fn runs_coalesce_adjacent_and_respect_limits() {
        let items = vec![(0..10, 'a'), (10..20, 'b'), (25..30, 'c'), (30..100, 'd')];
        let runs = build_runs(items.clone(), 1000, 0);
        let ranges: Vec<_> = runs.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(ranges, vec![0..20, 25..100]);
        let runs = build_runs(items.clone(), 1000, u64::MAX);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].0, 0..100);
        let runs = build_runs(items, 20, 0);
        let ranges: Vec<_> = runs.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(ranges, vec![0..20, 25..30, 30..100]);
        // Chunks sharing one compressed member always share a request.
        let shared = build_runs(vec![(0..50, 1), (0..50, 2)], 10, 0);
        assert_eq!(shared.len(), 1);
    }

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
        assert!(check_file(10, &[chunk(0, 4, 0..5), chunk(4, 6, 5..9)], 100).is_ok());
        assert!(check_file(10, &[chunk(0, 4, 0..5)], 100).is_err());
        assert!(check_file(10, &[chunk(0, 4, 0..5), chunk(5, 5, 5..9)], 100).is_err());
        assert!(check_file(4, &[chunk(0, 4, 0..500)], 100).is_err());
        assert!(check_file(0, &[], 100).is_ok());
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
