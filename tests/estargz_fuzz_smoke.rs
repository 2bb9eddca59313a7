//! Bounded fuzzing without coverage: runs the fuzz targets (`lazysnap::fuzzing`) over seeds and
//! the coverage-guided fuzzer's mutations of them, seeded, so the parsers are exercised by
//! `cargo test` alone. `FUZZ_ITERATIONS` sets the mutations per target (default 300);
//! `scripts/fuzz.sh` runs the coverage-guided fuzzer.

mod fixtures_common;

use std::path::PathBuf;

use lazysnap::estargz::{build_layer, BuildOptions, Compression};
use lazysnap::fuzzing::{self, mutate, Rng};

fn iterations() -> usize {
    std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn fixtures() -> PathBuf {
    fixtures_common::fixtures_dir()
}

fn run(name: &str, seeds: &[Vec<u8>], target: fn(&[u8]), seed_value: u64) {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    for seed in seeds {
        target(seed);
    }
    let mut rng = Rng(seed_value);
    for _ in 0..iterations() {
        let seed = &seeds[rng.below(seeds.len())];
        let other = &seeds[rng.below(seeds.len())];
        target(&mutate(&mut rng, seed, other));
    }
}

fn small_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("dir/a.txt", b"hello\n");
    add("dir/multi.bin", &[7u8; 9000]);
    add("dir/empty", b"");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "dir/link", "a.txt").unwrap();
    b.into_inner().unwrap()
}

fn small_layers() -> Vec<Vec<u8>> {
    let tar = small_tar();
    [Compression::Gzip, Compression::Zstd]
        .into_iter()
        .map(|compression| {
            let mut out = Vec::new();
            let opts = BuildOptions {
                chunk_size: 4096,
                ..BuildOptions::new(compression)
            };
            build_layer(&tar[..], &mut out, &opts).unwrap();
            out
        })
        .collect()
}

#[test]
fn fuzz_footer() {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for variant in ["esgz", "esgz-1m", "esgz-prio", "zstdchunked"] {
        for entry in std::fs::read_dir(fixtures().join(variant)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "blob") {
                let bytes = std::fs::read(&path).unwrap();
                seeds.push(bytes[bytes.len() - 51..].to_vec());
            }
        }
    }
    run("footer", &seeds, fuzzing::footer, 1);
}

#[test]
fn fuzz_toc_json() {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for variant in ["esgz", "esgz-prio", "zstdchunked"] {
        for entry in std::fs::read_dir(fixtures().join(variant)).unwrap() {
            let path = entry.unwrap().path();
            if path.to_string_lossy().ends_with(".toc.json") {
                let bytes = std::fs::read(&path).unwrap();
                if bytes.len() < 8192 {
                    seeds.push(bytes);
                }
            }
        }
    }
    seeds.push(br#"{"version":1,"entries":[{"name":"a","type":"reg","size":3,"offset":10,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"}]}"#.to_vec());
    run("toc_json", &seeds, fuzzing::toc_json, 2);
}

#[test]
fn fuzz_layer_blob() {
    run("layer_blob", &small_layers(), fuzzing::layer_blob, 3);
}

#[test]
fn fuzz_tar_input() {
    run("tar_input", &[small_tar()], fuzzing::tar_input, 4);
}

/// Structure-aware TOC mutations: valid JSON whose entries get hostile field values (huge,
/// negative or overlapping offsets, escaping names, wrong types), so validation runs deep.
#[test]
fn fuzz_toc_json_structured() {
    use serde_json::{json, Value};
    let mut seeds: Vec<Value> = Vec::new();
    for variant in ["esgz", "zstdchunked"] {
        for entry in std::fs::read_dir(fixtures().join(variant)).unwrap() {
            let path = entry.unwrap().path();
            if path.to_string_lossy().ends_with(".toc.json") {
                seeds.push(serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap());
            }
        }
    }
    let keys = [
        "name",
        "type",
        "size",
        "offset",
        "innerOffset",
        "chunkOffset",
        "chunkSize",
        "chunkDigest",
        "digest",
        "linkName",
        "mode",
        "uid",
        "devMajor",
        "modtime",
        "xattrs",
    ];
    let values = [
        json!(0),
        json!(1),
        json!(-1),
        json!(u64::MAX),
        json!(1u64 << 40),
        json!(4194304),
        json!("../../etc/passwd"),
        json!("/abs"),
        json!("data/text.txt"),
        json!("chunk"),
        json!("hardlink"),
        json!("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        json!(null),
        json!({"user.x": "!!"}),
        json!([1, 2]),
    ];
    let mut rng = Rng(5);
    for _ in 0..iterations() {
        let mut toc = seeds[rng.below(seeds.len())].clone();
        let Some(entries) = toc["entries"].as_array_mut() else {
            continue;
        };
        for _ in 0..1 + rng.below(3) {
            let n = entries.len();
            match rng.below(6) {
                0 if n > 1 => {
                    // Duplicate an entry somewhere else.
                    let e = entries[rng.below(n)].clone();
                    entries.insert(rng.below(n), e);
                }
                1 if n > 1 => {
                    entries.remove(rng.below(n));
                }
                2 if n > 1 => {
                    // Copy one entry's offset to another (overlapping chunks).
                    let from = entries[rng.below(n)]["offset"].clone();
                    entries[rng.below(n)]["offset"] = from;
                }
                _ if n > 0 => {
                    let key = keys[rng.below(keys.len())];
                    let value = values[rng.below(values.len())].clone();
                    entries[rng.below(n)][key] = value;
                }
                _ => {}
            }
        }
        fuzzing::toc_json(&serde_json::to_vec(&toc).unwrap());
    }
}

#[test]
fn fuzz_elf_libraries() {
    // The start of this test's own executable and of the C library: real ELF headers.
    let mut seeds = vec![b"\x7fELF\x02\x01\x01".to_vec()];
    for path in ["/proc/self/exe", "/usr/lib/x86_64-linux-gnu/libc.so.6"] {
        if let Ok(data) = std::fs::read(path) {
            seeds.push(data[..data.len().min(64 << 10)].to_vec());
        }
    }
    run("elf_libraries", &seeds, fuzzing::elf_libraries, 7);
}
