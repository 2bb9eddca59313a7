//! Mount table queries: whether a path is a mountpoint, and detaching a stale one.

use std::path::Path;

/// Lazily detaches whatever is mounted at `path` (a FUSE mount left by a previous process).
pub fn detach_stale_mount(path: &Path) {
    if let Err(e) = lazysnap_fuse::detach_stale_mount(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot detach stale mount");
    }
}

/// True when `path` is listed as a mountpoint in /proc/self/mountinfo.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount| unescape_mountinfo(mount) == wanted)
}

pub(super) fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}
