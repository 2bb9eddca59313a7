//! Shared harness of the `fetch_*` tests: layers of real gzip / zstd chunk members in memory
//! blobs, blob wrappers that count, fail, stall, corrupt or slow requests, and readers over them
//! with a cache and a scheduler.

#![allow(dead_code)] // each test file uses a different part

use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lazysnap::blob::{BlobError, BlobFuture, BlobSource, BlobStream, MemoryBlob};
use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::estargz::{ChunkDigest, ChunkInfo, Compression};
use lazysnap::fetch::{FetchOptions, FetchScheduler, LayerFiles, LayerReader, SchedulerOptions};
use lazysnap_fuse::ContentSource;

// ---------- fixtures: a blob of compressed chunk members ----------

pub struct TestLayer {
    pub blob: Bytes,
    pub files: Vec<TestFile>,
    pub contents: Vec<Vec<u8>>,
}

/// One file of a [`TestLayer`], kept apart so tests can inspect and break its chunk list.
pub struct TestFile {
    pub name: String,
    pub size: u64,
    pub chunks: Vec<ChunkInfo>,
    /// A whole-file digest other than the content's (a lying TOC).
    pub file_digest: Option<ChunkDigest>,
}

impl TestLayer {
    /// The files as a reader takes them.
    pub fn layer_files(&self) -> LayerFiles {
        let mut files = LayerFiles::new();
        for (f, content) in self.files.iter().zip(&self.contents) {
            let id = files.push(&f.name, f.size, &f.chunks).unwrap();
            if f.chunks.len() > 1 {
                files.set_file_digest(id, f.file_digest.unwrap_or_else(|| digest(content)));
            }
        }
        files
    }
}

pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Half-compressible: repeat-friendly high nibble.
            ((x >> 33) as u8) & 0x3f
        })
        .collect()
}

pub fn compress(compression: Compression, data: &[u8]) -> Vec<u8> {
    match compression {
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

pub fn digest(data: &[u8]) -> ChunkDigest {
    ChunkDigest::of(data)
}

/// Builds a blob: a junk header, then each file's chunks as separate members, then a trailer.
/// A file given as `pack_two` has its two chunks in one member (the second at an inner offset).
pub fn build_layer(
    contents: Vec<Vec<u8>>,
    chunk_size: usize,
    compression: Compression,
    header: &[u8],
) -> TestLayer {
    let mut blob = header.to_vec();
    let mut files = Vec::new();
    for (i, content) in contents.iter().enumerate() {
        let mut chunks = Vec::new();
        for (n, piece) in content.chunks(chunk_size).enumerate() {
            let start = blob.len() as u64;
            blob.extend_from_slice(&compress(compression, piece));
            chunks.push(ChunkInfo {
                compressed: start..blob.len() as u64,
                inner_offset: 0,
                file_offset: (n * chunk_size) as u64,
                len: piece.len() as u64,
                digest: digest(piece),
            });
        }
        files.push(TestFile {
            name: format!("file{i}"),
            size: content.len() as u64,
            chunks,
            file_digest: None,
        });
    }
    blob.extend_from_slice(b"TRAILER-TOC-AND-FOOTER");
    TestLayer {
        blob: Bytes::from(blob),
        files,
        contents,
    }
}

/// Appends a file whose two chunks share one compressed member (inner offsets).
pub fn add_packed_file(layer: &mut TestLayer, compression: Compression, a: Vec<u8>, b: Vec<u8>) {
    let mut blob = layer.blob.to_vec();
    let start = blob.len() as u64;
    let mut both = a.clone();
    both.extend_from_slice(&b);
    blob.extend_from_slice(&compress(compression, &both));
    let end = blob.len() as u64;
    blob.extend_from_slice(b"TRAILER");
    layer.files.push(TestFile {
        name: "packed".into(),
        size: both.len() as u64,
        chunks: vec![
            ChunkInfo {
                compressed: start..end,
                inner_offset: 0,
                file_offset: 0,
                len: a.len() as u64,
                digest: digest(&a),
            },
            ChunkInfo {
                compressed: start..end,
                inner_offset: a.len() as u64,
                file_offset: a.len() as u64,
                len: b.len() as u64,
                digest: digest(&b),
            },
        ],
        file_digest: None,
    });
    layer.contents.push(both);
    layer.blob = Bytes::from(blob);
}

// ---------- a blob wrapper that counts, fails, stalls and corrupts ----------

#[derive(Default)]
pub struct Controls {
    pub requests: Mutex<Vec<Range<u64>>>,
    pub delay_ms: AtomicU64,
    /// Requests never answer (a dead registry that accepts connections).
    pub hang: AtomicBool,
    /// Requests fail at once with `Unavailable`.
    pub refuse: AtomicBool,
    /// Flip the byte at this blob offset in answers (u64::MAX: off)...
    pub corrupt_at: AtomicU64,
    /// ...in this many more answers (u64::MAX: in all).
    pub corruptions_left: AtomicU64,
    /// Streamed reads deliver half their bytes, then fail (this many more times).
    pub break_streams: AtomicU64,
    /// Streamed reads started.
    pub streams: AtomicU64,
    /// Streamed reads deliver their pieces at this many bytes per second (0: at once).
    pub stream_bytes_per_sec: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

/// Counts a request in flight for as long as it lives.
pub struct InFlight<'a>(&'a Controls);

impl<'a> InFlight<'a> {
    pub fn new(c: &'a Controls) -> Self {
        let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct TestBlob {
    pub inner: MemoryBlob,
    pub controls: Arc<Controls>,
}

impl TestBlob {
    pub fn new(blob: Bytes) -> (Arc<TestBlob>, Arc<Controls>) {
        let controls = Arc::new(Controls::default());
        controls.corrupt_at.store(u64::MAX, Ordering::SeqCst);
        controls.corruptions_left.store(u64::MAX, Ordering::SeqCst);
        (
            Arc::new(TestBlob {
                inner: MemoryBlob(blob),
                controls: Arc::clone(&controls),
            }),
            controls,
        )
    }
}

impl Controls {
    pub fn requests(&self) -> Vec<Range<u64>> {
        self.requests.lock().unwrap().clone()
    }
    pub fn count_covering(&self, r: &Range<u64>) -> usize {
        self.requests()
            .iter()
            .filter(|q| q.start <= r.start && r.end <= q.end)
            .count()
    }
}

impl BlobSource for TestBlob {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_range(&self, range: Range<u64>) -> BlobFuture<'_, Bytes> {
        Box::pin(async move {
            let c = &self.controls;
            c.requests.lock().unwrap().push(range.clone());
            let _in_flight = InFlight::new(c);
            if c.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if c.refuse.load(Ordering::SeqCst) {
                return Err(BlobError::Unavailable("test source is down".into()));
            }
            let delay = c.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let data = self.inner.read_range(range.clone()).await?;
            let at = c.corrupt_at.load(Ordering::SeqCst);
            if range.contains(&at)
                && c.corruptions_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                let mut v = data.to_vec();
                v[(at - range.start) as usize] ^= 0xff;
                return Ok(Bytes::from(v));
            }
            Ok(data)
        })
    }

    /// Pieces of 100 bytes; half the range and then an error while `break_streams` lasts.
    fn read_range_stream(&self, range: Range<u64>) -> BlobFuture<'_, BlobStream> {
        Box::pin(async move {
            self.controls.streams.fetch_add(1, Ordering::SeqCst);
            let data = self.read_range(range).await?;
            let broken = self
                .controls
                .break_streams
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let keep = if broken { data.len() / 2 } else { data.len() };
            let mut pieces: Vec<Result<Bytes, BlobError>> = (0..keep)
                .step_by(100)
                .map(|at| Ok(data.slice(at..(at + 100).min(keep))))
                .collect();
            if broken {
                pieces.push(Err(BlobError::Unavailable("connection reset".into())));
            }
            let rate = self.controls.stream_bytes_per_sec.load(Ordering::SeqCst);
            if rate > 0 {
                let paced =
                    futures::StreamExt::then(futures::stream::iter(pieces), move |p| async move {
                        let len = p.as_ref().map_or(0, |b| b.len() as u64);
                        tokio::time::sleep(Duration::from_micros(len * 1_000_000 / rate)).await;
                        p
                    });
                return Ok(Box::pin(paced) as BlobStream);
            }
            Ok(Box::pin(futures::stream::iter(pieces)) as BlobStream)
        })
    }
}

// ---------- harness ----------

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn cache_in(dir: &std::path::Path, max_bytes: u64, memory_bytes: u64) -> Arc<ChunkCache> {
    ChunkCache::open(CacheOptions {
        max_bytes,
        memory_bytes,
        ..CacheOptions::new(dir)
    })
    .unwrap()
}

pub fn quiet_options() -> FetchOptions {
    FetchOptions {
        deadline: Duration::from_secs(20),
        attempt_timeout: Duration::from_secs(10),
        prefetch: false,
        background: false,
        readahead: false,
        scheduler: TEST_SCHEDULER.with(Arc::clone),
        ..FetchOptions::default()
    }
}

thread_local! {
    /// The scheduler of [`quiet_options`]: one per test (each test runs on a thread of its own),
    /// shared by every layer the test builds with those options, as the daemon shares one node-wide.
    static TEST_SCHEDULER: Arc<FetchScheduler> = scheduler(1, 2 * CHUNK as u64);
}

/// A scheduler of its own for one test: no quiet period, `concurrency` background requests,
/// lower-priority requests of `window / 2` bytes.
pub fn scheduler(concurrency: usize, window: u64) -> Arc<FetchScheduler> {
    FetchScheduler::new(SchedulerOptions {
        quiet_period: Duration::ZERO,
        background_concurrency: concurrency,
        min_window: window,
        max_window: window,
        ..SchedulerOptions::default()
    })
}

pub fn reader(
    rt: &tokio::runtime::Runtime,
    blob: Arc<dyn BlobSource>,
    layer: &TestLayer,
    compression: Compression,
    cache: &Arc<ChunkCache>,
    opts: FetchOptions,
    name: &str,
) -> Arc<LayerReader> {
    LayerReader::new(
        blob,
        compression,
        layer.layer_files(),
        Arc::clone(cache),
        opts,
        rt.handle().clone(),
        name,
    )
}

/// Reads like a FUSE thread: calls `read` and blocks on the `done` callback.
pub fn read_blocking(r: &LayerReader, content: u64, offset: u64, size: u32) -> Result<Bytes, i32> {
    let (tx, rx) = mpsc::channel();
    r.read(
        content,
        offset,
        size,
        Box::new(move |res| {
            let _ = tx.send(res);
        }),
    );
    rx.recv_timeout(Duration::from_secs(120))
        .expect("read never answered: a hang")
}

pub fn expected(content: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = (offset as usize).min(content.len());
    let end = (start + size as usize).min(content.len());
    &content[start..end]
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("gave up waiting for: {what}");
}

pub const CHUNK: usize = 1000;

pub fn sample_contents() -> Vec<Vec<u8>> {
    [0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17]
        .iter()
        .enumerate()
        .map(|(i, &len)| pseudo_random(i as u64 + 1, len))
        .collect()
}

// ---------- tests ----------

/// A tar of regular files (mode 0644, one fixed mtime), in the map's order.
pub fn tar_of(files: &std::collections::BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, &data[..]).unwrap();
    }
    builder.into_inner().unwrap()
}
