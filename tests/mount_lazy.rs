//! `lazysnap mount` end to end, as a user runs it: real registry on loopback, images converted by
//! `lazysnap convert` and by ctr-remote (the fixtures), real FUSE and overlayfs, as root.
//! The lazily mounted tree must equal the same image mounted the non-lazy way (downloaded and
//! unpacked), and a small read must cost only the TOC and the chunks it touches.

mod cli_common;
use cli_common::*;

mod fixtures_common;
mod pull_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use lazysnap_testbed::images;
use lazysnap_testbed::RegistryServer;

/// Directories a tar implies (parents of its entries) without an entry of their own: their
/// mtime is not defined by the layer.
fn implied_dirs(tar: &[u8]) -> std::collections::HashSet<String> {
    let mut archive = tar::Archive::new(tar);
    let mut explicit = std::collections::HashSet::new();
    let mut parents = std::collections::HashSet::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let path = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        if entry.header().entry_type().is_dir() {
            explicit.insert(path.clone());
        }
        let mut parent = Path::new(&path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            parents.insert(dir.to_string_lossy().into_owned());
            parent = dir.parent();
        }
    }
    parents.difference(&explicit).cloned().collect()
}

/// The tree listing of `root` with the undefined mtimes of `implied` directories left out.
fn listing(root: &Path, implied: &std::collections::HashSet<String>) -> Vec<String> {
    images::tree_listing(root)
        .unwrap()
        .into_iter()
        .map(|line| {
            let path = line.split(" dir ").next().unwrap_or_default();
            if line.contains(" dir ") && implied.contains(path) {
                line.split(' ')
                    .filter(|field| !field.starts_with("mtime="))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                line
            }
        })
        .collect()
}

/// The listing of unpacked layer `at` of `plain_layers` (base first) as a lazy layer stacked on
/// the ones before it holds it: without whiteouts of paths no layer below has (those only
/// deleted nothing, and overlayfs would list them; see `lazysnap::layer::LowerLayers`).
fn stacked_listing(
    plain_layers: &[PathBuf],
    at: usize,
    implied: &std::collections::HashSet<String>,
) -> Vec<String> {
    let below =
        lazysnap::layer::LowerLayers::new(plain_layers[..at].iter().rev().cloned().collect());
    listing(&plain_layers[at], implied)
        .into_iter()
        .filter(|line| {
            let path = line.split(' ').next().unwrap_or_default();
            !(line.contains(" char ") && line.contains(" dev=0,0")) || below.has(path)
        })
        .collect()
}

/// The layer directories of a mount (base first), checking each layer's mode in `status`.
fn layer_dirs(mounted: &MountedImage, mode: &str) -> Vec<PathBuf> {
    let status = mounted.status_json();
    let ours = status
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["dir"].as_str() == Some(mounted.dir.to_str().unwrap()))
        .expect("status lists the mount")
        .clone();
    ours["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            assert_eq!(layer["mode"], mode, "{ours:#}");
            PathBuf::from(layer["path"].as_str().unwrap())
        })
        .collect()
}

#[test]
fn lazily_mounted_image_equals_the_unpacked_image() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layers = vec![
        images::busybox_layer().unwrap(),
        images::every_entry_type_layer().unwrap(),
    ];
    let source = push_generated(&registry, work.path(), &layers, "app");
    let esgz = format!("{}/app:esgz", registry.host());
    let zstd = format!("{}/app:zstd", registry.host());
    lazysnap_ok(&["convert", &source, &esgz]);
    lazysnap_ok(&["convert", "--zstdchunked", &source, &zstd]);

    let unpacked = MountedImage::new(&source, work.path(), "plain", &[]);
    let lazy = MountedImage::new(&esgz, work.path(), "esgz", &[]);
    let lazy_zstd = MountedImage::new(&zstd, work.path(), "zstd", &[]);
    // Layer by layer, the lazy FUSE layers (eStargz and zstd:chunked) hold exactly the tree of
    // the downloaded-and-unpacked layers: entries, modes, owners, mtimes, contents, link
    // targets, devices, xattrs, whiteouts as char 0/0 (those of something below) and the opaque
    // xattr.
    let plain_layers = layer_dirs(&unpacked, "unpacked");
    for lazy_mount in [&lazy, &lazy_zstd] {
        let lazy_layers = layer_dirs(lazy_mount, "lazy");
        assert_eq!(lazy_layers.len(), plain_layers.len());
        for (at, (lazy_dir, tar)) in lazy_layers.iter().zip(&layers).enumerate() {
            let implied = implied_dirs(tar);
            let expected = stacked_listing(&plain_layers, at, &implied);
            assert!(expected.len() > 5, "{expected:?}");
            assert_eq!(listing(lazy_dir, &implied), expected);
        }
    }
    // Through overlayfs, the merged view reads the same.
    for path in ["etc/motd", "bin/busybox"] {
        assert_eq!(
            std::fs::read(lazy.dir.join(path)).unwrap(),
            std::fs::read(unpacked.dir.join(path)).unwrap(),
            "{path}"
        );
    }

    // The busybox from the lazy mount runs.
    let out = Command::new(lazy.dir.join("bin/busybox"))
        .args(["echo", "hello from a lazy layer"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a lazy layer\n"
    );
}

/// A layer of 16 files `big/N.bin` of 4 MiB of pseudo-random bytes (seeds from `seed`), plus
/// `extra` (path, content) if given; returns the tar and the 16 contents.
fn big_files_layer(seed: u64, extra: Option<(&str, &[u8])>) -> (Vec<u8>, Vec<Vec<u8>>) {
    let files: Vec<Vec<u8>> = (0..16u64)
        .map(|i| images::pseudo_random_bytes(4 << 20, seed + i))
        .collect();
    let mut tar = tar::Builder::new(Vec::new());
    let named = files
        .iter()
        .enumerate()
        .map(|(i, data)| (format!("big/{i}.bin"), data.as_slice()));
    let extra = extra.map(|(path, data)| (path.to_string(), data));
    for (path, data) in named.chain(extra) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, path, data).unwrap();
    }
    (tar.into_inner().unwrap(), files)
}

#[test]
fn reading_one_small_file_fetches_the_toc_and_at_most_two_chunks() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    // ~64 MiB of incompressible-ish data in 16 files, plus one small file.
    let small = b"small file content\n".repeat(200);
    let (layer, _) = big_files_layer(1, Some(("etc/small.conf", &small)));
    let source = push_generated(&registry, work.path(), &[layer], "big");
    let esgz = format!("{}/big:esgz", registry.host());
    lazysnap_ok(&["convert", &source, &esgz]);

    let manifest: serde_json::Value =
        serde_json::from_slice(&images::fetch_manifest(&registry.host(), "big", "esgz").unwrap())
            .unwrap();
    let layer_digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let layer_size = manifest["layers"][0]["size"].as_u64().unwrap();

    let mounted = MountedImage::new(&esgz, work.path(), "mnt", &["--no-prefetch"]);
    // The registry logs a request once it has answered it: wait for the mount's TOC read to be
    // logged, or it would count as the file read's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while registry.blob_bytes_served(&layer_digest) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = registry.blob_bytes_served(&layer_digest);
    assert_eq!(
        std::fs::read(mounted.dir.join("etc/small.conf")).unwrap(),
        small
    );
    let total = registry.blob_bytes_served(&layer_digest);
    let for_read = total - before;
    // The TOC (read at mount) is small; the small file is one chunk of a few KiB compressed.
    assert!(
        total < 1 << 20,
        "mount + one small read fetched {total} of {layer_size} bytes"
    );
    assert!(
        for_read > 0,
        "the small file's chunk came from the registry"
    );
    assert!(for_read < 64 << 10, "the read fetched {for_read} bytes");

    // The chunk cache holds decompressed image data: root only.
    use std::os::unix::fs::PermissionsExt;
    let cache_mode = std::fs::metadata(work.path().join("cache-mnt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(cache_mode & 0o777, 0o700);

    // The kernel asks a lazy layer for little beyond what is read (fetch.kernel_read_ahead_kb).
    use std::os::unix::fs::MetadataExt;
    let layer_dir = &layer_dirs(&mounted, "lazy")[0];
    let dev = std::fs::metadata(layer_dir).unwrap().dev();
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    assert_eq!(
        std::fs::read_to_string(&bdi).unwrap().trim(),
        lazysnap::layer::LAZY_READ_AHEAD_KB.to_string()
    );
}

#[test]
fn every_fixture_made_by_ctr_remote_mounts_to_the_source_tree() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let orig = runtime.block_on(pull_common::push_fixture(
        &registry.host(),
        "orig",
        "fixture",
        "orig",
    ));
    let unpacked = MountedImage::new(&orig, work.path(), "orig", &[]);
    let source_tars: Vec<Vec<u8>> = ["layer-B.tar", "layer-A.tar"]
        .iter()
        .map(|name| std::fs::read(pull_common::fixtures().join("orig").join(name)).unwrap())
        .collect();
    let plain_layers = layer_dirs(&unpacked, "unpacked");
    for variant in ["esgz", "esgz-1m", "esgz-prio", "zstdchunked"] {
        let image = runtime.block_on(pull_common::push_fixture(
            &registry.host(),
            variant,
            "fixture",
            variant,
        ));
        let lazy = MountedImage::new(&image, work.path(), variant, &["--no-prefetch"]);
        let lazy_layers = layer_dirs(&lazy, "lazy");
        for (at, (lazy_dir, tar)) in lazy_layers.iter().zip(&source_tars).enumerate() {
            let implied = implied_dirs(tar);
            assert_eq!(
                listing(lazy_dir, &implied),
                stacked_listing(&plain_layers, at, &implied),
                "fixture {variant}"
            );
        }
        assert_eq!(
            std::fs::read(lazy.dir.join("data/text.txt")).unwrap().len(),
            102400
        );
    }
}

#[test]
fn a_stopped_registry_gives_eio_for_uncached_files_and_recovers() {
    require_root_and_fuse();
    let mut registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let image = runtime.block_on(pull_common::push_fixture(
        &registry.host(),
        "esgz",
        "fixture",
        "esgz",
    ));
    let mounted = MountedImage::new(
        &image,
        work.path(),
        "outage",
        &["--no-prefetch", "--read-deadline", "3"],
    );
    let cached = mounted.dir.join("data/small/file-001");
    let uncached = mounted.dir.join("data/small/file-299");
    assert_eq!(std::fs::read(&cached).unwrap(), b"small file 001\n");

    registry.stop();
    // Drop the kernel's page cache so the read reaches lazysnap and its chunk cache.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(std::fs::read(&cached).unwrap(), b"small file 001\n");
    let started = std::time::Instant::now();
    let error = std::fs::read(&uncached).expect_err("the registry is down");
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    // Bounded: the read deadline is 3 s; a hang would sit here for ever.
    assert!(started.elapsed() < std::time::Duration::from_secs(60));

    registry.restart().unwrap();
    assert_eq!(std::fs::read(&uncached).unwrap(), b"small file 299\n");
}

/// The passthrough counters of the (single) layer of `mounted`: (files assembled, opens).
fn passthrough_counters(mounted: &MountedImage) -> (u64, u64) {
    let status = mounted.status_json();
    let ours = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| Path::new(s["dir"].as_str().unwrap()) == mounted.dir.canonicalize().unwrap())
        .unwrap()
        .clone();
    let layer = &ours["layers"][0];
    (
        layer["files_assembled"].as_u64().unwrap(),
        layer["passthrough_opens"].as_u64().unwrap(),
    )
}

#[test]
fn files_of_several_chunks_pass_through_once_cached() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = images::pseudo_random_bytes(5 << 20, 77);
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    tar.append_data(&mut header, "data/big.bin", &data[..])
        .unwrap();
    let source = push_generated(
        &registry,
        work.path(),
        &[tar.into_inner().unwrap()],
        "multi",
    );
    let esgz = format!("{}/multi:esgz", registry.host());
    lazysnap_ok(&["convert", "--chunk-size", "1048576", &source, &esgz]);

    let mounted = MountedImage::new(&esgz, work.path(), "mnt", &["--no-prefetch"]);
    let path = mounted.dir.join("data/big.bin");
    // The first read fetches the six chunks through the daemon.
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(passthrough_counters(&mounted), (0, 0));
    // An open with every chunk cached assembles the file in the background; once assembled,
    // opens are served by passthrough from the cache, with the same bytes.
    let mut waited = 0;
    loop {
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let (assembled, opens) = passthrough_counters(&mounted);
        if assembled == 1 && opens >= 1 {
            break;
        }
        waited += 1;
        assert!(waited < 200, "not passed through after {waited} opens: {assembled} assembled, {opens} passthrough opens");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);

    // Mounted with --no-passthrough, the same cached file is read through the daemon only.
    let plain = MountedImage::new(
        &esgz,
        work.path(),
        "plain",
        &["--no-prefetch", "--no-passthrough"],
    );
    assert_eq!(std::fs::read(plain.dir.join("data/big.bin")).unwrap(), data);
    assert_eq!(std::fs::read(plain.dir.join("data/big.bin")).unwrap(), data);
    assert_eq!(passthrough_counters(&plain).1, 0);
}

/// Names in `dir` of a merged mount, each checked to stat (a listed name that does not stat is
/// a whiteout overlayfs passed through).
fn merged_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Err(e) = std::fs::symlink_metadata(entry.path()) {
                panic!(
                    "{name} is listed in {} but does not stat: {e}",
                    dir.display()
                );
            }
            name
        })
        .collect();
    names.sort();
    names
}

#[test]
fn a_whiteout_of_what_no_lower_layer_has_is_not_listed() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let esgz = runtime.block_on(pull_common::push_fixture(
        &registry.host(),
        "esgz",
        "fixture",
        "esgz",
    ));
    let lazy = MountedImage::new(&esgz, work.path(), "esgz", &["--no-prefetch"]);
    // The data layer's data/wh-dir holds kept.txt and a whiteout of deleted-file, which the base
    // layer does not have (overlayfs lists a single layer's directory as it is).
    for _ in 0..2 {
        assert_eq!(merged_names(&lazy.dir.join("data/wh-dir")), ["kept.txt"]);
    }
    // The opaque directory still hides nothing it should show.
    assert!(lazy.dir.join("data/opaque-dir").is_dir());
}

/// The mount daemon keeps the disk watermarks `serve` keeps: reading 64 MiB through a cache on
/// a 40 MiB filesystem evicts instead of filling it, and every byte still reads right.
#[test]
fn the_mount_daemon_keeps_its_cache_filesystem_below_the_high_watermark() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (layer, files) = big_files_layer(100, None);
    let source = push_generated(&registry, work.path(), &[layer], "fill");
    let esgz = format!("{}/fill:esgz", registry.host());
    lazysnap_ok(&["convert", &source, &esgz]);

    let cache = work.path().join("cache-small");
    let _tmpfs = Tmpfs::mount(&cache, "40m");
    let mounted = MountedImage::new(&esgz, work.path(), "small", &["--no-background"]);
    let mut fullest = 0.0f64;
    for (i, data) in files.iter().enumerate() {
        let read = std::fs::read(mounted.dir.join(format!("big/{i}.bin"))).unwrap();
        assert!(read == *data, "big/{i}.bin read back wrong");
        let stats = nix::sys::statvfs::statvfs(&cache).unwrap();
        let used = 1.0 - stats.blocks_available() as f64 / stats.blocks() as f64;
        fullest = fullest.max(used);
    }
    assert!(
        fullest <= 0.95,
        "the cache filesystem reached {:.0}% full",
        fullest * 100.0
    );
    let log = std::fs::read_to_string(cache.join("mount-daemon.log")).unwrap_or_default();
    assert!(!log.contains("No space left"), "{log}");
}

#[test]
fn a_disk_that_other_data_filled_past_the_high_watermark_keeps_the_chunks_in_use() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..8u64)
        .map(|i| images::pseudo_random_bytes(1 << 20, 500 + i))
        .collect();
    let tar = tar_of(
        files
            .iter()
            .enumerate()
            .map(|(i, data)| (format!("used/{i}.bin"), data.clone())),
    );
    let source = push_generated(&registry, work.path(), &[tar], "full");
    let esgz = format!("{}/full:esgz", registry.host());
    lazysnap_ok(&["convert", &source, &esgz]);

    // A 256 MiB filesystem that other data has filled to 92%: past the default high watermark
    // (90%), with room for the 8 MiB the workload reads.
    let cache = work.path().join("cache-full");
    let _tmpfs = Tmpfs::mount(&cache, "256m");
    let filler = std::fs::File::create(cache.join("other-data")).unwrap();
    filler.set_len(0).unwrap();
    let stats = nix::sys::statvfs::statvfs(&cache).unwrap();
    let target = stats.blocks() * stats.fragment_size() / 100 * 92;
    std::io::Write::write_all(&mut &filler, &vec![0x5a; target as usize]).unwrap();
    drop(filler);

    let mounted = MountedImage::new(&esgz, work.path(), "full", &["--no-background"]);
    for round in 0..2 {
        for (i, data) in files.iter().enumerate() {
            let read = std::fs::read(mounted.dir.join(format!("used/{i}.bin"))).unwrap();
            assert!(
                read == *data,
                "used/{i}.bin read back wrong in round {round}"
            );
        }
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    }
    let chunk_files = std::fs::read_dir(cache.join("chunks/sha256"))
        .unwrap()
        .map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap().count())
        .sum::<usize>();
    assert_eq!(
        chunk_files,
        files.len(),
        "the chunks just read were evicted for the watermark"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&images::fetch_manifest(&registry.url(), "full", "esgz").unwrap())
            .unwrap();
    let size = manifest["layers"][0]["size"].as_u64().unwrap();
    let served = registry.blob_bytes_served(manifest["layers"][0]["digest"].as_str().unwrap());
    assert!(
        served <= size + size / 4,
        "the layer ({size} bytes) was fetched {served} bytes' worth: chunks fetched again"
    );
}

#[test]
fn a_decompression_bomb_neither_fills_memory_nor_overruns_the_cache_bound() {
    require_root_and_fuse();
    // Four 64 MiB files of zeros (each with its own first byte, so four chunks), one chunk each:
    // about 256 KiB compressed for 256 MiB decoded.
    const FILE: usize = 64 << 20;
    const FILES: usize = 4;
    const CACHE: u64 = 200 << 20;
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..FILES)
        .map(|i| {
            let mut data = vec![0u8; FILE];
            data[0] = i as u8 + 1;
            data
        })
        .collect();
    let tar = tar_of(
        contents
            .iter()
            .enumerate()
            .map(|(i, data)| (format!("bomb/{i}.bin"), data.clone())),
    );
    let source = push_generated(&registry, work.path(), &[tar], "bomb");
    let esgz = format!("{}/bomb:esgz", registry.host());
    lazysnap_ok(&["convert", "--chunk-size", &FILE.to_string(), &source, &esgz]);

    // The cache on a tmpfs of its own: what its files use is measured at once, never a file
    // counted twice while it is renamed.
    let cache = work.path().join("cache-bomb");
    let _tmpfs = Tmpfs::mount(&cache, "1g");
    let mounted = MountedImage::new(
        &esgz,
        work.path(),
        "bomb",
        &["--no-background", "--cache-size", &CACHE.to_string()],
    );
    let before = mounted.daemon_resources().peak_rss;
    let done = std::sync::atomic::AtomicBool::new(false);
    let fullest = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut fullest = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let stats = nix::sys::statvfs::statvfs(&cache).unwrap();
                let used = (stats.blocks() - stats.blocks_free()) * stats.fragment_size();
                fullest = fullest.max(used);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            fullest
        });
        let readers: Vec<_> = (0..FILES)
            .map(|i| {
                let path = mounted.dir.join(format!("bomb/{i}.bin"));
                scope.spawn(move || std::fs::read(&path).unwrap())
            })
            .collect();
        for (i, reader) in readers.into_iter().enumerate() {
            let data = reader.join().unwrap();
            assert!(data == contents[i], "bomb/{i}.bin read back wrong");
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    let peak = mounted.daemon_resources().peak_rss;
    eprintln!("mount daemon peak RSS {before} -> {peak} bytes; cache at most {fullest} bytes");
    // Decoded chunks go to their cache files, not memory: the daemon grows by far less than
    // one of them, let alone the four read at once.
    assert!(
        peak < before + (48 << 20),
        "the mount daemon's peak RSS went from {before} to {peak} bytes"
    );
    // Files being written count against the bound: the cache filesystem never held more than
    // it, plus the daemon's log and locks, plus at most one evicted chunk a read still maps
    // (its space is freed when that read ends).
    assert!(
        fullest <= CACHE + FILE as u64 + (2 << 20),
        "the cache held {fullest} bytes, over its {CACHE}-byte bound"
    );
}
