//! Benchmarks of the chunk cache and the layer reader's cached path: latency of a cached read
//! through `LayerReader::read` (memory tier and disk tier), chunk insert throughput, and the
//! decompress-and-verify step every fetched chunk goes through (`estargz::decode_chunk`).

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lazysnap::blob::{BlobSource, MemoryBlob};
use lazysnap::cache::{CacheOptions, ChunkCache};
use lazysnap::estargz::{ChunkDigest, ChunkInfo, Compression};
use lazysnap::fetch::{FetchOptions, FetchScheduler, LayerFiles, LayerReader, SchedulerOptions};
use lazysnap_fuse::ContentSource;
use lazysnap_testbed::images::incompressible_bytes;

const CHUNK: usize = 4 << 20;

fn digest(data: &[u8]) -> ChunkDigest {
    ChunkDigest::of(data)
}

/// A layer holding one file of `chunks` 4 MiB chunks, fully read once so it is cached.
fn cached_reader(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    memory_bytes: u64,
    chunks: usize,
) -> Arc<LayerReader> {
    let content = incompressible_bytes(chunks * CHUNK, 5);
    let mut blob = Vec::new();
    let mut infos = Vec::new();
    for (i, piece) in content.chunks(CHUNK).enumerate() {
        let start = blob.len() as u64;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(piece).unwrap();
        blob.extend_from_slice(&enc.finish().unwrap());
        infos.push(ChunkInfo {
            compressed: start..blob.len() as u64,
            inner_offset: 0,
            file_offset: (i * CHUNK) as u64,
            len: piece.len() as u64,
            digest: digest(piece),
        });
    }
    let cache = ChunkCache::open(CacheOptions {
        memory_bytes,
        ..CacheOptions::new(dir)
    })
    .unwrap();
    let blob: Arc<dyn BlobSource> = Arc::new(MemoryBlob(Bytes::from(blob)));
    let mut files = LayerFiles::new();
    files.push("bench", content.len() as u64, &infos).unwrap();
    let reader = LayerReader::new(
        blob,
        Compression::Gzip,
        files,
        cache,
        FetchOptions {
            prefetch: false,
            background: false,
            scheduler: FetchScheduler::new(SchedulerOptions::default()),
            ..FetchOptions::default()
        },
        rt.handle().clone(),
        "bench",
    );
    let mut offset = 0;
    while offset < content.len() as u64 {
        let got = rt.block_on(reader.read_async(0, offset, 1 << 20)).unwrap();
        offset += got.len() as u64;
    }
    reader
}

fn cached_reads(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("cached_read");
    group.measurement_time(Duration::from_secs(4));
    for (tier, memory_bytes) in [("memory", 64u64 << 20), ("disk", 0)] {
        let dir = tempfile::tempdir().unwrap();
        let reader = cached_reader(&rt, dir.path(), memory_bytes, 4);
        for size in [4096u32, 128 << 10] {
            group.throughput(Throughput::Bytes(u64::from(size)));
            let mut offset = 0u64;
            group.bench_function(BenchmarkId::new(tier, size), |b| {
                b.iter(|| {
                    // Cached reads answer synchronously on the calling thread.
                    reader.read(
                        0,
                        offset,
                        size,
                        Box::new(|r| {
                            black_box(r.unwrap());
                        }),
                    );
                    offset = (offset + u64::from(size)) % (4 * CHUNK as u64 - u64::from(size));
                })
            });
        }
    }
    group.finish();
}

fn inserts(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache_insert");
    group.measurement_time(Duration::from_secs(6));
    for size in [64usize << 10, CHUNK] {
        let count = 48;
        let chunks: Vec<(ChunkDigest, Bytes)> = (0..count)
            .map(|i| {
                let data = incompressible_bytes(size, i as u64 + 100);
                (digest(&data), Bytes::from(data))
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        // A bound of a third of the set: every insert writes a file and evicts one.
        let cache = ChunkCache::open(CacheOptions {
            max_bytes: (size * count / 3) as u64,
            memory_bytes: 0,
            ..CacheOptions::new(dir.path())
        })
        .unwrap();
        let mut i = 0;
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                let (d, data) = &chunks[i % count];
                cache.insert(d, data.clone()).unwrap();
                i += 1;
            })
        });
    }
    group.finish();
}

/// `decode_chunk` of one 1 MiB chunk: incompressible, text-like and program data, gzip and zstd.
fn decodes(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_chunk");
    let len = 1 << 20;
    let random = incompressible_bytes(len, 9);
    let text: Vec<u8> = b"lazily pulled layers read only what they need\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect();
    // A program binary (this benchmark's own), which compresses like most of an image's files.
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let program: Vec<u8> = exe.iter().copied().cycle().skip(len).take(len).collect();
    for (data_name, data) in [("random", &random), ("text", &text), ("program", &program)] {
        for compression in [Compression::Gzip, Compression::Zstd] {
            let compressed = match compression {
                Compression::Gzip => {
                    let mut enc =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                    enc.write_all(data).unwrap();
                    enc.finish().unwrap()
                }
                Compression::Zstd => zstd::encode_all(&data[..], 3).unwrap(),
            };
            let info = ChunkInfo {
                compressed: 0..compressed.len() as u64,
                inner_offset: 0,
                file_offset: 0,
                len: data.len() as u64,
                digest: digest(data),
            };
            group.throughput(Throughput::Bytes(len as u64));
            let name = format!("{compression:?}-{data_name}").to_lowercase();
            group.bench_function(name, |b| {
                b.iter(|| {
                    lazysnap::estargz::decode_chunk(compression, "bench", &info, &compressed)
                        .unwrap()
                        .len()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, cached_reads, inserts, decodes);
criterion_main!(benches);
