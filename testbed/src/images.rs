//! Test layers and tree comparisons: tar layers with every entry type lazysnap must carry
//! through, a workload layer for recording, and listings of extracted trees. Re-exports the
//! image builders of lazysnap's rig ([`lazysnap::rig::images`]).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tar::{EntryType, Header};

pub use lazysnap::rig::images::*;
use lazysnap::rig::RigError;

/// Size of the generated multi-chunk file `data/big.bin` (more than two default 4 MiB chunks).
pub const BIG_FILE_SIZE: usize = 9 * 1024 * 1024 + 123;

fn tar_err(context: &str) -> impl FnOnce(std::io::Error) -> RigError + '_ {
    move |source| RigError::Io {
        context: format!("building the test layer: {context}"),
        source,
    }
}

/// Tar writer with the header details the test layers need.
struct LayerTar {
    builder: tar::Builder<Vec<u8>>,
}

struct Meta<'a> {
    mode: u32,
    uid: u64,
    gid: u64,
    user: &'a str,
    group: &'a str,
}

const ROOT: Meta<'static> = Meta {
    mode: 0o755,
    uid: 0,
    gid: 0,
    user: "root",
    group: "root",
};

impl LayerTar {
    fn new() -> Self {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Complete);
        Self { builder }
    }

    fn header(kind: EntryType, meta: &Meta<'_>, size: u64) -> Result<Header, RigError> {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(meta.mode);
        h.set_uid(meta.uid);
        h.set_gid(meta.gid);
        h.set_username(meta.user).map_err(tar_err("user name"))?;
        h.set_groupname(meta.group).map_err(tar_err("group name"))?;
        h.set_mtime(TEST_MTIME);
        h.set_size(size);
        Ok(h)
    }

    /// A PAX extended header (`x`) applying `records` to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> Result<(), RigError> {
        let mut data = Vec::new();
        for (key, value) in records {
            let body_len = key.len() + value.len() + 3; // ' ', '=', '\n'
            let mut len = body_len + 1;
            while len.to_string().len() + body_len != len {
                len = len.to_string().len() + body_len;
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut h = Self::header(EntryType::XHeader, &ROOT, data.len() as u64)?;
        h.set_mode(0o644);
        h.set_path("PaxHeaders/entry")
            .map_err(tar_err("pax header"))?;
        h.set_cksum();
        self.builder
            .append(&h, data.as_slice())
            .map_err(tar_err("pax header"))
    }

    fn dir(&mut self, path: &str, meta: &Meta<'_>) -> Result<(), RigError> {
        let mut h = Self::header(EntryType::Directory, meta, 0)?;
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .map_err(tar_err(path))
    }

    fn file(&mut self, path: &str, meta: &Meta<'_>, data: &[u8]) -> Result<(), RigError> {
        let mut h = Self::header(EntryType::Regular, meta, data.len() as u64)?;
        self.builder
            .append_data(&mut h, path, data)
            .map_err(tar_err(path))
    }

    fn link(
        &mut self,
        kind: EntryType,
        path: &str,
        target: &str,
        meta: &Meta<'_>,
    ) -> Result<(), RigError> {
        let mut h = Self::header(kind, meta, 0)?;
        self.builder
            .append_link(&mut h, path, target)
            .map_err(tar_err(path))
    }

    fn special(
        &mut self,
        kind: EntryType,
        path: &str,
        meta: &Meta<'_>,
        major: u32,
        minor: u32,
    ) -> Result<(), RigError> {
        let mut h = Self::header(kind, meta, 0)?;
        h.set_device_major(major).map_err(tar_err(path))?;
        h.set_device_minor(minor).map_err(tar_err(path))?;
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .map_err(tar_err(path))
    }

    fn finish(self) -> Result<Vec<u8>, RigError> {
        self.builder.into_inner().map_err(tar_err("end of archive"))
    }
}

/// Path of the long (> 100 bytes) name in [`every_entry_type_layer`] (written with a GNU long
/// name header).
pub const LONG_NAME: &str = "deep/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/long-file-name-over-one-hundred-bytes.txt";
/// A UTF-8 name longer than 100 bytes, written with a PAX `path` record.
pub const PAX_UTF8_NAME: &str = "ünïcødé/文件-名前-ファイル-файл-αρχείο-with-a-long-tail-to-pass-the-ustar-limit-of-one-hundred-bytes.txt";

/// Deterministic incompressible bytes (xorshift): compressed, a chunk of them is as large as its
/// data, so byte counts of fetches equal the data's.
pub fn incompressible_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 29) as u8
        })
        .collect()
}

/// An uncompressed tar layer holding every entry type lazysnap must carry through: dirs; regular
/// files from empty to multi-chunk ([`BIG_FILE_SIZE`]); relative and absolute symlinks; a
/// hardlink; whiteouts `.wh.*` and an opaque `.wh..wh..opq`; PAX xattrs; a fifo; a char device;
/// setuid / setgid / sticky modes; owners with names; long and UTF-8 names.
pub fn every_entry_type_layer() -> Result<Vec<u8>, RigError> {
    let mut t = LayerTar::new();
    let user = Meta {
        mode: 0o644,
        uid: 1000,
        gid: 1001,
        user: "alice",
        group: "staff",
    };
    t.dir("data", &ROOT)?;
    t.file("data/empty", &ROOT.with_mode(0o644), b"")?;
    t.file("data/small.txt", &user, b"hello, lazy world\n")?;
    t.file(
        "data/medium.bin",
        &ROOT.with_mode(0o600),
        &pseudo_random_bytes(300 * 1024 + 7, 1),
    )?;
    t.file(
        "data/big.bin",
        &ROOT.with_mode(0o644),
        &pseudo_random_bytes(BIG_FILE_SIZE, 2),
    )?;
    t.file("data/exactly-4096", &ROOT.with_mode(0o644), &[b'x'; 4096])?;
    t.link(
        EntryType::Symlink,
        "data/link-rel",
        "small.txt",
        &ROOT.with_mode(0o777),
    )?;
    t.link(
        EntryType::Symlink,
        "data/link-abs",
        "/etc/motd",
        &ROOT.with_mode(0o777),
    )?;
    t.link(
        EntryType::Symlink,
        "data/link-dangling",
        "../nowhere/at/all",
        &ROOT.with_mode(0o777),
    )?;
    t.link(
        EntryType::Link,
        "data/hardlink-to-small",
        "data/small.txt",
        &user,
    )?;
    t.file(
        "data/setuid",
        &ROOT.with_mode(0o4755),
        b"#!/bin/sh\necho setuid\n",
    )?;
    t.file(
        "data/setgid",
        &ROOT.with_mode(0o2755),
        b"#!/bin/sh\necho setgid\n",
    )?;
    t.dir("data/sticky", &ROOT.with_mode(0o1777))?;
    t.dir("data/private", &user.with_mode(0o700))?;
    t.file("data/private/secret", &user.with_mode(0o400), b"s3cr3t")?;
    t.pax(&[
        ("SCHILY.xattr.user.comment", b"a comment"),
        ("SCHILY.xattr.user.binary", &[0, 1, 2, 255]),
    ])?;
    t.file("data/with-xattrs", &ROOT.with_mode(0o644), b"xattrs here\n")?;
    t.pax(&[("SCHILY.xattr.user.dir", b"on a dir")])?;
    t.dir("data/xattr-dir", &ROOT)?;
    t.special(EntryType::Fifo, "data/fifo", &ROOT.with_mode(0o644), 0, 0)?;
    t.special(
        EntryType::Char,
        "data/null-dev",
        &ROOT.with_mode(0o666),
        1,
        3,
    )?;
    t.dir("whiteouts", &ROOT)?;
    t.file("whiteouts/.wh.deleted-file", &ROOT.with_mode(0o644), b"")?;
    t.dir("whiteouts/opaque", &ROOT)?;
    t.file("whiteouts/opaque/.wh..wh..opq", &ROOT.with_mode(0o644), b"")?;
    t.file("whiteouts/opaque/kept", &ROOT.with_mode(0o644), b"kept\n")?;
    t.dir("deep", &ROOT)?;
    t.file(LONG_NAME, &ROOT.with_mode(0o644), b"long name\n")?;
    t.link(
        EntryType::Symlink,
        "deep/long-target-link",
        LONG_NAME,
        &ROOT.with_mode(0o777),
    )?;
    t.dir("ünïcødé", &ROOT)?;
    t.file(
        "ünïcødé/ファイル.txt",
        &ROOT.with_mode(0o644),
        "こんにちは\n".as_bytes(),
    )?;
    t.pax(&[("path", PAX_UTF8_NAME.as_bytes())])?;
    t.file("pax-short-name", &ROOT.with_mode(0o644), b"pax path\n")?;
    t.dir("many", &ROOT)?;
    for i in 0..64 {
        t.file(
            &format!("many/f{i:03}"),
            &ROOT.with_mode(0o644),
            &pseudo_random_bytes(i * 97, i as u64 + 10),
        )?;
    }
    t.finish()
}

impl Meta<'_> {
    fn with_mode(&self, mode: u32) -> Self {
        Meta { mode, ..*self }
    }
}

/// Size of `app/big.bin` in [`workload_layer`].
pub const WORKLOAD_BIG_FILE_SIZE: usize = 8 << 20;

/// The script [`workload_layer`] runs as its Cmd (over [`busybox_layer`]): it reads `app/b.txt`,
/// `app/a.txt`, the first 4 KiB of `app/big.bin` and 8 KiB at 6 MiB into it, in that order.
pub const WORKLOAD_SCRIPT: &str = "#!/bin/sh\ncat /app/b.txt\ncat /app/a.txt\nhead -c 4096 /app/big.bin | wc -c\ndd if=/app/big.bin bs=4096 skip=1536 count=2 status=none | wc -c\necho workload-done\n";

/// What [`WORKLOAD_SCRIPT`] prints.
pub const WORKLOAD_OUTPUT: &str = "bee\nay\n4096\n8192\nworkload-done\n";

/// A layer for recording a workload (stacked on [`busybox_layer`]): `/app/run.sh`
/// ([`WORKLOAD_SCRIPT`]), the files it reads, files it never touches (`app/c.txt`,
/// `app/unused.bin`), and `/bin/dd`.
pub fn workload_layer() -> Result<Vec<u8>, RigError> {
    let mut t = LayerTar::new();
    t.dir("bin", &ROOT)?;
    t.link(
        EntryType::Symlink,
        "bin/dd",
        "busybox",
        &ROOT.with_mode(0o777),
    )?;
    t.dir("app", &ROOT)?;
    t.file("app/c.txt", &ROOT.with_mode(0o644), b"sea\n")?;
    t.file(
        "app/unused.bin",
        &ROOT.with_mode(0o644),
        &pseudo_random_bytes(1 << 20, 11),
    )?;
    t.file("app/a.txt", &ROOT.with_mode(0o644), b"ay\n")?;
    t.file(
        "app/big.bin",
        &ROOT.with_mode(0o644),
        &pseudo_random_bytes(WORKLOAD_BIG_FILE_SIZE, 12),
    )?;
    t.file("app/b.txt", &ROOT.with_mode(0o644), b"bee\n")?;
    t.file(
        "app/run.sh",
        &ROOT.with_mode(0o755),
        WORKLOAD_SCRIPT.as_bytes(),
    )?;
    t.finish()
}

/// A layer whose files no workload reads: `data/notes.txt`.
pub fn unread_layer() -> Result<Vec<u8>, RigError> {
    let mut t = LayerTar::new();
    t.dir("data", &ROOT)?;
    t.file(
        "data/notes.txt",
        &ROOT.with_mode(0o644),
        b"nobody reads this\n",
    )?;
    t.finish()
}

/// [`tree_listing`] without the entries an eStargz layer adds (`stargz.index.json` and the
/// prefetch landmarks), for comparing a converted layer with its source.
pub fn tree_listing_without_estargz_entries(root: &Path) -> Result<Vec<String>, RigError> {
    Ok(tree_listing(root)?
        .into_iter()
        .filter(|l| {
            ![
                "stargz.index.json ",
                ".prefetch.landmark ",
                ".no.prefetch.landmark ",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .collect())
}

/// Extracts a layer blob (tar, tar.gz or tar.zst) with GNU tar into `dest`, keeping owners,
/// modes, xattrs and device nodes (needs root for the latter two).
pub fn extract_with_gnu_tar(blob: &Path, dest: &Path) -> Result<(), RigError> {
    fs::create_dir_all(dest).map_err(RigError::io(format!("creating {}", dest.display())))?;
    let output = Command::new("tar")
        .args([
            "--numeric-owner",
            "--same-owner",
            "-p",
            "--xattrs",
            "--xattrs-include=*",
        ])
        .arg("-C")
        .arg(dest)
        .arg("-xf")
        .arg(blob)
        .output()
        .map_err(RigError::io("running GNU tar"))?;
    if !output.status.success() {
        return Err(RigError::Start {
            what: format!("tar -xf {}", blob.display()),
            detail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

/// One line per entry of the tree under `root`, sorted by path: type, mode, owner, size, mtime
/// (not for directories, see below),
/// sha256 of the content, link target, device numbers, xattrs, and the hardlink group (first path
/// sharing the inode). Two trees are equal when their listings are.
pub fn tree_listing(root: &Path) -> Result<Vec<String>, RigError> {
    let mut paths = Vec::new();
    collect(root, root, &mut paths)?;
    paths.sort();
    let mut first_path_of_inode: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut lines = Vec::new();
    for rel in paths {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)
            .map_err(RigError::io(format!("stat {}", path.display())))?;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else {
            "reg"
        };
        let mut line = format!(
            "{rel} {kind} mode={:o} uid={} gid={}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
        );
        // GNU tar restores a directory's mtime when it leaves the directory in member order, so
        // a directory's mtime after extraction depends on the order of the archive (and
        // prioritized files are moved out of order on purpose): only non-directories carry it.
        if !ft.is_dir() {
            line.push_str(&format!(" mtime={}", meta.mtime()));
        }
        if ft.is_file() {
            let data =
                fs::read(&path).map_err(RigError::io(format!("reading {}", path.display())))?;
            line.push_str(&format!(
                " size={} {}",
                data.len(),
                lazysnap::digest::sha256_digest(&data)
            ));
            if meta.nlink() > 1 {
                let first = first_path_of_inode
                    .entry((meta.dev(), meta.ino()))
                    .or_insert_with(|| rel.clone());
                line.push_str(&format!(" linkgroup={first}"));
            }
        }
        if ft.is_symlink() {
            let target = fs::read_link(&path)
                .map_err(RigError::io(format!("readlink {}", path.display())))?;
            line.push_str(&format!(" -> {}", target.display()));
        }
        if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            line.push_str(&format!(" dev={},{}", libc::major(rdev), libc::minor(rdev)));
        }
        if !ft.is_symlink() {
            for (name, value) in xattrs(&path)? {
                line.push_str(&format!(" xattr:{name}={}", hex::encode(value)));
            }
        }
        lines.push(line);
    }
    Ok(lines)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), RigError> {
    let entries = fs::read_dir(dir).map_err(RigError::io(format!("listing {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(RigError::io(format!("listing {}", dir.display())))?;
        let path: PathBuf = entry.path();
        let rel = path
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_dir = entry
            .file_type()
            .map_err(RigError::io(format!("stat {}", path.display())))?
            .is_dir();
        out.push(rel);
        if is_dir {
            collect(root, &path, out)?;
        }
    }
    Ok(())
}

fn xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, RigError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| RigError::Start {
        what: "xattr".into(),
        detail: "NUL in path".into(),
    })?;
    let io = |what: &str| RigError::io(format!("{what} {}", path.display()));
    // SAFETY: c_path is a valid NUL-terminated string; a null buffer asks for the size.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        return Err(io("listxattr")(std::io::Error::last_os_error()));
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: names has room for len bytes.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(io("listxattr")(std::io::Error::last_os_error()));
    }
    names.truncate(len as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name).map_err(|_| RigError::Start {
            what: "xattr".into(),
            detail: "NUL in name".into(),
        })?;
        let mut value = vec![0u8; 65536];
        // SAFETY: value has room for its length; c_path and c_name are NUL-terminated.
        let n = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if n < 0 {
            return Err(io("getxattr")(std::io::Error::last_os_error()));
        }
        value.truncate(n as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests;
