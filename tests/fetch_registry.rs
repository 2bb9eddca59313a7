//! LayerReader against the real Distribution registry on 127.0.0.1 with eStargz layers built by
//! the project's writer: every file reads back exactly, a small read costs the TOC plus at most
//! two chunks, a second layer sharing a file fetches none of its chunks, and a stopped registry
//! gives EIO for uncached reads (cached ones keep working) until it is restarted.

use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use lazysnap::blob::BlobSource;
use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::estargz::{self, BuildOptions, Compression, EntryKind};
use lazysnap::fetch::{FetchOptions, FetchScheduler, LayerFiles, LayerReader, SchedulerOptions};
use lazysnap::registry::{Client, ClientConfig, Reference};
use lazysnap::testbed::RegistryServer;
use lazysnap_fuse::ContentSource;

const CHUNK: u64 = 256 << 10;

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 29) as u8
        })
        .collect()
}

fn tar_of(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
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

struct Pushed {
    digest: String,
    size: u64,
    toc_digest: String,
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

/// Opens the layer's TOC through the registry and makes a reader over its regular files.
fn open_reader(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    repo: &Reference,
    pushed: &Pushed,
    cache: &Arc<ChunkCache>,
    name: &str,
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
    let opts = FetchOptions {
        deadline: Duration::from_secs(8),
        attempt_timeout: Duration::from_secs(3),
        retries: 1,
        prefetch: false,
        background: false,
        scheduler: FetchScheduler::new(SchedulerOptions::default()),
        ..FetchOptions::default()
    };
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
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

    let shared = pseudo_random(900 << 10, 1);
    let mut first = BTreeMap::new();
    first.insert("app/big.bin".to_string(), pseudo_random(3 << 20, 2));
    first.insert("app/small.txt".to_string(), pseudo_random(4096, 3));
    first.insert("lib/shared.so".to_string(), shared.clone());
    first.insert("etc/empty".to_string(), Vec::new());
    let mut second = BTreeMap::new();
    second.insert("lib/shared.so".to_string(), shared.clone());
    second.insert("opt/other.bin".to_string(), pseudo_random(600 << 10, 4));
    let layer1 = build_and_push(&rt, &client, &repo, &first);
    let layer2 = build_and_push(&rt, &client, &repo, &second);

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(CacheOptions::new(cache_dir.path())).unwrap();
    let (r1, names1) = open_reader(&rt, &client, &repo, &layer1, &cache, "layer1");
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
    let (r2, names2) = open_reader(&rt, &client, &repo, &layer2, &cache, "layer2");
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
