//! Who may try an account's password, and when: HTTP logins (`POST /v1/login`) and pairing
//! requests (over QUIC) both go through [`crate::Cloud::verify_password`], which asks
//! [`Logins`] first.
//!
//! The property: wrong passwords from other clients never lock an account's owner out.
//!
//! - **Budgets per (account, client).** Every attempt spends a token of the bucket of its
//!   (account, client) pair and one of its client's bucket over all accounts, each
//!   `logins_per_minute` a minute (bursts as large). A client is an HTTP address (behind trusted
//!   proxies, the forwarded one) or a device asking to pair. No bucket is shared by every
//!   client of an account, so another address's guesses never spend the owner's budget. (Clients
//!   behind one address, a NAT, are one client.)
//! - **Pairing apart.** Device keys cost nothing to make, so per-device buckets would not slow
//!   guessing: pairing requests of one account also share one bucket. A flood of them can delay
//!   that account's pairings, never its HTTP logins, and HTTP guesses never delay pairings.
//! - **Argon2 lanes.** Hashing is bounded for everyone: strangers share the cloud's hashing
//!   permits with at most [`WAITING_MAX`] attempts waiting (more are refused as busy, 503 with
//!   `Retry-After`); a *proven* client has a lane of its own ([`PROVEN_PERMITS`]), so a flood
//!   from many addresses, which fills the strangers' queue, does not delay it. A client is proven
//!   for an account once it logged into it (the last [`PROVEN_MAX`] such pairs are kept) or when
//!   it presents a live token of the account with its login.
//!
//! What this gives up: a guesser with A addresses tries A × `logins_per_minute` passwords a
//! minute at one account instead of `logins_per_minute`, still bounded overall by the argon2
//! permits; strong passwords (argon2id, 8 bytes at least) are the defence there. A per-account
//! budget would bound it, and would hand every such guesser the owner's access.
//!
//! Tests: `relay/tests/http_limits.rs` (`login_attempts_are_limited_per_account_and_per_address`,
//! `others_guessing_an_account_do_not_lock_its_owner_out`,
//! `a_proven_client_has_its_own_argon2_lane`,
//! `pairing_requests_share_a_budget_apart_from_http_logins`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use engine::signing::DeviceId;
use engine::sync::Micros;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::cloud::LoginError;
use crate::limit::Buckets;

/// Hashes a proven client may have running beside the strangers' ones.
pub const PROVEN_PERMITS: usize = 1;
/// Strangers' attempts waiting for a hashing permit at once; more are refused as busy.
pub const WAITING_MAX: usize = 256;
/// (account, client) pairs remembered as proven; a new one beyond drops the least recent.
pub const PROVEN_MAX: usize = 1 << 14;
/// Login buckets tracked at once (see [`Buckets`] for what happens beyond).
pub const BUCKETS_MAX: usize = 1 << 16;
/// `Retry-After` for an attempt refused as busy, in seconds.
pub const BUSY_RETRY_S: u64 = 5;

/// Who tries a password.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Client {
    /// An HTTP client address.
    Address(IpAddr),
    /// A device asking to pair (over its authenticated QUIC connection).
    Device(DeviceId),
}

/// A login bucket.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    /// One client at one account.
    Attempt(String, Client),
    /// One client over all accounts.
    Client(Client),
    /// Every pairing request of one account.
    Pairing(String),
}

/// Which argon2 lane an admitted attempt waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Stranger,
    Proven,
}

/// The login limits of one cloud.
#[derive(Debug)]
pub struct Logins {
    buckets: Mutex<Buckets<Key>>,
    /// Proven (account, client) pairs and when they were last proven.
    proven: Mutex<BTreeMap<(String, Client), Micros>>,
    /// The proven clients' own hashing lane.
    lane: Semaphore,
    /// Strangers waiting for a hashing permit.
    waiting: AtomicUsize,
}

impl Logins {
    pub fn new(logins_per_minute: u32) -> Self {
        let per_min = f64::from(logins_per_minute);
        Self {
            buckets: Mutex::new(Buckets::new(per_min / 60.0, per_min, BUCKETS_MAX)),
            proven: Mutex::new(BTreeMap::new()),
            lane: Semaphore::new(PROVEN_PERMITS),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Spends the attempt's budgets at `now_us`; which lane it then waits for. Refused: the
    /// seconds until the emptiest budget has a token again.
    pub fn admit(&self, account: &str, client: &Client, now_us: Micros) -> Result<Lane, LoginError> {
        let mut keys = vec![Key::Attempt(account.to_string(), *client), Key::Client(*client)];
        if matches!(client, Client::Device(_)) {
            keys.push(Key::Pairing(account.to_string()));
        }
        {
            let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            for key in &keys {
                buckets.take(key, now_us).map_err(LoginError::RateLimited)?;
            }
        }
        let proven = self.proven.lock().unwrap_or_else(|e| e.into_inner());
        Ok(if proven.contains_key(&(account.to_string(), *client)) { Lane::Proven } else { Lane::Stranger })
    }

    /// Waits for a hashing permit of `lane`: the proven lane, or one of `strangers` (the cloud's
    /// hashing permits) when fewer than [`WAITING_MAX`] strangers wait already.
    pub async fn permit<'a>(
        &'a self,
        lane: Lane,
        strangers: &'a Semaphore,
    ) -> Result<SemaphorePermit<'a>, LoginError> {
        let semaphore = match lane {
            Lane::Proven => &self.lane,
            Lane::Stranger => strangers,
        };
        let _waiting = match lane {
            Lane::Proven => None,
            Lane::Stranger => Some(Waiting::enter(&self.waiting).ok_or(LoginError::Busy(BUSY_RETRY_S))?),
        };
        semaphore.acquire().await.map_err(|_| LoginError::Busy(BUSY_RETRY_S))
    }

    /// `client` proved it may use `account` (a right password, or a live token) at `now_us`.
    pub fn proven(&self, account: &str, client: &Client, now_us: Micros) {
        let mut proven = self.proven.lock().unwrap_or_else(|e| e.into_inner());
        let key = (account.to_string(), *client);
        if !proven.contains_key(&key) && proven.len() >= PROVEN_MAX {
            // Rare (a success by a pair not yet known, with the map full): one scan.
            if let Some(least) = proven.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone()) {
                proven.remove(&least);
            }
        }
        proven.insert(key, now_us);
    }
}

/// One stranger waiting for a hashing permit (counted down however the wait ends).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < WAITING_MAX).then_some(n + 1))
            .ok()?;
        Some(Self(count))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Client {
        Client::Address(IpAddr::from([192, 0, 2, last]))
    }

    #[test]
    fn another_clients_guesses_spend_none_of_the_owners_budget() {
        let logins = Logins::new(2);
        for _ in 0..2 {
            assert_eq!(logins.admit("alice", &ip(1), 0).unwrap(), Lane::Stranger);
        }
        assert!(matches!(logins.admit("alice", &ip(1), 0), Err(LoginError::RateLimited(30))));
        // The owner, from elsewhere, still has its whole budget.
        assert!(logins.admit("alice", &ip(2), 0).is_ok());
        assert!(logins.admit("alice", &ip(2), 0).is_ok());
        // Proven after a success: its own lane from then on.
        logins.proven("alice", &ip(2), 0);
        assert_eq!(logins.admit("alice", &ip(2), 60_000_000).unwrap(), Lane::Proven);
        assert_eq!(logins.admit("bob", &ip(2), 60_000_000).unwrap(), Lane::Stranger, "per account");
    }

    #[test]
    fn pairing_requests_of_an_account_share_one_budget() {
        let logins = Logins::new(2);
        let device = |b: u8| Client::Device(DeviceId([b; 32]));
        assert!(logins.admit("alice", &device(1), 0).is_ok());
        assert!(logins.admit("alice", &device(2), 0).is_ok());
        assert!(matches!(logins.admit("alice", &device(3), 0), Err(LoginError::RateLimited(_))));
        assert!(logins.admit("alice", &ip(1), 0).is_ok(), "HTTP logins are not pairing requests");
    }

    #[test]
    fn waiting_strangers_are_bounded() {
        let count = AtomicUsize::new(0);
        let held: Vec<_> = (0..WAITING_MAX).map(|_| Waiting::enter(&count).unwrap()).collect();
        assert!(Waiting::enter(&count).is_none());
        drop(held);
        assert_eq!(count.load(Ordering::Acquire), 0);
    }

    #[test]
    fn proven_pairs_are_bounded() {
        let logins = Logins::new(2);
        for i in 0..PROVEN_MAX as u64 + 1 {
            logins.proven(&i.to_string(), &ip(1), i);
        }
        let proven = logins.proven.lock().unwrap();
        assert_eq!(proven.len(), PROVEN_MAX);
        assert!(!proven.contains_key(&("0".to_string(), ip(1))), "the least recent went");
    }
}
