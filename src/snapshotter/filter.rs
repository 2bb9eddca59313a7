//! containerd's filter syntax for List: `selector ("," selector)*`, where a selector is a field
//! path (`name`, `parent`, `kind`, `labels.KEY`, with `"quoted"` path parts) optionally followed by
//! `==VALUE` or `!=VALUE` (VALUE quoted or bare). A selector without an operator tests presence.
//! The selectors of one filter are ANDed; the filters of one request are ORed.

use super::store::SnapshotInfo;

/// A filter string that does not parse; names the position and the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid filter {filter:?} at byte {offset}: {reason}")]
pub struct FilterError {
    pub filter: String,
    pub offset: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// One parsed filter: all its selectors must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    selectors: Vec<Selector>,
}

impl Filter {
    /// Parses one containerd filter expression.
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        let mut parser = Parser {
            text,
            chars: text.char_indices().collect(),
            pos: 0,
        };
        let mut selectors = Vec::new();
        loop {
            parser.skip_spaces();
            selectors.push(parser.selector()?);
            parser.skip_spaces();
            match parser.peek() {
                None => break,
                Some(',') => parser.pos += 1,
                Some(c) => return Err(parser.error(format!("expected ',' or end, found {c:?}"))),
            }
        }
        Ok(Self { selectors })
    }

    /// True when `info` matches every selector.
    pub fn matches(&self, info: &SnapshotInfo) -> bool {
        self.selectors.iter().all(|s| {
            let value = field(info, &s.path);
            match &s.op {
                Op::Present => value.is_some_and(|v| !v.is_empty()),
                Op::Equal(want) => value.as_deref() == Some(want.as_str()),
                Op::NotEqual(want) => value.as_deref() != Some(want.as_str()),
            }
        })
    }
}

/// True when `info` matches any of `filters` (or `filters` is empty).
pub fn matches_any(filters: &[Filter], info: &SnapshotInfo) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(info))
}

fn field(info: &SnapshotInfo, path: &[String]) -> Option<String> {
    match path {
        [one] if one == "name" => Some(info.name.clone()),
        [one] if one == "parent" => Some(info.parent.clone()),
        [one] if one == "kind" => Some(info.kind.as_str().to_string()),
        [labels, rest @ ..] if labels == "labels" && !rest.is_empty() => {
            info.labels.get(&rest.join(".")).cloned()
        }
        _ => None,
    }
}

struct Parser<'a> {
    text: &'a str,
    chars: Vec<(usize, char)>,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).map(|&(_, c)| c)
    }

    fn offset(&self) -> usize {
        self.chars
            .get(self.pos)
            .map(|&(o, _)| o)
            .unwrap_or(self.text.len())
    }

    fn error(&self, reason: String) -> FilterError {
        FilterError {
            filter: self.text.to_string(),
            offset: self.offset(),
            reason,
        }
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.path_part()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.path_part()?);
        }
        self.skip_spaces();
        let op = match (self.peek(), self.chars.get(self.pos + 1).map(|&(_, c)| c)) {
            (Some('='), Some('=')) => {
                self.pos += 2;
                Op::Equal(self.value()?)
            }
            (Some('!'), Some('=')) => {
                self.pos += 2;
                Op::NotEqual(self.value()?)
            }
            (Some('~'), Some('=')) => {
                return Err(self.error(
                    "the regular-expression operator ~= is not supported; use == or !=".into(),
                ))
            }
            _ => Op::Present,
        };
        Ok(Selector { path, op })
    }

    fn path_part(&mut self) -> Result<String, FilterError> {
        if self.peek() == Some('"') {
            return self.quoted();
        }
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-')
        {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expected a field name".into()));
        }
        Ok(self.chars[start..self.pos]
            .iter()
            .map(|&(_, c)| c)
            .collect())
    }

    fn value(&mut self) -> Result<String, FilterError> {
        self.skip_spaces();
        if self.peek() == Some('"') {
            return self.quoted();
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| c != ',') {
            self.pos += 1;
        }
        let value: String = self.chars[start..self.pos]
            .iter()
            .map(|&(_, c)| c)
            .collect();
        Ok(value.trim_end().to_string())
    }

    fn quoted(&mut self) -> Result<String, FilterError> {
        self.pos += 1; // opening quote
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated quoted string".into())),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some('n') => out.push('\n'),
                        Some('t') => out.push('\t'),
                        Some(c @ ('"' | '\\' | '/')) => out.push(c),
                        Some(c) => return Err(self.error(format!("unknown escape \\{c}"))),
                        None => return Err(self.error("unterminated escape".into())),
                    }
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshotter::store::Kind;
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    fn info(name: &str, parent: &str, labels: &[(&str, &str)]) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            parent: parent.into(),
            kind: Kind::Committed,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn containerd_remote_snapshot_lookup_filter() {
        let f =
            Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent==p1"#).unwrap();
        assert!(f.matches(&info(
            "x",
            "p1",
            &[("containerd.io/snapshot.ref", "sha256:abc")]
        )));
        assert!(!f.matches(&info(
            "x",
            "p2",
            &[("containerd.io/snapshot.ref", "sha256:abc")]
        )));
        assert!(!f.matches(&info("x", "p1", &[])));
    }

    #[test]
    fn quoted_values_presence_and_not_equal() {
        let f = Filter::parse(r#"name=="a,b", labels.foo, kind!=active"#).unwrap();
        assert!(f.matches(&info("a,b", "", &[("foo", "1")])));
        assert!(!f.matches(&info("a,b", "", &[])));
        let empty_parent = Filter::parse(r#"parent=="""#).unwrap();
        assert!(empty_parent.matches(&info("a", "", &[])));
    }

    #[test]
    fn bad_filters_name_the_offset() {
        let err = Filter::parse("name==a,").unwrap_err();
        assert_eq!(err.offset, 8);
        assert!(Filter::parse(r#"labels."x"#).is_err());
        assert!(Filter::parse("name~=a").unwrap_err().reason.contains("~="));
    }
}
