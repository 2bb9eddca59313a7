//! What a `lazysnap mount` publishes about each mount: one JSON state file per mount directory
//! (`<state-dir>/<hash of dir>.json`), written by the mount daemon and read by `umount` and
//! `status`; and the layer rows `status` shows for `serve` too.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use lazysnap::fetch::LayerFetchStats;

/// What the mount daemon publishes about one mount (the file `<state-dir>/<hash of dir>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountState {
    /// The mount daemon's pid (shared by every mount of its cache dir).
    pub pid: u32,
    pub image: String,
    pub dir: PathBuf,
    /// The daemon's socket; absent in files written before daemons were shared.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    pub layers: Vec<LayerState>,
    /// The shared cache's bytes on disk and bound.
    pub cache_bytes: u64,
    pub cache_limit: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerState {
    /// The image a `serve` layer was mounted for (a `mount`'s layers belong to its image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub digest: String,
    /// "lazy" (FUSE) or "unpacked" (not eStargz: downloaded and unpacked).
    pub mode: String,
    /// The layer's directory (an overlayfs lower dir).
    pub path: PathBuf,
    pub size: u64,
    pub on_demand_bytes: u64,
    pub prefetch_bytes: u64,
    pub background_bytes: u64,
    pub fetched_chunks: u64,
    pub total_chunks: u64,
    pub cache_hits: u64,
    /// Files of several chunks assembled in the cache for passthrough.
    #[serde(default)]
    pub files_assembled: u64,
    /// Opens served by FUSE passthrough (reads bypass the daemon).
    #[serde(default)]
    pub passthrough_opens: u64,
}

pub fn state_file(state_dir: &Path, dir: &Path) -> PathBuf {
    let digest = lazysnap::digest::sha256_digest(dir.as_os_str().as_encoded_bytes());
    state_dir.join(format!("{}.json", lazysnap::digest::short_digest(&digest)))
}

pub fn read_state(path: &Path) -> Option<MountState> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn write_state(path: &Path, state: &MountState) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&temp, path)?;
    Ok(())
}

/// True while `pid` runs (a zombie waiting to be reaped has exited).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl LayerState {
    /// The row of one layer: `mode` is "lazy" or "unpacked"; `stats` and `passthrough_opens`
    /// are what its reader and FUSE filesystem counted (zero for an unpacked layer).
    pub fn new(
        image: Option<String>,
        digest: String,
        mode: &str,
        path: PathBuf,
        size: u64,
        stats: &LayerFetchStats,
        passthrough_opens: u64,
    ) -> LayerState {
        LayerState {
            image,
            digest,
            mode: mode.to_string(),
            path,
            size,
            on_demand_bytes: stats.on_demand_bytes,
            prefetch_bytes: stats.prefetch_bytes,
            background_bytes: stats.background_bytes,
            fetched_chunks: stats.fetched_chunks,
            total_chunks: stats.total_chunks,
            cache_hits: stats.cache_hits,
            files_assembled: stats.files_assembled,
            passthrough_opens,
        }
    }
}
