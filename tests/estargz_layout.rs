//! Where the writer puts things: reconverting drops the old TOC and landmark, prioritized files
//! come first with their parents and then the prefetch landmark, the compression is sniffed,
//! the fixture's source layer converts with ctr-remote's TOC semantics, and a recorded file is
//! cut around what was read.

mod estargz_common;
mod fixtures_common;
use estargz_common::*;

use std::io::Read;

use bytes::Bytes;
use lazysnap::blob::MemoryBlob;
use lazysnap::estargz::{
    build_layer, decompressed_reader, open_layer, verify_layer, BuildOptions, Compression,
    EntryKind, Landmark,
};

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
