//! Reading a layer through ranged reads: footer → TOC → digest check → validated, normalized
//! entries with their chunk extents; and full verification of every chunk.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;

use bytes::Bytes;
use tracing::Instrument;

use super::footer::{parse_footer, Footer, MAX_FOOTER_SIZE};
use super::toc::Toc;
use super::{ChunkInfo, Compression, FormatError, TOC_TAR_NAME};
use crate::blob::BlobSource;
use crate::digest::Digest;

mod normalize;
mod verify;
use normalize::normalize;
pub(crate) use normalize::normalize_name;
pub use verify::{verify_layer, VerifyReport};

/// Largest TOC (uncompressed JSON, and compressed TOC bytes) a reader accepts: 512 MiB.
pub const MAX_TOC_SIZE: u64 = 512 << 20;

/// Largest decompressed chunk a reader accepts (256 MiB): bounds what one chunk read may
/// allocate even when the compressed bytes really expand that far.
pub const MAX_CHUNK_LEN: u64 = 256 << 20;

/// Which landmark a layer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landmark {
    /// `.prefetch.landmark`: files before it are prioritized.
    Prefetch,
    /// `.no.prefetch.landmark`: nothing is prioritized.
    NoPrefetch,
}

/// Type of a normalized entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl EntryKind {
    /// The TOC `type` string of this kind.
    pub fn as_toc_type(self) -> &'static str {
        match self {
            EntryKind::Dir => "dir",
            EntryKind::Reg => "reg",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::Char => "char",
            EntryKind::Block => "block",
            EntryKind::Fifo => "fifo",
        }
    }

    pub(crate) fn from_toc_type(kind: &str) -> Option<EntryKind> {
        Some(match kind {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::Reg,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::Char,
            "block" => EntryKind::Block,
            "fifo" => EntryKind::Fifo,
            _ => return None,
        })
    }
}

/// A validated file-system entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Normalized path: no `./`, no leading or trailing `/`, never empty.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits plus setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// File size (regular files; 0 otherwise).
    pub size: u64,
    /// Modification time, unix seconds.
    pub mtime: i64,
    /// Symlink target verbatim; hardlink target as a normalized path (resolved to a non-link).
    pub link_target: Option<String>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes, decoded.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// `sha256:<hex>` of the whole file, when the TOC gives it.
    pub digest: Option<String>,
    /// Chunks in file order. They cover `0..size` exactly when `stream_offset` is 0 (the
    /// file's own chunks, eStargz and zstd:chunked); otherwise they are the gzip spans of the
    /// layer's tar stream that cover `stream_offset..stream_offset + size` (a SOCI zTOC), and
    /// their `file_offset`s are offsets in that stream.
    pub chunks: Vec<ChunkInfo>,
    /// Where the file's bytes start in the byte sequence its chunks make.
    pub stream_offset: u64,
}

/// What lazysnap's prefetch of a layer fetches: the chunks whose compressed member starts in
/// `range` (before `.prefetch.landmark`) but those starting at a `skipped` offset (sorted; marked
/// `lazysnap.skipPrefetch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchPlan {
    pub range: Range<u64>,
    pub skipped: Vec<u64>,
}

impl PrefetchPlan {
    /// Whether the chunk whose compressed member starts at `compressed_start` is prefetched.
    pub fn wants(&self, compressed_start: u64) -> bool {
        self.range.contains(&compressed_start)
            && self.skipped.binary_search(&compressed_start).is_err()
    }
}

impl From<Range<u64>> for PrefetchPlan {
    /// The whole range, nothing skipped.
    fn from(range: Range<u64>) -> Self {
        PrefetchPlan {
            range,
            skipped: Vec::new(),
        }
    }
}

/// An opened layer: its TOC, validated and normalized.
#[derive(Debug, Clone)]
pub struct LayerToc {
    compression: Compression,
    toc_digest: Digest,
    /// The parsed TOC as read, until [`without_raw_toc`](LayerToc::without_raw_toc).
    toc: Option<Toc>,
    entries: Vec<Entry>,
    prefetch: Option<PrefetchPlan>,
    landmark: Option<Landmark>,
    blob_size: u64,
    /// `None` for a gzip layer read through a SOCI zTOC.
    footer: Option<Footer>,
    /// The spans the chunks are, for a gzip layer read through a SOCI zTOC.
    spans: Option<std::sync::Arc<crate::soci::GzipSpans>>,
}

impl LayerToc {
    /// A plain gzip layer read through a SOCI zTOC: its entries (whose chunks are the layer's
    /// spans) and the spans; `ztoc_digest` stands for the TOC digest. Hard links are resolved
    /// as for a TOC.
    pub(crate) fn from_spans(
        ztoc_digest: Digest,
        mut entries: Vec<Entry>,
        spans: std::sync::Arc<crate::soci::GzipSpans>,
        blob_size: u64,
    ) -> Result<LayerToc, FormatError> {
        normalize::resolve_hardlinks(&mut entries)?;
        Ok(LayerToc {
            compression: Compression::Gzip,
            toc_digest: ztoc_digest,
            toc: None,
            entries,
            prefetch: None,
            landmark: None,
            blob_size,
            footer: None,
            spans: Some(spans),
        })
    }
    /// The gzip spans the chunks are, when the layer was read through a SOCI zTOC.
    pub fn spans(&self) -> Option<&std::sync::Arc<crate::soci::GzipSpans>> {
        self.spans.as_ref()
    }
    /// How the chunks decode.
    pub fn chunk_coding(&self) -> super::ChunkCoding {
        match &self.spans {
            Some(spans) => super::ChunkCoding::GzipSpans(spans.clone()),
            None => super::ChunkCoding::Members(self.compression),
        }
    }
    /// Compression of the chunks.
    pub fn compression(&self) -> Compression {
        self.compression
    }
    /// `sha256:<hex>` of the uncompressed TOC JSON.
    pub fn toc_digest(&self) -> &Digest {
        &self.toc_digest
    }
    /// The raw TOC, unless [`without_raw_toc`](Self::without_raw_toc) dropped it.
    pub fn toc(&self) -> Option<&Toc> {
        self.toc.as_ref()
    }
    /// Drops the raw TOC (about as large again as the entries) for holders that need only the
    /// normalized entries, such as a mount.
    pub fn without_raw_toc(mut self) -> Self {
        self.toc = None;
        self
    }
    /// Normalized entries in TOC order, landmarks and `stargz.index.json` hidden.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    /// Compressed bytes holding the prioritized files (everything before `.prefetch.landmark`).
    pub fn prefetch_range(&self) -> Option<Range<u64>> {
        self.prefetch.as_ref().map(|p| p.range.clone())
    }
    /// Compressed start offsets, sorted, of the chunks in the prefetch range marked
    /// `lazysnap.skipPrefetch` (parts of files the recorded workload did not read).
    pub fn prefetch_skipped(&self) -> &[u64] {
        self.prefetch.as_ref().map_or(&[], |p| p.skipped.as_slice())
    }
    /// What lazysnap's prefetch of this layer fetches, if the layer has prioritized files.
    pub fn prefetch_plan(&self) -> Option<&PrefetchPlan> {
        self.prefetch.as_ref()
    }
    /// Compressed bytes lazysnap's prefetch fetches: the chunks its plan wants, each compressed
    /// member once.
    pub fn prefetch_bytes(&self) -> u64 {
        let Some(plan) = &self.prefetch else {
            return 0;
        };
        let mut members: Vec<Range<u64>> = self
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter())
            .map(|c| c.compressed.clone())
            .filter(|c| plan.wants(c.start))
            .collect();
        members.sort_unstable_by_key(|c| c.start);
        members.dedup_by_key(|c| c.start);
        members.iter().map(|c| c.end - c.start).sum()
    }
    /// The landmark the layer carries, if any.
    pub fn landmark(&self) -> Option<Landmark> {
        self.landmark
    }
    /// Size of the blob in bytes.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }
    /// The footer the layer ends with (none for a layer read through a SOCI zTOC).
    pub fn footer(&self) -> Option<Footer> {
        self.footer
    }
    /// Compressed offset where file data ends and the TOC begins (including zstd:chunked's
    /// skippable frame header); the blob's end when the TOC is not in the blob.
    pub fn data_end(&self) -> u64 {
        self.footer.as_ref().map_or(self.blob_size, data_end)
    }
}

fn data_end(footer: &Footer) -> u64 {
    match footer {
        Footer::ZstdChunked { toc_offset, .. } => toc_offset.saturating_sub(8),
        other => other.toc_offset(),
    }
}

fn blob_err(what: &str, range: &Range<u64>) -> impl FnOnce(crate::blob::BlobError) -> FormatError {
    let what = what.to_string();
    let range = range.clone();
    move |source| FormatError::Blob {
        what,
        range,
        source,
    }
}

/// How much of a blob's end [`open_layer`] reads in its first request: the footer and, for
/// layers of up to a few hundred files, the whole TOC, in one round trip. Larger TOCs take a
/// second request for the rest. The guess is kept small because the bytes before the TOC are
/// chunk data fetched again if read (on a 10 Mbit/s link 64 KiB cost about half a 100 ms round
/// trip).
pub const DEFAULT_TAIL_GUESS: u64 = 64 << 10;

/// Opens a layer: reads the footer and TOC (never the whole blob), checks the TOC digest
/// against `expected_toc_digest` when given, and validates every entry. One request of the last
/// [`DEFAULT_TAIL_GUESS`] bytes, and a second only for the part of a larger TOC before them.
pub async fn open_layer(
    blob: &dyn BlobSource,
    expected_toc_digest: Option<&str>,
) -> Result<LayerToc, FormatError> {
    open_layer_with_tail(blob, expected_toc_digest, DEFAULT_TAIL_GUESS).await
}

/// [`open_layer`] reading the last `tail_guess` bytes (at most a quarter of the blob) first: a
/// guess at footer + TOC (on a slow link a second round trip costs less than many bytes guessed
/// too many).
pub async fn open_layer_with_tail(
    blob: &dyn BlobSource,
    expected_toc_digest: Option<&str>,
    tail_guess: u64,
) -> Result<LayerToc, FormatError> {
    let span = tracing::debug_span!("estargz_open_layer", blob_size = blob.size(), tail_guess);
    open_layer_traced(blob, expected_toc_digest, tail_guess)
        .instrument(span)
        .await
}

/// Bytes `range` of the blob whose last bytes, from `tail_start`, are `tail`: sliced from the
/// tail where it covers them, the part before it fetched.
async fn read_with_tail(
    blob: &dyn BlobSource,
    tail: &Bytes,
    tail_start: u64,
    range: Range<u64>,
) -> Result<Bytes, FormatError> {
    let within = |at: u64| usize::try_from(at.saturating_sub(tail_start)).unwrap_or(usize::MAX);
    if range.start >= tail_start {
        return Ok(tail.slice(within(range.start)..within(range.end).min(tail.len())));
    }
    let head_range = range.start..tail_start.min(range.end);
    let head = blob
        .read_range(head_range.clone())
        .await
        .map_err(blob_err("TOC", &head_range))?;
    if range.end <= tail_start {
        return Ok(head);
    }
    let mut joined = Vec::with_capacity(head.len() + within(range.end));
    joined.extend_from_slice(&head);
    joined.extend_from_slice(&tail[..within(range.end).min(tail.len())]);
    Ok(Bytes::from(joined))
}

/// [`open_layer`] for a blob whose last bytes, `tail`, were already read (with the request that
/// learnt the blob's size): only the part of a larger TOC before them is read.
pub async fn open_layer_from_tail(
    blob: &dyn BlobSource,
    expected_toc_digest: Option<&str>,
    tail: Bytes,
) -> Result<LayerToc, FormatError> {
    let size = blob.size();
    let span = tracing::debug_span!("estargz_open_layer", blob_size = size, tail = tail.len());
    let Some(tail_start) = size.checked_sub(tail.len() as u64) else {
        return Err(FormatError::BadFooter {
            size,
            reason: format!("{} bytes were read as its last ones", tail.len()),
        });
    };
    open_with_tail(blob, expected_toc_digest, tail_start, tail)
        .instrument(span)
        .await
}

async fn open_layer_traced(
    blob: &dyn BlobSource,
    expected_toc_digest: Option<&str>,
    tail_guess: u64,
) -> Result<LayerToc, FormatError> {
    let size = blob.size();
    // At most a quarter of the blob: a small layer's TOC is not worth reading its data for.
    let tail_len = size.min(tail_guess.min(size / 4).max(MAX_FOOTER_SIZE as u64));
    let tail_range = size - tail_len..size;
    let tail = blob
        .read_range(tail_range.clone())
        .await
        .map_err(blob_err("footer", &tail_range))?;
    open_with_tail(blob, expected_toc_digest, tail_range.start, tail).await
}

/// The rest of opening a layer once its bytes from `tail_start` to the end, `tail`, are read.
async fn open_with_tail(
    blob: &dyn BlobSource,
    expected_toc_digest: Option<&str>,
    tail_start: u64,
    tail: Bytes,
) -> Result<LayerToc, FormatError> {
    let size = blob.size();
    let tail_range = tail_start..size;
    let footer = parse_footer(&tail, size)?;
    let footer_start = size - footer.len() as u64;
    let json = match footer {
        Footer::Estargz { toc_offset } | Footer::Legacy { toc_offset } => {
            if toc_offset >= footer_start {
                return Err(FormatError::BadFooter {
                    size,
                    reason: format!(
                        "TOC offset {toc_offset} is not before the footer at {footer_start}"
                    ),
                });
            }
            let range = toc_offset..footer_start;
            if range.end - range.start > MAX_TOC_SIZE {
                return Err(FormatError::BadToc {
                    offset: toc_offset,
                    reason: format!(
                        "compressed TOC is {} bytes, more than the {MAX_TOC_SIZE}-byte limit",
                        range.end - range.start
                    ),
                });
            }
            let bytes = read_with_tail(blob, &tail, tail_range.start, range).await?;
            read_toc_tar(&bytes, toc_offset)?
        }
        Footer::ZstdChunked {
            toc_offset,
            compressed_len,
            uncompressed_len,
        } => {
            let end = toc_offset.checked_add(compressed_len);
            if toc_offset < 8 || end.is_none_or(|end| end > footer_start) {
                return Err(FormatError::BadFooter {
                    size,
                    reason: format!(
                        "zstd:chunked TOC at {toc_offset} of {compressed_len} bytes does not fit before the footer at {footer_start}"
                    ),
                });
            }
            if compressed_len > MAX_TOC_SIZE || uncompressed_len > MAX_TOC_SIZE {
                return Err(FormatError::BadToc {
                    offset: toc_offset,
                    reason: format!(
                        "TOC of {compressed_len} compressed / {uncompressed_len} uncompressed bytes exceeds the {MAX_TOC_SIZE}-byte limit"
                    ),
                });
            }
            let range = toc_offset - 8..toc_offset + compressed_len;
            let bytes = read_with_tail(blob, &tail, tail_range.start, range).await?;
            read_zstd_toc(&bytes, toc_offset, compressed_len, uncompressed_len)?
        }
    };
    layer_from_toc_json(json, footer, size, expected_toc_digest)
}

/// Builds a [`LayerToc`] from the uncompressed TOC JSON of a blob with `footer`: digest check,
/// parse, validation. The synchronous core of [`open_layer`] (also the fuzzing entry point).
pub fn layer_from_toc_json(
    json: Vec<u8>,
    footer: Footer,
    blob_size: u64,
    expected_toc_digest: Option<&str>,
) -> Result<LayerToc, FormatError> {
    let toc_digest = crate::digest::sha256_digest(&json);
    if let Some(expected) = expected_toc_digest {
        if expected != toc_digest {
            return Err(FormatError::TocDigestMismatch {
                expected: expected.to_string(),
                actual: toc_digest.to_string(),
            });
        }
    }
    let toc = parse_toc_json(&json).map_err(|e| match e {
        FormatError::BadToc { reason, .. } => FormatError::BadToc {
            offset: footer.toc_offset(),
            reason,
        },
        other => other,
    })?;
    // The text is no longer needed: free it before the entries are built from the parsed TOC.
    drop(json);
    let normalized = normalize(&toc, data_end(&footer))?;
    Ok(LayerToc {
        compression: footer.compression(),
        toc_digest,
        toc: Some(toc),
        entries: normalized.entries,
        prefetch: normalized.prefetch,
        landmark: normalized.landmark,
        blob_size,
        footer: Some(footer),
        spans: None,
    })
}

/// Parses TOC JSON (`{"version":1,"entries":[...]}`); the error names what is wrong.
pub fn parse_toc_json(json: &[u8]) -> Result<Toc, FormatError> {
    if json.len() as u64 > MAX_TOC_SIZE {
        return Err(FormatError::BadToc {
            offset: 0,
            reason: format!("TOC JSON exceeds {MAX_TOC_SIZE} bytes"),
        });
    }
    let toc: Toc = serde_json::from_slice(json).map_err(|e| FormatError::BadToc {
        offset: 0,
        reason: format!("TOC is not valid JSON of the eStargz schema: {e}"),
    })?;
    if toc.version != 1 {
        return Err(FormatError::BadToc {
            offset: 0,
            reason: format!("unsupported TOC version {}, expected 1", toc.version),
        });
    }
    Ok(toc)
}

fn tar_octal(field: &[u8]) -> Option<u64> {
    super::tarfmt::parse_numeric(field)
}

/// Decompresses an eStargz TOC member and extracts `stargz.index.json` from its tar.
fn read_toc_tar(compressed: &[u8], toc_offset: u64) -> Result<Vec<u8>, FormatError> {
    let bad = |reason: String| FormatError::BadToc {
        offset: toc_offset,
        reason,
    };
    let mut decoder = flate2::read::GzDecoder::new(compressed);
    let mut header = [0u8; 512];
    decoder
        .read_exact(&mut header)
        .map_err(|e| bad(format!("cannot decompress the TOC tar header: {e}")))?;
    let name_end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let name = String::from_utf8_lossy(&header[..name_end]);
    if name != TOC_TAR_NAME {
        return Err(bad(format!(
            "TOC member is named {name:?}, expected {TOC_TAR_NAME}"
        )));
    }
    let size = tar_octal(&header[124..136])
        .ok_or_else(|| bad("TOC tar header has an invalid size field".into()))?;
    if size > MAX_TOC_SIZE {
        return Err(bad(format!(
            "TOC is {size} bytes, more than the {MAX_TOC_SIZE}-byte limit"
        )));
    }
    let mut json = Vec::new();
    let read = (&mut decoder)
        .take(size)
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("cannot decompress the TOC: {e}")))?;
    if read as u64 != size {
        return Err(bad(format!("TOC data ends after {read} of {size} bytes")));
    }
    Ok(json)
}

/// Checks the skippable frame around a zstd:chunked TOC and decompresses it.
fn read_zstd_toc(
    frame: &[u8],
    toc_offset: u64,
    compressed_len: u64,
    uncompressed_len: u64,
) -> Result<Vec<u8>, FormatError> {
    let bad = |reason: String| FormatError::BadToc {
        offset: toc_offset,
        reason,
    };
    let magic = frame
        .get(0..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let len = frame
        .get(4..8)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if magic != Some(super::footer::ZSTD_SKIPPABLE_MAGIC)
        || len.map(u64::from) != Some(compressed_len)
    {
        return Err(bad(format!(
            "no zstd skippable frame of {compressed_len} bytes before the TOC"
        )));
    }
    let payload = frame.get(8..).unwrap_or_default();
    let decoder = zstd::stream::read::Decoder::with_buffer(payload)
        .map_err(|e| bad(format!("cannot start zstd decoder: {e}")))?;
    let mut json = Vec::new();
    decoder
        .take(uncompressed_len + 1)
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("cannot decompress the TOC: {e}")))?;
    if json.len() as u64 != uncompressed_len {
        return Err(bad(format!(
            "TOC decompresses to {} bytes, the footer says {uncompressed_len}",
            json.len()
        )));
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize() {
        assert_eq!(normalize_name("./a/b/").unwrap(), "a/b");
        assert_eq!(normalize_name("a//b").unwrap(), "a/b");
        assert_eq!(normalize_name("./").unwrap(), "");
        assert!(normalize_name("/etc").is_err());
        assert!(normalize_name("a/../../etc").is_err());
    }
}
