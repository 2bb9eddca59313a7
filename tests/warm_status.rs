//! `lazysnap warm` and `lazysnap status` against a running `serve` (real registry, containerd
//! 1.6, runc, FUSE): warming pulls the image into containerd's `k8s.io` namespace and fetches
//! its prioritized chunks, or every chunk with `--all`, into serve's cache without starting a
//! container; a container started afterwards with the registry stopped runs its workload.
//! `status --json` lists serve's layers with what they fetched.

mod cli_common;
mod fixtures_common;
mod pull_common;

use cli_common::{lazysnap, lazysnap_ok, push_generated, tar_of};
use lazysnap_testbed::images;
use lazysnap_testbed::RegistryServer;
use pull_common::*;
use sha2::{Digest, Sha256};

const FILES: usize = 8;
const FILE_BYTES: usize = 256 << 10;

/// `lazysnap status --json` of the serve at `root`: its layers of `image`.
fn serve_layers(root: &std::path::Path, image: &str) -> Vec<serde_json::Value> {
    let out = lazysnap_ok(&["status", "--json", "--root", root.to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let serve = &status["serve"];
    assert!(serve.is_object(), "status shows no serve: {out}");
    serve["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["image"] == image)
        .cloned()
        .collect()
}

fn hashes_in_container(
    containerd: &TestContainerd,
    image: &str,
    files: &[usize],
) -> (bool, Vec<String>, String) {
    let script = files
        .iter()
        .map(|i| format!("sha256sum /app/{i}.bin"))
        .collect::<Vec<_>>()
        .join("; ");
    let id = format!("warm-{}-{}", std::process::id(), files.len());
    let (ok, out, err) = containerd.ctr(
        "k8s.io",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            image,
            &id,
            "sh",
            "-c",
            &script,
        ],
    );
    let hashes = out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    (ok, hashes, err)
}

#[test]
fn warm_fills_the_cache_so_containers_run_with_the_registry_stopped() {
    require_root_and_containerd();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| {
            let data = images::pseudo_random_bytes(FILE_BYTES, 4400 + i as u64);
            (format!("app/{i}.bin"), data)
        })
        .collect();
    let expected: Vec<String> = files
        .iter()
        .map(|(_, data)| hex::encode(Sha256::digest(data)))
        .collect();
    let base = images::busybox_layer().unwrap();
    let source = push_generated(&registry, work.path(), &[base, tar_of(files)], "warm");
    // Two images of the same content: one whose app files 0 and 1 are prioritized (a record
    // as `optimize` writes it, plus the busybox the container's shell needs), one plain.
    let record = work.path().join("record.jsonl");
    let mut lines = String::new();
    for path in ["bin/busybox", "bin/sh", "bin/sha256sum"] {
        lines.push_str(&format!(
            "{{\"layer\":0,\"path\":\"{path}\",\"size\":0,\"read\":[]}}\n"
        ));
    }
    for i in 0..2 {
        lines.push_str(&format!(
            "{{\"layer\":1,\"path\":\"app/{i}.bin\",\"size\":{FILE_BYTES},\"read\":[[0,{FILE_BYTES}]]}}\n"
        ));
    }
    std::fs::write(&record, lines).unwrap();
    let prioritized = format!("{}/warm:opt", registry.host());
    lazysnap_ok(&[
        "optimize",
        "--record-in",
        record.to_str().unwrap(),
        &source,
        &prioritized,
    ]);
    let plain = format!("{}/warm:esgz", registry.host());
    lazysnap_ok(&["convert", &source, &plain]);

    let lazysnap = TestLazysnap::start_with_config("[fetch]\nbackground_fill = false\n");
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let root = lazysnap.root();
    let address = containerd.socket();
    let warm = |image: &str, all: bool| {
        let mut args = vec![
            "warm",
            "-a",
            address.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
        ];
        if all {
            args.push("--all");
        }
        args.push(image);
        lazysnap_ok(&args)
    };

    let out = warm(&prioritized, false);
    assert!(out.contains("prioritized chunks fetched"), "{out}");
    let layers = serve_layers(&root, &prioritized);
    assert_eq!(layers.len(), 2, "{layers:?}");
    let app = &layers[1];
    assert!(
        app["prefetch_bytes"].as_u64().unwrap() > 0,
        "the prioritized files were not fetched: {app}"
    );
    assert!(
        app["fetched_chunks"].as_u64().unwrap() < app["total_chunks"].as_u64().unwrap(),
        "warm without --all fetched the whole layer: {app}"
    );

    let out = warm(&plain, true);
    assert!(out.contains("every chunk in the cache"), "{out}");
    for layer in serve_layers(&root, &plain) {
        assert_eq!(
            layer["fetched_chunks"], layer["total_chunks"],
            "--all left chunks out: {layer}"
        );
    }
    // The table names the images too.
    let table = lazysnap_ok(&["status", "--root", root.to_str().unwrap()]);
    assert!(
        table.contains(&plain) && table.contains("lazysnap serve (pid"),
        "{table}"
    );

    // kubelet's namespace has both images; with the registry gone they still run.
    let (ok, listed, _) = containerd.ctr("k8s.io", &["images", "ls", "-q"]);
    assert!(
        ok && listed.contains(&plain) && listed.contains(&prioritized),
        "{listed}"
    );
    drop(registry);
    let all: Vec<usize> = (0..FILES).collect();
    let (ok, hashes, err) = hashes_in_container(&containerd, &plain, &all);
    assert!(
        ok && hashes == expected,
        "the warmed image did not run without its registry: {err}\n{}",
        lazysnap.log()
    );
    let (ok, hashes, err) = hashes_in_container(&containerd, &prioritized, &[0, 1]);
    assert!(
        ok && hashes == expected[..2],
        "the prioritized files were not all warmed: {err}\n{}",
        lazysnap.log()
    );
}

#[test]
fn warm_without_a_serve_says_where_it_looked() {
    let root = tempfile::tempdir().unwrap();
    let output = lazysnap(&[
        "warm",
        "--root",
        root.path().to_str().unwrap(),
        "127.0.0.1:1/none:latest",
    ]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("no lazysnap serve answers on") && err.contains("control.sock"),
        "{err}"
    );
}
