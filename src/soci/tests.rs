use super::*;

fn span(compressed: std::ops::Range<u64>, uncompressed: std::ops::Range<u64>) -> Span {
    Span {
        compressed,
        uncompressed,
        bits: 0,
        window: vec![0u8; WINDOW_SIZE].into(),
        digest: [7; 32],
    }
}

fn file(name: &str, kind: &str, offset: u64, size: u64) -> ZtocFile {
    ZtocFile {
        name: name.into(),
        kind: kind.into(),
        offset,
        size,
        link_name: String::new(),
        mode: 0o100644,
        uid: 0,
        gid: 0,
        mod_time: "2024-01-02T03:04:05.5Z".into(),
        dev_major: 0,
        dev_minor: 0,
        pax_records: Vec::new(),
    }
}

fn ztoc(files: Vec<ZtocFile>) -> Ztoc {
    Ztoc {
        version: "0.9".into(),
        compressed_size: 300,
        uncompressed_size: 3000,
        files,
        spans: vec![
            span(10..100, 0..1000),
            span(99..200, 1000..2000),
            span(200..300, 2000..3000),
        ],
    }
}

#[test]
fn files_are_read_through_the_spans_that_hold_them() {
    let mut with_xattr = file("./etc/b", "reg", 1500, 1000);
    with_xattr
        .pax_records
        .push(("SCHILY.xattr.user.k".into(), "v".into()));
    with_xattr
        .pax_records
        .push(("path".into(), "ignored".into()));
    let mut link = file("etc/c", "hardlink", 0, 0);
    link.link_name = "./etc/b".into();
    let files = vec![
        file("./", "dir", 0, 0),
        file("etc/", "dir", 0, 0),
        file("etc/a", "reg", 512, 100),
        with_xattr,
        link,
        // A later entry of the same path replaces the earlier one.
        file("etc/a", "reg", 2600, 10),
    ];
    let digest = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    let layer = layer_from_ztoc(ztoc(files), digest.clone(), 300).unwrap();
    assert_eq!(layer.toc_digest(), &digest);
    let spans = layer.spans().unwrap();
    assert_eq!(spans.len(), 3);
    assert_eq!(spans.starting_at(99).unwrap().uncompressed, 1000..2000);
    let entries = layer.entries();
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["etc", "etc/a", "etc/b", "etc/c"]);
    let a = &entries[1];
    assert_eq!((a.size, a.stream_offset, a.chunks.len()), (10, 2600, 1));
    assert_eq!(a.chunks[0].compressed, 200..300);
    assert_eq!(a.mtime, 1704164645);
    let b = &entries[2];
    assert_eq!(b.stream_offset, 1500);
    let covered: Vec<_> = b
        .chunks
        .iter()
        .map(|c| c.file_offset..c.file_offset + c.len)
        .collect();
    assert_eq!(covered, [1000..2000, 2000..3000]);
    assert_eq!(b.xattrs.get("user.k").map(Vec::as_slice), Some(&b"v"[..]));
    assert_eq!(b.xattrs.len(), 1);
    assert_eq!(entries[3].link_target.as_deref(), Some("etc/b"));
    // The chunk keys differ by span and by zTOC.
    assert_ne!(a.chunks[0].digest, b.chunks[0].digest);
    let other = Digest::parse(&format!("sha256:{}", "cd".repeat(32))).unwrap();
    let again = layer_from_ztoc(ztoc(vec![file("x", "reg", 2600, 10)]), other, 300).unwrap();
    assert_ne!(again.entries()[0].chunks[0].digest, a.chunks[0].digest);
}

#[test]
fn a_ztoc_of_another_blob_or_with_unsafe_names_is_refused() {
    let digest = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    let err = layer_from_ztoc(ztoc(vec![]), digest.clone(), 301).unwrap_err();
    assert!(err.to_string().contains("layer of 300 bytes"), "{err}");
    let err =
        layer_from_ztoc(ztoc(vec![file("../x", "reg", 0, 1)]), digest.clone(), 300).unwrap_err();
    assert!(err.to_string().contains(".."), "{err}");
    let mut dangling = file("l", "hardlink", 0, 0);
    dangling.link_name = "missing".into();
    assert!(layer_from_ztoc(ztoc(vec![dangling]), digest, 300).is_err());
}

#[test]
fn the_fuzzing_seed_is_a_valid_ztoc() {
    let seed = include_bytes!("../../fuzz/seeds/ztoc/minimal");
    let parsed = Ztoc::parse(seed).unwrap();
    assert_eq!((parsed.version.as_str(), parsed.spans.len()), ("0.9", 1));
    let size = parsed.compressed_size;
    let digest = crate::digest::sha256_digest(seed);
    let layer = layer_from_ztoc(parsed, digest, size).unwrap();
    let paths: Vec<&str> = layer.entries().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["dir", "dir/file"]);
    // Every cut of it is an error, never a panic.
    for len in (0..seed.len()).step_by(97) {
        let _ = Ztoc::parse(&seed[..len]);
    }
}
