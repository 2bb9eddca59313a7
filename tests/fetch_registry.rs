//! LayerReader against the real Distribution registry on 127.0.0.1 with eStargz layers built by
//! the project's writer: every file reads back exactly, a small read costs the TOC plus at most
//! two chunks, a second layer sharing a file fetches none of its chunks, and a stopped registry
//! gives EIO for uncached reads (cached ones keep working) until it is restarted.

mod fetch_common;
use fetch_common::{runtime, tar_of, wait_until};
use lazysnap_testbed::images::incompressible_bytes as incompressible;

use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use lazysnap::blob::BlobSource;
use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::estargz::{self, BuildOptions, Compression, EntryKind};
use lazysnap::fetch::{FetchOptions, FetchScheduler, LayerFiles, LayerReader, SchedulerOptions};
use lazysnap::registry::{Client, ClientConfig, Reference};
use lazysnap_fuse::ContentSource;
use lazysnap_testbed::{LinkEmulator, LinkProfile, RegistryServer};

const CHUNK: u64 = 256 << 10;

struct Pushed {
    digest: lazysnap::digest::Digest,
    size: u64,
    toc_digest: lazysnap::digest::Digest,
}

fn build_and_push(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    repo: &Reference,
    files: &BTreeMap<String, Vec<u8>>,
) -> Pushed {
    let mut blob = Vec::new();
    let opts = BuildOptions {
        chunk_size: CHUNK,
        ..BuildOptions::new(Compression::Gzip)
    };
    let built = estargz::build_layer(&tar_of(files)[..], &mut blob, &opts).unwrap();
    rt.block_on(client.push_blob_bytes(repo, &built.blob_digest, Bytes::from(blob)))
        .unwrap();
    Pushed {
        digest: built.blob_digest,
        size: built.blob_size,
        toc_digest: built.toc_digest,
    }
}

/// Reads of what a process asks for only: no prefetch, background fill or read-ahead.
fn on_demand_only() -> FetchOptions {
    FetchOptions {
        deadline: Duration::from_secs(8),
        attempt_timeout: Duration::from_secs(3),
        retries: 1,
        prefetch: false,
        background: false,
        readahead: false,
        scheduler: FetchScheduler::new(SchedulerOptions::default()),
        ..FetchOptions::default()
    }
}

/// Opens the layer's TOC through the registry and makes a reader over its regular files.
#[allow(clippy::too_many_arguments)]
fn open_reader(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    repo: &Reference,
    pushed: &Pushed,
    cache: &Arc<ChunkCache>,
    name: &str,
    opts: FetchOptions,
) -> (Arc<LayerReader>, Vec<String>) {
    let blob: Arc<dyn BlobSource> = Arc::new(client.blob(repo, &pushed.digest, pushed.size));
    let toc = rt
        .block_on(estargz::open_layer(blob.as_ref(), Some(&pushed.toc_digest)))
        .unwrap();
    let mut names = Vec::new();
    let mut files = LayerFiles::new();
    for e in toc.entries() {
        if e.kind == EntryKind::Reg {
            names.push(e.path.clone());
            files.push(&e.path, e.size, &e.chunks).unwrap();
        }
    }
    let reader = LayerReader::new(
        blob,
        toc.compression(),
        files,
        Arc::clone(cache),
        opts,
        rt.handle().clone(),
        name,
    );
    (reader, names)
}

fn read_blocking(r: &LayerReader, content: usize, offset: u64, size: u32) -> Result<Bytes, i32> {
    let (tx, rx) = mpsc::channel();
    r.read(
        content as u64,
        offset,
        size,
        Box::new(move |res| {
            let _ = tx.send(res);
        }),
    );
    rx.recv_timeout(Duration::from_secs(120))
        .expect("read never answered: a hang")
}

fn read_file(r: &LayerReader, content: usize, size: usize) -> Result<Vec<u8>, i32> {
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let got = read_blocking(r, content, out.len() as u64, 128 << 10)?;
        assert!(!got.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&got);
    }
    Ok(out)
}

#[test]
fn lazy_reads_through_a_real_registry() {
    let mut registry = RegistryServer::start().expect("docker-registry must be installed");
    let rt = runtime();
    let client = Client::new(ClientConfig {
        request_timeout: Duration::from_secs(3),
        read_deadline: Duration::from_secs(4),
        connect_timeout: Duration::from_secs(2),
        max_retries: 1,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        ..ClientConfig::default()
    })
    .unwrap();
    let repo = Reference::parse(&format!("{}/lazy/layer", registry.host())).unwrap();

    let shared = incompressible(900 << 10, 1);
    let mut first = BTreeMap::new();
    first.insert("app/big.bin".to_string(), incompressible(3 << 20, 2));
    first.insert("app/small.txt".to_string(), incompressible(4096, 3));
    first.insert("lib/shared.so".to_string(), shared.clone());
    first.insert("etc/empty".to_string(), Vec::new());
    let mut second = BTreeMap::new();
    second.insert("lib/shared.so".to_string(), shared.clone());
    second.insert("opt/other.bin".to_string(), incompressible(600 << 10, 4));
    let layer1 = build_and_push(&rt, &client, &repo, &first);
    let layer2 = build_and_push(&rt, &client, &repo, &second);

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(CacheOptions::new(cache_dir.path())).unwrap();
    let (r1, names1) = open_reader(
        &rt,
        &client,
        &repo,
        &layer1,
        &cache,
        "layer1",
        on_demand_only(),
    );
    let index = |names: &[String], path: &str| names.iter().position(|n| n == path).unwrap();

    // One 4 KiB file costs the TOC (already read) plus at most two chunks.
    let toc_bytes = registry.blob_bytes_served(&layer1.digest);
    let small = index(&names1, "app/small.txt");
    assert_eq!(read_file(&r1, small, 4096).unwrap(), first["app/small.txt"]);
    let small_cost = registry.blob_bytes_served(&layer1.digest) - toc_bytes;
    assert!(
        small_cost <= 2 * CHUNK,
        "reading 4 KiB cost {small_cost} bytes from the registry"
    );

    // Every file reads back exactly.
    for (path, data) in &first {
        let got = read_file(&r1, index(&names1, path), data.len()).unwrap();
        assert!(got == *data, "{path} differs");
    }

    // The second layer shares lib/shared.so: none of its chunks are fetched again.
    let (r2, names2) = open_reader(
        &rt,
        &client,
        &repo,
        &layer2,
        &cache,
        "layer2",
        on_demand_only(),
    );
    let before = registry.blob_bytes_served(&layer2.digest);
    let got = read_file(&r2, index(&names2, "lib/shared.so"), shared.len()).unwrap();
    assert!(got == shared);
    assert_eq!(registry.blob_bytes_served(&layer2.digest), before);

    // Registry stopped: cached files keep reading, uncached reads fail with EIO (bounded).
    registry.stop();
    let other = index(&names2, "opt/other.bin");
    assert_eq!(read_blocking(&r2, other, 0, 4096), Err(libc::EIO));
    let got = read_file(&r1, index(&names1, "app/big.bin"), 3 << 20).unwrap();
    assert!(got == first["app/big.bin"]);

    // Registry back: the same read succeeds.
    registry.restart().unwrap();
    let got = read_file(&r2, other, 600 << 10).unwrap();
    assert!(got == second["opt/other.bin"]);
    let stats = r2.stats();
    assert_eq!(stats.fetched_chunks, stats.total_chunks);
    assert!(stats.cache_hits > 0 && stats.on_demand_bytes > 0);
}

/// Sixteen incompressible 256 KiB files `f00`..`f15`, in that order in the blob.
fn sixteen_files() -> BTreeMap<String, Vec<u8>> {
    (0..16)
        .map(|i| (format!("f{i:02}"), incompressible(CHUNK as usize, 100 + i)))
        .collect()
}

#[test]
fn an_on_demand_read_is_answered_before_the_prefetch_stream_reaches_its_chunk() {
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    // 8 Mbit/s and 40 ms: prefetching the 4 MiB layer takes about four seconds.
    let link = LinkEmulator::start(
        registry.host().parse().unwrap(),
        LinkProfile::new(8.0, Duration::from_millis(40)),
    )
    .unwrap();
    let rt = runtime();
    let client = Client::new(ClientConfig::default()).unwrap();
    let files = sixteen_files();
    let pushed = build_and_push(
        &rt,
        &client,
        &Reference::parse(&format!("{}/prio/layer", registry.host())).unwrap(),
        &files,
    );
    let slow = Reference::parse(&format!("{}/prio/layer", link.addr())).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(CacheOptions::new(cache_dir.path())).unwrap();
    let opts = FetchOptions {
        prefetch: true,
        background: false,
        scheduler: FetchScheduler::new(SchedulerOptions::default()),
        ..FetchOptions::default()
    };
    let (reader, names) = open_reader(&rt, &client, &slow, &pushed, &cache, "prio", opts);
    let toc_bytes = registry.blob_bytes_served(&pushed.digest);

    // Every file is prioritized: the prefetch streams the whole layer in blob order.
    reader.start_prefetch(Some((0..pushed.size).into()));
    wait_until("the prefetch streaming", || {
        reader.stats().prefetch_bytes > 0
    });
    let last = names.iter().position(|n| n == "f15").unwrap();
    let got = read_file(&reader, last, CHUNK as usize).unwrap();
    assert!(got == files["f15"]);
    let at_answer = reader.stats();
    assert!(
        !at_answer.prefetch_done,
        "the read waited for the whole prefetch: {at_answer:?}"
    );
    assert!(
        at_answer.on_demand_bytes >= CHUNK,
        "the read's chunk came from its own request: {at_answer:?}"
    );
    assert!(
        at_answer.prefetch_bytes + at_answer.on_demand_bytes < pushed.size,
        "the prefetch had not reached the end of the blob: {at_answer:?}"
    );

    wait_until("the prefetch done", || reader.stats().prefetch_done);
    // The prefetch skipped the chunk the read fetched: nothing was fetched twice.
    let data_bytes = registry.blob_bytes_served(&pushed.digest) - toc_bytes;
    assert!(
        data_bytes <= pushed.size,
        "{data_bytes} bytes fetched for a blob of {}",
        pushed.size
    );
    for (path, data) in &files {
        let index = names.iter().position(|n| n == path).unwrap();
        assert!(read_file(&reader, index, data.len()).unwrap() == *data);
    }
}

#[test]
fn background_fill_starts_only_after_the_quiet_period() {
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    let rt = runtime();
    let client = Client::new(ClientConfig::default()).unwrap();
    let repo = Reference::parse(&format!("{}/quiet/layer", registry.host())).unwrap();
    let files = sixteen_files();
    let pushed = build_and_push(&rt, &client, &repo, &files);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(CacheOptions::new(cache_dir.path())).unwrap();
    let quiet = Duration::from_secs(3);
    let opts = FetchOptions {
        prefetch: false,
        background: true,
        scheduler: FetchScheduler::new(SchedulerOptions {
            quiet_period: quiet,
            ..SchedulerOptions::default()
        }),
        ..FetchOptions::default()
    };
    let (reader, names) = open_reader(&rt, &client, &repo, &pushed, &cache, "quiet", opts);
    reader.start_prefetch(None);
    std::thread::sleep(quiet / 3);
    assert_eq!(
        reader.stats().requests,
        0,
        "background fill started at mount"
    );
    // A read (a container starting) restarts the quiet period.
    let first = names.iter().position(|n| n == "f00").unwrap();
    assert!(read_file(&reader, first, CHUNK as usize).unwrap() == files["f00"]);
    std::thread::sleep(quiet / 3);
    let stats = reader.stats();
    assert_eq!(
        (stats.requests, stats.background_bytes),
        (1, 0),
        "background fill started within the quiet period after a read"
    );
    wait_until("background fill done", || reader.stats().background_done);
    let stats = reader.stats();
    assert_eq!(stats.fetched_chunks, stats.total_chunks);
}
