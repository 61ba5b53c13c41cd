//! What the `feedmesh` node and `feedmesh-relay` share on the network.
//!
//! - **Endpoints** ([`endpoint`]): one iroh endpoint per process, keyed by the device's (or the
//!   cloud's) ed25519 key, so the key QUIC/TLS authenticates *is* the directory's device id and
//!   the channel key a ticket is bound to. No public relays, no DNS or pkarr lookup: a deployment
//!   uses its own relay, and peers learn each other's addresses from the cloud.
//! - **Frames** ([`frame`]): every message on a stream is a 4-byte big-endian length and that
//!   many bytes, bounded by [`FRAME_MAX`]; a longer length ends the stream with a typed error
//!   before anything is allocated.
//! - **Streams**: each bidirectional stream opens with one [`Open`] frame: a sync session (engine
//!   `AuthSession` messages follow) or one control [`Request`] (one [`Response`] follows). The
//!   cloud sends [`Notice`]s on unidirectional streams.
//! - **The session driver** ([`drive`]): runs a sans-IO engine session over a stream, with the
//!   caller's state behind its own lock.
//!
//! Wall time enters here (tickets are checked against it); the engine still takes it from us.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use engine::authz::AuthSession;
use engine::directory::{FolderId, Pairing, SignedChange};
use engine::signing::DeviceId;
use engine::sync::{Config, Micros, Outcome, SyncError};
use engine::ticket::{ChannelKey, CloudId, Ticket};
use iroh::endpoint::{RecvStream, SendStream};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, RelayUrl, SecretKey};
use serde::{Deserialize, Serialize};

pub mod store;
pub mod view;

/// The one ALPN both binaries speak.
pub const ALPN: &[u8] = b"feedmesh/1";

/// Largest frame: an engine message (1 MiB) with room for the envelope.
pub const FRAME_MAX: usize = (1 << 20) + 4096;

/// Largest control request or response frame (directory batches are the big ones).
pub const CONTROL_MAX: usize = 8 << 20;

/// Unix microseconds of this machine's clock.
pub fn now_us() -> Micros {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as Micros)
}

/// Unix seconds (directory changes carry them for the news feed).
pub fn now_secs() -> i64 {
    (now_us() / 1_000_000) as i64
}

/// The iroh secret key of a device key (both are ed25519).
pub fn secret_key(key: &engine::signing::DeviceKey) -> SecretKey {
    SecretKey::from_bytes(&key.to_bytes())
}

/// The directory device id of an iroh endpoint id.
pub fn device_of(id: EndpointId) -> DeviceId {
    DeviceId(*id.as_bytes())
}

/// The channel key a ticket is bound to: the endpoint id TLS authenticated.
pub fn channel_of(id: EndpointId) -> ChannelKey {
    ChannelKey(*id.as_bytes())
}

/// The endpoint id of a device.
pub fn endpoint_id(device: &DeviceId) -> Option<EndpointId> {
    EndpointId::from_bytes(&device.0).ok()
}

/// Engine session settings over a QUIC stream: the stream is reliable, so the retransmission
/// timer only detects a peer that went away.
pub fn stream_config() -> Config {
    Config {
        rto_us: 30_000_000,
        rto_max_us: 60_000_000,
        max_retries: 2,
        linger_us: 0,
        linger_after_hello: false,
        verify_threads: verify_threads(),
        ..Config::default()
    }
}

/// Threads for checking signatures of a batch of items: the machine's cores, at most 8.
/// Receiving and reloading signed items is bound by ed25519 verification.
pub fn verify_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
}

/// Checks the signatures a sync message carries for a replica of `scope` accepting `signers`
/// (`Replica::scope`, `Replica::signers`), before the caller takes the lock its replica is under;
/// the caller then hands the result to `Replica::set_verified` and the message to the session.
/// So no lock is held while ed25519 work proportional to a peer's input runs (issue 11). Bytes
/// that do not decode give an empty set: the session refuses them under the lock, cheaply.
pub fn preverify(
    bytes: &[u8],
    scope: Option<engine::signing::FeedScope>,
    signers: Option<&std::collections::BTreeSet<DeviceId>>,
) -> engine::signing::Verified {
    let Some(scope) = scope else { return Default::default() };
    let Ok(message) = engine::wire::decode(bytes, FRAME_MAX) else { return Default::default() };
    let items: Vec<_> = message.body.items().iter().filter_map(|w| engine::wire::from_wire(w).ok()).collect();
    engine::signing::Verified::check(&items, &scope, signers, verify_threads())
}

/// How a process binds its endpoint.
#[derive(Clone, Debug, Default)]
pub struct EndpointOptions {
    /// The deployment's relay (none: direct paths only).
    pub relay: Option<RelayUrl>,
    /// UDP port of the relay's QUIC address discovery, on the relay URL's host. Without it the
    /// endpoint does not learn its public (NAT-mapped) address, so hole punching rarely works.
    pub relay_qad_port: Option<u16>,
    /// UDP address to bind (default: any port on all interfaces).
    pub bind: Option<std::net::SocketAddr>,
    /// Extra CA certificates (PEM) to trust for the relay's HTTPS, e.g. a self-signed one.
    pub relay_ca_pem: Option<String>,
    /// No UDP at all: every packet goes through the relay (tests and benchmarks of the relayed
    /// path; a device behind a network that blocks UDP).
    pub relay_only: bool,
}

/// Binds an iroh endpoint for `key` that speaks [`ALPN`], uses only the configured relay and
/// looks nothing up in public services.
pub async fn endpoint(key: &engine::signing::DeviceKey, opts: &EndpointOptions) -> anyhow::Result<Endpoint> {
    let relay_mode = match &opts.relay {
        Some(url) => RelayMode::Custom(iroh::RelayMap::from(iroh::RelayConfig::new(
            url.clone(),
            opts.relay_qad_port.map(iroh_relay::RelayQuicConfig::new),
        ))),
        None => RelayMode::Disabled,
    };
    let mut builder = Endpoint::builder(iroh::endpoint::presets::Minimal)
        .secret_key(secret_key(key))
        .alpns(vec![ALPN.to_vec()])
        .relay_mode(relay_mode);
    if let Some(pem) = &opts.relay_ca_pem {
        use rustls::pki_types::pem::PemObject;
        let roots: Vec<rustls::pki_types::CertificateDer<'static>> =
            rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("relay CA certificate: {e}"))?;
        if roots.is_empty() {
            anyhow::bail!("relay CA file holds no certificate");
        }
        builder = builder.ca_tls_config(iroh::tls::CaTlsConfig::embedded().with_extra_roots(roots));
    }
    if opts.relay_only {
        builder = builder.clear_ip_transports();
    } else if let Some(bind) = opts.bind {
        builder = builder.clear_ip_transports().bind_addr(bind)?;
    }
    Ok(builder.bind().await?)
}

/// What a stream is for (its first frame).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Open {
    /// An engine `AuthSession` follows (its `DirHello` names the folder).
    Sync,
    /// One control request; one response follows.
    Control(Request),
}

/// Requests a device makes of the cloud (the cloud knows the device from the TLS-authenticated
/// endpoint id; nothing in a request can claim another identity).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// A fresh ticket for this device and this connection's key.
    Ticket,
    /// Push my directory changes the cloud lacks, pull those I lack (`heads` is mine).
    Directory { heads: Vec<(DeviceId, u32)>, changes: Vec<SignedChange> },
    /// My current addresses, for peers that want to reach me.
    Announce { addr: EndpointAddr },
    /// Addresses of the other devices that map `folder`.
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

/// Answers to [`Request`]s.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Ok,
    /// The request was refused or failed; the text says why.
    Error(String),
    Ticket {
        ticket: Ticket,
        cloud: CloudId,
    },
    Directory {
        changes: Vec<SignedChange>,
    },
    Peers {
        peers: Vec<EndpointAddr>,
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
    pub user: engine::directory::UserId,
    pub device: DeviceId,
    pub commitment: [u8; 32],
    /// The existing device that answered, and its nonce.
    pub existing: Option<(DeviceId, [u8; 32])>,
    /// The new device's revealed nonce and consent.
    pub pairing: Option<Pairing>,
}

/// What the cloud pushes to a connected device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Notice {
    /// The cloud's replica of the folder changed.
    Folder(FolderId),
    /// The directory changed.
    Directory,
    /// A pairing for this device's user waits for an answer.
    Pairing,
}

/// Errors on a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("stream: {0}")]
    Stream(String),
    #[error("undecodable {0}")]
    Decode(&'static str),
}

/// Frames on QUIC streams.
pub mod frame {
    use tokio::io::{AsyncRead, AsyncReadExt};

    use super::*;

    /// Writes one frame.
    pub async fn write(send: &mut SendStream, bytes: &[u8]) -> Result<(), FrameError> {
        if bytes.len() > CONTROL_MAX {
            return Err(FrameError::TooLarge(bytes.len(), CONTROL_MAX));
        }
        send.write_all(&(bytes.len() as u32).to_be_bytes())
            .await
            .map_err(|e| FrameError::Stream(e.to_string()))?;
        send.write_all(bytes).await.map_err(|e| FrameError::Stream(e.to_string()))
    }

    /// Bytes reserved for a frame before any of it has arrived.
    pub const FRAME_PREALLOC: usize = 64 << 10;

    /// Reads one frame of at most `max` bytes; `None` when the peer finished the stream cleanly
    /// between frames. Generic over the byte source so that the fuzzer (`fuzzing`, target
    /// `frame`) feeds it the same way a QUIC stream does.
    pub async fn read(
        recv: &mut (impl AsyncRead + Unpin),
        max: usize,
    ) -> Result<Option<Vec<u8>>, FrameError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match recv.read(&mut len[got..]).await.map_err(|e| FrameError::Stream(e.to_string()))? {
                0 if got == 0 => return Ok(None),
                0 => return Err(FrameError::Truncated),
                n => got += n,
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > max {
            return Err(FrameError::TooLarge(len, max));
        }
        // The buffer grows with what arrives (read_to_end at most doubles it), so a length
        // prefix the peer never fills costs at most FRAME_PREALLOC, not `len`.
        let mut buf = Vec::with_capacity(len.min(FRAME_PREALLOC));
        (&mut *recv)
            .take(len as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| FrameError::Stream(e.to_string()))?;
        if buf.len() < len {
            return Err(FrameError::Truncated);
        }
        Ok(Some(buf))
    }

    /// Writes a serialisable value as one frame.
    pub async fn write_value<T: Serialize>(send: &mut SendStream, value: &T) -> Result<(), FrameError> {
        let bytes = postcard::to_allocvec(value).map_err(|_| FrameError::Decode("value"))?;
        write(send, &bytes).await
    }

    /// Reads one frame and decodes it.
    pub async fn read_value<T: for<'de> Deserialize<'de>>(
        recv: &mut (impl AsyncRead + Unpin),
        max: usize,
        what: &'static str,
    ) -> Result<Option<T>, FrameError> {
        match read(recv, max).await? {
            None => Ok(None),
            Some(bytes) => postcard::from_bytes(&bytes).map(Some).map_err(|_| FrameError::Decode(what)),
        }
    }
}

/// Sends one control request on a new stream of `conn` and waits for the answer.
pub async fn request(conn: &iroh::endpoint::Connection, request: Request) -> anyhow::Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await?;
    frame::write_value(&mut send, &Open::Control(request)).await?;
    send.finish()?;
    let response: Option<Response> =
        tokio::time::timeout(Duration::from_secs(60), frame::read_value(&mut recv, CONTROL_MAX, "response"))
            .await??;
    match response {
        Some(Response::Error(why)) => anyhow::bail!("the cloud refused: {why}"),
        Some(r) => Ok(r),
        None => anyhow::bail!("the cloud closed the stream without an answer"),
    }
}

/// How a driven session ended.
#[derive(Debug)]
pub struct Driven {
    pub outcome: Outcome,
    pub frames_sent: u64,
    pub bytes_sent: u64,
}

/// Runs `session` over a stream until it finishes. `handle` passes one incoming message to the
/// session with the caller's state (locked inside the closure); `timeout` does the same for the
/// session's timer. The stream's send side is finished at the end.
pub async fn drive<H, T>(
    session: &mut AuthSession,
    send: &mut SendStream,
    recv: &mut RecvStream,
    mut handle: H,
    mut timeout: T,
) -> Result<Driven, FrameError>
where
    H: FnMut(&mut AuthSession, Micros, &[u8]) -> Result<(), SyncError>,
    T: FnMut(&mut AuthSession, Micros),
{
    let mut frames_sent = 0;
    let mut bytes_sent = 0;
    loop {
        while let Some(out) = session.poll_transmit() {
            frames_sent += 1;
            bytes_sent += out.len() as u64 + 4;
            frame::write(send, &out).await?;
        }
        let outcome = session.outcome();
        if !matches!(outcome, Outcome::Running) {
            let _ = send.finish();
            return Ok(Driven { outcome, frames_sent, bytes_sent });
        }
        let wait = session
            .poll_timeout()
            .map(|at| Duration::from_micros(at.saturating_sub(now_us())))
            .unwrap_or(Duration::from_secs(120));
        tokio::select! {
            got = frame::read(recv, FRAME_MAX) => match got? {
                Some(bytes) => {
                    // A refused or malformed message ends the session (the outcome says why);
                    // the error itself is in the outcome.
                    let _ = handle(session, now_us(), &bytes);
                }
                None => {
                    let _ = send.finish();
                    let outcome = match session.outcome() {
                        Outcome::Running => Outcome::Failed(SyncError::ConnectionLost),
                        o => o,
                    };
                    return Ok(Driven { outcome, frames_sent, bytes_sent });
                }
            },
            _ = tokio::time::sleep(wait) => timeout(session, now_us()),
        }
    }
}

/// The direct (IP) addresses of an endpoint address.
pub fn ip_addrs(addr: &EndpointAddr) -> Vec<std::net::SocketAddr> {
    addr.ip_addrs().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::frame;

    /// A length prefix the peer never fills ends as `Truncated`, and a whole frame reads back.
    #[tokio::test]
    async fn a_frame_is_read_only_as_far_as_it_arrived() {
        let mut claimed = &[0u8, 0x10, 0, 0, 1, 2, 3][..];
        assert!(matches!(frame::read(&mut claimed, 1 << 20).await, Err(super::FrameError::Truncated)));
        let mut whole = &[0u8, 0, 0, 3, 7, 8, 9][..];
        assert_eq!(frame::read(&mut whole, 16).await.unwrap(), Some(vec![7, 8, 9]));
        let mut over = &[0u8, 0, 1, 0][..];
        assert!(matches!(frame::read(&mut over, 16).await, Err(super::FrameError::TooLarge(256, 16))));
    }
}
