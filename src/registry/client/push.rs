//! Writing to a registry: blob existence checks, cross-repository mounts, uploads (monolithic or
//! chunked, from memory or a file) and manifest pushes.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use tracing::Instrument as _;

use crate::digest::{sha256_digest, Digest};
use crate::registry::reference::Reference;
use crate::registry::retry::{status_failure, Backoff, Failure};
use crate::registry::{verify_digest, RegistryError};

use super::{header_str, pull_scope, Body, Client, Endpoint, Request};

pub(super) fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

/// The `Location` of an upload, resolved against the request URL.
pub(super) fn upload_location(base: &str, headers: &HeaderMap) -> Result<reqwest::Url, Failure> {
    let location = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Failure::fatal(RegistryError::Corrupt(
                "upload answer without Location".into(),
            ))
        })?;
    reqwest::Url::parse(base)
        .and_then(|b| b.join(location))
        .map_err(|_| {
            Failure::fatal(RegistryError::Corrupt(
                "upload Location is not a URL".into(),
            ))
        })
}

/// `Range: 0-<end>` of an upload status.
pub(super) fn range_end(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(reqwest::header::RANGE)?.to_str().ok()?;
    let value = value.strip_prefix("bytes=").unwrap_or(value);
    value.split_once('-')?.1.trim().parse().ok()
}

impl Client {
    /// HEAD: does the repository have blob `digest`?
    pub async fn blob_exists(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let scope = push_scope(&reference.repository);
        let span = tracing::info_span!("registry.blob_exists", registry = %reference.registry, repository = %reference.repository, digest = %digest);
        self.with_endpoints(
            reference,
            |c| c.push,
            "checking blob",
            |endpoint| {
                let scope = scope.as_str();
                async move {
                    let url = endpoint.url(&format!("{}/blobs/{digest}", reference.repository));
                    let response = self
                        .send(
                            &endpoint,
                            &Request {
                                method: Method::HEAD,
                                url,
                                headers: HeaderMap::new(),
                                body: Body::Empty,
                                scope,
                                timeout: self.inner.config.request_timeout,
                            },
                        )
                        .await?;
                    match response.status() {
                        s if s.is_success() => Ok(true),
                        StatusCode::NOT_FOUND => Ok(false),
                        s => Err(status_failure(
                            &format!("HEAD blob {digest} of {}", reference.repository),
                            s,
                            response.headers(),
                        )),
                    }
                }
            },
        )
        .instrument(span)
        .await
    }

    /// Cross-repository mount of `digest` from `from_repository` (same registry). `Ok(false)`
    /// when the registry did not mount it (then upload it).
    pub async fn mount_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        from_repository: &str,
    ) -> Result<bool, RegistryError> {
        let scope = format!(
            "{} {}",
            push_scope(&reference.repository),
            pull_scope(from_repository)
        );
        let span = tracing::info_span!("registry.mount_blob", registry = %reference.registry, repository = %reference.repository, digest = %digest, from = from_repository);
        let result = self
            .with_endpoints(
                reference,
                |c| c.push,
                "mounting blob",
                |endpoint| {
                    let scope = scope.as_str();
                    async move {
                        let url = endpoint.url(&format!(
                            "{}/blobs/uploads/?mount={digest}&from={from_repository}",
                            reference.repository
                        ));
                        let response = self
                            .send(
                                &endpoint,
                                &Request {
                                    method: Method::POST,
                                    url: url.clone(),
                                    headers: HeaderMap::new(),
                                    body: Body::Empty,
                                    scope,
                                    timeout: self.inner.config.request_timeout,
                                },
                            )
                            .await?;
                        match response.status() {
                            StatusCode::CREATED => Ok(true),
                            StatusCode::ACCEPTED => {
                                // An upload session was opened instead; cancel it (best effort).
                                if let Some(loc) = header_str(response.headers(), "location") {
                                    if let Ok(u) =
                                        reqwest::Url::parse(&url).and_then(|b| b.join(&loc))
                                    {
                                        let _ = self
                                            .send(
                                                &endpoint,
                                                &Request {
                                                    method: Method::DELETE,
                                                    url: u.to_string(),
                                                    headers: HeaderMap::new(),
                                                    body: Body::Empty,
                                                    scope,
                                                    timeout: self.inner.config.request_timeout,
                                                },
                                            )
                                            .await;
                                    }
                                }
                                Ok(false)
                            }
                            s => Err(status_failure(
                                &format!(
                                    "mounting {digest} from {from_repository} into {}",
                                    reference.repository
                                ),
                                s,
                                response.headers(),
                            )),
                        }
                    }
                },
            )
            .instrument(span)
            .await;
        match result {
            Ok(mounted) => Ok(mounted),
            // No access to the source repository or it lacks the blob: upload instead.
            Err(
                RegistryError::Auth(_) | RegistryError::NotFound(_) | RegistryError::Invalid(_),
            ) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads `bytes` as blob `digest` (monolithic PUT); verifies the digest locally first.
    pub async fn push_blob_bytes(
        &self,
        reference: &Reference,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        verify_digest(digest, &bytes, "blob to push")?;
        let span = tracing::info_span!("registry.push_blob", registry = %reference.registry, repository = %reference.repository, digest = %digest, size = bytes.len());
        self.upload(reference, digest, Body::Bytes(bytes))
            .instrument(span)
            .await
    }

    /// Uploads the file at `path` as blob `digest`, streamed from disk (multi-GB files are
    /// sent in `upload_chunk_size` PATCH chunks, resumed after transient failures).
    pub async fn push_blob_file(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
    ) -> Result<(), RegistryError> {
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| {
                RegistryError::Invalid(format!("stat {} for upload: {e}", path.display()))
            })?
            .len();
        let span = tracing::info_span!("registry.push_blob", registry = %reference.registry, repository = %reference.repository, digest = %digest, size);
        self.upload(
            reference,
            digest,
            Body::File {
                path: path.to_path_buf(),
                offset: 0,
                len: size,
            },
        )
        .instrument(span)
        .await
    }

    pub(super) async fn upload(
        &self,
        reference: &Reference,
        digest: &Digest,
        body: Body,
    ) -> Result<(), RegistryError> {
        let scope = push_scope(&reference.repository);
        let size = body.len();
        let chunk = self.inner.config.upload_chunk_size.max(1);
        self.with_endpoints(
            reference,
            |c| c.push,
            "uploading blob",
            |endpoint| {
                let scope = scope.as_str();
                let body = body.clone();
                async move {
                    let location = self
                        .start_upload(&endpoint, &reference.repository, scope)
                        .await?;
                    let location = if size > chunk {
                        self.upload_chunks(&endpoint, location, &body, scope)
                            .await?
                    } else {
                        location
                    };
                    let final_body = if size > chunk { Body::Empty } else { body };
                    let mut url = location;
                    url.query_pairs_mut().append_pair("digest", digest);
                    let mut headers = HeaderMap::new();
                    headers.insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    let response = self
                        .send(
                            &endpoint,
                            &Request {
                                method: Method::PUT,
                                url: url.to_string(),
                                headers,
                                timeout: self.upload_timeout(final_body.len()),
                                body: final_body,
                                scope,
                            },
                        )
                        .await?;
                    if response.status() != StatusCode::CREATED && !response.status().is_success() {
                        let mut failure = status_failure(
                            &format!("completing upload of {digest} to {}", reference.repository),
                            response.status(),
                            response.headers(),
                        );
                        if response.status() == StatusCode::BAD_REQUEST {
                            failure.error = RegistryError::Invalid(format!(
                                "{} (the registry rejected the digest or size)",
                                failure.error
                            ));
                        }
                        return Err(failure);
                    }
                    Ok(())
                }
            },
        )
        .await
    }

    pub(super) fn upload_timeout(&self, len: u64) -> Duration {
        // Allow at least 1 MiB/s on top of the request timeout for large bodies.
        self.inner.config.request_timeout + Duration::from_secs(len >> 20)
    }

    pub(super) async fn start_upload(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        scope: &str,
    ) -> Result<reqwest::Url, Failure> {
        let url = endpoint.url(&format!("{repository}/blobs/uploads/"));
        let response = self
            .send(
                endpoint,
                &Request {
                    method: Method::POST,
                    url: url.clone(),
                    headers: HeaderMap::new(),
                    body: Body::Empty,
                    scope,
                    timeout: self.inner.config.request_timeout,
                },
            )
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(status_failure(
                &format!(
                    "starting an upload to {repository} on {}",
                    endpoint.host.host
                ),
                response.status(),
                response.headers(),
            ));
        }
        upload_location(&url, response.headers())
    }

    /// Sends `body` in PATCH chunks; after a transient failure asks the upload's status and
    /// resumes from the offset the registry has.
    pub(super) async fn upload_chunks(
        &self,
        endpoint: &Endpoint,
        mut location: reqwest::Url,
        body: &Body,
        scope: &str,
    ) -> Result<reqwest::Url, Failure> {
        let Body::File {
            path, len: size, ..
        } = body
        else {
            return Err(Failure::fatal(RegistryError::Invalid(
                "chunked uploads are for files".into(),
            )));
        };
        let chunk = self.inner.config.upload_chunk_size.max(1);
        let mut offset = 0u64;
        let mut backoff = Backoff::new(&self.inner.config);
        while offset < *size {
            let len = chunk.min(size - offset);
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("{}-{}", offset, offset + len - 1)) {
                headers.insert(reqwest::header::CONTENT_RANGE, v);
            }
            let result = self
                .send(
                    endpoint,
                    &Request {
                        method: Method::PATCH,
                        url: location.to_string(),
                        headers,
                        body: Body::File {
                            path: path.clone(),
                            offset,
                            len,
                        },
                        scope,
                        timeout: self.upload_timeout(len),
                    },
                )
                .await;
            let failure = match result {
                Ok(response) if response.status() == StatusCode::ACCEPTED => {
                    let end = range_end(response.headers());
                    location = upload_location(location.as_str(), response.headers())?;
                    if end != Some(offset + len - 1) {
                        return Err(Failure::transient(RegistryError::Corrupt(format!(
                            "chunk {offset}..{} of {}: the registry reports {end:?} bytes received",
                            offset + len,
                            path.display()
                        ))));
                    }
                    offset += len;
                    continue;
                }
                Ok(response) => status_failure(
                    &format!("uploading chunk at {offset} of {}", path.display()),
                    response.status(),
                    response.headers(),
                ),
                Err(f) => f,
            };
            backoff.wait(failure).await.map_err(Failure::fatal)?;
            // Ask where the registry is; resume there.
            let status = self
                .send(
                    endpoint,
                    &Request {
                        method: Method::GET,
                        url: location.to_string(),
                        headers: HeaderMap::new(),
                        body: Body::Empty,
                        scope,
                        timeout: self.inner.config.request_timeout,
                    },
                )
                .await?;
            if status.status() != StatusCode::NO_CONTENT {
                return Err(status_failure(
                    "upload status",
                    status.status(),
                    status.headers(),
                ));
            }
            offset = range_end(status.headers()).map_or(0, |end| end + 1);
            location = upload_location(location.as_str(), status.headers())?;
        }
        Ok(location)
    }

    /// PUTs a manifest under `reference`'s tag or digest; returns its digest.
    pub async fn put_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = sha256_digest(&bytes);
        if let Some(d) = &reference.digest {
            verify_digest(d, &bytes, "manifest to push")?;
        }
        let content_type = HeaderValue::from_str(media_type).map_err(|_| {
            RegistryError::Invalid(format!(
                "media type {media_type:?} is not a valid header value"
            ))
        })?;
        let scope = push_scope(&reference.repository);
        let span =
            tracing::info_span!("registry.put_manifest", reference = %reference, digest = %digest);
        self.with_endpoints(reference, |c| c.push, "pushing manifest", |endpoint| {
            let scope = scope.as_str();
            let bytes = bytes.clone();
            let content_type = content_type.clone();
            let digest = digest.clone();
            async move {
                let url = endpoint.url(&format!("{}/manifests/{}", reference.repository, reference.object()));
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_TYPE, content_type);
                let response = self
                    .send(&endpoint, &Request {
                        method: Method::PUT,
                        url,
                        headers,
                        body: Body::Bytes(bytes),
                        scope,
                        timeout: self.inner.config.request_timeout,
                    })
                    .await?;
                if !response.status().is_success() {
                    return Err(status_failure(
                        &format!("pushing manifest {reference}"),
                        response.status(),
                        response.headers(),
                    ));
                }
                if let Some(d) = header_str(response.headers(), "docker-content-digest") {
                    if d.starts_with("sha256:") && d != digest {
                        return Err(Failure::fatal(RegistryError::Corrupt(format!(
                            "pushing manifest {reference}: the registry computed {d}, we sent {digest}"
                        ))));
                    }
                }
                Ok(digest)
            }
        })
        .instrument(span)
        .await
    }
}
