//! `LayerFs`: the fuser `Filesystem` over an [`Index`]. It only translates requests into index
//! queries, hands reads to the [`ContentSource`] (answering from its callback, so no FUSE thread
//! waits for content) and keeps the passthrough handle table.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    AccessFlags, Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};

use crate::handles::{OpenMode, OpenTable};
use crate::index::{Index, Inode, Kind};
use crate::ContentSource;

mod nodes;
mod observe;
use observe::bump;
pub(crate) use observe::Counters;
pub use observe::{FsStats, OpObserver, OpenObserver};

/// Block size reported in attributes and statfs.
const BLOCK_SIZE: u32 = 4096;
/// Size reported for directories (like a fresh ext4 directory).
const DIR_SIZE: u64 = 4096;
/// xattr that marks an opaque directory for overlayfs (privileged mounts).
pub(crate) const TRUSTED_OPAQUE: &[u8] = b"trusted.overlay.opaque";
/// xattr that marks an opaque directory for overlayfs mounted with `userxattr`.
pub(crate) const USER_OPAQUE: &[u8] = b"user.overlay.opaque";

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

pub(crate) struct LayerFs {
    index: Index,
    source: Arc<dyn ContentSource>,
    config: FsConfig,
    counters: Arc<Counters>,
    /// Passthrough negotiated and not refused by the kernel since.
    passthrough_live: Arc<AtomicBool>,
    handles: OpenTable,
    /// The connection's /dev/fuse descriptor, on which backing ids are registered and closed.
    device: Arc<OwnedFd>,
}

impl LayerFs {}

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
            Some(backing) => nodes::reply_passthrough(reply, &backing, &self.counters),
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
