//! Writer round trips: a generated tar holding every entry type is converted to eStargz and
//! zstd:chunked; the result opens and verifies with our reader, extracts with GNU tar to the same
//! tree as the original, has the digests it reports, and does not depend on the thread count.
//! Where the writer puts things (priorities, landmarks, recorded reads) is `estargz_layout.rs`.

mod estargz_common;
use estargz_common::*;

use std::collections::BTreeMap;
use std::io::Read;

use bytes::Bytes;
use lazysnap::blob::MemoryBlob;
use lazysnap::estargz::{
    build_layer, decompressed_reader, open_layer, verify_layer, Compression, EntryKind, Landmark,
    UNCOMPRESSED_SIZE_ANNOTATION, ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
};
use lazysnap::labels;
use sha2::{Digest, Sha256};
use tar::EntryType;

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
