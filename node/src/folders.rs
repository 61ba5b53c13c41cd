//! Mapped folders: a folder's feed kept the same as a directory on disk (issue 14, item 1). The
//! decisions are the engine's (`engine::folder::plan`); this is the IO around them: scanning the
//! directory, carrying out the plan, keeping the base. Content that must come from another device
//! is reported as waiting: moving content between devices is not built into the node yet.
//!
//! Under the mapped directory, `.feedmesh/` is the folder's own: `base.json` (what was last in
//! sync per path), `tmp/` (files being written, renamed into place when whole) and `trash/`
//! (content a peer's delete or replacement removed, kept by root so it stays retrievable).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use engine::directory::FolderId;
use engine::feedsync::{Edit, Item};
use engine::folder::path::RESERVED_DIR;
use engine::folder::{plan, Action, ContentHash, DiskFile, FilePath, Outboard, Platform, Synced};
use engine::signing::hex;
use serde::{Deserialize, Serialize};

use crate::net::{lock, Shared};

/// The file in the data directory that says which folder is mapped to which directory.
pub const MAPPINGS_FILE: &str = "mapped.json";
/// Most files a scan looks at in one folder.
pub const FILES_MAX: usize = 1_000_000;
/// A file modified this recently is still being written: not published, not replaced.
pub const STABLE: Duration = Duration::from_secs(2);
/// Plans carried out in one pass (each settles what the previous one changed).
const ROUNDS_MAX: usize = 4;

/// Folder (hex id) -> directory.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Mappings {
    pub folders: BTreeMap<String, PathBuf>,
}

impl Mappings {
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(MAPPINGS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        write_atomically(&data_dir.join(MAPPINGS_FILE), serde_json::to_string_pretty(self)?.as_bytes())
    }

    pub fn dir_of(&self, folder: &FolderId) -> Option<&Path> {
        self.folders.get(&hex(&folder.0)).map(PathBuf::as_path)
    }
}

/// Maps `folder` to `dir` (created if missing; its files stay as they are and are published by
/// the next pass).
pub fn map(data_dir: &Path, folder: &FolderId, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    let mut mappings = Mappings::load(data_dir)?;
    if let Some((other, _)) = mappings.folders.iter().find(|(f, d)| **d == dir && **f != hex(&folder.0)) {
        bail!("{} is mapped to folder {} already", dir.display(), &other[..8]);
    }
    std::fs::create_dir_all(dir.join(RESERVED_DIR))
        .with_context(|| format!("creating {RESERVED_DIR} in {}", dir.display()))?;
    mappings.folders.insert(hex(&folder.0), dir.clone());
    mappings.save(data_dir)?;
    Ok(dir)
}

/// Unmaps `folder`'s directory; its files stay where they are.
pub fn unmap(data_dir: &Path, folder: &FolderId) -> anyhow::Result<Option<PathBuf>> {
    let mut mappings = Mappings::load(data_dir)?;
    let dir = mappings.folders.remove(&hex(&folder.0));
    mappings.save(data_dir)?;
    Ok(dir)
}

/// A file a mapped folder still needs here, for `status` and the local API.
#[derive(Debug, Clone, Serialize)]
pub struct FileNeed {
    pub path: String,
    pub size: u64,
    /// Bytes verified and written so far (a partial file).
    pub have_bytes: u64,
    /// The devices it is being fetched from now: short id, route, measured bytes per second.
    pub sources: Vec<(String, String, u64)>,
    /// Why nothing is being fetched, when nothing is.
    pub waiting: Option<String>,
}

impl FileNeed {
    /// One line for `status`: a bar, the share held, the path, and where from or why not.
    pub fn line(&self) -> String {
        let share = if self.size == 0 { 1.0 } else { self.have_bytes as f64 / self.size as f64 };
        let filled = (share * 20.0).floor() as usize;
        let bar: String = "#".repeat(filled.min(20)) + &".".repeat(20 - filled.min(20));
        let whence = if self.sources.is_empty() {
            format!("waiting: {}", self.waiting.as_deref().unwrap_or("not started yet"))
        } else {
            let from: Vec<String> = self
                .sources
                .iter()
                .map(|(d, route, rate)| {
                    format!("{d} ({route}, {:.1} MiB/s)", *rate as f64 / f64::from(1u32 << 20))
                })
                .collect();
            format!("from {}", from.join(", "))
        };
        format!(
            "[{bar}] {:>3}% {} ({:.1} of {:.1} MiB) {whence}",
            (share * 100.0).floor() as u64,
            self.path,
            self.have_bytes as f64 / f64::from(1u32 << 20),
            self.size as f64 / f64::from(1u32 << 20)
        )
    }
}

/// What one pass over a mapped folder did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Pass {
    pub published: usize,
    pub deleted: usize,
    pub resolved: usize,
    pub written: usize,
    pub removed: usize,
    /// Files whose content must come from another device, by path.
    pub waiting: Vec<String>,
    /// Their entries (what to fetch), one per content.
    #[serde(skip)]
    pub wants: Vec<engine::folder::FileEntry>,
    /// Items refused and files skipped, each with its reason.
    pub refused: Vec<String>,
    /// Files still being written (left for the next pass).
    pub unstable: usize,
}

impl Pass {
    pub fn summary(&self) -> String {
        let mut out = format!(
            "published {}, deleted {}, resolved {}, wrote {}, removed {}; {} still being written, {} waiting for content\n",
            self.published, self.deleted, self.resolved, self.written, self.removed, self.unstable, self.waiting.len()
        );
        for w in &self.waiting {
            out.push_str(&format!("  waiting: {w}: its content is on another device, not reached yet\n"));
        }
        for r in &self.refused {
            out.push_str(&format!("  refused: {r}\n"));
        }
        out
    }
}

/// One pass at a time in a process (the daemon's round and a `folder scan` may meet): a pass
/// reads and writes the folder's base.
static PASSES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A pass over every mapped directory of folders still mapped on this device (the daemon's
/// round); errors are per folder.
pub fn pass_all(node: &Shared) -> Vec<(FolderId, PathBuf, anyhow::Result<Pass>)> {
    mapped(node).into_iter().map(|(folder, dir)| (folder, dir.clone(), pass(node, &folder, &dir))).collect()
}

/// The folders mapped on this device (and still its to map), with their directories.
pub fn mapped(node: &Shared) -> Vec<(FolderId, PathBuf)> {
    let data_dir = lock(node).dir_path.clone();
    let Ok(mappings) = Mappings::load(&data_dir) else { return Vec::new() };
    let mut out = Vec::new();
    for (folder_hex, dir) in &mappings.folders {
        let Some(folder) = crate::state::parse_folder_hex(folder_hex) else { continue };
        if lock(node).check_mapped(&folder).is_err() {
            continue;
        }
        out.push((folder, dir.clone()));
    }
    out
}

/// One pass: scan, plan, carry out, until the plan has nothing left this device can do.
/// Scanning and hashing run without the node's lock; it is taken to read the folder's items and
/// for each write.
pub fn pass(node: &Shared, folder: &FolderId, dir: &Path) -> anyhow::Result<Pass> {
    let _one = PASSES.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Pass::default();
    let mut base = load_base(dir)?;
    for _ in 0..ROUNDS_MAX {
        let (files, skipped) = scan(dir, &base)?;
        out.unstable = files.values().filter(|f| f.root.is_none()).count();
        out.refused = skipped;
        let items: Vec<Arc<Item>> = {
            let n = lock(node);
            n.check_mapped(folder)?;
            n.replica(folder).map(|r| r.items().cloned().collect()).unwrap_or_default()
        };
        let plan = plan(items.iter().map(|i| i.as_ref()), &files, &base, Platform::current());
        out.refused.extend(plan.refused.iter().map(ToString::to_string));
        out.waiting.clear();
        out.wants.clear();
        let mut acted = false;
        for action in plan.actions {
            acted |= carry_out(node, folder, dir, &files, &mut base, action, &mut out)?;
        }
        // Only an action changes the base (a file waiting for its content does not): a pass
        // that did nothing leaves base.json as it was (serving keys its cache on it).
        if !acted {
            break;
        }
        // What the base is about to record must be on disk first: the files placed (renamed
        // fetched objects, copies) and their renames. Else a crash could leave a base naming a
        // file whose content or name was lost, which the next scan would take for a local edit or
        // delete and publish.
        durable(dir)?;
        save_base(dir, &base)?;
    }
    // What is still needed, for `status` (a fetch fills in sources and progress).
    let needs: Vec<FileNeed> = out
        .wants
        .iter()
        .map(|w| {
            let have = partial_have(dir, &w.root, w.size);
            let have_bytes = have
                .iter()
                .map(|r| {
                    (r.end * engine::folder::fetch::GROUP_BYTES).min(w.size)
                        - r.start * engine::folder::fetch::GROUP_BYTES
                })
                .sum();
            FileNeed {
                path: w.path.to_string(),
                size: w.size,
                have_bytes,
                sources: Vec::new(),
                waiting: None,
            }
        })
        .collect();
    let mut n = lock(node);
    if needs.is_empty() {
        n.needs.remove(folder);
    } else {
        n.needs.insert(*folder, needs);
    }
    drop(n);
    Ok(out)
}

/// Carries out one action; false when it could not (content to fetch).
fn carry_out(
    node: &Shared,
    folder: &FolderId,
    dir: &Path,
    files: &BTreeMap<FilePath, DiskFile>,
    base: &mut BTreeMap<FilePath, Synced>,
    action: Action,
    out: &mut Pass,
) -> anyhow::Result<bool> {
    let write = |id: &FilePath, edit: Edit| -> anyhow::Result<()> {
        lock(node).write(folder, id.item_id().as_str(), edit).map(|_| ())
    };
    match action {
        Action::Publish(entry) => {
            write(&entry.path, Edit { content: Some(entry.to_content()), ..Edit::default() })?;
            base.insert(entry.path.clone(), Synced::of(&entry, None));
            out.published += 1;
        }
        Action::PublishDelete(path) => {
            write(&path, Edit { delete: true, ..Edit::default() })?;
            base.remove(&path);
            out.deleted += 1;
        }
        Action::Resolve { path, copy } => {
            write(&path, Edit { resolve: true, ..Edit::default() })?;
            base.remove(&copy);
            out.resolved += 1;
        }
        Action::Write { at, entry, local, copy_of } => {
            // A local file with that root, else content fetched from a peer (verified as it came).
            let fetched = object_path(dir, &entry.root);
            let source = match local {
                Some(local) => dir.join(local.as_str()),
                None if fetched.exists() => fetched.clone(),
                None => {
                    out.waiting.push(at.to_string());
                    if out.wants.iter().all(|w| w.root != entry.root) {
                        out.wants.push(entry);
                    }
                    return Ok(false);
                }
            };
            let tmp = tmp_path(dir, &entry.root)?;
            // A fetched object was verified group by group as it came and synced when whole: it
            // is moved into place. A local source was scanned with this root and may have
            // changed since: its copy is hashed again.
            if source == fetched {
                std::fs::rename(&source, &tmp).with_context(|| format!("moving {}", source.display()))?;
            } else {
                std::fs::copy(&source, &tmp).with_context(|| format!("copying {}", source.display()))?;
            }
            if source != fetched && hash_file(&tmp)? != entry.root {
                let _ = std::fs::remove_file(&tmp);
                if source == fetched {
                    // A fetched object that is not what it should be is fetched again.
                    let _ = std::fs::remove_file(&fetched);
                }
                return Ok(false);
            }
            set_mode_and_mtime(&tmp, entry.executable, entry.mtime_ns)?;
            if let Some(old) = files.get(&at).and_then(|f| f.root) {
                stash(dir, &at, &old)?;
            }
            place(dir, &at, &tmp)?;
            base.insert(at, Synced::of(&entry, copy_of));
            out.written += 1;
        }
        Action::Touch { at, entry } => {
            set_mode_and_mtime(&dir.join(at.as_str()), entry.executable, entry.mtime_ns)?;
            base.insert(at, Synced::of(&entry, None));
        }
        Action::Adopt { at, synced } => {
            base.insert(at, synced);
        }
        Action::Remove { path } => {
            if let Some(root) = files.get(&path).and_then(|f| f.root) {
                stash(dir, &path, &root)?;
            }
            base.remove(&path);
            out.removed += 1;
        }
        Action::Forget { path } => {
            base.remove(&path);
        }
    }
    Ok(true)
}

/// Scans `dir`: every regular file under it but the folder's own directory, with its root (read
/// from the base when size, mtime and mode are unchanged; `None` while the file is being written).
/// Symlinks, names that are not UTF-8 and paths the engine refuses are skipped, with the reason.
pub fn scan(
    dir: &Path,
    base: &BTreeMap<FilePath, Synced>,
) -> anyhow::Result<(BTreeMap<FilePath, DiskFile>, Vec<String>)> {
    let mut files = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    let now = SystemTime::now();
    // Bound: FILES_MAX entries, each directory read once.
    while let Some((at, prefix)) = pending.pop() {
        let entries = std::fs::read_dir(&at).with_context(|| format!("reading {}", at.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", at.display()))?;
            if files.len() + skipped.len() >= FILES_MAX {
                bail!("{} holds more than {FILES_MAX} files", dir.display());
            }
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                skipped.push(format!("{}: a name that is not UTF-8", entry.path().display()));
                continue;
            };
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            if prefix.is_empty() && name == RESERVED_DIR {
                continue;
            }
            let meta = entry.path().symlink_metadata().with_context(|| format!("reading {rel}"))?;
            if meta.file_type().is_symlink() {
                skipped.push(format!("{rel}: a symlink (not synced)"));
                continue;
            }
            if meta.is_dir() {
                pending.push((entry.path(), rel));
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            let path = match FilePath::new(&rel) {
                Ok(path) => path,
                Err(e) => {
                    skipped.push(format!("{rel}: {e}"));
                    continue;
                }
            };
            let file = disk_file(dir, &entry.path(), &meta, base.get(&path), now)?;
            files.insert(path, file);
        }
    }
    Ok((files, skipped))
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(unix)]
fn executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn executable(_: &std::fs::Metadata) -> bool {
    false
}

fn disk_file(
    dir: &Path,
    path: &Path,
    meta: &std::fs::Metadata,
    base: Option<&Synced>,
    now: SystemTime,
) -> anyhow::Result<DiskFile> {
    let (size, mtime_ns, executable) = (meta.len(), mtime_ns(meta), executable(meta));
    let known = base.filter(|b| b.size == size && b.mtime_ns == mtime_ns && b.executable == executable);
    let root = match known {
        Some(b) => Some(b.root),
        None => {
            let recent =
                meta.modified().ok().and_then(|m| now.duration_since(m).ok()).is_none_or(|age| age < STABLE);
            if recent {
                None
            } else {
                let root = hash_and_keep_outboard(dir, path, size)?;
                // Changed while it was read: still being written.
                let again = path.symlink_metadata()?;
                (again.len() == size && self::mtime_ns(&again) == mtime_ns).then_some(root)
            }
        }
    };
    Ok(DiskFile { size, mtime_ns, executable, root })
}

/// The root of a file found changed; a large one's outboard is computed in the same read and
/// kept in `.feedmesh/outboards`, so the first peer that asks for it is served at once.
fn hash_and_keep_outboard(dir: &Path, path: &Path, size: u64) -> anyhow::Result<ContentHash> {
    if size <= OUTBOARD_CACHE_FROM {
        return hash_file(path);
    }
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let outboard = Outboard::of_reader(std::io::BufReader::with_capacity(1 << 20, file), size)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    keep_outboard(dir, &outboard)?;
    Ok(outboard.root)
}

/// Writes an outboard to the cache: renamed into place whole, not synced (a torn one does not
/// load and is computed again).
fn keep_outboard(dir: &Path, outboard: &Outboard) -> anyhow::Result<()> {
    let cache = dir.join(RESERVED_DIR).join("outboards").join(outboard.root.to_hex());
    std::fs::create_dir_all(cache.parent().expect("the cache has a folder"))?;
    let tmp = cache.with_extension("tmp");
    std::fs::write(&tmp, outboard.as_bytes())?;
    std::fs::rename(&tmp, &cache)?;
    Ok(())
}

fn hash_file(path: &Path) -> anyhow::Result<ContentHash> {
    let mut file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(ContentHash(*hasher.finalize().as_bytes()))
}

fn set_mode_and_mtime(path: &Path, executable: bool, mtime_ns: i64) -> anyhow::Result<()> {
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if let Ok(ns) = u64::try_from(mtime_ns) {
        file.set_modified(UNIX_EPOCH + Duration::from_nanos(ns))
            .with_context(|| format!("setting the mtime of {}", path.display()))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut perms = file.metadata()?.permissions();
        let mode = perms.mode();
        perms.set_mode(if executable { mode | ((mode & 0o444) >> 2) } else { mode & !0o111 });
        file.set_permissions(perms)?;
    }
    #[cfg(not(unix))]
    let _ = executable;
    Ok(())
}

/// Where fetched content waits, whole and verified, to be written into place.
pub fn object_path(dir: &Path, root: &ContentHash) -> PathBuf {
    dir.join(RESERVED_DIR).join("objects").join(root.to_hex())
}

/// Where content being fetched is written, group by group. One file: the content's bytes at
/// their offsets, and past the content's size the log of groups written (a little-endian u64
/// per group, each appended after the group's bytes were written), cut off when the file is
/// whole. One file, not two, per file fetched: creating files is what a tree of small files
/// costs most (on ext4 without a journal, just after many deletes, each creation scans for an
/// inode not recently freed).
pub fn partial_path(dir: &Path, root: &ContentHash) -> PathBuf {
    dir.join(RESERVED_DIR).join("partial").join(root.to_hex())
}

/// Most log records a partial file may hold per group (twins can write a group twice); a
/// longer log is not ours and is ignored (everything is fetched again).
const LOG_RECORDS_PER_GROUP_MAX: u64 = 4;

/// The verified runs of groups of a partial file of content `size` bytes long (empty when there
/// is none or its log is unreadable: then everything is fetched again).
pub fn partial_have(dir: &Path, root: &ContentHash, size: u64) -> Vec<std::ops::Range<u64>> {
    let groups_max = size.div_ceil(engine::folder::fetch::GROUP_BYTES);
    let Ok(file) = std::fs::File::open(partial_path(dir, root)) else { return Vec::new() };
    let len = file.metadata().map_or(0, |m| m.len());
    let log_len = len.saturating_sub(size);
    if log_len == 0 || log_len > groups_max * LOG_RECORDS_PER_GROUP_MAX * 8 {
        return Vec::new();
    }
    let mut bytes = vec![0u8; log_len as usize];
    if read_exact_at(&file, &mut bytes, size).is_err() {
        return Vec::new();
    }
    // A torn last record (a crash inside the append) is ignored, and so is a group past the end.
    let mut groups: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .filter(|g| *g < groups_max)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for g in groups {
        match runs.last_mut() {
            Some(last) if last.end == g => last.end += 1,
            _ => runs.push(g..g + 1),
        }
    }
    runs
}

/// Writes verified groups into the partial file, then records the runs held (after the data is
/// on disk: a crash loses at most the groups not yet recorded, which are fetched again).
/// A partial file being fetched, open for writing, and where its next log record goes.
#[derive(Debug)]
pub struct Partial {
    data: std::fs::File,
    log_at: u64,
}

impl Partial {
    /// Opens (or starts) the partial file of content `root` of `size` bytes.
    pub fn open(dir: &Path, root: &ContentHash, size: u64) -> anyhow::Result<Self> {
        let data = partial_path(dir, root);
        let open = || std::fs::File::options().create(true).truncate(false).write(true).open(&data);
        // The folder is made once, when the first open finds it missing (not a mkdir per file).
        let data = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data.parent().expect("a partial file has a folder"))?;
                open()?
            }
            other => other?,
        };
        // After the records already there (a torn last one is written over).
        let len = data.metadata()?.len();
        let log_at = size + len.saturating_sub(size) / 8 * 8;
        Ok(Self { data, log_at })
    }

    /// Writes a verified group at its offset, then logs it. No sync per group: a killed process
    /// loses nothing the kernel has; the whole file is synced when it is finished (and a power
    /// cut costs at most a refetch: a group is logged only after its bytes were written).
    pub fn write(&mut self, group: u64, bytes: &[u8]) -> anyhow::Result<()> {
        self.write_groups(&[(group, bytes)])
    }

    /// [`Partial::write`] for several groups: each written at its offset, then all logged with
    /// one write.
    pub fn write_groups(&mut self, groups: &[(u64, &[u8])]) -> anyhow::Result<()> {
        let mut log = Vec::with_capacity(groups.len() * 8);
        for (group, bytes) in groups {
            write_all_at(&self.data, bytes, group * engine::folder::fetch::GROUP_BYTES)?;
            log.extend_from_slice(&group.to_le_bytes());
        }
        write_all_at(&self.data, &log, self.log_at)?;
        self.log_at += log.len() as u64;
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `at` (the file's cursor untouched where the platform allows).
pub fn read_exact_at(file: &std::fs::File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = file;
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(buf)
    }
}

/// Writes all of `bytes` at `at`.
pub fn write_all_at(file: &std::fs::File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, bytes, at)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = file;
        file.seek(SeekFrom::Start(at))?;
        file.write_all(bytes)
    }
}

/// A finished partial file becomes an object (whole and verified), for the next pass to place.
/// On Linux it is not synced here: the pass that places it syncs the file system once before
/// its base records the file ([`durable`]), one flush for any number of files instead of one
/// per file (on ext4 without a journal, each fsync is an inode write and a device flush).
pub fn finish_partial(dir: &Path, root: &ContentHash, size: u64) -> anyhow::Result<()> {
    let data = partial_path(dir, root);
    // The log goes: what is left is the content.
    let file = std::fs::File::options().write(true).open(&data)?;
    file.set_len(size)?;
    #[cfg(not(target_os = "linux"))]
    file.sync_all()?;
    drop(file);
    let object = object_path(dir, root);
    if let Err(e) = std::fs::rename(&data, &object) {
        if e.kind() != std::io::ErrorKind::NotFound || !data.exists() {
            return Err(e.into());
        }
        std::fs::create_dir_all(object.parent().expect("an object has a folder"))?;
        std::fs::rename(&data, &object)?;
    }
    Ok(())
}

/// Where this device holds the content `root` of `size` bytes in the mapped directory `dir` (a
/// file whose base says so and that did not change since, a fetched object, or the trash), with
/// its outboard (computed once and kept in `.feedmesh/outboards/`). `None` when it does not hold
/// it, or the file's content is not `root` after all.
pub fn content_source(
    dir: &Path,
    root: &ContentHash,
    size: u64,
) -> anyhow::Result<Option<(PathBuf, Outboard)>> {
    let base = load_base(dir)?;
    let Some(path) = find_source(dir, &base, root, size) else { return Ok(None) };
    outboard_for(dir, &path, root, size)
}

/// Files up to this size have their outboard computed when served; larger ones keep it in
/// `.feedmesh/outboards`.
pub const OUTBOARD_CACHE_FROM: u64 = 1 << 20;

/// Where the directory holds the content `root` whole now (no outboard: for reading it as is).
pub fn held_path(dir: &Path, root: &ContentHash, size: u64) -> anyhow::Result<Option<PathBuf>> {
    Ok(find_source(dir, &load_base(dir)?, root, size))
}

/// Every content the mapped directory holds whole now, as the base last saw it (a file changed
/// since is left out): (root, size) -> where to read it. For uploads: one read of the base.
pub fn held_contents(dir: &Path) -> anyhow::Result<BTreeMap<(ContentHash, u64), PathBuf>> {
    let base = load_base(dir)?;
    let mut out = BTreeMap::new();
    // Bound: the base's entries (this device's own record of the directory).
    for (path, synced) in &base {
        let full = dir.join(path.as_str());
        let Ok(meta) = full.symlink_metadata() else { continue };
        if meta.is_file() && meta.len() == synced.size && mtime_ns(&meta) == synced.mtime_ns {
            out.entry((synced.root, synced.size)).or_insert(full);
        }
    }
    Ok(out)
}

/// Where the directory holds the content `root` whole: a synced file unchanged since, a fetched
/// object, or the trash.
fn find_source(
    dir: &Path,
    base: &BTreeMap<FilePath, Synced>,
    root: &ContentHash,
    size: u64,
) -> Option<PathBuf> {
    let mut found = None;
    for (path, synced) in base {
        if synced.root != *root || synced.size != size {
            continue;
        }
        let full = dir.join(path.as_str());
        let Ok(meta) = full.symlink_metadata() else { continue };
        if meta.is_file() && meta.len() == size && mtime_ns(&meta) == synced.mtime_ns {
            found = Some(full);
            break;
        }
    }
    if found.is_none() {
        for candidate in [object_path(dir, root), dir.join(RESERVED_DIR).join("trash").join(root.to_hex())] {
            if candidate.symlink_metadata().is_ok_and(|m| m.is_file() && m.len() == size) {
                found = Some(candidate);
                break;
            }
        }
    }
    found
}

/// The outboard of the file at `path` (which should have `root`): from the cache in
/// `.feedmesh/outboards`, or computed and cached; `None` if the file does not have that root.
pub fn outboard_for(
    dir: &Path,
    path: &Path,
    root: &ContentHash,
    size: u64,
) -> anyhow::Result<Option<(PathBuf, Outboard)>> {
    let path = path.to_path_buf();
    // A small file's outboard is cheaper to compute than to keep (a few parent hashes).
    if size <= OUTBOARD_CACHE_FROM {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let outboard = Outboard::of(&bytes);
        return Ok((outboard.root == *root && bytes.len() as u64 == size).then_some((path, outboard)));
    }
    let cache = dir.join(RESERVED_DIR).join("outboards").join(root.to_hex());
    if let Ok(bytes) = std::fs::read(&cache) {
        if let Ok(outboard) = Outboard::from_bytes(*root, size, bytes) {
            return Ok(Some((path, outboard)));
        }
    }
    let file = std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let outboard =
        Outboard::of_reader(std::io::BufReader::new(file), size).map_err(|e| anyhow::anyhow!("{e}"))?;
    if outboard.root != *root {
        return Ok(None);
    }
    keep_outboard(dir, &outboard)?;
    Ok(Some((path, outboard)))
}

fn tmp_path(dir: &Path, root: &ContentHash) -> anyhow::Result<PathBuf> {
    let tmp = dir.join(RESERVED_DIR).join("tmp");
    std::fs::create_dir_all(&tmp)?;
    Ok(tmp.join(root.to_hex()))
}

/// Moves the file at `at` into the trash (by root): a peer's delete or replacement never
/// destroys content outright.
fn stash(dir: &Path, at: &FilePath, root: &ContentHash) -> anyhow::Result<()> {
    let trash = dir.join(RESERVED_DIR).join("trash");
    std::fs::create_dir_all(&trash)?;
    let from = safe_target(dir, at)?;
    match std::fs::rename(&from, trash.join(root.to_hex())) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("moving {at} to the trash")),
    }
}

/// Renames the whole file `tmp` to `at` (never a partial file under the final name).
fn place(dir: &Path, at: &FilePath, tmp: &Path) -> anyhow::Result<()> {
    let target = safe_target(dir, at)?;
    std::fs::rename(tmp, &target).with_context(|| format!("placing {at}"))
}

/// `dir/at`, with its parent directories created; refused when a component on the way is a
/// symlink or a file (a path must not lead out of the folder).
fn safe_target(dir: &Path, at: &FilePath) -> anyhow::Result<PathBuf> {
    let mut here = dir.to_path_buf();
    let components: Vec<&str> = at.components().collect();
    let Some((name, parents)) = components.split_last() else { bail!("an empty path") };
    for part in parents {
        here.push(part);
        match here.symlink_metadata() {
            Ok(meta) if meta.file_type().is_symlink() => {
                bail!("{at}: {} is a symlink; not followed", here.display())
            }
            Ok(meta) if !meta.is_dir() => bail!("{at}: {} is a file, not a directory", here.display()),
            Ok(_) => {}
            Err(_) => std::fs::create_dir(&here).with_context(|| format!("creating {}", here.display()))?,
        }
    }
    here.push(name);
    if here.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
        bail!("{at}: a symlink is in its place; not replaced");
    }
    Ok(here)
}

#[derive(Serialize, Deserialize)]
struct BaseRow {
    root: String,
    size: u64,
    mtime_ns: i64,
    executable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    copy_of: Option<String>,
}

fn base_file(dir: &Path) -> PathBuf {
    dir.join(RESERVED_DIR).join("base.json")
}

fn load_base(dir: &Path) -> anyhow::Result<BTreeMap<FilePath, Synced>> {
    let path = base_file(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let rows: BTreeMap<String, BaseRow> =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    let mut base = BTreeMap::new();
    for (path, row) in rows {
        let (Ok(path), Some(root)) = (FilePath::new(&path), ContentHash::from_hex(&row.root)) else {
            continue;
        };
        let copy_of = row.copy_of.and_then(|id| engine::feedsync::ItemId::new(&id).ok());
        base.insert(
            path,
            Synced { root, size: row.size, mtime_ns: row.mtime_ns, executable: row.executable, copy_of },
        );
    }
    Ok(base)
}

/// Makes everything written under `dir` so far durable (data and names): on Linux one `syncfs`
/// of its file system. Elsewhere fetched objects are synced when finished
/// ([`finish_partial`]) and this syncs the directory's own entries only.
fn durable(dir: &Path) -> anyhow::Result<()> {
    let handle = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    #[cfg(target_os = "linux")]
    rustix::fs::syncfs(&handle).with_context(|| format!("syncing the file system of {}", dir.display()))?;
    #[cfg(not(target_os = "linux"))]
    let _ = handle.sync_all();
    Ok(())
}

fn save_base(dir: &Path, base: &BTreeMap<FilePath, Synced>) -> anyhow::Result<()> {
    let rows: BTreeMap<&str, BaseRow> = base
        .iter()
        .map(|(p, s)| {
            (
                p.as_str(),
                BaseRow {
                    root: s.root.to_hex(),
                    size: s.size,
                    mtime_ns: s.mtime_ns,
                    executable: s.executable,
                    copy_of: s.copy_of.as_ref().map(|id| id.to_string()),
                },
            )
        })
        .collect();
    write_atomically(&base_file(dir), serde_json::to_string(&rows)?.as_bytes())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_need_reads_as_a_bar_with_where_from_or_why_not() {
        let mut need = FileNeed {
            path: "video.mp4".into(),
            size: 10 << 20,
            have_bytes: 4 << 20,
            sources: vec![("ab12cd34".into(), "lan".into(), 3 << 20)],
            waiting: None,
        };
        assert_eq!(
            need.line(),
            "[########............]  40% video.mp4 (4.0 of 10.0 MiB) from ab12cd34 (lan, 3.0 MiB/s)"
        );
        need.sources.clear();
        need.waiting = Some("the devices that have it are not reachable now".into());
        assert!(
            need.line().ends_with("waiting: the devices that have it are not reachable now"),
            "{}",
            need.line()
        );
    }
}
