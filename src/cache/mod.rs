//! Chunk cache: verified, decompressed chunks keyed by chunk digest, a memory tier over a
//! size-bounded LRU on disk, shared by all layers and images, crash-safe and reused after restarts.
//!
//! Layout under the cache directory:
//! - `chunks/sha256/<first two hex digits>/<64 hex digits>`: one file per chunk, its decompressed
//!   bytes. A file only appears there by `rename` of a complete temp file, after the caller has
//!   verified the bytes against the digest.
//! - `tmp/`: files being written; emptied on open (leftovers of a crash).
//! - `lock`: `flock`ed while a [`ChunkCache`] has the directory open, so two daemons never share
//!   one index.
//!
//! Crash safety without an fsync per chunk: entries found on disk at open are marked unverified
//! and re-hashed the first time they are read (a torn or zero-length file left by a crash is
//! deleted then and refetched). Entries written by this process are trusted. Recency survives
//! restarts through file mtimes (refreshed at most once a minute per chunk on disk hits).
//!
//! Eviction never breaks a reader: readers receive owned [`Bytes`] or an open file descriptor,
//! and a read that finds its chunk gone is a miss the fetch layer refetches. The cache holds data
//! only: which chunks are being fetched, and by whom, is the fetch scheduler's
//! ([`crate::fetch::ClaimTable`]).
//!
//! Here: the cache's API, options and errors. The chunk files are `files.rs`, the disk tier's LRU
//! index with reservations, eviction and watermarks `index.rs`, the memory tier `memory.rs`,
//! passthrough assembly `assemble.rs`.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use lru::LruCache;

use crate::buffer_pool;
use crate::estargz::ChunkDigest;
use crate::metrics::{self, CacheTier};
use crate::sync::lock;

mod assemble;
mod files;
mod index;
mod memory;

pub use files::LargeChunkFile;
use files::{digest_of_file, scan_chunks};
pub use index::SpaceReservation;
use index::{DiskEntry, DiskIndex};
use memory::MemoryTier;

/// Chunk files kept open for reads ([`ChunkCache::read_at`]).
const OPEN_FILES: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(64) {
    Some(n) => n,
    None => std::num::NonZeroUsize::MIN,
};

/// Settings of a [`ChunkCache`].
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Directory holding the cache (created if missing).
    pub dir: PathBuf,
    /// Upper bound on the bytes of chunks kept on disk; least recently used chunks are evicted
    /// beyond it.
    pub max_bytes: u64,
    /// Upper bound on the bytes of hot chunks kept in memory (0 turns the memory tier off).
    pub memory_bytes: u64,
    /// When the filesystem holding `dir` is at least this full (percent of its capacity),
    /// chunks are evicted until it is at most `low_watermark_pct` full or the cache is empty,
    /// sparing the chunks used in the last two minutes while they take no more than the
    /// headroom above the high watermark.
    /// `None` (with `low_watermark_pct` `None`) turns watermarks off.
    pub high_watermark_pct: Option<u8>,
    /// See `high_watermark_pct`.
    pub low_watermark_pct: Option<u8>,
    /// `fsync` each chunk file before renaming it in. Off by default: unsynced files that a crash
    /// tears are detected by the re-hash of entries found at open.
    pub sync_writes: bool,
}

impl CacheOptions {
    /// Defaults: 10 GiB on disk, 64 MiB in memory, no watermarks, no fsync.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: 10 << 30,
            memory_bytes: 64 << 20,
            high_watermark_pct: None,
            low_watermark_pct: None,
            sync_writes: false,
        }
    }
}

/// Errors of the chunk cache; each names the digest or path concerned.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A filesystem operation failed.
    #[error("cache: cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The options are inconsistent.
    #[error("cache options: {0}")]
    Options(String),
    /// Another process (or another `ChunkCache` in this one) has the directory open.
    #[error("cache directory {} is in use by another lazysnap process (lock {}); use a separate --cache-dir", dir.display(), dir.join("lock").display())]
    Locked { dir: PathBuf },
    /// The chunks of a file concatenate to other bytes than the file digest says.
    #[error("the chunks of file {digest} do not add up to it (its TOC's file digest disagrees with its chunk digests); reading it through its chunks")]
    AssembledMismatch { digest: ChunkDigest },
    /// Chunk files being written leave no room in the bound for this one now.
    #[error("no room for chunk {digest} of {len} bytes in the cache bound of {max} bytes while {in_flight} bytes of other chunks are being written; served uncached")]
    WritesInFlight {
        digest: ChunkDigest,
        len: u64,
        in_flight: u64,
        max: u64,
    },
    /// A chunk larger than the whole disk bound cannot be stored.
    #[error("chunk {digest} of {len} bytes exceeds the cache size bound of {max} bytes; raise the cache size")]
    TooLarge {
        digest: ChunkDigest,
        len: u64,
        max: u64,
    },
}

/// Counters and sizes of a [`ChunkCache`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
    /// Chunks found corrupt on disk (size or digest) and removed.
    pub corrupt_removed: u64,
    pub disk_bytes: u64,
    pub disk_entries: u64,
    pub memory_bytes: u64,
    pub memory_entries: u64,
    pub max_bytes: u64,
}

#[derive(Default)]
struct Counters {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
    corrupt_removed: AtomicU64,
}

/// The node-wide chunk cache. Cheap to share (`Arc`); all methods take `&self` and never hold a
/// lock across disk reads or writes of chunk data.
pub struct ChunkCache {
    opts: CacheOptions,
    chunks_dir: PathBuf,
    tmp_dir: PathBuf,
    disk: Arc<Mutex<DiskIndex>>,
    /// Woken whenever a reservation ends, for large chunks waiting for room.
    space_released: Arc<tokio::sync::Notify>,
    memory: Mutex<MemoryTier>,
    /// Descriptors of recently read chunk files, kept open so that sequential reads of a chunk
    /// keep the kernel's readahead going; dropped when their chunk leaves the cache.
    open_files: Mutex<LruCache<ChunkDigest, Arc<File>>>,
    counters: Counters,
    temp_seq: AtomicU64,
    /// When (seconds since open, plus one) watermark eviction was last logged.
    watermark_logged: AtomicU64,
    opened: Instant,
    _lock: File,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.opts.dir)
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `opts.dir`: removes leftover temp files, rebuilds
    /// the index from the chunk files (oldest mtime = least recently used), and evicts down to
    /// the bounds if they shrank.
    pub fn open(opts: CacheOptions) -> Result<Arc<ChunkCache>, CacheError> {
        match (opts.high_watermark_pct, opts.low_watermark_pct) {
            (None, None) => {}
            (Some(high), Some(low)) if low < high && high <= 100 => {}
            (high, low) => {
                return Err(CacheError::Options(format!(
                    "watermarks must both be set with low < high <= 100 (got high {high:?}, low {low:?})"
                )))
            }
        }
        let dir = opts.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        // Chunks are decompressed image data, some of images that need credentials: root only,
        // also for a cache an older version created open to everyone.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("restrict to its owner the directory", &dir))?;
        let lock_path = dir.join("lock");
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open lock file", &lock_path))?;
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(CacheError::Locked { dir });
        }

        let tmp_dir = dir.join("tmp");
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir)
                .map_err(io_err("remove leftover temp files in", &tmp_dir))?;
        }
        fs::create_dir_all(&tmp_dir).map_err(io_err("create directory", &tmp_dir))?;
        let chunks_dir = dir.join("chunks").join("sha256");
        for shard in 0..=255u8 {
            let shard_dir = chunks_dir.join(hex::encode([shard]));
            fs::create_dir_all(&shard_dir).map_err(io_err("create directory", &shard_dir))?;
        }

        let mut found = scan_chunks(&chunks_dir)?;
        found.sort_by_key(|(_, _, mtime)| *mtime);
        let mut index = DiskIndex {
            reserved: 0,
            lru: LruCache::unbounded(),
            bytes: 0,
        };
        for (key, size, _) in found {
            index.bytes += size;
            index.lru.put(
                key,
                DiskEntry {
                    size,
                    verified: false,
                    touched: 0,
                },
            );
        }

        let cache = Arc::new(ChunkCache {
            chunks_dir,
            tmp_dir,
            disk: Arc::new(Mutex::new(index)),
            space_released: Arc::new(tokio::sync::Notify::new()),
            memory: Mutex::new(MemoryTier {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            counters: Counters::default(),
            temp_seq: AtomicU64::new(0),
            watermark_logged: AtomicU64::new(0),
            opened: Instant::now(),
            _lock: lock_file,
            open_files: Mutex::new(LruCache::new(OPEN_FILES)),
            opts,
        });
        {
            let mut disk = lock(&cache.disk);
            let evicted = cache.evict_locked(&mut disk, cache.opts.max_bytes, None);
            cache.note_evictions(evicted, disk.bytes);
            tracing::info!(
                dir = %cache.opts.dir.display(),
                chunks = disk.lru.len(),
                bytes = disk.bytes,
                evicted,
                "chunk cache opened"
            );
        }
        cache.enforce_watermarks(None);
        Ok(cache)
    }

    /// The options the cache was opened with.
    pub fn options(&self) -> &CacheOptions {
        &self.opts
    }

    /// Whether the chunk is cached (memory or disk). Does not change recency.
    pub fn contains(&self, digest: &ChunkDigest) -> bool {
        lock(&self.memory).lru.contains(digest) || lock(&self.disk).lru.contains(digest)
    }

    /// The whole chunk, if cached. A disk hit is loaded into the memory tier.
    pub fn get(&self, digest: &ChunkDigest) -> Option<Bytes> {
        if let Some(data) = self.memory_hit(digest) {
            return Some(data);
        }
        let data = self.load_from_disk(digest)?;
        self.insert_memory(*digest, data.clone());
        Some(data)
    }

    /// `len` bytes of the chunk from `offset` (fewer at its end), if cached. From disk only the
    /// asked range is read (once the entry is verified), so a partial read of a big chunk costs
    /// one `pread`.
    pub fn read_at(&self, digest: &ChunkDigest, offset: u64, len: usize) -> Option<Bytes> {
        if let Some(data) = self.memory_hit(digest) {
            return Some(slice_clamped(&data, offset, len));
        }
        let (size, verified, touched) = {
            let mut disk = lock(&self.disk);
            match disk.lru.get(digest) {
                Some(e) => (e.size, e.verified, e.touched),
                None => {
                    drop(disk);
                    self.note_miss();
                    return None;
                }
            }
        };
        if !verified {
            let data = self.load_from_disk(digest)?;
            self.insert_memory(*digest, data.clone());
            return Some(slice_clamped(&data, offset, len));
        }
        let kept_open = lock(&self.open_files).get(digest).cloned();
        let file = match kept_open {
            Some(file) => file,
            None => {
                let path = self.chunk_path(digest);
                let file = match File::open(&path) {
                    Ok(f) if f.metadata().is_ok_and(|m| m.len() == size) => {
                        // Reads of a chunk usually go on to its end: start reading it all now.
                        let _ = nix::fcntl::posix_fadvise(
                            &f,
                            0,
                            0,
                            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
                        );
                        Arc::new(f)
                    }
                    Ok(_) => {
                        self.remove_corrupt(digest, "size differs from the index");
                        self.note_miss();
                        return None;
                    }
                    Err(e) => {
                        self.forget_missing(digest, &path, &e);
                        self.note_miss();
                        return None;
                    }
                };
                lock(&self.open_files).put(*digest, Arc::clone(&file));
                file
            }
        };
        let start = offset.min(size);
        let end = start.saturating_add(len as u64).min(size);
        let Ok(want) = usize::try_from(end - start) else {
            self.note_miss();
            return None;
        };
        let mut buf = buffer_pool::POOL.take_sized(want);
        if file.read_exact_at(&mut buf, start).is_err() {
            self.remove_corrupt(digest, "read failed");
            self.note_miss();
            return None;
        }
        self.maybe_touch(digest, &file, touched);
        self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
        metrics::record_cache_hit(CacheTier::Disk);
        Some(buffer_pool::POOL.into_bytes(buf))
    }

    /// An open file holding exactly the chunk's bytes (for FUSE passthrough of single-chunk
    /// files). The descriptor stays valid if the chunk is evicted later.
    pub fn open_file(&self, digest: &ChunkDigest) -> Option<File> {
        let (size, verified) = {
            let mut disk = lock(&self.disk);
            let e = disk.lru.get(digest)?;
            (e.size, e.verified)
        };
        let file = File::open(self.chunk_path(digest)).ok()?;
        if !file.metadata().is_ok_and(|m| m.len() == size) {
            return None;
        }
        if !verified {
            // Hashed through a small buffer: these files can be whole large files.
            if !files::holds_chunk(&file, digest, &digest_of_file(&file).ok()?) {
                self.remove_corrupt(digest, "content does not match its digest");
                return None;
            }
            if let Some(e) = lock(&self.disk).lru.peek_mut(digest) {
                e.verified = true;
            }
        }
        Some(file)
    }

    /// Puts a verified chunk in the memory tier only, so readers find it before
    /// [`insert`](Self::insert) has written it to disk. False when the tier cannot hold it (too
    /// large for its budget): then only `insert` makes it findable.
    pub fn remember(&self, digest: &ChunkDigest, data: Bytes) -> bool {
        let len = data.len() as u64;
        if len == 0 || len > self.opts.memory_bytes / 2 {
            return false;
        }
        self.insert_memory(*digest, data);
        true
    }

    /// Stores a chunk. The caller must have verified that `data` hashes to `digest` (the fetch
    /// layer does, through `estargz::decode_chunk`); the cache never checks it again for entries
    /// it wrote itself. The file is written under `tmp/` and renamed into place, then least
    /// recently used chunks are evicted to keep within the bounds.
    pub fn insert(&self, digest: &ChunkDigest, data: Bytes) -> Result<(), CacheError> {
        self.insert_file(digest, data, None)
    }

    /// [`insert`](Self::insert) of a chunk whose key names it rather than hashes its bytes (a
    /// gzip span, keyed by its zTOC and position): the digest of its bytes is recorded with the
    /// file, so that the chunk is still trusted when a later daemon finds it on disk.
    pub fn insert_named(&self, key: &ChunkDigest, data: Bytes) -> Result<(), CacheError> {
        let content = ChunkDigest::of(&data);
        self.insert_file(key, data, Some(content))
    }

    fn insert_file(
        &self,
        digest: &ChunkDigest,
        data: Bytes,
        content: Option<ChunkDigest>,
    ) -> Result<(), CacheError> {
        let key = *digest;
        let len = data.len() as u64;
        if len > self.opts.max_bytes {
            return Err(CacheError::TooLarge {
                digest: key,
                len,
                max: self.opts.max_bytes,
            });
        }
        let path = self.chunk_path(&key);
        let already = {
            let mut disk = lock(&self.disk);
            disk.lru.get(&key).is_some() && path.exists()
        };
        if !already {
            let mut space = self.reserve(&key, len)?;
            let tmp = self.write_temp(&data)?;
            if let Some(content) = &content {
                files::record_content_digest(&tmp, content);
            }
            self.install(key, &tmp, &mut space)?;
            // On disk now: a chunk remembered until here leaves the memory tier, which keeps the
            // chunks read again (loaded by `get`), and its buffer goes back to be reused.
            self.forget_memory(&key);
        }
        self.enforce_watermarks(Some(&key));
        Ok(())
    }

    /// Counters and sizes.
    pub fn stats(&self) -> CacheStats {
        let (disk_bytes, disk_entries) = {
            let disk = lock(&self.disk);
            (disk.bytes, disk.lru.len() as u64)
        };
        let (memory_bytes, memory_entries) = {
            let mem = lock(&self.memory);
            (mem.bytes, mem.lru.len() as u64)
        };
        let c = &self.counters;
        CacheStats {
            memory_hits: c.memory_hits.load(Ordering::Relaxed),
            disk_hits: c.disk_hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            inserts: c.inserts.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            corrupt_removed: c.corrupt_removed.load(Ordering::Relaxed),
            disk_bytes,
            disk_entries,
            memory_bytes,
            memory_entries,
            max_bytes: self.opts.max_bytes,
        }
    }
}

fn slice_clamped(data: &Bytes, offset: u64, len: usize) -> Bytes {
    let size = data.len();
    let start = usize::try_from(offset).unwrap_or(size).min(size);
    let end = start.saturating_add(len).min(size);
    data.slice(start..end)
}

#[cfg(test)]
mod tests;
