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

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;

use base64::Engine;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use sha2::{Digest, Sha256};

use crate::digest::sha256_digest;
use crate::labels;

use super::footer::{estargz_footer, zstd_footer, ZSTD_SKIPPABLE_MAGIC};
use super::reader::normalize_name;
use super::tarfmt::{padding, ustar_reg_header, RawMember, TarMeta, TarStream, MAX_NON_REG_DATA};
use super::timefmt::format_rfc3339;
use super::toc::{Toc, TocEntry, MAX_TOC_ENTRIES};
use super::{
    Compression, FormatError, DEFAULT_CHUNK_SIZE, LANDMARK_CONTENT, NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK, TOC_TAR_NAME, UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION, ZSTD_MANIFEST_POSITION_ANNOTATION,
};

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
    pub blob_digest: String,
    pub blob_size: u64,
    /// `sha256:<hex>` of the decompressed stream.
    pub diff_id: String,
    /// Length of the decompressed stream.
    pub uncompressed_size: u64,
    /// `sha256:<hex>` of the uncompressed TOC JSON.
    pub toc_digest: String,
    /// zstd:chunked: `sha256:<hex>` of the compressed TOC.
    pub zstd_manifest_checksum: Option<String>,
    /// zstd:chunked: `offset:compressedLen:uncompressedLen:1`.
    pub zstd_manifest_position: Option<String>,
}

impl BuiltLayer {
    /// The layer annotations to put in the image manifest.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert(labels::TOC_DIGEST.to_string(), self.toc_digest.clone());
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
        .then(|| job.data.get(..job.digest_len).map(sha256_digest))
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

/// Where a TOC field's value comes from once members are written.
#[derive(Debug, Clone)]
enum DigestSource {
    Known(String),
    Member(u64),
}

/// A TOC entry whose offset and digests are filled in after compression.
struct PlannedEntry {
    toc: TocEntry,
    member: Option<u64>,
    chunk_digest: Option<DigestSource>,
    file_digest: Option<DigestSource>,
}

/// Cuts the tar stream into members and plans the TOC.
struct Layout<'a> {
    opts: &'a BuildOptions,
    sender: JobSender,
    pending: Vec<u8>,
    pending_digest_len: usize,
    next_member: u64,
    entries: Vec<PlannedEntry>,
}

fn xattrs_base64(xattrs: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    xattrs
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                base64::engine::general_purpose::STANDARD.encode(v),
            )
        })
        .collect()
}

fn toc_entry_for(meta: &TarMeta) -> TocEntry {
    let kind = meta.toc_type();
    let mut entry = TocEntry {
        name: meta.name.clone(),
        kind: kind.to_string(),
        modtime: format_rfc3339(meta.mtime),
        mode: u64::from(meta.mode),
        uid: meta.uid,
        gid: meta.gid,
        user_name: meta.uname.clone(),
        group_name: meta.gname.clone(),
        xattrs: xattrs_base64(&meta.xattrs),
        ..TocEntry::default()
    };
    match kind {
        "reg" => entry.size = meta.size,
        "symlink" | "hardlink" => entry.link_name = meta.link_name.clone(),
        "char" | "block" => {
            entry.dev_major = meta.dev_major;
            entry.dev_minor = meta.dev_minor;
        }
        _ => {}
    }
    entry
}

/// Reads a member's data from wherever it lies (the live stream or the spool).
trait MemberData {
    fn read_data(&mut self, buf: &mut [u8]) -> Result<(), FormatError>;
}

impl<R: Read> MemberData for TarStream<R> {
    fn read_data(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        TarStream::read_data(self, buf)
    }
}

struct SpoolData<'a> {
    file: &'a File,
    pos: u64,
}

impl MemberData for SpoolData<'_> {
    fn read_data(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        self.file
            .read_exact_at(buf, self.pos)
            .map_err(|e| FormatError::Io {
                context: format!("reading the spool file at {}", self.pos),
                source: e,
            })?;
        self.pos += buf.len() as u64;
        Ok(())
    }
}

/// Whether `member` is a TOC or landmark of an eStargz input (re-converting an eStargz layer):
/// this layer gets its own, and a second landmark would make it unmountable lazily.
fn is_estargz_metadata(member: &RawMember) -> bool {
    normalize_name(&member.meta.name).is_ok_and(|name| {
        [TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&name.as_str())
    })
}

/// The names of the members so far, and whether each is a directory: what a hardlink may point
/// at (an earlier member of the same layer that is not a directory, as for tar and the layers
/// readers accept).
#[derive(Default)]
struct SeenMembers(std::collections::HashMap<String, bool>);

impl SeenMembers {
    /// Refuses a member whose name or hardlink target is unsafe, or whose hardlink points at
    /// nothing before it or at a directory; records it otherwise.
    fn check(&mut self, member: &RawMember) -> Result<(), FormatError> {
        let bad = |reason: String| FormatError::BadTar {
            name: member.meta.name.clone(),
            offset: member.offset,
            reason,
        };
        let name = normalize_name(&member.meta.name)
            .map_err(|r| bad(format!("unsafe member name: {r}")))?;
        if member.meta.typeflag == b'1' {
            let target = normalize_name(&member.meta.link_name)
                .map_err(|r| bad(format!("unsafe hardlink target: {r}")))?;
            if target.is_empty() {
                return Err(bad("hardlink to the root directory".into()));
            }
            match self.0.get(&target) {
                None => {
                    return Err(bad(format!(
                        "hardlink target {target:?} is not an earlier member of the layer"
                    )))
                }
                Some(true) => {
                    return Err(bad(format!("hardlink target {target:?} is a directory")))
                }
                Some(false) => {}
            }
        }
        self.0.insert(name, member.meta.typeflag == b'5');
        Ok(())
    }
}

impl<'a> Layout<'a> {
    fn new(opts: &'a BuildOptions, sender: JobSender) -> Self {
        Layout {
            opts,
            sender,
            pending: Vec::new(),
            pending_digest_len: 0,
            next_member: 0,
            entries: Vec::new(),
        }
    }

    fn run<R: Read>(&mut self, input: R) -> Result<(), FormatError> {
        let mut stream = TarStream::new(input);
        if self.opts.prioritized.is_empty() && self.opts.recorded.is_empty() {
            self.add_landmark(NO_PREFETCH_LANDMARK)?;
            let mut seen = SeenMembers::default();
            while let Some(member) = stream.next_member()? {
                seen.check(&member)?;
                if is_estargz_metadata(&member) {
                    continue;
                }
                self.add_member(&member, &mut stream, &[])?;
            }
            stream.drain()?;
        } else {
            let spool = Spool::read(&mut stream)?;
            stream.drain()?;
            let order = spool.order(&self.opts.prioritized, &self.opts.recorded);
            for item in order {
                match item {
                    Ordered::Landmark => self.add_landmark(PREFETCH_LANDMARK)?,
                    Ordered::Member(i, read) => {
                        let Some(spooled) = spool.members.get(i) else {
                            continue;
                        };
                        let mut header =
                            vec![0u8; (spooled.header.end - spooled.header.start) as usize];
                        spool
                            .file
                            .read_exact_at(&mut header, spooled.header.start)
                            .map_err(|e| FormatError::Io {
                                context: "reading the spool file".into(),
                                source: e,
                            })?;
                        let member = RawMember {
                            header,
                            meta: spooled.meta.clone(),
                            offset: spooled.offset,
                        };
                        let mut data = SpoolData {
                            file: &spool.file,
                            pos: spooled.header.end,
                        };
                        self.add_member(&member, &mut data, read)?;
                    }
                }
            }
        }
        if self.opts.compression == Compression::Zstd {
            // zstd:chunked keeps no TOC tar member; end the tar stream here.
            self.pending.extend_from_slice(&[0u8; 1024]);
        }
        self.flush()?;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), FormatError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.pending);
        let job = Job {
            index: self.next_member,
            data,
            digest_len: std::mem::take(&mut self.pending_digest_len),
        };
        self.next_member += 1;
        self.sender.send(job)
    }

    fn add_landmark(&mut self, name: &str) -> Result<(), FormatError> {
        let meta = TarMeta {
            name: name.to_string(),
            typeflag: b'0',
            mode: 0o644,
            size: 1,
            ..TarMeta::default()
        };
        let member = RawMember {
            header: ustar_reg_header(name, 1, 0o644).to_vec(),
            meta,
            offset: 0,
        };
        let mut data = LandmarkData;
        self.add_member(&member, &mut data, &[])?;
        if let Some(last) = self.entries.last_mut() {
            last.toc.modtime.clear();
        }
        Ok(())
    }

    /// Adds one tar member; a regular file is cut into chunks by [`plan_chunks`] around `read`.
    fn add_member(
        &mut self,
        member: &RawMember,
        data: &mut dyn MemberData,
        read: &[Range<u64>],
    ) -> Result<(), FormatError> {
        let meta = &member.meta;
        check_entry_room(self.entries.len(), 1, member)?;
        let mut toc = toc_entry_for(meta);
        self.pending.extend_from_slice(&member.header);
        if !meta.is_reg() {
            if meta.size > MAX_NON_REG_DATA {
                return Err(FormatError::BadTar {
                    name: meta.name.clone(),
                    offset: member.offset,
                    reason: format!(
                        "a {} member carries {} data bytes; only regular files may hold data",
                        meta.toc_type(),
                        meta.size
                    ),
                });
            }
            let start = self.pending.len();
            self.pending.resize(start + meta.size as usize, 0);
            data.read_data(&mut self.pending[start..])?;
            self.pending
                .resize(self.pending.len() + padding(meta.size) as usize, 0);
            self.entries.push(PlannedEntry {
                toc,
                member: None,
                chunk_digest: None,
                file_digest: None,
            });
            return self.flush_if_large();
        }
        if meta.size == 0 {
            toc.digest = sha256_digest(&[]);
            self.entries.push(PlannedEntry {
                toc,
                member: None,
                chunk_digest: None,
                file_digest: None,
            });
            return self.flush_if_large();
        }
        self.flush()?;
        let size = meta.size;
        let chunk_size = self.opts.chunk_size;
        let chunks = plan_chunks(size, chunk_size, read);
        check_entry_room(self.entries.len(), chunks.len(), member)?;
        // A file of one chunk takes its digest from the chunk's; any other is hashed whole.
        let mut file_hasher = (chunks.len() > 1).then(Sha256::new);
        let first_index = self.entries.len();
        for (chunk_offset, len, skip_prefetch) in chunks {
            let last = chunk_offset + len == size;
            let mut buf = Vec::with_capacity(len as usize + if last { 512 } else { 0 });
            buf.resize(len as usize, 0);
            data.read_data(&mut buf)?;
            if let Some(h) = file_hasher.as_mut() {
                h.update(&buf);
            }
            let member = self.next_member;
            let mut entry = if chunk_offset == 0 {
                std::mem::take(&mut toc)
            } else {
                TocEntry {
                    name: meta.name.clone(),
                    kind: "chunk".into(),
                    chunk_offset,
                    ..TocEntry::default()
                }
            };
            if len == chunk_size || !last {
                entry.chunk_size = len;
            }
            entry.skip_prefetch = skip_prefetch;
            self.entries.push(PlannedEntry {
                toc: entry,
                member: Some(member),
                chunk_digest: Some(DigestSource::Member(member)),
                file_digest: None,
            });
            if last {
                buf.resize(buf.len() + padding(size) as usize, 0);
                self.pending = buf;
                self.pending_digest_len = len as usize;
            } else {
                self.pending = buf;
                self.pending_digest_len = len as usize;
                self.flush()?;
            }
        }
        let file_digest = match file_hasher {
            Some(h) => DigestSource::Known(format!("sha256:{}", hex::encode(h.finalize()))),
            None => DigestSource::Member(
                self.entries
                    .get(first_index)
                    .and_then(|e| e.member)
                    .unwrap_or(0),
            ),
        };
        if let Some(first) = self.entries.get_mut(first_index) {
            first.file_digest = Some(file_digest);
        }
        self.flush_if_large()
    }

    /// Keeps header-only runs (many empty files) from growing one member without bound.
    fn flush_if_large(&mut self) -> Result<(), FormatError> {
        if self.pending.len() as u64 >= self.opts.chunk_size.max(1 << 20) {
            self.flush()?;
        }
        Ok(())
    }
}

/// Refuses a member that would take the TOC past [`MAX_TOC_ENTRIES`] (`planned` entries so
/// far, `more` for this member): a layer no reader would open is never written.
fn check_entry_room(planned: usize, more: usize, member: &RawMember) -> Result<(), FormatError> {
    if planned + more <= MAX_TOC_ENTRIES {
        return Ok(());
    }
    Err(FormatError::BadTar {
        name: member.meta.name.clone(),
        offset: member.offset,
        reason: format!(
            "the layer needs more than {MAX_TOC_ENTRIES} TOC entries (files, directories, links \
             and chunks), the most a reader accepts: split it into several layers"
        ),
    })
}

/// The chunks of a file of `size` bytes as `(offset, len, skip_prefetch)`: pieces of at most
/// `chunk_size`, also cut at the edges of the `read` ranges, the pieces outside every range
/// marked to be skipped by the prefetch (none when `read` is empty).
fn plan_chunks(size: u64, chunk_size: u64, read: &[Range<u64>]) -> Vec<(u64, u64, bool)> {
    let mut edges: Vec<u64> = read
        .iter()
        .flat_map(|r| [r.start, r.end])
        .filter(|&e| e > 0 && e < size)
        .collect();
    edges.push(size);
    edges.sort_unstable();
    edges.dedup();
    let mut chunks = Vec::new();
    let mut start = 0u64;
    for edge in edges {
        let skip = !read.is_empty() && !read.iter().any(|r| r.start <= start && start < r.end);
        while start < edge {
            let len = chunk_size.max(1).min(edge - start);
            chunks.push((start, len, skip));
            start += len;
        }
    }
    chunks
}

struct LandmarkData;

impl MemberData for LandmarkData {
    fn read_data(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        buf.fill(LANDMARK_CONTENT);
        Ok(())
    }
}

/// The input tar spooled to an anonymous temp file so prioritized members can move first.
struct Spool {
    file: File,
    members: Vec<SpooledMember>,
}

struct SpooledMember {
    /// Header bytes in the spool; the data follows directly.
    header: Range<u64>,
    meta: TarMeta,
    path: String,
    offset: u64,
}

enum Ordered<'r> {
    /// A member, with the ranges of it a recorded workload read (empty: all of it).
    Member(usize, &'r [Range<u64>]),
    Landmark,
}

impl Spool {
    fn read<R: Read>(stream: &mut TarStream<R>) -> Result<Spool, FormatError> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| FormatError::Io { context, source }
        };
        let file =
            tempfile::tempfile().map_err(io("creating the spool file for prioritized files"))?;
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, &file);
        let mut members = Vec::new();
        let mut pos = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut seen = SeenMembers::default();
        while let Some(member) = stream.next_member()? {
            seen.check(&member)?;
            if is_estargz_metadata(&member) {
                continue;
            }
            writer
                .write_all(&member.header)
                .map_err(io("writing the spool file"))?;
            let header = pos..pos + member.header.len() as u64;
            pos = header.end;
            let mut left = member.meta.size;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                let part = buf.get_mut(..n).unwrap_or_default();
                stream.read_data(part)?;
                writer
                    .write_all(part)
                    .map_err(io("writing the spool file"))?;
                left -= n as u64;
            }
            pos += member.meta.size;
            let path = normalize_name(&member.meta.name).unwrap_or_default();
            members.push(SpooledMember {
                header,
                meta: member.meta,
                path,
                offset: member.offset,
            });
        }
        writer.flush().map_err(io("writing the spool file"))?;
        drop(writer);
        let mut file = file;
        file.rewind().map_err(io("rewinding the spool file"))?;
        Ok(Spool { file, members })
    }

    /// Prioritized members (with their parent dirs and hardlink targets) in pattern order, then
    /// the recorded files in their order, the prefetch landmark, then everything else in source
    /// order.
    fn order<'r>(&self, patterns: &[String], recorded: &'r [RecordedFile]) -> Vec<Ordered<'r>> {
        let mut by_path: HashMap<&str, usize> = HashMap::new();
        for (i, m) in self.members.iter().enumerate() {
            by_path.entry(m.path.as_str()).or_insert(i);
        }
        let mut taken = vec![false; self.members.len()];
        let mut order = Vec::new();
        for pattern in patterns {
            let trimmed = pattern.trim_start_matches("./").trim_start_matches('/');
            let exact = normalize_name(trimmed).unwrap_or_default();
            let glob = glob::Pattern::new(trimmed).ok();
            for i in 0..self.members.len() {
                let Some(m) = self.members.get(i) else {
                    continue;
                };
                if taken.get(i).copied().unwrap_or(true) || m.path.is_empty() {
                    continue;
                }
                let matches = m.path == exact || glob.as_ref().is_some_and(|g| g.matches(&m.path));
                if matches {
                    self.take(i, &by_path, &mut taken, &mut order, 0);
                }
            }
        }
        for file in recorded {
            let path = normalize_name(&file.path).unwrap_or_default();
            if let Some(&i) = by_path.get(path.as_str()) {
                let before = order.len();
                self.take(i, &by_path, &mut taken, &mut order, 0);
                let grew = order.len() > before;
                if let Some(Ordered::Member(last, read)) = order.last_mut() {
                    if *last == i && grew {
                        *read = &file.read;
                    }
                }
            }
        }
        order.push(Ordered::Landmark);
        for (i, t) in taken.iter().enumerate() {
            if !t {
                order.push(Ordered::Member(i, &[]));
            }
        }
        order
    }

    fn take(
        &self,
        i: usize,
        by_path: &HashMap<&str, usize>,
        taken: &mut [bool],
        order: &mut Vec<Ordered<'_>>,
        depth: usize,
    ) {
        let Some(m) = self.members.get(i) else { return };
        if taken.get(i).copied().unwrap_or(true) || depth > 64 {
            return;
        }
        // Parent directories first.
        let mut prefix_end = 0;
        while let Some(slash) = m.path.get(prefix_end..).and_then(|s| s.find('/')) {
            let parent = &m.path[..prefix_end + slash];
            if let Some(&p) = by_path.get(parent) {
                if p != i {
                    self.take(p, by_path, taken, order, depth + 1);
                }
            }
            prefix_end += slash + 1;
        }
        if m.meta.typeflag == b'1' {
            if let Ok(target) = normalize_name(&m.meta.link_name) {
                if let Some(&t) = by_path.get(target.as_str()) {
                    if t != i {
                        self.take(t, by_path, taken, order, depth + 1);
                    }
                }
            }
        }
        if let Some(slot) = taken.get_mut(i) {
            if !*slot {
                *slot = true;
                order.push(Ordered::Member(i, &[]));
            }
        }
    }
}

/// The ordered writing end: output, offsets and hashes.
struct OutputSink<'w, W: Write> {
    output: &'w mut W,
    offset: u64,
    blob_hasher: Sha256,
    diff_hasher: Sha256,
    uncompressed: u64,
    member_offsets: Vec<u64>,
    member_digests: Vec<Option<String>>,
}

impl<'w, W: Write> OutputSink<'w, W> {
    fn new(output: &'w mut W) -> Self {
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

    fn write(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        self.output.write_all(bytes).map_err(|e| FormatError::Io {
            context: format!("writing the layer at offset {}", self.offset),
            source: e,
        })?;
        self.blob_hasher.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn plain(&mut self, bytes: &[u8]) {
        self.diff_hasher.update(bytes);
        self.uncompressed += bytes.len() as u64;
    }

    /// Writes compressed members in index order as they arrive; returns a token per member
    /// written. On error, stops early (dropping the token sender stops the layout thread).
    fn write_members(
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

    fn resolve(&self, source: &Option<DigestSource>) -> String {
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

    fn finish(
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
                    Some(sha256_digest(&compressed)),
                    Some(format!("{toc_offset}:{clen}:{ulen}:1")),
                )
            }
        };
        self.output
            .flush()
            .map_err(io("flushing the layer output"))?;
        Ok(BuiltLayer {
            blob_digest: format!("sha256:{}", hex::encode(self.blob_hasher.finalize())),
            blob_size: self.offset,
            diff_id: format!("sha256:{}", hex::encode(self.diff_hasher.finalize())),
            uncompressed_size: self.uncompressed,
            toc_digest,
            zstd_manifest_checksum: checksum,
            zstd_manifest_position: position,
        })
    }
}

#[cfg(test)]
mod entry_limit_tests {
    use super::*;

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
