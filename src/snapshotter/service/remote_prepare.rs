//! The remote side of Prepare: a layer the remote-layer hook mounts lazily is committed at once
//! under its chain ID; restore after a restart, release on remove, and the check that a remote
//! chain is still mounted.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{info, info_span, warn, Instrument};

use crate::labels;
use crate::snapshotter::remote::{LayerLocator, RemoteLayerError, RemoteLayerRequest};
use crate::snapshotter::store::{now_nanos, Kind, SnapshotRecord, SnapshotView};

use super::fs::remove_dir_quietly;
use super::{Service, SnapshotError};

/// Why the remote path of Prepare did not mount a layer.
pub(super) enum RemoteAttempt {
    /// The target snapshot already exists: answer AlreadyExists.
    TargetExists,
    /// Fall back to a normal snapshot, for this reason.
    Fallback {
        /// Short stable word for the fallback metric.
        kind: &'static str,
        reason: String,
    },
}

impl Service {
    /// Remounts every remote layer recorded in the metadata (after a restart). Returns how many
    /// were restored; failures are logged and counted.
    pub async fn restore_remote_layers(&self) -> Result<usize, SnapshotError> {
        // Parents first: a layer's whiteouts are judged against the layers below it, mounted.
        let records = self
            .blocking(|s| {
                let txn = s.inner.store.read()?;
                let mut remote = Vec::new();
                for (name, record) in txn.all()? {
                    if record.remote {
                        let lower_dirs = s.layer_dirs(&txn, &record.parent)?;
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

    /// The remote path of Prepare: one read transaction checks the target and the parent, the
    /// hook mounts the layer with no transaction open (a mount takes round trips), and one write
    /// transaction commits it unless another Prepare committed the same target meanwhile.
    pub(super) async fn prepare_remote(
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
                let txn = s.inner.store.read()?;
                // containerd looks the result up by (snapshot.ref label, parent); one such
                // snapshot is enough.
                if txn
                    .committed_target(&parent_owned, &target_owned)?
                    .is_some()
                {
                    return Ok(None);
                }
                if !parent_owned.is_empty() {
                    match txn.get(&parent_owned)? {
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
                let name = if txn.get(&target_owned)?.is_some() {
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
                let lower_dirs = s.layer_dirs(&txn, &parent_owned)?;
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
                let raced = txn.get(&name)?.is_some()
                    || match record.labels.get(labels::SNAPSHOT_REF) {
                        Some(target) => !txn.with_target(&record.parent, target)?.is_empty(),
                        None => false,
                    };
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

    /// Unmounts (through the hook) and deletes a remote snapshot's directory.
    pub(super) async fn release_remote_dir(&self, id: u64) {
        let dir = self.dir(id);
        let mountpoint = dir.join("fs");
        if let Err(err) = self.inner.remote.unmount_layer(&mountpoint).await {
            warn!(mountpoint = %mountpoint.display(), error = %err,
                "unmounting remote layer failed; Cleanup will retry");
            return;
        }
        let _ = self.blocking(move |_| remove_dir_quietly(&dir)).await;
    }

    /// Checks the remote layers of `chain` (one small read each, which also refreshes tokens,
    /// redirects and connections) in the background, all at once: an unhealthy layer is only
    /// logged, so the call that asked does not wait a round trip per layer for it.
    pub(super) fn check_remote_chain(&self, chain: &[SnapshotRecord]) {
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
}
