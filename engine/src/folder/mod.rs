//! Live Folders: a folder of files as a FeedSync feed. Each file is an item ([`entry`]) named by a
//! checked path ([`path`]); the planner ([`plan`]) brings a directory and its feed together;
//! content is addressed by its BLAKE3 root and fetched in verified chunk
//! groups from whichever peers hold it, chosen by the sans-IO scheduler ([`fetch`]) that the node
//! and the simulator both run; content kept at the cloud is sealed with per-folder keys ([`keys`])
//! only member devices hold.

pub mod blob;
pub mod entry;
pub mod fetch;
pub mod keys;
pub mod live;
pub mod path;
pub mod plan;

pub use blob::{BlobError, Decoder, Groups, Outboard};
pub use entry::{conflict_copy, ContentHash, EntryError, FileEntry};
pub use fetch::{
    Command, Event, Failure, FetchConfig, FetchError, Fetcher, Policy, Progress, Request, RequestId, Route,
    Waiting,
};
pub use keys::{key_op, ring_of, ContentKey, KeyError, KeyRing, WrappedKey};
pub use live::{live_contents, LiveRoots};
pub use path::{FilePath, PathError, Platform};
pub use plan::{plan, Action, DiskFile, Plan, Refused, Synced};
