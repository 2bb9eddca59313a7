//! The snapshotter itself: containerd's snapshot semantics over the metadata store and the
//! snapshot directories, the remote-layer path of Prepare, restart recovery, and the thin tonic
//! adapter that maps every call to gRPC (one tracing span per call, errors to containerd's codes).

use crate::labels;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument};

use super::filter::{matches_any, Filter};
use super::mounts::{snapshot_mounts, OverlayOptions};
use super::proto::snapshots as pb;
use super::proto::Mount;
use super::remote::{LayerLocator, RemoteLayerError, RemoteLayerRequest, RemoteLayers};
use super::store::{now_nanos, Kind, MetadataStore, SnapshotInfo, SnapshotRecord, StoreError};

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
        let mut max_id = store.all()?.iter().map(|(_, r)| r.id).max().unwrap_or(0);
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

    /// The directory of snapshot `id`.
    fn dir(&self, id: u64) -> PathBuf {
        self.inner.snapshots_dir.join(id.to_string())
    }

    /// The layer trees of snapshot `name` and its ancestors, nearest first (what overlayfs
    /// stacks as lowerdirs); empty for "".
    fn layer_dirs(&self, name: &str) -> Result<Vec<PathBuf>, SnapshotError> {
        if name.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.inner.store.begin()?;
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

    /// Remounts every remote layer recorded in the metadata (after a restart). Returns how many
    /// were restored; failures are logged and counted.
    pub async fn restore_remote_layers(&self) -> Result<usize, SnapshotError> {
        // Parents first: a layer's whiteouts are judged against the layers below it, mounted.
        let records = self
            .blocking(|s| {
                let mut remote = Vec::new();
                for (name, record) in s.inner.store.all()? {
                    if record.remote {
                        let lower_dirs = s.layer_dirs(&record.parent)?;
                        remote.push((name, record, lower_dirs));
                    }
                }
                remote.sort_by_key(|(_, _, lower)| lower.len());
                Ok(remote)
            })
            .await?;
        let mut restored = 0;
        for (name, record, lower_dirs) in records {
            let mountpoint = self.dir(record.id).join("fs");
            match self
                .inner
                .remote
                .restore_layer(&mountpoint, &record.labels, &lower_dirs)
                .await
            {
                Ok(()) => {
                    restored += 1;
                    self.inner.remote_restored.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    self.inner
                        .remote_restore_failures
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(snapshot = %name, mountpoint = %mountpoint.display(), error = %err,
                        "remote layer could not be remounted after restart; containers using it will fail until it is removed and pulled again");
                }
            }
        }
        Ok(restored)
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
                    Ok(()) => {
                        return Err(SnapshotError::AlreadyExists(format!(
                            "target snapshot {target:?}"
                        )))
                    }
                    Err(RemoteAttempt::TargetExists) => {
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
        if !parent.is_empty() {
            // A container's rootfs comes from Prepare: check its remote layers.
            let parent_owned = parent.to_string();
            if let Ok(chain) = self
                .blocking(move |s| Ok(s.inner.store.begin()?.chain(&parent_owned)?))
                .await
            {
                self.check_remote_chain(&chain);
            }
        }
        let (key, parent) = (key.to_string(), parent.to_string());
        let mounts = self
            .blocking(move |s| s.create_local(Kind::Active, &key, &parent, labels))
            .await?;
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
        self.blocking(move |s| s.create_local(Kind::View, &key, &parent, labels))
            .await
    }

    async fn prepare_remote(
        &self,
        key: &str,
        parent: &str,
        target: &str,
        labels: &BTreeMap<String, String>,
        locator: LayerLocator,
    ) -> Result<(), RemoteAttempt> {
        let fallback = |e: SnapshotError| RemoteAttempt::Fallback {
            kind: "snapshotter_error",
            reason: e.to_string(),
        };
        let (target_owned, parent_owned) = (target.to_string(), parent.to_string());
        let (id, mountpoint, name, lower_dirs) = self
            .blocking(move |s| {
                // containerd looks the result up by (snapshot.ref label, parent); one such
                // snapshot is enough.
                if s.find_target(&target_owned, &parent_owned)?.is_some() {
                    return Ok(None);
                }
                if !parent_owned.is_empty() {
                    match s.inner.store.get(&parent_owned)? {
                        Some(p) if p.kind == Kind::Committed => {}
                        _ => {
                            return Err(SnapshotError::InvalidArgument(format!(
                                "parent {parent_owned:?} is not a committed snapshot"
                            )))
                        }
                    }
                }
                let id = s.inner.next_id.fetch_add(1, Ordering::Relaxed);
                // The chain ID names the snapshot, unless that name is taken by the same layer on
                // another parent (another namespace's unpacked parent): then a unique name.
                let name = if s.inner.store.get(&target_owned)?.is_some() {
                    format!("{target_owned}@{id}")
                } else {
                    target_owned.clone()
                };
                let dir = s.dir(id);
                let mountpoint = dir.join("fs");
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&mountpoint)
                    .map_err(SnapshotError::io(format!(
                        "creating {}",
                        mountpoint.display()
                    )))?;
                let lower_dirs = s.layer_dirs(&parent_owned)?;
                Ok(Some((id, mountpoint, name, lower_dirs)))
            })
            .await
            .map_err(fallback)?
            .ok_or(RemoteAttempt::TargetExists)?;

        let request = RemoteLayerRequest {
            target: target.to_string(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels: labels.clone(),
            locator,
            mountpoint: mountpoint.clone(),
            lower_dirs,
        };
        let span = info_span!("remote_layer.mount", target, layer = %request.locator.layer_digest);
        if let Err(err) = self
            .inner
            .remote
            .mount_layer(&request)
            .instrument(span)
            .await
        {
            let dir = self.dir(id);
            let _ = self.blocking(move |_| remove_dir_quietly(&dir)).await;
            let kind = match err {
                RemoteLayerError::Declined(_) => "declined",
                RemoteLayerError::Failed(_) => "remote_failed",
            };
            return Err(RemoteAttempt::Fallback {
                kind,
                reason: err.to_string(),
            });
        }

        let record = SnapshotRecord {
            id,
            kind: Kind::Committed,
            parent: parent.to_string(),
            created_nanos: now_nanos(),
            updated_nanos: now_nanos(),
            labels: labels.clone(),
            remote: true,
            usage: Some((0, 0)),
        };
        let committed = self
            .blocking(move |s| {
                let txn = s.inner.store.begin()?;
                let raced = txn.all()?.iter().any(|(other, r)| {
                    other == &name
                        || (r.parent == record.parent
                            && r.labels.get(labels::SNAPSHOT_REF)
                                == record.labels.get(labels::SNAPSHOT_REF))
                });
                if raced {
                    return Ok(false);
                }
                txn.put(&name, &record)?;
                txn.commit()?;
                Ok(true)
            })
            .await;
        match committed {
            Ok(true) => {
                self.inner.remote_mounted.fetch_add(1, Ordering::Relaxed);
                info!(target, key, "layer mounted lazily");
                Ok(())
            }
            other => {
                self.release_remote_dir(id).await;
                match other {
                    Ok(_) => Err(RemoteAttempt::TargetExists),
                    Err(e) => Err(fallback(e)),
                }
            }
        }
    }

    /// The name of a committed snapshot labelled `containerd.io/snapshot.ref` = `target` on
    /// `parent`, if any.
    fn find_target(&self, target: &str, parent: &str) -> Result<Option<String>, SnapshotError> {
        Ok(self
            .inner
            .store
            .all()?
            .into_iter()
            .find(|(_, r)| {
                r.kind == Kind::Committed
                    && r.parent == parent
                    && r.labels.get(labels::SNAPSHOT_REF).map(String::as_str) == Some(target)
            })
            .map(|(name, _)| name))
    }

    /// Unmounts (through the hook) and deletes a remote snapshot's directory.
    async fn release_remote_dir(&self, id: u64) {
        let dir = self.dir(id);
        let mountpoint = dir.join("fs");
        if let Err(err) = self.inner.remote.unmount_layer(&mountpoint).await {
            warn!(mountpoint = %mountpoint.display(), error = %err,
                "unmounting remote layer failed; Cleanup will retry");
            return;
        }
        let _ = self.blocking(move |_| remove_dir_quietly(&dir)).await;
    }

    /// Creates an active or view snapshot: directory made under a temporary name, then renamed
    /// into place inside the metadata transaction.
    fn create_local(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let temp = self.inner.snapshots_dir.join(format!("new-{id}"));
        let result = self.create_local_in(kind, key, parent, labels, id, &temp);
        if result.is_err() {
            remove_dir_quietly(&temp).ok();
        }
        result
    }

    fn create_local_in(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        id: u64,
        temp: &Path,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let mkdir = |path: &Path, mode: u32| {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(path)
                .map_err(SnapshotError::io(format!("creating {}", path.display())))
        };
        mkdir(temp, 0o700)?;
        mkdir(&temp.join("fs"), 0o755)?;
        if kind == Kind::Active {
            mkdir(&temp.join("work"), 0o711)?;
        }

        let txn = self.inner.store.begin()?;
        if txn.get(key)?.is_some() {
            return Err(SnapshotError::AlreadyExists(format!("snapshot {key:?}")));
        }
        let mut chain = Vec::new();
        if !parent.is_empty() {
            let parent_record = txn
                .get(parent)?
                .ok_or_else(|| SnapshotError::NotFound(format!("parent snapshot {parent:?}")))?;
            if parent_record.kind != Kind::Committed {
                return Err(SnapshotError::InvalidArgument(format!(
                    "parent {parent:?} is not a committed snapshot"
                )));
            }
            chain = txn.chain_ids(parent)?;
            // The new upper dir takes the owner of the parent's root, as containerd's overlay does.
            let parent_fs = self.dir(parent_record.id).join("fs");
            if let Ok(meta) = std::fs::metadata(&parent_fs) {
                std::os::unix::fs::lchown(temp.join("fs"), Some(meta.uid()), Some(meta.gid()))
                    .map_err(SnapshotError::io(format!(
                        "setting the owner of {}",
                        temp.join("fs").display()
                    )))?;
            }
        }
        let now = now_nanos();
        txn.put(
            key,
            &SnapshotRecord {
                id,
                kind,
                parent: parent.to_string(),
                created_nanos: now,
                updated_nanos: now,
                labels,
                remote: false,
                usage: None,
            },
        )?;
        let dir = self.dir(id);
        std::fs::rename(temp, &dir).map_err(SnapshotError::io(format!(
            "renaming {} to {}",
            temp.display(),
            dir.display()
        )))?;
        if let Err(err) = txn.commit() {
            remove_dir_quietly(&dir).ok();
            return Err(err.into());
        }
        Ok(self.mounts_for(kind, id, &chain))
    }

    fn mounts_for(&self, kind: Kind, id: u64, chain: &[(u64, bool)]) -> Vec<Mount> {
        let parent_dirs: Vec<PathBuf> = chain.iter().map(|&(pid, _)| self.dir(pid)).collect();
        let refs: Vec<&Path> = parent_dirs.iter().map(PathBuf::as_path).collect();
        snapshot_mounts(kind, &self.dir(id), &refs, &self.inner.overlay)
    }

    /// Mounts: the mounts of an active snapshot or a view; remote ancestors are health-checked
    /// first (failures are logged).
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let key_owned = key.to_string();
        let (record, chain) = self
            .blocking(move |s| {
                let txn = s.inner.store.begin()?;
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

    /// Checks the remote layers of `chain` (one small read each, which also refreshes tokens,
    /// redirects and connections) in the background, all at once: an unhealthy layer is only
    /// logged, so the call that asked does not wait a round trip per layer for it.
    fn check_remote_chain(&self, chain: &[SnapshotRecord]) {
        for link in chain.iter().filter(|r| r.remote) {
            let mountpoint = self.dir(link.id).join("fs");
            let remote = Arc::clone(&self.inner.remote);
            let labels = link.labels.clone();
            tokio::spawn(async move {
                if let Err(err) = remote.check_layer(&mountpoint, &labels).await {
                    warn!(mountpoint = %mountpoint.display(), error = %err, "remote layer is unhealthy");
                }
            });
        }
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
                let owned: HashSet<u64> = s.inner.store.all()?.iter().map(|(_, r)| r.id).collect();
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

/// Why the remote path of Prepare did not mount a layer.
enum RemoteAttempt {
    /// The target snapshot already exists: answer AlreadyExists.
    TargetExists,
    /// Fall back to a normal snapshot, for this reason.
    Fallback {
        /// Short stable word for the fallback metric.
        kind: &'static str,
        reason: String,
    },
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

/// True when `path` is the root of a mount (its device differs from its parent's).
fn is_mountpoint(path: &Path) -> bool {
    let (Some(parent), Ok(meta)) = (path.parent(), std::fs::symlink_metadata(path)) else {
        return false;
    };
    match std::fs::symlink_metadata(parent) {
        Ok(parent_meta) => parent_meta.dev() != meta.dev(),
        Err(_) => false,
    }
}

fn remove_dir_quietly(dir: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapshotError::io(format!("deleting {}", dir.display()))(e)),
    }
}

/// Bytes (allocated blocks × 512) and inodes under `root`, hard links counted once, without
/// crossing into other filesystems.
fn disk_usage(root: &Path) -> Result<(u64, u64), SnapshotError> {
    let root_meta = std::fs::symlink_metadata(root)
        .map_err(SnapshotError::io(format!("measuring {}", root.display())))?;
    let device = root_meta.dev();
    let mut seen = HashSet::new();
    let mut size = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != device || !seen.insert(meta.ino()) {
            continue;
        }
        inodes = inodes.saturating_add(1);
        size = size.saturating_add(meta.blocks().saturating_mul(512));
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    Ok((size, inodes))
}

fn to_map(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a snapshot info to its protobuf form.
pub fn info_to_proto(info: SnapshotInfo) -> pb::Info {
    let kind = match info.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: kind as i32,
        created_at: Some(timestamp(info.created)),
        updated_at: Some(timestamp(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

type ListStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

/// How many infos one List response message carries.
const LIST_BATCH: usize = 100;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Prepare", key = %r.key, parent = %r.parent);
        let mounts = Service::prepare(self, &r.key, &r.parent, to_map(r.labels))
            .instrument(span)
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.View", key = %r.key, parent = %r.parent);
        let mounts = Service::view(self, &r.key, &r.parent, to_map(r.labels))
            .instrument(span)
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Mounts", key = %r.key);
        let mounts = Service::mounts(self, &r.key).instrument(span).await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Commit", name = %r.name, key = %r.key);
        Service::commit(self, &r.name, &r.key, to_map(r.labels))
            .instrument(span)
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Remove", key = %r.key);
        Service::remove(self, &r.key).instrument(span).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Stat", key = %r.key);
        let info = Service::stat(self, &r.key).instrument(span).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_to_proto(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("Update needs info with a snapshot name"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let span = info_span!("snapshots.Update", name = %info.name);
        let updated = Service::update(self, &info.name, to_map(info.labels), paths)
            .instrument(span)
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_to_proto(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.List", filters = ?r.filters);
        let infos = Service::list(self, &r.filters).instrument(span).await?;
        let mut batches = Vec::new();
        let mut infos = infos.into_iter().map(info_to_proto).peekable();
        while infos.peek().is_some() {
            let info: Vec<pb::Info> = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("snapshots.Usage", key = %r.key);
        let (size, inodes) = Service::usage(self, &r.key).instrument(span).await?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(size).unwrap_or(i64::MAX),
            inodes: i64::try_from(inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let span = info_span!("snapshots.Cleanup");
        let removed = Service::cleanup(self).instrument(span).await?;
        info!(removed, "cleanup removed orphan snapshot directories");
        Ok(Response::new(()))
    }
}
