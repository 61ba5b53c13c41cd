//! FeedSync 1.0 as profiled in `docs/feedsync-profile.md`: the model, local operations, merge,
//! the canonical encoding and RSS 2.0 / Atom XML. Pure and deterministic: callers pass the time
//! and the endpoint id.

pub mod canonical;
pub mod limits;
pub mod merge;
pub mod model;
pub mod ops;
pub mod xml;

pub use canonical::{encode_version, encode_version_into};
pub use merge::{beats, compare, merge_feed, merge_item, merge_one, MergeOutcome, MergeStats};
pub use model::{
    Content, Dialect, Endpoint, Envelope, Feed, HistoryEntry, Item, ItemId, NsScope, PlainItem, Related,
    RelatedKind, Sharing, Version, When,
};
pub use ops::{sparse_purge, Edit};
pub use xml::{read_feed, write_feed, Problem, ProblemKind, ReadError};

/// Errors of the FeedSync model and its operations. Merging two valid feeds never produces one
/// (except [`FeedsyncError::DialectMismatch`], checked before anything changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedsyncError {
    #[error("sync id is empty")]
    IdEmpty,
    #[error("sync id is {len} bytes long (at most {max})", max = limits::ID_BYTES_MAX)]
    IdTooLong { len: usize },
    #[error("sync id {id:?} has a character outside RFC 2141 NSS at byte {at}")]
    IdCharacter { id: String, at: usize },
    #[error("history `by` is empty")]
    ByEmpty,
    #[error("history `by` is {len} bytes long (at most {max})", max = limits::BY_BYTES_MAX)]
    ByTooLong { len: usize },
    #[error("`when` {text:?} is not an RFC 3339 date-time between years 0000 and 9999")]
    WhenNotRfc3339 { text: String },
    #[error("time {unix_secs} (unix seconds) is outside years 0000..9999")]
    WhenOutOfRange { unix_secs: i64 },
    #[error("item {id}: no history entry")]
    HistoryEmpty { id: ItemId },
    #[error("item {id}: more than {max} history entries", max = limits::HISTORY_PER_VERSION_MAX)]
    HistoryTooLong { id: ItemId },
    #[error("item {id}: updates must be >= 1")]
    UpdatesZero { id: ItemId },
    #[error("item {id}: updates would overflow")]
    UpdatesOverflow { id: ItemId },
    #[error("item {id}: history sequence must be >= 1")]
    SequenceZero { id: ItemId },
    #[error("item {id}: a history entry has neither `when` nor `by`")]
    HistoryAnonymous { id: ItemId },
    #[error("item {id}: more than {max} conflicts", max = limits::CONFLICTS_PER_ITEM_MAX)]
    TooManyConflicts { id: ItemId },
    #[error("item {id}: {bytes} bytes encoded, over the limit of {max} bytes (one item must fit in one sync message)", max = limits::ITEM_ENCODED_MAX)]
    TooLarge { id: ItemId, bytes: usize },
    #[error("item {id}: a conflict has another sync id")]
    ConflictIdMismatch { id: ItemId },
    #[error("item {id}: content refused: {problem}")]
    Content { id: ItemId, problem: xml::ContentProblem },
    #[error("item {id}: a conflict equals the winning version")]
    ConflictEqualsWinner { id: ItemId },
    #[error("item {id}: a conflict beats the winning version")]
    ConflictBeatsWinner { id: ItemId },
    #[error("item {id}: a version is subsumed by another version of the item that is not its twin")]
    ConflictSubsumed { id: ItemId },
    #[error("item {id}: conflicts are not in best-first order")]
    ConflictsUnordered { id: ItemId },
    #[error("more than {max} items in one feed", max = limits::ITEMS_PER_FEED_MAX)]
    TooManyItems,
    #[error("cannot merge a {incoming} feed into a {local} feed")]
    DialectMismatch { local: Dialect, incoming: Dialect },
    /// A signed replica refused a version (see [`crate::signing`]).
    #[error(transparent)]
    Signature(#[from] crate::signing::SignatureError),
}
