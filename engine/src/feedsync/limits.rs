//! Every bound the FeedSync code enforces, in one place (documented in docs/feedsync-profile.md).

/// Largest feed document accepted by the reader, in bytes.
pub const FEED_BYTES_MAX: usize = 256 << 20;
/// Most synced items in one feed.
pub const ITEMS_PER_FEED_MAX: usize = 10_000_000;
/// Most history entries in one version (a local update past it applies a sparse purge first).
pub const HISTORY_PER_VERSION_MAX: usize = 4096;
/// Most conflicts kept per item (a merge keeps the best ones past it, deterministically).
pub const CONFLICTS_PER_ITEM_MAX: usize = 256;
/// Longest `sx:sync/@id`, in bytes.
pub const ID_BYTES_MAX: usize = 1024;
/// Longest `sx:history/@by`, in bytes.
pub const BY_BYTES_MAX: usize = 1024;
/// Longest `when` text, in bytes.
pub const WHEN_BYTES_MAX: usize = 64;
/// Earliest and latest `when` (0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z).
pub const WHEN_SECS_MIN: i64 = -62_167_219_200;
pub const WHEN_SECS_MAX: i64 = 253_402_300_799;
/// Largest encoded item (its winner and conflicts, as [`crate::feedsync::Item::encoded_bound`]
/// counts them), in bytes: one item always fits in one sync message of the default size (1 MiB,
/// with 64 KiB left for the message's other fields). Every path that makes an item holds to it: a
/// local write past it is refused, a merge keeps the best conflicts that fit, a received or read
/// item past it is refused.
pub const ITEM_ENCODED_MAX: usize = (1 << 20) - (64 << 10);
/// Largest raw XML of one item (with its conflicts), in bytes.
pub const ITEM_BYTES_MAX: usize = 4 << 20;
/// Most `sx:related` elements in `sx:sharing`.
pub const RELATED_MAX: usize = 256;
/// Most problems one read reports before it stops.
pub const PROBLEMS_MAX: usize = 100;
/// Deepest element nesting accepted anywhere in a document.
pub const DEPTH_MAX: usize = 256;
