//! FeedSync XML for RSS 2.0 and Atom 1.0: a streaming, bounded reader and a writer.

mod edit;
mod fragment;
mod read;
mod write;

pub use edit::{children, set_title, stamp_atom_entry};
pub use fragment::{check_content, forbidden as xml_forbids, ContentProblem};
pub use read::read_feed;
pub use write::write_feed;

/// The FeedSync namespace (prefix `sx`).
pub const FEEDSYNC_NS: &str = "http://feedsync.org/2007/feedsync";
/// The older Simple Sharing Extensions namespace, read as an alias of [`FEEDSYNC_NS`].
pub const SSE_NS: &str = "http://www.microsoft.com/schemas/rss/sse";
/// feedmesh's extension namespace for version signatures: `<fms:signature>` inside `sx:sync`,
/// the lowercase hex of the version's signature: 128 digits (the version's own ed25519 signature)
/// or a batch signature with the version's Merkle path (see `crate::signing`). Readers that do
/// not know it ignore it (FeedSync allows extension elements).
pub const SIGNATURE_NS: &str = "urn:feedmesh:signature:1";
/// The Atom 1.0 namespace.
pub const ATOM_NS: &str = "http://www.w3.org/2005/Atom";

/// Why a document is not an acceptable FeedSync feed. Every problem has a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.first().map(|p| p.to_string()).unwrap_or_default())]
pub struct ReadError {
    /// At least one; at most [`super::limits::PROBLEMS_MAX`].
    pub problems: Vec<Problem>,
}

/// One problem, at a 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct Problem {
    pub line: u32,
    pub kind: ProblemKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    #[error("malformed XML: {0}")]
    Malformed(String),
    #[error("item content: {0}")]
    Content(ContentProblem),
    #[error("not UTF-8")]
    NotUtf8,
    #[error("unsupported encoding {0:?} (only UTF-8)")]
    Encoding(String),
    #[error("document type declarations are not accepted")]
    DocType,
    #[error("document is {bytes} bytes (at most {max})", max = super::limits::FEED_BYTES_MAX)]
    TooLarge { bytes: u64 },
    #[error("over the limit of {0}")]
    Limit(&'static str),
    #[error("too many problems; stopped here")]
    TooManyProblems,
    #[error("not an RSS 2.0 or Atom feed: {0}")]
    NotAFeed(String),
    #[error("{0}")]
    Structure(String),
    #[error("sx:sync without id")]
    MissingId,
    #[error("duplicate sync id {0:?}")]
    DuplicateId(String),
    #[error("{element} without {attr}")]
    MissingAttr { element: &'static str, attr: &'static str },
    #[error("updates {0:?} is not an integer >= 1")]
    Updates(String),
    #[error("sequence {0:?} is not an integer >= 1")]
    Sequence(String),
    #[error("{attr} {text:?} is not a boolean")]
    Bool { attr: &'static str, text: String },
    #[error("when {0:?} is not an RFC 3339 date-time")]
    When(String),
    #[error("sx:history with neither when nor by")]
    HistoryAnonymous,
    #[error("sx:sync without sx:history")]
    MissingHistory,
    #[error("nested sx:conflicts")]
    NestedConflicts,
    #[error("a conflict of item {0:?} has another sync id")]
    ConflictId(String),
    #[error("sx:sharing with only one of since and until")]
    SharingWindow,
    #[error("sx:related link {0:?} is not an absolute URI")]
    RelatedLink(String),
    #[error("sx:related type {0:?} is neither complete nor aggregated")]
    RelatedType(String),
    #[error("{0}")]
    Model(String),
    #[error("fms:signature {0:?} is not a signature in lowercase hex (128 digits, or a batch form)")]
    Signature(String),
}
