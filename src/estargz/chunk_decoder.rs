//! [`ChunkDecoder`]: decompresses one chunk from its compressed bytes as they arrive, hashing the
//! chunk's bytes as they come out, and verifies length and digest at the end. The one way chunks
//! are decoded: from a whole buffer ([`super::decode_chunk`]) or from a response body as it
//! streams in (so decoding overlaps the transfer).

use std::io::Write;

use sha2::{Digest as _, Sha256};

use super::{ChunkDigest, ChunkInfo, Compression, FormatError};

/// Largest initial buffer reserved for a chunk; bigger chunks grow as real data arrives, so a
/// lying TOC cannot make us allocate.
const MAX_CHUNK_PREALLOC: u64 = 16 << 20;

/// Where decompressed bytes go: the first `skip` are dropped (the chunk's inner offset in its
/// compressed member), the next `want` are kept and hashed, the rest ignored.
#[derive(Default)]
struct ChunkSink {
    skip: u64,
    want: u64,
    out: Vec<u8>,
    hasher: Sha256,
}

impl ChunkSink {
    fn complete(&self) -> bool {
        self.out.len() as u64 == self.want
    }
}

impl Write for ChunkSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let skipped = usize::try_from(self.skip)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        self.skip -= skipped as u64;
        let rest = buf.get(skipped..).unwrap_or_default();
        let room = usize::try_from(self.want - self.out.len() as u64).unwrap_or(usize::MAX);
        let kept = rest.get(..room.min(rest.len())).unwrap_or_default();
        self.out.extend_from_slice(kept);
        self.hasher.update(kept);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Decompressor {
    Gzip(Box<flate2::write::MultiGzDecoder<ChunkSink>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, ChunkSink>>),
}

impl Decompressor {
    fn sink(&self) -> &ChunkSink {
        match self {
            Decompressor::Gzip(d) => d.get_ref(),
            Decompressor::Zstd(d) => d.get_ref(),
        }
    }
}

/// Decodes one chunk of a file named `name` (for errors) from compressed bytes fed in order.
pub struct ChunkDecoder<'a> {
    name: &'a str,
    chunk: &'a ChunkInfo,
    decompressor: Decompressor,
}

impl<'a> ChunkDecoder<'a> {
    /// A decoder for `chunk`, whose compressed bytes (`chunk.compressed`) will be fed.
    pub fn new(
        compression: Compression,
        name: &'a str,
        chunk: &'a ChunkInfo,
    ) -> Result<ChunkDecoder<'a>, FormatError> {
        let sink = ChunkSink {
            skip: chunk.inner_offset,
            want: chunk.len,
            out: Vec::with_capacity(
                usize::try_from(chunk.len.min(MAX_CHUNK_PREALLOC)).unwrap_or(0),
            ),
            hasher: Sha256::new(),
        };
        let decompressor = match compression {
            Compression::Gzip => {
                Decompressor::Gzip(Box::new(flate2::write::MultiGzDecoder::new(sink)))
            }
            Compression::Zstd => zstd::stream::write::Decoder::new(sink)
                .map(|d| Decompressor::Zstd(Box::new(d)))
                .map_err(|e| bad(name, chunk, format!("cannot start the zstd decoder: {e}")))?,
        };
        Ok(ChunkDecoder {
            name,
            chunk,
            decompressor,
        })
    }

    /// Decompresses the next compressed bytes. Once the chunk is complete, more input (the rest
    /// of a member shared with later chunks) is not decompressed.
    pub fn feed(&mut self, compressed: &[u8]) -> Result<(), FormatError> {
        if self.decompressor.sink().complete() {
            return Ok(());
        }
        let result = match &mut self.decompressor {
            Decompressor::Gzip(d) => d.write_all(compressed),
            Decompressor::Zstd(d) => d.write_all(compressed),
        };
        result.map_err(|e| self.bad(format!("cannot decompress {} bytes: {e}", self.chunk.len)))
    }

    /// Ends the input: the chunk must have all its bytes, hashing to its digest.
    pub fn finish(mut self) -> Result<Vec<u8>, FormatError> {
        if !self.decompressor.sink().complete() {
            let flushed = match &mut self.decompressor {
                Decompressor::Gzip(d) => d.try_finish(),
                Decompressor::Zstd(d) => d.flush(),
            };
            flushed.map_err(|e| {
                self.bad(format!("cannot decompress {} bytes: {e}", self.chunk.len))
            })?;
        }
        let sink = std::mem::take(match &mut self.decompressor {
            Decompressor::Gzip(d) => d.get_mut(),
            Decompressor::Zstd(d) => d.get_mut(),
        });
        if !sink.complete() {
            return Err(self.bad(if sink.skip > 0 {
                format!(
                    "data ends {} bytes before the inner offset {}",
                    sink.skip, self.chunk.inner_offset
                )
            } else {
                format!("data ends after {} of {} bytes", sink.out.len(), sink.want)
            }));
        }
        let actual = ChunkDigest::from_bytes(sink.hasher.finalize().into());
        if actual != self.chunk.digest {
            return Err(self.bad(format!(
                "digest mismatch: TOC says {}, data is {actual}",
                self.chunk.digest
            )));
        }
        Ok(sink.out)
    }

    fn bad(&self, reason: String) -> FormatError {
        bad(self.name, self.chunk, reason)
    }
}

fn bad(name: &str, chunk: &ChunkInfo, reason: String) -> FormatError {
    FormatError::BadChunk {
        name: name.to_string(),
        offset: chunk.compressed.start,
        reason,
    }
}
