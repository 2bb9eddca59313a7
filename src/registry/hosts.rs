//! containerd's `hosts.toml` directory format (`<dir>/<registry host>/hosts.toml`, falling back
//! to `<dir>/_default/hosts.toml`): `server`, `[host."…"]` with `capabilities`, `skip_verify`,
//! `ca`, `client`, `header`, `override_path`. Mirrors come first, in file order; the origin last.

use std::path::{Path, PathBuf};

use super::reference::{is_localhost_host, Reference};
use super::RegistryError;

/// What a host may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapabilities {
    pub pull: bool,
    pub resolve: bool,
    pub push: bool,
}

impl HostCapabilities {
    /// Everything (the origin's default).
    pub const ALL: Self = Self {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// One endpoint of a registry: a mirror or the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Base URL of the API including `/v2` (or the override path): `https://mirror:5000/v2`.
    pub api_base: String,
    /// `host[:port]` of the endpoint, the key for credentials and tokens.
    pub host: String,
    pub capabilities: HostCapabilities,
    pub skip_verify: bool,
    /// Extra CA certificates (PEM files) trusted for this host, besides the system roots.
    pub ca: Vec<PathBuf>,
    /// Client certificates: (cert PEM, optional key PEM; without a key the cert file holds it).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// True for a mirror (requests carry `?ns=<registry>`), false for the origin.
    pub is_mirror: bool,
}

/// A containerd `certs.d`-style configuration directory.
#[derive(Debug, Clone)]
pub struct HostsDir {
    dir: Option<PathBuf>,
    plain_http: bool,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHostsFile {
    server: Option<String>,
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<StringOrList>,
    client: Option<ClientCerts>,
    header: Option<toml::Table>,
    override_path: Option<bool>,
    #[serde(default)]
    host: toml::Table,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHostSettings {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<StringOrList>,
    client: Option<ClientCerts>,
    header: Option<toml::Table>,
    override_path: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum ClientCerts {
    One(String),
    Pairs(Vec<Vec<String>>),
    Many(Vec<String>),
}

impl HostsDir {
    /// `dir` may be `None` (no mirrors). `plain_http` applies to the origin of non-localhost
    /// registries (`--plain-http`).
    pub fn new(dir: Option<PathBuf>, plain_http: bool) -> Self {
        Self { dir, plain_http }
    }

    /// The endpoints to try for `reference`'s registry, mirrors first and the origin last.
    pub fn endpoints(&self, reference: &Reference) -> Result<Vec<HostConfig>, RegistryError> {
        let registry = reference.registry.as_str();
        let default_scheme = if self.plain_http || reference.is_localhost() {
            "http"
        } else {
            "https"
        };
        let origin_url = format!("{default_scheme}://{}", reference.endpoint_host());
        let Some(dir) = &self.dir else {
            return Ok(vec![origin(&origin_url)?]);
        };
        let file = [registry, "_default"]
            .iter()
            .map(|name| dir.join(host_dir_name(name)).join("hosts.toml"))
            .find(|p| p.is_file());
        let Some(file) = file else {
            return Ok(vec![origin(&origin_url)?]);
        };
        parse_hosts_file(&file, &origin_url, default_scheme)
    }
}

/// containerd names `[::1]:5000`'s directory as is; keep the host text verbatim.
fn host_dir_name(registry: &str) -> &str {
    registry
}

fn origin(url: &str) -> Result<HostConfig, RegistryError> {
    host_from_url(url, "https", HostCapabilities::ALL, false, false)
}

fn host_from_url(
    url: &str,
    default_scheme: &str,
    capabilities: HostCapabilities,
    override_path: bool,
    is_mirror: bool,
) -> Result<HostConfig, RegistryError> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        let host_part = url.split('/').next().unwrap_or("");
        let scheme = if is_localhost_host(host_part) {
            "http"
        } else {
            default_scheme
        };
        format!("{scheme}://{url}")
    };
    let parsed = reqwest::Url::parse(&with_scheme)
        .map_err(|e| RegistryError::Config(format!("host URL {url:?} is invalid: {e}")))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(RegistryError::Config(format!(
            "host URL {url:?} must be http or https"
        )));
    }
    let host = match (parsed.host_str(), parsed.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        (None, _) => {
            return Err(RegistryError::Config(format!(
                "host URL {url:?} has no host"
            )))
        }
    };
    let mut path = parsed.path().trim_end_matches('/').to_string();
    if !override_path && !path.ends_with("/v2") {
        path.push_str("/v2");
    }
    Ok(HostConfig {
        api_base: format!("{}://{}{}", parsed.scheme(), host, path),
        host,
        capabilities,
        skip_verify: false,
        ca: Vec::new(),
        client: Vec::new(),
        headers: Vec::new(),
        is_mirror,
    })
}

fn parse_hosts_file(
    file: &Path,
    origin_url: &str,
    default_scheme: &str,
) -> Result<Vec<HostConfig>, RegistryError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| RegistryError::Config(format!("{}: cannot read: {e}", file.display())))?;
    parse_hosts_text(&text, file, origin_url, default_scheme)
}

/// The hosts of a hosts.toml whose text is `text`, read from `file` (which names it in errors;
/// relative certificate paths are taken from its directory).
pub(crate) fn parse_hosts_text(
    text: &str,
    file: &Path,
    origin_url: &str,
    default_scheme: &str,
) -> Result<Vec<HostConfig>, RegistryError> {
    let err = |what: String| RegistryError::Config(format!("{}: {what}", file.display()));
    let raw: RawHostsFile =
        toml::from_str(text).map_err(|e| err(format!("invalid hosts.toml: {e}")))?;
    let base_dir = file.parent().unwrap_or(Path::new("/"));
    // Mirrors are tried in file order; the table map is sorted, so order by position.
    let mut mirrors: Vec<(String, toml::Value)> = raw.host.into_iter().collect();
    mirrors.sort_by_key(|(url, _)| text.find(&format!("\"{url}\"")).unwrap_or(usize::MAX));
    let mut hosts = Vec::new();
    for (url, value) in mirrors {
        let settings: RawHostSettings = value
            .try_into()
            .map_err(|e| err(format!("[host.{url:?}]: {e}")))?;
        hosts.push(
            apply_settings(&url, settings, default_scheme, true, base_dir)
                .map_err(|e| err(format!("[host.{url:?}]: {e}")))?,
        );
    }
    let server = raw.server.as_deref().unwrap_or(origin_url);
    hosts.push(
        apply_settings(
            server,
            RawHostSettings {
                capabilities: raw.capabilities,
                skip_verify: raw.skip_verify,
                ca: raw.ca,
                client: raw.client,
                header: raw.header,
                override_path: raw.override_path,
            },
            default_scheme,
            false,
            base_dir,
        )
        .map_err(|e| err(format!("server {server:?}: {e}")))?,
    );
    Ok(hosts)
}

fn apply_settings(
    url: &str,
    settings: RawHostSettings,
    default_scheme: &str,
    is_mirror: bool,
    base_dir: &Path,
) -> Result<HostConfig, RegistryError> {
    let capabilities = match &settings.capabilities {
        None if is_mirror => HostCapabilities {
            pull: true,
            resolve: true,
            push: false,
        },
        None => HostCapabilities::ALL,
        Some(list) => {
            let mut caps = HostCapabilities {
                pull: false,
                resolve: false,
                push: false,
            };
            for c in list {
                match c.as_str() {
                    "pull" => caps.pull = true,
                    "resolve" => caps.resolve = true,
                    "push" => caps.push = true,
                    other => {
                        return Err(RegistryError::Config(format!(
                            "unknown capability {other:?} (pull, resolve, push)"
                        )))
                    }
                }
            }
            caps
        }
    };
    let mut host = host_from_url(
        url,
        default_scheme,
        capabilities,
        settings.override_path.unwrap_or(false),
        is_mirror,
    )?;
    host.skip_verify = settings.skip_verify.unwrap_or(false);
    let resolve = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };
    host.ca = settings
        .ca
        .map(StringOrList::into_vec)
        .unwrap_or_default()
        .iter()
        .map(|p| resolve(p))
        .collect();
    host.client = match settings.client {
        None => Vec::new(),
        Some(ClientCerts::One(cert)) => vec![(resolve(&cert), None)],
        Some(ClientCerts::Many(certs)) => certs.iter().map(|c| (resolve(c), None)).collect(),
        Some(ClientCerts::Pairs(pairs)) => pairs
            .iter()
            .map(|pair| match pair.as_slice() {
                [cert] => Ok((resolve(cert), None)),
                [cert, key] => Ok((resolve(cert), Some(resolve(key)))),
                _ => Err(RegistryError::Config(
                    "client entries must be [cert] or [cert, key]".into(),
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    for (name, value) in settings.header.unwrap_or_default() {
        match value {
            toml::Value::String(s) => host.headers.push((name, s)),
            toml::Value::Array(values) => {
                for v in values {
                    match v {
                        toml::Value::String(s) => host.headers.push((name.clone(), s)),
                        _ => {
                            return Err(RegistryError::Config(format!(
                                "header {name:?} values must be strings"
                            )))
                        }
                    }
                }
            }
            _ => {
                return Err(RegistryError::Config(format!(
                    "header {name:?} must be a string or a list of strings"
                )))
            }
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_endpoints_without_hosts_dir() {
        let hosts = HostsDir::new(None, false);
        let e = hosts
            .endpoints(&Reference::parse("busybox").unwrap())
            .unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].api_base, "https://registry-1.docker.io/v2");
        let e = hosts
            .endpoints(&Reference::parse("127.0.0.1:5000/a").unwrap())
            .unwrap();
        assert_eq!(e[0].api_base, "http://127.0.0.1:5000/v2");
        let e = hosts
            .endpoints(&Reference::parse("[::1]:5000/a").unwrap())
            .unwrap();
        assert_eq!(e[0].api_base, "http://[::1]:5000/v2");
        let plain = HostsDir::new(None, true);
        let e = plain
            .endpoints(&Reference::parse("example.com/a").unwrap())
            .unwrap();
        assert_eq!(e[0].api_base, "http://example.com/v2");
    }

    #[test]
    fn parses_hosts_toml_mirrors_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("example.com");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(
            reg.join("hosts.toml"),
            r#"
server = "https://example.com"
[host."https://zz-mirror.local:5000"]
  capabilities = ["pull", "resolve"]
  ca = "ca.pem"
  skip_verify = false
  [host."https://zz-mirror.local:5000".header]
    x-custom = ["a", "b"]
[host."http://mirror-b.local/prefix/v2"]
  capabilities = ["pull"]
  override_path = true
  client = [["cert.pem", "key.pem"]]
"#,
        )
        .unwrap();
        let hosts = HostsDir::new(Some(dir.path().to_path_buf()), false);
        let e = hosts
            .endpoints(&Reference::parse("example.com/app:1").unwrap())
            .unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].api_base, "https://zz-mirror.local:5000/v2");
        assert!(e[0].is_mirror);
        assert!(!e[0].capabilities.push);
        assert_eq!(e[0].ca, vec![reg.join("ca.pem")]);
        assert_eq!(e[0].headers.len(), 2);
        assert_eq!(e[1].api_base, "http://mirror-b.local/prefix/v2");
        assert!(!e[1].capabilities.resolve);
        assert_eq!(
            e[1].client,
            vec![(reg.join("cert.pem"), Some(reg.join("key.pem")))]
        );
        assert_eq!(e[2].api_base, "https://example.com/v2");
        assert!(!e[2].is_mirror);
        assert!(e[2].capabilities.push);
    }

    #[test]
    fn rejects_unknown_keys_and_capabilities() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("_default");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(reg.join("hosts.toml"), "servr = \"x\"\n").unwrap();
        let hosts = HostsDir::new(Some(dir.path().to_path_buf()), false);
        let r = Reference::parse("example.com/app").unwrap();
        assert!(matches!(hosts.endpoints(&r), Err(RegistryError::Config(_))));
        std::fs::write(
            reg.join("hosts.toml"),
            "[host.\"https://m\"]\ncapabilities = [\"fly\"]\n",
        )
        .unwrap();
        assert!(matches!(hosts.endpoints(&r), Err(RegistryError::Config(_))));
    }
}
