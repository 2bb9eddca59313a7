//! Turns a layer's normalized TOC into the FUSE index (overlayfs whiteouts converted) and the
//! per-file fetch metadata ([`LayerFiles`]); the content id of a file is its position there.

use lazysnap_fuse::{Index, IndexBuilder, NewNode, NodeAttr, NodeKind};

use crate::estargz::{Entry, EntryKind, LayerToc};
use crate::fetch::LayerFiles;

use super::unpack::{OPAQUE_MARKER, WHITEOUT_PREFIX};
use super::{LayerError, LowerLayers};

/// Whether `path` is a whiteout of a path `lower` does not have (nothing to delete): such
/// whiteouts are left out (see [`LowerLayers`]).
fn deletes_nothing(path: &str, lower: &LowerLayers) -> bool {
    let (dir, name) = path
        .trim_end_matches('/')
        .rsplit_once('/')
        .unwrap_or(("", path));
    match name.strip_prefix(WHITEOUT_PREFIX) {
        Some(_) if name == OPAQUE_MARKER || name.starts_with(".wh..wh.") => false,
        Some(target) => !lower.has(&format!("{dir}/{target}")),
        None => false,
    }
}

/// Builds the FUSE index of `toc` for a layer stacked on `lower`; content id `n` is file `n` of
/// the [`LayerFiles`].
pub fn build_index(toc: &LayerToc, lower: &LowerLayers) -> Result<(Index, LayerFiles), LayerError> {
    let root_mtime = toc.entries().iter().map(|e| e.mtime).max().unwrap_or(0);
    let mut builder = IndexBuilder::new(NodeAttr::new(0o755, 0, 0, root_mtime));
    let mut files = sized_for(toc);
    for entry in toc.entries() {
        if deletes_nothing(&entry.path, lower) {
            continue;
        }
        let kind = match entry.kind {
            EntryKind::Dir => NodeKind::Dir,
            EntryKind::Reg => {
                let content = files
                    .push_in_stream(&entry.path, entry.size, entry.stream_offset, &entry.chunks)
                    .map_err(|e| LayerError::Toc {
                        detail: e.to_string(),
                    })?;
                if entry.chunks.len() > 1 {
                    // The name of the file's assembled backing file for passthrough; a file
                    // without a usable digest is read through its chunks only.
                    if let Some(digest) = entry.digest.as_deref().and_then(|d| d.parse().ok()) {
                        files.set_file_digest(content, digest);
                    }
                }
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

/// Empty [`LayerFiles`] with room for exactly the regular files of `toc`.
fn sized_for(toc: &LayerToc) -> LayerFiles {
    let (mut files, mut chunks, mut name_bytes) = (0usize, 0usize, 0usize);
    for entry in toc.entries().iter().filter(|e| e.kind == EntryKind::Reg) {
        files += 1;
        chunks = chunks.saturating_add(entry.chunks.len());
        name_bytes = name_bytes.saturating_add(entry.path.len());
    }
    LayerFiles::with_capacity(files, chunks, name_bytes)
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
