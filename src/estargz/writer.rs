//! Writing a layer: an uncompressed tar stream becomes eStargz (gzip members) or zstd:chunked
//! (zstd frames) with the ctr-remote layout, compressed in parallel with bounded memory.
//!
//! Pipeline: a layout thread parses the tar and cuts it into members (every chunk of file data
//! starts one; the headers that follow ride along with the previous chunk) → a pool of workers
//! compresses each member on its own → the caller's thread writes members in order, hashing the
//! compressed (blob digest) and uncompressed (diff_id) streams. A fixed number of tokens bounds
//! the members in flight, so memory is O(threads × chunk size) whatever the layer size. Each
//! member is compressed independently with fixed boundaries, so the output bytes do not depend on
//! the number of threads.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::ops::Range;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::digest::{sha256_digest, Digest};
use crate::labels;

use super::{
    Compression, FormatError, DEFAULT_CHUNK_SIZE, UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION, ZSTD_MANIFEST_POSITION_ANNOTATION,
};

mod layout;
mod output;
mod spool;
use layout::Layout;
use output::OutputSink;

/// Default gzip level (ctr-remote uses best compression).
pub const DEFAULT_GZIP_LEVEL: u32 = 9;
/// Default zstd level.
pub const DEFAULT_ZSTD_LEVEL: u32 = 3;
/// Largest chunk size accepted (keeps per-member memory sane).
pub const MAX_CHUNK_SIZE: u64 = 256 << 20;

/// How to build a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// gzip (eStargz) or zstd (zstd:chunked).
    pub compression: Compression,
    /// Chunk size in bytes (default 4 MiB).
    pub chunk_size: u64,
    /// Compression level: gzip 0–9 (default 9), zstd 1–22 (default 3).
    pub level: u32,
    /// Paths or globs (relative to `/`) to place first, in this order.
    pub prioritized: Vec<String>,
    /// Files a recorded workload used (exact paths), placed first after the `prioritized`
    /// matches, in this order.
    pub recorded: Vec<RecordedFile>,
}

/// A file a recorded workload used (`lazysnap optimize`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedFile {
    /// Path relative to `/`.
    pub path: String,
    /// The byte ranges read, sorted and disjoint, when only those are to be prefetched: the
    /// file is cut into chunks at their edges and the chunks outside them are marked
    /// `lazysnap.skipPrefetch`. Empty: the whole file is prefetched.
    pub read: Vec<Range<u64>>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions::new(Compression::Gzip)
    }
}

impl BuildOptions {
    /// Defaults for `compression` (chunk 4 MiB; gzip level 9 or zstd level 3; nothing prioritized).
    pub fn new(compression: Compression) -> Self {
        BuildOptions {
            compression,
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: match compression {
                Compression::Gzip => DEFAULT_GZIP_LEVEL,
                Compression::Zstd => DEFAULT_ZSTD_LEVEL,
            },
            prioritized: Vec::new(),
            recorded: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), FormatError> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(FormatError::InvalidOption(format!(
                "chunk size {} must be between 1 and {MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        let ok = match self.compression {
            Compression::Gzip => self.level <= 9,
            Compression::Zstd => (1..=22).contains(&self.level),
        };
        if !ok {
            return Err(FormatError::InvalidOption(format!(
                "level {} is out of range for {:?} (gzip 0-9, zstd 1-22)",
                self.level, self.compression
            )));
        }
        for pattern in &self.prioritized {
            glob::Pattern::new(pattern.trim_start_matches('/')).map_err(|e| {
                FormatError::InvalidOption(format!("prioritized pattern {pattern:?}: {e}"))
            })?;
        }
        Ok(())
    }
}

/// What [`build_layer`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltLayer {
    /// `sha256:<hex>` of the blob written.
    pub blob_digest: Digest,
    pub blob_size: u64,
    /// `sha256:<hex>` of the decompressed stream.
    pub diff_id: Digest,
    /// Length of the decompressed stream.
    pub uncompressed_size: u64,
    /// `sha256:<hex>` of the uncompressed TOC JSON.
    pub toc_digest: Digest,
    /// zstd:chunked: `sha256:<hex>` of the compressed TOC.
    pub zstd_manifest_checksum: Option<String>,
    /// zstd:chunked: `offset:compressedLen:uncompressedLen:1`.
    pub zstd_manifest_position: Option<String>,
}

impl BuiltLayer {
    /// The layer annotations to put in the image manifest.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert(labels::TOC_DIGEST.to_string(), self.toc_digest.to_string());
        out.insert(
            UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
            self.uncompressed_size.to_string(),
        );
        if let Some(c) = &self.zstd_manifest_checksum {
            out.insert(ZSTD_MANIFEST_CHECKSUM_ANNOTATION.to_string(), c.clone());
        }
        if let Some(p) = &self.zstd_manifest_position {
            out.insert(ZSTD_MANIFEST_POSITION_ANNOTATION.to_string(), p.clone());
        }
        out
    }
}

/// Builds an eStargz / zstd:chunked layer from an uncompressed tar, using every core.
pub fn build_layer<R: Read + Send, W: Write>(
    tar_input: R,
    output: W,
    opts: &BuildOptions,
) -> Result<BuiltLayer, FormatError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    build_layer_with_threads(tar_input, output, opts, threads)
}

/// [`build_layer`] with an explicit number of compression threads (the output is the same for
/// any count).
pub fn build_layer_with_threads<R: Read + Send, W: Write>(
    tar_input: R,
    mut output: W,
    opts: &BuildOptions,
    threads: usize,
) -> Result<BuiltLayer, FormatError> {
    opts.validate()?;
    let threads = threads.max(1);
    let (job_tx, job_rx) = bounded::<Job>(threads);
    let (result_tx, result_rx) = unbounded::<Result<Compressed, FormatError>>();
    let in_flight = threads * 2 + 2;
    let (token_tx, token_rx) = bounded::<()>(in_flight);
    for _ in 0..in_flight {
        let _ = token_tx.send(());
    }

    let mut sink = OutputSink::new(&mut output);
    let (layout, written) = std::thread::scope(|scope| {
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let result_tx = result_tx.clone();
            let (compression, level) = (opts.compression, opts.level);
            scope.spawn(move || {
                for job in job_rx {
                    if result_tx
                        .send(compress_member(job, compression, level))
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        drop(job_rx);
        drop(result_tx);
        let producer = scope.spawn(move || {
            let mut layout = Layout::new(opts, JobSender { job_tx, token_rx });
            layout.run(tar_input)?;
            // Dropping the layout closes the job channel so the workers finish.
            Ok::<_, FormatError>(layout.entries)
        });
        let written = sink.write_members(result_rx, token_tx);
        let layout = producer.join().unwrap_or_else(|_| {
            Err(FormatError::InvalidOption(
                "the layout thread panicked".into(),
            ))
        });
        (layout, written)
    });
    let layout = layout?;
    written?;
    sink.finish(layout, opts)
}

/// A member to compress.
struct Job {
    index: u64,
    data: Vec<u8>,
    /// The first `digest_len` bytes are a chunk whose digest the TOC needs.
    digest_len: usize,
}

/// A compressed member.
struct Compressed {
    index: u64,
    plain: Vec<u8>,
    compressed: Vec<u8>,
    chunk_digest: Option<String>,
}

fn compress_member(
    job: Job,
    compression: Compression,
    level: u32,
) -> Result<Compressed, FormatError> {
    let chunk_digest = (job.digest_len > 0)
        .then(|| {
            job.data
                .get(..job.digest_len)
                .map(|data| sha256_digest(data).into())
        })
        .flatten();
    let compressed =
        compress_bytes(&job.data, compression, level).map_err(|e| FormatError::Io {
            context: format!("compressing member {}", job.index),
            source: e,
        })?;
    Ok(Compressed {
        index: job.index,
        plain: job.data,
        compressed,
        chunk_digest,
    })
}

fn compress_bytes(data: &[u8], compression: Compression, level: u32) -> std::io::Result<Vec<u8>> {
    match compression {
        Compression::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(data.len() / 2 + 64),
                flate2::Compression::new(level),
            );
            encoder.write_all(data)?;
            encoder.finish()
        }
        Compression::Zstd => zstd::bulk::compress(data, level as i32),
    }
}

/// The layout thread's handle on the pipeline.
struct JobSender {
    job_tx: Sender<Job>,
    token_rx: Receiver<()>,
}

impl JobSender {
    fn send(&self, job: Job) -> Result<(), FormatError> {
        let aborted = || FormatError::Io {
            context: "writing the layer".into(),
            source: std::io::Error::other("the output side stopped"),
        };
        self.token_rx.recv().map_err(|_| aborted())?;
        self.job_tx.send(job).map_err(|_| aborted())
    }
}

#[cfg(test)]
mod entry_limit_tests {
    use super::layout::check_entry_room;
    use crate::estargz::tarfmt::{RawMember, TarMeta};
    use crate::estargz::MAX_TOC_ENTRIES;

    #[test]
    fn a_member_past_the_entry_limit_is_refused_by_name() {
        let member = RawMember {
            header: Vec::new(),
            meta: TarMeta {
                name: "big/file".into(),
                ..TarMeta::default()
            },
            offset: 4096,
        };
        assert!(check_entry_room(MAX_TOC_ENTRIES - 3, 3, &member).is_ok());
        let err = check_entry_room(MAX_TOC_ENTRIES - 3, 4, &member)
            .unwrap_err()
            .to_string();
        assert!(err.contains("big/file"), "{err}");
        assert!(
            err.contains(&format!("more than {MAX_TOC_ENTRIES} TOC entries")),
            "{err}"
        );
    }
}
