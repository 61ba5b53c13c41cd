//! The node's local HTTP API on 127.0.0.1, protected by a bearer token written (mode 0600) to
//! `api.json` in the data directory. Applications use the node as they would the cloud:
//!
//! - `GET /v1/status`; `GET /v1/folders`;
//! - `GET /v1/folders/{folder}/items`, `GET|PUT|DELETE /v1/folders/{folder}/items/{id}`
//!   (PUT takes `{"title": ..., "text": ...}`);
//! - `GET /v1/folders/{folder}/feed.atom` and `feed.json` (Atom with FeedSync, JSON Feed 1.1);
//!   `GET /v1/news.atom`, `news.rss`, `news.json` (the directory's news);
//! - `GET /v1/folders/{folder}/files` (a mapped folder's files: path, size, mtime, BLAKE3 root,
//!   and whether the content is here yet) and `GET /v1/folders/{folder}/files/{path}` (the
//!   file's bytes as the folder says them, from the mapped directory; `409 not-here-yet` while
//!   its content is still being fetched; the ETag is its BLAKE3 root);
//! - `POST /v1/exec` with a CLI command as JSON (what the `feedmesh` CLI uses while the daemon
//!   holds the database).
//!
//! `{folder}` is a folder name or id. Errors are JSON `{"error": CODE, "message": TEXT}` on
//! every route, unknown ones included.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::feedsync::ItemId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cmd::{exec, folder_document, news_document, status_json, Cmd, Ctx, Format};
use crate::net::lock;

/// What `api.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiFile {
    pub addr: SocketAddr,
    pub token: String,
    pub pid: u32,
}

#[derive(Clone)]
struct App {
    ctx: Arc<Ctx>,
    token: Arc<str>,
}

/// An error answer: `{"error": CODE, "message": TEXT}`; CODE is stable (the relay's codes by
/// status, or a device refusal's own: `text-too-large`, `not-a-member`, `not-mapped`).
struct ApiError(StatusCode, String, Option<&'static str>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.2.unwrap_or_else(|| error_code(self.0));
        (self.0, Json(json!({ "error": code, "message": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        let refused = e.chain().find_map(|c| c.downcast_ref::<crate::state::Refused>()).map(|r| r.code());
        let status = if e.chain().any(|c| c.is::<crate::state::NotFound>()) {
            StatusCode::NOT_FOUND
        } else if refused == Some("text-too-large") {
            StatusCode::PAYLOAD_TOO_LARGE
        } else if refused.is_some() {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError(status, format!("{e:#}"), refused)
    }
}

fn error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad-request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not-found",
        405 => "method-not-allowed",
        413 => "too-large",
        415 => "unsupported-media-type",
        422 => "unprocessable",
        _ if status.is_client_error() => "client-error",
        _ => "internal",
    }
}

/// Largest request body: a JSON command with a feed to import (`FEED` bytes as a JSON array)
/// or an item's text; a larger text is still refused by its own limit, with its own message.
pub const BODY_MAX: usize = 64 << 20;

/// axum's own rejections, unknown routes and methods as JSON errors too.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
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
    let text =
        axum::body::to_bytes(resp.into_body(), 4096).await.map(|b| String::from_utf8_lossy(&b).into_owned());
    let message = match status {
        StatusCode::NOT_FOUND => format!("no such resource: {method} {path}"),
        StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed on {path}"),
        StatusCode::PAYLOAD_TOO_LARGE => format!("the request body is over {} MiB", BODY_MAX >> 20),
        _ => text.unwrap_or_default(),
    };
    ApiError(status, message, None).into_response()
}

fn check(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), app.token.as_bytes()));
    if ok {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required (see api.json)".into(),
            None,
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the local API on `listener` until the process ends.
pub async fn serve(ctx: Arc<Ctx>, listener: tokio::net::TcpListener, token: String) -> anyhow::Result<()> {
    let app = App { ctx, token: token.into() };
    let router = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/exec", post(exec_route))
        .route("/v1/folders", get(folders))
        .route("/v1/folders/{folder}/items", get(items))
        .route("/v1/folders/{folder}/files", get(files))
        .route("/v1/folders/{folder}/files/{*path}", get(file))
        .route("/v1/folders/{folder}/items/{id}", get(get_item).put(put_item).delete(delete_item))
        .route("/v1/folders/{folder}/feed.atom", get(feed))
        .route("/v1/folders/{folder}/feed.json", get(feed_json))
        .route("/v1/news.atom", get(|s, h| news(s, h, Format::Atom)))
        .route("/v1/news.rss", get(|s, h| news(s, h, Format::Rss)))
        .route("/v1/news.json", get(|s, h| news(s, h, Format::Json)))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_MAX))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(app);
    axum::serve(listener, router).await?;
    Ok(())
}

async fn status(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    check(&app, &headers)?;
    Ok(Json(status_json(&lock(&app.ctx.node))))
}

async fn exec_route(
    State(app): State<App>,
    headers: HeaderMap,
    Json(cmd): Json<Cmd>,
) -> Result<Json<Value>, ApiError> {
    check(&app, &headers)?;
    let output = exec(&app.ctx, cmd).await?;
    Ok(Json(json!({ "output": output })))
}

async fn folders(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    check(&app, &headers)?;
    let n = lock(&app.ctx.node);
    let list: Vec<Value> = n
        .dir()
        .folders_of(&n.id)
        .into_iter()
        .map(|f| {
            json!({
                "id": engine::signing::hex(&f.0),
                "name": n.dir().folder(&f).map(|x| x.name.clone()),
                "items": n.replica(&f).map_or(0, |r| r.len()),
            })
        })
        .collect();
    Ok(Json(json!({ "folders": list })))
}

/// A mapped folder's directory and its live file entries (winners only), sorted by path.
fn mapped_entries(
    app: &App,
    folder: &str,
) -> Result<(std::path::PathBuf, Vec<engine::folder::FileEntry>), ApiError> {
    let n = lock(&app.ctx.node);
    let folder = n.folder(folder)?;
    let dir = crate::folders::Mappings::load(&n.dir_path)?
        .dir_of(&folder)
        .map(std::path::Path::to_path_buf)
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                "the folder is not mapped to a directory here".into(),
                Some("not-mapped"),
            )
        })?;
    let mut entries: Vec<engine::folder::FileEntry> = n
        .replica(&folder)
        .map(|r| {
            r.items()
                .filter(|i| !i.version.deleted)
                .filter_map(|i| engine::folder::FileEntry::from_version(&i.version).ok())
                .collect()
        })
        .unwrap_or_default();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((dir, entries))
}

async fn files(
    State(app): State<App>,
    headers: HeaderMap,
    Path(folder): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check(&app, &headers)?;
    let (dir, entries) = mapped_entries(&app, &folder)?;
    let list = tokio::task::spawn_blocking(move || {
        let held = crate::folders::held_contents(&dir).unwrap_or_default();
        entries
            .iter()
            .map(|e| {
                json!({
                    "path": e.path.as_str(),
                    "size": e.size,
                    "mtime_ns": e.mtime_ns,
                    "executable": e.executable,
                    "blake3": e.root.to_hex(),
                    "here": held.contains_key(&(e.root, e.size)),
                })
            })
            .collect::<Vec<Value>>()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Json(json!({ "files": list })))
}

/// A file's bytes, streamed from the mapped directory: only the content the folder says the
/// path has (a local edit not yet published, or content still being fetched, is not served).
async fn file(
    State(app): State<App>,
    headers: HeaderMap,
    Path((folder, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check(&app, &headers)?;
    let path = engine::folder::FilePath::new(&path)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("path: {e}"), None))?;
    let (dir, entries) = mapped_entries(&app, &folder)?;
    let entry = entries
        .into_iter()
        .find(|e| e.path == path)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no file {}", path.as_str()), None))?;
    let (root, size) = (entry.root, entry.size);
    let held = tokio::task::spawn_blocking(move || crate::folders::held_path(&dir, &root, size))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))??;
    let Some(held) = held else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("{} is not here yet: its content is still being fetched (see status)", path.as_str()),
            Some("not-here-yet"),
        ));
    };
    let file = tokio::fs::File::open(&held).await.map_err(|e| anyhow::anyhow!("{}: {e}", held.display()))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::ETAG, format!("\"{}\"", root.to_hex())),
        ],
        body,
    )
        .into_response())
}

async fn items(
    State(app): State<App>,
    headers: HeaderMap,
    Path(folder): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check(&app, &headers)?;
    let n = lock(&app.ctx.node);
    let folder = n.folder(&folder)?;
    let list: Vec<Value> = n
        .replica(&folder)
        .map(|r| r.items().map(|i| transport::view::item_json(i, false)).collect())
        .unwrap_or_default();
    Ok(Json(json!({ "items": list })))
}

async fn get_item(
    State(app): State<App>,
    headers: HeaderMap,
    Path((folder, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    check(&app, &headers)?;
    let n = lock(&app.ctx.node);
    let folder = n.folder(&folder)?;
    let fid =
        ItemId::new(&id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("item id: {e}"), None))?;
    let item = n
        .replica(&folder)
        .and_then(|r| r.item(&fid))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no item {id}"), None))?;
    Ok(Json(transport::view::item_json(item, true)))
}

#[derive(Deserialize)]
struct Put {
    title: Option<String>,
    #[serde(default)]
    text: String,
}

async fn put_item(
    State(app): State<App>,
    headers: HeaderMap,
    Path((folder, id)): Path<(String, String)>,
    Json(body): Json<Put>,
) -> Result<Json<Value>, ApiError> {
    check(&app, &headers)?;
    let item = {
        let mut n = lock(&app.ctx.node);
        let folder = n.folder(&folder)?;
        n.put(&folder, &id, body.title.as_deref(), &body.text)?
    };
    if let Ok(net) = app.ctx.net().await {
        net.wake.notify_one();
    }
    Ok(Json(transport::view::item_json(&item, false)))
}

async fn delete_item(
    State(app): State<App>,
    headers: HeaderMap,
    Path((folder, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    check(&app, &headers)?;
    let item = {
        let mut n = lock(&app.ctx.node);
        let folder = n.folder(&folder)?;
        n.remove(&folder, &id)?
    };
    if let Ok(net) = app.ctx.net().await {
        net.wake.notify_one();
    }
    Ok(Json(transport::view::item_json(&item, false)))
}

async fn feed(
    State(app): State<App>,
    headers: HeaderMap,
    Path(folder): Path<String>,
) -> Result<Response, ApiError> {
    folder_feed(&app, &headers, &folder, Format::Atom)
}

async fn feed_json(
    State(app): State<App>,
    headers: HeaderMap,
    Path(folder): Path<String>,
) -> Result<Response, ApiError> {
    folder_feed(&app, &headers, &folder, Format::Json)
}

fn folder_feed(app: &App, headers: &HeaderMap, folder: &str, format: Format) -> Result<Response, ApiError> {
    check(app, headers)?;
    let n = lock(&app.ctx.node);
    let folder = n.folder(folder)?;
    let (text, _) = folder_document(&n, &folder, format)?;
    Ok(([(header::CONTENT_TYPE, media_type(format))], text).into_response())
}

/// The directory's news feed (`/v1/news.atom`, `.rss`, `.json`).
async fn news(State(app): State<App>, headers: HeaderMap, format: Format) -> Result<Response, ApiError> {
    check(&app, &headers)?;
    let (text, _) = news_document(&lock(&app.ctx.node), format)?;
    Ok(([(header::CONTENT_TYPE, media_type(format))], text).into_response())
}

fn media_type(format: Format) -> &'static str {
    match format {
        Format::Atom => transport::syndication::ATOM_TYPE,
        Format::Rss => transport::syndication::RSS_TYPE,
        Format::Json => transport::syndication::JSON_FEED_TYPE,
    }
}
