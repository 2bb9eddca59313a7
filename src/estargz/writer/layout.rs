//! The layer's plan: the members of the source tar in output order (prioritized files first, then
//! the landmark), each cut into chunks, with the TOC entry each one gets.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::digest::sha256_digest;
use crate::estargz::reader::normalize_name;
use crate::estargz::tarfmt::{
    padding, ustar_reg_header, RawMember, TarMeta, TarStream, MAX_NON_REG_DATA,
};
use crate::estargz::timefmt::format_rfc3339;
use crate::estargz::toc::{TocEntry, MAX_TOC_ENTRIES};
use crate::estargz::{
    Compression, FormatError, LANDMARK_CONTENT, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
    TOC_TAR_NAME,
};

use super::spool::{Ordered, Spool};
use super::{BuildOptions, Job, JobSender};

/// Where a TOC field's value comes from once members are written.
#[derive(Debug, Clone)]
pub(super) enum DigestSource {
    Known(String),
    Member(u64),
}

/// A TOC entry whose offset and digests are filled in after compression.
pub(super) struct PlannedEntry {
    pub(super) toc: TocEntry,
    pub(super) member: Option<u64>,
    pub(super) chunk_digest: Option<DigestSource>,
    pub(super) file_digest: Option<DigestSource>,
}

/// Cuts the tar stream into members and plans the TOC.
pub(super) struct Layout<'a> {
    pub(super) opts: &'a BuildOptions,
    pub(super) sender: JobSender,
    pub(super) pending: Vec<u8>,
    pub(super) pending_digest_len: usize,
    pub(super) next_member: u64,
    pub(super) entries: Vec<PlannedEntry>,
}

pub(super) fn xattrs_base64(xattrs: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
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

pub(super) fn toc_entry_for(meta: &TarMeta) -> TocEntry {
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
pub(super) trait MemberData {
    fn read_data(&mut self, buf: &mut [u8]) -> Result<(), FormatError>;
}

impl<R: Read> MemberData for TarStream<R> {
    fn read_data(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        TarStream::read_data(self, buf)
    }
}

pub(super) struct SpoolData<'a> {
    pub(super) file: &'a File,
    pub(super) pos: u64,
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
pub(super) fn is_estargz_metadata(member: &RawMember) -> bool {
    normalize_name(&member.meta.name).is_ok_and(|name| {
        [TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&name.as_str())
    })
}

/// The names of the members so far, and whether each is a directory: what a hardlink may point
/// at (an earlier member of the same layer that is not a directory, as for tar and the layers
/// readers accept).
#[derive(Default)]
pub(super) struct SeenMembers(std::collections::HashMap<String, bool>);

impl SeenMembers {
    /// Refuses a member whose name or hardlink target is unsafe, or whose hardlink points at
    /// nothing before it or at a directory; records it otherwise.
    pub(super) fn check(&mut self, member: &RawMember) -> Result<(), FormatError> {
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
    pub(super) fn new(opts: &'a BuildOptions, sender: JobSender) -> Self {
        Layout {
            opts,
            sender,
            pending: Vec::new(),
            pending_digest_len: 0,
            next_member: 0,
            entries: Vec::new(),
        }
    }

    pub(super) fn run<R: Read>(&mut self, input: R) -> Result<(), FormatError> {
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

    pub(super) fn flush(&mut self) -> Result<(), FormatError> {
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

    pub(super) fn add_landmark(&mut self, name: &str) -> Result<(), FormatError> {
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
    pub(super) fn add_member(
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
            toc.digest = sha256_digest(&[]).into();
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
    pub(super) fn flush_if_large(&mut self) -> Result<(), FormatError> {
        if self.pending.len() as u64 >= self.opts.chunk_size.max(1 << 20) {
            self.flush()?;
        }
        Ok(())
    }
}

/// Refuses a member that would take the TOC past [`MAX_TOC_ENTRIES`] (`planned` entries so
/// far, `more` for this member): a layer no reader would open is never written.
pub(super) fn check_entry_room(
    planned: usize,
    more: usize,
    member: &RawMember,
) -> Result<(), FormatError> {
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
pub(super) fn plan_chunks(
    size: u64,
    chunk_size: u64,
    read: &[Range<u64>],
) -> Vec<(u64, u64, bool)> {
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

pub(super) struct LandmarkData;

impl MemberData for LandmarkData {
    fn read_data(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        buf.fill(LANDMARK_CONTENT);
        Ok(())
    }
}
