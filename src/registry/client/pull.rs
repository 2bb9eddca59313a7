//! Reading from a registry: manifests resolved by tag or digest (size-capped, media type from the
//! header or the JSON), blob responses followed across redirects, whole small blobs.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT};
use reqwest::{Method, StatusCode};
use tracing::Instrument as _;

use crate::digest::{sha256_digest, Digest};
use crate::registry::reference::Reference;
use crate::registry::retry::{status_failure, transport_failure, Failure};
use crate::registry::{
    verify_digest, FetchedManifest, RegistryError, MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};

use super::{
    header_str, identity_headers, pull_scope, read_body_limited, Body, Client, Endpoint, Request,
};

/// Largest manifest accepted (bounded allocation).
pub(super) const MAX_MANIFEST_BYTES: u64 = 8 << 20;

/// Largest blob [`Client::get_blob`] reads into memory; bigger ones go through
/// [`Client::blob_reader`] or [`Client::blob`].
pub(super) const MAX_IN_MEMORY_BLOB: u64 = 512 << 20;

pub(super) const MAX_REDIRECTS: usize = 5;

pub(super) fn is_manifest_media_type(ct: &str) -> bool {
    [
        MEDIA_TYPE_OCI_MANIFEST,
        MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_DOCKER_MANIFEST,
        MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    ]
    .contains(&ct)
}

pub(super) fn media_type_from_json(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).ok()?;
    match probe.media_type {
        Some(m) if is_manifest_media_type(&m) => Some(m),
        Some(_) => None,
        // OCI allows omitting mediaType: an index has "manifests".
        None if probe.manifests.is_some() => Some(MEDIA_TYPE_OCI_INDEX.to_string()),
        None => Some(MEDIA_TYPE_OCI_MANIFEST.to_string()),
    }
}

impl Client {
    /// Resolves `reference` (tag or digest) to its manifest or index. Digest verified: against
    /// the reference's digest if any, and against `Docker-Content-Digest`.
    pub async fn get_manifest(
        &self,
        reference: &Reference,
    ) -> Result<FetchedManifest, RegistryError> {
        let scope = pull_scope(&reference.repository);
        let span = tracing::info_span!("registry.get_manifest", reference = %reference);
        self.with_endpoints(reference, |c| c.resolve, "fetching manifest", |endpoint| {
            let scope = scope.as_str();
            async move {
                let url = endpoint.url(&format!(
                    "{}/manifests/{}",
                    reference.repository,
                    reference.object()
                ));
                let mut headers = HeaderMap::new();
                headers.insert(
                    ACCEPT,
                    HeaderValue::from_static(concat!(
                        "application/vnd.oci.image.manifest.v1+json, ",
                        "application/vnd.oci.image.index.v1+json, ",
                        "application/vnd.docker.distribution.manifest.v2+json, ",
                        "application/vnd.docker.distribution.manifest.list.v2+json;q=0.9, ",
                        "*/*;q=0.1"
                    )),
                );
                let what = format!("manifest {reference} from {}", endpoint.host.host);
                let tags_url = endpoint.url(&format!("{}/tags/list", reference.repository));
                let response = self
                    .send(&endpoint, &Request {
                        method: Method::GET,
                        url,
                        headers,
                        body: Body::Empty,
                        scope,
                        timeout: self.inner.config.request_timeout,
                    })
                    .await?;
                if response.status() == StatusCode::NOT_FOUND {
                    return Err(Failure::fatal(RegistryError::NotFound(format!(
                        "{what}: HTTP 404: no such repository, tag or digest (the repository's \
                         tags: GET {tags_url})"
                    ))));
                }
                if !response.status().is_success() {
                    return Err(status_failure(&what, response.status(), response.headers()));
                }
                let header_digest = header_str(response.headers(), "docker-content-digest");
                let content_type = header_str(response.headers(), "content-type")
                    .map(|ct| ct.split(';').next().unwrap_or("").trim().to_string());
                let bytes = read_body_limited(response, MAX_MANIFEST_BYTES, &what).await?;
                let digest = sha256_digest(&bytes);
                if let Some(expected) = &reference.digest {
                    verify_digest(expected, &bytes, &what).map_err(Failure::from)?;
                }
                if let Some(hd) = header_digest.filter(|d| d.starts_with("sha256:")) {
                    if hd != digest {
                        return Err(Failure::from(RegistryError::Corrupt(format!(
                            "{what}: Docker-Content-Digest says {hd} but the body hashes to {digest}"
                        ))));
                    }
                }
                let media_type = match content_type {
                    Some(ct) if is_manifest_media_type(&ct) => ct,
                    _ => media_type_from_json(&bytes).ok_or_else(|| {
                        Failure::fatal(RegistryError::Invalid(format!(
                            "{what}: neither Content-Type nor mediaType names a manifest or index type"
                        )))
                    })?,
                };
                let digest = match &reference.digest {
                    Some(d) => d.clone(),
                    None => digest,
                };
                Ok(FetchedManifest {
                    media_type,
                    digest,
                    bytes,
                })
            }
        })
        .instrument(span)
        .await
    }

    /// The referrers of manifest `subject` in `reference`'s repository whose artifact type is
    /// `artifact_type`, as an image index: through the referrers API, and where the registry
    /// lacks it, through the tag fallback (`sha256-<hex>`). `None` when neither has any.
    pub async fn get_referrers(
        &self,
        reference: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<crate::image::Index>, RegistryError> {
        let scope = pull_scope(&reference.repository);
        let span = tracing::info_span!("registry.get_referrers", reference = %reference, subject = %subject);
        let from_api = self
            .with_endpoints(
                reference,
                |c| c.resolve,
                "listing referrers",
                |endpoint| {
                    let scope = scope.as_str();
                    async move {
                        let what = format!("referrers of {subject} on {}", endpoint.host.host);
                        let mut url = reqwest::Url::parse(
                            &endpoint.url(&format!("{}/referrers/{subject}", reference.repository)),
                        )
                        .map_err(|e| {
                            Failure::fatal(RegistryError::Invalid(format!("{what}: {e}")))
                        })?;
                        url.query_pairs_mut()
                            .append_pair("artifactType", artifact_type);
                        let url = url.to_string();
                        let mut headers = HeaderMap::new();
                        headers.insert(
                            ACCEPT,
                            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
                        );
                        let response = self
                            .send(
                                &endpoint,
                                &Request {
                                    method: Method::GET,
                                    url,
                                    headers,
                                    body: Body::Empty,
                                    scope,
                                    timeout: self.inner.config.request_timeout,
                                },
                            )
                            .await?;
                        // A registry without the API answers 404 (or 400/405 for the path).
                        if matches!(
                            response.status(),
                            StatusCode::NOT_FOUND
                                | StatusCode::BAD_REQUEST
                                | StatusCode::METHOD_NOT_ALLOWED
                        ) {
                            return Ok(None);
                        }
                        if !response.status().is_success() {
                            return Err(status_failure(
                                &what,
                                response.status(),
                                response.headers(),
                            ));
                        }
                        let bytes = read_body_limited(response, MAX_MANIFEST_BYTES, &what).await?;
                        serde_json::from_slice::<crate::image::Index>(&bytes)
                            .map(Some)
                            .map_err(|e| {
                                Failure::fatal(RegistryError::Invalid(format!(
                                    "{what}: not an image index: {e}"
                                )))
                            })
                    }
                },
            )
            .instrument(span.clone())
            .await?;
        let has_any = |index: &crate::image::Index| {
            index
                .manifests
                .iter()
                .any(|m| m.artifact_type.as_deref() == Some(artifact_type))
        };
        if let Some(index) = from_api.filter(has_any) {
            return Ok(Some(index));
        }
        let tag = format!("{}-{}", subject.algorithm(), subject.hex());
        let fallback = reference.with_tag(&tag);
        match self.get_manifest(&fallback).instrument(span).await {
            Ok(fetched) => serde_json::from_slice::<crate::image::Index>(&fetched.bytes)
                .map(|index| Some(index).filter(has_any))
                .map_err(|e| {
                    RegistryError::Invalid(format!(
                        "referrers tag {fallback}: not an image index: {e}"
                    ))
                }),
            Err(RegistryError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Issues GET for a blob, following redirects (the registry's auth is only sent to the
    /// registry's own host). Returns the final response and the redirect target, if any.
    pub(crate) async fn get_blob_response(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        digest: &Digest,
        headers: HeaderMap,
        scope: &str,
        timeout: Duration,
    ) -> Result<(reqwest::Response, Option<reqwest::Url>), Failure> {
        let url = endpoint.url(&format!("{repository}/blobs/{digest}"));
        let response = self
            .send(
                endpoint,
                &Request {
                    method: Method::GET,
                    url: url.clone(),
                    headers: headers.clone(),
                    body: Body::Empty,
                    scope,
                    timeout,
                },
            )
            .await?;
        let mut response = response;
        let mut current = reqwest::Url::parse(&url).map_err(|_| {
            Failure::fatal(RegistryError::Invalid(format!(
                "blob URL for {digest} is invalid"
            )))
        })?;
        let mut redirected = None;
        for _ in 0..MAX_REDIRECTS {
            if !response.status().is_redirection() {
                return Ok((response, redirected));
            }
            let location = header_str(response.headers(), "location").ok_or_else(|| {
                Failure::fatal(RegistryError::Corrupt(format!(
                    "blob {digest} on {}: redirect without Location",
                    endpoint.host.host
                )))
            })?;
            let next = current.join(&location).map_err(|_| {
                Failure::fatal(RegistryError::Corrupt(format!(
                    "blob {digest} on {}: redirect to an invalid URL",
                    endpoint.host.host
                )))
            })?;
            tracing::debug!(target_host = next.host_str().unwrap_or(""), "blob redirect");
            response = self
                .get_redirected(endpoint, &next, headers.clone(), timeout)
                .await?;
            current = next.clone();
            redirected = Some(next);
        }
        Err(Failure::fatal(RegistryError::Corrupt(format!(
            "blob {digest} on {}: more than {MAX_REDIRECTS} redirects",
            endpoint.host.host
        ))))
    }

    /// GET of a redirect target: no registry credentials are sent there.
    pub(crate) async fn get_redirected(
        &self,
        endpoint: &Endpoint,
        url: &reqwest::Url,
        headers: HeaderMap,
        timeout: Duration,
    ) -> Result<reqwest::Response, Failure> {
        endpoint
            .http
            .get(url.clone())
            .headers(headers)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                transport_failure(
                    &format!("GET redirected blob on {}", url.host_str().unwrap_or("?")),
                    &e,
                )
            })
    }

    /// Fetches a small blob (a config) into memory, digest verified.
    pub async fn get_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        let scope = pull_scope(&reference.repository);
        let span = tracing::info_span!("registry.get_blob", registry = %reference.registry, repository = %reference.repository, digest = %digest);
        self.with_endpoints(
            reference,
            |c| c.pull,
            "fetching blob",
            |endpoint| {
                let scope = scope.as_str();
                async move {
                    let what = format!(
                        "blob {digest} of {} on {}",
                        reference.repository, endpoint.host.host
                    );
                    let (response, _) = self
                        .get_blob_response(
                            &endpoint,
                            &reference.repository,
                            digest,
                            identity_headers(),
                            scope,
                            self.inner.config.request_timeout,
                        )
                        .await?;
                    if response.status() != StatusCode::OK {
                        return Err(status_failure(&what, response.status(), response.headers()));
                    }
                    let bytes = read_body_limited(response, MAX_IN_MEMORY_BLOB, &what).await?;
                    verify_digest(digest, &bytes, &what).map_err(Failure::transient)?;
                    Ok(bytes)
                }
            },
        )
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::MEDIA_TYPE_OCI_INDEX;

    #[test]
    fn media_type_probe() {
        assert_eq!(
            media_type_from_json(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(MEDIA_TYPE_OCI_INDEX)
        );
        assert_eq!(
            media_type_from_json(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            )
            .as_deref(),
            Some(MEDIA_TYPE_DOCKER_MANIFEST)
        );
        assert_eq!(media_type_from_json(b"nope"), None);
    }
}
