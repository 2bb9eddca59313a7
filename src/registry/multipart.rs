//! `Content-Range` and `multipart/byteranges` parsing, strict: every part must say exactly
//! which bytes it holds and carry exactly that many.

/// Parses `bytes <start>-<end>/<total|*>` into (start, end inclusive, total).
pub(crate) fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, end, total))
}

/// The `boundary` parameter of a `multipart/byteranges` content type.
pub(crate) fn byteranges_boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    let kind = parts.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim().trim_matches('"');
            (!v.is_empty() && v.len() <= 200).then(|| v.to_string())
        } else {
            None
        }
    })
}

/// One part: (start, end inclusive, total if given, data).
pub(crate) type Part = (u64, u64, Option<u64>, bytes::Bytes);

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > haystack.len() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Splits a `multipart/byteranges` body into its parts, checking that each part's length
/// matches its `Content-Range` and only a line break separates it from the next boundary.
pub(crate) fn parse_byteranges(body: &bytes::Bytes, boundary: &str) -> Result<Vec<Part>, String> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut parts = Vec::new();
    let mut pos = find(body, delimiter, 0).ok_or("no multipart boundary in the body")?;
    loop {
        pos += delimiter.len();
        if body.get(pos..pos + 2) == Some(b"--") {
            return Ok(parts);
        }
        // Transport padding, then CRLF.
        while body.get(pos).is_some_and(|b| *b == b' ' || *b == b'\t') {
            pos += 1;
        }
        if body.get(pos..pos + 2) == Some(b"\r\n") {
            pos += 2;
        } else {
            return Err(format!("malformed multipart boundary line at byte {pos}"));
        }
        let header_end = find(body, b"\r\n\r\n", pos)
            .filter(|end| end - pos <= 16 << 10)
            .ok_or_else(|| format!("multipart part at byte {pos} has no end of headers"))?;
        let headers = std::str::from_utf8(&body[pos..header_end])
            .map_err(|_| format!("multipart part at byte {pos} has non-UTF-8 headers"))?;
        let range = headers
            .split("\r\n")
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-range"))
            .and_then(|(_, v)| parse_content_range(v))
            .ok_or_else(|| format!("multipart part at byte {pos} has no valid Content-Range"))?;
        let (start, end, total) = range;
        let len = usize::try_from(end - start + 1)
            .map_err(|_| format!("multipart part {start}-{end} is too large"))?;
        let data_start = header_end + 4;
        let data_end = data_start
            .checked_add(len)
            .filter(|e| *e <= body.len())
            .ok_or_else(|| format!("multipart part {start}-{end} is cut short"))?;
        parts.push((start, end, total, body.slice(data_start..data_end)));
        let next = find(body, delimiter, data_end)
            .ok_or_else(|| format!("multipart part {start}-{end} is not followed by a boundary"))?;
        if &body[data_end..next] != b"\r\n" {
            return Err(format!(
                "multipart part {start}-{end} holds more bytes than its Content-Range says"
            ));
        }
        pos = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn boundary() {
        assert_eq!(
            byteranges_boundary("multipart/byteranges; boundary=3d6b6a416f9b5").as_deref(),
            Some("3d6b6a416f9b5")
        );
        assert_eq!(
            byteranges_boundary("multipart/byteranges; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(byteranges_boundary("application/octet-stream"), None);
    }

    fn body(parts: &[(&str, &[u8])]) -> Bytes {
        let mut b = Vec::new();
        for (cr, data) in parts {
            b.extend_from_slice(b"\r\n--XYZ\r\nContent-Type: application/octet-stream\r\n");
            b.extend_from_slice(format!("Content-Range: {cr}\r\n\r\n").as_bytes());
            b.extend_from_slice(data);
        }
        b.extend_from_slice(b"\r\n--XYZ--\r\n");
        Bytes::from(b)
    }

    #[test]
    fn parses_parts_and_rejects_wrong_lengths() {
        let ok = body(&[("bytes 0-2/10", b"abc"), ("bytes 7-9/10", b"hij")]);
        let parts = parse_byteranges(&ok, "XYZ").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].0, 7);
        assert_eq!(&parts[1].3[..], b"hij");
        let long = body(&[("bytes 0-1/10", b"abc")]);
        assert!(parse_byteranges(&long, "XYZ").is_err());
        let short = body(&[("bytes 0-5/10", b"abc")]);
        assert!(parse_byteranges(&short, "XYZ").is_err());
        assert!(parse_byteranges(&Bytes::from_static(b"garbage"), "XYZ").is_err());
    }
}
