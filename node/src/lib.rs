//! The `feedmesh` device: the engine driven over iroh, with redb storage, a daemon, a local HTTP
//! API and the command line. The binary (`src/main.rs`) only parses arguments.

pub mod api;
pub mod cmd;
pub mod net;
pub mod state;

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
