//! Unit tests of the chunk cache: tiers, bounds, watermarks, crash leftovers, assembly.

use std::io::Read;
use std::time::SystemTime;

use super::index::DiskFill;
use super::*;

fn digest_of(data: &[u8]) -> ChunkDigest {
    ChunkDigest::of(data)
}

fn chunk_file(dir: &Path, digest: &ChunkDigest) -> PathBuf {
    let hex = digest.hex();
    dir.join("chunks/sha256").join(&hex[..2]).join(hex)
}

fn opts(dir: &Path, max: u64, mem: u64) -> CacheOptions {
    CacheOptions {
        max_bytes: max,
        memory_bytes: mem,
        ..CacheOptions::new(dir)
    }
}

#[test]
fn the_cache_is_readable_by_its_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = ChunkCache::open(opts(&root, 1 << 20, 0)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700, "an existing open cache dir is closed");
    let data = Bytes::from_static(b"decompressed image data");
    let d = digest_of(&data);
    cache.insert(&d, data).unwrap();
    let text = d.to_string();
    let hex = &text["sha256:".len()..];
    let file = root.join("chunks/sha256").join(&hex[..2]).join(hex);
    assert_eq!(mode(&file), 0o600);
}

#[test]
fn insert_then_get_and_read_at_from_both_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
    let data = Bytes::from((0..5000u32).map(|i| i as u8).collect::<Vec<_>>());
    let d = digest_of(&data);
    assert!(cache.get(&d).is_none());
    cache.insert(&d, data.clone()).unwrap();
    assert!(cache.contains(&d));
    assert_eq!(cache.get(&d).unwrap(), data);
    assert_eq!(cache.read_at(&d, 4990, 100).unwrap(), data.slice(4990..));
    assert_eq!(cache.read_at(&d, 6000, 10).unwrap().len(), 0);
    // The file name is the digest's hex, as caches written by earlier versions have it.
    let text = d.to_string();
    let hex = &text["sha256:".len()..];
    assert!(dir
        .path()
        .join("chunks/sha256")
        .join(&hex[..2])
        .join(hex)
        .is_file());
    let stats = cache.stats();
    assert_eq!(stats.disk_hits, 3);
    assert_eq!(stats.misses, 1);
    assert_eq!(stats.disk_bytes, 5000);

    let cache2_dir = tempfile::tempdir().unwrap();
    let mem_cache = ChunkCache::open(opts(cache2_dir.path(), 1 << 20, 1 << 20)).unwrap();
    // Remembered, a chunk is read from memory until it is on disk; then it leaves the tier.
    assert!(mem_cache.remember(&d, data.clone()));
    assert_eq!(mem_cache.read_at(&d, 10, 10).unwrap(), data.slice(10..20));
    assert_eq!(mem_cache.stats().memory_hits, 1);
    mem_cache.insert(&d, data.clone()).unwrap();
    assert_eq!(mem_cache.stats().memory_bytes, 0);
    assert_eq!(mem_cache.read_at(&d, 10, 10).unwrap(), data.slice(10..20));
    assert_eq!(mem_cache.stats().disk_hits, 1);
    // A chunk read again whole (`get`) is loaded into the memory tier and served from it.
    assert_eq!(mem_cache.get(&d).unwrap(), data);
    assert_eq!(mem_cache.read_at(&d, 10, 10).unwrap(), data.slice(10..20));
    assert_eq!(mem_cache.stats().memory_hits, 2);
}

#[test]
fn a_large_chunk_written_in_place_is_room_made_first_and_served_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(opts(dir.path(), 3000, 0)).unwrap();
    let small: Vec<Bytes> = (0..2u8).map(|i| Bytes::from(vec![i; 1000])).collect();
    for chunk in &small {
        cache.insert(&digest_of(chunk), chunk.clone()).unwrap();
    }
    let large = Bytes::from((0..2000u32).map(|i| i as u8).collect::<Vec<_>>());
    let key = digest_of(&large);
    let begin = |key, len| futures::executor::block_on(cache.begin_large(key, len));
    let file = begin(&key, large.len() as u64).unwrap();
    // Room was made before the first byte is written: what is cached plus what is being
    // written stays within the bound.
    assert!(cache.stats().disk_bytes + large.len() as u64 <= 3000);
    assert!(!cache.contains(&digest_of(&small[0])));
    let mut writer = file.writer().unwrap();
    writer.write_all(&large).unwrap();
    writer.flush().unwrap();
    drop(writer);
    let mapped = cache.finish_large(&key, file).unwrap();
    assert_eq!(mapped, large);
    assert_eq!(cache.read_at(&key, 1990, 100).unwrap(), large.slice(1990..));
    assert!(cache.stats().disk_bytes <= 3000);
    // A large chunk abandoned before it is finished leaves no file and no reservation.
    let other = digest_of(b"abandoned");
    let writing = begin(&other, 2500).unwrap();
    // While it is being written, no other write fits the bound: a small chunk is refused
    // (served uncached), a large one waits for room.
    let small_chunk = Bytes::from(vec![7u8; 1000]);
    assert!(matches!(
        cache.insert(&digest_of(&small_chunk), small_chunk.clone()),
        Err(CacheError::WritesInFlight { .. })
    ));
    let waits = digest_of(b"waits");
    let waiting = cache.begin_large(&waits, 1000);
    futures::pin_mut!(waiting);
    assert!(futures::executor::block_on(futures::future::poll_immediate(&mut waiting)).is_none());
    drop(writing);
    assert!(futures::executor::block_on(waiting).is_ok());
    assert!(!cache.contains(&other));
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    cache
        .insert(&digest_of(&small[1]), small[1].clone())
        .unwrap();
    assert!(cache.contains(&digest_of(&small[1])));
    // Larger than the whole bound: refused, not written.
    assert!(matches!(
        begin(&other, 4000),
        Err(CacheError::TooLarge { .. })
    ));
}

#[test]
fn size_bound_evicts_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(opts(dir.path(), 3000, 0)).unwrap();
    let chunks: Vec<Bytes> = (0..5u8).map(|i| Bytes::from(vec![i; 1000])).collect();
    let digests: Vec<ChunkDigest> = chunks.iter().map(|c| digest_of(c)).collect();
    for i in 0..3 {
        cache.insert(&digests[i], chunks[i].clone()).unwrap();
    }
    // Touch chunk 0 so chunk 1 is the least recently used.
    assert!(cache.get(&digests[0]).is_some());
    cache.insert(&digests[3], chunks[3].clone()).unwrap();
    assert!(cache.contains(&digests[0]));
    assert!(!cache.contains(&digests[1]));
    assert!(cache.stats().disk_bytes <= 3000);
    cache.insert(&digests[4], chunks[4].clone()).unwrap();
    assert!(!cache.contains(&digests[2]));
    assert_eq!(cache.stats().evictions, 2);
    assert!(cache.stats().disk_bytes <= 3000);
    assert!(matches!(
        cache.insert(&digest_of(&[9; 4000]), Bytes::from(vec![9; 4000])),
        Err(CacheError::TooLarge { .. })
    ));
}

#[test]
fn reopen_reuses_chunks_removes_temps_and_detects_torn_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = Bytes::from(vec![7u8; 3000]);
    let torn = Bytes::from(vec![8u8; 3000]);
    let (dg, dt) = (digest_of(&good), digest_of(&torn));
    {
        let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 1 << 20)).unwrap();
        cache.insert(&dg, good.clone()).unwrap();
        cache.insert(&dt, torn.clone()).unwrap();
        assert!(matches!(
            ChunkCache::open(opts(dir.path(), 1 << 20, 0)),
            Err(CacheError::Locked { .. })
        ));
    }
    // Simulate a crash: a leftover temp file and a chunk file cut short.
    std::fs::write(dir.path().join("tmp/123-0.part"), b"partial").unwrap();
    let torn_path = chunk_file(dir.path(), &dt);
    std::fs::write(&torn_path, vec![8u8; 10]).unwrap();
    let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 1 << 20)).unwrap();
    assert!(!dir.path().join("tmp/123-0.part").exists());
    assert_eq!(cache.stats().disk_entries, 2);
    assert_eq!(cache.get(&dg).unwrap(), good);
    assert!(cache.read_at(&dt, 0, 5).is_none());
    assert!(!torn_path.exists());
    assert_eq!(cache.stats().corrupt_removed, 1);
}

#[test]
fn assembled_files_are_checked_written_once_and_reverified_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let parts: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; 1500])).collect();
    let keys: Vec<ChunkDigest> = parts.iter().map(|p| digest_of(p)).collect();
    let whole_bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let whole = digest_of(&whole_bytes);
    let read_all = |file: File| {
        let mut data = Vec::new();
        (&file).read_to_end(&mut data).unwrap();
        data
    };
    {
        let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
        cache.insert(&keys[0], parts[0].clone()).unwrap();
        cache.insert(&keys[1], parts[1].clone()).unwrap();
        // A part missing: nothing written.
        assert!(!cache.assemble(&whole, &keys, 4500).unwrap());
        assert!(!cache.contains(&whole));
        cache.insert(&keys[2], parts[2].clone()).unwrap();
        // Parts that do not make the claimed file: an error, nothing stored.
        let other = digest_of(b"something else");
        assert!(matches!(
            cache.assemble(&other, &keys, 4500),
            Err(CacheError::AssembledMismatch { .. })
        ));
        assert!(!cache.contains(&other));
        assert!(cache.assemble(&whole, &keys, 4500).unwrap());
        assert_eq!(read_all(cache.open_file(&whole).unwrap()), whole_bytes);
        // Present already: checked against the parts, not rewritten.
        let inserts = cache.stats().inserts;
        assert!(cache.assemble(&whole, &keys, 4500).unwrap());
        assert_eq!(cache.stats().inserts, inserts);
        // Parts in another order do not make it.
        let swapped = [keys[1], keys[0], keys[2]];
        assert!(cache.assemble(&whole, &swapped, 4500).is_err());
        assert!(cache.contains(&whole));
    }
    // After a restart the entry is unverified: opening it hashes it first.
    let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
    assert_eq!(read_all(cache.open_file(&whole).unwrap()), whole_bytes);
    drop(cache);
    std::fs::write(chunk_file(dir.path(), &whole), vec![0u8; 4500]).unwrap();
    let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
    assert!(cache.open_file(&whole).is_none());
    assert_eq!(cache.stats().corrupt_removed, 1);
}

#[test]
fn reopen_with_smaller_bound_evicts_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<Bytes> = (0..4u8).map(|i| Bytes::from(vec![i; 1000])).collect();
    let digests: Vec<ChunkDigest> = chunks.iter().map(|c| digest_of(c)).collect();
    {
        let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
        for (i, c) in chunks.iter().enumerate() {
            cache.insert(&digests[i], c.clone()).unwrap();
            let path = chunk_file(dir.path(), &digests[i]);
            let when = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            File::open(path).unwrap().set_modified(when).unwrap();
        }
    }
    let cache = ChunkCache::open(opts(dir.path(), 2000, 0)).unwrap();
    assert!(!cache.contains(&digests[0]));
    assert!(!cache.contains(&digests[1]));
    assert!(cache.contains(&digests[2]));
    assert!(cache.contains(&digests[3]));
}

#[test]
fn watermarks_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 1 << 20, 0);
    o.high_watermark_pct = Some(80);
    o.low_watermark_pct = Some(85);
    assert!(matches!(ChunkCache::open(o), Err(CacheError::Options(_))));
}

#[test]
fn fullness_is_dfs_so_a_root_reserve_is_not_counted_as_used() {
    // 270 GB disk, 209 GB free of which 36 GB usable without root (a large reserve): df says
    // 61 GB used of 97 GB, 63 %, not the 87 % that counting the reserve as used gives.
    let gb = 1_000_000_000;
    let fill = DiskFill::of(270 * gb, 209 * gb, 36 * gb).unwrap();
    assert_eq!(
        fill,
        DiskFill {
            used: 61 * gb,
            capacity: 97 * gb
        }
    );
    assert_eq!(fill.used * 100 / fill.capacity, 62);
    // No reserve: used over total.
    let fill = DiskFill::of(100, 30, 30).unwrap();
    assert_eq!(
        fill,
        DiskFill {
            used: 70,
            capacity: 100
        }
    );
    assert_eq!(DiskFill::of(0, 0, 0), None);
}

/// A cache opened `secs` seconds ago, as far as the recency of its entries goes.
fn open_aged(o: CacheOptions, secs: u64) -> Arc<ChunkCache> {
    let mut cache = ChunkCache::open(o).unwrap();
    Arc::get_mut(&mut cache).unwrap().opened = std::time::Instant::now()
        .checked_sub(std::time::Duration::from_secs(secs))
        .expect("the machine has been up longer than the age asked for");
    cache
}

#[test]
fn watermark_below_current_usage_evicts_all_but_the_newest_chunk_when_none_is_in_use() {
    // high = 1 %: any real filesystem is above it, so every insert evicts towards low = 0 %,
    // which the cache can never reach. The chunk stored first is made older than the spare
    // window, so it goes; the one just stored is kept.
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 1 << 20, 0);
    o.high_watermark_pct = Some(1);
    o.low_watermark_pct = Some(0);
    let cache = open_aged(o, 10 * index::WATERMARK_SPARE_SECS);
    let a = Bytes::from(vec![1u8; 100]);
    let b = Bytes::from(vec![2u8; 100]);
    cache.insert(&digest_of(&a), a.clone()).unwrap();
    lock(&cache.disk)
        .lru
        .peek_mut(&digest_of(&a))
        .unwrap()
        .touched = 1;
    cache.insert(&digest_of(&b), b.clone()).unwrap();
    assert_eq!(cache.stats().disk_entries, 1);
    assert!(cache.contains(&digest_of(&b)));
    assert!(!cache.contains(&digest_of(&a)));
    assert_eq!(cache.stats().evictions, 1);
}

#[test]
fn watermark_eviction_spares_chunks_in_use_up_to_the_headroom() {
    // Any real filesystem is above 1 % full: every insert evicts towards 0 %. Chunks used in the
    // last two minutes stay while they fit in the headroom above the high watermark.
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 1 << 20, 0);
    o.high_watermark_pct = Some(1);
    o.low_watermark_pct = Some(0);
    let cache = open_aged(o, 10 * index::WATERMARK_SPARE_SECS);
    let chunks: Vec<Bytes> = (1..=3u8).map(|i| Bytes::from(vec![i; 100])).collect();
    for c in &chunks {
        cache.insert(&digest_of(c), c.clone()).unwrap();
    }
    assert_eq!(cache.stats().disk_entries, 3, "chunks in use were evicted");
    assert_eq!(cache.stats().evictions, 0);
}

#[test]
fn a_named_chunk_is_trusted_after_reopen_by_the_digest_recorded_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let span = Bytes::from(vec![5u8; 3000]);
    let corrupt = Bytes::from(vec![6u8; 3000]);
    let (named, unnamed) = (
        digest_of(b"span 0 of a zTOC"),
        digest_of(b"span 1 of a zTOC"),
    );
    {
        let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
        cache.insert_named(&named, span.clone()).unwrap();
        cache.insert_named(&unnamed, corrupt.clone()).unwrap();
    }
    // A named chunk's bytes changed on disk no longer match the digest recorded with them.
    let changed = chunk_file(dir.path(), &unnamed);
    let mut bytes = std::fs::read(&changed).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&changed, bytes).unwrap();
    let cache = ChunkCache::open(opts(dir.path(), 1 << 20, 0)).unwrap();
    assert_eq!(cache.get(&named).unwrap(), span);
    assert!(cache.get(&unnamed).is_none());
    assert_eq!(cache.stats().corrupt_removed, 1);
}
