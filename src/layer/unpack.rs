//! Fallback for layers that are not lazily pullable: unpack a layer tar stream into a directory
//! in overlayfs lower-dir form (whiteouts as char 0/0 devices, opaque dirs as an xattr), into a
//! temp dir renamed into place so a crash never leaves a half layer behind.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer tar entry {entry:?}: {source}")]
    Entry {
        entry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("layer tar entry {entry:?}: unsafe path (absolute or with '..')")]
    UnsafePath { entry: String },
    #[error("reading the layer tar: {0}")]
    Read(#[source] std::io::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Unpacks the uncompressed tar `input` into `dest` (which must not exist yet). The opaque
/// marker becomes `opaque_xattr` (`trusted.overlay.opaque` or `user.overlay.opaque`) = `y`.
pub fn unpack_layer(
    input: impl Read,
    dest: &Path,
    opaque_xattr: &str,
) -> Result<(), UnpackError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    let staging = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(parent)
        .map_err(io(format!("creating a temp dir in {}", parent.display())))?;
    let root = staging.path();
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let raw_path = entry.path().map_err(UnpackError::Read)?.into_owned();
        let name = raw_path.to_string_lossy().into_owned();
        let relative = safe_relative(&raw_path).ok_or(UnpackError::UnsafePath {
            entry: name.clone(),
        })?;
        let file_name = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if file_name == OPAQUE_MARKER {
            let dir = root.join(relative.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&dir).map_err(entry_error(&name))?;
            set_xattr(&dir, opaque_xattr, b"y").map_err(entry_error(&name))?;
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            let dir = root.join(relative.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&dir).map_err(entry_error(&name))?;
            make_whiteout(&dir.join(hidden)).map_err(entry_error(&name))?;
            continue;
        }
        entry.unpack_in(root).map_err(entry_error(&name))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, dest).map_err(io(format!(
        "moving {} to {}",
        staged.display(),
        dest.display()
    )))?;
    Ok(())
}

/// The path without a leading `/` or `./`; `None` when it would leave the root.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn make_whiteout(path: &Path) -> std::io::Result<()> {
    if path.symlink_metadata().is_ok() {
        if path.is_dir() {
            std::fs::remove_dir_all(path)?;
        } else {
            std::fs::remove_file(path)?;
        }
    }
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        nix::sys::stat::makedev(0, 0),
    )
    .map_err(std::io::Error::from)
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let c_name =
        CString::new(name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: both strings are NUL-terminated and live across the call; value is a valid slice.
    let rc = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn entry_error(entry: &str) -> impl FnOnce(std::io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Entry {
        entry: entry.to_string(),
        source,
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> UnpackError {
    move |source| UnpackError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn tar_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn converts_whiteouts_and_opaque_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        let tar = tar_with(&[
            ("a/kept.txt", b"kept"),
            ("a/.wh.gone", b""),
            ("b/.wh..wh..opq", b""),
            ("b/inside", b"x"),
        ]);
        unpack_layer(&tar[..], &dest, "user.overlay.opaque").unwrap();
        assert_eq!(std::fs::read(dest.join("a/kept.txt")).unwrap(), b"kept");
        let whiteout = std::fs::symlink_metadata(dest.join("a/gone")).unwrap();
        assert!(whiteout.file_type().is_char_device());
        let mut value = [0u8; 4];
        let c_path = CString::new(dest.join("b").as_os_str().as_bytes()).unwrap();
        let c_name = CString::new("user.overlay.opaque").unwrap();
        // SAFETY: valid NUL-terminated strings and buffer.
        let n = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert_eq!(n, 1);
        assert_eq!(value[0], b'y');
        assert!(!dest.join("b/.wh..wh..opq").exists());
    }
}
