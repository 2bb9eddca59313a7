//! Platforms (`os/arch[/variant]`): the host's, parsing, matching, and choosing a manifest from
//! an index.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Descriptor, ImageError, Index};

/// A platform as it appears in an index descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from its parts.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Self {
            architecture: architecture.to_string(),
            os: os.to_string(),
            os_version: None,
            os_features: Vec::new(),
            variant: variant.map(str::to_string),
        }
    }

    /// The platform this binary runs on, in OCI spelling (`linux/amd64`, `linux/arm64/v8`, ...).
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Self::new(std::env::consts::OS, arch, variant)
    }

    /// Parses `os/arch[/variant]`, e.g. `linux/amd64` or `linux/arm/v7`.
    pub fn parse(text: &str) -> Result<Self, ImageError> {
        let parts: Vec<&str> = text.split('/').collect();
        let bad = || {
            ImageError::Invalid(format!(
                "platform {text:?} is not os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8"
            ))
        };
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        match parts.as_slice() {
            [os, arch] => Ok(Self::new(os, arch, None)),
            [os, arch, variant] => Ok(Self::new(os, arch, Some(variant))),
            _ => Err(bad()),
        }
    }

    /// The variant, with `arm64`'s implied `v8` filled in.
    fn normalized_variant(&self) -> Option<&str> {
        match (self.architecture.as_str(), self.variant.as_deref()) {
            ("arm64", None) => Some("v8"),
            (_, v) => v,
        }
    }

    /// True when an image for `candidate` runs on `self`: same os and arch, and the same variant
    /// when `self` names one.
    pub fn matches(&self, candidate: &Platform) -> bool {
        if self.os != candidate.os || self.architecture != candidate.architecture {
            return false;
        }
        match (self.variant.as_deref(), candidate.normalized_variant()) {
            (None, _) => true,
            (Some(_), cv) => self.normalized_variant() == cv,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Chooses the manifest for `platform` from `index`: the first whose platform matches, preferring
/// an exact variant match. Descriptors without a platform (attestations, ...) are never chosen.
pub fn select_platform<'a>(
    index: &'a Index,
    platform: &Platform,
) -> Result<&'a Descriptor, ImageError> {
    let matching = || {
        index
            .manifests
            .iter()
            .filter(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
    };
    let exact = matching().find(|d| {
        d.platform.as_ref().map(|p| p.normalized_variant()) == Some(platform.normalized_variant())
    });
    if let Some(found) = exact.or_else(|| matching().next()) {
        return Ok(found);
    }
    let available: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
        .collect();
    Err(ImageError::NoPlatform {
        wanted: platform.to_string(),
        available: if available.is_empty() {
            "none".to_string()
        } else {
            available.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OCI_MANIFEST;

    fn desc(digest_byte: char, p: &str) -> Descriptor {
        let mut d = Descriptor::new(
            OCI_MANIFEST,
            &crate::digest::Digest::parse(&format!(
                "sha256:{}",
                digest_byte.to_string().repeat(64)
            ))
            .unwrap(),
            1,
        );
        d.platform = Some(Platform::parse(p).unwrap());
        d
    }

    #[test]
    fn parses_and_displays() {
        assert_eq!(
            Platform::parse("linux/amd64").unwrap().to_string(),
            "linux/amd64"
        );
        assert_eq!(
            Platform::parse("linux/arm/v7").unwrap().variant.as_deref(),
            Some("v7")
        );
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
        let host = Platform::host();
        assert_eq!(host.os, "linux");
    }

    #[test]
    fn selects_by_platform_and_variant() {
        let mut index = Index::new_oci();
        index.manifests = vec![
            desc('a', "linux/arm/v6"),
            desc('b', "linux/arm/v7"),
            desc('c', "linux/amd64"),
            desc('d', "linux/arm64"),
        ];
        let pick = |p: &str| {
            select_platform(&index, &Platform::parse(p).unwrap())
                .unwrap()
                .digest
                .chars()
                .nth(7)
                .unwrap()
        };
        assert_eq!(pick("linux/amd64"), 'c');
        assert_eq!(pick("linux/arm/v7"), 'b');
        assert_eq!(pick("linux/arm"), 'a');
        assert_eq!(pick("linux/arm64/v8"), 'd');
        let err = select_platform(&index, &Platform::parse("windows/amd64").unwrap()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("windows/amd64") && text.contains("linux/arm/v7"),
            "{text}"
        );
    }
}
