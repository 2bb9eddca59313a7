//! Mounting: opens /dev/fuse, mounts it read-only with mount(2) (we run as root; no fusermount),
//! runs a multi-threaded fuser session in the background, and unmounts on [`MountHandle`] drop
//! (lazily when the mount is busy).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, Session, SessionACL};

use crate::fs::{Counters, FsConfig, FsStats, LayerFs, OpObserver, OpenObserver};
use crate::handles::{OpenRecord, OpenTable};
use crate::resume::Relay;
use crate::{ContentSource, Index};

/// How long `unmount` waits for the session threads to stop after a successful unmount before
/// leaving them to finish on their own (e.g. an overlayfs mount still uses the layer).
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// Options of one layer mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Shown as the mount source in /proc/mounts.
    pub fs_name: String,
    /// Let every user (not only root) access the mount; needed for containers.
    pub allow_other: bool,
    /// How long the kernel caches name lookups, negative ones included.
    pub entry_timeout: Duration,
    /// How long the kernel caches attributes.
    pub attr_timeout: Duration,
    /// Use FUSE passthrough for files the source has entirely on disk (falls back to reads
    /// through the daemon when the kernel refuses).
    pub passthrough: bool,
    /// Report opaque directories as `user.overlay.opaque` (overlayfs `userxattr`) instead of
    /// `trusted.overlay.opaque`.
    pub userxattr: bool,
    /// Number of threads reading FUSE requests (reads never block them).
    pub threads: usize,
    /// Kernel readahead for the mount in KiB (its bdi `read_ahead_kb`): sequential reads arrive
    /// as requests of up to 1 MiB, with this much in flight at once (4 MiB by default, which
    /// keeps the daemon's threads and the cache's disk reads busy). None keeps the default.
    pub read_ahead_kb: Option<u32>,
    /// Called with every operation's duration (e.g. to feed a latency histogram).
    pub observer: Option<OpObserver>,
    /// Called with the content id of every regular file opened (access recording).
    pub open_observer: Option<OpenObserver>,
    /// A file mirroring which inodes are open and how, so that a daemon resuming this mount
    /// after a restart ([`resume`](crate::resume)) keeps the kernel's open files consistent.
    pub open_record: Option<PathBuf>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            fs_name: "lazysnap".to_string(),
            allow_other: true,
            entry_timeout: Duration::from_secs(24 * 3600),
            attr_timeout: Duration::from_secs(24 * 3600),
            passthrough: true,
            userxattr: false,
            threads: 4,
            read_ahead_kb: Some(4096),
            observer: None,
            open_observer: None,
            open_record: None,
        }
    }
}

/// Why mounting or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("mountpoint {path}: {source} (it must be an existing directory)")]
    Mountpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open /dev/fuse: {0} (load the fuse module and run as root)")]
    Device(std::io::Error),
    #[error("mount(2) of FUSE at {path} failed: {source} (mounting needs root / CAP_SYS_ADMIN)")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("FUSE session at {path} failed: {source}")]
    Session {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot resume the FUSE connection of {path}: {detail} (detach it and mount again)")]
    Resume { path: PathBuf, detail: String },
    #[error("unmount of {path} failed: {source}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A mounted layer. Dropping it unmounts (lazily if busy); [`MountHandle::unmount`] reports errors.
#[derive(Debug)]
pub struct MountHandle {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    counters: Arc<Counters>,
    passthrough_live: Arc<AtomicBool>,
    /// Device number of the mounted filesystem and a duplicate of its /dev/fuse descriptor
    /// (which reports POLLERR once the filesystem is gone): together they tell whether the
    /// mount point still holds this layer, so a later mount at the same path (which may even
    /// reuse the device number) is never unmounted by this handle.
    dev: Option<u64>,
    connection: Arc<OwnedFd>,
    /// For a resumed connection: the threads relaying it to the session.
    relay: Option<Relay>,
}

/// Mounts `index` at `mountpoint`, serving file contents from `source`.
pub fn mount(
    index: Index,
    source: Arc<dyn ContentSource>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<MountHandle, FuseError> {
    let span = tracing::info_span!("fuse_mount", mountpoint = %mountpoint.display(), inodes = index.inode_count());
    let _enter = span.enter();
    let mountpoint = mountpoint
        .canonicalize()
        .and_then(|p| {
            if p.is_dir() {
                Ok(p)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    "not a directory",
                ))
            }
        })
        .map_err(|source| FuseError::Mountpoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;

    keep_request_buffers_lazy();
    let device: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(FuseError::Device)?
        .into();

    mount_syscall(&device, &mountpoint, opts).map_err(|source| FuseError::Mount {
        path: mountpoint.clone(),
        source,
    })?;

    let connection = match device.try_clone() {
        Ok(connection) => Arc::new(connection),
        Err(source) => {
            let _ = detach(&mountpoint);
            return Err(FuseError::Session {
                path: mountpoint,
                source,
            });
        }
    };
    let record = match &opts.open_record {
        Some(path) => match OpenRecord::create(path, index.inode_count() as u64) {
            Ok(record) => Some(record),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot keep the open-file record; a daemon resuming this mount will not know its open files");
                None
            }
        },
        None => None,
    };
    let table = OpenTable::new(record, Some(&connection));
    let started = start_session(
        index,
        source,
        mountpoint.clone(),
        opts,
        table,
        device,
        connection,
        None,
    );
    if started.is_err() {
        let _ = detach(&mountpoint);
    }
    started
}

/// Serves `index` on a FUSE connection: `session_fd` is what fuser reads requests from (the
/// connection itself, or the relay of a resumed one), `connection` the /dev/fuse descriptor.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_session(
    index: Index,
    source: Arc<dyn ContentSource>,
    mountpoint: PathBuf,
    opts: &MountOptions,
    table: OpenTable,
    session_fd: OwnedFd,
    connection: Arc<OwnedFd>,
    relay: Option<Relay>,
) -> Result<MountHandle, FuseError> {
    let counters = Arc::new(Counters::default());
    let passthrough_live = Arc::new(AtomicBool::new(false));
    let fs = LayerFs::new(
        index,
        source,
        FsConfig {
            entry_ttl: opts.entry_timeout,
            attr_ttl: opts.attr_timeout,
            passthrough: opts.passthrough,
            userxattr: opts.userxattr,
            observer: opts.observer.clone(),
            open_observer: opts.open_observer.clone(),
        },
        Arc::clone(&counters),
        Arc::clone(&passthrough_live),
        table,
        Arc::clone(&connection),
    );
    let mut config = Config::default();
    config.n_threads = Some(opts.threads.max(1));
    let acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.acl = acl;

    let session = Session::from_fd(fs, session_fd, acl, config)
        .and_then(|session| {
            // A resumed connection's relay starts once fuser has answered the synthetic INIT.
            if let Some(relay) = &relay {
                relay.start()?;
            }
            Session::spawn(session)
        })
        .map_err(|source| FuseError::Session {
            path: mountpoint.clone(),
            source,
        })?;
    let dev = std::fs::metadata(&mountpoint).map(|m| m.dev()).ok();
    if relay.is_none() {
        if let (Some(kb), Some(dev)) = (opts.read_ahead_kb, dev) {
            if let Err(err) = set_read_ahead(dev, kb) {
                tracing::warn!(error = %err, "could not raise the mount's readahead; sequential reads use the kernel default");
            }
        }
    }
    tracing::info!(
        passthrough = passthrough_live.load(Ordering::Relaxed),
        resumed = relay.is_some(),
        "layer mounted"
    );
    Ok(MountHandle {
        session: Some(session),
        mountpoint,
        counters,
        passthrough_live,
        dev,
        connection,
        relay,
    })
}

impl MountHandle {
    /// Where the layer is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The mount's /dev/fuse connection, for a holder that keeps it open across restarts of the
    /// daemon ([`resume`](crate::resume) serves it again).
    pub fn connection(&self) -> BorrowedFd<'_> {
        self.connection.as_fd()
    }

    /// Device number of the mounted filesystem (tells a later daemon that the mount point still
    /// holds this connection).
    pub fn device_number(&self) -> Option<u64> {
        self.dev
    }

    /// Leaves the layer mounted when the handle goes: the daemon is exiting and another one
    /// resumes the connection, which a holder keeps open meanwhile.
    pub fn leave_mounted(mut self) {
        // Without a session, dropping the handle unmounts nothing; the session's and the
        // relay's threads serve on until the process exits.
        self.session.take();
    }

    /// Operation counts so far.
    pub fn stats(&self) -> FsStats {
        self.counters
            .snapshot(self.passthrough_live.load(Ordering::Relaxed))
    }

    /// Unmounts; when the mount is busy it is detached (lazy unmount) and disappears once its last
    /// user is gone.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), FuseError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let _span =
            tracing::info_span!("fuse_unmount", mountpoint = %self.mountpoint.display()).entered();
        let path = CString::new(self.mountpoint.as_os_str().as_bytes()).map_err(|e| {
            FuseError::Unmount {
                path: self.mountpoint.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            }
        })?;
        let alive = connection_alive(&self.connection);
        let still_ours = alive
            && match (self.dev, std::fs::metadata(&self.mountpoint)) {
                (Some(dev), Ok(meta)) => meta.dev() == dev,
                // Unknown device, or the mount point cannot be stat'ed: try anyway.
                _ => true,
            };
        // SAFETY: `path` is a valid NUL-terminated string.
        let rc = if still_ours {
            unsafe { libc::umount2(path.as_ptr(), 0) }
        } else {
            0
        };
        if !still_ours {
            tracing::info!("mount point no longer holds this layer (already unmounted)");
        }
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EBUSY) => {
                    tracing::warn!("mount busy; detaching it (lazy unmount)");
                    detach(&self.mountpoint).map_err(|source| FuseError::Unmount {
                        path: self.mountpoint.clone(),
                        source,
                    })?;
                    // The session keeps serving the remaining users and ends with the last one.
                    return Ok(());
                }
                // Already unmounted by someone else.
                Some(libc::EINVAL) | Some(libc::ENOENT) => {}
                _ => {
                    return Err(FuseError::Unmount {
                        path: self.mountpoint.clone(),
                        source: err,
                    })
                }
            }
        }
        let deadline = Instant::now() + JOIN_WAIT;
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if session.guard.is_finished() {
            // A relayed session ends when its relay closes: that is no error.
            if let (Err(err), None) = (session.join(), &self.relay) {
                tracing::warn!(error = %err, "FUSE session ended with an error");
            }
        } else {
            tracing::warn!("FUSE session still serving after unmount (layer still used, e.g. by overlayfs); leaving it running");
        }
        Ok(())
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(err) = self.unmount_inner() {
            tracing::error!(error = %err, "unmount on drop failed");
        }
    }
}

/// fuser gives every session thread a 16 MiB request buffer (`calloc`). glibc's dynamic mmap
/// threshold rises to that size after the first such buffer is freed, after which new buffers
/// come from the heap and are zeroed page by page: 16 MiB resident per thread instead of the few
/// KiB requests touch. A fixed threshold of 8 MiB keeps them mmap-backed (lazily zero), which
/// measured ~16 MiB less RSS per mount; smaller allocations are unaffected.
pub(crate) fn keep_request_buffers_lazy() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tuning; M_MMAP_THRESHOLD accepts this value.
            if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20) } != 1 {
                tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused");
            }
        });
    }
}

/// Sets `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb` of the filesystem with device number `dev`.
fn set_read_ahead(dev: u64, kb: u32) -> std::io::Result<()> {
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::write(&bdi, kb.to_string())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{bdi}: {e}")))
}

/// Whether the FUSE connection behind `device` still exists (the filesystem is not gone).
pub(crate) fn connection_alive(device: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: device.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return !(rc > 0 && pfd.revents & libc::POLLERR != 0);
    }
}

/// Lazily unmounts whatever is mounted at `mountpoint` (e.g. a layer left behind by a daemon
/// that crashed: its accesses fail with ENOTCONN). Returns false when nothing was mounted there.
pub fn detach_stale_mount(mountpoint: &Path) -> Result<bool, FuseError> {
    let _span =
        tracing::info_span!("fuse_detach_stale", mountpoint = %mountpoint.display()).entered();
    match detach(mountpoint) {
        Ok(()) => Ok(true),
        Err(err) if matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => {
            Ok(false)
        }
        Err(source) => Err(FuseError::Unmount {
            path: mountpoint.to_path_buf(),
            source,
        }),
    }
}

fn detach(mountpoint: &Path) -> std::io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn mount_syscall(device: &OwnedFd, mountpoint: &Path, opts: &MountOptions) -> std::io::Result<()> {
    let invalid = |e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let mut data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
        device.as_raw_fd(),
        // SAFETY: getuid/getgid cannot fail.
        unsafe { libc::getuid() },
        unsafe { libc::getgid() },
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let source = CString::new(opts.fs_name.as_str()).map_err(invalid)?;
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(invalid)?;
    let fstype = CString::new("fuse.lazysnap").map_err(invalid)?;
    let data = CString::new(data).map_err(invalid)?;
    let flags = libc::MS_RDONLY | libc::MS_NOATIME;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
