//! One image mounted by the mount daemon: its layers mounted lazily (or downloaded and unpacked
//! once per digest when not lazy), stacked with overlayfs, reported and torn down.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use lazysnap::cache::ChunkCache;
use lazysnap::daemon;
use lazysnap::estargz;
use lazysnap::fetch::FetchScheduler;
use lazysnap::image::{self, ImageLocation, Platform};
use lazysnap::layer::{self, LowerLayers, MountedLayer, RemoteLayerSpec};
use lazysnap::registry::{Client, Reference};

use crate::cli::mount_socket::MountRequest;
use crate::cli::mount_state::{state_file, LayerState};

/// One image mounted at one directory.
pub(super) struct ImageMount {
    pub(super) image: String,
    pub(super) dir: PathBuf,
    pub(super) state_path: PathBuf,
    /// Holds the layers' mountpoints: `<state file>.d/<position>`.
    pub(super) work: PathBuf,
    pub(super) descriptors: Vec<image::Descriptor>,
    /// Layer directories, base first (FUSE mountpoints or unpacked trees).
    pub(super) lower_dirs: Vec<PathBuf>,
    /// The FUSE layer of each lower dir, `None` for an unpacked one.
    pub(super) layers: Vec<Option<MountedLayer>>,
    /// Whether `dir` has the stacked image mounted on it.
    pub(super) stacked: bool,
}

impl ImageMount {
    pub(super) fn layer_states(&self) -> Vec<LayerState> {
        self.descriptors
            .iter()
            .zip(&self.lower_dirs)
            .zip(&self.layers)
            .map(|((descriptor, path), mounted)| {
                let stats = mounted.as_ref().map(|m| m.stats()).unwrap_or_default();
                let passthrough_opens = mounted
                    .as_ref()
                    .and_then(|m| m.fs_stats())
                    .map_or(0, |s| s.passthrough_opens);
                LayerState::new(
                    None,
                    descriptor.digest.to_string(),
                    if mounted.is_some() {
                        "lazy"
                    } else {
                        "unpacked"
                    },
                    path.clone(),
                    descriptor.size,
                    &stats,
                    passthrough_opens,
                )
            })
            .collect()
    }

    /// Unmounts the stacked image (when `unmount_dir` and it is still there) and every layer,
    /// and removes the work directory and state file. Problems are logged: there is nothing
    /// left to undo.
    pub(super) async fn teardown(self, unmount_dir: bool) {
        if unmount_dir && self.stacked && layer::is_mountpoint(&self.dir) {
            if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "unmounting the image");
            }
        }
        for mounted in self.layers.into_iter().flatten() {
            let mountpoint = mounted.mountpoint().to_path_buf();
            match tokio::task::spawn_blocking(move || mounted.unmount()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "unmounting a layer")
                }
                Err(e) => {
                    tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "unmount task")
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.work);
        let _ = std::fs::remove_file(&self.state_path);
    }
}

/// Mounts every layer of `request.image` and stacks them read-only at `request.dir`; on failure
/// undoes what it did.
pub(super) async fn mount_image(
    cache: &Arc<ChunkCache>,
    cache_dir: &Path,
    request: &MountRequest,
) -> anyhow::Result<ImageMount> {
    let state_path = state_file(&request.state_dir, &request.dir);
    let mut mounted = ImageMount {
        image: request.image.clone(),
        dir: request.dir.clone(),
        work: state_path.with_extension("d"),
        state_path,
        descriptors: Vec::new(),
        lower_dirs: Vec::new(),
        layers: Vec::new(),
        stacked: false,
    };
    match mount_layers(&mut mounted, cache, cache_dir, request).await {
        Ok(()) => Ok(mounted),
        Err(error) => {
            mounted.teardown(true).await;
            Err(error)
        }
    }
}

pub(super) async fn mount_layers(
    mounted: &mut ImageMount,
    cache: &Arc<ChunkCache>,
    cache_dir: &Path,
    request: &MountRequest,
) -> anyhow::Result<()> {
    let platform = match &request.platform {
        Some(text) => Platform::parse(text)?,
        None => Platform::host(),
    };
    let config = request.config();
    let client = daemon::registry_client(&config)?;
    // The process-wide scheduler: it bounds background work across every image this daemon
    // mounts.
    let manager = daemon::layer_manager(
        &config,
        client.clone(),
        cache.clone(),
        FetchScheduler::global(),
        platform.clone(),
        tokio::runtime::Handle::current(),
    );
    let reference = Reference::parse(&request.image)?;
    let resolved = image::resolve_image(
        &client,
        &ImageLocation::Registry(reference.clone()),
        &platform,
    )
    .await
    .with_context(|| format!("resolving {}", request.image))?;

    // Layers without a TOC may be covered by the image's SOCI index, which the manager looks up
    // by the manifest's digest.
    if resolved
        .manifest
        .layers
        .iter()
        .any(|layer| !layer.annotations.contains_key(lazysnap::labels::TOC_DIGEST))
    {
        manager
            .image_manifest(&reference)
            .await
            .with_context(|| format!("resolving {}", request.image))?;
    }
    let _ = std::fs::remove_dir_all(&mounted.work);
    for (position, descriptor) in resolved.manifest.layers.iter().enumerate() {
        let spec = RemoteLayerSpec {
            image: reference.clone(),
            layer: descriptor.clone(),
        };
        let mountpoint = mounted.work.join(position.to_string());
        std::fs::create_dir_all(&mountpoint)
            .with_context(|| format!("creating {}", mountpoint.display()))?;
        // eStargz / zstd:chunked, or plain gzip in the image's SOCI index; else downloaded.
        // The layers already stacked, nearest first, decide which whiteouts delete anything.
        let below = LowerLayers::new(mounted.lower_dirs.iter().rev().cloned().collect());
        // The lazy layers already stacked, nearest first: library prefetch looks there too.
        let below_readers: Vec<_> = mounted
            .layers
            .iter()
            .rev()
            .flatten()
            .map(|layer| layer.reader().clone())
            .collect();
        let lazy = match manager
            .mount(&spec, &mountpoint, &below, &below_readers)
            .await
        {
            Ok(layer) => Some(layer),
            Err(e) if e.is_not_lazy() => {
                tracing::info!(layer = %descriptor.digest, reason = %e, "downloading and unpacking the layer");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let lower = match &lazy {
            Some(_) => mountpoint,
            None => unpack_cached(&client, &spec, cache_dir).await?,
        };
        mounted.descriptors.push(descriptor.clone());
        mounted.lower_dirs.push(lower);
        mounted.layers.push(lazy);
    }
    stack_layers(&mounted.lower_dirs, &mounted.dir)?;
    mounted.stacked = true;
    Ok(())
}

/// Downloads and unpacks a layer that cannot be mounted lazily, once per digest.
pub(super) async fn unpack_cached(
    client: &Client,
    spec: &RemoteLayerSpec,
    cache_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let hex = image::digest_hex(&spec.layer.digest)?;
    let dest = cache_dir.join("unpacked").join(hex);
    if dest.is_dir() {
        return Ok(dest);
    }
    tracing::info!(
        layer = %lazysnap::digest::short_digest(&spec.layer.digest),
        "layer is not lazily pullable: downloading and unpacking it"
    );
    let reader = client
        .blob_reader(&spec.image, &spec.layer.digest)
        .await
        .with_context(|| format!("downloading layer {}", spec.layer.digest))?;
    let sync_reader = tokio_util::io::SyncIoBridge::new(reader);
    let target = dest.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let tar = estargz::decompressed_reader(sync_reader)?;
        layer::unpack_layer(tar, &target, "trusted.overlay.opaque")?;
        Ok(())
    })
    .await??;
    Ok(dest)
}

/// Stacks `lower_dirs` (base first) read-only at `dir`: a bind mount for one layer, overlayfs
/// for more.
pub(super) fn stack_layers(lower_dirs: &[PathBuf], dir: &Path) -> anyhow::Result<()> {
    use nix::mount::{mount, MsFlags};
    match lower_dirs {
        [] => bail!("the image has no layers"),
        [only] => {
            mount(
                Some(only.as_path()),
                dir,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting {} at {}", only.display(), dir.display()))?;
            let read_only = mount(
                None::<&str>,
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
            if let Err(e) = read_only {
                let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
                return Err(e).with_context(|| format!("making {} read-only", dir.display()));
            }
        }
        _ => {
            let lowers: Vec<String> = lower_dirs
                .iter()
                .rev()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let options = format!("lowerdir={}", lowers.join(":"));
            mount(
                Some("overlay"),
                dir,
                Some("overlay"),
                MsFlags::MS_RDONLY,
                Some(options.as_str()),
            )
            .with_context(|| format!("mounting overlayfs at {} ({options})", dir.display()))?;
        }
    }
    Ok(())
}
