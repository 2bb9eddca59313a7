//! The disk tier's LRU index: entries and their recency, reservations of room for chunks being
//! written, eviction to the size bound and to the disk's watermarks, removal.

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lru::LruCache;

use crate::estargz::ChunkDigest;
use crate::metrics::{self};
use crate::sync::lock;

use super::{CacheError, ChunkCache};

/// How often (seconds) a disk hit refreshes the chunk file's mtime, which orders the LRU after a
/// restart.
pub(super) const TOUCH_INTERVAL_SECS: u64 = 60;

/// Chunks used within this many seconds are the working set of what runs now: eviction for the
/// disk's watermarks spares them (up to the headroom above the high watermark), so a node whose
/// disk others have filled does not fetch the same chunks again and again.
pub(super) const WATERMARK_SPARE_SECS: u64 = 2 * TOUCH_INTERVAL_SECS;

pub(super) struct DiskEntry {
    pub(super) size: u64,
    /// False for entries found at open until their bytes have been hashed once.
    pub(super) verified: bool,
    /// Seconds since the cache was opened (at least 1) when the chunk was stored or its file's
    /// mtime last refreshed; 0 for an entry found at open and not used since.
    pub(super) touched: u64,
}

pub(super) struct DiskIndex {
    pub(super) lru: LruCache<ChunkDigest, DiskEntry>,
    pub(super) bytes: u64,
    /// Bytes of chunk files being written (see [`SpaceReservation`]): entries plus these stay
    /// within the bound.
    pub(super) reserved: u64,
}

/// Room in the disk bound for one chunk file being written, made by evicting before the first
/// byte is written; released when the file is installed or abandoned.
pub struct SpaceReservation {
    pub(super) disk: Arc<Mutex<DiskIndex>>,
    pub(super) released: Arc<tokio::sync::Notify>,
    pub(super) len: u64,
}

impl Drop for SpaceReservation {
    fn drop(&mut self) {
        let mut disk = lock(&self.disk);
        disk.reserved = disk.reserved.saturating_sub(self.len);
        drop(disk);
        self.released.notify_waiters();
    }
}

/// How full a filesystem is, as `df` reports it: the bytes written over the bytes an unprivileged
/// writer could have, so blocks reserved for root count neither as used nor as room. (Counting the
/// reserve as used would call a disk with a large reserve full while it is mostly empty.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DiskFill {
    pub(super) used: u64,
    pub(super) capacity: u64,
}

impl DiskFill {
    /// From statvfs's total, free and available-to-unprivileged bytes; `None` for an empty total.
    pub(super) fn of(total: u64, free: u64, available: u64) -> Option<DiskFill> {
        let used = total.saturating_sub(free);
        let capacity = used.saturating_add(available);
        (capacity > 0).then_some(DiskFill { used, capacity })
    }
}

impl ChunkCache {
    /// Makes room for a chunk file of `len` bytes about to be written: evicts until the entries
    /// and every file being written fit the disk bound.
    /// Refused when the other files being written leave no room for `len` more bytes (the
    /// caller serves the chunk uncached, or waits: [`Self::begin_large`]).
    pub(super) fn reserve(
        &self,
        key: &ChunkDigest,
        len: u64,
    ) -> Result<SpaceReservation, CacheError> {
        if len > self.opts.max_bytes {
            return Err(CacheError::TooLarge {
                digest: *key,
                len,
                max: self.opts.max_bytes,
            });
        }
        let mut disk = lock(&self.disk);
        if disk.reserved + len > self.opts.max_bytes {
            return Err(CacheError::WritesInFlight {
                digest: *key,
                len,
                in_flight: disk.reserved,
                max: self.opts.max_bytes,
            });
        }
        disk.reserved += len;
        let target = self.opts.max_bytes.saturating_sub(disk.reserved);
        let evicted = self.evict_locked(&mut disk, target, None);
        self.note_evictions(evicted, disk.bytes);
        Ok(SpaceReservation {
            disk: Arc::clone(&self.disk),
            released: Arc::clone(&self.space_released),
            len,
        })
    }

    /// Every chunk file on disk, with its size.
    pub fn disk_entries(&self) -> Vec<(ChunkDigest, u64)> {
        lock(&self.disk)
            .lru
            .iter()
            .map(|(key, entry)| (*key, entry.size))
            .collect()
    }

    /// When the chunk `key` was last used: its file's mtime, refreshed at most once a minute
    /// while it is in use.
    pub fn last_used(&self, key: &ChunkDigest) -> Option<SystemTime> {
        fs::metadata(self.chunk_path(key))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Removes these chunks from the disk cache (and the memory tier); a read that needs one
    /// again fetches it. A reader that has a chunk file open or mapped keeps its bytes. Returns
    /// the chunks and bytes removed.
    pub fn remove(&self, keys: &[ChunkDigest]) -> (u64, u64) {
        let (mut removed, mut bytes) = (0, 0);
        let mut disk = lock(&self.disk);
        for key in keys {
            let Some(entry) = disk.lru.pop(key) else {
                continue;
            };
            disk.bytes = disk.bytes.saturating_sub(entry.size);
            lock(&self.open_files).pop(key);
            let path = self.chunk_path(key);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a pruned chunk");
                }
            }
            removed += 1;
            bytes += entry.size;
        }
        let now = disk.bytes;
        drop(disk);
        let mut memory = lock(&self.memory);
        for key in keys {
            if let Some(data) = memory.lru.pop(key) {
                memory.bytes = memory.bytes.saturating_sub(data.len() as u64);
            }
        }
        drop(memory);
        metrics::set_cache_bytes(now);
        (removed, bytes)
    }

    pub(super) fn now_secs(&self) -> u64 {
        self.opened.elapsed().as_secs()
    }

    /// Refreshes the file's mtime (the restart-time recency order) at most once a minute.
    pub(super) fn maybe_touch(&self, key: &ChunkDigest, file: &File, touched: u64) {
        let now = self.now_secs();
        if touched != 0 && now.saturating_sub(touched) < TOUCH_INTERVAL_SECS {
            return;
        }
        if file.set_modified(SystemTime::now()).is_ok() {
            if let Some(e) = lock(&self.disk).lru.peek_mut(key) {
                e.touched = now.max(1);
            }
        }
    }

    /// The index says a chunk is on disk but opening it failed: drop the entry if the file is
    /// really gone (checked under the lock, as renames and unlinks happen under it).
    pub(super) fn forget_missing(&self, key: &ChunkDigest, path: &Path, err: &io::Error) {
        let mut disk = lock(&self.disk);
        lock(&self.open_files).pop(key);
        if !path.exists() {
            if let Some(e) = disk.lru.pop(key) {
                disk.bytes = disk.bytes.saturating_sub(e.size);
            }
            tracing::warn!(path = %path.display(), error = %err, "cached chunk file vanished; it will be refetched");
        }
    }

    pub(super) fn remove_corrupt(&self, key: &ChunkDigest, why: &str) {
        let path = self.chunk_path(key);
        let mut disk = lock(&self.disk);
        if let Some(e) = disk.lru.pop(key) {
            disk.bytes = disk.bytes.saturating_sub(e.size);
        }
        lock(&self.open_files).pop(key);
        let _ = fs::remove_file(&path);
        drop(disk);
        self.counters
            .corrupt_removed
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(path = %path.display(), reason = why, "removed a corrupt cached chunk; it will be refetched");
    }

    /// Evicts least recently used chunks until at most `target` bytes remain (never `keep`).
    /// Unlinks happen under the index lock so they cannot race a rename of the same digest.
    pub(super) fn evict_locked(
        &self,
        disk: &mut DiskIndex,
        target: u64,
        keep: Option<&ChunkDigest>,
    ) -> u64 {
        self.evict_while(disk, keep, |bytes, _| bytes > target)
    }

    /// Evicts the least recently used chunk while `go_on(bytes held, that chunk)` says so
    /// (never `keep`); returns how many were evicted.
    fn evict_while(
        &self,
        disk: &mut DiskIndex,
        keep: Option<&ChunkDigest>,
        go_on: impl Fn(u64, &DiskEntry) -> bool,
    ) -> u64 {
        let mut evicted = 0;
        loop {
            match disk.lru.peek_lru() {
                Some((_, oldest)) if go_on(disk.bytes, oldest) => {}
                _ => break,
            }
            let Some((key, entry)) = disk.lru.pop_lru() else {
                break;
            };
            if Some(&key) == keep {
                // The only entry left is the one being kept.
                disk.lru.put(key, entry);
                break;
            }
            disk.bytes = disk.bytes.saturating_sub(entry.size);
            lock(&self.open_files).pop(&key);
            let path = self.chunk_path(&key);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove evicted chunk");
                }
            }
            evicted += 1;
        }
        evicted
    }

    pub(super) fn note_evictions(&self, evicted: u64, bytes_now: u64) {
        if evicted > 0 {
            self.counters
                .evictions
                .fetch_add(evicted, Ordering::Relaxed);
            metrics::record_evictions(evicted);
        }
        metrics::set_cache_bytes(bytes_now);
    }

    /// If the filesystem is above the high watermark, evicts down to the low one (never `keep`,
    /// the chunk just stored). Chunks used in the last [`WATERMARK_SPARE_SECS`] are spared while
    /// the cache holds no more than the headroom above the high watermark: when others have
    /// filled the disk, the cache shrinks to what is in use instead of refetching it on every read.
    pub(super) fn enforce_watermarks(&self, keep: Option<&ChunkDigest>) {
        let (Some(high), Some(low)) = (self.opts.high_watermark_pct, self.opts.low_watermark_pct)
        else {
            return;
        };
        let Ok(vfs) = nix::sys::statvfs::statvfs(&self.chunks_dir) else {
            return;
        };
        let frsize = vfs.fragment_size();
        let Some(fill) = DiskFill::of(
            vfs.blocks().saturating_mul(frsize),
            vfs.blocks_free().saturating_mul(frsize),
            vfs.blocks_available().saturating_mul(frsize),
        ) else {
            return;
        };
        if fill.used.saturating_mul(100) < fill.capacity.saturating_mul(u64::from(high)) {
            return;
        }
        let low_bytes = fill.capacity / 100 * u64::from(low);
        let to_free = fill.used.saturating_sub(low_bytes);
        let headroom = fill.capacity / 100 * u64::from(100u8.saturating_sub(high));
        let now = self.now_secs();
        let mut disk = lock(&self.disk);
        let target = disk.bytes.saturating_sub(to_free);
        let evicted = self.evict_while(&mut disk, keep, |bytes, oldest| {
            let in_use = oldest.touched != 0 && now < oldest.touched + WATERMARK_SPARE_SECS;
            bytes > target && (bytes > headroom || !in_use)
        });
        self.note_evictions(evicted, disk.bytes);
        let stamp = now + 1;
        let last = self.watermark_logged.load(Ordering::Relaxed);
        if last == 0 || stamp.saturating_sub(last) >= 10 {
            self.watermark_logged.store(stamp, Ordering::Relaxed);
            tracing::info!(
                used_pct = fill.used * 100 / fill.capacity,
                high,
                low,
                evicted,
                remaining_bytes = disk.bytes,
                "disk above the high watermark: evicted chunks"
            );
        }
    }
}
