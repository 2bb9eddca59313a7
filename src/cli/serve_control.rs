//! `serve`'s control socket (`<root>/control.sock`, mode 0600): JSON-lines requests from
//! `lazysnap status` (the layers the snapshotter has mounted and what they fetched) and
//! `lazysnap warm` (fetch an image's layers into the cache now). Both sides live here.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use lazysnap::layer::{self, LayerManager};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::{info, warn};

use super::mount_state::LayerState;

/// The socket's name in serve's root directory.
pub const SOCKET_NAME: &str = "control.sock";

/// `<root>/control.sock`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join(SOCKET_NAME)
}

/// One request, one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The layers mounted and the cache; answered with [`Reply::Status`].
    Status,
    /// Wait for the prefetch of these layers (blob digests) and, with `all`, fetch the rest of
    /// them now; answered with [`Reply::Warmed`] once done.
    Warm { layers: Vec<String>, all: bool },
    /// The disk cache by mounted layer; answered with [`Reply::CacheUsage`].
    CacheUsage,
    /// Remove chunks from the cache; answered with [`Reply::Pruned`].
    Prune { mode: layer::PruneMode, force: bool },
}

/// One reply, one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status(ServeStatus),
    Warmed {
        /// The warmed layers as they are now.
        layers: Vec<LayerState>,
        /// Requested layers not mounted lazily by this daemon.
        not_mounted: Vec<String>,
    },
    CacheUsage(layer::CacheUsage),
    Pruned(layer::PruneReport),
    Error {
        message: String,
    },
}

/// What `lazysnap status` shows of a running `serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeStatus {
    pub pid: u32,
    pub root: PathBuf,
    /// The shared cache's bytes on disk and bound.
    pub cache_bytes: u64,
    pub cache_limit: u64,
    pub layers: Vec<LayerState>,
}

fn layer_state(report: layer::MountedLayerReport) -> LayerState {
    LayerState::new(
        Some(report.image),
        report.digest.to_string(),
        "lazy",
        report.mountpoint,
        report.size,
        &report.stats,
        report.passthrough_opens,
    )
}

/// Binds the control socket in `root` (replacing a stale one: the caller already holds the
/// root, so no other daemon serves it).
pub fn bind(root: &Path) -> anyhow::Result<UnixListener> {
    let path = socket_path(root);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    info!(socket = %path.display(), "control socket for `lazysnap status` and `lazysnap warm`");
    Ok(listener)
}

/// Answers requests on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, manager: Arc<LayerManager>, root: PathBuf) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (manager, root) = (Arc::clone(&manager), root.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(request) => answer(request, &manager, &root).await,
                    Err(e) => Reply::Error {
                        message: format!("bad request {line:?}: {e}"),
                    },
                };
                let Ok(mut text) = serde_json::to_string(&reply) else {
                    return;
                };
                text.push('\n');
                if write.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn answer(request: Request, manager: &LayerManager, root: &Path) -> Reply {
    match request {
        Request::Status => {
            let cache = manager.cache().stats();
            Reply::Status(ServeStatus {
                pid: std::process::id(),
                root: root.to_path_buf(),
                cache_bytes: cache.disk_bytes,
                cache_limit: cache.max_bytes,
                layers: manager
                    .mounted_layers()
                    .into_iter()
                    .map(layer_state)
                    .collect(),
            })
        }
        Request::CacheUsage => Reply::CacheUsage(manager.cache_usage()),
        Request::Prune { mode, force } => Reply::Pruned(manager.prune_cache(mode, force).await),
        Request::Warm { layers, all } => {
            let span = tracing::info_span!("warm", layers = layers.len(), all);
            let not_mounted =
                tracing::Instrument::instrument(manager.warm(&layers, all), span).await;
            let warmed = manager
                .mounted_layers()
                .into_iter()
                .filter(|l| layers.iter().any(|d| *d == l.digest))
                .map(layer_state)
                .collect();
            Reply::Warmed {
                layers: warmed,
                not_mounted,
            }
        }
    }
}

/// Sends `request` to the `serve` whose root is `root` and returns its reply; `None` when no
/// `serve` listens there.
pub fn ask(root: &Path, request: &Request) -> anyhow::Result<Option<Reply>> {
    let path = socket_path(root);
    let stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            return Err(e).with_context(|| {
                format!(
                    "connecting to lazysnap serve's control socket {} (root only: run as root)",
                    path.display()
                )
            })
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", path.display()));
        }
    };
    let mut writer = stream
        .try_clone()
        .with_context(|| format!("using {}", path.display()))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    writer
        .write_all(line.as_bytes())
        .with_context(|| format!("writing to {}", path.display()))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .with_context(|| format!("reading from {}", path.display()))?;
    if reply.is_empty() {
        anyhow::bail!("lazysnap serve closed {} without answering", path.display());
    }
    let reply: Reply = serde_json::from_str(&reply)
        .with_context(|| format!("lazysnap serve's answer on {}", path.display()))?;
    Ok(Some(reply))
}
