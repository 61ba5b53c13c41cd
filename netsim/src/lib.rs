//! feedmesh's deterministic network simulator: engine replicas and sync sessions (the very code
//! the binaries run) over a modelled network with latency, loss, duplication, reordering,
//! partitions, NATs, crashes and clock skew. Time and randomness come from the scenario's seed.

pub mod checker;
pub mod net;
pub mod scenario;
pub mod shrink;
pub mod sim;
pub mod sweep;

pub use scenario::Scenario;
pub use sim::{run, Report};
