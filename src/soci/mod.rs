//! SOCI indexes: lazy reads of unmodified gzip layers. An index (an OCI manifest whose subject
//! is the image manifest, found through the referrers API or its tag fallback) lists one zTOC
//! per indexed layer; a zTOC gives the layer's file table and gzip checkpoints. Here: the index
//! vocabulary, the zTOC reader, span decoding, and the layer's entries and spans as the mount
//! and fetch paths take them (each span is one chunk, cached under a key that names the zTOC);
//! and, for indexing a layer, building its checkpoints and writing its zTOC.

mod checkpoints;
mod flatbuf;
mod span;
mod write;
mod ztoc;

use std::collections::HashMap;

pub use checkpoints::{build_checkpoints, CheckpointError, Checkpointed};
pub use span::{decode_span, SpanError};
pub use write::{write_ztoc, WriteError};
pub use ztoc::{Span, Ztoc, ZtocError, ZtocFile, WINDOW_SIZE};

use crate::digest::Digest;
use crate::estargz::timefmt::parse_rfc3339;
use crate::estargz::{
    normalize_name, ChunkDigest, ChunkInfo, Entry, EntryKind, FormatError, LayerToc,
};

/// `artifactType` (and config media type) of a SOCI index manifest.
pub const INDEX_ARTIFACT_TYPE: &str = "application/vnd.amazon.soci.index.v1+json";
/// Annotation of a zTOC descriptor in the index: the digest of the layer it indexes.
pub const IMAGE_LAYER_DIGEST: &str = "com.amazon.soci.image-layer-digest";
/// Largest zTOC accepted (the file table and 32 KiB per span): 256 MiB.
pub const MAX_ZTOC_SIZE: u64 = 256 << 20;
/// PAX record prefix of an extended attribute.
const XATTR_PAX_PREFIX: &str = "SCHILY.xattr.";

/// The spans of one layer, as the fetch path decodes them: each span is the chunk whose
/// compressed range starts where it does.
#[derive(Debug)]
pub struct GzipSpans {
    spans: Vec<Span>,
    keys: Vec<ChunkDigest>,
}

impl GzipSpans {
    /// `ztoc`'s spans; their cache keys derive from `ztoc_digest`, which pins the checkpoint
    /// windows as well as the compressed bytes.
    fn new(spans: Vec<Span>, ztoc_digest: &Digest) -> GzipSpans {
        let keys = spans
            .iter()
            .enumerate()
            .map(|(i, span)| {
                let mut name = format!("lazysnap soci span\0{ztoc_digest}\0{i}\0").into_bytes();
                name.extend_from_slice(&span.digest);
                ChunkDigest::of(&name)
            })
            .collect();
        GzipSpans { spans, keys }
    }

    /// The span whose compressed bytes start at `compressed_start`.
    pub fn starting_at(&self, compressed_start: u64) -> Option<&Span> {
        let at = self
            .spans
            .binary_search_by_key(&compressed_start, |s| s.compressed.start)
            .ok()?;
        self.spans.get(at)
    }

    /// Number of spans.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    fn chunk(&self, i: usize) -> Option<ChunkInfo> {
        let span = self.spans.get(i)?;
        Some(ChunkInfo {
            compressed: span.compressed.clone(),
            inner_offset: 0,
            file_offset: span.uncompressed.start,
            len: span.uncompressed.end - span.uncompressed.start,
            digest: *self.keys.get(i)?,
        })
    }

    /// The spans that hold stream bytes `start..end`, as chunks.
    fn chunks_covering(&self, start: u64, end: u64) -> Vec<ChunkInfo> {
        let first = self.spans.partition_point(|s| s.uncompressed.end <= start);
        let last = self.spans.partition_point(|s| s.uncompressed.start < end);
        (first..last.max(first))
            .filter_map(|i| self.chunk(i))
            .collect()
    }
}

/// Opens a gzip layer of `blob_size` bytes through its zTOC (the blob `ztoc_digest`): entries
/// as a TOC's would be (names normalized and confined, later tar entries replacing earlier ones
/// of the same path, hard links resolved), each regular file's chunks the spans holding it.
pub fn layer_from_ztoc(
    ztoc: Ztoc,
    ztoc_digest: Digest,
    blob_size: u64,
) -> Result<LayerToc, FormatError> {
    let bad = |name: &str, reason: String| FormatError::BadEntry {
        name: name.to_string(),
        offset: 0,
        reason: format!("in the zTOC: {reason}"),
    };
    if ztoc.compressed_size != blob_size {
        return Err(FormatError::BadToc {
            offset: 0,
            reason: format!(
                "the zTOC indexes a layer of {} bytes, the blob has {blob_size}",
                ztoc.compressed_size
            ),
        });
    }
    let spans = std::sync::Arc::new(GzipSpans::new(ztoc.spans, &ztoc_digest));
    let mut entries: Vec<Entry> = Vec::with_capacity(ztoc.files.len());
    let mut by_path: HashMap<String, usize> = HashMap::new();
    for file in &ztoc.files {
        let path = normalize_name(&file.name).map_err(|r| bad(&file.name, r))?;
        let kind = EntryKind::from_toc_type(&file.kind)
            .ok_or_else(|| bad(&file.name, format!("unknown type {:?}", file.kind)))?;
        if path.is_empty() {
            continue;
        }
        let mtime = parse_rfc3339(&file.mod_time).unwrap_or(0);
        let dev = |n: u64| u32::try_from(n).map_err(|_| bad(&file.name, format!("device {n}")));
        let mut entry = Entry {
            path: path.clone(),
            kind,
            mode: (file.mode & 0o7777) as u32,
            uid: file.uid,
            gid: file.gid,
            size: 0,
            mtime,
            link_target: None,
            dev_major: 0,
            dev_minor: 0,
            xattrs: file
                .pax_records
                .iter()
                .filter_map(|(key, value)| {
                    let name = key.strip_prefix(XATTR_PAX_PREFIX)?;
                    Some((name.to_string(), value.as_bytes().to_vec()))
                })
                .collect(),
            digest: None,
            chunks: Vec::new(),
            stream_offset: 0,
        };
        match kind {
            EntryKind::Reg => {
                entry.size = file.size;
                entry.stream_offset = file.offset;
                if file.size > 0 {
                    entry.chunks = spans.chunks_covering(file.offset, file.offset + file.size);
                }
            }
            EntryKind::Symlink => entry.link_target = Some(file.link_name.clone()),
            EntryKind::Hardlink => {
                let target = normalize_name(&file.link_name)
                    .map_err(|r| bad(&file.name, format!("hardlink target: {r}")))?;
                entry.link_target = Some(target);
            }
            EntryKind::Char | EntryKind::Block => {
                entry.dev_major = dev(file.dev_major)?;
                entry.dev_minor = dev(file.dev_minor)?;
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
        match by_path.get(&path).and_then(|&at| entries.get_mut(at)) {
            Some(earlier) => *earlier = entry,
            None => {
                by_path.insert(path, entries.len());
                entries.push(entry);
            }
        }
    }
    LayerToc::from_spans(ztoc_digest, entries, spans, blob_size)
}

#[cfg(test)]
mod tests;
