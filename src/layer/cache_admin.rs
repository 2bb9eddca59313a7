//! What operators ask of the node's chunk cache through the layer manager: usage per layer and
//! image, pruning what no mounted layer uses, and warming layers ahead of their containers.

use std::collections::HashMap;
use std::sync::Arc;

use crate::digest::Digest;
use crate::estargz::ChunkDigest;
use crate::sync::lock;

use super::{LayerManager, MountedLayerReport, RemoteLayerSpec};

/// What `lazysnap cache du` shows: the disk cache by mounted layer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CacheUsage {
    /// Bytes and chunk files on disk, and the bound.
    pub total_bytes: u64,
    pub total_chunks: u64,
    pub limit: u64,
    /// What no mounted layer uses (left by layers unmounted or images removed).
    pub unused_bytes: u64,
    pub unused_chunks: u64,
    pub layers: Vec<LayerCacheUsage>,
}

/// One mounted layer's part of the disk cache.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerCacheUsage {
    pub image: String,
    pub digest: Digest,
    /// Bytes of its chunks (and assembled files) on disk.
    pub cached_bytes: u64,
    /// Of those, bytes another mounted layer uses too.
    pub shared_bytes: u64,
    pub cached_chunks: u64,
}

/// Which chunks `lazysnap cache prune` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneMode {
    /// Chunks no mounted layer uses.
    Unused,
    /// Chunks not used for this long.
    OlderThan(std::time::Duration),
    /// Every chunk.
    All,
}

/// What a prune removed, and the mounted layers whose registry did not answer (their chunks
/// kept, or removed with `--force`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PruneReport {
    pub removed_chunks: u64,
    pub removed_bytes: u64,
    pub unreachable: Vec<String>,
}

impl LayerManager {
    /// What the disk cache holds for each mounted layer (bytes of its chunks and assembled
    /// files in the cache, and of those the bytes other mounted layers use too), and what no
    /// mounted layer uses.
    pub fn cache_usage(&self) -> CacheUsage {
        let layers: Vec<(MountedLayerReport, Vec<ChunkDigest>)> = {
            let mounted = lock(&self.mounted);
            let mut layers: Vec<_> = mounted
                .values()
                .map(|layer| (layer.report(), layer.reader.cache_keys()))
                .collect();
            layers.sort_by(|a, b| a.0.mountpoint.cmp(&b.0.mountpoint));
            layers
        };
        let on_disk: HashMap<ChunkDigest, u64> = self.cache.disk_entries().into_iter().collect();
        // How many mounted layers use each key (each layer lists a key once).
        let mut users: HashMap<ChunkDigest, usize> = HashMap::new();
        for key in layers.iter().flat_map(|(_, keys)| keys) {
            *users.entry(*key).or_default() += 1;
        }
        let unused: Vec<u64> = on_disk
            .iter()
            .filter(|(key, _)| !users.contains_key(key))
            .map(|(_, size)| *size)
            .collect();
        let layers = layers
            .into_iter()
            .map(|(report, keys)| {
                let mut layer = LayerCacheUsage {
                    image: report.image,
                    digest: report.digest,
                    cached_bytes: 0,
                    shared_bytes: 0,
                    cached_chunks: 0,
                };
                for key in &keys {
                    let Some(size) = on_disk.get(key) else {
                        continue;
                    };
                    layer.cached_bytes += size;
                    layer.cached_chunks += 1;
                    if users.get(key).is_some_and(|&n| n > 1) {
                        layer.shared_bytes += size;
                    }
                }
                layer
            })
            .collect();
        CacheUsage {
            total_bytes: on_disk.values().sum(),
            total_chunks: on_disk.len() as u64,
            limit: self.cache.options().max_bytes,
            unused_bytes: unused.iter().sum(),
            unused_chunks: unused.len() as u64,
            layers,
        }
    }

    /// Removes chunks from the disk cache while layers stay mounted (their reads fetch what is
    /// gone again). `Unused` removes what no mounted layer uses; `OlderThan` what was not used
    /// for that long; `All` everything. A mounted layer's chunks are kept when its registry
    /// does not answer now (a refetch would fail), unless `force`; the report says which, either
    /// way.
    pub async fn prune_cache(&self, mode: PruneMode, force: bool) -> PruneReport {
        let layers: Vec<(RemoteLayerSpec, Vec<ChunkDigest>)> = lock(&self.mounted)
            .values()
            .map(|layer| (layer.spec.clone(), layer.reader.cache_keys()))
            .collect();
        let mut used = std::collections::HashSet::new();
        let mut protected = std::collections::HashSet::new();
        let mut unreachable: Vec<String> = Vec::new();
        for (spec, keys) in &layers {
            used.extend(keys.iter().copied());
            if mode == PruneMode::Unused {
                continue;
            }
            if let Err(e) = self.check(spec).await {
                let outcome = if force {
                    "its chunks are removed anyway (--force): its reads fail until the registry is back"
                } else {
                    protected.extend(keys.iter().copied());
                    "its chunks are kept (--force removes them)"
                };
                unreachable.push(format!(
                    "layer {} of {}: its registry does not answer ({e}); {outcome}",
                    spec.layer.digest, spec.image
                ));
            }
        }
        let now = std::time::SystemTime::now();
        let doomed: Vec<ChunkDigest> = self
            .cache
            .disk_entries()
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| match mode {
                PruneMode::Unused => !used.contains(key),
                PruneMode::OlderThan(age) => {
                    !protected.contains(key)
                        && self
                            .cache
                            .last_used(key)
                            .and_then(|t| now.duration_since(t).ok())
                            .is_some_and(|idle| idle >= age)
                }
                PruneMode::All => !protected.contains(key),
            })
            .collect();
        let (removed_chunks, removed_bytes) = self.cache.remove(&doomed);
        tracing::info!(
            ?mode,
            force,
            removed_chunks,
            removed_bytes,
            unreachable = unreachable.len(),
            "cache pruned"
        );
        PruneReport {
            removed_chunks,
            removed_bytes,
            unreachable,
        }
    }

    /// Warms the mounted layers with these blob digests: waits for each one's prefetch of its
    /// prioritized part, and with `all` fetches the rest too, now. Digests of layers this
    /// manager has not mounted are returned (they were unpacked, or not pulled through it).
    pub async fn warm(&self, digests: &[String], all: bool) -> Vec<String> {
        let mut readers = Vec::new();
        let mut missing = Vec::new();
        {
            let mounted = lock(&self.mounted);
            for digest in digests {
                match mounted.values().find(|l| &l.spec.layer.digest == digest) {
                    Some(layer) => readers.push(Arc::clone(&layer.reader)),
                    None => missing.push(digest.clone()),
                }
            }
        }
        futures::future::join_all(readers.into_iter().map(|reader| async move {
            reader.prefetch_finished().await;
            if all {
                reader.fill_all().await;
            }
        }))
        .await;
        missing
    }
}
