//! Passthrough assembly: a file whose chunks are all cached is assembled once into a plain file
//! the kernel can read directly (FUSE passthrough), off the read path.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::estargz::ChunkDigest;

use super::Inner;

#[derive(Default)]
pub(super) struct Assembly {
    running: bool,
    /// Sorted.
    proven: Vec<u32>,
    /// Files that cannot be assembled (a lying file digest, too large): not tried again. Sorted.
    refused: Vec<u32>,
}

impl Inner {
    pub(super) fn assembly(&self) -> std::sync::MutexGuard<'_, Assembly> {
        crate::sync::lock(&self.assembly)
    }

    /// Whether file `index`'s chunks were shown to make its assembled cache file.
    pub(super) fn assembled(&self, index: usize) -> bool {
        u32::try_from(index).is_ok_and(|i| self.assembly().proven.binary_search(&i).is_ok())
    }

    /// Assembles file `index` (all of whose chunks are cached) into the cache entry `whole` on
    /// the blocking pool, unless this layer is already assembling one.
    pub(super) fn start_assembly(self: &Arc<Self>, index: usize, whole: ChunkDigest) {
        let Ok(file) = u32::try_from(index) else {
            return;
        };
        {
            let mut assembly = self.assembly();
            if assembly.running || assembly.refused.binary_search(&file).is_ok() {
                return;
            }
            assembly.running = true;
        }
        let inner = Arc::clone(self);
        self.runtime.spawn_blocking(move || {
            let parts: Vec<ChunkDigest> = inner
                .files
                .chunks(index)
                .unwrap_or_default()
                .iter()
                .map(|c| c.digest)
                .collect();
            let size = inner.files.size(index).unwrap_or(0);
            let result = inner.cache.assemble(&whole, &parts, size);
            {
                let mut assembly = inner.assembly();
                assembly.running = false;
                let list = match &result {
                    Ok(true) => Some(&mut assembly.proven),
                    Ok(false) => None,
                    Err(_) => Some(&mut assembly.refused),
                };
                if let Some(list) = list {
                    if let Err(at) = list.binary_search(&file) {
                        list.insert(at, file);
                    }
                }
            }
            match result {
                Ok(true) => {
                    inner
                        .counters
                        .files_assembled
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(layer = %inner.layer, file = %inner.file_name(index), size, "file assembled for passthrough");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(layer = %inner.layer, file = %inner.file_name(index), error = %e, "cannot assemble a file for passthrough; reading it through its chunks")
                }
            }
        });
    }
}
