//! Open-file table: counts the open handles of each inode by mode (cached through the daemon, or
//! FUSE passthrough with a shared backing id). The kernel refuses to mix both modes on one inode,
//! so an inode keeps the mode of its first open until all its handles are released; the backing
//! id is closed when the last passthrough handle goes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use fuser::BackingId;

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

#[derive(Debug, Default)]
struct InodeOpens {
    cached: u64,
    passthrough: u64,
    backing: Option<Arc<BackingId>>,
}

/// Inode number -> its open handles. Only inodes with open handles are present.
#[derive(Debug, Default)]
pub(crate) struct OpenTable {
    inner: Mutex<HashMap<u64, InodeOpens>>,
}

impl OpenTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, InodeOpens>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The backing id of `ino` if it is open in passthrough mode (counts one more handle).
    pub(crate) fn reuse_passthrough(&self, ino: u64) -> Option<Arc<BackingId>> {
        let mut table = self.lock();
        let opens = table.get_mut(&ino)?;
        let backing = opens.backing.clone()?;
        opens.passthrough += 1;
        Some(backing)
    }

    pub(crate) fn has_cached_opens(&self, ino: u64) -> bool {
        self.lock().get(&ino).is_some_and(|o| o.cached > 0)
    }

    /// Records a passthrough open with a fresh backing id. Returns the id to reply with (an
    /// existing one if another open won the race), or None if the inode is open cached.
    pub(crate) fn open_passthrough(
        &self,
        ino: u64,
        backing: Arc<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut table = self.lock();
        let opens = table.entry(ino).or_default();
        if opens.cached > 0 {
            return None;
        }
        let backing = opens.backing.get_or_insert(backing).clone();
        opens.passthrough += 1;
        Some(backing)
    }

    /// Records a cached open, unless the inode is (by now) open in passthrough mode: then that
    /// handle joins it and the backing id to reply with is returned.
    pub(crate) fn open_cached(&self, ino: u64) -> Option<Arc<BackingId>> {
        let mut table = self.lock();
        let opens = table.entry(ino).or_default();
        if let Some(backing) = &opens.backing {
            opens.passthrough += 1;
            return Some(Arc::clone(backing));
        }
        opens.cached += 1;
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
        }
    }
}
