//! Decoding one gzip span from its compressed bytes alone: the bytes are checked against the
//! span digest, shifted to the span's first bit, and inflated as raw deflate with the
//! checkpoint's window as the dictionary.

use flate2::{Decompress, FlushDecompress, Status};
use sha2::{Digest as _, Sha256};

use super::ztoc::Span;

/// Why a span's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    /// The bytes are not the ones the zTOC recorded.
    #[error("digest mismatch: the zTOC says sha256:{expected}, the bytes are sha256:{actual}")]
    DigestMismatch { expected: String, actual: String },
    /// The bytes hash right but do not inflate to the span (a zTOC that does not fit the layer).
    #[error("cannot inflate: {0}")]
    Undecodable(String),
}

/// The compressed bytes from the span's first bit on: as they are when the span starts on a
/// byte boundary, else shifted so that they do.
fn aligned(span: &Span, compressed: &[u8]) -> Vec<u8> {
    if span.bits == 0 {
        return compressed.to_vec();
    }
    // The first byte's high `bits` bits are the span's first bits (deflate fills bytes from the
    // least significant bit).
    let shift = 8 - u32::from(span.bits);
    compressed
        .iter()
        .zip(compressed.iter().skip(1).map(Some).chain([None]))
        .map(|(&low, high)| {
            let carried = high.map_or(0u16, |&h| u16::from(h) << (8 - shift));
            ((u16::from(low) >> shift) | carried) as u8
        })
        .collect()
}

/// The span's uncompressed bytes from its compressed ones (`span.compressed` of the blob),
/// verified against the span digest first. Never returns bytes that did not verify.
pub fn decode_span(span: &Span, compressed: &[u8]) -> Result<Vec<u8>, SpanError> {
    let actual: [u8; 32] = Sha256::digest(compressed).into();
    if actual != span.digest {
        return Err(SpanError::DigestMismatch {
            expected: hex::encode(span.digest),
            actual: hex::encode(actual),
        });
    }
    let want = usize::try_from(span.uncompressed.end - span.uncompressed.start)
        .map_err(|_| SpanError::Undecodable("span too large".into()))?;
    let input = aligned(span, compressed);
    let mut inflater = Decompress::new(false);
    inflater
        .set_dictionary(&span.window)
        .map_err(|e| SpanError::Undecodable(format!("window refused: {e}")))?;
    let mut out = Vec::with_capacity(want);
    loop {
        let consumed = usize::try_from(inflater.total_in()).unwrap_or(usize::MAX);
        let before = out.len();
        let rest = input.get(consumed..).unwrap_or_default();
        let status = inflater
            .decompress_vec(rest, &mut out, FlushDecompress::None)
            .map_err(|e| SpanError::Undecodable(e.to_string()))?;
        if out.len() == want {
            return Ok(out);
        }
        let progressed = out.len() > before
            || usize::try_from(inflater.total_in()).unwrap_or(usize::MAX) > consumed;
        if status == Status::StreamEnd || !progressed {
            return Err(SpanError::Undecodable(format!(
                "{} of the span's {want} bytes",
                out.len()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::soci::ztoc::WINDOW_SIZE;

    fn span_of(window: &[u8], compressed: &[u8], bits: u8, len: u64) -> Span {
        let mut padded = vec![0u8; WINDOW_SIZE - window.len()];
        padded.extend_from_slice(window);
        Span {
            compressed: 0..compressed.len() as u64,
            uncompressed: 0..len,
            bits,
            window: padded.into(),
            digest: Sha256::digest(compressed).into(),
        }
    }

    /// A raw deflate stream of `first` then, after a full flush (a byte-aligned block
    /// boundary), `second`, which refers back into `first`; and where `second` starts.
    fn flushed(first: &[u8], second: &[u8]) -> (Vec<u8>, usize) {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(first).unwrap();
        encoder.flush().unwrap();
        let at = encoder.get_ref().len();
        encoder.write_all(second).unwrap();
        (encoder.finish().unwrap(), at)
    }

    #[test]
    fn a_span_decodes_from_its_window_and_bad_bytes_never_do() {
        let first: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let second: Vec<u8> = first[10_000..30_000].repeat(3);
        let (stream, at) = flushed(&first, &second);
        let window = &first[first.len() - WINDOW_SIZE..];
        let span = span_of(window, &stream[at..], 0, second.len() as u64);
        assert!(decode_span(&span, &stream[at..]).unwrap() == second);

        // A flipped bit: refused by the digest, not decoded.
        let mut corrupt = stream[at..].to_vec();
        corrupt[5] ^= 1;
        let err = decode_span(&span, &corrupt).unwrap_err();
        assert!(matches!(err, SpanError::DigestMismatch { .. }), "{err}");
        // The right bytes with a wrong window: they verify, but do not decode to the span.
        let wrong = span_of(&[0u8; 16], &stream[at..], 0, second.len() as u64);
        let decoded = decode_span(&wrong, &stream[at..]);
        assert!(decoded.as_deref().ok() != Some(&second[..]));
    }

    #[test]
    fn a_span_starting_inside_a_byte_is_shifted_into_place() {
        let first = b"lazy pulling of plain gzip layers ".repeat(2000);
        let second = b"from a checkpoint that is not byte aligned ".repeat(500);
        let (stream, at) = flushed(&first, &second);
        let window = &first[first.len() - WINDOW_SIZE..];
        // Move the span three bits into its first byte: prefix the stream with three bits.
        for bits_used in 1..8u8 {
            let shift = u32::from(bits_used);
            let mut shifted = Vec::new();
            let mut carry = 0u16;
            let mut carried_bits = shift;
            carry |= 0b101 & ((1 << shift) - 1);
            for &byte in &stream[at..] {
                carry |= u16::from(byte) << carried_bits;
                shifted.push(carry as u8);
                carry >>= 8;
                carried_bits = shift;
            }
            shifted.push(carry as u8);
            // The span's first byte holds `8 - bits_used` of its bits.
            let span = span_of(window, &shifted, 8 - bits_used, second.len() as u64);
            assert!(
                decode_span(&span, &shifted).unwrap() == second,
                "{bits_used}"
            );
        }
    }
}
