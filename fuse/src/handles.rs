//! Open-file table: counts the open handles of each inode by mode (cached through the daemon, or
//! FUSE passthrough with a shared backing id). The kernel refuses to mix both modes on one inode,
//! so an inode keeps the mode of its first open until all its handles are released; the backing
//! id is closed when the last passthrough handle goes. The table can be mirrored into a file
//! ([`OpenRecord`]) so that a daemon resuming the FUSE connection after a restart knows which
//! inodes the kernel still holds open, in which mode, and with which backing id.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// How a handle was opened; it is the `fh` value the kernel hands back on release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum OpenMode {
    Cached = 0,
    Passthrough = 1,
}

impl OpenMode {
    pub(crate) fn from_handle(fh: u64) -> Self {
        if fh == OpenMode::Passthrough as u64 {
            OpenMode::Passthrough
        } else {
            OpenMode::Cached
        }
    }
}

/// A backing id registered on the FUSE connection; closed on the connection when dropped.
#[derive(Debug)]
pub(crate) struct Backing {
    id: u32,
    device: Arc<OwnedFd>,
}

nix::ioctl_write_ptr!(fuse_backing_close, 229, 2, u32);

impl Backing {
    /// Registers `file` as a passthrough backing file on the connection `device`.
    pub(crate) fn open(device: &Arc<OwnedFd>, file: &File) -> std::io::Result<Self> {
        let id = fuser::BackingId::create_raw(device.as_fd(), file.as_fd())?;
        Ok(Backing {
            id,
            device: Arc::clone(device),
        })
    }

    pub(crate) fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: the ioctl reads one u32 from a valid pointer.
        if let Err(err) = unsafe { fuse_backing_close(self.device.as_raw_fd(), &self.id) } {
            // ENODEV/ENOTCONN: the connection is gone and took its backing ids with it.
            tracing::debug!(id = self.id, error = %err, "closing a FUSE backing id failed");
        }
    }
}

#[derive(Debug, Default)]
struct InodeOpens {
    cached: u64,
    passthrough: u64,
    backing: Option<Arc<Backing>>,
}

impl InodeOpens {
    /// One record slot: cached count (16 bits), passthrough count (16 bits), backing id (32).
    fn slot(&self) -> u64 {
        let cached = self.cached.min(u64::from(u16::MAX));
        let passthrough = self.passthrough.min(u64::from(u16::MAX));
        let id = self.backing.as_ref().map_or(0, |b| u64::from(b.id));
        cached << 48 | passthrough << 32 | id
    }
}

/// The open-file table mirrored in a shared file mapping, one 64-bit slot per inode: it survives
/// the daemon (the page cache keeps it through `kill -9`) for the next one to read.
#[derive(Debug)]
pub(crate) struct OpenRecord {
    map: memmap2::MmapMut,
}

impl OpenRecord {
    /// Creates (or empties) the record of a fresh mount with `inodes` inodes at `path`.
    pub(crate) fn create(path: &Path, inodes: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Self::map(&file, inodes)
    }

    /// Opens the record a previous daemon kept for the same mount.
    pub(crate) fn open(path: &Path, inodes: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::map(&file, inodes)
    }

    fn map(file: &File, inodes: u64) -> std::io::Result<Self> {
        let len = (inodes + 1).saturating_mul(8).max(8);
        if file.metadata()?.len() != len {
            file.set_len(len)?;
        }
        // SAFETY: the file is private to this mount's daemon; it is only accessed through
        // the atomics below.
        let map = unsafe { memmap2::MmapMut::map_mut(file)? };
        Ok(OpenRecord { map })
    }

    fn slot(&self, ino: u64) -> Option<&AtomicU64> {
        let index = usize::try_from(ino).ok()?;
        let bytes = self.map.get(index * 8..index * 8 + 8)?;
        // SAFETY: the mapping is page aligned, so every 8-byte slot is aligned for AtomicU64,
        // and the bytes stay mapped as long as `self`.
        Some(unsafe { &*(bytes.as_ptr() as *const AtomicU64) })
    }

    fn store(&self, ino: u64, value: u64) {
        if let Some(slot) = self.slot(ino) {
            slot.store(value, Ordering::Relaxed);
        }
    }

    fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0..(self.map.len() / 8) as u64).filter_map(|ino| {
            let value = self.slot(ino)?.load(Ordering::Relaxed);
            (value != 0).then_some((ino, value))
        })
    }
}

/// Inode number -> its open handles. Only inodes with open handles are present.
#[derive(Debug)]
pub(crate) struct OpenTable {
    inner: Mutex<HashMap<u64, InodeOpens>>,
    record: Option<OpenRecord>,
}

impl OpenTable {
    /// A table mirrored into `record` (when given), starting from what the record holds: the
    /// opens a previous daemon left on the same connection, their backing ids now owned here.
    pub(crate) fn new(record: Option<OpenRecord>, device: Option<&Arc<OwnedFd>>) -> Self {
        let mut table = HashMap::new();
        if let Some(record) = &record {
            for (ino, value) in record.entries() {
                let id = (value & 0xffff_ffff) as u32;
                let opens = InodeOpens {
                    cached: value >> 48,
                    passthrough: (value >> 32) & 0xffff,
                    backing: match (id, device) {
                        (0, _) | (_, None) => None,
                        (id, Some(device)) => Some(Arc::new(Backing {
                            id,
                            device: Arc::clone(device),
                        })),
                    },
                };
                table.insert(ino, opens);
            }
        }
        OpenTable {
            inner: Mutex::new(table),
            record,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, InodeOpens>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn mirror(&self, ino: u64, opens: Option<&InodeOpens>) {
        if let Some(record) = &self.record {
            record.store(ino, opens.map_or(0, InodeOpens::slot));
        }
    }

    /// The backing id of `ino` if it is open in passthrough mode (counts one more handle).
    pub(crate) fn reuse_passthrough(&self, ino: u64) -> Option<Arc<Backing>> {
        let mut table = self.lock();
        let opens = table.get_mut(&ino)?;
        let backing = opens.backing.clone()?;
        opens.passthrough += 1;
        self.mirror(ino, Some(opens));
        Some(backing)
    }

    pub(crate) fn has_cached_opens(&self, ino: u64) -> bool {
        self.lock().get(&ino).is_some_and(|o| o.cached > 0)
    }

    /// Records a passthrough open with a fresh backing id. Returns the id to reply with (an
    /// existing one if another open won the race), or None if the inode is open cached.
    pub(crate) fn open_passthrough(&self, ino: u64, backing: Arc<Backing>) -> Option<Arc<Backing>> {
        let mut table = self.lock();
        let opens = table.entry(ino).or_default();
        if opens.cached > 0 {
            return None;
        }
        let backing = opens.backing.get_or_insert(backing).clone();
        opens.passthrough += 1;
        self.mirror(ino, Some(opens));
        Some(backing)
    }

    /// Records a cached open, unless the inode is (by now) open in passthrough mode: then that
    /// handle joins it and the backing id to reply with is returned.
    pub(crate) fn open_cached(&self, ino: u64) -> Option<Arc<Backing>> {
        let mut table = self.lock();
        let opens = table.entry(ino).or_default();
        if let Some(backing) = &opens.backing {
            let backing = Arc::clone(backing);
            opens.passthrough += 1;
            self.mirror(ino, Some(opens));
            return Some(backing);
        }
        opens.cached += 1;
        self.mirror(ino, Some(opens));
        None
    }

    pub(crate) fn release(&self, ino: u64, mode: OpenMode) {
        let mut table = self.lock();
        let Some(opens) = table.get_mut(&ino) else {
            return;
        };
        match mode {
            OpenMode::Cached => opens.cached = opens.cached.saturating_sub(1),
            OpenMode::Passthrough => {
                opens.passthrough = opens.passthrough.saturating_sub(1);
                if opens.passthrough == 0 {
                    opens.backing = None;
                }
            }
        }
        if opens.cached == 0 && opens.passthrough == 0 {
            table.remove(&ino);
            self.mirror(ino, None);
        } else {
            self.mirror(ino, Some(opens));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_brings_back_the_open_counts_of_each_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opens");
        {
            let table = OpenTable::new(Some(OpenRecord::create(&path, 10).unwrap()), None);
            table.open_cached(3);
            table.open_cached(3);
            table.open_cached(7);
            table.release(7, OpenMode::Cached);
        }
        let table = OpenTable::new(Some(OpenRecord::open(&path, 10).unwrap()), None);
        assert!(table.has_cached_opens(3));
        assert!(!table.has_cached_opens(7));
        table.release(3, OpenMode::Cached);
        table.release(3, OpenMode::Cached);
        assert!(!table.has_cached_opens(3));
        let again = OpenTable::new(Some(OpenRecord::open(&path, 10).unwrap()), None);
        assert!(!again.has_cached_opens(3));
    }

    #[test]
    fn inode_numbers_beyond_the_record_are_kept_in_memory_only() {
        let dir = tempfile::tempdir().unwrap();
        let table = OpenTable::new(
            Some(OpenRecord::create(&dir.path().join("opens"), 2).unwrap()),
            None,
        );
        table.open_cached(99);
        assert!(table.has_cached_opens(99));
    }
}
