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

/// Prefix of a whiteout entry's name, and the name of the opaque-directory marker (OCI).
pub(super) const WHITEOUT_PREFIX: &str = ".wh.";
pub(super) const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Unpacks the uncompressed tar `input` into `dest` (which must not exist yet). The opaque
/// marker becomes `opaque_xattr` (`trusted.overlay.opaque` or `user.overlay.opaque`) = `y`.
pub fn unpack_layer(input: impl Read, dest: &Path, opaque_xattr: &str) -> Result<(), UnpackError> {
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
    // Entries added to a directory after it was unpacked change its mtime: restore them last.
    let mut dir_mtimes: Vec<(PathBuf, i64)> = Vec::new();
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
        if relative.parent() == Some(Path::new("")) && is_estargz_metadata(&file_name) {
            // The TOC and landmark of an eStargz layer: a lazy mount hides them, so does this.
            continue;
        }
        if file_name == OPAQUE_MARKER {
            let dir = root.join(relative.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&dir).map_err(entry_error(&name))?;
            set_xattr(&dir, opaque_xattr, b"y").map_err(entry_error(&name))?;
            continue;
        }
        let header = entry.header().clone();
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            let dir = root.join(relative.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&dir).map_err(entry_error(&name))?;
            let path = dir.join(hidden);
            make_node(&path, nix::sys::stat::SFlag::S_IFCHR, 0, 0).map_err(entry_error(&name))?;
            apply_metadata(&path, &header).map_err(entry_error(&name))?;
            continue;
        }
        let node_kind = match header.entry_type() {
            tar::EntryType::Fifo => Some(nix::sys::stat::SFlag::S_IFIFO),
            tar::EntryType::Char => Some(nix::sys::stat::SFlag::S_IFCHR),
            tar::EntryType::Block => Some(nix::sys::stat::SFlag::S_IFBLK),
            _ => None,
        };
        if let Some(kind) = node_kind {
            let path = root.join(&relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(entry_error(&name))?;
            }
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            make_node(&path, kind, major, minor).map_err(entry_error(&name))?;
            apply_metadata(&path, &header).map_err(entry_error(&name))?;
            continue;
        }
        let is_dir = header.entry_type().is_dir();
        let dir_xattrs = if is_dir {
            pax_xattrs(&mut entry)
        } else {
            Vec::new()
        };
        entry.unpack_in(root).map_err(entry_error(&name))?;
        if is_dir {
            let path = root.join(&relative);
            for (key, value) in &dir_xattrs {
                set_xattr(&path, key, value).map_err(entry_error(&name))?;
            }
            let mtime = header.mtime().map_err(entry_error(&name))?;
            dir_mtimes.push((path, i64::try_from(mtime).unwrap_or(i64::MAX)));
        }
    }
    for (dir, mtime) in dir_mtimes.iter().rev() {
        let time = nix::sys::time::TimeSpec::new(*mtime, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            dir,
            &time,
            &time,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| UnpackError::Entry {
            entry: dir.display().to_string(),
            source: e.into(),
        })?;
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

/// Creates a device node or fifo at `path`, replacing whatever is there.
fn make_node(
    path: &Path,
    kind: nix::sys::stat::SFlag,
    major: u32,
    minor: u32,
) -> std::io::Result<()> {
    if let Ok(existing) = path.symlink_metadata() {
        if existing.is_dir() {
            std::fs::remove_dir_all(path)?;
        } else {
            std::fs::remove_file(path)?;
        }
    }
    nix::sys::stat::mknod(
        path,
        kind,
        nix::sys::stat::Mode::empty(),
        nix::sys::stat::makedev(u64::from(major), u64::from(minor)),
    )
    .map_err(std::io::Error::from)
}

/// Gives a node created by hand the owner, permissions and mtime of its tar header.
fn apply_metadata(path: &Path, header: &tar::Header) -> std::io::Result<()> {
    let uid = header.uid().unwrap_or(0);
    let gid = header.gid().unwrap_or(0);
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(nix::unistd::Uid::from_raw(u32::try_from(uid).unwrap_or(0))),
        Some(nix::unistd::Gid::from_raw(u32::try_from(gid).unwrap_or(0))),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    let mode = header.mode().unwrap_or(0o644) & 0o7777;
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        path,
        nix::sys::stat::Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )?;
    let mtime = i64::try_from(header.mtime().unwrap_or(0)).unwrap_or(0);
    let time = nix::sys::time::TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &time,
        &time,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// The `SCHILY.xattr.*` PAX records of an entry (the tar crate applies them to files only).
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<(String, Vec<u8>)> {
    let Ok(Some(extensions)) = entry.pax_extensions() else {
        return Vec::new();
    };
    extensions
        .flatten()
        .filter_map(|ext| {
            let key = ext.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_string();
            Some((key, ext.value_bytes().to_vec()))
        })
        .collect()
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

/// Whether a root entry named `name` is eStargz metadata rather than a file of the image.
fn is_estargz_metadata(name: &str) -> bool {
    [
        crate::estargz::TOC_TAR_NAME,
        crate::estargz::PREFETCH_LANDMARK,
        crate::estargz::NO_PREFETCH_LANDMARK,
    ]
    .contains(&name)
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
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_700_000_000);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn the_toc_and_landmarks_of_an_estargz_layer_are_not_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        let tar = tar_with(&[
            (".prefetch.landmark", b"\x0c"),
            ("app/stargz.index.json", b"an ordinary file"),
            ("app/run", b"x"),
            ("stargz.index.json", b"{}"),
        ]);
        unpack_layer(&tar[..], &dest, "user.overlay.opaque").unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["app"]);
        assert!(
            dest.join("app/stargz.index.json").is_file(),
            "only the root ones are metadata"
        );
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
