//! Images: manifests, indexes and configs (OCI and Docker media types), platform choice, OCI
//! layouts, and conversion of whole images to eStargz / zstd:chunked.

mod convert;
mod layout;
mod location;
mod platform;
mod resolve;
mod types;

pub use convert::{
    convert_image, ConvertOptions, ConvertProgress, ConvertReport, ImageReport, LayerAction,
    LayerReport, NoProgress,
};
pub use layout::OciLayout;
pub use location::ImageLocation;
pub use platform::{select_platform, Platform};
pub use resolve::{image_config, resolve_image, ResolvedImage};
pub use types::*;

/// Errors reading, writing or converting images; each names the image, blob or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image, tag or blob does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Malformed input (manifest, reference, platform, digest).
    #[error("invalid: {0}")]
    Invalid(String),
    /// Content does not match its digest.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// No manifest in an index matches the wanted platform.
    #[error("no image for platform {wanted} in the index (available: {available}); choose one with --platform or use --all-platforms")]
    NoPlatform { wanted: String, available: String },
    /// A registry operation failed.
    #[error("{context}: {source}")]
    Registry {
        context: String,
        #[source]
        source: crate::registry::RegistryError,
    },
    /// A layer could not be read or written in the eStargz / zstd:chunked format.
    #[error("{context}: {source}")]
    Format {
        context: String,
        #[source]
        source: crate::estargz::FormatError,
    },
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
