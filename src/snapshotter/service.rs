//! The snapshotter itself: containerd's snapshot semantics over the metadata store and the
//! snapshot directories, the remote-layer path of Prepare, restart recovery, and the thin tonic
//! adapter that maps every call to gRPC (one tracing span per call, errors to containerd's codes).
//! The remote-layer path and restore are `service/remote_prepare.rs`, local snapshot directories
//! and mounts `service/local.rs`, filesystem helpers `service/fs.rs`, the tonic adapter
//! `service/grpc.rs`.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tonic::Status;
use tracing::warn;

use crate::labels;
use crate::layer::is_mountpoint;

use super::filter::{matches_any, Filter};
use super::mounts::OverlayOptions;
use super::proto::Mount;
use super::remote::{LayerLocator, RemoteLayers};
use super::store::{
    now_nanos, Kind, MetadataStore, SnapshotInfo, SnapshotRecord, SnapshotView, StoreError,
};

mod fs;
mod grpc;
mod local;
mod remote_prepare;
use fs::{disk_usage, remove_dir_quietly};
pub use grpc::info_to_proto;
use remote_prepare::RemoteAttempt;

/// A snapshotter call's failure, mapped to the gRPC code containerd converts back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// → `NotFound`.
    #[error("{0}: not found")]
    NotFound(String),
    /// → `AlreadyExists`.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// → `FailedPrecondition`.
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    /// → `InvalidArgument`.
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    /// → `Internal`.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// → `Internal`.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl SnapshotError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

impl From<SnapshotError> for Status {
    fn from(err: SnapshotError) -> Self {
        let message = err.to_string();
        match err {
            SnapshotError::NotFound(_) => Status::not_found(message),
            SnapshotError::AlreadyExists(_) => Status::already_exists(message),
            SnapshotError::FailedPrecondition(_) => Status::failed_precondition(message),
            SnapshotError::InvalidArgument(_) => Status::invalid_argument(message),
            SnapshotError::Store(_) | SnapshotError::Io { .. } => Status::internal(message),
        }
    }
}

/// How to open a [`Service`].
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// State directory: `metadata.db` and `snapshots/` live here.
    pub root: PathBuf,
    /// Overlay mount options for this host (see [`OverlayOptions::detect`]).
    pub overlay: OverlayOptions,
}

impl ServiceOptions {
    /// Options for `root` with overlay options detected from the host.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            overlay: OverlayOptions::detect(),
        }
    }
}

/// Counters of the remote-layer path (every fallback is counted and logged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Layers mounted lazily on Prepare.
    pub remote_mounted: u64,
    /// Prepares of layers that fell back to a normal snapshot (declined, or without the image's
    /// labels).
    pub remote_fallbacks: u64,
    /// Remote layers remounted after a restart.
    pub remote_restored: u64,
    /// Remote layers that could not be remounted after a restart.
    pub remote_restore_failures: u64,
}

/// containerd's snapshotter over a root directory; cheap to clone (shared state).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    snapshots_dir: PathBuf,
    store: MetadataStore,
    remote: Arc<dyn RemoteLayers>,
    overlay: OverlayOptions,
    next_id: AtomicU64,
    remote_mounted: AtomicU64,
    remote_fallbacks: AtomicU64,
    /// Whether the missing-labels warning was logged (once per daemon).
    warned_no_labels: AtomicBool,
    remote_restored: AtomicU64,
    remote_restore_failures: AtomicU64,
}

impl Service {
    /// Opens (or creates) the snapshotter state under `options.root`. Call
    /// [`Service::restore_remote_layers`] afterwards to remount remote layers after a restart.
    pub fn open(
        options: ServiceOptions,
        remote: Arc<dyn RemoteLayers>,
    ) -> Result<Self, SnapshotError> {
        let snapshots_dir = options.root.join("snapshots");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&snapshots_dir)
            .map_err(SnapshotError::io(format!(
                "creating {} (is the root writable?)",
                snapshots_dir.display()
            )))?;
        let store = MetadataStore::open(&options.root.join("metadata.db"))?;
        let mut max_id = store
            .read()?
            .all()?
            .iter()
            .map(|(_, r)| r.id)
            .max()
            .unwrap_or(0);
        for entry in std::fs::read_dir(&snapshots_dir)
            .map_err(SnapshotError::io(format!(
                "listing {}",
                snapshots_dir.display()
            )))?
            .flatten()
        {
            if let Some(id) = dir_id(&entry.file_name().to_string_lossy()) {
                max_id = max_id.max(id);
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                snapshots_dir,
                store,
                remote,
                overlay: options.overlay,
                next_id: AtomicU64::new(max_id.saturating_add(1)),
                remote_mounted: AtomicU64::new(0),
                remote_fallbacks: AtomicU64::new(0),
                warned_no_labels: AtomicBool::new(false),
                remote_restored: AtomicU64::new(0),
                remote_restore_failures: AtomicU64::new(0),
            }),
        })
    }

    /// Tells the remote-layer hook the daemon stops (see [`RemoteLayers::shutdown`]).
    pub async fn shutdown(&self) {
        self.inner.remote.shutdown().await;
    }

    /// The remote-layer counters.
    pub fn stats(&self) -> ServiceStats {
        let i = &self.inner;
        ServiceStats {
            remote_mounted: i.remote_mounted.load(Ordering::Relaxed),
            remote_fallbacks: i.remote_fallbacks.load(Ordering::Relaxed),
            remote_restored: i.remote_restored.load(Ordering::Relaxed),
            remote_restore_failures: i.remote_restore_failures.load(Ordering::Relaxed),
        }
    }

    /// How many metadata transactions were begun since open: one per call (two for a layer
    /// mounted remotely: a read before the mount, a write after it).
    pub fn metadata_transactions(&self) -> u64 {
        self.inner.store.transactions()
    }

    /// The directory of snapshot `id`.
    fn dir(&self, id: u64) -> PathBuf {
        self.inner.snapshots_dir.join(id.to_string())
    }

    /// The layer trees of snapshot `name` and its ancestors, nearest first (what overlayfs
    /// stacks as lowerdirs), as `txn` sees them; empty for "".
    fn layer_dirs(
        &self,
        txn: &impl SnapshotView,
        name: &str,
    ) -> Result<Vec<PathBuf>, SnapshotError> {
        if name.is_empty() {
            return Ok(Vec::new());
        }
        Ok(txn
            .chain_ids(name)?
            .into_iter()
            .map(|(id, _)| self.dir(id).join("fs"))
            .collect())
    }

    /// Runs blocking filesystem + metadata work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Service) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, SnapshotError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || work(&this))
            .await
            .map_err(|e| SnapshotError::Io {
                context: "snapshotter worker thread".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// Prepare: an active snapshot on `parent`. With layer labels, first asks the remote hook to
    /// mount the layer lazily; success commits it as the `containerd.io/snapshot.ref` target and
    /// answers `AlreadyExists` (containerd then skips fetch and unpack).
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        validate(key, &labels)?;
        if let Some(target) = labels.get(labels::SNAPSHOT_REF).cloned() {
            if let Some(locator) = LayerLocator::from_labels(&labels) {
                match self
                    .prepare_remote(key, parent, &target, &labels, locator)
                    .await
                {
                    // Mounted now, or by an earlier Prepare: containerd skips fetch and unpack.
                    Ok(()) | Err(RemoteAttempt::TargetExists) => {
                        return Err(SnapshotError::AlreadyExists(format!(
                            "target snapshot {target:?}"
                        )))
                    }
                    Err(RemoteAttempt::Fallback { kind, reason }) => {
                        self.inner.remote_fallbacks.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::record_fallback(kind);
                        warn!(key, target = %target, reason = %reason,
                            "layer falls back to a normal snapshot (containerd fetches and unpacks it)");
                    }
                }
            } else {
                // An unpack without the image's labels: containerd downloads the layer in full.
                self.inner.remote_fallbacks.fetch_add(1, Ordering::Relaxed);
                crate::metrics::record_fallback("no_labels");
                if !self.inner.warned_no_labels.swap(true, Ordering::Relaxed) {
                    warn!(key, target = %target,
                        "containerd prepares a layer without the image's labels, so it is downloaded \
                         and unpacked in full, not mounted lazily; with containerd 2.x's transfer \
                         service set [proxy_plugins.lazysnap.exports] \
                         enable_remote_snapshot_annotations = \"true\", \
                         for CRI keep snapshot annotations enabled (counted in \
                         lazysnap_fallbacks_total{{reason=\"no_labels\"}}; warned once)");
                }
            }
        }
        let (key, parent) = (key.to_string(), parent.to_string());
        let (mounts, chain) = self
            .blocking(move |s| s.create_local(Kind::Active, &key, &parent, labels))
            .await?;
        // A container's rootfs comes from Prepare: check its remote layers.
        self.check_remote_chain(&chain);
        Ok(mounts)
    }

    /// View: a read-only snapshot of `parent`.
    pub async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        validate(key, &labels)?;
        let (key, parent) = (key.to_string(), parent.to_string());
        let (mounts, _) = self
            .blocking(move |s| s.create_local(Kind::View, &key, &parent, labels))
            .await?;
        Ok(mounts)
    }

    /// Mounts: the mounts of an active snapshot or a view; remote ancestors are health-checked
    /// first (failures are logged).
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let key_owned = key.to_string();
        let (record, chain) = self
            .blocking(move |s| {
                let txn = s.inner.store.read()?;
                let record = txn
                    .get(&key_owned)?
                    .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key_owned:?}")))?;
                if record.kind == Kind::Committed {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "snapshot {key_owned:?} is committed, not active or view"
                    )));
                }
                let chain = if record.parent.is_empty() {
                    Vec::new()
                } else {
                    txn.chain(&record.parent)?
                };
                Ok((record, chain))
            })
            .await?;
        self.check_remote_chain(&chain);
        let ids: Vec<(u64, bool)> = chain.iter().map(|r| (r.id, r.remote)).collect();
        Ok(self.mounts_for(record.kind, record.id, &ids))
    }

    /// Commit: turns active snapshot `key` into committed snapshot `name` (usage measured now).
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotError> {
        validate(name, &labels)?;
        let (name, key) = (name.to_string(), key.to_string());
        self.blocking(move |s| {
            let txn = s.inner.store.begin()?;
            let record = txn
                .get(&key)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key:?}")))?;
            if record.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            if txn.get(&name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {name:?}")));
            }
            let usage = disk_usage(&s.dir(record.id).join("fs"))?;
            let now = now_nanos();
            txn.delete(&key)?;
            txn.put(
                &name,
                &SnapshotRecord {
                    kind: Kind::Committed,
                    created_nanos: now,
                    updated_nanos: now,
                    labels,
                    usage: Some(usage),
                    ..record
                },
            )?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// Remove: deletes a snapshot without children; a remote layer is unmounted through the
    /// hook, then the directory is deleted (left for Cleanup if that fails).
    pub async fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let key = key.to_string();
        let record = self
            .blocking(move |s| {
                let txn = s.inner.store.begin()?;
                let record = txn
                    .get(&key)?
                    .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key:?}")))?;
                if txn.has_children(&key)? {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "cannot remove snapshot {key:?} with child"
                    )));
                }
                txn.delete(&key)?;
                txn.commit()?;
                Ok(record)
            })
            .await?;
        if record.remote {
            self.release_remote_dir(record.id).await;
        } else {
            let dir = self.dir(record.id);
            if let Err(err) = self.blocking(move |_| remove_dir_quietly(&dir)).await {
                warn!(error = %err, "removing snapshot directory failed; Cleanup will retry");
            }
        }
        Ok(())
    }

    /// Stat: the info of one snapshot.
    pub async fn stat(&self, key: &str) -> Result<SnapshotInfo, SnapshotError> {
        let key = key.to_string();
        self.blocking(move |s| {
            s.inner
                .store
                .read()?
                .get(&key)?
                .map(|r| r.info(&key))
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key:?}")))
        })
        .await
    }

    /// Update: changes labels. `field_paths` may name `labels` (replace all) or `labels.KEY`
    /// (set or, when absent from `labels`, delete one); empty means replace all labels.
    pub async fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        field_paths: Vec<String>,
    ) -> Result<SnapshotInfo, SnapshotError> {
        validate(name, &labels)?;
        let name = name.to_string();
        self.blocking(move |s| {
            let txn = s.inner.store.begin()?;
            let mut record = txn
                .get(&name)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {name:?}")))?;
            if field_paths.is_empty() {
                record.labels = labels;
            } else {
                for path in &field_paths {
                    if path == "labels" {
                        record.labels = labels.clone();
                    } else if let Some(label) = path.strip_prefix("labels.") {
                        match labels.get(label) {
                            Some(v) => record.labels.insert(label.to_string(), v.clone()),
                            None => record.labels.remove(label),
                        };
                    } else {
                        return Err(SnapshotError::InvalidArgument(format!(
                            "cannot update field {path:?} of snapshot {name:?} (only labels and labels.KEY)"
                        )));
                    }
                }
            }
            record.updated_nanos = now_nanos();
            txn.put(&name, &record)?;
            txn.commit()?;
            Ok(record.info(&name))
        })
        .await
    }

    /// List: every snapshot matching any of `filters` (containerd filter syntax).
    pub async fn list(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        let parsed = filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SnapshotError::InvalidArgument(e.to_string()))?;
        self.blocking(move |s| {
            Ok(s.inner
                .store
                .read()?
                .all()?
                .into_iter()
                .map(|(name, record)| record.info(&name))
                .filter(|info| matches_any(&parsed, info))
                .collect())
        })
        .await
    }

    /// Usage: (bytes, inodes) used by the snapshot's own directory (measured at commit for
    /// committed snapshots, now for active ones; remote layers use no local disk).
    pub async fn usage(&self, key: &str) -> Result<(u64, u64), SnapshotError> {
        let key = key.to_string();
        self.blocking(move |s| {
            let record = s
                .inner
                .store
                .read()?
                .get(&key)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key:?}")))?;
            match record.usage {
                Some(usage) => Ok(usage),
                None => disk_usage(&s.dir(record.id).join("fs")),
            }
        })
        .await
    }

    /// Cleanup: deletes directories under `snapshots/` that no record owns (left by crashes,
    /// failed removes, interrupted prepares); remote mounts among them are unmounted first.
    /// Returns how many were deleted.
    pub async fn cleanup(&self) -> Result<usize, SnapshotError> {
        let orphans = self
            .blocking(|s| {
                let owned: HashSet<u64> = s
                    .inner
                    .store
                    .read()?
                    .all()?
                    .iter()
                    .map(|(_, r)| r.id)
                    .collect();
                let mut orphans = Vec::new();
                for entry in std::fs::read_dir(&s.inner.snapshots_dir)
                    .map_err(SnapshotError::io(format!(
                        "listing {}",
                        s.inner.snapshots_dir.display()
                    )))?
                    .flatten()
                {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let orphan = match name.parse::<u64>() {
                        Ok(id) => !owned.contains(&id),
                        Err(_) => name.starts_with("new-"),
                    };
                    if orphan {
                        orphans.push(entry.path());
                    }
                }
                Ok(orphans)
            })
            .await?;
        let mut removed = 0;
        for dir in orphans {
            let mountpoint = dir.join("fs");
            if is_mountpoint(&mountpoint) {
                if let Err(err) = self.inner.remote.unmount_layer(&mountpoint).await {
                    warn!(mountpoint = %mountpoint.display(), error = %err, "cleanup could not unmount");
                }
                if is_mountpoint(&mountpoint) {
                    let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
                }
                if is_mountpoint(&mountpoint) {
                    warn!(mountpoint = %mountpoint.display(), "still mounted; cleanup leaves it");
                    continue;
                }
            }
            let d = dir.clone();
            match self.blocking(move |_| remove_dir_quietly(&d)).await {
                Ok(()) => removed += 1,
                Err(err) => warn!(dir = %dir.display(), error = %err, "cleanup could not delete"),
            }
        }
        Ok(removed)
    }
}

/// Parses a snapshot directory name (`<id>`, `new-<id>`) into its id.
fn dir_id(name: &str) -> Option<u64> {
    name.strip_prefix("new-").unwrap_or(name).parse().ok()
}

fn validate(key: &str, labels: &BTreeMap<String, String>) -> Result<(), SnapshotError> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument(
            "snapshot key is empty".to_string(),
        ));
    }
    for (k, v) in labels {
        if !labels::fits(k, v) {
            return Err(SnapshotError::InvalidArgument(format!(
                "label {k:?} is longer than {} bytes with its value",
                labels::MAX_LABEL_BYTES
            )));
        }
    }
    Ok(())
}
