//! `lazysnap cache du` and `lazysnap cache prune` against a running `serve` (real registry,
//! containerd 1.6, runc, FUSE): use by image and layer with the bytes layers share; pruning while
//! a container runs (it reads right afterwards, fetching again); `--unused` after an image is
//! removed; and a dead registry keeps a mounted layer's chunks unless `--force`.

mod cli_common;
mod fixtures_common;
mod pull_common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use cli_common::{lazysnap, lazysnap_ok, push_generated, tar_of};
use lazysnap_testbed::images;
use lazysnap_testbed::RegistryServer;
use pull_common::*;
use sha2::{Digest, Sha256};

fn du(root: &std::path::Path) -> serde_json::Value {
    let out = lazysnap_ok(&["cache", "du", "--json", "--root", root.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

fn layers_of<'a>(usage: &'a serde_json::Value, image: &str) -> Vec<&'a serde_json::Value> {
    usage["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["image"] == image)
        .collect()
}

#[test]
fn du_and_prune_while_containers_run() {
    require_root_and_containerd();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let base = images::busybox_layer().unwrap();
    let common = images::pseudo_random_bytes(512 << 10, 77);
    let mut images_built = Vec::new();
    for (name, seed) in [("one", 1u64), ("two", 2), ("three", 3)] {
        let own = images::pseudo_random_bytes(512 << 10, 100 + seed);
        let app = tar_of([
            ("app/common.bin".to_string(), common.clone()),
            ("app/own.bin".to_string(), own.clone()),
        ]);
        let source = push_generated(&registry, work.path(), &[base.clone(), app], name);
        let esgz = format!("{}/{name}:esgz", registry.host());
        lazysnap_ok(&["convert", &source, &esgz]);
        images_built.push((esgz, hex::encode(Sha256::digest(&own))));
    }
    let lazysnap_serve = TestLazysnap::start_with_config(
        "[fetch]\nbackground_fill = false\nread_deadline_secs = 3\nrequest_timeout_secs = 2\n",
    );
    let containerd = TestContainerd::start(Some(&lazysnap_serve.socket()));
    let root = lazysnap_serve.root();
    let warm_all = |image: &str| {
        lazysnap_ok(&[
            "warm",
            "-a",
            containerd.socket().to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--all",
            image,
        ])
    };
    for (image, _) in &images_built {
        warm_all(image);
    }

    // Each app layer holds its own file and the common one, which the others share (the busybox
    // layer is one snapshot, mounted for the first image).
    let usage = du(&root);
    assert_eq!(usage["layers"].as_array().unwrap().len(), 4, "{usage}");
    for (image, _) in &images_built {
        let layers = layers_of(&usage, image);
        let app = layers.last().unwrap();
        assert!(app["cached_bytes"].as_u64().unwrap() >= 1 << 20, "{app}");
        assert!(app["shared_bytes"].as_u64().unwrap() >= 512 << 10, "{app}");
    }
    let table = lazysnap_ok(&["cache", "du", "--root", root.to_str().unwrap()]);
    assert!(
        table.contains("SHARED") && table.contains(&images_built[0].0),
        "{table}"
    );

    // A container of image one keeps running and reading its file while the cache is pruned.
    let (image, own_hash) = images_built[0].clone();
    let id = format!("prune-{}", std::process::id());
    let mut running = Command::new(CTR)
        .arg("-a")
        .arg(containerd.socket())
        .args(["-n", "k8s.io", "run", "--rm", "--snapshotter", "lazysnap"])
        .arg(&image)
        .arg(&id)
        .args([
            "sh",
            "-c",
            "while read line; do echo 3 > /dev/null; sha256sum /app/own.bin; done",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = running.stdin.take().unwrap();
    let mut output = BufReader::new(running.stdout.take().unwrap());
    let mut hash_once = || {
        writeln!(input, "go").unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        line.split_whitespace().next().unwrap_or("").to_string()
    };
    assert_eq!(hash_once(), own_hash);
    let pruned = lazysnap_ok(&["cache", "prune", "--all", "--root", root.to_str().unwrap()]);
    assert!(pruned.contains("removed"), "{pruned}");
    let usage = du(&root);
    assert_eq!(usage["total_chunks"], 0, "{usage}");
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").unwrap();
    assert_eq!(hash_once(), own_hash, "a read after the prune");
    drop(input);
    let _ = running.wait();

    // Chunks used within the hour stay; nothing is unused while every image is mounted.
    let kept = lazysnap_ok(&[
        "cache",
        "prune",
        "--older-than",
        "1h",
        "--root",
        root.to_str().unwrap(),
    ]);
    assert!(kept.contains("removed 0 chunk files"), "{kept}");

    // Image three removed: containerd's GC removes its snapshots, serve unmounts its app layer,
    // and that layer's own chunk is left unused.
    let (three, _) = &images_built[2];
    warm_all(three);
    let (ok, _, err) = containerd.ctr("k8s.io", &["images", "rm", "--sync", three]);
    assert!(ok, "{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let usage = loop {
        let usage = du(&root);
        if layers_of(&usage, three).is_empty() {
            break usage;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "image three's layers stay mounted: {usage}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(
        usage["unused_bytes"].as_u64().unwrap() >= 512 << 10,
        "{usage}"
    );
    let pruned = lazysnap_ok(&[
        "cache",
        "prune",
        "--unused",
        "--root",
        root.to_str().unwrap(),
    ]);
    assert!(!pruned.contains("removed 0 chunk"), "{pruned}");
    assert_eq!(du(&root)["unused_bytes"], 0);

    // With the registry gone, a mounted layer's chunks are kept unless --force.
    drop(registry);
    let kept = lazysnap_ok(&["cache", "prune", "--all", "--root", root.to_str().unwrap()]);
    assert!(
        kept.contains("does not answer") && kept.contains("its chunks are kept"),
        "{kept}"
    );
    assert!(du(&root)["total_chunks"].as_u64().unwrap() > 0);
    let forced = lazysnap_ok(&[
        "cache",
        "prune",
        "--all",
        "--force",
        "--root",
        root.to_str().unwrap(),
    ]);
    assert!(
        forced.contains("removed anyway") && !forced.contains("are kept"),
        "{forced}"
    );
    assert_eq!(du(&root)["total_chunks"], 0);
    // Without a serve there is no cache to ask about.
    let dir = tempfile::tempdir().unwrap();
    let output = lazysnap(&["cache", "du", "--root", dir.path().to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no lazysnap serve answers"));
}
