//! Honest answers (issue 13, items 3 and 4): names are unique on a relay and `init` says the
//! cloud refused (non-zero, nothing created); limits give the same clear error through the CLI,
//! with or without a daemon, and the local API; a non-member is told so; errors are JSON with a
//! stable code.

mod common;

use common::*;
use serde_json::Value;

fn fails(dev: &Dev, args: &[&str]) -> String {
    let out = dev.cmd(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} must fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn names_limits_and_membership_get_honest_answers() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let mut a = Dev::new(root.path(), "a");
    a.ok(&["init", "--relay", &relay.url, "--name", "alice", "--account", "alice"]);
    let folder = a.ok(&["folder", "create", "photos"]).split_whitespace().last().unwrap().to_string();
    a.ok(&["sync"]);

    // A second alice is refused by the cloud, before anything is created.
    let b = Dev::new(root.path(), "b");
    let err = fails(&b, &["init", "--relay", &relay.url, "--name", "alice"]);
    assert!(err.contains("the cloud refused: the user name \"alice\" is taken"), "{err}");
    assert!(!b.dir.exists(), "nothing was created");
    let err = fails(&b, &["init", "--relay", &relay.url, "--name", "ALICE"]);
    assert!(err.contains("is taken"), "names compare case-insensitively: {err}");
    let err = fails(&b, &["init", "--relay", &relay.url, "--name", "bob", "--account", "alice"]);
    assert!(err.contains("the cloud refused: the account name \"alice\" is taken"), "{err}");
    assert!(!b.dir.exists());
    // A weak password is refused here, before the relay is asked.
    let out = b
        .command()
        .arg("--dir")
        .arg(&b.dir)
        .args(["init", "--relay", &relay.url, "--name", "bob", "--account", "bob"])
        .env("FEEDMESH_PASSWORD", "short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("passwords are 8 to 1024 bytes"));
    assert!(!b.dir.exists());
    b.ok(&["init", "--relay", &relay.url, "--name", "bob"]);
    b.ok(&["sync"]);

    // Bob is no member of alice's folder: put and ls say so.
    let err = fails(&b, &["put", &folder, "x", "text"]);
    assert!(err.contains("you are not a member of folder photos"), "{err}");
    let err = fails(&b, &["ls", &folder]);
    assert!(err.contains("you are not a member of folder photos"), "{err}");

    // 10 MB of text: the same error from the CLI with and without a daemon, and the local API.
    let big = root.path().join("big.txt");
    std::fs::write(&big, vec![b'x'; 10 << 20]).unwrap();
    let limit = "item text is 10485760 bytes, over the limit of 256 KiB";
    let err = fails(&a, &["put", "photos", "big", "--file", big.to_str().unwrap()]);
    assert!(err.contains(limit), "{err}");
    a.start();
    let err = fails(&a, &["put", "photos", "big", "--file", big.to_str().unwrap()]);
    assert!(err.contains(limit), "{err}");
    let (base, token) = a.api();
    relay.rt.block_on(async {
        let c = reqwest::Client::new();
        let text = "x".repeat(10 << 20);
        let r = c
            .put(format!("{base}/v1/folders/photos/items/big"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"text": text}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "text-too-large", "{body}");
        assert!(body["message"].as_str().unwrap().contains(limit), "{body}");
        let r = c.get(format!("{base}/v1/nothing/here")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "not-found", "{body}");
        let r = c.get(format!("{base}/v1/folders/nope/items")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "not-found");
    });
    a.kill();
}
