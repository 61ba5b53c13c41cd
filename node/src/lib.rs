//! The `feedmesh` device: the engine driven over iroh, with redb storage, a daemon, a local HTTP
//! API and the command line. The binary (`src/main.rs`) only parses arguments.

pub mod api;
pub mod cmd;
pub mod folders;
pub mod net;
pub mod state;
pub mod watch;

use std::path::{Path, PathBuf};

/// The data directory: `--dir`, else `$FEEDMESH_DIR`, else `~/.feedmesh`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("FEEDMESH_DIR").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".feedmesh")))
        .unwrap_or_else(|| PathBuf::from(".feedmesh"))
}

/// Whether an error says the database is held by another process (a running daemon).
pub fn is_locked(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<transport::store::StoreError>(), Some(transport::store::StoreError::Locked))
    })
}

/// The lock file that keeps a second daemon off a data directory.
pub const DAEMON_LOCK: &str = "daemon.lock";

/// Takes the data directory's daemon lock without waiting (held until the file is dropped or the
/// process ends, however it ends); a clear error when another daemon holds it.
pub fn lock_daemon(dir: &Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    if !dir.join(state::KEY_FILE).exists() {
        anyhow::bail!("{} is not initialised (run `feedmesh init`)", dir.display());
    }
    let path = dir.join(DAEMON_LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(dir.join(state::API_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<api::ApiFile>(&t).ok())
                .map(|f| format!(" (pid {})", f.pid))
                .unwrap_or_default();
            anyhow::bail!(
                "another feedmesh daemon is running on {}{pid}; stop it first, or use the CLI, which talks to it",
                dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}
