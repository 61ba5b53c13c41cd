//! The ids every layer names (users and folders), in a module of their own so that the
//! directory, tickets, the wire and refusals share them without importing each other.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::signing::{hex, DeviceId};

/// A user: the key of the user's first device, which created the identity.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserId(pub [u8; 32]);

/// A folder (a shared mesh object): the first 16 bytes of the id of the change that created it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FolderId(pub [u8; 16]);

macro_rules! short_debug {
    ($t:ty, $p:literal) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($p, ":{}"), hex(&self.0[..6]))
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}
pub(crate) use short_debug;

short_debug!(UserId, "user");
short_debug!(FolderId, "folder");

impl FolderId {
    /// What version signatures of this folder's feed are bound to.
    pub fn scope(&self) -> crate::signing::FeedScope {
        crate::signing::FeedScope(self.0)
    }
}

impl UserId {
    /// The user a first device creates.
    pub fn of_first_device(device: DeviceId) -> Self {
        Self(device.0)
    }
}
