//! The snapshotter test harness: the real service on a temp unix socket, a tonic client, and
//! real bind / overlay mounts of what it returns.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use lazysnap::snapshotter::proto::snapshots as pb;
use lazysnap::snapshotter::proto::snapshots::snapshots_client::SnapshotsClient;
use lazysnap::snapshotter::proto::Mount;
use lazysnap::snapshotter::{NoRemoteLayers, RemoteLayers, Service, ServiceOptions};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the snapshotter conformance suite mounts overlayfs and must run as root"
    );
}

/// A running service on a temp socket plus a client connected to it.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub client: SnapshotsClient<Channel>,
    pub service: Service,
    pub stop: Option<oneshot::Sender<()>>,
    pub server: Option<tokio::task::JoinHandle<()>>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(Arc::new(NoRemoteLayers)).await
    }

    pub async fn start_with(remote: Arc<dyn RemoteLayers>) -> Self {
        // A short root keeps 128-layer lowerdir options small.
        let dir = tempfile::Builder::new()
            .prefix("ls")
            .tempdir_in("/tmp")
            .unwrap();
        Self::start_in(dir, remote).await
    }

    pub async fn start_in(dir: tempfile::TempDir, remote: Arc<dyn RemoteLayers>) -> Self {
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
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
        let Harness { dir, .. } = self;
        dir
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.dir.path().join("root/snapshots")
    }

    pub fn mount_dir(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("mnt").join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    pub async fn prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
        self.prepare_labeled(key, parent, HashMap::new()).await
    }

    pub async fn prepare_labeled(
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

    pub async fn view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
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

    pub async fn commit(&mut self, name: &str, key: &str) -> Result<(), tonic::Status> {
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

    pub async fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        self.client
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: "lazysnap".into(),
                key: key.into(),
            })
            .await
            .map(|_| ())
    }

    pub async fn stat(&mut self, key: &str) -> Result<pb::Info, tonic::Status> {
        self.client
            .stat(pb::StatSnapshotRequest {
                snapshotter: "lazysnap".into(),
                key: key.into(),
            })
            .await
            .map(|r| r.into_inner().info.unwrap())
    }

    pub async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, tonic::Status> {
        self.client
            .mounts(pb::MountsRequest {
                snapshotter: "lazysnap".into(),
                key: key.into(),
            })
            .await
            .map(|r| r.into_inner().mounts)
    }

    pub async fn list(&mut self, filters: &[&str]) -> Result<Vec<pb::Info>, tonic::Status> {
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

    pub async fn names(&mut self, filters: &[&str]) -> Vec<String> {
        self.list(filters)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    pub async fn cleanup(&mut self) {
        self.client
            .cleanup(pb::CleanupRequest {
                snapshotter: "lazysnap".into(),
            })
            .await
            .unwrap();
    }

    pub async fn usage(&mut self, key: &str) -> Result<pb::UsageResponse, tonic::Status> {
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
pub fn mount_all(mounts: &[Mount], target: &Path, snapshots_dir: &Path) -> Mounted {
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
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.as_ref().display()))
}
