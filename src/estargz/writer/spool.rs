//! Members held back while the prioritized ones are written first: spooled to memory or a temp
//! file, and replayed in order.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::ops::Range;

use crate::estargz::reader::normalize_name;
use crate::estargz::tarfmt::{TarMeta, TarStream};
use crate::estargz::FormatError;

use super::layout::{is_estargz_metadata, SeenMembers};
use super::RecordedFile;

/// The input tar spooled to an anonymous temp file so prioritized members can move first.
pub(super) struct Spool {
    pub(super) file: File,
    pub(super) members: Vec<SpooledMember>,
}

pub(super) struct SpooledMember {
    /// Header bytes in the spool; the data follows directly.
    pub(super) header: Range<u64>,
    pub(super) meta: TarMeta,
    pub(super) path: String,
    pub(super) offset: u64,
}

pub(super) enum Ordered<'r> {
    /// A member, with the ranges of it a recorded workload read (empty: all of it).
    Member(usize, &'r [Range<u64>]),
    Landmark,
}

impl Spool {
    pub(super) fn read<R: Read>(stream: &mut TarStream<R>) -> Result<Spool, FormatError> {
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
    pub(super) fn order<'r>(
        &self,
        patterns: &[String],
        recorded: &'r [RecordedFile],
    ) -> Vec<Ordered<'r>> {
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

    pub(super) fn take(
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
