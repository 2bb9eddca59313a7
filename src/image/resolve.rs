//! Resolving an image reference to the manifest of the node's platform, and reading its config.

use std::sync::Arc;

use crate::blob::BlobSource;
use crate::image::location::ImageLocation;
use crate::image::types::{is_index, parse_json, Descriptor, ImageConfig, Index, Manifest};
use crate::image::{select_platform, ImageError, Platform};
use crate::registry::Client;

use super::convert::{effective_media_type, Source};

/// An image manifest resolved for reading its layers (inspect, mount, pull); its config is
/// fetched only by those that need it ([`image_config`]).
pub struct ResolvedImage {
    /// The manifest's descriptor (platform set when it came from an index).
    pub descriptor: Descriptor,
    pub manifest: Manifest,
    /// One ranged blob per entry of `manifest.layers`.
    pub blobs: Vec<Arc<dyn BlobSource>>,
}

/// Resolves `location` to one image manifest (choosing `platform` from an index) with ranged
/// access to each of its layer blobs.
pub async fn resolve_image(
    client: &Client,
    location: &ImageLocation,
    platform: &Platform,
) -> Result<ResolvedImage, ImageError> {
    let source = Source::at(client, location)?;
    let (root, bytes) = source.root().await?;
    let media_type = effective_media_type(&root.media_type, &bytes);
    let (descriptor, bytes) = if is_index(&media_type) {
        let index: Index = parse_json(&format!("index of {}", source.name()), &bytes)?;
        let chosen = select_platform(&index, platform)
            .map_err(|e| ImageError::Invalid(format!("{}: {e}", source.name())))?
            .clone();
        let bytes = source.manifest(&chosen).await?;
        (chosen, bytes)
    } else {
        let mut root = root;
        root.media_type = media_type;
        (root, bytes)
    };
    let what = format!("manifest {} of {}", descriptor.digest, source.name());
    let manifest: Manifest = parse_json(&what, &bytes)?;
    let blobs = manifest
        .layers
        .iter()
        .map(|l| source.ranged(l))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ResolvedImage {
        descriptor,
        manifest,
        blobs,
    })
}

/// The config `manifest` names, of the image at `location` (one more round trip to a
/// registry).
pub async fn image_config(
    client: &Client,
    location: &ImageLocation,
    manifest: &Manifest,
) -> Result<ImageConfig, ImageError> {
    let source = Source::at(client, location)?;
    let digest = &manifest.config.digest;
    let bytes = source.small_blob(digest).await?;
    parse_json(&format!("config {digest} of {}", source.name()), &bytes)
}
