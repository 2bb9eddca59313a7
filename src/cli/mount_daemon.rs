//! The mount daemon: one process per cache directory that owns the chunk cache and hosts every
//! `lazysnap mount` using it. It answers on `<cache dir>/mount.sock` (protocol in
//! [`super::mount_socket`]), mounts each image's layers (FUSE per eStargz layer, overlayfs at the
//! mount directory), keeps one state file per mount, and exits when its last mount is gone, or
//! unmounts everything on SIGTERM / SIGINT.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lazysnap::cache::{CacheError, ChunkCache};
use lazysnap::layer::{self};
use lazysnap::sync::lock;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::mount_socket::{self, MountRequest, Reply, Request, StarterLock};
use super::mount_state::{write_state, MountState};
use super::parse_size;

mod image_mount;
use image_mount::{mount_image, ImageMount};

/// How long a daemon with no mount and no client stays up (a client that started it and died).
const IDLE_GRACE: Duration = Duration::from_secs(30);
/// How long a new daemon waits for the cache lock held by a daemon that is still exiting.
const CACHE_LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long an exiting daemon lets clients read their last replies and mounts in progress end.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// Longest request line accepted.
const MAX_REQUEST: u64 = 1 << 20;

/// `lazysnap mount-daemon` (hidden): what `lazysnap mount` starts in the background.
#[derive(clap::Args)]
pub struct DaemonArgs {
    /// The chunk cache directory this daemon owns; it listens on `<cache_dir>/mount.sock`.
    #[arg(long)]
    cache_dir: PathBuf,
    /// Chunk cache size bound.
    #[arg(long, value_parser = parse_size)]
    cache_size: u64,
}

/// Runs a detached daemon (its own session) until its last mount is gone.
pub fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    let _ = nix::unistd::setsid();
    let runtime = super::runtime()?;
    runtime.block_on(serve(args.cache_dir, args.cache_size, None))?;
    Ok(ExitCode::SUCCESS)
}

/// `lazysnap mount --foreground`: this process becomes the daemon of `cache_dir` (other mounts
/// may join it) and mounts `request` first; Ctrl-C unmounts everything.
pub fn run_foreground(
    cache_dir: PathBuf,
    cache_size: u64,
    starter: StarterLock,
    request: MountRequest,
) -> anyhow::Result<ExitCode> {
    let runtime = super::runtime()?;
    runtime.block_on(serve(cache_dir, cache_size, Some((starter, request))))?;
    Ok(ExitCode::SUCCESS)
}

/// The daemon's shared state.
struct Daemon {
    cache: Arc<ChunkCache>,
    cache_dir: PathBuf,
    cache_limit: u64,
    socket: PathBuf,
    inner: Mutex<Inner>,
    /// Wakes the main loop when the daemon retires (stops accepting) or fails in the foreground.
    retired: tokio::sync::Notify,
}

struct Inner {
    /// Mounted images by their directory.
    mounts: BTreeMap<PathBuf, ImageMount>,
    /// Directories being mounted right now.
    mounting: HashSet<PathBuf>,
    /// Open client connections.
    connections: usize,
    /// False once the daemon stopped listening (its socket is gone).
    accepting: bool,
    /// Since when no client was connected.
    idle_since: Instant,
    /// Why a `--foreground` daemon's first mount failed.
    fatal: Option<anyhow::Error>,
}

async fn serve(
    cache_dir: PathBuf,
    cache_limit: u64,
    foreground: Option<(StarterLock, MountRequest)>,
) -> anyhow::Result<()> {
    let socket = mount_socket::socket_path(&cache_dir);
    let cache = open_cache(&cache_dir, cache_limit, &socket).await?;
    // Holding the cache lock means no other daemon of this cache is alive: a socket file left
    // there is stale.
    let listener = bind(&socket)?;
    tracing::info!(socket = %socket.display(), cache = %cache_dir.display(), "mount daemon listening");
    let daemon = Arc::new(Daemon {
        cache,
        cache_dir,
        cache_limit,
        socket,
        inner: Mutex::new(Inner {
            mounts: BTreeMap::new(),
            mounting: HashSet::new(),
            connections: 0,
            accepting: true,
            idle_since: Instant::now(),
            fatal: None,
        }),
        retired: tokio::sync::Notify::new(),
    });
    if let Some((starter, request)) = foreground {
        drop(starter);
        // The first mount counts as a client, so the daemon does not retire before it is done.
        lock(&daemon.inner).connections += 1;
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let reply = daemon.mount(request.clone()).await;
            let mut inner = lock(&daemon.inner);
            inner.connections -= 1;
            match reply {
                Reply::Mounted { image, layers } => eprintln!(
                    "mounted {image} at {} ({layers} layers; Ctrl-C unmounts)",
                    request.dir.display()
                ),
                Reply::Error { message } => {
                    inner.fatal = Some(anyhow::anyhow!(message));
                    daemon.stop_accepting(&mut inner);
                }
                other => tracing::warn!(?other, "unexpected mount reply"),
            }
        });
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: unmounting everything"); break }
            _ = interrupt.recv() => { tracing::info!("SIGINT: unmounting everything"); break }
            _ = daemon.retired.notified() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let mut inner = lock(&daemon.inner);
                    if inner.accepting {
                        inner.connections += 1;
                        tokio::spawn(daemon.clone().handle_connection(stream));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tick.tick() => daemon.tick().await,
        }
    }
    {
        let mut inner = lock(&daemon.inner);
        daemon.stop_accepting(&mut inner);
    }
    drop(listener);
    daemon.finish().await;
    let fatal = lock(&daemon.inner).fatal.take();
    match fatal {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Opens the cache, waiting a little for a daemon that is exiting to release it.
async fn open_cache(
    cache_dir: &Path,
    cache_limit: u64,
    socket: &Path,
) -> anyhow::Result<Arc<ChunkCache>> {
    let started = Instant::now();
    loop {
        // `serve`'s defaults (memory tier, disk watermarks) with this cache dir and bound.
        let mut config = lazysnap::config::Config::default();
        config.cache.dir = cache_dir.to_path_buf();
        config.cache.max_bytes = cache_limit;
        let options = lazysnap::daemon::cache_options(&config);
        match tokio::task::spawn_blocking(move || ChunkCache::open(options)).await? {
            Ok(cache) => return Ok(cache),
            Err(CacheError::Locked { .. }) if started.elapsed() < CACHE_LOCK_WAIT => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e @ CacheError::Locked { .. }) => {
                return Err(e).with_context(|| {
                    format!(
                        "the mount daemon cannot own {}: its lock is held by a process that does \
                         not answer on {} (a `lazysnap serve`?); stop that process or mount with \
                         another --cache-dir",
                        cache_dir.display(),
                        socket.display()
                    )
                })
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("opening the cache at {}", cache_dir.display()))
            }
        }
    }
}

/// Listens on `socket`, readable and writable by root only.
fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    use nix::sys::stat::{umask, Mode};
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(socket) {
        Ok(()) => tracing::info!(socket = %socket.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("removing the stale socket {}", socket.display()))
        }
    }
    // Created 0600 from the start: nobody else may connect between bind and chmod.
    let previous = umask(Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(socket);
    umask(previous);
    let listener = listener.with_context(|| {
        format!(
            "listening on {} (a socket path must be under 108 bytes: use a shorter --cache-dir)",
            socket.display()
        )
    })?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", socket.display()))?;
    Ok(listener)
}

impl Daemon {
    /// Stops listening: removes the socket so the next `lazysnap mount` starts a new daemon.
    fn stop_accepting(&self, inner: &mut Inner) {
        if inner.accepting {
            inner.accepting = false;
            if let Err(e) = std::fs::remove_file(&self.socket) {
                tracing::warn!(socket = %self.socket.display(), error = %e, "removing the socket");
            }
            self.retired.notify_one();
        }
    }

    /// Retires when nothing is mounted or being mounted and no client but `own` connections is
    /// connected. True when it did.
    fn retire_if_idle(&self, inner: &mut Inner, own: usize) -> bool {
        if inner.accepting
            && inner.mounts.is_empty()
            && inner.mounting.is_empty()
            && inner.connections <= own
        {
            tracing::info!("no mount left: exiting");
            self.stop_accepting(inner);
            return true;
        }
        false
    }

    async fn handle_connection(self: Arc<Self>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        loop {
            let mut line = String::new();
            let reply = match (&mut reader).take(MAX_REQUEST).read_line(&mut line).await {
                Ok(0) => break,
                Ok(_) if !line.ends_with('\n') => Reply::Error {
                    message: format!("request longer than {MAX_REQUEST} bytes or cut short"),
                },
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(request) => self.handle(request).await,
                    Err(e) => Reply::Error {
                        message: format!("unreadable request to the mount daemon: {e}"),
                    },
                },
                Err(e) => {
                    tracing::debug!(error = %e, "reading a request");
                    break;
                }
            };
            let closing = matches!(reply, Reply::Error { .. }) && !line.ends_with('\n');
            let mut text = serde_json::to_string(&reply).unwrap_or_else(|e| {
                format!(r#"{{"reply":"error","message":"encoding the reply: {e}"}}"#)
            });
            text.push('\n');
            if write.write_all(text.as_bytes()).await.is_err() || closing {
                break;
            }
        }
        let mut inner = lock(&self.inner);
        inner.connections -= 1;
        inner.idle_since = Instant::now();
        self.retire_if_idle(&mut inner, 0);
    }

    async fn handle(&self, request: Request) -> Reply {
        match request {
            Request::Hello => {
                let inner = lock(&self.inner);
                Reply::Hello {
                    pid: std::process::id(),
                    cache_dir: self.cache_dir.clone(),
                    cache_limit: self.cache_limit,
                    mounts: inner.mounts.len(),
                }
            }
            Request::Mount(request) => self.mount(request).await,
            Request::Umount { dir } => self.umount(&dir).await,
        }
    }

    async fn mount(&self, request: MountRequest) -> Reply {
        let dir = request.dir.clone();
        {
            let mut inner = lock(&self.inner);
            if inner.mounts.contains_key(&dir) || inner.mounting.contains(&dir) {
                return Reply::Error {
                    message: format!(
                        "{} is already mounted by lazysnap (pid {}): `lazysnap umount {}` first",
                        dir.display(),
                        std::process::id(),
                        dir.display()
                    ),
                };
            }
            inner.mounting.insert(dir.clone());
        }
        let result = mount_image(&self.cache, &self.cache_dir, &request).await;
        let mounted = match result {
            Ok(mounted) => mounted,
            Err(error) => {
                lock(&self.inner).mounting.remove(&dir);
                tracing::warn!(image = %request.image, dir = %dir.display(), error = format!("{error:#}"), "mount failed");
                return Reply::Error {
                    message: format!("{error:#}"),
                };
            }
        };
        tracing::info!(image = %request.image, dir = %dir.display(), "mounted");
        let state = self.state_of(&mounted);
        if let Err(error) = write_state(&mounted.state_path, &state) {
            lock(&self.inner).mounting.remove(&dir);
            mounted.teardown(true).await;
            return Reply::Error {
                message: format!("{error:#}"),
            };
        }
        let reply = Reply::Mounted {
            image: mounted.image.clone(),
            layers: mounted.lower_dirs.len(),
        };
        let mut inner = lock(&self.inner);
        inner.mounting.remove(&dir);
        inner.mounts.insert(dir, mounted);
        reply
    }

    async fn umount(&self, dir: &Path) -> Reply {
        let taken = lock(&self.inner).mounts.remove(dir);
        let Some(mounted) = taken else {
            return Reply::Error {
                message: format!(
                    "{} is not mounted by the mount daemon (pid {}) of {}: it was unmounted \
                     already (by someone else?); its state file is stale and can be removed",
                    dir.display(),
                    std::process::id(),
                    self.cache_dir.display()
                ),
            };
        };
        if layer::is_mountpoint(dir) {
            let unmounted = nix::mount::umount2(dir, nix::mount::MntFlags::empty())
                .or_else(|_| nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH));
            if let Err(e) = unmounted {
                lock(&self.inner).mounts.insert(dir.to_path_buf(), mounted);
                return Reply::Error {
                    message: format!("unmounting {}: {e}", dir.display()),
                };
            }
        }
        mounted.teardown(false).await;
        tracing::info!(dir = %dir.display(), "unmounted");
        let mut inner = lock(&self.inner);
        Reply::Unmounted {
            daemon_exiting: self.retire_if_idle(&mut inner, 1),
        }
    }

    /// Once a second: drops mounts whose directory was unmounted by someone else and refreshes
    /// the state files.
    async fn tick(&self) {
        let gone: Vec<ImageMount> = {
            let mut inner = lock(&self.inner);
            let dirs: Vec<PathBuf> = inner
                .mounts
                .keys()
                .filter(|dir| !layer::is_mountpoint(dir))
                .cloned()
                .collect();
            dirs.iter()
                .filter_map(|dir| inner.mounts.remove(dir))
                .collect()
        };
        let any_gone = !gone.is_empty();
        for mounted in gone {
            tracing::info!(dir = %mounted.dir.display(), "unmounted externally; releasing its layers");
            mounted.teardown(false).await;
        }
        // Written under the lock: a mount taken out of the map (and its state file removed)
        // must not have its file written again afterwards.
        let mut inner = lock(&self.inner);
        for mounted in inner.mounts.values() {
            if let Err(e) = write_state(&mounted.state_path, &self.state_of(mounted)) {
                tracing::warn!(path = %mounted.state_path.display(), error = %e, "writing a state file");
            }
        }
        if any_gone || inner.idle_since.elapsed() > IDLE_GRACE {
            self.retire_if_idle(&mut inner, 0);
        }
    }

    /// After the main loop: lets clients read their last replies and mounts in progress end
    /// (bounded), then unmounts whatever is still mounted.
    async fn finish(&self) {
        let started = Instant::now();
        while started.elapsed() < DRAIN_WAIT {
            {
                let inner = lock(&self.inner);
                if inner.connections == 0 && inner.mounting.is_empty() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all: Vec<ImageMount> = std::mem::take(&mut lock(&self.inner).mounts)
            .into_values()
            .collect();
        for mounted in all {
            mounted.teardown(true).await;
        }
    }

    fn state_of(&self, mounted: &ImageMount) -> MountState {
        MountState {
            pid: std::process::id(),
            image: mounted.image.clone(),
            dir: mounted.dir.clone(),
            socket: Some(self.socket.clone()),
            layers: mounted.layer_states(),
            cache_bytes: self.cache.stats().disk_bytes,
            cache_limit: self.cache_limit,
        }
    }
}
