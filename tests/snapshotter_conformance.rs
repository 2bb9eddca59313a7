//! Conformance suite for the snapshotter, in the spirit of containerd's snapshotter testsuite:
//! every test starts the real service on a temp unix socket and drives it with a tonic client,
//! mounting what it returns with real bind / overlay mounts (needs root: fails loudly without).

use lazysnap::labels;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lazysnap::snapshotter::proto::snapshots as pb;
use lazysnap::snapshotter::proto::snapshots::snapshots_client::SnapshotsClient;
use lazysnap::snapshotter::proto::Mount;
use lazysnap::snapshotter::{
    NoRemoteLayers, RemoteLayerError, RemoteLayerRequest, RemoteLayers, Service, ServiceOptions,
};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the snapshotter conformance suite mounts overlayfs and must run as root"
    );
}

/// A running service on a temp socket plus a client connected to it.
struct Harness {
    dir: tempfile::TempDir,
    client: SnapshotsClient<Channel>,
    service: Service,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(Arc::new(NoRemoteLayers)).await
    }

    async fn start_with(remote: Arc<dyn RemoteLayers>) -> Self {
        // A short root keeps 128-layer lowerdir options small.
        let dir = tempfile::Builder::new()
            .prefix("ls")
            .tempdir_in("/tmp")
            .unwrap();
        Self::start_in(dir, remote).await
    }

    async fn start_in(dir: tempfile::TempDir, remote: Arc<dyn RemoteLayers>) -> Self {
        require_root();
        let service = Service::open(ServiceOptions::new(dir.path().join("root")), remote).unwrap();
        service.restore_remote_layers().await.unwrap();
        let socket = dir.path().join("snap.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = service.clone();
        let server = tokio::spawn(async move {
            lazysnap::snapshotter::serve(listener, served, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            dir,
            client: SnapshotsClient::new(channel),
            service,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops the server and hands back the state directory (for restart tests).
    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
        let Harness { dir, .. } = self;
        dir
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.dir.path().join("root/snapshots")
    }

    fn mount_dir(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("mnt").join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    async fn prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        self.prepare_labeled(key, parent, HashMap::new()).await
    }

    async fn prepare_labeled(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, tonic::Status> {
        self.client
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: "lazysnap".into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            })
            .await
            .map(|r| r.into_inner().mounts)
    }

    async fn view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        self.client
            .view(pb::ViewSnapshotRequest {
                snapshotter: "lazysnap".into(),
                key: key.into(),
                parent: parent.into(),
                labels: HashMap::new(),
            })
            .await
            .map(|r| r.into_inner().mounts)
    }

    async fn commit(&mut self, name: &str, key: &str) -> Result<(), tonic::Status> {
        self.client
            .commit(pb::CommitSnapshotRequest {
                snapshotter: "lazysnap".into(),
                name: name.into(),
                key: key.into(),
                labels: HashMap::from([("origin".to_string(), key.to_string())]),
            })
            .await
            .map(|_| ())
    }

    async fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        self.client
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: "lazysnap".into(),
                key: key.into(),
            })
            .await
            .map(|_| ())
    }

    async fn stat(&mut self, key: &str) -> Result<pb::Info, tonic::Status> {
        self.client
            .stat(pb::StatSnapshotRequest {
                snapshotter: "lazysnap".into(),
                key: key.into(),
            })
            .await
            .map(|r| r.into_inner().info.unwrap())
    }

    async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, tonic::Status> {
        self.client
            .mounts(pb::MountsRequest {
                snapshotter: "lazysnap".into(),
                key: key.into(),
            })
            .await
            .map(|r| r.into_inner().mounts)
    }

    async fn list(&mut self, filters: &[&str]) -> Result<Vec<pb::Info>, tonic::Status> {
        let mut stream = self
            .client
            .list(pb::ListSnapshotsRequest {
                snapshotter: "lazysnap".into(),
                filters: filters.iter().map(|f| f.to_string()).collect(),
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await? {
            out.extend(batch.info);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn names(&mut self, filters: &[&str]) -> Vec<String> {
        self.list(filters)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    async fn cleanup(&mut self) {
        self.client
            .cleanup(pb::CleanupRequest {
                snapshotter: "lazysnap".into(),
            })
            .await
            .unwrap();
    }

    async fn usage(&mut self, key: &str) -> Result<pb::UsageResponse, tonic::Status> {
        self.client
            .usage(pb::UsageRequest {
                snapshotter: "lazysnap".into(),
                key: key.into(),
            })
            .await
            .map(|r| r.into_inner())
    }
}

/// Performs `mounts` at `target` the way containerd would, with mount(8). Overlay lowerdirs under
/// the snapshots dir are passed relative to it (mount runs there), as containerd does for long
/// chains, so 128 layers fit in one page of options.
fn mount_all(mounts: &[Mount], target: &Path, snapshots_dir: &Path) -> Mounted {
    assert_eq!(mounts.len(), 1, "one mount expected: {mounts:?}");
    let m = &mounts[0];
    let prefix = format!("{}/", snapshots_dir.display());
    let status = match m.r#type.as_str() {
        "bind" => Command::new("mount")
            .arg("-o")
            .arg(m.options.join(","))
            .arg(&m.source)
            .arg(target)
            .status()
            .unwrap(),
        "overlay" => {
            let options: Vec<String> = m
                .options
                .iter()
                .map(|o| match o.strip_prefix("lowerdir=") {
                    Some(dirs) => format!(
                        "lowerdir={}",
                        dirs.split(':')
                            .map(|d| d.strip_prefix(&prefix).unwrap_or(d))
                            .collect::<Vec<_>>()
                            .join(":")
                    ),
                    None => o.clone(),
                })
                .collect();
            Command::new("mount")
                .current_dir(snapshots_dir)
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(options.join(","))
                .arg(target)
                .status()
                .unwrap()
        }
        other => panic!("unexpected mount type {other}"),
    };
    assert!(
        status.success(),
        "mount {m:?} at {} failed",
        target.display()
    );
    Mounted(target.to_path_buf())
}

/// Unmounts on drop (also when an assertion fails), so tests clean up what they mount.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.as_ref().display()))
}

#[tokio::test]
async fn basic_prepare_commit_view_with_real_mounts() {
    let mut h = Harness::start().await;
    let snaps = h.snapshots_dir();

    let mounts = h.prepare("active-base", "").await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(mounts[0].options, ["rw", "rbind"]);
    {
        let target = h.mount_dir("base");
        let _m = mount_all(&mounts, &target, &snaps);
        std::fs::write(target.join("foo"), "foo\n").unwrap();
        std::fs::create_dir(target.join("dir")).unwrap();
        std::fs::write(target.join("dir/bar"), "bar\n").unwrap();
    }
    h.commit("base", "active-base").await.unwrap();
    assert_eq!(
        h.stat("active-base").await.unwrap_err().code(),
        Code::NotFound
    );
    let base = h.stat("base").await.unwrap();
    assert_eq!(base.kind, pb::Kind::Committed as i32);
    assert_eq!(base.parent, "");
    assert_eq!(
        base.labels.get("origin").map(String::as_str),
        Some("active-base")
    );
    let usage = h.usage("base").await.unwrap();
    assert!(usage.inodes >= 4 && usage.size > 0, "{usage:?}");

    let mounts = h.prepare("active-top", "base").await.unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    assert!(mounts[0].options.iter().any(|o| o.starts_with("upperdir=")));
    assert_eq!(h.mounts("active-top").await.unwrap(), mounts);
    {
        let target = h.mount_dir("top");
        let _m = mount_all(&mounts, &target, &snaps);
        assert_eq!(read(target.join("foo")), "foo\n");
        std::fs::write(target.join("baz"), "baz\n").unwrap();
        std::fs::remove_file(target.join("foo")).unwrap();
    }
    h.commit("top", "active-top").await.unwrap();
    let top = h.stat("top").await.unwrap();
    assert_eq!(top.parent, "base");

    // A view of two layers is a read-only overlay; of one layer a read-only bind.
    let mounts = h.view("view-top", "top").await.unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    assert!(mounts[0]
        .options
        .iter()
        .all(|o| !o.starts_with("upperdir=")));
    {
        let target = h.mount_dir("view");
        let _m = mount_all(&mounts, &target, &snaps);
        assert_eq!(read(target.join("baz")), "baz\n");
        assert_eq!(read(target.join("dir/bar")), "bar\n");
        assert!(
            !target.join("foo").exists(),
            "deleted file must stay deleted"
        );
        assert!(
            std::fs::write(target.join("new"), "x").is_err(),
            "a view is read-only"
        );
    }
    let view = h.stat("view-top").await.unwrap();
    assert_eq!(view.kind, pb::Kind::View as i32);
    let mounts = h.view("view-base", "base").await.unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(mounts[0].options, ["ro", "rbind"]);
    assert!(mounts[0].source.ends_with("/fs"));
    h.stop().await;
}

#[tokio::test]
async fn error_codes_match_containerd() {
    let mut h = Harness::start().await;
    h.prepare("a", "").await.unwrap();
    assert_eq!(
        h.prepare("a", "").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        h.prepare("b", "missing").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        h.prepare("b", "a").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        h.prepare("", "").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        h.commit("x", "missing").await.unwrap_err().code(),
        Code::NotFound
    );
    h.commit("c", "a").await.unwrap();
    assert_eq!(
        h.mounts("c").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(h.mounts("nope").await.unwrap_err().code(), Code::NotFound);
    h.prepare("d", "c").await.unwrap();
    assert_eq!(
        h.commit("c", "d").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    h.view("v", "c").await.unwrap();
    assert_eq!(
        h.commit("cv", "v").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        h.remove("c").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(h.remove("nope").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(h.stat("nope").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        h.list(&["name~=x"]).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let long_label = HashMap::from([("k".to_string(), "v".repeat(5000))]);
    assert_eq!(
        h.prepare_labeled("e", "", long_label)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    h.stop().await;
}

#[tokio::test]
async fn remove_and_cleanup_free_directories() {
    let mut h = Harness::start().await;
    let snaps = h.snapshots_dir();
    h.prepare("a", "").await.unwrap();
    h.commit("base", "a").await.unwrap();
    h.prepare("b", "base").await.unwrap();
    let dirs_before = std::fs::read_dir(&snaps).unwrap().count();
    assert_eq!(dirs_before, 2);
    h.remove("b").await.unwrap();
    h.remove("base").await.unwrap();
    assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 0);
    assert!(h.names(&[]).await.is_empty());

    // Orphans: a directory no record owns and an interrupted temp dir.
    std::fs::create_dir_all(snaps.join("9999/fs/sub")).unwrap();
    std::fs::write(snaps.join("9999/fs/sub/file"), "x").unwrap();
    std::fs::create_dir_all(snaps.join("new-77/fs")).unwrap();
    h.prepare("kept", "").await.unwrap();
    h.cleanup().await;
    let left: Vec<String> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 1, "only the live snapshot stays: {left:?}");
    assert!(h.mounts("kept").await.is_ok());
    h.stop().await;
}

#[tokio::test]
async fn walk_with_filters_and_update_labels() {
    let mut h = Harness::start().await;
    let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    h.prepare_labeled("a", "", labels(&[(labels::SNAPSHOT_REF, "sha256:one")]))
        .await
        .unwrap();
    h.commit("one", "a").await.unwrap();
    h.client
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "lazysnap".into(),
            info: Some(pb::Info {
                name: "one".into(),
                labels: labels(&[(labels::SNAPSHOT_REF, "sha256:one"), ("keep", "1")]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![
                    format!("labels.{}", labels::SNAPSHOT_REF),
                    "labels.keep".into(),
                ],
            }),
        })
        .await
        .unwrap();
    h.prepare("b", "one").await.unwrap();
    h.commit("two", "b").await.unwrap();
    h.prepare("c", "two").await.unwrap();
    h.view("v", "one").await.unwrap();

    assert_eq!(h.names(&[]).await, ["c", "one", "two", "v"]);
    assert_eq!(
        h.names(&[r#"labels."containerd.io/snapshot.ref"==sha256:one"#])
            .await,
        ["one"]
    );
    assert_eq!(
        h.names(&[r#"labels."containerd.io/snapshot.ref"=="sha256:one",parent=="""#])
            .await,
        ["one"]
    );
    assert_eq!(h.names(&["parent==one"]).await, ["two", "v"]);
    assert_eq!(h.names(&["parent==one,kind==view"]).await, ["v"]);
    assert_eq!(
        h.names(&["parent==one", "name==c"]).await,
        ["c", "two", "v"]
    );
    assert_eq!(h.names(&["labels.keep==1"]).await, ["one"]);

    // Deleting one label through its field path, then replacing all labels.
    let updated = h
        .client
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "lazysnap".into(),
            info: Some(pb::Info {
                name: "one".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.keep".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert!(!updated.labels.contains_key("keep"));
    assert!(updated.labels.contains_key(labels::SNAPSHOT_REF));
    let before = h.stat("one").await.unwrap();
    let (created, updated) = (before.created_at.unwrap(), before.updated_at.unwrap());
    assert!((updated.seconds, updated.nanos) >= (created.seconds, created.nanos));
    let err = h
        .client
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "lazysnap".into(),
            info: Some(pb::Info {
                name: "one".into(),
                parent: "x".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    h.stop().await;
}

#[tokio::test]
async fn chain_of_128_layers_mounts_every_layer() {
    let mut h = Harness::start().await;
    let snaps = h.snapshots_dir();
    let mut parent = String::new();
    for n in 0..128 {
        let key = format!("active-{n}");
        let mounts = h.prepare(&key, &parent).await.unwrap();
        {
            let target = h.mount_dir(&key);
            let _m = mount_all(&mounts, &target, &snaps);
            std::fs::write(target.join(format!("layer-{n}")), n.to_string()).unwrap();
            std::fs::write(target.join("top"), n.to_string()).unwrap();
        }
        let name = format!("layer-{n}");
        h.commit(&name, &key).await.unwrap();
        parent = name;
    }
    let mounts = h.view("view", &parent).await.unwrap();
    let lower = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lower.split(':').count(), 128);
    let target = h.mount_dir("view");
    let _m = mount_all(&mounts, &target, &snaps);
    for n in 0..128 {
        assert_eq!(read(target.join(format!("layer-{n}"))), n.to_string());
    }
    assert_eq!(read(target.join("top")), "127");
    drop(_m);
    h.stop().await;
}

#[tokio::test]
async fn concurrent_prepares() {
    let mut h = Harness::start().await;
    h.prepare("a", "").await.unwrap();
    h.commit("base", "a").await.unwrap();

    let mut tasks = Vec::new();
    for n in 0..32 {
        let mut client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .prepare(pb::PrepareSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: format!("c-{n}"),
                    parent: "base".into(),
                    labels: HashMap::new(),
                })
                .await
                .map(|r| r.into_inner().mounts)
        }));
    }
    let mut uppers = std::collections::HashSet::new();
    for task in tasks {
        let mounts = task.await.unwrap().unwrap();
        let upper = mounts[0]
            .options
            .iter()
            .find(|o| o.starts_with("upperdir="))
            .unwrap()
            .clone();
        assert!(
            uppers.insert(upper),
            "every snapshot gets its own upper dir"
        );
    }

    // The same key prepared concurrently: exactly one wins, the others get AlreadyExists.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .prepare(pb::PrepareSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: "same".into(),
                    parent: "base".into(),
                    labels: HashMap::new(),
                })
                .await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(h.names(&["parent==base"]).await.len(), 33);
    // Losers left no directories behind.
    assert_eq!(std::fs::read_dir(h.snapshots_dir()).unwrap().count(), 34);
    h.stop().await;
}

#[tokio::test]
async fn metadata_survives_restart() {
    let mut h = Harness::start().await;
    h.prepare("a", "").await.unwrap();
    h.commit("base", "a").await.unwrap();
    h.prepare("b", "base").await.unwrap();
    let dir = h.stop().await;

    let mut h = Harness::start_in(dir, Arc::new(NoRemoteLayers)).await;
    assert_eq!(h.names(&[]).await, ["b", "base"]);
    let mounts = h.mounts("b").await.unwrap();
    assert!(mounts[0].options.iter().any(|o| o.starts_with("lowerdir=")));
    // New ids never collide with existing directories.
    h.prepare("c", "base").await.unwrap();
    assert_eq!(std::fs::read_dir(h.snapshots_dir()).unwrap().count(), 3);
    h.stop().await;
}

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
    let err = h
        .prepare_labeled(
            "default/2/extract-2 sha256:chain1",
            "sha256:chain0",
            stargz_labels("sha256:chain1", "sha256:l1"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
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
