//! Filesystem helpers of the snapshot service: quiet removal, disk usage.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::SnapshotError;

pub(super) fn remove_dir_quietly(dir: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapshotError::io(format!("deleting {}", dir.display()))(e)),
    }
}

/// Bytes (allocated blocks × 512) and inodes under `root`, hard links counted once, without
/// crossing into other filesystems.
pub(super) fn disk_usage(root: &Path) -> Result<(u64, u64), SnapshotError> {
    let root_meta = std::fs::symlink_metadata(root)
        .map_err(SnapshotError::io(format!("measuring {}", root.display())))?;
    let device = root_meta.dev();
    let mut seen = HashSet::new();
    let mut size = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != device || !seen.insert(meta.ino()) {
            continue;
        }
        inodes = inodes.saturating_add(1);
        size = size.saturating_add(meta.blocks().saturating_mul(512));
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    Ok((size, inodes))
}
