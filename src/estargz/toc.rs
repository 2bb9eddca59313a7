//! The raw TOC (`stargz.index.json`) as serde types with the exact key names, types and omitempty
//! rules of the eStargz JTOC; shared by eStargz and zstd:chunked.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole TOC: `{"version": 1, "entries": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Toc {
    /// Format version, 1.
    pub version: i64,
    /// Entries in blob order.
    #[serde(default, deserialize_with = "at_most_max_entries")]
    pub entries: Vec<TocEntry>,
}

/// Most entries (files, directories, links and chunk entries) a TOC may have: about a million.
/// Reading a TOC costs memory per entry, and a small compressed TOC can declare millions of
/// tiny ones; what a layer needs beyond this is refused before it is held.
pub const MAX_TOC_ENTRIES: usize = 1 << 20;

/// Deserializes the entry array, failing as soon as it passes [`MAX_TOC_ENTRIES`].
fn at_most_max_entries<'de, D>(deserializer: D) -> Result<Vec<TocEntry>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<TocEntry>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an array of at most {MAX_TOC_ENTRIES} TOC entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(entry) = seq.next_element()? {
                if entries.len() == MAX_TOC_ENTRIES {
                    return Err(serde::de::Error::custom(format!(
                        "the TOC has more than {MAX_TOC_ENTRIES} entries, the most lazysnap \
                         reads (split the layer)"
                    )));
                }
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_seq(Bounded)
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// One TOC entry. Fields are omitted when zero/empty, as the Go writer does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TocEntry {
    /// Tar name verbatim (dirs may end in `/`).
    pub name: String,
    /// `dir reg symlink hardlink char block fifo chunk`.
    #[serde(rename = "type")]
    pub kind: String,
    /// File size (reg only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// RFC3339 UTC modification time.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    /// Symlink target verbatim, or hardlink target tar name.
    #[serde(rename = "linkName", default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    /// Permission bits plus setuid/setgid/sticky.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: u64,
    /// Owner user id.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub uid: u32,
    /// Owner group id.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub gid: u32,
    /// Owner user name.
    #[serde(rename = "userName", default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    /// Owner group name.
    #[serde(
        rename = "groupName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub group_name: String,
    /// Compressed offset of the member (frame) that starts with this entry's (chunk's) data.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// Offset of the data inside the decompressed member.
    #[serde(rename = "innerOffset", default, skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
    /// Device major number (char/block).
    #[serde(rename = "devMajor", default, skip_serializing_if = "is_zero")]
    pub dev_major: u64,
    /// Device minor number (char/block).
    #[serde(rename = "devMinor", default, skip_serializing_if = "is_zero")]
    pub dev_minor: u64,
    /// Extended attributes, values base64-encoded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// `sha256:<hex>` of the whole file (reg).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Offset of this chunk within the file.
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    /// Length of this chunk; 0 means "up to the end of the file".
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    /// `sha256:<hex>` of this chunk's data.
    #[serde(
        rename = "chunkDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
    /// lazysnap's mark on a chunk of the prioritized part that the recorded workload never read
    /// (`lazysnap optimize` cuts partly read files around what was read): lazysnap's prefetch
    /// leaves it out; other readers ignore the key and prefetch it with the rest.
    #[serde(
        rename = "lazysnap.skipPrefetch",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub skip_prefetch: bool,
}
