//! Whole files assembled from cached chunks, the backing files of FUSE passthrough.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;

use sha2::{Digest as _, Sha256};

use crate::estargz::ChunkDigest;
use crate::sync::lock;

use super::{CacheError, ChunkCache};

impl ChunkCache {
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
}
