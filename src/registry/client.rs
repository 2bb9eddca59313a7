//! The registry client: endpoint selection (mirrors then origin), authorized requests with
//! retries and deadlines, manifest resolve, blob get/exists/mount/push and manifest push.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION,
};
use reqwest::{Method, StatusCode};
use tracing::Instrument as _;

use super::auth::AuthStore;
use super::hosts::{HostCapabilities, HostConfig, HostsDir};
use super::reference::Reference;
use super::retry::{status_failure, transport_failure, with_note, Backoff, Failure, Retry};
use super::{
    verify_digest, ClientConfig, DockerConfig, FetchedManifest, RegistryError,
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};
use crate::digest::sha256_digest;

/// Largest manifest accepted (bounded allocation).
const MAX_MANIFEST_BYTES: u64 = 8 << 20;
/// Largest blob [`Client::get_blob`] reads into memory; bigger ones go through
/// [`Client::blob_reader`] or [`Client::blob`].
const MAX_IN_MEMORY_BLOB: u64 = 512 << 20;
const MAX_REDIRECTS: usize = 5;

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

fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
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
                auth: AuthStore::new(docker_config),
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
        let http = builder
            .build()
            .map_err(|e| RegistryError::Config(format!("building the HTTP client: {e}")))?;
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

    /// Issues GET for a blob, following redirects (the registry's auth is only sent to the
    /// registry's own host). Returns the final response and the redirect target, if any.
    pub(crate) async fn get_blob_response(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        digest: &str,
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
        digest: &str,
    ) -> Result<Bytes, RegistryError> {
        super::DigestVerifier::new(digest)?;
        let scope = pull_scope(&reference.repository);
        let span = tracing::info_span!("registry.get_blob", registry = %reference.registry, repository = %reference.repository, digest);
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

    /// HEAD: does the repository have blob `digest`?
    pub async fn blob_exists(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<bool, RegistryError> {
        let scope = push_scope(&reference.repository);
        let span = tracing::info_span!("registry.blob_exists", registry = %reference.registry, repository = %reference.repository, digest);
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
        digest: &str,
        from_repository: &str,
    ) -> Result<bool, RegistryError> {
        let scope = format!(
            "{} {}",
            push_scope(&reference.repository),
            pull_scope(from_repository)
        );
        let span = tracing::info_span!("registry.mount_blob", registry = %reference.registry, repository = %reference.repository, digest, from = from_repository);
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
        digest: &str,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        verify_digest(digest, &bytes, "blob to push")?;
        let span = tracing::info_span!("registry.push_blob", registry = %reference.registry, repository = %reference.repository, digest, size = bytes.len());
        self.upload(reference, digest, Body::Bytes(bytes))
            .instrument(span)
            .await
    }

    /// Uploads the file at `path` as blob `digest`, streamed from disk (multi-GB files are
    /// sent in `upload_chunk_size` PATCH chunks, resumed after transient failures).
    pub async fn push_blob_file(
        &self,
        reference: &Reference,
        digest: &str,
        path: &Path,
    ) -> Result<(), RegistryError> {
        super::DigestVerifier::new(digest)?;
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| {
                RegistryError::Invalid(format!("stat {} for upload: {e}", path.display()))
            })?
            .len();
        let span = tracing::info_span!("registry.push_blob", registry = %reference.registry, repository = %reference.repository, digest, size);
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

    async fn upload(
        &self,
        reference: &Reference,
        digest: &str,
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

    fn upload_timeout(&self, len: u64) -> Duration {
        // Allow at least 1 MiB/s on top of the request timeout for large bodies.
        self.inner.config.request_timeout + Duration::from_secs(len >> 20)
    }

    async fn start_upload(
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
    async fn upload_chunks(
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
    ) -> Result<String, RegistryError> {
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

/// The `Location` of an upload, resolved against the request URL.
fn upload_location(base: &str, headers: &HeaderMap) -> Result<reqwest::Url, Failure> {
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
fn range_end(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(reqwest::header::RANGE)?.to_str().ok()?;
    let value = value.strip_prefix("bytes=").unwrap_or(value);
    value.split_once('-')?.1.trim().parse().ok()
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

fn is_manifest_media_type(ct: &str) -> bool {
    [
        MEDIA_TYPE_OCI_MANIFEST,
        MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_DOCKER_MANIFEST,
        MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    ]
    .contains(&ct)
}

fn media_type_from_json(bytes: &[u8]) -> Option<String> {
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
