//! `LayerFs`: the fuser `Filesystem` over an [`Index`]. It only translates requests into index
//! queries, hands reads to the [`ContentSource`] (answering from its callback, so no FUSE thread
//! waits for content) and keeps the passthrough handle table.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};

use crate::handles::{OpenMode, OpenTable};
use crate::index::{system_time, Index, Inode, Kind, FLAG_OPAQUE};
use crate::{ContentId, ContentSource};

/// Block size reported in attributes and statfs.
const BLOCK_SIZE: u32 = 4096;
/// Size reported for directories (like a fresh ext4 directory).
const DIR_SIZE: u64 = 4096;
/// xattr that marks an opaque directory for overlayfs (privileged mounts).
pub(crate) const TRUSTED_OPAQUE: &[u8] = b"trusted.overlay.opaque";
/// xattr that marks an opaque directory for overlayfs mounted with `userxattr`.
pub(crate) const USER_OPAQUE: &[u8] = b"user.overlay.opaque";

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

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Settings of one filesystem instance.
#[derive(Clone, Debug)]
pub(crate) struct FsConfig {
    pub(crate) entry_ttl: Duration,
    pub(crate) attr_ttl: Duration,
    pub(crate) passthrough: bool,
    pub(crate) userxattr: bool,
    pub(crate) observer: Option<OpObserver>,
    pub(crate) open_observer: Option<OpenObserver>,
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
struct OpTimer {
    observer: Option<OpObserver>,
    op: &'static str,
    start: Instant,
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        if let Some(observer) = &self.observer {
            (observer.0)(self.op, self.start.elapsed());
        }
    }
}

pub(crate) struct LayerFs {
    index: Index,
    source: Arc<dyn ContentSource>,
    config: FsConfig,
    counters: Arc<Counters>,
    /// Passthrough negotiated and not refused by the kernel since.
    passthrough_live: Arc<AtomicBool>,
    handles: OpenTable,
}

impl LayerFs {
    pub(crate) fn new(
        index: Index,
        source: Arc<dyn ContentSource>,
        config: FsConfig,
        counters: Arc<Counters>,
        passthrough_live: Arc<AtomicBool>,
    ) -> Self {
        LayerFs {
            index,
            source,
            config,
            counters,
            passthrough_live,
            handles: OpenTable::default(),
        }
    }

    fn timer(&self, op: &'static str) -> OpTimer {
        OpTimer {
            observer: self.config.observer.clone(),
            op,
            start: Instant::now(),
        }
    }

    fn opaque_xattr_name(&self) -> &'static [u8] {
        if self.config.userxattr {
            USER_OPAQUE
        } else {
            TRUSTED_OPAQUE
        }
    }

    fn attr(&self, ino: u64, inode: &Inode) -> FileAttr {
        let (kind, size, rdev) = match inode.kind {
            Kind::Dir => (FileType::Directory, DIR_SIZE, 0),
            Kind::Reg => (FileType::RegularFile, inode.size, 0),
            Kind::Symlink => (FileType::Symlink, inode.size, 0),
            Kind::Char => (FileType::CharDevice, 0, inode.data as u32),
            Kind::Block => (FileType::BlockDevice, 0, inode.data as u32),
            Kind::Fifo => (FileType::NamedPipe, 0, 0),
        };
        let time = system_time(inode.mtime);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm: inode.mode,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn file_type(kind: Kind) -> FileType {
        match kind {
            Kind::Dir => FileType::Directory,
            Kind::Reg => FileType::RegularFile,
            Kind::Symlink => FileType::Symlink,
            Kind::Char => FileType::CharDevice,
            Kind::Block => FileType::BlockDevice,
            Kind::Fifo => FileType::NamedPipe,
        }
    }

    /// (inode number, name, kind) of directory position `pos`: 0 is ".", 1 is "..", then children.
    fn dir_entry(&self, ino: u64, dir: &Inode, pos: usize) -> Option<(u64, &[u8])> {
        match pos {
            0 => Some((ino, b".")),
            1 => Some((u64::from(dir.parent), b"..")),
            _ => {
                let d = self.index.children(ino).get(pos - 2)?;
                Some((u64::from(d.ino), self.index.name(d)))
            }
        }
    }

    fn xattr_names(&self, ino: u64, inode: &Inode) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, _) in self.index.xattrs(ino) {
            out.extend_from_slice(name);
            out.push(0);
        }
        if inode.flags & FLAG_OPAQUE != 0 {
            out.extend_from_slice(self.opaque_xattr_name());
            out.push(0);
        }
        out
    }

    fn xattr_value(&self, ino: u64, inode: &Inode, name: &[u8]) -> Option<Vec<u8>> {
        if inode.flags & FLAG_OPAQUE != 0 && name == self.opaque_xattr_name() {
            return Some(b"y".to_vec());
        }
        self.index
            .xattrs(ino)
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_vec())
    }

    /// Opens `ino` through FUSE passthrough if the source has it on disk. Returns the reply back
    /// when passthrough does not apply.
    fn try_open_passthrough(&self, ino: u64, inode: &Inode, reply: ReplyOpen) -> Option<ReplyOpen> {
        let content = inode.data;
        if !self.config.passthrough || !self.passthrough_live.load(Ordering::Relaxed) {
            return Some(reply);
        }
        // An inode already open in cached mode must stay cached until closed (the kernel refuses
        // mixing modes on one inode); one already passthrough reuses its backing id.
        if let Some(backing) = self.handles.reuse_passthrough(ino) {
            bump(&self.counters.passthrough_opens);
            reply.opened_passthrough(
                FileHandle(OpenMode::Passthrough as u64),
                FopenFlags::empty(),
                &backing,
            );
            return None;
        }
        if self.handles.has_cached_opens(ino) {
            return Some(reply);
        }
        let Some(file) = self.source.local_file(content) else {
            return Some(reply);
        };
        // A backing file of another length would serve wrong bytes or a short file.
        match file.metadata() {
            Ok(meta) if meta.is_file() && meta.len() == inode.size => {}
            Ok(meta) => {
                tracing::warn!(ino, content, expected = inode.size, actual = meta.len(), "local file offered for passthrough has the wrong size; reading through the source");
                return Some(reply);
            }
            Err(err) => {
                tracing::warn!(ino, content, error = %err, "cannot stat the local file offered for passthrough");
                return Some(reply);
            }
        }
        let backing = match reply.open_backing(&file) {
            Ok(backing) => Arc::new(backing),
            Err(err) => {
                if self.passthrough_live.swap(false, Ordering::Relaxed) {
                    tracing::warn!(ino, error = %err, "kernel refused a FUSE passthrough backing file; serving reads through the daemon from now on");
                }
                return Some(reply);
            }
        };
        match self.handles.open_passthrough(ino, backing) {
            Some(backing) => {
                bump(&self.counters.passthrough_opens);
                reply.opened_passthrough(
                    FileHandle(OpenMode::Passthrough as u64),
                    FopenFlags::empty(),
                    &backing,
                );
                None
            }
            // A cached open raced in meanwhile: stay cached.
            None => Some(reply),
        }
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_READ;
        let supported = config.capabilities() & wanted;
        if config.add_capabilities(supported).is_err() {
            tracing::debug!("kernel refused optional FUSE capabilities");
        }
        // Many reads may wait on the network at once; let the kernel queue them.
        let _ = config.set_max_background(256);
        let _ = config.set_congestion_threshold(192);
        let mut live = false;
        if self.config.passthrough {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                // Depth 1: backing files on an ordinary filesystem, and room for overlayfs on top.
                Ok(()) => match config.set_max_stack_depth(1) {
                    Ok(_) => live = true,
                    Err(max) => {
                        tracing::warn!(max, "FUSE passthrough unavailable: stack depth refused")
                    }
                },
                Err(_) => tracing::warn!(
                    "kernel does not offer FUSE passthrough; reads go through the daemon"
                ),
            }
        }
        self.passthrough_live.store(live, Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.timer("lookup");
        bump(&self.counters.lookups);
        match self.index.inode(parent.0) {
            Some(dir) if dir.kind == Kind::Dir => {}
            Some(_) => return reply.error(Errno::ENOTDIR),
            None => return reply.error(Errno::ENOENT),
        }
        match self.index.lookup(parent.0, name.as_bytes()) {
            Some(ino) => match self.index.inode(ino) {
                Some(inode) => {
                    let attr = self.attr(ino, inode);
                    reply.entry_with_ttls(
                        &self.config.attr_ttl,
                        &self.config.entry_ttl,
                        &attr,
                        Generation(0),
                    );
                }
                None => reply.error(Errno::EIO),
            },
            None => {
                // The layer never changes: let the kernel cache the negative answer (node id 0).
                let mut attr = self.attr(0, &NEGATIVE_PLACEHOLDER);
                attr.ino = INodeNo(0);
                reply.entry_with_ttls(
                    &Duration::ZERO,
                    &self.config.entry_ttl,
                    &attr,
                    Generation(0),
                );
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.timer("getattr");
        bump(&self.counters.getattrs);
        match self.index.inode(ino.0) {
            Some(inode) => reply.attr(&self.config.attr_ttl, &self.attr(ino.0, inode)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.timer("readlink");
        match self.index.symlink_target(ino.0) {
            Some(target) => reply.data(target),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.timer("open");
        let Some(inode) = self.index.inode(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match inode.kind {
            Kind::Reg => {}
            Kind::Dir => return reply.error(Errno::EISDIR),
            _ => return reply.error(Errno::EACCES),
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        bump(&self.counters.opens);
        if let Some(observer) = &self.config.open_observer {
            (observer.0)(inode.data);
        }
        let Some(reply) = self.try_open_passthrough(ino.0, inode, reply) else {
            return;
        };
        match self.handles.open_cached(ino.0) {
            Some(backing) => {
                bump(&self.counters.passthrough_opens);
                reply.opened_passthrough(
                    FileHandle(OpenMode::Passthrough as u64),
                    FopenFlags::empty(),
                    &backing,
                )
            }
            None => reply.opened(
                FileHandle(OpenMode::Cached as u64),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(inode) = self.index.inode(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if inode.kind != Kind::Reg {
            return reply.error(Errno::EISDIR);
        }
        if offset >= inode.size || size == 0 {
            return reply.data(&[]);
        }
        let len = (inode.size - offset).min(u64::from(size)) as u32;
        bump(&self.counters.reads);
        self.counters
            .reads_in_flight
            .fetch_add(1, Ordering::Relaxed);
        let counters = Arc::clone(&self.counters);
        let timer = self.timer("read");
        let done: crate::ReadDone = Box::new(move |result| {
            let _timer = timer;
            counters.reads_in_flight.fetch_sub(1, Ordering::Relaxed);
            match result {
                // The kernel takes a short read before end of file as a smaller file (and zero
                // fills), so anything but the exact length is an I/O error, never wrong bytes.
                Ok(bytes) if bytes.len() >= len as usize => {
                    counters
                        .read_bytes
                        .fetch_add(u64::from(len), Ordering::Relaxed);
                    reply.data(&bytes[..len as usize]);
                }
                Ok(bytes) => {
                    bump(&counters.read_errors);
                    tracing::warn!(
                        ino = ino.0,
                        offset,
                        wanted = len,
                        got = bytes.len(),
                        "content source returned a short read; answering EIO"
                    );
                    reply.error(Errno::EIO);
                }
                Err(errno) => {
                    bump(&counters.read_errors);
                    let errno = if errno > 0 {
                        Errno::from_i32(errno)
                    } else {
                        Errno::EIO
                    };
                    reply.error(errno);
                }
            }
        });
        let source = &self.source;
        let content = inode.data;
        // A panicking source must not take a FUSE thread down; the dropped reply answers EIO.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            source.read(content, offset, len, done)
        }))
        .is_err()
        {
            tracing::error!(ino = ino.0, offset, "content source panicked during read");
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.release(ino.0, OpenMode::from_handle(fh.0));
        reply.ok();
    }

    /// Nothing to write back on close: the layer is read-only. ENOSYS (the first time; the
    /// close itself still succeeds) makes the kernel stop sending FLUSH on this mount, which
    /// spares every later close a round trip to the daemon.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timer = self.timer("flush");
        reply.error(Errno::ENOSYS);
    }

    /// Nothing to sync: the layer is read-only. As with flush, ENOSYS turns FSYNC off for the
    /// mount while fsync(2) itself succeeds.
    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.timer("fsync");
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.timer("opendir");
        match self.index.inode(ino.0) {
            Some(inode) if inode.kind == Kind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = self.timer("readdir");
        bump(&self.counters.readdirs);
        let Some(dir) = self.index.inode(ino.0).filter(|d| d.kind == Kind::Dir) else {
            return reply.error(Errno::ENOTDIR);
        };
        let mut pos = usize::try_from(offset).unwrap_or(usize::MAX);
        while let Some((child, name)) = self.dir_entry(ino.0, dir, pos) {
            let kind = self
                .index
                .inode(child)
                .map_or(FileType::RegularFile, |i| Self::file_type(i.kind));
            if reply.add(
                INodeNo(child),
                pos as u64 + 1,
                kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
            pos += 1;
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timer = self.timer("readdirplus");
        bump(&self.counters.readdirs);
        let Some(dir) = self.index.inode(ino.0).filter(|d| d.kind == Kind::Dir) else {
            return reply.error(Errno::ENOTDIR);
        };
        let mut pos = usize::try_from(offset).unwrap_or(usize::MAX);
        while let Some((child, name)) = self.dir_entry(ino.0, dir, pos) {
            let Some(inode) = self.index.inode(child) else {
                break;
            };
            let attr = self.attr(child, inode);
            if reply.add(
                INodeNo(child),
                pos as u64 + 1,
                OsStr::from_bytes(name),
                &self.config.entry_ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
            pos += 1;
        }
        reply.ok();
    }

    /// No ioctls: ENOTTY, the answer for "not a terminal" that callers such as `isatty` after
    /// every Python `open` expect (fuser's default would log a warning for each).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.timer("statfs");
        let blocks = self
            .index
            .total_file_bytes()
            .div_ceil(u64::from(BLOCK_SIZE));
        let files = self.index.inode_count() as u64;
        reply.statfs(blocks, 0, 0, files, 0, BLOCK_SIZE, 255, BLOCK_SIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = self.timer("getxattr");
        bump(&self.counters.xattr_ops);
        let Some(inode) = self.index.inode(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match self.xattr_value(ino.0, inode, name.as_bytes()) {
            None => reply.error(Errno::NO_XATTR),
            Some(value) => xattr_reply(reply, size, &value),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = self.timer("listxattr");
        bump(&self.counters.xattr_ops);
        let Some(inode) = self.index.inode(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let names = self.xattr_names(ino.0, inode);
        xattr_reply(reply, size, &names);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.index.inode(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }
}

/// Answers a getxattr/listxattr: size probe, too-small buffer, or the data.
fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    let len = value.len() as u32;
    if size == 0 {
        reply.size(len);
    } else if size < len {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// Attributes sent with negative lookups (only the TTL matters to the kernel).
static NEGATIVE_PLACEHOLDER: Inode = Inode {
    size: 0,
    data: 0,
    mtime: 0,
    uid: 0,
    gid: 0,
    nlink: 0,
    child_count: 0,
    parent: 0,
    mode: 0,
    kind: Kind::Reg,
    flags: 0,
};
