//! What the layers below a layer show, as overlayfs stacks them: decides which of a layer's
//! whiteouts delete something. overlayfs passes the readdir of a directory that only one layer
//! provides straight through, whiteouts included (while lookup hides them), so a whiteout of a
//! path nothing below has would be listed, unstattable, in every container: such whiteouts are
//! left out of the layer instead (a layer's parents are fixed, so this holds for its lifetime).

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The overlayfs xattr marking an opaque directory, with the value that means opaque.
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque\0";

/// The directories of the layers below a layer, nearest first (overlayfs' lowerdir order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LowerLayers(Vec<PathBuf>);

impl LowerLayers {
    /// `dirs`, nearest first; empty for a base layer.
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self(dirs)
    }

    /// The directories, nearest first.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.0
    }

    /// No layer below.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the merged view of these layers has `path` (relative to the root): looked up
    /// component by component as overlayfs does (a whiteout or a non-directory hides what lies
    /// below it; an opaque directory hides the layers below it).
    pub fn has(&self, path: &str) -> bool {
        let components: Vec<&str> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let Some((last, parents)) = components.split_last() else {
            return !self.0.is_empty();
        };
        let mut stack: Vec<PathBuf> = self.0.clone();
        for component in parents {
            let mut next = Vec::new();
            for dir in &stack {
                let path = dir.join(component);
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if is_whiteout(&meta) {
                    break;
                }
                if !meta.is_dir() {
                    if next.is_empty() {
                        return false;
                    }
                    break;
                }
                let opaque = is_opaque(&path);
                next.push(path);
                if opaque {
                    break;
                }
            }
            if next.is_empty() {
                return false;
            }
            stack = next;
        }
        for dir in &stack {
            if let Ok(meta) = std::fs::symlink_metadata(dir.join(last)) {
                return !is_whiteout(&meta);
            }
        }
        false
    }
}

fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut value = [0u8; 4];
    // SAFETY: both names are NUL-terminated and `value` is writable for its length.
    let len = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            OPAQUE_XATTR.as_ptr().cast(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    len == 1 && value[0] == b'y'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whiteout(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, 0) };
        assert_eq!(
            rc,
            0,
            "mknod needs root: {}",
            std::io::Error::last_os_error()
        );
    }

    #[test]
    fn paths_are_looked_up_through_the_layers_as_overlayfs_does() {
        let root = tempfile::tempdir().unwrap();
        let (top, bottom) = (root.path().join("top"), root.path().join("bottom"));
        for dir in ["a/b", "gone", "opaque", "file-here"] {
            std::fs::create_dir_all(bottom.join(dir)).unwrap();
        }
        std::fs::write(bottom.join("a/b/c"), b"x").unwrap();
        std::fs::write(bottom.join("gone/f"), b"x").unwrap();
        std::fs::write(bottom.join("opaque/hidden"), b"x").unwrap();
        std::fs::write(bottom.join("file-here/f"), b"x").unwrap();
        std::fs::create_dir_all(top.join("opaque")).unwrap();
        std::fs::write(top.join("opaque/shown"), b"x").unwrap();
        std::fs::write(top.join("file-here"), b"a file over the directory").unwrap();
        whiteout(&top.join("gone"));
        let c = std::ffi::CString::new(top.join("opaque").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path, name and value.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                OPAQUE_XATTR.as_ptr().cast(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());

        let lower = LowerLayers::new(vec![top, bottom]);
        assert!(lower.has("a/b/c"));
        assert!(lower.has("./a/b"));
        assert!(!lower.has("a/missing"));
        assert!(!lower.has("gone"), "whited out in the top layer");
        assert!(!lower.has("gone/f"), "below a whiteout");
        assert!(lower.has("opaque/shown"));
        assert!(!lower.has("opaque/hidden"), "below an opaque directory");
        assert!(lower.has("file-here"));
        assert!(!lower.has("file-here/f"), "below a file");
        assert!(!LowerLayers::default().has("a"));
    }
}
