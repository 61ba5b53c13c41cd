//! Why something was refused, in two forms: the full local error ([`Refusal`], with the ticket's or
//! directory's own error inside) and the typed code that travels ([`RefusalCode`], [`AbortCode`]):
//! fieldless or with fixed-size fields, so a peer's reason is bounded, cannot carry text to a
//! terminal, and is matched by type, never by comparing strings.

use serde::{Deserialize, Serialize};

use crate::directory::{Denied, DirError};
use crate::ids::FolderId;
use crate::signing::DeviceId;
use crate::ticket::TicketError;

/// Why an authorized session was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("peer ticket: {0}")]
    Ticket(TicketError),
    #[error("peer's directory changes: {0}")]
    Directory(DirError),
    #[error("directory catch-up did not fit in one message; sync again")]
    DirectoryBehind,
    #[error("folder {folder} is not in the directory")]
    UnknownFolder { folder: FolderId },
    #[error("device {device} is not an active device in the directory")]
    DeviceNotActive { device: DeviceId },
    #[error("folder is not mapped on device {device}")]
    NotMapped { device: DeviceId },
    #[error("the user of device {device} is not an active member of the folder")]
    NotMember { device: DeviceId },
    #[error("peer sent {0}")]
    Protocol(&'static str),
    /// The cloud holds as much of this device's data as it allows.
    #[error("storage limit of {limit_bytes} bytes reached")]
    StorageLimit { limit_bytes: u64 },
    /// The peer refused, for the reason it sent.
    #[error("peer refused: {0}")]
    Peer(RefusalCode),
}

impl From<Denied> for Refusal {
    fn from(d: Denied) -> Self {
        match d {
            Denied::UnknownFolder { folder } => Refusal::UnknownFolder { folder },
            Denied::DeviceNotActive { device } => Refusal::DeviceNotActive { device },
            Denied::NotMapped { device } => Refusal::NotMapped { device },
            Denied::NotMember { device } => Refusal::NotMember { device },
        }
    }
}

impl Refusal {
    /// The reason as it travels.
    pub fn code(&self) -> RefusalCode {
        match self {
            Refusal::Ticket(e) => RefusalCode::Ticket(TicketCode::of(e)),
            Refusal::Directory(e) => RefusalCode::Directory(DirCode::of(e)),
            Refusal::DirectoryBehind => RefusalCode::DirectoryBehind,
            Refusal::UnknownFolder { folder } => RefusalCode::UnknownFolder { folder: *folder },
            Refusal::DeviceNotActive { device } => RefusalCode::DeviceNotActive { device: *device },
            Refusal::NotMapped { device } => RefusalCode::NotMapped { device: *device },
            Refusal::NotMember { device } => RefusalCode::NotMember { device: *device },
            Refusal::Protocol(_) => RefusalCode::Protocol,
            Refusal::StorageLimit { limit_bytes } => RefusalCode::StorageLimit { limit_bytes: *limit_bytes },
            // A refusal is never forwarded; if it were, it would say what the first peer said.
            Refusal::Peer(code) => *code,
        }
    }
}

/// A refusal as it travels (`Body::Refused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RefusalCode {
    #[error("ticket: {0}")]
    Ticket(TicketCode),
    #[error("directory changes: {0}")]
    Directory(DirCode),
    #[error("directory catch-up did not fit in one message")]
    DirectoryBehind,
    #[error("folder {folder} is not in the directory")]
    UnknownFolder { folder: FolderId },
    #[error("device {device} is not an active device in the directory")]
    DeviceNotActive { device: DeviceId },
    #[error("folder is not mapped on device {device}")]
    NotMapped { device: DeviceId },
    #[error("the user of device {device} is not an active member of the folder")]
    NotMember { device: DeviceId },
    #[error("protocol violation")]
    Protocol,
    #[error("storage limit of {limit_bytes} bytes reached")]
    StorageLimit { limit_bytes: u64 },
}

/// What was wrong with a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum TicketCode {
    #[error("bad signature")]
    Signature,
    #[error("not yet valid")]
    NotYetValid,
    #[error("expired")]
    Expired,
    #[error("lifetime out of bounds")]
    Lifetime,
    #[error("bound to another channel key")]
    WrongChannel,
    #[error("does not grant the folder")]
    FolderNotGranted,
    #[error("does not grant relay use")]
    RelayNotGranted,
    #[error("malformed")]
    Malformed,
}

impl TicketCode {
    pub fn of(e: &TicketError) -> Self {
        match e {
            TicketError::Signature(_) => TicketCode::Signature,
            TicketError::NotYetValid { .. } => TicketCode::NotYetValid,
            TicketError::Expired { .. } => TicketCode::Expired,
            TicketError::Lifetime => TicketCode::Lifetime,
            TicketError::WrongChannel => TicketCode::WrongChannel,
            TicketError::FolderNotGranted(_) => TicketCode::FolderNotGranted,
            TicketError::RelayNotGranted => TicketCode::RelayNotGranted,
            TicketError::Malformed => TicketCode::Malformed,
        }
    }
}

/// Why directory changes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DirCode {
    #[error("a change is malformed")]
    Malformed,
    #[error("a change's signature does not verify")]
    Signature,
    #[error("a change's author is not entitled to it")]
    NotEntitled,
    #[error("an author signed two different changes with one number")]
    Equivocation,
    #[error("changes depend on changes not received")]
    MissingDependency,
    #[error("over a directory limit")]
    Limit,
    #[error("pairing refused")]
    Pairing,
}

impl DirCode {
    pub fn of(e: &DirError) -> Self {
        match e {
            DirError::Malformed { .. } => DirCode::Malformed,
            DirError::Signature { .. } => DirCode::Signature,
            DirError::NotEntitled { .. } => DirCode::NotEntitled,
            DirError::Equivocation { .. } => DirCode::Equivocation,
            DirError::MissingDependency { .. } => DirCode::MissingDependency,
            DirError::Limit(_) => DirCode::Limit,
            DirError::Pairing(_) => DirCode::Pairing,
        }
    }
}

/// Why a sync session was given up, as it travels (`Body::Abort`): the kind of the sender's
/// [`crate::sync::SyncError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AbortCode {
    #[error("the peer broke the protocol")]
    Protocol,
    #[error("a message did not decode or was over a limit")]
    Wire,
    #[error("the coded symbols cannot be a set difference")]
    Symbols,
    #[error("reconciliation needs too many coded symbols")]
    TooManySymbols,
    #[error("a version was refused (forged, altered, unsigned or unauthorized)")]
    Signature,
    #[error("the session was refused")]
    Refused,
    #[error("the peer did not answer")]
    Timeout,
}
