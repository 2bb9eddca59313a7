//! LayerReader over real gzip / zstd chunk members in memory blobs, through counting, failing,
//! slow and corrupting blob wrappers: correct bytes, singleflight, cross-layer sharing,
//! verification, deadlines, cache bound, restart reuse, prefetch and background fill.

mod fetch_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lazysnap::estargz::{Compression, PrefetchPlan};
use lazysnap::fetch::FetchOptions;

use fetch_common::*;

#[test]
fn reads_return_correct_bytes_at_all_offsets_gzip_and_zstd() {
    for compression in [Compression::Gzip, Compression::Zstd] {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let mut layer = build_layer(sample_contents(), CHUNK, compression, b"HEADER");
        add_packed_file(
            &mut layer,
            compression,
            pseudo_random(50, 300),
            pseudo_random(51, 700),
        );
        let (blob, _controls) = TestBlob::new(layer.blob.clone());
        // Memory tier off so cached reads also come through disk `pread`s.
        let cache = cache_in(dir.path(), 1 << 30, 0);
        let r = reader(
            &rt,
            blob,
            &layer,
            compression,
            &cache,
            quiet_options(),
            "all-offsets",
        );
        for (id, content) in layer.contents.iter().enumerate() {
            let len = content.len() as u64;
            for size in [1u32, 7, 999, 1000, 1001, 4096, 131072] {
                let mut offset = 0;
                while offset <= len + 3 {
                    let got = read_blocking(&r, id as u64, offset, size).unwrap_or_else(|e| {
                        panic!("file {id} offset {offset} size {size}: errno {e}")
                    });
                    assert_eq!(
                        &got[..],
                        expected(content, offset, size),
                        "{compression:?} file {id} offset {offset} size {size}"
                    );
                    offset += 137;
                }
            }
        }
        assert_eq!(read_blocking(&r, 999, 0, 10), Err(libc::EIO));
        let stats = r.stats();
        assert_eq!(stats.fetched_chunks, stats.total_chunks);
        assert!(stats.on_demand_bytes > 0 && stats.cache_hits > 0);
    }
}

#[test]
fn sixty_four_concurrent_readers_fetch_each_chunk_once() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(7, 8 * CHUNK + 5);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Gzip, b"H");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    controls.delay_ms.store(100, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "concurrent",
    );
    let threads: Vec<_> = (0..64)
        .map(|t| {
            let r = Arc::clone(&r);
            let content = content.clone();
            std::thread::spawn(move || {
                // Each reader walks the file with a different read size, starting at a
                // different place, as FUSE threads serving several processes would.
                let size = 300 + (t as u32 * 37) % 900;
                let start = (t as u64 * 211) % content.len() as u64;
                let mut offset = start;
                loop {
                    let got = read_blocking(&r, 0, offset, size).unwrap();
                    assert_eq!(&got[..], expected(&content, offset, size));
                    offset += size as u64;
                    if offset >= content.len() as u64 {
                        offset = 0;
                    }
                    if offset <= start && offset + size as u64 > start {
                        break;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for c in &layer.files[0].chunks {
        assert_eq!(
            controls.count_covering(&c.compressed),
            1,
            "chunk {} fetched more than once: {:?}",
            c.digest,
            controls.requests()
        );
    }
}

#[test]
fn shared_chunks_across_two_layers_are_fetched_once() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let shared = pseudo_random(11, 4 * CHUNK);
    let only_b = pseudo_random(12, 2 * CHUNK);
    let layer_a = build_layer(vec![shared.clone()], CHUNK, Compression::Gzip, b"AAAA");
    // Same file at other blob offsets in layer B, plus a file of its own.
    let layer_b = build_layer(
        vec![only_b.clone(), shared.clone()],
        CHUNK,
        Compression::Gzip,
        b"B",
    );
    let (blob_a, ctl_a) = TestBlob::new(layer_a.blob.clone());
    let (blob_b, ctl_b) = TestBlob::new(layer_b.blob.clone());
    ctl_a.delay_ms.store(150, Ordering::SeqCst);
    ctl_b.delay_ms.store(150, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    let ra = reader(
        &rt,
        blob_a,
        &layer_a,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "a",
    );
    let rb = reader(
        &rt,
        blob_b,
        &layer_b,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "b",
    );
    // Both layers read the shared file at the same moment.
    let ta = {
        let ra = Arc::clone(&ra);
        std::thread::spawn(move || read_blocking(&ra, 0, 0, 1 << 20).unwrap())
    };
    let tb = {
        let rb = Arc::clone(&rb);
        std::thread::spawn(move || read_blocking(&rb, 1, 0, 1 << 20).unwrap())
    };
    assert_eq!(&ta.join().unwrap()[..], &shared[..]);
    assert_eq!(&tb.join().unwrap()[..], &shared[..]);
    for (ca, cb) in layer_a.files[0].chunks.iter().zip(&layer_b.files[1].chunks) {
        assert_eq!(ca.digest, cb.digest);
        let total = ctl_a.count_covering(&ca.compressed) + ctl_b.count_covering(&cb.compressed);
        assert_eq!(total, 1, "shared chunk {} fetched {total} times", ca.digest);
    }
    // A later reader of the shared file in B costs no request at all.
    let before = ctl_b.requests().len();
    assert_eq!(
        &read_blocking(&rb, 1, 1500, 2000).unwrap()[..],
        &shared[1500..3500]
    );
    assert_eq!(ctl_b.requests().len(), before);
    assert_eq!(&read_blocking(&rb, 0, 0, 10_000).unwrap()[..], &only_b[..]);
}

#[test]
fn corrupt_chunk_is_refetched_then_gives_eio_is_not_cached_and_is_counted_by_layer_and_reason() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(21, 3 * CHUNK);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Gzip, b"HDR");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let bad = layer.files[0].chunks[1].clone();
    // Flip a byte in the middle of the second chunk's deflate data.
    controls.corrupt_at.store(
        (bad.compressed.start + bad.compressed.end) / 2,
        Ordering::SeqCst,
    );
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "layer-corrupt-test",
    );
    assert_eq!(read_blocking(&r, 0, 0, 100).unwrap()[..], content[..100]);
    // Bad bytes are fetched again (they came over the network; the next answer may be right),
    // a bounded number of times, then the read fails.
    assert_eq!(read_blocking(&r, 0, CHUNK as u64 + 5, 100), Err(libc::EIO));
    assert!(!cache.contains(&bad.digest), "unverified chunk was cached");
    let attempts = 1 + u64::from(FetchOptions::default().retries);
    assert_eq!(r.stats().verify_failures, attempts);
    // Counted by layer and reason; the chunk digest goes to the log, never into a label (a
    // registry serving bad bytes must not grow the metrics without bound).
    let text = lazysnap::metrics::encode();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("lazysnap_chunk_verify_failures_total{layer=\"layer-corrupt-test\"")
        })
        .collect();
    assert_eq!(series.len(), 1, "{text}");
    assert!(
        series[0].contains("reason=\"digest_mismatch\"")
            || series[0].contains("reason=\"undecodable\""),
        "{text}"
    );
    assert!(!text.contains(&bad.digest.to_string()), "{text}");
    // A read spanning the bad chunk fails as a whole; nothing unverified leaks.
    assert_eq!(read_blocking(&r, 0, 900, 300), Err(libc::EIO));
    // Once the source answers right, the same read succeeds.
    controls.corrupt_at.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(
        &read_blocking(&r, 0, CHUNK as u64 + 5, 100).unwrap()[..],
        &content[CHUNK + 5..CHUNK + 105]
    );
    // One bad answer costs the read nothing but a second request.
    let third = &layer.files[0].chunks[2];
    let failures = r.stats().verify_failures;
    controls.corruptions_left.store(1, Ordering::SeqCst);
    controls.corrupt_at.store(
        (third.compressed.start + third.compressed.end) / 2,
        Ordering::SeqCst,
    );
    assert_eq!(
        &read_blocking(&r, 0, 2 * CHUNK as u64, 100).unwrap()[..],
        &content[2 * CHUNK..2 * CHUNK + 100]
    );
    assert_eq!(r.stats().verify_failures, failures + 1);
}

#[test]
fn dead_source_gives_eio_within_the_deadline_then_recovers() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(31, 4 * CHUNK);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Zstd, b"Z");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    let opts = FetchOptions {
        deadline: Duration::from_secs(3),
        attempt_timeout: Duration::from_millis(500),
        retries: 2,
        ..quiet_options()
    };
    let r = reader(&rt, blob, &layer, Compression::Zstd, &cache, opts, "dead");
    assert_eq!(&read_blocking(&r, 0, 0, 10).unwrap()[..], &content[..10]);

    // A source that accepts requests but never answers.
    controls.hang.store(true, Ordering::SeqCst);
    let asked_before = controls.requests().len();
    assert_eq!(read_blocking(&r, 0, 2000, 10), Err(libc::EIO));
    let attempts = controls.requests().len() - asked_before;
    assert!(
        (1..=3).contains(&attempts),
        "{attempts} attempts, retries bounded to 2"
    );
    // Cached data keeps being served.
    assert_eq!(&read_blocking(&r, 0, 5, 10).unwrap()[..], &content[5..15]);

    // A source that refuses at once.
    controls.hang.store(false, Ordering::SeqCst);
    controls.refuse.store(true, Ordering::SeqCst);
    assert_eq!(read_blocking(&r, 0, 3000, 10), Err(libc::EIO));

    // Back up: the same reads succeed.
    controls.refuse.store(false, Ordering::SeqCst);
    assert_eq!(
        &read_blocking(&r, 0, 2000, 10).unwrap()[..],
        &content[2000..2010]
    );
    assert_eq!(
        &read_blocking(&r, 0, 3000, 10).unwrap()[..],
        &content[3000..3010]
    );
}

#[test]
fn cache_size_bound_holds_under_pressure_while_reads_succeed() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(41, 20 * CHUNK);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Gzip, b"P");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let bound = 3 * CHUNK as u64;
    let cache = cache_in(dir.path(), bound, 0);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "pressure",
    );
    for round in 0..2 {
        let mut offset = 0;
        while offset < content.len() as u64 {
            let got = read_blocking(&r, 0, offset, 700).unwrap();
            assert_eq!(
                &got[..],
                expected(&content, offset, 700),
                "round {round} offset {offset}"
            );
            let stats = cache.stats();
            assert!(stats.disk_bytes <= bound, "{stats:?}");
            offset += 700;
        }
    }
    assert!(cache.stats().evictions >= 17);
    // Evicted chunks were refetched in the second round.
    assert!(controls.requests().len() > 20);
}

#[test]
fn restart_reuses_the_cache_without_fetching() {
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(51, 6 * CHUNK + 3);
    let layer = build_layer(vec![content.clone()], CHUNK, Compression::Gzip, b"R");
    {
        let rt = runtime();
        let (blob, _c) = TestBlob::new(layer.blob.clone());
        let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
        let r = reader(
            &rt,
            blob,
            &layer,
            Compression::Gzip,
            &cache,
            quiet_options(),
            "before",
        );
        assert_eq!(&read_blocking(&r, 0, 0, 1 << 20).unwrap()[..], &content[..]);
    }
    let rt = runtime();
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    controls.refuse.store(true, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 1 << 20);
    assert_eq!(cache.stats().disk_entries, 7);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "after",
    );
    assert_eq!(&read_blocking(&r, 0, 0, 1 << 20).unwrap()[..], &content[..]);
    assert_eq!(
        &read_blocking(&r, 0, 2500, 1000).unwrap()[..],
        &content[2500..3500]
    );
    assert!(controls.requests().is_empty());
    assert_eq!(r.stats().fetched_chunks, 7);
}

#[test]
fn prefetch_fetches_the_prioritized_range_in_one_request() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..5).map(|i| pseudo_random(60 + i, 2 * CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"PF");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        prefetch: true,
        scheduler: scheduler(1, 1 << 20),
        ..quiet_options()
    };
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        opts,
        "prefetch",
    );
    // Prioritized: files 0..3 (six chunks), as if a landmark followed them.
    let range = layer.files[0].chunks[0].compressed.start..layer.files[2].chunks[1].compressed.end;
    r.start_prefetch(Some(range.clone().into()));
    wait_until("prefetch done", || r.stats().prefetch_done);
    assert_eq!(controls.requests(), vec![range.clone()]);
    for f in &layer.files[..3] {
        for c in &f.chunks {
            assert!(cache.contains(&c.digest));
        }
    }
    for f in &layer.files[3..] {
        for c in &f.chunks {
            assert!(!cache.contains(&c.digest), "background fill is off");
        }
    }
    let stats = r.stats();
    assert_eq!(stats.prefetch_bytes, range.end - range.start);
    assert_eq!((stats.fetched_chunks, stats.total_chunks), (6, 10));
    // Prefetched files read without requests.
    assert_eq!(
        &read_blocking(&r, 1, 0, 4096).unwrap()[..],
        &contents[1][..]
    );
    assert_eq!(controls.requests().len(), 1);
}

#[test]
fn prefetch_sends_no_bytes_of_the_chunks_a_plan_skips() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    // Files of 8 chunks: file 1's compressed bytes are more than a tar header's gap.
    let contents: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(70 + i, 8 * CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"SK");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        prefetch: true,
        scheduler: scheduler(1, 4 << 20),
        ..quiet_options()
    };
    let r = reader(&rt, blob, &layer, Compression::Gzip, &cache, opts, "skip");
    // Prioritized: files 0..3, of which the record says file 1 was not read (an optimized
    // image's unread part of a file): the prefetch must not send file 1's bytes, even though
    // one request for files 0 to 2 would fit its window.
    let span = |file: usize| {
        let chunks = &layer.files[file].chunks;
        chunks[0].compressed.start..chunks[chunks.len() - 1].compressed.end
    };
    let plan = PrefetchPlan {
        range: span(0).start..span(2).end,
        skipped: layer.files[1]
            .chunks
            .iter()
            .map(|c| c.compressed.start)
            .collect(),
    };
    r.start_prefetch(Some(plan));
    wait_until("prefetch done", || r.stats().prefetch_done);
    let mut requests = controls.requests();
    requests.sort_by_key(|range| range.start);
    assert_eq!(requests, vec![span(0), span(2)]);
    for c in &layer.files[1].chunks {
        assert!(!cache.contains(&c.digest), "a skipped chunk was fetched");
    }
    let sent: u64 = requests.iter().map(|range| range.end - range.start).sum();
    assert_eq!(r.stats().prefetch_bytes, sent);
}

#[test]
fn background_fill_yields_to_on_demand_reads_then_fills_everything() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(70 + i, 3 * CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"BG");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let scheduler = scheduler(1, 4 * CHUNK as u64);
    let opts = FetchOptions {
        background: true,
        scheduler: Arc::clone(&scheduler),
        ..quiet_options()
    };
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        opts,
        "background",
    );
    // An on-demand read is in flight (e.g. in another layer) before the fill starts.
    let waiting = scheduler.on_demand();
    r.start_prefetch(None);
    wait_until("prefetch phase done", || r.stats().prefetch_done);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        controls.requests().is_empty(),
        "background fill ran while an on-demand read was waiting: {:?}",
        controls.requests()
    );
    // The layer's own on-demand reads still go through meanwhile.
    assert_eq!(
        &read_blocking(&r, 2, 10, 20).unwrap()[..],
        &contents[2][10..30]
    );
    assert_eq!(controls.requests().len(), 1);
    drop(waiting);
    wait_until("background fill done", || r.stats().background_done);
    let stats = r.stats();
    assert_eq!(stats.fetched_chunks, stats.total_chunks);
    assert!(stats.background_bytes > 0);
    assert_eq!(
        stats.on_demand_bytes,
        layer.files[2].chunks[0].compressed.end - layer.files[2].chunks[0].compressed.start
    );
    // Requests were coalesced (at most two chunks each), none repeated.
    for c in layer.files.iter().flat_map(|f| &f.chunks) {
        assert_eq!(controls.count_covering(&c.compressed), 1);
    }
    assert!(controls.requests().len() < 12);
}

#[test]
fn shutdown_stops_background_fill() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..10).map(|i| pseudo_random(80 + i, 2 * CHUNK)).collect();
    let layer = build_layer(contents, CHUNK, Compression::Gzip, b"SD");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    controls.delay_ms.store(200, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        background: true,
        ..quiet_options()
    };
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        opts,
        "shutdown",
    );
    r.start_prefetch(None);
    wait_until("a background request", || !controls.requests().is_empty());
    r.shutdown();
    std::thread::sleep(Duration::from_millis(600));
    let after = controls.requests().len();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        controls.requests().len(),
        after,
        "requests continued after shutdown"
    );
    assert!(!r.stats().background_done);
    assert!(after < 20);
}
