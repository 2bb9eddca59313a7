//! Building the gzip checkpoints of a layer (what `soci create` stores in a zTOC): the layer is
//! inflated once, stopping at every deflate block boundary; past each `span_size` bytes of
//! output, the boundary becomes a checkpoint with the 32 KiB of output before it. zlib's safe
//! API stops at boundaries but does not say how many bits of the last byte it took, so each
//! checkpoint's bit offset is found by decoding from it at each of the 8 offsets and keeping the
//! one that gives the output that really follows.

use sha2::{Digest as _, Sha256};
use zlib_rs::{Inflate, InflateFlush, Status};

use super::span::inflate_span;
use super::ztoc::{Span, WINDOW_SIZE};

/// Output compared to settle a checkpoint's bit offset.
const PROBE_BYTES: usize = 64 << 10;
/// Compressed bytes handed to one probe: enough for [`PROBE_BYTES`] of output at any ratio a
/// real block reaches, bounded so that a probe costs little.
const PROBE_INPUT: usize = 1 << 20;

/// Why checkpoints could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("the layer is not a gzip stream lazysnap can index: {0}")]
    Gzip(String),
    #[error("no bit offset at compressed byte {at} decodes to the output that follows")]
    NoAlignment { at: u64 },
}

/// A gzip layer's spans (each with its window, bit offset and digest) and its uncompressed
/// stream.
pub struct Checkpointed {
    pub spans: Vec<Span>,
    pub uncompressed: Vec<u8>,
}

/// Inflates `gzip` (one gzip member) and cuts it into spans of at least `span_size`
/// uncompressed bytes, each decodable from its checkpoint and digested.
pub fn build_checkpoints(gzip: &[u8], span_size: u64) -> Result<Checkpointed, CheckpointError> {
    let mut inflater = Inflate::new(true, 16 + 15);
    let mut out: Vec<u8> = Vec::with_capacity(gzip.len().saturating_mul(3));
    let mut buf = vec![0u8; 256 << 10];
    // (compressed offset just past the boundary's byte, uncompressed offset) of each checkpoint.
    let mut boundaries: Vec<(u64, u64)> = Vec::new();
    let mut last = 0u64;
    loop {
        let (consumed, produced) = (inflater.total_in(), inflater.total_out());
        let input = gzip
            .get(usize::try_from(consumed).unwrap_or(usize::MAX)..)
            .unwrap_or_default();
        let status = inflater
            .decompress(input, &mut buf, InflateFlush::Block)
            .map_err(|e| CheckpointError::Gzip(format!("{e:?}")))?;
        let written = usize::try_from(inflater.total_out() - produced).unwrap_or(usize::MAX);
        out.extend_from_slice(buf.get(..written).unwrap_or_default());
        if status == Status::StreamEnd {
            break;
        }
        let progressed = written > 0 || inflater.total_in() > consumed;
        let input_left = inflater.total_in() < gzip.len() as u64;
        if !progressed || !input_left {
            return Err(CheckpointError::Gzip(format!(
                "the stream ends at compressed byte {} without its end",
                inflater.total_in()
            )));
        }
        // Stopped with room to spare: at a block boundary (or just past the gzip header).
        let total_out = out.len() as u64;
        if written < buf.len() && (boundaries.is_empty() || total_out - last > span_size) {
            boundaries.push((inflater.total_in(), total_out));
            last = total_out;
        }
    }
    // A boundary after the last block would start a span of nothing.
    let total = out.len() as u64;
    boundaries.retain(|&(_, start)| start < total || start == 0);
    let mut spans: Vec<Span> = Vec::with_capacity(boundaries.len());
    for (i, &(at, start)) in boundaries.iter().enumerate() {
        let end = boundaries
            .get(i + 1)
            .map_or(out.len() as u64, |&(_, next)| next);
        let compressed_end = boundaries
            .get(i + 1)
            .map_or(gzip.len() as u64, |&(next, _)| next);
        let window = window_before(&out, start);
        let span = aligned_span(gzip, &out, at, start..end, compressed_end, window)?;
        spans.push(span);
    }
    Ok(Checkpointed {
        spans,
        uncompressed: out,
    })
}

/// The 32 KiB of output before `at`, zero-padded at the front.
fn window_before(out: &[u8], at: u64) -> Box<[u8]> {
    let at = usize::try_from(at).unwrap_or(out.len()).min(out.len());
    let mut window = vec![0u8; WINDOW_SIZE];
    let history = &out[at.saturating_sub(WINDOW_SIZE)..at];
    window[WINDOW_SIZE - history.len()..].copy_from_slice(history);
    window.into()
}

/// The span from the boundary after byte `at - 1`: the bit offset that decodes to the output
/// that follows, its compressed range and its digest.
fn aligned_span(
    gzip: &[u8],
    out: &[u8],
    at: u64,
    uncompressed: std::ops::Range<u64>,
    compressed_end: u64,
    window: Box<[u8]>,
) -> Result<Span, CheckpointError> {
    let following = &out[usize::try_from(uncompressed.start).unwrap_or(out.len())..];
    let probe = following.len().min(PROBE_BYTES);
    for bits in 0..8u8 {
        let Some(start) = at.checked_sub(u64::from(bits != 0)) else {
            continue;
        };
        let from = usize::try_from(start).unwrap_or(usize::MAX);
        let Some(input) = gzip.get(from..(from + PROBE_INPUT).min(gzip.len())) else {
            continue;
        };
        let candidate = Span {
            compressed: start..compressed_end,
            uncompressed: uncompressed.clone(),
            bits,
            window: window.clone(),
            digest: [0; 32],
        };
        if inflate_span(&candidate, input, probe).is_ok_and(|got| got == following[..probe]) {
            let bytes = &gzip[from..usize::try_from(compressed_end).unwrap_or(gzip.len())];
            return Ok(Span {
                digest: Sha256::digest(bytes).into(),
                ..candidate
            });
        }
    }
    Err(CheckpointError::NoAlignment { at })
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::soci::decode_span;

    fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut encoder =
            flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    /// Text, incompressible bytes and runs: dynamic, stored and fixed blocks.
    fn mixed_data() -> Vec<u8> {
        let mut data = Vec::new();
        for round in 0..6u64 {
            data.extend(
                (0..200_000u64).flat_map(|i| format!("line {i} of round {round}\n").into_bytes()),
            );
            data.extend(crate::rig::images::pseudo_random_bytes(300_000, round));
            data.extend(std::iter::repeat_n(b'z', 50_000));
        }
        data
    }

    #[test]
    fn every_span_decodes_alone_to_its_part_of_the_stream() {
        let data = mixed_data();
        for level in [1, 6, 9] {
            let compressed = gzip(&data, level);
            let built = build_checkpoints(&compressed, 256 << 10).unwrap();
            assert!(built.uncompressed == data);
            // zlib-rs's fastest level writes few, long blocks: checkpoints only fall between.
            if level > 1 {
                assert!(
                    built.spans.len() > 10,
                    "level {level}: {}",
                    built.spans.len()
                );
            }
            let mut next = 0;
            for span in &built.spans {
                assert_eq!(span.uncompressed.start, next);
                next = span.uncompressed.end;
                let bytes =
                    &compressed[span.compressed.start as usize..span.compressed.end as usize];
                let decoded = decode_span(span, bytes).unwrap();
                let expected =
                    &data[span.uncompressed.start as usize..span.uncompressed.end as usize];
                assert!(
                    decoded == expected,
                    "level {level}, span at {:?}",
                    span.compressed
                );
            }
            assert_eq!(next, data.len() as u64);
            if level > 1 {
                assert!(built.spans.iter().any(|s| s.bits != 0), "level {level}");
            }
        }
    }

    #[test]
    fn a_stream_that_is_not_gzip_or_ends_early_is_an_error() {
        assert!(build_checkpoints(b"not gzip at all", 1 << 20).is_err());
        let compressed = gzip(&mixed_data(), 6);
        assert!(build_checkpoints(&compressed[..compressed.len() / 2], 1 << 20).is_err());
    }
}
