//! The relay's HTTP API (axum).
//!
//! Public: `GET /health`, `GET /metrics`, `GET /v1/connect` (what `feedmesh init` needs),
//! `POST /v1/login`. Everything else takes `Authorization: Bearer TOKEN` (a login token, an
//! admin-issued account token, or the admin token) and shows what that account's user may see:
//! users, devices, folders, members, invitations, items (JSON), feeds as FeedSync Atom
//! (`GET /v1/folders/{id}/feed.atom?since=SEQ`), a FeedSync feed merged by POST, and long-poll
//! notifications (`GET /v1/notifications?since=N&epoch=E&timeout=S`, held up to 60 s; an
//! answer carries `latest` and `epoch` for the next call, and `resync: true` when events may
//! have been missed: the relay restarted, or the cursor is older than the events kept).
//!
//! `POST /v1/logout` revokes the presented token. Tokens expire (`limits.token_ttl_secs`) and
//! survive a restart (the store keeps their hashes); an account keeps at most
//! `tokens_per_account`, and issuing one more drops its oldest. A long-poll waits only while its
//! token lives: logging the token out, or its expiry, ends it with 401.
//!
//! A long-poll shows folder events of folders the caller may see, and directory events that
//! concern the caller's user (its devices, folders it takes part in, invitations to it: see
//! `cloud::directory_audience`); the admin sees every event.
//!
//! Limits: connections, and how long a header, a body or an idle connection may take
//! ([`conn`]); a token bucket per client address on every request (`http_requests_per_second`,
//! `http_burst`); login attempts per (account, client) and per client, with argon2 lanes
//! ([`crate::login`]); long-polls waiting at once, in all (`long_polls_max`, then 503), per
//! account (`long_polls_per_account`) and per client address (`long_polls_per_address`, then
//! 429). Refusals carry `Retry-After`. Behind a reverse proxy listed in `trusted_proxies`, the
//! client is the forwarded address; otherwise every client behind it shares its address.
//!
//! Errors are JSON `{"error": CODE, "message": TEXT}` with a fitting status, on every route and
//! for unknown ones ([`error_code`]: one stable code per status).

pub mod conn;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo as Peer, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use engine::directory::{FolderId, InviteState, MemberState, UserId};
use engine::feedsync::{read_feed, Item};
use engine::replica::Seq;
use engine::signing::{hex, unhex, DeviceId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cloud::{Cloud, LoginError};
use crate::limit::Buckets;
use crate::metrics::Reason;

/// The HTTP API's own limits (per client address, per account).
#[derive(Debug)]
pub struct Guard {
    requests: std::sync::Mutex<Buckets<IpAddr>>,
    trusted_proxies: Vec<IpAddr>,
    long_polls: std::sync::Mutex<LongPolls>,
    long_polls_max: usize,
    long_polls_per_account: usize,
    long_polls_per_address: usize,
}

impl Guard {
    pub fn new(limits: &crate::Limits, trusted_proxies: Vec<IpAddr>) -> Self {
        Self {
            requests: std::sync::Mutex::new(Buckets::new(
                f64::from(limits.http_requests_per_second),
                f64::from(limits.http_burst),
                1 << 16,
            )),
            trusted_proxies,
            long_polls: std::sync::Mutex::new(LongPolls::default()),
            long_polls_max: limits.long_polls_max,
            long_polls_per_account: limits.long_polls_per_account,
            long_polls_per_address: limits.long_polls_per_address,
        }
    }

    fn long_polls(&self) -> std::sync::MutexGuard<'_, LongPolls> {
        self.long_polls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Long-polls waiting, in all, by account ("" for the admin) and by client address. Every key
/// has at least one waiting, so each map holds at most `long_polls_max` entries.
#[derive(Debug, Default)]
struct LongPolls {
    total: usize,
    by_account: BTreeMap<String, usize>,
    by_address: BTreeMap<IpAddr, usize>,
}

/// Why a long-poll was turned away.
#[derive(Clone, Copy, Debug)]
enum LongPollRefusal {
    /// `long_polls_max` are waiting (503).
    Full,
    /// The account has `long_polls_per_account` waiting (429).
    Account,
    /// The address has `long_polls_per_address` waiting (429).
    Address,
}

/// `Retry-After` for a refused long-poll, in seconds.
const LONG_POLL_RETRY_S: u64 = 5;

/// One waiting long-poll, holding its places in [`LongPolls`] and the `long_polls` gauge; they
/// are given back however the request ends (a client that goes away drops the handler's future).
struct Waiting {
    app: App,
    account: String,
    client: IpAddr,
}

impl Waiting {
    fn enter(app: &App, account: &str, client: IpAddr) -> Result<Self, LongPollRefusal> {
        let guard = &app.guard;
        let mut polls = guard.long_polls();
        if polls.total >= guard.long_polls_max {
            return Err(LongPollRefusal::Full);
        }
        let by_account = polls.by_account.get(account).copied().unwrap_or(0);
        if by_account >= guard.long_polls_per_account {
            return Err(LongPollRefusal::Account);
        }
        let by_address = polls.by_address.get(&client).copied().unwrap_or(0);
        if by_address >= guard.long_polls_per_address {
            return Err(LongPollRefusal::Address);
        }
        polls.total += 1;
        polls.by_account.insert(account.to_string(), by_account + 1);
        polls.by_address.insert(client, by_address + 1);
        app.cloud.metrics.long_polls.inc();
        Ok(Self { app: app.clone(), account: account.to_string(), client })
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut polls = self.app.guard.long_polls();
        polls.total = polls.total.saturating_sub(1);
        if let Some(n) = polls.by_account.get_mut(&self.account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                polls.by_account.remove(&self.account);
            }
        }
        if let Some(n) = polls.by_address.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                polls.by_address.remove(&self.client);
            }
        }
        self.app.cloud.metrics.long_polls.dec();
    }
}

/// The address a request is limited by, put in the request's extensions by [`per_address`].
#[derive(Clone, Copy, Debug)]
struct Client(IpAddr);

/// The client behind `peer`: `peer` itself unless it is a trusted proxy; then, walking
/// `X-Forwarded-For` from the nearest hop back, the first address that is not a trusted proxy
/// (proxies append the address they saw, so entries left of an untrusted one may be forged).
/// An entry that does not parse ends the walk at the last good hop.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    let mut client = peer;
    if !trusted.contains(&client) {
        return client;
    }
    let values: Vec<&str> =
        headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
    for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !trusted.contains(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

fn too_many(app: &App, what: &str, status: StatusCode, retry_after: u64) -> Response {
    app.cloud.metrics.refusals.get_or_create(&Reason::new(what)).inc();
    let mut r =
        ApiError(status, format!("{what}: too many requests, retry in {retry_after} s")).into_response();
    r.headers_mut().insert(header::RETRY_AFTER, retry_after.into());
    r
}

/// Every request spends a token of its client address's bucket.
async fn per_address(
    State(app): State<App>,
    Peer(peer): Peer<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let client = client_ip(peer.ip(), req.headers(), &app.guard.trusted_proxies);
    req.extensions_mut().insert(Client(client));
    let taken =
        app.guard.requests.lock().unwrap_or_else(|e| e.into_inner()).take(&client, transport::now_us());
    match taken {
        Ok(()) => next.run(req).await,
        Err(retry) => too_many(&app, "http-rate", StatusCode::TOO_MANY_REQUESTS, retry),
    }
}

/// Largest FeedSync document accepted by POST.
pub const POST_FEED_MAX: usize = 16 << 20;
/// FeedSync POSTs parsed and merged at once (each on a blocking thread); more get 503.
pub const POSTS_AT_ONCE: usize = 2;
/// Largest body any other request may carry.
pub const BODY_MAX: usize = 1 << 20;
/// Longest a long-poll is held.
pub const LONG_POLL_MAX_S: u64 = 60;

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct App {
    pub cloud: Arc<Cloud>,
    pub endpoint: iroh::Endpoint,
    pub relay_url: iroh::RelayUrl,
    /// The address discovery port devices are told.
    pub qad_port: Option<u16>,
    pub relay_clients: Arc<AtomicI64>,
    pub guard: Arc<Guard>,
    /// [`POSTS_AT_ONCE`] permits.
    pub posting: Arc<tokio::sync::Semaphore>,
}

/// The relay server's access control: only the cloud and devices active in the directory may use
/// the relay (it forwards ciphertext only, but it is not an open relay).
#[derive(Debug)]
pub struct RelayAccess {
    pub cloud: Arc<Cloud>,
    pub clients: Arc<AtomicI64>,
}

impl iroh_relay::server::AccessControl for RelayAccess {
    async fn on_connect(&self, request: &iroh_relay::server::ClientRequest) -> iroh_relay::server::Access {
        let device = transport::device_of(request.endpoint_id());
        let allowed = device == self.cloud.id || {
            let st = self.cloud.lock();
            // A device that is pairing is not active yet, but it must reach the cloud.
            st.dir().user_of(&device).is_some() || st.control.pairings().any(|p| p.device == device)
        };
        if allowed {
            self.clients.fetch_add(1, Ordering::Relaxed);
            iroh_relay::server::Access::Allow
        } else {
            self.cloud.metrics.refusals.get_or_create(&Reason::new("relay-unknown-device")).inc();
            iroh_relay::server::Access::Deny { reason: Some("not an active device of this mesh".into()) }
        }
    }

    fn on_disconnect(&self, _id: iroh::EndpointId, _conn: iroh_relay::server::ConnectionId) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a node needs to reach the cloud.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectInfo {
    /// The cloud's endpoint id (and ticket key), hex.
    pub cloud: String,
    pub relay_url: String,
    /// Direct UDP addresses of the cloud endpoint.
    pub addrs: Vec<std::net::SocketAddr>,
    /// UDP port of the relay's QUIC address discovery (on the relay URL's host), when it runs.
    #[serde(default)]
    pub qad_port: Option<u16>,
}

pub fn connect_info(
    cloud: &Cloud,
    endpoint: &iroh::Endpoint,
    relay_url: &iroh::RelayUrl,
    qad_port: Option<u16>,
) -> ConnectInfo {
    let mut addrs: Vec<std::net::SocketAddr> = endpoint.addr().ip_addrs().copied().collect();
    if addrs.is_empty() {
        addrs = endpoint.bound_sockets();
    }
    // An unspecified bind address is reachable on loopback from this machine.
    let addrs = addrs
        .into_iter()
        .map(|a| {
            if a.ip().is_unspecified() {
                std::net::SocketAddr::new([127, 0, 0, 1].into(), a.port())
            } else {
                a
            }
        })
        .collect();
    ConnectInfo { cloud: hex(&cloud.id.0), relay_url: relay_url.to_string(), addrs, qad_port }
}

/// An API error: JSON `{"error": CODE, "message": TEXT}`, where CODE is stable (one per
/// status, [`error_code`]) and TEXT is for people.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": error_code(self.0), "message": self.1 }))).into_response()
    }
}

/// The stable `error` code of an error status (docs/deploy.md lists them).
pub fn error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad-request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not-found",
        405 => "method-not-allowed",
        408 => "timeout",
        409 => "conflict",
        413 => "too-large",
        415 => "unsupported-media-type",
        422 => "unprocessable",
        429 => "rate-limited",
        503 => "unavailable",
        _ if status.is_client_error() => "client-error",
        _ => "internal",
    }
}

/// Every error answer is JSON with a stable code, whoever made it: axum's own rejections (a
/// body over its limit, JSON that does not decode, a bad query), unknown routes and methods.
async fn json_errors(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).into_owned());
    let text = text.unwrap_or_default();
    let message = match status {
        StatusCode::NOT_FOUND => format!("no such resource: {method} {path}"),
        StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed on {path}"),
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is too large: at most {} KiB here ({} MiB for a FeedSync feed)",
            BODY_MAX >> 10,
            POST_FEED_MAX >> 20
        ),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_lowercase(),
        _ => text,
    };
    let mut out = ApiError(status, message).into_response();
    for name in [header::RETRY_AFTER, header::ALLOW] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

fn internal(e: anyhow::Error) -> ApiError {
    tracing::error!(error = %format!("{e:#}"), "HTTP API");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error (logged)".into())
}

/// The bearer token of a request.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(unauthorized)
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}
fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no such {what}"))
}
fn unauthorized() -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, "a valid bearer token is required".into())
}

/// Who a request speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Principal {
    Admin,
    User(UserId),
}

fn principal(app: &App, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let token = bearer(headers)?;
    principal_of(app, &app.cloud.token_account(token).ok_or_else(unauthorized)?)
}

/// Who a live token's account ("" for the admin) speaks for.
fn principal_of(app: &App, account: &str) -> Result<Principal, ApiError> {
    if account.is_empty() {
        return Ok(Principal::Admin);
    }
    app.cloud.lock().accounts.get(account).map(|a| Principal::User(a.user)).ok_or_else(unauthorized)
}

fn count(app: &App, route: &str) {
    app.cloud.metrics.http_requests.get_or_create(&Reason::new(route)).inc();
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/connect", get(connect))
        .route("/v1/names/{name}", get(names))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/accounts/{name}/tokens", post(account_token))
        .route("/v1/users", get(users))
        .route("/v1/users/{id}", get(user))
        .route("/v1/devices", get(devices))
        .route("/v1/folders", get(folders))
        .route("/v1/folders/{id}", get(folder))
        .route("/v1/folders/{id}/members", get(members))
        .route("/v1/invitations", get(invitations))
        .route("/v1/folders/{id}/items", get(items))
        .route("/v1/folders/{id}/items/{item}", get(item))
        .route("/v1/folders/{id}/feed.atom", get(feed_atom))
        .route("/v1/folders/{id}/feed.json", get(feed_json))
        .route("/v1/folders/{id}/feed", post(post_feed).layer(DefaultBodyLimit::max(POST_FEED_MAX)))
        .route("/v1/notifications", get(notifications))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(DefaultBodyLimit::max(BODY_MAX))
        .layer(middleware::from_fn_with_state(app.clone(), per_address))
        .layer(middleware::from_fn(json_errors))
        .with_state(app)
}

async fn health(State(app): State<App>) -> Json<Value> {
    count(&app, "health");
    let st = app.cloud.lock();
    Json(json!({
        "status": "ok",
        "cloud": hex(&app.cloud.id.0),
        "devices_connected": st.connections.len(),
        "directory_changes": st.dir().len(),
        "folders": st.replicas.len(),
    }))
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    count(&app, "metrics");
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        app.cloud.metrics.render(app.relay_clients.load(Ordering::Relaxed)),
    )
}

async fn connect(State(app): State<App>) -> Json<ConnectInfo> {
    count(&app, "connect");
    Json(connect_info(&app.cloud, &app.endpoint, &app.relay_url, app.qad_port))
}

/// Whether a user name and an account name are taken here: what `feedmesh init` checks before
/// it creates anything. It tells no more than any device learns (every device holds the
/// directory's user names; a device asking for a taken account name is told so).
async fn names(State(app): State<App>, Path(name): Path<String>) -> Json<Value> {
    count(&app, "names");
    let st = app.cloud.lock();
    Json(json!({
        "name": name,
        "user_taken": crate::cloud::user_name_taken(st.dir(), &name),
        "account_taken": st.accounts.contains_key(&name),
    }))
}

#[derive(Deserialize)]
struct Login {
    account: String,
    password: String,
}

async fn login(
    State(app): State<App>,
    Extension(Client(client)): Extension<Client>,
    headers: HeaderMap,
    Json(body): Json<Login>,
) -> Result<Json<Value>, Response> {
    count(&app, "login");
    let account = body.account.clone();
    let client = crate::login::Client::Address(client);
    // A client presenting a live token of the account is proven (its own argon2 lane).
    if let Ok(token) = bearer(&headers) {
        app.cloud.token_holder(token, &account, &client);
    }
    let user =
        app.cloud.clone().verify_password(body.account, body.password, client).await.map_err(
            |e| match e {
                LoginError::RateLimited(retry) => {
                    too_many(&app, "login-rate", StatusCode::TOO_MANY_REQUESTS, retry)
                }
                LoginError::Busy(retry) => {
                    too_many(&app, "login-busy", StatusCode::SERVICE_UNAVAILABLE, retry)
                }
                LoginError::TooLong => bad(e.to_string()).into_response(),
                LoginError::Wrong => ApiError(StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
            },
        )?;
    let token = app.cloud.issue_token(&account).map_err(|e| internal(e).into_response())?;
    Ok(Json(json!({ "token": token, "user": hex(&user.0), "expires_in": app.cloud.limits.token_ttl_secs })))
}

async fn logout(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    count(&app, "logout");
    principal(&app, &headers)?;
    let revoked = app.cloud.revoke_token(bearer(&headers)?).map_err(internal)?;
    Ok(Json(json!({ "revoked": revoked })))
}

async fn account_token(
    State(app): State<App>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    count(&app, "account-token");
    if principal(&app, &headers)? != Principal::Admin {
        return Err(ApiError(StatusCode::FORBIDDEN, "only the admin issues account tokens".into()));
    }
    if !app.cloud.lock().accounts.contains_key(&name) {
        return Err(not_found("account"));
    }
    let token = app.cloud.issue_token(&name).map_err(internal)?;
    Ok(Json(json!({ "token": token, "expires_in": app.cloud.limits.token_ttl_secs })))
}

fn parse_folder(id: &str) -> Result<FolderId, ApiError> {
    let bytes = unhex(id).filter(|b| b.len() == 16).ok_or_else(|| bad("folder ids are 32 hex digits"))?;
    let mut f = [0u8; 16];
    f.copy_from_slice(&bytes);
    Ok(FolderId(f))
}

fn parse_user(id: &str) -> Result<UserId, ApiError> {
    let bytes = unhex(id).filter(|b| b.len() == 32).ok_or_else(|| bad("user ids are 64 hex digits"))?;
    let mut u = [0u8; 32];
    u.copy_from_slice(&bytes);
    Ok(UserId(u))
}

/// Whether the principal may see the folder: the admin, or a participant.
fn may_see(st: &crate::cloud::State, who: &Principal, folder: &FolderId) -> Result<(), ApiError> {
    let f = st.dir().folder(folder).ok_or_else(|| not_found("folder"))?;
    match who {
        Principal::Admin => Ok(()),
        Principal::User(u) if st.dir().state().is_participant(f, u) => Ok(()),
        Principal::User(_) => Err(not_found("folder")),
    }
}

fn user_json(cloud: &crate::cloud::Cloud, st: &crate::cloud::State, id: &UserId) -> Value {
    let u = st.dir().state().users.get(id);
    json!({
        "id": hex(&id.0),
        "name": u.map(|u| u.name.clone()),
        "account": st.accounts.values().find(|a| a.user == *id).map(|a| a.name.clone()),
        "devices": u.map(|u| u.devices.iter().filter(|(_, active)| **active).count()).unwrap_or(0),
        "content_bytes": cloud.content_usage(id),
        "content_quota": cloud.limits.content_quota_bytes_per_user,
    })
}

async fn users(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    count(&app, "users");
    let who = principal(&app, &headers)?;
    let st = app.cloud.lock();
    let list: Vec<Value> = st
        .dir()
        .state()
        .users
        .keys()
        .filter(|u| who == Principal::Admin || who == Principal::User(**u))
        .map(|u| user_json(&app.cloud, &st, u))
        .collect();
    Ok(Json(json!({ "users": list })))
}

async fn user(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    count(&app, "user");
    let who = principal(&app, &headers)?;
    let id = parse_user(&id)?;
    let st = app.cloud.lock();
    if !st.dir().state().users.contains_key(&id) || !(who == Principal::Admin || who == Principal::User(id)) {
        return Err(not_found("user"));
    }
    Ok(Json(user_json(&app.cloud, &st, &id)))
}

async fn devices(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    count(&app, "devices");
    let who = principal(&app, &headers)?;
    let st = app.cloud.lock();
    let mut list = Vec::new();
    for (uid, u) in &st.dir().state().users {
        if !(who == Principal::Admin || who == Principal::User(*uid)) {
            continue;
        }
        for (device, active) in &u.devices {
            list.push(json!({
                "id": hex(&device.0),
                "user": hex(&uid.0),
                "active": active,
                "connected": st.connections.contains_key(device),
                "storage_bytes": app.cloud.usage(device),
            }));
        }
    }
    Ok(Json(json!({ "devices": list })))
}

fn folder_json(st: &crate::cloud::State, id: &FolderId) -> Value {
    let f = st.dir().folder(id);
    let replica = st.replicas.get(id);
    json!({
        "id": hex(&id.0),
        "name": f.map(|f| f.name.clone()),
        "owner": f.map(|f| hex(&f.owner.0)),
        "mapped_on": f.map(|f| f.mapped.iter().map(|d| hex(&d.0)).collect::<Vec<_>>()),
        "storage": f.map(|f| match f.storage { engine::directory::Storage::Cloud => "cloud", engine::directory::Storage::P2p => "p2p" }),
        "items": replica.map_or(0, |r| r.len()),
        "head": replica.map_or(0, |r| r.head().0),
    })
}

async fn folders(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    count(&app, "folders");
    let who = principal(&app, &headers)?;
    let st = app.cloud.lock();
    let list: Vec<Value> = st
        .dir()
        .state()
        .folders
        .keys()
        .filter(|f| may_see(&st, &who, f).is_ok())
        .map(|f| folder_json(&st, f))
        .collect();
    Ok(Json(json!({ "folders": list })))
}

async fn folder(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    count(&app, "folder");
    let who = principal(&app, &headers)?;
    let id = parse_folder(&id)?;
    let st = app.cloud.lock();
    may_see(&st, &who, &id)?;
    Ok(Json(folder_json(&st, &id)))
}

async fn members(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    count(&app, "members");
    let who = principal(&app, &headers)?;
    let id = parse_folder(&id)?;
    let st = app.cloud.lock();
    may_see(&st, &who, &id)?;
    let f = st.dir().folder(&id).ok_or_else(|| not_found("folder"))?;
    let mut list = vec![json!({ "user": hex(&f.owner.0), "role": "owner", "state": "active" })];
    for (u, m) in &f.members {
        list.push(json!({
            "user": hex(&u.0),
            "role": format!("{:?}", m.role).to_lowercase(),
            "state": match m.state { MemberState::Pending => "pending", MemberState::Active => "active", MemberState::Removed => "removed" },
        }));
    }
    Ok(Json(json!({ "members": list })))
}

async fn invitations(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    count(&app, "invitations");
    let who = principal(&app, &headers)?;
    let st = app.cloud.lock();
    let list: Vec<Value> = st
        .dir()
        .state()
        .invitations
        .iter()
        .filter(|(_, inv)| match &who {
            Principal::Admin => true,
            Principal::User(u) => inv.invitee == *u || st.dir().folder(&inv.folder).is_some_and(|f| f.owner == *u),
        })
        .map(|(id, inv)| {
            json!({
                "id": hex(&id.0),
                "folder": hex(&inv.folder.0),
                "invitee": hex(&inv.invitee.0),
                "state": match inv.state { InviteState::Open => "open", InviteState::Accepted => "accepted", InviteState::Declined => "declined", InviteState::Cancelled => "cancelled" },
            })
        })
        .collect();
    Ok(Json(json!({ "invitations": list })))
}

use transport::view::item_json;

async fn items(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    count(&app, "items");
    let who = principal(&app, &headers)?;
    let id = parse_folder(&id)?;
    let st = app.cloud.lock();
    may_see(&st, &who, &id)?;
    let list: Vec<Value> =
        st.replicas.get(&id).map(|r| r.items().map(|i| item_json(i, false)).collect()).unwrap_or_default();
    Ok(Json(json!({ "items": list })))
}

async fn item(
    State(app): State<App>,
    headers: HeaderMap,
    Path((id, item_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    count(&app, "item");
    let who = principal(&app, &headers)?;
    let id = parse_folder(&id)?;
    let st = app.cloud.lock();
    may_see(&st, &who, &id)?;
    let item_id = engine::feedsync::ItemId::new(&item_id).map_err(|e| bad(e.to_string()))?;
    let item = st.replicas.get(&id).and_then(|r| r.item(&item_id)).ok_or_else(|| not_found("item"))?;
    Ok(Json(item_json(item, true)))
}

#[derive(Deserialize)]
struct Since {
    since: Option<u64>,
    epoch: Option<u64>,
}

/// The self URL of a request on this relay: `http://HOST/PATH`, when the Host header is a
/// plain host name or address (anything else gets no self link rather than a made-up one).
fn self_url(headers: &HeaderMap, path: &str) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let plain = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    plain.then(|| format!("http://{host}{path}"))
}

/// Which document a feed route writes.
#[derive(Clone, Copy, Debug)]
enum FeedDoc {
    Atom,
    Json,
}

async fn feed_atom(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> Result<Response, ApiError> {
    count(&app, "feed-atom");
    folder_feed(&app, &headers, &id, &q, FeedDoc::Atom)
}

async fn feed_json(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> Result<Response, ApiError> {
    count(&app, "feed-json");
    folder_feed(&app, &headers, &id, &q, FeedDoc::Json)
}

/// A folder as Atom (RFC 4287, with `sx:sync`) or JSON Feed 1.1 (`transport::syndication`).
fn folder_feed(
    app: &App,
    headers: &HeaderMap,
    id: &str,
    q: &Since,
    doc: FeedDoc,
) -> Result<Response, ApiError> {
    let who = principal(app, headers)?;
    let folder_hex = id.to_string();
    let id = parse_folder(id)?;
    let st = app.cloud.lock();
    may_see(&st, &who, &id)?;
    let (epoch, head, items) = match st.replicas.get(&id) {
        Some(r) => {
            // A cursor from another epoch (the relay restarted) means everything.
            let since = match (q.since, q.epoch) {
                (Some(s), Some(e)) if e == r.epoch() => Seq(s),
                (Some(s), None) => Seq(s),
                _ => Seq(0),
            };
            (r.epoch(), r.head().0, r.log_since(since).map(|c| &**c.item).collect::<Vec<&Item>>())
        }
        None => (st.epoch(), 0, Vec::new()),
    };
    let folder = st.dir().folder(&id).ok_or_else(|| not_found("folder"))?;
    let owner = st.dir().state().users.get(&folder.owner).map(|u| u.name.clone()).unwrap_or_default();
    let now = engine::feedsync::When::from_unix_secs(transport::now_secs())
        .map_err(|e| internal(anyhow::anyhow!("clock: {e}")))?;
    let mut meta =
        transport::syndication::Meta::folder(&folder_hex.to_lowercase(), &folder.name, &owner, now);
    let (path, kind) = match doc {
        FeedDoc::Atom => ("feed.atom", transport::syndication::ATOM_TYPE),
        FeedDoc::Json => ("feed.json", transport::syndication::JSON_FEED_TYPE),
    };
    meta.self_url = self_url(headers, &format!("/v1/folders/{}/{path}", folder_hex.to_lowercase()));
    let body = match doc {
        FeedDoc::Atom => transport::syndication::atom(&meta, items)
            .map_err(|e| internal(anyhow::anyhow!("writing the feed: {e}")))?,
        FeedDoc::Json => transport::syndication::json_feed(&meta, items).to_string(),
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind.to_string()),
            (header::HeaderName::from_static("x-feedmesh-epoch"), epoch.to_string()),
            (header::HeaderName::from_static("x-feedmesh-head"), head.to_string()),
        ],
        body,
    )
        .into_response())
}

async fn post_feed(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    count(&app, "post-feed");
    let who = principal(&app, &headers)?;
    let id = parse_folder(&id)?;
    may_see(&app.cloud.lock(), &who, &id)?;
    // Parsing, verifying and merging a body of up to 16 MB is seconds of CPU: it runs on a
    // blocking thread, at most POSTS_AT_ONCE at a time (more get 503), so the runtime's workers
    // stay free for every other request (the load benchmark saw /health wait behind posts).
    let Ok(permit) = app.posting.clone().try_acquire_owned() else {
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "busy with other posts, retry shortly".into()));
    };
    let cloud = app.cloud.clone();
    let work = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let feed = read_feed(&body)
            .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("not a FeedSync feed: {e}")))?;
        // A feed this relay or a node wrote has its entries stamped for readers: undo that, so
        // the signed bytes are what is checked.
        let items: Vec<Item> = feed.items().map(transport::syndication::restore).collect();
        drop(feed);
        cloud.merge_posted(&id, items).map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
    });
    let (merged, changed, refused) =
        work.await.map_err(|e| internal(anyhow::anyhow!("post task: {e}")))??;
    Ok(Json(json!({ "merged": merged, "changed": changed, "refused": refused })))
}

#[derive(Deserialize)]
struct Poll {
    since: Option<u64>,
    timeout: Option<u64>,
    /// The `epoch` of the answer `since` came from.
    epoch: Option<u64>,
}

async fn notifications(
    State(app): State<App>,
    Extension(Client(client)): Extension<Client>,
    headers: HeaderMap,
    Query(q): Query<Poll>,
) -> Result<Json<Value>, Response> {
    count(&app, "notifications");
    let token = bearer(&headers).map_err(IntoResponse::into_response)?;
    let record = app.cloud.token_record(token).ok_or_else(|| unauthorized().into_response())?;
    let who = principal_of(&app, &record.account).map_err(IntoResponse::into_response)?;
    // Event numbers count from 0 in each epoch (the relay's run), and only the last
    // EVENTS_KEPT stay: a cursor from another epoch, from beyond the counter, or from before the
    // oldest kept event may have missed events. Such a poll is answered at once with
    // `"resync": true` and every event kept (the client re-reads what it shows), never held on a
    // counter that went back.
    let (epoch, resync) = {
        let st = app.cloud.lock();
        let since = q.since.unwrap_or(0);
        let oldest = st.events.front().map_or(st.event_seq + 1, |e| e.seq);
        let resync = q.epoch.is_some_and(|e| e != st.epoch())
            || since > st.event_seq
            || (q.since.is_some() && since + 1 < oldest);
        (st.epoch(), resync)
    };
    let since = if resync { 0 } else { q.since.unwrap_or(0) };
    let wait = Duration::from_secs(q.timeout.unwrap_or(LONG_POLL_MAX_S).min(LONG_POLL_MAX_S));
    let started = tokio::time::Instant::now();
    let deadline = started + wait;
    // The token's expiry (unix seconds) ends the wait too, if it comes first.
    let token_left_us = i128::from(record.expires) * 1_000_000 - i128::from(transport::now_us());
    let token_end = u64::try_from(token_left_us.max(0))
        .ok()
        .and_then(|us| started.checked_add(Duration::from_micros(us)))
        .filter(|end| *end < deadline);
    let _waiting = Waiting::enter(&app, &record.account, client).map_err(|refusal| match refusal {
        LongPollRefusal::Full => {
            too_many(&app, "long-polls", StatusCode::SERVICE_UNAVAILABLE, LONG_POLL_RETRY_S)
        }
        LongPollRefusal::Account => {
            too_many(&app, "long-polls-account", StatusCode::TOO_MANY_REQUESTS, LONG_POLL_RETRY_S)
        }
        LongPollRefusal::Address => {
            too_many(&app, "long-polls-address", StatusCode::TOO_MANY_REQUESTS, LONG_POLL_RETRY_S)
        }
    })?;
    loop {
        // Register before looking, so an event (or a logout) between the look and the wait still
        // wakes us.
        let notified = app.cloud.events_changed.notified();
        let live = token_end.is_none_or(|end| tokio::time::Instant::now() < end)
            && app.cloud.token_account(token).is_some_and(|a| a == record.account);
        if !live {
            return Err(ApiError(StatusCode::UNAUTHORIZED, "the token was logged out or expired".into())
                .into_response());
        }
        let (events, latest) = {
            let st = app.cloud.lock();
            let events: Vec<Value> = st
                .events
                .iter()
                .filter(|e| e.seq > since)
                .filter(|e| match (&who, &e.folder_id) {
                    (Principal::Admin, _) => true,
                    (Principal::User(_), Some(f)) => may_see(&st, &who, f).is_ok(),
                    (Principal::User(u), None) => e.audience.contains(u),
                })
                .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
                .collect();
            (events, st.event_seq)
        };
        if resync || !events.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(json!({ "events": events, "latest": latest, "epoch": epoch, "resync": resync })));
        }
        // Woken by an event, a token change or the token's end: look again (the top checks the
        // token); at the deadline the next look answers.
        let _ = tokio::time::timeout_at(token_end.unwrap_or(deadline), notified).await;
    }
}

/// A device id from hex.
pub fn parse_device(id: &str) -> Option<DeviceId> {
    let bytes = unhex(id).filter(|b| b.len() == 32)?;
    let mut d = [0u8; 32];
    d.copy_from_slice(&bytes);
    Some(DeviceId(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies = [ip("10.0.0.1"), ip("10.0.0.2")];
        let peer = ip("10.0.0.1");
        let case = |peer: IpAddr, values: &[&str]| client_ip(peer, &forwarded(values), &proxies);
        // An untrusted peer is itself, whatever it claims.
        assert_eq!(case(ip("203.0.113.9"), &["198.51.100.1"]), ip("203.0.113.9"));
        // A trusted proxy without the header: the proxy.
        assert_eq!(case(peer, &[]), peer);
        assert_eq!(case(peer, &["198.51.100.1"]), ip("198.51.100.1"));
        // The nearest untrusted hop, not the leftmost (which the client may have forged).
        assert_eq!(case(peer, &["6.6.6.6, 198.51.100.1"]), ip("198.51.100.1"));
        // Through a second trusted proxy, and across repeated headers.
        assert_eq!(case(peer, &["6.6.6.6, 198.51.100.1, 10.0.0.2"]), ip("198.51.100.1"));
        assert_eq!(case(peer, &["6.6.6.6", "198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(case(peer, &["2001:db8::7 , 10.0.0.2"]), ip("2001:db8::7"));
        // Garbage ends the walk at the last hop that parsed.
        assert_eq!(case(peer, &["198.51.100.1, nonsense"]), peer);
        assert_eq!(case(peer, &["198.51.100.1, x, 10.0.0.2"]), ip("10.0.0.2"));
        assert_eq!(case(peer, &["x, 198.51.100.1"]), ip("198.51.100.1"));
    }
}
