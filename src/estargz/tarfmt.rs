//! A streaming tar reader that keeps each member's raw header blocks (PAX and GNU long-name
//! extension headers included) so the writer can copy them verbatim, plus a ustar header writer
//! for the members lazysnap adds (landmarks, the TOC).

use std::collections::BTreeMap;
use std::io::Read;

use super::FormatError;

/// Tar block size.
pub const BLOCK: usize = 512;
/// Largest PAX or GNU long-name extension payload accepted (xattrs included).
const MAX_EXTENSION_SIZE: u64 = 16 << 20;
/// Largest data a non-regular member may carry (copied raw with the header).
pub const MAX_NON_REG_DATA: u64 = 1 << 20;

/// Parses a tar numeric field: octal (NUL/space padded) or GNU base-256.
pub fn parse_numeric(field: &[u8]) -> Option<u64> {
    if let Some((&first, rest)) = field.split_first() {
        if first & 0x80 != 0 {
            if first & 0x40 != 0 {
                return None; // negative
            }
            let mut value: u64 = u64::from(first & 0x3f);
            for &b in rest {
                value = value.checked_mul(256)?.checked_add(u64::from(b))?;
            }
            return Some(value);
        }
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect();
    if text.is_empty() {
        return Some(0);
    }
    let text = std::str::from_utf8(&text).ok()?;
    u64::from_str_radix(text, 8).ok()
}

/// Padding needed after `len` data bytes to reach a block boundary.
pub fn padding(len: u64) -> u64 {
    (BLOCK as u64 - len % BLOCK as u64) % BLOCK as u64
}

/// Metadata of one tar member, extensions applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TarMeta {
    pub name: String,
    pub typeflag: u8,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub uname: String,
    pub gname: String,
    pub size: u64,
    pub mtime: i64,
    pub link_name: String,
    pub dev_major: u64,
    pub dev_minor: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl TarMeta {
    /// True for regular files (types `0`, NUL, `7`).
    pub fn is_reg(&self) -> bool {
        matches!(self.typeflag, b'0' | 0 | b'7')
    }

    /// The TOC type of this member.
    pub fn toc_type(&self) -> &'static str {
        match self.typeflag {
            b'1' => "hardlink",
            b'2' => "symlink",
            b'3' => "char",
            b'4' => "block",
            b'5' => "dir",
            b'6' => "fifo",
            _ => "reg",
        }
    }
}

/// One member as read: raw header blocks and metadata; its data follows in the stream.
#[derive(Debug, Clone)]
pub struct RawMember {
    /// Every header block of the member (extension headers and their data included).
    pub header: Vec<u8>,
    pub meta: TarMeta,
    /// Input offset of the member's first header block.
    pub offset: u64,
}

/// Reads tar members one by one from a stream.
pub struct TarStream<R> {
    inner: R,
    pos: u64,
    remaining: u64,
    pad: u64,
    ended: bool,
    /// Name of the member whose data is being read (for errors).
    current: String,
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(field.get(..end).unwrap_or_default()).into_owned()
}

fn cbytes(field: &[u8]) -> Vec<u8> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    field.get(..end).unwrap_or_default().to_vec()
}

impl<R: Read> TarStream<R> {
    pub fn new(inner: R) -> Self {
        TarStream {
            inner,
            pos: 0,
            remaining: 0,
            pad: 0,
            ended: false,
            current: String::new(),
        }
    }

    fn err(&self, name: &str, reason: String) -> FormatError {
        FormatError::BadTar {
            name: name.to_string(),
            offset: self.pos,
            reason,
        }
    }

    /// Reads one block; `Ok(false)` on a clean end of stream before any byte.
    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, FormatError> {
        let mut filled = 0;
        while filled < BLOCK {
            let n = match self.inner.read(&mut block[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(FormatError::Io {
                        context: format!("reading the input tar at byte {}", self.pos),
                        source: e,
                    })
                }
            };
            if n == 0 {
                if filled == 0 {
                    return Ok(false);
                }
                return Err(self.err(
                    "",
                    format!("stream ends inside a header block ({filled} of 512 bytes)"),
                ));
            }
            filled += n;
            self.pos += n as u64;
        }
        Ok(true)
    }

    fn read_payload(&mut self, len: u64, name: &str) -> Result<Vec<u8>, FormatError> {
        let mut data = Vec::new();
        let total = len + padding(len);
        let read = (&mut self.inner)
            .take(total)
            .read_to_end(&mut data)
            .map_err(|e| FormatError::Io {
                context: format!("reading the input tar at byte {}", self.pos),
                source: e,
            })?;
        self.pos += read as u64;
        if read as u64 != total {
            return Err(self.err(name, "stream ends inside an extension header".into()));
        }
        Ok(data)
    }

    /// Reads the next member's headers. Call [`Self::read_data`] / [`Self::skip_data`] for its
    /// data before calling this again (remaining data is skipped automatically).
    pub fn next_member(&mut self) -> Result<Option<RawMember>, FormatError> {
        self.skip_data()?;
        if self.ended {
            return Ok(None);
        }
        let offset = self.pos;
        let mut raw = Vec::new();
        let mut pax: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block)? {
                if raw.is_empty() {
                    self.ended = true;
                    return Ok(None);
                }
                return Err(self.err("", "stream ends after extension headers".into()));
            }
            if block.iter().all(|&b| b == 0) {
                if raw.is_empty() {
                    self.ended = true;
                    return Ok(None);
                }
                return Err(self.err("", "end-of-archive block after extension headers".into()));
            }
            let name_field = cstr(&block[..100]);
            let checksum = parse_numeric(&block[148..156]);
            let mut unsigned: u64 = 0;
            let mut signed: i64 = 0;
            for (i, &b) in block.iter().enumerate() {
                let b = if (148..156).contains(&i) { b' ' } else { b };
                unsigned += u64::from(b);
                signed += i64::from(b as i8);
            }
            if checksum != Some(unsigned) && checksum.map(|c| c as i64) != Some(signed) {
                return Err(self.err(
                    &name_field,
                    "header checksum mismatch (not a tar stream, or corrupt)".into(),
                ));
            }
            raw.extend_from_slice(&block);
            let typeflag = block[156];
            let size = parse_numeric(&block[124..136])
                .ok_or_else(|| self.err(&name_field, "invalid size field".into()))?;
            match typeflag {
                b'x' | b'g' | b'L' | b'K' => {
                    if size > MAX_EXTENSION_SIZE {
                        return Err(self.err(
                            &name_field,
                            format!("extension header of {size} bytes is over the limit"),
                        ));
                    }
                    let data = self.read_payload(size, &name_field)?;
                    raw.extend_from_slice(&data);
                    let body = data.get(..size as usize).unwrap_or_default();
                    match typeflag {
                        b'x' => parse_pax(body, &mut pax).map_err(|r| self.err(&name_field, r))?,
                        b'L' => long_name = Some(cbytes(body)),
                        b'K' => long_link = Some(cbytes(body)),
                        _ => {} // global PAX header: kept raw, not applied
                    }
                    continue;
                }
                _ => {}
            }
            let ustar = &block[257..263] == b"ustar\0" || &block[257..263] == b"ustar ";
            let mut name = cbytes(&block[..100]);
            if &block[257..263] == b"ustar\0" && block[345] != 0 {
                let mut full = cbytes(&block[345..500]);
                full.push(b'/');
                full.extend_from_slice(&name);
                name = full;
            }
            if let Some(n) = long_name.take() {
                name = n;
            }
            if let Some(p) = pax.remove("path") {
                name = p;
            }
            let mut link = cbytes(&block[157..257]);
            if let Some(l) = long_link.take() {
                link = l;
            }
            if let Some(l) = pax.remove("linkpath") {
                link = l;
            }
            let name = String::from_utf8(name)
                .map_err(|_| self.err(&name_field, "member name is not UTF-8".into()))?;
            let link_name = String::from_utf8(link)
                .map_err(|_| self.err(&name, "link target is not UTF-8".into()))?;
            let field = |r: std::ops::Range<usize>, what: &str| {
                parse_numeric(block.get(r).unwrap_or_default())
                    .ok_or_else(|| self.err(&name, format!("invalid {what} field")))
            };
            let mut meta = TarMeta {
                typeflag,
                mode: (field(100..108, "mode")? & 0o7777) as u32,
                uid: u32::try_from(field(108..116, "uid")?)
                    .map_err(|_| self.err(&name, "uid out of range".into()))?,
                gid: u32::try_from(field(116..124, "gid")?)
                    .map_err(|_| self.err(&name, "gid out of range".into()))?,
                uname: if ustar {
                    cstr(&block[265..297])
                } else {
                    String::new()
                },
                gname: if ustar {
                    cstr(&block[297..329])
                } else {
                    String::new()
                },
                size,
                mtime: i64::try_from(field(136..148, "mtime")?).unwrap_or(i64::MAX),
                link_name,
                dev_major: if ustar {
                    field(329..337, "devmajor")?
                } else {
                    0
                },
                dev_minor: if ustar {
                    field(337..345, "devminor")?
                } else {
                    0
                },
                xattrs: BTreeMap::new(),
                name,
            };
            if pax.keys().any(|k| k.starts_with("GNU.sparse.")) {
                let real = pax
                    .get("GNU.sparse.name")
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_else(|| meta.name.clone());
                return Err(self.err(
                    &real,
                    "a GNU sparse file (PAX GNU.sparse.* records) cannot be converted: its data \
                     would be stored as the sparse map; write the layer without sparse files \
                     (tar without --sparse / -S)"
                        .into(),
                ));
            }
            apply_pax(&mut meta, pax).map_err(|r| self.err(&meta.name, r))?;
            if !matches!(
                typeflag,
                b'0' | 0 | b'7' | b'1' | b'2' | b'3' | b'4' | b'5' | b'6'
            ) {
                return Err(self.err(
                    &meta.name,
                    format!(
                        "unsupported tar member type {:?} (sparse, multi-volume and vendor types cannot be converted)",
                        typeflag as char
                    ),
                ));
            }
            self.remaining = meta.size;
            self.pad = padding(meta.size);
            self.current.clone_from(&meta.name);
            return Ok(Some(RawMember {
                header: raw,
                meta,
                offset,
            }));
        }
    }

    /// Fills `buf` with the next data bytes of the current member (`buf.len() <= remaining`).
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        if buf.len() as u64 > self.remaining {
            return Err(self.err(&self.current, "read past the member's data".into()));
        }
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err(&self.current, "stream ends inside a member's data".into())
            } else {
                FormatError::Io {
                    context: format!("reading the input tar at byte {}", self.pos),
                    source: e,
                }
            }
        })?;
        self.pos += buf.len() as u64;
        self.remaining -= buf.len() as u64;
        Ok(())
    }

    /// Skips the rest of the current member's data and its padding.
    pub fn skip_data(&mut self) -> Result<(), FormatError> {
        let total = self.remaining + self.pad;
        if total == 0 {
            return Ok(());
        }
        let skipped = std::io::copy(&mut (&mut self.inner).take(total), &mut std::io::sink())
            .map_err(|e| FormatError::Io {
                context: format!("reading the input tar at byte {}", self.pos),
                source: e,
            })?;
        self.pos += skipped;
        self.remaining = 0;
        self.pad = 0;
        if skipped != total {
            return Err(self.err(&self.current, "stream ends inside a member's data".into()));
        }
        Ok(())
    }

    /// Reads the input to its end (record padding after the end-of-archive blocks).
    pub fn drain(&mut self) -> Result<(), FormatError> {
        std::io::copy(&mut self.inner, &mut std::io::sink()).map_err(|e| FormatError::Io {
            context: "reading the end of the input tar".into(),
            source: e,
        })?;
        Ok(())
    }
}

fn parse_pax(mut body: &[u8], out: &mut BTreeMap<String, Vec<u8>>) -> Result<(), String> {
    while !body.is_empty() {
        if body.iter().all(|&b| b == 0) {
            break;
        }
        let space = body
            .iter()
            .position(|&b| b == b' ')
            .ok_or("PAX record without a length")?;
        let len: usize = std::str::from_utf8(body.get(..space).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record length is not a number")?;
        if len <= space + 1 || len > body.len() {
            return Err("PAX record length out of range".into());
        }
        let record = body.get(space + 1..len).ok_or("PAX record out of range")?;
        let record = record
            .strip_suffix(b"\n")
            .ok_or("PAX record not ended by newline")?;
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without `=`")?;
        let key = String::from_utf8(record.get(..eq).unwrap_or_default().to_vec())
            .map_err(|_| "PAX key is not UTF-8")?;
        out.insert(key, record.get(eq + 1..).unwrap_or_default().to_vec());
        body = body.get(len..).unwrap_or_default();
    }
    Ok(())
}

fn apply_pax(meta: &mut TarMeta, pax: BTreeMap<String, Vec<u8>>) -> Result<(), String> {
    let text = |v: &[u8], key: &str| {
        String::from_utf8(v.to_vec()).map_err(|_| format!("PAX {key} is not UTF-8"))
    };
    let number = |v: &[u8], key: &str| -> Result<u64, String> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("PAX {key} is not a number"))
    };
    for (key, value) in pax {
        match key.as_str() {
            "size" => meta.size = number(&value, "size")?,
            "uid" => {
                meta.uid = u32::try_from(number(&value, "uid")?).map_err(|_| "PAX uid too big")?
            }
            "gid" => {
                meta.gid = u32::try_from(number(&value, "gid")?).map_err(|_| "PAX gid too big")?
            }
            "uname" => meta.uname = text(&value, "uname")?,
            "gname" => meta.gname = text(&value, "gname")?,
            "mtime" => {
                let s = text(&value, "mtime")?;
                let whole = s.split('.').next().unwrap_or_default();
                meta.mtime = whole
                    .parse()
                    .map_err(|_| format!("PAX mtime {s:?} is not a number"))?;
                if s.starts_with('-') && s.contains('.') {
                    // Floor towards negative infinity for fractional negative times.
                    meta.mtime = meta.mtime.saturating_sub(1);
                }
            }
            _ => {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    meta.xattrs.insert(name.to_string(), value);
                }
            }
        }
    }
    Ok(())
}

fn put_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let text = format!("{value:0width$o}");
    let bytes = text.as_bytes();
    let start = bytes.len().saturating_sub(width);
    field[..width].copy_from_slice(&bytes[start..]);
    field[width] = 0;
}

/// A ustar header for a regular file lazysnap adds (`name` of at most 100 bytes).
pub fn ustar_reg_header(name: &str, size: u64, mode: u32) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let name = name.as_bytes();
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    put_octal(&mut h[100..108], u64::from(mode));
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    put_octal(&mut h[124..136], size);
    put_octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    put_octal(&mut h[329..337], 0);
    put_octal(&mut h[337..345], 0);
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
        assert_eq!(parse_numeric(b"   17 \0"), Some(0o17));
        assert_eq!(parse_numeric(b"\0\0\0"), Some(0));
        assert_eq!(parse_numeric(&[0x80, 0, 0, 1, 0]), Some(256));
        assert_eq!(parse_numeric(b"9"), None);
    }

    #[test]
    fn own_header_reads_back() {
        let mut stream = ustar_reg_header("x.txt", 3, 0o644).to_vec();
        stream.extend_from_slice(b"abc");
        stream.resize(1024 + 1024, 0);
        let mut tar = TarStream::new(&stream[..]);
        let m = tar.next_member().unwrap().unwrap();
        assert_eq!(m.meta.name, "x.txt");
        assert_eq!(m.meta.size, 3);
        assert_eq!(m.meta.mode, 0o644);
        assert!(tar.next_member().unwrap().is_none());
        let mut archive = tar::Archive::new(&stream[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["x.txt"]);
    }

    #[test]
    fn a_truncated_member_names_itself() {
        let mut stream = ustar_reg_header("data/file.bin", 5000, 0o644).to_vec();
        stream.extend_from_slice(&[7u8; 1000]);
        let mut tar = TarStream::new(&stream[..]);
        tar.next_member().unwrap().unwrap();
        let mut buf = vec![0u8; 5000];
        let err = tar.read_data(&mut buf).unwrap_err().to_string();
        assert!(err.contains("data/file.bin"), "{err}");
        let mut tar = TarStream::new(&stream[..]);
        tar.next_member().unwrap().unwrap();
        let err = tar.next_member().unwrap_err().to_string();
        assert!(err.contains("data/file.bin"), "{err}");
    }

    #[test]
    fn a_gnu_sparse_member_is_refused_by_its_real_name() {
        let mut builder = tar::Builder::new(Vec::new());
        let records: [(&str, &[u8]); 4] = [
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"data/sparse.bin"),
            ("GNU.sparse.realsize", b"1099511627776"),
        ];
        builder.append_pax_extensions(records).unwrap();
        let mut header = tar::Header::new_ustar();
        header.set_size(512);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "GNUSparseFile.0/sparse.bin", &[0u8; 512][..])
            .unwrap();
        let stream = builder.into_inner().unwrap();
        let err = TarStream::new(&stream[..])
            .next_member()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data/sparse.bin") && err.contains("sparse"),
            "{err}"
        );
    }
}
