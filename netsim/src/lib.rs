//! The deterministic discrete-event simulator that will drive engine state machines over a
//! virtual network. A placeholder until the simulator lands; it links the engine so the
//! workspace's dependency shape is real.

/// The engine version this simulator drives (the same crate the binaries use).
pub fn engine_crate() -> &'static str {
    std::any::type_name::<engine::feedsync::Feed>()
}
