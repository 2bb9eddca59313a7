//! OCI distribution client: references, manifest resolve, blob get/stream/ranged reads, push,
//! auth (anonymous, Bearer token, Basic, docker config), containerd `hosts.toml` mirrors,
//! redirects, retries with deadlines. Knows HTTP and OCI distribution, nothing of FUSE or formats.

mod auth;
mod client;
pub(crate) mod hosts;
mod multipart;
mod ranged;
mod reader;
mod reference;
mod retry;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

pub use auth::{CredentialProviders, Credentials, DockerConfig, Keychain};
pub use client::Client;
pub use hosts::{HostCapabilities, HostConfig, HostsDir};
pub use ranged::RemoteBlob;
pub use reader::BlobReader;
pub use reference::Reference;

use crate::blob::BlobError;
use crate::digest::Digest;

/// OCI image manifest media type.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// Everything that can go wrong talking to a registry, classified so callers can decide
/// (retry later, fall back, fail). Messages name the host, repository and digest, never a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// Credentials are missing or were refused (401/403, token service refused).
    #[error("registry authorization failed: {0}")]
    Auth(String),
    /// The repository, manifest or blob does not exist (404).
    #[error("not found in registry: {0}")]
    NotFound(String),
    /// The registry cannot be reached now (connection error, 5xx, 429, deadline passed).
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The registry answered with bytes that cannot be right (digest mismatch, short body,
    /// wrong `Content-Range`, malformed multipart).
    #[error("corrupt registry response: {0}")]
    Corrupt(String),
    /// The request is invalid (bad reference, range outside the blob, rejected upload).
    #[error("invalid registry request: {0}")]
    Invalid(String),
    /// Client configuration is wrong (unreadable hosts.toml, CA file, docker config).
    #[error("registry client configuration: {0}")]
    Config(String),
}

impl RegistryError {
    /// True for errors a later attempt may not hit (network, 5xx, 429, deadlines).
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable(_))
    }
}

impl From<RegistryError> for BlobError {
    fn from(error: RegistryError) -> Self {
        let message = error.to_string();
        match error {
            RegistryError::Auth(_) => BlobError::Auth(message),
            RegistryError::NotFound(_) => BlobError::NotFound(message),
            RegistryError::Unavailable(_) => BlobError::Unavailable(message),
            RegistryError::Corrupt(_) => BlobError::Corrupt(message),
            RegistryError::Invalid(_) | RegistryError::Config(_) => BlobError::Invalid(message),
        }
    }
}

/// How a [`Client`] is set up. `Default` gives production values: 30 s per request, 60 s per
/// read including retries, TLS verified against the system roots.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// containerd `certs.d`-style directory: `<dir>/<registry host>/hosts.toml`.
    pub hosts_dir: Option<PathBuf>,
    /// Docker config file or directory holding `config.json`; `None` means `$DOCKER_CONFIG`
    /// or `~/.docker`.
    pub docker_config: Option<PathBuf>,
    /// Use plain HTTP for every registry (`--plain-http`); localhost registries always do.
    pub plain_http: bool,
    /// Credentials given at run time (the CRI keychain), consulted before the docker config.
    pub keychain: Option<std::sync::Arc<Keychain>>,
    /// kubelet credential provider plugins, consulted after the keychain.
    pub credential_providers: Option<std::sync::Arc<CredentialProviders>>,
    /// Deadline of one HTTP request including its body.
    pub request_timeout: Duration,
    /// Bound on the total time of one logical read (all retries and endpoints included).
    pub read_deadline: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// `User-Agent` header.
    pub user_agent: String,
    /// Retries after the first attempt (transient errors only).
    pub max_retries: u32,
    /// First backoff delay; doubles per retry (with full jitter) up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Largest backoff delay.
    pub max_backoff: Duration,
    /// Uploads larger than this are sent in `PATCH` chunks of this size.
    pub upload_chunk_size: u64,
    /// How long a redirect target of a blob is reused before re-resolving through the registry.
    pub redirect_ttl: Duration,
    /// How long a mirror that failed with a transient error is skipped.
    pub mirror_cooldown: Duration,
    /// Ranges per multi-range request.
    pub max_ranges_per_request: usize,
    /// Concurrent single-range requests when multi-range is not available.
    pub range_concurrency: usize,
    /// Longest streamed response serving a [`RemoteBlob`] read sequentially in pieces of at
    /// least 64 KiB: such reads share one response (the first 4 MiB long, the next ones this
    /// long) instead of a request each, and only the bytes read are pulled from it. 0 turns
    /// streaming off.
    pub sequential_window: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            hosts_dir: None,
            docker_config: None,
            keychain: None,
            credential_providers: None,
            plain_http: false,
            request_timeout: Duration::from_secs(30),
            read_deadline: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            user_agent: concat!("lazysnap/", env!("CARGO_PKG_VERSION")).to_string(),
            max_retries: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            upload_chunk_size: 64 << 20,
            redirect_ttl: Duration::from_secs(300),
            mirror_cooldown: Duration::from_secs(30),
            max_ranges_per_request: 64,
            range_concurrency: 8,
            sequential_window: 1 << 30,
        }
    }
}

/// A manifest or index as fetched: its media type, verified digest and raw bytes.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// Media type from `Content-Type` (or the document's `mediaType` when the header is generic).
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`, checked against the requested digest and `Docker-Content-Digest`.
    pub digest: Digest,
    /// The exact bytes the registry served.
    pub bytes: Bytes,
}

/// Checks that `data` has `expected` digest (`sha256:` or `sha512:`).
pub fn verify_digest(expected: &Digest, data: &[u8], what: &str) -> Result<(), RegistryError> {
    let mut verifier = DigestVerifier::new(expected);
    verifier.update(data);
    verifier.finish(what)
}

/// Incremental digest check for streamed content.
pub(crate) enum DigestVerifier {
    Sha256(String, sha2::Sha256),
    Sha512(String, sha2::Sha512),
}

impl DigestVerifier {
    pub(crate) fn new(expected: &Digest) -> Self {
        use sha2::Digest as _;
        let hex = expected.hex().to_string();
        match expected.algorithm() {
            "sha512" => Self::Sha512(hex, sha2::Sha512::new()),
            _ => Self::Sha256(hex, sha2::Sha256::new()),
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        use sha2::Digest as _;
        match self {
            Self::Sha256(_, h) => h.update(data),
            Self::Sha512(_, h) => h.update(data),
        }
    }

    pub(crate) fn finish(self, what: &str) -> Result<(), RegistryError> {
        use sha2::Digest as _;
        let (expected, actual, algorithm) = match self {
            Self::Sha256(e, h) => (e, hex::encode(h.finalize()), "sha256"),
            Self::Sha512(e, h) => (e, hex::encode(h.finalize()), "sha512"),
        };
        if expected == actual {
            Ok(())
        } else {
            Err(RegistryError::Corrupt(format!(
                "{what}: content digest is {algorithm}:{actual}, expected {algorithm}:{expected}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_verification() {
        let d = crate::digest::sha256_digest(b"hello");
        assert!(verify_digest(&d, b"hello", "t").is_ok());
        assert!(matches!(
            verify_digest(&d, b"hellO", "t"),
            Err(RegistryError::Corrupt(_))
        ));
    }

    #[test]
    fn errors_map_to_blob_errors() {
        let e: BlobError = RegistryError::Unavailable("x".into()).into();
        assert!(matches!(e, BlobError::Unavailable(_)));
        let e: BlobError = RegistryError::Corrupt("x".into()).into();
        assert!(matches!(e, BlobError::Corrupt(_)));
    }
}
