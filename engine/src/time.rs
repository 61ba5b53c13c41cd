//! Time as the engine takes it from its caller, in microseconds (`Micros`): a session's timers
//! need only a clock that does not go back (the binaries give monotonic time); ticket windows
//! are Unix time, since the cloud and the devices must agree on them. FeedSync history instants
//! are `feedsync::When`. A module of its own so that `ticket`, `cloud` and `sync` share the type
//! without importing each other.

/// Microseconds on the caller's clock.
pub type Micros = u64;
