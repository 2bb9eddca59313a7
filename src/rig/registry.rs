//! The real Distribution registry (Debian `docker-registry`) on `127.0.0.1:<free port>`, storage
//! in a temp dir, with its access log parsed so tests can assert how many bytes a read cost.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, require_program, RigError};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How to start a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `auth.htpasswd.path`: an htpasswd file (bcrypt) turning on Basic auth.
    pub htpasswd: Option<PathBuf>,
    /// `proxy.remoteurl`: run as a pull-through cache of this upstream registry.
    pub proxy_remote_url: Option<String>,
    /// Extra YAML appended verbatim to the config (e.g. a `auth.token` section).
    pub extra_config: Option<String>,
    /// Serve HTTPS with this certificate and key (PEM files) instead of plain HTTP.
    pub tls: Option<RegistryTls>,
    /// Serve the storage of another registry (e.g. an HTTPS front of the same repositories)
    /// instead of a fresh one in the registry's own directory.
    pub storage_root: Option<PathBuf>,
}

/// The certificate and key of an HTTPS registry.
#[derive(Debug, Clone)]
pub struct RegistryTls {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// A running registry; killed and its storage removed on drop.
pub struct RegistryServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    storage_root: PathBuf,
    https: bool,
}

impl RegistryServer {
    /// Starts a plain registry with default options.
    pub fn start() -> Result<Self, RigError> {
        Self::start_with(&RegistryOptions::default())
    }

    /// Starts a registry with `options` and waits until it answers `/v2/`.
    pub fn start_with(options: &RegistryOptions) -> Result<Self, RigError> {
        require_program(REGISTRY_BIN, "docker-registry")?;
        let dir = tempfile::Builder::new()
            .prefix("lazysnap-registry-")
            .tempdir()
            .map_err(RigError::io("creating the registry temp dir"))?;
        let port = free_port()?;
        let storage_root = options
            .storage_root
            .clone()
            .unwrap_or_else(|| dir.path().join("storage"));
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, render_config(&storage_root, port, options))
            .map_err(RigError::io("writing the registry config"))?;
        let log = File::create(dir.path().join("registry.log"))
            .map_err(RigError::io("creating the registry log"))?;
        let log_err = log
            .try_clone()
            .map_err(RigError::io("duplicating the registry log handle"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(RigError::io("spawning docker-registry"))?;
        let mut server = Self {
            child,
            port,
            dir,
            storage_root,
            https: options.tls.is_some(),
        };
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), RigError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(RigError::Start {
                    what: "docker-registry".into(),
                    detail: format!("exited with {status}; log:\n{}", self.log()),
                });
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(RigError::Start {
                    what: "docker-registry".into(),
                    detail: format!("not listening after {timeout:?}; log:\n{}", self.log()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:<port>`, the registry host as used in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The TCP port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>` (`https://` when serving TLS).
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// Where the registry keeps its repositories (see [`RegistryOptions::storage_root`]).
    pub fn storage_root(&self) -> &Path {
        &self.storage_root
    }

    /// The registry's storage and config directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the registry logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Access-log lines for GETs of blob `digest` (`sha256:…`): (status, body bytes) each.
    pub fn blob_gets(&self, digest: &str) -> Vec<(u16, u64)> {
        // Clients may add a query (containerd's `?ns=<host>` for mirrors).
        let needles = [
            format!("/blobs/{digest} HTTP/"),
            format!("/blobs/{digest}?"),
        ];
        self.log()
            .lines()
            .filter(|line| line.contains("\"GET ") && needles.iter().any(|n| line.contains(n)))
            .filter_map(parse_status_and_bytes)
            .collect()
    }

    /// Total body bytes the registry served for GETs of blob `digest`.
    pub fn blob_bytes_served(&self, digest: &str) -> u64 {
        self.blob_gets(digest).iter().map(|(_, bytes)| bytes).sum()
    }

    /// Stops the registry (SIGKILL) without removing its storage; see [`Self::restart`].
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again on the same port and storage after [`Self::stop`].
    pub fn restart(&mut self) -> Result<(), RigError> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .map_err(RigError::io("opening the registry log"))?;
        let log_err = log
            .try_clone()
            .map_err(RigError::io("duplicating the registry log handle"))?;
        self.child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(RigError::io("spawning docker-registry"))?;
        self.wait_ready(Duration::from_secs(20))
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn render_config(storage_root: &Path, port: u16, options: &RegistryOptions) -> String {
    let mut config = format!(
        "version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: false\n\
         storage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  redirect:\n    disable: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  headers:\n    X-Content-Type-Options: [nosniff]\n",
        storage_root.display()
    );
    if let Some(tls) = &options.tls {
        config.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            tls.certificate.display(),
            tls.key.display()
        ));
    }
    if let Some(htpasswd) = &options.htpasswd {
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: {}\n",
            htpasswd.display()
        ));
    }
    if let Some(remote) = &options.proxy_remote_url {
        config.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
    }
    if let Some(extra) = &options.extra_config {
        config.push_str(extra);
        if !extra.ends_with('\n') {
            config.push('\n');
        }
    }
    config
}

/// Parses `... "GET /v2/... HTTP/1.1" 206 1234 ...` (or `HTTP/2.0`) into (206, 1234).
fn parse_status_and_bytes(line: &str) -> Option<(u16, u64)> {
    let after_request = line.split(" HTTP/").nth(1)?.split("\" ").nth(1)?;
    let mut fields = after_request.split_whitespace();
    let status = fields.next()?.parse().ok()?;
    let bytes = fields.next()?.parse().ok()?;
    Some((status, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_log_lines() {
        let line = r#"127.0.0.1 - - [22/Nov/2026:02:50:00 +0000] "GET /v2/x/blobs/sha256:ab HTTP/1.1" 206 4096 "" "curl/7.88""#;
        assert_eq!(parse_status_and_bytes(line), Some((206, 4096)));
        let http2 = r#"127.0.0.1 - - [06/Dec/2026:18:42:10 +0000] "GET /v2/t/img/blobs/sha256:81 HTTP/2.0" 206 3247317 "" "soci-snapshotter/0.4.1-6""#;
        assert_eq!(parse_status_and_bytes(http2), Some((206, 3_247_317)));
    }

    #[test]
    fn starts_real_registry_and_counts_bytes() {
        let registry = RegistryServer::start().expect("docker-registry must be installed");
        let v2 = std::net::TcpStream::connect(("127.0.0.1", registry.port()));
        assert!(v2.is_ok(), "{}", registry.log());
    }
}
