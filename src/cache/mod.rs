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

use crate::sync::lock;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest as _, Sha256};

use crate::buffer_pool;
use crate::estargz::ChunkDigest;
use crate::metrics::{self, CacheTier};

/// Chunk files kept open for reads ([`ChunkCache::read_at`]).
const OPEN_FILES: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(64) {
    Some(n) => n,
    None => std::num::NonZeroUsize::MIN,
};

/// How often (seconds) a disk hit refreshes the chunk file's mtime, which orders the LRU after a
/// restart.
const TOUCH_INTERVAL_SECS: u64 = 60;

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
    /// chunks are evicted until it is at most `low_watermark_pct` full or the cache is empty.
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

struct DiskEntry {
    size: u64,
    /// False for entries found at open until their bytes have been hashed once.
    verified: bool,
    /// Seconds since the cache was opened when the file's mtime was last refreshed.
    touched: u64,
}

struct DiskIndex {
    lru: LruCache<ChunkDigest, DiskEntry>,
    bytes: u64,
    /// Bytes of chunk files being written (see [`SpaceReservation`]): entries plus these stay
    /// within the bound.
    reserved: u64,
}

/// Room in the disk bound for one chunk file being written, made by evicting before the first
/// byte is written; released when the file is installed or abandoned.
pub struct SpaceReservation {
    disk: Arc<Mutex<DiskIndex>>,
    released: Arc<tokio::sync::Notify>,
    len: u64,
}

impl Drop for SpaceReservation {
    fn drop(&mut self) {
        let mut disk = lock(&self.disk);
        disk.reserved = disk.reserved.saturating_sub(self.len);
        drop(disk);
        self.released.notify_waiters();
    }
}

/// A chunk too large to decode in memory, being written to a temp file of the cache by its
/// decoder: [`ChunkCache::begin_large`], then [`ChunkCache::finish_large`].
pub struct LargeChunkFile {
    file: fs::File,
    path: PathBuf,
    space: SpaceReservation,
}

impl LargeChunkFile {
    /// A writer to the file, for the decoder.
    pub fn writer(&self) -> Result<Box<dyn Write + Send>, CacheError> {
        let file = self.file.try_clone().map_err(|source| CacheError::Io {
            action: "open a writer to",
            path: self.path.clone(),
            source,
        })?;
        Ok(Box::new(io::BufWriter::with_capacity(1 << 20, file)))
    }
}

impl Drop for LargeChunkFile {
    fn drop(&mut self) {
        // Installed files were renamed away; an abandoned one is removed.
        let _ = fs::remove_file(&self.path);
    }
}

struct MemoryTier {
    lru: LruCache<ChunkDigest, Bytes>,
    bytes: u64,
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

/// A chunk file mapped read-only, the owner of the [`Bytes`] a large chunk is served from: the
/// kernel pages it in from the file as reads touch it and may drop it again, so its size does
/// not count against the daemon's memory. Cache files are replaced by rename and removed by
/// unlink, never truncated, so the mapping stays valid after eviction.
struct MappedChunk {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone; it is unmapped once, on drop.
unsafe impl Send for MappedChunk {}
// SAFETY: see above; shared access only reads.
unsafe impl Sync for MappedChunk {}

impl MappedChunk {
    fn map(file: &fs::File, len: u64) -> io::Result<MappedChunk> {
        let size = usize::try_from(len)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "empty or oversized chunk")
            })?;
        // SAFETY: a fresh shared read-only mapping of a regular file we hold open; no other
        // memory is affected.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                size,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                file,
                0,
            )
        }
        .map_err(io::Error::from)?;
        Ok(MappedChunk {
            ptr,
            len: size.get(),
        })
    }
}

impl AsRef<[u8]> for MappedChunk {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for MappedChunk {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, once.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
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

    fn chunk_path(&self, key: &ChunkDigest) -> PathBuf {
        let hex = key.hex();
        self.chunks_dir.join(&hex[..2]).join(hex)
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
            if digest_of_file(&file).ok()? != *digest {
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
            self.install(key, &tmp, &mut space)?;
            // On disk now: a chunk remembered until here leaves the memory tier, which keeps the
            // chunks read again (loaded by `get`), and its buffer goes back to be reused.
            self.forget_memory(&key);
        }
        self.enforce_watermarks(Some(&key));
        Ok(())
    }

    /// Makes room for a chunk file of `len` bytes about to be written: evicts until the entries
    /// and every file being written fit the disk bound.
    /// Refused when the other files being written leave no room for `len` more bytes (the
    /// caller serves the chunk uncached, or waits: [`Self::begin_large`]).
    fn reserve(&self, key: &ChunkDigest, len: u64) -> Result<SpaceReservation, CacheError> {
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

    /// Starts the cache file of chunk `key` of `len` bytes for a decoder to write into (a chunk
    /// too large to hold in memory); its room in the disk bound is reserved first, waiting for
    /// other large chunks being written to finish when they leave none.
    pub async fn begin_large(
        &self,
        key: &ChunkDigest,
        len: u64,
    ) -> Result<LargeChunkFile, CacheError> {
        let space = loop {
            let released = self.space_released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.reserve(key, len) {
                Err(CacheError::WritesInFlight { .. }) => released.await,
                other => break other?,
            }
        };
        let path = self.temp_path();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| CacheError::Io {
                action: "create chunk temp file",
                path: path.clone(),
                source,
            })?;
        Ok(LargeChunkFile { file, path, space })
    }

    /// Installs a chunk file the decoder wrote completely and verified, and returns its bytes
    /// mapped from the file (not read into memory).
    pub fn finish_large(
        &self,
        key: &ChunkDigest,
        mut large: LargeChunkFile,
    ) -> Result<Bytes, CacheError> {
        let len = large.space.len;
        let io_error = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io {
                action,
                path,
                source,
            }
        };
        if self.opts.sync_writes {
            large
                .file
                .sync_data()
                .map_err(io_error("sync chunk temp file", &large.path))?;
        }
        let mapped = MappedChunk::map(&large.file, len)
            .map_err(io_error("map chunk temp file", &large.path))?;
        self.install(*key, &large.path, &mut large.space)?;
        self.enforce_watermarks(Some(key));
        Ok(Bytes::from_owner(mapped))
    }

    /// Renames the complete temp file `tmp`, written into `space`, into place as entry `key`
    /// (its room now counted as the entry's), then evicts to keep within the disk bound.
    fn install(
        &self,
        key: ChunkDigest,
        tmp: &Path,
        space: &mut SpaceReservation,
    ) -> Result<(), CacheError> {
        let len = space.len;
        let path = self.chunk_path(&key);
        let mut disk = lock(&self.disk);
        if let Err(source) = fs::rename(tmp, &path) {
            drop(disk);
            let _ = fs::remove_file(tmp);
            return Err(CacheError::Io {
                action: "rename a temp file to",
                path,
                source,
            });
        }
        if let Some(old) = disk.lru.put(
            key,
            DiskEntry {
                size: len,
                verified: true,
                touched: self.now_secs(),
            },
        ) {
            disk.bytes = disk.bytes.saturating_sub(old.size);
        }
        disk.bytes += len;
        // The file now counts as an entry, no longer as a write in flight.
        disk.reserved = disk.reserved.saturating_sub(len);
        // Accounted for above: when its owner drops it, it only wakes the waiters.
        space.len = 0;
        let target = self.opts.max_bytes.saturating_sub(disk.reserved);
        let evicted = self.evict_locked(&mut disk, target, Some(&key));
        self.note_evictions(evicted, disk.bytes);
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes sure the entry `whole` exists and is the concatenation of the cached chunks `parts`
    /// — the backing file for FUSE passthrough of a file made of several chunks: writes it if it
    /// is missing, and either way checks that the parts are `size` bytes hashing to `whole` (a
    /// TOC whose file digest disagrees with its chunks gets an error and stores nothing).
    /// Streams through a small buffer; the parts stay cached. `Ok(false)`: a part is missing.
    pub fn assemble(
        &self,
        whole: &ChunkDigest,
        parts: &[ChunkDigest],
        size: u64,
    ) -> Result<bool, CacheError> {
        if size > self.opts.max_bytes / 2 {
            return Err(CacheError::TooLarge {
                digest: *whole,
                len: size,
                max: self.opts.max_bytes / 2,
            });
        }
        // Present already (another layer's file): the parts must still be shown to make it.
        let present = lock(&self.disk).lru.contains(whole) && self.chunk_path(whole).exists();
        let space = if present {
            None
        } else {
            match self.reserve(whole, size) {
                Ok(space) => Some(space),
                // No room while other chunks are being written: later, like a missing part.
                Err(CacheError::WritesInFlight { .. }) => return Ok(false),
                Err(e) => return Err(e),
            }
        };
        let tmp = self.temp_path();
        let io_error = |action, source| CacheError::Io {
            action,
            path: tmp.clone(),
            source,
        };
        let written = (|| {
            let mut out = if present {
                None
            } else {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| io_error("create the assembled file", e))?;
                Some(file)
            };
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            for part in parts {
                let Ok(mut file) = File::open(self.chunk_path(part)) else {
                    return Ok(None);
                };
                loop {
                    let n = file
                        .read(&mut buf)
                        .map_err(|e| io_error("read a chunk into the assembled file", e))?;
                    let Some(piece) = buf.get(..n).filter(|p| !p.is_empty()) else {
                        break;
                    };
                    hasher.update(piece);
                    if let Some(out) = out.as_mut() {
                        out.write_all(piece)
                            .map_err(|e| io_error("write the assembled file", e))?;
                    }
                    total += n as u64;
                }
            }
            if let Some(out) = out.as_ref().filter(|_| self.opts.sync_writes) {
                out.sync_data()
                    .map_err(|e| io_error("sync the assembled file", e))?;
            }
            Ok(Some((
                total,
                ChunkDigest::from_bytes(hasher.finalize().into()),
            )))
        })();
        match written {
            Ok(Some((total, digest))) if total == size && digest == *whole => {
                if let Some(mut space) = space {
                    self.install(*whole, &tmp, &mut space)?;
                    self.enforce_watermarks(Some(whole));
                }
                Ok(true)
            }
            Ok(Some(_)) => {
                let _ = fs::remove_file(&tmp);
                Err(CacheError::AssembledMismatch { digest: *whole })
            }
            Ok(None) => {
                let _ = fs::remove_file(&tmp);
                Ok(false)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
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

    fn memory_hit(&self, key: &ChunkDigest) -> Option<Bytes> {
        let data = lock(&self.memory).lru.get(key).cloned()?;
        // Keep the disk copy of a hot chunk from being evicted first.
        lock(&self.disk).lru.promote(key);
        self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
        metrics::record_cache_hit(CacheTier::Memory);
        Some(data)
    }

    fn note_miss(&self) {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        metrics::record_cache_miss();
    }

    /// Reads a whole chunk file, checking its size and (for entries found at open) its digest.
    fn load_from_disk(&self, key: &ChunkDigest) -> Option<Bytes> {
        let (size, verified, touched) = {
            let mut disk = lock(&self.disk);
            match disk.lru.get(key) {
                Some(e) => (e.size, e.verified, e.touched),
                None => {
                    drop(disk);
                    self.note_miss();
                    return None;
                }
            }
        };
        let path = self.chunk_path(key);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                self.forget_missing(key, &path, &e);
                self.note_miss();
                return None;
            }
        };
        let data = match (file.metadata(), usize::try_from(size)) {
            (Ok(meta), Ok(len)) if meta.len() == size => read_exact_range(&file, 0, len).ok(),
            _ => None,
        };
        let Some(data) = data else {
            self.remove_corrupt(key, "size differs from the index or read failed");
            self.note_miss();
            return None;
        };
        if !verified {
            if ChunkDigest::of(&data) != *key {
                self.remove_corrupt(key, "content does not match its digest");
                self.note_miss();
                return None;
            }
            if let Some(e) = lock(&self.disk).lru.peek_mut(key) {
                e.verified = true;
            }
        }
        self.maybe_touch(key, &file, touched);
        self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
        metrics::record_cache_hit(CacheTier::Disk);
        Some(Bytes::from(data))
    }

    fn forget_memory(&self, key: &ChunkDigest) {
        let mut mem = lock(&self.memory);
        if let Some(old) = mem.lru.pop(key) {
            mem.bytes = mem.bytes.saturating_sub(old.len() as u64);
        }
    }

    fn insert_memory(&self, key: ChunkDigest, data: Bytes) {
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

    fn now_secs(&self) -> u64 {
        self.opened.elapsed().as_secs()
    }

    /// Refreshes the file's mtime (the restart-time recency order) at most once a minute.
    fn maybe_touch(&self, key: &ChunkDigest, file: &File, touched: u64) {
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
    fn forget_missing(&self, key: &ChunkDigest, path: &Path, err: &io::Error) {
        let mut disk = lock(&self.disk);
        lock(&self.open_files).pop(key);
        if !path.exists() {
            if let Some(e) = disk.lru.pop(key) {
                disk.bytes = disk.bytes.saturating_sub(e.size);
            }
            tracing::warn!(path = %path.display(), error = %err, "cached chunk file vanished; it will be refetched");
        }
    }

    fn remove_corrupt(&self, key: &ChunkDigest, why: &str) {
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

    /// A fresh name under `tmp/` for a file being written.
    fn temp_path(&self) -> PathBuf {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir
            .join(format!("{}-{seq}.part", std::process::id()))
    }

    fn write_temp(&self, data: &[u8]) -> Result<PathBuf, CacheError> {
        let tmp = self.temp_path();
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(data)?;
            if self.opts.sync_writes {
                file.sync_data()?;
            }
            Ok(())
        })();
        if let Err(source) = result {
            let _ = fs::remove_file(&tmp);
            return Err(CacheError::Io {
                action: "write chunk temp file",
                path: tmp,
                source,
            });
        }
        Ok(tmp)
    }

    /// Evicts least recently used chunks until at most `target` bytes remain (never `keep`).
    /// Unlinks happen under the index lock so they cannot race a rename of the same digest.
    fn evict_locked(&self, disk: &mut DiskIndex, target: u64, keep: Option<&ChunkDigest>) -> u64 {
        let mut evicted = 0;
        while disk.bytes > target {
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

    fn note_evictions(&self, evicted: u64, bytes_now: u64) {
        if evicted > 0 {
            self.counters
                .evictions
                .fetch_add(evicted, Ordering::Relaxed);
            metrics::record_evictions(evicted);
        }
        metrics::set_cache_bytes(bytes_now);
    }

    /// If the filesystem is above the high watermark, evicts down to the low one (never `keep`,
    /// the chunk just stored).
    fn enforce_watermarks(&self, keep: Option<&ChunkDigest>) {
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
        let mut disk = lock(&self.disk);
        let target = disk.bytes.saturating_sub(to_free);
        let evicted = self.evict_locked(&mut disk, target, keep);
        self.note_evictions(evicted, disk.bytes);
        let now = self.now_secs() + 1;
        let last = self.watermark_logged.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= 10 {
            self.watermark_logged.store(now, Ordering::Relaxed);
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

/// How full a filesystem is, as `df` reports it: the bytes written over the bytes an unprivileged
/// writer could have, so blocks reserved for root count neither as used nor as room. (Counting the
/// reserve as used would call a disk with a large reserve full while it is mostly empty.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiskFill {
    used: u64,
    capacity: u64,
}

impl DiskFill {
    /// From statvfs's total, free and available-to-unprivileged bytes; `None` for an empty total.
    fn of(total: u64, free: u64, available: u64) -> Option<DiskFill> {
        let used = total.saturating_sub(free);
        let capacity = used.saturating_add(available);
        (capacity > 0).then_some(DiskFill { used, capacity })
    }
}

fn slice_clamped(data: &Bytes, offset: u64, len: usize) -> Bytes {
    let size = data.len();
    let start = usize::try_from(offset).unwrap_or(size).min(size);
    let end = start.saturating_add(len).min(size);
    data.slice(start..end)
}

/// Lists `(digest, size, mtime)` of the chunk files; removes files whose names are not digests.
fn scan_chunks(chunks_dir: &Path) -> Result<Vec<(ChunkDigest, u64, SystemTime)>, CacheError> {
    let mut found = Vec::new();
    for shard in 0..=255u8 {
        let shard_name = hex::encode([shard]);
        let shard_dir = chunks_dir.join(&shard_name);
        let entries = fs::read_dir(&shard_dir).map_err(io_err("list", &shard_dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &shard_dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let key = name
                .to_str()
                .filter(|n| n.len() == 64 && n.starts_with(&shard_name))
                .and_then(ChunkDigest::from_hex);
            let meta = entry.metadata().ok().filter(|m| m.is_file());
            match (key, meta) {
                (Some(key), Some(meta)) => {
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((key, meta.len(), mtime));
                }
                _ => {
                    tracing::warn!(path = %path.display(), "removing a stray file from the chunk cache");
                    let _ = fs::remove_file(&path).or_else(|_| fs::remove_dir_all(&path));
                }
            }
        }
    }
    Ok(found)
}

/// The sha256 of everything in `file`, read through a 1 MiB buffer at explicit offsets (the
/// file position is left alone).
fn digest_of_file(file: &File) -> io::Result<ChunkDigest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        match file.read_at(&mut buf, offset)? {
            0 => break,
            n => {
                hasher.update(buf.get(..n).unwrap_or_default());
                offset += n as u64;
            }
        }
    }
    Ok(ChunkDigest::from_bytes(hasher.finalize().into()))
}

/// `len` bytes of `file` from `offset`, read into a fresh buffer without zero-filling it first.
fn read_exact_range(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut reader = file;
    reader.seek(io::SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(len);
    reader.take(len as u64).read_to_end(&mut buf)?;
    if buf.len() == len {
        Ok(buf)
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read {} of {len} bytes", buf.len()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> ChunkDigest {
        ChunkDigest::of(data)
    }

    fn chunk_file(dir: &Path, digest: &ChunkDigest) -> PathBuf {
        let hex = digest.hex();
        dir.join("chunks/sha256").join(&hex[..2]).join(hex)
    }

    fn opts(dir: &Path, max: u64, mem: u64) -> CacheOptions {
        CacheOptions {
            max_bytes: max,
            memory_bytes: mem,
            ..CacheOptions::new(dir)
        }
    }

    #[test]
    fn the_cache_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = ChunkCache::open(opts(&root, 1 << 20, 0)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700, "an existing open cache dir is closed");
        let data = Bytes::from_static(b"decompressed image data");
        let d = digest_of(&data);
        cache.insert(&d, data).unwrap();
        let text = d.to_string();
        let hex = &text["sha256:".len()..];
        let file = root.join("chunks/sha256").join(&hex[..2]).join(hex);
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn insert_then_get_and_read_at_from_both_tiers() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
        let data = Bytes::from((0..5000u32).map(|i| i as u8).collect::<Vec<_>>());
        let d = digest_of(&data);
        assert!(cache.get(&d).is_none());
        cache.insert(&d, data.clone()).unwrap();
        assert!(cache.contains(&d));
        assert_eq!(cache.get(&d).unwrap(), data);
        assert_eq!(cache.read_at(&d, 4990, 100).unwrap(), data.slice(4990..));
        assert_eq!(cache.read_at(&d, 6000, 10).unwrap().len(), 0);
        // The file name is the digest's hex, as caches written by earlier versions have it.
        let text = d.to_string();
        let hex = &text["sha256:".len()..];
        assert!(dir
            .path()
            .join("chunks/sha256")
            .join(&hex[..2])
            .join(hex)
            .is_file());
        let stats = cache.stats();
        assert_eq!(stats.disk_hits, 3);
        assert_eq!(stats.misses, 1);
        assert_eq!(stats.disk_bytes, 5000);

        let cache2_dir = tempfile::tempdir().unwrap();
        let mem_cache = ChunkCache::open(opts(cache2_dir.path(), 1 << 20, 1 << 20)).unwrap();
        // Remembered, a chunk is read from memory until it is on disk; then it leaves the tier.
        assert!(mem_cache.remember(&d, data.clone()));
        assert_eq!(mem_cache.read_at(&d, 10, 10).unwrap(), data.slice(10..20));
        assert_eq!(mem_cache.stats().memory_hits, 1);
        mem_cache.insert(&d, data.clone()).unwrap();
        assert_eq!(mem_cache.stats().memory_bytes, 0);
        assert_eq!(mem_cache.read_at(&d, 10, 10).unwrap(), data.slice(10..20));
        assert_eq!(mem_cache.stats().disk_hits, 1);
        // A chunk read again whole (`get`) is loaded into the memory tier and served from it.
        assert_eq!(mem_cache.get(&d).unwrap(), data);
        assert_eq!(mem_cache.read_at(&d, 10, 10).unwrap(), data.slice(10..20));
        assert_eq!(mem_cache.stats().memory_hits, 2);
    }

    #[test]
    fn a_large_chunk_written_in_place_is_room_made_first_and_served_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(opts(dir.path(), 3000, 0)).unwrap();
        let small: Vec<Bytes> = (0..2u8).map(|i| Bytes::from(vec![i; 1000])).collect();
        for chunk in &small {
            cache.insert(&digest_of(chunk), chunk.clone()).unwrap();
        }
        let large = Bytes::from((0..2000u32).map(|i| i as u8).collect::<Vec<_>>());
        let key = digest_of(&large);
        let begin = |key, len| futures::executor::block_on(cache.begin_large(key, len));
        let file = begin(&key, large.len() as u64).unwrap();
        // Room was made before the first byte is written: what is cached plus what is being
        // written stays within the bound.
        assert!(cache.stats().disk_bytes + large.len() as u64 <= 3000);
        assert!(!cache.contains(&digest_of(&small[0])));
        let mut writer = file.writer().unwrap();
        writer.write_all(&large).unwrap();
        writer.flush().unwrap();
        drop(writer);
        let mapped = cache.finish_large(&key, file).unwrap();
        assert_eq!(mapped, large);
        assert_eq!(cache.read_at(&key, 1990, 100).unwrap(), large.slice(1990..));
        assert!(cache.stats().disk_bytes <= 3000);
        // A large chunk abandoned before it is finished leaves no file and no reservation.
        let other = digest_of(b"abandoned");
        let writing = begin(&other, 2500).unwrap();
        // While it is being written, no other write fits the bound: a small chunk is refused
        // (served uncached), a large one waits for room.
        let small_chunk = Bytes::from(vec![7u8; 1000]);
        assert!(matches!(
            cache.insert(&digest_of(&small_chunk), small_chunk.clone()),
            Err(CacheError::WritesInFlight { .. })
        ));
        let waits = digest_of(b"waits");
        let waiting = cache.begin_large(&waits, 1000);
        futures::pin_mut!(waiting);
        assert!(
            futures::executor::block_on(futures::future::poll_immediate(&mut waiting)).is_none()
        );
        drop(writing);
        assert!(futures::executor::block_on(waiting).is_ok());
        assert!(!cache.contains(&other));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        cache
            .insert(&digest_of(&small[1]), small[1].clone())
            .unwrap();
        assert!(cache.contains(&digest_of(&small[1])));
        // Larger than the whole bound: refused, not written.
        assert!(matches!(
            begin(&other, 4000),
            Err(CacheError::TooLarge { .. })
        ));
    }

    #[test]
    fn size_bound_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(opts(dir.path(), 3000, 0)).unwrap();
        let chunks: Vec<Bytes> = (0..5u8).map(|i| Bytes::from(vec![i; 1000])).collect();
        let digests: Vec<ChunkDigest> = chunks.iter().map(|c| digest_of(c)).collect();
        for i in 0..3 {
            cache.insert(&digests[i], chunks[i].clone()).unwrap();
        }
        // Touch chunk 0 so chunk 1 is the least recently used.
        assert!(cache.get(&digests[0]).is_some());
        cache.insert(&digests[3], chunks[3].clone()).unwrap();
        assert!(cache.contains(&digests[0]));
        assert!(!cache.contains(&digests[1]));
        assert!(cache.stats().disk_bytes <= 3000);
        cache.insert(&digests[4], chunks[4].clone()).unwrap();
        assert!(!cache.contains(&digests[2]));
        assert_eq!(cache.stats().evictions, 2);
        assert!(cache.stats().disk_bytes <= 3000);
        assert!(matches!(
            cache.insert(&digest_of(&[9; 4000]), Bytes::from(vec![9; 4000])),
            Err(CacheError::TooLarge { .. })
        ));
    }

    #[test]
    fn reopen_reuses_chunks_removes_temps_and_detects_torn_files() {
        let dir = tempfile::tempdir().unwrap();
        let good = Bytes::from(vec![7u8; 3000]);
        let torn = Bytes::from(vec![8u8; 3000]);
        let (dg, dt) = (digest_of(&good), digest_of(&torn));
        {
            let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 1 << 20)).unwrap();
            cache.insert(&dg, good.clone()).unwrap();
            cache.insert(&dt, torn.clone()).unwrap();
            assert!(matches!(
                ChunkCache::open(opts(dir.path(), 1 << 20, 0)),
                Err(CacheError::Locked { .. })
            ));
        }
        // Simulate a crash: a leftover temp file and a chunk file cut short.
        std::fs::write(dir.path().join("tmp/123-0.part"), b"partial").unwrap();
        let torn_path = chunk_file(dir.path(), &dt);
        std::fs::write(&torn_path, vec![8u8; 10]).unwrap();
        let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 1 << 20)).unwrap();
        assert!(!dir.path().join("tmp/123-0.part").exists());
        assert_eq!(cache.stats().disk_entries, 2);
        assert_eq!(cache.get(&dg).unwrap(), good);
        assert!(cache.read_at(&dt, 0, 5).is_none());
        assert!(!torn_path.exists());
        assert_eq!(cache.stats().corrupt_removed, 1);
    }

    #[test]
    fn assembled_files_are_checked_written_once_and_reverified_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let parts: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; 1500])).collect();
        let keys: Vec<ChunkDigest> = parts.iter().map(|p| digest_of(p)).collect();
        let whole_bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let whole = digest_of(&whole_bytes);
        let read_all = |file: File| {
            let mut data = Vec::new();
            (&file).read_to_end(&mut data).unwrap();
            data
        };
        {
            let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
            cache.insert(&keys[0], parts[0].clone()).unwrap();
            cache.insert(&keys[1], parts[1].clone()).unwrap();
            // A part missing: nothing written.
            assert!(!cache.assemble(&whole, &keys, 4500).unwrap());
            assert!(!cache.contains(&whole));
            cache.insert(&keys[2], parts[2].clone()).unwrap();
            // Parts that do not make the claimed file: an error, nothing stored.
            let other = digest_of(b"something else");
            assert!(matches!(
                cache.assemble(&other, &keys, 4500),
                Err(CacheError::AssembledMismatch { .. })
            ));
            assert!(!cache.contains(&other));
            assert!(cache.assemble(&whole, &keys, 4500).unwrap());
            assert_eq!(read_all(cache.open_file(&whole).unwrap()), whole_bytes);
            // Present already: checked against the parts, not rewritten.
            let inserts = cache.stats().inserts;
            assert!(cache.assemble(&whole, &keys, 4500).unwrap());
            assert_eq!(cache.stats().inserts, inserts);
            // Parts in another order do not make it.
            let swapped = [keys[1], keys[0], keys[2]];
            assert!(cache.assemble(&whole, &swapped, 4500).is_err());
            assert!(cache.contains(&whole));
        }
        // After a restart the entry is unverified: opening it hashes it first.
        let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
        assert_eq!(read_all(cache.open_file(&whole).unwrap()), whole_bytes);
        drop(cache);
        std::fs::write(chunk_file(dir.path(), &whole), vec![0u8; 4500]).unwrap();
        let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
        assert!(cache.open_file(&whole).is_none());
        assert_eq!(cache.stats().corrupt_removed, 1);
    }

    #[test]
    fn reopen_with_smaller_bound_evicts_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<Bytes> = (0..4u8).map(|i| Bytes::from(vec![i; 1000])).collect();
        let digests: Vec<ChunkDigest> = chunks.iter().map(|c| digest_of(c)).collect();
        {
            let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
            for (i, c) in chunks.iter().enumerate() {
                cache.insert(&digests[i], c.clone()).unwrap();
                let path = chunk_file(dir.path(), &digests[i]);
                let when = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
                File::open(path).unwrap().set_modified(when).unwrap();
            }
        }
        let cache = ChunkCache::open(opts(dir.path(), 2000, 0)).unwrap();
        assert!(!cache.contains(&digests[0]));
        assert!(!cache.contains(&digests[1]));
        assert!(cache.contains(&digests[2]));
        assert!(cache.contains(&digests[3]));
    }

    #[test]
    fn watermarks_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), 1 << 20, 0);
        o.high_watermark_pct = Some(80);
        o.low_watermark_pct = Some(85);
        assert!(matches!(ChunkCache::open(o), Err(CacheError::Options(_))));
    }

    #[test]
    fn fullness_is_dfs_so_a_root_reserve_is_not_counted_as_used() {
        // 270 GB disk, 209 GB free of which 36 GB usable without root (a large reserve): df says
        // 61 GB used of 97 GB, 63 %, not the 87 % that counting the reserve as used gives.
        let gb = 1_000_000_000;
        let fill = DiskFill::of(270 * gb, 209 * gb, 36 * gb).unwrap();
        assert_eq!(
            fill,
            DiskFill {
                used: 61 * gb,
                capacity: 97 * gb
            }
        );
        assert_eq!(fill.used * 100 / fill.capacity, 62);
        // No reserve: used over total.
        let fill = DiskFill::of(100, 30, 30).unwrap();
        assert_eq!(
            fill,
            DiskFill {
                used: 70,
                capacity: 100
            }
        );
        assert_eq!(DiskFill::of(0, 0, 0), None);
    }

    #[test]
    fn watermark_below_current_usage_evicts_all_but_the_newest_chunk() {
        // high = 1 %: any real filesystem is above it, so every insert triggers eviction
        // down to "low" = 0 %, which the cache can never reach: it keeps only the chunk just
        // stored.
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), 1 << 20, 0);
        o.high_watermark_pct = Some(1);
        o.low_watermark_pct = Some(0);
        let cache = ChunkCache::open(o).unwrap();
        let a = Bytes::from(vec![1u8; 100]);
        let b = Bytes::from(vec![2u8; 100]);
        cache.insert(&digest_of(&a), a.clone()).unwrap();
        cache.insert(&digest_of(&b), b.clone()).unwrap();
        assert_eq!(cache.stats().disk_entries, 1);
        assert!(cache.contains(&digest_of(&b)));
        assert!(!cache.contains(&digest_of(&a)));
        assert_eq!(cache.stats().evictions, 1);
    }
}
