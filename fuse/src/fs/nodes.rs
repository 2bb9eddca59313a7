//! The filesystem's view of index nodes: attributes, directory entries, extended attributes
//! (overlay's opaque marker included) and the passthrough open of a file backed by one file.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fuser::{FileAttr, FileHandle, FileType, FopenFlags, INodeNo, ReplyOpen};

use crate::handles::{Backing, OpenMode, OpenTable};
use crate::index::{system_time, Index, Inode, Kind, FLAG_OPAQUE};
use crate::ContentSource;

use super::observe::{bump, Counters, OpTimer};
use super::{FsConfig, LayerFs, BLOCK_SIZE, DIR_SIZE, TRUSTED_OPAQUE, USER_OPAQUE};

impl LayerFs {
    pub(crate) fn new(
        index: Index,
        source: Arc<dyn ContentSource>,
        config: FsConfig,
        counters: Arc<Counters>,
        passthrough_live: Arc<AtomicBool>,
        handles: OpenTable,
        device: Arc<OwnedFd>,
    ) -> Self {
        LayerFs {
            index,
            source,
            config,
            counters,
            passthrough_live,
            handles,
            device,
        }
    }

    pub(super) fn timer(&self, op: &'static str) -> OpTimer {
        OpTimer {
            observer: self.config.observer.clone(),
            op,
            start: Instant::now(),
        }
    }

    pub(super) fn opaque_xattr_name(&self) -> &'static [u8] {
        if self.config.userxattr {
            USER_OPAQUE
        } else {
            TRUSTED_OPAQUE
        }
    }

    pub(super) fn attr(&self, ino: u64, inode: &Inode) -> FileAttr {
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

    pub(super) fn file_type(kind: Kind) -> FileType {
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
    pub(super) fn dir_entry(&self, ino: u64, dir: &Inode, pos: usize) -> Option<(u64, &[u8])> {
        match pos {
            0 => Some((ino, b".")),
            1 => Some((u64::from(dir.parent), b"..")),
            _ => {
                let d = self.index.children(ino).get(pos - 2)?;
                Some((u64::from(d.ino), self.index.name(d)))
            }
        }
    }

    pub(super) fn xattr_names(&self, ino: u64, inode: &Inode) -> Vec<u8> {
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

    pub(super) fn xattr_value(&self, ino: u64, inode: &Inode, name: &[u8]) -> Option<Vec<u8>> {
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
    pub(super) fn try_open_passthrough(
        &self,
        ino: u64,
        inode: &Inode,
        reply: ReplyOpen,
    ) -> Option<ReplyOpen> {
        let content = inode.data;
        if !self.config.passthrough || !self.passthrough_live.load(Ordering::Relaxed) {
            return Some(reply);
        }
        // An inode already open in cached mode must stay cached until closed (the kernel refuses
        // mixing modes on one inode); one already passthrough reuses its backing id.
        if let Some(backing) = self.handles.reuse_passthrough(ino) {
            reply_passthrough(reply, &backing, &self.counters);
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
        let backing = match Backing::open(&self.device, &file) {
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
                reply_passthrough(reply, &backing, &self.counters);
                None
            }
            // A cached open raced in meanwhile: stay cached.
            None => Some(reply),
        }
    }
}

/// Answers an open with `backing`, which this filesystem owns (and closes on the connection when
/// its last handle goes), not fuser: the reply only borrows the id.
pub(super) fn reply_passthrough(reply: ReplyOpen, backing: &Backing, counters: &Counters) {
    bump(&counters.passthrough_opens);
    // SAFETY: the id is open on this connection and stays open while `backing` lives; the
    // wrapper is turned back into the raw id right after the reply, so fuser never closes it.
    let wrapped = unsafe { reply.wrap_backing(backing.id()) };
    reply.opened_passthrough(
        FileHandle(OpenMode::Passthrough as u64),
        FopenFlags::empty(),
        &wrapped,
    );
    wrapped.into_raw();
}
