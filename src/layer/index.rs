//! Turns a layer's normalized TOC into the FUSE index (overlayfs whiteouts converted) and the
//! per-file chunk lists the fetch path serves; the content id of a file is its position in them.

use lazysnap_fuse::{Index, IndexBuilder, NewNode, NodeAttr, NodeKind};

use crate::estargz::{Entry, EntryKind, LayerToc};
use crate::fetch::FileChunks;

use super::LayerError;

/// Builds the FUSE index of `toc`; content id `n` is `files[n]`.
pub fn build_index(toc: &LayerToc) -> Result<(Index, Vec<FileChunks>), LayerError> {
    let root_mtime = toc.entries().iter().map(|e| e.mtime).max().unwrap_or(0);
    let mut builder = IndexBuilder::new(NodeAttr::new(0o755, 0, 0, root_mtime));
    let mut files = Vec::new();
    for entry in toc.entries() {
        let kind = match entry.kind {
            EntryKind::Dir => NodeKind::Dir,
            EntryKind::Reg => {
                let content = files.len() as u64;
                files.push(FileChunks {
                    name: entry.path.clone(),
                    size: entry.size,
                    chunks: entry.chunks.clone(),
                });
                NodeKind::File {
                    size: entry.size,
                    content,
                }
            }
            EntryKind::Symlink => NodeKind::Symlink {
                target: link_target(entry)?,
            },
            EntryKind::Hardlink => NodeKind::HardLink {
                target_path: link_target(entry)?,
            },
            EntryKind::Char => NodeKind::CharDev {
                major: entry.dev_major,
                minor: entry.dev_minor,
            },
            EntryKind::Block => NodeKind::BlockDev {
                major: entry.dev_major,
                minor: entry.dev_minor,
            },
            EntryKind::Fifo => NodeKind::Fifo,
        };
        let node = NewNode {
            kind,
            attr: NodeAttr::new(entry.mode, entry.uid, entry.gid, entry.mtime),
            xattrs: entry
                .xattrs
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        };
        builder
            .add(&entry.path, node)
            .map_err(|source| LayerError::Index {
                entry: entry.path.clone(),
                source,
            })?;
    }
    Ok((builder.build(), files))
}

fn link_target(entry: &Entry) -> Result<String, LayerError> {
    entry.link_target.clone().ok_or_else(|| LayerError::Toc {
        detail: format!(
            "entry {:?} is a {} without a link target",
            entry.path,
            entry.kind.as_toc_type()
        ),
    })
}
