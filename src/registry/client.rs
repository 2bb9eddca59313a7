//! The registry client: endpoint selection (mirrors then origin), authorized requests with
//! retries and deadlines, manifest resolve, blob get/exists/mount/push and manifest push.
//! Reading (manifests, blobs) is `client/pull.rs`, writing (mounts, uploads, manifest pushes)
//! `client/push.rs`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use reqwest::{Method, StatusCode};

use super::auth::AuthStore;
use super::hosts::{HostCapabilities, HostConfig, HostsDir};
use super::reference::Reference;
use super::retry::{transport_failure, with_note, Backoff, Failure, Retry};
use super::{ClientConfig, DockerConfig, RegistryError};

mod pull;
mod push;

/// A registry client. Clones share connection pools, tokens and learned host behaviour.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub config: ClientConfig,
    hosts: HostsDir,
    pub auth: AuthStore,
    http_by_tls: Mutex<HashMap<TlsKey, reqwest::Client>>,
    endpoints: Mutex<HashMap<String, Arc<Vec<Endpoint>>>>,
    mirror_down_until: Mutex<HashMap<String, Instant>>,
    no_multi_range: Mutex<HashSet<String>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct TlsKey {
    skip_verify: bool,
    ca: Vec<PathBuf>,
    client: Vec<(PathBuf, Option<PathBuf>)>,
}

/// One endpoint of a registry with its HTTP client.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub host: HostConfig,
    pub http: reqwest::Client,
    pub registry: String,
}

impl Endpoint {
    /// `<api_base>/<path>`, with `ns=<registry>` for mirrors as containerd sends it.
    pub fn url(&self, path: &str) -> String {
        let mut url = format!("{}/{}", self.host.api_base, path);
        if self.host.is_mirror {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str("ns=");
            url.push_str(&self.registry);
        }
        url
    }
}

/// What a request sends as its body; rebuilt for each attempt.
#[derive(Clone)]
pub(crate) enum Body {
    Empty,
    Bytes(Bytes),
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    async fn build(&self) -> Result<reqwest::Body, Failure> {
        match self {
            Body::Empty => Ok(reqwest::Body::from(Bytes::new())),
            Body::Bytes(b) => Ok(reqwest::Body::from(b.clone())),
            Body::File { path, offset, len } => {
                use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
                let mut file = tokio::fs::File::open(path).await.map_err(|e| {
                    Failure::fatal(RegistryError::Invalid(format!(
                        "opening {} for upload: {e}",
                        path.display()
                    )))
                })?;
                file.seek(std::io::SeekFrom::Start(*offset))
                    .await
                    .map_err(|e| {
                        Failure::fatal(RegistryError::Invalid(format!(
                            "seeking {} to {offset}: {e}",
                            path.display()
                        )))
                    })?;
                let stream =
                    tokio_util::io::ReaderStream::with_capacity(file.take(*len), 256 << 10);
                Ok(reqwest::Body::wrap_stream(stream))
            }
        }
    }
}

/// One HTTP request to an endpoint.
pub(crate) struct Request<'a> {
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Body,
    pub scope: &'a str,
    pub timeout: Duration,
}

fn install_crypto_provider() {
    // Ignore AlreadyInstalled: any provider installed by the process is fine. rustls 0.23.48
    // deprecates ring's provider for lacking post-quantum key exchange; ring stays (aws-lc-rs
    // needs cmake and a C toolchain to build), so a build resolving that version stays clean.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `repository:<repo>:pull`.
pub(crate) fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

impl Client {
    /// Builds a client; reads the docker config now. One that cannot be read or parsed is
    /// logged as a warning naming the file and left out: anonymous pulls still work, and a
    /// registry that needs credentials then says so.
    pub fn new(config: ClientConfig) -> Result<Client, RegistryError> {
        install_crypto_provider();
        let docker_config =
            DockerConfig::load(config.docker_config.as_deref()).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "docker config ignored: only anonymous access to registries");
                DockerConfig::default()
            });
        let hosts = HostsDir::new(config.hosts_dir.clone(), config.plain_http);
        let client = Client {
            inner: Arc::new(Inner {
                auth: AuthStore::new(
                    docker_config,
                    config.keychain.clone(),
                    config.credential_providers.clone(),
                ),
                hosts,
                http_by_tls: Mutex::new(HashMap::new()),
                endpoints: Mutex::new(HashMap::new()),
                mirror_down_until: Mutex::new(HashMap::new()),
                no_multi_range: Mutex::new(HashSet::new()),
                config,
            }),
        };
        // Build the default HTTP client now so TLS setup problems show at startup.
        client.http_for(&TlsKey {
            skip_verify: false,
            ca: Vec::new(),
            client: Vec::new(),
        })?;
        Ok(client)
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    fn http_for(&self, key: &TlsKey) -> Result<reqwest::Client, RegistryError> {
        let mut cache = crate::sync::lock(&self.inner.http_by_tls);
        if let Some(c) = cache.get(key) {
            return Ok(c.clone());
        }
        let config = &self.inner.config;
        let mut builder = reqwest::Client::builder()
            .user_agent(config.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true);
        if key.skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        for ca in &key.ca {
            let pem = std::fs::read(ca).map_err(|e| {
                RegistryError::Config(format!("reading CA file {}: {e}", ca.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
                RegistryError::Config(format!(
                    "CA file {} holds no PEM certificates",
                    ca.display()
                ))
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        for (cert, key_file) in &key.client {
            let mut pem = std::fs::read(cert).map_err(|e| {
                RegistryError::Config(format!(
                    "reading client certificate {}: {e}",
                    cert.display()
                ))
            })?;
            if let Some(k) = key_file {
                pem.push(b'\n');
                pem.extend(std::fs::read(k).map_err(|e| {
                    RegistryError::Config(format!("reading client key {}: {e}", k.display()))
                })?);
            }
            let identity = reqwest::Identity::from_pem(&pem).map_err(|_| {
                RegistryError::Config(format!(
                    "client certificate {} (with its key) is not a PEM certificate and private key",
                    cert.display()
                ))
            })?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(|e| {
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                detail.push_str(": ");
                detail.push_str(&cause.to_string());
                source = cause.source();
            }
            RegistryError::Config(format!(
                "building the HTTP client: {detail} (TLS needs the system's CA certificates, \
                 /etc/ssl/certs/ca-certificates.crt from Debian's ca-certificates)"
            ))
        })?;
        cache.insert(key.clone(), http.clone());
        Ok(http)
    }

    /// Endpoints for `reference`'s registry, mirrors first, origin last.
    pub(crate) fn endpoints(
        &self,
        reference: &Reference,
    ) -> Result<Arc<Vec<Endpoint>>, RegistryError> {
        if let Some(e) = crate::sync::lock(&self.inner.endpoints).get(&reference.registry) {
            return Ok(e.clone());
        }
        let hosts = self.inner.hosts.endpoints(reference)?;
        let mut endpoints = Vec::with_capacity(hosts.len());
        for host in hosts {
            let http = self.http_for(&TlsKey {
                skip_verify: host.skip_verify,
                ca: host.ca.clone(),
                client: host.client.clone(),
            })?;
            endpoints.push(Endpoint {
                host,
                http,
                registry: reference.registry.clone(),
            });
        }
        let endpoints = Arc::new(endpoints);
        crate::sync::lock(&self.inner.endpoints)
            .insert(reference.registry.clone(), endpoints.clone());
        Ok(endpoints)
    }

    pub(crate) fn multi_range_known_unsupported(&self, endpoint: &Endpoint) -> bool {
        crate::sync::lock(&self.inner.no_multi_range).contains(&endpoint.host.api_base)
    }

    pub(crate) fn remember_no_multi_range(&self, endpoint: &Endpoint) {
        tracing::info!(host = %endpoint.host.host, "registry rejects multi-range requests; using single ranges from now on");
        crate::sync::lock(&self.inner.no_multi_range).insert(endpoint.host.api_base.clone());
    }

    /// Sends one request, answering a 401 challenge once (token or Basic) and resending.
    pub(crate) async fn send(
        &self,
        endpoint: &Endpoint,
        request: &Request<'_>,
    ) -> Result<reqwest::Response, Failure> {
        let host = endpoint.host.host.as_str();
        let mut authorization = self.inner.auth.cached_header(host, request.scope).await;
        for attempt in 0..2 {
            let mut builder = endpoint
                .http
                .request(request.method.clone(), &request.url)
                .timeout(request.timeout);
            for (name, value) in &endpoint.host.headers {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    builder = builder.header(n, v);
                }
            }
            builder = builder.headers(request.headers.clone());
            if let Some(auth) = &authorization {
                builder = builder.header(reqwest::header::AUTHORIZATION, auth.clone());
            }
            if !matches!(request.body, Body::Empty)
                || request.method == Method::PUT
                || request.method == Method::PATCH
                || request.method == Method::POST
            {
                builder = builder
                    .header(CONTENT_LENGTH, request.body.len())
                    .body(request.body.build().await?);
            }
            let context = format!("{} {}", request.method, redact_query(&request.url));
            let response = builder
                .send()
                .await
                .map_err(|e| transport_failure(&context, &e))?;
            if response.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                if response.status() == StatusCode::UNAUTHORIZED {
                    return Err(Failure::fatal(RegistryError::Auth(format!(
                        "{context}: HTTP 401 even with fresh credentials (check the docker config for {host})"
                    ))));
                }
                return Ok(response);
            }
            let challenges: Vec<String> = response
                .headers()
                .get_all(reqwest::header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect();
            drop(response);
            let header = self
                .inner
                .auth
                .authorize(
                    &endpoint.http,
                    host,
                    request.scope,
                    &challenges,
                    authorization.as_ref(),
                    self.inner.config.request_timeout,
                )
                .await
                .map_err(Failure::from)?;
            authorization = Some(header);
        }
        Err(Failure::fatal(RegistryError::Auth(format!(
            "{host}: authorization loop"
        ))))
    }

    /// Runs `op` against each endpoint with `capability` in order (skipping mirrors cooling
    /// down after a transient failure); when all fail, backs off and retries until the read
    /// deadline. The origin's error is the one reported.
    pub(crate) async fn with_endpoints<T, F, Fut>(
        &self,
        reference: &Reference,
        capability: fn(&HostCapabilities) -> bool,
        what: &str,
        op: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Endpoint) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let endpoints = self.endpoints(reference)?;
        let usable: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| capability(&e.host.capabilities))
            .collect();
        if usable.is_empty() {
            return Err(RegistryError::Config(format!(
                "{what}: no host configured for {} has the needed capability (hosts.toml capabilities)",
                reference.registry
            )));
        }
        let mut backoff = Backoff::new(&self.inner.config);
        loop {
            let mut last: Option<Failure> = None;
            let now = Instant::now();
            for endpoint in &usable {
                let cooling = endpoint.host.is_mirror
                    && crate::sync::lock(&self.inner.mirror_down_until)
                        .get(&endpoint.host.api_base)
                        .is_some_and(|until| *until > now);
                if cooling {
                    continue;
                }
                let remaining = backoff.remaining();
                let result = match tokio::time::timeout(remaining, op((*endpoint).clone())).await {
                    Ok(r) => r,
                    Err(_) => Err(Failure::transient(RegistryError::Unavailable(format!(
                        "{what} on {}: read deadline of {:?} passed",
                        endpoint.host.host, self.inner.config.read_deadline
                    )))),
                };
                match result {
                    Ok(v) => return Ok(v),
                    Err(failure) => {
                        if endpoint.host.is_mirror && failure.retry != Retry::Never {
                            tracing::warn!(mirror = %endpoint.host.host, error = %failure.error, "mirror failed; skipping it for a while");
                            crate::sync::lock(&self.inner.mirror_down_until).insert(
                                endpoint.host.api_base.clone(),
                                Instant::now() + self.inner.config.mirror_cooldown,
                            );
                        }
                        last = Some(failure);
                    }
                }
                if backoff.remaining().is_zero() {
                    break;
                }
            }
            let failure = last.unwrap_or_else(|| {
                Failure::transient(RegistryError::Unavailable(format!(
                    "{what}: no endpoint tried"
                )))
            });
            let mirrors: Vec<String> = usable
                .iter()
                .filter(|e| e.host.is_mirror)
                .map(|e| format!("mirror {}", e.host.host))
                .collect();
            let tried = |error: RegistryError| {
                if mirrors.is_empty() {
                    error
                } else {
                    with_note(
                        error,
                        &format!("hosts.toml mirrors tried first: {}", mirrors.join(", ")),
                    )
                }
            };
            if backoff.remaining().is_zero() {
                return Err(tried(with_note(failure.error, "read deadline passed")));
            }
            backoff.wait(failure).await.map_err(tried)?;
        }
    }
}

pub(crate) fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_string)
}

/// Headers for blob reads: no content coding, so byte offsets are the blob's.
pub(crate) fn identity_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers
}

/// Drops the query of a URL for messages (signed redirect URLs carry credentials there).
pub(crate) fn redact_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// Reads a body of unknown length up to `limit` bytes.
pub(crate) async fn read_body_limited(
    mut response: reqwest::Response,
    limit: u64,
    what: &str,
) -> Result<Bytes, Failure> {
    if let Some(len) = response.content_length() {
        if len > limit {
            return Err(Failure::fatal(RegistryError::Invalid(format!(
                "{what}: {len} bytes is more than the limit of {limit}"
            ))));
        }
    }
    let capacity = usize::try_from(response.content_length().unwrap_or(0).min(limit)).unwrap_or(0);
    let mut buf = BytesMut::with_capacity(capacity);
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() as u64 + chunk.len() as u64 > limit {
                    return Err(Failure::fatal(RegistryError::Invalid(format!(
                        "{what}: body is more than the limit of {limit} bytes"
                    ))));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(transport_failure(what, &e)),
        }
    }
    Ok(buf.freeze())
}

/// Reads a body that must be exactly `expected` bytes.
pub(crate) async fn read_body_exact(
    mut response: reqwest::Response,
    expected: u64,
    what: &str,
) -> Result<Bytes, Failure> {
    if let Some(len) = response.content_length() {
        if len != expected {
            return Err(Failure::transient(RegistryError::Corrupt(format!(
                "{what}: Content-Length {len}, expected {expected}"
            ))));
        }
    }
    let capacity = usize::try_from(expected).map_err(|_| {
        Failure::fatal(RegistryError::Invalid(format!(
            "{what}: {expected} bytes do not fit in memory"
        )))
    })?;
    let mut buf = BytesMut::with_capacity(capacity);
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() as u64 + chunk.len() as u64 > expected {
                    return Err(Failure::transient(RegistryError::Corrupt(format!(
                        "{what}: body is longer than the {expected} bytes asked for"
                    ))));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(transport_failure(what, &e)),
        }
    }
    if buf.len() as u64 != expected {
        return Err(Failure::transient(RegistryError::Corrupt(format!(
            "{what}: body ended after {} of {expected} bytes",
            buf.len()
        ))));
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreadable_ca_from_hosts_toml_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let host_dir = dir.path().join("example.com");
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(
            host_dir.join("hosts.toml"),
            "server = \"https://example.com\"\nca = \"missing.pem\"\n",
        )
        .unwrap();
        let client = Client::new(ClientConfig {
            hosts_dir: Some(dir.path().to_path_buf()),
            ..ClientConfig::default()
        })
        .unwrap();
        let reference = Reference::parse("example.com/app:1").unwrap();
        let err = client.get_manifest(&reference).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Config(ref m) if m.contains("missing.pem")),
            "{err:?}"
        );
    }

    #[test]
    fn mirror_urls_carry_namespace() {
        install_crypto_provider();
        let host = HostConfig {
            api_base: "http://m:5000/v2".into(),
            host: "m:5000".into(),
            capabilities: HostCapabilities::ALL,
            skip_verify: false,
            ca: vec![],
            client: vec![],
            headers: vec![],
            is_mirror: true,
        };
        let e = Endpoint {
            host,
            http: reqwest::Client::new(),
            registry: "docker.io".into(),
        };
        assert_eq!(
            e.url("a/blobs/x"),
            "http://m:5000/v2/a/blobs/x?ns=docker.io"
        );
        assert_eq!(
            e.url("a/blobs/uploads/?mount=1"),
            "http://m:5000/v2/a/blobs/uploads/?mount=1&ns=docker.io"
        );
    }
}
