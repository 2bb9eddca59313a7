//! The chunk files under `chunks/` and `tmp/`: paths, temp files installed by rename, large
//! chunks written in place and served mapped, reads with first-use verification, the scan at
//! open.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::estargz::ChunkDigest;
use crate::metrics::{self, CacheTier};
use crate::sync::lock;

use super::index::{DiskEntry, SpaceReservation};
use super::{io_err, CacheError, ChunkCache};

/// A chunk too large to decode in memory, being written to a temp file of the cache by its
/// decoder: [`ChunkCache::begin_large`], then [`ChunkCache::finish_large`].
pub struct LargeChunkFile {
    pub(super) file: fs::File,
    pub(super) path: PathBuf,
    pub(super) space: SpaceReservation,
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

/// A chunk file mapped read-only, the owner of the [`Bytes`] a large chunk is served from: the
/// kernel pages it in from the file as reads touch it and may drop it again, so its size does
/// not count against the daemon's memory. Cache files are replaced by rename and removed by
/// unlink, never truncated, so the mapping stays valid after eviction.
pub(super) struct MappedChunk {
    pub(super) ptr: std::ptr::NonNull<libc::c_void>,
    pub(super) len: usize,
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

/// Lists `(digest, size, mtime)` of the chunk files; removes files whose names are not digests.
pub(super) fn scan_chunks(
    chunks_dir: &Path,
) -> Result<Vec<(ChunkDigest, u64, SystemTime)>, CacheError> {
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
/// Extended attribute of a chunk file whose key names the chunk rather than hashes its bytes (a
/// gzip span): the sha256 of its bytes, which a file found at open is checked against instead.
const CONTENT_DIGEST_XATTR: &str = "user.lazysnap.sha256";

/// Records on the temp file of a named chunk the digest of its bytes. Best effort: without it
/// (a filesystem without user xattrs) the chunk is fetched again after a restart.
pub(super) fn record_content_digest(tmp: &Path, content: &ChunkDigest) {
    if let Err(e) = xattr::set(tmp, CONTENT_DIGEST_XATTR, content.as_bytes()) {
        tracing::debug!(path = %tmp.display(), error = %e, "cannot record a named chunk's digest; it is fetched again after a restart");
    }
}

/// Whether `file`, found on disk for `key`, holds the chunk: its bytes (hashing to `actual`)
/// hash to the key, or to the digest recorded on a named chunk's file.
pub(super) fn holds_chunk(file: &File, key: &ChunkDigest, actual: &ChunkDigest) -> bool {
    use xattr::FileExt as _;
    actual == key
        || file
            .get_xattr(CONTENT_DIGEST_XATTR)
            .ok()
            .flatten()
            .is_some_and(|recorded| recorded.as_slice() == actual.as_bytes())
}

pub(super) fn digest_of_file(file: &File) -> io::Result<ChunkDigest> {
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
pub(super) fn read_exact_range(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
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

impl ChunkCache {
    pub(super) fn chunk_path(&self, key: &ChunkDigest) -> PathBuf {
        let hex = key.hex();
        self.chunks_dir.join(&hex[..2]).join(hex)
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
    pub(super) fn install(
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
                touched: self.now_secs().max(1),
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

    /// Reads a whole chunk file, checking its size and (for entries found at open) its digest.
    pub(super) fn load_from_disk(&self, key: &ChunkDigest) -> Option<Bytes> {
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
            if !holds_chunk(&file, key, &ChunkDigest::of(&data)) {
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

    /// A fresh name under `tmp/` for a file being written.
    pub(super) fn temp_path(&self) -> PathBuf {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir
            .join(format!("{}-{seq}.part", std::process::id()))
    }

    pub(super) fn write_temp(&self, data: &[u8]) -> Result<PathBuf, CacheError> {
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
}
