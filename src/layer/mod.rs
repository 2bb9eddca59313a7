//! A remote layer's life: locate its blob, read footer and TOC (digest checked), build the FUSE
//! index, mount it with a fetching content source, check its health, and unmount it.

mod index;
mod lower;
mod startup;
mod unpack;

pub use index::build_index;
pub use lower::LowerLayers;
pub use unpack::{unpack_layer, UnpackError};

use crate::digest::{short_digest, Digest};
use crate::sync::lock;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tracing::Instrument;

use crate::blob::BlobSource;
use crate::cache::ChunkCache;
use crate::estargz::{self, FormatError};
use crate::fetch::{FetchOptions, LayerFetchStats, LayerReader};
use crate::fuse_holder::{FuseHolder, HeldConnection, HolderError};
use crate::image::{self, Descriptor, Manifest, Platform};
use crate::labels;
use crate::registry::{Client, Reference, RegistryError};
use crate::snapshotter::remote::{LayerLocator, RemoteLayerError};

mod cache_admin;
mod hook;
mod image_state;
mod mountinfo;
mod soci_index;
pub use cache_admin::{CacheUsage, LayerCacheUsage, PruneMode, PruneReport};
use hook::to_remote_error;
use image_state::{ImageStartup, TocCell};
pub use mountinfo::{detach_stale_mount, is_mountpoint};

/// Why a layer could not be mounted or checked.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("layer {digest} is not lazily pullable: {source}")]
    Format {
        digest: Digest,
        #[source]
        source: FormatError,
    },
    #[error("image: {0}")]
    Image(#[from] image::ImageError),
    #[error("chunk cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("layer {digest} is not in image {image}")]
    NotInImage { digest: Digest, image: String },
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
    Unhealthy { digest: Digest, detail: String },
    #[error(
        "layer {digest} is not lazily pullable: it has no {} annotation (not eStargz / \
         zstd:chunked) and no zTOC in a SOCI index of the image (`soci create` and `soci push` \
         index it)",
        labels::TOC_DIGEST
    )]
    NotIndexed { digest: Digest },
}

impl LayerError {
    /// True when the layer can never be mounted lazily (not eStargz), as opposed to a failure
    /// that may pass (registry down).
    pub fn is_not_lazy(&self) -> bool {
        matches!(
            self,
            LayerError::Format { .. }
                | LayerError::NotInImage { .. }
                | LayerError::NotIndexed { .. }
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

/// Serves `index` again on a connection a previous daemon left mounted at `mountpoint`.
async fn resume_index(
    index: lazysnap_fuse::Index,
    source: Arc<dyn lazysnap_fuse::ContentSource>,
    mountpoint: &Path,
    options: lazysnap_fuse::MountOptions,
    held: HeldConnection,
) -> Result<lazysnap_fuse::MountHandle, LayerError> {
    let target = mountpoint.to_path_buf();
    tokio::task::spawn_blocking(move || {
        lazysnap_fuse::resume(index, source, &target, &options, held.fd, held.dev)
    })
    .await
    .map_err(|join| LayerError::Toc {
        detail: format!("resume task failed: {join}"),
    })?
    .map_err(|source| LayerError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })
}

/// One layer a [`LayerManager`] has mounted, as `lazysnap status` shows it.
#[derive(Debug, Clone)]
pub struct MountedLayerReport {
    /// The image it was mounted for.
    pub image: String,
    /// Its blob digest and compressed size.
    pub digest: Digest,
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

    /// Stops fetching and leaves the layer mounted (the daemon exits; the holder keeps it).
    pub fn leave_mounted(mut self) {
        self.reader.shutdown();
        if let Some(handle) = self.handle.take() {
            handle.leave_mounted();
        }
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
    /// Manifests already resolved (with their digests), by image reference.
    manifests: Mutex<HashMap<String, (Digest, Arc<Manifest>)>>,
    /// Each image's SOCI index (looked up once), by image reference.
    soci_indexes: Mutex<HashMap<String, soci_index::IndexCell>>,
    /// TOCs read (or being read) ahead of their layer's Prepare, by image reference and layer.
    tocs: Mutex<HashMap<(String, Digest), (std::time::Instant, TocCell)>>,
    /// What the first Prepare of an image learned for the startup prefetch, by image reference.
    startups: Mutex<HashMap<String, (std::time::Instant, Arc<ImageStartup>)>>,
    /// Keeps the FUSE connections of hook-mounted layers across restarts of the daemon.
    holder: Option<FuseHolder>,
    /// Connections a previous daemon left mounted, by mount point, until restored.
    held: Mutex<HashMap<PathBuf, HeldConnection>>,
    /// Unmount the layers when the daemon stops, even with a holder (maintenance).
    unmount_on_exit: AtomicBool,
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
            soci_indexes: Mutex::new(HashMap::new()),
            tocs: Mutex::new(HashMap::new()),
            startups: Mutex::new(HashMap::new()),
            holder: None,
            held: Mutex::new(HashMap::new()),
            unmount_on_exit: AtomicBool::new(false),
        }
    }

    /// Hands the FUSE connection of every layer mounted through the hook to `holder`, and takes
    /// over the ones it kept from a previous daemon: restoring those layers resumes them, so
    /// running containers keep reading through restarts.
    pub fn attach_fuse_holder(&mut self, holder: FuseHolder) -> Result<(), HolderError> {
        let held = holder.list()?;
        if !held.is_empty() {
            tracing::info!(
                connections = held.len(),
                "resuming FUSE connections a previous daemon left mounted"
            );
        }
        self.held = Mutex::new(held);
        self.holder = Some(holder);
        Ok(())
    }

    /// Unmount every layer when the daemon stops (`serve --unmount-on-exit`), for maintenance.
    pub fn unmount_on_exit(&self) {
        self.unmount_on_exit
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets go of the held connections no restored snapshot claimed (their snapshots are gone):
    /// they are detached, as nothing will serve them.
    pub fn release_unclaimed_connections(&self) {
        let unclaimed: Vec<PathBuf> = lock(&self.held).drain().map(|(path, _)| path).collect();
        for mountpoint in unclaimed {
            tracing::info!(mountpoint = %mountpoint.display(), "detaching a held FUSE connection no snapshot uses");
            self.release_connection(&mountpoint);
            detach_stale_mount(&mountpoint);
        }
    }

    fn release_connection(&self, mountpoint: &Path) {
        if let Some(holder) = &self.holder {
            if let Err(err) = holder.release(mountpoint) {
                tracing::warn!(error = %err, "cannot tell the FUSE holder to let a connection go");
            }
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

    /// Finds layer `digest` of `image` (size and annotations come from the manifest).
    pub async fn locate(
        &self,
        image: &Reference,
        digest: &Digest,
    ) -> Result<RemoteLayerSpec, LayerError> {
        let manifest = self.image_manifest(image).await?;
        let layer = manifest
            .layers
            .iter()
            .find(|layer| layer.digest == *digest)
            .cloned()
            .ok_or_else(|| LayerError::NotInImage {
                digest: digest.clone(),
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
            self.mount_toc(spec, &toc, mountpoint, lower, below, &[], None)
                .await
        }
        .instrument(span)
        .await;
        // The parsed TOC went with the block: the index and chunk lists hold what reads use.
        lazysnap_fuse::release_freed_memory();
        mounted
    }

    /// Mounts a layer whose TOC was read by [`read_toc`](Self::read_toc), stacked on `lower`
    /// (whiteouts of what `lower` lacks are left out); resumes `held` instead when a previous
    /// daemon left it mounted there.
    #[allow(clippy::too_many_arguments)]
    async fn mount_toc(
        &self,
        spec: &RemoteLayerSpec,
        toc: &estargz::LayerToc,
        mountpoint: &Path,
        lower: &LowerLayers,
        below: &[Arc<LayerReader>],
        startup_files: &[String],
        held: Option<HeldConnection>,
    ) -> Result<MountedLayer, LayerError> {
        let blob: Arc<dyn BlobSource> = Arc::new(self.client.blob(
            &spec.image,
            &spec.layer.digest,
            spec.layer.size,
        ));
        let (index, files) = build_index(toc, lower)?;
        let reader = LayerReader::new(
            blob,
            toc.chunk_coding(),
            files,
            self.cache.clone(),
            self.options.fetch.clone(),
            self.runtime.clone(),
            short_digest(&spec.layer.digest),
        );
        reader.set_lower_layers(below);
        let mut mount_options = self.options.mount.clone();
        mount_options.fs_name = format!("lazysnap:{}", short_digest(&spec.layer.digest));
        if self.holder.is_some() {
            mount_options.open_record = Some(mountpoint.with_file_name("fs.opens"));
        }
        let source: Arc<dyn lazysnap_fuse::ContentSource> = reader.clone();
        // A connection a previous daemon left mounted here is served again (its containers
        // never notice); one that is gone or replaced is detached and the layer mounted afresh.
        let held = held.and_then(|held| {
            match lazysnap_fuse::check_resumable(&held.fd, mountpoint, held.dev) {
                Ok(()) => Some(held),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot resume the layer's connection; mounting it afresh");
                    detach_stale_mount(mountpoint);
                    crate::metrics::record_layer_restore(crate::metrics::LayerRestore::Remounted);
                    None
                }
            }
        });
        let handle = match held {
            Some(held) => {
                let handle = resume_index(index, source, mountpoint, mount_options, held).await?;
                crate::metrics::record_layer_restore(crate::metrics::LayerRestore::Resumed);
                handle
            }
            None => {
                let handle = mount_index(index, source, mountpoint, mount_options).await?;
                if let (Some(holder), Some(dev)) = (&self.holder, handle.device_number()) {
                    if let Err(err) = holder.hold(mountpoint, dev, handle.connection()) {
                        tracing::warn!(error = %err, "the FUSE holder does not keep this layer: a restart of the daemon breaks its containers");
                    }
                }
                handle
            }
        };
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
    pub fn mounted_stats(&self) -> BTreeMap<PathBuf, (Digest, LayerFetchStats)> {
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
        held: Option<HeldConnection>,
    ) -> Result<(), RemoteLayerError> {
        let image = Reference::parse(&locator.image_ref)
            .map_err(|e| RemoteLayerError::Declined(format!("image reference: {e}")))?;
        let layer_digest = Digest::parse(&locator.layer_digest)
            .map_err(|e| RemoteLayerError::Declined(format!("layer digest label: {e}")))?;
        // The first Prepare of an image fetches its manifest (for this layer's size and the
        // other layers' TOCs); when the labels name this layer's TOC digest, its tail is read
        // meanwhile by a suffix range, which tells the size too: one round trip less.
        let early_tail = async {
            if locator.toc_digest.is_none() || self.cached_manifest(&image).is_some() {
                return None;
            }
            let read = self
                .client
                .blob_tail(&image, &layer_digest, estargz::DEFAULT_TAIL_GUESS)
                .await;
            read.map_err(|e| tracing::debug!(error = %e, "reading the layer's tail before the manifest failed; reading it after"))
                .ok()
        };
        let (located, early_tail) = tokio::join!(self.locate(&image, &layer_digest), early_tail);
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
        let span = tracing::info_span!("layer.mount", layer = %spec.layer.digest, mountpoint = %mountpoint.display());
        let layer = async {
            let toc = self
                .toc_read_ahead(&image, &spec, &locator.image_layers, early_tail)
                .await?;
            let below = self.lazy_readers_below(lower);
            let startup_files = self.startup_files_of(&image, &spec.layer.digest);
            let mounted = self
                .mount_toc(&spec, &toc, mountpoint, lower, &below, &startup_files, held)
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

    /// The readers of the lazy layers among `lower`, mounted before through the hook, nearest
    /// first.
    fn lazy_readers_below(&self, lower: &LowerLayers) -> Vec<Arc<LayerReader>> {
        let mounted = lock(&self.mounted);
        lower
            .dirs()
            .iter()
            .filter_map(|dir| mounted.get(dir).map(|layer| layer.reader.clone()))
            .collect()
    }
}
