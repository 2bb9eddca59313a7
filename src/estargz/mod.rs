//! eStargz and zstd:chunked: footer, TOC types, reader (TOC and chunk digest verification) and
//! writer (chunking, prioritized files and landmarks, parallel compression).
//!
//! Reading starts from a ranged [`BlobSource`](crate::blob::BlobSource): [`open_layer`] fetches
//! the footer and the TOC only, validates every entry and yields normalized [`Entry`]s whose
//! [`ChunkInfo`]s say which compressed bytes to fetch; [`decode_chunk`] turns those bytes into
//! verified file data. [`build_layer`] writes a layer from an uncompressed tar stream.

mod chunk_decoder;
mod chunk_digest;
mod decompress;
pub mod footer;
mod reader;
mod tarfmt;
pub(crate) mod timefmt;
pub mod toc;
mod writer;

use std::ops::Range;

pub use chunk_decoder::{ChunkDecoder, Decoded};
pub use chunk_digest::{ChunkDigest, InvalidChunkDigest};
pub use decompress::decompressed_reader;
pub(crate) use reader::normalize_name;
pub use reader::{
    layer_from_toc_json, open_layer, open_layer_from_tail, open_layer_with_tail, parse_toc_json,
    verify_layer, Entry, EntryKind, Landmark, LayerToc, PrefetchPlan, VerifyReport,
    DEFAULT_TAIL_GUESS, MAX_CHUNK_LEN, MAX_TOC_SIZE,
};
pub use toc::{Toc, TocEntry, MAX_TOC_ENTRIES};
pub use writer::{build_layer, build_layer_with_threads, BuildOptions, BuiltLayer, RecordedFile};

/// The layer annotation carrying the sha256 of the uncompressed TOC JSON is [`crate::labels::TOC_DIGEST`].
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

impl FormatError {
    /// For a chunk that failed verification, a bounded label of why (`digest_mismatch`: it
    /// decoded to other bytes; `undecodable`: it did not decode to its declared length).
    pub fn chunk_failure_reason(&self) -> &'static str {
        match self {
            FormatError::BadChunk { reason, .. }
                if reason.starts_with(chunk_decoder::DIGEST_MISMATCH) =>
            {
                "digest_mismatch"
            }
            _ => "undecodable",
        }
    }

    /// The blob has no eStargz or zstd:chunked footer at all: most likely a plain gzip or zstd
    /// layer, which `lazysnap convert` rewrites.
    pub fn is_not_lazy_format(&self) -> bool {
        matches!(
            self,
            FormatError::BadFooter { .. } | FormatError::Truncated { .. }
        )
    }
}

/// How a layer's chunks decode.
#[derive(Debug, Clone)]
pub enum ChunkCoding {
    /// Each chunk starts a gzip member or a zstd frame of its own (eStargz, zstd:chunked).
    Members(Compression),
    /// Each chunk is a span of one gzip stream, decoded from its checkpoint (a plain gzip layer
    /// read through a SOCI zTOC).
    GzipSpans(std::sync::Arc<crate::soci::GzipSpans>),
}

impl From<Compression> for ChunkCoding {
    fn from(compression: Compression) -> Self {
        ChunkCoding::Members(compression)
    }
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

/// Decompresses one chunk from its compressed bytes (`compressed` covers `chunk.compressed`) and
/// verifies its digest. Never returns unverified bytes; never allocates more than `chunk.len`.
pub fn decode_chunk(
    compression: Compression,
    name: &str,
    chunk: &ChunkInfo,
    compressed: &[u8],
) -> Result<Vec<u8>, FormatError> {
    ChunkDecoder::decode_whole(compression, name, chunk, compressed)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct SharedBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn chunk_of(data: &[u8], compressed: &[u8], inner_offset: u64) -> ChunkInfo {
        ChunkInfo {
            compressed: 0..compressed.len() as u64,
            inner_offset,
            file_offset: 0,
            len: data.len() as u64,
            digest: ChunkDigest::of(data),
        }
    }

    #[test]
    fn a_failed_chunk_names_a_bounded_reason() {
        let data = b"some file data".repeat(100);
        let compressed = gzip(&data);
        let mut chunk = chunk_of(&data, &compressed, 0);
        chunk.digest = ChunkDigest::of(b"other bytes");
        let wrong = decode_chunk(Compression::Gzip, "f", &chunk, &compressed).unwrap_err();
        assert_eq!(wrong.chunk_failure_reason(), "digest_mismatch");
        let chunk = chunk_of(&data, b"not gzip at all", 0);
        let garbage = decode_chunk(Compression::Gzip, "f", &chunk, b"not gzip at all").unwrap_err();
        assert_eq!(garbage.chunk_failure_reason(), "undecodable");
    }

    #[test]
    fn chunks_decode_and_verify_and_short_or_wrong_data_is_an_error() {
        for len in [1, 256 << 10, 3 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for compression in [Compression::Gzip, Compression::Zstd] {
                let compressed = match compression {
                    Compression::Gzip => gzip(&data),
                    Compression::Zstd => zstd::encode_all(&data[..], 1).unwrap(),
                };
                let chunk = chunk_of(&data, &compressed, 0);
                let out = decode_chunk(compression, "f", &chunk, &compressed).unwrap();
                assert!(out == data, "{len} {compression:?}");
                // A wrong digest, and data cut short, are errors.
                let mut wrong = chunk.clone();
                wrong.digest = ChunkDigest::of(b"other");
                let err = decode_chunk(compression, "f", &wrong, &compressed).unwrap_err();
                assert!(err.to_string().contains("digest mismatch"), "{err}");
                let mut longer = chunk.clone();
                longer.len += 1;
                let err = decode_chunk(compression, "f", &longer, &compressed).unwrap_err();
                assert!(err.to_string().contains("data ends after"), "{err}");
                // Into a writer: the same bytes, and the same errors.
                let decode_into = |chunk: &ChunkInfo| {
                    let written = SharedBuffer::default();
                    let mut decoder = ChunkDecoder::into_writer(
                        compression,
                        "f",
                        chunk,
                        Box::new(written.clone()),
                    )
                    .unwrap();
                    decoder.feed(&compressed)?;
                    decoder.finish().map(|_| written.0.lock().unwrap().clone())
                };
                assert!(
                    decode_into(&chunk).unwrap() == data,
                    "{len} {compression:?}"
                );
                let err = decode_into(&wrong).unwrap_err();
                assert!(err.to_string().contains("digest mismatch"), "{err}");
                let err = decode_into(&longer).unwrap_err();
                assert!(err.to_string().contains("data ends after"), "{err}");
            }
        }
    }

    #[test]
    fn a_chunk_at_an_inner_offset_of_a_member_decodes() {
        let first = vec![1u8; 1000];
        let second: Vec<u8> = (0..(600 << 10)).map(|i| (i % 7) as u8).collect();
        let both = [first.clone(), second.clone()].concat();
        let compressed = gzip(&both);
        let chunk = chunk_of(&second, &compressed, first.len() as u64);
        let out = decode_chunk(Compression::Gzip, "f", &chunk, &compressed).unwrap();
        assert!(out == second);
    }

    #[test]
    fn gzip_chunks_decode_whatever_their_members_hold_around_them() {
        let first: Vec<u8> = (0..(300 << 10)).map(|i| (i % 13) as u8).collect();
        let second: Vec<u8> = (0..(200 << 10)).map(|i| (i % 5) as u8).collect();
        let shared = gzip(&[first.clone(), second.clone()].concat());
        // A chunk that is only the start of its member (the member goes on with another file).
        let chunk = chunk_of(&first, &shared, 0);
        assert!(decode_chunk(Compression::Gzip, "f", &chunk, &shared).unwrap() == first);
        // A chunk followed by another member (the next file's tar header in eStargz).
        let followed = [gzip(&first), gzip(b"next header")].concat();
        let chunk = chunk_of(&first, &followed, 0);
        assert!(decode_chunk(Compression::Gzip, "f", &chunk, &followed).unwrap() == first);
        // A chunk spanning two members.
        let spanning = [gzip(&first), gzip(&second)].concat();
        let both = [first.clone(), second.clone()].concat();
        let chunk = chunk_of(&both, &spanning, 0);
        assert!(decode_chunk(Compression::Gzip, "f", &chunk, &spanning).unwrap() == both);
        // Fed in pieces as a response streams in, the same bytes come out.
        let mut decoder = ChunkDecoder::new(Compression::Gzip, "f", &chunk).unwrap();
        for piece in spanning.chunks(7777) {
            decoder.feed(piece).unwrap();
        }
        assert!(matches!(decoder.finish().unwrap(), Decoded::Memory(out) if out == both));
        // Into a writer (a large chunk's cache file), inflated as it streams in: the same bytes.
        let written = SharedBuffer::default();
        let mut decoder =
            ChunkDecoder::into_writer(Compression::Gzip, "f", &chunk, Box::new(written.clone()))
                .unwrap();
        for piece in spanning.chunks(7777) {
            decoder.feed(piece).unwrap();
        }
        assert!(matches!(decoder.finish().unwrap(), Decoded::Written));
        assert!(*written.0.lock().unwrap() == both);
        // A flipped byte inside the deflate data is an error naming the chunk, never bytes.
        let mut corrupt = gzip(&first);
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 0x55;
        let chunk = chunk_of(&first, &corrupt, 0);
        let err = decode_chunk(Compression::Gzip, "f", &chunk, &corrupt).unwrap_err();
        assert!(err.to_string().contains("f"), "{err}");
        // Cut short: an error too.
        let whole = gzip(&first);
        let cut = &whole[..whole.len() - 100];
        let chunk = chunk_of(&first, cut, 0);
        let err = decode_chunk(Compression::Gzip, "f", &chunk, cut).unwrap_err();
        assert!(
            err.to_string().contains("cannot decompress") || err.to_string().contains("data ends"),
            "{err}"
        );
    }
}
