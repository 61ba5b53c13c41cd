//! The bodies of feedmesh's fuzz targets, as plain functions of the input bytes, so that the
//! libFuzzer binaries in `fuzz/` and the default test suite (`tests/replay.rs`, which replays every
//! committed corpus and crash regression under a memory budget) run exactly the same code.
//!
//! A target returns normally for every input: refusing bad input is the expected outcome. It
//! panics only on a broken property (an accepted value that does not round-trip, a replica or
//! directory invariant, a session that never ends, ...); libFuzzer reports that as a crash, and
//! so does the replay test. Loops and memory blow-ups are failures too: libFuzzer runs with
//! `-timeout` and `-rss_limit_mb`/`-malloc_limit_mb`, the replay test with [`Budget`]s.
//!
//! | target | what it feeds | module |
//! | --- | --- | --- |
//! | `wire_message` | `wire::decode`, `from_wire` of every item, ticket and change checks | [`engine_targets`] |
//! | `wire_item` | two `WireItem`s: `from_wire`, merge laws, replica merges | [`engine_targets`] |
//! | `directory` | `Directory::apply` of raw or fixture-signed changes | [`engine_targets`] |
//! | `ticket` | `Ticket::verify*` of raw or cloud-signed tickets, against a model | [`engine_targets`] |
//! | `read_feed` | the FeedSync XML reader and writer | [`engine_targets`] |
//! | `session_responder`, `session_initiator` | a `sync::Session` fed attacker messages and timers | [`session_targets`] |
//! | `auth_responder`, `auth_initiator` | an `authz::AuthSession` likewise | [`session_targets`] |
//! | `cloud_control` | `engine::cloud::Cloud` fed sequences of control requests | [`cloud_targets`] |
//! | `roles` | an `engine::device::Device` and an `engine::cloud::Cloud` wired together, fed attacker bytes, commands and timers | [`role_targets`] |
//! | `control` | `engine::control`'s `Open`, `Request`, `Response`, `Notice` | [`transport_targets`] |
//! | `frame` | `transport::frame::Reader` over a chunked stream with cancelled reads, against a model | [`transport_targets`] |
//! | `relay_http` | the relay's HTTP router: JSON bodies, queries, paths, the FeedSync POST | [`relay_targets`] |
//! | `relay_control` | the relay's answer to control requests (`Cloud::handle_request`) | [`relay_targets`] |

pub mod cloud_targets;
pub mod engine_targets;
pub mod fixture;
#[cfg(feature = "relay")]
pub mod relay_targets;
pub mod role_targets;
pub mod session_targets;
pub mod transport_targets;

/// What one input may cost, checked by the replay test's counting allocator: the most bytes live
/// at once during the input (above what was live before it), and all bytes allocated during it,
/// each at most `per_byte * input length + base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub peak_per_byte: u64,
    pub peak_base: u64,
    pub total_per_byte: u64,
    pub total_base: u64,
}

impl Budget {
    /// The bound on peak live bytes for an input of `len` bytes.
    pub fn peak_max(&self, len: usize) -> u64 {
        self.peak_per_byte.saturating_mul(len as u64).saturating_add(self.peak_base)
    }

    /// The bound on bytes allocated in all for an input of `len` bytes.
    pub fn total_max(&self, len: usize) -> u64 {
        self.total_per_byte.saturating_mul(len as u64).saturating_add(self.total_base)
    }
}

const MIB: u64 = 1 << 20;

/// One fuzz target: its name (the folder of its corpus and the `fuzz/fuzz_targets` file), its
/// body, what it must set up before the first measured input, and its budget.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// One-time setup (fixtures, a relay in a temporary folder) that is not charged to an input.
    pub prepare: fn(),
    pub budget: Budget,
}

fn nothing() {}

/// Every target. The budgets, and why each is what it is:
///
/// - decoders (`wire_message`, `wire_item`, `ticket`, `control`): postcard allocates at most what
///   the input describes, and a decoded value is re-encoded and decoded again a few times, so
///   64x the input live and 512x allocated, plus 1 MiB for fixtures' clones and formatting.
/// - `directory`: a batch is applied to clones of the fixture directory (about 20 changes) and
///   the whole log is rebuilt from scratch to check that the state is a function of the set of
///   changes, so a fixed 4 MiB live / 64 MiB allocated over the same per-byte allowances.
/// - `read_feed`: the reader keeps raw spans and the writer re-serialises twice: 64x / 1024x.
/// - sessions: a message is at most `Config::max_message_bytes` (1 MiB), and one short message
///   may legitimately ask for a full-size answer (`More { upto }` makes an initiator encode up to
///   65,520 coded symbols), so live memory is bounded by a few messages in flight (16 MiB) and
///   allocation by one full answer per step: 64 KiB allocated per input byte (a step is at least
///   one byte) plus 64 MiB.
/// - `frame`: the reader reserves at most `FRAME_PREALLOC` (64 KiB) for a frame and grows it with
///   what arrives (at most doubling), and the model keeps a copy: 8x the input live and 32x
///   allocated, plus 1 MiB. A 4-byte header announcing 8 MiB must not cost 8 MiB
///   (`regressions/frame/claims-control-max`).
/// - relay: one HTTP request through axum, JSON, the cloud's replica and its redb store: 32 MiB
///   live and 256 MiB allocated beside 512x per byte (a POSTed feed is read, merged and stored).
pub const TARGETS: &[Target] = &[
    Target {
        name: "wire_message",
        run: engine_targets::wire_message,
        prepare: fixture::prepare,
        budget: Budget { peak_per_byte: 64, peak_base: MIB, total_per_byte: 512, total_base: 4 * MIB },
    },
    Target {
        name: "wire_item",
        run: engine_targets::wire_item,
        prepare: fixture::prepare,
        budget: Budget { peak_per_byte: 64, peak_base: MIB, total_per_byte: 512, total_base: 4 * MIB },
    },
    Target {
        name: "directory",
        run: engine_targets::directory,
        prepare: fixture::prepare,
        budget: Budget { peak_per_byte: 64, peak_base: 4 * MIB, total_per_byte: 512, total_base: 64 * MIB },
    },
    Target {
        name: "ticket",
        run: engine_targets::ticket,
        prepare: fixture::prepare,
        budget: Budget { peak_per_byte: 64, peak_base: MIB, total_per_byte: 512, total_base: 4 * MIB },
    },
    Target {
        name: "folder_entry",
        run: engine_targets::folder_entry,
        prepare: nothing,
        budget: Budget { peak_per_byte: 64, peak_base: MIB, total_per_byte: 512, total_base: 4 * MIB },
    },
    Target {
        name: "blob_response",
        run: engine_targets::blob_response,
        prepare: nothing,
        budget: Budget { peak_per_byte: 64, peak_base: MIB, total_per_byte: 512, total_base: 4 * MIB },
    },
    Target {
        name: "read_feed",
        run: engine_targets::read_feed,
        prepare: nothing,
        budget: Budget { peak_per_byte: 64, peak_base: MIB, total_per_byte: 1024, total_base: 4 * MIB },
    },
    Target {
        name: "session_responder",
        run: session_targets::session_responder,
        prepare: fixture::prepare,
        budget: Budget {
            peak_per_byte: 64,
            peak_base: 16 * MIB,
            total_per_byte: 64 << 10,
            total_base: 64 * MIB,
        },
    },
    Target {
        name: "session_initiator",
        run: session_targets::session_initiator,
        prepare: fixture::prepare,
        budget: Budget {
            peak_per_byte: 64,
            peak_base: 16 * MIB,
            total_per_byte: 64 << 10,
            total_base: 64 * MIB,
        },
    },
    Target {
        name: "auth_responder",
        run: session_targets::auth_responder,
        prepare: fixture::prepare,
        budget: Budget {
            peak_per_byte: 64,
            peak_base: 16 * MIB,
            total_per_byte: 64 << 10,
            total_base: 64 * MIB,
        },
    },
    Target {
        name: "auth_initiator",
        run: session_targets::auth_initiator,
        prepare: fixture::prepare,
        budget: Budget {
            peak_per_byte: 64,
            peak_base: 16 * MIB,
            total_per_byte: 64 << 10,
            total_base: 64 * MIB,
        },
    },
    Target {
        name: "cloud_control",
        run: cloud_targets::cloud_control,
        prepare: fixture::prepare,
        budget: Budget { peak_per_byte: 64, peak_base: 4 * MIB, total_per_byte: 512, total_base: 64 * MIB },
    },
    Target {
        name: "roles",
        run: role_targets::roles,
        prepare: fixture::prepare,
        budget: Budget {
            peak_per_byte: 64,
            peak_base: 16 * MIB,
            total_per_byte: 64 << 10,
            total_base: 64 * MIB,
        },
    },
    Target {
        name: "control",
        run: transport_targets::control,
        prepare: nothing,
        budget: Budget { peak_per_byte: 64, peak_base: MIB, total_per_byte: 512, total_base: 4 * MIB },
    },
    Target {
        name: "frame",
        run: transport_targets::frame,
        prepare: nothing,
        budget: Budget { peak_per_byte: 8, peak_base: MIB, total_per_byte: 32, total_base: MIB },
    },
    #[cfg(feature = "relay")]
    Target {
        name: "relay_http",
        run: relay_targets::relay_http,
        prepare: relay_targets::prepare,
        budget: Budget { peak_per_byte: 64, peak_base: 32 * MIB, total_per_byte: 512, total_base: 256 * MIB },
    },
    #[cfg(feature = "relay")]
    Target {
        name: "relay_control",
        run: relay_targets::relay_control,
        prepare: relay_targets::prepare,
        budget: Budget { peak_per_byte: 64, peak_base: 32 * MIB, total_per_byte: 512, total_base: 256 * MIB },
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// One step of a session target's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Bytes from the peer (one transport frame).
    Message(&'a [u8]),
    /// The clock moves on by this many microseconds and the session's timer is polled.
    Timeout(u64),
}

/// Most steps one input makes (a bound on the work of one input beside its size).
pub const STEPS_MAX: usize = 256;

/// Splits a session target's input into [`Step`]s. Each step starts with a tag byte: below 0x80
/// a message follows, its length a little-endian `u16` (cut short at the end of the input); from
/// 0x80 the clock moves `(tag - 0x80)^2 * 10 ms` (0 to 161 s, so both the retransmission timer
/// and the linger deadline are reachable) and the timer fires.
#[derive(Clone, Debug)]
pub struct Steps<'a> {
    rest: &'a [u8],
    taken: usize,
}

impl<'a> Steps<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Self { rest: input, taken: 0 }
    }
}

impl<'a> Iterator for Steps<'a> {
    type Item = Step<'a>;

    fn next(&mut self) -> Option<Step<'a>> {
        if self.taken >= STEPS_MAX {
            return None;
        }
        let (&tag, rest) = self.rest.split_first()?;
        self.taken += 1;
        if tag >= 0x80 {
            self.rest = rest;
            let k = u64::from(tag - 0x80);
            return Some(Step::Timeout(k * k * 10_000));
        }
        let (len, rest) = match rest {
            [lo, hi, rest @ ..] => (usize::from(u16::from_le_bytes([*lo, *hi])), rest),
            _ => (rest.len(), &rest[rest.len()..]),
        };
        let (message, rest) = rest.split_at(len.min(rest.len()));
        self.rest = rest;
        Some(Step::Message(message))
    }
}

/// Appends a message step (for seeds). Messages longer than `u16::MAX` do not fit a step.
pub fn push_message(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    let Ok(len) = u16::try_from(bytes.len()) else { return false };
    out.push(0);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    true
}

/// Appends a timer step of `(k)^2 * 10 ms`, `k < 128`.
pub fn push_timeout(out: &mut Vec<u8>, k: u8) {
    out.push(0x80 | (k & 0x7f));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_split_messages_and_timers() {
        let mut input = vec![3];
        assert!(push_message(&mut input, b"hello"));
        push_timeout(&mut input, 10);
        assert!(push_message(&mut input, b""));
        input.extend_from_slice(&[0, 9, 0, b'x']);
        let steps: Vec<Step<'_>> = Steps::new(&input[1..]).collect();
        assert_eq!(
            steps,
            vec![Step::Message(b"hello"), Step::Timeout(1_000_000), Step::Message(b""), Step::Message(b"x")]
        );
    }

    #[test]
    fn steps_are_bounded() {
        let input = vec![0x81u8; 10_000];
        assert_eq!(Steps::new(&input).count(), STEPS_MAX);
    }

    #[test]
    fn every_target_is_named_once() {
        let mut names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TARGETS.len());
        assert!(target("session_responder").is_some());
    }
}
