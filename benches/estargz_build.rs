//! Throughput of `build_layer` (MB/s of uncompressed tar input) on a generated ~64 MB tar of
//! mixed data: text-like files, incompressible bytes, zero runs and many small files.
//! `ESTARGZ_BENCH_TAR=FILE` converts FILE instead (scripts/estargz_vs_ctr_remote.sh uses it to
//! compare with ctr-remote on the same input); `ESTARGZ_BENCH_WRITE_TAR=FILE` saves the generated
//! input.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lazysnap::estargz::{build_layer, BuildOptions, Compression};

/// Deterministic xorshift generator so every run converts the same input.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa",
];

fn text(rng: &mut Xorshift, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let r = rng.next();
        for i in 0..8 {
            out.extend_from_slice(WORDS[((r >> (i * 4)) & 15) as usize].as_bytes());
            out.push(b' ');
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

fn random(rng: &mut Xorshift, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// About 64 MB: 24 MB of text files, 16 MB of random data, 8 MB of zeros and sparse-ish
/// binaries, and 2000 small config-like files.
fn mixed_tar() -> Vec<u8> {
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut builder = tar::Builder::new(Vec::new());
    let add = |builder: &mut tar::Builder<Vec<u8>>, path: String, data: Vec<u8>| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        builder.append_data(&mut header, path, &data[..]).unwrap();
    };
    for i in 0..12 {
        let data = text(&mut rng, 2 << 20);
        add(&mut builder, format!("usr/share/doc/text-{i}.txt"), data);
    }
    for i in 0..4 {
        let data = random(&mut rng, 4 << 20);
        add(&mut builder, format!("usr/lib/blob-{i}.bin"), data);
    }
    for i in 0..4 {
        let mut data = vec![0u8; 2 << 20];
        for (j, b) in data.iter_mut().enumerate().step_by(97) {
            *b = (j % 251) as u8;
        }
        add(&mut builder, format!("usr/lib/sparse-{i}.so"), data);
    }
    for i in 0..2000 {
        let len = 200 + (rng.next() % 7000) as usize;
        let data = text(&mut rng, len);
        add(
            &mut builder,
            format!("etc/conf.d/{:02}/file-{i}.conf", i % 50),
            data,
        );
    }
    builder.into_inner().unwrap()
}

fn bench_build(c: &mut Criterion) {
    let input = match std::env::var_os("ESTARGZ_BENCH_TAR") {
        Some(path) => std::fs::read(&path).expect("ESTARGZ_BENCH_TAR must name a readable tar"),
        None => mixed_tar(),
    };
    if let Some(path) = std::env::var_os("ESTARGZ_BENCH_WRITE_TAR") {
        std::fs::write(&path, &input).expect("ESTARGZ_BENCH_WRITE_TAR must be writable");
    }
    let mut group = c.benchmark_group("build_layer");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.sample_size(10);
    let cases = [
        ("gzip-9", Compression::Gzip, 9),
        ("gzip-6", Compression::Gzip, 6),
        ("zstd-3", Compression::Zstd, 3),
    ];
    for (name, compression, level) in cases {
        let opts = BuildOptions {
            level,
            ..BuildOptions::new(compression)
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut out = Vec::with_capacity(input.len());
                build_layer(&input[..], &mut out, &opts).unwrap();
                out.len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_build);
criterion_main!(benches);
