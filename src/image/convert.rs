//! `convert_image`: reads an image (registry or OCI layout; a single manifest or an index),
//! rewrites every tar layer as eStargz or zstd:chunked, writes a new config (`rootfs.diff_ids`)
//! and manifest (OCI media types, TOC annotations), and stores it at the destination, skipping
//! blobs the destination already has.
//!
//! Each layer is streamed: downloaded to a temp file, decompressed and rebuilt into another temp
//! file, then pushed from that file, so memory stays constant for multi-GB layers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tracing::{debug, info, info_span, Instrument};

use crate::digest::{sha256_digest, Digest};
use crate::estargz::{self, BuildOptions, Compression, RecordedFile};
use crate::labels;
use crate::registry::{Client, RegistryError};

use super::layout::OciLayout;
use super::location::ImageLocation;
use super::types::{
    is_index, is_layer, is_manifest, parse_json, to_json, Descriptor, ImageConfig, Index, Manifest,
    DOCKER_CONFIG, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST,
};
use super::{select_platform, ImageError, Platform};

mod endpoints;
mod layer;
use endpoints::Sink;
pub(crate) use endpoints::Source;
pub(crate) use layer::effective_media_type;
use layer::{convert_file, is_format_annotation, ProgressRelay};

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Gzip (eStargz) or zstd (zstd:chunked).
    pub compression: Compression,
    /// Largest chunk of a regular file.
    pub chunk_size: u64,
    /// Compression level; `None` is 9 for gzip and 3 for zstd.
    pub level: Option<u32>,
    /// Paths or globs to put first, in this order (the prefetched part).
    pub prioritized: Vec<String>,
    /// Per tar layer (by position), the files a recorded workload used, placed first after the
    /// `prioritized` matches (`lazysnap optimize`); a layer without any gets
    /// `.no.prefetch.landmark` unless a pattern matches in it.
    pub recorded: Vec<Vec<RecordedFile>>,
    /// Platform chosen from an index (unless `all_platforms`).
    pub platform: Platform,
    /// Convert every manifest of an index and write a new index.
    pub all_platforms: bool,
    /// Keep layers that are already eStargz / zstd:chunked as they are.
    pub reuse: bool,
    /// Where temp files go (default: the system temp dir).
    pub temp_dir: Option<PathBuf>,
    /// Layers converted at the same time.
    pub concurrency: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            compression: Compression::Gzip,
            chunk_size: estargz::DEFAULT_CHUNK_SIZE,
            level: None,
            prioritized: Vec::new(),
            recorded: Vec::new(),
            platform: Platform::host(),
            all_platforms: false,
            reuse: false,
            temp_dir: None,
            concurrency: 2,
        }
    }
}

impl ConvertOptions {
    /// The build options of the tar layer at `position`.
    fn build_options(&self, position: usize) -> BuildOptions {
        let level = self.level.unwrap_or(match self.compression {
            Compression::Gzip => 9,
            Compression::Zstd => 3,
        });
        BuildOptions {
            compression: self.compression,
            chunk_size: self.chunk_size,
            level,
            prioritized: self.prioritized.clone(),
            recorded: self.recorded.get(position).cloned().unwrap_or_default(),
        }
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerAction {
    /// Rebuilt as eStargz / zstd:chunked.
    Converted,
    /// Already lazily pullable and kept (`--reuse`).
    Reused,
    /// Not a tar layer (e.g. an attestation blob); copied verbatim.
    Copied,
}

/// One layer of a converted image.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub source_digest: Digest,
    pub target: Descriptor,
    /// The digest of the layer's tar; `None` for a blob that is not a tar layer (copied as is).
    pub diff_id: Option<Digest>,
    pub action: LayerAction,
    /// False when the destination already had the blob.
    pub uploaded: bool,
    /// Uncompressed tar bytes read (for throughput figures).
    pub uncompressed_size: u64,
}

/// One converted image manifest.
#[derive(Debug, Clone)]
pub struct ImageReport {
    pub platform: Option<Platform>,
    pub manifest: Descriptor,
    pub layers: Vec<LayerReport>,
}

/// The result of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Where the image was written.
    pub target: String,
    /// The top-level descriptor written (a manifest, or an index with `--all-platforms`).
    pub descriptor: Descriptor,
    pub images: Vec<ImageReport>,
}

/// Progress callbacks, one set per layer (`layer` is the source digest).
pub trait ConvertProgress: Send + Sync {
    /// A layer starts; `size` is its compressed size.
    fn layer_started(&self, _layer: &str, _size: u64) {}
    /// A new phase of the layer ("downloading", "converting", "pushing"); positions restart.
    fn layer_phase(&self, _layer: &str, _phase: &str) {}
    /// Compressed input bytes handled so far in the current phase.
    fn layer_position(&self, _layer: &str, _bytes: u64) {}
    /// The layer is done.
    fn layer_finished(&self, _layer: &str, _report: &LayerReport) {}
}

/// Progress that reports nothing.
pub struct NoProgress;
impl ConvertProgress for NoProgress {}

pub(super) fn registry_err(context: String) -> impl FnOnce(RegistryError) -> ImageError {
    move |source| ImageError::Registry { context, source }
}

pub(super) fn io_err(context: String) -> impl FnOnce(std::io::Error) -> ImageError {
    move |source| ImageError::Io { context, source }
}

/// Converts the image at `src` and writes it to `dst`. See the module docs.
pub async fn convert_image(
    client: &Client,
    src: &ImageLocation,
    dst: &ImageLocation,
    opts: &ConvertOptions,
    progress: &dyn ConvertProgress,
) -> Result<ConvertReport, ImageError> {
    let source = Source::at(client, src)?;
    let sink = match dst {
        ImageLocation::Registry(reference) => Sink::Registry {
            client,
            reference: reference.clone(),
        },
        ImageLocation::Layout { dir, tag } => Sink::Layout {
            layout: OciLayout::create(dir)?,
            tag: tag.clone(),
        },
    };
    let tmp = match &opts.temp_dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("lazysnap-convert-")
            .tempdir_in(dir),
        None => tempfile::Builder::new()
            .prefix("lazysnap-convert-")
            .tempdir(),
    }
    .map_err(io_err("creating a temp dir for the conversion".into()))?;
    let span = info_span!("convert", src = %source.name(), dst = %sink.name());
    let job = Job {
        source: &source,
        sink: &sink,
        opts,
        progress,
        tmp: tmp.path(),
    };
    job.run().instrument(span).await
}

struct Job<'a> {
    source: &'a Source<'a>,
    sink: &'a Sink<'a>,
    opts: &'a ConvertOptions,
    progress: &'a dyn ConvertProgress,
    tmp: &'a Path,
}

impl Job<'_> {
    async fn run(&self) -> Result<ConvertReport, ImageError> {
        let (root, bytes) = self.source.root().await?;
        let media_type = effective_media_type(&root.media_type, &bytes);
        if is_index(&media_type) {
            let index: Index = parse_json(&format!("index of {}", self.source.name()), &bytes)?;
            if self.opts.all_platforms {
                return self.convert_index(&index).await;
            }
            let chosen = select_platform(&index, &self.opts.platform)
                .map_err(|e| ImageError::Invalid(format!("{}: {e}", self.source.name())))?
                .clone();
            let manifest_bytes = self.source.manifest(&chosen).await?;
            let image = self.convert_manifest(&chosen, &manifest_bytes).await?;
            self.finish_single(image).await
        } else if is_manifest(&media_type) {
            let mut descriptor = root.clone();
            descriptor.media_type = media_type;
            let image = self.convert_manifest(&descriptor, &bytes).await?;
            self.finish_single(image).await
        } else {
            Err(ImageError::Invalid(format!(
                "{} is a {media_type:?}, not an image manifest or index",
                self.source.name()
            )))
        }
    }

    async fn finish_single(
        &self,
        image: (ImageReport, Bytes),
    ) -> Result<ConvertReport, ImageError> {
        let (mut report, bytes) = image;
        let descriptor = self.sink.put_root(report.manifest.clone(), bytes).await?;
        report.manifest.digest.clone_from(&descriptor.digest);
        debug!(digest = %descriptor.digest, target = %self.sink.name(), "image written");
        Ok(ConvertReport {
            target: self.sink.name(),
            descriptor,
            images: vec![report],
        })
    }

    async fn convert_index(&self, index: &Index) -> Result<ConvertReport, ImageError> {
        let mut out = Index::new_oci();
        out.annotations = index.annotations.clone();
        let mut images = Vec::new();
        for child in &index.manifests {
            let unknown_platform = child
                .platform
                .as_ref()
                .is_some_and(|p| p.os == "unknown" || p.architecture == "unknown");
            if unknown_platform || !is_manifest(&child.media_type) {
                // Attestations and nested indexes refer to the old manifests: leave them out.
                continue;
            }
            let bytes = self.source.manifest(child).await?;
            let (report, manifest_bytes) = self.convert_manifest(child, &bytes).await?;
            let mut descriptor = self.sink.put_child(OCI_MANIFEST, manifest_bytes).await?;
            descriptor.platform.clone_from(&child.platform);
            descriptor.annotations.clone_from(&child.annotations);
            out.manifests.push(descriptor.clone());
            images.push(ImageReport {
                manifest: descriptor,
                ..report
            });
        }
        if out.manifests.is_empty() {
            return Err(ImageError::Invalid(format!(
                "the index of {} lists no image manifests",
                self.source.name()
            )));
        }
        let bytes = Bytes::from(to_json("index", &out)?);
        let descriptor = Descriptor::new(OCI_INDEX, &sha256_digest(&bytes), bytes.len() as u64);
        let descriptor = self.sink.put_root(descriptor, bytes).await?;
        debug!(digest = %descriptor.digest, target = %self.sink.name(), "index written");
        Ok(ConvertReport {
            target: self.sink.name(),
            descriptor,
            images,
        })
    }

    /// Converts one image manifest; stores its layers and config, returns the new manifest's
    /// bytes (not yet stored) and the report.
    async fn convert_manifest(
        &self,
        descriptor: &Descriptor,
        bytes: &[u8],
    ) -> Result<(ImageReport, Bytes), ImageError> {
        let what = format!("manifest {} of {}", descriptor.digest, self.source.name());
        let manifest: Manifest = parse_json(&what, bytes)?;
        let config_bytes = self.source.small_blob(&manifest.config.digest).await?;
        let is_image_config =
            manifest.config.media_type == OCI_CONFIG || manifest.config.media_type == DOCKER_CONFIG;
        if !is_image_config {
            return Err(ImageError::Invalid(format!(
                "{what} has config media type {:?}, not an image config",
                manifest.config.media_type
            )));
        }
        let mut config: ImageConfig = parse_json(&format!("config of {what}"), &config_bytes)?;
        let tar_layers = manifest
            .layers
            .iter()
            .filter(|l| is_layer(&l.media_type))
            .count();
        if tar_layers != config.rootfs.diff_ids.len() {
            return Err(ImageError::Invalid(format!(
                "{what} has {tar_layers} layers but its config lists {} diff_ids",
                config.rootfs.diff_ids.len()
            )));
        }
        let mut diff_id_iter = config.rootfs.diff_ids.iter().enumerate();
        let work: Vec<(Descriptor, Option<(usize, String)>)> = manifest
            .layers
            .iter()
            .map(|l| {
                let tar_layer = if is_layer(&l.media_type) {
                    diff_id_iter.next().map(|(i, d)| (i, d.clone()))
                } else {
                    None
                };
                (l.clone(), tar_layer)
            })
            .collect();
        let layers: Vec<LayerReport> = futures::stream::iter(work)
            .map(|(layer, tar_layer)| async move { self.convert_layer(&layer, tar_layer).await })
            .buffered(self.opts.concurrency.max(1))
            .try_collect()
            .await?;
        config.rootfs.diff_ids = layers
            .iter()
            .filter(|l| l.action != LayerAction::Copied)
            .filter_map(|l| l.diff_id.as_ref().map(Digest::to_string))
            .collect();
        let new_config = Bytes::from(to_json("config", &config)?);
        let config_digest = sha256_digest(&new_config);
        let config_len = new_config.len() as u64;
        self.sink.push_bytes(&config_digest, new_config).await?;
        let out = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_string()),
            config: Descriptor::new(OCI_CONFIG, &config_digest, config_len),
            layers: layers.iter().map(|l| l.target.clone()).collect(),
            annotations: manifest.annotations.clone(),
            extra: manifest.extra.clone(),
        };
        let out_bytes = Bytes::from(to_json("manifest", &out)?);
        let mut new_descriptor = Descriptor::new(
            OCI_MANIFEST,
            &sha256_digest(&out_bytes),
            out_bytes.len() as u64,
        );
        new_descriptor.platform = descriptor.platform.clone().or_else(|| {
            Some(Platform::new(
                &config.os,
                &config.architecture,
                config.variant.as_deref(),
            ))
        });
        Ok((
            ImageReport {
                platform: new_descriptor.platform.clone(),
                manifest: new_descriptor,
                layers,
            },
            out_bytes,
        ))
    }

    /// Converts one layer; `tar_layer` is its position among the tar layers and its diff id
    /// (`None` for a blob that is not a tar layer).
    async fn convert_layer(
        &self,
        layer: &Descriptor,
        tar_layer: Option<(usize, String)>,
    ) -> Result<LayerReport, ImageError> {
        let digest = &layer.digest;
        let span = info_span!("layer", digest = %digest, size = layer.size);
        async {
            self.progress.layer_started(digest, layer.size);
            let Some((position, diff_id)) = tar_layer else {
                let uploaded = self.copy_blob(layer).await?;
                let report = LayerReport {
                    source_digest: digest.clone(),
                    target: layer.clone(),
                    diff_id: None,
                    action: LayerAction::Copied,
                    uploaded,
                    uncompressed_size: 0,
                };
                self.progress.layer_finished(digest, &report);
                return Ok(report);
            };
            if self.opts.reuse {
                if let Some(report) = self.try_reuse(layer, &diff_id).await? {
                    self.progress.layer_finished(digest, &report);
                    return Ok(report);
                }
            }
            let report = self.rebuild(layer, position).await?;
            self.progress.layer_finished(digest, &report);
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// Copies a blob unchanged to the destination; false when it was already there.
    async fn copy_blob(&self, layer: &Descriptor) -> Result<bool, ImageError> {
        if self.sink.has_blob(&layer.digest).await? {
            return Ok(false);
        }
        if self.sink.mount_from(self.source, &layer.digest).await {
            return Ok(false);
        }
        let path = self
            .source
            .local_file(layer, self.tmp, self.progress)
            .await?;
        self.progress.layer_phase(&layer.digest, "pushing");
        self.sink.push_file(&layer.digest, &path).await?;
        if path.starts_with(self.tmp) {
            let _ = std::fs::remove_file(&path);
        }
        Ok(true)
    }

    /// Keeps a layer that is already eStargz / zstd:chunked (its TOC opens and verifies against
    /// the annotation when there is one).
    async fn try_reuse(
        &self,
        layer: &Descriptor,
        diff_id: &str,
    ) -> Result<Option<LayerReport>, ImageError> {
        let diff_id = Digest::parse(diff_id).map_err(|e| {
            ImageError::Invalid(format!(
                "the config's diff_id of layer {}: {e}",
                layer.digest
            ))
        })?;
        let blob = self.source.ranged(layer)?;
        let expected = layer
            .annotations
            .get(labels::TOC_DIGEST)
            .map(String::as_str);
        let toc = match estargz::open_layer(blob.as_ref(), expected).await {
            Ok(toc) => toc,
            Err(e) => {
                info!(layer = %layer.digest, reason = %e, "not reusable; converting");
                return Ok(None);
            }
        };
        let mut target = layer.clone();
        target.media_type = match toc.compression() {
            Compression::Gzip => OCI_LAYER_GZIP.to_string(),
            Compression::Zstd => OCI_LAYER_ZSTD.to_string(),
        };
        target
            .annotations
            .insert(labels::TOC_DIGEST.to_string(), toc.toc_digest().to_string());
        let uploaded = self.copy_blob(layer).await?;
        let uncompressed_size = layer
            .annotations
            .get(estargz::UNCOMPRESSED_SIZE_ANNOTATION)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok(Some(LayerReport {
            source_digest: layer.digest.clone(),
            target,
            diff_id: Some(diff_id),
            action: LayerAction::Reused,
            uploaded,
            uncompressed_size,
        }))
    }

    async fn rebuild(
        &self,
        layer: &Descriptor,
        position: usize,
    ) -> Result<LayerReport, ImageError> {
        let digest = layer.digest.clone();
        let input = self
            .source
            .local_file(layer, self.tmp, self.progress)
            .await?;
        let output = self.tmp.join(format!("out-{}", digest.replace(':', "-")));
        self.progress.layer_phase(&digest, "converting");
        let build = self.opts.build_options(position);
        let built = {
            let input = input.clone();
            let output = output.clone();
            let progress = ProgressRelay::new(self.progress, &digest);
            let digest = digest.clone();
            // build_layer is CPU bound and blocking: run it off the async workers, while this
            // task relays its progress.
            let (tx, mut rx) = tokio::sync::watch::channel(0u64);
            let handle = tokio::task::spawn_blocking(move || {
                convert_file(&input, &output, &build, &digest, tx)
            });
            tokio::pin!(handle);
            loop {
                tokio::select! {
                    result = &mut handle => {
                        break result.map_err(|e| ImageError::Invalid(format!("conversion task failed: {e}")))??;
                    }
                    changed = rx.changed() => {
                        if changed.is_ok() {
                            progress.position(*rx.borrow());
                        } else {
                            // The converter dropped its sender: it is finishing.
                            break (&mut handle).await.map_err(|e| ImageError::Invalid(format!("conversion task failed: {e}")))??;
                        }
                    }
                }
            }
        };
        if input.starts_with(self.tmp) {
            let _ = std::fs::remove_file(&input);
        }
        let mut target = Descriptor::new(
            match self.opts.compression {
                Compression::Gzip => OCI_LAYER_GZIP,
                Compression::Zstd => OCI_LAYER_ZSTD,
            },
            &built.blob_digest,
            built.blob_size,
        );
        target.annotations = layer
            .annotations
            .iter()
            .filter(|(k, _)| !is_format_annotation(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>();
        target.annotations.extend(built.annotations());
        let uploaded = if self.sink.has_blob(&built.blob_digest).await? {
            false
        } else {
            self.progress.layer_phase(&digest, "pushing");
            self.sink.push_file(&built.blob_digest, &output).await?;
            true
        };
        let _ = std::fs::remove_file(&output);
        Ok(LayerReport {
            source_digest: digest,
            target,
            diff_id: Some(built.diff_id.clone()),
            action: LayerAction::Converted,
            uploaded,
            uncompressed_size: built.uncompressed_size,
        })
    }
}

#[cfg(test)]
mod tests;
