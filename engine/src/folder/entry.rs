//! A file as an item of its folder's FeedSync log: path, size, modification time, executable bit
//! and the BLAKE3 root of its content, written as one XML element in the item's content so that a
//! folder's feed stays readable as RSS. A tombstone keeps the entry of the file it deleted.
//!
//! The item's sync id is derived from the path ([`FilePath::item_id`]); an entry whose id is not
//! its path's is refused, so no item can claim another's path. Renaming a file is a delete at the
//! old path and a create at the new one with the same root: the content is found locally by its
//! root and never fetched again.

use std::fmt;
use std::sync::Arc;

use quick_xml::events::Event;
use quick_xml::Reader;

use super::path::{FilePath, PathError};
use crate::feedsync::{Content, NsScope, Version, When};

/// The namespace of a file entry (versioned: a later layout takes a new one).
pub const NAMESPACE: &str = "urn:feedmesh:folder:1";
/// Largest file, in bytes (1 TiB): bounds every size a peer can name.
pub const FILE_BYTES_MAX: u64 = 1 << 40;
/// Longest entry XML accepted, in bytes (a path at its longest, escaped, and the fields).
pub const ENTRY_XML_BYTES_MAX: usize = 6 * super::path::PATH_BYTES_MAX + 512;

/// The BLAKE3 root of a file's content (the root of its bao tree).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The root of `bytes` (what a driver computes while it reads a file).
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        crate::signing::hex(&self.0)
    }

    /// 64 lowercase hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

/// What an item of a folder says about its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub path: FilePath,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch (what the writer's file system said).
    pub mtime_ns: i64,
    pub executable: bool,
    pub root: ContentHash,
}

/// Why an item's content is not a file entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the content is not one `file` element in namespace {NAMESPACE}")]
    NotAnEntry,
    #[error("the entry is {bytes} bytes long (at most {max})", max = ENTRY_XML_BYTES_MAX)]
    TooLong { bytes: usize },
    #[error("the entry's `{name}` attribute is missing")]
    Missing { name: &'static str },
    #[error("the entry's `{name}` attribute appears twice")]
    Duplicate { name: &'static str },
    #[error("the entry has an unknown attribute")]
    UnknownAttribute,
    #[error("the entry's `{name}` attribute is not valid")]
    Invalid { name: &'static str },
    #[error("the entry's size {size} is over the limit of {max} bytes", max = FILE_BYTES_MAX)]
    TooLarge { size: u64 },
    #[error("the entry's path is refused: {0}")]
    Path(#[from] PathError),
    #[error("the item's sync id is not the one of the path it names")]
    IdMismatch,
}

const ATTRIBUTES: [&str; 6] = ["path", "size", "mtime", "exec", "blake3", "xmlns"];

impl FileEntry {
    /// The entry as item content (one empty element carrying its own namespace).
    pub fn to_content(&self) -> Arc<Content> {
        let inner = format!(
            "<file xmlns=\"{NAMESPACE}\" path=\"{}\" size=\"{}\" mtime=\"{}\" exec=\"{}\" blake3=\"{}\"/>",
            quick_xml::escape::escape(self.path.as_str()),
            self.size,
            self.mtime_ns,
            if self.executable { "1" } else { "0" },
            self.root.to_hex()
        );
        Arc::new(Content { attrs: "".into(), inner: inner.into(), scope: Arc::new(NsScope::default()) })
    }

    /// Reads the entry of `version` (live or deleted) and checks that the item's id is its path's.
    pub fn from_version(version: &Version) -> Result<Self, EntryError> {
        let entry = Self::from_content(&version.content)?;
        if entry.path.item_id() != version.id {
            return Err(EntryError::IdMismatch);
        }
        Ok(entry)
    }

    /// Reads an entry from item content. Strict: one `file` element in [`NAMESPACE`], each
    /// attribute once, nothing else.
    pub fn from_content(content: &Content) -> Result<Self, EntryError> {
        let inner = content.inner.trim();
        if inner.len() > ENTRY_XML_BYTES_MAX {
            return Err(EntryError::TooLong { bytes: inner.len() });
        }
        let mut reader = Reader::from_str(inner);
        let start = match reader.read_event() {
            Ok(Event::Empty(start)) if start.name().as_ref() == "file" => start,
            _ => return Err(EntryError::NotAnEntry),
        };
        if !matches!(reader.read_event(), Ok(Event::Eof)) {
            return Err(EntryError::NotAnEntry);
        }
        let mut values: [Option<String>; 6] = Default::default();
        // Bound: the element is at most ENTRY_XML_BYTES_MAX bytes, so are its attributes.
        for attr in start.attributes().with_checks(true) {
            let attr = attr.map_err(|_| EntryError::NotAnEntry)?;
            let at = ATTRIBUTES
                .iter()
                .position(|name| *name == attr.key.as_ref())
                .ok_or(EntryError::UnknownAttribute)?;
            if values[at].is_some() {
                return Err(EntryError::Duplicate { name: ATTRIBUTES[at] });
            }
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|_| EntryError::Invalid { name: ATTRIBUTES[at] })?;
            values[at] = Some(value.into_owned());
        }
        let [path, size, mtime, exec, root, xmlns] = values;
        if xmlns.as_deref() != Some(NAMESPACE) {
            return Err(EntryError::NotAnEntry);
        }
        let path = FilePath::new(&path.ok_or(EntryError::Missing { name: "path" })?)?;
        let size = number::<u64>(size, "size")?;
        if size > FILE_BYTES_MAX {
            return Err(EntryError::TooLarge { size });
        }
        let mtime_ns = number::<i64>(mtime, "mtime")?;
        let executable = match exec.as_deref() {
            Some("0") => false,
            Some("1") => true,
            Some(_) => return Err(EntryError::Invalid { name: "exec" }),
            None => return Err(EntryError::Missing { name: "exec" }),
        };
        let root = ContentHash::from_hex(&root.ok_or(EntryError::Missing { name: "blake3" })?)
            .ok_or(EntryError::Invalid { name: "blake3" })?;
        Ok(Self { path, size, mtime_ns, executable, root })
    }
}

/// A decimal number as this module writes it: digits, an optional `-`, no `+`, no leading zero.
fn number<T: std::str::FromStr + ToString>(
    text: Option<String>,
    name: &'static str,
) -> Result<T, EntryError> {
    let text = text.ok_or(EntryError::Missing { name })?;
    let value: T = text.parse().map_err(|_| EntryError::Invalid { name })?;
    if value.to_string() != text {
        return Err(EntryError::Invalid { name });
    }
    Ok(value)
}

/// Where a losing version of a file is kept beside the winner:
/// `name (conflict, DEVICE, DATE).ext`, with DEVICE the first 8 characters of the endpoint that
/// wrote the loser and DATE its time (UTC, no characters Windows refuses). The same losing version
/// gives the same name on every device, so a conflict copy is a view of the item's conflict, not
/// a file of its own: deleting it resolves the conflict. The stem is shortened (at a character
/// boundary) when the name would be too long.
pub fn conflict_copy(path: &FilePath, loser: &Version) -> Result<FilePath, PathError> {
    let top = loser.topmost();
    let device: String = top.by.as_ref().map_or("unknown", |b| b.as_str()).chars().take(8).collect();
    let date = top.when.as_ref().map_or_else(|| "undated".to_string(), date_of);
    let name = path.file_name();
    let (stem, ext) = match name.rfind('.') {
        Some(dot) if dot > 0 => name.split_at(dot),
        _ => (name, ""),
    };
    let tail = format!(" (conflict, {device}, {date}){ext}");
    let room = super::path::COMPONENT_BYTES_MAX.saturating_sub(tail.len());
    let mut cut = stem.len().min(room);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    path.sibling(&format!("{}{tail}", &stem[..cut]))
}

/// `YYYY-MM-DD HHMMSS` in UTC.
fn date_of(when: &When) -> String {
    let text = when.whole_seconds().to_rfc3339();
    // RFC 3339 as written here: YYYY-MM-DDTHH:MM:SSZ.
    match (text.get(..10), text.get(11..19)) {
        (Some(day), Some(time)) => format!("{day} {}", time.replace(':', "")),
        _ => text.replace(':', ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feedsync::{Endpoint, Item};

    fn entry(path: &str) -> FileEntry {
        FileEntry {
            path: FilePath::new(path).unwrap(),
            size: 1234,
            mtime_ns: -5,
            executable: true,
            root: ContentHash::of(b"hello"),
        }
    }

    fn content(inner: &str) -> Content {
        Content { attrs: "".into(), inner: inner.into(), scope: Default::default() }
    }

    #[test]
    fn an_entry_reads_back_as_written() {
        for path in ["a.txt", "dir/<&\"'>.bin", "ünï/名前"] {
            let e = entry(path);
            let c = e.to_content();
            crate::feedsync::xml::check_content(&c).expect("entry content is valid item content");
            assert_eq!(FileEntry::from_content(&c).unwrap(), e);
        }
    }

    #[test]
    fn an_item_must_carry_the_id_of_its_path() {
        let by = Endpoint::new("dev").unwrap();
        let when = When::from_unix_secs(1_800_000_000).unwrap();
        let e = entry("a.txt");
        let item = Item::create(e.path.item_id(), &by, &when, e.to_content(), false);
        assert_eq!(FileEntry::from_version(&item.version).unwrap(), e);
        let other =
            Item::create(FilePath::new("b.txt").unwrap().item_id(), &by, &when, e.to_content(), false);
        assert_eq!(FileEntry::from_version(&other.version), Err(EntryError::IdMismatch));
    }

    #[test]
    fn malformed_entries_are_refused_with_their_reason() {
        let good = entry("a").to_content().inner.to_string();
        let root = ContentHash::of(b"hello").to_hex();
        let cases: Vec<(String, EntryError)> = vec![
            ("".into(), EntryError::NotAnEntry),
            ("<p>hi</p>".into(), EntryError::NotAnEntry),
            (good.replace(NAMESPACE, "urn:other"), EntryError::NotAnEntry),
            (format!("{good}{good}"), EntryError::NotAnEntry),
            (good.replace("path=\"a\"", "path=\"../etc\""), EntryError::Path(PathError::Dots { at: 0 })),
            (good.replace("path=\"a\"", "path=\"/etc\""), EntryError::Path(PathError::Absolute)),
            (good.replace("path=\"a\" ", ""), EntryError::Missing { name: "path" }),
            (good.replace("size=\"1234\"", "size=\"+1234\""), EntryError::Invalid { name: "size" }),
            (good.replace("size=\"1234\"", "size=\"01234\""), EntryError::Invalid { name: "size" }),
            (good.replace("size=\"1234\"", "size=\"-1\""), EntryError::Invalid { name: "size" }),
            (
                good.replace("size=\"1234\"", "size=\"1099511627777\""),
                EntryError::TooLarge { size: (1 << 40) + 1 },
            ),
            (good.replace("exec=\"1\"", "exec=\"yes\""), EntryError::Invalid { name: "exec" }),
            (good.replace(&root, &root.to_uppercase()), EntryError::Invalid { name: "blake3" }),
            (good.replace(&root, &root[..62]), EntryError::Invalid { name: "blake3" }),
            (good.replace("exec=\"1\"", "exec=\"1\" exec=\"1\""), EntryError::NotAnEntry),
            (good.replace("exec=\"1\"", "exec=\"1\" x=\"1\""), EntryError::UnknownAttribute),
            (
                format!("<file path=\"{}\"/>", "a".repeat(ENTRY_XML_BYTES_MAX)),
                EntryError::TooLong { bytes: ENTRY_XML_BYTES_MAX + 15 },
            ),
        ];
        for (inner, reason) in cases {
            assert_eq!(FileEntry::from_content(&content(&inner)), Err(reason), "{inner}");
        }
    }

    #[test]
    fn a_conflict_copy_sits_beside_the_file_and_names_its_writer() {
        let by = Endpoint::new("0123456789abcdef").unwrap();
        let when = When::from_unix_secs(1_796_649_930).unwrap(); // 2026-12-07T13:25:30Z
        let e = entry("docs/report.final.txt");
        let loser = Item::create(e.path.item_id(), &by, &when, e.to_content(), false).version;
        let copy = conflict_copy(&e.path, &loser).unwrap();
        assert_eq!(copy.as_str(), "docs/report.final (conflict, 01234567, 2026-12-07 132530).txt");
        copy.check_local(crate::folder::Platform::Windows).unwrap();
        let bare = conflict_copy(&FilePath::new(".profile").unwrap(), &loser).unwrap();
        assert_eq!(bare.as_str(), ".profile (conflict, 01234567, 2026-12-07 132530)");
        let long = FilePath::new(&format!("{}.txt", "é".repeat(125))).unwrap();
        let copy = conflict_copy(&long, &loser).unwrap();
        assert!(copy.as_str().len() <= super::super::path::COMPONENT_BYTES_MAX);
        assert!(copy.as_str().ends_with("132530).txt"));
    }
}
