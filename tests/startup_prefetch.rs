//! The startup prefetch through the real registry and FUSE, as containerd's Prepares drive it:
//! mounting an image's layers fetches what every container of it reads first (the program its
//! config names, found through PATH and a symlink in the layer above; /etc/passwd, /etc/group
//! and /etc/ld.so.cache, each from the layer that shows it), and nothing else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::fetch::{FetchOptions, FetchScheduler, SchedulerOptions};
use lazysnap::image::{convert_image, ConvertOptions, ImageLocation, NoProgress, OciLayout};
use lazysnap::layer::{LayerManager, LayerManagerOptions};
use lazysnap::registry::{Client, ClientConfig, Reference};
use lazysnap::snapshotter::remote::{
    LayerLocator, LocatorSource, RemoteLayerRequest, RemoteLayers,
};
use lazysnap_testbed::images::{
    incompressible_bytes, push_layout_image, write_image, ImageOptions,
};
use lazysnap_testbed::RegistryServer;

/// A tar of regular files and (`Err(target)`) symlinks.
fn tar_of(entries: &[(&str, Result<Vec<u8>, &str>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(1_700_000_000);
        match content {
            Ok(data) => {
                header.set_size(data.len() as u64);
                header.set_mode(0o755);
                header.set_entry_type(tar::EntryType::Regular);
                builder.append_data(&mut header, path, &data[..]).unwrap();
            }
            Err(target) => {
                header.set_size(0);
                header.set_mode(0o777);
                header.set_entry_type(tar::EntryType::Symlink);
                builder.append_link(&mut header, path, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// containerd's Prepare of `layers[i]` (base first) of `image_ref`, stacked on the mounts of
/// the layers below.
fn prepare(
    image_ref: &str,
    layers: &[lazysnap::digest::Digest],
    i: usize,
    dir: &Path,
) -> RemoteLayerRequest {
    let mountpoint = dir.join(format!("mnt{i}"));
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
            toc_digest: None,
            source: LocatorSource::Stargz,
        },
        mountpoint,
        lower_dirs: (0..i).rev().map(|b| dir.join(format!("mnt{b}"))).collect(),
    }
}

fn fetched_chunks(manager: &LayerManager) -> BTreeMap<PathBuf, u64> {
    manager
        .mounted_layers()
        .into_iter()
        .map(|layer| (layer.mountpoint, layer.stats.fetched_chunks))
        .collect()
}

#[test]
fn mounting_an_image_fetches_its_program_and_what_every_start_reads_and_nothing_else() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts FUSE filesystems: run it as root"
    );
    let mut registry = RegistryServer::start().expect("docker-registry must be installed");
    let dir = tempfile::tempdir().unwrap();
    let program = incompressible_bytes(300 << 10, 1);
    let base_group = b"root:x:0:\n".to_vec();
    let top_group = b"root:x:0:\napp:x:100:\n".to_vec();
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n".to_vec();
    let ld_cache = incompressible_bytes(20 << 10, 2);
    let base = tar_of(&[
        ("etc/group", Ok(base_group)),
        ("etc/ld.so.cache", Ok(ld_cache.clone())),
        ("etc/passwd", Ok(passwd.clone())),
        ("usr/bin/prog", Ok(program.clone())),
        ("usr/bin/unused", Ok(incompressible_bytes(300 << 10, 3))),
        ("usr/share/doc/big", Ok(incompressible_bytes(1 << 20, 4))),
    ]);
    // The layer above names the program under another name, in a directory earlier in PATH,
    // and shadows /etc/group.
    let top = tar_of(&[
        ("etc/group", Ok(top_group.clone())),
        ("usr/local/bin/app", Err("/usr/bin/prog")),
        (
            "usr/local/share/other",
            Ok(incompressible_bytes(200 << 10, 5)),
        ),
    ]);
    let layout = OciLayout::create(&dir.path().join("oci")).unwrap();
    let options = ImageOptions {
        cmd: vec!["app".into(), "--serve".into()],
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        ..ImageOptions::default()
    };
    write_image(&layout, &[base, top], &options, Some("src")).unwrap();
    push_layout_image(&layout, Some("src"), &registry.host(), "startup/app", "src").unwrap();
    let rt = runtime();
    let client = Client::new(ClientConfig::default()).unwrap();
    let image_ref = format!("{}/startup/app:v1", registry.host());
    rt.block_on(convert_image(
        &client,
        &ImageLocation::Registry(
            Reference::parse(&format!("{}/startup/app:src", registry.host())).unwrap(),
        ),
        &ImageLocation::Registry(Reference::parse(&image_ref).unwrap()),
        &ConvertOptions::default(),
        &NoProgress,
    ))
    .unwrap();
    let manifest: lazysnap::image::Manifest = lazysnap::image::parse_json(
        "manifest",
        &lazysnap_testbed::images::fetch_manifest(&registry.url(), "startup/app", "v1").unwrap(),
    )
    .unwrap();
    let layers: Vec<lazysnap::digest::Digest> =
        manifest.layers.iter().map(|l| l.digest.clone()).collect();

    // Prefetch on, but no background fill and no read-ahead: only the startup prefetch fetches.
    let cache = ChunkCache::open(CacheOptions::new(dir.path().join("cache"))).unwrap();
    let manager = LayerManager::new(
        client,
        cache,
        rt.handle().clone(),
        LayerManagerOptions {
            fetch: FetchOptions {
                deadline: Duration::from_secs(2),
                background: false,
                readahead: false,
                scheduler: FetchScheduler::new(SchedulerOptions::default()),
                ..FetchOptions::default()
            },
            startup_prefetch: true,
            ..LayerManagerOptions::default()
        },
    );
    for i in 0..2 {
        rt.block_on(manager.mount_layer(&prepare(&image_ref, &layers, i, dir.path())))
            .unwrap();
    }
    let (mnt0, mnt1) = (dir.path().join("mnt0"), dir.path().join("mnt1"));
    // Base: the program, passwd and the loader's cache (its group is shadowed); top: its group.
    let expected = BTreeMap::from([(mnt0.clone(), 3), (mnt1.clone(), 1)]);
    let started = Instant::now();
    while fetched_chunks(&manager) != expected {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "startup prefetch did not fetch what was expected: {:?}, expected {expected:?}",
            fetched_chunks(&manager)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // With the registry gone, what was prefetched reads right, and nothing else reads.
    registry.stop();
    assert_eq!(std::fs::read(mnt0.join("usr/bin/prog")).unwrap(), program);
    assert_eq!(std::fs::read(mnt0.join("etc/passwd")).unwrap(), passwd);
    assert_eq!(
        std::fs::read(mnt0.join("etc/ld.so.cache")).unwrap(),
        ld_cache
    );
    assert_eq!(std::fs::read(mnt1.join("etc/group")).unwrap(), top_group);
    for unfetched in ["usr/bin/unused", "usr/share/doc/big", "etc/group"] {
        assert!(
            std::fs::read(mnt0.join(unfetched)).is_err(),
            "{unfetched} was fetched"
        );
    }
    assert_eq!(fetched_chunks(&manager), expected, "the reads fetched more");
    for mountpoint in [mnt1, mnt0] {
        rt.block_on(manager.unmount_layer(&mountpoint)).unwrap();
    }
}
