//! Fuzz targets, shared by the coverage-guided fuzzer in `fuzz/` (scripts/fuzz.sh) and the
//! bounded smoke test (`tests/estargz_fuzz_smoke.rs`): each takes arbitrary bytes and must return
//! without panicking, hanging or allocating beyond the format's limits. Results are discarded on
//! purpose.

use std::path::Path;

use bytes::Bytes;
use sha2::Digest as _;

use crate::blob::MemoryBlob;
use crate::estargz::footer::{parse_footer, Footer};
use crate::estargz::{
    build_layer_with_threads, layer_from_toc_json, open_layer, verify_layer, BuildOptions,
    Compression,
};
use crate::image::{parse_json, Index, Manifest};

/// A fuzz target: takes any bytes, must not panic, hang or allocate without bound.
pub type Target = fn(&[u8]);

/// Every target by name.
pub const TARGETS: [(&str, Target); 8] = [
    ("footer", footer),
    ("toc_json", toc_json),
    ("layer_blob", layer_blob),
    ("tar_input", tar_input),
    ("manifest", manifest),
    ("hosts_toml", hosts_toml),
    ("elf_libraries", elf_libraries),
    ("ztoc", ztoc),
];

/// The library names library prefetch reads from a file's first bytes (an image's programs are
/// input like any other).
pub fn elf_libraries(data: &[u8]) {
    let _ = crate::fetch::elf_deps::needed_libraries(data);
}

/// A SOCI zTOC as a registry would send it: parsed, turned into layer entries, and its first
/// span inflated from the input's last bytes (given the digest they have, so that the decoder
/// itself, with the empty blocks that align a span, sees arbitrary deflate data).
pub fn ztoc(data: &[u8]) {
    let Ok(parsed) = crate::soci::Ztoc::parse(data) else {
        return;
    };
    if let Some(first) = parsed.spans.first() {
        let tail = &data[data.len().saturating_sub(4096)..];
        let span = crate::soci::Span {
            compressed: 0..tail.len() as u64,
            digest: sha2::Sha256::digest(tail).into(),
            ..first.clone()
        };
        let _ = crate::soci::decode_span(&span, tail);
    }
    let digest = crate::digest::sha256_digest(data);
    let size = parsed.compressed_size;
    let _ = crate::soci::layer_from_ztoc(parsed, digest, size);
}

/// Footer recognition on arbitrary tail bytes.
pub fn footer(data: &[u8]) {
    let _ = parse_footer(data, data.len() as u64);
}

/// TOC JSON parsing and entry validation, as for an eStargz and a zstd:chunked blob.
pub fn toc_json(data: &[u8]) {
    let footers = [
        Footer::Estargz {
            toc_offset: 1 << 20,
        },
        Footer::ZstdChunked {
            toc_offset: 1 << 20,
            compressed_len: 100,
            uncompressed_len: data.len() as u64,
        },
    ];
    for footer in footers {
        let _ = layer_from_toc_json(data.to_vec(), footer, 2 << 20, None);
    }
}

/// A whole blob: footer, TOC, validation and, when it opens, verification of every chunk.
pub fn layer_blob(data: &[u8]) {
    let blob = MemoryBlob(Bytes::copy_from_slice(data));
    futures::executor::block_on(async {
        if let Ok(layer) = open_layer(&blob, None).await {
            let _ = verify_layer(&blob, &layer).await;
        }
    });
}

/// The writer on an arbitrary "tar" stream (small chunks so multi-chunk paths run).
pub fn tar_input(data: &[u8]) {
    for compression in [Compression::Gzip, Compression::Zstd] {
        let opts = BuildOptions {
            chunk_size: 4096,
            level: 1,
            ..BuildOptions::new(compression)
        };
        let _ = build_layer_with_threads(data, std::io::sink(), &opts, 1);
    }
}

/// An image manifest or index as a registry would send it.
pub fn manifest(data: &[u8]) {
    let _ = parse_json::<Manifest>("manifest", data);
    let _ = parse_json::<Index>("index", data);
}

/// A containerd hosts.toml (mirrors, certificates, headers) for registry `example.com`.
pub fn hosts_toml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let file = Path::new("/nonexistent/lazysnap-fuzz/example.com/hosts.toml");
    let _ = crate::registry::hosts::parse_hosts_text(&text, file, "https://example.com", "https");
}

/// Largest input the mutator makes.
pub const MAX_INPUT: usize = 256 << 10;

/// A small deterministic generator (xorshift) for the mutator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const INTERESTING: [&[u8]; 12] = [
    &[0],
    &[0xff],
    &[0x7f],
    &[0x80],
    b"0",
    b"9",
    b"\"",
    b"{",
    b"}",
    b"[",
    &[0xff, 0xff, 0xff, 0xff],
    &[0, 0, 0, 0, 0, 0, 0, 0],
];

/// A havoc stack of edits of `input` (bit flips, random and boundary bytes, deletions,
/// insertions, duplicated blocks, arithmetic on bytes), sometimes splicing in part of `other`;
/// at most [`MAX_INPUT`] bytes.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        // Half the edits land in the last 2 KiB, where footers and TOCs live.
        let pos = if len > 0 && rng.below(2) == 0 {
            len - 1 - rng.below(len.min(2048))
        } else {
            rng.below(len.max(1))
        };
        match rng.below(8) {
            0 => {
                if let Some(b) = data.get_mut(pos) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                if let Some(b) = data.get_mut(pos) {
                    *b = rng.next_u64() as u8;
                }
            }
            2 => {
                let value = INTERESTING[rng.below(INTERESTING.len())];
                let end = (pos + value.len()).min(data.len());
                if let Some(dst) = data.get_mut(pos.min(end)..end) {
                    dst.copy_from_slice(&value[..dst.len()]);
                }
            }
            3 => {
                let end = (pos + 1 + rng.below(64)).min(data.len());
                data.drain(pos.min(end)..end);
            }
            4 => {
                let insert: Vec<u8> = (0..1 + rng.below(32))
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                let at = pos.min(data.len());
                data.splice(at..at, insert);
            }
            5 => {
                // Duplicate a block (repeated entries, nested structures).
                let start = rng.below(len.max(1)).min(len);
                let end = (start + 1 + rng.below(256)).min(len);
                let block = data[start..end].to_vec();
                let at = pos.min(data.len());
                data.splice(at..at, block);
            }
            6 if !other.is_empty() => {
                let start = rng.below(other.len());
                let end = (start + 1 + rng.below(1024)).min(other.len());
                let at = pos.min(data.len());
                data.splice(at..at, other[start..end].iter().copied());
            }
            _ => {
                // Arithmetic on a byte (lengths and offsets).
                if let Some(b) = data.get_mut(pos) {
                    *b = b.wrapping_add((rng.below(35) as u8).wrapping_sub(17));
                }
            }
        }
    }
    data.truncate(MAX_INPUT);
    data
}
