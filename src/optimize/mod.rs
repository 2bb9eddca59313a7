//! `lazysnap optimize`: converts the source image, mounts its layers through recording FUSE
//! mounts stacked by overlayfs, runs the image's workload over them with runc, and converts the
//! image again with the files the workload used first (per layer, in first-access order; large
//! files only where they were read), then reports how much of the image the workload uses.

pub mod record;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazysnap_fuse::{ContentSource, MountHandle, MountOptions};
use tracing::Instrument;

use crate::blob::BlobSource;
use crate::cache::{CacheError, CacheOptions, ChunkCache};
use crate::digest::{short_digest, Digest};
use crate::estargz::{self, EntryKind, FormatError};
use crate::fetch::{FetchOptions, LayerReader};
use crate::image::{
    convert_image, image_config, is_layer, resolve_image, ConvertOptions, ConvertProgress,
    ConvertReport, ImageConfig, ImageError, ImageLocation, ResolvedImage,
};
use crate::layer::{build_index, mount_index, LayerError, LowerLayers, LAZY_READ_AHEAD_KB};
use crate::registry::Client;

pub use record::{AccessLog, Record, RecordError, RecordedAccess};
pub use workload::{Ended, RunOutcome, StopWhen, WorkloadError, WorkloadOverrides};

/// Why an image could not be optimized.
#[derive(Debug, thiserror::Error)]
pub enum OptimizeError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("chunk cache of the recording: {0}")]
    Cache(#[from] CacheError),
    #[error("layer {layer} of the converted image: {source}")]
    Format {
        layer: String,
        #[source]
        source: FormatError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{description}; no image was written (pass --accept-failed-run to write one from this record anyway). Last lines of output:\n{tail}")]
    FailedRun { description: String, tail: String },
    #[error("optimize works on one platform at a time; choose one with --platform")]
    AllPlatforms,
}

/// What to optimize for and how.
#[derive(Debug, Clone)]
pub struct OptimizeOptions {
    /// How layers are written (chunk size, compression, platform, temp dir…).
    pub convert: ConvertOptions,
    pub stop: StopWhen,
    pub overrides: WorkloadOverrides,
    /// Use this record instead of running the workload.
    pub record_in: Option<PathBuf>,
    /// Write the record here.
    pub record_out: Option<PathBuf>,
    /// Write the image even when the run failed (non-zero exit, awaited line never printed).
    pub accept_failed_run: bool,
}

/// How much of one layer the workload used, and what the optimized layer prefetches.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerUse {
    /// Digest of the layer in the source image.
    pub source_digest: String,
    pub files: u64,
    pub file_bytes: u64,
    pub files_used: u64,
    /// Bytes of those files read (whole files count fully when only opened).
    pub bytes_read: u64,
    /// Compressed bytes of the optimized layer lazysnap prefetches.
    pub prefetch_bytes: u64,
    /// Compressed bytes of the optimized layer's footer and TOC (what a lazy pull reads first).
    #[serde(default)]
    pub toc_bytes: u64,
    /// Compressed size of the optimized layer.
    pub blob_size: u64,
}

impl LayerUse {
    /// Adds `other`'s counts to these (for totals).
    pub fn add(&mut self, other: &LayerUse) {
        self.files += other.files;
        self.file_bytes += other.file_bytes;
        self.files_used += other.files_used;
        self.bytes_read += other.bytes_read;
        self.prefetch_bytes += other.prefetch_bytes;
        self.toc_bytes += other.toc_bytes;
        self.blob_size += other.blob_size;
    }
}

/// The result of an optimization.
#[derive(Debug, Clone)]
pub struct OptimizeReport {
    /// The run (none with a record given).
    pub run: Option<RunOutcome>,
    pub record: Record,
    pub layers: Vec<LayerUse>,
    pub converted: ConvertReport,
}

/// Progress of an optimization: phases as text, conversions as per-layer progress.
pub trait OptimizeProgress: ConvertProgress {
    /// A new phase starts.
    fn phase(&self, _text: &str) {}
}

/// Optimizes `src` into `dst` (see the module doc).
pub async fn optimize_image(
    client: &Client,
    src: &ImageLocation,
    dst: &ImageLocation,
    opts: &OptimizeOptions,
    progress: &dyn OptimizeProgress,
) -> Result<OptimizeReport, OptimizeError> {
    if opts.convert.all_platforms {
        return Err(OptimizeError::AllPlatforms);
    }
    let temp_parent = opts
        .convert
        .temp_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("lazysnap-optimize-")
        .tempdir_in(&temp_parent)
        .map_err(|source| OptimizeError::Io {
            what: format!("creating a work directory in {}", temp_parent.display()),
            source,
        })?;
    // The image the optimized one is written from, its number of tar layers, the record.
    let (source, layers, record, run) = match &opts.record_in {
        Some(path) => {
            let resolved = resolve_image(client, src, &opts.convert.platform).await?;
            let layers = tar_layers(&resolved).len();
            (src.clone(), layers, Record::read(path, layers)?, None)
        }
        None => {
            progress.phase("converting the image for the recording run");
            let plain = ImageLocation::Layout {
                dir: work.path().join("plain"),
                tag: None,
            };
            let mut plain_opts = opts.convert.clone();
            plain_opts.prioritized.clear();
            plain_opts.recorded.clear();
            plain_opts.reuse = true;
            let plain_report = convert_image(client, src, &plain, &plain_opts, progress).await?;
            let digests = source_tar_layers(&plain_report);
            let resolved = resolve_image(client, &plain, &opts.convert.platform).await?;
            let config = image_config(client, &plain, &resolved.manifest).await?;
            progress.phase("running the workload over recording mounts");
            let (record, outcome) =
                record_run(&resolved, &config, &digests, work.path(), opts).await?;
            (plain, tar_layers(&resolved).len(), record, Some(outcome))
        }
    };
    if let Some(path) = &opts.record_out {
        record.write(path)?;
    }
    if let Some(outcome) = &run {
        if !outcome.succeeded(&opts.stop) && !opts.accept_failed_run {
            return Err(OptimizeError::FailedRun {
                description: outcome.describe(&opts.stop),
                tail: outcome.tail.join("\n"),
            });
        }
    }
    progress.phase("writing the optimized image");
    let mut final_opts = opts.convert.clone();
    final_opts.recorded = record.per_layer(layers);
    final_opts.reuse = false;
    final_opts.temp_dir = Some(work.path().to_path_buf());
    let converted = convert_image(client, &source, dst, &final_opts, progress).await?;
    progress.phase("reading the optimized image's TOCs");
    let layers = layer_use(client, dst, &opts.convert, &record, &converted).await?;
    Ok(OptimizeReport {
        run,
        record,
        layers,
        converted,
    })
}

/// The tar layers of an image with their blobs, in order.
fn tar_layers(resolved: &ResolvedImage) -> Vec<(Digest, Arc<dyn BlobSource>)> {
    resolved
        .manifest
        .layers
        .iter()
        .zip(&resolved.blobs)
        .filter(|(d, _)| is_layer(&d.media_type))
        .map(|(d, b)| (d.digest.clone(), Arc::clone(b)))
        .collect()
}

/// The source digests of the tar layers a conversion read, in order.
fn source_tar_layers(report: &ConvertReport) -> Vec<Digest> {
    report
        .images
        .first()
        .map(|i| {
            i.layers
                .iter()
                .filter(|l| l.diff_id.is_some())
                .map(|l| l.source_digest.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Per layer of the optimized image: its files, what the workload used, what is prefetched.
async fn layer_use(
    client: &Client,
    dst: &ImageLocation,
    convert: &ConvertOptions,
    record: &Record,
    converted: &ConvertReport,
) -> Result<Vec<LayerUse>, OptimizeError> {
    let resolved = resolve_image(client, dst, &convert.platform).await?;
    let sources = source_tar_layers(converted);
    let mut out = Vec::new();
    for (position, (digest, blob)) in tar_layers(&resolved).into_iter().enumerate() {
        let toc =
            estargz::open_layer(&*blob, None)
                .await
                .map_err(|source| OptimizeError::Format {
                    layer: digest.to_string(),
                    source,
                })?;
        let mut usage = LayerUse {
            source_digest: record
                .accesses
                .iter()
                .find(|a| a.layer == position && !a.layer_digest.is_empty())
                .map(|a| a.layer_digest.clone())
                .or_else(|| sources.get(position).map(Digest::to_string))
                .unwrap_or_default(),
            prefetch_bytes: toc.prefetch_bytes(),
            toc_bytes: blob.size().saturating_sub(toc.data_end()),
            blob_size: blob.size(),
            ..LayerUse::default()
        };
        for entry in toc.entries().iter().filter(|e| e.kind == EntryKind::Reg) {
            usage.files += 1;
            usage.file_bytes += entry.size;
        }
        for access in record.accesses.iter().filter(|a| a.layer == position) {
            usage.files_used += 1;
            usage.bytes_read += access.read_bytes();
        }
        out.push(usage);
    }
    Ok(out)
}

/// The layers mounted for a recording run, and the overlay over them.
struct RecordingMounts {
    readers: Vec<Arc<LayerReader>>,
    handles: Vec<MountHandle>,
    rootfs: Option<PathBuf>,
}

impl RecordingMounts {
    fn teardown(&mut self) {
        if let Some(rootfs) = self.rootfs.take() {
            if nix::mount::umount(&rootfs).is_err() {
                let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        for reader in &self.readers {
            reader.shutdown();
        }
        while let Some(handle) = self.handles.pop() {
            if let Err(e) = handle.unmount() {
                tracing::warn!(error = %e, "unmounting a recording layer");
            }
        }
    }
}

impl Drop for RecordingMounts {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Mounts every layer of `resolved` (eStargz, local) through a recording source, stacks them
/// with a writable upper layer, runs the workload on them and returns what it used.
async fn record_run(
    resolved: &ResolvedImage,
    config: &ImageConfig,
    digests: &[Digest],
    work: &Path,
    opts: &OptimizeOptions,
) -> Result<(Record, RunOutcome), OptimizeError> {
    let io = |what: String| move |source| OptimizeError::Io { what, source };
    let cache = ChunkCache::open(CacheOptions::new(work.join("cache")))?;
    let fetch = FetchOptions {
        prefetch: false,
        background: false,
        readahead: false,
        library_prefetch: false,
        ..FetchOptions::default()
    };
    let log = AccessLog::new();
    let mut mounts = RecordingMounts {
        readers: Vec::new(),
        handles: Vec::new(),
        rootfs: None,
    };
    let mut names = Vec::new();
    let mut lower_dirs: Vec<PathBuf> = Vec::new();
    for (position, (digest, blob)) in tar_layers(resolved).into_iter().enumerate() {
        let span = tracing::info_span!("recording_mount", layer = %short_digest(&digest));
        let toc = estargz::open_layer(&*blob, None)
            .instrument(span.clone())
            .await
            .map_err(|source| OptimizeError::Format {
                layer: digest.to_string(),
                source,
            })?;
        let below = LowerLayers::new(lower_dirs.iter().rev().cloned().collect());
        let (index, files) = build_index(&toc, &below)?;
        names.push(
            (0..files.len())
                .map(|i| {
                    (
                        files.name(i).unwrap_or_default().to_string(),
                        files.size(i).unwrap_or(0),
                    )
                })
                .collect::<Vec<_>>(),
        );
        let reader = LayerReader::new(
            blob,
            toc.compression(),
            files,
            cache.clone(),
            fetch.clone(),
            tokio::runtime::Handle::current(),
            short_digest(&digest),
        );
        let source: Arc<dyn ContentSource> = Arc::new(record::RecordingSource {
            inner: reader.clone(),
            layer: position,
            log: Arc::clone(&log),
        });
        let mountpoint = work.join("layers").join(position.to_string());
        std::fs::create_dir_all(&mountpoint)
            .map_err(io(format!("creating {}", mountpoint.display())))?;
        let options = MountOptions {
            fs_name: format!("lazysnap-record:{}", short_digest(&digest)),
            // Every read must reach the recorder.
            passthrough: false,
            open_observer: Some(log.open_observer(position)),
            // The kernel asks for what it will ask a lazy layer for.
            read_ahead_kb: Some(LAZY_READ_AHEAD_KB),
            ..MountOptions::default()
        };
        let handle = mount_index(index, source, &mountpoint, options).await?;
        mounts.readers.push(reader);
        mounts.handles.push(handle);
        lower_dirs.push(mountpoint);
    }
    let rootfs = work.join("rootfs");
    let upper = work.join("upper");
    let overlay_work = work.join("overlay-work");
    for dir in [&rootfs, &upper, &overlay_work] {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let lowers: Vec<String> = lower_dirs
        .iter()
        .rev()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={},index=off",
        lowers.join(":"),
        upper.display(),
        overlay_work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| OptimizeError::Io {
        what: format!("mounting overlayfs at {} ({options})", rootfs.display()),
        source: e.into(),
    })?;
    mounts.rootfs = Some(rootfs.clone());

    let process = workload::process_for(config, &opts.overrides, &rootfs)?;
    tracing::info!(args = ?process.args, uid = process.uid, "running the workload");
    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle).map_err(io(format!("creating {}", bundle.display())))?;
    workload::write_bundle(&bundle, &rootfs, &process, &opts.overrides).await?;
    let id = format!(
        "lazysnap-optimize-{}",
        work.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("run")
            .trim_start_matches("lazysnap-optimize-")
    );
    let outcome = workload::run(&bundle, &work.join("runc"), &id, &opts.stop).await?;
    mounts.teardown();
    Ok((log.record(&names, digests), outcome))
}
