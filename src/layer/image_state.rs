//! Per-image state of the first Prepare: the manifest, every layer's TOC read ahead at once, and
//! the image config with the files its containers read first.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tracing::Instrument;

use crate::digest::Digest;
use crate::estargz::{self};
use crate::image::{self, Descriptor, Manifest};
use crate::labels;
use crate::registry::Reference;
use crate::snapshotter::remote::RemoteLayerError;
use crate::sync::lock;

use super::hook::to_remote_error;
use super::startup;
use super::{LayerError, LayerManager, RemoteLayerSpec};

/// The startup prefetch of one image's layers (see [`startup`]).
#[derive(Default)]
pub(super) struct ImageStartup {
    /// The process part of the image config; `None` when the config could not be read.
    pub(super) process: tokio::sync::OnceCell<Option<image::ProcessConfig>>,
    /// The files each layer prefetches at mount, by layer digest.
    pub(super) files: std::sync::OnceLock<HashMap<Digest, Vec<String>>>,
}

/// Longest a layer's first mount waits for the image config (read beside the TOCs) for the
/// startup prefetch.
pub(super) const IMAGE_CONFIG_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a TOC read ahead of its layer's Prepare is kept.
pub(super) const TOC_READ_AHEAD_TTL: std::time::Duration = std::time::Duration::from_secs(120);

/// A layer's TOC, read once by whichever Prepare comes first.
pub(super) type TocCell =
    Arc<tokio::sync::OnceCell<Result<Arc<estargz::LayerToc>, RemoteLayerError>>>;

impl LayerManager {
    /// The image manifest of `image` for the configured platform (indexes resolved).
    pub async fn image_manifest(&self, image: &Reference) -> Result<Arc<Manifest>, LayerError> {
        if let Some(found) = self.cached_manifest(image) {
            return Ok(found);
        }
        let key = image.to_string();
        let location = image::ImageLocation::Registry(image.clone());
        let resolved =
            image::resolve_image(&self.client, &location, &self.options.platform).await?;
        let manifest = Arc::new(resolved.manifest);
        lock(&self.manifests).insert(key, (resolved.descriptor.digest, manifest.clone()));
        Ok(manifest)
    }

    /// The manifest of `image` if [`image_manifest`](Self::image_manifest) fetched it before.
    pub(super) fn cached_manifest(&self, image: &Reference) -> Option<Arc<Manifest>> {
        lock(&self.manifests)
            .get(&image.to_string())
            .map(|(_, manifest)| manifest.clone())
    }

    /// The digest of `image`'s manifest (for its platform), once
    /// [`image_manifest`](Self::image_manifest) fetched it.
    pub(super) fn cached_manifest_digest(&self, image: &Reference) -> Option<Digest> {
        lock(&self.manifests)
            .get(&image.to_string())
            .map(|(digest, _)| digest.clone())
    }

    /// Reads and checks the footer and TOC of `spec`'s blob (see [`estargz::open_layer`]),
    /// starting from `tail`, its last bytes, when they were read already.
    pub(super) async fn read_toc(
        &self,
        spec: &RemoteLayerSpec,
        tail: Option<Bytes>,
    ) -> Result<estargz::LayerToc, LayerError> {
        if spec.toc_digest().is_none() {
            // Not eStargz / zstd:chunked: a plain gzip layer the image's SOCI index may cover.
            return self
                .read_ztoc_layer(spec)
                .await?
                .ok_or_else(|| LayerError::NotIndexed {
                    digest: spec.layer.digest.clone(),
                });
        }
        let blob = self
            .client
            .blob(&spec.image, &spec.layer.digest, spec.layer.size);
        let opened = match tail {
            Some(tail) => estargz::open_layer_from_tail(&blob, spec.toc_digest(), tail).await,
            None => estargz::open_layer(&blob, spec.toc_digest()).await,
        };
        opened
            .map(estargz::LayerToc::without_raw_toc)
            .map_err(|source| LayerError::Format {
                digest: spec.layer.digest.clone(),
                source,
            })
    }

    /// The TOC of `spec`, read together with those of the image's other lazily pullable layers
    /// not read yet (`image_layers`, from the Prepare labels): containerd prepares layers one
    /// after another, so the first Prepare of an image reads every TOC at once and the later
    /// ones find theirs ready. TOCs read ahead are kept for [`TOC_READ_AHEAD_TTL`]. `tail`: the
    /// last bytes of `spec`'s blob, if already read.
    pub(super) async fn toc_read_ahead(
        &self,
        image: &Reference,
        spec: &RemoteLayerSpec,
        image_layers: &[String],
        tail: Option<Bytes>,
    ) -> Result<Arc<estargz::LayerToc>, RemoteLayerError> {
        let manifest = self.image_manifest(image).await.map_err(to_remote_error)?;
        // Layers without a TOC are read ahead too when the image's SOCI index covers them.
        let indexed = match manifest
            .layers
            .iter()
            .any(|l| !l.annotations.contains_key(labels::TOC_DIGEST))
        {
            true => self.soci_indexed_layers(image).await,
            false => Vec::new(),
        };
        let others = image_layers
            .iter()
            .filter(|digest| **digest != spec.layer.digest)
            .filter_map(|digest| manifest.layers.iter().find(|l| l.digest == *digest))
            .filter(|layer| {
                layer.annotations.contains_key(labels::TOC_DIGEST)
                    || indexed.contains(&layer.digest)
            })
            .map(|layer| RemoteLayerSpec {
                image: image.clone(),
                layer: layer.clone(),
            });
        let jobs: Vec<_> = std::iter::once(spec.clone())
            .chain(others)
            .map(|spec| (self.toc_cell(image, &spec.layer.digest), spec))
            .collect();
        let tail = &tail;
        let startup = self
            .options
            .startup_prefetch
            .then(|| self.image_startup(image));
        let process = async {
            let startup = startup.as_ref()?;
            let read = startup
                .process
                .get_or_init(|| self.image_process(image, &manifest));
            // Never holds a mount back for long: without the config there is no startup prefetch.
            tokio::time::timeout(IMAGE_CONFIG_WAIT, read)
                .await
                .ok()
                .cloned()
                .flatten()
        };
        let tocs = futures::future::join_all(jobs.iter().enumerate().map(
            |(position, (cell, spec))| async move {
                // The tail read ahead is this layer's, the first job.
                let tail = tail.clone().filter(|_| position == 0);
                cell.get_or_init(|| async {
                    self.read_toc(spec, tail)
                        .await
                        .map(Arc::new)
                        .map_err(to_remote_error)
                })
                .await
                .clone()
            },
        ));
        let (mut results, process) = tokio::join!(tocs, process);
        if let (Some(startup), Some(process)) = (startup, process) {
            startup.files.get_or_init(|| {
                let by_digest: HashMap<&str, &estargz::LayerToc> = jobs
                    .iter()
                    .zip(&results)
                    .filter_map(|((_, spec), toc)| {
                        Some((spec.layer.digest.as_str(), toc.as_ref().ok()?.as_ref()))
                    })
                    .collect();
                let top_first: Vec<&Descriptor> = manifest.layers.iter().rev().collect();
                let tocs: Vec<Option<&estargz::LayerToc>> = top_first
                    .iter()
                    .map(|layer| by_digest.get(layer.digest.as_str()).copied())
                    .collect();
                let files = startup::startup_files(&process, &tocs);
                tracing::debug!(?files, "startup files of the image");
                top_first
                    .iter()
                    .zip(files)
                    .map(|(layer, files)| (layer.digest.clone(), files))
                    .collect()
            });
        }
        results.swap_remove(0)
    }

    /// The startup-prefetch state of `image` (created empty), dropping expired ones.
    pub(super) fn image_startup(&self, image: &Reference) -> Arc<ImageStartup> {
        let mut startups = lock(&self.startups);
        startups.retain(|_, (created, _)| created.elapsed() < TOC_READ_AHEAD_TTL);
        startups
            .entry(image.to_string())
            .or_insert_with(|| (std::time::Instant::now(), Arc::default()))
            .1
            .clone()
    }

    /// The files layer `digest` of `image` prefetches at mount (none when unknown).
    pub(super) fn startup_files_of(&self, image: &Reference, digest: &Digest) -> Vec<String> {
        let startup = lock(&self.startups)
            .get(&image.to_string())
            .map(|(_, startup)| startup.clone());
        startup
            .and_then(|startup| startup.files.get()?.get(digest).cloned())
            .unwrap_or_default()
    }

    /// The process part of `image`'s config (one small blob); `None`, logged, when it cannot be
    /// read: the startup prefetch is an optimization.
    pub(super) async fn image_process(
        &self,
        image: &Reference,
        manifest: &Manifest,
    ) -> Option<image::ProcessConfig> {
        let digest = &manifest.config.digest;
        let span = tracing::info_span!("image.config", image = %image, digest = %digest);
        let location = image::ImageLocation::Registry(image.clone());
        image::image_config(&self.client, &location, manifest)
            .instrument(span)
            .await
            .map(|config| config.process())
            .map_err(|e| tracing::info!(image = %image, error = %e, "cannot read the image config; no startup prefetch for it"))
            .ok()
    }

    /// The read-ahead cell of one layer's TOC (created empty), dropping expired ones.
    pub(super) fn toc_cell(&self, image: &Reference, digest: &Digest) -> TocCell {
        let mut tocs = lock(&self.tocs);
        tocs.retain(|_, (created, _)| created.elapsed() < TOC_READ_AHEAD_TTL);
        tocs.entry((image.to_string(), digest.clone()))
            .or_insert_with(|| (std::time::Instant::now(), TocCell::default()))
            .1
            .clone()
    }
}
