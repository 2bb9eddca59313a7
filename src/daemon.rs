//! The daemon's one composition root: a [`Config`] made into the registry client, the chunk
//! cache's options, the fetch scheduler and the layer manager. `lazysnap serve` and the mount
//! daemon of `lazysnap mount` (which turns its flags into a [`Config`]) both wire here.

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

use crate::cache::{CacheOptions, ChunkCache};
use crate::config::Config;
use crate::fetch::{FetchOptions, FetchScheduler, SchedulerOptions};
use crate::image::Platform;
use crate::layer::{LayerError, LayerManager, LayerManagerOptions};
use crate::registry::{Client, ClientConfig, CredentialProviders, Keychain, RegistryError};

/// The registry client: hosts.toml directory, credentials, plain HTTP, timeouts.
pub fn registry_client(config: &Config) -> Result<Client, RegistryError> {
    registry_client_with(config, None)
}

/// The registry client, consulting `keychain` (credentials given at run time) first.
fn registry_client_with(
    config: &Config,
    keychain: Option<Arc<Keychain>>,
) -> Result<Client, RegistryError> {
    let registry = &config.registry;
    let credential_providers = if registry.credential_provider_config.as_os_str().is_empty() {
        None
    } else {
        Some(Arc::new(CredentialProviders::load(
            &registry.credential_provider_config,
            &registry.credential_provider_bin_dir,
        )?))
    };
    Client::new(ClientConfig {
        keychain,
        credential_providers,
        hosts_dir: (!registry.config_path.as_os_str().is_empty())
            .then(|| registry.config_path.clone()),
        docker_config: (!registry.docker_config.as_os_str().is_empty())
            .then(|| registry.docker_config.clone()),
        plain_http: registry.plain_http,
        request_timeout: Duration::from_secs(config.fetch.request_timeout_secs),
        read_deadline: Duration::from_secs(config.fetch.read_deadline_secs),
        ..ClientConfig::default()
    })
}

/// The chunk cache's directory, bounds and disk watermarks.
pub fn cache_options(config: &Config) -> CacheOptions {
    let mut options = CacheOptions::new(config.cache_dir());
    options.max_bytes = config.cache.max_bytes;
    options.memory_bytes = config.cache.memory_bytes;
    options.high_watermark_pct = Some(config.cache.high_watermark_pct);
    options.low_watermark_pct = Some(config.cache.low_watermark_pct);
    options
}

/// A fetch scheduler with the configured background limits (one per daemon: it bounds the
/// background work of every layer it serves).
pub fn scheduler(config: &Config) -> Arc<FetchScheduler> {
    let fetch = &config.fetch;
    FetchScheduler::new(SchedulerOptions {
        quiet_period: Duration::from_secs(fetch.background_quiet_secs),
        background_concurrency: fetch.background_concurrency.max(1) as usize,
        background_bandwidth: (fetch.background_bandwidth > 0)
            .then_some(fetch.background_bandwidth),
        ..SchedulerOptions::default()
    })
}

/// The layer manager over `client` and `cache`, scheduling with `scheduler`, resolving images
/// for `platform`; fetch tasks run on `runtime`.
pub fn layer_manager(
    config: &Config,
    client: Client,
    cache: Arc<ChunkCache>,
    scheduler: Arc<FetchScheduler>,
    platform: Platform,
    runtime: Handle,
) -> LayerManager {
    let fetch = &config.fetch;
    let defaults = LayerManagerOptions::default();
    LayerManager::new(
        client,
        cache,
        runtime,
        LayerManagerOptions {
            fetch: FetchOptions {
                deadline: Duration::from_secs(fetch.read_deadline_secs),
                prefetch: fetch.prefetch,
                background: fetch.background_fill,
                readahead: fetch.readahead,
                library_prefetch: fetch.library_prefetch,
                scheduler,
                ..FetchOptions::default()
            },
            mount: lazysnap_fuse::MountOptions {
                passthrough: fetch.passthrough,
                read_ahead_kb: Some(fetch.kernel_read_ahead_kb),
                ..defaults.mount
            },
            platform,
            startup_prefetch: fetch.startup_prefetch,
        },
    )
}

/// The CRI keychain `[cri_keychain]` turns on: filled by the CRI image service `serve` forwards,
/// read by the registry client.
pub fn cri_keychain(config: &Config) -> Option<Arc<Keychain>> {
    let keychain = &config.cri_keychain;
    keychain
        .enable
        .then(|| Arc::new(Keychain::new(Duration::from_secs(keychain.ttl_secs))))
}

/// Everything `lazysnap serve` mounts layers with: client (with `keychain`), cache (opened here),
/// scheduler and manager, for the host's platform.
pub fn serve_layer_manager(
    config: &Config,
    keychain: Option<Arc<Keychain>>,
    runtime: Handle,
) -> Result<LayerManager, LayerError> {
    let client = registry_client_with(config, keychain)?;
    let cache = ChunkCache::open(cache_options(config))?;
    Ok(layer_manager(
        config,
        client,
        cache,
        scheduler(config),
        Platform::host(),
        runtime,
    ))
}
