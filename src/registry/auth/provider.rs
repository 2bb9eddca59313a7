//! kubelet credential provider plugins (`credentialprovider.kubelet.k8s.io/v1`): the same
//! `CredentialProviderConfig` file and plugin directory kubelet uses, so lazysnap gets the
//! short-lived tokens of cloud registries (ECR, GCR/Artifact Registry, ACR) the way kubelet does.
//! A plugin is run with a `CredentialProviderRequest` on stdin for an image its `matchImages`
//! match; its answer is cached for its `cacheDuration` (per image, registry or globally, as it
//! says) and asked again once 80% of that has passed, before the token it holds expires.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::Instrument as _;

use super::Credentials;
use crate::registry::RegistryError;

/// Share of a cache duration after which a plugin is asked again.
const REFRESH_AT: f64 = 0.8;
/// How long a plugin may take.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderConfigFile {
    #[serde(default)]
    providers: Vec<ProviderSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderSpec {
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    #[serde(default)]
    default_cache_duration: Option<String>,
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
}

#[derive(Debug, Clone, Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderResponse {
    #[serde(default)]
    cache_key_type: String,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

struct Cached {
    /// Credentials by the plugin's `auth` key (a match pattern).
    auth: Vec<(String, Credentials)>,
    fetched: Instant,
    duration: Duration,
}

/// The plugins of a `CredentialProviderConfig` and their cached answers.
pub struct CredentialProviders {
    providers: Vec<ProviderSpec>,
    bin_dir: PathBuf,
    cache: tokio::sync::Mutex<HashMap<(String, String), Cached>>,
}

impl std::fmt::Debug for CredentialProviders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialProviders")
            .field(
                "providers",
                &self.providers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .field("bin_dir", &self.bin_dir)
            .finish()
    }
}

impl CredentialProviders {
    /// Reads kubelet's `CredentialProviderConfig` (YAML or JSON) at `config`; plugins are run
    /// from `bin_dir`.
    pub fn load(config: &Path, bin_dir: &Path) -> Result<Self, RegistryError> {
        let fail = |what: String| {
            RegistryError::Config(format!(
                "credential provider config {}: {what}",
                config.display()
            ))
        };
        let text = std::fs::read_to_string(config).map_err(|e| fail(e.to_string()))?;
        let file: ProviderConfigFile =
            serde_norway::from_str(&text).map_err(|e| fail(e.to_string()))?;
        for provider in &file.providers {
            if provider.api_version != "credentialprovider.kubelet.k8s.io/v1" {
                return Err(fail(format!(
                    "provider {}: apiVersion {:?} is not credentialprovider.kubelet.k8s.io/v1",
                    provider.name, provider.api_version
                )));
            }
            if provider.name.contains('/') || provider.name.is_empty() {
                return Err(fail(format!(
                    "provider name {:?} must be a file name in {}",
                    provider.name,
                    bin_dir.display()
                )));
            }
            if let Some(duration) = &provider.default_cache_duration {
                parse_duration(duration).ok_or_else(|| {
                    fail(format!(
                        "provider {}: defaultCacheDuration {duration:?} is not a duration such as \"12h\"",
                        provider.name
                    ))
                })?;
            }
        }
        Ok(CredentialProviders {
            providers: file.providers,
            bin_dir: bin_dir.to_path_buf(),
            cache: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Credentials for `repository` on `host` from the first plugin whose `matchImages` match.
    pub async fn credentials_for(
        &self,
        host: &str,
        repository: Option<&str>,
    ) -> Result<Option<Credentials>, RegistryError> {
        let image = match repository {
            Some(repository) => format!("{host}/{repository}"),
            None => host.to_string(),
        };
        let Some(provider) = self
            .providers
            .iter()
            .find(|p| p.match_images.iter().any(|m| image_matches(m, &image)))
        else {
            return Ok(None);
        };
        let mut cache = self.cache.lock().await;
        let keys = [
            (provider.name.clone(), image.clone()),
            (provider.name.clone(), host.to_string()),
            (provider.name.clone(), String::new()),
        ];
        let now = Instant::now();
        let cached = keys.iter().find_map(|key| {
            cache
                .get(key)
                .filter(|c| now.duration_since(c.fetched) < c.duration)
                .map(|c| (key.clone(), c))
        });
        let fresh_enough = cached
            .as_ref()
            .is_some_and(|(_, c)| now.duration_since(c.fetched) < c.duration.mul_f64(REFRESH_AT));
        if !fresh_enough {
            match self.run(provider, &image).await {
                Ok(response) => {
                    let duration = response
                        .cache_duration
                        .as_deref()
                        .and_then(parse_duration)
                        .or_else(|| {
                            provider
                                .default_cache_duration
                                .as_deref()
                                .and_then(parse_duration)
                        })
                        .unwrap_or(Duration::ZERO);
                    let key = match response.cache_key_type.as_str() {
                        "Registry" => keys[1].clone(),
                        "Global" => keys[2].clone(),
                        _ => keys[0].clone(),
                    };
                    let auth: Vec<(String, Credentials)> = response
                        .auth
                        .into_iter()
                        .map(|(pattern, entry)| {
                            (
                                pattern,
                                Credentials::Basic {
                                    username: entry.username,
                                    password: entry.password,
                                },
                            )
                        })
                        .collect();
                    let found = pick(&auth, &image);
                    cache.insert(
                        key,
                        Cached {
                            auth,
                            fetched: now,
                            duration,
                        },
                    );
                    return Ok(found);
                }
                // A failed refresh keeps what is still valid.
                Err(err) if cached.is_some() => {
                    tracing::warn!(provider = %provider.name, error = %err, "refreshing credentials failed; using the cached ones until they expire");
                }
                Err(err) => return Err(err),
            }
        }
        Ok(cached.and_then(|(_, c)| pick(&c.auth, &image)))
    }

    async fn run(
        &self,
        provider: &ProviderSpec,
        image: &str,
    ) -> Result<ProviderResponse, RegistryError> {
        let span =
            tracing::info_span!("registry.credential_provider", provider = %provider.name, image);
        self.run_plugin(provider, image).instrument(span).await
    }

    async fn run_plugin(
        &self,
        provider: &ProviderSpec,
        image: &str,
    ) -> Result<ProviderResponse, RegistryError> {
        use tokio::io::AsyncWriteExt as _;
        let program = self.bin_dir.join(&provider.name);
        let fail = |what: String| {
            RegistryError::Config(format!(
                "credential provider {} for {image}: {what}",
                program.display()
            ))
        };
        let mut child = tokio::process::Command::new(&program)
            .args(&provider.args)
            .envs(provider.env.iter().map(|e| (&e.name, &e.value)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot run it: {e}")))?;
        let request = serde_json::json!({
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "kind": "CredentialProviderRequest",
            "image": image,
        });
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(request.to_string().as_bytes())
                .await
                .map_err(|e| fail(format!("writing the request: {e}")))?;
        }
        let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| fail(format!("no answer within {PLUGIN_TIMEOUT:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        if !output.status.success() {
            return Err(fail(format!(
                "exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        // The answer holds secrets: the parse error is reported without it.
        serde_json::from_slice(&output.stdout).map_err(|e| {
            fail(format!(
                "its answer is not a CredentialProviderResponse (line {}, column {})",
                e.line(),
                e.column()
            ))
        })
    }
}

/// The credentials whose `auth` key matches `image` best (the longest pattern).
fn pick(auth: &[(String, Credentials)], image: &str) -> Option<Credentials> {
    auth.iter()
        .filter(|(pattern, _)| image_matches(pattern, image))
        .max_by_key(|(pattern, _)| pattern.len())
        .map(|(_, c)| c.clone())
}

/// kubelet's image matching: the host's dot-separated labels match one for one (`*` within a
/// label), a port must be equal, and the pattern's path is a prefix of the image's.
fn image_matches(pattern: &str, image: &str) -> bool {
    let strip = |s: &str| {
        s.strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s)
            .to_string()
    };
    let (pattern, image) = (strip(pattern), strip(image));
    let (pattern_host, pattern_path) = pattern.split_once('/').unwrap_or((&pattern, ""));
    let (image_host, image_path) = image.split_once('/').unwrap_or((&image, ""));
    let (pattern_name, pattern_port) = pattern_host
        .rsplit_once(':')
        .map_or((pattern_host, None), |(h, p)| (h, Some(p)));
    let (image_name, image_port) = image_host
        .rsplit_once(':')
        .map_or((image_host, None), |(h, p)| (h, Some(p)));
    if pattern_port.is_some() && pattern_port != image_port {
        return false;
    }
    let pattern_labels: Vec<&str> = pattern_name.split('.').collect();
    let image_labels: Vec<&str> = image_name.split('.').collect();
    if pattern_labels.len() != image_labels.len() {
        return false;
    }
    let labels_match = pattern_labels
        .iter()
        .zip(&image_labels)
        .all(|(p, i)| glob::Pattern::new(p).is_ok_and(|p| p.matches(i)));
    labels_match
        && (pattern_path.is_empty()
            || image_path == pattern_path
            || image_path.starts_with(&format!("{}/", pattern_path.trim_end_matches('/'))))
}

/// Go's duration syntax as kubelet writes it: `12h`, `1h30m`, `90s`, `500ms`.
fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::from_secs_f64(value * seconds);
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_match_like_kubelet() {
        assert!(image_matches(
            "*.dkr.ecr.*.amazonaws.com",
            "123.dkr.ecr.us-east-1.amazonaws.com/app"
        ));
        assert!(!image_matches(
            "*.dkr.ecr.*.amazonaws.com",
            "dkr.ecr.us-east-1.amazonaws.com/app"
        ));
        assert!(image_matches("127.0.0.1:5000", "127.0.0.1:5000/team/app"));
        assert!(!image_matches("127.0.0.1:5001", "127.0.0.1:5000/team/app"));
        assert!(image_matches("registry.io/team", "registry.io/team/app"));
        assert!(!image_matches("registry.io/team", "registry.io/teamx/app"));
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("12 hours"), None);
    }

    #[test]
    fn a_config_with_another_api_version_names_the_provider() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("providers.yaml");
        std::fs::write(
            &config,
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: ecr\n    matchImages: [\"*.example.com\"]\n    apiVersion: credentialprovider.kubelet.k8s.io/v1alpha1\n",
        )
        .unwrap();
        let err = CredentialProviders::load(&config, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ecr") && err.contains("v1alpha1"), "{err}");
    }
}

#[cfg(test)]
mod refresh_tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_is_reused_then_asked_again_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let plugin = dir.path().join("p");
        std::fs::write(
            &plugin,
            format!(
                "#!/bin/sh\ncat > /dev/null\necho run >> {}\nprintf '%s' '{{\"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"Image\",\"cacheDuration\":\"1s\",\"auth\":{{\"reg.example\":{{\"username\":\"u\",\"password\":\"p\"}}}}}}'\n",
                runs.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("c.yaml");
        std::fs::write(
            &config,
            "providers:\n  - name: p\n    matchImages: [\"reg.example\"]\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
        )
        .unwrap();
        let providers = CredentialProviders::load(&config, dir.path()).unwrap();
        let count = || {
            std::fs::read_to_string(&runs)
                .unwrap_or_default()
                .lines()
                .count()
        };
        for _ in 0..3 {
            let found = providers
                .credentials_for("reg.example", Some("app"))
                .await
                .unwrap();
            assert!(matches!(found, Some(Credentials::Basic { username, .. }) if username == "u"));
        }
        assert_eq!(count(), 1);
        // Past 80% of its one second: asked again while the old answer is still valid.
        tokio::time::sleep(Duration::from_millis(850)).await;
        providers
            .credentials_for("reg.example", Some("app"))
            .await
            .unwrap();
        assert_eq!(count(), 2);
        assert!(providers
            .credentials_for("other.example", Some("app"))
            .await
            .unwrap()
            .is_none());
    }
}
