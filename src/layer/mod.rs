//! A remote layer's life: locate its blob, read footer and TOC (digest checked), build the FUSE
//! index, mount it with a fetching content source, check its health, and unmount it.

mod index;
mod lower;
mod startup;
mod unpack;

pub use index::build_index;
pub use lower::LowerLayers;
pub use unpack::{unpack_layer, UnpackError};

use crate::digest::short_digest;
use crate::sync::lock;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::runtime::Handle;
use tracing::Instrument;

use crate::blob::BlobSource;
use crate::cache::ChunkCache;
use crate::estargz::{self, ChunkDigest, FormatError};
use crate::fetch::{FetchOptions, LayerFetchStats, LayerReader};
use crate::image::{self, Descriptor, Manifest, Platform};
use crate::labels;
use crate::registry::{Client, Reference, RegistryError};
use crate::snapshotter::remote::{
    LayerLocator, RemoteLayerError, RemoteLayerRequest, RemoteLayers,
};

/// Why a layer could not be mounted or checked.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("layer {digest} is not lazily pullable: {source}")]
    Format {
        digest: String,
        #[source]
        source: FormatError,
    },
    #[error("image: {0}")]
    Image(#[from] image::ImageError),
    #[error("chunk cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("layer {digest} is not in image {image}")]
    NotInImage { digest: String, image: String },
    #[error("TOC entry {entry:?} cannot be indexed: {source}")]
    Index {
        entry: String,
        #[source]
        source: lazysnap_fuse::IndexError,
    },
    #[error("invalid TOC: {detail}")]
    Toc { detail: String },
    #[error("mounting layer at {mountpoint}: {source}")]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: lazysnap_fuse::FuseError,
    },
    #[error("layer at {0} is not mounted by this process")]
    NotMounted(PathBuf),
    #[error("layer blob {digest} is unreachable: {detail}")]
    Unhealthy { digest: String, detail: String },
}

impl LayerError {
    /// True when the layer can never be mounted lazily (not eStargz), as opposed to a failure
    /// that may pass (registry down).
    pub fn is_not_lazy(&self) -> bool {
        matches!(
            self,
            LayerError::Format { .. } | LayerError::NotInImage { .. }
        )
    }
}

/// Where a remote layer lives.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteLayerSpec {
    /// The image (its repository locates the blob).
    pub image: Reference,
    /// The layer blob's descriptor (digest, size, annotations).
    pub layer: Descriptor,
}

impl RemoteLayerSpec {
    /// The TOC digest annotation of the layer, if any.
    pub fn toc_digest(&self) -> Option<&str> {
        self.layer
            .annotations
            .get(labels::TOC_DIGEST)
            .map(String::as_str)
    }
}

/// Kernel read-ahead of a lazy layer's mount, in KiB: a page fault or a small read asks the
/// daemon for little more than it needs (with the 4 MiB of a disk-like mount, python3's first
/// line pulled 1.6 MB more over a slow link). `lazysnap optimize` records with the same value:
/// at 8 rather than 32 its record of the python3 app shrank from 6.22 to 5.54 MB to prefetch.
pub const LAZY_READ_AHEAD_KB: u32 = 8;

/// Settings of a [`LayerManager`].
#[derive(Debug, Clone)]
pub struct LayerManagerOptions {
    pub fetch: FetchOptions,
    pub mount: lazysnap_fuse::MountOptions,
    /// Platform chosen from image indexes.
    pub platform: Platform,
    /// At each layer's mount, prefetch what every container of the image reads first (see
    /// [`startup`]): the program its config names, the loader's cache, the user database.
    pub startup_prefetch: bool,
}

impl Default for LayerManagerOptions {
    fn default() -> Self {
        Self {
            fetch: FetchOptions::default(),
            mount: lazysnap_fuse::MountOptions {
                observer: Some(lazysnap_fuse::OpObserver(Arc::new(
                    crate::metrics::observe_fuse_op,
                ))),
                read_ahead_kb: Some(LAZY_READ_AHEAD_KB),
                ..lazysnap_fuse::MountOptions::default()
            },
            platform: Platform::host(),
            startup_prefetch: true,
        }
    }
}

/// Mounts a FUSE index served by `source` at `mountpoint` (off the async workers: mounting
/// blocks).
pub async fn mount_index(
    index: lazysnap_fuse::Index,
    source: Arc<dyn lazysnap_fuse::ContentSource>,
    mountpoint: &Path,
    options: lazysnap_fuse::MountOptions,
) -> Result<lazysnap_fuse::MountHandle, LayerError> {
    let target = mountpoint.to_path_buf();
    tokio::task::spawn_blocking(move || lazysnap_fuse::mount(index, source, &target, &options))
        .await
        .map_err(|join| LayerError::Toc {
            detail: format!("mount task failed: {join}"),
        })?
        .map_err(|source| LayerError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        })
}

/// What `lazysnap cache du` shows: the disk cache by mounted layer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CacheUsage {
    /// Bytes and chunk files on disk, and the bound.
    pub total_bytes: u64,
    pub total_chunks: u64,
    pub limit: u64,
    /// What no mounted layer uses (left by layers unmounted or images removed).
    pub unused_bytes: u64,
    pub unused_chunks: u64,
    pub layers: Vec<LayerCacheUsage>,
}

/// One mounted layer's part of the disk cache.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerCacheUsage {
    pub image: String,
    pub digest: String,
    /// Bytes of its chunks (and assembled files) on disk.
    pub cached_bytes: u64,
    /// Of those, bytes another mounted layer uses too.
    pub shared_bytes: u64,
    pub cached_chunks: u64,
}

/// Which chunks `lazysnap cache prune` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneMode {
    /// Chunks no mounted layer uses.
    Unused,
    /// Chunks not used for this long.
    OlderThan(std::time::Duration),
    /// Every chunk.
    All,
}

/// What a prune removed, and the mounted layers whose registry did not answer (their chunks
/// kept, or removed with `--force`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PruneReport {
    pub removed_chunks: u64,
    pub removed_bytes: u64,
    pub unreachable: Vec<String>,
}

/// One layer a [`LayerManager`] has mounted, as `lazysnap status` shows it.
#[derive(Debug, Clone)]
pub struct MountedLayerReport {
    /// The image it was mounted for.
    pub image: String,
    /// Its blob digest and compressed size.
    pub digest: String,
    pub size: u64,
    pub mountpoint: PathBuf,
    pub stats: LayerFetchStats,
    /// Opens served by FUSE passthrough.
    pub passthrough_opens: u64,
}

/// A layer mounted through FUSE; unmounted (and its background fetches stopped) on drop.
pub struct MountedLayer {
    spec: RemoteLayerSpec,
    toc_digest: String,
    reader: Arc<LayerReader>,
    handle: Option<lazysnap_fuse::MountHandle>,
    mountpoint: PathBuf,
}

impl MountedLayer {
    /// The reader serving the layer's files.
    pub fn reader(&self) -> &Arc<LayerReader> {
        &self.reader
    }

    /// The layer and what it fetched so far.
    fn report(&self) -> MountedLayerReport {
        MountedLayerReport {
            image: self.spec.image.to_string(),
            digest: self.spec.layer.digest.clone(),
            size: self.spec.layer.size,
            mountpoint: self.mountpoint.clone(),
            stats: self.reader.stats(),
            passthrough_opens: self.fs_stats().map_or(0, |s| s.passthrough_opens),
        }
    }

    /// What the layer is.
    pub fn spec(&self) -> &RemoteLayerSpec {
        &self.spec
    }

    /// The verified TOC digest.
    pub fn toc_digest(&self) -> &str {
        &self.toc_digest
    }

    /// Where the layer's root is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// What the layer fetched and served so far.
    pub fn stats(&self) -> LayerFetchStats {
        self.reader.stats()
    }

    /// The FUSE filesystem's counters (opens, passthrough opens), while mounted.
    pub fn fs_stats(&self) -> Option<lazysnap_fuse::FsStats> {
        self.handle.as_ref().map(|h| h.stats())
    }

    /// Stops fetching and unmounts, reporting unmount errors.
    pub fn unmount(mut self) -> Result<(), LayerError> {
        self.reader.shutdown();
        match self.handle.take() {
            Some(handle) => handle.unmount().map_err(|source| LayerError::Mount {
                mountpoint: self.mountpoint.clone(),
                source,
            }),
            None => Ok(()),
        }
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        self.reader.shutdown();
    }
}

/// Mounts remote layers, all sharing one registry client and one chunk cache.
pub struct LayerManager {
    client: Client,
    cache: Arc<ChunkCache>,
    runtime: Handle,
    options: LayerManagerOptions,
    /// Layers mounted through the [`RemoteLayers`] hook, by mountpoint.
    mounted: Mutex<HashMap<PathBuf, MountedLayer>>,
    /// Manifests already resolved, by image reference.
    manifests: Mutex<HashMap<String, Arc<Manifest>>>,
    /// TOCs read (or being read) ahead of their layer's Prepare, by image reference and layer.
    tocs: Mutex<HashMap<(String, String), (std::time::Instant, TocCell)>>,
    /// What the first Prepare of an image learned for the startup prefetch, by image reference.
    startups: Mutex<HashMap<String, (std::time::Instant, Arc<ImageStartup>)>>,
}

/// The startup prefetch of one image's layers (see [`startup`]).
#[derive(Default)]
struct ImageStartup {
    /// The process part of the image config; `None` when the config could not be read.
    process: tokio::sync::OnceCell<Option<image::ProcessConfig>>,
    /// The files each layer prefetches at mount, by layer digest.
    files: std::sync::OnceLock<HashMap<String, Vec<String>>>,
}

impl LayerManager {
    /// A manager whose fetch tasks run on `runtime`.
    pub fn new(
        client: Client,
        cache: Arc<ChunkCache>,
        runtime: Handle,
        options: LayerManagerOptions,
    ) -> Self {
        Self {
            client,
            cache,
            runtime,
            options,
            mounted: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            tocs: Mutex::new(HashMap::new()),
            startups: Mutex::new(HashMap::new()),
        }
    }

    /// The registry client layers are fetched with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The chunk cache every layer shares.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Every layer mounted through the [`RemoteLayers`] hook, with what it fetched so far, in
    /// mountpoint order.
    pub fn mounted_layers(&self) -> Vec<MountedLayerReport> {
        let mut reports: Vec<MountedLayerReport> = lock(&self.mounted)
            .values()
            .map(MountedLayer::report)
            .collect();
        reports.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        reports
    }

    /// What the disk cache holds for each mounted layer (bytes of its chunks and assembled
    /// files in the cache, and of those the bytes other mounted layers use too), and what no
    /// mounted layer uses.
    pub fn cache_usage(&self) -> CacheUsage {
        let layers: Vec<(MountedLayerReport, Vec<ChunkDigest>)> = {
            let mounted = lock(&self.mounted);
            let mut layers: Vec<_> = mounted
                .values()
                .map(|layer| (layer.report(), layer.reader.cache_keys()))
                .collect();
            layers.sort_by(|a, b| a.0.mountpoint.cmp(&b.0.mountpoint));
            layers
        };
        let on_disk: HashMap<ChunkDigest, u64> = self.cache.disk_entries().into_iter().collect();
        // How many mounted layers use each key (each layer lists a key once).
        let mut users: HashMap<ChunkDigest, usize> = HashMap::new();
        for key in layers.iter().flat_map(|(_, keys)| keys) {
            *users.entry(*key).or_default() += 1;
        }
        let unused: Vec<u64> = on_disk
            .iter()
            .filter(|(key, _)| !users.contains_key(key))
            .map(|(_, size)| *size)
            .collect();
        let layers = layers
            .into_iter()
            .map(|(report, keys)| {
                let mut layer = LayerCacheUsage {
                    image: report.image,
                    digest: report.digest,
                    cached_bytes: 0,
                    shared_bytes: 0,
                    cached_chunks: 0,
                };
                for key in &keys {
                    let Some(size) = on_disk.get(key) else {
                        continue;
                    };
                    layer.cached_bytes += size;
                    layer.cached_chunks += 1;
                    if users.get(key).is_some_and(|&n| n > 1) {
                        layer.shared_bytes += size;
                    }
                }
                layer
            })
            .collect();
        CacheUsage {
            total_bytes: on_disk.values().sum(),
            total_chunks: on_disk.len() as u64,
            limit: self.cache.options().max_bytes,
            unused_bytes: unused.iter().sum(),
            unused_chunks: unused.len() as u64,
            layers,
        }
    }

    /// Removes chunks from the disk cache while layers stay mounted (their reads fetch what is
    /// gone again). `Unused` removes what no mounted layer uses; `OlderThan` what was not used
    /// for that long; `All` everything. A mounted layer's chunks are kept when its registry
    /// does not answer now (a refetch would fail), unless `force`; the report says which, either
    /// way.
    pub async fn prune_cache(&self, mode: PruneMode, force: bool) -> PruneReport {
        let layers: Vec<(RemoteLayerSpec, Vec<ChunkDigest>)> = lock(&self.mounted)
            .values()
            .map(|layer| (layer.spec.clone(), layer.reader.cache_keys()))
            .collect();
        let mut used = std::collections::HashSet::new();
        let mut protected = std::collections::HashSet::new();
        let mut unreachable: Vec<String> = Vec::new();
        for (spec, keys) in &layers {
            used.extend(keys.iter().copied());
            if mode == PruneMode::Unused {
                continue;
            }
            if let Err(e) = self.check(spec).await {
                let outcome = if force {
                    "its chunks are removed anyway (--force): its reads fail until the registry is back"
                } else {
                    protected.extend(keys.iter().copied());
                    "its chunks are kept (--force removes them)"
                };
                unreachable.push(format!(
                    "layer {} of {}: its registry does not answer ({e}); {outcome}",
                    spec.layer.digest, spec.image
                ));
            }
        }
        let now = std::time::SystemTime::now();
        let doomed: Vec<ChunkDigest> = self
            .cache
            .disk_entries()
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| match mode {
                PruneMode::Unused => !used.contains(key),
                PruneMode::OlderThan(age) => {
                    !protected.contains(key)
                        && self
                            .cache
                            .last_used(key)
                            .and_then(|t| now.duration_since(t).ok())
                            .is_some_and(|idle| idle >= age)
                }
                PruneMode::All => !protected.contains(key),
            })
            .collect();
        let (removed_chunks, removed_bytes) = self.cache.remove(&doomed);
        tracing::info!(
            ?mode,
            force,
            removed_chunks,
            removed_bytes,
            unreachable = unreachable.len(),
            "cache pruned"
        );
        PruneReport {
            removed_chunks,
            removed_bytes,
            unreachable,
        }
    }

    /// Warms the mounted layers with these blob digests: waits for each one's prefetch of its
    /// prioritized part, and with `all` fetches the rest too, now. Digests of layers this
    /// manager has not mounted are returned (they were unpacked, or not pulled through it).
    pub async fn warm(&self, digests: &[String], all: bool) -> Vec<String> {
        let mut readers = Vec::new();
        let mut missing = Vec::new();
        {
            let mounted = lock(&self.mounted);
            for digest in digests {
                match mounted.values().find(|l| &l.spec.layer.digest == digest) {
                    Some(layer) => readers.push(Arc::clone(&layer.reader)),
                    None => missing.push(digest.clone()),
                }
            }
        }
        futures::future::join_all(readers.into_iter().map(|reader| async move {
            reader.prefetch_finished().await;
            if all {
                reader.fill_all().await;
            }
        }))
        .await;
        missing
    }

    /// The image manifest of `image` for the configured platform (indexes resolved).
    pub async fn image_manifest(&self, image: &Reference) -> Result<Arc<Manifest>, LayerError> {
        if let Some(found) = self.cached_manifest(image) {
            return Ok(found);
        }
        let key = image.to_string();
        let location = image::ImageLocation::Registry(image.clone());
        let manifest = Arc::new(
            image::resolve_image(&self.client, &location, &self.options.platform)
                .await?
                .manifest,
        );
        lock(&self.manifests).insert(key, manifest.clone());
        Ok(manifest)
    }

    /// The manifest of `image` if [`image_manifest`](Self::image_manifest) fetched it before.
    fn cached_manifest(&self, image: &Reference) -> Option<Arc<Manifest>> {
        lock(&self.manifests).get(&image.to_string()).cloned()
    }

    /// Finds layer `digest` of `image` (size and annotations come from the manifest).
    pub async fn locate(
        &self,
        image: &Reference,
        digest: &str,
    ) -> Result<RemoteLayerSpec, LayerError> {
        let manifest = self.image_manifest(image).await?;
        let layer = manifest
            .layers
            .iter()
            .find(|layer| layer.digest == digest)
            .cloned()
            .ok_or_else(|| LayerError::NotInImage {
                digest: digest.to_string(),
                image: image.to_string(),
            })?;
        Ok(RemoteLayerSpec {
            image: image.clone(),
            layer,
        })
    }

    /// Mounts `spec` lazily at `mountpoint` (an existing empty directory), stacked on `lower`,
    /// and starts its prefetch; `below` are the readers of the lazy layers among `lower`,
    /// nearest first, where library prefetch looks after this layer. Fails with
    /// [`LayerError::Format`] when the layer is not eStargz/zstd:chunked.
    pub async fn mount(
        &self,
        spec: &RemoteLayerSpec,
        mountpoint: &Path,
        lower: &LowerLayers,
        below: &[Arc<LayerReader>],
    ) -> Result<MountedLayer, LayerError> {
        let span = tracing::info_span!("layer.mount", layer = %spec.layer.digest, mountpoint = %mountpoint.display());
        let mounted = async {
            let toc = self.read_toc(spec, None).await?;
            self.mount_toc(spec, &toc, mountpoint, lower, below, &[])
                .await
        }
        .instrument(span)
        .await;
        // The parsed TOC went with the block: the index and chunk lists hold what reads use.
        lazysnap_fuse::release_freed_memory();
        mounted
    }

    /// Reads and checks the footer and TOC of `spec`'s blob (see [`estargz::open_layer`]),
    /// starting from `tail`, its last bytes, when they were read already.
    async fn read_toc(
        &self,
        spec: &RemoteLayerSpec,
        tail: Option<Bytes>,
    ) -> Result<estargz::LayerToc, LayerError> {
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

    /// Mounts a layer whose TOC was read by [`read_toc`](Self::read_toc), stacked on `lower`
    /// (whiteouts of what `lower` lacks are left out).
    async fn mount_toc(
        &self,
        spec: &RemoteLayerSpec,
        toc: &estargz::LayerToc,
        mountpoint: &Path,
        lower: &LowerLayers,
        below: &[Arc<LayerReader>],
        startup_files: &[String],
    ) -> Result<MountedLayer, LayerError> {
        let blob: Arc<dyn BlobSource> = Arc::new(self.client.blob(
            &spec.image,
            &spec.layer.digest,
            spec.layer.size,
        ));
        let (index, files) = build_index(toc, lower)?;
        let reader = LayerReader::new(
            blob,
            toc.compression(),
            files,
            self.cache.clone(),
            self.options.fetch.clone(),
            self.runtime.clone(),
            short_digest(&spec.layer.digest),
        );
        reader.set_lower_layers(below);
        let mut mount_options = self.options.mount.clone();
        mount_options.fs_name = format!("lazysnap:{}", short_digest(&spec.layer.digest));
        let source: Arc<dyn lazysnap_fuse::ContentSource> = reader.clone();
        let handle = mount_index(index, source, mountpoint, mount_options).await?;
        reader.start_prefetch(toc.prefetch_plan().cloned());
        reader.prefetch_startup_files(startup_files);
        tracing::info!(entries = toc.entries().len(), toc_digest = %toc.toc_digest(), "layer mounted lazily");
        let toc_digest = toc.toc_digest().to_string();
        Ok(MountedLayer {
            spec: spec.clone(),
            toc_digest,
            reader,
            handle: Some(handle),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// Checks that the blob of a mounted layer is still reachable (one small ranged read,
    /// which also refreshes tokens, redirects and connections).
    pub async fn check(&self, spec: &RemoteLayerSpec) -> Result<(), LayerError> {
        let blob = self
            .client
            .blob(&spec.image, &spec.layer.digest, spec.layer.size);
        let end = spec.layer.size.min(1);
        blob.read_range(0..end)
            .await
            .map(|_| ())
            .map_err(|e| LayerError::Unhealthy {
                digest: spec.layer.digest.clone(),
                detail: e.to_string(),
            })
    }

    /// Fetch statistics of every layer mounted through the hook, by mountpoint.
    pub fn mounted_stats(&self) -> BTreeMap<PathBuf, (String, LayerFetchStats)> {
        lock(&self.mounted)
            .iter()
            .map(|(path, layer)| {
                (
                    path.clone(),
                    (layer.spec.layer.digest.clone(), layer.stats()),
                )
            })
            .collect()
    }

    async fn mount_located(
        &self,
        locator: &LayerLocator,
        mountpoint: &Path,
        lower: &LowerLayers,
    ) -> Result<(), RemoteLayerError> {
        let image = Reference::parse(&locator.image_ref)
            .map_err(|e| RemoteLayerError::Declined(format!("image reference: {e}")))?;
        // The first Prepare of an image fetches its manifest (for this layer's size and the
        // other layers' TOCs); when the labels name this layer's TOC digest, its tail is read
        // meanwhile by a suffix range, which tells the size too: one round trip less.
        let early_tail = async {
            if locator.toc_digest.is_none() || self.cached_manifest(&image).is_some() {
                return None;
            }
            let read = self
                .client
                .blob_tail(&image, &locator.layer_digest, estargz::DEFAULT_TAIL_GUESS)
                .await;
            read.map_err(|e| tracing::debug!(error = %e, "reading the layer's tail before the manifest failed; reading it after"))
                .ok()
        };
        let (located, early_tail) =
            tokio::join!(self.locate(&image, &locator.layer_digest), early_tail);
        let mut spec = located.map_err(to_remote_error)?;
        // Kept only when the registry's size agrees with the manifest's.
        let early_tail = early_tail
            .filter(|(blob, _)| blob.size() == spec.layer.size)
            .map(|(_, tail)| tail);
        if let Some(toc_digest) = &locator.toc_digest {
            spec.layer
                .annotations
                .insert(labels::TOC_DIGEST.to_string(), toc_digest.clone());
        }
        if spec.toc_digest().is_none() {
            return Err(RemoteLayerError::Declined(format!(
                "layer {} has no {} annotation: not eStargz / zstd:chunked",
                spec.layer.digest,
                labels::TOC_DIGEST
            )));
        }
        let span = tracing::info_span!("layer.mount", layer = %spec.layer.digest, mountpoint = %mountpoint.display());
        let layer = async {
            let toc = self
                .toc_read_ahead(&image, &spec, &locator.image_layers, early_tail)
                .await?;
            // The lazy layers below, mounted before this one through the hook.
            let below: Vec<Arc<LayerReader>> = {
                let mounted = lock(&self.mounted);
                lower
                    .dirs()
                    .iter()
                    .filter_map(|dir| mounted.get(dir).map(|layer| layer.reader.clone()))
                    .collect()
            };
            let startup_files = self.startup_files_of(&image, &spec.layer.digest);
            let mounted = self
                .mount_toc(&spec, &toc, mountpoint, lower, &below, &startup_files)
                .await
                .map_err(to_remote_error);
            lock(&self.tocs).remove(&(image.to_string(), spec.layer.digest.clone()));
            // The parsed TOC is no longer needed: the index and chunk lists hold what reads use.
            drop(toc);
            lazysnap_fuse::release_freed_memory();
            mounted
        }
        .instrument(span)
        .await?;
        lock(&self.mounted).insert(mountpoint.to_path_buf(), layer);
        Ok(())
    }

    /// The TOC of `spec`, read together with those of the image's other lazily pullable layers
    /// not read yet (`image_layers`, from the Prepare labels): containerd prepares layers one
    /// after another, so the first Prepare of an image reads every TOC at once and the later
    /// ones find theirs ready. TOCs read ahead are kept for [`TOC_READ_AHEAD_TTL`]. `tail`: the
    /// last bytes of `spec`'s blob, if already read.
    async fn toc_read_ahead(
        &self,
        image: &Reference,
        spec: &RemoteLayerSpec,
        image_layers: &[String],
        tail: Option<Bytes>,
    ) -> Result<Arc<estargz::LayerToc>, RemoteLayerError> {
        let manifest = self.image_manifest(image).await.map_err(to_remote_error)?;
        let others = image_layers
            .iter()
            .filter(|digest| **digest != spec.layer.digest)
            .filter_map(|digest| manifest.layers.iter().find(|l| l.digest == *digest))
            .filter(|layer| layer.annotations.contains_key(labels::TOC_DIGEST))
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
    fn image_startup(&self, image: &Reference) -> Arc<ImageStartup> {
        let mut startups = lock(&self.startups);
        startups.retain(|_, (created, _)| created.elapsed() < TOC_READ_AHEAD_TTL);
        startups
            .entry(image.to_string())
            .or_insert_with(|| (std::time::Instant::now(), Arc::default()))
            .1
            .clone()
    }

    /// The files layer `digest` of `image` prefetches at mount (none when unknown).
    fn startup_files_of(&self, image: &Reference, digest: &str) -> Vec<String> {
        let startup = lock(&self.startups)
            .get(&image.to_string())
            .map(|(_, startup)| startup.clone());
        startup
            .and_then(|startup| startup.files.get()?.get(digest).cloned())
            .unwrap_or_default()
    }

    /// The process part of `image`'s config (one small blob); `None`, logged, when it cannot be
    /// read: the startup prefetch is an optimization.
    async fn image_process(
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
    fn toc_cell(&self, image: &Reference, digest: &str) -> TocCell {
        let mut tocs = lock(&self.tocs);
        tocs.retain(|_, (created, _)| created.elapsed() < TOC_READ_AHEAD_TTL);
        tocs.entry((image.to_string(), digest.to_string()))
            .or_insert_with(|| (std::time::Instant::now(), TocCell::default()))
            .1
            .clone()
    }
}

/// Longest a layer's first mount waits for the image config (read beside the TOCs) for the
/// startup prefetch.
const IMAGE_CONFIG_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a TOC read ahead of its layer's Prepare is kept.
const TOC_READ_AHEAD_TTL: std::time::Duration = std::time::Duration::from_secs(120);

/// A layer's TOC, read once by whichever Prepare comes first.
type TocCell = Arc<tokio::sync::OnceCell<Result<Arc<estargz::LayerToc>, RemoteLayerError>>>;

fn to_remote_error(error: LayerError) -> RemoteLayerError {
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

/// Lazily detaches whatever is mounted at `path` (a FUSE mount left by a previous process).
pub fn detach_stale_mount(path: &Path) {
    if let Err(e) = lazysnap_fuse::detach_stale_mount(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot detach stale mount");
    }
}

/// True when `path` is listed as a mountpoint in /proc/self/mountinfo.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount| unescape_mountinfo(mount) == wanted)
}

fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

impl LayerManager {
    /// A manager set up from the daemon's configuration: registry client, shared chunk cache
    /// and fetch settings; fetch tasks run on `runtime`.
    pub fn from_config(
        config: &crate::config::Config,
        runtime: Handle,
    ) -> Result<Self, LayerError> {
        let client = Client::new(crate::registry::ClientConfig {
            hosts_dir: Some(config.registry.config_path.clone()),
            docker_config: (!config.registry.docker_config.as_os_str().is_empty())
                .then(|| config.registry.docker_config.clone()),
            plain_http: config.registry.plain_http,
            request_timeout: std::time::Duration::from_secs(config.fetch.request_timeout_secs),
            read_deadline: std::time::Duration::from_secs(config.fetch.read_deadline_secs),
            ..crate::registry::ClientConfig::default()
        })?;
        let mut cache_options = crate::cache::CacheOptions::new(config.cache_dir());
        cache_options.max_bytes = config.cache.max_bytes;
        cache_options.memory_bytes = config.cache.memory_bytes;
        cache_options.high_watermark_pct = Some(config.cache.high_watermark_pct);
        cache_options.low_watermark_pct = Some(config.cache.low_watermark_pct);
        let cache = ChunkCache::open(cache_options)?;
        let fetch = FetchOptions {
            deadline: std::time::Duration::from_secs(config.fetch.read_deadline_secs),
            prefetch: config.fetch.prefetch,
            background: config.fetch.background_fill,
            readahead: config.fetch.readahead,
            library_prefetch: config.fetch.library_prefetch,
            scheduler: crate::fetch::FetchScheduler::new(crate::fetch::SchedulerOptions {
                quiet_period: std::time::Duration::from_secs(config.fetch.background_quiet_secs),
                background_concurrency: config.fetch.background_concurrency.max(1) as usize,
                background_bandwidth: (config.fetch.background_bandwidth > 0)
                    .then_some(config.fetch.background_bandwidth),
                ..crate::fetch::SchedulerOptions::default()
            }),
            ..FetchOptions::default()
        };
        Ok(Self::new(
            client,
            cache,
            runtime,
            LayerManagerOptions {
                fetch,
                mount: lazysnap_fuse::MountOptions {
                    passthrough: config.fetch.passthrough,
                    read_ahead_kb: Some(config.fetch.kernel_read_ahead_kb),
                    ..LayerManagerOptions::default().mount
                },
                startup_prefetch: config.fetch.startup_prefetch,
                ..LayerManagerOptions::default()
            },
        ))
    }
}
