//! Sniffs a layer stream's compression (gzip, zstd or none) and returns a reader of the plain
//! tar: the input side of conversion.

use std::io::{BufReader, Read};

use super::FormatError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

fn is_zstd_skippable(head: &[u8]) -> bool {
    matches!(head, [b0, 0x2a, 0x4d, 0x18, ..] if b0 & 0xf0 == 0x50)
}

/// Wraps `r` in a decoder chosen by its first bytes: gzip (all members), zstd (all frames,
/// skippable frames skipped), or the bytes as they are (plain tar).
pub fn decompressed_reader<R: Read + Send + 'static>(
    r: R,
) -> Result<Box<dyn Read + Send>, FormatError> {
    let mut r = r;
    let mut head = [0u8; 4];
    let mut filled = 0;
    while filled < head.len() {
        match r.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(FormatError::Io {
                    context: "reading the start of the layer stream".into(),
                    source: e,
                })
            }
        }
    }
    let head = head[..filled].to_vec();
    let source = BufReader::with_capacity(256 << 10, std::io::Cursor::new(head.clone()).chain(r));
    if head.starts_with(&GZIP_MAGIC) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(source)))
    } else if head.starts_with(&ZSTD_MAGIC) || is_zstd_skippable(&head) {
        let decoder = zstd::stream::read::Decoder::new(source).map_err(|e| FormatError::Io {
            context: "starting the zstd decoder".into(),
            source: e,
        })?;
        Ok(Box::new(decoder))
    } else {
        Ok(Box::new(source))
    }
}
