//! The HTTP API's connections: the accept loop and the bounds on every connection, so that idle,
//! slow (slowloris) or numerous connections cannot take the relay's file handles.
//!
//! `axum::serve` has none of these, so the API is served here with hyper's HTTP/1 connection
//! driver, which axum uses underneath:
//!
//! - at most `http_connections_per_address` connections from one peer address (trusted proxies
//!   are exempt); one more is closed as soon as it is accepted
//!   (`feedmesh_refusals_total{kind="http-connections"}`);
//! - at most `http_connections_max` at once. When they are all taken, a new connection is still
//!   admitted and one that is not handling a request (idle, or still sending a header) is closed
//!   in its place: from the address holding the most connections, its oldest
//!   (`kind="http-connections-evicted"`). So attackers spread over many addresses cannot keep a
//!   monitoring check or a new client out by filling the table (the load benchmark
//!   `relay_load` found exactly that). Only when every connection is handling a request is the
//!   new one closed instead;
//! - a request's header must arrive within `http_header_timeout_ms` of the connection being ready
//!   for it (hyper's `header_read_timeout`, which also closes a keep-alive connection that sends
//!   no next request);
//! - its body within `http_body_timeout_ms` of the header ([`Deadline`]): later, reading it fails
//!   and the handler answers 400;
//! - a connection that moves no byte either way for `http_idle_timeout_ms` while none of its
//!   requests is being handled (a client that stops reading its answer) is closed. A long-poll
//!   being handled is not idle.
//!
//! Tests: `relay/tests/http_connections.rs`.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::metrics::{Metrics, Reason};

/// How long the accept loop pauses after an error that is not one connection's (out of file
/// handles, say), rather than spinning.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The bounds on the API's connections (from [`crate::Limits`]).
#[derive(Clone, Debug)]
pub struct Bounds {
    pub connections_max: usize,
    pub connections_per_address: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    /// Peers exempt from the per-address cap (reverse proxies speak for many clients).
    pub trusted_proxies: Vec<IpAddr>,
}

impl Bounds {
    pub fn new(limits: &crate::Limits, trusted_proxies: Vec<IpAddr>) -> Self {
        Self {
            connections_max: limits.http_connections_max.max(1),
            connections_per_address: limits.http_connections_per_address.max(1),
            header_timeout: Duration::from_millis(limits.http_header_timeout_ms.max(1)),
            body_timeout: Duration::from_millis(limits.http_body_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(limits.http_idle_timeout_ms.max(1)),
            trusted_proxies,
        }
    }
}

/// Serves `router` on `listener` until the returned future is dropped (which closes every
/// connection it serves).
pub async fn serve(listener: TcpListener, router: Router, bounds: Bounds, metrics: Metrics) {
    let bounds = Arc::new(bounds);
    let open = Arc::new(Open { counts: Mutex::new(Counts::default()), bounds: bounds.clone(), metrics });
    // At most `connections_max` running (each holds a slot), plus finished ones not yet reaped.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an HTTP connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(slot) = Open::admit(&open, peer.ip()) else {
            open.metrics.refusals.get_or_create(&Reason::new("http-connections")).inc();
            drop(stream);
            continue;
        };
        tasks.spawn(connection(stream, peer, slot, router.clone(), bounds.clone()));
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Open connections, in all and by peer address. Every address in the map has at least one
/// connection, so it holds at most `connections_max` entries (plus those being evicted).
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_address: BTreeMap<IpAddr, usize>,
    /// Every open connection not yet told to close, by admission order.
    live: BTreeMap<u64, (IpAddr, Arc<Activity>)>,
    next_id: u64,
}

impl Counts {
    /// Tells one connection that is handling no request to close (see the module docs); whether
    /// there was one.
    fn evict(&mut self) -> bool {
        let victim = self
            .live
            .iter()
            .filter(|(_, (_, activity))| activity.busy.load(Ordering::Relaxed) == 0)
            .max_by_key(|(id, (ip, _))| {
                (self.by_address.get(ip).copied().unwrap_or(0), std::cmp::Reverse(**id))
            })
            .map(|(id, _)| *id);
        let Some((_, activity)) = victim.and_then(|id| self.live.remove(&id)) else { return false };
        activity.evict.notify_one();
        true
    }
}

#[derive(Debug)]
struct Open {
    counts: Mutex<Counts>,
    bounds: Arc<Bounds>,
    metrics: Metrics,
}

impl Open {
    /// A slot for a connection from `ip`, if both caps allow one.
    /// Work: one pass over the open connections when the table is full (at most
    /// `connections_max` plus those being evicted), under the connection table's own lock.
    fn admit(this: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut counts = this.counts.lock().unwrap_or_else(|e| e.into_inner());
        let exempt = this.bounds.trusted_proxies.contains(&ip);
        let mine = counts.by_address.get(&ip).copied().unwrap_or(0);
        if !exempt && mine >= this.bounds.connections_per_address {
            return None;
        }
        if counts.live.len() >= this.bounds.connections_max {
            if !counts.evict() {
                return None;
            }
            this.metrics.refusals.get_or_create(&Reason::new("http-connections-evicted")).inc();
        }
        counts.total += 1;
        counts.by_address.insert(ip, mine + 1);
        let id = counts.next_id;
        counts.next_id += 1;
        let activity = Arc::new(Activity::new());
        counts.live.insert(id, (ip, activity.clone()));
        this.metrics.http_connections.inc();
        Some(Slot { open: this.clone(), ip, id, activity })
    }
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
struct Slot {
    open: Arc<Open>,
    ip: IpAddr,
    id: u64,
    activity: Arc<Activity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.open.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.live.remove(&self.id);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_address.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.by_address.remove(&self.ip);
            }
        }
        self.open.metrics.http_connections.dec();
    }
}

/// Serves one connection until it ends, a timeout closes it, or the server stops.
async fn connection(stream: TcpStream, peer: SocketAddr, slot: Slot, router: Router, bounds: Arc<Bounds>) {
    let activity = slot.activity.clone();
    let _slot = slot;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Tracked { inner: stream, activity: activity.clone() });
    let body_timeout = bounds.body_timeout;
    let service = hyper::service::service_fn({
        let activity = activity.clone();
        move |req: hyper::Request<Incoming>| {
            let busy = Busy::enter(&activity);
            let mut req = req.map(|body| Deadline::new(body, body_timeout));
            req.extensions_mut().insert(ConnectInfo(peer));
            let answer = router.clone().oneshot(req);
            async move {
                let response = answer.await;
                drop(busy);
                response
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(bounds.header_timeout).keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::select! {
        served = conn => {
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        }
        () = activity.idle(bounds.idle_timeout) => {
            tracing::debug!(%peer, "closing an idle HTTP connection");
        }
        () = activity.evict.notified() => {
            tracing::debug!(%peer, "closing an HTTP connection to make room for a new one");
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are being handled.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
    /// Told when the connection must close to make room (see [`Counts::evict`]).
    evict: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            evict: tokio::sync::Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Returns once the connection has been idle for `idle`: no byte moved and no request
    /// handled. Wakes at most once per `idle` while it is not.
    async fn idle(&self, idle: Duration) {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        loop {
            let quiet_ms = self.now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed));
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            if !busy && quiet_ms >= idle_ms {
                return;
            }
            let wait_ms = if busy { idle_ms } else { idle_ms - quiet_ms };
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
    }
}

/// A request being handled (counted down however its handler ends).
struct Busy(Arc<Activity>);

impl Busy {
    fn enter(activity: &Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        activity.touch();
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream that records when it last moved a byte.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0} ms")]
pub struct BodyTimeout(u128);

/// A request body that fails once `timeout` has passed since the request's header.
pub struct Deadline<B> {
    inner: B,
    at: Instant,
    timeout: Duration,
    /// Armed on the first wait (most bodies are empty or arrive with the header).
    sleep: Option<Pin<Box<Sleep>>>,
    expired: bool,
}

impl<B> Deadline<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self { inner, at: Instant::now() + timeout, timeout, sleep: None, expired: false }
    }
}

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let at = this.at;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.expired = true;
            return Poll::Ready(Some(Err(BodyTimeout(this.timeout.as_millis()).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> std::fmt::Debug for Deadline<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadline").field("at", &self.at).field("expired", &self.expired).finish()
    }
}
