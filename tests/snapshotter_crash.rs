//! Crash consistency of the snapshot metadata: the real `lazysnap serve` is killed with SIGKILL
//! while clients run Prepare / Commit / Remove loops, then started again on the same root; every
//! time, the metadata must be whole and agree with the snapshot directories (each snapshot's
//! directory there, its parents listed, and after Cleanup no directory without a snapshot), and
//! the snapshotter must go on working.

mod cli_common;
use cli_common::Rng;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lazysnap::snapshotter::proto::snapshots as pb;
use lazysnap::snapshotter::proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::{Channel, Endpoint};

/// A `lazysnap serve` on `dir`'s root and socket, killed (SIGKILL) on drop.
struct Serve {
    child: Child,
    socket: PathBuf,
}

impl Serve {
    fn start(dir: &Path) -> Serve {
        let socket = dir.join("lazysnap.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "root = \"{}\"\naddress = \"{}\"\nmetrics_address = \"127.0.0.1:{}\"\n[cache]\ndir = \"{}\"\n",
                dir.join("root").display(),
                socket.display(),
                lazysnap_testbed::free_port().unwrap(),
                dir.join("cache").display()
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let serve = Serve { child, socket };
        for _ in 0..300 {
            if std::os::unix::net::UnixStream::connect(&serve.socket).is_ok() {
                return serve;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "lazysnap serve did not start; log:\n{}",
            std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
        );
    }

    async fn client(&self) -> SnapshotsClient<Channel> {
        let channel = Endpoint::from_shared(format!("unix://{}", self.socket.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        SnapshotsClient::new(channel)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    tonic::Request::new(message)
}

/// Prepare, Commit and Remove as fast as the server answers, until a call fails (the server was
/// killed). Names are unique per `worker` and `round`.
async fn churn(mut client: SnapshotsClient<Channel>, worker: u64, round: u64) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (worker << 32) ^ round);
    let mut committed: Vec<String> = Vec::new();
    for i in 0.. {
        let parent = match rng.below(3) {
            0 => String::new(),
            _ => committed
                .get(rng.below(committed.len() as u64) as usize)
                .cloned()
                .unwrap_or_default(),
        };
        let active = format!("active-{round}-{worker}-{i}");
        let prepared = client
            .prepare(request(pb::PrepareSnapshotRequest {
                snapshotter: "lazysnap".into(),
                key: active.clone(),
                parent,
                labels: HashMap::new(),
            }))
            .await;
        if prepared.is_err() {
            return;
        }
        let step = rng.below(10);
        let result = if step < 6 {
            let name = format!("layer-{round}-{worker}-{i}");
            let done = client
                .commit(request(pb::CommitSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    name: name.clone(),
                    key: active,
                    labels: HashMap::new(),
                }))
                .await
                .map(|_| ());
            if done.is_ok() {
                committed.push(name);
            }
            done
        } else if step < 8 {
            client
                .remove(request(pb::RemoveSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: active,
                }))
                .await
                .map(|_| ())
        } else {
            Ok(())
        };
        if let Err(status) = result {
            if status.code() == tonic::Code::Unavailable || status.code() == tonic::Code::Unknown {
                return;
            }
        }
    }
}

/// The checks after a restart: returns the number of snapshots.
async fn check_consistent(client: &mut SnapshotsClient<Channel>, root: &Path) -> usize {
    let mut infos = Vec::new();
    let mut stream = client
        .list(request(pb::ListSnapshotsRequest {
            snapshotter: "lazysnap".into(),
            filters: Vec::new(),
        }))
        .await
        .expect("List after a restart")
        .into_inner();
    while let Some(page) = stream.message().await.expect("List page") {
        infos.extend(page.info);
    }
    let names: HashSet<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    for info in &infos {
        assert!(
            info.parent.is_empty() || names.contains(info.parent.as_str()),
            "{} has parent {} that is not listed",
            info.name,
            info.parent
        );
        client
            .stat(request(pb::StatSnapshotRequest {
                snapshotter: "lazysnap".into(),
                key: info.name.clone(),
            }))
            .await
            .unwrap_or_else(|e| panic!("Stat {}: {e}", info.name));
        // Every directory a mount of it names exists: for an active snapshot its own mounts,
        // for a committed one those of a new snapshot on top.
        let active = info.kind == pb::Kind::Active as i32;
        let check_key = format!("check-{}", info.name);
        let mounts = if active {
            client
                .mounts(request(pb::MountsRequest {
                    snapshotter: "lazysnap".into(),
                    key: info.name.clone(),
                }))
                .await
                .map(|r| r.into_inner().mounts)
        } else {
            client
                .prepare(request(pb::PrepareSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: check_key.clone(),
                    parent: info.name.clone(),
                    labels: HashMap::new(),
                }))
                .await
                .map(|r| r.into_inner().mounts)
        }
        .unwrap_or_else(|e| panic!("mounts of {}: {e}", info.name));
        for mount in &mounts {
            let mut paths = vec![mount.source.clone()];
            for option in &mount.options {
                for key in ["lowerdir=", "upperdir=", "workdir="] {
                    if let Some(value) = option.strip_prefix(key) {
                        paths.extend(value.split(':').map(str::to_string));
                    }
                }
            }
            for path in paths.iter().filter(|p| p.starts_with('/')) {
                assert!(
                    Path::new(path).exists(),
                    "{} mounts {path}, which does not exist",
                    info.name
                );
            }
        }
        if !active {
            client
                .remove(request(pb::RemoveSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: check_key,
                }))
                .await
                .unwrap();
        }
    }
    client
        .cleanup(request(pb::CleanupRequest {
            snapshotter: "lazysnap".into(),
        }))
        .await
        .expect("Cleanup after a restart");
    let dirs = std::fs::read_dir(root.join("snapshots")).unwrap().count();
    assert_eq!(
        dirs,
        infos.len(),
        "after Cleanup the snapshot directories must be exactly the snapshots'"
    );
    infos.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_and_directories_agree_after_sigkill_during_churn() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the crash test runs lazysnap serve, which needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed);
    let mut seen = 0;
    for round in 0..8u64 {
        let mut serve = Serve::start(dir.path());
        let mut client = serve.client().await;
        if round > 0 {
            seen = check_consistent(&mut client, &dir.path().join("root")).await;
        }
        let workers: Vec<_> = (0..3)
            .map(|worker| tokio::spawn(churn(client.clone(), worker, round)))
            .collect();
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        serve.kill();
        for worker in workers {
            worker.await.unwrap();
        }
    }
    let serve = Serve::start(dir.path());
    let mut client = serve.client().await;
    let total = check_consistent(&mut client, &dir.path().join("root")).await;
    assert!(
        total > 0 && seen > 0,
        "the churn made no snapshots ({total}); the test did not test anything"
    );
    // Still working: a chain on top of the state the crashes left.
    client
        .prepare(request(pb::PrepareSnapshotRequest {
            snapshotter: "lazysnap".into(),
            key: "after".into(),
            parent: String::new(),
            labels: HashMap::new(),
        }))
        .await
        .unwrap();
}
