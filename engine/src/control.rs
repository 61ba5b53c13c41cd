//! The control plane between a device and the cloud, as engine protocol: what a stream is for
//! ([`Open`]), a device's requests ([`Request`]), the cloud's answers ([`Response`], with a typed
//! [`ControlError`] when it refuses) and what the cloud pushes to a connected device ([`Notice`]).
//!
//! Every frame is `WIRE_VERSION` (the sync messages' version: the two change together) followed by
//! the postcard encoding, at most [`CONTROL_MAX`] bytes, and a decoded value is checked against
//! the bounds below ([`Bounded`]) before anyone acts on it. The cloud knows the asking device from
//! the authenticated channel; nothing in a request can claim another identity.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::directory::{FolderId, Pairing, SignedChange, UserId, CHANGES_PER_BATCH_MAX, DEPS_MAX};
use crate::refusal::{DirCode, RefusalCode};
use crate::signing::DeviceId;
use crate::ticket::{CloudId, Ticket};
use crate::wire::{WireError, WIRE_VERSION};

/// Largest control frame (a directory batch is the largest), in bytes.
pub const CONTROL_MAX: usize = 8 << 20;
/// Most direct addresses in one [`PeerAddr`].
pub const ADDRS_MAX: usize = 64;
/// Longest relay URL in a [`PeerAddr`], in bytes.
pub const RELAY_URL_MAX: usize = 512;
/// Most peers in one [`Response::Peers`].
pub const PEERS_MAX: usize = 4096;
/// Most pairings in one [`Response::Pairings`].
pub const PAIRINGS_MAX: usize = 256;
/// Longest account name or password in a request, in bytes.
pub const SECRET_MAX: usize = 1024;

/// Where a device can be reached: its id, its home relay and its direct addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    pub device: DeviceId,
    pub relay: Option<String>,
    pub direct: Vec<SocketAddr>,
}

/// What a stream is for (its first frame).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Open {
    /// An engine `AuthSession` follows (its `DirHello` names the folder).
    Sync,
    /// One control request; one response follows.
    Control(Request),
    /// Chunk groups `start..end` of the content `root` (`size` bytes) of a file of `folder`
    /// (Live Folders): the peer answers one [`ContentReply`], then, with `Ok`, the bao response
    /// for those groups (`engine::folder::blob`), and finishes the stream.
    Content { folder: FolderId, root: [u8; 32], size: u64, start: u64, end: u64 },
    /// Stores the content `root` (`size` bytes) of a file of a `cloud` folder at the cloud,
    /// sealed with the folder's key of `epoch`: the cloud answers one [`UploadReply`]; with
    /// `Need`, the device sends a frame per missing group (the group's index, 8 bytes little
    /// endian, then `ContentKey::seal_group` of its bao frame), finishes the stream, and the
    /// cloud answers a last [`UploadReply`] saying what it stored. Resumable: a new upload asks
    /// only for the groups still missing.
    Upload { folder: FolderId, root: [u8; 32], size: u64, epoch: u32 },
}

/// What the cloud says of an upload (and of the user's storage).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReply {
    pub state: UploadState,
    /// Bytes of sealed content the folder owner's user keeps at the cloud.
    pub used: u64,
    /// That user's quota, in bytes.
    pub quota: u64,
}

/// Where an upload stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadState {
    /// Send these groups (sorted, disjoint runs).
    Need(Vec<(u64, u64)>),
    /// The cloud holds the whole content.
    Have,
    /// The owner's user is past its quota: this content stays peer to peer.
    OverQuota,
    /// The folder keeps its content between devices only.
    P2p,
    /// This device may not read the folder, or the key epoch is unknown.
    NotAllowed,
    /// No live file of the folder has that content.
    NotInFolder,
    /// Larger than this version stores.
    TooLarge,
}

/// Most runs in an [`UploadState::Need`].
pub const UPLOAD_RUNS_MAX: usize = 4096;

/// A peer's answer to [`Open::Content`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContentReply {
    /// The response follows.
    Ok,
    /// This device does not hold that content (or not whole, or it changed on disk).
    NotHeld,
    /// The asking device may not sync this folder with this one.
    NotAllowed,
    /// No live file of the folder has that content: it is not served.
    NotInFolder,
    /// Too large for this version to serve.
    TooLarge,
    /// Too many requests from this device now: ask again later.
    Busy,
    /// The cloud's copy: the response follows with every frame sealed with the folder's
    /// content key of this epoch (`ContentKey::open_group`, then as with `Ok`).
    Sealed { epoch: u32 },
}

/// Requests a device makes of the cloud.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A fresh ticket for this device and this connection's key.
    Ticket,
    /// Push my directory changes the cloud lacks, pull those I lack (`heads` is mine).
    Directory { heads: Vec<(DeviceId, u32)>, changes: Vec<SignedChange> },
    /// My current addresses, for peers that want to reach me.
    Announce { addr: PeerAddr },
    /// Addresses of the other devices that map `folder` and may sync it with me.
    Peers { folder: FolderId },
    /// Creates (or re-keys) the cloud account `name` for this device's user.
    Account { name: String, password: String },
    /// A new device asks to join the user of account `account` (password-checked). It sends its
    /// commitment to a nonce first.
    PairRequest { account: String, password: String, commitment: [u8; 32] },
    /// The new device asks how its pairing stands.
    PairStatus { id: u64 },
    /// The new device reveals its nonce and signs its consent (after the existing nonce came).
    PairConsent { id: u64, pairing: Pairing },
    /// An active device lists its user's pending pairings.
    PairList,
    /// An active device answers a pairing request with its nonce.
    PairNonce { id: u64, nonce: [u8; 32] },
}

impl Request {
    /// The request kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Ticket => "ticket",
            Request::Directory { .. } => "directory",
            Request::Announce { .. } => "announce",
            Request::Peers { .. } => "peers",
            Request::Account { .. } => "account",
            Request::PairRequest { .. } => "pair-request",
            Request::PairStatus { .. } => "pair-status",
            Request::PairConsent { .. } => "pair-consent",
            Request::PairList => "pair-list",
            Request::PairNonce { .. } => "pair-nonce",
        }
    }
}

/// Answers to [`Request`]s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    /// The request was refused or failed, for a typed reason.
    Refused(ControlError),
    Ticket {
        ticket: Ticket,
        cloud: CloudId,
    },
    Directory {
        changes: Vec<SignedChange>,
    },
    Peers {
        peers: Vec<PeerAddr>,
    },
    PairId {
        id: u64,
    },
    PairStatus(PairView),
    Pairings(Vec<PairView>),
}

/// A pairing as the cloud's mailbox holds it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairView {
    pub id: u64,
    pub user: UserId,
    pub device: DeviceId,
    pub commitment: [u8; 32],
    /// The existing device that answered, and its nonce.
    pub existing: Option<(DeviceId, [u8; 32])>,
    /// The new device's revealed nonce and consent.
    pub pairing: Option<Pairing>,
}

/// What the cloud pushes to a connected device.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Notice {
    /// The cloud's replica of the folder changed.
    Folder(FolderId),
    /// The directory changed.
    Directory,
    /// A pairing for this device's user waits for an answer.
    Pairing,
}

/// Why the cloud refused a control request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ControlError {
    #[error("rate limit: slow down")]
    RateLimited,
    #[error("the cloud is busy; try again")]
    Busy,
    #[error("only an active device of a user may ask this")]
    NotActive,
    #[error("this device is already active in the directory")]
    AlreadyActive,
    #[error("too many pending pairings for this user")]
    TooManyPairings,
    #[error("no such pairing")]
    NoSuchPairing,
    #[error("pairing consent out of turn")]
    ConsentOutOfTurn,
    #[error("the nonce does not match the commitment")]
    CommitmentMismatch,
    #[error("directory changes refused: {0}")]
    Directory(DirCode),
    #[error("the folder may not be held by this device: {0}")]
    Folder(RefusalCode),
    #[error("a device announces only its own address")]
    NotOwnAddress,
    #[error("over a request limit (addresses, heads or text)")]
    Limit,
    #[error("account names are 1 to 64 characters of a-z, 0-9, '.', '_' and '-'")]
    AccountName,
    #[error("the account name is taken")]
    AccountTaken,
    #[error("this user already has an account under another name")]
    AccountOtherName,
    #[error("passwords are 8 to 1024 bytes")]
    WeakPassword,
    #[error("wrong account or password")]
    WrongPassword,
    #[error("this request needs the account's password checked first")]
    PasswordRequired,
    #[error("too many login attempts; try again later")]
    LoginsExhausted,
    #[error("devices answer no control requests")]
    NotCloud,
    #[error("the cloud could not store the change; try again")]
    Storage,
}

/// A value whose collections a peer chose: checked before anyone acts on it.
pub trait Bounded {
    /// `Err(what)` names the first bound the value is over.
    fn check_bounds(&self) -> Result<(), &'static str>;
}

impl Bounded for PeerAddr {
    fn check_bounds(&self) -> Result<(), &'static str> {
        if self.direct.len() > ADDRS_MAX {
            return Err("direct addresses");
        }
        if self.relay.as_ref().is_some_and(|r| r.len() > RELAY_URL_MAX) {
            return Err("relay URL");
        }
        Ok(())
    }
}

impl Bounded for Request {
    fn check_bounds(&self) -> Result<(), &'static str> {
        match self {
            Request::Directory { heads, changes } => {
                if heads.len() > DEPS_MAX {
                    return Err("directory heads");
                }
                if changes.len() > CHANGES_PER_BATCH_MAX {
                    return Err("directory changes");
                }
                Ok(())
            }
            Request::Announce { addr } => addr.check_bounds(),
            Request::Account { name, password } | Request::PairRequest { account: name, password, .. } => {
                if name.len() > SECRET_MAX || password.len() > SECRET_MAX {
                    return Err("account name or password");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl Bounded for ContentReply {
    fn check_bounds(&self) -> Result<(), &'static str> {
        Ok(())
    }
}

impl Bounded for UploadReply {
    fn check_bounds(&self) -> Result<(), &'static str> {
        match &self.state {
            UploadState::Need(runs) if runs.len() > UPLOAD_RUNS_MAX => Err("upload runs"),
            UploadState::Need(runs) if runs.iter().any(|(a, b)| a >= b) => Err("upload runs"),
            _ => Ok(()),
        }
    }
}

impl Bounded for Open {
    fn check_bounds(&self) -> Result<(), &'static str> {
        match self {
            Open::Sync => Ok(()),
            Open::Control(request) => request.check_bounds(),
            Open::Content { size, start, end, .. } => {
                let groups = size.div_ceil(crate::folder::fetch::GROUP_BYTES);
                if *size > crate::folder::entry::FILE_BYTES_MAX || start >= end || *end > groups {
                    return Err("content groups");
                }
                Ok(())
            }
            Open::Upload { size, .. } if *size > crate::folder::entry::FILE_BYTES_MAX => Err("upload size"),
            Open::Upload { .. } => Ok(()),
        }
    }
}

impl Bounded for Response {
    fn check_bounds(&self) -> Result<(), &'static str> {
        match self {
            Response::Directory { changes } if changes.len() > CHANGES_PER_BATCH_MAX => {
                Err("directory changes")
            }
            Response::Peers { peers } => {
                if peers.len() > PEERS_MAX {
                    return Err("peers");
                }
                peers.iter().try_for_each(Bounded::check_bounds)
            }
            Response::Pairings(p) if p.len() > PAIRINGS_MAX => Err("pairings"),
            _ => Ok(()),
        }
    }
}

impl Bounded for Notice {
    fn check_bounds(&self) -> Result<(), &'static str> {
        Ok(())
    }
}

/// Encodes a control value: the version byte, then postcard.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION];
    // Serialising plain data into a Vec cannot fail.
    out.extend(postcard::to_allocvec(value).unwrap_or_default());
    out
}

/// Decodes a control value of at most `max` bytes and checks its bounds.
pub fn decode<T: DeserializeOwned + Bounded>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge { len: bytes.len(), max });
    }
    let Some((&version, rest)) = bytes.split_first() else {
        return Err(WireError::Decode("empty control frame".into()));
    };
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let (value, tail): (T, &[u8]) =
        postcard::take_from_bytes(rest).map_err(|e| WireError::Decode(e.to_string()))?;
    if !tail.is_empty() {
        return Err(WireError::Trailing);
    }
    value.check_bounds().map_err(WireError::Bound)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_bounds_are_checked() {
        let addr = PeerAddr { device: DeviceId([1; 32]), relay: Some("https://r/".into()), direct: vec![] };
        let open = Open::Control(Request::Announce { addr: addr.clone() });
        assert_eq!(decode::<Open>(&encode(&open), CONTROL_MAX), Ok(open));
        let refused = Response::Refused(ControlError::Directory(DirCode::Signature));
        assert_eq!(decode::<Response>(&encode(&refused), CONTROL_MAX), Ok(refused));
        let many = PeerAddr { direct: vec!["127.0.0.1:1".parse().unwrap(); ADDRS_MAX + 1], ..addr };
        let over = Open::Control(Request::Announce { addr: many });
        assert_eq!(decode::<Open>(&encode(&over), CONTROL_MAX), Err(WireError::Bound("direct addresses")));
        let mut old = encode(&Open::Sync);
        old[0] = WIRE_VERSION - 1;
        assert_eq!(decode::<Open>(&old, CONTROL_MAX), Err(WireError::Version(WIRE_VERSION - 1)));
        assert!(matches!(decode::<Open>(&encode(&Open::Sync), 1), Err(WireError::TooLarge { .. })));
    }
}
