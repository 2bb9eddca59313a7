//! Verifying a whole layer against its TOC: every chunk fetched in batches, decoded and checked
//! against its chunk digest, and every file against its file digest.

use std::collections::HashMap;
use std::ops::Range;

use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::blob::BlobSource;
use crate::estargz::{decode_chunk, FormatError};

use super::{blob_err, Entry, EntryKind, LayerToc};

/// What [`verify_layer`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Regular files whose content was verified (including empty ones).
    pub files: u64,
    /// Chunks decompressed and verified.
    pub chunks: u64,
    /// Decompressed bytes verified.
    pub bytes: u64,
    /// Compressed bytes read.
    pub compressed_bytes: u64,
}

/// Upper bound of compressed bytes fetched in one `read_ranges` call during verification.
pub(super) const VERIFY_BATCH_BYTES: u64 = 16 << 20;

pub(super) const VERIFY_BATCH_RANGES: usize = 64;

/// Reads, decompresses and verifies every chunk of every file, and each file's whole digest.
pub async fn verify_layer(
    blob: &dyn BlobSource,
    layer: &LayerToc,
) -> Result<VerifyReport, FormatError> {
    let span = tracing::debug_span!("estargz_verify_layer", toc_digest = %layer.toc_digest);
    verify_layer_traced(blob, layer).instrument(span).await
}

pub(super) async fn verify_layer_traced(
    blob: &dyn BlobSource,
    layer: &LayerToc,
) -> Result<VerifyReport, FormatError> {
    let mut report = VerifyReport::default();
    let jobs: Vec<(usize, usize)> = layer
        .entries
        .iter()
        .enumerate()
        .flat_map(|(ei, e)| (0..e.chunks.len()).map(move |ci| (ei, ci)))
        .collect();
    let mut hashers: HashMap<usize, Sha256> = HashMap::new();
    let mut start = 0;
    while start < jobs.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while let Some(&(ei, ci)) = jobs.get(end) {
            let Some(chunk) = layer.entries.get(ei).and_then(|e| e.chunks.get(ci)) else {
                break;
            };
            let len = chunk.compressed.end - chunk.compressed.start;
            if end > start
                && (bytes + len > VERIFY_BATCH_BYTES || end - start >= VERIFY_BATCH_RANGES)
            {
                break;
            }
            bytes += len;
            end += 1;
        }
        let batch = jobs.get(start..end).unwrap_or_default();
        let ranges: Vec<Range<u64>> = batch
            .iter()
            .filter_map(|&(ei, ci)| layer.entries.get(ei)?.chunks.get(ci))
            .map(|c| c.compressed.clone())
            .collect();
        let whole =
            ranges.first().map(|r| r.start).unwrap_or(0)..ranges.last().map(|r| r.end).unwrap_or(0);
        let datas = blob
            .read_ranges(ranges)
            .await
            .map_err(blob_err("chunks", &whole))?;
        for (&(ei, ci), data) in batch.iter().zip(datas.iter()) {
            let Some(entry) = layer.entries.get(ei) else {
                continue;
            };
            let Some(chunk) = entry.chunks.get(ci) else {
                continue;
            };
            let plain = decode_chunk(layer.compression, &entry.path, chunk, data)?;
            report.chunks += 1;
            report.bytes += plain.len() as u64;
            report.compressed_bytes += data.len() as u64;
            hashers.entry(ei).or_default().update(&plain);
            if ci + 1 == entry.chunks.len() {
                let hasher = hashers.remove(&ei).unwrap_or_default();
                check_file_digest(entry, hasher)?;
                report.files += 1;
            }
        }
        start = end;
    }
    for entry in &layer.entries {
        if entry.kind == EntryKind::Reg && entry.chunks.is_empty() {
            check_file_digest(entry, Sha256::new())?;
            report.files += 1;
        }
    }
    Ok(report)
}

pub(super) fn check_file_digest(entry: &Entry, hasher: Sha256) -> Result<(), FormatError> {
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    match &entry.digest {
        Some(expected) if *expected != actual => Err(FormatError::BadChunk {
            name: entry.path.clone(),
            offset: entry
                .chunks
                .first()
                .map(|c| c.compressed.start)
                .unwrap_or(0),
            reason: format!("file digest mismatch: TOC says {expected}, content is {actual}"),
        }),
        _ => Ok(()),
    }
}
