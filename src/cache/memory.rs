//! The memory tier: recently used small chunks held as [`Bytes`], bounded in bytes.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use lru::LruCache;

use crate::estargz::ChunkDigest;
use crate::metrics::{self, CacheTier};
use crate::sync::lock;

use super::ChunkCache;

pub(super) struct MemoryTier {
    pub(super) lru: LruCache<ChunkDigest, Bytes>,
    pub(super) bytes: u64,
}

impl ChunkCache {
    pub(super) fn memory_hit(&self, key: &ChunkDigest) -> Option<Bytes> {
        let data = lock(&self.memory).lru.get(key).cloned()?;
        // Keep the disk copy of a hot chunk from being evicted first.
        lock(&self.disk).lru.promote(key);
        self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
        metrics::record_cache_hit(CacheTier::Memory);
        Some(data)
    }

    pub(super) fn note_miss(&self) {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        metrics::record_cache_miss();
    }

    pub(super) fn forget_memory(&self, key: &ChunkDigest) {
        let mut mem = lock(&self.memory);
        if let Some(old) = mem.lru.pop(key) {
            mem.bytes = mem.bytes.saturating_sub(old.len() as u64);
        }
    }

    pub(super) fn insert_memory(&self, key: ChunkDigest, data: Bytes) {
        let budget = self.opts.memory_bytes;
        let len = data.len() as u64;
        if len == 0 || len > budget / 2 {
            return;
        }
        let mut mem = lock(&self.memory);
        if let Some(old) = mem.lru.put(key, data) {
            mem.bytes = mem.bytes.saturating_sub(old.len() as u64);
        }
        mem.bytes += len;
        while mem.bytes > budget {
            match mem.lru.pop_lru() {
                Some((_, old)) => mem.bytes = mem.bytes.saturating_sub(old.len() as u64),
                None => break,
            }
        }
    }
}
