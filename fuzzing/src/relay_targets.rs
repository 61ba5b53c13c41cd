//! Targets for what the relay reads from the network: HTTP requests through its real axum router
//! (JSON bodies, paths, queries, bearer tokens, the FeedSync POST that is read and merged), and
//! control requests from a connected device (`Cloud::handle_control`).
//!
//! One relay is set up per process (a redb store on tmpfs, the fixture directory, an account
//! "alice" for user a1, an admin token, and the signed fixture items in the folder's replica).
//! It is stateful across inputs the way a real relay is: a POSTed item or an announced address
//! stays. Password work never runs while fuzzing: the login budget (`logins_per_minute = 0`,
//! which leaves one attempt per key) is spent for the fuzzer's client address and devices during
//! setup, so every later login or pairing request is refused before argon2, after its body was
//! parsed; creating an account (an argon2 hash, only for active devices) is checked up to the
//! name and password rules and not hashed.

use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request as HttpRequest, StatusCode};
use axum::Router;
use engine::signing::{self, hex, DeviceId};
use relay::cloud::{Account, Cloud, Limits};
use relay::http::{App, Guard};
use relay::login::Client;
use tower::ServiceExt;
use transport::{Request, Response};

use crate::fixture::{self, world, NAMES};

/// The admin token of the fuzzed relay.
pub const ADMIN_TOKEN: &str = "fuzz-admin-token";
/// The address every fuzzed HTTP request comes from.
pub const CLIENT: &str = "127.0.0.1:40000";
/// Largest response body read back.
const RESPONSE_MAX: usize = 64 << 20;

#[derive(Debug)]
struct Relay {
    /// A paused clock: a long-poll's wait costs no wall time.
    requests: tokio::runtime::Runtime,
    /// Where the cloud endpoint lives (the router's `/v1/connect` reads its address).
    _endpoints: tokio::runtime::Runtime,
    router: Router,
    cloud: Arc<Cloud>,
    alice_token: Mutex<String>,
    _dir: tempfile::TempDir,
}

fn build() -> Relay {
    let w = world();
    let tmp = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new().prefix("feedmesh-fuzz-").tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .expect("a temporary folder for the fuzzed relay's store");
    let store =
        transport::store::Store::open(&tmp.path().join("relay.redb"), "relay").expect("a fresh store opens");
    store.save_changes(&w.changes).expect("the fixture directory is stored");
    let limits = Limits {
        http_requests_per_second: 1_000_000,
        http_burst: u32::MAX,
        logins_per_minute: 0,
        ..Limits::default()
    };
    let cloud =
        Arc::new(Cloud::load(store, w.key("cloud").clone(), limits.clone(), 77).expect("the cloud loads"));
    cloud.set_admin_token(ADMIN_TOKEN);
    {
        let mut st = cloud.lock();
        let user = engine::directory::UserId::of_first_device(w.device("a1"));
        // Never checked: logins are refused by the budget before the hash is looked at.
        st.accounts.insert("alice".into(), Account { name: "alice".into(), user, phc: String::new() });
    }
    let alice_token = cloud.issue_token("alice").expect("a token for alice");
    let items: Vec<_> = fixture::pairs().signed.a.items().map(|i| (**i).clone()).collect();
    cloud.merge_posted(&w.folder, items).expect("the fixture items merge");
    let endpoints = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime for the cloud endpoint");
    let endpoint = endpoints
        .block_on(transport::endpoint(
            w.key("cloud"),
            &transport::EndpointOptions {
                bind: Some("127.0.0.1:0".parse().expect("literal")),
                ..Default::default()
            },
        ))
        .expect("the cloud endpoint binds on loopback");
    // Spend the one login attempt of the fuzzer's address and of every fixture device: with
    // `logins_per_minute = 0` a client's bucket holds one token and never refills.
    let clients = std::iter::once(Client::Address(client().ip()))
        .chain(w.keys.iter().map(|k| Client::Device(DeviceId::of(k))));
    for (i, client) in clients.enumerate() {
        let _ = endpoints.block_on(cloud.clone().verify_password(format!("setup{i}"), "x".into(), client));
    }
    let app = App {
        cloud: cloud.clone(),
        endpoint,
        relay_url: "http://127.0.0.1:1".parse().expect("literal"),
        qad_port: None,
        relay_clients: Arc::new(AtomicI64::new(0)),
        guard: Arc::new(Guard::new(&limits, Vec::new())),
        posting: Arc::new(tokio::sync::Semaphore::new(relay::http::POSTS_AT_ONCE)),
    };
    let requests = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a paused runtime for requests");
    Relay {
        requests,
        _endpoints: endpoints,
        router: relay::http::router(app),
        cloud,
        alice_token: Mutex::new(alice_token),
        _dir: tmp,
    }
}

fn client() -> SocketAddr {
    CLIENT.parse().expect("literal")
}

fn relay_instance() -> &'static Relay {
    static RELAY: OnceLock<Relay> = OnceLock::new();
    RELAY.get_or_init(build)
}

/// Sets the relay up (not charged to the first input).
pub fn prepare() {
    fixture::prepare();
    let _ = relay_instance();
}

/// The routes the fuzzer picks from (`{}` is the path parameter the input gives).
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/connect"),
    ("POST", "/v1/login"),
    ("POST", "/v1/logout"),
    ("POST", "/v1/accounts/{}/tokens"),
    ("GET", "/v1/users"),
    ("GET", "/v1/users/{}"),
    ("GET", "/v1/devices"),
    ("GET", "/v1/folders"),
    ("GET", "/v1/folders/{}"),
    ("GET", "/v1/folders/{}/members"),
    ("GET", "/v1/invitations"),
    ("GET", "/v1/folders/{}/items"),
    ("GET", "/v1/folders/{}/items/{}"),
    ("GET", "/v1/folders/{}/feed.atom"),
    ("POST", "/v1/folders/{}/feed"),
    ("GET", "/v1/notifications"),
];

/// One HTTP request: byte 0 picks the route (past the table: the method is `GET`/`POST`/`PUT`
/// and the path is the parameter itself), byte 1 the token (none, admin, alice's, the parameter),
/// byte 2 the path parameter (bit 0: the fixture folder's id, bit 1: alice's user id, else the
/// input's text) and whether the body is JSON (bit 2); then a length byte and the parameter
/// text, a length byte and the query, and the body.
pub fn relay_http(data: &[u8]) {
    let [route, auth, flags, rest @ ..] = data else { return };
    let (param, rest) = take_text(rest);
    let (query, body) = take_text(rest);
    let w = world();
    let r = relay_instance();
    let param = match flags & 3 {
        1 => hex(&w.folder.0),
        2 => hex(&w.device("a1").0),
        _ => param,
    };
    let (method, path) = match ROUTES.get(usize::from(*route)) {
        Some((method, template)) => {
            let mut parts = template.split("{}");
            let mut path = parts.next().unwrap_or_default().to_string();
            for (i, part) in parts.enumerate() {
                path.push_str(if i == 0 { &param } else { "x" });
                path.push_str(part);
            }
            (method.parse::<Method>().unwrap_or(Method::GET), path)
        }
        None => {
            let method = [Method::GET, Method::POST, Method::PUT][usize::from(*route) % 3].clone();
            (method, param.clone())
        }
    };
    let uri = if query.is_empty() { path } else { format!("{path}?{query}") };
    let mut token = r.alice_token.lock().unwrap_or_else(|e| e.into_inner());
    if r.cloud.token_account(&token).is_none() {
        // A logout in an earlier input revoked it.
        *token = r.cloud.issue_token("alice").expect("a token for alice");
    }
    let bearer = match auth % 4 {
        0 => None,
        1 => Some(ADMIN_TOKEN.to_string()),
        2 => Some(token.clone()),
        _ => Some(param.clone()),
    };
    drop(token);
    let mut builder = HttpRequest::builder().method(method).uri(uri);
    if let Some(bearer) = bearer {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {bearer}"));
    }
    if flags & 4 != 0 {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    let Ok(mut request) = builder.body(Body::from(body.to_vec())) else { return };
    request.extensions_mut().insert(ConnectInfo(client()));
    let (status, content_type, bytes) = r.requests.block_on(async {
        let response = r.router.clone().oneshot(request).await.expect("the router is infallible");
        let status = response.status();
        let content_type =
            response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let bytes =
            axum::body::to_bytes(response.into_body(), RESPONSE_MAX).await.expect("a response body reads");
        (status, content_type, bytes)
    });
    assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status} for a client's request: {}",
        String::from_utf8_lossy(&bytes)
    );
    if content_type.as_deref().is_some_and(|t| t.starts_with("application/json")) {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
            "a JSON response that does not parse"
        );
    }
    check_cloud(&r.cloud);
}

/// A length byte and that much text (lossily UTF-8).
fn take_text(bytes: &[u8]) -> (String, &[u8]) {
    let Some((&len, rest)) = bytes.split_first() else { return (String::new(), bytes) };
    let (text, rest) = rest.split_at(usize::from(len).min(rest.len()));
    (String::from_utf8_lossy(text).into_owned(), rest)
}

/// The cloud's replicas hold their invariants and only versions signed for their folder.
fn check_cloud(cloud: &Cloud) {
    let st = cloud.lock();
    for (folder, replica) in &st.replicas {
        replica.check_invariants().expect("the cloud's replica holds its invariants");
        let scope = folder.scope();
        for item in replica.items() {
            for version in std::iter::once(&item.version).chain(&item.conflicts) {
                assert!(
                    signing::verify_version(version, &scope).is_ok(),
                    "the cloud holds an unverified version"
                );
            }
        }
    }
}

/// A control request from a connected device: byte 0 picks the device (a1, a2, b1, c1, the
/// cloud's own key, a stranger), the rest is the `Request` as read from a frame (version byte,
/// postcard: `engine::control::decode`).
pub fn relay_control(data: &[u8]) {
    let Some((&who, rest)) = data.split_first() else { return };
    let Ok(request) = engine::control::decode::<Request>(rest, transport::CONTROL_MAX) else { return };
    let w = world();
    let r = relay_instance();
    let name = NAMES[usize::from(who) % NAMES.len()];
    let device = w.device(name);
    let before = r.cloud.lock().dir().digest();
    let is_directory = matches!(request, Request::Directory { .. });
    let is_ticket = matches!(request, Request::Ticket);
    let answer = match request {
        Request::Account { name, password } => {
            // Checked as the cloud does before it hashes; the hash itself is not fuzzed.
            let _ = relay::cloud::check_account_name(&name);
            let _ = password.len();
            return;
        }
        request => r.requests.block_on(r.cloud.handle_control(device, request)),
    };
    let bytes = engine::control::encode(&answer);
    assert!(
        engine::control::decode::<Response>(&bytes, transport::CONTROL_MAX).is_ok(),
        "a response decodes within its bounds"
    );
    match &answer {
        Response::Refused(_) if is_directory => {
            assert_eq!(
                r.cloud.lock().dir().digest(),
                before,
                "a refused directory batch changed the directory"
            );
        }
        Response::Refused(_) => {}
        response if is_ticket => {
            let Response::Ticket { ticket, cloud } = response else {
                panic!("a ticket request answered {response:?}")
            };
            assert_eq!(*cloud, w.cloud());
            let body = ticket
                .verify(cloud, transport::now_us(), &device.into())
                .expect("the cloud's fresh ticket verifies for the device that asked");
            assert_eq!(body.device, device);
        }
        _ => {}
    }
    check_cloud(&r.cloud);
}
