//! Tickets: short-lived statements by the cloud's ticket authority (ed25519) naming one device,
//! the channel key its connections are authenticated with, and its rights (folders, relay use).
//!
//! A ticket is necessary, never sufficient: the device that checks it also consults its own
//! verified directory ([`crate::directory::Directory::may_sync`]). Verification checks the
//! signature, the validity window with a clock-skew allowance of [`TICKET_SKEW_US`] on each
//! side, a lifetime of at most [`TICKET_LIFETIME_MAX_US`], and that the ticket is bound to the
//! channel key the peer actually authenticated with, so a ticket replayed by another device fails.
//! Time is the caller's (`now`, microseconds of its clock); the engine never reads a clock.

use serde::{Deserialize, Serialize};

use crate::ids::FolderId;
use crate::signing::{self, DeviceId, DeviceKey, Sig64, SignatureError};
use crate::time::Micros;

/// Domain of ticket signatures.
pub const TICKET_DOMAIN: &[u8] = b"feedmesh/ticket/v1\0";
/// Clock skew tolerated between the issuer and a verifier, each way: 2 minutes.
pub const TICKET_SKEW_US: Micros = 120_000_000;
/// Longest lifetime a verifier accepts: 1 hour.
pub const TICKET_LIFETIME_MAX_US: Micros = 3_600_000_000;
/// The lifetime the authority gives by default: 10 minutes (a removal stops a ticket within it).
pub const TICKET_LIFETIME_US: Micros = 600_000_000;
/// Most folders one ticket names.
pub const TICKET_FOLDERS_MAX: usize = 4096;

/// The key the transport authenticated a peer with (iroh: the node's ed25519 key).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct ChannelKey(pub [u8; 32]);

impl From<DeviceId> for ChannelKey {
    fn from(d: DeviceId) -> Self {
        Self(d.0)
    }
}

/// The cloud's ticket-signing public key, which devices are configured with.
pub type CloudId = DeviceId;

/// What a ticket allows.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Rights {
    /// Sorted, unique.
    pub folders: Vec<FolderId>,
    pub relay: bool,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TicketBody {
    pub device: DeviceId,
    pub channel: ChannelKey,
    pub rights: Rights,
    /// Validity window in the issuer's clock, microseconds.
    pub issued_us: Micros,
    pub expires_us: Micros,
    /// Distinguishes reissues (rights changed).
    pub serial: u64,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Ticket {
    pub body: TicketBody,
    pub signature: Sig64,
}

/// Why a ticket is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket signature: {0}")]
    Signature(SignatureError),
    #[error("ticket not valid before {issued_us} (now {now_us}, skew allowance {TICKET_SKEW_US})")]
    NotYetValid { issued_us: Micros, now_us: Micros },
    #[error("ticket expired at {expires_us} (now {now_us}, skew allowance {TICKET_SKEW_US})")]
    Expired { expires_us: Micros, now_us: Micros },
    #[error("ticket lifetime over {TICKET_LIFETIME_MAX_US} us or negative")]
    Lifetime,
    #[error("ticket is bound to another channel key (replayed by another device?)")]
    WrongChannel,
    #[error("ticket does not grant folder {0}")]
    FolderNotGranted(FolderId),
    #[error("ticket does not grant relay use")]
    RelayNotGranted,
    #[error("ticket names more than {TICKET_FOLDERS_MAX} folders or unsorted ones")]
    Malformed,
}

fn body_bytes(body: &TicketBody) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_allocvec(body).unwrap_or_default()
}

impl Ticket {
    /// Checks signature, bounds, lifetime, window (with skew) and channel binding.
    pub fn verify(
        &self,
        cloud: &CloudId,
        now_us: Micros,
        peer: &ChannelKey,
    ) -> Result<&TicketBody, TicketError> {
        let b = &self.body;
        if b.rights.folders.len() > TICKET_FOLDERS_MAX || b.rights.folders.windows(2).any(|w| w[0] >= w[1]) {
            return Err(TicketError::Malformed);
        }
        cloud.verify(TICKET_DOMAIN, &body_bytes(b), &self.signature).map_err(TicketError::Signature)?;
        if b.expires_us < b.issued_us || b.expires_us - b.issued_us > TICKET_LIFETIME_MAX_US {
            return Err(TicketError::Lifetime);
        }
        if now_us.saturating_add(TICKET_SKEW_US) < b.issued_us {
            return Err(TicketError::NotYetValid { issued_us: b.issued_us, now_us });
        }
        if now_us >= b.expires_us.saturating_add(TICKET_SKEW_US) {
            return Err(TicketError::Expired { expires_us: b.expires_us, now_us });
        }
        if b.channel != *peer {
            return Err(TicketError::WrongChannel);
        }
        Ok(b)
    }

    /// [`Ticket::verify`], and the ticket grants `folder`.
    pub fn verify_for_folder(
        &self,
        cloud: &CloudId,
        now_us: Micros,
        peer: &ChannelKey,
        folder: &FolderId,
    ) -> Result<&TicketBody, TicketError> {
        let b = self.verify(cloud, now_us, peer)?;
        if b.rights.folders.binary_search(folder).is_err() {
            return Err(TicketError::FolderNotGranted(*folder));
        }
        Ok(b)
    }

    /// [`Ticket::verify`], and the ticket grants relay use (for the relay's state machine).
    pub fn verify_for_relay(
        &self,
        cloud: &CloudId,
        now_us: Micros,
        peer: &ChannelKey,
    ) -> Result<&TicketBody, TicketError> {
        let b = self.verify(cloud, now_us, peer)?;
        if !b.rights.relay {
            return Err(TicketError::RelayNotGranted);
        }
        Ok(b)
    }
}

/// The cloud's ticket authority (sans-IO: the caller passes the key and the time).
#[derive(Debug)]
pub struct TicketAuthority {
    key: DeviceKey,
    serial: u64,
}

impl TicketAuthority {
    pub fn new(key: DeviceKey) -> Self {
        Self { key, serial: 0 }
    }

    pub fn id(&self) -> CloudId {
        DeviceId::of(&self.key)
    }

    /// Signs a ticket for `device` with `rights`, valid from `now_us` for `lifetime_us`.
    pub fn issue(
        &mut self,
        device: DeviceId,
        channel: ChannelKey,
        mut rights: Rights,
        now_us: Micros,
        lifetime_us: Micros,
    ) -> Ticket {
        rights.folders.sort_unstable();
        rights.folders.dedup();
        rights.folders.truncate(TICKET_FOLDERS_MAX);
        self.serial += 1;
        let body = TicketBody {
            device,
            channel,
            rights,
            issued_us: now_us,
            expires_us: now_us.saturating_add(lifetime_us),
            serial: self.serial,
        };
        let signature = signing::sign(&self.key, TICKET_DOMAIN, &body_bytes(&body));
        Ticket { body, signature }
    }
}
