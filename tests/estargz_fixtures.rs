//! Interoperability: every ctr-remote-made layer in ../shared/fixtures opens with its manifest's
//! TOC digest, verifies, and describes exactly the tree of its source tar (expected/*.jsonl).

mod fixtures_common;

use lazysnap::labels;
use std::collections::BTreeMap;
use std::path::PathBuf;

use lazysnap::blob::{BlobSource, FileBlob};
use lazysnap::estargz::{
    decode_chunk, open_layer, verify_layer, Compression, EntryKind, Landmark, LayerToc,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures_dir() -> PathBuf {
    let dir = fixtures_common::fixtures_dir();
    assert!(
        dir.join("fixtures.json").exists(),
        "fixtures missing: expected ../shared/fixtures/fixtures.json next to the repository"
    );
    dir
}

struct FixtureLayer {
    variant: String,
    file: PathBuf,
    source: String,
    toc_digest: String,
    media_type: String,
}

fn fixture_layers() -> Vec<FixtureLayer> {
    let dir = fixtures_dir();
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("fixtures.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for variant in ["esgz", "esgz-1m", "esgz-prio", "zstdchunked"] {
        let layers = index["variants"][variant]["layers"].as_array().unwrap();
        for layer in layers {
            out.push(FixtureLayer {
                variant: variant.to_string(),
                file: dir.join(layer["file"].as_str().unwrap()),
                source: layer["source_layer"].as_str().unwrap().to_string(),
                toc_digest: layer["annotations"][labels::TOC_DIGEST]
                    .as_str()
                    .unwrap()
                    .to_string(),
                media_type: layer["mediaType"].as_str().unwrap().to_string(),
            });
        }
    }
    assert_eq!(out.len(), 8);
    out
}

fn expected_entries(source: &str) -> Vec<Value> {
    let path = fixtures_dir().join(format!("expected/layer-{source}.jsonl"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn file_content(blob: &dyn BlobSource, layer: &LayerToc, index: usize) -> Vec<u8> {
    let entry = &layer.entries()[index];
    let mut content = Vec::new();
    for chunk in &entry.chunks {
        let compressed = blob.read_range(chunk.compressed.clone()).await.unwrap();
        let data = decode_chunk(layer.compression(), &entry.path, chunk, &compressed).unwrap();
        assert_eq!(chunk.file_offset, content.len() as u64);
        content.extend_from_slice(&data);
    }
    content
}

#[tokio::test]
async fn every_fixture_layer_opens_verifies_and_matches_its_source_tree() {
    for fixture in fixture_layers() {
        let what = format!("{} layer {}", fixture.variant, fixture.source);
        let blob = FileBlob::open(&fixture.file).unwrap();
        let layer = open_layer(&blob, Some(&fixture.toc_digest))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(layer.toc_digest().as_str(), fixture.toc_digest, "{what}");
        let expected_compression = if fixture.media_type.ends_with("+zstd") {
            Compression::Zstd
        } else {
            Compression::Gzip
        };
        assert_eq!(layer.compression(), expected_compression, "{what}");
        let report = verify_layer(&blob, &layer)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(report.chunks > 0, "{what}");

        let expected = expected_entries(&fixture.source);
        let entries = layer.entries();
        assert_eq!(entries.len(), expected.len(), "{what}: entry count");
        if fixture.variant != "esgz-prio" {
            let order: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
            let want: Vec<&str> = expected
                .iter()
                .map(|e| e["path"].as_str().unwrap())
                .collect();
            assert_eq!(order, want, "{what}: TOC order is the source order");
        }
        let by_path: BTreeMap<&str, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_str(), i))
            .collect();
        for want in &expected {
            let path = want["path"].as_str().unwrap();
            let &index = by_path
                .get(path)
                .unwrap_or_else(|| panic!("{what}: {path} missing"));
            let got = &entries[index];
            let ctx = format!("{what}: {path}");
            assert_eq!(
                got.kind.as_toc_type(),
                want["type"].as_str().unwrap(),
                "{ctx}"
            );
            assert_eq!(u64::from(got.mode), want["mode"].as_u64().unwrap(), "{ctx}");
            assert_eq!(u64::from(got.uid), want["uid"].as_u64().unwrap(), "{ctx}");
            assert_eq!(u64::from(got.gid), want["gid"].as_u64().unwrap(), "{ctx}");
            assert_eq!(got.size, want["size"].as_u64().unwrap(), "{ctx}");
            assert_eq!(got.mtime, want["mtime"].as_i64().unwrap(), "{ctx}");
            match got.kind {
                EntryKind::Reg => {
                    let content = file_content(&blob, &layer, index).await;
                    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&content)));
                    assert_eq!(digest, want["sha256"].as_str().unwrap(), "{ctx}");
                    assert_eq!(content.len() as u64, got.size, "{ctx}");
                }
                EntryKind::Symlink | EntryKind::Hardlink => {
                    assert_eq!(
                        got.link_target.as_deref(),
                        want["linkname"].as_str(),
                        "{ctx}"
                    );
                }
                EntryKind::Char | EntryKind::Block => {
                    assert_eq!(u64::from(got.dev_major), want["devmajor"].as_u64().unwrap());
                    assert_eq!(u64::from(got.dev_minor), want["devminor"].as_u64().unwrap());
                }
                _ => {}
            }
            let want_xattrs: BTreeMap<String, Vec<u8>> = want
                .get("xattrs")
                .and_then(|x| x.as_object())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().as_bytes().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(got.xattrs, want_xattrs, "{ctx}");
        }

        let landmark = layer.landmark();
        if fixture.variant == "esgz-prio" {
            assert_eq!(landmark, Some(Landmark::Prefetch), "{what}");
            let range = layer.prefetch_range().expect("prefetch range");
            assert_eq!(range.start, 0);
            assert!(range.end > 0 && range.end < layer.blob_size());
        } else {
            assert_eq!(landmark, Some(Landmark::NoPrefetch), "{what}");
            assert_eq!(layer.prefetch_range(), None, "{what}");
        }
    }
}

#[tokio::test]
async fn prioritized_fixture_lists_recorded_files_first_and_prefetch_range_covers_them() {
    let fixture = fixture_layers()
        .into_iter()
        .find(|f| f.variant == "esgz-prio" && f.source == "A")
        .unwrap();
    let blob = FileBlob::open(&fixture.file).unwrap();
    let layer = open_layer(&blob, Some(&fixture.toc_digest)).await.unwrap();
    let first: Vec<&str> = layer.entries()[..5]
        .iter()
        .map(|e| e.path.as_str())
        .collect();
    assert_eq!(
        first,
        [
            "data",
            "data/big-9m.bin",
            "data/small",
            "data/small/file-007",
            "data/text.txt"
        ]
    );
    let range = layer.prefetch_range().unwrap();
    for entry in &layer.entries()[..5] {
        for chunk in &entry.chunks {
            assert!(chunk.compressed.end <= range.end, "{} in range", entry.path);
        }
    }
    for entry in &layer.entries()[5..] {
        for chunk in &entry.chunks {
            assert!(
                chunk.compressed.start >= range.end,
                "{} after range",
                entry.path
            );
        }
    }
}

#[tokio::test]
async fn chunk_extents_match_ctr_remote_layout() {
    let fixture = fixture_layers()
        .into_iter()
        .find(|f| f.variant == "esgz" && f.source == "A")
        .unwrap();
    let blob = FileBlob::open(&fixture.file).unwrap();
    let layer = open_layer(&blob, None).await.unwrap();
    let big = layer
        .entries()
        .iter()
        .find(|e| e.path == "data/big-9m.bin")
        .unwrap();
    let starts: Vec<u64> = big.chunks.iter().map(|c| c.compressed.start).collect();
    assert_eq!(starts, [19150, 48665, 78187]);
    assert_eq!(big.chunks[0].compressed.end, 48665);
    assert_eq!(big.chunks[1].compressed.end, 78187);
    let lens: Vec<u64> = big.chunks.iter().map(|c| c.len).collect();
    assert_eq!(lens, [4194304, 4194304, 1048576]);
    let hardlink = layer
        .entries()
        .iter()
        .find(|e| e.path == "data/hardlink-to-text")
        .unwrap();
    assert_eq!(hardlink.kind, EntryKind::Hardlink);
    assert_eq!(hardlink.link_target.as_deref(), Some("data/text.txt"));
    assert!(layer
        .toc()
        .expect("raw TOC")
        .entries
        .iter()
        .any(|e| e.name == ".no.prefetch.landmark"));
    assert!(!layer.entries().iter().any(|e| e.path.contains("landmark")));
}

#[test]
fn reader_futures_are_send_so_callers_can_spawn_them() {
    fn assert_send<T: Send>(_: &T) {}
    let blob = lazysnap::blob::MemoryBlob(bytes::Bytes::from_static(b""));
    let open = open_layer(&blob, None);
    assert_send(&open);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let layer = rt.block_on(open);
    assert!(layer.is_err());
}

#[tokio::test]
async fn our_footers_are_byte_identical_to_ctr_remote_footers() {
    use lazysnap::estargz::footer::{estargz_footer, zstd_footer, Footer};
    for fixture in fixture_layers() {
        let bytes = std::fs::read(&fixture.file).unwrap();
        let blob = FileBlob::open(&fixture.file).unwrap();
        let layer = open_layer(&blob, None).await.unwrap();
        match layer.footer().expect("an eStargz layer has a footer") {
            Footer::Estargz { toc_offset } => {
                assert_eq!(bytes[bytes.len() - 51..], estargz_footer(toc_offset));
            }
            Footer::ZstdChunked {
                toc_offset,
                compressed_len,
                uncompressed_len,
            } => {
                assert_eq!(
                    bytes[bytes.len() - 48..],
                    zstd_footer(toc_offset, compressed_len, uncompressed_len)
                );
            }
            other => panic!("{}: unexpected footer {other:?}", fixture.variant),
        }
    }
}
