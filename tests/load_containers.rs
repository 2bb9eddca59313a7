//! Load through containerd: 50 containers started at once from 3 lazily pulled images (real
//! `lazysnap serve`, containerd 1.6, runc), each hashing files of its image. Every container must
//! print the right hashes, each layer must be fetched from the registry about once however many
//! containers read it, and the daemon's peak memory and descriptors stay bounded. Prints the
//! figures.

mod cli_common;
mod fixtures_common;
mod pull_common;

use std::sync::atomic::{AtomicUsize, Ordering};

use cli_common::{lazysnap_ok, process_resources, push_generated, tar_of, Resources};
use lazysnap_testbed::images;
use lazysnap_testbed::RegistryServer;
use pull_common::*;
use sha2::{Digest, Sha256};

const IMAGES: usize = 3;
const CONTAINERS: usize = 50;
const FILES: usize = 24;
const FILE_BYTES: usize = 96 << 10;

fn app_layer(seed: u64) -> (Vec<u8>, Vec<String>) {
    let files: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| {
            let data = images::pseudo_random_bytes(FILE_BYTES, seed * 1000 + i as u64);
            (format!("app/{i}.bin"), data)
        })
        .collect();
    let hashes = files
        .iter()
        .map(|(_, data)| hex::encode(Sha256::digest(data)))
        .collect();
    (tar_of(files), hashes)
}

#[test]
fn fifty_containers_from_three_lazy_images_start_at_once_and_read_right() {
    require_root_and_containerd();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let base = images::busybox_layer().unwrap();
    let mut expected = Vec::new();
    let mut references = Vec::new();
    for k in 0..IMAGES {
        let (app, hashes) = app_layer(k as u64 + 1);
        expected.push(hashes);
        let repo = format!("load{k}");
        let source = push_generated(&registry, work.path(), &[base.clone(), app], &repo);
        let esgz = format!("{}/{repo}:esgz", registry.host());
        lazysnap_ok(&["convert", &source, &esgz]);
        references.push(esgz);
    }

    let lazysnap = TestLazysnap::start_with_config("[fetch]\nbackground_fill = false\n");
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    for reference in &references {
        let pulled = lazysnap_pull(&containerd, "load", "lazysnap", reference);
        assert!(pulled.contains("lazy"), "{pulled}");
    }

    let right = AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for c in 0..CONTAINERS {
            let (containerd, references, expected) = (&containerd, &references, &expected);
            let (right, failures) = (&right, &failures);
            scope.spawn(move || {
                let k = c % IMAGES;
                let files: Vec<usize> = (0..4).map(|j| (c * 7 + j * 5) % FILES).collect();
                let script = files
                    .iter()
                    .map(|i| format!("sha256sum /app/{i}.bin"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let id = format!("load-{}-{c}", std::process::id());
                let (ok, out, err) = containerd.ctr(
                    "load",
                    &[
                        "run",
                        "--rm",
                        "--snapshotter",
                        "lazysnap",
                        &references[k],
                        &id,
                        "sh",
                        "-c",
                        &script,
                    ],
                );
                let hashes: Vec<&str> = out
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .collect();
                let want: Vec<&str> = files.iter().map(|&i| expected[k][i].as_str()).collect();
                if ok && hashes == want {
                    right.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("container {c}: ok={ok} out={out:?} err={err:?}"));
                }
            });
        }
    });
    let Resources { peak_rss, fds, .. } =
        process_resources(&[" serve ", lazysnap.dir.path().to_str().unwrap()]);
    // What the registry sent for the app layers, against their sizes.
    let mut sent = 0u64;
    let mut sizes = 0u64;
    for k in 0..IMAGES {
        let manifest =
            images::fetch_manifest(&registry.url(), &format!("load{k}"), "esgz").unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let app = &manifest["layers"][1];
        sent += registry.blob_bytes_served(app["digest"].as_str().unwrap());
        sizes += app["size"].as_u64().unwrap();
    }
    eprintln!(
        "load: {} of {CONTAINERS} containers right; app layers {sizes} bytes, registry sent \
         {sent} for them ({:.2}x); serve peak RSS {:.1} MiB, {fds} open fds",
        right.load(Ordering::Relaxed),
        sent as f64 / sizes as f64,
        peak_rss as f64 / (1 << 20) as f64
    );
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} containers failed:\n{}\ncontainerd log:\n{}",
        failures.len(),
        failures.join("\n"),
        containerd.log()
    );
    assert!(
        sent <= sizes + sizes / 4,
        "the app layers ({sizes} bytes) were fetched {sent} bytes' worth: chunks fetched again"
    );
    assert!(peak_rss < 512 << 20, "serve peak RSS {peak_rss}");
    assert!(fds < 1024, "serve holds {fds} descriptors");
}
