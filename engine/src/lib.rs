//! feedmesh's sans-IO core. No tokio, no clock, no OS randomness: time, randomness and keys come
//! from the caller, so the simulator and the real binaries run the very same code.
//!
//! - [`feedsync`]: the FeedSync model, local operations, merge, canonical encoding and XML.

pub mod feedsync;
