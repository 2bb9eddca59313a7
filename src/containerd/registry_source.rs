//! The registry as the [`ImageSource`] of a pull: manifests, the config and streamed layer blobs
//! through `registry::Client` (auth, mirrors, retries and digest checks are its business).

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::FutureExt;
use tokio_util::io::ReaderStream;

use super::pull::{source_stream, FetchedManifest, ImageSource};
use super::ContainerdError;
use crate::digest::Digest;
use crate::registry::{Client, Reference, RegistryError};

/// One image reference on a registry.
pub struct RegistrySource {
    client: Client,
    reference: Reference,
}

impl RegistrySource {
    /// A source for `reference` read through `client`.
    pub fn new(client: Client, reference: Reference) -> Self {
        Self { client, reference }
    }

    /// The reference this source reads.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }
}

fn source_error(err: RegistryError) -> ContainerdError {
    ContainerdError::Source(err.to_string())
}

fn convert(fetched: crate::registry::FetchedManifest) -> FetchedManifest {
    FetchedManifest {
        media_type: fetched.media_type,
        digest: fetched.digest,
        bytes: fetched.bytes,
    }
}

impl ImageSource for RegistrySource {
    fn resolve(&self) -> BoxFuture<'_, Result<FetchedManifest, ContainerdError>> {
        async move {
            self.client
                .get_manifest(&self.reference)
                .await
                .map(convert)
                .map_err(source_error)
        }
        .boxed()
    }

    fn manifest<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<FetchedManifest, ContainerdError>> {
        async move {
            self.client
                .get_manifest(&self.reference.with_digest(digest))
                .await
                .map(convert)
                .map_err(source_error)
        }
        .boxed()
    }

    fn blob<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<Bytes, ContainerdError>> {
        async move {
            self.client
                .get_blob(&self.reference, digest)
                .await
                .map_err(source_error)
        }
        .boxed()
    }

    fn blob_stream<'a>(
        &'a self,
        digest: &'a Digest,
        _size: u64,
    ) -> BoxFuture<'a, Result<BoxStream<'static, Result<Bytes, ContainerdError>>, ContainerdError>>
    {
        async move {
            let reader = self
                .client
                .blob_reader(&self.reference, digest)
                .await
                .map_err(source_error)?;
            Ok(source_stream(
                ReaderStream::with_capacity(reader, 256 * 1024),
                digest,
            ))
        }
        .boxed()
    }

    fn distribution_source(&self) -> Option<(String, String)> {
        Some((
            self.reference.registry.clone(),
            self.reference.repository.clone(),
        ))
    }
}
