//! feedmesh's sans-IO core. No tokio, no clock, no OS randomness: time, randomness and keys come
//! from the caller, so the simulator and the real binaries run the very same code.
//!
//! - [`feedsync`]: the FeedSync model, local operations, merge, canonical encoding and XML.
//! - [`replica`]: one feed's items, change log (epoch + sequence) and digest.
//! - [`riblt`]: rateless IBLT over 64-bit fingerprints, for set reconciliation.
//! - [`sync`]: the sans-IO sync session (incremental by cursors, or full reconciliation).
//! - [`wire`]: the versioned, bounded wire codec (serde + postcard).
//! - [`signing`]: device keys, signed versions.
//! - [`directory`]: the signed, verified directory log (users, devices, folders, members).
//! - [`ticket`]: the cloud's short-lived tickets.
//! - [`authz`]: the authorized session (directory catch-up, ticket and directory checks, then sync).
//! - [`time`]: the caller's microseconds (`Micros`).
//! - [`refusal`]: why something was refused, locally and as typed codes on the wire.
//! - [`cloud`]: the cloud as a sans-IO state machine (directory, tickets, address book, pairing
//!   mailbox, notices, replicas and their sessions).
//! - [`device`]: the device as a sans-IO state machine (directory, replicas, sessions, ticket,
//!   control requests); the node and the simulator run it.
//! - [`sessions`]: the session table the device and the cloud share.
//! - [`control`]: the control plane between a device and the cloud (tickets, directory, addresses,
//!   pairing, notices), as typed, versioned, bounded messages.
//! - [`folder`]: Live Folders: file entries, checked paths, the content scheduler.
//! - [`loopback`]: two sessions wired back to back in memory (clean or faulty channel), the one
//!   pump tests, fuzz fixtures and benchmarks run session pairs with.

pub mod authz;
pub mod cloud;
pub mod control;
pub mod device;
pub mod directory;
pub mod feedsync;
pub mod folder;
pub mod ids;
pub mod loopback;
pub mod refusal;
pub mod replica;
pub mod riblt;
pub mod sessions;
pub mod signing;
pub mod sync;
pub mod ticket;
pub mod time;
pub mod wire;
