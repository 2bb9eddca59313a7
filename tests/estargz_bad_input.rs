//! Bad input gives a named error, never a panic, wrong bytes or a huge allocation: corrupted and
//! truncated fixture blobs, wrong TOC digests, and hand-made TOCs breaking each rule.

mod fixtures_common;

use std::io::Write;

use bytes::Bytes;
use lazysnap::blob::MemoryBlob;
use lazysnap::estargz::footer::{estargz_footer, zstd_footer};
use lazysnap::estargz::{
    build_layer, open_layer, verify_layer, BuildOptions, FormatError, LayerToc,
};
use sha2::{Digest, Sha256};

fn fixture(variant: &str, prefix: &str) -> Vec<u8> {
    let dir = fixtures_common::fixtures_dir();
    let dir = dir.join(variant);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with(prefix) && name.ends_with(".blob") {
            return std::fs::read(path).unwrap();
        }
    }
    panic!("fixture {variant}/{prefix}* missing");
}

/// esgz layer A (ctr-remote, 4 MiB chunks).
fn esgz_a() -> Vec<u8> {
    fixture("esgz", "beb145bf")
}

async fn open(bytes: Vec<u8>, digest: Option<&str>) -> Result<LayerToc, FormatError> {
    open_layer(&MemoryBlob(Bytes::from(bytes)), digest).await
}

async fn open_ok(bytes: Vec<u8>) -> (MemoryBlob, LayerToc) {
    let blob = MemoryBlob(Bytes::from(bytes));
    let layer = open_layer(&blob, None).await.unwrap();
    (blob, layer)
}

#[tokio::test]
async fn flipped_byte_in_a_chunk_is_a_bad_chunk_naming_the_file() {
    for (variant, prefix) in [("esgz", "beb145bf"), ("zstdchunked", "579998ad")] {
        let mut bytes = fixture(variant, prefix);
        let layer = open(bytes.clone(), None).await.unwrap();
        let text = layer
            .entries()
            .iter()
            .find(|e| e.path == "data/text.txt")
            .unwrap();
        let range = text.chunks[0].compressed.clone();
        let middle = (range.start + (range.end - range.start) / 2) as usize;
        bytes[middle] ^= 0x55;
        let (blob, layer) = open_ok(bytes).await;
        match verify_layer(&blob, &layer).await {
            Err(FormatError::BadChunk { name, offset, .. }) => {
                assert_eq!(name, "data/text.txt", "{variant}");
                assert_eq!(offset, range.start);
            }
            other => panic!("{variant}: expected BadChunk, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn truncated_blobs_are_refused() {
    let bytes = esgz_a();
    for cut in [1usize, 51, 1000, bytes.len() - 30] {
        let err = open(bytes[..bytes.len() - cut].to_vec(), None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::BadFooter { .. } | FormatError::Truncated { .. }
            ),
            "cut {cut}: {err}"
        );
    }
    // Dropping the head keeps the footer but the TOC offset now points at the wrong bytes.
    let err = open(bytes[4096..].to_vec(), None).await.unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::BadToc { .. } | FormatError::BadFooter { .. }
        ),
        "{err}"
    );
    let err = open(Vec::new(), None).await.unwrap_err();
    assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
}

#[tokio::test]
async fn wrong_toc_digest_is_refused() {
    let wrong = format!("sha256:{}", "0".repeat(64));
    for bytes in [esgz_a(), fixture("zstdchunked", "579998ad")] {
        match open(bytes, Some(&wrong)).await {
            Err(FormatError::TocDigestMismatch { expected, .. }) => assert_eq!(expected, wrong),
            other => panic!("expected TocDigestMismatch, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn wrong_footers_are_refused() {
    let mut bytes = esgz_a();
    let n = bytes.len();
    bytes[n - 30] = b'z'; // inside the hex offset
    let err = open(bytes, None).await.unwrap_err();
    assert!(matches!(err, FormatError::BadFooter { .. }), "{err}");
    // A footer pointing past the blob.
    let mut bytes = b"data".to_vec();
    bytes.extend_from_slice(&estargz_footer(1 << 40));
    let err = open(bytes, None).await.unwrap_err();
    assert!(matches!(err, FormatError::BadFooter { .. }), "{err}");
    let mut bytes = vec![0u8; 100];
    bytes.extend_from_slice(&zstd_footer(50, u64::MAX, 10));
    let err = open(bytes, None).await.unwrap_err();
    assert!(matches!(err, FormatError::BadFooter { .. }), "{err}");
    let mut bytes = vec![0u8; 100];
    bytes.extend_from_slice(&zstd_footer(50, 40, 1 << 40));
    let err = open(bytes, None).await.unwrap_err();
    assert!(matches!(err, FormatError::BadToc { .. }), "{err}");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn toc_member(json: &[u8], declared_size: Option<u64>) -> Vec<u8> {
    let mut header = tar::Header::new_ustar();
    header.set_path("stargz.index.json").unwrap();
    header.set_size(declared_size.unwrap_or(json.len() as u64));
    header.set_mode(0o644);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(json);
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    gzip(&tar)
}

/// A blob whose data part is `members` (gzip members, each holding `payload`) followed by a TOC
/// built by `toc(offsets_of_members)`.
fn crafted_blob(payloads: &[&[u8]], toc: impl Fn(&[u64]) -> String) -> Vec<u8> {
    let mut blob = gzip(&[0u8; 512]); // a header-only member first
    let mut offsets = Vec::new();
    for p in payloads {
        offsets.push(blob.len() as u64);
        blob.extend_from_slice(&gzip(p));
    }
    let json = toc(&offsets);
    let toc_offset = blob.len() as u64;
    blob.extend_from_slice(&toc_member(json.as_bytes(), None));
    blob.extend_from_slice(&estargz_footer(toc_offset));
    blob
}

fn reg(name: &str, size: usize, offset: u64, data_digest: &str, extra: &str) -> String {
    format!(
        r#"{{"name":"{name}","type":"reg","size":{size},"offset":{offset},"digest":"{data_digest}","chunkDigest":"{data_digest}"{extra}}}"#
    )
}

fn toc(entries: &[String]) -> String {
    format!(r#"{{"version":1,"entries":[{}]}}"#, entries.join(","))
}

async fn expect_bad_entry(blob: Vec<u8>, name: &str, why: &str) {
    match open(blob, None).await {
        Err(FormatError::BadEntry {
            name: got, reason, ..
        }) => {
            assert_eq!(got, name, "{why}: {reason}");
        }
        other => panic!("{why}: expected BadEntry for {name}, got {other:?}"),
    }
}

#[tokio::test]
async fn crafted_toc_that_is_valid_opens_and_verifies() {
    let data = b"hello world";
    let blob = crafted_blob(&[data], |o| {
        toc(&[reg("a.txt", data.len(), o[0], &digest(data), "")])
    });
    let (blob, layer) = open_ok(blob).await;
    assert_eq!(layer.entries().len(), 1);
    verify_layer(&blob, &layer).await.unwrap();
}

#[tokio::test]
async fn non_json_or_wrong_version_toc_is_refused() {
    for json in [
        "not json at all",
        r#"{"version":2,"entries":[]}"#,
        r#"{"version":1,"entries":[{"name":5}]}"#,
    ] {
        let blob = crafted_blob(&[], |_| json.to_string());
        let err = open(blob, None).await.unwrap_err();
        assert!(matches!(err, FormatError::BadToc { .. }), "{json}: {err}");
    }
}

#[tokio::test]
async fn oversized_toc_is_refused_before_allocation() {
    let mut blob = gzip(&[0u8; 512]);
    let toc_offset = blob.len() as u64;
    blob.extend_from_slice(&toc_member(b"{}", Some(600 << 20)));
    blob.extend_from_slice(&estargz_footer(toc_offset));
    let err = open(blob, None).await.unwrap_err();
    match err {
        FormatError::BadToc { reason, .. } => assert!(reason.contains("limit"), "{reason}"),
        other => panic!("expected BadToc, got {other:?}"),
    }
}

#[tokio::test]
async fn unsafe_names_and_link_targets_are_refused() {
    let data = b"x";
    let d = digest(data);
    for name in ["../escape", "a/../../escape", "/etc/passwd"] {
        let blob = crafted_blob(&[data], |o| toc(&[reg(name, 1, o[0], &d, "")]));
        expect_bad_entry(blob, name, "unsafe name").await;
    }
    let link = |target: &str| {
        let target = target.to_string();
        let d = d.clone();
        crafted_blob(&[data], move |o| {
            toc(&[
                reg("a.txt", 1, o[0], &d, ""),
                format!(r#"{{"name":"link","type":"hardlink","linkName":"{target}"}}"#),
            ])
        })
    };
    expect_bad_entry(link("missing.txt"), "link", "missing hardlink target").await;
    expect_bad_entry(link("../a.txt"), "link", "escaping hardlink target").await;
    expect_bad_entry(link("/a.txt"), "link", "absolute hardlink target").await;
}

#[tokio::test]
async fn chunk_layout_violations_are_refused() {
    let data = b"0123456789";
    let d = digest(data);
    // Offset beyond the data part of the blob.
    let blob = crafted_blob(&[data], |_| toc(&[reg("far.txt", 10, 1 << 30, &d, "")]));
    expect_bad_entry(blob, "far.txt", "offset outside the blob").await;
    // Two files claiming the same chunk bytes.
    let blob = crafted_blob(&[data], |o| {
        toc(&[
            reg("one.txt", 10, o[0], &d, ""),
            reg("two.txt", 10, o[0], &d, ""),
        ])
    });
    expect_bad_entry(blob, "two.txt", "duplicate chunk").await;
    // Chunks that do not add up to the file size.
    let blob = crafted_blob(&[data], |o| {
        toc(&[reg("short.txt", 20, o[0], &d, r#","chunkSize":10"#)])
    });
    expect_bad_entry(blob, "short.txt", "chunk sizes not summing to the size").await;
    // A chunk entry repeating a file offset.
    let blob = crafted_blob(&[data, data], |o| {
        toc(&[
            reg("rep.txt", 20, o[0], &d, r#","chunkSize":10"#),
            format!(
                r#"{{"name":"rep.txt","type":"chunk","offset":{},"chunkOffset":0,"chunkSize":10,"chunkDigest":"{d}"}}"#,
                o[1]
            ),
        ])
    });
    expect_bad_entry(blob, "rep.txt", "overlapping chunk offsets").await;
    // A chunk entry with nobody to belong to.
    let blob = crafted_blob(&[data], |o| {
        toc(&[format!(
            r#"{{"name":"orphan","type":"chunk","offset":{},"chunkDigest":"{d}"}}"#,
            o[0]
        )])
    });
    expect_bad_entry(blob, "orphan", "orphan chunk").await;
    // Chunk digests that are not sha256, or not hex: refused naming the entry.
    let sha512 = format!("sha512:{}", "ab".repeat(64));
    let short = format!("sha256:{}", &d["sha256:".len()..][..62]);
    for (file, bad) in [("sha512.txt", sha512), ("short.txt", short)] {
        let blob = crafted_blob(&[data], |o| {
            toc(&[format!(
                r#"{{"name":"{file}","type":"reg","size":10,"offset":{},"digest":"{d}","chunkDigest":"{bad}"}}"#,
                o[0]
            )])
        });
        match open(blob, None).await {
            Err(FormatError::BadEntry { name, reason, .. }) => {
                assert_eq!(name, file, "{reason}");
                assert!(reason.contains("sha256:<64 hex digits>"), "{reason}");
                assert!(reason.contains(&bad[..60]), "{reason}");
            }
            other => panic!("{file}: expected BadEntry, got {other:?}"),
        }
    }
    // Unknown type, bad xattr encoding, bad modtime.
    let blob = crafted_blob(&[], |_| {
        toc(&[r#"{"name":"s","type":"socket"}"#.to_string()])
    });
    expect_bad_entry(blob, "s", "unknown type").await;
    let blob = crafted_blob(&[], |_| {
        toc(&[r#"{"name":"x","type":"dir","xattrs":{"user.a":"!!!"}}"#.to_string()])
    });
    expect_bad_entry(blob, "x", "bad base64").await;
    let blob = crafted_blob(&[], |_| {
        toc(&[r#"{"name":"t","type":"dir","modtime":"yesterday"}"#.to_string()])
    });
    expect_bad_entry(blob, "t", "bad modtime").await;
}

#[tokio::test]
async fn chunk_holding_more_than_declared_never_yields_wrong_bytes() {
    // The member holds 100 bytes but the TOC declares 5 with the digest of all 100: the reader
    // decodes exactly 5 bytes and the digest check fails.
    let data = [7u8; 100];
    let blob = crafted_blob(&[&data], |o| {
        toc(&[reg("big.txt", 5, o[0], &digest(&data), "")])
    });
    let (blob, layer) = open_ok(blob).await;
    match verify_layer(&blob, &layer).await {
        Err(FormatError::BadChunk { name, .. }) => assert_eq!(name, "big.txt"),
        other => panic!("expected BadChunk, got {other:?}"),
    }
    // Declaring more than the member holds fails too, without allocating the declared size.
    let blob = crafted_blob(&[&data], |o| {
        toc(&[reg(
            "huge.txt",
            1 << 40,
            o[0],
            &digest(&data),
            r#","chunkSize":1099511627776"#,
        )])
    });
    expect_bad_entry(blob, "huge.txt", "chunk over the size limit").await;
    let blob = crafted_blob(&[&data], |o| {
        toc(&[reg("big2.txt", 200, o[0], &digest(&data), "")])
    });
    let (blob, layer) = open_ok(blob).await;
    assert!(matches!(
        verify_layer(&blob, &layer).await,
        Err(FormatError::BadChunk { .. })
    ));
}

#[test]
fn writer_refuses_bad_tar_input() {
    let opts = BuildOptions::default();
    let err = build_layer(&b"this is not a tar stream at all"[..], Vec::new(), &opts).unwrap_err();
    assert!(matches!(err, FormatError::BadTar { .. }), "{err}");
    let garbage = vec![0x41u8; 4096];
    let err = build_layer(&garbage[..], Vec::new(), &opts).unwrap_err();
    assert!(matches!(err, FormatError::BadTar { .. }), "{err}");
    // A member whose name escapes the root.
    let mut header = tar::Header::new_ustar();
    header.as_old_mut().name[..9].copy_from_slice(b"../escape");
    header.set_size(0);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.resize(tar.len() + 1024, 0);
    match build_layer(&tar[..], Vec::new(), &opts).unwrap_err() {
        FormatError::BadTar { name, .. } => assert_eq!(name, "../escape"),
        other => panic!("expected BadTar, got {other:?}"),
    }
    // Hardlinks to nothing before them, or to a directory: refused by name, with or without
    // prioritized files (which spool the members first), never written as a layer readers refuse.
    let link_to = |target: &str, with_dir: bool| {
        let mut b = tar::Builder::new(Vec::new());
        if with_dir {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_mode(0o755);
            b.append_data(&mut h, "dir/", &[][..]).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        h.set_mode(0o644);
        b.append_link(&mut h, "link", target).unwrap();
        b.into_inner().unwrap()
    };
    let prioritized = BuildOptions {
        prioritized: vec!["link".into()],
        ..BuildOptions::default()
    };
    for (tar, why) in [
        (link_to("missing", false), "not an earlier member"),
        (link_to("dir", true), "is a directory"),
    ] {
        for opts in [&opts, &prioritized] {
            match build_layer(&tar[..], Vec::new(), opts).unwrap_err() {
                FormatError::BadTar { name, reason, .. } => {
                    assert_eq!(name, "link");
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("expected BadTar, got {other:?}"),
            }
        }
    }
    // A truncated member.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(10_000);
    h.set_mode(0o644);
    b.append_data(&mut h, "file", &vec![1u8; 10_000][..])
        .unwrap();
    let full = b.into_inner().unwrap();
    assert!(build_layer(&full[..5000], Vec::new(), &opts).is_err());
    // Bad options.
    let bad = BuildOptions {
        chunk_size: 0,
        ..BuildOptions::default()
    };
    assert!(matches!(
        build_layer(&full[..], Vec::new(), &bad),
        Err(FormatError::InvalidOption(_))
    ));
}

#[test]
fn a_toc_past_the_entry_limit_is_refused_naming_the_limit() {
    // 28 bytes an entry: a TOC of about 30 MB (a few hundred KB compressed) that would cost
    // nearly a gigabyte once parsed, were it not stopped at the limit.
    let mut json = String::from(r#"{"version":1,"entries":["#);
    for i in 0..=lazysnap::estargz::MAX_TOC_ENTRIES {
        if i > 0 {
            json.push(',');
        }
        json.push_str(r#"{"name":"d","type":"dir"}"#);
    }
    json.push_str("]}");
    let err = lazysnap::estargz::parse_toc_json(json.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "more than {} entries",
            lazysnap::estargz::MAX_TOC_ENTRIES
        )),
        "{err}"
    );
}
