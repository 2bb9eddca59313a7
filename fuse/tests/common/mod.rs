//! Shared helpers for the FUSE integration tests: root / device checks that fail loudly, an
//! in-memory content source that answers some reads later from another thread, and a mounted
//! test filesystem that always unmounts (its handle drops before its temp dir).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lazysnap_fuse::{mount, ContentId, ContentSource, Index, MountHandle, MountOptions, ReadDone};

/// Panics (never skips) unless the test can really mount FUSE.
pub fn require_fuse_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these FUSE tests must run as root (mount(2) of /dev/fuse needs CAP_SYS_ADMIN)"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (modprobe fuse)"
    );
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Contents in memory. Reads whose 4 KiB block number is odd are answered from another thread
/// after a short sleep (as a network fetch would); ids in `failing` answer EIO.
#[derive(Default)]
pub struct MemorySource {
    pub contents: HashMap<ContentId, Bytes>,
    pub failing: HashSet<ContentId>,
    pub reads: AtomicU64,
    pub delayed_reads: AtomicU64,
    /// A local file per content id, offered for passthrough.
    pub local_files: HashMap<ContentId, PathBuf>,
}

impl MemorySource {
    pub fn insert(&mut self, id: ContentId, data: impl Into<Bytes>) {
        self.contents.insert(id, data.into());
    }
}

impl ContentSource for MemorySource {
    fn read(&self, content: ContentId, offset: u64, size: u32, done: ReadDone) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if self.failing.contains(&content) {
            done(Err(libc::EIO));
            return;
        }
        let Some(data) = self.contents.get(&content) else {
            done(Err(libc::EIO));
            return;
        };
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        let slice = data.slice(start..end);
        if (offset / 4096) % 2 == 1 {
            self.delayed_reads.fetch_add(1, Ordering::Relaxed);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2));
                done(Ok(slice));
            });
        } else {
            done(Ok(slice));
        }
    }

    fn local_file(&self, content: ContentId) -> Option<std::fs::File> {
        std::fs::File::open(self.local_files.get(&content)?).ok()
    }
}

/// A mounted index in a temp dir; unmounts on drop (the handle drops before the dir).
pub struct TestMount {
    pub handle: MountHandle,
    pub dir: tempfile::TempDir,
}

impl TestMount {
    pub fn new(index: Index, source: Arc<dyn ContentSource>, opts: &MountOptions) -> TestMount {
        require_fuse_root();
        let dir = tempfile::tempdir().expect("temp dir for the mountpoint");
        let handle = mount(index, source, dir.path(), opts).expect("mount the test filesystem");
        TestMount { handle, dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.dir.path().to_path_buf()
        } else {
            self.dir.path().join(rel)
        }
    }
}

/// Default options for tests: passthrough off unless a test turns it on.
pub fn test_options() -> MountOptions {
    MountOptions {
        passthrough: false,
        ..MountOptions::default()
    }
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// lgetxattr; None when the attribute does not exist.
pub fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = cpath(path);
    let n = CString::new(name).expect("xattr name");
    // SAFETY: valid C strings; a null buffer with size 0 asks for the size.
    let size = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        let err = std::io::Error::last_os_error();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENODATA),
            "getxattr {name} on {}: {err}",
            path.display()
        );
        return None;
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buf has `size` bytes.
    let got =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        got >= 0,
        "getxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(got as usize);
    Some(buf)
}

/// llistxattr, names in the order returned.
pub fn list_xattrs(path: &Path) -> Vec<String> {
    let p = cpath(path);
    // SAFETY: null buffer with size 0 asks for the size.
    let size = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(
        size >= 0,
        "listxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buf has `size` bytes.
    let got = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(
        got >= 0,
        "listxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(got as usize);
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Whether `path` is a mount point listed in /proc/self/mounts.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    let want = path.to_string_lossy().to_string();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
}

/// Node attributes: mode, owner, group, mtime.
pub fn attr(mode: u32, uid: u32, gid: u32, mtime: i64) -> lazysnap_fuse::NodeAttr {
    lazysnap_fuse::NodeAttr::new(mode, uid, gid, mtime)
}

/// A node of `kind` with `attr` and no xattrs.
pub fn node(
    kind: lazysnap_fuse::NodeKind,
    attr: lazysnap_fuse::NodeAttr,
) -> lazysnap_fuse::NewNode {
    lazysnap_fuse::NewNode {
        kind,
        attr,
        xattrs: vec![],
    }
}
