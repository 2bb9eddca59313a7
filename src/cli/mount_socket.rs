//! The mount daemon's socket seen from the command line: where it lives in the cache directory,
//! the JSON-lines requests and replies, and the client side that finds the live daemon of a cache
//! directory or starts one (one at a time, under a lock file).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lazysnap::config::Config;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// The daemon's socket, in the cache directory it owns.
pub const SOCKET_NAME: &str = "mount.sock";
/// Held by whoever is checking for a live daemon or starting one, so only one starts.
const STARTER_LOCK_NAME: &str = "mount.lock";
/// Where a detached daemon logs (truncated when a daemon starts).
pub const LOG_NAME: &str = "mount-daemon.log";

/// How long a live daemon has to answer `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a fresh daemon has to open the cache and listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the starter lock is waited for (another client starting the daemon).
const STARTER_LOCK_TIMEOUT: Duration = Duration::from_secs(120);

/// `<cache_dir>/mount.sock`.
pub fn socket_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(SOCKET_NAME)
}

/// `<cache_dir>/mount-daemon.log`.
pub fn log_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(LOG_NAME)
}

/// One request, one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Who are you? Answered with [`Reply::Hello`].
    Hello,
    /// Mount an image; answered with [`Reply::Mounted`] or [`Reply::Error`].
    Mount(MountRequest),
    /// Unmount one directory; answered with [`Reply::Unmounted`] or [`Reply::Error`].
    Umount { dir: PathBuf },
}

/// The per-mount options of `lazysnap mount`; cache-wide ones belong to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRequest {
    pub image: String,
    /// Canonical path of the directory to mount at.
    pub dir: PathBuf,
    /// Where the mount's state file goes.
    pub state_dir: PathBuf,
    pub platform: Option<String>,
    pub plain_http: bool,
    pub hosts_dir: Option<PathBuf>,
    pub no_prefetch: bool,
    /// No background fill (prefetch and reads only).
    #[serde(default)]
    pub no_background: bool,
    /// Never serve reads by FUSE passthrough.
    #[serde(default)]
    pub no_passthrough: bool,
    /// Seconds.
    pub read_deadline: u64,
}

impl MountRequest {
    /// The daemon configuration these flags stand for (the rest is `serve`'s defaults).
    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.registry.config_path = self.hosts_dir.clone().unwrap_or_default();
        config.registry.plain_http = self.plain_http;
        config.fetch.read_deadline_secs = self.read_deadline;
        config.fetch.prefetch = !self.no_prefetch;
        config.fetch.background_fill = !self.no_prefetch && !self.no_background;
        config.fetch.readahead = !self.no_prefetch;
        config.fetch.library_prefetch = !self.no_prefetch;
        config.fetch.passthrough = !self.no_passthrough;
        // The startup prefetch is the snapshotter's: it knows the image's TOCs at once.
        config.fetch.startup_prefetch = false;
        config
    }
}

/// One reply, one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        pid: u32,
        cache_dir: PathBuf,
        /// The daemon's cache size bound, which every mount it hosts shares.
        cache_limit: u64,
        mounts: usize,
    },
    Mounted {
        image: String,
        layers: usize,
    },
    Unmounted {
        /// The last mount is gone: the daemon stopped listening and is exiting.
        daemon_exiting: bool,
    },
    Error {
        message: String,
    },
}

/// A connection to a live daemon that answered `hello`.
pub struct DaemonConnection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    socket: PathBuf,
    pub pid: u32,
    pub cache_limit: u64,
}

impl DaemonConnection {
    /// Connects to the daemon on `socket` and says hello. `None` when nobody listens there (no
    /// socket, a stale one left by a killed daemon, or a daemon that is exiting); an error when a
    /// process accepts but does not answer.
    pub fn connect(socket: &Path) -> anyhow::Result<Option<DaemonConnection>> {
        let stream = match UnixStream::connect(socket) {
            Ok(stream) => stream,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                return Ok(None)
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("connecting to the mount daemon on {}", socket.display())
                })
            }
        };
        let writer = stream
            .try_clone()
            .context("duplicating the mount daemon connection")?;
        let mut connection = DaemonConnection {
            reader: BufReader::new(stream),
            writer,
            socket: socket.to_path_buf(),
            pid: 0,
            cache_limit: 0,
        };
        match connection.exchange(&Request::Hello, HELLO_TIMEOUT) {
            Ok(Some(Reply::Hello {
                pid, cache_limit, ..
            })) => {
                connection.pid = pid;
                connection.cache_limit = cache_limit;
                Ok(Some(connection))
            }
            // Closed without a word: the daemon stopped accepting (it is exiting).
            Ok(None) => Ok(None),
            Ok(Some(other)) => bail!(
                "the process on {} answered hello with {other:?}: not a lazysnap mount daemon of this version",
                socket.display()
            ),
            Err(e) if is_timeout(&e) => {
                let pid = peer_pid(&connection.writer)
                    .map_or_else(|| "?".to_string(), |pid| pid.to_string());
                bail!(
                    "the mount daemon (pid {pid}) on {} accepts but does not answer within {} s; \
                     `kill {pid}` stops it (unmounting its images), then retry",
                    socket.display(),
                    HELLO_TIMEOUT.as_secs()
                )
            }
            Err(e) => Err(e).with_context(|| format!("talking to the mount daemon on {}", socket.display())),
        }
    }

    /// Sends `request` and waits up to `timeout` for the reply.
    pub fn request(&mut self, request: &Request, timeout: Duration) -> anyhow::Result<Reply> {
        match self.exchange(request, timeout) {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => bail!(
                "the mount daemon (pid {}) closed the connection without answering; see {}",
                self.pid,
                self.log_hint()
            ),
            Err(e) if is_timeout(&e) => bail!(
                "the mount daemon (pid {}) did not answer within {} s; see {}",
                self.pid,
                timeout.as_secs(),
                self.log_hint()
            ),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "talking to the mount daemon (pid {}) on {}",
                    self.pid,
                    self.socket.display()
                )
            }),
        }
    }

    fn log_hint(&self) -> String {
        self.socket.parent().map_or_else(
            || LOG_NAME.to_string(),
            |dir| log_path(dir).display().to_string(),
        )
    }

    /// Writes one line and reads one; `Ok(None)` on end of stream.
    fn exchange(&mut self, request: &Request, timeout: Duration) -> std::io::Result<Option<Reply>> {
        let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
        line.push('\n');
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            // A daemon that closed its end before reading is one that is going away.
            if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
                return Ok(None);
            }
            return Err(e);
        }
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(0) => Ok(None),
            Ok(_) => serde_json::from_str(&answer).map(Some).map_err(|e| {
                std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("unreadable reply {:?}: {e}", answer.trim_end()),
                )
            }),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn peer_pid(stream: &UnixStream) -> Option<i32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|credentials| credentials.pid())
}

/// The lock that makes "is a daemon live? if not, start one" atomic across `lazysnap mount`
/// processes. Released on drop.
pub struct StarterLock {
    _lock: Flock<std::fs::File>,
}

impl StarterLock {
    /// Waits (bounded) for `<cache_dir>/mount.lock`.
    pub fn acquire(cache_dir: &Path) -> anyhow::Result<StarterLock> {
        let path = cache_dir.join(STARTER_LOCK_NAME);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let started = Instant::now();
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(StarterLock { _lock: lock }),
                Err((returned, nix::errno::Errno::EWOULDBLOCK)) => file = returned,
                Err((_, errno)) => {
                    return Err(errno).with_context(|| format!("locking {}", path.display()))
                }
            }
            if started.elapsed() > STARTER_LOCK_TIMEOUT {
                bail!(
                    "{} stayed locked for {} s by another `lazysnap mount` starting the mount daemon; \
                     find it with `fuser {}` and retry when it is done",
                    path.display(),
                    STARTER_LOCK_TIMEOUT.as_secs(),
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Takes the starter lock of `cache_dir` and returns the live daemon's connection, or `None`
/// with the lock still held (and any stale socket removed) so the caller can become the daemon.
pub fn live_daemon_or_lock(
    cache_dir: &Path,
) -> anyhow::Result<Result<DaemonConnection, StarterLock>> {
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating the cache directory {}", cache_dir.display()))?;
    let lock = StarterLock::acquire(cache_dir)?;
    let socket = socket_path(cache_dir);
    if let Some(connection) = DaemonConnection::connect(&socket)? {
        return Ok(Ok(connection));
    }
    remove_stale_socket(&socket)?;
    Ok(Err(lock))
}

/// Removes a socket file nobody listens on (left by a daemon killed with SIGKILL).
fn remove_stale_socket(socket: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => {
            tracing::info!(socket = %socket.display(), "removed a stale mount daemon socket");
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the stale socket {}", socket.display())),
    }
}

/// Connects to the daemon of `cache_dir`, starting a detached one (with `cache_size` as its
/// bound) when none answers. Two concurrent callers start one daemon between them.
pub fn connect_or_start(cache_dir: &Path, cache_size: u64) -> anyhow::Result<DaemonConnection> {
    let lock = match live_daemon_or_lock(cache_dir)? {
        Ok(connection) => return Ok(connection),
        Err(lock) => lock,
    };
    let socket = socket_path(cache_dir);
    let log = log_path(cache_dir);
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let exe = std::env::current_exe().context("finding the lazysnap executable")?;
    let mut child = Command::new(exe)
        .arg("mount-daemon")
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--cache-size")
        .arg(cache_size.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .context("starting the mount daemon")?;
    let started = Instant::now();
    loop {
        if let Some(connection) = DaemonConnection::connect(&socket)? {
            drop(lock);
            return Ok(connection);
        }
        if let Some(status) = child.try_wait().context("watching the mount daemon")? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "the mount daemon exited with {status} before listening on {}:\n{}",
                socket.display(),
                text.trim_end()
            );
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "the mount daemon (pid {}) is not listening on {} after {} s; see {}",
                child.id(),
                socket.display(),
                START_TIMEOUT.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> MountRequest {
        MountRequest {
            image: "127.0.0.1:5000/app:1".into(),
            dir: "/mnt/app".into(),
            state_dir: "/run/lazysnap-mounts".into(),
            platform: None,
            plain_http: true,
            hosts_dir: None,
            no_prefetch: false,
            no_background: false,
            no_passthrough: false,
            read_deadline: 12,
        }
    }

    #[test]
    fn mount_flags_become_serve_defaults_with_their_overrides() {
        let config = request().config();
        let defaults = Config::default();
        assert_eq!(config.cache, defaults.cache);
        assert!(config.registry.config_path.as_os_str().is_empty());
        assert!(config.registry.plain_http);
        assert_eq!(config.fetch.read_deadline_secs, 12);
        assert!(config.fetch.prefetch && config.fetch.background_fill);
        assert!(config.fetch.readahead && config.fetch.library_prefetch);
        assert!(config.fetch.passthrough);
        assert!(
            !config.fetch.startup_prefetch,
            "the snapshotter's, not a mount's"
        );
        assert_eq!(
            config.fetch.background_concurrency,
            defaults.fetch.background_concurrency
        );

        let config = MountRequest {
            no_background: true,
            no_passthrough: true,
            hosts_dir: Some("/etc/containerd/certs.d".into()),
            ..request()
        }
        .config();
        assert!(config.fetch.prefetch && !config.fetch.background_fill);
        assert!(!config.fetch.passthrough);
        assert_eq!(
            config.registry.config_path,
            Path::new("/etc/containerd/certs.d")
        );

        let config = MountRequest {
            no_prefetch: true,
            ..request()
        }
        .config();
        assert!(!config.fetch.prefetch && !config.fetch.background_fill);
        assert!(!config.fetch.readahead && !config.fetch.library_prefetch);
    }
}
