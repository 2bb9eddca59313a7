//! The chunk cache under concurrent inserts, reads and evictions with a tight bound: every
//! answer is the right bytes, the bound holds, and files held open survive eviction.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::estargz::ChunkDigest;

fn chunk(i: usize) -> (ChunkDigest, Bytes) {
    let data: Vec<u8> = (0..(1000 + i * 37))
        .map(|j| (j as u8).wrapping_mul(i as u8 | 1))
        .collect();
    (ChunkDigest::of(&data), Bytes::from(data))
}

#[test]
fn concurrent_inserts_reads_and_evictions_never_return_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bound = 20_000;
    let cache = ChunkCache::open(CacheOptions {
        max_bytes: bound,
        memory_bytes: 8_000,
        ..CacheOptions::new(dir.path())
    })
    .unwrap();
    let chunks: Arc<Vec<(ChunkDigest, Bytes)>> = Arc::new((0..40).map(chunk).collect());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let cache = Arc::clone(&cache);
            let chunks = Arc::clone(&chunks);
            std::thread::spawn(move || {
                for round in 0..300 {
                    let i = (t * 7 + round * 13) % chunks.len();
                    let (d, data) = &chunks[i];
                    match round % 3 {
                        0 => cache.insert(d, data.clone()).unwrap(),
                        1 => {
                            if let Some(got) = cache.get(d) {
                                assert_eq!(&got, data, "wrong bytes for chunk {i}");
                            }
                        }
                        _ => {
                            if let Some(got) = cache.read_at(d, 100, 500) {
                                assert_eq!(&got[..], &data[100..600], "wrong range of chunk {i}");
                            }
                        }
                    }
                    assert!(cache.stats().disk_bytes <= bound);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = cache.stats();
    assert!(stats.disk_bytes <= bound, "{stats:?}");
    assert!(stats.evictions > 0);
    // The index matches the files on disk.
    let mut on_disk = 0u64;
    for shard in std::fs::read_dir(dir.path().join("chunks/sha256")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            on_disk += f.unwrap().metadata().unwrap().len();
        }
    }
    assert_eq!(on_disk, stats.disk_bytes);
}

#[test]
fn an_open_chunk_file_survives_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(CacheOptions {
        max_bytes: 3_000,
        memory_bytes: 0,
        ..CacheOptions::new(dir.path())
    })
    .unwrap();
    let (d0, data0) = chunk(0);
    cache.insert(&d0, data0.clone()).unwrap();
    let mut file = cache.open_file(&d0).unwrap();
    for i in 1..6 {
        let (d, data) = chunk(i);
        cache.insert(&d, data).unwrap();
    }
    assert!(!cache.contains(&d0), "chunk 0 should have been evicted");
    let mut held = Vec::new();
    file.read_to_end(&mut held).unwrap();
    assert_eq!(held, data0);
    assert!(cache.get(&d0).is_none());
}
