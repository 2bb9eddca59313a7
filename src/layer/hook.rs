//! The snapshotter's remote-layer hook implemented by the layer manager.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::snapshotter::remote::{
    LayerLocator, RemoteLayerError, RemoteLayerRequest, RemoteLayers,
};
use crate::sync::lock;

use super::lower::LowerLayers;
use super::mountinfo::detach_stale_mount;
use super::{LayerError, LayerManager};

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
        self.mount_located(&request.locator, &request.mountpoint, &lower)
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
        detach_stale_mount(mountpoint);
        self.mount_located(&locator, mountpoint, &LowerLayers::new(lower_dirs.to_vec()))
            .await
    }

    async fn unmount_layer(&self, mountpoint: &Path) -> Result<(), RemoteLayerError> {
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
}
