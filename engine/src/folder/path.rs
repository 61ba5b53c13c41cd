//! A file's path inside a mapped folder, as an item names it: relative, `/`-separated, checked
//! before anything touches a disk. A path from a peer is hostile, so every rule is a constructor
//! check with a typed reason, and a path refused here refuses one file, never the folder.
//!
//! Two layers: [`FilePath::new`] holds on every device (no way out of the folder, no control
//! characters, bounded); [`FilePath::check_local`] adds what one platform's file systems cannot
//! hold (a Windows device refuses `a:b` while a Linux one holds it). Symlinks are the driver's
//! part: it never follows one below the folder's root when it writes.

use std::fmt;
use std::sync::Arc;

use crate::feedsync::ItemId;

/// Longest path, in bytes (UTF-8).
pub const PATH_BYTES_MAX: usize = 4096;
/// Longest component (one file or directory name), in bytes: what ext4, APFS and NTFS hold.
pub const COMPONENT_BYTES_MAX: usize = 255;
/// Most components in one path.
pub const DEPTH_MAX: usize = 64;
/// The folder's own directory at its root (partial downloads, the stash of replaced content).
/// No synced path enters it.
pub const RESERVED_DIR: &str = ".feedmesh";

/// The rules of the local file systems, for [`FilePath::check_local`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// Linux, the BSDs, macOS: any byte but `/` and NUL.
    Unix,
    /// NTFS and FAT through Win32: no `<>:"|?*`, no reserved device names, no trailing dot or
    /// space.
    Windows,
}

impl Platform {
    /// The platform this code was compiled for.
    pub const fn current() -> Self {
        if cfg!(windows) {
            Platform::Windows
        } else {
            Platform::Unix
        }
    }
}

/// Why a path was refused. Byte offsets are into the path as received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path is {bytes} bytes long (at most {max})", max = PATH_BYTES_MAX)]
    TooLong { bytes: usize },
    #[error("path has more than {max} components", max = DEPTH_MAX)]
    TooDeep,
    #[error("path is absolute (starts with `/`)")]
    Absolute,
    #[error("path has an empty component at byte {at} (`//` or a trailing `/`)")]
    EmptyComponent { at: usize },
    #[error("path has a `.` or `..` component at byte {at}")]
    Dots { at: usize },
    #[error("a component at byte {at} is {bytes} bytes long (at most {max})", max = COMPONENT_BYTES_MAX)]
    ComponentTooLong { at: usize, bytes: usize },
    #[error("character U+{code:04X} at byte {at}: control characters are not allowed in a path")]
    Control { at: usize, code: u32 },
    #[error("backslash at byte {at}: a separator on Windows, so not allowed in a name")]
    Backslash { at: usize },
    #[error("path enters the folder's own directory `{RESERVED_DIR}`")]
    Reserved,
    #[error("character {ch:?} at byte {at} cannot be held by this device's file system (Windows)")]
    WindowsCharacter { at: usize, ch: char },
    #[error("component {name:?} is a reserved device name on Windows")]
    WindowsDeviceName { name: String },
    #[error("component {name:?} ends with a dot or a space, which Windows drops")]
    WindowsTrailing { name: String },
}

/// A checked path of a file in a folder (see the module doc for the rules).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FilePath(Arc<str>);

impl FilePath {
    /// Checks `text` against the rules every device holds to.
    pub fn new(text: &str) -> Result<Self, PathError> {
        if text.is_empty() {
            return Err(PathError::Empty);
        }
        if text.len() > PATH_BYTES_MAX {
            return Err(PathError::TooLong { bytes: text.len() });
        }
        if text.starts_with('/') {
            return Err(PathError::Absolute);
        }
        if let Some((at, ch)) = text.char_indices().find(|(_, c)| c.is_control()) {
            return Err(PathError::Control { at, code: ch as u32 });
        }
        if let Some(at) = text.find('\\') {
            return Err(PathError::Backslash { at });
        }
        let mut at = 0;
        // Bound: at most DEPTH_MAX components are looked at.
        for (depth, name) in text.split('/').enumerate() {
            if depth == DEPTH_MAX {
                return Err(PathError::TooDeep);
            }
            if name.is_empty() {
                return Err(PathError::EmptyComponent { at });
            }
            if name == "." || name == ".." {
                return Err(PathError::Dots { at });
            }
            if name.len() > COMPONENT_BYTES_MAX {
                return Err(PathError::ComponentTooLong { at, bytes: name.len() });
            }
            if depth == 0 && name.eq_ignore_ascii_case(RESERVED_DIR) {
                return Err(PathError::Reserved);
            }
            at += name.len() + 1;
        }
        Ok(Self(Arc::from(text)))
    }

    /// Checks what `platform`'s file systems cannot hold, on top of [`FilePath::new`]'s rules.
    pub fn check_local(&self, platform: Platform) -> Result<(), PathError> {
        match platform {
            Platform::Unix => Ok(()),
            Platform::Windows => {
                let mut at = 0;
                for name in self.components() {
                    if let Some((i, ch)) = name.char_indices().find(|(_, c)| "<>:\"|?*".contains(*c)) {
                        return Err(PathError::WindowsCharacter { at: at + i, ch });
                    }
                    if name.ends_with('.') || name.ends_with(' ') {
                        return Err(PathError::WindowsTrailing { name: name.to_string() });
                    }
                    if windows_device_name(name) {
                        return Err(PathError::WindowsDeviceName { name: name.to_string() });
                    }
                    at += name.len() + 1;
                }
                Ok(())
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, outermost first (never empty, never `.` or `..`).
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The directory part, `None` at the folder's root.
    pub fn parent(&self) -> Option<&str> {
        self.0.rsplit_once('/').map(|(parent, _)| parent)
    }

    /// The sync id of the item that holds this path's file. Derived from the path (a keyed hash,
    /// so any path gives a valid id of fixed length): two devices that create the same path
    /// concurrently make two versions of one item, and the merge keeps one and a conflict.
    pub fn item_id(&self) -> ItemId {
        let mut hasher = blake3::Hasher::new_derive_key("feedmesh 2026 folder file path");
        hasher.update(self.0.as_bytes());
        let digest = hasher.finalize();
        let id = format!("file-{}", crate::signing::hex(&digest.as_bytes()[..16]));
        // Invariant: "file-" and hex digits are RFC 2141 NSS characters, 37 bytes.
        ItemId::new(&id).expect("a hex id is a valid sync id")
    }

    /// This path with `name` as its last component (a sibling in the same directory).
    pub fn sibling(&self, name: &str) -> Result<FilePath, PathError> {
        match self.parent() {
            Some(parent) => FilePath::new(&format!("{parent}/{name}")),
            None => FilePath::new(name),
        }
    }
}

/// CON, PRN, AUX, NUL, COM0-9, LPT0-9 (and the superscript digits), with or without an extension,
/// in any case.
fn windows_device_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).trim_end_matches(' ');
    let upper = stem.to_ascii_uppercase();
    match upper.as_str() {
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$" => true,
        _ => {
            let digit = |rest: &str| {
                matches!(rest, "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" | "¹" | "²" | "³")
            };
            (upper.starts_with("COM") || upper.starts_with("LPT")) && digit(upper.get(3..).unwrap_or(""))
        }
    }
}

impl fmt::Debug for FilePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for FilePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> PathError {
        FilePath::new(text).expect_err(text)
    }

    #[test]
    fn paths_that_leave_the_folder_are_refused() {
        assert_eq!(refused(""), PathError::Empty);
        assert_eq!(refused("/etc/passwd"), PathError::Absolute);
        assert_eq!(refused("../x"), PathError::Dots { at: 0 });
        assert_eq!(refused("a/../../x"), PathError::Dots { at: 2 });
        assert_eq!(refused("a/./x"), PathError::Dots { at: 2 });
        assert_eq!(refused("a//x"), PathError::EmptyComponent { at: 2 });
        assert_eq!(refused("a/"), PathError::EmptyComponent { at: 2 });
        assert_eq!(refused("..\\x"), PathError::Backslash { at: 2 });
        assert_eq!(refused("a\u{0}b"), PathError::Control { at: 1, code: 0 });
        assert_eq!(refused("a\u{1b}[2J"), PathError::Control { at: 1, code: 0x1b });
        assert_eq!(refused(".feedmesh/partial/x"), PathError::Reserved);
        assert_eq!(refused(".FeedMesh"), PathError::Reserved);
        assert_eq!(refused(&vec!["a"; DEPTH_MAX + 1].join("/")), PathError::TooDeep);
        assert_eq!(refused(&"x".repeat(256)), PathError::ComponentTooLong { at: 0, bytes: 256 });
        assert_eq!(refused(&"abcd/".repeat(1000)), PathError::TooLong { bytes: 5000 });
    }

    #[test]
    fn ordinary_paths_are_taken() {
        for text in
            ["a", "docs/report (final).txt", "ünïcödé/名前.md", "a/.feedmesh", ".hidden", "..x", "x.."]
        {
            let path = FilePath::new(text).expect(text);
            assert_eq!(path.as_str(), text);
            path.check_local(Platform::Unix).expect(text);
        }
        let path = FilePath::new("a/b/c.txt").unwrap();
        assert_eq!(path.file_name(), "c.txt");
        assert_eq!(path.parent(), Some("a/b"));
        assert_eq!(path.sibling("d.txt").unwrap().as_str(), "a/b/d.txt");
        assert_eq!(FilePath::new("top").unwrap().parent(), None);
        let depth_max = vec!["a"; DEPTH_MAX].join("/");
        assert_eq!(FilePath::new(&depth_max).unwrap().components().count(), DEPTH_MAX);
    }

    #[test]
    fn windows_refuses_what_it_cannot_hold_and_unix_holds_it() {
        let cases: [(&str, PathError); 6] = [
            ("a/b:c", PathError::WindowsCharacter { at: 3, ch: ':' }),
            ("what?", PathError::WindowsCharacter { at: 4, ch: '?' }),
            ("dir/con.txt", PathError::WindowsDeviceName { name: "con.txt".into() }),
            ("LPT1", PathError::WindowsDeviceName { name: "LPT1".into() }),
            ("trailing.", PathError::WindowsTrailing { name: "trailing.".into() }),
            ("a /b", PathError::WindowsTrailing { name: "a ".into() }),
        ];
        for (text, reason) in cases {
            let path = FilePath::new(text).expect(text);
            path.check_local(Platform::Unix).expect(text);
            assert_eq!(path.check_local(Platform::Windows), Err(reason), "{text}");
        }
        for text in ["console.txt", "COM", "LPT10", "com1x", "a.b/c"] {
            FilePath::new(text).unwrap().check_local(Platform::Windows).expect(text);
        }
    }

    #[test]
    fn the_item_id_is_the_path_s_and_only_its() {
        let a = FilePath::new("a/b.txt").unwrap();
        assert_eq!(a.item_id(), FilePath::new("a/b.txt").unwrap().item_id());
        assert_ne!(a.item_id(), FilePath::new("a/B.txt").unwrap().item_id());
        assert_eq!(a.item_id().as_str().len(), 37);
        let long = FilePath::new(&vec!["x".repeat(60); 60].join("/")).unwrap();
        assert_eq!(long.item_id().as_str().len(), 37);
    }
}
