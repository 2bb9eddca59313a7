//! One layer of a pull: prepared through the snapshotter with the labels a remote snapshotter
//! reads (mounted lazily, or its blob fetched and unpacked when the snapshotter declines), then
//! committed under its chain ID.

use std::collections::HashMap;

use futures::future::BoxFuture;

use crate::containerd::client::{Containerd, Prepared};
use crate::containerd::proto::Descriptor as ProtoDescriptor;
use crate::containerd::ContainerdError;
use crate::image::Descriptor;
use crate::labels;

use super::{ImageSource, LayerOutcome, PullOptions, PullProgress};

/// Everything one layer's pull needs.
pub(super) struct LayerContext<'a> {
    pub(super) containerd: &'a Containerd,
    pub(super) source: &'a dyn ImageSource,
    pub(super) options: &'a PullOptions,
    pub(super) index: usize,
    pub(super) layer: &'a Descriptor,
    pub(super) diff_id: &'a str,
    pub(super) chain_id: &'a str,
    pub(super) parent: &'a str,
    pub(super) layer_digests: &'a [String],
    pub(super) manifest_digest: &'a str,
    pub(super) progress: &'a dyn PullProgress,
    pub(super) content_labels: HashMap<String, String>,
    /// The blob fetch started ahead for this layer, if any.
    pub(super) prefetch: Option<SharedFetch<'a>>,
    /// The first layer that fell back: the fetches ahead of it and the layers after it start.
    pub(super) first_fallback: &'a tokio::sync::watch::Sender<Option<usize>>,
}

/// A layer blob fetch into the content store that several parties may await.
pub(super) type SharedFetch<'a> =
    futures::future::Shared<BoxFuture<'a, Result<u64, ContainerdError>>>;

/// Layer blobs fetched ahead at the same time.
pub(super) const PREFETCH_CONCURRENCY: usize = 3;

/// Fetches one layer blob into containerd's content store (labelled with its diff ID), unless
/// containerd already has it.
pub(super) struct BlobFetch<'a> {
    pub(super) containerd: &'a Containerd,
    pub(super) source: &'a dyn ImageSource,
    pub(super) index: usize,
    pub(super) layer: &'a Descriptor,
    pub(super) diff_id: &'a str,
    pub(super) content_labels: HashMap<String, String>,
    pub(super) progress: &'a dyn PullProgress,
}

impl BlobFetch<'_> {
    /// Returns the bytes written (0 when containerd already had the blob).
    pub(super) async fn run(self) -> Result<u64, ContainerdError> {
        let digest = &self.layer.digest;
        let mut content_labels = self.content_labels;
        content_labels.insert(labels::UNCOMPRESSED.to_string(), self.diff_id.to_string());
        if self.containerd.content_labels(digest).await?.is_some() {
            self.containerd
                .update_content_labels(digest, &content_labels)
                .await?;
            return Ok(0);
        }
        let stream = self.source.blob_stream(digest, self.layer.size).await?;
        let (index, progress) = (self.index, self.progress);
        let mut written = 0u64;
        self.containerd
            .write_content(digest, self.layer.size, content_labels, stream, |n| {
                written += n;
                progress.layer_bytes(index, n);
            })
            .await?;
        Ok(written)
    }
}

/// Attempts at Prepare when containerd reports AlreadyExists but the target is not found
/// (containerd retries the same way: another unpack may have been racing).
pub(super) const PREPARE_ATTEMPTS: usize = 3;

impl LayerContext<'_> {
    pub(super) async fn pull_layer(&self) -> Result<(LayerOutcome, u64), ContainerdError> {
        let snapshotter = &self.options.snapshotter;
        if self
            .containerd
            .snapshot_exists(snapshotter, self.chain_id)
            .await?
        {
            return Ok((LayerOutcome::Present, 0));
        }
        let snapshot_labels = self.snapshot_labels();
        for _ in 0..PREPARE_ATTEMPTS {
            let key = format!("extract-{} {}", unique_part(), self.chain_id);
            let prepared = self
                .containerd
                .prepare_snapshot(snapshotter, &key, self.parent, snapshot_labels.clone())
                .await?;
            match prepared {
                Prepared::AlreadyExists => {
                    if self
                        .containerd
                        .snapshot_exists(snapshotter, self.chain_id)
                        .await?
                    {
                        tracing::info!(layer = %self.layer.digest, chain_id = self.chain_id, "layer mounted remotely (lazy)");
                        return Ok((LayerOutcome::Lazy, 0));
                    }
                    tracing::warn!(layer = %self.layer.digest, key, "Prepare said AlreadyExists but the target is missing; retrying");
                }
                Prepared::Active(mounts) => {
                    let result = self.unpack(&key, mounts, snapshot_labels.clone()).await;
                    if result.is_err() {
                        if let Err(err) = self.containerd.remove_snapshot(snapshotter, &key).await {
                            tracing::warn!(key, error = %err, "could not remove the failed unpack snapshot");
                        }
                    }
                    return result.map(|bytes| (LayerOutcome::Unpacked, bytes));
                }
            }
        }
        Err(ContainerdError::Protocol(format!(
            "snapshotter {snapshotter} kept answering AlreadyExists for layer {} (chain ID {}) \
             without having it",
            self.layer.digest, self.chain_id
        )))
    }

    /// The labels containerd's unpacker and CRI pass to Prepare: the target, CRI's image labels,
    /// and the layer's `containerd.io/snapshot/*` annotations (e.g. the eStargz TOC digest).
    pub(super) fn snapshot_labels(&self) -> HashMap<String, String> {
        let mut map = HashMap::new();
        for (key, value) in &self.layer.annotations {
            if labels::fits(key, value) {
                map.insert(key.clone(), value.clone());
            }
        }
        map.insert(labels::SNAPSHOT_REF.to_string(), self.chain_id.to_string());
        if labels::fits(labels::CRI_IMAGE_REF, &self.options.image_name) {
            map.insert(
                labels::CRI_IMAGE_REF.to_string(),
                self.options.image_name.clone(),
            );
        }
        map.insert(
            labels::CRI_LAYER_DIGEST.to_string(),
            self.layer.digest.to_string(),
        );
        map.insert(
            labels::CRI_MANIFEST_DIGEST.to_string(),
            self.manifest_digest.to_string(),
        );
        map.insert(
            labels::CRI_IMAGE_LAYERS.to_string(),
            labels::image_layers_value(self.layer_digests, self.index),
        );
        map
    }

    /// The fallback: fetch the blob into the content store, apply it onto the prepared mounts,
    /// check the diff ID, commit under the chain ID. Returns the blob bytes written.
    pub(super) async fn unpack(
        &self,
        key: &str,
        mounts: Vec<crate::containerd::proto::Mount>,
        snapshot_labels: HashMap<String, String>,
    ) -> Result<u64, ContainerdError> {
        let digest = &self.layer.digest;
        tracing::info!(layer = %digest, size = self.layer.size, "layer falls back: fetching and unpacking");
        let index = self.index;
        self.first_fallback.send_if_modified(|first| match first {
            Some(earlier) if *earlier <= index => false,
            _ => {
                *first = Some(index);
                true
            }
        });
        let written = match &self.prefetch {
            Some(started) => started.clone().await?,
            None => {
                BlobFetch {
                    containerd: self.containerd,
                    source: self.source,
                    index: self.index,
                    layer: self.layer,
                    diff_id: self.diff_id,
                    content_labels: self.content_labels.clone(),
                    progress: self.progress,
                }
                .run()
                .await?
            }
        };
        let layer = ProtoDescriptor {
            media_type: self.layer.media_type.clone(),
            digest: digest.to_string(),
            size: i64::try_from(self.layer.size).map_err(|_| ContainerdError::Invalid {
                what: format!("layer {digest}"),
                detail: format!("size {} does not fit containerd's int64", self.layer.size),
            })?,
            annotations: HashMap::new(),
        };
        let applied = self.containerd.apply_layer(layer, mounts).await?;
        if applied != self.diff_id {
            return Err(ContainerdError::DiffIdMismatch {
                layer: digest.to_string(),
                expected: self.diff_id.to_string(),
                actual: applied,
            });
        }
        let committed = self
            .containerd
            .commit_snapshot(
                &self.options.snapshotter,
                self.chain_id,
                key,
                snapshot_labels,
            )
            .await?;
        if !committed {
            // Another pull committed the same chain ID first; ours is redundant.
            self.containerd
                .remove_snapshot(&self.options.snapshotter, key)
                .await?;
        }
        Ok(written)
    }
}

/// A per-attempt unique part for unpack keys (like containerd's: time and randomness).
pub(super) fn unique_part() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let random: u64 = rand::random();
    format!("{nanos}-{random:016x}")
}
