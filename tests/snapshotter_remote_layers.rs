//! The remote-layer path of Prepare through the real service and a tonic client: a layer the
//! hook mounts is committed under its chain ID and answered AlreadyExists, restored after a
//! restart, released on remove; declined or unlabelled layers fall back to normal snapshots.

mod snapshotter_common;
use snapshotter_common::*;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lazysnap::labels;
use lazysnap::snapshotter::proto::snapshots as pb;
use lazysnap::snapshotter::{RemoteLayerError, RemoteLayerRequest, RemoteLayers};
use tonic::Code;

/// A remote-layer hook for tests: "mounts" a layer by writing a marker file into the mountpoint
/// (or declines), and records every call.
#[derive(Default)]
struct FakeRemote {
    decline: bool,
    mounted: AtomicUsize,
    restored: Mutex<Vec<PathBuf>>,
    unmounted: Mutex<Vec<PathBuf>>,
}

#[async_trait]
impl RemoteLayers for FakeRemote {
    async fn mount_layer(&self, request: &RemoteLayerRequest) -> Result<(), RemoteLayerError> {
        if self.decline {
            return Err(RemoteLayerError::Declined("test declines".into()));
        }
        assert!(request.mountpoint.is_dir());
        assert_eq!(
            request.locator.toc_digest.as_deref(),
            Some("sha256:toc"),
            "TOC digest label reaches the hook"
        );
        std::fs::write(
            request.mountpoint.join("remote-file"),
            &request.locator.layer_digest,
        )
        .unwrap();
        self.mounted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn restore_layer(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
        _lower_dirs: &[std::path::PathBuf],
    ) -> Result<(), RemoteLayerError> {
        assert!(labels.contains_key(labels::STARGZ_DIGEST));
        self.restored.lock().unwrap().push(mountpoint.to_path_buf());
        Ok(())
    }

    async fn unmount_layer(&self, mountpoint: &Path) -> Result<(), RemoteLayerError> {
        self.unmounted
            .lock()
            .unwrap()
            .push(mountpoint.to_path_buf());
        Ok(())
    }
}

fn stargz_labels(target: &str, digest: &str) -> HashMap<String, String> {
    HashMap::from([
        (labels::SNAPSHOT_REF.to_string(), target.to_string()),
        (
            labels::STARGZ_REFERENCE.to_string(),
            "127.0.0.1:5000/app:1".to_string(),
        ),
        (labels::STARGZ_DIGEST.to_string(), digest.to_string()),
        (
            labels::STARGZ_LAYERS.to_string(),
            "sha256:l0,sha256:l1".to_string(),
        ),
        (labels::TOC_DIGEST.to_string(), "sha256:toc".to_string()),
    ])
}

#[tokio::test]
async fn remote_layers_commit_under_target_and_answer_already_exists() {
    let remote = Arc::new(FakeRemote::default());
    let mut h = Harness::start_with(remote.clone()).await;
    let snaps = h.snapshots_dir();

    let err = h
        .prepare_labeled(
            "default/1/extract-1 sha256:chain0",
            "",
            stargz_labels("sha256:chain0", "sha256:l0"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    // A remote Prepare is a read before the mount and a write after it.
    let transactions = h.service.metadata_transactions();
    let err = h
        .prepare_labeled(
            "default/2/extract-2 sha256:chain1",
            "sha256:chain0",
            stargz_labels("sha256:chain1", "sha256:l1"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(h.service.metadata_transactions() - transactions, 2);
    assert_eq!(remote.mounted.load(Ordering::SeqCst), 2);
    assert_eq!(h.service.stats().remote_mounted, 2);

    // containerd finds the remote snapshot by label and parent.
    let found = h
        .list(&[r#"labels."containerd.io/snapshot.ref"==sha256:chain1,parent==sha256:chain0"#])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "sha256:chain1");
    assert_eq!(found[0].kind, pb::Kind::Committed as i32);
    assert_eq!(
        found[0]
            .labels
            .get(labels::STARGZ_DIGEST)
            .map(String::as_str),
        Some("sha256:l1")
    );
    // A second prepare of an existing target answers AlreadyExists without mounting again.
    let err = h
        .prepare_labeled(
            "default/3/extract-3 sha256:chain1",
            "sha256:chain0",
            stargz_labels("sha256:chain1", "sha256:l1"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(remote.mounted.load(Ordering::SeqCst), 2);

    // The same layer on another parent (another namespace unpacked the parent) is mounted
    // again under a unique name; containerd finds each by (label, parent).
    h.prepare("other-a", "").await.unwrap();
    h.commit("other-base", "other-a").await.unwrap();
    let err = h
        .prepare_labeled(
            "other/1/extract-4 sha256:chain1",
            "other-base",
            stargz_labels("sha256:chain1", "sha256:l1"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(remote.mounted.load(Ordering::SeqCst), 3);
    let found = h
        .names(&[r#"labels."containerd.io/snapshot.ref"==sha256:chain1,parent==other-base"#])
        .await;
    assert_eq!(found.len(), 1);
    assert_ne!(found[0], "sha256:chain1");
    h.remove(&found[0]).await.unwrap();
    h.remove("other-base").await.unwrap();

    // A container on top sees the remote layers through overlay.
    let mounts = h.prepare("container", "sha256:chain1").await.unwrap();
    {
        let target = h.mount_dir("container");
        let _m = mount_all(&mounts, &target, &snaps);
        assert_eq!(read(target.join("remote-file")), "sha256:l1");
    }
    h.remove("container").await.unwrap();
    h.remove("sha256:chain1").await.unwrap();
    assert_eq!(remote.unmounted.lock().unwrap().len(), 2);

    // Restart: the remaining remote layer is restored through the hook.
    let dir = h.stop().await;
    let remote2 = Arc::new(FakeRemote::default());
    let mut h = Harness::start_in(dir, remote2.clone()).await;
    assert_eq!(remote2.restored.lock().unwrap().len(), 1);
    assert_eq!(h.names(&[]).await, ["sha256:chain0"]);
    h.stop().await;
}

#[tokio::test]
async fn declined_remote_layers_fall_back_to_normal_snapshots() {
    let remote = Arc::new(FakeRemote {
        decline: true,
        ..Default::default()
    });
    let mut h = Harness::start_with(remote).await;
    let key = "default/1/extract-1 sha256:chain0";
    let mounts = h
        .prepare_labeled(key, "", stargz_labels("sha256:chain0", "sha256:l0"))
        .await
        .unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(h.service.stats().remote_fallbacks, 1);
    // containerd unpacks into it and commits under the chain ID.
    h.commit("sha256:chain0", key).await.unwrap();
    assert_eq!(h.names(&[]).await, ["sha256:chain0"]);
    // The directory of a declined mount attempt was removed again.
    assert_eq!(std::fs::read_dir(h.snapshots_dir()).unwrap().count(), 1);
    h.stop().await;
}

/// An unpack whose Prepare carries the target label but none of the image's (containerd 2.x's
/// transfer service without remote-snapshot exports) falls back visibly: counted and metered
/// as `no_labels`, and still a working snapshot.
#[tokio::test]
async fn a_layer_prepared_without_image_labels_is_counted_as_a_fallback() {
    let mut h = Harness::start_with(Arc::new(FakeRemote::default())).await;
    let key = "default/1/extract-2 sha256:chain-nolabels";
    let labels: HashMap<String, String> = [(
        "containerd.io/snapshot.ref".to_string(),
        "sha256:chain-nolabels".to_string(),
    )]
    .into_iter()
    .collect();
    let mounts = h.prepare_labeled(key, "", labels).await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(h.service.stats().remote_fallbacks, 1);
    assert_eq!(h.service.stats().remote_mounted, 0);
    let text = lazysnap::metrics::encode();
    assert!(
        text.contains("lazysnap_fallbacks_total{reason=\"no_labels\"}"),
        "{text}"
    );
    h.stop().await;
}
