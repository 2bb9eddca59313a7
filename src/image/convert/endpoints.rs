//! Where a conversion reads its image and writes the result: a registry or an OCI layout, behind
//! one interface for manifests, configs and layer blobs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::blob::{BlobSource, FileBlob};
use crate::digest::{sha256_digest, Digest};
use crate::image::layout::OciLayout;
use crate::image::location::ImageLocation;
use crate::image::types::Descriptor;
use crate::image::ImageError;
use crate::registry::{Client, Reference};

use super::{io_err, registry_err, ConvertProgress};

/// Where images are read from.
pub(crate) enum Source<'a> {
    Registry {
        client: &'a Client,
        reference: Reference,
    },
    Layout {
        layout: OciLayout,
        tag: Option<String>,
    },
}

impl<'a> Source<'a> {
    /// As the user wrote it (`oci:DIR[:TAG]` or a reference).
    pub(crate) fn name(&self) -> String {
        match self {
            Source::Registry { reference, .. } => ImageLocation::Registry(reference.clone()),
            Source::Layout { layout, tag } => ImageLocation::Layout {
                dir: layout.dir().to_path_buf(),
                tag: tag.clone(),
            },
        }
        .to_string()
    }

    /// The top-level descriptor and bytes (manifest or index).
    pub(crate) async fn root(&self) -> Result<(Descriptor, Bytes), ImageError> {
        match self {
            Source::Registry { client, reference } => {
                let fetched = client
                    .get_manifest(reference)
                    .await
                    .map_err(registry_err(format!("resolving {reference}")))?;
                let descriptor = Descriptor::new(
                    &fetched.media_type,
                    &fetched.digest,
                    fetched.bytes.len() as u64,
                );
                Ok((descriptor, fetched.bytes))
            }
            Source::Layout { layout, tag } => {
                let descriptor = layout.resolve(tag.as_deref())?;
                let bytes = layout.read_blob(&descriptor.digest)?;
                Ok((descriptor, Bytes::from(bytes)))
            }
        }
    }

    pub(crate) async fn manifest(&self, descriptor: &Descriptor) -> Result<Bytes, ImageError> {
        match self {
            Source::Registry { client, reference } => {
                let r = reference.with_digest(&descriptor.digest);
                let fetched = client
                    .get_manifest(&r)
                    .await
                    .map_err(registry_err(format!("fetching manifest {r}")))?;
                Ok(fetched.bytes)
            }
            Source::Layout { layout, .. } => Ok(Bytes::from(layout.read_blob(&descriptor.digest)?)),
        }
    }

    /// Where `location` points, read through `client` when it is a registry.
    pub(crate) fn at(
        client: &'a Client,
        location: &ImageLocation,
    ) -> Result<Source<'a>, ImageError> {
        Ok(match location {
            ImageLocation::Registry(reference) => Source::Registry {
                client,
                reference: reference.clone(),
            },
            ImageLocation::Layout { dir, tag } => Source::Layout {
                layout: OciLayout::open(dir)?,
                tag: tag.clone(),
            },
        })
    }

    pub(crate) async fn small_blob(&self, digest: &Digest) -> Result<Bytes, ImageError> {
        match self {
            Source::Registry { client, reference } => client
                .get_blob(reference, digest)
                .await
                .map_err(registry_err(format!(
                    "fetching blob {digest} of {reference}"
                ))),
            Source::Layout { layout, .. } => Ok(Bytes::from(layout.read_blob(digest)?)),
        }
    }

    /// A ranged view of a blob (to detect layers that are already eStargz).
    pub(crate) fn ranged(
        &self,
        descriptor: &Descriptor,
    ) -> Result<Arc<dyn BlobSource>, ImageError> {
        match self {
            Source::Registry { client, reference } => Ok(Arc::new(client.blob(
                reference,
                &descriptor.digest,
                descriptor.size,
            ))),
            Source::Layout { layout, .. } => {
                let path = layout.blob_path(&descriptor.digest)?;
                let blob = FileBlob::open(&path)
                    .map_err(|e| ImageError::NotFound(format!("{}: {e}", path.display())))?;
                Ok(Arc::new(blob))
            }
        }
    }

    /// A local file holding the blob: the layout's own file, or a verified download into `tmp`.
    pub(crate) async fn local_file(
        &self,
        descriptor: &Descriptor,
        tmp: &Path,
        progress: &dyn ConvertProgress,
    ) -> Result<PathBuf, ImageError> {
        match self {
            Source::Layout { layout, .. } => {
                let path = layout.blob_path(&descriptor.digest)?;
                if !path.is_file() {
                    return Err(ImageError::NotFound(format!(
                        "layer {} is missing from {}",
                        descriptor.digest,
                        self.name()
                    )));
                }
                Ok(path)
            }
            Source::Registry { client, reference } => {
                use sha2::Digest as _;
                use tokio::io::AsyncReadExt;
                let digest = &descriptor.digest;
                progress.layer_phase(digest, "downloading");
                let context = || format!("downloading layer {digest} of {reference}");
                let mut reader = client
                    .blob_reader(reference, digest)
                    .await
                    .map_err(registry_err(context()))?;
                let path = tmp.join(format!("in-{}", digest.replace(':', "-")));
                let mut file = tokio::fs::File::create(&path)
                    .await
                    .map_err(io_err(format!("creating {}", path.display())))?;
                let mut hasher = sha2::Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    let n = reader.read(&mut buf).await.map_err(io_err(context()))?;
                    if n == 0 {
                        break;
                    }
                    let data = buf.get(..n).unwrap_or_default();
                    hasher.update(data);
                    file.write_all(data)
                        .await
                        .map_err(io_err(format!("writing {}", path.display())))?;
                    total += n as u64;
                    progress.layer_position(digest, total);
                }
                file.flush()
                    .await
                    .map_err(io_err(format!("writing {}", path.display())))?;
                let actual = Digest::of_sha256(hasher.finalize().into());
                if actual != *digest {
                    return Err(ImageError::Corrupt(format!(
                        "layer {digest} of {reference} downloaded as {total} bytes with digest {actual}"
                    )));
                }
                Ok(path)
            }
        }
    }
}

/// Where images are written.
pub(super) enum Sink<'a> {
    Registry {
        client: &'a Client,
        reference: Reference,
    },
    Layout {
        layout: OciLayout,
        tag: Option<String>,
    },
}

impl Sink<'_> {
    /// As the user wrote it (`oci:DIR[:TAG]` or a reference).
    pub(super) fn name(&self) -> String {
        match self {
            Sink::Registry { reference, .. } => ImageLocation::Registry(reference.clone()),
            Sink::Layout { layout, tag } => ImageLocation::Layout {
                dir: layout.dir().to_path_buf(),
                tag: tag.clone(),
            },
        }
        .to_string()
    }

    pub(super) async fn has_blob(&self, digest: &Digest) -> Result<bool, ImageError> {
        match self {
            Sink::Registry { client, reference } => client
                .blob_exists(reference, digest)
                .await
                .map_err(registry_err(format!(
                    "checking blob {digest} in {reference}"
                ))),
            Sink::Layout { layout, .. } => Ok(layout.has_blob(digest)),
        }
    }

    /// Tries a cross-repository mount from `source` (same registry only).
    pub(super) async fn mount_from(&self, source: &Source<'_>, digest: &Digest) -> bool {
        match (self, source) {
            (
                Sink::Registry { client, reference },
                Source::Registry {
                    reference: from, ..
                },
            ) if from.registry == reference.registry && from.repository != reference.repository => {
                client
                    .mount_blob(reference, digest, &from.repository)
                    .await
                    .unwrap_or(false)
            }
            _ => false,
        }
    }

    pub(super) async fn push_file(&self, digest: &Digest, path: &Path) -> Result<(), ImageError> {
        match self {
            Sink::Registry { client, reference } => client
                .push_blob_file(reference, digest, path)
                .await
                .map_err(registry_err(format!(
                    "pushing blob {digest} to {reference}"
                ))),
            Sink::Layout { layout, .. } => layout.import_blob_file(digest, path),
        }
    }

    pub(super) async fn push_bytes(&self, digest: &Digest, bytes: Bytes) -> Result<(), ImageError> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        match self {
            Sink::Registry { client, reference } => client
                .push_blob_bytes(reference, digest, bytes)
                .await
                .map_err(registry_err(format!(
                    "pushing blob {digest} to {reference}"
                ))),
            Sink::Layout { layout, .. } => layout.write_blob(&bytes).map(|_| ()),
        }
    }

    /// Stores a manifest or index by digest (children of an index) and returns its descriptor.
    pub(super) async fn put_child(
        &self,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Descriptor, ImageError> {
        let digest = sha256_digest(&bytes);
        let descriptor = Descriptor::new(media_type, &digest, bytes.len() as u64);
        match self {
            Sink::Registry { client, reference } => {
                let r = reference.with_digest(&digest);
                client
                    .put_manifest(&r, media_type, bytes)
                    .await
                    .map_err(registry_err(format!(
                        "pushing manifest {digest} to {reference}"
                    )))?;
            }
            Sink::Layout { layout, .. } => {
                layout.write_blob(&bytes)?;
            }
        }
        Ok(descriptor)
    }

    /// Stores the top-level manifest or index under the destination's tag.
    pub(super) async fn put_root(
        &self,
        mut descriptor: Descriptor,
        bytes: Bytes,
    ) -> Result<Descriptor, ImageError> {
        match self {
            Sink::Registry { client, reference } => {
                client
                    .put_manifest(reference, &descriptor.media_type, bytes)
                    .await
                    .map_err(registry_err(format!("pushing the manifest to {reference}")))?;
            }
            Sink::Layout { layout, tag } => {
                layout.write_blob(&bytes)?;
                let mut entry = descriptor.clone();
                entry.platform = None;
                layout.add_to_index(entry, tag.as_deref())?;
                descriptor.annotations.clear();
            }
        }
        Ok(descriptor)
    }
}
