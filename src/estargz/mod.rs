//! eStargz and zstd:chunked: footer, TOC types, reader (TOC and chunk digest verification) and
//! writer (chunking, prioritized files and landmarks, parallel compression).
//!
//! Reading starts from a ranged [`BlobSource`](crate::blob::BlobSource): [`open_layer`] fetches
//! the footer and the TOC only, validates every entry and yields normalized [`Entry`]s whose
//! [`ChunkInfo`]s say which compressed bytes to fetch; [`decode_chunk`] turns those bytes into
//! verified file data. [`build_layer`] writes a layer from an uncompressed tar stream.

mod chunk_digest;
mod decompress;
pub mod footer;
#[doc(hidden)]
pub mod fuzzing;
mod reader;
mod tarfmt;
mod timefmt;
pub mod toc;
mod writer;

use std::io::Read;
use std::ops::Range;

use sha2::{Digest, Sha256};

pub use chunk_digest::{ChunkDigest, InvalidChunkDigest};
pub use decompress::decompressed_reader;
pub use reader::{
    layer_from_toc_json, open_layer, parse_toc_json, verify_layer, Entry, EntryKind, Landmark,
    LayerToc, VerifyReport, MAX_CHUNK_LEN, MAX_TOC_SIZE,
};
pub use toc::{Toc, TocEntry};
pub use writer::{build_layer, build_layer_with_threads, BuildOptions, BuiltLayer};

/// Layer annotation carrying the sha256 of the uncompressed TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation carrying the length of the decompressed layer stream.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// zstd:chunked annotation: sha256 of the compressed TOC (skippable frame payload).
pub const ZSTD_MANIFEST_CHECKSUM_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-checksum";
/// zstd:chunked annotation: `offset:compressedLen:uncompressedLen:1` of the TOC.
pub const ZSTD_MANIFEST_POSITION_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-position";

/// Name of the tar member holding the TOC in an eStargz blob.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Landmark placed after the prioritized files.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Landmark placed first when no file is prioritized.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Content of both landmark files.
pub const LANDMARK_CONTENT: u8 = 0x0f;
/// Default chunk size (4 MiB), as ctr-remote uses.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// How a layer's chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// eStargz: each chunk starts a gzip member.
    Gzip,
    /// zstd:chunked: each chunk starts a zstd frame.
    Zstd,
}

/// Errors in reading or writing the format; each names the entry or offset it is about.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A chunk's bytes do not decompress to what the TOC declares.
    #[error("chunk of {name} at compressed offset {offset}: {reason}")]
    BadChunk {
        name: String,
        offset: u64,
        reason: String,
    },
    /// The blob ends too early or is too small to be a layer of this format.
    #[error("truncated layer blob ({size} bytes): {reason}")]
    Truncated { size: u64, reason: String },
    /// The last bytes of the blob are not a known footer.
    #[error("no eStargz or zstd:chunked footer at the end of the blob ({size} bytes): {reason}; is this layer really eStargz / zstd:chunked?")]
    BadFooter { size: u64, reason: String },
    /// The TOC cannot be read or parsed.
    #[error("TOC at compressed offset {offset}: {reason}")]
    BadToc { offset: u64, reason: String },
    /// The TOC's digest is not the one the manifest annotation promises.
    #[error("TOC digest mismatch: expected {expected}, the blob's TOC is {actual}; the annotation or the blob is wrong")]
    TocDigestMismatch { expected: String, actual: String },
    /// A TOC entry is invalid (bad name, chunk layout, link target, ...).
    #[error("TOC entry {name:?} (compressed offset {offset}): {reason}")]
    BadEntry {
        name: String,
        offset: u64,
        reason: String,
    },
    /// Reading the blob failed.
    #[error("reading {what} (bytes {}..{}): {source}", range.start, range.end)]
    Blob {
        what: String,
        range: Range<u64>,
        #[source]
        source: crate::blob::BlobError,
    },
    /// The input tar stream of the writer is malformed or holds something unsupported.
    #[error("input tar at byte {offset} ({name}): {reason}")]
    BadTar {
        name: String,
        offset: u64,
        reason: String,
    },
    /// Reading the input or writing the output failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A build option is out of range.
    #[error("invalid build option: {0}")]
    InvalidOption(String),
}

/// One chunk of a regular file: where its compressed bytes lie in the blob, and what they decode
/// to. This is what the fetch path needs from the TOC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Compressed bytes to fetch: from the chunk's member (frame) start up to the next member
    /// that starts another chunk (or the TOC).
    pub compressed: Range<u64>,
    /// Bytes to skip in the decompressed member before the chunk's data starts.
    pub inner_offset: u64,
    /// Offset of the chunk's first byte within the file.
    pub file_offset: u64,
    /// Decompressed length of the chunk.
    pub len: u64,
    /// sha256 of the decompressed chunk.
    pub digest: ChunkDigest,
}

/// Largest initial buffer reserved for a chunk; bigger chunks grow as real data arrives, so a
/// lying TOC cannot make us allocate.
const MAX_CHUNK_PREALLOC: u64 = 16 << 20;

/// Decompresses one chunk from its compressed bytes (`compressed` covers `chunk.compressed`) and
/// verifies its digest. Never returns unverified bytes; never allocates more than `chunk.len`.
pub fn decode_chunk(
    compression: Compression,
    name: &str,
    chunk: &ChunkInfo,
    compressed: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let bad = |reason: String| FormatError::BadChunk {
        name: name.to_string(),
        offset: chunk.compressed.start,
        reason,
    };
    let len = usize::try_from(chunk.len).map_err(|_| bad("chunk too large".into()))?;
    let mut out = Vec::with_capacity(len.min(MAX_CHUNK_PREALLOC as usize));
    let result = match compression {
        Compression::Gzip => read_exact_after(
            flate2::bufread::MultiGzDecoder::new(compressed),
            chunk.inner_offset,
            chunk.len,
            &mut out,
        ),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(compressed) {
            Ok(decoder) => read_exact_after(decoder, chunk.inner_offset, chunk.len, &mut out),
            Err(e) => Err(e),
        },
    };
    result.map_err(|e| bad(format!("cannot decompress {} bytes: {e}", chunk.len)))?;
    let actual = ChunkDigest::of(&out);
    if actual != chunk.digest {
        return Err(bad(format!(
            "digest mismatch: TOC says {}, data is {actual}",
            chunk.digest
        )));
    }
    Ok(out)
}

/// `sha256:<hex>` of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn read_exact_after(
    mut reader: impl Read,
    skip: u64,
    len: u64,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let skipped = std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())?;
    if skipped != skip {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("data ends after {skipped} bytes, before the inner offset {skip}"),
        ));
    }
    let read = (&mut reader).take(len).read_to_end(out)?;
    if read as u64 != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("data ends after {read} of {len} bytes"),
        ));
    }
    Ok(())
}
