//! What a recorded workload used: the access log the recording mounts feed (first access of each
//! file, byte ranges read), the record it becomes (per layer, in first-access order), and the
//! record's file format (JSON lines, `--record-out` / `--record-in`).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use lazysnap_fuse::{ContentId, ContentSource, OpenObserver, ReadDone};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::estargz::RecordedFile;

/// Reads closer than this are prefetched together (a gap this small costs less than a miss, and
/// fewer, larger chunks compress better). On the python3 image at 10 Mbit/s, 16 KiB with
/// [`WHOLE_FILE_MAX`] 64 KiB prefetched 2.26 MB for `print(1)`; 64 KiB with 1 MiB, 2.83 MB.
pub const MERGE_GAP: u64 = 16 << 10;
/// Files up to this size are prefetched whole, however little of them was read.
pub const WHOLE_FILE_MAX: u64 = 64 << 10;
/// Files of which at least this share (percent) was read are prefetched whole.
pub const WHOLE_FILE_READ_PCT: u64 = 75;

/// One file a workload used, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedAccess {
    /// Position of the layer among the image's tar layers (base first).
    pub layer: usize,
    /// Digest of that layer in the source image (for people; `layer` is what counts).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub layer_digest: String,
    /// Path of the file in the layer, relative to `/`.
    pub path: String,
    /// Size of the file.
    pub size: u64,
    /// Byte ranges read, `[start, end)`, sorted and disjoint (empty when only opened).
    #[serde(default)]
    pub read: Vec<(u64, u64)>,
}

impl RecordedAccess {
    /// Bytes of the file read.
    pub fn read_bytes(&self) -> u64 {
        self.read.iter().map(|(s, e)| e.saturating_sub(*s)).sum()
    }

    /// The file as the layer writer takes it: whole, or only the ranges read (widened to
    /// [`MERGE_GAP`]) when it is large and mostly unread.
    pub fn to_recorded_file(&self) -> RecordedFile {
        RecordedFile {
            path: self.path.clone(),
            read: prefetch_ranges(self.size, &self.read),
        }
    }
}

/// The ranges of a file of `size` bytes to prefetch when `read` was read: empty (the whole file)
/// for a small or mostly read file, else the reads with gaps under [`MERGE_GAP`] closed.
pub fn prefetch_ranges(size: u64, read: &[(u64, u64)]) -> Vec<Range<u64>> {
    let read_bytes: u64 = read.iter().map(|(s, e)| e.saturating_sub(*s)).sum();
    if size <= WHOLE_FILE_MAX || read_bytes.saturating_mul(100) >= size * WHOLE_FILE_READ_PCT {
        return Vec::new();
    }
    let mut out: Vec<Range<u64>> = Vec::new();
    for &(start, end) in read {
        let (start, end) = (start.min(size), end.min(size));
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if start <= last.end.saturating_add(MERGE_GAP) => {
                last.end = last.end.max(end)
            }
            _ => out.push(start..end),
        }
    }
    if let Some(last) = out.last_mut() {
        if size - last.end < MERGE_GAP {
            last.end = size;
        }
    }
    if let Some(first) = out.first_mut() {
        if first.start < MERGE_GAP {
            first.start = 0;
        }
    }
    out
}

/// The record of a run: every file used, in first-access order across layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub accesses: Vec<RecordedAccess>,
}

/// Why a record file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {detail} (each line is a JSON object with layer, path, size and read, as --record-out writes)")]
    Parse {
        path: String,
        line: usize,
        detail: String,
    },
}

impl Record {
    /// The files of each of `layers` tar layers to place first, in first-access order.
    pub fn per_layer(&self, layers: usize) -> Vec<Vec<RecordedFile>> {
        let mut out = vec![Vec::new(); layers];
        for access in &self.accesses {
            if let Some(files) = out.get_mut(access.layer) {
                files.push(access.to_recorded_file());
            }
        }
        out
    }

    /// Writes the record as JSON lines.
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        let io = |source| RecordError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        for access in &self.accesses {
            let line = serde_json::to_string(access).map_err(|e| io(e.into()))?;
            writeln!(out, "{line}").map_err(io)?;
        }
        out.flush().map_err(io)
    }

    /// Reads a record written by [`Record::write`]; `layers` is the number of tar layers of the
    /// image it is applied to.
    pub fn read(path: &Path, layers: usize) -> Result<Record, RecordError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| RecordError::Io {
            path: name.clone(),
            source,
        })?;
        let mut accesses = Vec::new();
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| RecordError::Io {
                path: name.clone(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let parse = |detail: String| RecordError::Parse {
                path: name.clone(),
                line: n + 1,
                detail,
            };
            let access: RecordedAccess =
                serde_json::from_str(&line).map_err(|e| parse(e.to_string()))?;
            if access.layer >= layers {
                return Err(parse(format!(
                    "layer {} does not exist: the image has {layers} layers (was the record made for another image?)",
                    access.layer
                )));
            }
            if access.read.iter().any(|(s, e)| s >= e) {
                return Err(parse("a read range is empty or reversed".into()));
            }
            accesses.push(access);
        }
        Ok(Record { accesses })
    }
}

/// A regular file of a recorded layer: its path and size, by content id.
pub type LayerFileNames = Vec<(String, u64)>;

/// Collects first accesses and byte ranges read from every recording mount of one run.
#[derive(Debug, Default)]
pub struct AccessLog {
    inner: Mutex<LogInner>,
}

/// A file of one layer: (layer position, content id).
type FileKey = (usize, ContentId);

#[derive(Debug, Default)]
struct LogInner {
    /// Files in first-access order, with the ranges read.
    files: Vec<(FileKey, Vec<Range<u64>>)>,
    position: HashMap<FileKey, usize>,
}

impl LogInner {
    fn slot(&mut self, key: FileKey) -> &mut Vec<Range<u64>> {
        let next = self.files.len();
        let at = *self.position.entry(key).or_insert(next);
        if at == next {
            self.files.push((key, Vec::new()));
        }
        &mut self.files[at].1
    }
}

impl AccessLog {
    pub fn new() -> Arc<AccessLog> {
        Arc::new(AccessLog::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        crate::sync::lock(&self.inner)
    }

    /// File `content` of `layer` was opened.
    pub fn opened(&self, layer: usize, content: ContentId) {
        self.lock().slot((layer, content));
    }

    /// `range` of file `content` of `layer` was read.
    pub fn read(&self, layer: usize, content: ContentId, range: Range<u64>) {
        self.lock().slot((layer, content)).push(range);
    }

    /// An observer that logs opens of `layer`'s files.
    pub fn open_observer(self: &Arc<Self>, layer: usize) -> OpenObserver {
        let log = Arc::clone(self);
        OpenObserver(Arc::new(move |content| log.opened(layer, content)))
    }

    /// The record: `names[layer][content]` names each file, `digests[layer]` each layer.
    pub fn record(&self, names: &[LayerFileNames], digests: &[Digest]) -> Record {
        let inner = self.lock();
        let mut accesses = Vec::with_capacity(inner.files.len());
        for ((layer, content), ranges) in &inner.files {
            let Some((path, size)) = usize::try_from(*content)
                .ok()
                .and_then(|c| names.get(*layer)?.get(c))
            else {
                continue;
            };
            accesses.push(RecordedAccess {
                layer: *layer,
                layer_digest: digests
                    .get(*layer)
                    .map(Digest::to_string)
                    .unwrap_or_default(),
                path: path.clone(),
                size: *size,
                read: merge(ranges, *size),
            });
        }
        Record { accesses }
    }
}

/// `ranges` sorted, clamped to `size` and merged where they touch or overlap.
fn merge(ranges: &[Range<u64>], size: u64) -> Vec<(u64, u64)> {
    let mut sorted: Vec<(u64, u64)> = ranges
        .iter()
        .map(|r| (r.start.min(size), r.end.min(size)))
        .filter(|(s, e)| s < e)
        .collect();
    sorted.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in sorted {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// A content source that logs every read of layer `layer` before passing it on.
pub struct RecordingSource {
    pub inner: Arc<dyn ContentSource>,
    pub layer: usize,
    pub log: Arc<AccessLog>,
}

impl ContentSource for RecordingSource {
    fn read(&self, content: ContentId, offset: u64, size: u32, done: ReadDone) {
        self.log.read(
            self.layer,
            content,
            offset..offset.saturating_add(u64::from(size)),
        );
        self.inner.read(content, offset, size, done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_file_read_in_two_places_prefetches_only_those() {
        let size = 8 << 20;
        let read = [(0, 4096), (4 << 20, (4 << 20) + 8192)];
        assert_eq!(
            prefetch_ranges(size, &read),
            vec![0..4096, (4 << 20)..(4 << 20) + 8192]
        );
        // Gaps under MERGE_GAP close, and so do the ends near the file's edges.
        let read = [
            (5_000, 8_000),
            (20_000, 30_000),
            (100_000, 110_000),
            (size - 100, size),
        ];
        assert_eq!(
            prefetch_ranges(size, &read),
            vec![0..30_000, 100_000..110_000, (size - 100)..size]
        );
    }

    #[test]
    fn small_or_mostly_read_files_are_prefetched_whole() {
        assert!(prefetch_ranges(WHOLE_FILE_MAX, &[(0, 10)]).is_empty());
        let size = 4 << 20;
        assert!(prefetch_ranges(size, &[(0, size * 3 / 4)]).is_empty());
        assert!(!prefetch_ranges(size, &[(0, size / 2)]).is_empty());
    }

    #[test]
    fn the_log_keeps_first_access_order_and_merges_reads() {
        let log = AccessLog::new();
        log.opened(1, 0);
        log.read(0, 2, 4096..8192);
        log.read(1, 0, 0..4096);
        log.read(0, 2, 0..4096);
        log.read(0, 2, 100..200);
        let names = vec![
            vec![("a".into(), 1), ("b".into(), 2), ("big".into(), 10_000)],
            vec![("first".into(), 5000)],
        ];
        let l0 = crate::digest::sha256_digest(b"l0");
        let l1 = crate::digest::sha256_digest(b"l1");
        let record = log.record(&names, &[l0, l1]);
        let paths: Vec<_> = record
            .accesses
            .iter()
            .map(|a| (a.layer, a.path.as_str()))
            .collect();
        assert_eq!(paths, vec![(1, "first"), (0, "big")]);
        assert_eq!(record.accesses[1].read, vec![(0, 8192)]);
        assert_eq!(record.accesses[0].read, vec![(0, 4096)]);
    }

    #[test]
    fn a_record_round_trips_and_a_bad_one_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.jsonl");
        let record = Record {
            accesses: vec![RecordedAccess {
                layer: 1,
                layer_digest: "sha256:x".into(),
                path: "usr/bin/app".into(),
                size: 10,
                read: vec![(0, 10)],
            }],
        };
        record.write(&path).unwrap();
        assert_eq!(Record::read(&path, 2).unwrap(), record);
        let err = Record::read(&path, 1).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("layer 1 does not exist"),
            "{err}"
        );
        std::fs::write(&path, "{\"layer\":0}\n").unwrap();
        let err = Record::read(&path, 1).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("path"), "{err}");
    }
}
