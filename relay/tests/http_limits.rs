//! The HTTP API's limits and tokens: a request budget per client address, login attempts per
//! account and per address (refused before any argon2 work), oversize credentials, a cap on
//! waiting long-polls, logout, token expiry, tokens surviving a restart, trusted proxies, and the
//! address discovery port devices are told.

use std::time::Duration;

use engine::directory::UserId;
use relay::cloud::Account;
use serde_json::{json, Value};

struct Relay {
    rt: tokio::runtime::Runtime,
    running: Option<relay::Running>,
    url: String,
    dir: tempfile::TempDir,
}

impl Relay {
    fn start(limits: relay::Limits) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), limits)
    }

    fn start_in(dir: tempfile::TempDir, limits: relay::Limits) -> Self {
        Self::start_with(dir, |cfg| cfg.limits = limits)
    }

    fn start_with(dir: tempfile::TempDir, change: impl FnOnce(&mut relay::Config)) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut cfg = relay::Config::loopback(dir.path());
        change(&mut cfg);
        let running = rt.block_on(relay::start(cfg)).expect("relay starts");
        let url = format!("http://{}", running.http_addr);
        Self { rt, running: Some(running), url, dir }
    }

    fn running(&self) -> &relay::Running {
        self.running.as_ref().unwrap()
    }

    /// An account for a user that need not exist in the directory (tokens only name accounts).
    fn add_account(&self, name: &str) {
        let account = Account { name: name.into(), user: UserId([7; 32]), phc: "unused".into() };
        self.running().cloud.lock().accounts.insert(name.into(), account);
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Option<String>, Value) {
        self.rt.block_on(async {
            let c = reqwest::Client::new();
            let mut req = c.request(method.parse().unwrap(), format!("{}{path}", self.url));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(&b);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (status, retry, r.json().await.unwrap_or(Value::Null))
        })
    }

    fn stop(mut self) -> tempfile::TempDir {
        let running = self.running.take().unwrap();
        self.rt.block_on(running.shutdown());
        self.dir
    }
}

#[test]
fn each_client_address_has_a_request_budget() {
    let relay =
        Relay::start(relay::Limits { http_requests_per_second: 1, http_burst: 5, ..Default::default() });
    // A slow machine may take more than a second over the burst, earning a token back: so the
    // test counts what got through before the first refusal, against what the budget allows.
    let started = std::time::Instant::now();
    let mut ok = 0;
    let (status, retry, body) = loop {
        let answer = relay.send("GET", "/health", None, None);
        if answer.0 != 200 || ok > 100 {
            break answer;
        }
        ok += 1;
    };
    let allowed = 5 + started.elapsed().as_secs_f64().ceil() as usize;
    assert!((5..=allowed).contains(&ok), "{ok} requests got through; the budget allows 5 to {allowed}");
    assert_eq!(status, 429);
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(body["error"].as_str().unwrap().contains("too many requests"), "{body}");
    let metrics = relay.running().cloud.metrics.render(0);
    assert!(metrics.contains("feedmesh_refusals_total{kind=\"http-rate\"} 1"), "{metrics}");
}

#[test]
fn login_attempts_are_limited_per_account_and_per_address() {
    let relay = Relay::start(relay::Limits { logins_per_minute: 2, ..Default::default() });
    let login = |account: &str| {
        relay.send("POST", "/v1/login", None, Some(json!({"account": account, "password": "wrong-password"})))
    };
    assert_eq!(login("mallory").0, 401);
    assert_eq!(login("mallory").0, 401);
    let (status, retry, _) = login("mallory");
    assert_eq!(status, 429, "the third guess within a minute is refused");
    // 2 a minute: one back in 30 s, less whatever the two refused guesses took.
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!((20..=30).contains(&retry), "Retry-After {retry}");
    // Another account from the same address: the address's own budget is spent too.
    assert_eq!(login("trent").0, 429);
    // Oversize credentials are refused outright.
    let long = "x".repeat(relay::cloud::PASSWORD_MAX + 1);
    let (status, _, body) =
        relay.send("POST", "/v1/login", None, Some(json!({"account": "a", "password": long})));
    assert_eq!(status, 400, "{body}");
}

#[test]
fn waiting_long_polls_are_capped() {
    let relay = Relay::start(relay::Limits { long_polls_max: 1, ..Default::default() });
    let admin = relay.running().admin_token.clone();
    let url = relay.url.clone();
    let (first, second) = relay.rt.block_on(async {
        let c = reqwest::Client::new();
        let held = tokio::spawn({
            let (c, url, admin) = (c.clone(), url.clone(), admin.clone());
            async move {
                c.get(format!("{url}/v1/notifications?since=0&timeout=3"))
                    .bearer_auth(admin)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        });
        // The first is waiting once the gauge says so.
        loop {
            let m = c.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
            if m.contains("feedmesh_long_polls 1") {
                break;
            }
            // Polling within the request budget (50 a second).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let second = c
            .get(format!("{url}/v1/notifications?since=0&timeout=3"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        let retry = second.headers().get("retry-after").is_some();
        ((held.await.unwrap()), (second.status().as_u16(), retry))
    });
    assert_eq!(first, 200, "the waiting one is answered at its timeout");
    assert_eq!(second, (503, true), "a second one over the cap is turned away with Retry-After");
    // And the slot is free again afterwards.
    let (status, _, _) = relay.send("GET", "/v1/notifications?since=0&timeout=0", Some(&admin), None);
    assert_eq!(status, 200);
}

#[test]
fn tokens_survive_a_restart_and_logout_revokes_them() {
    let relay = Relay::start(relay::Limits::default());
    relay.add_account("carol");
    let admin = relay.running().admin_token.clone();
    let (status, _, body) = relay.send("POST", "/v1/accounts/carol/tokens", Some(&admin), None);
    assert_eq!(status, 200, "{body}");
    let kept = body["token"].as_str().unwrap().to_string();
    let (_, _, body) = relay.send("POST", "/v1/accounts/carol/tokens", Some(&admin), None);
    let revoked = body["token"].as_str().unwrap().to_string();
    assert_eq!(relay.send("GET", "/v1/folders", Some(&kept), None).0, 200);
    assert_eq!(relay.send("POST", "/v1/logout", Some(&revoked), None).2["revoked"], true);
    assert_eq!(relay.send("GET", "/v1/folders", Some(&revoked), None).0, 401, "logged out");
    // The store holds hashes, not tokens.
    let dir = relay.stop();
    let db = std::fs::read(dir.path().join("relay.redb")).unwrap();
    assert!(!db.windows(kept.len()).any(|w| w == kept.as_bytes()), "a usable token is on disk");

    let relay = Relay::start_in(dir, relay::Limits::default());
    relay.add_account("carol");
    assert_eq!(relay.send("GET", "/v1/folders", Some(&kept), None).0, 200, "the token outlived the restart");
    assert_eq!(
        relay.send("GET", "/v1/folders", Some(&revoked), None).0,
        401,
        "and the revoked one stays revoked"
    );
    // The admin token cannot be logged out.
    assert_eq!(relay.send("POST", "/v1/logout", Some(&admin), None).2["revoked"], false);
    assert_eq!(relay.send("GET", "/v1/folders", Some(&admin), None).0, 200);
}

#[test]
fn tokens_expire_and_each_account_keeps_a_bounded_number() {
    let relay = Relay::start(relay::Limits { token_ttl_secs: 0, ..Default::default() });
    relay.add_account("dave");
    let admin = relay.running().admin_token.clone();
    let (_, _, body) = relay.send("POST", "/v1/accounts/dave/tokens", Some(&admin), None);
    assert_eq!(body["expires_in"], 0);
    let expired = body["token"].as_str().unwrap().to_string();
    assert_eq!(relay.send("GET", "/v1/folders", Some(&expired), None).0, 401, "a token past its lifetime");

    let relay = Relay::start(relay::Limits { tokens_per_account: 2, ..Default::default() });
    relay.add_account("erin");
    let admin = relay.running().admin_token.clone();
    let tokens: Vec<String> = (0..3)
        .map(|_| {
            let (_, _, body) = relay.send("POST", "/v1/accounts/erin/tokens", Some(&admin), None);
            body["token"].as_str().unwrap().to_string()
        })
        .collect();
    let live: Vec<u16> = tokens.iter().map(|t| relay.send("GET", "/v1/folders", Some(t), None).0).collect();
    // Issued in the same second, the oldest by (time, hash) goes: exactly one of the three.
    assert_eq!(live.iter().filter(|&&s| s == 200).count(), 2, "{live:?}");
    assert_eq!(live[2], 200, "the newest is always kept");
}

#[test]
fn pairing_requests_share_the_login_budget_of_the_account() {
    // Pairing requests over QUIC check the password with the same function, keyed by device.
    let relay = Relay::start(relay::Limits { logins_per_minute: 2, ..Default::default() });
    let cloud = relay.running().cloud.clone();
    let check = |client: &str| {
        relay.rt.block_on(cloud.clone().verify_password("frank".into(), "guess-guess".into(), client.into()))
    };
    assert!(matches!(check("device:1"), Err(relay::cloud::LoginError::Wrong)), "an unknown account");
    assert!(matches!(check("device:2"), Err(relay::cloud::LoginError::Wrong)));
    // A third device guessing the same account is refused before any hashing.
    assert!(
        matches!(check("device:3"), Err(relay::cloud::LoginError::RateLimited(20..=30))),
        "refused for about 30 s"
    );
}

#[test]
fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    let limits = relay::Limits { http_requests_per_second: 1, http_burst: 2, ..Default::default() };
    let health = |relay: &Relay, forwarded: &str| {
        relay.rt.block_on(async {
            let r = reqwest::Client::new()
                .get(format!("{}/health", relay.url))
                .header("x-forwarded-for", forwarded)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        })
    };
    // The test's requests come from 127.0.0.1, here a trusted proxy.
    let relay = Relay::start_with(tempfile::tempdir().unwrap(), |cfg| {
        cfg.limits = limits.clone();
        cfg.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    });
    // Spending a whole burst, and more, as one client...
    let statuses: Vec<u16> = (0..6).map(|_| health(&relay, "198.51.100.1")).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    // ...leaves another client's budget whole; a forged entry left of the real one is ignored.
    assert_eq!(health(&relay, "198.51.100.1, 198.51.100.2"), 200);
    assert_eq!(health(&relay, "198.51.100.1, 198.51.100.2"), 200);

    // Without trusted proxies the header is ignored: varying it earns nothing.
    let relay = Relay::start(limits);
    let statuses: Vec<u16> = (0..6).map(|i| health(&relay, &format!("198.51.100.{i}"))).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[test]
fn devices_are_told_the_public_address_discovery_port() {
    let relay = Relay::start_with(tempfile::tempdir().unwrap(), |cfg| {
        cfg.tls_self_signed = vec!["127.0.0.1".into()];
        cfg.public_qad_port = Some(443);
    });
    let bound = relay.running().qad_addr.expect("address discovery runs with TLS").port();
    assert_ne!(bound, 443, "port 0 never binds below 1024");
    assert_eq!(relay.running().connect_info().qad_port, Some(443));
    let (status, _, info) = relay.send("GET", "/v1/connect", None, None);
    assert_eq!(status, 200);
    assert_eq!(info["qad_port"], 443, "{info}");
}
