//! Decoding one gzip span from its compressed bytes alone: the bytes are checked against the
//! span digest, shifted to the span's first bit, and inflated as raw deflate with the
//! checkpoint's window as the dictionary.

use flate2::{Decompress, FlushDecompress, Status};
use sha2::{Digest as _, Sha256};

use super::ztoc::Span;

/// Most output reserved at once while a span inflates.
const RESERVE_STEP: usize = 4 << 20;

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

/// Bits packed as deflate packs them: from each byte's least significant bit up.
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    bits: usize,
}

impl BitWriter {
    /// The low `count` bits of `value`, least significant first (header fields, extra bits).
    fn put(&mut self, value: u32, count: u32) {
        for i in 0..count {
            if self.bits % 8 == 0 {
                self.bytes.push(0);
            }
            if (value >> i) & 1 == 1 {
                if let Some(last) = self.bytes.last_mut() {
                    *last |= 1 << (self.bits % 8);
                }
            }
            self.bits += 1;
        }
    }

    /// A Huffman code of `len` bits, most significant first.
    fn put_code(&mut self, code: u32, len: u32) {
        for i in (0..len).rev() {
            self.put((code >> i) & 1, 1);
        }
    }

    /// A non-final fixed-Huffman block holding only its end-of-block code: 10 bits, no output.
    fn empty_fixed_block(&mut self) {
        self.put(0, 1);
        self.put(1, 2);
        self.put_code(0, 7);
    }

    /// A non-final dynamic-Huffman block holding only its end-of-block code: 95 bits (7 more
    /// than a whole number of bytes), no output. Its literal/length code has one symbol, the
    /// end of block, of length 1; its one distance code is unused (length 0). The code-length
    /// code gives symbol 18 (a run of zeros) length 1 and symbols 0 and 1 length 2.
    fn empty_dynamic_block(&mut self) {
        self.put(0, 1);
        self.put(2, 2);
        self.put(0, 5); // 257 literal/length codes
        self.put(0, 5); // 1 distance code
        self.put(15, 4); // 19 code-length codes, in the format's order:
        for symbol in [
            16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
        ] {
            let len = match symbol {
                18 => 1,
                0 | 1 => 2,
                _ => 0,
            };
            self.put(len, 3);
        }
        // 256 literal lengths of 0 (runs of 138 and 118), end of block 1, distance 0.
        self.put_code(0b0, 1);
        self.put(138 - 11, 7);
        self.put_code(0b0, 1);
        self.put(118 - 11, 7);
        self.put_code(0b11, 2);
        self.put_code(0b10, 2);
        // The block's data: its end-of-block code.
        self.put_code(0b0, 1);
    }
}

/// The span's compressed bytes made into a raw deflate stream from the start: when the span
/// starts inside its first byte, empty blocks take the place of the bits before it, so that
/// every later byte keeps its position (stored blocks align to the original byte boundaries).
fn aligned(span: &Span, compressed: &[u8]) -> Vec<u8> {
    let Some((&first, rest)) = compressed.split_first().filter(|_| span.bits != 0) else {
        return compressed.to_vec();
    };
    // The bits of the first byte before the span: the low `skip` ones.
    let skip = 8 - usize::from(span.bits);
    let mut prefix = BitWriter::default();
    // Fixed blocks add 2 bits modulo 8; a dynamic block 7: together, any count.
    let fixed_blocks = if skip % 2 == 1 {
        prefix.empty_dynamic_block();
        (skip + 8 - 7) % 8 / 2
    } else {
        skip / 2
    };
    for _ in 0..fixed_blocks {
        prefix.empty_fixed_block();
    }
    debug_assert_eq!(prefix.bits % 8, skip);
    let mut out = prefix.bytes;
    if let Some(last) = out.last_mut() {
        *last |= first & !((1u8 << skip) - 1);
    }
    out.extend_from_slice(rest);
    out
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
    inflate_span(span, compressed, want)
}

/// The first `want` bytes `compressed` (from the span's first bit on) inflate to from the span's
/// checkpoint, unverified: for [`decode_span`], and for finding a checkpoint's bit offset.
pub(super) fn inflate_span(
    span: &Span,
    compressed: &[u8],
    want: usize,
) -> Result<Vec<u8>, SpanError> {
    let input = aligned(span, compressed);
    let mut inflater = Decompress::new(false);
    inflater
        .set_dictionary(&span.window)
        .map_err(|e| SpanError::Undecodable(format!("window refused: {e}")))?;
    // Reserved as output arrives: a zTOC's lengths are not trusted with memory.
    let mut out = Vec::with_capacity(want.min(RESERVE_STEP));
    loop {
        if out.len() == out.capacity() {
            out.reserve((want - out.len()).min(RESERVE_STEP));
        }
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
    fn a_stored_block_after_an_unaligned_checkpoint_keeps_its_byte_alignment() {
        // A fixed block of three literals ends 2 bits into a byte; a stored block follows.
        let mut stream = BitWriter::default();
        stream.put(0, 1);
        stream.put(1, 2);
        for &b in b"abc" {
            stream.put_code(0x30 + u32::from(b), 8); // literals 0..143: 8-bit codes from 0x30
        }
        stream.put_code(0, 7);
        assert_eq!(stream.bits, 34);
        let checkpoint = stream.bytes.len() - 1; // the byte holding the stored block's header
        let stored = b"stored bytes here, then a back-reference nowhere";
        stream.put(0, 1);
        stream.put(0, 2);
        let mut bytes = stream.bytes;
        bytes.extend_from_slice(&(stored.len() as u16).to_le_bytes());
        bytes.extend_from_slice(&(!(stored.len() as u16)).to_le_bytes());
        bytes.extend_from_slice(stored);
        bytes.push(0b0000_0011); // final fixed block: its end-of-block code
        bytes.push(0);
        // The whole stream inflates to both blocks' bytes.
        let mut whole = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::DeflateDecoder::new(&bytes[..]),
            &mut whole,
        )
        .unwrap();
        assert_eq!(whole, [&b"abc"[..], stored].concat());
        // The span from the checkpoint: 6 bits of its first byte are the span's.
        let span = span_of(b"abc", &bytes[checkpoint..], 6, stored.len() as u64);
        assert_eq!(decode_span(&span, &bytes[checkpoint..]).unwrap(), stored);
    }

    #[test]
    fn a_span_claiming_more_bytes_than_its_data_holds_is_an_error_not_an_allocation() {
        let (stream, at) = flushed(b"abc", b"defdefdef");
        let span = span_of(b"abc", &stream[at..], 0, 1 << 40);
        let err = decode_span(&span, &stream[at..]).unwrap_err();
        assert!(matches!(err, SpanError::Undecodable(_)), "{err}");
    }

    #[test]
    fn every_skipped_bit_count_makes_empty_blocks_of_that_length() {
        for skip in 1..8usize {
            let span = span_of(b"", &[0xff], 8 - skip as u8, 0);
            let out = aligned(&span, &[0xff]);
            // The high bits of the first byte are kept as they were.
            let last = *out.last().unwrap();
            assert_eq!(last >> skip, 0xff >> skip, "{skip}");
        }
    }

    #[test]
    fn a_span_starting_inside_a_byte_decodes_from_its_first_bit() {
        let first = b"lazy pulling of plain gzip layers ".repeat(2000);
        let second = b"from a checkpoint that is not byte aligned ".repeat(500);
        let (stream, at) = flushed(&first, &second);
        let window = &first[first.len() - WINDOW_SIZE..];
        // The span moved `bits_used` bits into its first byte, after that many bits of junk.
        for bits_used in 1..8u8 {
            let mut shifted = Vec::new();
            let mut carry = 0b101 & ((1u16 << bits_used) - 1);
            for &byte in &stream[at..] {
                carry |= u16::from(byte) << bits_used;
                shifted.push(carry as u8);
                carry >>= 8;
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
