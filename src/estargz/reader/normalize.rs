//! A TOC turned into entries lazysnap can serve, or refused with the reason: names normalized
//! and confined, digests and sizes checked, chunks placed within the blob without overlaps, hard
//! links resolved.

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine;

use crate::estargz::timefmt::parse_rfc3339;
use crate::estargz::toc::{Toc, TocEntry};
use crate::estargz::{
    ChunkDigest, ChunkInfo, FormatError, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME,
};

use super::{Entry, EntryKind, Landmark, PrefetchPlan, MAX_CHUNK_LEN};

/// Normalizes a tar/TOC name: strips `./` and trailing `/`, refuses `..`, absolute paths and NUL.
/// Returns `""` for the root directory.
pub(crate) fn normalize_name(name: &str) -> Result<String, String> {
    if name.starts_with('/') {
        return Err("absolute path".into());
    }
    if name.contains('\0') {
        return Err("NUL byte in name".into());
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("path contains a `..` component".into()),
            other => parts.push(other),
        }
    }
    Ok(parts.join("/"))
}

pub(super) fn check_digest(value: &str) -> bool {
    crate::digest::Digest::parse_sha256(value).is_ok()
}

pub(super) struct Normalized {
    pub(super) entries: Vec<Entry>,
    pub(super) landmark: Option<Landmark>,
    pub(super) prefetch: Option<PrefetchPlan>,
}

/// Where the chunks of the open regular file go.
pub(super) enum OpenReg {
    None,
    Visible(usize),
    Hidden {
        name: String,
        size: u64,
        covered: u64,
    },
}

pub(super) struct ChunkPlace<'a> {
    pub(super) offset: u64,
    pub(super) inner: u64,
    pub(super) len: u64,
    pub(super) name: &'a str,
}

pub(super) fn normalize(toc: &Toc, data_end: u64) -> Result<Normalized, FormatError> {
    let entry_err = |e: &TocEntry, reason: String| FormatError::BadEntry {
        name: e.name.clone(),
        offset: e.offset,
        reason,
    };
    let mut offsets: Vec<u64> = Vec::new();
    for e in &toc.entries {
        if e.offset == 0 {
            continue;
        }
        if e.offset >= data_end {
            return Err(entry_err(
                e,
                format!(
                    "data offset lies outside the data part of the blob (which ends at {data_end})"
                ),
            ));
        }
        offsets.push(e.offset);
    }
    offsets.sort_unstable();
    offsets.dedup();
    let extent_end = |offset: u64| -> u64 {
        let next = offsets.partition_point(|&o| o <= offset);
        offsets.get(next).copied().unwrap_or(data_end)
    };

    let mut entries: Vec<Entry> = Vec::new();
    let mut places: Vec<ChunkPlace> = Vec::new();
    let mut landmark = None;
    let mut prefetch_range = None;
    let mut prefetch_skipped = Vec::new();
    let mut open = OpenReg::None;

    let close = |open: &OpenReg, entries: &[Entry]| -> Result<(), FormatError> {
        let (name, size, covered) = match open {
            OpenReg::None => return Ok(()),
            OpenReg::Visible(i) => match entries.get(*i) {
                Some(e) => (
                    e.path.clone(),
                    e.size,
                    e.chunks.last().map(|c| c.file_offset + c.len).unwrap_or(0),
                ),
                None => return Ok(()),
            },
            OpenReg::Hidden {
                name,
                size,
                covered,
            } => (name.clone(), *size, *covered),
        };
        if covered != size {
            return Err(FormatError::BadEntry {
                name,
                offset: 0,
                reason: format!("chunks cover {covered} bytes but the file has {size}"),
            });
        }
        Ok(())
    };

    for e in &toc.entries {
        if e.skip_prefetch && landmark.is_none() && e.offset > 0 {
            prefetch_skipped.push(e.offset);
        }
        if e.kind == "chunk" {
            let (size, covered, display) = match &open {
                OpenReg::None => {
                    return Err(entry_err(
                        e,
                        "chunk entry without a preceding regular file".into(),
                    ))
                }
                OpenReg::Visible(i) => {
                    let Some(file) = entries.get(*i) else {
                        return Err(entry_err(e, "chunk entry without its file".into()));
                    };
                    (
                        file.size,
                        file.chunks
                            .last()
                            .map(|c| c.file_offset + c.len)
                            .unwrap_or(0),
                        file.path.clone(),
                    )
                }
                OpenReg::Hidden { size, covered, .. } => (*size, *covered, e.name.clone()),
            };
            let file_name = match &open {
                OpenReg::Hidden { name, .. } => name.clone(),
                _ => display.clone(),
            };
            if normalize_name(&e.name).ok() != normalize_name(&file_name).ok() {
                return Err(entry_err(
                    e,
                    format!("chunk entry follows file {file_name:?} of another name"),
                ));
            }
            let chunk = make_chunk(e, size, covered, &extent_end, None)?;
            places.push(ChunkPlace {
                offset: chunk.compressed.start,
                inner: chunk.inner_offset,
                len: chunk.len,
                name: &e.name,
            });
            match &mut open {
                OpenReg::Visible(i) => {
                    if let Some(file) = entries.get_mut(*i) {
                        file.chunks.push(chunk);
                    }
                }
                OpenReg::Hidden { covered, .. } => *covered += chunk.len,
                OpenReg::None => {}
            }
            continue;
        }
        close(&open, &entries)?;
        open = OpenReg::None;

        let path = normalize_name(&e.name).map_err(|r| entry_err(e, r))?;
        let kind = EntryKind::from_toc_type(&e.kind)
            .ok_or_else(|| entry_err(e, format!("unknown entry type {:?}", e.kind)))?;
        let hidden_landmark = match path.as_str() {
            PREFETCH_LANDMARK => Some(Landmark::Prefetch),
            NO_PREFETCH_LANDMARK => Some(Landmark::NoPrefetch),
            _ => None,
        };
        if hidden_landmark.is_some() || path == TOC_TAR_NAME {
            if let Some(kind) = hidden_landmark {
                if landmark.is_some() {
                    return Err(entry_err(e, "second landmark in one layer".into()));
                }
                landmark = Some(kind);
                if kind == Landmark::Prefetch && e.offset > 0 {
                    prefetch_range = Some(0..extent_end(e.offset));
                }
            }
            if kind == EntryKind::Reg {
                let mut covered = 0;
                if e.size > 0 {
                    let chunk = make_chunk(e, e.size, 0, &extent_end, Some(&e.digest))?;
                    places.push(ChunkPlace {
                        offset: chunk.compressed.start,
                        inner: chunk.inner_offset,
                        len: chunk.len,
                        name: &e.name,
                    });
                    covered = chunk.len;
                }
                open = OpenReg::Hidden {
                    name: e.name.clone(),
                    size: e.size,
                    covered,
                };
            }
            continue;
        }
        if path.is_empty() {
            if kind != EntryKind::Dir {
                return Err(entry_err(e, "the root can only be a directory".into()));
            }
            continue;
        }
        let mtime = if e.modtime.is_empty() {
            0
        } else {
            parse_rfc3339(&e.modtime)
                .ok_or_else(|| entry_err(e, format!("modtime {:?} is not RFC3339", e.modtime)))?
        };
        let mut xattrs = BTreeMap::new();
        for (key, value) in &e.xattrs {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|err| entry_err(e, format!("xattr {key}: value is not base64: {err}")))?;
            xattrs.insert(key.clone(), decoded);
        }
        let dev = |n: u64, what: &str| {
            u32::try_from(n).map_err(|_| entry_err(e, format!("{what} {n} out of range")))
        };
        let mut entry = Entry {
            path,
            kind,
            mode: (e.mode & 0o7777) as u32,
            uid: e.uid,
            gid: e.gid,
            size: 0,
            mtime,
            link_target: None,
            dev_major: 0,
            dev_minor: 0,
            xattrs,
            digest: None,
            chunks: Vec::new(),
            stream_offset: 0,
        };
        match kind {
            EntryKind::Reg => {
                entry.size = e.size;
                if !e.digest.is_empty() {
                    if !check_digest(&e.digest) {
                        return Err(entry_err(
                            e,
                            format!("digest {:?} is not sha256:<hex>", e.digest),
                        ));
                    }
                    entry.digest = Some(e.digest.clone());
                }
                if e.size > 0 {
                    let chunk = make_chunk(e, e.size, 0, &extent_end, Some(&e.digest))?;
                    places.push(ChunkPlace {
                        offset: chunk.compressed.start,
                        inner: chunk.inner_offset,
                        len: chunk.len,
                        name: &e.name,
                    });
                    entry.chunks.push(chunk);
                }
                open = OpenReg::Visible(entries.len());
            }
            EntryKind::Symlink => {
                if e.link_name.is_empty() {
                    return Err(entry_err(e, "symlink without a target".into()));
                }
                entry.link_target = Some(e.link_name.clone());
            }
            EntryKind::Hardlink => {
                let target = normalize_name(&e.link_name)
                    .map_err(|r| entry_err(e, format!("hardlink target {:?}: {r}", e.link_name)))?;
                if target.is_empty() {
                    return Err(entry_err(e, "hardlink to the root directory".into()));
                }
                entry.link_target = Some(target);
            }
            EntryKind::Char | EntryKind::Block => {
                entry.dev_major = dev(e.dev_major, "devMajor")?;
                entry.dev_minor = dev(e.dev_minor, "devMinor")?;
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
        entries.push(entry);
    }
    close(&open, &entries)?;

    resolve_hardlinks(&mut entries)?;
    check_overlaps(&mut places)?;
    prefetch_skipped.sort_unstable();
    prefetch_skipped.dedup();
    Ok(Normalized {
        entries,
        landmark,
        prefetch: prefetch_range.map(|range| PrefetchPlan {
            range,
            skipped: prefetch_skipped,
        }),
    })
}

/// Builds the chunk described by TOC entry `e` (a `reg` or `chunk` entry) of a file of `size`
/// bytes whose earlier chunks cover `covered` bytes.
pub(super) fn make_chunk(
    e: &TocEntry,
    size: u64,
    covered: u64,
    extent_end: &dyn Fn(u64) -> u64,
    file_digest: Option<&str>,
) -> Result<ChunkInfo, FormatError> {
    let entry_err = |reason: String| FormatError::BadEntry {
        name: e.name.clone(),
        offset: e.offset,
        reason,
    };
    if e.chunk_offset != covered {
        return Err(entry_err(format!(
            "chunk starts at file offset {}, expected {covered} (chunks overlap, repeat or leave a gap)",
            e.chunk_offset
        )));
    }
    let rest = size.saturating_sub(e.chunk_offset);
    let len = if e.chunk_size > 0 { e.chunk_size } else { rest };
    if len == 0 || len > rest {
        return Err(entry_err(format!(
            "chunk of {len} bytes at file offset {} does not fit in the file of {size} bytes",
            e.chunk_offset
        )));
    }
    if len > MAX_CHUNK_LEN {
        return Err(entry_err(format!(
            "chunk of {len} bytes exceeds the {MAX_CHUNK_LEN}-byte limit"
        )));
    }
    if e.offset == 0 {
        return Err(entry_err("file data has no compressed offset".into()));
    }
    let digest_text = if !e.chunk_digest.is_empty() {
        e.chunk_digest.as_str()
    } else if let Some(d) = file_digest.filter(|d| !d.is_empty() && len == size) {
        d
    } else {
        return Err(entry_err("chunk has no chunkDigest".into()));
    };
    let digest = digest_text
        .parse::<ChunkDigest>()
        .map_err(|invalid| entry_err(invalid.to_string()))?;
    Ok(ChunkInfo {
        compressed: e.offset..extent_end(e.offset),
        inner_offset: e.inner_offset,
        file_offset: e.chunk_offset,
        len,
        digest,
    })
}

/// Checks that no two chunks share bytes of one member (same offset, overlapping inner ranges).
pub(super) fn check_overlaps(places: &mut [ChunkPlace]) -> Result<(), FormatError> {
    places.sort_by_key(|p| (p.offset, p.inner));
    for pair in places.windows(2) {
        let [prev, cur] = pair else { continue };
        if prev.offset == cur.offset && prev.inner.saturating_add(prev.len) > cur.inner {
            return Err(FormatError::BadEntry {
                name: cur.name.to_string(),
                offset: cur.offset,
                reason: format!(
                    "chunk at inner offset {} overlaps (or duplicates) a chunk of {:?} at inner offset {}",
                    cur.inner, prev.name, prev.inner
                ),
            });
        }
    }
    Ok(())
}

/// Resolves every hardlink target to an existing non-hardlink, non-directory entry.
pub(crate) fn resolve_hardlinks(entries: &mut [Entry]) -> Result<(), FormatError> {
    let mut by_path: HashMap<&str, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_path.insert(e.path.as_str(), i);
    }
    let mut resolved: Vec<(usize, String)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind != EntryKind::Hardlink {
            continue;
        }
        let mut seen = HashSet::new();
        let mut target = e.link_target.clone().unwrap_or_default();
        loop {
            let Some(&t) = by_path.get(target.as_str()) else {
                return Err(FormatError::BadEntry {
                    name: e.path.clone(),
                    offset: 0,
                    reason: format!("hardlink target {target:?} does not exist in the layer"),
                });
            };
            let Some(te) = entries.get(t) else { break };
            match te.kind {
                EntryKind::Hardlink => {
                    if !seen.insert(t) || t == i {
                        return Err(FormatError::BadEntry {
                            name: e.path.clone(),
                            offset: 0,
                            reason: "hardlink loop".into(),
                        });
                    }
                    target = te.link_target.clone().unwrap_or_default();
                }
                EntryKind::Dir => {
                    return Err(FormatError::BadEntry {
                        name: e.path.clone(),
                        offset: 0,
                        reason: format!("hardlink target {target:?} is a directory"),
                    })
                }
                _ => break,
            }
        }
        resolved.push((i, target));
    }
    for (i, target) in resolved {
        if let Some(e) = entries.get_mut(i) {
            e.link_target = Some(target);
        }
    }
    Ok(())
}
