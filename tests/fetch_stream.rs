//! LayerReader streaming and assembly over the `fetch_common` harness: files assembled for
//! passthrough (and never when their digest disagrees), chunks and runs streamed in pieces with
//! broken streams retried, slow links, inconsistent chunk lists, background fill's concurrency
//! across layers, and warming a layer whose chunks another layer is fetching.

mod fetch_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lazysnap::blob::BlobSource;
use lazysnap::cache::ChunkCache;
use lazysnap::estargz::Compression;
use lazysnap::fetch::{FetchOptions, LayerReader};
use lazysnap_fuse::ContentSource;

use fetch_common::*;

/// Everything in `file`.
fn file_bytes(file: &std::fs::File) -> Vec<u8> {
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut &*file, &mut data).unwrap();
    data
}

/// Asks for file `index`'s local file until the layer has assembled `assembled` files.
fn local_file_once_assembled(r: &LayerReader, index: u64, assembled: u64) -> Option<std::fs::File> {
    for _ in 0..500 {
        let file = r.local_file(index);
        if r.stats().files_assembled >= assembled {
            return r.local_file(index);
        }
        drop(file);
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("file {index} was not assembled within 10 s");
}

#[test]
fn cached_files_offer_a_local_file_for_passthrough() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents = vec![pseudo_random(90, 500), pseudo_random(91, 2500)];
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"LF");
    let (blob, _c) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "local",
    );
    assert!(r.local_file(0).is_none(), "not cached yet");
    assert!(r.local_file(1).is_none(), "not cached yet");
    read_blocking(&r, 0, 0, 1000).unwrap();
    read_blocking(&r, 1, 0, 5000).unwrap();
    let file = r.local_file(0).expect("single cached chunk");
    assert_eq!(file_bytes(&file), contents[0]);
    // A file of three chunks: the first open once all are cached assembles it in the
    // background; later opens get the assembled file.
    assert_eq!(r.stats().files_assembled, 0);
    let file = local_file_once_assembled(&r, 1, 1).expect("assembled multi-chunk file");
    assert_eq!(file_bytes(&file), contents[1]);
    // A second layer with the same file checks the assembled file against its own chunks
    // (without writing it again) before it passes through too.
    let (blob, _c) = TestBlob::new(layer.blob.clone());
    let again = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "local-again",
    );
    let file = local_file_once_assembled(&again, 1, 1).expect("checked assembled file");
    assert_eq!(file_bytes(&file), contents[1]);
}

#[test]
fn files_whose_digest_disagrees_with_their_chunks_are_never_assembled() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents = vec![pseudo_random(92, 2500), pseudo_random(93, 3500)];
    let mut layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"LD");
    // File 0 claims file 1's content digest: assembling it must not store its bytes under it.
    layer.files[0].file_digest = Some(digest(&contents[1]));
    let (blob, _c) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "lying",
    );
    assert_eq!(read_blocking(&r, 0, 0, 5000).unwrap(), contents[0]);
    read_blocking(&r, 1, 0, 5000).unwrap();
    // File 1 gets assembled; file 0 never is, and file 1's entry keeps file 1's bytes.
    let file = local_file_once_assembled(&r, 1, 1).expect("file 1 assembled");
    for _ in 0..20 {
        assert!(r.local_file(0).is_none());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(r.stats().files_assembled, 1);
    assert_eq!(file_bytes(&file), contents[1]);
    assert_eq!(read_blocking(&r, 0, 0, 5000).unwrap(), contents[0]);
}

/// A reader of a layer holding one file, `content` in chunks of [`CHUNK`], whose blob source
/// streams in 100-byte pieces under test controls; its cache (under `dir`, one per compression)
/// keeps nothing in memory.
fn streaming_reader(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    content: &[u8],
    compression: Compression,
    options: FetchOptions,
) -> (TestLayer, Arc<Controls>, Arc<ChunkCache>, Arc<LayerReader>) {
    let layer = build_layer(vec![content.to_vec()], CHUNK, compression, b"ST");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(&dir.join(format!("{compression:?}")), 1 << 30, 0);
    let r = reader(rt, blob, &layer, compression, &cache, options, "stream");
    (layer, controls, cache, r)
}

#[test]
fn a_chunk_streams_in_pieces_and_a_broken_stream_is_retried_whole() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(40, 3 * CHUNK);
    for compression in [Compression::Gzip, Compression::Zstd] {
        let (layer, controls, cache, r) =
            streaming_reader(&rt, dir.path(), &content, compression, quiet_options());
        // A read waiting on one chunk streams it (in 100-byte pieces here).
        assert_eq!(
            &read_blocking(&r, 0, 10, 100).unwrap()[..],
            &content[10..110]
        );
        assert_eq!(controls.streams.load(Ordering::SeqCst), 1);
        // A stream broken half way: the chunk is fetched again, and reads right.
        controls.break_streams.store(1, Ordering::SeqCst);
        let at = CHUNK as u64 + 7;
        assert_eq!(
            &read_blocking(&r, 0, at, 200).unwrap()[..],
            &content[at as usize..at as usize + 200]
        );
        assert_eq!(controls.break_streams.load(Ordering::SeqCst), 0);
        assert_eq!(
            controls.count_covering(&layer.files[0].chunks[1].compressed),
            2
        );
        // Corrupt bytes arriving by stream are refused like buffered ones.
        let last = &layer.files[0].chunks[2];
        let middle = (last.compressed.start + last.compressed.end) / 2;
        controls.corrupt_at.store(middle, Ordering::SeqCst);
        assert_eq!(read_blocking(&r, 0, 2 * CHUNK as u64, 10), Err(libc::EIO));
        assert!(!cache.contains(&last.digest));
    }
}

/// A read of several cold chunks streams them in one request, each decoded as soon as its bytes
/// are in; when that stream breaks, the chunks that had all their bytes keep their verdict and
/// only the rest are fetched again.
#[test]
fn a_run_of_chunks_streams_in_one_request_and_a_break_refetches_only_the_unfinished() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(41, 8 * CHUNK);
    let four = 4 * CHUNK as u64;
    for compression in [Compression::Gzip, Compression::Zstd] {
        let (layer, controls, cache, r) =
            streaming_reader(&rt, dir.path(), &content, compression, quiet_options());
        let chunks = &layer.files[0].chunks;
        let first_half = chunks[0].compressed.start..chunks[3].compressed.end;
        assert_eq!(
            &read_blocking(&r, 0, 0, four as u32).unwrap()[..],
            &content[..four as usize]
        );
        assert_eq!(controls.streams.load(Ordering::SeqCst), 1);
        assert_eq!(controls.requests(), vec![first_half]);
        controls.break_streams.store(1, Ordering::SeqCst);
        assert_eq!(
            &read_blocking(&r, 0, four, four as u32).unwrap()[..],
            &content[four as usize..]
        );
        assert_eq!(controls.break_streams.load(Ordering::SeqCst), 0);
        assert_eq!(
            controls.count_covering(&chunks[4].compressed),
            1,
            "{compression:?}"
        );
        assert_eq!(
            controls.count_covering(&chunks[7].compressed),
            2,
            "{compression:?}"
        );
        for c in chunks {
            assert!(cache.contains(&c.digest));
        }
    }
}

/// On a slow link a long run keeps streaming past `attempt_timeout`, which is for a request that
/// stops sending, not for one that takes long: one request, never retried.
#[test]
fn a_slow_link_streams_a_long_run_past_the_attempt_timeout() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let content = pseudo_random(42, 8 * CHUNK);
    let options = FetchOptions {
        attempt_timeout: Duration::from_millis(300),
        ..quiet_options()
    };
    let (layer, controls, _cache, r) =
        streaming_reader(&rt, dir.path(), &content, Compression::Gzip, options);
    // About 8 KB compressed at 10 KB/s: 0.8 s, in 100-byte pieces 10 ms apart.
    controls
        .stream_bytes_per_sec
        .store(10_000, Ordering::SeqCst);
    assert_eq!(
        &read_blocking(&r, 0, 0, (8 * CHUNK) as u32).unwrap()[..],
        &content[..]
    );
    let run = layer.files[0].chunks[0].compressed.start..layer.files[0].chunks[7].compressed.end;
    assert_eq!(controls.requests(), vec![run]);
}

#[test]
fn inconsistent_chunk_lists_read_as_eio() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut layer = build_layer(
        vec![pseudo_random(95, 2 * CHUNK)],
        CHUNK,
        Compression::Gzip,
        b"X",
    );
    layer.files[0].size += 5;
    let (blob, _c) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        quiet_options(),
        "bad-toc",
    );
    assert_eq!(read_blocking(&r, 0, 0, 10), Err(libc::EIO));
}

#[test]
fn background_fill_respects_its_concurrency_limit_across_layers() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..8).map(|i| pseudo_random(100 + i, 2 * CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"CL");
    // Two layers (as of two images) on one source, so that its count of requests in flight
    // covers both: the window would allow two requests at once, the concurrency limit one.
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    controls.delay_ms.store(50, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        background: true,
        scheduler: scheduler(1, 4 * CHUNK as u64),
        ..quiet_options()
    };
    let readers: Vec<_> = ["limits-a", "limits-b"]
        .into_iter()
        .map(|name| {
            let r = reader(
                &rt,
                Arc::clone(&blob) as Arc<dyn BlobSource>,
                &layer,
                Compression::Gzip,
                &cache,
                opts.clone(),
                name,
            );
            r.start_prefetch(None);
            r
        })
        .collect();
    for r in &readers {
        wait_until("background fill done", || r.stats().background_done);
    }
    let max = controls.max_in_flight.load(Ordering::SeqCst);
    assert_eq!(max, 1, "{max} background requests in flight at once");
    for c in layer.files.iter().flat_map(|f| &f.chunks) {
        assert_eq!(controls.count_covering(&c.compressed), 1);
    }
    let requests = controls.requests().len();
    for (i, content) in contents.iter().enumerate() {
        assert_eq!(
            &read_blocking(&readers[1], i as u64, 0, 1 << 20).unwrap()[..],
            &content[..]
        );
    }
    assert_eq!(controls.requests().len(), requests);
}

/// Two layers (blobs laid out differently) holding the same one-chunk file: its content, then
/// each layer with its source and the source's controls.
#[allow(clippy::type_complexity)]
fn two_layers_sharing_a_file(
    seed: u64,
) -> (
    Vec<u8>,
    (TestLayer, Arc<dyn BlobSource>, Arc<Controls>),
    (TestLayer, Arc<dyn BlobSource>, Arc<Controls>),
) {
    let shared = pseudo_random(seed, CHUNK);
    let layer = |prefix: &[u8]| {
        let layer = build_layer(vec![shared.clone()], CHUNK, Compression::Gzip, prefix);
        let (blob, controls) = TestBlob::new(layer.blob.clone());
        (layer, blob as Arc<dyn BlobSource>, controls)
    };
    let (a, b) = (layer(b"A"), layer(b"BB"));
    (shared, a, b)
}

#[test]
fn fill_all_waits_for_a_chunk_another_layer_is_fetching() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (_, (layer_a, blob_a, _), (layer_b, blob_b, ctl_b)) = two_layers_sharing_a_file(122);
    // Layer B's slow source streams the shared chunk when A is asked to fill everything.
    ctl_b.delay_ms.store(400, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = quiet_options();
    let rb = reader(
        &rt,
        blob_b,
        &layer_b,
        Compression::Gzip,
        &cache,
        opts.clone(),
        "b",
    );
    let ra = reader(&rt, blob_a, &layer_a, Compression::Gzip, &cache, opts, "a");
    let filling_b = {
        let rb = Arc::clone(&rb);
        rt.spawn(async move { rb.fill_all().await })
    };
    wait_until("layer B fetching", || !ctl_b.requests().is_empty());
    // A's fill returns with its chunks in the cache, not merely claimed by B's stream.
    rt.block_on(ra.fill_all());
    let stats = ra.stats();
    assert_eq!(stats.fetched_chunks, stats.total_chunks);
    rt.block_on(filling_b).unwrap();
}

#[test]
fn a_layer_shutting_down_mid_fetch_does_not_fail_readers_of_other_layers() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (shared, (layer_a, blob_a, ctl_a), (layer_b, blob_b, ctl_b)) =
        two_layers_sharing_a_file(120);
    // Layer B's source stalls, so B's on-demand read holds the shared chunk's claim.
    ctl_b.hang.store(true, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = quiet_options();
    let rb = reader(
        &rt,
        blob_b,
        &layer_b,
        Compression::Gzip,
        &cache,
        opts.clone(),
        "b",
    );
    let stuck = {
        let rb = Arc::clone(&rb);
        std::thread::spawn(move || read_blocking(&rb, 0, 0, 100))
    };
    wait_until("layer B fetching", || !ctl_b.requests().is_empty());
    let ra = reader(&rt, blob_a, &layer_a, Compression::Gzip, &cache, opts, "a");
    let pending = {
        let ra = Arc::clone(&ra);
        std::thread::spawn(move || read_blocking(&ra, 0, 0, 100))
    };
    // A's read waits on B's fetch of the same chunk (same priority); then B goes away.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        ctl_a.requests().is_empty(),
        "A should have joined B's fetch"
    );
    rb.shutdown();
    assert_eq!(&pending.join().unwrap().unwrap()[..], &shared[..100]);
    assert_eq!(ctl_a.requests().len(), 1);
    // B's own read ends either way (EIO, or the copy A fetched): it must not hang.
    let _ = stuck.join().unwrap();
}

#[test]
fn an_on_demand_read_overtakes_a_stalled_background_fetch_of_its_chunk() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (shared, (layer_a, blob_a, ctl_a), (layer_b, blob_b, ctl_b)) =
        two_layers_sharing_a_file(121);
    // Layer B's background fill claims the shared chunk and its source stalls.
    ctl_b.hang.store(true, Ordering::SeqCst);
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = quiet_options();
    let rb = reader(
        &rt,
        blob_b,
        &layer_b,
        Compression::Gzip,
        &cache,
        FetchOptions {
            background: true,
            ..opts.clone()
        },
        "b",
    );
    rb.start_prefetch(None);
    wait_until("layer B fetching", || !ctl_b.requests().is_empty());
    let ra = reader(&rt, blob_a, &layer_a, Compression::Gzip, &cache, opts, "a");
    // A's read does not wait behind B's stalled stream: it fetches the chunk itself.
    assert_eq!(&read_blocking(&ra, 0, 0, 100).unwrap()[..], &shared[..100]);
    assert_eq!(ctl_a.requests().len(), 1);
    rb.shutdown();
}

#[test]
fn a_miss_reads_ahead_the_files_that_follow_in_the_blob() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(130 + i, CHUNK)).collect();
    let layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"RA");
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        readahead: true,
        ..quiet_options()
    };
    let r = reader(
        &rt,
        blob,
        &layer,
        Compression::Gzip,
        &cache,
        opts,
        "readahead",
    );
    // A miss on file 3 brings files 4 and 5 (the rest of the blob) with it.
    assert_eq!(
        &read_blocking(&r, 3, 0, 4096).unwrap()[..],
        &contents[3][..]
    );
    let span = |from: usize, to: usize| {
        layer.files[from].chunks[0].compressed.start..layer.files[to].chunks[0].compressed.end
    };
    assert_eq!(controls.requests(), vec![span(3, 5)]);
    // File 3 is cached now: read-ahead from file 0 stops before it.
    assert_eq!(
        &read_blocking(&r, 0, 0, 4096).unwrap()[..],
        &contents[0][..]
    );
    assert_eq!(controls.requests(), vec![span(3, 5), span(0, 2)]);
    for i in [1, 2, 4, 5] {
        assert_eq!(
            &read_blocking(&r, i, 0, 4096).unwrap()[..],
            &contents[i as usize][..]
        );
    }
    assert_eq!(
        controls.requests().len(),
        2,
        "the other files came with the misses"
    );
}

#[test]
fn read_ahead_stays_in_the_directory_of_the_miss() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(140 + i, CHUNK)).collect();
    let mut layer = build_layer(contents.clone(), CHUNK, Compression::Gzip, b"RD");
    for (file, name) in
        layer
            .files
            .iter_mut()
            .zip(["pkg/a", "pkg/b", "pkg/c", "pkg/sub/d", "pkg/sub/e", "top"])
    {
        file.name = name.to_string();
    }
    let (blob, controls) = TestBlob::new(layer.blob.clone());
    let cache = cache_in(dir.path(), 1 << 30, 0);
    let opts = FetchOptions {
        readahead: true,
        ..quiet_options()
    };
    let r = reader(&rt, blob, &layer, Compression::Gzip, &cache, opts, "dir-ra");
    let span = |from: usize, to: usize| {
        layer.files[from].chunks[0].compressed.start..layer.files[to].chunks[0].compressed.end
    };
    // A miss on pkg/b brings pkg/c, and stops at pkg/sub/d (another directory).
    assert_eq!(
        &read_blocking(&r, 1, 0, 4096).unwrap()[..],
        &contents[1][..]
    );
    assert_eq!(controls.requests(), vec![span(1, 2)]);
    // A miss on pkg/sub/d brings pkg/sub/e, not the file at the root after it.
    assert_eq!(
        &read_blocking(&r, 3, 0, 4096).unwrap()[..],
        &contents[3][..]
    );
    assert_eq!(controls.requests(), vec![span(1, 2), span(3, 4)]);
    for i in [2, 4] {
        assert_eq!(
            &read_blocking(&r, i, 0, 4096).unwrap()[..],
            &contents[i as usize][..]
        );
    }
    assert_eq!(controls.requests().len(), 2);
    assert_eq!(
        &read_blocking(&r, 5, 0, 4096).unwrap()[..],
        &contents[5][..]
    );
    assert_eq!(
        controls.requests().len(),
        3,
        "the root file was not read ahead"
    );
}
