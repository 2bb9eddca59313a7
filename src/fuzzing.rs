//! Fuzz targets, shared by the coverage-guided fuzzer in `fuzz/` (scripts/fuzz.sh) and the
//! bounded smoke test (`tests/estargz_fuzz_smoke.rs`): each takes arbitrary bytes and must return
//! without panicking, hanging or allocating beyond the format's limits. Results are discarded on
//! purpose.

use std::path::Path;

use bytes::Bytes;

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
pub const TARGETS: [(&str, Target); 6] = [
    ("footer", footer),
    ("toc_json", toc_json),
    ("layer_blob", layer_blob),
    ("tar_input", tar_input),
    ("manifest", manifest),
    ("hosts_toml", hosts_toml),
];

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
        let _ = layer_from_toc_json(data, footer, 2 << 20, None);
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
