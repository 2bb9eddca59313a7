//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the bounded fuzz smoke test
//! (`tests/estargz_fuzz_smoke.rs`): each takes arbitrary bytes and must return without panicking,
//! hanging or allocating beyond the format's limits. Results are discarded on purpose.

use bytes::Bytes;

use super::footer::{parse_footer, Footer};
use super::reader::{layer_from_toc_json, open_layer, verify_layer};
use super::writer::{build_layer_with_threads, BuildOptions};
use super::Compression;
use crate::blob::MemoryBlob;

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
