//! `lazysnap mount IMAGE DIR` and `lazysnap umount DIR`: images mounted lazily and read-only
//! without containerd. Every mount with the same cache directory is hosted by one
//! detached mount daemon that owns that cache ([`super::mount_daemon`]); these commands find it
//! (or start it) through its socket ([`super::mount_socket`]). One state file per mount directory
//! tells `status` and `umount` which daemon hosts it and what it fetched.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use lazysnap::layer;

use super::mount_daemon;
use super::mount_socket::{self, DaemonConnection, MountRequest, Reply, Request};
use super::mount_state::{process_alive, read_state, state_file};
use super::{human_bytes, parse_size};

/// The cache size bound of a daemon started without `--cache-size`.
const DEFAULT_CACHE_SIZE: u64 = 10 << 30;
/// How long a mount may take in the daemon (resolving, TOCs, unpacking non-eStargz layers).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an unmount may take in the daemon, and the daemon to exit after its last one.
const UMOUNT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct MountArgs {
    /// Image reference, e.g. 127.0.0.1:5000/app:esgz.
    image: String,
    /// Existing directory to mount the image's root filesystem at (read-only).
    dir: PathBuf,
    /// Mount over a directory that is not empty (its files are hidden until `umount`).
    #[arg(long)]
    force: bool,
    /// Chunk cache directory. All mounts with the same cache dir are served by one mount daemon
    /// that owns it: the first mount starts the daemon, later ones join it through the socket
    /// <cache-dir>/mount.sock (mode 0600, root only; daemon log <cache-dir>/mount-daemon.log), and
    /// it exits when its last image is unmounted. A `lazysnap serve` needs a cache dir of its own.
    #[arg(long, default_value = "/var/lib/lazysnap/cache")]
    cache_dir: PathBuf,
    /// Chunk cache size bound, e.g. 10GiB, 512MiB or bytes [default: 10GiB]. Set by the mount
    /// that starts the daemon; a later mount with another value gets a warning and the running
    /// daemon's bound.
    #[arg(long, value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Where the mount state files go (one per mount directory).
    #[arg(long, default_value = "/run/lazysnap/mounts")]
    state_dir: PathBuf,
    /// Platform to choose from an image index (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// Use plain HTTP for a registry that is not on localhost.
    #[arg(long)]
    plain_http: bool,
    /// containerd-style hosts.toml directory (mirrors, CA, headers; default:
    /// /etc/containerd/certs.d, else /etc/docker/certs.d, when they exist).
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Fetch only what is read: no prefetch of prioritized files or of the libraries a program
    /// names, no background fill and no read-ahead of the files that follow a miss.
    #[arg(long)]
    no_prefetch: bool,
    /// Fetch the prioritized files and what is read, but never fill in the rest of the layers
    /// in the background.
    #[arg(long)]
    no_background: bool,
    /// Serve every read through the daemon, never by FUSE passthrough from the cache.
    #[arg(long)]
    no_passthrough: bool,
    /// Longest a read may wait for the registry before it fails with EIO, in seconds.
    #[arg(long, default_value_t = 30)]
    read_deadline: u64,
    /// Be the mount daemon in the foreground instead of starting a detached one (logs to
    /// stderr; later mounts with the same cache dir join it; Ctrl-C unmounts them all).
    #[arg(long)]
    foreground: bool,
}

#[derive(clap::Args)]
pub struct UmountArgs {
    /// A directory mounted by `lazysnap mount`.
    dir: PathBuf,
    /// Where the mount state files are.
    #[arg(long, default_value = "/run/lazysnap/mounts")]
    state_dir: PathBuf,
}

pub fn run_mount(args: MountArgs) -> anyhow::Result<ExitCode> {
    super::require_root("mount", "it mounts FUSE filesystems")?;
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
        // Its daemon died (SIGKILL): what it left mounted is dead.
        release_stale(&state_path, &dir);
    }
    let not_empty = std::fs::read_dir(&dir)
        .with_context(|| format!("reading mount directory {}", dir.display()))?
        .next()
        .is_some();
    if not_empty && !args.force {
        bail!(
            "{} is not empty: mounting would hide its files until `lazysnap umount`; empty it, \
             choose another directory, or pass --force",
            dir.display()
        );
    }
    std::fs::create_dir_all(&args.cache_dir)
        .with_context(|| format!("creating the cache directory {}", args.cache_dir.display()))?;
    let cache_dir = args
        .cache_dir
        .canonicalize()
        .with_context(|| format!("cache directory {}", args.cache_dir.display()))?;
    let state_dir = std::path::absolute(&args.state_dir)
        .with_context(|| format!("state directory {}", args.state_dir.display()))?;
    let request = MountRequest {
        image: args.image.clone(),
        dir: dir.clone(),
        state_dir,
        platform: args.platform.clone(),
        plain_http: args.plain_http,
        hosts_dir: super::hosts_dir_or_default(args.hosts_dir.clone())
            .as_ref()
            .map(std::path::absolute)
            .transpose()
            .context("--hosts-dir")?,
        no_prefetch: args.no_prefetch,
        no_background: args.no_background,
        no_passthrough: args.no_passthrough,
        read_deadline: args.read_deadline,
    };
    let cache_size = args.cache_size.unwrap_or(DEFAULT_CACHE_SIZE);
    if args.foreground {
        return match mount_socket::live_daemon_or_lock(&cache_dir)? {
            Ok(daemon) => bail!(
                "--foreground: the mount daemon (pid {}) already serves {}; mount without \
                 --foreground to add this image to it, or use another --cache-dir",
                daemon.pid,
                cache_dir.display()
            ),
            Err(starter) => mount_daemon::run_foreground(cache_dir, cache_size, starter, request),
        };
    }
    let mut daemon = mount_socket::connect_or_start(&cache_dir, cache_size)?;
    if let Some(asked) = args.cache_size {
        if asked != daemon.cache_limit {
            eprintln!(
                "lazysnap: warning: --cache-size {} does not apply: the mount daemon (pid {}) of {} \
                 is running with a bound of {}, shared by all its mounts; to change it, unmount \
                 every image mounted with this cache dir and mount again",
                human_bytes(asked),
                daemon.pid,
                cache_dir.display(),
                human_bytes(daemon.cache_limit)
            );
        }
    }
    match daemon.request(&Request::Mount(request), MOUNT_TIMEOUT)? {
        Reply::Mounted { image, layers } => {
            eprintln!(
                "mounted {image} at {} ({layers} layers; mount daemon pid {}; `lazysnap status`, `lazysnap umount {}`)",
                dir.display(),
                daemon.pid,
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Reply::Error { message } => bail!("{message}"),
        other => bail!("the mount daemon answered a mount with {other:?}"),
    }
}

/// Undoes what a dead daemon left for `dir`: the stacked image, the layers' FUSE mounts (their
/// connections are gone), the work directory and the state file.
fn release_stale(state_path: &Path, dir: &Path) {
    if layer::is_mountpoint(dir) {
        if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(dir = %dir.display(), error = %e, "detaching a stale mount");
        }
    }
    let work = state_path.with_extension("d");
    if let Ok(entries) = std::fs::read_dir(&work) {
        for entry in entries.flatten() {
            if layer::is_mountpoint(&entry.path()) {
                layer::detach_stale_mount(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_file(state_path);
}

pub fn run_umount(args: UmountArgs) -> anyhow::Result<ExitCode> {
    super::require_root("umount", "it unmounts FUSE filesystems")?;
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
    if process_alive(state.pid) {
        match &state.socket {
            Some(socket) => {
                if let Some(mut daemon) = DaemonConnection::connect(socket)? {
                    if daemon.pid == state.pid {
                        let reply = daemon
                            .request(&Request::Umount { dir: dir.clone() }, UMOUNT_TIMEOUT)?;
                        drop(daemon);
                        match reply {
                            Reply::Unmounted { daemon_exiting } => {
                                if daemon_exiting {
                                    wait_for_exit(state.pid)?;
                                }
                                eprintln!("unmounted {}", dir.display());
                                return Ok(ExitCode::SUCCESS);
                            }
                            Reply::Error { message } => bail!("{message}"),
                            other => bail!("the mount daemon answered an unmount with {other:?}"),
                        }
                    }
                }
                // Nobody (or another daemon) answers for this state file's pid: its daemon
                // died and the pid was reused.
            }
            None => {
                // A daemon from before daemons were shared: it hosts this mount only.
                if layer::is_mountpoint(&dir) {
                    nix::mount::umount2(&dir, nix::mount::MntFlags::empty())
                        .or_else(|_| nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH))
                        .with_context(|| format!("unmounting {}", dir.display()))?;
                }
                let pid = nix::unistd::Pid::from_raw(state.pid as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                wait_for_exit(state.pid)?;
            }
        }
    }
    release_stale(&state_path, &dir);
    eprintln!("unmounted {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Waits (bounded) for a mount daemon to exit.
fn wait_for_exit(pid: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    while process_alive(pid) {
        if started.elapsed() > UMOUNT_TIMEOUT {
            bail!(
                "mount daemon {pid} did not exit within {} s after its last unmount; `kill {pid}`",
                UMOUNT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
