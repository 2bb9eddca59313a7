//! Building an [`Index`](super::Index): entries added by path in any order (parents made as
//! needed, whiteouts converted or kept, hard links resolved to their target's inode), then frozen
//! into the flat arrays the filesystem serves from.

use std::collections::HashMap;

use super::{
    dirent_name, idx, release_freed_memory, Dirent, Index, IndexError, Inode, Kind, NewNode,
    NodeAttr, NodeKind, XattrRecord, FLAG_OPAQUE, NAME_MAX, OPAQUE_MARKER, ROOT_INO,
    WHITEOUT_META_PREFIX, WHITEOUT_PREFIX,
};

/// Builds an [`Index`] from entries in layer order. Parents are created on demand (mode 0755,
/// owned by root) and take the attributes of their own entry if it comes later. A later entry
/// for an existing path replaces it (directories merge), as extracting a tar would.
#[derive(Debug)]
pub struct IndexBuilder {
    pub(super) inodes: Vec<Inode>,
    pub(super) arena: Vec<u8>,
    pub(super) interned: HashMap<Box<[u8]>, u32>,
    /// (directory inode, interned name offset) -> child inode.
    pub(super) children: HashMap<(u32, u32), u32>,
    pub(super) xattrs: Vec<XattrRecord>,
    pub(super) convert_whiteouts: bool,
    pub(super) implied_attr: NodeAttr,
}

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

    pub(super) fn ensure_dirs(&mut self, path: &str, parents: &[&str]) -> Result<u32, IndexError> {
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
    pub(super) fn resolve(&self, path: &str) -> Option<u32> {
        let components = split_path(path).ok()?;
        let mut cur = ROOT_INO as u32;
        for component in components {
            let name_off = *self.interned.get(component.as_bytes())?;
            cur = *self.children.get(&(cur, name_off))?;
        }
        Some(cur)
    }

    pub(super) fn leaf_inode(&mut self, path: &str, node: &NewNode) -> Result<Inode, IndexError> {
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

    pub(super) fn push_inode(&mut self, inode: Inode, path: &str) -> Result<u32, IndexError> {
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

    pub(super) fn intern(&mut self, name: &str, path: &str) -> Result<u32, IndexError> {
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

    pub(super) fn append(&mut self, bytes: &[u8], path: &str) -> Result<u32, IndexError> {
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
    pub(super) fn set_xattrs(
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

pub(super) fn dir_inode(attr: &NodeAttr, parent: u32) -> Inode {
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

pub(super) fn set_attr(inode: &mut Inode, attr: &NodeAttr) {
    inode.mode = (attr.mode & 0o7777) as u16;
    inode.uid = attr.uid;
    inode.gid = attr.gid;
    inode.mtime = attr.mtime_secs;
}

/// The kernel's `new_encode_dev`, as FUSE's `rdev` field expects.
pub(super) fn encode_dev(path: &str, major: u32, minor: u32) -> Result<u32, IndexError> {
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
pub(super) fn split_path(path: &str) -> Result<Vec<&str>, IndexError> {
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
