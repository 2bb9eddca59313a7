//! Writing a zTOC for a gzip layer, in the format SOCI reads: the file table of its tar stream
//! (each entry with the offset of its data) and the checkpoints [`build_checkpoints`] made, with
//! their span digests. FlatBuffers are built with the `flatbuffers` crate's builder, field by
//! field in the schema's order (see `ztoc.rs` for the layout this reader checks).

use std::io::Cursor;

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use super::checkpoints::Checkpointed;
use super::ztoc::WINDOW_SIZE;
use crate::estargz::timefmt::format_rfc3339;

/// zTOC format version written (the one Debian's soci 0.4.1 writes and reads).
const ZTOC_VERSION: &str = "0.9";

/// Why a zTOC could not be written.
#[derive(Debug, thiserror::Error)]
#[error("indexing the layer's tar stream: {0}")]
pub struct WriteError(String);

/// The slot of field `index` in a table's vtable.
fn slot(index: u16) -> u16 {
    4 + 2 * index
}

/// One tar entry as the zTOC lists it.
struct TarEntry {
    name: String,
    kind: &'static str,
    offset: u64,
    size: u64,
    link_name: String,
    mode: u64,
    uid: u32,
    gid: u32,
    user_name: String,
    group_name: String,
    mod_time: String,
    dev_major: u64,
    dev_minor: u64,
    pax_records: Vec<(String, String)>,
}

fn tar_entries(stream: &[u8]) -> Result<Vec<TarEntry>, WriteError> {
    let fail = |e: std::io::Error| WriteError(e.to_string());
    let mut archive = tar::Archive::new(Cursor::new(stream));
    let mut listed = Vec::new();
    for entry in archive.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        let header = entry.header().clone();
        let kind = match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => "reg",
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            // PAX and GNU long-name records belong to the entry after them.
            _ => continue,
        };
        let pax_records = match entry.pax_extensions().map_err(fail)? {
            Some(records) => records
                .filter_map(Result::ok)
                .filter_map(|r| Some((r.key().ok()?.to_string(), r.value().ok()?.to_string())))
                .collect(),
            None => Vec::new(),
        };
        listed.push(TarEntry {
            name: entry.path().map_err(fail)?.to_string_lossy().into_owned(),
            kind,
            offset: entry.raw_file_position(),
            size: if kind == "reg" { entry.size() } else { 0 },
            link_name: entry
                .link_name()
                .map_err(fail)?
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default(),
            mode: u64::from(header.mode().map_err(fail)?),
            uid: u32::try_from(header.uid().map_err(fail)?).unwrap_or(u32::MAX),
            gid: u32::try_from(header.gid().map_err(fail)?).unwrap_or(u32::MAX),
            user_name: header.username().ok().flatten().unwrap_or("").to_string(),
            group_name: header.groupname().ok().flatten().unwrap_or("").to_string(),
            mod_time: format_rfc3339(i64::try_from(header.mtime().map_err(fail)?).unwrap_or(0)),
            dev_major: u64::from(header.device_major().ok().flatten().unwrap_or(0)),
            dev_minor: u64::from(header.device_minor().ok().flatten().unwrap_or(0)),
            pax_records,
        });
    }
    Ok(listed)
}

/// The checkpoints as the zTOC stores them: count, span size, then each checkpoint's compressed
/// offset (past the byte holding its first bits), uncompressed offset, bits and window.
fn checkpoint_blob(layer: &Checkpointed, span_size: u64) -> Vec<u8> {
    let count = i32::try_from(layer.spans.len()).unwrap_or(i32::MAX);
    let mut blob = Vec::with_capacity(12 + layer.spans.len() * (17 + WINDOW_SIZE));
    blob.extend_from_slice(&count.to_le_bytes());
    blob.extend_from_slice(&span_size.to_le_bytes());
    for span in &layer.spans {
        let after_first_byte = span.compressed.start + u64::from(span.bits != 0);
        blob.extend_from_slice(&after_first_byte.to_le_bytes());
        blob.extend_from_slice(&span.uncompressed.start.to_le_bytes());
        blob.push(span.bits);
        blob.extend_from_slice(&span.window);
    }
    blob
}

/// The zTOC of the gzip layer `compressed_size` bytes long whose checkpoints are `layer`.
pub fn write_ztoc(
    layer: &Checkpointed,
    compressed_size: u64,
    span_size: u64,
    build_tool: &str,
) -> Result<Vec<u8>, WriteError> {
    let entries = tar_entries(&layer.uncompressed)?;
    let mut fbb = FlatBufferBuilder::with_capacity(1 << 20);
    let mut files = Vec::with_capacity(entries.len());
    for entry in &entries {
        let name = fbb.create_string(&entry.name);
        let kind = fbb.create_string(entry.kind);
        let link_name = fbb.create_string(&entry.link_name);
        let user_name = fbb.create_string(&entry.user_name);
        let group_name = fbb.create_string(&entry.group_name);
        let mod_time = fbb.create_string(&entry.mod_time);
        let records: Vec<_> = entry
            .pax_records
            .iter()
            .map(|(key, value)| {
                let key = fbb.create_string(key);
                let value = fbb.create_string(value);
                let start = fbb.start_table();
                fbb.push_slot_always(slot(0), key);
                fbb.push_slot_always(slot(1), value);
                fbb.end_table(start)
            })
            .collect();
        let records = fbb.create_vector(&records);
        let start = fbb.start_table();
        fbb.push_slot_always(slot(0), name);
        fbb.push_slot_always(slot(1), kind);
        fbb.push_slot::<i64>(slot(2), entry.offset as i64, 0);
        fbb.push_slot::<i64>(slot(3), entry.size as i64, 0);
        fbb.push_slot_always(slot(4), link_name);
        fbb.push_slot::<i64>(slot(5), entry.mode as i64, 0);
        fbb.push_slot::<u32>(slot(6), entry.uid, 0);
        fbb.push_slot::<u32>(slot(7), entry.gid, 0);
        fbb.push_slot_always(slot(8), user_name);
        fbb.push_slot_always(slot(9), group_name);
        fbb.push_slot_always(slot(10), mod_time);
        fbb.push_slot::<i64>(slot(11), entry.dev_major as i64, 0);
        fbb.push_slot::<i64>(slot(12), entry.dev_minor as i64, 0);
        fbb.push_slot_always(slot(13), records);
        files.push(fbb.end_table(start));
    }
    let files = fbb.create_vector(&files);
    let toc = {
        let start = fbb.start_table();
        fbb.push_slot_always(slot(0), files);
        fbb.end_table(start)
    };
    let digests: Vec<WIPOffset<&str>> = layer
        .spans
        .iter()
        .map(|span| fbb.create_string(&format!("sha256:{}", hex::encode(span.digest))))
        .collect();
    let digests = fbb.create_vector(&digests);
    let checkpoints = fbb.create_vector(&checkpoint_blob(layer, span_size));
    let max_span_id = i32::try_from(layer.spans.len()).unwrap_or(i32::MAX) - 1;
    let info = {
        let start = fbb.start_table();
        fbb.push_slot::<i8>(slot(0), 1, 1);
        fbb.push_slot::<i32>(slot(1), max_span_id, 0);
        fbb.push_slot_always(slot(2), digests);
        fbb.push_slot_always(slot(3), checkpoints);
        fbb.end_table(start)
    };
    let version = fbb.create_string(ZTOC_VERSION);
    let tool = fbb.create_string(build_tool);
    let root = {
        let start = fbb.start_table();
        fbb.push_slot_always(slot(0), version);
        fbb.push_slot_always(slot(1), tool);
        fbb.push_slot::<i64>(slot(2), compressed_size as i64, 0);
        fbb.push_slot::<i64>(slot(3), layer.uncompressed.len() as i64, 0);
        fbb.push_slot_always(slot(4), toc);
        fbb.push_slot_always(slot(5), info);
        fbb.end_table(start)
    };
    fbb.finish_minimal(root);
    Ok(fbb.finished_data().to_vec())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::digest::sha256_digest;
    use crate::soci::{build_checkpoints, decode_span, layer_from_ztoc, Ztoc};

    #[test]
    fn a_written_ztoc_reads_back_and_serves_every_file() {
        let mut builder = tar::Builder::new(Vec::new());
        let big = crate::rig::images::pseudo_random_bytes(3 << 20, 9);
        let text: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let mut add = |path: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(1_700_000_000);
            header.set_uid(0);
            header.set_gid(0);
            builder.append_data(&mut header, path, data).unwrap();
        };
        add("a/text", &text);
        add("a/big", &big);
        add(
            &format!("a/{}", "long-name-".repeat(15)),
            b"past 100 bytes of name",
        );
        let tar = builder.into_inner().unwrap();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gzip.write_all(&tar).unwrap();
        let gzip = gzip.finish().unwrap();

        let built = build_checkpoints(&gzip, 512 << 10).unwrap();
        let bytes = write_ztoc(&built, gzip.len() as u64, 512 << 10, "lazysnap test").unwrap();
        let parsed = Ztoc::parse(&bytes).unwrap();
        assert_eq!(parsed.spans, built.spans);
        let layer = layer_from_ztoc(parsed, sha256_digest(&bytes), gzip.len() as u64).unwrap();
        let spans = layer.spans().unwrap();
        for (path, data) in [
            ("a/text", &text[..]),
            ("a/big", &big[..]),
            (
                &format!("a/{}", "long-name-".repeat(15))[..],
                &b"past 100 bytes of name"[..],
            ),
        ] {
            let entry = layer.entries().iter().find(|e| e.path == path).unwrap();
            let mut stream = Vec::new();
            for chunk in &entry.chunks {
                let span = spans.starting_at(chunk.compressed.start).unwrap();
                let range = chunk.compressed.start as usize..chunk.compressed.end as usize;
                stream.extend(decode_span(span, &gzip[range]).unwrap());
            }
            let from = (entry.stream_offset - entry.chunks[0].file_offset) as usize;
            assert!(stream[from..from + data.len()] == *data, "{path}");
        }
    }
}
