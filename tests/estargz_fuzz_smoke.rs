//! Bounded fuzzing on stable: runs the cargo-fuzz target bodies
//! (`lazysnap::fuzzing`) over seeds and deterministic random mutations of them, so the
//! parsers are exercised in every CI run even without nightly. `FUZZ_ITERATIONS` sets the
//! mutations per target (default 300); `scripts/fuzz.sh` runs the real fuzzers when it can.

use std::path::PathBuf;

use lazysnap::estargz::{build_layer, BuildOptions, Compression};
use lazysnap::fuzzing;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn iterations() -> usize {
    std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn fixtures() -> PathBuf {
    lazysnap::testbed::fixtures_dir()
}

/// One random edit: flip bytes (biased towards the tail, where footers and TOCs live), truncate,
/// insert random bytes, or overwrite with a run of a boundary value.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    let edits = 1 + rng.below(4);
    for _ in 0..edits {
        let len = data.len();
        let pos = if rng.below(2) == 0 && len > 0 {
            len - 1 - rng.below(len.min(2048))
        } else {
            rng.below(len.max(1))
        };
        match rng.below(5) {
            0 | 1 => {
                if let Some(b) = data.get_mut(pos) {
                    *b ^= 1 << rng.below(8);
                }
            }
            2 => data.truncate(pos),
            3 => {
                let insert: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                let at = pos.min(data.len());
                data.splice(at..at, insert);
            }
            _ => {
                let value = [0u8, 0xff, b'9', b'"'][rng.below(4)];
                let end = (pos + 1 + rng.below(8)).min(data.len());
                for b in data.get_mut(pos.min(end)..end).unwrap_or_default() {
                    *b = value;
                }
            }
        }
    }
    data
}

fn run(name: &str, seeds: &[Vec<u8>], target: fn(&[u8]), seed_value: u64) {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    for seed in seeds {
        target(seed);
    }
    let mut rng = Rng(seed_value);
    for _ in 0..iterations() {
        let seed = &seeds[rng.below(seeds.len())];
        target(&mutate(&mut rng, seed));
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
