//! feedmesh's deterministic network simulator: the engine's `Device` and `Cloud` state machines
//! (the very types the binaries run) over a modelled network with latency, loss, duplication, reordering,
//! partitions, NATs, crashes and clock skew. Time and randomness come from the scenario's seed.

pub mod checker;
pub mod clock_skew;
pub mod content;
pub mod gossip;
pub mod mesh;
pub mod net;
pub mod plot;
pub mod queue;
pub mod scenario;
pub mod shrink;
pub mod sim;
pub mod stream;
pub mod swarm;
pub mod sweep;
pub mod topology;

pub use scenario::Scenario;
pub use sim::{run, FaultCounts, Report};
