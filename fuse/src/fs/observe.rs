//! What the filesystem tells its owner: operation counters and their snapshot, and the observers
//! of opens and of each operation's duration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ContentId;

/// Operation counters shared between the filesystem and its [`crate::MountHandle`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) lookups: AtomicU64,
    pub(crate) getattrs: AtomicU64,
    pub(crate) readdirs: AtomicU64,
    pub(crate) opens: AtomicU64,
    pub(crate) passthrough_opens: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) read_errors: AtomicU64,
    pub(crate) reads_in_flight: AtomicU64,
    pub(crate) xattr_ops: AtomicU64,
}

/// A snapshot of a mount's operation counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    pub lookups: u64,
    pub getattrs: u64,
    pub readdirs: u64,
    /// Opens of regular files (passthrough ones included).
    pub opens: u64,
    /// Opens served by FUSE passthrough (reads bypass the daemon).
    pub passthrough_opens: u64,
    /// Read requests handed to the content source.
    pub reads: u64,
    /// Bytes returned by those reads.
    pub read_bytes: u64,
    /// Reads answered with an error.
    pub read_errors: u64,
    /// Reads handed to the source and not answered yet.
    pub reads_in_flight: u64,
    pub xattr_ops: u64,
    /// Whether passthrough was negotiated with the kernel and not refused since.
    pub passthrough_active: bool,
}

impl Counters {
    pub(crate) fn snapshot(&self, passthrough_active: bool) -> FsStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FsStats {
            lookups: get(&self.lookups),
            getattrs: get(&self.getattrs),
            readdirs: get(&self.readdirs),
            opens: get(&self.opens),
            passthrough_opens: get(&self.passthrough_opens),
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            read_errors: get(&self.read_errors),
            reads_in_flight: get(&self.reads_in_flight),
            xattr_ops: get(&self.xattr_ops),
            passthrough_active,
        }
    }
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Called with the [`ContentId`] of every regular file opened through the mount, in order (a
/// recording mount for access-order optimization; the receiver dedups).
#[derive(Clone)]
pub struct OpenObserver(pub Arc<dyn Fn(ContentId) + Send + Sync>);

impl std::fmt::Debug for OpenObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenObserver")
    }
}

/// Receives the duration of every FUSE operation the filesystem answers, by operation name
/// ("lookup", "getattr", "readdir", "open", "read", "getxattr", ...); for reads it is the time
/// until the answer was sent, waiting on the content source included. Wire it to metrics.
#[derive(Clone)]
pub struct OpObserver(pub Arc<dyn Fn(&'static str, Duration) + Send + Sync>);

impl std::fmt::Debug for OpObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpObserver")
    }
}

/// Reports an operation's duration to the observer when dropped.
pub(super) struct OpTimer {
    pub(super) observer: Option<OpObserver>,
    pub(super) op: &'static str,
    pub(super) start: Instant,
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        if let Some(observer) = &self.observer {
            (observer.0)(self.op, self.start.elapsed());
        }
    }
}
