//! Images: manifests, indexes and configs (OCI and Docker media types), platform choice, OCI
//! layouts, and conversion of whole images to eStargz / zstd:chunked.

mod layout;
mod platform;
mod types;

pub use layout::OciLayout;
pub use platform::{select_platform, Platform};
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
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
