//! Chunk digests in binary form: parsed once from the TOC's `sha256:<hex>`, compared as 32 bytes
//! on the fetch path and by the chunk cache, shown as `sha256:<hex>` in logs, errors and cache
//! file names.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The sha256 of a decompressed chunk: its identity in the chunk cache and what verification
/// compares fetched data against.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkDigest([u8; 32]);

/// A chunk digest that is not `sha256:<64 hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk digest {shown:?} is not sha256:<64 hex digits>")]
pub struct InvalidChunkDigest {
    /// The offending text, cut to 100 characters.
    shown: String,
}

impl ChunkDigest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> ChunkDigest {
        ChunkDigest(Sha256::digest(data).into())
    }

    /// A digest from the 32 bytes of a sha256.
    pub fn from_bytes(bytes: [u8; 32]) -> ChunkDigest {
        ChunkDigest(bytes)
    }

    /// Parses the 64 hex digits (either case) of a sha256, without the `sha256:` prefix.
    pub fn from_hex(hex_digits: &str) -> Option<ChunkDigest> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut bytes).ok()?;
        Some(ChunkDigest(bytes))
    }

    /// The 32 bytes of the sha256.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix (cache file names).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for ChunkDigest {
    type Err = InvalidChunkDigest;

    /// Parses `sha256:<64 hex digits>`; any other algorithm or form is refused.
    fn from_str(text: &str) -> Result<ChunkDigest, InvalidChunkDigest> {
        text.strip_prefix("sha256:")
            .and_then(ChunkDigest::from_hex)
            .ok_or_else(|| InvalidChunkDigest {
                shown: text.chars().take(100).collect(),
            })
    }
}

impl fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shows_and_hashes_the_same_digest() {
        let data = b"hello";
        let text = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let parsed: ChunkDigest = text.parse().unwrap();
        assert_eq!(parsed, ChunkDigest::of(data));
        assert_eq!(parsed.to_string(), text);
        assert_eq!(format!("{parsed:?}"), text);
        assert_eq!(parsed.hex(), text["sha256:".len()..]);
        let upper = format!("sha256:{}", hex::encode_upper(Sha256::digest(data)));
        assert_eq!(upper.parse::<ChunkDigest>().unwrap(), parsed);
        assert_eq!(ChunkDigest::from_bytes(*parsed.as_bytes()), parsed);
    }

    #[test]
    fn refuses_other_algorithms_and_malformed_hex() {
        let sha512 = format!("sha512:{}", "0".repeat(128));
        let long = format!("sha256:{}", "a".repeat(200));
        for bad in [
            "",
            "sha256:",
            "sha256:zz",
            "md5:00",
            "sha256:../../etc/passwd",
            &sha512,
            &long,
            &format!("sha256:{}", "0".repeat(63)),
            &format!("sha256:{}", "0".repeat(65)),
            &format!("SHA256:{}", "0".repeat(64)),
        ] {
            let error = bad.parse::<ChunkDigest>().unwrap_err();
            assert!(
                error.to_string().contains("sha256:<64 hex digits>"),
                "{bad}"
            );
            assert!(error.to_string().len() < 200, "{bad}: message not cut");
        }
    }
}
