//! Registry credentials and authorization: docker `config.json` (`auths`, `credHelpers`,
//! `credsStore` through `docker-credential-*`), `WWW-Authenticate` challenges, Bearer tokens
//! (cached until expiry, refreshed on 401) and Basic auth. Secrets are redacted in `Debug` and
//! never put in error messages or tracing fields.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;
use tracing::Instrument as _;

use super::RegistryError;

mod credentials;
mod keychain;
mod provider;
use credentials::sensitive_header;
pub use credentials::{Credentials, DockerConfig};
pub use keychain::Keychain;
pub use provider::CredentialProviders;

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// Lowercase scheme: `bearer`, `basic`.
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (several challenges allowed).
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let bytes = header.as_bytes();
    let mut pos = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_token = |b: u8| !b.is_ascii_whitespace() && b != b',' && b != b'=' && b != b'"';
    loop {
        while pos < bytes.len() && (bytes[pos].is_ascii_whitespace() || bytes[pos] == b',') {
            pos += 1;
        }
        if pos >= bytes.len() {
            break;
        }
        let start = pos;
        while pos < bytes.len() && is_token(bytes[pos]) {
            pos += 1;
        }
        if start == pos {
            // Stray '=' or '"': skip one byte to make progress.
            pos += 1;
            continue;
        }
        let token = &header[start..pos];
        let mut look = pos;
        while look < bytes.len() && bytes[look].is_ascii_whitespace() {
            look += 1;
        }
        if look < bytes.len() && bytes[look] == b'=' {
            pos = look + 1;
            while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
                pos += 1;
            }
            let mut value = String::new();
            if pos < bytes.len() && bytes[pos] == b'"' {
                pos += 1;
                while pos < bytes.len() && bytes[pos] != b'"' {
                    if bytes[pos] == b'\\' && pos + 1 < bytes.len() {
                        pos += 1;
                    }
                    let ch_len = utf8_len(bytes[pos]);
                    let end = (pos + ch_len).min(bytes.len());
                    value.push_str(&String::from_utf8_lossy(&bytes[pos..end]));
                    pos = end;
                }
                pos += 1;
            } else {
                let vstart = pos;
                while pos < bytes.len() && bytes[pos] != b',' && !bytes[pos].is_ascii_whitespace() {
                    pos += 1;
                }
                value.push_str(&header[vstart..pos]);
            }
            if let Some(current) = out.last_mut() {
                current.params.insert(token.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

#[derive(Clone)]
struct CachedToken {
    header: HeaderValue,
    expires: Instant,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Credentials and tokens of one client, shared by its clones.
pub(crate) struct AuthStore {
    docker_config: DockerConfig,
    /// Credentials given at run time (CRI pulls), consulted first and never cached here.
    keychain: Option<std::sync::Arc<Keychain>>,
    /// kubelet credential provider plugins, consulted next (they cache their answers).
    providers: Option<std::sync::Arc<CredentialProviders>>,
    credentials: tokio::sync::Mutex<HashMap<String, Option<Credentials>>>,
    tokens: Mutex<HashMap<(String, String), CachedToken>>,
    basic_hosts: Mutex<HashSet<String>>,
    fetch_lock: tokio::sync::Mutex<()>,
}

impl AuthStore {
    pub fn new(
        docker_config: DockerConfig,
        keychain: Option<std::sync::Arc<Keychain>>,
        providers: Option<std::sync::Arc<CredentialProviders>>,
    ) -> Self {
        Self {
            docker_config,
            keychain,
            providers,
            credentials: tokio::sync::Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            basic_hosts: Mutex::new(HashSet::new()),
            fetch_lock: tokio::sync::Mutex::new(()),
        }
    }

    async fn credentials(
        &self,
        host: &str,
        scope: &str,
    ) -> Result<Option<Credentials>, RegistryError> {
        let repository = scope
            .strip_prefix("repository:")
            .and_then(|rest| rest.rsplit_once(':'))
            .map(|(repository, _)| repository);
        if let Some(keychain) = &self.keychain {
            if let Some(found) = keychain.credentials_for(host, repository) {
                return Ok(Some(found));
            }
        }
        if let Some(providers) = &self.providers {
            if let Some(found) = providers.credentials_for(host, repository).await? {
                return Ok(Some(found));
            }
        }
        let mut cache = self.credentials.lock().await;
        if let Some(c) = cache.get(host) {
            return Ok(c.clone());
        }
        let found = self.docker_config.credentials_for(host).await?;
        cache.insert(host.to_string(), found.clone());
        Ok(found)
    }

    /// The `Authorization` value to send preemptively to `host` for `scope`, if one is known.
    pub async fn cached_header(&self, host: &str, scope: &str) -> Option<HeaderValue> {
        let token = {
            let tokens = crate::sync::lock(&self.tokens);
            tokens
                .get(&(host.to_string(), scope.to_string()))
                .filter(|t| t.expires > Instant::now())
                .map(|t| t.header.clone())
        };
        if token.is_some() {
            return token;
        }
        let basic = crate::sync::lock(&self.basic_hosts).contains(host);
        if basic {
            return self
                .credentials(host, scope)
                .await
                .ok()
                .flatten()?
                .basic_header();
        }
        None
    }

    /// Answers a 401 from `host`: obtains a fresh Authorization value for `scope` from the
    /// challenges (token from the realm, or Basic credentials).
    pub async fn authorize(
        &self,
        http: &reqwest::Client,
        host: &str,
        scope: &str,
        www_authenticate: &[String],
        sent: Option<&HeaderValue>,
        timeout: Duration,
    ) -> Result<HeaderValue, RegistryError> {
        let challenges: Vec<Challenge> = www_authenticate
            .iter()
            .flat_map(|h| parse_challenges(h))
            .collect();
        // One token fetch at a time: requests refused together share the new token.
        let _fetching = self.fetch_lock.lock().await;
        {
            let mut tokens = crate::sync::lock(&self.tokens);
            let key = (host.to_string(), scope.to_string());
            match tokens.get(&key) {
                Some(t) if t.expires > Instant::now() && Some(&t.header) != sent => {
                    return Ok(t.header.clone());
                }
                _ => {
                    tokens.remove(&key);
                }
            }
        }
        let credentials = self.credentials(host, scope).await?;
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let span = tracing::info_span!(
                "registry.token",
                host,
                scope,
                realm = bearer.params.get("realm").map_or("", String::as_str)
            );
            let header = self
                .fetch_token(http, host, scope, bearer, credentials.as_ref(), timeout)
                .instrument(span)
                .await?;
            return Ok(header);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let header = credentials.as_ref().and_then(Credentials::basic_header).ok_or_else(|| {
                RegistryError::Auth(format!(
                    "{host} requires Basic auth and no username/password is configured for it (docker login {host}, or add it to the docker config)"
                ))
            })?;
            crate::sync::lock(&self.basic_hosts).insert(host.to_string());
            return Ok(header);
        }
        Err(RegistryError::Auth(format!(
            "{host} answered 401 without a Bearer or Basic challenge"
        )))
    }

    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        host: &str,
        scope: &str,
        challenge: &Challenge,
        credentials: Option<&Credentials>,
        timeout: Duration,
    ) -> Result<HeaderValue, RegistryError> {
        let realm = challenge
            .params
            .get("realm")
            .ok_or_else(|| RegistryError::Auth(format!("{host}: Bearer challenge has no realm")))?;
        let mut url = reqwest::Url::parse(realm).map_err(|_| {
            RegistryError::Auth(format!("{host}: Bearer realm {realm:?} is not a URL"))
        })?;
        let mut scopes: Vec<String> = scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(extra) = challenge.params.get("scope") {
            for s in extra.split(' ').filter(|s| !s.is_empty()) {
                if !scopes.iter().any(|have| have == s) {
                    scopes.push(s.to_string());
                }
            }
        }
        let service = challenge.params.get("service");
        let request = match credentials {
            Some(Credentials::IdentityToken(refresh)) => {
                let mut form = vec![
                    ("grant_type", "refresh_token".to_string()),
                    ("client_id", "lazysnap".to_string()),
                    ("refresh_token", refresh.clone()),
                ];
                if let Some(s) = service {
                    form.push(("service", s.clone()));
                }
                if !scopes.is_empty() {
                    form.push(("scope", scopes.join(" ")));
                }
                let body = form
                    .iter()
                    .map(|(k, v)| format!("{k}={}", form_encode(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                http.post(url)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body)
            }
            other => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in &scopes {
                        q.append_pair("scope", s);
                    }
                }
                let mut request = http.get(url);
                if let Some(header) = other.and_then(Credentials::basic_header) {
                    request = request.header(reqwest::header::AUTHORIZATION, header);
                }
                request
            }
        };
        let response = request.timeout(timeout).send().await.map_err(|e| {
            RegistryError::Unavailable(format!(
                "token service for {host} unreachable: {}",
                super::retry::transport_failure("token request", &e).error
            ))
        })?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(RegistryError::Auth(format!(
                "token service for {host} refused the credentials (HTTP {status}) for scope {scope:?}; check the docker config"
            )));
        }
        if !status.is_success() {
            let failure = super::retry::status_failure(
                &format!("token service for {host}"),
                status,
                response.headers(),
            );
            return Err(failure.error);
        }
        let body = response.bytes().await.map_err(|e| {
            super::retry::transport_failure(&format!("token service for {host}"), &e).error
        })?;
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            RegistryError::Auth(format!(
                "token service for {host} answered something other than token JSON"
            ))
        })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                RegistryError::Auth(format!("token service for {host} returned no token"))
            })?;
        let header = sensitive_header(&format!("Bearer {token}")).ok_or_else(|| {
            RegistryError::Auth(format!(
                "token service for {host} returned a token with invalid characters"
            ))
        })?;
        // Spec default is 60 s; refresh a little early.
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(60).clamp(1, 86_400));
        let expires = Instant::now() + lifetime.mul_f64(0.9);
        crate::sync::lock(&self.tokens).insert(
            (host.to_string(), scope.to_string()),
            CachedToken {
                header: header.clone(),
                expires,
            },
        );
        tracing::debug!(host, scope, ?lifetime, "registry token obtained");
        Ok(header)
    }
}

fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
