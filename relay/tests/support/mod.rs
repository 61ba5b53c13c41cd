//! What the relay's HTTP tests share: a relay on loopback with its own runtime, requests from a
//! chosen loopback address (Linux routes all of 127.0.0.0/8 to lo), accounts and a small mesh
//! of users made through the cloud's own request handler.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use engine::directory::{Directory, FolderId, Op, UserId};
use engine::signing::{DeviceId, DeviceKey};
use relay::cloud::Account;
use serde_json::Value;

/// How long a test waits for something that must happen (a gauge, a close) before failing.
pub const PATIENCE: Duration = Duration::from_secs(15);

pub struct Relay {
    pub rt: tokio::runtime::Runtime,
    running: Option<relay::Running>,
    pub url: String,
    dir: tempfile::TempDir,
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

impl Relay {
    pub fn start(limits: relay::Limits) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), limits)
    }

    pub fn start_in(dir: tempfile::TempDir, limits: relay::Limits) -> Self {
        Self::start_with(dir, |cfg| cfg.limits = limits)
    }

    pub fn start_with(dir: tempfile::TempDir, change: impl FnOnce(&mut relay::Config)) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut cfg = relay::Config::loopback(dir.path());
        change(&mut cfg);
        let running = rt.block_on(relay::start(cfg)).expect("relay starts");
        let url = format!("http://{}", running.http_addr);
        Self { rt, running: Some(running), url, dir }
    }

    pub fn running(&self) -> &relay::Running {
        self.running.as_ref().unwrap()
    }

    pub fn admin(&self) -> String {
        self.running().admin_token.clone()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.running().http_addr
    }

    /// An account for a user that need not exist in the directory (tokens only name accounts).
    pub fn add_account(&self, name: &str) {
        self.add_account_for(name, UserId([7; 32]), None);
    }

    /// An account of `user`, with `password` if given (argon2id, as the cloud makes them).
    pub fn add_account_for(&self, name: &str, user: UserId, password: Option<&str>) {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let phc = match password {
            Some(p) => argon2::Argon2::default()
                .hash_password(p.as_bytes(), &SaltString::encode_b64(&[9; 16]).unwrap())
                .unwrap()
                .to_string(),
            None => "unused".into(),
        };
        let account = Account { name: name.into(), user, phc };
        self.running().cloud.lock().accounts.insert(name.into(), account);
    }

    /// A token the admin issues for `account`.
    pub fn token_for(&self, account: &str) -> String {
        let (status, _, body) =
            self.send("POST", &format!("/v1/accounts/{account}/tokens"), Some(&self.admin()), None);
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Option<String>, Value) {
        self.send_from(ip("127.0.0.1"), method, path, token, body)
    }

    /// A request from the loopback address `from`.
    pub fn send_from(
        &self,
        from: IpAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Option<String>, Value) {
        self.rt.block_on(request(&self.url, from, method, path, token, body))
    }

    /// Waits (at most [`PATIENCE`]) until `gauge` reads `value`.
    pub fn wait_for(&self, what: &str, gauge: impl Fn(&relay::Running) -> i64, value: i64) {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let now = gauge(self.running());
            if now == value {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{what} stayed {now}, not {value}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(mut self) -> tempfile::TempDir {
        let running = self.running.take().unwrap();
        self.rt.block_on(running.shutdown());
        self.dir
    }
}

/// One request from `from`; (status, Retry-After, JSON body).
pub async fn request(
    url: &str,
    from: IpAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let c = reqwest::Client::builder().local_address(from).timeout(PATIENCE).build().unwrap();
    let mut req = c.request(method.parse().unwrap(), format!("{url}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

/// Users with one device each, whose directory changes go to the cloud through its own request
/// handler (as a device's would over QUIC).
pub struct Mesh {
    pub dir: Directory,
    when: i64,
}

/// A user and its device.
pub struct Person {
    pub key: DeviceKey,
    pub device: DeviceId,
    pub user: UserId,
}

impl Mesh {
    pub fn new() -> Self {
        Self { dir: Directory::new(), when: 1_700_000_000 }
    }

    /// Makes `op` by `key` and hands it to the cloud.
    pub fn change(&mut self, relay: &Relay, key: &DeviceKey, op: Op) -> engine::directory::SignedChange {
        self.when += 1;
        let change = self.dir.make(key, self.when, op).unwrap();
        let device = DeviceId::of(key);
        let request = transport::Request::Directory { heads: Vec::new(), changes: vec![change.clone()] };
        let answer = relay.running().cloud.handle_request(device, request);
        assert!(matches!(answer, transport::Response::Directory { .. }), "{answer:?}");
        change
    }

    /// A new user (its first device) named `name`, with an account of the same name.
    pub fn person(&mut self, relay: &Relay, seed: u8, name: &str) -> Person {
        let key = DeviceKey::from_bytes(&[seed; 32]);
        let device = DeviceId::of(&key);
        self.change(relay, &key, Op::CreateUser { name: name.into() });
        let user = UserId::of_first_device(device);
        relay.add_account_for(name, user, None);
        Person { key, device, user }
    }

    pub fn folder(&mut self, relay: &Relay, owner: &Person, name: &str) -> FolderId {
        self.change(relay, &owner.key, Op::CreateFolder { name: name.into() }).folder_id()
    }
}

/// A TCP connection to `to` from the loopback address `from`.
pub async fn connect_from(from: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(from), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the peer closes (or resets) the connection; what it sent, or `None` if it was
/// still open after [`PATIENCE`].
pub async fn read_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read).await.ok()?;
    Some(got)
}

/// Sends `GET path` on an open connection and reads one answer: its status, or `None` if the
/// connection closed first.
pub async fn get_on(stream: &mut tokio::net::TcpStream, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let answer = async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if got.len() >= end + 4 + length {
                    return head.split(' ').nth(1).and_then(|s| s.parse().ok());
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, answer).await.expect("an answer or a close")
}

/// A device's replica of `folder` with `n` items signed by `key`, titled `"{title} {i}"` with
/// body `body`.
pub fn signed_replica(
    folder: FolderId,
    key: &DeviceKey,
    n: usize,
    title: &str,
    body: &str,
) -> engine::replica::Replica {
    use engine::feedsync::{Edit, ItemId, When};
    let mut r = engine::replica::Replica::new_signed(1, folder.scope());
    let when = When::from_unix_secs(1_700_000_000).unwrap();
    for i in 0..n {
        let content = transport::view::content(Some(&format!("{title} {i}")), body);
        r.change_signed(
            &ItemId::new(&format!("item-{i}")).unwrap(),
            key,
            &when,
            &Edit { content: Some(content), ..Edit::default() },
        )
        .unwrap();
    }
    r
}
