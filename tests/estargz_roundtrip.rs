//! Writer round trips: a generated tar holding every entry type is converted to eStargz and
//! zstd:chunked; the result opens and verifies with our reader, extracts with GNU tar to the same
//! tree as the original, has the digests it reports, and does not depend on the thread count.

mod fixtures_common;

use lazysnap::labels;
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
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

const CHUNK: u64 = 64 * 1024;

fn header(kind: EntryType, size: u64, mode: u32) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn content(seed: u64, len: usize) -> Vec<u8> {
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
fn every_entry_tar() -> Vec<u8> {
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

fn opts(compression: Compression) -> BuildOptions {
    BuildOptions {
        chunk_size: CHUNK,
        ..BuildOptions::new(compression)
    }
}

fn build(
    tar: &[u8],
    opts: &BuildOptions,
    threads: usize,
) -> (Vec<u8>, lazysnap::estargz::BuiltLayer) {
    let mut out = Vec::new();
    let built = build_layer_with_threads(tar, &mut out, opts, threads).unwrap();
    (out, built)
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn gnu_tar_extract(archive: &Path, dir: &Path, extra: &[&str]) {
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

fn xattrs_of(path: &Path) -> BTreeMap<String, Vec<u8>> {
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
fn describe_tree(root: &Path) -> BTreeMap<String, String> {
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

fn assert_extracts_like_original(original_tar: &[u8], converted: &[u8], zstd: bool) {
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

#[tokio::test]
async fn gzip_layer_round_trips_through_reader_and_gnu_tar() {
    let tar = every_entry_tar();
    let (out, built) = build(&tar, &opts(Compression::Gzip), 2);
    assert_eq!(built.blob_size, out.len() as u64);
    assert_eq!(
        built.blob_digest,
        format!("sha256:{}", hex::encode(Sha256::digest(&out)))
    );
    let mut plain = Vec::new();
    decompressed_reader(std::io::Cursor::new(out.clone()))
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(
        built.diff_id,
        format!("sha256:{}", hex::encode(Sha256::digest(&plain)))
    );
    assert_eq!(built.uncompressed_size, plain.len() as u64);
    let annotations = built.annotations();
    assert_eq!(annotations[labels::TOC_DIGEST], built.toc_digest);
    assert_eq!(
        annotations[UNCOMPRESSED_SIZE_ANNOTATION],
        plain.len().to_string()
    );

    let blob = MemoryBlob(Bytes::from(out.clone()));
    let layer = open_layer(&blob, Some(&built.toc_digest)).await.unwrap();
    assert_eq!(layer.compression(), Compression::Gzip);
    assert_eq!(layer.landmark(), Some(Landmark::NoPrefetch));
    let report = verify_layer(&blob, &layer).await.unwrap();
    assert!(report.chunks >= 4 + 2 + 40);

    // Entries equal what the tar crate reads from the original.
    let mut archive = tar::Archive::new(&tar[..]);
    let mut want = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let path = path.trim_end_matches('/').to_string();
        let h = entry.header().clone();
        let xattrs: BTreeMap<String, Vec<u8>> = entry
            .pax_extensions()
            .unwrap()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let e = e.unwrap();
                Some((
                    e.key().unwrap().strip_prefix("SCHILY.xattr.")?.to_string(),
                    e.value_bytes().to_vec(),
                ))
            })
            .collect();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        want.push((path, h, xattrs, data));
    }
    let entries = layer.entries();
    assert_eq!(entries.len(), want.len());
    for (got, (path, h, xattrs, data)) in entries.iter().zip(&want) {
        assert_eq!(&got.path, path);
        assert_eq!(got.mode, h.mode().unwrap() & 0o7777, "{path}");
        assert_eq!(u64::from(got.uid), h.uid().unwrap(), "{path}");
        assert_eq!(got.mtime as u64, h.mtime().unwrap(), "{path}");
        assert_eq!(&got.xattrs, xattrs, "{path}");
        match h.entry_type() {
            EntryType::Regular => {
                assert_eq!(got.kind, EntryKind::Reg);
                assert_eq!(got.size, data.len() as u64);
                assert_eq!(
                    got.digest.as_deref().unwrap(),
                    format!("sha256:{}", hex::encode(Sha256::digest(data)))
                );
                let expected_chunks = (data.len() as u64).div_ceil(CHUNK);
                assert_eq!(got.chunks.len() as u64, expected_chunks, "{path}");
            }
            EntryType::Link => {
                assert_eq!(got.kind, EntryKind::Hardlink);
                assert_eq!(got.link_target.as_deref(), Some("root/text.txt"));
            }
            EntryType::Char => {
                assert_eq!(
                    (got.kind, got.dev_major, got.dev_minor),
                    (EntryKind::Char, 1, 3)
                );
            }
            _ => {}
        }
    }

    assert_extracts_like_original(&tar, &out, false);
}

#[tokio::test]
async fn zstd_layer_round_trips_through_reader_and_gnu_tar() {
    let tar = every_entry_tar();
    let (out, built) = build(&tar, &opts(Compression::Zstd), 2);
    assert!(built.zstd_manifest_checksum.is_some());
    let position = built.zstd_manifest_position.clone().unwrap();
    let parts: Vec<u64> = position.split(':').map(|p| p.parse().unwrap()).collect();
    assert_eq!(parts.len(), 4);
    assert_eq!(parts[3], 1);
    let toc_frame = &out[parts[0] as usize..(parts[0] + parts[1]) as usize];
    assert_eq!(
        built.zstd_manifest_checksum.as_deref().unwrap(),
        format!("sha256:{}", hex::encode(Sha256::digest(toc_frame)))
    );
    assert!(built
        .annotations()
        .contains_key(ZSTD_MANIFEST_CHECKSUM_ANNOTATION));
    let mut plain = Vec::new();
    decompressed_reader(std::io::Cursor::new(out.clone()))
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(
        built.diff_id,
        format!("sha256:{}", hex::encode(Sha256::digest(&plain)))
    );
    assert_eq!(built.uncompressed_size, plain.len() as u64);

    let blob = MemoryBlob(Bytes::from(out.clone()));
    let layer = open_layer(&blob, Some(&built.toc_digest)).await.unwrap();
    assert_eq!(layer.compression(), Compression::Zstd);
    verify_layer(&blob, &layer).await.unwrap();
    assert_extracts_like_original(&tar, &out, true);
}

#[test]
fn output_bytes_do_not_depend_on_thread_count() {
    let tar = every_entry_tar();
    for compression in [Compression::Gzip, Compression::Zstd] {
        let mut o = opts(compression);
        let (one, _) = build(&tar, &o, 1);
        let (four, _) = build(&tar, &o, 4);
        assert!(one == four, "{compression:?}: 1 vs 4 threads differ");
        o.prioritized = vec!["root/small/file-007".into(), "root/big.bin".into()];
        let (one, _) = build(&tar, &o, 1);
        let (three, _) = build(&tar, &o, 3);
        assert!(
            one == three,
            "{compression:?} prioritized: 1 vs 3 threads differ"
        );
    }
    // The default entry point agrees too.
    let mut out = Vec::new();
    build_layer(&tar[..], &mut out, &opts(Compression::Gzip)).unwrap();
    assert!(out == build(&tar, &opts(Compression::Gzip), 1).0);
}

/// Re-converting an eStargz layer (its tar holds a TOC and a landmark) gives a layer with one
/// landmark and one TOC, the new ones, and the same files.
#[tokio::test]
async fn reconverting_an_estargz_layer_drops_its_toc_and_landmark() {
    let tar = every_entry_tar();
    let (first, _) = build(&tar, &opts(Compression::Gzip), 2);
    let mut again_tar = Vec::new();
    decompressed_reader(std::io::Cursor::new(first.clone()))
        .unwrap()
        .read_to_end(&mut again_tar)
        .unwrap();
    let original = open_layer(&MemoryBlob(Bytes::from(first.clone())), None)
        .await
        .unwrap();
    let paths = |layer: &lazysnap::estargz::LayerToc| -> Vec<String> {
        layer.entries().iter().map(|e| e.path.clone()).collect()
    };
    for prioritized in [vec![], vec!["root/big.bin".to_string()]] {
        let mut o = opts(Compression::Gzip);
        o.prioritized = prioritized.clone();
        let (out, built) = build(&again_tar, &o, 2);
        let blob = MemoryBlob(Bytes::from(out));
        let layer = open_layer(&blob, Some(&built.toc_digest))
            .await
            .unwrap_or_else(|e| panic!("prioritized {prioritized:?}: {e}"));
        let want = if prioritized.is_empty() {
            Landmark::NoPrefetch
        } else {
            Landmark::Prefetch
        };
        assert_eq!(layer.landmark(), Some(want));
        let mut got = paths(&layer);
        let mut expected = paths(&original);
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "prioritized {prioritized:?}");
        verify_layer(&blob, &layer).await.unwrap();
    }
}

#[tokio::test]
async fn prioritized_files_come_first_with_parents_then_the_prefetch_landmark() {
    let tar = every_entry_tar();
    let mut o = opts(Compression::Gzip);
    o.prioritized = vec![
        "/root/small/file-007".into(),
        "root/big.bin".into(),
        "root/hardlink-to-text".into(),
        "root/small/file-01*".into(),
        "does/not/exist".into(),
    ];
    let (out, built) = build(&tar, &o, 2);
    let blob = MemoryBlob(Bytes::from(out.clone()));
    let layer = open_layer(&blob, Some(&built.toc_digest)).await.unwrap();
    assert_eq!(layer.landmark(), Some(Landmark::Prefetch));
    let mut first: Vec<&str> = layer.entries().iter().map(|e| e.path.as_str()).collect();
    first.truncate(17);
    let mut want = vec![
        "root",
        "root/small",
        "root/small/file-007",
        "root/big.bin",
        "root/text.txt",
        "root/hardlink-to-text",
    ];
    let globbed: Vec<String> = (10..20)
        .map(|i| format!("root/small/file-{i:03}"))
        .collect();
    want.extend(globbed.iter().map(String::as_str));
    assert_eq!(first[..16], want[..]);
    let range = layer.prefetch_range().unwrap();
    for (i, entry) in layer.entries().iter().enumerate() {
        for chunk in &entry.chunks {
            if i < 16 {
                assert!(chunk.compressed.end <= range.end, "{}", entry.path);
            } else {
                assert!(chunk.compressed.start >= range.end, "{}", entry.path);
            }
        }
    }
    verify_layer(&blob, &layer).await.unwrap();
    // Still the same tree for GNU tar.
    let dir = scratch();
    let conv = dir.path().join("prio.tar.gz");
    std::fs::write(&conv, &out).unwrap();
    gnu_tar_extract(&conv, &dir.path().join("x"), &["-z"]);
    assert!(dir.path().join("x/.prefetch.landmark").exists());
    assert_eq!(
        std::fs::read(dir.path().join("x/root/hardlink-to-text")).unwrap(),
        content(3, 5000)
    );
}

#[test]
fn decompressed_reader_sniffs_gzip_zstd_and_plain() {
    let tar = every_entry_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::bulk::compress(&tar, 3).unwrap();
    for input in [gz, zst, tar.clone()] {
        let mut out = Vec::new();
        decompressed_reader(std::io::Cursor::new(input))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == tar);
    }
    let mut tiny = Vec::new();
    decompressed_reader(std::io::Cursor::new(vec![1u8, 2]))
        .unwrap()
        .read_to_end(&mut tiny)
        .unwrap();
    assert_eq!(tiny, [1, 2]);
}

#[test]
fn converting_the_fixture_source_layer_matches_ctr_remote_toc_semantics() {
    let dir = fixtures_common::fixtures_dir();
    let tar = std::fs::read(dir.join("orig/layer-A.tar")).unwrap();
    let mut out = Vec::new();
    let built = build_layer(&tar[..], &mut out, &BuildOptions::default()).unwrap();
    let ours: serde_json::Value = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let blob = MemoryBlob(Bytes::from(out));
        let layer = rt
            .block_on(open_layer(&blob, Some(&built.toc_digest)))
            .unwrap();
        serde_json::to_value(layer.toc().unwrap()).unwrap()
    };
    let theirs: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(
            "esgz/beb145bfbc1d2335bbaa76f52247d4053a246f6ea94ab3557c1318f73e9a2126.toc.json",
        ))
        .unwrap(),
    )
    .unwrap();
    // Same entries with the same keys and values, except offsets (compression differs) and
    // user/group names (ctr-remote writes them only when they change for a uid).
    let strip = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.as_object().unwrap().clone();
                e.remove("offset");
                e.remove("userName");
                e.remove("groupName");
                if e["name"] == ".no.prefetch.landmark" {
                    e.remove("mode");
                }
                serde_json::Value::Object(e)
            })
            .collect()
    };
    let (ours, theirs) = (strip(&ours), strip(&theirs));
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a, b);
    }
}

/// A recorded file read in two places is cut at the edges of what was read: the chunks outside
/// are marked `lazysnap.skipPrefetch` (and only those), it comes first in record order, and
/// every byte still reads back and verifies, for eStargz and zstd:chunked.
#[tokio::test]
async fn a_recorded_file_is_cut_around_what_was_read_and_the_rest_is_marked_skipped() {
    let tar = every_entry_tar();
    for compression in [Compression::Gzip, Compression::Zstd] {
        let mut o = opts(compression);
        o.recorded = vec![
            lazysnap::estargz::RecordedFile {
                path: "root/big.bin".into(),
                read: vec![1000..5000, 150_000..160_000],
            },
            // Smaller than one chunk, yet cut in two: its file digest covers both.
            lazysnap::estargz::RecordedFile {
                path: "root/exact.bin".into(),
                read: std::iter::once(0..1000).collect(),
            },
            lazysnap::estargz::RecordedFile {
                path: "root/small/file-003".into(),
                read: vec![],
            },
        ];
        let (out, built) = build(&tar, &o, 2);
        let blob = MemoryBlob(Bytes::from(out));
        let layer = open_layer(&blob, Some(&built.toc_digest)).await.unwrap();
        assert_eq!(layer.landmark(), Some(Landmark::Prefetch));
        let regs: Vec<&str> = layer
            .entries()
            .iter()
            .filter(|e| e.kind == EntryKind::Reg)
            .map(|e| e.path.as_str())
            .collect();
        assert_eq!(
            &regs[..3],
            &["root/big.bin", "root/exact.bin", "root/small/file-003"]
        );
        let big = &layer.entries()[layer
            .entries()
            .iter()
            .position(|e| e.path == "root/big.bin")
            .unwrap()];
        let read_starts = [1000u64, 150_000];
        let edges: Vec<u64> = big.chunks.iter().map(|c| c.file_offset).collect();
        for edge in [1000, 5000, 150_000, 160_000] {
            assert!(edges.contains(&edge), "a chunk starts at {edge}: {edges:?}");
        }
        assert!(big.chunks.iter().all(|c| c.len <= CHUNK));
        let skipped = layer.prefetch_skipped();
        for c in &big.chunks {
            let read = read_starts.contains(&c.file_offset);
            assert_eq!(
                skipped.binary_search(&c.compressed.start).is_err(),
                read,
                "chunk at {} ({compression:?})",
                c.file_offset
            );
        }
        verify_layer(&blob, &layer).await.unwrap();
    }
}
