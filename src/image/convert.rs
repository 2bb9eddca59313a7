//! `convert_image`: reads an image (registry or OCI layout; a single manifest or an index),
//! rewrites every tar layer as eStargz or zstd:chunked, writes a new config (`rootfs.diff_ids`)
//! and manifest (OCI media types, TOC annotations), and stores it at the destination, skipping
//! blobs the destination already has.
//!
//! Each layer is streamed: downloaded to a temp file, decompressed and rebuilt into another temp
//! file, then pushed from that file, so memory stays constant for multi-GB layers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, info_span, Instrument};

use crate::blob::{BlobSource, FileBlob};
use crate::digest::sha256_digest;
use crate::estargz::{self, BuildOptions, Compression, RecordedFile};
use crate::labels;
use crate::registry::{Client, Reference, RegistryError};

use super::layout::OciLayout;
use super::location::ImageLocation;
use super::types::{
    is_index, is_layer, is_manifest, parse_json, to_json, Descriptor, ImageConfig, Index, Manifest,
    DOCKER_CONFIG, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST,
};
use super::{select_platform, ImageError, Platform};

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
    pub source_digest: String,
    pub target: Descriptor,
    pub diff_id: String,
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

fn registry_err(context: String) -> impl FnOnce(RegistryError) -> ImageError {
    move |source| ImageError::Registry { context, source }
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> ImageError {
    move |source| ImageError::Io { context, source }
}

/// Where images are read from.
enum Source<'a> {
    Registry {
        client: &'a Client,
        reference: Reference,
    },
    Layout {
        layout: OciLayout,
        tag: Option<String>,
    },
}

impl<'a> Source<'a> {
    /// As the user wrote it (`oci:DIR[:TAG]` or a reference).
    fn name(&self) -> String {
        match self {
            Source::Registry { reference, .. } => ImageLocation::Registry(reference.clone()),
            Source::Layout { layout, tag } => ImageLocation::Layout {
                dir: layout.dir().to_path_buf(),
                tag: tag.clone(),
            },
        }
        .to_string()
    }

    /// The top-level descriptor and bytes (manifest or index).
    async fn root(&self) -> Result<(Descriptor, Bytes), ImageError> {
        match self {
            Source::Registry { client, reference } => {
                let fetched = client
                    .get_manifest(reference)
                    .await
                    .map_err(registry_err(format!("resolving {reference}")))?;
                let descriptor = Descriptor::new(
                    &fetched.media_type,
                    &fetched.digest,
                    fetched.bytes.len() as u64,
                );
                Ok((descriptor, fetched.bytes))
            }
            Source::Layout { layout, tag } => {
                let descriptor = layout.resolve(tag.as_deref())?;
                let bytes = layout.read_blob(&descriptor.digest)?;
                Ok((descriptor, Bytes::from(bytes)))
            }
        }
    }

    async fn manifest(&self, descriptor: &Descriptor) -> Result<Bytes, ImageError> {
        match self {
            Source::Registry { client, reference } => {
                let r = reference.with_digest(&descriptor.digest);
                let fetched = client
                    .get_manifest(&r)
                    .await
                    .map_err(registry_err(format!("fetching manifest {r}")))?;
                Ok(fetched.bytes)
            }
            Source::Layout { layout, .. } => Ok(Bytes::from(layout.read_blob(&descriptor.digest)?)),
        }
    }

    /// Where `location` points, read through `client` when it is a registry.
    fn at(client: &'a Client, location: &ImageLocation) -> Result<Source<'a>, ImageError> {
        Ok(match location {
            ImageLocation::Registry(reference) => Source::Registry {
                client,
                reference: reference.clone(),
            },
            ImageLocation::Layout { dir, tag } => Source::Layout {
                layout: OciLayout::open(dir)?,
                tag: tag.clone(),
            },
        })
    }

    async fn small_blob(&self, digest: &str) -> Result<Bytes, ImageError> {
        match self {
            Source::Registry { client, reference } => client
                .get_blob(reference, digest)
                .await
                .map_err(registry_err(format!(
                    "fetching blob {digest} of {reference}"
                ))),
            Source::Layout { layout, .. } => Ok(Bytes::from(layout.read_blob(digest)?)),
        }
    }

    /// A ranged view of a blob (to detect layers that are already eStargz).
    fn ranged(&self, descriptor: &Descriptor) -> Result<Arc<dyn BlobSource>, ImageError> {
        match self {
            Source::Registry { client, reference } => Ok(Arc::new(client.blob(
                reference,
                &descriptor.digest,
                descriptor.size,
            ))),
            Source::Layout { layout, .. } => {
                let path = layout.blob_path(&descriptor.digest)?;
                let blob = FileBlob::open(&path)
                    .map_err(|e| ImageError::NotFound(format!("{}: {e}", path.display())))?;
                Ok(Arc::new(blob))
            }
        }
    }

    /// A local file holding the blob: the layout's own file, or a verified download into `tmp`.
    async fn local_file(
        &self,
        descriptor: &Descriptor,
        tmp: &Path,
        progress: &dyn ConvertProgress,
    ) -> Result<PathBuf, ImageError> {
        match self {
            Source::Layout { layout, .. } => {
                let path = layout.blob_path(&descriptor.digest)?;
                if !path.is_file() {
                    return Err(ImageError::NotFound(format!(
                        "layer {} is missing from {}",
                        descriptor.digest,
                        self.name()
                    )));
                }
                Ok(path)
            }
            Source::Registry { client, reference } => {
                use sha2::Digest as _;
                use tokio::io::AsyncReadExt;
                let digest = &descriptor.digest;
                progress.layer_phase(digest, "downloading");
                let context = || format!("downloading layer {digest} of {reference}");
                let mut reader = client
                    .blob_reader(reference, digest)
                    .await
                    .map_err(registry_err(context()))?;
                let path = tmp.join(format!("in-{}", digest.replace(':', "-")));
                let mut file = tokio::fs::File::create(&path)
                    .await
                    .map_err(io_err(format!("creating {}", path.display())))?;
                let mut hasher = sha2::Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    let n = reader.read(&mut buf).await.map_err(io_err(context()))?;
                    if n == 0 {
                        break;
                    }
                    let data = buf.get(..n).unwrap_or_default();
                    hasher.update(data);
                    file.write_all(data)
                        .await
                        .map_err(io_err(format!("writing {}", path.display())))?;
                    total += n as u64;
                    progress.layer_position(digest, total);
                }
                file.flush()
                    .await
                    .map_err(io_err(format!("writing {}", path.display())))?;
                let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
                if &actual != digest {
                    return Err(ImageError::Corrupt(format!(
                        "layer {digest} of {reference} downloaded as {total} bytes with digest {actual}"
                    )));
                }
                Ok(path)
            }
        }
    }
}

/// Where images are written.
enum Sink<'a> {
    Registry {
        client: &'a Client,
        reference: Reference,
    },
    Layout {
        layout: OciLayout,
        tag: Option<String>,
    },
}

impl Sink<'_> {
    /// As the user wrote it (`oci:DIR[:TAG]` or a reference).
    fn name(&self) -> String {
        match self {
            Sink::Registry { reference, .. } => ImageLocation::Registry(reference.clone()),
            Sink::Layout { layout, tag } => ImageLocation::Layout {
                dir: layout.dir().to_path_buf(),
                tag: tag.clone(),
            },
        }
        .to_string()
    }

    async fn has_blob(&self, digest: &str) -> Result<bool, ImageError> {
        match self {
            Sink::Registry { client, reference } => client
                .blob_exists(reference, digest)
                .await
                .map_err(registry_err(format!(
                    "checking blob {digest} in {reference}"
                ))),
            Sink::Layout { layout, .. } => Ok(layout.has_blob(digest)),
        }
    }

    /// Tries a cross-repository mount from `source` (same registry only).
    async fn mount_from(&self, source: &Source<'_>, digest: &str) -> bool {
        match (self, source) {
            (
                Sink::Registry { client, reference },
                Source::Registry {
                    reference: from, ..
                },
            ) if from.registry == reference.registry && from.repository != reference.repository => {
                client
                    .mount_blob(reference, digest, &from.repository)
                    .await
                    .unwrap_or(false)
            }
            _ => false,
        }
    }

    async fn push_file(&self, digest: &str, path: &Path) -> Result<(), ImageError> {
        match self {
            Sink::Registry { client, reference } => client
                .push_blob_file(reference, digest, path)
                .await
                .map_err(registry_err(format!(
                    "pushing blob {digest} to {reference}"
                ))),
            Sink::Layout { layout, .. } => layout.import_blob_file(digest, path),
        }
    }

    async fn push_bytes(&self, digest: &str, bytes: Bytes) -> Result<(), ImageError> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        match self {
            Sink::Registry { client, reference } => client
                .push_blob_bytes(reference, digest, bytes)
                .await
                .map_err(registry_err(format!(
                    "pushing blob {digest} to {reference}"
                ))),
            Sink::Layout { layout, .. } => layout.write_blob(&bytes).map(|_| ()),
        }
    }

    /// Stores a manifest or index by digest (children of an index) and returns its descriptor.
    async fn put_child(&self, media_type: &str, bytes: Bytes) -> Result<Descriptor, ImageError> {
        let digest = sha256_digest(&bytes);
        let descriptor = Descriptor::new(media_type, &digest, bytes.len() as u64);
        match self {
            Sink::Registry { client, reference } => {
                let r = reference.with_digest(&digest);
                client
                    .put_manifest(&r, media_type, bytes)
                    .await
                    .map_err(registry_err(format!(
                        "pushing manifest {digest} to {reference}"
                    )))?;
            }
            Sink::Layout { layout, .. } => {
                layout.write_blob(&bytes)?;
            }
        }
        Ok(descriptor)
    }

    /// Stores the top-level manifest or index under the destination's tag.
    async fn put_root(
        &self,
        mut descriptor: Descriptor,
        bytes: Bytes,
    ) -> Result<Descriptor, ImageError> {
        match self {
            Sink::Registry { client, reference } => {
                client
                    .put_manifest(reference, &descriptor.media_type, bytes)
                    .await
                    .map_err(registry_err(format!("pushing the manifest to {reference}")))?;
            }
            Sink::Layout { layout, tag } => {
                layout.write_blob(&bytes)?;
                let mut entry = descriptor.clone();
                entry.platform = None;
                layout.add_to_index(entry, tag.as_deref())?;
                descriptor.annotations.clear();
            }
        }
        Ok(descriptor)
    }
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
            .map(|l| l.diff_id.clone())
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
        let digest = layer.digest.as_str();
        let span = info_span!("layer", digest = %digest, size = layer.size);
        async {
            self.progress.layer_started(digest, layer.size);
            let Some((position, diff_id)) = tar_layer else {
                let uploaded = self.copy_blob(layer).await?;
                let report = LayerReport {
                    source_digest: digest.to_string(),
                    target: layer.clone(),
                    diff_id: String::new(),
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
            diff_id: diff_id.to_string(),
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
            diff_id: built.diff_id.clone(),
            action: LayerAction::Converted,
            uploaded,
            uncompressed_size: built.uncompressed_size,
        })
    }
}

/// Annotations describing a layer's format, which a rebuilt layer replaces.
fn is_format_annotation(key: &str) -> bool {
    key.starts_with("containerd.io/snapshot/stargz/")
        || key.starts_with("io.containers.estargz.")
        || key.starts_with("io.containers.zstd-chunked.")
}

/// Forwards positions to a [`ConvertProgress`] for one layer.
struct ProgressRelay<'a> {
    progress: &'a dyn ConvertProgress,
    layer: &'a str,
}

impl<'a> ProgressRelay<'a> {
    fn new(progress: &'a dyn ConvertProgress, layer: &'a str) -> Self {
        Self { progress, layer }
    }
    fn position(&self, bytes: u64) {
        self.progress.layer_position(self.layer, bytes);
    }
}

/// Counts bytes read from the compressed input and publishes them every MiB.
struct CountingReader<R> {
    inner: R,
    count: u64,
    last_sent: u64,
    tx: tokio::sync::watch::Sender<u64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count - self.last_sent >= 1 << 20 || n == 0 {
            self.last_sent = self.count;
            let _ = self.tx.send(self.count);
        }
        Ok(n)
    }
}

fn convert_file(
    input: &Path,
    output: &Path,
    build: &BuildOptions,
    digest: &str,
    tx: tokio::sync::watch::Sender<u64>,
) -> Result<estargz::BuiltLayer, ImageError> {
    let file = File::open(input).map_err(io_err(format!("opening {}", input.display())))?;
    let counting = CountingReader {
        inner: std::io::BufReader::with_capacity(1 << 20, file),
        count: 0,
        last_sent: 0,
        tx,
    };
    let tar = estargz::decompressed_reader(counting).map_err(|source| ImageError::Format {
        context: format!("decompressing layer {digest}"),
        source,
    })?;
    let out = File::create(output).map_err(io_err(format!("creating {}", output.display())))?;
    let writer = BufWriter::with_capacity(1 << 20, out);
    estargz::build_layer(tar, writer, build).map_err(|source| ImageError::Format {
        context: format!("converting layer {digest}"),
        source,
    })
}

/// The media type of a manifest document: the transport's, or the document's own `mediaType`
/// when the transport gave a generic one.
fn effective_media_type(declared: &str, bytes: &[u8]) -> String {
    if is_index(declared) || is_manifest(declared) {
        return declared.to_string();
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(m),
            ..
        }) => m,
        Ok(Probe {
            manifests: Some(_), ..
        }) => OCI_INDEX.to_string(),
        Ok(_) => OCI_MANIFEST.to_string(),
        Err(_) => declared.to_string(),
    }
}

/// An image manifest resolved for reading its layers (inspect, mount, pull); its config is
/// fetched only by those that need it ([`image_config`]).
pub struct ResolvedImage {
    /// The manifest's descriptor (platform set when it came from an index).
    pub descriptor: Descriptor,
    pub manifest: Manifest,
    /// One ranged blob per entry of `manifest.layers`.
    pub blobs: Vec<Arc<dyn BlobSource>>,
}

/// Resolves `location` to one image manifest (choosing `platform` from an index) with ranged
/// access to each of its layer blobs.
pub async fn resolve_image(
    client: &Client,
    location: &ImageLocation,
    platform: &Platform,
) -> Result<ResolvedImage, ImageError> {
    let source = Source::at(client, location)?;
    let (root, bytes) = source.root().await?;
    let media_type = effective_media_type(&root.media_type, &bytes);
    let (descriptor, bytes) = if is_index(&media_type) {
        let index: Index = parse_json(&format!("index of {}", source.name()), &bytes)?;
        let chosen = select_platform(&index, platform)
            .map_err(|e| ImageError::Invalid(format!("{}: {e}", source.name())))?
            .clone();
        let bytes = source.manifest(&chosen).await?;
        (chosen, bytes)
    } else {
        let mut root = root;
        root.media_type = media_type;
        (root, bytes)
    };
    let what = format!("manifest {} of {}", descriptor.digest, source.name());
    let manifest: Manifest = parse_json(&what, &bytes)?;
    let blobs = manifest
        .layers
        .iter()
        .map(|l| source.ranged(l))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ResolvedImage {
        descriptor,
        manifest,
        blobs,
    })
}

/// The config `manifest` names, of the image at `location` (one more round trip to a
/// registry).
pub async fn image_config(
    client: &Client,
    location: &ImageLocation,
    manifest: &Manifest,
) -> Result<ImageConfig, ImageError> {
    let source = Source::at(client, location)?;
    let digest = &manifest.config.digest;
    let bytes = source.small_blob(digest).await?;
    parse_json(&format!("config {digest} of {}", source.name()), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_falls_back_to_the_document() {
        assert_eq!(effective_media_type(OCI_INDEX, b"{}"), OCI_INDEX);
        let docker_list = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        assert_eq!(
            effective_media_type("application/json", docker_list),
            super::super::DOCKER_MANIFEST_LIST
        );
        assert_eq!(
            effective_media_type("application/octet-stream", br#"{"manifests":[]}"#),
            OCI_INDEX
        );
        assert_eq!(
            effective_media_type("", br#"{"schemaVersion":2,"layers":[]}"#),
            OCI_MANIFEST
        );
        assert_eq!(
            effective_media_type("text/plain", b"not json"),
            "text/plain"
        );
    }

    #[test]
    fn rebuilt_layers_drop_old_format_annotations_only() {
        assert!(is_format_annotation(labels::TOC_DIGEST));
        assert!(is_format_annotation(estargz::UNCOMPRESSED_SIZE_ANNOTATION));
        assert!(is_format_annotation(
            estargz::ZSTD_MANIFEST_CHECKSUM_ANNOTATION
        ));
        assert!(!is_format_annotation("org.opencontainers.image.title"));
    }

    #[test]
    fn default_levels_follow_the_compression() {
        let gzip = ConvertOptions::default().build_options(0);
        assert_eq!(
            (gzip.level, gzip.chunk_size),
            (9, estargz::DEFAULT_CHUNK_SIZE)
        );
        let zstd = ConvertOptions {
            compression: Compression::Zstd,
            ..Default::default()
        }
        .build_options(0);
        assert_eq!(zstd.level, 3);
        let explicit = ConvertOptions {
            level: Some(1),
            ..Default::default()
        }
        .build_options(0);
        assert_eq!(explicit.level, 1);
    }
}
