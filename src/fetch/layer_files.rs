//! The per-file fetch metadata of a layer, laid out flat: one chunk array and one name arena for
//! the whole layer, plus a 24-byte record per file, so a layer of many small files costs a few
//! allocations instead of several per file.

use std::ops::Range;

use lazysnap_fuse::ContentId;

use crate::estargz::{ChunkDigest, ChunkInfo};

/// The regular files of a layer as the fetch path needs them: each file's size and chunks in
/// file order, and its name (for messages only). File `n`, the FUSE [`ContentId`] `n`, is the
/// `n`th file pushed.
#[derive(Debug, Clone, Default)]
pub struct LayerFiles {
    /// Every file's chunks, file after file.
    chunks: Vec<ChunkInfo>,
    records: Vec<FileRecord>,
    /// Every file's name, concatenated; file `n`'s name ends at byte `name_ends[n]`.
    names: String,
    name_ends: Vec<u32>,
    /// Whole-file digests of files made of several chunks, by file, sorted: the names of their
    /// assembled passthrough backing files in the cache.
    file_digests: Vec<(u32, ChunkDigest)>,
}

/// Where one file's chunks lie in [`LayerFiles`], and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileRecord {
    pub(super) size: u64,
    /// Where the file's bytes start in the byte sequence its chunks make: 0 for a file's own
    /// chunks, its offset in the tar stream when the chunks are the layer's gzip spans.
    pub(super) stream_offset: u64,
    pub(super) first_chunk: u32,
    pub(super) chunk_count: u32,
}

impl FileRecord {
    /// Positions of the file's chunks in the layer's chunk array.
    pub(super) fn chunk_range(&self) -> Range<usize> {
        let first = self.first_chunk as usize;
        first..first + self.chunk_count as usize
    }
}

/// A layer with more files, chunks or bytes of file names than a [`LayerFiles`] addresses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot add file {name:?}: the layer would hold more than {} {what}",
    u32::MAX
)]
pub struct LayerFilesFull {
    name: String,
    what: &'static str,
}

impl LayerFiles {
    /// No files.
    pub fn new() -> LayerFiles {
        LayerFiles::default()
    }

    /// No files yet, with room for `files` files holding `chunks` chunks in all and names of
    /// `name_bytes` bytes in all (a layer's exact totals avoid any reallocation).
    pub fn with_capacity(files: usize, chunks: usize, name_bytes: usize) -> LayerFiles {
        LayerFiles {
            chunks: Vec::with_capacity(chunks),
            records: Vec::with_capacity(files),
            names: String::with_capacity(name_bytes),
            name_ends: Vec::with_capacity(files),
            file_digests: Vec::new(),
        }
    }

    /// Adds a file of `size` bytes made of `chunks` and returns its content id. The chunk list
    /// is stored as given; [`LayerReader`](super::LayerReader) checks it.
    pub fn push(
        &mut self,
        name: &str,
        size: u64,
        chunks: &[ChunkInfo],
    ) -> Result<ContentId, LayerFilesFull> {
        self.push_in_stream(name, size, 0, chunks)
    }

    /// Adds a file of `size` bytes that starts at `stream_offset` of the byte sequence `chunks`
    /// make (the gzip spans of a layer's tar stream that hold it) and returns its content id.
    pub fn push_in_stream(
        &mut self,
        name: &str,
        size: u64,
        stream_offset: u64,
        chunks: &[ChunkInfo],
    ) -> Result<ContentId, LayerFilesFull> {
        let full = |what| LayerFilesFull {
            name: name.chars().take(200).collect(),
            what,
        };
        let content = u32::try_from(self.records.len())
            .ok()
            .filter(|&n| n < u32::MAX)
            .ok_or_else(|| full("files"))?;
        let first_chunk = u32::try_from(self.chunks.len()).map_err(|_| full("chunks"))?;
        let chunk_count = u32::try_from(chunks.len())
            .ok()
            .filter(|&n| first_chunk.checked_add(n).is_some())
            .ok_or_else(|| full("chunks"))?;
        let name_end = u32::try_from(self.names.len() + name.len())
            .map_err(|_| full("bytes of file names"))?;
        self.chunks.extend_from_slice(chunks);
        self.records.push(FileRecord {
            size,
            stream_offset,
            first_chunk,
            chunk_count,
        });
        self.names.push_str(name);
        self.name_ends.push(name_end);
        Ok(ContentId::from(content))
    }

    /// Records the digest of the whole content of the file `content` (the TOC's file digest),
    /// for a file of several chunks; files are recorded in the order they were pushed.
    pub fn set_file_digest(&mut self, content: ContentId, digest: ChunkDigest) {
        let Ok(file) = u32::try_from(content) else {
            return;
        };
        if self
            .file_digests
            .last()
            .is_none_or(|&(last, _)| last < file)
        {
            self.file_digests.push((file, digest));
        }
    }

    /// The whole-file digest recorded for file `file`, if any.
    pub fn file_digest(&self, file: usize) -> Option<ChunkDigest> {
        let file = u32::try_from(file).ok()?;
        let at = self
            .file_digests
            .binary_search_by_key(&file, |&(f, _)| f)
            .ok()?;
        self.file_digests.get(at).map(|&(_, digest)| digest)
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when there are no files.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Name of file `file`.
    pub fn name(&self, file: usize) -> Option<&str> {
        let end = *self.name_ends.get(file)? as usize;
        let start = match file.checked_sub(1) {
            Some(previous) => *self.name_ends.get(previous)? as usize,
            None => 0,
        };
        self.names.get(start..end)
    }

    /// Size of file `file` in bytes.
    pub fn size(&self, file: usize) -> Option<u64> {
        self.records.get(file).map(|r| r.size)
    }

    /// Chunks of file `file`, in the order they were pushed.
    pub fn chunks(&self, file: usize) -> Option<&[ChunkInfo]> {
        self.chunks.get(self.records.get(file)?.chunk_range())
    }

    /// Every chunk of the layer, file after file.
    pub(super) fn all_chunks(&self) -> &[ChunkInfo] {
        &self.chunks
    }

    pub(super) fn record(&self, file: usize) -> Option<FileRecord> {
        self.records.get(file).copied()
    }

    pub(super) fn records(&self) -> &[FileRecord] {
        &self.records
    }

    /// The chunks of a file whose record this holds.
    pub(super) fn chunks_of(&self, record: &FileRecord) -> &[ChunkInfo] {
        self.chunks.get(record.chunk_range()).unwrap_or_default()
    }

    /// The file that chunk `at` of [`LayerFiles::all_chunks`] belongs to.
    pub(super) fn file_of_chunk(&self, at: usize) -> usize {
        self.records.partition_point(|r| r.chunk_range().end <= at)
    }

    /// Sorts each file's chunks by file offset where they are not (a TOC may list them out of
    /// order).
    pub(super) fn sort_chunks(&mut self) {
        for record in &self.records {
            if let Some(chunks) = self.chunks.get_mut(record.chunk_range()) {
                if !chunks.is_sorted_by_key(|c| c.file_offset) {
                    chunks.sort_by_key(|c| c.file_offset);
                }
            }
        }
    }

    /// Releases spare capacity (files are no longer added).
    pub(super) fn shrink_to_fit(&mut self) {
        self.chunks.shrink_to_fit();
        self.records.shrink_to_fit();
        self.names.shrink_to_fit();
        self.name_ends.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::ChunkDigest;

    fn chunk(file_offset: u64, len: u64) -> ChunkInfo {
        ChunkInfo {
            compressed: 10..20,
            inner_offset: 0,
            file_offset,
            len,
            digest: ChunkDigest::of(&file_offset.to_le_bytes()),
        }
    }

    #[test]
    fn files_keep_their_names_sizes_and_chunks() {
        let mut files = LayerFiles::with_capacity(3, 3, 12);
        assert_eq!(files.push("a/one", 7, &[chunk(0, 7)]), Ok(0));
        assert_eq!(files.push("", 0, &[]), Ok(1));
        assert_eq!(files.push("b/two", 9, &[chunk(4, 5), chunk(0, 4)]), Ok(2));
        assert_eq!(files.len(), 3);
        assert_eq!(files.name(0), Some("a/one"));
        assert_eq!(files.name(1), Some(""));
        assert_eq!(files.name(2), Some("b/two"));
        assert_eq!(files.name(3), None);
        assert_eq!(files.size(2), Some(9));
        assert_eq!(files.chunks(1), Some(&[][..]));
        assert_eq!(files.chunks(2).map(<[_]>::len), Some(2));
        assert_eq!(files.chunks(3), None);
        files.sort_chunks();
        let offsets: Vec<u64> = files
            .chunks(2)
            .unwrap_or_default()
            .iter()
            .map(|c| c.file_offset)
            .collect();
        assert_eq!(offsets, [0, 4]);
        // Chunk 0 is file 0's; the empty file 1 owns none, so chunks 1 and 2 are file 2's.
        assert_eq!(
            (0..3).map(|at| files.file_of_chunk(at)).collect::<Vec<_>>(),
            [0, 2, 2]
        );
    }
}
