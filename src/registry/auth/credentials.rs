//! Where credentials come from: docker `config.json` (inline auths, credential stores and
//! helpers, with the host names docker writes normalized) and the helpers run for them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::HeaderValue;

use crate::registry::reference::DOCKER_HUB;
use crate::registry::RegistryError;

/// Credentials for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Username and password (or a personal access token used as password).
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (`identitytoken` in the docker config), exchanged at the realm.
    IdentityToken(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

impl Credentials {
    pub(super) fn basic_header(&self) -> Option<HeaderValue> {
        match self {
            Credentials::Basic { username, password } => {
                let raw = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                sensitive_header(&format!("Basic {raw}"))
            }
            Credentials::IdentityToken(_) => None,
        }
    }
}

pub(super) fn sensitive_header(value: &str) -> Option<HeaderValue> {
    let mut header = HeaderValue::from_str(value).ok()?;
    header.set_sensitive(true);
    Some(header)
}

/// The parts of a docker `config.json` that hold registry credentials.
#[derive(Default, Clone)]
pub struct DockerConfig {
    pub(super) path: Option<PathBuf>,
    pub(super) auths: HashMap<String, Credentials>,
    pub(super) cred_helpers: HashMap<String, String>,
    pub(super) creds_store: Option<String>,
}

impl fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerConfig")
            .field("path", &self.path)
            .field("auth_hosts", &self.auths.keys().collect::<Vec<_>>())
            .field("cred_helpers", &self.cred_helpers)
            .field("creds_store", &self.creds_store)
            .finish()
    }
}

#[derive(serde::Deserialize, Default)]
pub(super) struct RawDockerConfig {
    #[serde(default)]
    pub(super) auths: HashMap<String, RawAuth>,
    #[serde(default, rename = "credHelpers")]
    pub(super) cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    pub(super) creds_store: Option<String>,
}

#[derive(serde::Deserialize, Default)]
pub(super) struct RawAuth {
    #[serde(default)]
    pub(super) auth: Option<String>,
    #[serde(default)]
    pub(super) username: Option<String>,
    #[serde(default)]
    pub(super) password: Option<String>,
    #[serde(default)]
    pub(super) identitytoken: Option<String>,
}

impl DockerConfig {
    /// Loads `path` (a `config.json` file or a directory holding one); `None` means
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. A missing file is an empty
    /// config; an unreadable or malformed one is an error naming the file.
    pub fn load(path: Option<&Path>) -> Result<DockerConfig, RegistryError> {
        let file = match path {
            Some(p) if p.is_dir() => p.join("config.json"),
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os("DOCKER_CONFIG") {
                Some(dir) => PathBuf::from(dir).join("config.json"),
                None => match std::env::var_os("HOME") {
                    Some(home) => PathBuf::from(home).join(".docker").join("config.json"),
                    None => return Ok(DockerConfig::default()),
                },
            },
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfig {
                    path: Some(file),
                    ..DockerConfig::default()
                })
            }
            Err(e) => {
                return Err(RegistryError::Config(format!(
                    "reading docker config {}: {e}",
                    file.display()
                )))
            }
        };
        let raw: RawDockerConfig = serde_json::from_str(&text).map_err(|e| {
            RegistryError::Config(format!(
                "docker config {} is not valid JSON: line {} column {} (fix or remove the file)",
                file.display(),
                e.line(),
                e.column()
            ))
        })?;
        let mut auths = HashMap::new();
        for (key, entry) in raw.auths {
            let host = normalize_auth_key(&key);
            let credentials = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                Some(Credentials::IdentityToken(token))
            } else if let Some(encoded) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        RegistryError::Config(format!(
                            "docker config {}: the \"auth\" of {key:?} is not base64 of user:password",
                            file.display()
                        ))
                    })?;
                let (username, password) = decoded.split_once(':').ok_or_else(|| {
                    RegistryError::Config(format!(
                        "docker config {}: the \"auth\" of {key:?} has no ':' between user and password",
                        file.display()
                    ))
                })?;
                Some(Credentials::Basic {
                    username: username.to_string(),
                    password: password.to_string(),
                })
            } else {
                match (entry.username, entry.password) {
                    (Some(username), Some(password)) => {
                        Some(Credentials::Basic { username, password })
                    }
                    _ => None,
                }
            };
            if let Some(c) = credentials {
                auths.insert(host, c);
            }
        }
        Ok(DockerConfig {
            path: Some(file),
            auths,
            cred_helpers: raw
                .cred_helpers
                .into_iter()
                .map(|(k, v)| (normalize_auth_key(&k), v))
                .collect(),
            creds_store: raw.creds_store.filter(|s| !s.is_empty()),
        })
    }

    /// Credentials for `host` (`docker.io`, `ghcr.io`, `127.0.0.1:5000`): a credential helper
    /// named in `credHelpers`, else `auths`, else `credsStore`, else none (anonymous).
    pub async fn credentials_for(&self, host: &str) -> Result<Option<Credentials>, RegistryError> {
        let host = normalize_auth_key(host);
        if let Some(helper) = self.cred_helpers.get(&host) {
            return run_credential_helper(helper, &host).await;
        }
        if let Some(c) = self.auths.get(&host) {
            return Ok(Some(c.clone()));
        }
        if let Some(store) = &self.creds_store {
            return run_credential_helper(store, &host).await;
        }
        Ok(None)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `https://host:5000/x` → `host:5000`.
pub(super) fn normalize_auth_key(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or("");
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_string(),
        h => h.to_ascii_lowercase(),
    }
}

#[derive(serde::Deserialize)]
pub(super) struct HelperOutput {
    #[serde(rename = "Username", default)]
    pub(super) username: String,
    #[serde(rename = "Secret", default)]
    pub(super) secret: String,
}

pub(super) async fn run_credential_helper(
    helper: &str,
    host: &str,
) -> Result<Option<Credentials>, RegistryError> {
    use tokio::io::AsyncWriteExt as _;
    let program = format!("docker-credential-{helper}");
    let server = if host == DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    };
    let fail = |what: String| RegistryError::Config(format!("{program} get for {host}: {what}"));
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run it ({e}); install it or fix credHelpers/credsStore"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .await
            .map_err(|e| fail(format!("writing the server name: {e}")))?;
    }
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| fail("no answer within 30 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    if !output.status.success() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        // stderr of helpers describes the failure without secrets.
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(fail(format!(
            "exited with {}: {}",
            output.status,
            stderr.trim().chars().take(300).collect::<String>()
        )));
    }
    let parsed: HelperOutput = serde_json::from_slice(&output.stdout)
        .map_err(|_| fail("printed something other than {\"Username\",\"Secret\"} JSON".into()))?;
    if parsed.secret.is_empty() {
        return Ok(None);
    }
    if parsed.username == "<token>" {
        Ok(Some(Credentials::IdentityToken(parsed.secret)))
    } else {
        Ok(Some(Credentials::Basic {
            username: parsed.username,
            password: parsed.secret,
        }))
    }
}
