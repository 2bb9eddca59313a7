//! Helpers of the writer's integration tests: a tar of every entry type, build options, GNU tar
//! extraction and a description of an extracted tree to compare.
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use lazysnap::blob::MemoryBlob;
use lazysnap::estargz::{
    build_layer, build_layer_with_threads, decompressed_reader, open_layer, verify_layer,
    BuildOptions, Compression, EntryKind, Landmark, UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
};
use lazysnap::labels;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

pub const CHUNK: u64 = 64 * 1024;

pub fn header(kind: EntryType, size: u64, mode: u32) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0u64;
    while out.len() < len {
        let line = format!("{seed}-{i} the quick brown fox {}\n", i * 7919 % 1000);
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// A tar with every kind of entry a layer can hold.
pub fn every_entry_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, h: &mut Header, path: &str, data: &[u8]| {
        b.append_data(h, path, data).unwrap();
    };
    add(
        &mut b,
        &mut header(EntryType::Directory, 0, 0o755),
        "root/",
        &[],
    );
    add(
        &mut b,
        &mut header(EntryType::Directory, 0, 0o700),
        "root/empty-dir/",
        &[],
    );
    add(
        &mut b,
        &mut header(EntryType::Regular, 0, 0o644),
        "root/empty.txt",
        &[],
    );
    add(
        &mut b,
        &mut header(EntryType::Regular, 1, 0o644),
        "root/one-byte",
        b"x",
    );
    let big = content(1, (CHUNK * 3 + 1234) as usize);
    add(
        &mut b,
        &mut header(EntryType::Regular, big.len() as u64, 0o644),
        "root/big.bin",
        &big,
    );
    let exact = content(2, CHUNK as usize);
    add(
        &mut b,
        &mut header(EntryType::Regular, CHUNK, 0o644),
        "root/exact.bin",
        &exact,
    );
    let text = content(3, 5000);
    add(
        &mut b,
        &mut header(EntryType::Regular, 5000, 0o644),
        "root/text.txt",
        &text,
    );
    let mut suid = header(EntryType::Regular, 4, 0o4755);
    add(&mut b, &mut suid, "root/setuid", b"\x7fELF");
    let mut owned = header(EntryType::Regular, 6, 0o600);
    owned.set_uid(1000);
    owned.set_gid(1001);
    owned.set_username("alice").unwrap();
    owned.set_groupname("staff").unwrap();
    add(&mut b, &mut owned, "root/private", b"secret");
    let mut sym = header(EntryType::Symlink, 0, 0o777);
    b.append_link(&mut sym, "root/link-rel", "text.txt")
        .unwrap();
    let mut sym = header(EntryType::Symlink, 0, 0o777);
    b.append_link(&mut sym, "root/link-dangling", "../nowhere/at/all")
        .unwrap();
    let mut hard = header(EntryType::Link, 0, 0o644);
    b.append_link(&mut hard, "root/hardlink-to-text", "root/text.txt")
        .unwrap();
    add(
        &mut b,
        &mut header(EntryType::Directory, 0, 0o755),
        "root/wh/",
        &[],
    );
    add(
        &mut b,
        &mut header(EntryType::Regular, 0, 0o644),
        "root/wh/.wh.gone",
        &[],
    );
    add(
        &mut b,
        &mut header(EntryType::Directory, 0, 0o755),
        "root/opaque/",
        &[],
    );
    add(
        &mut b,
        &mut header(EntryType::Regular, 0, 0o644),
        "root/opaque/.wh..wh..opq",
        &[],
    );
    add(
        &mut b,
        &mut header(EntryType::Regular, 3, 0o644),
        "root/opaque/inside",
        b"in\n",
    );
    b.append_pax_extensions([
        ("SCHILY.xattr.user.test", &b"hello"[..]),
        ("SCHILY.xattr.user.bin", &[0u8, 1, 2, 255][..]),
    ])
    .unwrap();
    add(
        &mut b,
        &mut header(EntryType::Regular, 5, 0o644),
        "root/xattr.txt",
        b"attrs",
    );
    add(
        &mut b,
        &mut header(EntryType::Fifo, 0, 0o644),
        "root/fifo",
        &[],
    );
    let mut dev = header(EntryType::Char, 0, 0o666);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(3).unwrap();
    add(&mut b, &mut dev, "root/null-char", &[]);
    let long_dir = format!("root/{}/{}", "a".repeat(60), "b".repeat(60));
    add(
        &mut b,
        &mut header(EntryType::Directory, 0, 0o755),
        &format!("root/{}/", "a".repeat(60)),
        &[],
    );
    add(
        &mut b,
        &mut header(EntryType::Directory, 0, 0o755),
        &format!("{long_dir}/"),
        &[],
    );
    let gnu_long = format!("{long_dir}/gnu-long-name-file-0001.txt");
    assert!(gnu_long.len() > 150);
    add(
        &mut b,
        &mut header(EntryType::Regular, 4, 0o644),
        &gnu_long,
        b"long",
    );
    let pax_long = format!("{long_dir}/pax-long-name-file-0001.txt");
    b.append_pax_extensions([("path", pax_long.as_bytes())])
        .unwrap();
    add(
        &mut b,
        &mut header(EntryType::Regular, 3, 0o644),
        "root/pax-short-name",
        b"pax",
    );
    add(
        &mut b,
        &mut header(EntryType::Directory, 0, 0o755),
        "root/données/",
        &[],
    );
    add(
        &mut b,
        &mut header(EntryType::Regular, 4, 0o644),
        "root/données/ünïcödé.txt",
        b"utf8",
    );
    let mut small_dir = header(EntryType::Directory, 0, 0o755);
    add(&mut b, &mut small_dir, "root/small/", &[]);
    for i in 0..40 {
        let data = format!("small file {i:03}\n");
        add(
            &mut b,
            &mut header(EntryType::Regular, data.len() as u64, 0o644),
            &format!("root/small/file-{i:03}"),
            data.as_bytes(),
        );
    }
    let mut last = header(EntryType::Regular, 4, 0o644);
    last.set_mtime(1_700_012_345);
    add(&mut b, &mut last, "root/zz-last", b"last");
    b.into_inner().unwrap()
}

pub fn opts(compression: Compression) -> BuildOptions {
    BuildOptions {
        chunk_size: CHUNK,
        ..BuildOptions::new(compression)
    }
}

pub fn build(
    tar: &[u8],
    opts: &BuildOptions,
    threads: usize,
) -> (Vec<u8>, lazysnap::estargz::BuiltLayer) {
    let mut out = Vec::new();
    let built = build_layer_with_threads(tar, &mut out, opts, threads).unwrap();
    (out, built)
}

pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

pub fn gnu_tar_extract(archive: &Path, dir: &Path, extra: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let status = Command::new("tar")
        .args(extra)
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(archive)
        .arg("-C")
        .arg(dir)
        .status()
        .expect("GNU tar must be installed");
    assert!(status.success(), "tar -x {} failed", archive.display());
}

pub fn xattrs_of(path: &Path) -> BTreeMap<String, Vec<u8>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: valid C string and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: valid C strings and buffer of the given length.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(len >= 0);
        value.truncate(len as usize);
        out.insert(String::from_utf8(name.to_vec()).unwrap(), value);
    }
    out
}

/// Everything about a tree that a layer must preserve, keyed by relative path.
pub fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel_path = rel.join(entry.file_name());
            let path = root.join(&rel_path);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                stack.push(rel_path.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("symlink->{}", std::fs::read_link(&path).unwrap().display())
            } else if ft.is_fifo() {
                "fifo".into()
            } else if ft.is_char_device() {
                format!("char {:x}", meta.rdev())
            } else {
                let data = std::fs::read(&path).unwrap();
                format!(
                    "reg {} {} nlink={}",
                    data.len(),
                    hex::encode(Sha256::digest(&data)),
                    meta.nlink()
                )
            };
            let mtime = if ft.is_dir() { 0 } else { meta.mtime() };
            out.insert(
                rel_path.display().to_string(),
                format!(
                    "{kind} mode={:o} uid={} gid={} mtime={mtime} xattrs={:?}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    xattrs_of(&path)
                ),
            );
        }
    }
    out
}

pub fn assert_extracts_like_original(original_tar: &[u8], converted: &[u8], zstd: bool) {
    let dir = scratch();
    let orig_path = dir.path().join("orig.tar");
    std::fs::write(&orig_path, original_tar).unwrap();
    let conv_path = dir
        .path()
        .join(if zstd { "conv.tar.zst" } else { "conv.tar.gz" });
    std::fs::write(&conv_path, converted).unwrap();
    gnu_tar_extract(&orig_path, &dir.path().join("a"), &[]);
    gnu_tar_extract(
        &conv_path,
        &dir.path().join("b"),
        if zstd { &["--zstd"] } else { &["-z"] },
    );
    let a = describe_tree(&dir.path().join("a"));
    let mut b = describe_tree(&dir.path().join("b"));
    for added in [
        "stargz.index.json",
        ".no.prefetch.landmark",
        ".prefetch.landmark",
    ] {
        b.remove(added);
    }
    assert_eq!(a, b);
    assert!(a.len() > 60, "the tree was extracted");
}
