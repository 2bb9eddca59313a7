//! eStargz and zstd:chunked: footer, TOC types, reader (TOC and chunk digest verification) and
//! writer (chunking, prioritized files and landmarks, parallel compression).

use std::io::Read;
use std::ops::Range;

use sha2::{Digest, Sha256};

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
    /// `sha256:<hex>` of the decompressed chunk.
    pub digest: String,
}

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
    let mut out = Vec::with_capacity(len);
    let result = match compression {
        Compression::Gzip => read_exact_after(
            flate2::read::MultiGzDecoder::new(compressed),
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
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&out)));
    if actual != chunk.digest {
        return Err(bad(format!(
            "digest mismatch: TOC says {}, data is {actual}",
            chunk.digest
        )));
    }
    Ok(out)
}

fn read_exact_after(
    mut reader: impl Read,
    skip: u64,
    len: u64,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())?;
    let read = (&mut reader).take(len).read_to_end(out)?;
    if read as u64 != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("data ends after {read} of {len} bytes"),
        ));
    }
    Ok(())
}
