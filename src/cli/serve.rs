//! `lazysnap serve [--config FILE] [--root DIR] [--address SOCK]`: runs the containerd proxy
//! snapshotter on a unix socket (mode 0660) until SIGTERM or SIGINT, then drains in-flight calls.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use lazysnap::config::Config;
use lazysnap::daemon;
use lazysnap::fuse_holder::FuseHolder;
use lazysnap::layer::LayerManager;
use lazysnap::registry::Keychain;
use lazysnap::snapshotter::{self, RemoteLayers, Service, ServiceOptions};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (see packaging/config.toml); default /etc/lazysnap/config.toml
    /// when it exists, else every key has its default.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (overrides `root` in the config; default /var/lib/lazysnap).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Unix socket to serve on (overrides `address`; default /run/lazysnap/lazysnap.sock).
    #[arg(long, value_name = "SOCK")]
    address: Option<PathBuf>,
    /// On SIGTERM/SIGINT, unmount every layer (for maintenance: running containers lose their
    /// lazy layers). By default the layers stay mounted, kept by the FUSE holder process, and
    /// the next start serves them again, so running containers never notice a restart.
    #[arg(long)]
    unmount_on_exit: bool,
}

/// The configuration file `serve` reads: `--config`, else the default path when it exists.
fn config_path(args: &ServeArgs) -> Option<PathBuf> {
    args.config.clone().or_else(|| {
        let default = PathBuf::from(lazysnap::config::DEFAULT_CONFIG_PATH);
        default.is_file().then_some(default)
    })
}

/// The `log_format` and `log_level` of the configuration file, if it reads (errors in the file
/// are reported later by `run`, once logging is set up).
pub fn configured_logging(args: &ServeArgs) -> Option<(String, String)> {
    let config = Config::load(&config_path(args)?).ok()?;
    let format = match config.log_format {
        lazysnap::config::LogFormat::Json => "json",
        lazysnap::config::LogFormat::Text => "text",
    };
    Some((format.to_string(), config.log_level))
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    super::require_root(
        "serve",
        "it mounts FUSE filesystems and serves containerd's socket",
    )?;
    let mut config = match config_path(&args) {
        Some(path) => {
            info!(config = %path.display(), "configuration");
            Config::load(&path)?
        }
        None => Config::default(),
    };
    if let Some(root) = args.root {
        config.root = root;
    }
    if let Some(address) = args.address {
        config.address = address;
    }
    let _root_lock = lock_root(&config.root)?;
    super::runtime()?.block_on(async {
        let keychain = daemon::cri_keychain(&config);
        let manager = daemon::serve_layer_manager(
            &config,
            keychain.clone(),
            tokio::runtime::Handle::current(),
        )
        .context("setting up lazy remote layers")?;
        let manager = keep_connections(manager, &config.root);
        if args.unmount_on_exit {
            manager.unmount_on_exit();
        }
        serve(config, Arc::new(manager), keychain).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Gives `manager` the FUSE holder of `root` (started when none runs), which keeps the layers'
/// connections through restarts; without one, a restart breaks running containers.
fn keep_connections(mut manager: LayerManager, root: &Path) -> LayerManager {
    let socket = root.join(FUSE_HOLDER_SOCKET);
    let attached =
        FuseHolder::connect_or_start(&socket).and_then(|holder| manager.attach_fuse_holder(holder));
    if let Err(err) = attached {
        warn!(error = %err, "no FUSE holder: restarts of the daemon will break running containers");
    }
    manager
}

/// The FUSE holder's socket in the daemon's root.
const FUSE_HOLDER_SOCKET: &str = "fuse-holder.sock";

/// Runs the snapshotter described by `config`, mounting remote layers with `manager`, until
/// SIGTERM or SIGINT; answers `lazysnap status` and `lazysnap warm` on its control socket.
pub async fn serve(
    config: Config,
    manager: Arc<LayerManager>,
    keychain: Option<Arc<Keychain>>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.root)
        .with_context(|| format!("creating root {}", config.root.display()))?;
    if let Some(addr) = config.metrics_socket_addr() {
        // Bind now so a taken port is an error at start, not a log line later.
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("binding metrics_address {addr} (pick a free loopback port)")
        })?;
        info!(%addr, "Prometheus metrics on http://{addr}/metrics");
        tokio::spawn(lazysnap::metrics::serve_listener(listener));
    }
    let options = ServiceOptions::new(&config.root);
    let remote: Arc<dyn RemoteLayers> = manager.clone();
    let service = tokio::task::spawn_blocking(move || Service::open(options, remote))
        .await
        .context("opening the snapshotter")??;
    let restored = service
        .restore_remote_layers()
        .await
        .context("restoring remote layers")?;
    manager.release_unclaimed_connections();
    let listener = bind_socket(&config.address)?;
    // Bound once the root is ours (Service::open refuses a root another serve holds).
    let control = super::serve_control::bind(&config.root)?;
    let control = tokio::spawn(super::serve_control::serve(
        control,
        manager,
        config.root.clone(),
    ));
    info!(
        address = %config.address.display(),
        root = %config.root.display(),
        restored_remote_layers = restored,
        "lazysnap snapshotter serving"
    );

    let (stop_cri, cri_stopped) = tokio::sync::oneshot::channel::<()>();
    let cri = match keychain {
        Some(keychain) => {
            let settings = config.cri_keychain.clone();
            Some(tokio::spawn(async move {
                let stopped = async {
                    let _ = cri_stopped.await;
                };
                if let Err(err) = lazysnap::cri_keychain::serve(
                    &settings.listen_path,
                    &settings.image_service_path,
                    keychain,
                    stopped,
                )
                .await
                {
                    tracing::error!(error = %err, "the CRI keychain stopped: kubelet's pulls through it fail");
                }
            }))
        }
        None => None,
    };

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Under systemd (Type=notify) the unit is started, and containerd ordered after it may
    // start, only now: the socket accepts calls, remote layers are mounted again, and a SIGTERM
    // sent at once is a clean shutdown (the handlers are in place).
    lazysnap::metrics::set_serving(true);
    notify_service_manager(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving on {}", config.address.display())),
    ]);
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("SIGINT: shutting down"),
        }
    };
    let stats_service = service.clone();
    snapshotter::serve(listener, service, shutdown).await?;
    lazysnap::metrics::set_serving(false);
    notify_service_manager(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_cri.send(());
    if let Some(cri) = cri {
        let _ = cri.await;
    }
    control.abort();
    let _ = std::fs::remove_file(super::serve_control::socket_path(&config.root));
    stats_service.shutdown().await;
    let stats = stats_service.stats();
    info!(
        remote_mounted = stats.remote_mounted,
        remote_fallbacks = stats.remote_fallbacks,
        "lazysnap snapshotter stopped"
    );
    if let Err(err) = std::fs::remove_file(&config.address) {
        warn!(address = %config.address.display(), error = %err, "could not remove the socket");
    }
    Ok(())
}

/// Tells the service manager (systemd's `$NOTIFY_SOCKET`, when set) how the daemon is; a failure
/// is logged, never fatal.
fn notify_service_manager(states: &[sd_notify::NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        warn!(error = %err, "could not notify the service manager ($NOTIFY_SOCKET)");
    }
}

/// Takes `<root>/serve.lock` for as long as the process runs: one `serve` per root.
fn lock_root(root: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(root).with_context(|| format!("creating root {}", root.display()))?;
    let path = root.join("serve.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
            "another lazysnap serve is running with root {} (it holds {}); stop it, or give \
             this one another --root",
            root.display(),
            path.display()
        ),
        Err((_, errno)) => Err(errno).with_context(|| format!("locking {}", path.display())),
    }
}

/// Binds the unix socket at `path` with mode 0660, replacing a stale socket file left by a
/// killed process (but refusing when another server still answers on it).
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; remove it or choose another --address",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another server is listening on {}; stop it or choose another --address",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting mode 0660 on {}", path.display()))?;
    Ok(listener)
}
