//! A SOCI zTOC: the file table of one gzip layer (names, types, offsets in the uncompressed tar
//! stream) and its gzip checkpoints, which make each span of the stream decodable on its own.
//!
//! Facts from the public schema (`ztoc.fbs`): table `Ztoc` { version, build_tool_identifier,
//! compressed_archive_size, uncompressed_archive_size, toc: `TOC` { metadata: [`FileMetadata`] },
//! compression_info: `CompressionInfo` { compression_algorithm (1 = gzip), max_span_id,
//! span_digests: [string], checkpoints: [ubyte] } }. The checkpoints are the zran index: an
//! `i32` count and an `i64` span size, then per checkpoint the compressed offset (`u64`), the
//! uncompressed offset (`u64`), the bits of the byte before the compressed offset that belong
//! to the span (`u8`) and the 32 KiB window of output before it, all little-endian. A first
//! version left out checkpoint 0 (at byte 10, output 0, no bits, an empty window).

use std::ops::Range;

use super::flatbuf::{FlatError, Table};

/// Bytes of history a gzip checkpoint keeps (the deflate window).
pub const WINDOW_SIZE: usize = 32 << 10;
/// Bytes of one checkpoint in the blob: compressed and uncompressed offsets, bits, window.
const CHECKPOINT_SIZE: usize = 8 + 8 + 1 + WINDOW_SIZE;
/// Bytes before the checkpoints in the blob: count and span size.
const CHECKPOINTS_HEADER: usize = 4 + 8;
/// `CompressionInfo.compression_algorithm` of gzip layers.
const GZIP: u8 = 1;
/// Most spans a zTOC may declare: a layer of 64 GiB at SOCI's smallest useful span size of
/// 1 MiB. Each holds a 32 KiB window in memory.
const MAX_SPANS: usize = 1 << 16;
/// Largest span accepted, uncompressed (one span is one cached chunk, decoded whole): 256 MiB,
/// 64 times SOCI's default span.
pub const MAX_SPAN_LEN: u64 = 256 << 20;

/// Why a zTOC cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZtocError {
    #[error(transparent)]
    Flat(#[from] FlatError),
    #[error("{0}")]
    Invalid(String),
}

fn invalid(what: impl Into<String>) -> ZtocError {
    ZtocError::Invalid(what.into())
}

/// One entry of the file table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtocFile {
    pub name: String,
    /// The tar type as a TOC type string: `reg`, `dir`, `symlink`, `hardlink`, `char`,
    /// `block`, `fifo`.
    pub kind: String,
    /// Where the file's content starts in the uncompressed tar stream.
    pub offset: u64,
    pub size: u64,
    pub link_name: String,
    pub mode: u64,
    pub uid: u32,
    pub gid: u32,
    /// RFC 3339.
    pub mod_time: String,
    pub dev_major: u64,
    pub dev_minor: u64,
    /// The entry's PAX records (extended attributes are those named `SCHILY.xattr.NAME`).
    pub pax_records: Vec<(String, String)>,
}

/// One gzip span: compressed bytes that decode on their own from a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The compressed bytes: from the byte holding the span's first bits to the next span's
    /// checkpoint (the blob's end for the last span).
    pub compressed: Range<u64>,
    /// What they decode to in the uncompressed tar stream.
    pub uncompressed: Range<u64>,
    /// How many high bits of the first compressed byte belong to the span (0: it starts on a
    /// byte boundary).
    pub bits: u8,
    /// The 32 KiB of output before the span, which its back-references may reach.
    pub window: Box<[u8]>,
    /// sha256 of the compressed bytes, from the zTOC.
    pub digest: [u8; 32],
}

/// A parsed zTOC.
#[derive(Debug, Clone)]
pub struct Ztoc {
    pub version: String,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub files: Vec<ZtocFile>,
    pub spans: Vec<Span>,
}

impl Ztoc {
    /// Parses and checks a zTOC blob: the spans must tile both the compressed layer (of
    /// `compressed_archive_size` bytes) and its uncompressed stream, each with a span digest.
    pub fn parse(buf: &[u8]) -> Result<Ztoc, ZtocError> {
        let root = Table::root(buf)?;
        let version = root.string(0, "version")?.to_string();
        let compressed_size = root.u64(2, "compressed_archive_size")?;
        let uncompressed_size = root.u64(3, "uncompressed_archive_size")?;
        let info = root
            .table(5, "compression_info")?
            .ok_or_else(|| invalid("no compression_info"))?;
        let algorithm = info.u8(0, "compression_algorithm", GZIP)?;
        if algorithm != GZIP {
            return Err(invalid(format!(
                "compression algorithm {algorithm} is not gzip (1): only gzip layers are read lazily"
            )));
        }
        let max_span_id = info.u32(1, "max_span_id")? as i32;
        let digests = info.strings(2, "span_digests")?;
        let checkpoints = parse_checkpoints(info.bytes(3, "checkpoints")?)?;
        let count = usize::try_from(max_span_id)
            .ok()
            .and_then(|id| id.checked_add(1))
            .ok_or_else(|| invalid(format!("max_span_id {max_span_id} is negative")))?;
        if checkpoints.len() != count {
            return Err(invalid(format!(
                "{} checkpoints for max_span_id {max_span_id}",
                checkpoints.len()
            )));
        }
        if digests.len() != count {
            return Err(invalid(format!(
                "{} span digests for {count} spans (a zTOC without span digests cannot be \
                 verified span by span; rebuild the index with a newer soci)",
                digests.len()
            )));
        }
        let spans = spans_of(checkpoints, &digests, compressed_size, uncompressed_size)?;
        let toc = root.table(4, "toc")?.ok_or_else(|| invalid("no toc"))?;
        let files = toc
            .tables(0, "metadata")?
            .iter()
            .map(parse_file)
            .collect::<Result<Vec<_>, _>>()?;
        for file in &files {
            let end = file.offset.checked_add(file.size);
            if file.kind == "reg" && end.is_none_or(|end| end > uncompressed_size) {
                return Err(invalid(format!(
                    "file {:?} ({} bytes at {}) ends past the uncompressed stream of {uncompressed_size} bytes",
                    file.name, file.size, file.offset
                )));
            }
        }
        Ok(Ztoc {
            version,
            compressed_size,
            uncompressed_size,
            files,
            spans,
        })
    }
}

fn parse_file(table: &Table<'_>) -> Result<ZtocFile, ZtocError> {
    let pax_records = table
        .tables(13, "xattrs")?
        .iter()
        .map(|x| {
            Ok((
                x.string(0, "key")?.to_string(),
                x.string(1, "value")?.to_string(),
            ))
        })
        .collect::<Result<Vec<_>, FlatError>>()?;
    Ok(ZtocFile {
        name: table.string(0, "name")?.to_string(),
        kind: table.string(1, "type")?.to_string(),
        offset: table.u64(2, "uncompressed_offset")?,
        size: table.u64(3, "uncompressed_size")?,
        link_name: table.string(4, "linkname")?.to_string(),
        mode: table.u64(5, "mode")?,
        uid: table.u32(6, "uid")?,
        gid: table.u32(7, "gid")?,
        mod_time: table.string(10, "mod_time")?.to_string(),
        dev_major: table.u64(11, "devmajor")?,
        dev_minor: table.u64(12, "devminor")?,
        pax_records,
    })
}

/// A checkpoint as stored: compressed offset, uncompressed offset, bits, window.
struct Checkpoint<'a> {
    compressed: u64,
    uncompressed: u64,
    bits: u8,
    window: &'a [u8],
}

fn parse_checkpoints(blob: &[u8]) -> Result<Vec<Checkpoint<'_>>, ZtocError> {
    let header = blob
        .get(..CHECKPOINTS_HEADER)
        .ok_or_else(|| invalid(format!("checkpoints: {} bytes, no header", blob.len())))?;
    let count = i32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let count = usize::try_from(count)
        .ok()
        .filter(|&n| (1..=MAX_SPANS).contains(&n))
        .ok_or_else(|| invalid(format!("checkpoints: count {count} out of range")))?;
    let body = &blob[CHECKPOINTS_HEADER..];
    let mut checkpoints = Vec::with_capacity(count);
    let stored = if body.len() == count * CHECKPOINT_SIZE {
        count
    } else if body.len() == (count - 1) * CHECKPOINT_SIZE {
        // The first version's layout: checkpoint 0 implied, just past a 10-byte gzip header.
        checkpoints.push(Checkpoint {
            compressed: 10,
            uncompressed: 0,
            bits: 0,
            window: &[0u8; WINDOW_SIZE][..],
        });
        count - 1
    } else {
        return Err(invalid(format!(
            "checkpoints: {} bytes do not hold {count} checkpoints",
            blob.len()
        )));
    };
    for record in body.chunks_exact(CHECKPOINT_SIZE).take(stored) {
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&record[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        checkpoints.push(Checkpoint {
            compressed: word(0),
            uncompressed: word(8),
            bits: record[16],
            window: &record[17..],
        });
    }
    Ok(checkpoints)
}

fn spans_of(
    checkpoints: Vec<Checkpoint<'_>>,
    digests: &[&str],
    compressed_size: u64,
    uncompressed_size: u64,
) -> Result<Vec<Span>, ZtocError> {
    let mut spans = Vec::with_capacity(checkpoints.len());
    for (i, point) in checkpoints.iter().enumerate() {
        let (next_compressed, next_uncompressed) = match checkpoints.get(i + 1) {
            Some(next) => (next.compressed, next.uncompressed),
            None => (compressed_size, uncompressed_size),
        };
        if point.bits > 7 {
            return Err(invalid(format!("checkpoint {i}: {} bits", point.bits)));
        }
        let start = point
            .compressed
            .checked_sub(u64::from(point.bits != 0))
            .ok_or_else(|| invalid(format!("checkpoint {i}: bits before byte 0")))?;
        if start >= next_compressed || next_compressed > compressed_size {
            return Err(invalid(format!(
                "span {i}: compressed bytes {start}..{next_compressed} are not within the layer of {compressed_size} bytes"
            )));
        }
        // Each span ends where the next begins: only the order and the start need checking.
        if point.uncompressed > next_uncompressed || (i == 0 && point.uncompressed != 0) {
            return Err(invalid(format!(
                "span {i}: uncompressed bytes {}..{next_uncompressed} do not follow the span before",
                point.uncompressed
            )));
        }
        if next_uncompressed - point.uncompressed > MAX_SPAN_LEN {
            return Err(invalid(format!(
                "span {i}: {} uncompressed bytes, more than the {MAX_SPAN_LEN} a span may hold",
                next_uncompressed - point.uncompressed
            )));
        }
        let digest = crate::digest::Digest::parse_sha256(digests[i])
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(hex::decode(d.hex()).ok()?).ok())
            .ok_or_else(|| invalid(format!("span {i}: digest {:?} is not sha256", digests[i])))?;
        spans.push(Span {
            compressed: start..next_compressed,
            uncompressed: point.uncompressed..next_uncompressed,
            bits: point.bits,
            window: point.window.into(),
            digest,
        });
    }
    Ok(spans)
}
