//! The local HTTP API and the CLI make the same writes with the same checks (issue 12, item 5):
//! both go through `Node::put` and `Node::remove`.

mod common;

use common::*;

#[test]
fn the_local_api_checks_writes_as_the_cli_does() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let mut a1 = Dev::new(root.path(), "a1");
    a1.ok(&["init", "--relay", &relay.url, "--name", "alice"]);
    a1.ok(&["folder", "create", "notes"]);
    // The CLI refuses both.
    let big = "x".repeat(300 * 1024);
    let file = root.path().join("big.txt");
    std::fs::write(&file, &big).unwrap();
    let out = a1.cmd(&["put", "notes", "big", "--file", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("over the limit of 256 KiB"));
    let out = a1.cmd(&["rm", "notes", "ghost"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no item ghost"));
    // The API gives the same answers.
    a1.start();
    let (base, token) = a1.api();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let call = |method: reqwest::Method, id: &str, body: Option<serde_json::Value>| {
        let mut request =
            client.request(method, format!("{base}/v1/folders/notes/items/{id}")).bearer_auth(&token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        rt.block_on(async {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        })
    };
    let (status, text) = call(reqwest::Method::PUT, "big", Some(serde_json::json!({ "text": big })));
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("\"error\":\"text-too-large\""), "a stable code: {text}");
    assert!(text.contains("over the limit of 256 KiB"), "{text}");
    let (status, text) = call(reqwest::Method::DELETE, "ghost", None);
    assert_eq!(status, 400, "a tombstone for an item that never was: {text}");
    assert!(text.contains("no item ghost"), "{text}");
    let (status, text) = call(reqwest::Method::PUT, "small", Some(serde_json::json!({ "text": "hello" })));
    assert_eq!(status, 200, "{text}");
    let (status, text) = call(reqwest::Method::DELETE, "small", None);
    assert_eq!(status, 200, "{text}");
    let (status, text) = call(reqwest::Method::DELETE, "small", None);
    assert_eq!(status, 400, "deleted twice: {text}");
}
