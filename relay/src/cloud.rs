//! The cloud services: the engine's cloud (`engine::cloud::Cloud`: ticket authority, verified
//! directory, address book, pairing mailbox, notices, a replica of every feed and the sync
//! sessions devices run against them), driven from one place ([`driver`]); and what stays here:
//! accounts and passwords, HTTP tokens, rate limits, the storage quota and change notifications.
//! One lock guards the state; nothing awaits while holding it.
//!
//! The cloud holds no device key: it cannot add a directory change or sign a version. It syncs
//! feeds with the devices that may hold them (engine rule `Directory::may_hold`), and devices
//! verify every version it passes on.

mod content;
mod driver;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use engine::cloud::CloudLimits;
use engine::control::ControlError;
use engine::directory::{Directory, FolderId, UserId};
use engine::feedsync::Item;
use engine::replica::Replica;
use engine::signing::{DeviceId, DeviceKey};
use engine::wire;
use iroh::endpoint::{Connection, RecvStream, SendStream};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Notify};
use transport::store::Store;
use transport::{frame, now_secs, now_us, Notice, Open, Request, Response};

use driver::HostClock;
pub use driver::{STREAM_QUEUE, SYNC_STREAMS_PER_DEVICE};

use crate::metrics::Metrics;

/// Per-device limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent connections of one device.
    pub connections_per_device: usize,
    /// Sustained frames per second one device may send (token bucket).
    pub messages_per_second: u32,
    /// Bucket size (burst).
    pub message_burst: u32,
    /// Bytes of feed data one device may add to the cloud's replicas.
    pub storage_bytes_per_device: u64,
    /// Bytes of sealed file content (Live Folders) each user's `cloud` folders may keep at the
    /// cloud; past it, new content of that user's folders goes peer to peer only. 5 GB by
    /// default, as Live Mesh gave.
    pub content_quota_bytes_per_user: u64,
    /// Pending pairings per user.
    pub pairings_per_user: usize,
    /// HTTP API: sustained requests per second from one client address (token bucket).
    pub http_requests_per_second: u32,
    /// HTTP API: bucket size (burst) per client address.
    pub http_burst: u32,
    /// Login attempts per minute of one client (an HTTP address, or a device asking to pair) at
    /// one account, and of one client over all accounts; pairing requests of one account also
    /// share one such budget (see [`crate::login`]). Argon2 is costly on purpose; this also
    /// slows password guessing.
    pub logins_per_minute: u32,
    /// Long-poll requests waiting at once (more get 503 and a Retry-After).
    pub long_polls_max: usize,
    /// Long-poll requests one account (the admin counts as one) may have waiting at once (more
    /// get 429 and a Retry-After).
    pub long_polls_per_account: usize,
    /// Long-poll requests one client address may have waiting at once (more get 429).
    pub long_polls_per_address: usize,
    /// HTTP connections open at once (more are closed as soon as they are accepted). Keep it
    /// well below the process's file-handle limit: the relay server and storage need some too.
    pub http_connections_max: usize,
    /// HTTP connections one peer address may hold open at once (trusted proxies are exempt:
    /// every client behind one shares its address).
    pub http_connections_per_address: usize,
    /// Longest wait for a request's header, in milliseconds: from when a connection is ready
    /// for a request (just opened, or done with the previous one) to the header's last byte.
    pub http_header_timeout_ms: u64,
    /// Longest a request's body may take to arrive, in milliseconds from its header.
    pub http_body_timeout_ms: u64,
    /// A connection that moves no byte either way for this long, in milliseconds, while no
    /// request of it is being handled, is closed (a client that stops reading its answer).
    pub http_idle_timeout_ms: u64,
    /// QUIC handshakes per second one source address may start at the cloud endpoint (token
    /// bucket; connections through the relay server share one bucket). A connection from a new
    /// key leaves about 25 KiB in iroh's per-remote state for 60 s after it closes, so this is
    /// what bounds the memory connect/close churn can hold (issue 11, defect 9).
    pub quic_handshakes_per_second: u32,
    /// Bucket size (burst) of [`Limits::quic_handshakes_per_second`].
    pub quic_handshake_burst: u32,
    /// QUIC handshakes per second from all sources together (a flood from many addresses).
    pub quic_handshakes_per_second_total: u32,
    /// QUIC connections to the cloud endpoint open at once (more are refused at the handshake).
    pub quic_connections_max: usize,
    /// Lifetime of a login or admin-issued account token, in seconds.
    pub token_ttl_secs: u64,
    /// Live tokens per account; issuing one more drops the oldest.
    pub tokens_per_account: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections_per_device: 8,
            messages_per_second: 2_000,
            message_burst: 20_000,
            storage_bytes_per_device: 1 << 30,
            content_quota_bytes_per_user: 5_000_000_000,
            pairings_per_user: 16,
            http_requests_per_second: 50,
            http_burst: 200,
            logins_per_minute: 10,
            long_polls_max: 1024,
            long_polls_per_account: 8,
            long_polls_per_address: 32,
            http_connections_max: 512,
            http_connections_per_address: 32,
            http_header_timeout_ms: 10_000,
            http_body_timeout_ms: 60_000,
            http_idle_timeout_ms: 30_000,
            quic_handshakes_per_second: 10,
            quic_handshake_burst: 50,
            quic_handshakes_per_second_total: 200,
            quic_connections_max: 16_384,
            token_ttl_secs: 30 * 24 * 3600,
            tokens_per_account: 32,
        }
    }
}

/// A cloud account: it authenticates a person to the cloud (HTTP API, pairing mailbox) and
/// never adds a device by itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Account {
    pub name: String,
    pub user: UserId,
    /// Argon2id PHC string.
    pub phc: String,
}

/// A change notification, for long-poll clients.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub seq: u64,
    /// "folder" or "directory".
    pub kind: &'static str,
    pub folder: Option<String>,
    #[serde(skip)]
    pub folder_id: Option<FolderId>,
    /// For a directory event: the users it concerns (see [`directory_audience`]); only they
    /// (and the admin) see it. Empty for folder events, which show to the folder's participants.
    #[serde(skip)]
    pub audience: BTreeSet<UserId>,
}

const EVENTS_KEPT: usize = 4096;
/// Most users one directory event names; a change concerning more becomes several events.
pub const AUDIENCE_MAX: usize = 64;

/// An HTTP bearer token, kept under its BLAKE3 hash: neither memory dumps of the map nor the
/// store hold a usable token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The account it speaks for ("" for the admin).
    pub account: String,
    pub issued: i64,
    pub expires: i64,
    /// Issue order: one more than any token's before it, so the oldest of an account's tokens
    /// is the one with the least serial, even among tokens issued in the same second. Records
    /// stored before it existed read as 0 (they are older than any that has one).
    pub serial: u64,
}

/// How a token was stored before it had a serial.
#[derive(Deserialize)]
struct TokenRecordV1 {
    account: String,
    issued: i64,
    expires: i64,
}

impl TokenRecord {
    /// Decodes a stored record, of either form.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if let Ok(record) = postcard::from_bytes::<TokenRecord>(bytes) {
            return Some(record);
        }
        let v1: TokenRecordV1 = postcard::from_bytes(bytes).ok()?;
        Some(Self { account: v1.account, issued: v1.issued, expires: v1.expires, serial: 0 })
    }
}

/// Longest account name and password a login may carry.
pub const ACCOUNT_MAX: usize = 128;
pub const PASSWORD_MAX: usize = 1024;

/// Why a password check failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("wrong account or password")]
    Wrong,
    #[error("too many login attempts, retry in {0} s")]
    RateLimited(u64),
    #[error("too many logins waiting for a password check, retry in {0} s")]
    Busy(u64),
    #[error("account names are at most {ACCOUNT_MAX} bytes, passwords at most {PASSWORD_MAX}")]
    TooLong,
}

impl LoginError {
    /// The reason as a device's control request is refused with it.
    pub fn code(&self) -> ControlError {
        match self {
            LoginError::Wrong => ControlError::WrongPassword,
            LoginError::RateLimited(_) => ControlError::LoginsExhausted,
            LoginError::Busy(_) => ControlError::Busy,
            LoginError::TooLong => ControlError::Limit,
        }
    }
}

/// A hash to check unknown accounts against (same cost as a real one).
static DUMMY_PHC: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_password("no account has this password").unwrap_or_default());

/// The key a token is kept under.
pub fn token_hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// The mutable state.
#[derive(Debug)]
pub struct State {
    /// The engine's cloud: directory, tickets, address book, pairing mailbox, notices, the
    /// replicas and their sync sessions. Driven only through [`driver`]'s pump; read freely
    /// (`State` derefs to it, so `st.replicas` are its replicas).
    pub control: engine::cloud::Cloud,
    /// The writers of the sync streams, by device and session ([`driver`]).
    streams: BTreeMap<(DeviceId, u64), driver::StreamOut>,
    next_stream: u64,
    /// Replica changes the engine handed out that could not be stored yet: retried before
    /// anything else, and while any is left no sync message goes out.
    unstored: VecDeque<engine::sessions::Commit<DeviceId>>,
    /// The engine's time (wall time advanced monotonically).
    clock: HostClock,
    /// The deadline the timer task waits for.
    armed: Option<engine::time::Micros>,
    pub accounts: BTreeMap<String, Account>,
    pub connections: BTreeMap<DeviceId, usize>,
    buckets: crate::limit::Buckets<DeviceId>,
    pub events: VecDeque<Event>,
    pub event_seq: u64,
    /// HTTP bearer tokens by hash (account tokens are stored; the admin's is not).
    pub tokens: BTreeMap<[u8; 32], TokenRecord>,
    epoch: u64,
}

/// Reads of the engine's cloud: `st.replicas`, `st.addresses()` and the like.
impl std::ops::Deref for State {
    type Target = engine::cloud::Cloud;

    fn deref(&self) -> &Self::Target {
        &self.control
    }
}

impl State {
    /// The cloud's verified directory.
    pub fn dir(&self) -> &Directory {
        self.control.directory()
    }

    /// This run's epoch: replicas' change logs and the long-poll's event numbers count from
    /// zero in each (a restart makes a new one).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Most posted items merged under one hold of the cloud's lock.
pub const POST_CHUNK_ITEMS: usize = 256;

/// The cloud.
#[derive(Debug)]
pub struct Cloud {
    pub key: DeviceKey,
    pub id: DeviceId,
    pub limits: Limits,
    pub metrics: Metrics,
    store: Store,
    state: Mutex<State>,
    /// Who may try a password, and when (HTTP login and pairing requests): [`crate::login`].
    logins: crate::login::Logins,
    /// Argon2 runs at most this many at once, whoever asks (new device keys and account names
    /// cost an attacker nothing; CPU does cost us).
    hashing: tokio::sync::Semaphore,
    notices: broadcast::Sender<(Notice, Option<DeviceId>)>,
    /// Wakes long-poll requests.
    pub events_changed: Notify,
    /// Wakes the timer task when the engine's next deadline comes earlier ([`driver`]).
    timer: Arc<Notify>,
    /// Live Folders' content index and sweeps ([`content`]); taken after `state`, never before.
    content: Mutex<content::ContentState>,
}

impl Cloud {
    /// Loads the cloud from its store (key, accounts, directory, replicas).
    pub fn load(store: Store, key: DeviceKey, limits: Limits, epoch: u64) -> anyhow::Result<Self> {
        let dir = store.load_directory()?;
        let accounts: BTreeMap<String, Account> = match store.get_blob("accounts")? {
            Some(bytes) => {
                postcard::from_bytes(&bytes).map_err(|_| anyhow::anyhow!("stored accounts are corrupt"))?
            }
            None => BTreeMap::new(),
        };
        let mut tokens = BTreeMap::new();
        for (hash, bytes) in store.tokens()? {
            let record =
                TokenRecord::decode(&bytes).ok_or_else(|| anyhow::anyhow!("a stored token is corrupt"))?;
            tokens.insert(hash, record);
        }
        // A store from before signature v2: the cloud holds no key, so it keeps only what
        // verifies; devices send the rest again, signed anew, in their next sessions.
        if let Some(m) = store.migrate_signatures(|folder, item| {
            engine::signing::migrate_signatures(item, &folder.scope(), None)
        })? {
            tracing::warn!(
                kept = m.kept,
                dropped = m.dropped,
                "migrated stored items to folder-bound signatures"
            );
        }
        let control_limits =
            CloudLimits { pairings_per_user: limits.pairings_per_user, ..CloudLimits::default() };
        let mut control = engine::cloud::Cloud::new(key.clone(), dir, control_limits)
            .with_sessions(transport::stream_config(), epoch);
        for folder in store.folders()? {
            let mut replica = Replica::new_signed(epoch, folder.scope());
            replica.set_signers(Some(control.directory().signers(&folder)));
            // Verified before it was stored: loaded as it is (`Replica::restore`).
            replica
                .restore(store.load_items(&folder)?.into_iter().map(Arc::new), transport::verify_threads())
                .map_err(|e| anyhow::anyhow!("stored items of {folder}: {e}"))?;
            control.install(folder, replica);
        }
        let (notices, _) = broadcast::channel(1024);
        let state = State {
            control,
            streams: BTreeMap::new(),
            next_stream: 0,
            unstored: VecDeque::new(),
            clock: HostClock::start(),
            armed: None,
            accounts,
            connections: BTreeMap::new(),
            buckets: crate::limit::Buckets::new(
                f64::from(limits.messages_per_second),
                f64::from(limits.message_burst),
                1 << 20,
            ),
            events: VecDeque::new(),
            event_seq: 0,
            tokens,
            epoch,
        };
        let id = DeviceId::of(&key);
        let logins = crate::login::Logins::new(limits.logins_per_minute);
        Ok(Self {
            key,
            id,
            limits,
            metrics: Metrics::new(),
            store,
            state: Mutex::new(state),
            logins,
            hashing: tokio::sync::Semaphore::new(2),
            notices,
            events_changed: Notify::new(),
            timer: Arc::new(Notify::new()),
            content: Mutex::new(content::ContentState::default()),
        })
    }

    /// The state if no one holds it now (tests check that long work leaves it free).
    pub fn try_lock(&self) -> Option<MutexGuard<'_, State>> {
        match self.state.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would poison it; the state is still consistent at every
        // await-free step, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<(Notice, Option<DeviceId>)> {
        self.notices.subscribe()
    }

    /// Sends the notices the engine owes connected devices to their forwarders (each forwarder
    /// asks `Cloud::may_see` before it passes one on).
    fn flush_notices(&self, st: &mut State) {
        while let Some(out) = st.control.poll_notice() {
            let _ = self.notices.send((out.notice, out.origin));
        }
    }

    /// Tells long-polls that a folder changed (devices are told by the engine's notices).
    fn publish_folder(&self, st: &mut State, folder: FolderId) {
        Self::push_event(st, "folder", Some(folder), BTreeSet::new());
        self.events_changed.notify_waiters();
    }

    /// Publishes new directory `changes`: long-polls see them as events naming the users they
    /// concern ([`directory_audience`]), at most [`AUDIENCE_MAX`] a event.
    fn publish_directory(&self, st: &mut State, changes: &[engine::directory::SignedChange]) {
        let users: Vec<UserId> = directory_audience(st.dir(), changes).into_iter().collect();
        if users.is_empty() {
            // Still an event (the admin sees every one), named to nobody else.
            Self::push_event(st, "directory", None, BTreeSet::new());
        }
        for chunk in users.chunks(AUDIENCE_MAX) {
            Self::push_event(st, "directory", None, chunk.iter().copied().collect());
        }
        self.events_changed.notify_waiters();
    }

    /// Appends one long-poll event, keeping the last [`EVENTS_KEPT`].
    fn push_event(
        st: &mut State,
        kind: &'static str,
        folder_id: Option<FolderId>,
        audience: BTreeSet<UserId>,
    ) {
        st.event_seq += 1;
        st.events.push_back(Event {
            seq: st.event_seq,
            kind,
            folder: folder_id.map(|f| engine::signing::hex(&f.0)),
            folder_id,
            audience,
        });
        while st.events.len() > EVENTS_KEPT {
            st.events.pop_front();
        }
    }

    /// Token bucket: whether `device` may send one more frame now.
    pub fn admit_frame(&self, device: &DeviceId) -> bool {
        self.lock().buckets.take(device, now_us()).is_ok()
    }

    // ------------------------------------------------------------------ connections

    /// Serves one device connection until it closes.
    pub async fn serve(self: Arc<Self>, conn: Connection) {
        let device = transport::device_of(conn.remote_id());
        let channel = transport::channel_of(conn.remote_id());
        {
            let mut st = self.lock();
            let n = st.connections.entry(device).or_insert(0);
            if *n >= self.limits.connections_per_device {
                drop(st);
                self.metrics.refusals.get_or_create(&crate::metrics::Reason::new("connection-limit")).inc();
                conn.close(1u32.into(), b"too many connections from this device");
                return;
            }
            *n += 1;
        }
        self.metrics.connections.inc();
        let notices = tokio::spawn(self.clone().forward_notices(conn.clone(), device));
        loop {
            let Ok((send, recv)) = conn.accept_bi().await else { break };
            let cloud = self.clone();
            tokio::spawn(async move {
                if let Err(e) = cloud.serve_stream(device, channel, send, recv).await {
                    tracing::debug!(%device, error = %e, "stream ended with an error");
                }
            });
        }
        notices.abort();
        self.metrics.connections.dec();
        let mut st = self.lock();
        if let Some(n) = st.connections.get_mut(&device) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.connections.remove(&device);
            }
        }
    }

    /// Pushes notices the device may see over unidirectional streams.
    async fn forward_notices(self: Arc<Self>, conn: Connection, device: DeviceId) {
        let mut rx = self.subscribe();
        loop {
            let notice = match rx.recv().await {
                Ok((notice, origin)) if origin != Some(device) => notice,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => Notice::Directory,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let visible = self.lock().control.may_see(&notice, &device);
            if !visible {
                continue;
            }
            let Ok(mut send) = conn.open_uni().await else { return };
            if frame::write_value(&mut send, &notice).await.is_err() {
                return;
            }
            let _ = send.finish();
            self.metrics.notices_sent.inc();
        }
    }

    async fn serve_stream(
        self: Arc<Self>,
        device: DeviceId,
        channel: engine::ticket::ChannelKey,
        mut send: SendStream,
        recv: RecvStream,
    ) -> anyhow::Result<()> {
        let mut recv = frame::Reader::new(recv);
        let open: Option<Open> = recv.read_value(transport::CONTROL_MAX, "stream opening").await?;
        match open {
            None => Ok(()),
            Some(Open::Control(request)) => {
                if !self.admit_frame(&device) {
                    frame::write_value(&mut send, &Response::Refused(ControlError::RateLimited)).await?;
                    let _ = send.finish();
                    return Ok(());
                }
                let kind = request.kind();
                let response = self.handle_control(device, request).await;
                self.metrics.requests.get_or_create(&crate::metrics::Reason::new(kind)).inc();
                frame::write_value(&mut send, &response).await?;
                let _ = send.finish();
                Ok(())
            }
            Some(Open::Sync) => self.serve_sync(device, channel, send, recv).await,
            Some(Open::Content { folder, root, size, start, end }) => {
                if !self.admit_frame(&device) {
                    frame::write_value(&mut send, &engine::control::ContentReply::Busy).await?;
                    let _ = send.finish();
                    return Ok(());
                }
                let root = engine::folder::ContentHash(root);
                self.serve_content(device, folder, root, size, start..end, send).await
            }
            Some(Open::Upload { folder, root, size, epoch }) => {
                if !self.admit_frame(&device) {
                    let _ = send.reset(0u32.into());
                    return Ok(());
                }
                let root = engine::folder::ContentHash(root);
                self.serve_upload(device, folder, root, size, epoch, send, recv).await
            }
        }
    }

    // ------------------------------------------------------------------ control requests

    /// Answers one control request from `device` (authenticated by the connection), with a
    /// typed refusal if it fails. Password work (argon2, slow on purpose) runs on a blocking
    /// thread and never under the state lock; everything else is the engine's control plane.
    pub async fn handle_control(self: &Arc<Self>, device: DeviceId, request: Request) -> Response {
        match request {
            Request::PairRequest { account, password, commitment } => {
                let user = match self
                    .clone()
                    .verify_password(account, password, crate::login::Client::Device(device))
                    .await
                {
                    Ok(user) => user,
                    Err(e) => return Response::Refused(e.code()),
                };
                let mut guard = self.lock();
                let st = &mut *guard;
                let response = st.control.handle_pair_request(device, user, commitment);
                let _ = self.pump(st);
                response
            }
            Request::Account { name, password } => match self.set_account(device, name, password).await {
                Ok(()) => Response::Ok,
                Err(e) => Response::Refused(e),
            },
            other => self.handle_request(device, other),
        }
    }

    /// Creates (or re-keys) the account `name` of `device`'s user.
    async fn set_account(
        &self,
        device: DeviceId,
        name: String,
        password: String,
    ) -> Result<(), ControlError> {
        self.account_allowed(device, &name)?;
        check_password(&password)?;
        let phc = {
            let _permit = self.hashing.acquire().await.map_err(|_| ControlError::Busy)?;
            tokio::task::spawn_blocking(move || hash_password(&password))
                .await
                .map_err(|_| ControlError::Busy)?
                .map_err(|_| ControlError::Busy)?
        };
        let mut guard = self.lock();
        let st = &mut *guard;
        // Checked again: the state may have moved while the hash was computed.
        let user = self.account_allowed_in(st, device, &name)?;
        st.accounts.insert(name.clone(), Account { name, user, phc });
        self.save_accounts(st).map_err(|_| ControlError::Storage)
    }

    /// Whether `device` may set up account `name` for its user; the user.
    fn account_allowed(&self, device: DeviceId, name: &str) -> Result<UserId, ControlError> {
        self.account_allowed_in(&self.lock(), device, name)
    }

    fn account_allowed_in(&self, st: &State, device: DeviceId, name: &str) -> Result<UserId, ControlError> {
        let user = st.control.account_user(&device)?;
        check_account_name(name).map_err(|_| ControlError::AccountName)?;
        if st.accounts.get(name).is_some_and(|a| a.user != user) {
            return Err(ControlError::AccountTaken);
        }
        if st.accounts.values().any(|a| a.user == user && a.name != name) {
            return Err(ControlError::AccountOtherName);
        }
        Ok(user)
    }

    /// Checks an account's password for a client (an HTTP address, or a device asking to pair).
    /// The attempt first spends the client's login budgets ([`crate::login`]: none is shared
    /// with other clients of the account, so their guesses cannot lock it out), then waits for
    /// an argon2 lane (proven clients have their own); the hash runs on a blocking thread,
    /// outside the lock. A success makes the (account, client) pair proven.
    pub async fn verify_password(
        self: Arc<Self>,
        account: String,
        password: String,
        client: crate::login::Client,
    ) -> Result<UserId, LoginError> {
        if account.len() > ACCOUNT_MAX || password.len() > PASSWORD_MAX {
            return Err(LoginError::TooLong);
        }
        let lane = self.logins.admit(&account, &client, now_us())?;
        let phc = self.lock().accounts.get(&account).map(|a| (a.phc.clone(), a.user));
        let _permit = self.logins.permit(lane, &self.hashing).await?;
        let user = tokio::task::spawn_blocking(move || {
            // An unknown account costs the same hash as a known one, so timing does not tell.
            let (phc, user) = match phc {
                Some((phc, user)) => (phc, Some(user)),
                None => (DUMMY_PHC.clone(), None),
            };
            let parsed = PasswordHash::new(&phc).map_err(|_| LoginError::Wrong)?;
            Argon2::default().verify_password(password.as_bytes(), &parsed).map_err(|_| LoginError::Wrong)?;
            user.ok_or(LoginError::Wrong)
        })
        .await
        .map_err(|_| LoginError::Wrong)??;
        self.logins.proven(&account, &client, now_us());
        Ok(user)
    }

    /// Records that `client` holds a live token of `account` (it presented one): the pair is
    /// proven, like after a successful login ([`crate::login`]).
    pub fn token_holder(&self, token: &str, account: &str, client: &crate::login::Client) {
        if self.token_account(token).is_some_and(|a| a == account) {
            self.logins.proven(account, client, now_us());
        }
    }

    /// Answers one control request that needs no password work: the engine's control plane,
    /// then whatever it accepted is stored before the answer goes out.
    pub fn handle_request(&self, device: DeviceId, request: Request) -> Response {
        let mut guard = self.lock();
        let st = &mut *guard;
        if let Request::Directory { changes, .. } = &request {
            if let Some(name) = taken_user_name(st.dir(), changes) {
                tracing::info!(%device, name, "refused a user whose name is taken");
                self.metrics.refusals.get_or_create(&crate::metrics::Reason::new("user-name-taken")).inc();
                // The engine's control plane has no code of its own for this yet: a squatter is
                // not entitled to a name another user holds.
                return Response::Refused(ControlError::Directory(engine::refusal::DirCode::NotEntitled));
            }
        }
        let is_ticket = matches!(request, Request::Ticket);
        let now = st.clock.now_us();
        let response = st.control.handle_request(now, device, request);
        if is_ticket && matches!(response, Response::Ticket { .. }) {
            self.metrics.tickets_issued.inc();
        }
        // What the request changed is stored before it is acknowledged.
        if self.pump(st).is_err() {
            return Response::Refused(ControlError::Storage);
        }
        response
    }

    fn save_accounts(&self, st: &State) -> anyhow::Result<()> {
        let bytes = postcard::to_allocvec(&st.accounts)?;
        self.store.put_blob("accounts", &bytes)?;
        Ok(())
    }

    /// Merges items posted over HTTP into the cloud's replica (each must carry valid signatures of
    /// the folder's signers). Returns (merged, changed, refused with reasons).
    ///
    /// Work proportional to the body runs outside the cloud's lock: versions by a device that may
    /// not write the folder are refused first, without checking their signatures; the rest are
    /// verified with no lock held; the engine's cloud merges them ([`engine::cloud::Cloud::merge_items`])
    /// and the driver stores what changed, under the lock for at most [`POST_CHUNK_ITEMS`] items
    /// at a time. Bytes added count against the storage limit of the device that signed each
    /// item's winner, as a session's bytes count against its device.
    pub fn merge_posted(
        &self,
        folder: &FolderId,
        items: Vec<Item>,
    ) -> anyhow::Result<(usize, usize, Vec<String>)> {
        let signers = {
            let st = self.lock();
            if st.dir().folder(folder).is_none() {
                anyhow::bail!("no such folder");
            }
            st.dir().signers(folder)
        };
        let mut refused = Vec::new();
        let mut accepted = Vec::new();
        for item in items {
            let outsider =
                std::iter::once(&item.version).chain(item.conflicts.iter()).find_map(|v| {
                    match v.topmost().by.as_ref().and_then(DeviceId::from_endpoint) {
                        Some(d) if signers.contains(&d) => None,
                        Some(d) => Some(format!("signed by {d}, which may not write this folder")),
                        None => Some("its topmost history entry names no device".to_string()),
                    }
                });
            match outsider {
                Some(why) => refused.push(format!("{}: {why}", item.id().as_str())),
                None => accepted.push(item),
            }
        }
        let scope = folder.scope();
        let verified =
            engine::signing::Verified::check(&accepted, &scope, Some(&signers), transport::verify_threads());
        let accepted: Vec<Arc<Item>> = accepted.into_iter().map(Arc::new).collect();
        let limit = self.limits.storage_bytes_per_device;
        // The winner's signer, by construction one of `signers`.
        let author = |item: &Item| item.version.topmost().by.as_ref().and_then(DeviceId::from_endpoint);
        let (mut merged, mut changed) = (0, 0);
        for chunk in accepted.chunks(POST_CHUNK_ITEMS) {
            let mut over = BTreeSet::new();
            for device in chunk.iter().filter_map(|i| author(i)).collect::<BTreeSet<_>>() {
                if self.store.usage(&device.0)? > limit {
                    over.insert(device);
                }
            }
            let within: Vec<Arc<Item>> =
                chunk.iter().filter(|i| author(i).is_some_and(|d| !over.contains(&d))).cloned().collect();
            let (results, stored) = {
                let mut guard = self.lock();
                let st = &mut *guard;
                let results = st.control.merge_items(*folder, &within, verified.clone())?;
                (results, self.pump(st))
            };
            let mut results = results.into_iter();
            let mut added: BTreeMap<DeviceId, u64> = BTreeMap::new();
            for item in chunk {
                let id = item.id().as_str().to_string();
                let Some(device) = author(item) else { continue };
                if over.contains(&device) {
                    self.metrics.refusals.get_or_create(&crate::metrics::Reason::new("storage-limit")).inc();
                    refused.push(format!("{id}: storage limit of {limit} bytes reached by {device}"));
                    continue;
                }
                match results.next() {
                    Some(Ok(c)) => {
                        merged += 1;
                        changed += usize::from(c);
                        if c {
                            *added.entry(device).or_default() +=
                                wire::encoded_len(&wire::to_wire(item)) as u64;
                        }
                    }
                    Some(Err(e)) => refused.push(format!("{id}: {e}")),
                    None => {}
                }
            }
            stored.map_err(|_| anyhow::anyhow!("storing the merged items failed"))?;
            for (device, bytes) in added {
                self.store.add_usage(&device.0, bytes)?;
            }
        }
        Ok((merged, changed, refused))
    }

    /// Bytes of sealed file content `user` keeps at the cloud (its quota's count).
    pub fn content_usage(&self, user: &UserId) -> u64 {
        self.store.content_usage(&user.0).unwrap_or(0)
    }

    /// Bytes of feed data a device added to the cloud's replicas.
    pub fn usage(&self, device: &DeviceId) -> u64 {
        self.store.usage(&device.0).unwrap_or(0)
    }

    /// Creates an admin-issued bearer token for an account (or for the admin with "").
    pub fn issue_token(&self, account: &str) -> anyhow::Result<String> {
        let token = random_token();
        let now = now_secs();
        let ttl = i64::try_from(self.limits.token_ttl_secs).unwrap_or(i64::MAX);
        let mut st = self.lock();
        // Expired tokens go, and this account's oldest beyond its allowance.
        let mut gone: Vec<[u8; 32]> = st
            .tokens
            .iter()
            .filter(|(_, t)| t.expires <= now && !t.account.is_empty())
            .map(|(h, _)| *h)
            .collect();
        // Oldest first: by serial (issue order), then (records from before serials) by time;
        // the hash only orders old records of the same second.
        let mut mine: Vec<(u64, i64, [u8; 32])> = st
            .tokens
            .iter()
            .filter(|(_, t)| t.account == account && t.expires > now)
            .map(|(h, t)| (t.serial, t.issued, *h))
            .collect();
        mine.sort_unstable();
        let excess = (mine.len() + 1).saturating_sub(self.limits.tokens_per_account.max(1));
        gone.extend(mine.into_iter().take(excess).map(|(_, _, h)| h));
        let serial = st.tokens.values().map(|t| t.serial).max().unwrap_or(0).saturating_add(1);
        let hash = token_hash(&token);
        let record = TokenRecord {
            account: account.to_string(),
            issued: now,
            expires: now.saturating_add(ttl),
            serial,
        };
        self.store.put_token(&hash, &postcard::to_allocvec(&record)?, &gone)?;
        for h in &gone {
            st.tokens.remove(h);
        }
        st.tokens.insert(hash, record);
        if !gone.is_empty() {
            // Long-polls of a dropped token end (they check their token when woken).
            self.events_changed.notify_waiters();
        }
        Ok(token)
    }

    /// The admin token (from the config or `admin.token`): never expires, never stored here.
    pub fn set_admin_token(&self, token: &str) {
        self.lock().tokens.insert(
            token_hash(token),
            TokenRecord { account: String::new(), issued: 0, expires: i64::MAX, serial: 0 },
        );
    }

    /// The account a live token speaks for ("" for the admin).
    pub fn token_account(&self, token: &str) -> Option<String> {
        self.token_record(token).map(|t| t.account)
    }

    /// A live token's record.
    pub fn token_record(&self, token: &str) -> Option<TokenRecord> {
        let st = self.lock();
        st.tokens.get(&token_hash(token)).filter(|t| t.expires > now_secs()).cloned()
    }

    /// Revokes a token (logout). The admin token stays.
    pub fn revoke_token(&self, token: &str) -> anyhow::Result<bool> {
        let mut st = self.lock();
        let h = token_hash(token);
        if st.tokens.get(&h).is_none_or(|t| t.account.is_empty()) {
            return Ok(false);
        }
        self.store.delete_tokens(&[h])?;
        st.tokens.remove(&h);
        drop(st);
        // Long-polls of this token end (they check their token when woken).
        self.events_changed.notify_waiters();
        Ok(true)
    }
}

/// The users directory `changes` concern, in the state after them: the author's user; the user
/// a device change is about; the invitee of an invitation; a removed member; and everyone taking
/// part in (owner or active member of) a folder a change touches. A long-poll shows a directory
/// event only to them (and to the admin).
pub fn directory_audience(dir: &Directory, changes: &[engine::directory::SignedChange]) -> BTreeSet<UserId> {
    use engine::directory::{MemberState, Op};
    let state = dir.state();
    let mut users = BTreeSet::new();
    let mut folders = BTreeSet::new();
    for change in changes {
        let author = change.body.author;
        users.extend(state.device_user.get(&author).copied());
        match &change.body.op {
            Op::CreateUser { .. } => {
                users.insert(UserId::of_first_device(author));
            }
            Op::AddDevice { user, .. } | Op::RemoveDevice { user, .. } => {
                users.insert(*user);
            }
            Op::CreateFolder { .. } => {
                folders.insert(change.folder_id());
            }
            Op::Invite { folder, invitee, .. } => {
                users.insert(*invitee);
                folders.insert(*folder);
            }
            Op::Resend { invitation }
            | Op::Cancel { invitation }
            | Op::Accept { invitation }
            | Op::Decline { invitation } => {
                if let Some(inv) = dir.invitation(invitation) {
                    users.insert(inv.invitee);
                    folders.insert(inv.folder);
                }
            }
            Op::RemoveMember { folder, user } => {
                users.insert(*user);
                folders.insert(*folder);
            }
            Op::Map { folder } => {
                folders.insert(*folder);
            }
            Op::Unmap { folder, device } => {
                users.extend(state.device_user.get(device).copied());
                folders.insert(*folder);
            }
            Op::SetStorage { folder, .. } | Op::FolderKeys { folder, .. } => {
                folders.insert(*folder);
            }
        }
    }
    for f in folders.iter().filter_map(|f| dir.folder(f)) {
        users.insert(f.owner);
        users.extend(f.members.iter().filter(|(_, m)| m.state == MemberState::Active).map(|(u, _)| *u));
    }
    users
}

fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing: {e}"))?
        .to_string())
}

/// The first name a `CreateUser` of `changes` takes that another user holds on this relay (or
/// that two new users of the batch share). Names are compared case-insensitively, so "Alice"
/// cannot squat beside "alice". A user's own `CreateUser` sent again is not a second user.
pub fn taken_user_name(dir: &Directory, changes: &[engine::directory::SignedChange]) -> Option<String> {
    let key = |name: &str| name.to_lowercase();
    let mut held: BTreeMap<String, UserId> =
        dir.state().users.iter().map(|(id, u)| (key(&u.name), *id)).collect();
    for change in changes {
        if let engine::directory::Op::CreateUser { name } = &change.body.op {
            let user = UserId(change.body.author.0);
            match held.get(&key(name)) {
                Some(holder) if *holder != user => return Some(name.clone()),
                _ => {
                    held.insert(key(name), user);
                }
            }
        }
    }
    None
}

/// Whether a user name is taken on this relay (compared as [`taken_user_name`] does).
pub fn user_name_taken(dir: &Directory, name: &str) -> bool {
    let name = name.to_lowercase();
    dir.state().users.values().any(|u| u.name.to_lowercase() == name)
}

/// Account names: 1 to 64 of `a-z 0-9 . _ -`.
pub fn check_account_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !ok {
        anyhow::bail!("account names are 1 to 64 characters of a-z, 0-9, '.', '_' and '-'");
    }
    Ok(())
}

fn check_password(password: &str) -> Result<(), ControlError> {
    if password.len() < 8 || password.len() > 1024 {
        return Err(ControlError::WeakPassword);
    }
    Ok(())
}

/// 32 random bytes, hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    engine::signing::hex(&bytes)
}

/// Unix seconds, for the HTTP API's views.
pub fn now() -> i64 {
    now_secs()
}
