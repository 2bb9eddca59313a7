//! Layer footers: the 51-byte eStargz footer, the legacy 47-byte stargz footer and the 48-byte
//! zstd:chunked footer (skippable frame with a 40-byte payload). Parsing and byte-exact writing.

use super::{Compression, FormatError};

/// Size of the eStargz footer.
pub const ESTARGZ_FOOTER_SIZE: usize = 51;
/// Size of the legacy stargz footer.
pub const LEGACY_FOOTER_SIZE: usize = 47;
/// Size of the zstd:chunked footer as ctr-remote 0.12 writes it.
pub const ZSTD_FOOTER_SIZE: usize = 48;
/// Bytes to read from the end of a blob to recognise any footer.
pub const MAX_FOOTER_SIZE: usize = ESTARGZ_FOOTER_SIZE;

/// First magic of a zstd skippable frame (`0x184D2A50`), little endian on disk.
pub const ZSTD_SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// Magic at the end of the zstd:chunked footer payload.
pub const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";
/// Manifest type in the zstd:chunked footer for a TOC.
pub const ZSTD_MANIFEST_TYPE_TOC: u64 = 1;

/// Which footer a blob ends with, and what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Footer {
    /// eStargz 51-byte footer: TOC gzip member starts at `toc_offset`.
    Estargz { toc_offset: u64 },
    /// Legacy stargz 47-byte footer: TOC gzip member starts at `toc_offset`.
    Legacy { toc_offset: u64 },
    /// zstd:chunked footer: the TOC's zstd frame is `compressed_len` bytes at `toc_offset`
    /// (just past its 8-byte skippable frame header) and decompresses to `uncompressed_len`.
    ZstdChunked {
        toc_offset: u64,
        compressed_len: u64,
        uncompressed_len: u64,
    },
}

impl Footer {
    /// Length of this footer in bytes.
    pub fn len(&self) -> usize {
        match self {
            Footer::Estargz { .. } => ESTARGZ_FOOTER_SIZE,
            Footer::Legacy { .. } => LEGACY_FOOTER_SIZE,
            Footer::ZstdChunked { .. } => ZSTD_FOOTER_SIZE,
        }
    }

    /// Always false: a footer has a fixed, non-zero size.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The compression of chunks in a layer with this footer.
    pub fn compression(&self) -> Compression {
        match self {
            Footer::Estargz { .. } | Footer::Legacy { .. } => Compression::Gzip,
            Footer::ZstdChunked { .. } => Compression::Zstd,
        }
    }

    /// Compressed offset where the TOC data starts.
    pub fn toc_offset(&self) -> u64 {
        match *self {
            Footer::Estargz { toc_offset }
            | Footer::Legacy { toc_offset }
            | Footer::ZstdChunked { toc_offset, .. } => toc_offset,
        }
    }
}

/// Recognises the footer in `tail`, the last bytes of a blob of `blob_size` bytes (`tail` may be
/// shorter than [`MAX_FOOTER_SIZE`] only if the blob is). Tries eStargz, zstd:chunked, legacy.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer, FormatError> {
    if tail.len() < LEGACY_FOOTER_SIZE {
        return Err(FormatError::Truncated {
            size: blob_size,
            reason: format!(
                "the smallest footer is {LEGACY_FOOTER_SIZE} bytes, the blob ends after {}",
                tail.len()
            ),
        });
    }
    let mut reasons = Vec::new();
    if let Some(last) = last_n(tail, ESTARGZ_FOOTER_SIZE) {
        match parse_estargz(last) {
            Ok(toc_offset) => return Ok(Footer::Estargz { toc_offset }),
            Err(reason) => reasons.push(format!("eStargz: {reason}")),
        }
    }
    if let Some(last) = last_n(tail, ZSTD_FOOTER_SIZE) {
        match parse_zstd(last) {
            Ok(footer) => return Ok(footer),
            Err(reason) => reasons.push(format!("zstd:chunked: {reason}")),
        }
    }
    if let Some(last) = last_n(tail, LEGACY_FOOTER_SIZE) {
        match parse_legacy(last) {
            Ok(toc_offset) => return Ok(Footer::Legacy { toc_offset }),
            Err(reason) => reasons.push(format!("legacy stargz: {reason}")),
        }
    }
    Err(FormatError::BadFooter {
        size: blob_size,
        reason: reasons.join("; "),
    })
}

fn last_n(tail: &[u8], n: usize) -> Option<&[u8]> {
    tail.len()
        .checked_sub(n)
        .and_then(|start| tail.get(start..))
}

/// Checks the gzip header fields common to both gzip footers; returns the extra field.
fn gzip_footer_extra(footer: &[u8], xlen: usize) -> Result<&[u8], String> {
    if footer.get(0..3) != Some(&[0x1f, 0x8b, 0x08][..]) {
        return Err("not a gzip header".into());
    }
    let flags = footer.get(3).copied().unwrap_or(0);
    if flags & 0x04 == 0 {
        return Err("gzip header has no FEXTRA field".into());
    }
    let declared = footer
        .get(10..12)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        .unwrap_or(0);
    if declared != xlen {
        return Err(format!(
            "gzip extra field is {declared} bytes, expected {xlen}"
        ));
    }
    footer
        .get(12..12 + xlen)
        .ok_or_else(|| "footer too short".to_string())
}

fn parse_hex_offset(payload: &[u8]) -> Result<u64, String> {
    let (hex, magic) = payload.split_at(payload.len().min(16));
    if magic != b"STARGZ" {
        return Err("no STARGZ magic".into());
    }
    let text = std::str::from_utf8(hex).map_err(|_| "TOC offset is not hex".to_string())?;
    u64::from_str_radix(text, 16).map_err(|_| format!("TOC offset {text:?} is not hex"))
}

fn parse_estargz(footer: &[u8]) -> Result<u64, String> {
    let extra = gzip_footer_extra(footer, 26)?;
    if extra.get(0..2) != Some(&b"SG"[..]) || extra.get(2..4) != Some(&[22, 0][..]) {
        return Err("gzip extra field has no SG subfield of 22 bytes".into());
    }
    parse_hex_offset(extra.get(4..26).unwrap_or_default())
}

fn parse_legacy(footer: &[u8]) -> Result<u64, String> {
    let extra = gzip_footer_extra(footer, 22)?;
    parse_hex_offset(extra)
}

fn u64_le(bytes: &[u8], at: usize) -> u64 {
    let mut buf = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        buf.copy_from_slice(src);
    }
    u64::from_le_bytes(buf)
}

fn parse_zstd(footer: &[u8]) -> Result<Footer, String> {
    let magic = footer
        .get(0..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    if magic != ZSTD_SKIPPABLE_MAGIC {
        return Err("not a zstd skippable frame".into());
    }
    let size = footer
        .get(4..8)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    if size != 40 {
        return Err(format!("skippable frame holds {size} bytes, expected 40"));
    }
    if footer.get(40..48) != Some(&ZSTD_CHUNKED_MAGIC[..]) {
        return Err("no GnUlInUx magic".into());
    }
    let manifest_type = u64_le(footer, 32);
    if manifest_type != ZSTD_MANIFEST_TYPE_TOC {
        return Err(format!("manifest type {manifest_type}, expected 1 (TOC)"));
    }
    Ok(Footer::ZstdChunked {
        toc_offset: u64_le(footer, 8),
        compressed_len: u64_le(footer, 16),
        uncompressed_len: u64_le(footer, 24),
    })
}

/// The 51-byte eStargz footer pointing at a TOC member at `toc_offset`.
pub fn estargz_footer(toc_offset: u64) -> [u8; ESTARGZ_FOOTER_SIZE] {
    let mut out = [0u8; ESTARGZ_FOOTER_SIZE];
    out[..12].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0]);
    out[12..16].copy_from_slice(&[b'S', b'G', 22, 0]);
    let payload = format!("{toc_offset:016x}STARGZ");
    // toc_offset < 2^64 so the payload is exactly 22 bytes.
    out[16..38].copy_from_slice(&payload.as_bytes()[..22]);
    // Empty final stored deflate block, then CRC32 and ISIZE of nothing.
    out[38..43].copy_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    out
}

/// The 48-byte zstd:chunked footer.
pub fn zstd_footer(toc_offset: u64, compressed_len: u64, uncompressed_len: u64) -> [u8; 48] {
    let mut out = [0u8; ZSTD_FOOTER_SIZE];
    out[0..4].copy_from_slice(&ZSTD_SKIPPABLE_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&40u32.to_le_bytes());
    out[8..16].copy_from_slice(&toc_offset.to_le_bytes());
    out[16..24].copy_from_slice(&compressed_len.to_le_bytes());
    out[24..32].copy_from_slice(&uncompressed_len.to_le_bytes());
    out[32..40].copy_from_slice(&ZSTD_MANIFEST_TYPE_TOC.to_le_bytes());
    out[40..48].copy_from_slice(ZSTD_CHUNKED_MAGIC);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estargz_footer_round_trips() {
        let footer = estargz_footer(0x2516e);
        assert_eq!(
            parse_footer(&footer, 1000).unwrap(),
            Footer::Estargz {
                toc_offset: 0x2516e
            }
        );
        // The footer is a valid empty gzip member.
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&footer[..]), &mut out)
            .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn legacy_footer_parses() {
        let mut footer = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0];
        footer.extend_from_slice(b"00000000000001ffSTARGZ");
        footer.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(footer.len(), LEGACY_FOOTER_SIZE);
        assert_eq!(
            parse_footer(&footer, 47).unwrap(),
            Footer::Legacy { toc_offset: 0x1ff }
        );
    }

    #[test]
    fn zstd_footer_round_trips() {
        let footer = zstd_footer(1089872, 499, 1870);
        assert_eq!(
            parse_footer(&footer, 2000).unwrap(),
            Footer::ZstdChunked {
                toc_offset: 1089872,
                compressed_len: 499,
                uncompressed_len: 1870
            }
        );
    }

    #[test]
    fn garbage_is_a_bad_footer() {
        assert!(matches!(
            parse_footer(&[7u8; 51], 51),
            Err(FormatError::BadFooter { .. })
        ));
        assert!(matches!(
            parse_footer(&[7u8; 10], 10),
            Err(FormatError::Truncated { .. })
        ));
    }
}
