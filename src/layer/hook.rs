//! The snapshotter's remote-layer hook implemented by the layer manager.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::snapshotter::remote::{
    LayerLocator, RemoteLayerError, RemoteLayerRequest, RemoteLayers,
};
use crate::sync::lock;
use std::sync::atomic::Ordering;

use super::lower::LowerLayers;
use super::mountinfo::detach_stale_mount;
use super::{LayerError, LayerManager, MountedLayer};

pub(super) fn to_remote_error(error: LayerError) -> RemoteLayerError {
    if error.is_not_lazy() {
        RemoteLayerError::Declined(error.to_string())
    } else {
        RemoteLayerError::Failed(error.to_string())
    }
}

#[async_trait]
impl RemoteLayers for LayerManager {
    async fn mount_layer(&self, request: &RemoteLayerRequest) -> Result<(), RemoteLayerError> {
        let lower = LowerLayers::new(request.lower_dirs.clone());
        self.mount_located(&request.locator, &request.mountpoint, &lower, None)
            .await
    }

    async fn check_layer(
        &self,
        mountpoint: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteLayerError> {
        let spec = lock(&self.mounted)
            .get(mountpoint)
            .map(|layer| layer.spec.clone());
        match spec {
            Some(spec) => self.check(&spec).await.map_err(to_remote_error),
            None => Err(RemoteLayerError::Failed(
                LayerError::NotMounted(mountpoint.to_path_buf()).to_string(),
            )),
        }
    }

    async fn restore_layer(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
        lower_dirs: &[PathBuf],
    ) -> Result<(), RemoteLayerError> {
        let locator = LayerLocator::from_labels(labels).ok_or_else(|| {
            RemoteLayerError::Declined(format!(
                "snapshot at {} has no layer locator labels",
                mountpoint.display()
            ))
        })?;
        // A connection the holder kept is resumed; anything else left there is stale.
        let held = lock(&self.held).remove(mountpoint);
        if held.is_none() {
            detach_stale_mount(mountpoint);
        }
        let lower = LowerLayers::new(lower_dirs.to_vec());
        let resumable = held.is_some();
        match self.mount_located(&locator, mountpoint, &lower, held).await {
            Ok(()) => {
                if !resumable {
                    crate::metrics::record_layer_restore(crate::metrics::LayerRestore::Remounted);
                }
                Ok(())
            }
            // A kept connection nothing serves would block its containers' reads for ever:
            // detach it, so they fail as they would have without the holder.
            Err(err) => {
                if resumable {
                    self.release_connection(mountpoint);
                    detach_stale_mount(mountpoint);
                }
                Err(err)
            }
        }
    }

    async fn unmount_layer(&self, mountpoint: &Path) -> Result<(), RemoteLayerError> {
        self.release_connection(mountpoint);
        let layer = lock(&self.mounted).remove(mountpoint);
        match layer {
            Some(layer) => tokio::task::spawn_blocking(move || layer.unmount())
                .await
                .map_err(|e| RemoteLayerError::Failed(format!("unmount task: {e}")))?
                .map_err(|e| RemoteLayerError::Failed(e.to_string())),
            None => {
                detach_stale_mount(mountpoint);
                Ok(())
            }
        }
    }

    /// With a holder, layers stay mounted for their running containers (the next daemon
    /// resumes them) unless an unmount on exit was asked for; without one, they go with the
    /// daemon.
    async fn shutdown(&self) {
        let layers: Vec<(PathBuf, MountedLayer)> = lock(&self.mounted).drain().collect();
        let keep = self.holder.is_some() && !self.unmount_on_exit.load(Ordering::Relaxed);
        if keep && !layers.is_empty() {
            tracing::info!(
                layers = layers.len(),
                "leaving the layers mounted for their containers; the next start resumes them"
            );
        }
        for (mountpoint, layer) in layers {
            if keep {
                layer.leave_mounted();
            } else {
                self.release_connection(&mountpoint);
                let unmounted = tokio::task::spawn_blocking(move || layer.unmount()).await;
                if let Ok(Err(err)) = unmounted {
                    tracing::warn!(error = %err, "unmount on exit failed");
                }
            }
        }
    }
}
