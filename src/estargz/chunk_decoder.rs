//! [`ChunkDecoder`]: decompresses one chunk from its compressed bytes, fed as they arrive, and
//! verifies length and digest at the end. The one way chunks are decoded: from a whole buffer
//! ([`super::decode_chunk`]) or from a response body as it streams in. zstd is decompressed (and
//! hashed) as it arrives; gzip is gathered and inflated in one call at the end, with libdeflate,
//! which is several times faster than a streaming inflater and so ends sooner even on loopback.

use std::io::Write;

use sha2::{Digest as _, Sha256};

use super::{ChunkCoding, ChunkDigest, ChunkInfo, Compression, FormatError};
use crate::buffer_pool::POOL;

/// Largest initial buffer reserved for a chunk; bigger chunks grow as real data arrives, so a
/// lying TOC cannot make us allocate.
const MAX_CHUNK_PREALLOC: u64 = 16 << 20;

/// Compressed bytes of a gzip chunk, gathered for one inflate call, in a pooled buffer.
struct Gathered(Vec<u8>);

impl Drop for Gathered {
    fn drop(&mut self) {
        POOL.give_back(std::mem::take(&mut self.0));
    }
}

/// Room left after a gzip chunk for the tar padding and headers that follow it in its member, when
/// the member's own size is not known (its range ends in another member).
const TRAILING_TAR_SLACK: u64 = 64 << 10;

/// Where decompressed bytes go: the first `skip` are dropped (the chunk's inner offset in its
/// compressed member), the next `want` are kept and hashed, the rest ignored.
#[derive(Default)]
struct ChunkSink {
    skip: u64,
    want: u64,
    out: SinkOut,
    hasher: Sha256,
}

/// What a [`ChunkSink`] keeps the chunk in.
enum SinkOut {
    Memory(Vec<u8>),
    /// A writer of the caller's (a cache file): memory stays bounded whatever the chunk's size.
    Writer {
        to: Box<dyn Write + Send>,
        written: u64,
    },
}

impl Default for SinkOut {
    fn default() -> Self {
        SinkOut::Memory(Vec::new())
    }
}

/// A decoded chunk: its bytes, or the note that they went to the writer given to
/// [`ChunkDecoder::into_writer`].
#[derive(Debug)]
pub enum Decoded {
    Memory(Vec<u8>),
    Written,
}

impl Decoded {
    /// The bytes of a chunk decoded into memory (a decoder made by [`ChunkDecoder::new`]).
    fn into_memory(self, name: &str, chunk: &ChunkInfo) -> Result<Vec<u8>, FormatError> {
        match self {
            Decoded::Memory(data) => Ok(data),
            Decoded::Written => Err(bad(name, chunk, "decoded into memory, yet written".into())),
        }
    }
}

/// The decompressor that streams into `sink`: zstd, or gzip inflated as it arrives.
fn streaming(
    compression: Compression,
    name: &str,
    chunk: &ChunkInfo,
    sink: ChunkSink,
) -> Result<Decompressor, FormatError> {
    Ok(match compression {
        Compression::Gzip => {
            Decompressor::GzipStream(Box::new(flate2::write::MultiGzDecoder::new(sink)))
        }
        Compression::Zstd => zstd::stream::write::Decoder::new(sink)
            .map(|d| Decompressor::Zstd(Box::new(d)))
            .map_err(|e| bad(name, chunk, format!("cannot start the zstd decoder: {e}")))?,
    })
}

impl ChunkSink {
    fn for_chunk(chunk: &ChunkInfo) -> ChunkSink {
        ChunkSink {
            skip: chunk.inner_offset,
            want: chunk.len,
            out: SinkOut::Memory(
                POOL.take(usize::try_from(chunk.len.min(MAX_CHUNK_PREALLOC)).unwrap_or(0)),
            ),
            hasher: Sha256::new(),
        }
    }

    fn into_writer(chunk: &ChunkInfo, to: Box<dyn Write + Send>) -> ChunkSink {
        ChunkSink {
            skip: chunk.inner_offset,
            want: chunk.len,
            out: SinkOut::Writer { to, written: 0 },
            hasher: Sha256::new(),
        }
    }

    fn kept(&self) -> u64 {
        match &self.out {
            SinkOut::Memory(out) => out.len() as u64,
            SinkOut::Writer { written, .. } => *written,
        }
    }

    fn complete(&self) -> bool {
        self.kept() == self.want
    }

    /// The chunk, if all of it arrived and it hashes to its digest.
    fn verified(self, name: &str, chunk: &ChunkInfo) -> Result<Decoded, FormatError> {
        if !self.complete() {
            return Err(bad(
                name,
                chunk,
                if self.skip > 0 {
                    format!(
                        "data ends {} bytes before the inner offset {}",
                        self.skip, chunk.inner_offset
                    )
                } else {
                    format!("data ends after {} of {} bytes", self.kept(), self.want)
                },
            ));
        }
        check_digest(
            name,
            chunk,
            ChunkDigest::from_bytes(self.hasher.finalize().into()),
        )?;
        match self.out {
            SinkOut::Memory(out) => Ok(Decoded::Memory(out)),
            SinkOut::Writer { mut to, .. } => {
                to.flush().map_err(|e| {
                    bad(name, chunk, format!("cannot write the decoded chunk: {e}"))
                })?;
                Ok(Decoded::Written)
            }
        }
    }
}

fn check_digest(name: &str, chunk: &ChunkInfo, actual: ChunkDigest) -> Result<(), FormatError> {
    if actual != chunk.digest {
        return Err(bad(
            name,
            chunk,
            format!(
                "{DIGEST_MISMATCH}: TOC says {}, data is {actual}",
                chunk.digest
            ),
        ));
    }
    Ok(())
}

/// Inflates a gzip chunk from all its compressed bytes and verifies it. The member holding the
/// chunk is inflated in one libdeflate call, into a buffer sized by the gzip trailer (or with
/// [`TRAILING_TAR_SLACK`] to spare): eStargz writers put the tar padding and the headers of the
/// entries that follow a file's last chunk in the same member, and a chunk's range usually holds
/// just that member. Anything else (a chunk spanning members, a range of several members, corrupt
/// data) goes through the streaming decoder, which also names what is wrong.
fn inflate_gzip(name: &str, chunk: &ChunkInfo, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
    let needed = chunk.inner_offset.checked_add(chunk.len);
    let member_len = compressed
        .len()
        .checked_sub(4)
        .and_then(|at| compressed.get(at..))
        .and_then(|trailer| <[u8; 4]>::try_from(trailer).ok())
        .map_or(0, |isize| u64::from(u32::from_le_bytes(isize)));
    let fits = needed
        .map(|needed| {
            (
                needed,
                needed.saturating_add(TRAILING_TAR_SLACK).max(member_len),
            )
        })
        .filter(|&(_, out_len)| out_len <= MAX_CHUNK_PREALLOC)
        .and_then(|(needed, out_len)| {
            Some((
                usize::try_from(needed).ok()?,
                usize::try_from(out_len).ok()?,
            ))
        });
    if let Some((needed, out_len)) = fits {
        let mut out = POOL.take_sized(out_len);
        let inflated = libdeflater::Decompressor::new().gzip_decompress(compressed, &mut out);
        if inflated.is_ok_and(|n| n >= needed) {
            out.truncate(needed);
            let skip = usize::try_from(chunk.inner_offset).unwrap_or(0);
            if skip > 0 {
                out.drain(..skip);
            }
            check_digest(name, chunk, ChunkDigest::of(&out))?;
            return Ok(out);
        }
        POOL.give_back(out);
    }
    let mut decoder = flate2::write::MultiGzDecoder::new(ChunkSink::for_chunk(chunk));
    decoder
        .write_all(compressed)
        .and_then(|()| decoder.try_finish())
        .map_err(|e| undecodable(name, chunk, e))?;
    std::mem::take(decoder.get_mut())
        .verified(name, chunk)?
        .into_memory(name, chunk)
}

impl Write for ChunkSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let skipped = usize::try_from(self.skip)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        self.skip -= skipped as u64;
        let rest = buf.get(skipped..).unwrap_or_default();
        let room = usize::try_from(self.want - self.kept()).unwrap_or(usize::MAX);
        let kept = rest.get(..room.min(rest.len())).unwrap_or_default();
        match &mut self.out {
            SinkOut::Memory(out) => out.extend_from_slice(kept),
            SinkOut::Writer { to, written } => {
                to.write_all(kept)?;
                *written += kept.len() as u64;
            }
        }
        self.hasher.update(kept);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Decompressor {
    /// gzip: gathered, inflated at the end by [`inflate_gzip`].
    Gzip(Gathered),
    /// gzip into a writer: inflated as it arrives.
    GzipStream(Box<flate2::write::MultiGzDecoder<ChunkSink>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, ChunkSink>>),
    /// A gzip span: gathered, checked against its digest and inflated from its checkpoint at
    /// the end, into memory or into `to`.
    Span {
        gathered: Gathered,
        spans: std::sync::Arc<crate::soci::GzipSpans>,
        to: Option<Box<dyn Write + Send>>,
    },
}

/// Decodes one chunk of a file named `name` (for errors) from compressed bytes fed in order. It
/// owns what it needs, so a chunk received on one thread can be finished on another.
pub struct ChunkDecoder {
    name: String,
    chunk: ChunkInfo,
    decompressor: Decompressor,
}

impl ChunkDecoder {
    /// A decoder for `chunk`, whose compressed bytes (`chunk.compressed`) will be fed.
    pub fn new(
        coding: impl Into<ChunkCoding>,
        name: &str,
        chunk: &ChunkInfo,
    ) -> Result<ChunkDecoder, FormatError> {
        let compression = match coding.into() {
            ChunkCoding::Members(compression) => compression,
            ChunkCoding::GzipSpans(spans) => return Ok(Self::span(name, chunk, spans, None)),
        };
        let decompressor = match compression {
            Compression::Gzip => {
                let range = chunk.compressed.end.saturating_sub(chunk.compressed.start);
                Decompressor::Gzip(Gathered(
                    POOL.take(usize::try_from(range.min(MAX_CHUNK_PREALLOC)).unwrap_or(0)),
                ))
            }
            Compression::Zstd => streaming(compression, name, chunk, ChunkSink::for_chunk(chunk))?,
        };
        Ok(ChunkDecoder {
            name: name.to_string(),
            chunk: chunk.clone(),
            decompressor,
        })
    }

    /// A decoder for `chunk` that writes the decoded bytes to `to` as they are inflated (both
    /// formats stream), for chunks too large to hold in memory; [`finish`](Self::finish) then
    /// answers [`Decoded::Written`].
    pub fn into_writer(
        coding: impl Into<ChunkCoding>,
        name: &str,
        chunk: &ChunkInfo,
        to: Box<dyn Write + Send>,
    ) -> Result<ChunkDecoder, FormatError> {
        let compression = match coding.into() {
            ChunkCoding::Members(compression) => compression,
            ChunkCoding::GzipSpans(spans) => return Ok(Self::span(name, chunk, spans, Some(to))),
        };
        let decompressor = streaming(compression, name, chunk, ChunkSink::into_writer(chunk, to))?;
        Ok(ChunkDecoder {
            name: name.to_string(),
            chunk: chunk.clone(),
            decompressor,
        })
    }

    /// A decoder for the gzip span `chunk` is (one of `spans`), into memory or into `to`.
    fn span(
        name: &str,
        chunk: &ChunkInfo,
        spans: std::sync::Arc<crate::soci::GzipSpans>,
        to: Option<Box<dyn Write + Send>>,
    ) -> ChunkDecoder {
        let range = chunk.compressed.end.saturating_sub(chunk.compressed.start);
        ChunkDecoder {
            name: name.to_string(),
            chunk: chunk.clone(),
            decompressor: Decompressor::Span {
                gathered: Gathered(
                    POOL.take(usize::try_from(range.min(MAX_CHUNK_PREALLOC)).unwrap_or(0)),
                ),
                spans,
                to,
            },
        }
    }

    /// Takes the next compressed bytes. Once a zstd chunk is complete, more input (the rest of a
    /// frame shared with later chunks) is not decompressed.
    pub fn feed(&mut self, compressed: &[u8]) -> Result<(), FormatError> {
        match &mut self.decompressor {
            Decompressor::Gzip(gathered) | Decompressor::Span { gathered, .. } => {
                gathered.0.extend_from_slice(compressed);
                Ok(())
            }
            Decompressor::Zstd(d) if !d.get_ref().complete() => d
                .write_all(compressed)
                .map_err(|e| undecodable(&self.name, &self.chunk, e)),
            Decompressor::GzipStream(d) if !d.get_ref().complete() => d
                .write_all(compressed)
                .map_err(|e| undecodable(&self.name, &self.chunk, e)),
            Decompressor::Zstd(_) | Decompressor::GzipStream(_) => Ok(()),
        }
    }

    /// Ends the input: the chunk must have all its bytes, hashing to its digest.
    pub fn finish(self) -> Result<Decoded, FormatError> {
        match self.decompressor {
            Decompressor::Gzip(gathered) => {
                inflate_gzip(&self.name, &self.chunk, &gathered.0).map(Decoded::Memory)
            }
            Decompressor::GzipStream(mut d) => {
                if !d.get_ref().complete() {
                    d.try_finish()
                        .map_err(|e| undecodable(&self.name, &self.chunk, e))?;
                }
                std::mem::take(d.get_mut()).verified(&self.name, &self.chunk)
            }
            Decompressor::Zstd(mut d) => {
                if !d.get_ref().complete() {
                    d.flush()
                        .map_err(|e| undecodable(&self.name, &self.chunk, e))?;
                }
                std::mem::take(d.get_mut()).verified(&self.name, &self.chunk)
            }
            Decompressor::Span {
                gathered,
                spans,
                to,
            } => decode_span(&self.name, &self.chunk, &spans, &gathered.0, to),
        }
    }

    /// Decodes a chunk from all its compressed bytes at once (gzip without gathering a copy).
    pub fn decode_whole(
        compression: Compression,
        name: &str,
        chunk: &ChunkInfo,
        compressed: &[u8],
    ) -> Result<Vec<u8>, FormatError> {
        if compression == Compression::Gzip {
            return inflate_gzip(name, chunk, compressed);
        }
        let mut decoder = ChunkDecoder::new(compression, name, chunk)?;
        decoder.feed(compressed)?;
        decoder.finish()?.into_memory(name, chunk)
    }
}

/// Decodes the gzip span `chunk` from its compressed bytes: verified against the span digest,
/// inflated from its checkpoint, and checked to be as long as the chunk.
fn decode_span(
    name: &str,
    chunk: &ChunkInfo,
    spans: &crate::soci::GzipSpans,
    compressed: &[u8],
    to: Option<Box<dyn Write + Send>>,
) -> Result<Decoded, FormatError> {
    let span = spans
        .starting_at(chunk.compressed.start)
        .filter(|span| span.compressed == chunk.compressed)
        .ok_or_else(|| bad(name, chunk, "no gzip span of the zTOC is this chunk".into()))?;
    let data = crate::soci::decode_span(span, compressed).map_err(|e| {
        let prefix = match e {
            crate::soci::SpanError::DigestMismatch { .. } => DIGEST_MISMATCH,
            crate::soci::SpanError::Undecodable(_) => "gzip span",
        };
        bad(name, chunk, format!("{prefix}: {e}"))
    })?;
    if data.len() as u64 != chunk.len {
        return Err(bad(
            name,
            chunk,
            format!(
                "gzip span decodes to {} bytes, not {}",
                data.len(),
                chunk.len
            ),
        ));
    }
    match to {
        None => Ok(Decoded::Memory(data)),
        Some(mut to) => {
            to.write_all(&data)
                .and_then(|()| to.flush())
                .map_err(|e| bad(name, chunk, format!("cannot write the decoded chunk: {e}")))?;
            Ok(Decoded::Written)
        }
    }
}

/// How the reason of a chunk whose bytes decode but hash wrong starts.
pub(super) const DIGEST_MISMATCH: &str = "digest mismatch";

fn undecodable(name: &str, chunk: &ChunkInfo, e: std::io::Error) -> FormatError {
    bad(
        name,
        chunk,
        format!("cannot decompress {} bytes: {e}", chunk.len),
    )
}

fn bad(name: &str, chunk: &ChunkInfo, reason: String) -> FormatError {
    FormatError::BadChunk {
        name: name.to_string(),
        offset: chunk.compressed.start,
        reason,
    }
}
