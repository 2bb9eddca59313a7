//! LayerReader over real gzip / zstd chunk members in memory blobs, through counting, failing,
//! slow and corrupting blob wrappers: correct bytes, singleflight, cross-layer sharing,
//! verification, deadlines, cache bound, restart reuse, prefetch and background fill.

use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lazysnap::blob::{BlobError, BlobFuture, BlobSource, BlobStream, MemoryBlob};
use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::estargz::{ChunkDigest, ChunkInfo, Compression, PrefetchPlan};
use lazysnap::fetch::{FetchOptions, FetchScheduler, LayerFiles, LayerReader, SchedulerOptions};
use lazysnap_fuse::ContentSource;

// ---------- fixtures: a blob of compressed chunk members ----------

struct TestLayer {
    blob: Bytes,
    files: Vec<TestFile>,
    contents: Vec<Vec<u8>>,
}

/// One file of a [`TestLayer`], kept apart so tests can inspect and break its chunk list.
struct TestFile {
    name: String,
    size: u64,
    chunks: Vec<ChunkInfo>,
    /// A whole-file digest other than the content's (a lying TOC).
    file_digest: Option<ChunkDigest>,
}

impl TestLayer {
    /// The files as a reader takes them.
    fn layer_files(&self) -> LayerFiles {
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

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
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

fn compress(compression: Compression, data: &[u8]) -> Vec<u8> {
    match compression {
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

fn digest(data: &[u8]) -> ChunkDigest {
    ChunkDigest::of(data)
}

/// Builds a blob: a junk header, then each file's chunks as separate members, then a trailer.
/// A file given as `pack_two` has its two chunks in one member (the second at an inner offset).
fn build_layer(
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
fn add_packed_file(layer: &mut TestLayer, compression: Compression, a: Vec<u8>, b: Vec<u8>) {
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
struct Controls {
    requests: Mutex<Vec<Range<u64>>>,
    delay_ms: AtomicU64,
    /// Requests never answer (a dead registry that accepts connections).
    hang: AtomicBool,
    /// Requests fail at once with `Unavailable`.
    refuse: AtomicBool,
    /// Flip the byte at this blob offset in answers (u64::MAX: off)...
    corrupt_at: AtomicU64,
    /// ...in this many more answers (u64::MAX: in all).
    corruptions_left: AtomicU64,
    /// Streamed reads deliver half their bytes, then fail (this many more times).
    break_streams: AtomicU64,
    /// Streamed reads started.
    streams: AtomicU64,
    /// Streamed reads deliver their pieces at this many bytes per second (0: at once).
    stream_bytes_per_sec: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a Controls);

impl<'a> InFlight<'a> {
    fn new(c: &'a Controls) -> Self {
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

struct TestBlob {
    inner: MemoryBlob,
    controls: Arc<Controls>,
}

impl TestBlob {
    fn new(blob: Bytes) -> (Arc<TestBlob>, Arc<Controls>) {
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
    fn requests(&self) -> Vec<Range<u64>> {
        self.requests.lock().unwrap().clone()
    }
    fn count_covering(&self, r: &Range<u64>) -> usize {
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn cache_in(dir: &std::path::Path, max_bytes: u64, memory_bytes: u64) -> Arc<ChunkCache> {
    ChunkCache::open(CacheOptions {
        max_bytes,
        memory_bytes,
        ..CacheOptions::new(dir)
    })
    .unwrap()
}

fn quiet_options() -> FetchOptions {
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
fn scheduler(concurrency: usize, window: u64) -> Arc<FetchScheduler> {
    FetchScheduler::new(SchedulerOptions {
        quiet_period: Duration::ZERO,
        background_concurrency: concurrency,
        min_window: window,
        max_window: window,
        ..SchedulerOptions::default()
    })
}

fn reader(
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
fn read_blocking(r: &LayerReader, content: u64, offset: u64, size: u32) -> Result<Bytes, i32> {
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

fn expected(content: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = (offset as usize).min(content.len());
    let end = (start + size as usize).min(content.len());
    &content[start..end]
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("gave up waiting for: {what}");
}

const CHUNK: usize = 1000;

fn sample_contents() -> Vec<Vec<u8>> {
    [0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17]
        .iter()
        .enumerate()
        .map(|(i, &len)| pseudo_random(i as u64 + 1, len))
        .collect()
}

// ---------- tests ----------

#[test]
fn reads_return_correct_bytes_at_all_offsets_gzip_and_zstd() {
    for compression in [Compression::Gzip, Compression::Zstd] {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let mut layer = build_layer(sample_contents(), CHUNK, compression, b"HEADER");
        add_packed_file(
            &mut layer,
            compression,
            pseudo_random(50, 300),
            pseudo_random(51, 700),
        );
        let (blob, _controls) = TestBlob::new(layer.blob.clone());
        // Memory tier off so cached reads also come through disk `pread`s.
        let cache = cache_in(dir.path(), 1 << 30, 0);
        let r = reader(
            &rt,
            blob,
            &layer,
            compression,
            &cache,
            quiet_options(),
            "all-offsets",
        );
        for (id, content) in layer.contents.iter().enumerate() {
            let len = content.len() as u64;
            for size in [1u32, 7, 999, 1000, 1001, 4096, 131072] {
                let mut offset = 0;
                while offset <= len + 3 {
                    let got = read_blocking(&r, id as u64, offset, size).unwrap_or_else(|e| {
                        panic!("file {id} offset {offset} size {size}: errno {e}")
                    });
                    assert_eq!(
                        &got[..],
                        expected(content, offset, size),
                        "{compression:?} file {id} offset {offset} size {size}"
                    );
                    offset += 137;
                }
            }
        }
        assert_eq!(read_blocking(&r, 999, 0, 10), Err(libc::EIO));
        let stats = r.stats();
        assert_eq!(stats.fetched_chunks, stats.total_chunks);
        assert!(stats.on_demand_bytes > 0 && stats.cache_hits > 0);
    }
}

#[test]
fn sixty_four_concurrent_readers_fetch_each_chunk_once() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(7, 8 * CHUNK + 5);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Gzip, b"H");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    controls.delay_ms.store(100, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "concurrent",
    );
    let threads: Vec<_> = (0..64)
        .map(|t| {
            let r = Arc::clone(&r);
            let content = content.clone();
            std::thread::spawn(move || {
                // Each reader walks the file with a different read size, starting at a
                // different place, as FUSE threads serving several processes would.
                let size = 300 + (t as u32 * 37) % 900;
                let start = (t as u64 * 211) % content.len() as u64;
                let mut offset = start;
                loop {
                    let got = read_blocking(&r, 0, offset, size).unwrap();
                    assert_eq!(&got[..], expected(&content, offset, size));
                    offset += size as u64;
                    if offset >= content.len() as u64 {
                        offset = 0;
                    }
                    if offset <= start && offset + size as u64 > start {
                        break;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for c in &layer.files[0].chunks {
        assert_eq!(
            controls.count_covering(&c.compressed),
            1,
            "chunk {} fetched more than once: {:?}",
            c.digest,
            controls.requests()
        );
    }
}

#[test]
fn shared_chunks_across_two_layers_are_fetched_once() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let shared = pseudo_random(11, 4 * CHUNK);
    let only_b = pseudo_random(12, 2 * CHUNK);
    let layer_a = build_layer(vec![shared.clone()], CHUNK, Compression::Gzip, b"AAAA");
    // Same file at other blob offsets in layer B, plus a file of its own.
    let layer_b = build_layer(
        vec![only_b.clone(), shared.clone()],
        CHUNK,
        Compression::Gzip,
        b"B",
    );
    let (blob_a, ctl_a) = TestBlob::new(layer_a.blob.clone());
    let (blob_b, ctl_b) = TestBlob::new(layer_b.blob.clone());
    ctl_a.delay_ms.store(150, Ordering::SeqCst);
    ctl_b.delay_ms.store(150, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    let ra = reader(
        &rt,
        blob_a,
        &layer_a,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "a",
    );
    let rb = reader(
        &rt,
        blob_b,
        &layer_b,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "b",
    );
    // Both layers read the shared file at the same moment.
    let ta = {
        let ra = Arc::clone(&ra);
        std::thread::spawn(move || read_blocking(&ra, 0, 0, 1 << 20).unwrap())
    };
    let tb = {
        let rb = Arc::clone(&rb);
        std::thread::spawn(move || read_blocking(&rb, 1, 0, 1 << 20).unwrap())
    };
    assert_eq!(&ta.join().unwrap()[..], &shared[..]);
    assert_eq!(&tb.join().unwrap()[..], &shared[..]);
    for (ca, cb) in layer_a.files[0].chunks.iter().zip(&layer_b.files[1].chunks) {
        assert_eq!(ca.digest, cb.digest);
        let total = ctl_a.count_covering(&ca.compressed) + ctl_b.count_covering(&cb.compressed);
        assert_eq!(total, 1, "shared chunk {} fetched {total} times", ca.digest);
    }
    // A later reader of the shared file in B costs no request at all.
    let before = ctl_b.requests().len();
    assert_eq!(
        &read_blocking(&rb, 1, 1500, 2000).unwrap()[..],
        &shared[1500..3500]
    );
    assert_eq!(ctl_b.requests().len(), before);
    assert_eq!(&read_blocking(&rb, 0, 0, 10_000).unwrap()[..], &only_b[..]);
}

#[test]
fn corrupt_chunk_is_refetched_then_gives_eio_is_not_cached_and_is_counted_by_layer_and_reason() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(21, 3 * CHUNK);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Gzip, b"HDR");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let bad = layer.files[0].chunks[1].clone();
    // Flip a byte in the middle of the second chunk's deflate data.
    controls.corrupt_at.store(
        (bad.compressed.start + bad.compressed.end) / 2,
        Ordering::SeqCst,
    );
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "layer-corrupt-test",
    );
    assert_eq!(read_blocking(&r, 0, 0, 100).unwrap()[..], content[..100]);
    // Bad bytes are fetched again (they came over the network; the next answer may be right),
    // a bounded number of times, then the read fails.
    assert_eq!(read_blocking(&r, 0, CHUNK as u64 + 5, 100), Err(libc::EIO));
    assert!(!cache.contains(&bad.digest), "unverified chunk was cached");
    let attempts = 1 + u64::from(FetchOptions::default().retries);
    assert_eq!(r.stats().verify_failures, attempts);
    // Counted by layer and reason; the chunk digest goes to the log, never into a label (a
    // registry serving bad bytes must not grow the metrics without bound).
    let text = lazysnap::metrics::encode();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("lazysnap_chunk_verify_failures_total{layer=\"layer-corrupt-test\"")
        })
        .collect();
    assert_eq!(series.len(), 1, "{text}");
    assert!(
        series[0].contains("reason=\"digest_mismatch\"")
            || series[0].contains("reason=\"undecodable\""),
        "{text}"
    );
    assert!(!text.contains(&bad.digest.to_string()), "{text}");
    // A read spanning the bad chunk fails as a whole; nothing unverified leaks.
    assert_eq!(read_blocking(&r, 0, 900, 300), Err(libc::EIO));
    // Once the source answers right, the same read succeeds.
    controls.corrupt_at.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(
        &read_blocking(&r, 0, CHUNK as u64 + 5, 100).unwrap()[..],
        &content[CHUNK + 5..CHUNK + 105]
    );
    // One bad answer costs the read nothing but a second request.
    let third = &layer.files[0].chunks[2];
    let failures = r.stats().verify_failures;
    controls.corruptions_left.store(1, Ordering::SeqCst);
    controls.corrupt_at.store(
        (third.compressed.start + third.compressed.end) / 2,
        Ordering::SeqCst,
    );
    assert_eq!(
        &read_blocking(&r, 0, 2 * CHUNK as u64, 100).unwrap()[..],
        &content[2 * CHUNK..2 * CHUNK + 100]
    );
    assert_eq!(r.stats().verify_failures, failures + 1);
}

#[test]
fn dead_source_gives_eio_within_the_deadline_then_recovers() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(31, 4 * CHUNK);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Zstd, b"Z");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    let opts = FetchOptions {
        deadline: Duration::from_secs(3),
        attempt_timeout: Duration::from_millis(500),
        retries: 2,
        ..quiet_options()
    };
    let r = reader(&rt, blob, &layer, Compression::Zstd, &cache, opts, "dead");
    assert_eq!(&read_blocking(&r, 0, 0, 10).unwrap()[..], &content[..10]);

    // A source that accepts requests but never answers.
    controls.hang.store(true, Ordering::SeqCst);
    let asked_before = controls.requests().len();
    assert_eq!(read_blocking(&r, 0, 2000, 10), Err(libc::EIO));
    let attempts = controls.requests().len() - asked_before;
    assert!(
        (1..=3).contains(&attempts),
        "{attempts} attempts, retries bounded to 2"
    );
    // Cached data keeps being served.
    assert_eq!(&read_blocking(&r, 0, 5, 10).unwrap()[..], &content[5..15]);

    // A source that refuses at once.
    controls.hang.store(false, Ordering::SeqCst);
    controls.refuse.store(true, Ordering::SeqCst);
    assert_eq!(read_blocking(&r, 0, 3000, 10), Err(libc::EIO));

    // Back up: the same reads succeed.
    controls.refuse.store(false, Ordering::SeqCst);
    assert_eq!(
        &read_blocking(&r, 0, 2000, 10).unwrap()[..],
        &content[2000..2010]
    );
    assert_eq!(
        &read_blocking(&r, 0, 3000, 10).unwrap()[..],
        &content[3000..3010]
    );
}

#[test]
fn cache_size_bound_holds_under_pressure_while_reads_succeed() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(41, 20 * CHUNK);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Gzip, b"P");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let bound = 3 * CHUNK as u64;
    let cache = cache_in(dir.path(), bound, 0);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "pressure",
    );
    for round in 0..2 {
        let mut offset = 0;
        while offset < content.len() as u64 {
            let got = read_blocking(&r, 0, offset, 700).unwrap();
            assert_eq!(
                &got[..],
                expected(&content, offset, 700),
                "round {round} offset {offset}"
            );
            let stats = cache.stats();
            assert!(stats.disk_bytes <= bound, "{stats:?}");
            offset += 700;
        }
    }
    assert!(cache.stats().evictions >= 17);
    // Evicted chunks were refetched in the second round.
    assert!(controls.requests().len() > 20);
}

#[test]
fn restart_reuses_the_cache_without_fetching() {
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(51, 6 * CHUNK + 3);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Gzip, b"R");
    {
        let rt = runtime();
        let (blob, _c) = TestBlob::new(layer.blob.clone());
        let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
        let r = reader(
            &rt,
            blob,
            &layer,
            Compression::Gzip,
            &cache,
            quiet_options(),
            "before",
        );
        assert_eq!(&read_blocking(&r, 0, 0, 1 << 20).unwrap()[..], &content[..]);
    }
    let rt = runtime();
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    controls.refuse.store(true, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    assert_eq!(cache.stats().disk_entries, 7);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "after",
    );
    assert_eq!(&read_blocking(&r, 0, 0, 1 << 20).unwrap()[..], &content[..]);
    assert_eq!(
        &read_blocking(&r, 0, 2500, 1000).unwrap()[..],
        &content[2500..3500]
    );
    assert!(controls.requests().is_empty());
    assert_eq!(r.stats().fetched_chunks, 7);
}

#[test]
fn prefetch_fetches_the_prioritized_range_in_one_request() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..5).map(|i| pseudo_random(60 + i, 2 * CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"PF");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        prefetch: true,
        scheduler: scheduler(1, 1 << 20),
        ..quiet_options()
    };
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        opts,
        "prefetch",
    );
    // Prioritized: files 0..3 (six chunks), as if a landmark followed them.
    let range = layer.files[0].chunks[0].compressed.start..layer.files[2].chunks[1].compressed.end;
    r.start_prefetch(Some(range.clone().into()));
    wait_until("prefetch done", || r.stats().prefetch_done);
    assert_eq!(controls.requests(), vec![range.clone()]);
    for f in &layer.files[..3] {
        for c in &f.chunks {
            assert!(cache.contains(&c.digest));
        }
    }
    for f in &layer.files[3..] {
        for c in &f.chunks {
            assert!(!cache.contains(&c.digest), "background fill is off");
        }
    }
    let stats = r.stats();
    assert_eq!(stats.prefetch_bytes, range.end - range.start);
    assert_eq!((stats.fetched_chunks, stats.total_chunks), (6, 10));
    // Prefetched files read without requests.
    assert_eq!(
        &read_blocking(&r, 1, 0, 4096).unwrap()[..],
        &contents[1][..]
    );
    assert_eq!(controls.requests().len(), 1);
}

#[test]
fn prefetch_sends_no_bytes_of_the_chunks_a_plan_skips() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    // Files of 8 chunks: file 1's compressed bytes are more than a tar header's gap.
    let contents: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(70 + i, 8 * CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"SK");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        prefetch: true,
        scheduler: scheduler(1, 4 << 20),
        ..quiet_options()
    };
    let r = reader(&rt, blob, &layer, Compression::Gzip, &cache, opts, "skip");
    // Prioritized: files 0..3, of which the record says file 1 was not read (an optimized
    // image's unread part of a file): the prefetch must not send file 1's bytes, even though
    // one request for files 0 to 2 would fit its window.
    let span = |file: usize| {
        let chunks = &layer.files[file].chunks;
        chunks[0].compressed.start..chunks[chunks.len() - 1].compressed.end
    };
    let plan = PrefetchPlan {
        range: span(0).start..span(2).end,
        skipped: layer.files[1]
            .chunks
            .iter()
            .map(|c| c.compressed.start)
            .collect(),
    };
    r.start_prefetch(Some(plan));
    wait_until("prefetch done", || r.stats().prefetch_done);
    let mut requests = controls.requests();
    requests.sort_by_key(|range| range.start);
    assert_eq!(requests, vec![span(0), span(2)]);
    for c in &layer.files[1].chunks {
        assert!(!cache.contains(&c.digest), "a skipped chunk was fetched");
    }
    let sent: u64 = requests.iter().map(|range| range.end - range.start).sum();
    assert_eq!(r.stats().prefetch_bytes, sent);
}

#[test]
fn background_fill_yields_to_on_demand_reads_then_fills_everything() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(70 + i, 3 * CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"BG");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let scheduler = scheduler(1, 4 * CHUNK as u64);
    let opts = FetchOptions {
        background: true,
        scheduler: Arc::clone(&scheduler),
        ..quiet_options()
    };
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        opts,
        "background",
    );
    // An on-demand read is in flight (e.g. in another layer) before the fill starts.
    let waiting = scheduler.on_demand();
    r.start_prefetch(None);
    wait_until("prefetch phase done", || r.stats().prefetch_done);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        controls.requests().is_empty(),
        "background fill ran while an on-demand read was waiting: {:?}",
        controls.requests()
    );
    // The layer's own on-demand reads still go through meanwhile.
    assert_eq!(
        &read_blocking(&r, 2, 10, 20).unwrap()[..],
        &contents[2][10..30]
    );
    assert_eq!(controls.requests().len(), 1);
    drop(waiting);
    wait_until("background fill done", || r.stats().background_done);
    let stats = r.stats();
    assert_eq!(stats.fetched_chunks, stats.total_chunks);
    assert!(stats.background_bytes > 0);
    assert_eq!(
        stats.on_demand_bytes,
        layer.files[2].chunks[0].compressed.end - layer.files[2].chunks[0].compressed.start
    );
    // Requests were coalesced (at most two chunks each), none repeated.
    for c in layer.files.iter().flat_map(|f| &f.chunks) {
        assert_eq!(controls.count_covering(&c.compressed), 1);
    }
    assert!(controls.requests().len() < 12);
}

#[test]
fn shutdown_stops_background_fill() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..10).map(|i| pseudo_random(80 + i, 2 * CHUNK)).collect();
    let layer = build_layer(contents, CHUNK, Compression::Gzip, b"SD");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    controls.delay_ms.store(200, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        background: true,
        ..quiet_options()
    };
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        opts,
        "shutdown",
    );
    r.start_prefetch(None);
    wait_until("a background request", || !controls.requests().is_empty());
    r.shutdown();
    std::thread::sleep(Duration::from_millis(600));
    let after = controls.requests().len();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        controls.requests().len(),
        after,
        "requests continued after shutdown"
    );
    assert!(!r.stats().background_done);
    assert!(after < 20);
}

/// Everything in `file`.
fn file_bytes(file: &std::fs::File) -> Vec<u8> {
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut &*file, &mut data).unwrap();
    data
}

/// Asks for file `index`'s local file until the layer has assembled `assembled` files.
fn local_file_once_assembled(r: &LayerReader, index: u64, assembled: u64) -> Option<std::fs::File> {
    for _ in 0..500 {
        let file = r.local_file(index);
        if r.stats().files_assembled >= assembled {
            return r.local_file(index);
        }
        drop(file);
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("file {index} was not assembled within 10 s");
}

#[test]
fn cached_files_offer_a_local_file_for_passthrough() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents = vec![pseudo_random(90, 500), pseudo_random(91, 2500)];
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"LF");
    let (blob, _c) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "local",
    );
    assert!(r.local_file(0).is_none(), "not cached yet");
    assert!(r.local_file(1).is_none(), "not cached yet");
    read_blocking(&r, 0, 0, 1000).unwrap();
    read_blocking(&r, 1, 0, 5000).unwrap();
    let file = r.local_file(0).expect("single cached chunk");
    assert_eq!(file_bytes(&file), contents[0]);
    // A file of three chunks: the first open once all are cached assembles it in the
    // background; later opens get the assembled file.
    assert_eq!(r.stats().files_assembled, 0);
    let file = local_file_once_assembled(&r, 1, 1).expect("assembled multi-chunk file");
    assert_eq!(file_bytes(&file), contents[1]);
    // A second layer with the same file checks the assembled file against its own chunks
    // (without writing it again) before it passes through too.
    let (blob, _c) = TestBlob::new(layer.blob.clone());
    let again = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "local-again",
    );
    let file = local_file_once_assembled(&again, 1, 1).expect("checked assembled file");
    assert_eq!(file_bytes(&file), contents[1]);
}

#[test]
fn files_whose_digest_disagrees_with_their_chunks_are_never_assembled() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents = vec![pseudo_random(92, 2500), pseudo_random(93, 3500)];
    let mut layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"LD");
    // File 0 claims file 1's content digest: assembling it must not store its bytes under it.
    layer.files[0].file_digest = Some(digest(&contents[1]));
    let (blob, _c) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "lying",
    );
    assert_eq!(read_blocking(&r, 0, 0, 5000).unwrap(), contents[0]);
    read_blocking(&r, 1, 0, 5000).unwrap();
    // File 1 gets assembled; file 0 never is, and file 1's entry keeps file 1's bytes.
    let file = local_file_once_assembled(&r, 1, 1).expect("file 1 assembled");
    for _ in 0..20 {
        assert!(r.local_file(0).is_none());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(r.stats().files_assembled, 1);
    assert_eq!(file_bytes(&file), contents[1]);
    assert_eq!(read_blocking(&r, 0, 0, 5000).unwrap(), contents[0]);
}

/// A reader of a layer holding one file, `content` in chunks of [`CHUNK`], whose blob source
/// streams in 100-byte pieces under test controls; its cache (under `dir`, one per compression)
/// keeps nothing in memory.
fn streaming_reader(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    content: &[u8],
    compression: Compression,
    options: FetchOptions,
) -> (TestLayer, Arc<Controls>, Arc<ChunkCache>, Arc<LayerReader>) {
    let layer = build_layer(vec![content.to_vec()], CHUNK, compression, b"ST");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(&dir.join(format!("{compression:?}")), 1 << 30, 0);
    let r = reader(rt, blob, &layer, compression, &cache, options, "stream");
    (layer, controls, cache, r)
}

#[test]
fn a_chunk_streams_in_pieces_and_a_broken_stream_is_retried_whole() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(40, 3 * CHUNK);
    for compression in [Compression::Gzip, Compression::Zstd] {
        let (layer, controls, cache, r) =
            streaming_reader(&rt, dir.path(), &content, compression, quiet_options());
        // A read waiting on one chunk streams it (in 100-byte pieces here).
        assert_eq!(
            &read_blocking(&r, 0, 10, 100).unwrap()[..],
            &content[10..110]
        );
        assert_eq!(controls.streams.load(Ordering::SeqCst), 1);
        // A stream broken half way: the chunk is fetched again, and reads right.
        controls.break_streams.store(1, Ordering::SeqCst);
        let at = CHUNK as u64 + 7;
        assert_eq!(
            &read_blocking(&r, 0, at, 200).unwrap()[..],
            &content[at as usize..at as usize + 200]
        );
        assert_eq!(controls.break_streams.load(Ordering::SeqCst), 0);
        assert_eq!(
            controls.count_covering(&layer.files[0].chunks[1].compressed),
            2
        );
        // Corrupt bytes arriving by stream are refused like buffered ones.
        let last = &layer.files[0].chunks[2];
        let middle = (last.compressed.start + last.compressed.end) / 2;
        controls.corrupt_at.store(middle, Ordering::SeqCst);
        assert_eq!(read_blocking(&r, 0, 2 * CHUNK as u64, 10), Err(libc::EIO));
        assert!(!cache.contains(&last.digest));
    }
}

/// A read of several cold chunks streams them in one request, each decoded as soon as its bytes
/// are in; when that stream breaks, the chunks that had all their bytes keep their verdict and
/// only the rest are fetched again.
#[test]
fn a_run_of_chunks_streams_in_one_request_and_a_break_refetches_only_the_unfinished() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(41, 8 * CHUNK);
    let four = 4 * CHUNK as u64;
    for compression in [Compression::Gzip, Compression::Zstd] {
        let (layer, controls, cache, r) =
            streaming_reader(&rt, dir.path(), &content, compression, quiet_options());
        let chunks = &layer.files[0].chunks;
        let first_half = chunks[0].compressed.start..chunks[3].compressed.end;
        assert_eq!(
            &read_blocking(&r, 0, 0, four as u32).unwrap()[..],
            &content[..four as usize]
        );
        assert_eq!(controls.streams.load(Ordering::SeqCst), 1);
        assert_eq!(controls.requests(), vec![first_half]);
        controls.break_streams.store(1, Ordering::SeqCst);
        assert_eq!(
            &read_blocking(&r, 0, four, four as u32).unwrap()[..],
            &content[four as usize..]
        );
        assert_eq!(controls.break_streams.load(Ordering::SeqCst), 0);
        assert_eq!(
            controls.count_covering(&chunks[4].compressed),
            1,
            "{compression:?}"
        );
        assert_eq!(
            controls.count_covering(&chunks[7].compressed),
            2,
            "{compression:?}"
        );
        for c in chunks {
            assert!(cache.contains(&c.digest));
        }
    }
}

/// On a slow link a long run keeps streaming past `attempt_timeout`, which is for a request that
/// stops sending, not for one that takes long: one request, never retried.
#[test]
fn a_slow_link_streams_a_long_run_past_the_attempt_timeout() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(42, 8 * CHUNK);
    let options = FetchOptions {
        attempt_timeout: Duration::from_millis(300),
        ..quiet_options()
    };
    let (layer, controls, _cache, r) =
        streaming_reader(&rt, dir.path(), &content, Compression::Gzip, options);
    // About 8 KB compressed at 10 KB/s: 0.8 s, in 100-byte pieces 10 ms apart.
    controls
        .stream_bytes_per_sec
        .store(10_000, Ordering::SeqCst);
    assert_eq!(
        &read_blocking(&r, 0, 0, (8 * CHUNK) as u32).unwrap()[..],
        &content[..]
    );
    let run = layer.files[0].chunks[0].compressed.start..layer.files[0].chunks[7].compressed.end;
    assert_eq!(controls.requests(), vec![run]);
}

#[test]
fn inconsistent_chunk_lists_read_as_eio() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut layer = build_layer(
        vec![pseudo_random(95, 2 * CHUNK)],
        CHUNK,
        Compression::Gzip,
        b"X",
    );
    layer.files[0].size += 5;
    let (blob, _c) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "bad-toc",
    );
    assert_eq!(read_blocking(&r, 0, 0, 10), Err(libc::EIO));
}

#[test]
fn background_fill_respects_its_concurrency_limit_across_layers() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..8).map(|i| pseudo_random(100 + i, 2 * CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"CL");
    // Two layers (as of two images) on one source, so that its count of requests in flight
    // covers both: the window would allow two requests at once, the concurrency limit one.
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    controls.delay_ms.store(50, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        background: true,
        scheduler: scheduler(1, 4 * CHUNK as u64),
        ..quiet_options()
    };
    let readers: Vec<_> = ["limits-a", "limits-b"]
        .into_iter()
        .map(|name| {
            let r = reader(
                &rt,
                Arc::clone(&blob) as Arc<dyn BlobSource>,
                &layer,
                Compression::Gzip,
                &cache,
                opts.clone(),
                name,
            );
            r.start_prefetch(None);
            r
        })
        .collect();
    for r in &readers {
        wait_until("background fill done", || r.stats().background_done);
    }
    let max = controls.max_in_flight.load(Ordering::SeqCst);
    assert_eq!(max, 1, "{max} background requests in flight at once");
    for c in layer.files.iter().flat_map(|f| &f.chunks) {
        assert_eq!(controls.count_covering(&c.compressed), 1);
    }
    let requests = controls.requests().len();
    for (i, content) in contents.iter().enumerate() {
        assert_eq!(
            &read_blocking(&readers[1], i as u64, 0, 1 << 20).unwrap()[..],
            &content[..]
        );
    }
    assert_eq!(controls.requests().len(), requests);
}

/// Two layers (blobs laid out differently) holding the same one-chunk file: its content, then
/// each layer with its source and the source's controls.
#[allow(clippy::type_complexity)]
fn two_layers_sharing_a_file(
    seed: u64,
) -> (
    Vec<u8>,
    (TestLayer, Arc<dyn BlobSource>, Arc<Controls>),
    (TestLayer, Arc<dyn BlobSource>, Arc<Controls>),
) {
    let shared = pseudo_random(seed, CHUNK);
    let layer = |prefix: &[u8]| {
        let layer = build_layer(vec![shared.clone()], CHUNK, Compression::Gzip, prefix);
        let (blob, controls) = TestBlob::new(layer.blob.clone());
        (layer, blob as Arc<dyn BlobSource>, controls)
    };
    let (a, b) = (layer(b"A"), layer(b"BB"));
    (shared, a, b)
}

#[test]
fn fill_all_waits_for_a_chunk_another_layer_is_fetching() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (_, (layer_a, blob_a, _), (layer_b, blob_b, ctl_b)) = two_layers_sharing_a_file(122);
    // Layer B's slow source streams the shared chunk when A is asked to fill everything.
    ctl_b.delay_ms.store(400, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = quiet_options();
    let rb = reader(
        &rt,
        blob_b,
        &layer_b,
        Compression::Gzip,
        &cache,
        opts.clone(),
        "b",
    );
    let ra = reader(&rt, blob_a, &layer_a, Compression::Gzip, &cache, opts, "a");
    let filling_b = {
        let rb = Arc::clone(&rb);
        rt.spawn(async move { rb.fill_all().await })
    };
    wait_until("layer B fetching", || !ctl_b.requests().is_empty());
    // A's fill returns with its chunks in the cache, not merely claimed by B's stream.
    rt.block_on(ra.fill_all());
    let stats = ra.stats();
    assert_eq!(stats.fetched_chunks, stats.total_chunks);
    rt.block_on(filling_b).unwrap();
}

#[test]
fn a_layer_shutting_down_mid_fetch_does_not_fail_readers_of_other_layers() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (shared, (layer_a, blob_a, ctl_a), (layer_b, blob_b, ctl_b)) =
        two_layers_sharing_a_file(120);
    // Layer B's source stalls, so B's on-demand read holds the shared chunk's claim.
    ctl_b.hang.store(true, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = quiet_options();
    let rb = reader(
        &rt,
        blob_b,
        &layer_b,
        Compression::Gzip,
        &cache,
        opts.clone(),
        "b",
    );
    let stuck = {
        let rb = Arc::clone(&rb);
        std::thread::spawn(move || read_blocking(&rb, 0, 0, 100))
    };
    wait_until("layer B fetching", || !ctl_b.requests().is_empty());
    let ra = reader(&rt, blob_a, &layer_a, Compression::Gzip, &cache, opts, "a");
    let pending = {
        let ra = Arc::clone(&ra);
        std::thread::spawn(move || read_blocking(&ra, 0, 0, 100))
    };
    // A's read waits on B's fetch of the same chunk (same priority); then B goes away.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        ctl_a.requests().is_empty(),
        "A should have joined B's fetch"
    );
    rb.shutdown();
    assert_eq!(&pending.join().unwrap().unwrap()[..], &shared[..100]);
    assert_eq!(ctl_a.requests().len(), 1);
    // B's own read ends either way (EIO, or the copy A fetched): it must not hang.
    let _ = stuck.join().unwrap();
}

#[test]
fn an_on_demand_read_overtakes_a_stalled_background_fetch_of_its_chunk() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (shared, (layer_a, blob_a, ctl_a), (layer_b, blob_b, ctl_b)) =
        two_layers_sharing_a_file(121);
    // Layer B's background fill claims the shared chunk and its source stalls.
    ctl_b.hang.store(true, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = quiet_options();
    let rb = reader(
        &rt,
        blob_b,
        &layer_b,
        Compression::Gzip,
        &cache,
        FetchOptions {
            background: true,
            ..opts.clone()
        },
        "b",
    );
    rb.start_prefetch(None);
    wait_until("layer B fetching", || !ctl_b.requests().is_empty());
    let ra = reader(&rt, blob_a, &layer_a, Compression::Gzip, &cache, opts, "a");
    // A's read does not wait behind B's stalled stream: it fetches the chunk itself.
    assert_eq!(&read_blocking(&ra, 0, 0, 100).unwrap()[..], &shared[..100]);
    assert_eq!(ctl_a.requests().len(), 1);
    rb.shutdown();
}

#[test]
fn a_miss_reads_ahead_the_files_that_follow_in_the_blob() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(130 + i, CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"RA");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        readahead: true,
        ..quiet_options()
    };
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        opts,
        "readahead",
    );
    // A miss on file 3 brings files 4 and 5 (the rest of the blob) with it.
    assert_eq!(
        &read_blocking(&r, 3, 0, 4096).unwrap()[..],
        &contents[3][..]
    );
    let span = |from: usize, to: usize| {
        layer.files[from].chunks[0].compressed.start..layer.files[to].chunks[0].compressed.end
    };
    assert_eq!(controls.requests(), vec![span(3, 5)]);
    // File 3 is cached now: read-ahead from file 0 stops before it.
    assert_eq!(
        &read_blocking(&r, 0, 0, 4096).unwrap()[..],
        &contents[0][..]
    );
    assert_eq!(controls.requests(), vec![span(3, 5), span(0, 2)]);
    for i in [1, 2, 4, 5] {
        assert_eq!(
            &read_blocking(&r, i, 0, 4096).unwrap()[..],
            &contents[i as usize][..]
        );
    }
    assert_eq!(
        controls.requests().len(),
        2,
        "the other files came with the misses"
    );
}

#[test]
fn read_ahead_stays_in_the_directory_of_the_miss() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(140 + i, CHUNK)).collect();
    let mut layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"RD");
    for (file, name) in
        layer
            .files
            .iter_mut()
            .zip(["pkg/a", "pkg/b", "pkg/c", "pkg/sub/d", "pkg/sub/e", "top"])
    {
        file.name = name.to_string();
    }
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        readahead: true,
        ..quiet_options()
    };
    let r = reader(&rt, blob, &layer, Compression::Gzip, &cache, opts, "dir-ra");
    let span = |from: usize, to: usize| {
        layer.files[from].chunks[0].compressed.start..layer.files[to].chunks[0].compressed.end
    };
    // A miss on pkg/b brings pkg/c, and stops at pkg/sub/d (another directory).
    assert_eq!(
        &read_blocking(&r, 1, 0, 4096).unwrap()[..],
        &contents[1][..]
    );
    assert_eq!(controls.requests(), vec![span(1, 2)]);
    // A miss on pkg/sub/d brings pkg/sub/e, not the file at the root after it.
    assert_eq!(
        &read_blocking(&r, 3, 0, 4096).unwrap()[..],
        &contents[3][..]
    );
    assert_eq!(controls.requests(), vec![span(1, 2), span(3, 4)]);
    for i in [2, 4] {
        assert_eq!(
            &read_blocking(&r, i, 0, 4096).unwrap()[..],
            &contents[i as usize][..]
        );
    }
    assert_eq!(controls.requests().len(), 2);
    assert_eq!(
        &read_blocking(&r, 5, 0, 4096).unwrap()[..],
        &contents[5][..]
    );
    assert_eq!(
        controls.requests().len(),
        3,
        "the root file was not read ahead"
    );
}
