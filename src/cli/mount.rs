//! `lazysnap mount IMAGE DIR`, `lazysnap umount DIR`, `lazysnap status`: an image mounted lazily
//! and read-only without containerd. `mount` starts a detached daemon that serves the layers'
//! FUSE mounts and stacks them with overlayfs at DIR; its state file tells `status` and `umount`
//! where it is and what it fetched.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::estargz;
use lazysnap::fetch::FetchOptions;
use lazysnap::image::{self, ImageLocation, Platform};
use lazysnap::layer::{self, LayerManager, LayerManagerOptions, RemoteLayerSpec};
use lazysnap::registry::{Client, ClientConfig, Reference};

/// Environment variable marking the detached daemon process.
const DAEMON_ENV: &str = "LAZYSNAP_MOUNT_DAEMON";

#[derive(clap::Args)]
pub struct MountArgs {
    /// Image reference, e.g. 127.0.0.1:5000/app:esgz.
    image: String,
    /// Existing directory to mount the image's root filesystem at (read-only).
    dir: PathBuf,
    /// Chunk cache directory, shared by every mount and by `lazysnap serve`.
    #[arg(long, default_value = "/var/lib/lazysnap/cache")]
    cache_dir: PathBuf,
    /// Chunk cache size bound, e.g. 10GiB, 512MiB or bytes.
    #[arg(long, default_value = "10GiB", value_parser = parse_size)]
    cache_size: u64,
    /// Where mount daemons keep their state files.
    #[arg(long, default_value = "/run/lazysnap/mounts")]
    state_dir: PathBuf,
    /// Platform to choose from an image index (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// Use plain HTTP for a registry that is not on localhost.
    #[arg(long)]
    plain_http: bool,
    /// containerd-style hosts.toml directory (mirrors, CA, headers).
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Do not prefetch prioritized files or fill the rest in the background.
    #[arg(long)]
    no_prefetch: bool,
    /// Longest a read may wait for the registry before it fails with EIO, in seconds.
    #[arg(long, default_value_t = 30)]
    read_deadline: u64,
    /// Stay in the foreground instead of detaching (logs to stderr; Ctrl-C unmounts).
    #[arg(long)]
    foreground: bool,
}

#[derive(clap::Args)]
pub struct UmountArgs {
    /// A directory mounted by `lazysnap mount`.
    dir: PathBuf,
    /// Where mount daemons keep their state files.
    #[arg(long, default_value = "/run/lazysnap/mounts")]
    state_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Where mount daemons keep their state files.
    #[arg(long, default_value = "/run/lazysnap/mounts")]
    state_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What a mount daemon publishes about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MountState {
    pid: u32,
    image: String,
    dir: PathBuf,
    ready: bool,
    error: Option<String>,
    layers: Vec<LayerState>,
    cache_bytes: u64,
    cache_limit: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerState {
    digest: String,
    /// "lazy" (FUSE) or "unpacked" (not eStargz: downloaded and unpacked).
    mode: String,
    /// The layer's directory (an overlayfs lower dir).
    path: PathBuf,
    size: u64,
    on_demand_bytes: u64,
    prefetch_bytes: u64,
    background_bytes: u64,
    fetched_chunks: u64,
    total_chunks: u64,
    cache_hits: u64,
}

pub fn run_mount(args: MountArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("mount directory {} (create it first)", args.dir.display()))?;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let state_path = state_file(&args.state_dir, &dir);
    if let Some(existing) = read_state(&state_path) {
        if process_alive(existing.pid) {
            bail!(
                "{} is already mounted by lazysnap (pid {}): `lazysnap umount {}` first",
                dir.display(),
                existing.pid,
                dir.display()
            );
        }
    }
    if args.foreground || std::env::var_os(DAEMON_ENV).is_some() {
        return serve_mount(args, dir, state_path);
    }
    spawn_daemon(&dir, &state_path)
}

/// Starts this program again as a detached daemon and waits until it reports ready or failed.
fn spawn_daemon(dir: &Path, state_path: &Path) -> anyhow::Result<ExitCode> {
    let state_dir = state_path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state dir {}", state_dir.display()))?;
    let _ = std::fs::remove_file(state_path);
    let log_path = state_path.with_extension("log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the lazysnap executable")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the mount daemon")?;
    let started = Instant::now();
    loop {
        if let Some(state) = read_state(state_path) {
            if state.ready {
                eprintln!(
                    "mounted {} at {} ({} layers; `lazysnap status`, `lazysnap umount {}`)",
                    state.image,
                    dir.display(),
                    state.layers.len(),
                    dir.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(error) = state.error {
                bail!("{error}");
            }
        }
        if let Some(status) = child.try_wait().context("watching the mount daemon")? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("mount daemon exited with {status}:\n{log}");
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "mount daemon not ready after 5 minutes; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon: mounts every layer, stacks them at `dir`, publishes state, and unmounts on
/// SIGTERM / SIGINT or when `dir` is unmounted by someone else.
fn serve_mount(args: MountArgs, dir: PathBuf, state_path: PathBuf) -> anyhow::Result<ExitCode> {
    if std::env::var_os(DAEMON_ENV).is_some() {
        let _ = nix::unistd::setsid();
    }
    let runtime = super::runtime()?;
    let mut state = MountState {
        pid: std::process::id(),
        image: args.image.clone(),
        dir: dir.clone(),
        ready: false,
        error: None,
        layers: Vec::new(),
        cache_bytes: 0,
        cache_limit: args.cache_size,
    };
    let result = runtime.block_on(mount_and_wait(&args, &dir, &state_path, &mut state));
    if let Err(error) = &result {
        state.error = Some(format!("{error:#}"));
        let _ = write_state(&state_path, &state);
    } else {
        let _ = std::fs::remove_file(&state_path);
    }
    result.map(|()| ExitCode::SUCCESS)
}

async fn mount_and_wait(
    args: &MountArgs,
    dir: &Path,
    state_path: &Path,
    state: &mut MountState,
) -> anyhow::Result<()> {
    let platform = match &args.platform {
        Some(text) => Platform::parse(text)?,
        None => Platform::host(),
    };
    let client = Client::new(ClientConfig {
        hosts_dir: args.hosts_dir.clone(),
        plain_http: args.plain_http,
        read_deadline: Duration::from_secs(args.read_deadline),
        ..ClientConfig::default()
    })?;
    let mut cache_options = CacheOptions::new(&args.cache_dir);
    cache_options.max_bytes = args.cache_size;
    let cache = ChunkCache::open(cache_options)
        .with_context(|| format!("opening the cache at {}", args.cache_dir.display()))?;
    let fetch = FetchOptions {
        deadline: Duration::from_secs(args.read_deadline),
        prefetch: !args.no_prefetch,
        background: !args.no_prefetch,
        ..FetchOptions::default()
    };
    let manager = LayerManager::new(
        client.clone(),
        cache.clone(),
        tokio::runtime::Handle::current(),
        LayerManagerOptions {
            fetch,
            platform: platform.clone(),
            ..LayerManagerOptions::default()
        },
    );
    let reference = Reference::parse(&args.image)?;
    let resolved = image::resolve_image(
        &client,
        &ImageLocation::Registry(reference.clone()),
        &platform,
    )
    .await
    .with_context(|| format!("resolving {}", args.image))?;

    let work = state_path.with_extension("d");
    let _ = std::fs::remove_dir_all(&work);
    let mut lazy_layers = Vec::new();
    let mut lower_dirs = Vec::new();
    for (position, descriptor) in resolved.manifest.layers.iter().enumerate() {
        let spec = RemoteLayerSpec {
            image: reference.clone(),
            layer: descriptor.clone(),
        };
        let mountpoint = work.join(position.to_string());
        std::fs::create_dir_all(&mountpoint)
            .with_context(|| format!("creating {}", mountpoint.display()))?;
        let mounted = if spec.toc_digest().is_some() {
            match manager.mount(&spec, &mountpoint).await {
                Ok(mounted) => Some(mounted),
                Err(e) if e.is_not_lazy() => {
                    tracing::warn!(layer = %descriptor.digest, error = %e, "falling back to download and unpack");
                    None
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        match mounted {
            Some(mounted) => {
                lower_dirs.push(mountpoint);
                lazy_layers.push(Some(mounted));
            }
            None => {
                let unpacked = unpack_cached(&client, &spec, &args.cache_dir).await?;
                lower_dirs.push(unpacked);
                lazy_layers.push(None);
            }
        }
    }
    stack_layers(&lower_dirs, dir)?;
    state.ready = true;
    refresh_state(
        state,
        &resolved.manifest.layers,
        &lower_dirs,
        &lazy_layers,
        &cache,
    );
    write_state(state_path, state)?;

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                if !layer::is_mountpoint(dir) {
                    tracing::info!(dir = %dir.display(), "unmounted externally; stopping");
                    break;
                }
                refresh_state(state, &resolved.manifest.layers, &lower_dirs, &lazy_layers, &cache);
                let _ = write_state(state_path, state);
            }
        }
    }
    if layer::is_mountpoint(dir) {
        if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(dir = %dir.display(), error = %e, "unmounting the image");
        }
    }
    for mounted in lazy_layers.into_iter().flatten() {
        let mountpoint = mounted.mountpoint().to_path_buf();
        if let Err(e) = tokio::task::spawn_blocking(move || mounted.unmount()).await? {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "unmounting a layer");
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Downloads and unpacks a layer that cannot be mounted lazily, once per digest.
async fn unpack_cached(
    client: &Client,
    spec: &RemoteLayerSpec,
    cache_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let hex = image::digest_hex(&spec.layer.digest)?;
    let dest = cache_dir.join("unpacked").join(hex);
    if dest.is_dir() {
        return Ok(dest);
    }
    eprintln!(
        "layer {} is not eStargz: downloading and unpacking it",
        layer::short_digest(&spec.layer.digest)
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
fn stack_layers(lower_dirs: &[PathBuf], dir: &Path) -> anyhow::Result<()> {
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
            mount(
                None::<&str>,
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .with_context(|| format!("making {} read-only", dir.display()))?;
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

fn refresh_state(
    state: &mut MountState,
    descriptors: &[image::Descriptor],
    paths: &[PathBuf],
    layers: &[Option<layer::MountedLayer>],
    cache: &Arc<ChunkCache>,
) {
    state.layers = descriptors
        .iter()
        .zip(paths)
        .zip(layers)
        .map(|((descriptor, path), mounted)| {
            let stats = mounted.as_ref().map(|m| m.stats()).unwrap_or_default();
            LayerState {
                digest: descriptor.digest.clone(),
                mode: if mounted.is_some() {
                    "lazy"
                } else {
                    "unpacked"
                }
                .to_string(),
                path: path.clone(),
                size: descriptor.size,
                on_demand_bytes: stats.on_demand_bytes,
                prefetch_bytes: stats.prefetch_bytes,
                background_bytes: stats.background_bytes,
                fetched_chunks: stats.fetched_chunks,
                total_chunks: stats.total_chunks,
                cache_hits: stats.cache_hits,
            }
        })
        .collect();
    state.cache_bytes = cache.stats().disk_bytes;
}

pub fn run_umount(args: UmountArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("{}", args.dir.display()))?;
    let state_path = state_file(&args.state_dir, &dir);
    let Some(state) = read_state(&state_path) else {
        bail!(
            "{} was not mounted by `lazysnap mount` (no state in {})",
            dir.display(),
            args.state_dir.display()
        );
    };
    if layer::is_mountpoint(&dir) {
        nix::mount::umount2(&dir, nix::mount::MntFlags::empty())
            .or_else(|_| nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH))
            .with_context(|| format!("unmounting {}", dir.display()))?;
    }
    if process_alive(state.pid) {
        let pid = nix::unistd::Pid::from_raw(state.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while process_alive(state.pid) {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("mount daemon {} did not stop within 30 s", state.pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = std::fs::remove_file(&state_path);
    eprintln!("unmounted {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

pub fn run_status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut states = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&args.state_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(state) = read_state(&path) {
                    if process_alive(state.pid) {
                        states.push(state);
                    }
                }
            }
        }
    }
    states.sort_by(|a, b| a.dir.cmp(&b.dir));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&states)?);
        return Ok(ExitCode::SUCCESS);
    }
    if states.is_empty() {
        println!("no images mounted by `lazysnap mount`");
        return Ok(ExitCode::SUCCESS);
    }
    for state in &states {
        println!(
            "{}  {}  (pid {}, cache {} of {})",
            state.dir.display(),
            state.image,
            state.pid,
            human_bytes(state.cache_bytes),
            human_bytes(state.cache_limit)
        );
        println!(
            "  {:<14} {:<9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10}",
            "LAYER", "MODE", "SIZE", "ON-DEMAND", "PREFETCH", "BACKGROUND", "FETCHED", "CACHE-HITS"
        );
        for layer in &state.layers {
            let fetched = if layer.total_chunks == 0 {
                "-".to_string()
            } else {
                format!(
                    "{:.0}%",
                    100.0 * layer.fetched_chunks as f64 / layer.total_chunks as f64
                )
            };
            println!(
                "  {:<14} {:<9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10}",
                layer::short_digest(&layer.digest),
                layer.mode,
                human_bytes(layer.size),
                human_bytes(layer.on_demand_bytes),
                human_bytes(layer.prefetch_bytes),
                human_bytes(layer.background_bytes),
                fetched,
                layer.cache_hits
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn state_file(state_dir: &Path, dir: &Path) -> PathBuf {
    let digest = image::sha256_digest(dir.as_os_str().as_encoded_bytes());
    state_dir.join(format!("{}.json", layer::short_digest(&digest)))
}

fn read_state(path: &Path) -> Option<MountState> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_state(path: &Path, state: &MountState) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&temp, path)?;
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Parses `10GiB`, `512MiB`, `4096`, `1.5G` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| {
        format!("size {text:?}: expected a number with an optional unit like 10GiB")
    })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "size {text:?}: unknown unit {other:?} (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    Ok((number * multiplier as f64) as u64)
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
