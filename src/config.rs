//! The daemon's one TOML configuration file: every key, its default, and validation that names
//! the offending key.
//!
//! Every key is optional; an empty file (or no file) means all defaults. Unknown keys are errors
//! that name the key. The full file with defaults (also in `packaging/config.toml`):
//!
//! ```toml
//! # State directory: snapshot metadata (metadata.db) and snapshot directories.
//! root = "/var/lib/lazysnap"
//! # Unix socket containerd's proxy plugin connects to (created mode 0660).
//! address = "/run/lazysnap/lazysnap.sock"
//! # Log format: "text" or "json".
//! log_format = "text"
//! # Log level: error, warn, info, debug, trace, or a filter such as "info,lazysnap::fetch=debug"
//! # (the LAZYSNAP_LOG environment variable and --log-level win over it).
//! log_level = "info"
//! # Prometheus endpoint, e.g. "127.0.0.1:9345"; empty = off. Loopback unless a cluster's Prometheus
//! # scrapes it (then e.g. "0.0.0.0:9345"). Also serves /healthz (503 until serving) and /livez.
//! metrics_address = ""
//!
//! [cache]
//! # Chunk cache directory; default "<root>/cache".
//! dir = ""
//! # Size bound of the disk cache in bytes (default 10 GiB).
//! max_bytes = 10737418240
//! # In-memory tier in bytes (default 64 MiB).
//! memory_bytes = 67108864
//! # Disk-usage watermarks of the filesystem holding the cache (like kubelet's image GC): when it
//! # is fuller than high_watermark_pct (Use% as df shows it, root's reserve not counted), chunks
//! # are evicted until it is below low_watermark_pct. Chunks used in the last two minutes are
//! # spared while they take no more than the room above high_watermark_pct, so a disk that
//! # other data fills does not make running containers fetch the same chunks again and again.
//! high_watermark_pct = 90
//! low_watermark_pct = 80
//!
//! [fetch]
//! # Fetch the prioritized part of each layer when it is mounted.
//! prefetch = true
//! # Fill the rest of each layer in the background.
//! background_fill = true
//! # Concurrent background range requests across all layers.
//! background_concurrency = 2
//! # Background bandwidth limit in bytes/s across all layers (0 = unlimited).
//! background_bandwidth = 0
//! # Background fill starts only once no read has missed the cache (and no layer was mounted)
//! # for this many seconds, so it never competes with a container's startup.
//! background_quiet_secs = 5
//! # On a read that misses the cache, also fetch the chunks that follow it in the layer (the next
//! # files in TOC order), up to about one bandwidth-delay product: fewer round trips at startup.
//! readahead = true
//! # When a program's or library's first chunk is fetched, also fetch the shared libraries it
//! # names (its interpreter and needed libraries, found in this layer or the layers below) at
//! # prefetch priority: the loader's chain of round trips becomes one.
//! library_prefetch = true
//! # At a layer's mount, fetch what every container of the image reads first: the program its
//! # config names (entrypoint or cmd, through PATH and symlinks), /etc/ld.so.cache, /etc/passwd
//! # and /etc/group, at prefetch priority while the pull and the container's create go on.
//! startup_prefetch = true
//! # Deadline of one on-demand read, in seconds: after it the process gets EIO.
//! read_deadline_secs = 30
//! # Timeout of one HTTP request, in seconds.
//! request_timeout_secs = 30
//! # Kernel read-ahead of each lazy layer's mount in KiB (its bdi read_ahead_kb): what the kernel
//! # asks for beyond what a process reads. Small keeps a cold start from fetching bytes nobody
//! # reads (a page fault in a large binary otherwise pulls megabytes around it).
//! kernel_read_ahead_kb = 8
//! # Serve files whose bytes are all cached by FUSE passthrough (the kernel reads the cache file;
//! # needs Linux 6.9+, falls back by itself); false sends every read through lazysnap.
//! passthrough = true
//!
//! [registry]
//! # containerd-style hosts.toml tree (<dir>/<host>/hosts.toml), as containerd's config_path.
//! config_path = "/etc/containerd/certs.d"
//! # Docker config with registry credentials; empty = $DOCKER_CONFIG/config.json or ~/.docker/config.json.
//! docker_config = ""
//! # Use plain HTTP for every registry (localhost / 127.0.0.1 always use plain HTTP).
//! plain_http = false
//! # kubelet's credential provider plugins (ECR, GCR, ACR tokens): the CredentialProviderConfig
//! # file kubelet's --image-credential-provider-config names (empty = none) and the plugins'
//! # directory (--image-credential-provider-bin-dir). Answers are cached for their cacheDuration
//! # and asked again after 80% of it, before short-lived tokens expire.
//! credential_provider_config = ""
//! credential_provider_bin_dir = "/usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec"
//!
//! [cri_keychain]
//! # Private images under Kubernetes: kubelet hands pull secrets to the CRI image service, never to
//! # a snapshotter. With enable = true, serve also serves the CRI image service on listen_path,
//! # forwards every call to containerd's (image_service_path), and keeps the credentials of each
//! # PullImage in memory, per image, for ttl_secs after its last pull, to fetch that image's lazy
//! # layers. Point kubelet there: --image-service-endpoint=unix:///run/lazysnap/cri-image.sock.
//! enable = false
//! listen_path = "/run/lazysnap/cri-image.sock"
//! image_service_path = "/run/containerd/containerd.sock"
//! ttl_secs = 86400
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default state directory.
pub const DEFAULT_ROOT: &str = "/var/lib/lazysnap";
/// Default socket containerd connects to.
pub const DEFAULT_ADDRESS: &str = "/run/lazysnap/lazysnap.sock";

/// A configuration file that cannot be used; names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type (the message names the key).
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// A value of the right type that is not allowed.
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: String,
        key: &'static str,
        message: String,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole configuration of `lazysnap serve`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// State directory (default `/var/lib/lazysnap`).
    pub root: PathBuf,
    /// Unix socket path (default `/run/lazysnap/lazysnap.sock`).
    pub address: PathBuf,
    /// `text` (default) or `json`.
    pub log_format: LogFormat,
    /// A tracing filter: a level (default `info`) or directives like `info,lazysnap::fetch=debug`.
    pub log_level: String,
    /// Prometheus endpoint address; empty (default) = off.
    pub metrics_address: String,
    pub cache: CacheConfig,
    pub fetch: FetchConfig,
    pub registry: RegistryConfig,
    pub cri_keychain: CriKeychainConfig,
}

/// `[cri_keychain]`: the CRI image service lazysnap can serve to learn kubelet's pull secrets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriKeychainConfig {
    /// Serve the CRI image service and keep the credentials of its pulls (default false).
    pub enable: bool,
    /// Socket kubelet's `--image-service-endpoint` points at.
    pub listen_path: PathBuf,
    /// containerd's socket, where every call is forwarded.
    pub image_service_path: PathBuf,
    /// How long credentials are kept after the last pull of their image (default one day).
    pub ttl_secs: u64,
}

impl Default for CriKeychainConfig {
    fn default() -> Self {
        Self {
            enable: false,
            listen_path: PathBuf::from("/run/lazysnap/cri-image.sock"),
            image_service_path: PathBuf::from("/run/containerd/containerd.sock"),
            ttl_secs: 86400,
        }
    }
}

/// `[cache]`: the chunk cache.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Cache directory; empty (default) = `<root>/cache`.
    pub dir: PathBuf,
    /// Disk size bound in bytes (default 10 GiB).
    pub max_bytes: u64,
    /// Memory tier in bytes (default 64 MiB).
    pub memory_bytes: u64,
    /// Eviction starts when the cache's filesystem is fuller than this percentage (default 90).
    pub high_watermark_pct: u8,
    /// Watermark eviction stops below this percentage of the filesystem (default 80).
    pub low_watermark_pct: u8,
}

/// `[fetch]`: prefetch, background fill and deadlines.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Prefetch the prioritized part of a layer on mount (default true).
    pub prefetch: bool,
    /// Fill the rest of each layer in the background (default true).
    pub background_fill: bool,
    /// Concurrent background requests (default 2).
    pub background_concurrency: u32,
    /// Background bandwidth in bytes/s across all layers, 0 = unlimited (default 0).
    pub background_bandwidth: u64,
    /// Seconds without a cache miss or a mount before background fill starts (default 5).
    pub background_quiet_secs: u64,
    /// Read-ahead of the following chunks on a miss (default true).
    pub readahead: bool,
    /// Prefetch of the shared libraries an ELF file names once its first chunk is fetched
    /// (default true).
    pub library_prefetch: bool,
    /// Prefetch, at mount, of the files every container of the image reads first (default
    /// true).
    pub startup_prefetch: bool,
    /// On-demand read deadline in seconds (default 30).
    pub read_deadline_secs: u64,
    /// HTTP request timeout in seconds (default 30).
    pub request_timeout_secs: u64,
    /// FUSE passthrough for files whose bytes are all cached (default true).
    pub passthrough: bool,
    /// Kernel read-ahead of a lazy layer's mount in KiB (default 32).
    pub kernel_read_ahead_kb: u32,
}

/// `[registry]`: how registries are reached.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// hosts.toml directory (default `/etc/containerd/certs.d`).
    pub config_path: PathBuf,
    /// Docker config file; empty (default) = the usual locations.
    pub docker_config: PathBuf,
    /// Plain HTTP for every registry (default false).
    pub plain_http: bool,
    /// kubelet's `CredentialProviderConfig` file; empty (default) = no credential providers.
    pub credential_provider_config: PathBuf,
    /// Directory of the credential provider plugins (kubelet's `--image-credential-provider-bin-dir`).
    pub credential_provider_bin_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            log_format: LogFormat::Text,
            log_level: "info".to_string(),
            metrics_address: String::new(),
            cache: CacheConfig::default(),
            fetch: FetchConfig::default(),
            registry: RegistryConfig::default(),
            cri_keychain: CriKeychainConfig::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            max_bytes: 10 * 1024 * 1024 * 1024,
            memory_bytes: 64 * 1024 * 1024,
            high_watermark_pct: 90,
            low_watermark_pct: 80,
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            prefetch: true,
            background_fill: true,
            background_concurrency: 2,
            background_bandwidth: 0,
            background_quiet_secs: 5,
            readahead: true,
            library_prefetch: true,
            startup_prefetch: true,
            read_deadline_secs: 30,
            request_timeout_secs: 30,
            passthrough: true,
            kernel_read_ahead_kb: crate::layer::LAZY_READ_AHEAD_KB,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            config_path: PathBuf::from("/etc/containerd/certs.d"),
            docker_config: PathBuf::new(),
            plain_http: false,
            credential_provider_config: PathBuf::new(),
            credential_provider_bin_dir: PathBuf::from(
                "/usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec",
            ),
        }
    }
}

/// Parses a log level or filter: comma-separated directives, each a level (`error`, `warn`,
/// `info`, `debug`, `trace`, `off`) or `target=level`. A bare word that is not a level (which
/// tracing would take for a target and so log nothing) is refused.
pub fn log_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let bad = |why: String| {
        format!("{text:?} is not a level or filter ({why}); use error, warn, info, debug or trace, or target=level directives such as \"info,lazysnap::fetch=debug\"")
    };
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(bad(format!("{directive:?} is not a level")));
        }
    }
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| bad(e.to_string()))
}

/// Where `lazysnap serve` reads its configuration when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lazysnap/config.toml";

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML `text`; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            key,
            message,
        };
        if self.root.as_os_str().is_empty() || !self.root.is_absolute() {
            return Err(invalid(
                "root",
                format!("{:?} must be an absolute path", self.root),
            ));
        }
        if self.address.as_os_str().is_empty() || !self.address.is_absolute() {
            return Err(invalid(
                "address",
                format!("{:?} must be an absolute socket path", self.address),
            ));
        }
        if let Err(e) = log_filter(&self.log_level) {
            return Err(invalid("log_level", e));
        }
        if !self.metrics_address.is_empty() {
            let addr: SocketAddr = self.metrics_address.parse().map_err(|e| {
                invalid(
                    "metrics_address",
                    format!(
                        "{:?} is not HOST:PORT ({e}); e.g. \"127.0.0.1:9345\"",
                        self.metrics_address
                    ),
                )
            })?;
            if addr.port() == 0 {
                return Err(invalid(
                    "metrics_address",
                    format!("{addr} has no port; e.g. \"127.0.0.1:9345\""),
                ));
            }
        }
        let k = &self.cri_keychain;
        if k.enable {
            for (key, path) in [
                ("cri_keychain.listen_path", &k.listen_path),
                ("cri_keychain.image_service_path", &k.image_service_path),
            ] {
                if !path.is_absolute() {
                    return Err(invalid(
                        key,
                        format!("{path:?} must be an absolute socket path"),
                    ));
                }
            }
            if k.listen_path == k.image_service_path || k.listen_path == self.address {
                return Err(invalid(
                    "cri_keychain.listen_path",
                    format!(
                        "{:?} must be a socket of its own (not containerd's nor the snapshotter's)",
                        k.listen_path
                    ),
                ));
            }
        }
        let c = &self.cache;
        if c.high_watermark_pct == 0 || c.high_watermark_pct > 100 {
            return Err(invalid(
                "cache.high_watermark_pct",
                format!("{} must be 1..=100", c.high_watermark_pct),
            ));
        }
        if c.low_watermark_pct >= c.high_watermark_pct {
            return Err(invalid(
                "cache.low_watermark_pct",
                format!(
                    "{} must be below cache.high_watermark_pct ({})",
                    c.low_watermark_pct, c.high_watermark_pct
                ),
            ));
        }
        if c.max_bytes == 0 {
            return Err(invalid("cache.max_bytes", "must be above 0".into()));
        }
        if self.fetch.background_concurrency == 0 && self.fetch.background_fill {
            return Err(invalid(
                "fetch.background_concurrency",
                "must be at least 1 while fetch.background_fill is on".into(),
            ));
        }
        if self.fetch.read_deadline_secs == 0 {
            return Err(invalid(
                "fetch.read_deadline_secs",
                "must be at least 1 (a read must never wait forever, nor fail at once)".into(),
            ));
        }
        if !(4..=65536).contains(&self.fetch.kernel_read_ahead_kb) {
            return Err(invalid(
                "fetch.kernel_read_ahead_kb",
                format!(
                    "{} must be 4..=65536 (KiB; one page up to 64 MiB)",
                    self.fetch.kernel_read_ahead_kb
                ),
            ));
        }
        Ok(())
    }

    /// The cache directory: `cache.dir`, or `<root>/cache` when empty.
    pub fn cache_dir(&self) -> PathBuf {
        if self.cache.dir.as_os_str().is_empty() {
            self.root.join("cache")
        } else {
            self.cache.dir.clone()
        }
    }

    /// The metrics endpoint address, when enabled.
    pub fn metrics_socket_addr(&self) -> Option<SocketAddr> {
        self.metrics_address.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_documented_defaults() {
        let config = Config::parse("", "test").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.root, PathBuf::from("/var/lib/lazysnap"));
        assert_eq!(config.cache_dir(), PathBuf::from("/var/lib/lazysnap/cache"));
        assert!(config.metrics_socket_addr().is_none());
    }

    #[test]
    fn packaged_example_parses_to_defaults() {
        let text = include_str!("../packaging/config.toml");
        assert_eq!(Config::parse(text, "packaging").unwrap(), Config::default());
    }

    #[test]
    fn passthrough_can_be_turned_off() {
        let config = Config::parse("[fetch]\npassthrough = false\n", "f").unwrap();
        assert!(!config.fetch.passthrough);
        assert!(Config::default().fetch.passthrough);
    }

    #[test]
    fn kernel_read_ahead_is_checked() {
        let config = Config::parse("[fetch]\nkernel_read_ahead_kb = 128\n", "f").unwrap();
        assert_eq!(config.fetch.kernel_read_ahead_kb, 128);
        let err = Config::parse("[fetch]\nkernel_read_ahead_kb = 0\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fetch.kernel_read_ahead_kb"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("[cache]\nmax_byte = 5\n", "f.toml").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("max_byte"), "{message}");
        assert!(message.contains("f.toml"), "{message}");
        let err = Config::parse("rooot = \"/x\"\n", "f.toml").unwrap_err();
        assert!(err.to_string().contains("rooot"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::parse("metrics_address = \"localhost\"\n", "f").unwrap_err();
        assert!(err.to_string().contains("metrics_address"), "{err}");
        // A cluster's Prometheus may scrape another address than loopback.
        Config::parse("metrics_address = \"0.0.0.0:9000\"\n", "f").unwrap();
        let err = Config::parse(
            "[cri_keychain]\nenable = true\nlisten_path = \"/run/containerd/containerd.sock\"\n",
            "f",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("cri_keychain.listen_path"),
            "{err}"
        );
        let err = Config::parse(
            "[cache]\nhigh_watermark_pct = 50\nlow_watermark_pct = 60\n",
            "f",
        )
        .unwrap_err();
        assert!(err.to_string().contains("cache.low_watermark_pct"), "{err}");
        let err = Config::parse("[fetch]\nprefetch = \"yes\"\n", "f").unwrap_err();
        assert!(err.to_string().contains("prefetch"), "{err}");
        let ok = Config::parse(
            "root = \"/tmp/x\"\nmetrics_address = \"127.0.0.1:9345\"\nlog_format = \"json\"\n",
            "f",
        )
        .unwrap();
        assert_eq!(ok.log_format, LogFormat::Json);
        assert!(ok.metrics_socket_addr().is_some());
    }
}
