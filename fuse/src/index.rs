//! The immutable inode index a mounted layer is served from: [`IndexBuilder`] turns a list of
//! entries (in layer order) into compact tables, converting overlayfs whiteouts on the way.
//!
//! Layout: one `Vec<Inode>` (inode number = position + 1, so numbers follow build order), one
//! `Vec<Dirent>` holding every directory's children contiguously and sorted by name (lookups are a
//! binary search, readdir offsets are positions), and one byte arena holding names (interned),
//! symlink targets and xattrs. About 60 bytes per entry plus its name.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ContentId;

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

/// Builds an [`Index`] from entries in layer order. Parents are created on demand (mode 0755,
/// owned by root) and take the attributes of their own entry if it comes later. A later entry
/// for an existing path replaces it (directories merge), as extracting a tar would.
#[derive(Debug)]
pub struct IndexBuilder {
    inodes: Vec<Inode>,
    arena: Vec<u8>,
    interned: HashMap<Box<[u8]>, u32>,
    /// (directory inode, interned name offset) -> child inode.
    children: HashMap<(u32, u32), u32>,
    xattrs: Vec<XattrRecord>,
    convert_whiteouts: bool,
    implied_attr: NodeAttr,
}

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;

impl IndexBuilder {
    /// Starts an index whose root directory has `root` attributes.
    pub fn new(root: NodeAttr) -> Self {
        let mut builder = IndexBuilder {
            inodes: Vec::new(),
            arena: Vec::new(),
            interned: HashMap::new(),
            children: HashMap::new(),
            xattrs: Vec::new(),
            convert_whiteouts: true,
            implied_attr: NodeAttr {
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime_secs: root.mtime_secs,
            },
        };
        builder.inodes.push(dir_inode(&root, 1));
        builder
    }

    /// Whether `.wh.NAME` entries become char devices 0/0 and `.wh..wh..opq` an opaque flag
    /// (default true, as overlayfs lower directories need). With false they are kept as files.
    pub fn set_convert_whiteouts(&mut self, convert: bool) -> &mut Self {
        self.convert_whiteouts = convert;
        self
    }

    /// Number of inodes so far (root included).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Adds one entry. `path` is relative to the layer root ("a/b", "./a/b/" and "/a/b" are the
    /// same); "" or "." with a directory updates the root's attributes.
    pub fn add(&mut self, path: &str, node: NewNode) -> Result<(), IndexError> {
        let components = split_path(path)?;
        let Some((last, parents)) = components.split_last() else {
            // The root itself.
            return match node.kind {
                NodeKind::Dir => {
                    set_attr(&mut self.inodes[0], &node.attr);
                    self.set_xattrs(ROOT_INO as u32, &node.xattrs, path, true)?;
                    Ok(())
                }
                _ => Err(IndexError::InvalidPath {
                    path: path.to_string(),
                    reason: "the root must be a directory",
                }),
            };
        };
        let parent = self.ensure_dirs(path, parents)?;

        let mut node = node;
        let mut name: &str = last;
        if self.convert_whiteouts && last.starts_with(WHITEOUT_PREFIX) {
            if *last == OPAQUE_MARKER {
                let dir = &mut self.inodes[idx(parent)];
                dir.flags |= FLAG_OPAQUE;
                return Ok(());
            }
            if last.starts_with(WHITEOUT_META_PREFIX) {
                // aufs metadata (e.g. .wh..wh.plnk): not part of the tree.
                return Ok(());
            }
            name = &last[WHITEOUT_PREFIX.len()..];
            node.kind = NodeKind::CharDev { major: 0, minor: 0 };
            node.xattrs.clear();
        }
        let name_off = self.intern(name, path)?;
        let key = (parent, name_off);

        match node.kind {
            NodeKind::HardLink { ref target_path } => {
                let target =
                    self.resolve(target_path)
                        .ok_or_else(|| IndexError::HardLinkTargetMissing {
                            path: path.to_string(),
                            target: target_path.clone(),
                        })?;
                if self.inodes[idx(target)].kind == Kind::Dir {
                    return Err(IndexError::HardLinkToDir {
                        path: path.to_string(),
                        target: target_path.clone(),
                    });
                }
                self.children.insert(key, target);
                Ok(())
            }
            NodeKind::Dir => {
                if let Some(&existing) = self.children.get(&key) {
                    if self.inodes[idx(existing)].kind == Kind::Dir {
                        set_attr(&mut self.inodes[idx(existing)], &node.attr);
                        return self.set_xattrs(existing, &node.xattrs, path, true);
                    }
                }
                let ino = self.push_inode(dir_inode(&node.attr, parent), path)?;
                self.children.insert(key, ino);
                self.set_xattrs(ino, &node.xattrs, path, false)
            }
            _ => {
                let inode = self.leaf_inode(path, &node)?;
                let ino = self.push_inode(inode, path)?;
                self.children.insert(key, ino);
                self.set_xattrs(ino, &node.xattrs, path, false)
            }
        }
    }

    /// Freezes the index: sorts directories, counts links.
    pub fn build(self) -> Index {
        let IndexBuilder {
            mut inodes,
            arena,
            interned,
            children,
            mut xattrs,
            ..
        } = self;
        let name_lens: HashMap<u32, u16> = interned
            .into_iter()
            .map(|(name, off)| (off, name.len() as u16))
            .collect();

        let mut dirents: Vec<(u32, Dirent)> = children
            .into_iter()
            .map(|((parent, name_off), ino)| {
                let name_len = name_lens.get(&name_off).copied().unwrap_or(0);
                (
                    parent,
                    Dirent {
                        name_off,
                        ino,
                        name_len,
                    },
                )
            })
            .collect();
        drop(name_lens);
        dirents.sort_unstable_by(|(pa, a), (pb, b)| {
            pa.cmp(pb)
                .then_with(|| dirent_name(&arena, a).cmp(dirent_name(&arena, b)))
        });

        // Children of each directory are now contiguous: record start and count.
        for (pos, (parent, _)) in dirents.iter().enumerate() {
            let dir = &mut inodes[idx(*parent)];
            if dir.child_count == 0 {
                dir.data = pos as u64;
            }
            dir.child_count += 1;
        }
        let dirents: Vec<Dirent> = dirents.into_iter().map(|(_, d)| d).collect();

        // Link counts over the reachable tree: files count their names, directories 2 + subdirs.
        for inode in inodes.iter_mut() {
            inode.nlink = 0;
        }
        let mut stack = vec![ROOT_INO as u32];
        inodes[0].nlink = 2;
        while let Some(dir) = stack.pop() {
            let (start, count) = {
                let d = &inodes[idx(dir)];
                (d.data as usize, d.child_count as usize)
            };
            for dirent in &dirents[start..start + count] {
                let child = &mut inodes[idx(dirent.ino)];
                if child.kind == Kind::Dir {
                    child.nlink = 2;
                    stack.push(dirent.ino);
                    inodes[idx(dir)].nlink += 1;
                } else {
                    child.nlink += 1;
                }
            }
        }

        xattrs.sort_by_key(|x| x.ino);
        let mut index = Index {
            inodes,
            dirents,
            arena,
            xattrs,
        };
        index.inodes.shrink_to_fit();
        index.arena.shrink_to_fit();
        index.xattrs.shrink_to_fit();
        release_freed_memory();
        index
    }

    fn ensure_dirs(&mut self, path: &str, parents: &[&str]) -> Result<u32, IndexError> {
        let mut cur = ROOT_INO as u32;
        for (depth, component) in parents.iter().enumerate() {
            let name_off = self.intern(component, path)?;
            match self.children.get(&(cur, name_off)) {
                Some(&child) if self.inodes[idx(child)].kind == Kind::Dir => cur = child,
                Some(_) => {
                    return Err(IndexError::ParentNotDir {
                        path: path.to_string(),
                        parent: parents[..=depth].join("/"),
                    });
                }
                None => {
                    let attr = self.implied_attr;
                    let child = self.push_inode(dir_inode(&attr, cur), path)?;
                    self.children.insert((cur, name_off), child);
                    cur = child;
                }
            }
        }
        Ok(cur)
    }

    /// Finds the inode at `path`, if every component exists (no whiteout conversion applies).
    fn resolve(&self, path: &str) -> Option<u32> {
        let components = split_path(path).ok()?;
        let mut cur = ROOT_INO as u32;
        for component in components {
            let name_off = *self.interned.get(component.as_bytes())?;
            cur = *self.children.get(&(cur, name_off))?;
        }
        Some(cur)
    }

    fn leaf_inode(&mut self, path: &str, node: &NewNode) -> Result<Inode, IndexError> {
        let (kind, size, data) = match &node.kind {
            NodeKind::File { size, content } => (Kind::Reg, *size, *content),
            NodeKind::Symlink { target } => {
                let off = self.append(target.as_bytes(), path)?;
                (Kind::Symlink, target.len() as u64, u64::from(off))
            }
            NodeKind::CharDev { major, minor } => {
                (Kind::Char, 0, u64::from(encode_dev(path, *major, *minor)?))
            }
            NodeKind::BlockDev { major, minor } => {
                (Kind::Block, 0, u64::from(encode_dev(path, *major, *minor)?))
            }
            NodeKind::Fifo => (Kind::Fifo, 0, 0),
            NodeKind::Dir | NodeKind::HardLink { .. } => {
                return Err(IndexError::InvalidPath {
                    path: path.to_string(),
                    reason: "internal: not a leaf",
                });
            }
        };
        Ok(Inode {
            size,
            data,
            mtime: node.attr.mtime_secs,
            uid: node.attr.uid,
            gid: node.attr.gid,
            nlink: 1,
            child_count: 0,
            parent: 0,
            mode: (node.attr.mode & 0o7777) as u16,
            kind,
            flags: 0,
        })
    }

    fn push_inode(&mut self, inode: Inode, path: &str) -> Result<u32, IndexError> {
        let ino = u32::try_from(self.inodes.len() + 1)
            .ok()
            .filter(|n| *n < u32::MAX)
            .ok_or_else(|| IndexError::TooLarge {
                path: path.to_string(),
                what: "more than 4 billion inodes",
            })?;
        self.inodes.push(inode);
        Ok(ino)
    }

    fn intern(&mut self, name: &str, path: &str) -> Result<u32, IndexError> {
        if name.len() > NAME_MAX {
            return Err(IndexError::NameTooLong {
                path: path.to_string(),
            });
        }
        if let Some(&off) = self.interned.get(name.as_bytes()) {
            return Ok(off);
        }
        let off = self.append(name.as_bytes(), path)?;
        self.interned.insert(name.as_bytes().into(), off);
        Ok(off)
    }

    fn append(&mut self, bytes: &[u8], path: &str) -> Result<u32, IndexError> {
        let off = u32::try_from(self.arena.len())
            .ok()
            .filter(|off| {
                (*off as usize)
                    .checked_add(bytes.len())
                    .is_some_and(|end| end <= u32::MAX as usize)
            })
            .ok_or_else(|| IndexError::TooLarge {
                path: path.to_string(),
                what: "names, link targets and xattrs exceed 4 GiB",
            })?;
        self.arena.extend_from_slice(bytes);
        Ok(off)
    }

    /// Sets the xattrs of `ino`; `existing` says the inode may already have some (re-added
    /// directory), which are then dropped first.
    fn set_xattrs(
        &mut self,
        ino: u32,
        xattrs: &[(String, Vec<u8>)],
        path: &str,
        existing: bool,
    ) -> Result<(), IndexError> {
        if existing && self.xattrs.iter().any(|x| x.ino == ino) {
            self.xattrs.retain(|x| x.ino != ino);
        }
        for (name, value) in xattrs {
            let name_off = self.append(name.as_bytes(), path)?;
            let value_off = self.append(value, path)?;
            self.xattrs.push(XattrRecord {
                ino,
                name_off,
                value_off,
                name_len: name.len() as u32,
                value_len: value.len() as u32,
            });
        }
        Ok(())
    }
}

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

fn dir_inode(attr: &NodeAttr, parent: u32) -> Inode {
    Inode {
        size: 0,
        data: 0,
        mtime: attr.mtime_secs,
        uid: attr.uid,
        gid: attr.gid,
        nlink: 2,
        child_count: 0,
        parent,
        mode: (attr.mode & 0o7777) as u16,
        kind: Kind::Dir,
        flags: 0,
    }
}

fn set_attr(inode: &mut Inode, attr: &NodeAttr) {
    inode.mode = (attr.mode & 0o7777) as u16;
    inode.uid = attr.uid;
    inode.gid = attr.gid;
    inode.mtime = attr.mtime_secs;
}

/// The kernel's `new_encode_dev`, as FUSE's `rdev` field expects.
fn encode_dev(path: &str, major: u32, minor: u32) -> Result<u32, IndexError> {
    if major >= 1 << 12 || minor >= 1 << 20 {
        return Err(IndexError::DeviceNumberTooLarge {
            path: path.to_string(),
            major,
            minor,
        });
    }
    Ok((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// Splits a layer path into components, dropping "", "." and a leading "/"; rejects "..".
fn split_path(path: &str) -> Result<Vec<&str>, IndexError> {
    let mut out = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                return Err(IndexError::InvalidPath {
                    path: path.to_string(),
                    reason: "contains '..'",
                })
            }
            c if c.as_bytes().contains(&0) => {
                return Err(IndexError::InvalidPath {
                    path: path.to_string(),
                    reason: "contains a NUL byte",
                });
            }
            c => out.push(c),
        }
    }
    Ok(out)
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
