//! LayerReader against the real Distribution registry on 127.0.0.1 with eStargz layers built by
//! the project's writer: every file reads back exactly, a small read costs the TOC plus at most
//! two chunks, a second layer sharing a file fetches none of its chunks, and a stopped registry
//! gives EIO for uncached reads (cached ones keep working) until it is restarted.

use lazysnap::labels;
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sixteen incompressible 256 KiB files `f00`..`f15`, in that order in the blob.
fn sixteen_files() -> BTreeMap<String, Vec<u8>> {
    (0..16)
        .map(|i| (format!("f{i:02}"), pseudo_random(CHUNK as usize, 100 + i)))
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

/// A 3-layer eStargz image pushed as `repo:v1`; returns its layer digests, base first.
fn push_three_layer_image(
    registry: &RegistryServer,
    dir: &std::path::Path,
    repo: &str,
) -> Vec<String> {
    use lazysnap::image::{convert_image, ConvertOptions, ImageLocation, NoProgress, OciLayout};
    use lazysnap_testbed::images::{push_layout_image, write_image, ImageOptions};
    let layout = OciLayout::create(&dir.join("oci")).unwrap();
    let layers: Vec<Vec<u8>> = (0..3u64)
        .map(|i| {
            let mut files = BTreeMap::new();
            files.insert(
                format!("layer{i}/data.bin"),
                pseudo_random(300 << 10, 40 + i),
            );
            tar_of(&files)
        })
        .collect();
    write_image(&layout, &layers, &ImageOptions::default(), Some("src")).unwrap();
    push_layout_image(&layout, Some("src"), &registry.host(), repo, "src").unwrap();
    let client = Client::new(ClientConfig::default()).unwrap();
    let src = Reference::parse(&format!("{}/{repo}:src", registry.host())).unwrap();
    let dst = Reference::parse(&format!("{}/{repo}:v1", registry.host())).unwrap();
    let report = runtime()
        .block_on(convert_image(
            &client,
            &ImageLocation::Registry(src),
            &ImageLocation::Registry(dst),
            &ConvertOptions::default(),
            &NoProgress,
        ))
        .unwrap();
    let manifest_bytes =
        lazysnap_testbed::images::fetch_manifest(&registry.url(), repo, "v1").unwrap();
    let manifest: lazysnap::image::Manifest =
        lazysnap::image::parse_json("manifest", &manifest_bytes).unwrap();
    drop(report);
    manifest.layers.iter().map(|l| l.digest.clone()).collect()
}

/// A [`LayerManager`](lazysnap::layer::LayerManager) on a cache in `dir`, fetching on demand
/// only.
fn on_demand_layer_manager(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> lazysnap::layer::LayerManager {
    let cache = ChunkCache::open(CacheOptions::new(dir.join("cache"))).unwrap();
    lazysnap::layer::LayerManager::new(
        Client::new(ClientConfig::default()).unwrap(),
        cache,
        rt.handle().clone(),
        lazysnap::layer::LayerManagerOptions {
            fetch: FetchOptions {
                prefetch: false,
                background: false,
                scheduler: FetchScheduler::new(SchedulerOptions::default()),
                ..FetchOptions::default()
            },
            ..lazysnap::layer::LayerManagerOptions::default()
        },
    )
}

/// The remote-layer request containerd's Prepare of `layers[i]` of `image_ref` becomes (stargz
/// labels), mounting at `mountpoint`.
fn remote_layer_request(
    image_ref: &str,
    layers: &[String],
    i: usize,
    toc_digest: Option<String>,
    mountpoint: std::path::PathBuf,
) -> lazysnap::snapshotter::remote::RemoteLayerRequest {
    use lazysnap::snapshotter::remote::{LayerLocator, LocatorSource, RemoteLayerRequest};
    std::fs::create_dir_all(&mountpoint).unwrap();
    RemoteLayerRequest {
        target: format!("target-{i}"),
        key: format!("key-{i}"),
        parent: String::new(),
        labels: BTreeMap::new(),
        locator: LayerLocator {
            image_ref: image_ref.to_string(),
            layer_digest: layers[i].clone(),
            image_layers: layers[i..].to_vec(),
            toc_digest,
            source: LocatorSource::Stargz,
        },
        mountpoint,
        lower_dirs: Vec::new(),
    }
}

#[test]
fn a_pull_asks_for_the_tocs_of_all_layers_before_waiting_for_any() {
    use lazysnap::snapshotter::remote::RemoteLayers;
    use lazysnap_testbed::{Fault, FaultProxy, ProxyEvent};
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts FUSE filesystems: run it as root"
    );
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    let dir = tempfile::tempdir().unwrap();
    let layers = push_three_layer_image(&registry, dir.path(), "toc/app");
    assert_eq!(layers.len(), 3);
    // Each layer's first request is held 300 ms: a pull that waits for one layer's TOC before
    // asking for the next shows as an answer between two arrivals.
    let proxy = FaultProxy::start(&registry.host()).unwrap();
    for digest in &layers {
        proxy.inject(digest, Fault::Delay(Duration::from_millis(300)));
    }
    let rt = runtime();
    let manager = on_demand_layer_manager(&rt, dir.path());
    let image_ref = format!("{}/toc/app:v1", proxy.host());
    let request = |i: usize| {
        remote_layer_request(
            &image_ref,
            &layers,
            i,
            None,
            dir.path().join(format!("mnt{i}")),
        )
    };
    let blob_events = || -> Vec<ProxyEvent> {
        proxy
            .events()
            .into_iter()
            .filter(|e| {
                let (ProxyEvent::Arrived(t) | ProxyEvent::Answered(t)) = e;
                layers.iter().any(|digest| t.contains(digest.as_str()))
            })
            .collect()
    };
    // containerd prepares the layers one after another.
    rt.block_on(manager.mount_layer(&request(0))).unwrap();
    let after_first = blob_events();
    let first_answer = after_first
        .iter()
        .position(|e| matches!(e, ProxyEvent::Answered(_)))
        .unwrap();
    for digest in &layers {
        assert!(
            after_first[..first_answer]
                .iter()
                .any(|e| matches!(e, ProxyEvent::Arrived(t) if t.contains(digest.as_str()))),
            "layer {digest}'s TOC was not asked for before the first answer: {after_first:?}"
        );
    }
    for i in 1..3 {
        rt.block_on(manager.mount_layer(&request(i))).unwrap();
    }
    assert_eq!(
        blob_events().len(),
        after_first.len(),
        "later Prepares read their TOCs again"
    );
    for i in 0..3 {
        let mountpoint = dir.path().join(format!("mnt{i}"));
        assert!(mountpoint.join(format!("layer{i}/data.bin")).is_file());
        rt.block_on(manager.unmount_layer(&mountpoint)).unwrap();
    }
}

#[test]
fn a_toc_digest_label_cannot_get_an_unverified_toc_mounted() {
    use lazysnap::snapshotter::remote::RemoteLayers;
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts FUSE filesystems: run it as root"
    );
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    let dir = tempfile::tempdir().unwrap();
    let layers = push_three_layer_image(&registry, dir.path(), "label/app");
    let rt = runtime();
    let manager = on_demand_layer_manager(&rt, dir.path());
    // The labels name a TOC digest other than that of the TOC the registry serves (a label
    // cannot vouch for bytes): the layer is not mounted.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let mountpoint = dir.path().join("mnt");
    let image_ref = format!("{}/label/app:v1", registry.host());
    let request = remote_layer_request(
        &image_ref,
        &layers,
        0,
        Some(wrong.clone()),
        mountpoint.clone(),
    );
    let err = rt.block_on(manager.mount_layer(&request)).unwrap_err();
    assert!(err.to_string().contains(&wrong), "{err}");
    assert_eq!(
        std::fs::read_dir(&mountpoint).unwrap().count(),
        0,
        "nothing mounted"
    );
}

#[test]
fn a_first_prepare_reads_its_layers_tail_while_the_manifest_is_on_its_way() {
    use lazysnap::snapshotter::remote::RemoteLayers;
    use lazysnap_testbed::{Fault, FaultProxy, ProxyEvent};
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts FUSE filesystems: run it as root"
    );
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    let dir = tempfile::tempdir().unwrap();
    let layers = push_three_layer_image(&registry, dir.path(), "tail/app");
    let manifest: lazysnap::image::Manifest = lazysnap::image::parse_json(
        "manifest",
        &lazysnap_testbed::images::fetch_manifest(&registry.url(), "tail/app", "v1").unwrap(),
    )
    .unwrap();
    let toc_digest = manifest.layers[0].annotations[labels::TOC_DIGEST].clone();
    // The manifest is held 1 s: a Prepare that waits for it before asking for its layer's tail
    // shows the manifest answered before that request arrives.
    let proxy = FaultProxy::start(&registry.host()).unwrap();
    proxy.inject("/manifests/", Fault::Delay(Duration::from_secs(1)));
    let rt = runtime();
    let manager = on_demand_layer_manager(&rt, dir.path());
    let image_ref = format!("{}/tail/app:v1", proxy.host());
    let mountpoint = dir.path().join("mnt0");
    let request =
        remote_layer_request(&image_ref, &layers, 0, Some(toc_digest), mountpoint.clone());
    rt.block_on(manager.mount_layer(&request)).unwrap();
    let events = proxy.events();
    let manifest_answered = events
        .iter()
        .position(|e| matches!(e, ProxyEvent::Answered(t) if t.contains("/manifests/")))
        .unwrap();
    let tail_asked = events
        .iter()
        .position(|e| matches!(e, ProxyEvent::Arrived(t) if t.contains(layers[0].as_str())))
        .unwrap();
    assert!(
        tail_asked < manifest_answered,
        "the layer's tail was asked for only after the manifest came: {events:?}"
    );
    // The layer mounted from that tail reads right.
    let data = std::fs::read(mountpoint.join("layer0/data.bin")).unwrap();
    assert!(
        data == pseudo_random(300 << 10, 40),
        "layer0/data.bin read back wrong"
    );
    rt.block_on(manager.unmount_layer(&mountpoint)).unwrap();
}

#[test]
fn a_blobs_tail_comes_with_its_size_from_one_suffix_range() {
    let registry = RegistryServer::start().expect("docker-registry must be installed");
    let dir = tempfile::tempdir().unwrap();
    let layers = push_three_layer_image(&registry, dir.path(), "suffix/app");
    let blob_file = dir.path().join("layer1.blob");
    lazysnap_testbed::images::fetch_blob(&registry.url(), "suffix/app", &layers[1], &blob_file)
        .unwrap();
    let whole = std::fs::read(&blob_file).unwrap();
    let client = Client::new(ClientConfig::default()).unwrap();
    let reference = Reference::parse(&format!("{}/suffix/app:v1", registry.host())).unwrap();
    let rt = runtime();
    for len in [
        1u64,
        51,
        65536,
        whole.len() as u64,
        whole.len() as u64 + 1000,
    ] {
        let (blob, tail) = rt
            .block_on(client.blob_tail(&reference, &layers[1], len))
            .unwrap();
        assert_eq!(lazysnap::blob::BlobSource::size(&blob), whole.len() as u64);
        let expected = &whole[whole.len().saturating_sub(len as usize)..];
        assert!(tail == expected, "the last {len} bytes read back wrong");
    }
    let missing = format!("sha256:{}", "1".repeat(64));
    let err = rt
        .block_on(client.blob_tail(&reference, &missing, 100))
        .unwrap_err();
    assert!(err.to_string().contains(&missing), "{err}");
}
