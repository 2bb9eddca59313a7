//! Load: 10,000 random reads across 1,000 files of a lazily mounted image (`lazysnap mount`, real
//! FUSE and registry) from 16 threads. Every read returns the right bytes, the layer's bytes are
//! fetched from the registry about once (singleflight, no refetch), and the mount daemon's peak
//! memory and open file descriptors stay bounded. Prints the figures.

mod cli_common;
use cli_common::*;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use lazysnap_testbed::images;
use lazysnap_testbed::RegistryServer;

const FILES: usize = 1000;
const THREADS: u64 = 16;
const READS: u64 = 10_000;

#[test]
fn ten_thousand_random_reads_from_sixteen_threads_are_right_and_fetched_once() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..FILES)
        .map(|i| images::pseudo_random_bytes(4096 + (i * 7919) % 61440, 90_000 + i as u64))
        .collect();
    let tar = tar_of(
        files
            .iter()
            .enumerate()
            .map(|(i, data)| (format!("load/{:02}/{i}.bin", i % 50), data.clone())),
    );
    let source = push_generated(&registry, work.path(), &[tar], "load");
    let esgz = format!("{}/load:esgz", registry.host());
    lazysnap_ok(&["convert", &source, &esgz]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&images::fetch_manifest(&registry.url(), "load", "esgz").unwrap())
            .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let layer_size = manifest["layers"][0]["size"].as_u64().unwrap();

    let mounted = MountedImage::new(&esgz, work.path(), "mnt", &["--no-background"]);

    let right = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (files, mounted, right) = (&files, &mounted, &right);
            scope.spawn(move || {
                let mut rng = Rng(0x10ad + thread);
                for _ in 0..READS / THREADS {
                    let i = rng.below(FILES as u64) as usize;
                    let data = &files[i];
                    let offset = rng.below(data.len() as u64) as usize;
                    let len = (1 + rng.below(16384) as usize).min(data.len() - offset);
                    let path = mounted.dir.join(format!("load/{:02}/{i}.bin", i % 50));
                    let file = std::fs::File::open(&path).unwrap();
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, offset as u64)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert!(
                        buf == data[offset..offset + len],
                        "{} read wrong",
                        path.display()
                    );
                    right.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let Resources { peak_rss, fds, .. } = mounted.daemon_resources();
    let served = registry.blob_bytes_served(&layer);
    eprintln!(
        "load: {} reads right of {READS}; layer {layer_size} bytes, registry served {served} \
         for it ({:.2}x); mount daemon peak RSS {:.1} MiB, {fds} open fds",
        right.load(Ordering::Relaxed),
        served as f64 / layer_size as f64,
        peak_rss as f64 / (1 << 20) as f64
    );
    assert_eq!(right.load(Ordering::Relaxed), READS);
    // Each chunk once (plus the footer and TOC reads, and read-ahead that only extends runs).
    assert!(
        served <= layer_size + layer_size / 4,
        "the layer ({layer_size} bytes) was fetched {served} bytes' worth: chunks fetched again"
    );
    assert!(peak_rss < 256 << 20, "mount daemon peak RSS {peak_rss}");
    assert!(fds < 512, "mount daemon holds {fds} descriptors");
}
