//! What the `feedmesh` node and `feedmesh-relay` share on the network.
//!
//! - **Endpoints** ([`endpoint`]): one iroh endpoint per process, keyed by the device's (or the
//!   cloud's) ed25519 key, so the key QUIC/TLS authenticates *is* the directory's device id and
//!   the channel key a ticket is bound to. No public relays, no DNS or pkarr lookup: a deployment
//!   uses its own relay, and peers learn each other's addresses from the cloud.
//! - **Frames** ([`frame`]): every message on a stream is a 4-byte big-endian length and that
//!   many bytes, bounded by [`FRAME_MAX`]; a longer length ends the stream with a typed error
//!   before its body is buffered, and a frame's buffer grows only with the bytes that arrive.
//!   Reading is cancel-safe ([`frame::Reader`]), so a timer racing a read never tears a frame.
//! - **Streams**: each bidirectional stream opens with one [`Open`] frame: a sync session (engine
//!   `AuthSession` messages follow) or one control [`Request`] (one [`Response`] follows). The
//!   cloud sends [`Notice`]s on unidirectional streams.
//! - **The session driver** ([`drive`]): runs a sans-IO engine session over a stream, with the
//!   caller's state behind its own lock.
//!
//! Wall time enters here (tickets are checked against it); the engine still takes it from us.
//! A driven session's timers run on a monotonic clock (`SessionClock`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use engine::authz::AuthSession;
use engine::signing::DeviceId;
use engine::sync::{Config, Micros, Outcome, SyncError};
use engine::ticket::ChannelKey;
use iroh::endpoint::{RecvStream, SendStream};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, RelayUrl, SecretKey};
use serde::Serialize;

pub mod store;
pub mod stored;
pub mod syndication;

/// Waits for SIGINT (Ctrl-C) or SIGTERM (`kill`, systemd, containers): both stop a daemon the
/// same clean way. The signal's name, for the line the daemon logs.
pub async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}
pub mod view;

/// The one ALPN both binaries speak.
pub const ALPN: &[u8] = b"feedmesh/1";

/// Largest frame: an engine message (1 MiB) with room for the envelope.
pub const FRAME_MAX: usize = (1 << 20) + 4096;

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
        // Reliable and ordered: the next chunks travel while the peer stores this one.
        send_ahead: 1,
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
    // The session checks each item whole (content included) when it takes the message; here
    // only what the signatures cover is needed.
    let items: Vec<_> =
        message.body.items().iter().filter_map(|w| engine::wire::from_wire_structure(w).ok()).collect();
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

pub use engine::control::{ControlError, Notice, Open, PairView, PeerAddr, Request, Response, CONTROL_MAX};

/// The cloud refused a control request, for a typed reason (callers match on it with
/// `anyhow::Error::downcast_ref`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the cloud refused: {0}")]
pub struct CloudRefused(pub ControlError);

/// A device's address as the control plane carries it.
pub fn peer_addr(addr: &EndpointAddr) -> PeerAddr {
    PeerAddr {
        device: device_of(addr.id),
        relay: addr.relay_urls().next().map(|u| u.to_string()),
        direct: addr.ip_addrs().copied().collect(),
    }
}

/// An iroh address from the control plane's, if its device id is a key and its relay URL parses.
pub fn endpoint_addr(addr: &PeerAddr) -> Option<EndpointAddr> {
    let id = endpoint_id(&addr.device)?;
    let mut addrs: Vec<iroh::TransportAddr> = Vec::new();
    if let Some(relay) = &addr.relay {
        addrs.push(iroh::TransportAddr::Relay(relay.parse::<RelayUrl>().ok()?));
    }
    addrs.extend(addr.direct.iter().map(|a| iroh::TransportAddr::Ip(*a)));
    Some(EndpointAddr::from_parts(id, addrs))
}

/// Errors on a stream.
#[derive(Clone, Debug, thiserror::Error)]
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

/// What the byte source under a [`frame::Reader`] fails with (a reset or lost QUIC stream).
impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Stream(e.to_string())
    }
}

/// Frames on QUIC streams: a 4-byte big-endian length, then that many bytes. This is what
/// tokio-util's `LengthDelimitedCodec` reads and writes with a 4-byte big-endian length field
/// (its default; tested), and what every earlier release sent, so old and new peers interoperate.
///
/// Reading is cancel-safe: a [`Reader`] is a `FramedRead`, whose buffer keeps what arrived of a
/// frame when a read is dropped unfinished (a `select!` whose timer won, a timeout), so the next
/// read goes on where it stopped. A read that kept its partial frame in a local, as the
/// `read_exact`-style reader before it did, tore the stream when a timer fired mid-frame.
pub mod frame {
    use std::future::poll_fn;
    use std::pin::Pin;

    use futures_core::Stream;
    use tokio::io::AsyncRead;
    use tokio_util::bytes::{Buf, BufMut, BytesMut};
    use tokio_util::codec::{Decoder, Encoder, FramedRead};

    use super::*;

    /// Bytes of a frame's length prefix.
    pub const HEAD: usize = 4;

    /// When the reader's buffer fills inside a frame, it makes room for what the frame still
    /// needs, but at most this much (or twice what it holds, as a `Vec` grows, if that is more).
    /// So a frame's buffer grows with what arrives, and a length prefix the peer never fills
    /// costs what arrived and at most this beside the reader's first 8 KiB, not what it claims.
    pub const FRAME_PREALLOC: usize = 64 << 10;

    /// Every frame this process reads or writes, kept while [`tap::start`] is on (off unless a
    /// test turns it on): a test that runs the relay in its own process looks for plaintext in
    /// what the cloud received and sent, after QUIC's decryption.
    pub mod tap {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Mutex;

        static ON: AtomicBool = AtomicBool::new(false);
        static BYTES: Mutex<Vec<u8>> = Mutex::new(Vec::new());

        pub fn start() {
            ON.store(true, Ordering::SeqCst);
        }

        /// What was recorded since the last call.
        pub fn take() -> Vec<u8> {
            std::mem::take(&mut *BYTES.lock().unwrap_or_else(|p| p.into_inner()))
        }

        /// Whether `needle` is anywhere in what was recorded (or across two frames' seam).
        pub fn contains(needle: &[u8]) -> bool {
            let bytes = BYTES.lock().unwrap_or_else(|p| p.into_inner());
            !needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle)
        }

        /// Bytes recorded so far.
        pub fn len() -> usize {
            BYTES.lock().unwrap_or_else(|p| p.into_inner()).len()
        }

        pub(super) fn record(frame: &[u8]) {
            if ON.load(Ordering::Relaxed) {
                BYTES.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(frame);
            }
        }
    }

    /// The frame format as a tokio-util codec, for frames of at most `max` bytes.
    ///
    /// Not `LengthDelimitedCodec` itself, though it reads and writes the same bytes: once a
    /// header arrives that codec reserves the whole length it claims (tokio-util 0.7,
    /// `decode_head`), so four bytes from a peer would cost us up to the limit, and its limit
    /// error is an `io::Error` rather than [`FrameError::TooLarge`]. This one looks at the header
    /// without taking it until the whole frame is there, so it holds no state of its own: what
    /// arrived of a frame is only ever in the buffer the `FramedRead` keeps.
    #[derive(Clone, Copy, Debug)]
    pub struct Codec {
        pub max: usize,
    }

    impl Decoder for Codec {
        type Item = BytesMut;
        type Error = FrameError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
            let Some(head) = src.first_chunk::<HEAD>() else { return Ok(None) };
            let len = u32::from_be_bytes(*head) as usize;
            if len > self.max {
                return Err(FrameError::TooLarge(len, self.max));
            }
            let whole = HEAD + len;
            if src.len() < whole {
                // Only when full: room asked for while some is left would double the buffer
                // again on every read that arrives within a chunk of its end.
                if src.len() == src.capacity() {
                    src.reserve((whole - src.len()).min(FRAME_PREALLOC));
                }
                return Ok(None);
            }
            src.advance(HEAD);
            let frame = src.split_to(len);
            debug_assert_eq!(frame.len(), len);
            tap::record(&frame);
            Ok(Some(frame))
        }

        /// At the end of the stream: the frames still buffered, then a clean end if it came
        /// between frames and `Truncated` if it came inside one.
        fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
            match self.decode(src)? {
                Some(frame) => Ok(Some(frame)),
                None if src.is_empty() => Ok(None),
                None => Err(FrameError::Truncated),
            }
        }
    }

    impl Encoder<&[u8]> for Codec {
        type Error = FrameError;

        fn encode(&mut self, bytes: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
            let too_large = FrameError::TooLarge(bytes.len(), self.max);
            if bytes.len() > self.max {
                return Err(too_large);
            }
            let len = u32::try_from(bytes.len()).map_err(|_| too_large)?;
            tap::record(bytes);
            dst.reserve(HEAD + bytes.len());
            dst.put_u32(len);
            dst.extend_from_slice(bytes);
            Ok(())
        }
    }

    /// Writes one frame (at most [`CONTROL_MAX`] bytes) with one write. Writes are not raced
    /// against timers (the driver sends everything its session polled before it waits), so
    /// they need no buffer that outlives a call.
    pub async fn write(send: &mut SendStream, bytes: &[u8]) -> Result<(), FrameError> {
        let mut wire = BytesMut::new();
        Codec { max: CONTROL_MAX }.encode(bytes, &mut wire)?;
        send.write_all(&wire).await.map_err(|e| FrameError::Stream(e.to_string()))
    }

    /// Writes many frames (each at most [`CONTROL_MAX`] bytes) with one write and no copy: each
    /// frame's header and bytes go to the stream as chunks it takes over (a content response's
    /// groups: a write per 16 KiB group cost more than the rest of sending it).
    pub async fn write_frames(send: &mut SendStream, frames: Vec<Vec<u8>>) -> Result<(), FrameError> {
        let mut chunks = Vec::with_capacity(frames.len() * 2);
        for frame in frames {
            let too_large = FrameError::TooLarge(frame.len(), CONTROL_MAX);
            if frame.len() > CONTROL_MAX {
                return Err(too_large);
            }
            let len = u32::try_from(frame.len()).map_err(|_| too_large)?;
            tap::record(&frame);
            chunks.push(tokio_util::bytes::Bytes::copy_from_slice(&len.to_be_bytes()));
            chunks.push(tokio_util::bytes::Bytes::from(frame));
        }
        send.write_all_chunks(&mut chunks).await.map_err(|e| FrameError::Stream(e.to_string()))
    }

    /// Writes a serialisable value as one frame.
    /// Writes one control value (`engine::control::encode`: the version byte, then postcard).
    pub async fn write_value<T: Serialize>(send: &mut SendStream, value: &T) -> Result<(), FrameError> {
        write(send, &engine::control::encode(value)).await
    }

    /// Reads the frames of one stream, cancel-safely. Make one per stream and read every frame
    /// of it through it: its buffer may already hold bytes of the next frame. Generic over the
    /// byte source so that tests and the fuzzer (`fuzzing`, target `frame`) feed it the way a
    /// QUIC stream does.
    #[derive(Debug)]
    pub struct Reader<R> {
        frames: FramedRead<R, Codec>,
        /// The error that ended the stream, given again by later reads (after a bad header
        /// the bytes that follow are not frames).
        failed: Option<FrameError>,
    }

    /// What ended a wait for the next frame ([`Reader::next_before`]).
    #[derive(Debug)]
    pub enum Next {
        Frame(BytesMut),
        /// The peer finished the stream cleanly between frames.
        End,
        /// The deadline passed first.
        Deadline,
    }

    impl<R: AsyncRead + Unpin> Reader<R> {
        pub fn new(recv: R) -> Self {
            Reader { frames: FramedRead::new(recv, Codec { max: 0 }), failed: None }
        }

        /// Reads one frame of at most `max` bytes; `None` when the peer finished the stream
        /// cleanly between frames. Cancel-safe: dropped unfinished, it loses nothing.
        pub async fn read(&mut self, max: usize) -> Result<Option<BytesMut>, FrameError> {
            if let Some(e) = &self.failed {
                return Err(e.clone());
            }
            self.frames.decoder_mut().max = max;
            match poll_fn(|cx| Pin::new(&mut self.frames).poll_next(cx)).await {
                None => Ok(None),
                Some(Ok(frame)) => Ok(Some(frame)),
                Some(Err(e)) => {
                    self.failed = Some(e.clone());
                    Err(e)
                }
            }
        }

        /// Reads one frame and decodes it. Cancel-safe as [`Reader::read`].
        /// Reads one control value (`engine::control::decode`: version, size and bounds checked).
        pub async fn read_value<T: serde::de::DeserializeOwned + engine::control::Bounded>(
            &mut self,
            max: usize,
            what: &'static str,
        ) -> Result<Option<T>, FrameError> {
            match self.read(max).await? {
                None => Ok(None),
                Some(bytes) => {
                    engine::control::decode(&bytes, max).map(Some).map_err(|_| FrameError::Decode(what))
                }
            }
        }

        /// Bytes read from the source and not yet handed out.
        #[cfg(test)]
        pub(crate) fn buffered(&self) -> usize {
            self.frames.read_buffer().len()
        }

        /// The capacity of the reader's buffer.
        #[cfg(test)]
        pub(crate) fn buffer_capacity(&self) -> usize {
            self.frames.read_buffer().capacity()
        }

        /// Waits for the next frame of at most `max` bytes or for `deadline`, whichever comes
        /// first. A deadline that passes inside a frame leaves what arrived of it buffered for
        /// the next call.
        pub async fn next_before(
            &mut self,
            max: usize,
            deadline: tokio::time::Instant,
        ) -> Result<Next, FrameError> {
            tokio::select! {
                // `read` is cancel-safe, so losing to the timer costs nothing.
                got = self.read(max) => Ok(match got? {
                    Some(frame) => Next::Frame(frame),
                    None => Next::End,
                }),
                () = tokio::time::sleep_until(deadline) => Ok(Next::Deadline),
            }
        }
    }

    /// Reads the one frame a stream carries (a control response, a notice) and decodes it; bytes
    /// after that frame are dropped with the reader, so a stream of several frames needs a
    /// [`Reader`] kept for all of them.
    pub async fn read_value<T: serde::de::DeserializeOwned + engine::control::Bounded>(
        recv: &mut (impl AsyncRead + Unpin),
        max: usize,
        what: &'static str,
    ) -> Result<Option<T>, FrameError> {
        Reader::new(recv).read_value(max, what).await
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
        Some(Response::Refused(why)) => Err(CloudRefused(why).into()),
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

/// How long a driven session waits for its peer when it has no timer armed.
const DRIVE_WAIT_MAX: Duration = Duration::from_secs(120);

/// The clock a driven session runs on: this machine's Unix time when the driver started
/// (tickets are checked against the session's time, so it must be wall time), advanced by a
/// monotonic clock. A wall clock that steps during a session neither fires its timers early nor
/// holds them back, the time it is given never goes backwards, and a deadline it polled is due
/// by the session's own time when the timer for it fires.
#[derive(Clone, Copy, Debug)]
pub struct SessionClock {
    wall_us: Micros,
    start: tokio::time::Instant,
}

impl SessionClock {
    pub fn start() -> Self {
        SessionClock { wall_us: now_us(), start: tokio::time::Instant::now() }
    }

    /// The session's time now.
    pub fn now_us(&self) -> Micros {
        self.wall_us.saturating_add(self.start.elapsed().as_micros() as Micros)
    }

    /// The monotonic instant at which the session's time is `at` (now, if it already was).
    pub fn instant_of(&self, at: Micros) -> tokio::time::Instant {
        let after = Duration::from_micros(at.saturating_sub(self.wall_us));
        // Beyond what an Instant holds: wake after the longest wait, then look again.
        self.start.checked_add(after).unwrap_or_else(|| tokio::time::Instant::now() + DRIVE_WAIT_MAX)
    }
}

/// Runs `session` over a stream until it finishes. `handle` passes one incoming message to the
/// session with the caller's state (locked inside the closure); `timeout` does the same for the
/// session's timer. Both get the session's time on a [`SessionClock`] (Unix micros when the
/// driver started, advanced monotonically). `recv` is the stream's [`frame::Reader`], which the
/// caller may have read the stream's first frames from. The stream's send side is finished at
/// the end.
pub async fn drive<H, T>(
    session: &mut AuthSession,
    send: &mut SendStream,
    recv: &mut frame::Reader<RecvStream>,
    mut handle: H,
    mut timeout: T,
) -> Result<Driven, FrameError>
where
    H: FnMut(&mut AuthSession, Micros, &[u8]) -> Result<(), SyncError>,
    T: FnMut(&mut AuthSession, Micros),
{
    let clock = SessionClock::start();
    let mut frames_sent = 0;
    let mut bytes_sent = 0;
    loop {
        while let Some(out) = session.poll_transmit() {
            frames_sent += 1;
            bytes_sent += (frame::HEAD + out.len()) as u64;
            frame::write(send, &out).await?;
        }
        let outcome = session.outcome();
        if !matches!(outcome, Outcome::Running) {
            let _ = send.finish();
            return Ok(Driven { outcome, frames_sent, bytes_sent });
        }
        let deadline = match session.poll_timeout() {
            Some(at) => clock.instant_of(at),
            None => tokio::time::Instant::now() + DRIVE_WAIT_MAX,
        };
        // Cancel-safe: a deadline that passes inside a frame leaves it buffered in `recv`.
        match recv.next_before(FRAME_MAX, deadline).await? {
            frame::Next::Frame(bytes) => {
                // A refused or malformed message ends the session (the outcome says why);
                // the error itself is in the outcome.
                let _ = handle(session, clock.now_us(), &bytes);
            }
            frame::Next::End => {
                let _ = send.finish();
                let outcome = match session.outcome() {
                    Outcome::Running => Outcome::Failed(SyncError::ConnectionLost),
                    o => o,
                };
                return Ok(Driven { outcome, frames_sent, bytes_sent });
            }
            frame::Next::Deadline => timeout(session, clock.now_us()),
        }
    }
}

/// The direct (IP) addresses of an endpoint address.
pub fn ip_addrs(addr: &EndpointAddr) -> Vec<std::net::SocketAddr> {
    addr.ip_addrs().copied().collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::time::Instant;
    use tokio_util::bytes::{Bytes, BytesMut};
    use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

    use super::frame::{self, Next, Reader};
    use super::{FrameError, SessionClock, CONTROL_MAX, FRAME_MAX};

    /// A length prefix the peer never fills ends as `Truncated` and costs a chunk, not what it
    /// claims; a whole frame reads back; a length over the limit is `TooLarge`, again on every
    /// later read.
    #[tokio::test(start_paused = true)]
    async fn a_frame_is_read_only_as_far_as_it_arrived() {
        let mut claimed = Reader::new(&[0u8, 0x10, 0, 0, 1, 2, 3][..]);
        assert!(matches!(claimed.read(1 << 20).await, Err(FrameError::Truncated)));
        let mut whole = Reader::new(&[0u8, 0, 0, 3, 7, 8, 9][..]);
        assert_eq!(whole.read(16).await.unwrap().as_deref(), Some(&[7u8, 8, 9][..]));
        assert!(whole.read(16).await.unwrap().is_none());
        let mut over = Reader::new(&[0u8, 0, 1, 0][..]);
        assert!(matches!(over.read(16).await, Err(FrameError::TooLarge(256, 16))));
        assert!(matches!(over.read(1 << 10).await, Err(FrameError::TooLarge(256, 16))));

        // A header claiming CONTROL_MAX and three bytes of it, on a stream that stays open.
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(&[0x00, 0x80, 0, 0, 1, 2, 3]).await.unwrap();
        let mut open = Reader::new(rx);
        let soon = Instant::now() + Duration::from_secs(1);
        assert!(matches!(open.next_before(CONTROL_MAX, soon).await, Ok(Next::Deadline)));
        let capacity = open.buffer_capacity();
        assert!(capacity <= (8 << 10) + frame::FRAME_PREALLOC, "{capacity} bytes for 7 that arrived");
        drop(tx);
        assert!(matches!(open.read(CONTROL_MAX).await, Err(FrameError::Truncated)));
    }

    /// A frame that arrives in two parts with a pause between, while the driver's timer fires
    /// again and again: it comes out whole, and the frame after it too (the stream stays in
    /// step). With the reader before `frame::Reader`, which kept a partial frame in the read's
    /// own future, the first timer dropped 54 bytes and the next read took body bytes for a
    /// length (`TooLarge(842216501, ..)`).
    #[tokio::test(start_paused = true)]
    async fn a_timer_firing_inside_a_frame_does_not_tear_it() {
        let first: Vec<u8> = (0..100u8).collect();
        let second = vec![42u8; 10];
        let mut wire = Vec::new();
        for f in [&first, &second] {
            wire.extend((f.len() as u32).to_be_bytes());
            wire.extend(f);
        }
        let (mut tx, rx) = tokio::io::duplex(256);
        let writer = tokio::spawn(async move {
            tx.write_all(&wire[..54]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            tx.write_all(&wire[54..]).await.unwrap();
        });
        let mut recv = Reader::new(rx);
        let (mut frames, mut deadlines) = (Vec::new(), 0);
        loop {
            match recv.next_before(FRAME_MAX, Instant::now() + Duration::from_secs(1)).await.unwrap() {
                Next::Frame(f) => frames.push(f.to_vec()),
                Next::End => break,
                Next::Deadline => {
                    deadlines += 1;
                    if frames.is_empty() {
                        assert_eq!(recv.buffered(), 54, "what arrived of the frame is kept");
                    }
                }
            }
        }
        writer.await.unwrap();
        assert_eq!(frames, [first, second]);
        assert!(deadlines >= 9, "the timer fired {deadlines} times inside the frame");
    }

    /// The bytes on the wire are `LengthDelimitedCodec`'s with a 4-byte big-endian length (and
    /// what the writer before this codec sent): each side reads what the other writes.
    #[test]
    fn the_format_is_length_delimited_with_a_u32_big_endian_length() {
        let old_wire = [0u8, 0, 0, 3, 7, 8, 9, 0, 0, 0, 0];
        let mut standard = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .big_endian()
            .max_frame_length(16)
            .new_codec();
        let mut ours = frame::Codec { max: 16 };

        let mut written = BytesMut::new();
        ours.encode(&[7u8, 8, 9][..], &mut written).unwrap();
        ours.encode(&[][..], &mut written).unwrap();
        let mut theirs = BytesMut::new();
        standard.encode(Bytes::from_static(&[7, 8, 9]), &mut theirs).unwrap();
        standard.encode(Bytes::new(), &mut theirs).unwrap();
        assert_eq!(&written[..], &old_wire[..]);
        assert_eq!(&theirs[..], &old_wire[..]);

        let mut buf = BytesMut::from(&old_wire[..]);
        assert_eq!(ours.decode(&mut buf).unwrap().as_deref(), Some(&[7u8, 8, 9][..]));
        assert_eq!(ours.decode(&mut buf).unwrap().as_deref(), Some(&[][..]));
        assert!(ours.decode_eof(&mut buf).unwrap().is_none());
        let mut buf = BytesMut::from(&old_wire[..]);
        assert_eq!(standard.decode(&mut buf).unwrap().as_deref(), Some(&[7u8, 8, 9][..]));

        assert!(matches!(ours.encode(&[0u8; 17][..], &mut written), Err(FrameError::TooLarge(17, 16))));
    }

    /// A driven session's time follows the monotonic (here paused) clock from the wall time the
    /// driver started at, and a deadline it polls is due by its time when the timer fires.
    #[tokio::test(start_paused = true)]
    async fn a_driven_session_runs_on_a_monotonic_clock() {
        let clock = SessionClock::start();
        let before = clock.now_us();
        assert!(before.abs_diff(super::now_us()) < 60_000_000);
        let at = before + 5_000_000;
        let fire = clock.instant_of(at);
        tokio::time::sleep_until(fire).await;
        assert!(clock.now_us() >= at);
        assert_eq!(clock.now_us() - before, 5_000_000);
        assert!(clock.instant_of(before - 1) <= Instant::now(), "a past deadline is due now");
    }
}
