//! Where an image lives: a registry reference, or an OCI layout directory written `oci:DIR[:TAG]`.

use std::fmt;
use std::path::PathBuf;

use super::ImageError;
use crate::registry::Reference;

/// An image location on the command line.
#[derive(Debug, Clone)]
pub enum ImageLocation {
    /// `registry/repository[:tag][@digest]`.
    Registry(Reference),
    /// `oci:DIR[:TAG]`: an OCI image layout; without a tag, the layout must hold one image.
    Layout { dir: PathBuf, tag: Option<String> },
}

impl ImageLocation {
    /// Parses `oci:DIR[:TAG]` or a registry reference.
    pub fn parse(text: &str) -> Result<Self, ImageError> {
        if let Some(rest) = text.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(ImageError::Invalid(
                    "oci: needs a directory, as in oci:/path/to/layout[:tag]".into(),
                ));
            }
            // A tag never contains '/', so a ':' followed by a '/' belongs to the directory.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => {
                    (dir, (!tag.is_empty()).then(|| tag.to_string()))
                }
                _ => (rest, None),
            };
            return Ok(Self::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        Reference::parse(text)
            .map(Self::Registry)
            .map_err(|e| ImageError::Invalid(format!("image reference {text:?}: {e}")))
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Registry(r) => write!(f, "{r}"),
            Self::Layout {
                dir,
                tag: Some(tag),
            } => write!(f, "oci:{}:{tag}", dir.display()),
            Self::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layouts_and_references() {
        match ImageLocation::parse("oci:/tmp/x:v1").unwrap() {
            ImageLocation::Layout { dir, tag } => {
                assert_eq!(dir, PathBuf::from("/tmp/x"));
                assert_eq!(tag.as_deref(), Some("v1"));
            }
            other => panic!("{other:?}"),
        }
        match ImageLocation::parse("oci:/tmp/x").unwrap() {
            ImageLocation::Layout { dir, tag } => {
                assert_eq!(dir, PathBuf::from("/tmp/x"));
                assert!(tag.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(ImageLocation::parse("oci:").is_err());
        assert!(matches!(
            ImageLocation::parse("127.0.0.1:5000/a/b:c").unwrap(),
            ImageLocation::Registry(_)
        ));
    }
}
