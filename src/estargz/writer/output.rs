//! The output stream: compressed members written in order as the compressor threads finish them,
//! offsets and digests recorded for the TOC, then the TOC and the footer.

use std::collections::BTreeMap;
use std::io::Write;

use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest as _, Sha256};

use crate::digest::{sha256_digest, Digest};
use crate::estargz::footer::{estargz_footer, zstd_footer, ZSTD_SKIPPABLE_MAGIC};
use crate::estargz::tarfmt::{padding, ustar_reg_header};
use crate::estargz::toc::Toc;
use crate::estargz::{Compression, FormatError, TOC_TAR_NAME};

use super::layout::{DigestSource, PlannedEntry};
use super::{compress_bytes, BuildOptions, BuiltLayer, Compressed};

/// The ordered writing end: output, offsets and hashes.
pub(super) struct OutputSink<'w, W: Write> {
    pub(super) output: &'w mut W,
    pub(super) offset: u64,
    pub(super) blob_hasher: Sha256,
    pub(super) diff_hasher: Sha256,
    pub(super) uncompressed: u64,
    pub(super) member_offsets: Vec<u64>,
    pub(super) member_digests: Vec<Option<String>>,
}

impl<'w, W: Write> OutputSink<'w, W> {
    pub(super) fn new(output: &'w mut W) -> Self {
        OutputSink {
            output,
            offset: 0,
            blob_hasher: Sha256::new(),
            diff_hasher: Sha256::new(),
            uncompressed: 0,
            member_offsets: Vec::new(),
            member_digests: Vec::new(),
        }
    }

    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        self.output.write_all(bytes).map_err(|e| FormatError::Io {
            context: format!("writing the layer at offset {}", self.offset),
            source: e,
        })?;
        self.blob_hasher.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    pub(super) fn plain(&mut self, bytes: &[u8]) {
        self.diff_hasher.update(bytes);
        self.uncompressed += bytes.len() as u64;
    }

    /// Writes compressed members in index order as they arrive; returns a token per member
    /// written. On error, stops early (dropping the token sender stops the layout thread).
    pub(super) fn write_members(
        &mut self,
        results: Receiver<Result<Compressed, FormatError>>,
        tokens: Sender<()>,
    ) -> Result<(), FormatError> {
        let mut waiting: BTreeMap<u64, Compressed> = BTreeMap::new();
        let mut next = 0u64;
        for result in results.iter() {
            let member = result?;
            waiting.insert(member.index, member);
            while let Some(member) = waiting.remove(&next) {
                self.member_offsets.push(self.offset);
                self.member_digests.push(member.chunk_digest);
                self.write(&member.compressed)?;
                self.plain(&member.plain);
                next += 1;
                let _ = tokens.send(());
            }
        }
        if !waiting.is_empty() {
            return Err(FormatError::Io {
                context: "writing the layer".into(),
                source: std::io::Error::other(format!("member {next} was never compressed")),
            });
        }
        Ok(())
    }

    pub(super) fn resolve(&self, source: &Option<DigestSource>) -> String {
        match source {
            Some(DigestSource::Known(d)) => d.clone(),
            Some(DigestSource::Member(m)) => self
                .member_digests
                .get(*m as usize)
                .cloned()
                .flatten()
                .unwrap_or_default(),
            None => String::new(),
        }
    }

    pub(super) fn finish(
        mut self,
        planned_entries: Vec<PlannedEntry>,
        opts: &BuildOptions,
    ) -> Result<BuiltLayer, FormatError> {
        let mut toc = Toc {
            version: 1,
            entries: Vec::with_capacity(planned_entries.len()),
        };
        for planned in &planned_entries {
            let mut entry = planned.toc.clone();
            if let Some(m) = planned.member {
                entry.offset = self.member_offsets.get(m as usize).copied().unwrap_or(0);
            }
            if planned.chunk_digest.is_some() {
                entry.chunk_digest = self.resolve(&planned.chunk_digest);
            }
            if planned.file_digest.is_some() {
                entry.digest = self.resolve(&planned.file_digest);
            }
            toc.entries.push(entry);
        }
        let mut json = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut ser = serde_json::Serializer::with_formatter(&mut json, formatter);
        serde::Serialize::serialize(&toc, &mut ser).map_err(|e| FormatError::Io {
            context: "serializing the TOC".into(),
            source: std::io::Error::other(e),
        })?;
        let toc_digest = sha256_digest(&json);
        let io = |context: &'static str| {
            move |source| FormatError::Io {
                context: context.into(),
                source,
            }
        };
        let (checksum, position) = match opts.compression {
            Compression::Gzip => {
                let mut tar = ustar_reg_header(TOC_TAR_NAME, json.len() as u64, 0o644).to_vec();
                tar.extend_from_slice(&json);
                tar.resize(tar.len() + padding(json.len() as u64) as usize + 1024, 0);
                let compressed = compress_bytes(&tar, Compression::Gzip, opts.level)
                    .map_err(io("compressing the TOC"))?;
                let toc_offset = self.offset;
                self.write(&compressed)?;
                self.plain(&tar);
                self.write(&estargz_footer(toc_offset))?;
                (None, None)
            }
            Compression::Zstd => {
                let compressed = compress_bytes(&json, Compression::Zstd, opts.level)
                    .map_err(io("compressing the TOC"))?;
                let frame_len = u32::try_from(compressed.len()).map_err(|_| {
                    FormatError::InvalidOption("compressed TOC exceeds 4 GiB".into())
                })?;
                let mut header = ZSTD_SKIPPABLE_MAGIC.to_le_bytes().to_vec();
                header.extend_from_slice(&frame_len.to_le_bytes());
                self.write(&header)?;
                let toc_offset = self.offset;
                self.write(&compressed)?;
                let (clen, ulen) = (compressed.len() as u64, json.len() as u64);
                self.write(&zstd_footer(toc_offset, clen, ulen))?;
                (
                    Some(sha256_digest(&compressed).into()),
                    Some(format!("{toc_offset}:{clen}:{ulen}:1")),
                )
            }
        };
        self.output
            .flush()
            .map_err(io("flushing the layer output"))?;
        Ok(BuiltLayer {
            blob_digest: Digest::of_sha256(self.blob_hasher.finalize().into()),
            blob_size: self.offset,
            diff_id: Digest::of_sha256(self.diff_hasher.finalize().into()),
            uncompressed_size: self.uncompressed,
            toc_digest,
            zstd_manifest_checksum: checksum,
            zstd_manifest_position: position,
        })
    }
}
