//! Plain gzip layers that an image's SOCI index covers: the index looked up once per image
//! (the registry's referrers API, else its tag fallback), and a layer's zTOC fetched and opened
//! as its TOC.

use std::sync::Arc;

use tracing::Instrument;

use crate::digest::Digest;
use crate::estargz::LayerToc;
use crate::image::Manifest;
use crate::registry::Reference;
use crate::soci::{self, Ztoc, INDEX_ARTIFACT_TYPE, MAX_ZTOC_SIZE};
use crate::sync::lock;

use super::{LayerError, LayerManager, RemoteLayerSpec};

/// An image's SOCI index manifest, looked up once (`None`: the image has none).
pub(super) type IndexCell = Arc<tokio::sync::OnceCell<Option<Arc<Manifest>>>>;

impl LayerManager {
    /// The SOCI index of `image` (whose manifest was fetched), looked up once; `None` when it
    /// has none. A lookup that fails is logged and taken as none, not kept: the layer is then
    /// pulled as usual.
    async fn soci_index(&self, image: &Reference) -> Option<Arc<Manifest>> {
        let cell = lock(&self.soci_indexes)
            .entry(image.to_string())
            .or_default()
            .clone();
        let found = cell
            .get_or_try_init(|| async {
                let subject = self.cached_manifest_digest(image).ok_or(())?;
                let span = tracing::info_span!("soci.index", image = %image, subject = %subject);
                self.find_soci_index(image, &subject)
                    .instrument(span)
                    .await
                    .map_err(|e| tracing::warn!(image = %image, error = %e, "cannot look up the image's SOCI index; its gzip layers are pulled whole"))
            })
            .await;
        found.ok().cloned().flatten()
    }

    async fn find_soci_index(
        &self,
        image: &Reference,
        subject: &Digest,
    ) -> Result<Option<Arc<Manifest>>, LayerError> {
        let Some(referrers) = self
            .client
            .get_referrers(image, subject, INDEX_ARTIFACT_TYPE)
            .await?
        else {
            tracing::debug!("the image has no SOCI index");
            return Ok(None);
        };
        // The last one listed: `soci push` appends, so it is the newest.
        let Some(descriptor) = referrers
            .manifests
            .iter()
            .rev()
            .find(|m| m.artifact_type.as_deref() == Some(INDEX_ARTIFACT_TYPE))
        else {
            return Ok(None);
        };
        let fetched = self
            .client
            .get_manifest(&image.with_digest(&descriptor.digest))
            .await?;
        let manifest: Manifest =
            serde_json::from_slice(&fetched.bytes).map_err(|e| LayerError::Toc {
                detail: format!(
                    "SOCI index {} of {image} is not an image manifest: {e}",
                    descriptor.digest
                ),
            })?;
        tracing::info!(index = %descriptor.digest, ztocs = manifest.layers.len(), "found the image's SOCI index");
        Ok(Some(Arc::new(manifest)))
    }

    /// The layers of `image` its SOCI index has a zTOC for (none without an index).
    pub(super) async fn soci_indexed_layers(&self, image: &Reference) -> Vec<Digest> {
        let Some(index) = self.soci_index(image).await else {
            return Vec::new();
        };
        index
            .layers
            .iter()
            .filter_map(|ztoc| ztoc.annotations.get(soci::IMAGE_LAYER_DIGEST))
            .filter_map(|digest| Digest::parse(digest).ok())
            .collect()
    }

    /// The layer `spec` opened through its zTOC, if the image's SOCI index has one for it.
    pub(super) async fn read_ztoc_layer(
        &self,
        spec: &RemoteLayerSpec,
    ) -> Result<Option<LayerToc>, LayerError> {
        let Some(index) = self.soci_index(&spec.image).await else {
            return Ok(None);
        };
        let Some(ztoc) = index.layers.iter().find(|ztoc| {
            ztoc.annotations.get(soci::IMAGE_LAYER_DIGEST) == Some(&spec.layer.digest.to_string())
        }) else {
            tracing::info!(layer = %spec.layer.digest, "the image's SOCI index has no zTOC for this layer (soci skips small layers); it is pulled whole");
            return Ok(None);
        };
        let format_error = |source| LayerError::Format {
            digest: spec.layer.digest.clone(),
            source,
        };
        if ztoc.size > MAX_ZTOC_SIZE {
            return Err(format_error(crate::estargz::FormatError::BadToc {
                offset: 0,
                reason: format!(
                    "zTOC {} declares {} bytes, more than the {MAX_ZTOC_SIZE} accepted",
                    ztoc.digest, ztoc.size
                ),
            }));
        }
        let span = tracing::info_span!("soci.ztoc", layer = %spec.layer.digest, ztoc = %ztoc.digest, bytes = ztoc.size);
        let bytes = self
            .client
            .get_blob(&spec.image, &ztoc.digest)
            .instrument(span)
            .await?;
        let parsed = Ztoc::parse(&bytes).map_err(|e| {
            format_error(crate::estargz::FormatError::BadToc {
                offset: 0,
                reason: format!(
                    "zTOC {} from the image's SOCI index: {e}; rebuild the index with `soci create`",
                    ztoc.digest
                ),
            })
        })?;
        drop(bytes);
        soci::layer_from_ztoc(parsed, ztoc.digest.clone(), spec.layer.size)
            .map(Some)
            .map_err(format_error)
    }
}
