//! The immutable inode index a mounted layer is served from: [`IndexBuilder`] turns a list of
//! entries (in layer order) into compact tables, converting overlayfs whiteouts on the way.
//!
//! Layout: one `Vec<Inode>` (inode number = position + 1, so numbers follow build order), one
//! `Vec<Dirent>` holding every directory's children contiguously and sorted by name (lookups are a
//! binary search, readdir offsets are positions), and one byte arena holding names (interned),
//! symlink targets and xattrs. About 60 bytes per entry plus its name.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ContentId;

mod builder;
use builder::split_path;
pub use builder::IndexBuilder;

/// Name of a whiteout file's prefix in OCI/Docker layers.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the marker that makes its directory opaque.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Prefix of aufs metadata entries (hidden, never converted).
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
/// Longest file name Linux accepts (NAME_MAX).
const NAME_MAX: usize = 255;

/// Ownership, permissions and modification time of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeAttr {
    /// Permission bits plus setuid/setgid/sticky (`0o7777`); file-type bits are ignored.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the Unix epoch (may be negative).
    pub mtime_secs: i64,
}

impl NodeAttr {
    /// Convenience constructor.
    pub fn new(mode: u32, uid: u32, gid: u32, mtime_secs: i64) -> Self {
        NodeAttr {
            mode,
            uid,
            gid,
            mtime_secs,
        }
    }
}

/// What kind of entry is added, with its kind-specific data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    /// A regular file of `size` bytes whose bytes the [`crate::ContentSource`] serves as `content`.
    File {
        size: u64,
        content: ContentId,
    },
    /// A symbolic link; `target` is returned verbatim by readlink.
    Symlink {
        target: String,
    },
    /// A hard link to an entry added earlier (path relative to the layer root). It shares the
    /// target's inode; its own attributes and xattrs are ignored.
    HardLink {
        target_path: String,
    },
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One entry to add to an [`IndexBuilder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewNode {
    pub kind: NodeKind,
    pub attr: NodeAttr,
    /// Extended attributes (name, value), e.g. `security.capability`.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Why an entry could not be added to an index.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("entry {path:?}: invalid path ({reason}); paths are relative to the layer root, without '..'")]
    InvalidPath { path: String, reason: &'static str },
    #[error("entry {path:?}: a path component is longer than {NAME_MAX} bytes")]
    NameTooLong { path: String },
    #[error("entry {path:?}: parent {parent:?} exists and is not a directory")]
    ParentNotDir { path: String, parent: String },
    #[error("hard link {path:?}: target {target:?} was not added before it (tar order: targets come first)")]
    HardLinkTargetMissing { path: String, target: String },
    #[error(
        "hard link {path:?}: target {target:?} is a directory; directories cannot be hard-linked"
    )]
    HardLinkToDir { path: String, target: String },
    #[error("entry {path:?}: device {major}:{minor} does not fit the kernel's 12-bit major / 20-bit minor encoding")]
    DeviceNumberTooLarge {
        path: String,
        major: u32,
        minor: u32,
    },
    #[error("entry {path:?}: the index is full ({what}); split the layer")]
    TooLarge { path: String, what: &'static str },
}

/// File type of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    Reg,
    Symlink,
    Char,
    Block,
    Fifo,
}

/// Inode flag: directory is opaque (overlayfs `.wh..wh..opq`).
pub(crate) const FLAG_OPAQUE: u8 = 1;

/// One inode: 48 bytes.
#[derive(Clone, Debug)]
pub(crate) struct Inode {
    /// Regular file: size; symlink: target length; dir: 0 while building.
    pub(crate) size: u64,
    /// Regular file: content id; symlink: arena offset of the target; device: encoded rdev;
    /// directory: position of its first child in `dirents`.
    pub(crate) data: u64,
    pub(crate) mtime: i64,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) nlink: u32,
    /// Directory: number of children.
    pub(crate) child_count: u32,
    /// Directory: inode number of its parent (root: itself).
    pub(crate) parent: u32,
    pub(crate) mode: u16,
    pub(crate) kind: Kind,
    pub(crate) flags: u8,
}

/// One directory entry: 12 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dirent {
    pub(crate) name_off: u32,
    pub(crate) ino: u32,
    pub(crate) name_len: u16,
}

/// One extended attribute of an inode, stored in the arena.
#[derive(Clone, Copy, Debug)]
struct XattrRecord {
    ino: u32,
    name_off: u32,
    value_off: u32,
    name_len: u32,
    value_len: u32,
}

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;

/// Hands freed heap memory back to the kernel (glibc keeps it otherwise): the builder's temporary
/// maps, or a parsed TOC once its index is built, are ~as large as the index for 100k entries.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn idx(ino: u32) -> usize {
    (ino as usize).saturating_sub(1)
}

fn dirent_name<'a>(arena: &'a [u8], d: &Dirent) -> &'a [u8] {
    let start = d.name_off as usize;
    arena.get(start..start + d.name_len as usize).unwrap_or(&[])
}

/// A frozen, read-only tree of inodes. Cheap to query from many threads.
#[derive(Debug)]
pub struct Index {
    inodes: Vec<Inode>,
    dirents: Vec<Dirent>,
    arena: Vec<u8>,
    xattrs: Vec<XattrRecord>,
}

/// What [`Index::node`] tells about one inode (for callers and tests; the filesystem uses the
/// same data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub ino: u64,
    pub kind: NodeKindInfo,
    pub attr: NodeAttr,
    pub size: u64,
    pub nlink: u32,
    pub opaque: bool,
}

/// Kind of an inode in a built index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKindInfo {
    Dir,
    File { content: ContentId },
    Symlink { target: Vec<u8> },
    CharDev { rdev: u32 },
    BlockDev { rdev: u32 },
    Fifo,
}

impl Index {
    /// Number of inodes (root included).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Number of directory entries (names), hard links included.
    pub fn entry_count(&self) -> usize {
        self.dirents.len()
    }

    /// Sum of regular file sizes (each inode once).
    pub fn total_file_bytes(&self) -> u64 {
        self.inodes
            .iter()
            .filter(|i| i.kind == Kind::Reg && i.nlink > 0)
            .map(|i| i.size)
            .sum()
    }

    /// Heap bytes held by the index tables.
    pub fn memory_usage(&self) -> usize {
        self.inodes.capacity() * std::mem::size_of::<Inode>()
            + self.dirents.capacity() * std::mem::size_of::<Dirent>()
            + self.arena.capacity()
            + self.xattrs.capacity() * std::mem::size_of::<XattrRecord>()
    }

    /// Inode number at `path` (relative to the root), following no symlinks.
    pub fn lookup_path(&self, path: &str) -> Option<u64> {
        let mut cur = ROOT_INO;
        for component in split_path(path).ok()? {
            cur = self.lookup(cur, component.as_bytes())?;
        }
        Some(cur)
    }

    /// Describes inode `ino`.
    pub fn node(&self, ino: u64) -> Option<NodeInfo> {
        let inode = self.inode(ino)?;
        let kind = match inode.kind {
            Kind::Dir => NodeKindInfo::Dir,
            Kind::Reg => NodeKindInfo::File {
                content: inode.data,
            },
            Kind::Symlink => NodeKindInfo::Symlink {
                target: self.symlink_target(ino)?.to_vec(),
            },
            Kind::Char => NodeKindInfo::CharDev {
                rdev: inode.data as u32,
            },
            Kind::Block => NodeKindInfo::BlockDev {
                rdev: inode.data as u32,
            },
            Kind::Fifo => NodeKindInfo::Fifo,
        };
        Some(NodeInfo {
            ino,
            kind,
            attr: NodeAttr {
                mode: u32::from(inode.mode),
                uid: inode.uid,
                gid: inode.gid,
                mtime_secs: inode.mtime,
            },
            size: inode.size,
            nlink: inode.nlink,
            opaque: inode.flags & FLAG_OPAQUE != 0,
        })
    }

    pub(crate) fn inode(&self, ino: u64) -> Option<&Inode> {
        let pos = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.inodes.get(pos)
    }

    /// Children of directory `ino`, sorted by name.
    pub(crate) fn children(&self, ino: u64) -> &[Dirent] {
        match self.inode(ino) {
            Some(d) if d.kind == Kind::Dir && d.child_count > 0 => {
                let start = d.data as usize;
                self.dirents
                    .get(start..start + d.child_count as usize)
                    .unwrap_or(&[])
            }
            _ => &[],
        }
    }

    pub(crate) fn name(&self, d: &Dirent) -> &[u8] {
        dirent_name(&self.arena, d)
    }

    /// Child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let children = self.children(parent);
        children
            .binary_search_by(|d| self.name(d).cmp(name))
            .ok()
            .and_then(|pos| children.get(pos))
            .map(|d| u64::from(d.ino))
    }

    pub(crate) fn symlink_target(&self, ino: u64) -> Option<&[u8]> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Symlink {
            return None;
        }
        let start = usize::try_from(inode.data).ok()?;
        self.arena
            .get(start..start.checked_add(usize::try_from(inode.size).ok()?)?)
    }

    /// Extended attributes of `ino` as (name, value) pairs, in the order they were added.
    pub fn xattrs(&self, ino: u64) -> impl Iterator<Item = (&[u8], &[u8])> {
        let ino32 = u32::try_from(ino).unwrap_or(0);
        let start = self.xattrs.partition_point(|x| x.ino < ino32);
        self.xattrs[start..]
            .iter()
            .take_while(move |x| x.ino == ino32)
            .map(|x| {
                let name = self
                    .arena
                    .get(x.name_off as usize..(x.name_off + x.name_len) as usize)
                    .unwrap_or(&[]);
                let value = self
                    .arena
                    .get(x.value_off as usize..(x.value_off as usize + x.value_len as usize))
                    .unwrap_or(&[]);
                (name, value)
            })
    }
}

/// Seconds since the epoch to `SystemTime` (negative = before 1970).
pub(crate) fn system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

#[cfg(test)]
mod tests;
