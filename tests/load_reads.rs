//! Load: 10,000 random reads across 1,000 files of a lazily mounted image (`lazysnap mount`, real
//! FUSE and registry) from 16 threads. Every read returns the right bytes, the layer's bytes are
//! fetched from the registry about once (singleflight, no refetch), and the mount daemon's peak
//! memory and open file descriptors stay bounded. Prints the figures.

mod cli_common;
use cli_common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use lazysnap::image::OciLayout;
use lazysnap::testbed::images::{self, ImageOptions};
use lazysnap::testbed::RegistryServer;

const FILES: usize = 1000;
const THREADS: u64 = 16;
const READS: u64 = 10_000;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

struct Mounted {
    dir: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = lazysnap(&[
            "umount",
            "--state-dir",
            self.state_dir.to_str().unwrap(),
            self.dir.to_str().unwrap(),
        ]);
    }
}

/// The mount daemon serving `cache_dir`: (peak RSS in bytes, open descriptors).
fn mount_daemon_resources(cache_dir: &Path) -> (u64, usize) {
    let needle = cache_dir.to_str().unwrap();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("lazysnap") && cmdline.contains(needle) && cmdline.contains(" mount") {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap();
            let peak_kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap();
            let fds = std::fs::read_dir(entry.path().join("fd")).unwrap().count();
            return (peak_kib * 1024, fds);
        }
    }
    panic!("no mount daemon process for {needle}");
}

/// Digest and size of the first layer of `repo:tag`, from its manifest.
fn first_layer(registry: &RegistryServer, repo: &str, tag: &str) -> (String, u64) {
    let out = std::process::Command::new("curl")
        .args([
            "-sSf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ])
        .arg(format!("{}/v2/{repo}/manifests/{tag}", registry.url()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layer = &manifest["layers"][0];
    (
        layer["digest"].as_str().unwrap().to_string(),
        layer["size"].as_u64().unwrap(),
    )
}

#[test]
fn ten_thousand_random_reads_from_sixteen_threads_are_right_and_fetched_once() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..FILES)
        .map(|i| images::pseudo_random_bytes(4096 + (i * 7919) % 61440, 90_000 + i as u64))
        .collect();
    let mut tar = tar::Builder::new(Vec::new());
    for (i, data) in files.iter().enumerate() {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        tar.append_data(
            &mut header,
            format!("load/{:02}/{i}.bin", i % 50),
            data.as_slice(),
        )
        .unwrap();
    }
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    images::write_image(
        &layout,
        &[tar.into_inner().unwrap()],
        &ImageOptions::default(),
        Some("src"),
    )
    .unwrap();
    images::push_layout_image(&layout, Some("src"), &registry.host(), "load", "src").unwrap();
    let esgz = format!("{}/load:esgz", registry.host());
    lazysnap_ok(&["convert", &format!("{}/load:src", registry.host()), &esgz]);
    let (layer, layer_size) = first_layer(&registry, "load", "esgz");

    let dir = work.path().join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let state_dir = work.path().join("state");
    let cache_dir = work.path().join("cache");
    lazysnap_ok(&[
        "mount",
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--no-background",
        &esgz,
        dir.to_str().unwrap(),
    ]);
    let mounted = Mounted { dir, state_dir };

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
    let (peak_rss, fds) = mount_daemon_resources(&cache_dir);
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
