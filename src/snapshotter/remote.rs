//! The remote-layer hook: how Prepare asks "can this layer be mounted lazily?" and how Remove,
//! Cleanup and restart hand mounted layers back. The `layer` module implements [`RemoteLayers`]
//! with FUSE mounts; [`NoRemoteLayers`] declines everything (every layer is unpacked normally).
//!
//! Labels read here (containerd passes layer annotations and its own labels on Prepare):
//! - `containerd.io/snapshot.ref`: the chain ID the committed snapshot must be named.
//! - CRI: `containerd.io/snapshot/cri.image-ref`, `…/cri.layer-digest`, `…/cri.image-layers`.
//! - stargz (`ctr-remote images rpull`): `containerd.io/snapshot/remote/stargz.reference`,
//!   `…/stargz.digest`, `…/stargz.layers`.
//! - The layer's TOC digest annotation `containerd.io/snapshot/stargz/toc.digest`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::labels;

/// Which label family located the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocatorSource {
    /// containerd's CRI plugin labels.
    Cri,
    /// stargz-snapshotter's `ctr-remote images rpull` labels.
    Stargz,
}

/// Where a layer lives: enough for the layer module to resolve and mount it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLocator {
    /// Image reference, e.g. `127.0.0.1:5000/app:v1`.
    pub image_ref: String,
    /// The layer blob's digest (`sha256:…`).
    pub layer_digest: String,
    /// Every layer digest of the image, base first, when the labels list them (for prefetch).
    pub image_layers: Vec<String>,
    /// The TOC digest annotation, when present (absent for non-eStargz layers).
    pub toc_digest: Option<String>,
    pub source: LocatorSource,
}

impl LayerLocator {
    /// Reads a locator from Prepare labels; `None` when the labels do not name a layer.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<Self> {
        let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        let split = |v: Option<String>| -> Vec<String> {
            v.map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
        };
        let toc_digest = get(labels::TOC_DIGEST);
        if let (Some(image_ref), Some(layer_digest)) =
            (get(labels::CRI_IMAGE_REF), get(labels::CRI_LAYER_DIGEST))
        {
            return Some(Self {
                image_ref,
                layer_digest,
                image_layers: split(get(labels::CRI_IMAGE_LAYERS)),
                toc_digest,
                source: LocatorSource::Cri,
            });
        }
        if let (Some(image_ref), Some(layer_digest)) =
            (get(labels::STARGZ_REFERENCE), get(labels::STARGZ_DIGEST))
        {
            return Some(Self {
                image_ref,
                layer_digest,
                image_layers: split(get(labels::STARGZ_LAYERS)),
                toc_digest,
                source: LocatorSource::Stargz,
            });
        }
        None
    }
}

/// A request to mount one layer lazily.
#[derive(Debug, Clone)]
pub struct RemoteLayerRequest {
    /// The snapshot name to commit on success (the `containerd.io/snapshot.ref` chain ID).
    pub target: String,
    /// The Prepare key containerd used (`<ns>/<n>/extract-… <chainID>`).
    pub key: String,
    /// Parent snapshot name ("" for the base layer).
    pub parent: String,
    /// Every Prepare label.
    pub labels: BTreeMap<String, String>,
    pub locator: LayerLocator,
    /// An existing empty directory to mount the layer's root at (the snapshot's `fs/`).
    pub mountpoint: PathBuf,
    /// The directories of the layers below (the parent chain), nearest first, all mounted.
    pub lower_dirs: Vec<PathBuf>,
}

/// Why a remote mount did not happen. Either way Prepare falls back to a normal snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteLayerError {
    /// The layer is not lazily pullable (not eStargz, no TOC, remote layers disabled, …).
    #[error("layer declined for lazy pulling: {0}")]
    Declined(String),
    /// Trying failed (registry unreachable, TOC digest mismatch, mount failed, …).
    #[error("remote layer failed: {0}")]
    Failed(String),
}

/// The snapshotter's hook into remote (lazily fetched) layers.
///
/// Implementations must be cheap to call concurrently: containerd prepares the layers of an
/// image in parallel.
#[async_trait]
pub trait RemoteLayers: Send + Sync + 'static {
    /// Mounts the layer described by `request` at `request.mountpoint` (read-only, whiteouts as
    /// overlayfs expects). `Ok(())` means the directory now shows the layer's tree; the
    /// snapshotter then commits the snapshot as `request.target`.
    async fn mount_layer(&self, request: &RemoteLayerRequest) -> Result<(), RemoteLayerError>;

    /// Checks a mounted layer before its mounts are handed out (refresh dead connections,
    /// re-resolve). Errors are logged; the default says healthy.
    async fn check_layer(
        &self,
        _mountpoint: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), RemoteLayerError> {
        Ok(())
    }

    /// Mounts again a layer recorded before a restart at `mountpoint` (which may hold a stale
    /// FUSE mount from the previous process: clean it first). `labels` are the stored labels,
    /// including the locator labels; `lower_dirs` as in [`RemoteLayerRequest::lower_dirs`]
    /// (restored before this one).
    async fn restore_layer(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
        lower_dirs: &[PathBuf],
    ) -> Result<(), RemoteLayerError>;

    /// Unmounts and frees the layer mounted at `mountpoint` (Remove and Cleanup call this before
    /// deleting the directory). Must succeed when nothing is mounted there.
    async fn unmount_layer(&self, mountpoint: &Path) -> Result<(), RemoteLayerError>;

    /// Called once when `lazysnap serve` stops (after in-flight gRPC calls drained): stop
    /// prefetch and background work. Mounts may stay for running containers; the next start
    /// restores them through [`RemoteLayers::restore_layer`]. The default does nothing.
    async fn shutdown(&self) {}
}

/// The hook used when lazy pulling is off or unavailable: declines every layer, so containerd
/// fetches and unpacks them normally.
#[derive(Debug, Clone, Default)]
pub struct NoRemoteLayers;

#[async_trait]
impl RemoteLayers for NoRemoteLayers {
    async fn mount_layer(&self, request: &RemoteLayerRequest) -> Result<(), RemoteLayerError> {
        Err(RemoteLayerError::Declined(format!(
            "remote layers are disabled in this lazysnap (layer {} of {})",
            request.locator.layer_digest, request.locator.image_ref
        )))
    }

    async fn restore_layer(
        &self,
        mountpoint: &Path,
        _labels: &BTreeMap<String, String>,
        _lower_dirs: &[PathBuf],
    ) -> Result<(), RemoteLayerError> {
        Err(RemoteLayerError::Declined(format!(
            "remote layers are disabled; cannot remount {}",
            mountpoint.display()
        )))
    }

    async fn unmount_layer(&self, _mountpoint: &Path) -> Result<(), RemoteLayerError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn locators_from_cri_and_stargz_labels() {
        let cri = LayerLocator::from_labels(&labels(&[
            (labels::CRI_IMAGE_REF, "127.0.0.1:5000/a:1"),
            (labels::CRI_LAYER_DIGEST, "sha256:l1"),
            (labels::CRI_IMAGE_LAYERS, "sha256:l0,sha256:l1"),
            (labels::TOC_DIGEST, "sha256:toc"),
        ]))
        .unwrap();
        assert_eq!(cri.source, LocatorSource::Cri);
        assert_eq!(cri.image_layers, ["sha256:l0", "sha256:l1"]);
        assert_eq!(cri.toc_digest.as_deref(), Some("sha256:toc"));

        let stargz = LayerLocator::from_labels(&labels(&[
            (labels::STARGZ_REFERENCE, "127.0.0.1:5000/a:1"),
            (labels::STARGZ_DIGEST, "sha256:l1"),
        ]))
        .unwrap();
        assert_eq!(stargz.source, LocatorSource::Stargz);
        assert!(stargz.toc_digest.is_none());

        assert!(LayerLocator::from_labels(&labels(&[(labels::SNAPSHOT_REF, "x")])).is_none());
    }
}
