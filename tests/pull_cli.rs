//! `lazysnap pull` end to end: the real binary pulls the fixture image from the test-bed registry
//! into a real containerd, and `ctr run` starts a container from it.

mod fixtures_common;
mod pull_common;

use std::process::Command;

use lazysnap_testbed::RegistryServer;
use pull_common::*;

#[test]
fn pull_cli_overlayfs_then_ctr_run_prints_the_file() {
    require_root_and_containerd();
    let (registry, image) = registry_with_fixture("orig", "fixture", "orig");
    let containerd = TestContainerd::start(None);
    let namespace = "pullcli";

    let stdout = lazysnap_pull(&containerd, namespace, "overlayfs", &image);
    // One summary line per layer, both fallen back (overlayfs never mounts remotely).
    assert_eq!(stdout.matches("fetched+unpacked").count(), 3, "{stdout}");
    assert!(stdout.contains(&format!("pulled {image}")), "{stdout}");
    for layer in [
        "sha256:0f32956b158d4de6aca00cabf2f6577c61f09b4a71af8a8e32e01116e65d72e2",
        "sha256:7203d3ec90d79727377e6123b0d4e936878a0d098be6a401057b6dc4615efe68",
    ] {
        assert!(
            registry.blob_bytes_served(layer) > 0,
            "layer {layer} was fetched"
        );
    }

    let out = containerd.run(
        namespace,
        "overlayfs",
        &image,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(out, "x");
    let out = containerd.run(
        namespace,
        "overlayfs",
        &image,
        &["/bin/sh", "-c", "cat /data/small/file-007"],
    );
    assert_eq!(out, "small file 007\n");
}

#[test]
fn pull_cli_names_the_socket_when_containerd_is_absent() {
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(["pull", "--containerd", "/nonexistent/containerd.sock"])
        .arg("127.0.0.1:1/none:latest")
        .output()
        .expect("run lazysnap pull");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/containerd.sock"), "{stderr}");
    assert!(stderr.contains("--containerd"), "{stderr}");
}

#[test]
fn pull_cli_through_lazysnap_serve_plain_gzip_falls_back_and_runs() {
    require_root_and_containerd();
    let (_registry, image) = registry_with_fixture("orig", "fixture", "orig");
    // lazysnap first: containerd connects to its proxy plugins at start.
    let lazysnap = TestLazysnap::start();
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let namespace = "pullserve";

    let stdout = lazysnap_pull(&containerd, namespace, "lazysnap", &image);
    // Plain gzip layers are not lazily pullable: both fall back to an unpack into lazysnap.
    let layer_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("sha256:"))
        .collect();
    assert_eq!(layer_lines.len(), 2, "{stdout}");
    assert!(
        layer_lines.iter().all(|l| l.contains("fetched+unpacked")),
        "{stdout}"
    );

    // lazysnap holds both committed layers.
    let (ok, listing, err) =
        containerd.ctr(namespace, &["snapshots", "--snapshotter", "lazysnap", "ls"]);
    assert!(ok, "{err}");
    assert_eq!(
        listing.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{listing}"
    );

    let out = containerd.run(
        namespace,
        "lazysnap",
        &image,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(out, "x", "lazysnap log:\n{}", lazysnap.log());
    let out = containerd.run(
        namespace,
        "lazysnap",
        &image,
        &["/bin/sh", "-c", "cat /data/text.txt | head -c 6"],
    );
    assert_eq!(out, "00000 ");
}

#[test]
fn pull_cli_picks_the_platform_manifest_from_an_index() {
    require_root_and_containerd();
    let registry = RegistryServer::start().expect("start registry");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let image = runtime.block_on(push_fixture(&registry.host(), "orig", "fixture", "orig"));
    let manifest = std::fs::read(fixture_dir("orig").join("manifest.json")).unwrap();
    let manifest_digest = lazysnap::digest::sha256_digest(&manifest);
    // An index whose arm64 entry must not be chosen on --platform linux/amd64 (both entries
    // point at the one pushed manifest, which the registry requires to exist).
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
             "size": manifest.len(), "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
             "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"}}
        ]
    });
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_ref = image.replace(":orig", ":multi");
    runtime.block_on(async {
        let client =
            lazysnap::registry::Client::new(lazysnap::registry::ClientConfig::default()).unwrap();
        client
            .put_manifest(
                &lazysnap::registry::Reference::parse(&index_ref).unwrap(),
                "application/vnd.oci.image.index.v1+json",
                index_bytes.clone().into(),
            )
            .await
            .expect("push index");
    });
    let containerd = TestContainerd::start(None);
    let namespace = "pullindex";
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args([
            "pull",
            "--snapshotter",
            "overlayfs",
            "--platform",
            "linux/amd64",
        ])
        .arg("--containerd")
        .arg(containerd.socket())
        .arg("--namespace")
        .arg(namespace)
        .arg(&index_ref)
        .output()
        .expect("run lazysnap pull");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let index_digest = lazysnap::digest::sha256_digest(&index_bytes);
    assert!(
        stdout.contains(index_digest.as_str()),
        "the image target is the index: {stdout}"
    );
    let (ok, images, err) = containerd.ctr(namespace, &["images", "ls"]);
    assert!(ok, "{err}");
    assert!(images.contains(index_digest.as_str()), "{images}");
    let out = containerd.run(
        namespace,
        "overlayfs",
        &index_ref,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(out, "x");

    // A platform the index does not have is an error naming what it has.
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args([
            "pull",
            "--snapshotter",
            "overlayfs",
            "--platform",
            "linux/s390x",
        ])
        .arg("--containerd")
        .arg(containerd.socket())
        .arg("--namespace")
        .arg(namespace)
        .arg(&index_ref)
        .output()
        .expect("run lazysnap pull");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("linux/s390x") && stderr.contains("linux/arm64"),
        "{stderr}"
    );
}

/// The product path: `lazysnap serve` with real remote layers, `lazysnap pull` of the eStargz
/// fixture, `ctr run`. Both layers are lazy; the registry serves only part of each layer blob.
#[test]
fn pull_cli_estargz_through_lazysnap_serve_is_lazy_and_runs() {
    require_root_and_containerd();
    let (registry, image) = registry_with_fixture("esgz", "fixture", "esgz");
    let lazysnap = TestLazysnap::start();
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    let namespace = "pullesgz";

    let stdout = lazysnap_pull(&containerd, namespace, "lazysnap", &image);
    let layer_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("sha256:"))
        .collect();
    assert_eq!(layer_lines.len(), 2, "{stdout}");
    assert!(
        layer_lines.iter().all(|l| l.contains("  lazy  ")),
        "every eStargz layer is mounted lazily:\n{stdout}\nlazysnap log:\n{}",
        lazysnap.log()
    );

    let out = containerd.run(
        namespace,
        "lazysnap",
        &image,
        &["cat", "/data/one-byte.txt"],
    );
    assert_eq!(out, "x", "lazysnap log:\n{}", lazysnap.log());
    // Nobody downloaded a layer blob whole: every layer GET the registry answered was a ranged
    // read (206) by lazysnap's lazy reader, none a full 200 like an unpacking pull.
    for layer in [
        "sha256:d7ffa78de5dc9f584ede75dd4055684882f6e559f9e9ccea9e3289e5d97bd03f",
        "sha256:beb145bfbc1d2335bbaa76f52247d4053a246f6ea94ab3557c1318f73e9a2126",
    ] {
        let gets = registry.blob_gets(layer);
        assert!(!gets.is_empty(), "lazysnap read layer {layer} remotely");
        assert!(
            gets.iter().all(|(status, _)| *status == 206),
            "layer {layer} GETs: {gets:?}"
        );
        let served: u64 = gets.iter().map(|(_, bytes)| bytes).sum();
        eprintln!("layer {layer}: {} ranged GETs, {served} bytes", gets.len());
    }
}
