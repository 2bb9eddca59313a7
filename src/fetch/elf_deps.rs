//! The shared libraries a program or library will load, read from its first bytes, and where such
//! libraries lie in a layer. On a cold start the dynamic loader opens the interpreter and each
//! needed library one after another, a round trip each; knowing their names when the program's
//! first chunk arrives lets them be fetched together instead.

use std::collections::HashSet;

use crate::le::{u16_at, u32_at, u64_at};

const ELF_MAGIC: &[u8] = b"\x7fELF";
const ELF_CLASS_64: u8 = 2;
const ELF_DATA_LITTLE: u8 = 1;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;
const PHDR_64_LEN: usize = 56;
/// Bytes scanned for library names when the first loadable segment is executable (older layouts
/// put `.dynstr` and code in one segment).
const MAX_SCAN: usize = 1 << 20;
/// Library names taken from one file, at most.
const MAX_NAMES: usize = 64;
const MAX_NAME_LEN: usize = 96;

/// Whether `bytes` (a file's first bytes) start an ELF file.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(ELF_MAGIC)
}

/// File names of the libraries a 64-bit little-endian ELF file whose first bytes are `bytes`
/// asks for: its interpreter's (PT_INTERP) and each NUL-terminated string of its first loadable
/// segment that reads as a library file name (`lib….so…`, `ld-….so…`). That segment holds
/// `.dynstr`, where the DT_NEEDED and version-requirement names are; the `.dynamic` section that
/// points at them often lies megabytes further, so the names are recognized rather than looked
/// up. Empty for anything else.
pub fn needed_libraries(bytes: &[u8]) -> Vec<String> {
    if !is_elf(bytes)
        || bytes.get(4) != Some(&ELF_CLASS_64)
        || bytes.get(5) != Some(&ELF_DATA_LITTLE)
    {
        return Vec::new();
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        u64_at(bytes, 0x20),
        u16_at(bytes, 0x36),
        u16_at(bytes, 0x38),
    ) else {
        return Vec::new();
    };
    if usize::from(phentsize) < PHDR_64_LEN {
        return Vec::new();
    }
    let mut names = Vec::new();
    let mut scan = None;
    for i in 0..u64::from(phnum) {
        let Some(at) = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|at| usize::try_from(at).ok())
        else {
            break;
        };
        let field = |delta: usize| at.checked_add(delta);
        let (Some(kind), Some(flags), Some(offset), Some(filesz)) = (
            u32_at(bytes, at),
            field(4).and_then(|at| u32_at(bytes, at)),
            field(8).and_then(|at| u64_at(bytes, at)),
            field(32).and_then(|at| u64_at(bytes, at)),
        ) else {
            break;
        };
        match kind {
            PT_INTERP => {
                let interp = slice(bytes, offset, filesz);
                let path = interp.split(|&b| b == 0).next().unwrap_or_default();
                let base = path.rsplit(|&b| b == b'/').next().unwrap_or_default();
                if let Some(name) = library_name(base) {
                    names.push(name);
                }
            }
            PT_LOAD if scan.is_none() => {
                scan = Some(if flags & PF_X == 0 {
                    slice(bytes, offset, filesz.min(MAX_SCAN as u64))
                } else {
                    &bytes[..bytes.len().min(MAX_SCAN)]
                });
            }
            _ => {}
        }
    }
    // Each name is preceded by a NUL (the string table starts with one).
    for piece in scan.unwrap_or_default().split(|&b| b == 0).skip(1) {
        if names.len() >= MAX_NAMES {
            break;
        }
        if let Some(name) = library_name(piece) {
            names.push(name);
        }
    }
    let mut seen = HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names
}

/// `text` as a library file name: `lib….so`, `ld-….so` or either with a version after `.so`,
/// printable, no path.
fn library_name(text: &[u8]) -> Option<String> {
    if text.is_empty() || text.len() > MAX_NAME_LEN {
        return None;
    }
    if !text
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
    {
        return None;
    }
    let text = std::str::from_utf8(text).ok()?;
    if !(text.starts_with("lib") || text.starts_with("ld-")) {
        return None;
    }
    let (stem, version) = text.split_once(".so")?;
    let versioned = version.is_empty()
        || version.strip_prefix('.').is_some_and(|v| {
            v.split('.')
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
    (stem.len() > 3 && versioned).then(|| text.to_string())
}

/// Whether `path` (relative, as in a TOC) is in a directory the dynamic loader searches: one
/// named `lib`, `lib32` or `lib64`, or a multiarch one such as `lib/x86_64-linux-gnu`.
pub fn in_library_dir(path: &str) -> bool {
    let mut parts = path.rsplit('/');
    let _file = parts.next();
    match parts.next() {
        Some("lib" | "lib32" | "lib64") => true,
        Some(dir) => dir.contains("-linux-"),
        None => false,
    }
}

/// Whether a file named `base` provides library `name`: the same name, or the name followed by
/// more of the version (`libz.so.1.2.13` for `libz.so.1`, its soname's usual symlink target).
pub fn provides(base: &str, name: &str) -> bool {
    base.strip_prefix(name)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

fn slice(bytes: &[u8], offset: u64, len: u64) -> &[u8] {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let end = usize::try_from(offset.saturating_add(len))
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    &bytes[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file: header, an interpreter, a read-only first segment holding a string
    /// table, then an executable segment whose bytes also hold a library-like string.
    fn elf(interp: &str, strtab: &[&str], text: &[u8], first_executable: bool) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(ELF_MAGIC);
        out[4] = ELF_CLASS_64;
        out[5] = ELF_DATA_LITTLE;
        out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        out[0x36..0x38].copy_from_slice(&(PHDR_64_LEN as u16).to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let headers_end = 64 + 3 * PHDR_64_LEN;
        let interp_bytes = format!("{interp}\0").into_bytes();
        let mut table = vec![0u8];
        for s in strtab {
            table.extend_from_slice(s.as_bytes());
            table.push(0);
        }
        let interp_at = headers_end;
        let table_at = interp_at + interp_bytes.len();
        let text_at = table_at + table.len();
        let phdr = |kind: u32, flags: u32, offset: usize, len: usize| {
            let mut p = vec![0u8; PHDR_64_LEN];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[4..8].copy_from_slice(&flags.to_le_bytes());
            p[8..16].copy_from_slice(&(offset as u64).to_le_bytes());
            p[32..40].copy_from_slice(&(len as u64).to_le_bytes());
            p
        };
        let first_flags = if first_executable { 5 } else { 4 };
        out.extend(phdr(PT_INTERP, 4, interp_at, interp_bytes.len()));
        out.extend(phdr(PT_LOAD, first_flags, 0, text_at));
        out.extend(phdr(PT_LOAD, 5, text_at, text.len()));
        out.extend(interp_bytes);
        out.extend(table);
        out.extend_from_slice(text);
        out
    }

    #[test]
    fn names_the_interpreter_and_the_libraries_in_the_string_table() {
        let file = elf(
            "/lib64/ld-linux-x86-64.so.2",
            &[
                "libm.so.6",
                "PyObject_GetAttr",
                "libz.so.1",
                "libexpat.so.1",
                "libc.so.6",
                "GLIBC_2.34",
                "libm.so.6",
                "lib.so",
                "libfoo.so.x1",
                "usr/lib/libbar.so.1",
            ],
            b"\0libgcc_s.so.1\0",
            false,
        );
        assert_eq!(
            needed_libraries(&file),
            [
                "ld-linux-x86-64.so.2",
                "libm.so.6",
                "libz.so.1",
                "libexpat.so.1",
                "libc.so.6"
            ]
        );
        // With code in the first segment, what follows it is scanned too.
        let old_layout = elf("/lib/ld.so", &["libc.so.6"], b"\0libgcc_s.so.1\0", true);
        assert_eq!(
            needed_libraries(&old_layout),
            ["libc.so.6", "libgcc_s.so.1"]
        );
    }

    #[test]
    fn anything_else_names_nothing_and_never_panics() {
        assert!(needed_libraries(b"#!/bin/sh\nlibc.so.6\0").is_empty());
        let file = elf("/lib64/ld-linux-x86-64.so.2", &["libc.so.6"], b"", false);
        for len in 0..file.len() {
            let _ = needed_libraries(&file[..len]);
        }
        let mut elf32 = file.clone();
        elf32[4] = 1;
        assert!(needed_libraries(&elf32).is_empty());
        let mut huge = file.clone();
        huge[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(needed_libraries(&huge).is_empty());
    }

    #[test]
    fn library_dirs_and_versioned_files() {
        assert!(in_library_dir("usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(in_library_dir("lib64/ld-linux-x86-64.so.2"));
        assert!(in_library_dir("usr/lib/libfoo.so"));
        assert!(!in_library_dir("usr/lib/python3.11/lib-dynload/_json.so"));
        assert!(!in_library_dir("libc.so.6"));
        assert!(provides("libz.so.1.2.13", "libz.so.1"));
        assert!(provides("libc.so.6", "libc.so.6"));
        assert!(!provides("libz.so.10", "libz.so.1"));
        assert!(!provides("libzstd.so.1", "libz.so.1"));
    }
}
