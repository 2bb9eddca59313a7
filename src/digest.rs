//! Content digests as OCI writes them (`<algorithm>:<lowercase hex>`): [`Digest`], the one type
//! that holds one (blob digests in descriptors and the registry's API are `Digest`s, checked when
//! they are parsed), and [`sha256_digest`], the one function that computes one.

use std::fmt;

use sha2::Digest as _;

/// A well-formed content digest: `sha256:` and 64 lowercase hex digits, or `sha512:` and 128.
/// Safe to use in a file name or a URL path once parsed; reads as its text (`&str`) where one is
/// wanted, and is checked when deserialized (a manifest with a malformed digest is refused).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

/// A digest that is not `<algorithm>:<lowercase hex>` of a supported algorithm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} must be <algorithm>:<hex>, e.g. sha256: and 64 lowercase hex digits")]
    Malformed(String),
    #[error("digest algorithm {algorithm:?} of {digest:?} is not sha256 or sha512")]
    Algorithm { digest: String, algorithm: String },
    #[error(
        "digest {0:?} is not sha256: and 64 lowercase hex digits (the only algorithm used here)"
    )]
    NotSha256(String),
}

impl Digest {
    /// Parses `text`, checking the algorithm and the length and case of its hex part.
    pub fn parse(text: &str) -> Result<Self, DigestError> {
        let (algorithm, hex) = text
            .split_once(':')
            .ok_or_else(|| DigestError::Malformed(text.to_string()))?;
        let expected_len = match algorithm {
            "sha256" => 64,
            "sha512" => 128,
            _ => {
                return Err(DigestError::Algorithm {
                    digest: text.to_string(),
                    algorithm: algorithm.to_string(),
                })
            }
        };
        let lowercase_hex = hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if hex.len() != expected_len || !lowercase_hex {
            return Err(DigestError::Malformed(text.to_string()));
        }
        Ok(Self(text.to_string()))
    }

    /// Parses `text` and requires sha256 (what names blobs in an OCI layout and chunks in a TOC).
    pub fn parse_sha256(text: &str) -> Result<Self, DigestError> {
        let digest = Self::parse(text)?;
        if digest.algorithm() == "sha256" {
            Ok(digest)
        } else {
            Err(DigestError::NotSha256(text.to_string()))
        }
    }

    /// The digest of a finished sha256 hash (of a stream hashed as it was written).
    pub fn of_sha256(hash: [u8; 32]) -> Self {
        Self(format!("sha256:{}", hex::encode(hash)))
    }

    /// `sha256` or `sha512`.
    pub fn algorithm(&self) -> &str {
        self.0
            .split_once(':')
            .map_or("", |(algorithm, _)| algorithm)
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, hex)| hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text)
    }
}

impl std::ops::Deref for Digest {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Digest {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<Digest> for String {
    fn eq(&self, other: &Digest) -> bool {
        *self == other.0
    }
}

impl PartialEq<Digest> for &str {
    fn eq(&self, other: &Digest) -> bool {
        *self == other.0
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> Self {
        digest.0
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> Digest {
    Digest::of_sha256(sha2::Sha256::digest(bytes).into())
}

/// The first 12 hex digits of a digest (or of any text, unchecked), for names and logs.
pub fn short_digest(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    hex.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_oci_writes_and_names_what_is_wrong() {
        let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(sha256_digest(b""), empty);
        let digest = Digest::parse(empty).unwrap();
        assert_eq!(digest.algorithm(), "sha256");
        assert_eq!(digest.hex().len(), 64);
        assert_eq!(digest.to_string(), empty);
        assert_eq!(Digest::parse_sha256(empty).unwrap(), sha256_digest(b""));
        let sha512 = format!("sha512:{}", "ab".repeat(64));
        assert!(Digest::parse(&sha512).is_ok());
        assert!(matches!(
            Digest::parse_sha256(&sha512),
            Err(DigestError::NotSha256(_))
        ));
        for bad in [
            "",
            "sha256",
            "sha256:../../etc/passwd",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(DigestError::Malformed(_))),
                "{bad}"
            );
        }
        let md5 = Digest::parse("md5:00").unwrap_err();
        assert!(md5.to_string().contains("\"md5\""), "{md5}");
        assert_eq!(short_digest(empty), "e3b0c44298fc");
    }
}
