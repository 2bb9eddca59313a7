//! Layers mounted through the layer manager against the real Distribution registry on
//! 127.0.0.1: a pull asks for every layer's TOC before waiting for any, a TOC digest label
//! cannot get an unverified TOC mounted, a first Prepare reads its layer's tail while the
//! manifest is on its way, and a blob's tail comes with its size from one suffix range.

mod fetch_common;
use fetch_common::{runtime, tar_of};
use lazysnap_testbed::images::incompressible_bytes as incompressible;

use std::collections::BTreeMap;
use std::time::Duration;

use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::fetch::{FetchOptions, FetchScheduler, SchedulerOptions};
use lazysnap::labels;
use lazysnap::registry::{Client, ClientConfig, Reference};
use lazysnap_testbed::RegistryServer;

/// A 3-layer eStargz image pushed as `repo:v1`; returns its layer digests, base first.
fn push_three_layer_image(
    registry: &RegistryServer,
    dir: &std::path::Path,
    repo: &str,
) -> Vec<lazysnap::digest::Digest> {
    use lazysnap::image::{convert_image, ConvertOptions, ImageLocation, NoProgress, OciLayout};
    use lazysnap_testbed::images::{push_layout_image, write_image, ImageOptions};
    let layout = OciLayout::create(&dir.join("oci")).unwrap();
    let layers: Vec<Vec<u8>> = (0..3u64)
        .map(|i| {
            let mut files = BTreeMap::new();
            files.insert(
                format!("layer{i}/data.bin"),
                incompressible(300 << 10, 40 + i),
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
    layers: &[lazysnap::digest::Digest],
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
            layer_digest: layers[i].to_string(),
            image_layers: layers[i..].iter().map(ToString::to_string).collect(),
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
        data == incompressible(300 << 10, 40),
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
    let missing = lazysnap::digest::Digest::parse(&format!("sha256:{}", "1".repeat(64))).unwrap();
    let err = rt
        .block_on(client.blob_tail(&reference, &missing, 100))
        .unwrap_err();
    assert!(err.to_string().contains(missing.as_str()), "{err}");
}
