//! The same lazy pulls on every containerd lazysnap supports: Debian 12's 1.6, Debian 13's 1.7
//! and Debian unstable's 2.x (binaries extracted by `scripts/get-containerd.sh` into
//! /var/cache/lazysnap-bench/containerd-SUITE; Debian 12's runc runs the containers), each
//! configured with the snippet `packaging/containerd/` ships for it. On each: `lazysnap pull`,
//! `ctr-remote images rpull` and CRI PullImage mount the layers lazily (the registry served less
//! than the data layer) and the container prints the right bytes; on 2.x also `ctr image pull`
//! through the transfer service, and `ctr images import` still unpacks with overlayfs. CRI's
//! image filesystem is lazysnap's root where containerd supports exporting it (1.7.16+).

mod fixtures_common;
mod pull_common;

use std::path::PathBuf;
use std::process::Command;

use lazysnap_testbed::{ContainerdOptions, RegistryServer};
use pull_common::*;

/// Nothing fetched but what containers read: a lazy pull serves less than the data layer.
const ON_DEMAND_ONLY: &str =
    "[fetch]\nprefetch = false\nbackground_fill = false\nreadahead = false\n";

#[derive(Clone, Copy, Debug)]
enum Version {
    V1_6,
    V1_7,
    V2,
}

impl Version {
    /// Where its binaries are (None: the system's).
    fn bin_dir(self) -> Option<PathBuf> {
        let suite = match self {
            Version::V1_6 => return None,
            Version::V1_7 => "trixie",
            Version::V2 => "unstable",
        };
        let cache = std::env::var("LAZYSNAP_CONTAINERD_CACHE")
            .unwrap_or_else(|_| "/var/cache/lazysnap-bench".into());
        let dir = PathBuf::from(cache).join(format!("containerd-{suite}/root/usr/bin"));
        assert!(
            dir.join("containerd").is_file(),
            "containerd {self:?} is missing at {}: run scripts/get-containerd.sh {suite} \
             (scripts/test.sh does)",
            dir.display()
        );
        Some(dir)
    }

    /// How its server version starts.
    fn prefix(self) -> &'static str {
        match self {
            Version::V1_6 => "1.6.",
            Version::V1_7 => "1.7.",
            Version::V2 => "2.",
        }
    }

    fn snippet(self) -> &'static str {
        match self {
            Version::V1_6 | Version::V1_7 => {
                "packaging/containerd/config-v2-containerd-1.6-1.7.toml"
            }
            Version::V2 => "packaging/containerd/config-v3-containerd-2.x.toml",
        }
    }
}

/// lazysnap, then containerd `version` with its shipped snippet (root and socket made this
/// test's), the registry holding the fixture image.
struct Node {
    registry: RegistryServer,
    image: String,
    lazysnap: TestLazysnap,
    containerd: TestContainerd,
}

fn node(version: Version, enable_cri: bool) -> Node {
    require_root_and_containerd();
    let (registry, image) = registry_with_fixture("esgz", "fixture", "esgz");
    let lazysnap = TestLazysnap::start_with_config(ON_DEMAND_ONLY);
    let snippet = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(version.snippet()),
    )
    .expect("the packaging snippet")
    .replace(
        lazysnap::config::DEFAULT_ROOT,
        &lazysnap.root().display().to_string(),
    );
    let containerd = TestContainerd::start_with(ContainerdOptions {
        snapshotter_socket: Some(lazysnap.socket()),
        enable_cri,
        bin_dir: version.bin_dir(),
        snippet: Some(snippet),
        ..ContainerdOptions::default()
    });
    let (ok, versions, err) = containerd.ctr("default", &["version"]);
    assert!(ok, "{err}");
    let server = versions.split("Server:").nth(1).unwrap_or_default();
    let running = server
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().trim_start_matches('v').to_string())
        .unwrap_or_default();
    assert!(
        running.starts_with(version.prefix()),
        "expected containerd {version:?}, running {running:?}:\n{versions}"
    );
    Node {
        registry,
        image,
        lazysnap,
        containerd,
    }
}

impl Node {
    /// The pulled image runs and its data layer was not fetched whole.
    fn assert_runs_lazily(&self, namespace: &str) {
        let out = self.containerd.run(
            namespace,
            "lazysnap",
            &self.image,
            &["cat", "/data/small/file-007", "/data/one-byte.txt"],
        );
        assert_eq!(out, "small file 007\nx");
        let (data_layer, data_size) = layer_digests("esgz")[1].clone();
        let served = self.registry.blob_bytes_served(&data_layer);
        assert!(
            served < data_size,
            "the data layer was fetched whole ({served} bytes): not mounted lazily\nlazysnap log:\n{}\ncontainerd log:\n{}",
            self.lazysnap.log(),
            self.containerd.log()
        );
    }
}

fn lazysnap_pull_runs_lazily(version: Version) {
    let node = node(version, false);
    lazysnap_pull(&node.containerd, "versions", "lazysnap", &node.image);
    node.assert_runs_lazily("versions");
}

fn ctr_remote_rpull_runs_lazily(version: Version) {
    let node = node(version, false);
    let output = Command::new("/usr/bin/ctr-remote")
        .arg("-a")
        .arg(node.containerd.socket())
        .args(["-n", "versions", "images", "rpull", "--plain-http"])
        .args(["--snapshotter", "lazysnap"])
        .arg(&node.image)
        .output()
        .expect("run ctr-remote (Debian package stargz-snapshotter)");
    assert!(
        output.status.success(),
        "ctr-remote rpull on {version:?}: {}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        node.containerd.log()
    );
    node.assert_runs_lazily("versions");
}

fn cri_pull_runs_lazily(version: Version) {
    use lazysnap::containerd::proto::runtime::v1::{
        image_service_client::ImageServiceClient, ImageFsInfoRequest, ImageSpec, PullImageRequest,
    };
    let node = node(version, true);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mountpoints = runtime.block_on(async {
        let client = lazysnap::containerd::Containerd::connect(&node.containerd.socket(), "k8s.io")
            .await
            .expect("connect to containerd");
        let mut cri = ImageServiceClient::new(client.channel());
        cri.pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: node.image.clone(),
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CRI PullImage on {version:?}: {e}\ncontainerd log:\n{}",
                node.containerd.log()
            )
        });
        let info = cri
            .image_fs_info(ImageFsInfoRequest {})
            .await
            .expect("CRI ImageFsInfo")
            .into_inner();
        info.image_filesystems
            .iter()
            .filter_map(|fs| fs.fs_id.as_ref().map(|id| id.mountpoint.clone()))
            .collect::<Vec<_>>()
    });
    node.assert_runs_lazily("k8s.io");
    if matches!(version, Version::V1_7 | Version::V2) {
        let root = node.lazysnap.root().display().to_string();
        assert!(
            mountpoints.contains(&root),
            "CRI's image filesystem on {version:?} is {mountpoints:?}, not lazysnap's root {root}"
        );
        assert!(
            !node.containerd.log().contains("doesn't export root path"),
            "{}",
            node.containerd.log()
        );
    }
}

#[test]
fn lazysnap_pull_on_containerd_1_6() {
    lazysnap_pull_runs_lazily(Version::V1_6);
}

#[test]
fn lazysnap_pull_on_containerd_1_7() {
    lazysnap_pull_runs_lazily(Version::V1_7);
}

#[test]
fn lazysnap_pull_on_containerd_2() {
    lazysnap_pull_runs_lazily(Version::V2);
}

#[test]
fn ctr_remote_rpull_on_containerd_1_6() {
    ctr_remote_rpull_runs_lazily(Version::V1_6);
}

#[test]
fn ctr_remote_rpull_on_containerd_1_7() {
    ctr_remote_rpull_runs_lazily(Version::V1_7);
}

#[test]
fn ctr_remote_rpull_on_containerd_2() {
    ctr_remote_rpull_runs_lazily(Version::V2);
}

#[test]
fn cri_pull_on_containerd_1_6() {
    cri_pull_runs_lazily(Version::V1_6);
}

#[test]
fn cri_pull_on_containerd_1_7() {
    cri_pull_runs_lazily(Version::V1_7);
}

#[test]
fn cri_pull_on_containerd_2() {
    cri_pull_runs_lazily(Version::V2);
}

/// containerd 2.x's `ctr image pull` goes through the transfer service, which passes the
/// remote-snapshot labels only with the snippet's exports and unpacks only for listed snapshotters.
#[test]
fn transfer_service_pull_on_containerd_2() {
    let node = node(Version::V2, false);
    let (ok, out, err) = node.containerd.ctr(
        "versions",
        &[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "lazysnap",
            &node.image,
        ],
    );
    assert!(
        ok,
        "ctr image pull: {err}\n{out}\ncontainerd log:\n{}",
        node.containerd.log()
    );
    node.assert_runs_lazily("versions");
}

/// The snippet's unpack list keeps overlayfs: a plain `ctr image pull` (and `ctr images import`)
/// without --snapshotter still unpacks.
#[test]
fn transfer_service_keeps_overlayfs_on_containerd_2() {
    let node = node(Version::V2, false);
    let (ok, out, err) = node
        .containerd
        .ctr("versions", &["image", "pull", "--plain-http", &node.image]);
    assert!(
        ok,
        "ctr image pull: {err}\n{out}\n{}",
        node.containerd.log()
    );
    let out = node.containerd.run(
        "versions",
        "overlayfs",
        &node.image,
        &["cat", "/data/small/file-007"],
    );
    assert_eq!(out, "small file 007\n");
}
