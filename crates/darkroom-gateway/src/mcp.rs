//! Darkroom as an MCP (Model Context Protocol) server: every app endpoint in the catalog is a tool, and a tool call
//! runs through the queue (submit, poll the status with progress notifications, fetch the result).
//!
//! The server uses only the gateway's public HTTP API, through [`Api`], so auth, scopes, validation, limits, budgets
//! and usage apply exactly as for any other client. Two transports:
//! - Streamable HTTP at `/mcp` on the gateway ([`http_service`]): stateless; every call goes through the gateway's
//!   own router in process ([`InProcessApi`]) with the MCP caller's `Authorization` header.
//! - stdio (`darkroom mcp`, [`serve_stdio`]): talks to a running server over HTTP ([`HttpApi`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorCode, Implementation, InitializeResult,
    JsonObject, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ProgressToken, Resource,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, Peer, RoleServer, ServerHandler, ServiceExt as _};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::Gateway;

/// What the model is told about this server.
const INSTRUCTIONS: &str = "Darkroom is a self-hosted generative-media platform. Each tool runs one Darkroom app \
    (an image, audio or test model) through Darkroom's request queue: the call waits until the request completes \
    and returns the app's JSON output. Generated media are returned as file URLs (also attached as resource links); \
    pass such URLs on to other tools that take file inputs. Inputs are validated against each tool's input schema; \
    a failed request returns an error result with the server's explanation.";

/// Largest in-process response body read.
const MAX_BODY: usize = 512 << 20;
/// Catalog pages followed at most (100 models each).
const MAX_CATALOG_PAGES: usize = 100;
/// Consecutive failures to reach the server while polling before a tool call gives up.
const MAX_POLL_FAILURES: u32 = 5;
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(250);

/// The gateway's public HTTP API, as the MCP server uses it.
#[async_trait]
pub trait Api: Send + Sync + 'static {
    /// method, path with query (e.g. "/v1/models?expand=schemas"), optional JSON body -> (status, JSON body).
    /// A body that is not JSON comes back as a JSON string.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Value), String>;
}

fn parse_body(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// A remote Darkroom server over HTTP(S), acting with an API key (`Authorization: Key …`).
pub struct HttpApi {
    base: url::Url,
    key: Option<String>,
    http: reqwest::Client,
}

impl HttpApi {
    /// `base` is the server's base URL (`https://127.0.0.1:8080`, or with a path prefix); `ca_cert` an extra CA
    /// (PEM) to trust besides the system's.
    pub fn new(base: &str, key: Option<String>, ca_cert: Option<&Path>) -> Result<HttpApi, String> {
        let base = url::Url::parse(base).map_err(|e| format!("invalid server URL {base:?}: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(format!("the server URL must be http:// or https://, not {base}"));
        }
        let tls = darkroom_core::tls::client_config(ca_cert)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(HttpApi { base, key: key.filter(|k| !k.is_empty()), http })
    }

    /// The base URL's path without its trailing slash (`""` for a server at the root).
    pub fn base_path(&self) -> String {
        self.base.path().trim_end_matches('/').to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base.as_str().trim_end_matches('/'), path)
    }
}

#[async_trait]
impl Api for HttpApi {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        let url = self.url(path);
        let mut rb = self.http.request(method.clone(), &url).header(ACCEPT, "application/json");
        if let Some(key) = &self.key {
            rb = rb.header(AUTHORIZATION, format!("Key {key}"));
        }
        if let Some(body) = body {
            rb = rb.json(&body);
        }
        let resp = rb.send().await.map_err(|e| format!("{method} {url}: cannot reach the server: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| format!("{method} {url}: reading the response: {e}"))?;
        Ok((status, parse_body(&bytes)))
    }
}

/// The gateway's own router, called in process with a caller's `Authorization` header.
pub struct InProcessApi {
    gw: Weak<Gateway>,
    authorization: Option<HeaderValue>,
    host: Option<HeaderValue>,
}

impl InProcessApi {
    /// Calls act as the caller whose `Authorization` header this is (none: as an anonymous client, which only a
    /// `--no-auth` gateway accepts).
    pub fn new(gw: &Arc<Gateway>, authorization: Option<HeaderValue>) -> InProcessApi {
        InProcessApi { gw: Arc::downgrade(gw), authorization, host: None }
    }
}

#[async_trait]
impl Api for InProcessApi {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        let router = self.gw.upgrade().ok_or("the gateway is shutting down")?.router();
        // The caller's host keeps the gateway's host checks and absolute URLs as they were for the MCP request.
        let host = self.host.clone().unwrap_or_else(|| HeaderValue::from_static("127.0.0.1"));
        let mut b = http::Request::builder().method(method.clone()).uri(path).header(HOST, host);
        b = b.header(ACCEPT, "application/json");
        if let Some(a) = &self.authorization {
            b = b.header(AUTHORIZATION, a.clone());
        }
        let body = match body {
            Some(v) => {
                b = b.header(CONTENT_TYPE, "application/json");
                axum::body::Body::from(serde_json::to_vec(&v).map_err(|e| e.to_string())?)
            }
            None => axum::body::Body::empty(),
        };
        let req = b.body(body).map_err(|e| format!("{method} {path}: {e}"))?;
        let resp = match router.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), MAX_BODY)
            .await
            .map_err(|e| format!("{method} {path}: reading the response: {e}"))?;
        Ok((status, parse_body(&bytes)))
    }
}

/// `Authorization: Bearer <key>` (what many MCP clients can send) read as `Key <key>`; anything else unchanged.
fn normalize_authorization(v: &HeaderValue) -> HeaderValue {
    if let Ok(s) = v.to_str()
        && s.len() > 7
        && s[..7].eq_ignore_ascii_case("bearer ")
        && let Ok(k) = HeaderValue::from_str(&format!("Key {}", s[7..].trim()))
    {
        return k;
    }
    v.clone()
}

/// The tool name for an endpoint id: `/` becomes `__`, any other character outside `[A-Za-z0-9_.-]` becomes `_`.
pub fn tool_name(endpoint_id: &str) -> String {
    let mut s = String::with_capacity(endpoint_id.len() + 4);
    for c in endpoint_id.chars() {
        match c {
            '/' => s.push_str("__"),
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') => s.push(c),
            _ => s.push('_'),
        }
    }
    s
}

/// The path and query of a URL the gateway returned, as [`Api::call`] takes it: scheme and host dropped, and the
/// server's own path prefix (`prefix`, e.g. `/darkroom` for a public URL `https://host/darkroom`) removed. When the
/// URL names another prefix, the path from its `/queue/` segment on is used.
pub fn api_path(url: &str, prefix: &str) -> String {
    let pq = match url::Url::parse(url) {
        Ok(u) => match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        },
        Err(_) => url.to_string(),
    };
    let prefix = prefix.trim_end_matches('/');
    if !prefix.is_empty()
        && let Some(rest) = pq.strip_prefix(prefix)
        && (rest.starts_with('/') || rest.starts_with('?'))
    {
        return rest.to_string();
    }
    if !pq.starts_with("/queue/")
        && let Some(i) = pq.find("/queue/")
    {
        return pq[i..].to_string();
    }
    pq
}

fn with_query(path: &str, q: &str) -> String {
    if path.contains('?') { format!("{path}&{q}") } else { format!("{path}?{q}") }
}

/// A file object in an output: any JSON object with a string `url` and a string `content_type`.
#[derive(Debug, Clone, PartialEq)]
pub struct FileLink {
    pub url: String,
    pub content_type: String,
    pub file_name: Option<String>,
    pub file_size: Option<u64>,
}

/// Every file object in `v`, in document order, each URL once.
pub fn file_links(v: &Value) -> Vec<FileLink> {
    fn walk(v: &Value, out: &mut Vec<FileLink>) {
        match v {
            Value::Object(o) => {
                if let (Some(Value::String(url)), Some(Value::String(ct))) = (o.get("url"), o.get("content_type")) {
                    if !out.iter().any(|f| &f.url == url) {
                        out.push(FileLink {
                            url: url.clone(),
                            content_type: ct.clone(),
                            file_name: o.get("file_name").and_then(Value::as_str).map(str::to_string),
                            file_size: o.get("file_size").and_then(Value::as_u64),
                        });
                    }
                    return;
                }
                o.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = vec![];
    walk(v, &mut out);
    out
}

/// `data:<mime>;base64,<data>` split into its media type and data.
fn data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (head, data) = rest.split_once(',')?;
    let mime = head.strip_suffix(";base64")?;
    Some((mime, data))
}

impl FileLink {
    fn name(&self) -> String {
        if let Some(n) = self.file_name.as_deref().filter(|n| !n.is_empty()) {
            return n.to_string();
        }
        if !self.url.starts_with("data:")
            && let Ok(u) = url::Url::parse(&self.url)
            && let Some(seg) = u.path_segments().and_then(|mut s| s.next_back()).filter(|s| !s.is_empty())
        {
            return seg.to_string();
        }
        "output".to_string()
    }

    /// Inline images and audio for `data:` URLs; a resource link otherwise.
    fn content(&self) -> ContentBlock {
        if let Some((mime, data)) = data_url(&self.url) {
            let mime = if mime.is_empty() { self.content_type.as_str() } else { mime };
            if mime.starts_with("image/") {
                return ContentBlock::image(data, mime);
            }
            if mime.starts_with("audio/") {
                return ContentBlock::audio(data, mime);
            }
        }
        let mut r = Resource::new(self.url.clone(), self.name()).with_mime_type(self.content_type.clone());
        if let Some(size) = self.file_size {
            r = r.with_size(size);
        }
        ContentBlock::resource_link(r)
    }
}

/// A copy of `v` for the text content, with the long `data:` URLs of `attached` files shortened (the files are
/// attached as content blocks).
fn elide_data_urls(v: &Value, attached: &[FileLink]) -> Value {
    match v {
        Value::String(s) if s.len() > 256 && s.starts_with("data:") && attached.iter().any(|f| &f.url == s) => {
            let head = s.split(',').next().unwrap_or("data:");
            Value::String(format!("{head},… ({} bytes, attached)", s.len()))
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| elide_data_urls(x, attached)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| (k.clone(), elide_data_urls(x, attached))).collect()),
        other => other.clone(),
    }
}

/// The tool result for an app's output.
pub fn success_result(output: Value) -> CallToolResult {
    let files = file_links(&output);
    let mut content = vec![ContentBlock::text(elide_data_urls(&output, &files).to_string())];
    content.extend(files.iter().map(FileLink::content));
    let mut r = CallToolResult::success(content);
    // MCP's structured content is an object.
    r.structured_content = Some(if output.is_object() { output } else { json!({ "result": output }) });
    r
}

fn error_result(text: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

/// An error answer of the server, for a person or a model to read: status, `error_type`, and the whole body (with
/// field-level validation detail).
fn api_error_text(doing: &str, status: u16, body: &Value) -> String {
    let kind = body.get("error_type").and_then(Value::as_str).map(|t| format!(" ({t})")).unwrap_or_default();
    let body = match body {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!("Darkroom answered HTTP {status}{kind} when {doing}: {body}")
}

/// The tool's input schema: the app's JSON Schema as an object schema, without `$schema`.
fn input_schema(schema: &Value) -> JsonObject {
    let mut o = match schema {
        Value::Object(o) => o.clone(),
        _ => Map::new(),
    };
    o.remove("$schema");
    let is_object = match o.get("type") {
        None => {
            o.insert("type".into(), json!("object"));
            true
        }
        Some(Value::String(t)) => t == "object",
        Some(Value::Array(ts)) if ts.iter().any(|t| t == "object") => {
            o.insert("type".into(), json!("object"));
            true
        }
        Some(_) => false,
    };
    if !is_object {
        // Not an object schema: MCP tools take objects, so accept any object and let the server validate.
        o = Map::new();
        o.insert("type".into(), json!("object"));
        o.insert("additionalProperties".into(), json!(true));
    }
    o
}

fn price_text(pricing: &Value) -> Option<String> {
    let unit_price = pricing.get("unit_price").and_then(Value::as_f64).unwrap_or(0.0);
    let second = pricing.get("runner_second_price").and_then(Value::as_f64).unwrap_or(0.0);
    let currency = pricing.get("currency").and_then(Value::as_str).unwrap_or("USD");
    let unit = pricing.get("unit").and_then(Value::as_str).unwrap_or("request");
    if pricing.is_null() {
        return None;
    }
    let mut parts = vec![];
    if unit_price > 0.0 {
        parts.push(format!("{unit_price} {currency} per {unit}"));
    }
    if second > 0.0 {
        parts.push(format!("{second} {currency} per runner second"));
    }
    Some(if parts.is_empty() { "Price: free.".to_string() } else { format!("Price: {}.", parts.join(" plus ")) })
}

fn describe(endpoint_id: &str, meta: &Value) -> String {
    let s = |k: &str| meta.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
    let mut lines = vec![];
    match (s("display_name"), s("description")) {
        (Some(n), Some(d)) => lines.push(format!("{n}: {d}")),
        (Some(n), None) => lines.push(n.to_string()),
        (None, Some(d)) => lines.push(d.to_string()),
        (None, None) => {}
    }
    let mut facts = format!("Runs the Darkroom app endpoint `{endpoint_id}` through the queue.");
    if let Some(c) = s("category") {
        facts.push_str(&format!(" Category: {c}."));
    }
    if let Some(st) = s("status").filter(|st| *st != "active") {
        facts.push_str(&format!(" Status: {st}."));
    }
    if let Some(p) = meta.get("pricing").and_then(price_text) {
        facts.push(' ');
        facts.push_str(&p);
    }
    lines.push(facts);
    lines.join("\n")
}

/// The tool for one catalog item (`None` without an `endpoint_id`).
pub fn tool_for_model(model: &Value) -> Option<(Tool, String)> {
    let endpoint_id = model.get("endpoint_id").and_then(Value::as_str).filter(|e| !e.is_empty())?;
    let meta = model.get("metadata").cloned().unwrap_or(Value::Null);
    let schema = input_schema(model.get("input_schema").unwrap_or(&Value::Null));
    let mut tool = Tool::new(tool_name(endpoint_id), describe(endpoint_id, &meta), Arc::new(schema));
    if let Some(title) = meta.get("display_name").and_then(Value::as_str).filter(|t| !t.is_empty()) {
        tool = tool.with_title(title);
    }
    Some((tool, endpoint_id.to_string()))
}

/// A failed call to the server.
enum ApiFailure {
    Unreachable(String),
    Status(u16, Value),
}

impl ApiFailure {
    fn into_mcp(self, doing: &str) -> McpError {
        match self {
            ApiFailure::Unreachable(e) => McpError::internal_error(format!("{doing}: {e}"), None),
            ApiFailure::Status(code, body) => {
                let text = api_error_text(doing, code, &body);
                if code == 401 || code == 403 {
                    McpError::new(ErrorCode::INVALID_REQUEST, text, Some(body))
                } else {
                    McpError::internal_error(text, Some(body))
                }
            }
        }
    }
}

/// Every item of the catalog, following its pages.
async fn catalog(api: &dyn Api) -> Result<Vec<Value>, ApiFailure> {
    let mut out = vec![];
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_CATALOG_PAGES {
        let mut path = "/v1/models?expand=schemas&limit=100".to_string();
        if let Some(c) = &cursor {
            path.push_str("&cursor=");
            path.extend(url::form_urlencoded::byte_serialize(c.as_bytes()));
        }
        let (code, body) = api.call(Method::GET, &path, None).await.map_err(ApiFailure::Unreachable)?;
        if !(200..300).contains(&code) {
            return Err(ApiFailure::Status(code, body));
        }
        if let Some(models) = body.get("models").and_then(Value::as_array) {
            out.extend(models.iter().cloned());
        }
        let more = body.get("has_more").and_then(Value::as_bool).unwrap_or(false);
        match body.get("next_cursor").and_then(Value::as_str).filter(|c| !c.is_empty()) {
            Some(c) if more && cursor.as_deref() != Some(c) => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// How a server reaches the gateway.
#[derive(Clone)]
enum Backend {
    /// One API for every call (stdio: a remote server with one key).
    Fixed(Arc<dyn Api>),
    /// The gateway's router in process, with each MCP request's own credentials.
    InProcess(Weak<Gateway>),
}

/// Tool names seen in catalogs, to their endpoint ids (shared by the stateless HTTP service's per-request servers).
#[derive(Default)]
struct ToolNames(Mutex<HashMap<String, String>>);

impl ToolNames {
    fn get(&self, name: &str) -> Option<String> {
        self.0.lock().unwrap().get(name).cloned()
    }
    fn remember(&self, pairs: impl IntoIterator<Item = (String, String)>) {
        let mut m = self.0.lock().unwrap();
        if m.len() > 100_000 {
            m.clear();
        }
        m.extend(pairs);
    }
}

/// The MCP server: a [`ServerHandler`] over an [`Api`].
#[derive(Clone)]
pub struct McpServer {
    backend: Backend,
    names: Arc<ToolNames>,
    /// The server's own path prefix in the URLs it returns (see [`api_path`]).
    prefix: String,
}

impl McpServer {
    /// A server whose every call goes through `api`; `prefix` is the path of the server's public base URL (`""` at
    /// the root), removed from the URLs the server returns.
    pub fn new(api: Arc<dyn Api>, prefix: &str) -> McpServer {
        McpServer { backend: Backend::Fixed(api), names: Default::default(), prefix: prefix.to_string() }
    }

    fn api(&self, ctx: &RequestContext<RoleServer>) -> Arc<dyn Api> {
        match &self.backend {
            Backend::Fixed(api) => api.clone(),
            Backend::InProcess(gw) => {
                let parts = ctx.extensions.get::<http::request::Parts>();
                Arc::new(InProcessApi {
                    gw: gw.clone(),
                    authorization: parts.and_then(|p| p.headers.get(AUTHORIZATION)).map(normalize_authorization),
                    host: parts.and_then(|p| p.headers.get(HOST)).cloned(),
                })
            }
        }
    }

    async fn tools(&self, api: &dyn Api) -> Result<Vec<Tool>, McpError> {
        let models = catalog(api).await.map_err(|e| e.into_mcp("listing the models (GET /v1/models)"))?;
        let mut tools = Vec::with_capacity(models.len());
        let mut names = Vec::with_capacity(models.len());
        for m in &models {
            if let Some((tool, endpoint)) = tool_for_model(m) {
                names.push((tool.name.to_string(), endpoint));
                tools.push(tool);
            }
        }
        self.names.remember(names);
        Ok(tools)
    }

    /// The endpoint id of a tool name, from what was listed before or a fresh catalog.
    async fn endpoint(&self, api: &dyn Api, name: &str) -> Result<String, McpError> {
        if let Some(e) = self.names.get(name) {
            return Ok(e);
        }
        self.tools(api).await?;
        self.names.get(name).ok_or_else(|| {
            McpError::invalid_params(format!("unknown tool {name:?}: no Darkroom app endpoint has this name"), None)
        })
    }
}

async fn or_cancel<T>(ct: &CancellationToken, f: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        biased;
        _ = ct.cancelled() => None,
        v = f => Some(v),
    }
}

/// The progress notifications of one tool call.
struct Progress {
    token: Option<ProgressToken>,
    peer: Option<Peer<RoleServer>>,
    last_state: Option<(String, Option<u64>, Option<u64>, String)>,
    last_value: Option<f64>,
}

impl Progress {
    /// The next progress value: the fraction in percent when it moved forward, else a small step (MCP asks for a
    /// value that increases with every notification).
    fn next_value(&mut self, fraction: Option<f64>, done: bool) -> f64 {
        let want = if done { 100.0 } else { fraction.map(|f| f.clamp(0.0, 1.0) * 100.0).unwrap_or(0.0) };
        let v = match self.last_value {
            Some(last) if want <= last => last + (100.0 - last).max(0.0) / 1000.0,
            _ => want,
        };
        self.last_value = Some(v);
        v
    }

    /// Reports a status answer when it differs from the last one reported.
    async fn report(&mut self, status: &Value) {
        let (Some(token), Some(peer)) = (self.token.clone(), self.peer.clone()) else { return };
        let state = status.get("status").and_then(Value::as_str).unwrap_or("").to_string();
        let position = status.get("queue_position").and_then(Value::as_u64);
        let fraction = status.pointer("/progress/fraction").and_then(Value::as_f64);
        let message = match state.as_str() {
            "IN_QUEUE" => format!("in queue, position {}", position.unwrap_or(0)),
            "COMPLETED" => "completed".to_string(),
            _ => status
                .pointer("/progress/message")
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
                .or_else(|| {
                    status
                        .get("logs")
                        .and_then(Value::as_array)
                        .and_then(|l| l.last())
                        .and_then(|l| l.get("message"))
                        .and_then(Value::as_str)
                        .filter(|m| !m.is_empty())
                })
                .unwrap_or("running")
                .to_string(),
        };
        let key = (state.clone(), position, fraction.map(f64::to_bits), message.clone());
        if self.last_state.as_ref() == Some(&key) {
            return;
        }
        self.last_state = Some(key);
        let value = self.next_value(fraction, state == "COMPLETED");
        let p = ProgressNotificationParam::new(token, value).with_total(100.0).with_message(message);
        if let Err(e) = peer.notify_progress(p).await {
            tracing::debug!(error = %e, "MCP progress notification not sent");
        }
    }
}

/// Runs one tool call through the queue. Every failure is a tool error result, for the model to read.
async fn run_tool(
    api: Arc<dyn Api>,
    prefix: &str,
    endpoint: &str,
    args: Value,
    ct: &CancellationToken,
    mut progress: Progress,
) -> CallToolResult {
    let submit = match api.call(Method::POST, &format!("/queue/{endpoint}"), Some(args)).await {
        Ok((code, body)) if (200..300).contains(&code) => body,
        Ok((code, body)) => return error_result(api_error_text(&format!("submitting to {endpoint}"), code, &body)),
        Err(e) => return error_result(format!("Could not submit to {endpoint}: {e}")),
    };
    let request_id = submit.get("request_id").and_then(Value::as_str).unwrap_or("").to_string();
    let url = |k: &str| submit.get(k).and_then(Value::as_str).map(|u| api_path(u, prefix));
    let (Some(status_path), Some(response_path), Some(cancel_path)) =
        (url("status_url"), url("response_url"), url("cancel_url"))
    else {
        return error_result(format!("Darkroom accepted the request but returned no status URLs: {submit}"));
    };
    tracing::debug!(%endpoint, %request_id, "MCP tool call queued");
    let cancelled = || async {
        let put = api.call(Method::PUT, &cancel_path, None);
        match tokio::time::timeout(Duration::from_secs(10), put).await {
            Ok(Ok((code, _))) if code < 400 => {}
            Ok(Ok((code, body))) => tracing::warn!(%request_id, code, %body, "MCP: cancelling the request failed"),
            Ok(Err(e)) => tracing::warn!(%request_id, error = %e, "MCP: cancelling the request failed"),
            Err(_) => tracing::warn!(%request_id, "MCP: cancelling the request timed out"),
        }
        error_result(format!("Cancelled: asked Darkroom to cancel request {request_id}."))
    };

    let status_req = if progress.token.is_some() { with_query(&status_path, "logs=1") } else { status_path.clone() };
    let mut delay = POLL_FIRST;
    let mut failures = 0;
    loop {
        let Some(r) = or_cancel(ct, api.call(Method::GET, &status_req, None)).await else {
            return cancelled().await;
        };
        match r {
            Ok((code, status)) if code == 200 || code == 202 => {
                failures = 0;
                progress.report(&status).await;
                if status.get("status").and_then(Value::as_str) == Some("COMPLETED") {
                    break;
                }
            }
            Ok((code, body)) => {
                return error_result(api_error_text(
                    &format!("checking the status of request {request_id}"),
                    code,
                    &body,
                ));
            }
            Err(e) => {
                failures += 1;
                if failures >= MAX_POLL_FAILURES {
                    return error_result(format!(
                        "Lost contact with Darkroom while waiting for request {request_id}: {e}"
                    ));
                }
            }
        }
        if or_cancel(ct, tokio::time::sleep(delay)).await.is_none() {
            return cancelled().await;
        }
        delay = (delay * 3 / 2).min(POLL_MAX);
    }

    let mut failures = 0;
    loop {
        match api.call(Method::GET, &response_path, None).await {
            Ok((code, body)) if (200..300).contains(&code) => return success_result(body),
            Ok((code, body)) => {
                return error_result(api_error_text(
                    &format!("running {endpoint} (request {request_id})"),
                    code,
                    &body,
                ));
            }
            Err(e) => {
                failures += 1;
                if failures >= MAX_POLL_FAILURES {
                    return error_result(format!("Could not fetch the result of request {request_id}: {e}"));
                }
                tokio::time::sleep(POLL_MAX).await;
            }
        }
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        InitializeResult::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("darkroom", env!("CARGO_PKG_VERSION")).with_title("Darkroom"))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let api = self.api(&ctx);
        Ok(ListToolsResult::with_all_items(self.tools(api.as_ref()).await?))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let api = self.api(&ctx);
        let endpoint = self.endpoint(api.as_ref(), &request.name).await?;
        let args = Value::Object(request.arguments.unwrap_or_default());
        let progress = Progress {
            token: ctx.meta.get_progress_token(),
            peer: Some(ctx.peer.clone()),
            last_state: None,
            last_value: None,
        };
        Ok(run_tool(api, &self.prefix, &endpoint, args, &ctx.ct, progress).await.into())
    }
}

/// Serves MCP on standard input and output until the client closes it. Logs must go to standard error.
pub async fn serve_stdio(api: HttpApi) -> anyhow::Result<()> {
    let prefix = api.base_path();
    let server = McpServer::new(Arc::new(api), &prefix);
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("MCP session on stdio could not start: {e}"))?;
    running.waiting().await?;
    Ok(())
}

/// Checks the caller's credentials before any MCP message is read, so a client with a wrong key fails at connect
/// with the gateway's own 401. `Bearer <key>` is accepted as `Key <key>`.
async fn mcp_auth(State(gw): State<Weak<Gateway>>, mut req: Request, next: Next) -> Response {
    let Some(gw) = gw.upgrade() else {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "the gateway is shutting down").into_response();
    };
    if let Some(v) = req.headers().get(AUTHORIZATION).map(normalize_authorization) {
        req.headers_mut().insert(AUTHORIZATION, v);
    }
    if let Err(e) = gw.authenticate(req.headers()).await {
        return e.into_response();
    }
    drop(gw);
    next.run(req).await
}

/// The Streamable HTTP MCP endpoint, to mount at `/mcp` (`.route_service("/mcp", mcp::http_service(gw))`).
///
/// Stateless (no MCP sessions): every POST is one JSON-RPC message, answered as JSON, or as an SSE stream when the
/// tool call sends progress notifications before its result. Each tool call runs as the HTTP caller, through the
/// gateway's own router. Host validation (rmcp's DNS-rebinding guard) is left to the gateway: with auth every call
/// needs a key; with `--no-auth` only loopback host names are allowed, as the gateway itself does.
pub fn http_service(gw: Arc<Gateway>) -> axum::Router {
    let weak = Arc::downgrade(&gw);
    let prefix = gw.cfg.public_url.as_ref().map(|u| u.path().trim_end_matches('/').to_string()).unwrap_or_default();
    let names: Arc<ToolNames> = Default::default();
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_max_request_body_bytes(gw.cfg.body_limit);
    if !gw.cfg.no_auth {
        config = config.disable_allowed_hosts();
    }
    let factory_gw = weak.clone();
    let service = StreamableHttpService::new(
        move || {
            Ok(McpServer {
                backend: Backend::InProcess(factory_gw.clone()),
                names: names.clone(),
                prefix: prefix.clone(),
            })
        },
        Arc::new(NeverSessionManager::default()),
        config,
    );
    axum::Router::new().fallback_service(service).layer(axum::middleware::from_fn_with_state(weak, mcp_auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        assert_eq!(tool_name("darkroom/diagnostics"), "darkroom__diagnostics");
        assert_eq!(tool_name("darkroom/sd-turbo/image-to-image"), "darkroom__sd-turbo__image-to-image");
        assert_eq!(tool_name("ns/o.w_n/a b+c"), "ns__o.w_n__a_b_c");
        assert_eq!(tool_name("é/x"), "___x");
        let name = tool_name("fal-ai/flux/dev");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
    }

    #[test]
    fn api_paths() {
        let s = "https://127.0.0.1:8080/queue/darkroom/diagnostics/requests/abc/status";
        assert_eq!(api_path(s, ""), "/queue/darkroom/diagnostics/requests/abc/status");
        assert_eq!(api_path("http://h/queue/o/a/requests/1?x=1", ""), "/queue/o/a/requests/1?x=1");
        // The server's own prefix is removed.
        assert_eq!(api_path("https://ex.com/dr/queue/o/a/requests/1", "/dr"), "/queue/o/a/requests/1");
        assert_eq!(api_path("https://ex.com/dr/queue/o/a/requests/1", "/dr/"), "/queue/o/a/requests/1");
        // Another prefix than the one this client knows: from the queue segment on.
        assert_eq!(api_path("https://ex.com/other/queue/o/a/requests/1/status", ""), "/queue/o/a/requests/1/status");
        // A prefix that only shares leading characters is not removed.
        assert_eq!(api_path("https://ex.com/drx/queue/o/a", "/dr"), "/queue/o/a");
        // Already a path.
        assert_eq!(api_path("/queue/o/a/requests/1", "/dr"), "/queue/o/a/requests/1");
        assert_eq!(with_query("/a", "logs=1"), "/a?logs=1");
        assert_eq!(with_query("/a?b=1", "logs=1"), "/a?b=1&logs=1");
    }

    #[test]
    fn file_links_found_everywhere_once() {
        let out = json!({
            "images": [
                {"url": "https://h/cdn/1.png", "content_type": "image/png", "width": 1, "file_name": "a.png"},
                {"url": "https://h/cdn/2.png", "content_type": "image/png", "file_size": 12},
                {"url": "https://h/cdn/1.png", "content_type": "image/png"},
            ],
            "audio": {"url": "https://h/cdn/x/speech.wav?sig=1", "content_type": "audio/wav"},
            "not_a_file": {"url": "https://h/other"},
            "seed": 3,
        });
        let links = file_links(&out);
        assert_eq!(links.len(), 3);
        assert_eq!(links[0].file_name.as_deref(), Some("a.png"));
        assert_eq!(links[1].file_size, Some(12));
        assert_eq!(links[1].name(), "2.png");
        assert_eq!(links[2].name(), "speech.wav");
        assert!(file_links(&json!({"echo": {"hi": 1}})).is_empty());
    }

    #[test]
    fn results_carry_links_and_structured_content() {
        let out = json!({"image": {"url": "https://h/cdn/1.png", "content_type": "image/png"}});
        let r = success_result(out.clone());
        assert_eq!(r.is_error, Some(false));
        assert_eq!(r.structured_content, Some(out));
        assert_eq!(r.content.len(), 2);
        let link = r.content[1].as_resource_link().expect("a resource link");
        assert_eq!(link.uri, "https://h/cdn/1.png");
        assert_eq!(link.mime_type.as_deref(), Some("image/png"));
        // Structured content is always an object.
        assert_eq!(success_result(json!([1, 2])).structured_content, Some(json!({"result": [1, 2]})));
        // Inline data URLs become image content, shortened in the text.
        let data = format!("data:image/png;base64,{}", "A".repeat(400));
        let r = success_result(json!({"image": {"url": data, "content_type": "image/png"}}));
        assert!(r.content[1].as_image().is_some());
        assert!(r.content[0].as_text().unwrap().text.len() < 200);
        // A data URL that is not a file object's stays in the text (nothing else carries it).
        let r = success_result(json!({"raw": data}));
        assert_eq!(r.content.len(), 1);
        assert!(r.content[0].as_text().unwrap().text.contains(&data));
    }

    #[test]
    fn tools_from_catalog_items() {
        let item = json!({
            "endpoint_id": "darkroom/diagnostics", "app_id": "darkroom/diagnostics", "path": "",
            "metadata": {"display_name": "Diagnostics", "category": "test", "description": "Echoes.",
                         "status": "active",
                         "pricing": {"unit": "request", "unit_price": 0.0, "runner_second_price": 0.0, "currency": "USD"}},
            "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                             "properties": {"echo": true}},
        });
        let (tool, endpoint) = tool_for_model(&item).unwrap();
        assert_eq!(endpoint, "darkroom/diagnostics");
        assert_eq!(tool.name, "darkroom__diagnostics");
        assert_eq!(tool.title.as_deref(), Some("Diagnostics"));
        let d = tool.description.as_deref().unwrap();
        assert!(d.starts_with("Diagnostics: Echoes."), "{d}");
        assert!(d.contains("Category: test.") && d.contains("Price: free."), "{d}");
        assert!(!tool.input_schema.contains_key("$schema"));
        assert!(tool.input_schema["properties"].get("echo").is_some());

        let priced = json!({"unit": "image", "unit_price": 0.003, "runner_second_price": 0.0, "currency": "USD"});
        assert_eq!(price_text(&priced).unwrap(), "Price: 0.003 USD per image.");
        // Schemas that are not object schemas still give object schemas.
        assert_eq!(input_schema(&Value::Null)["type"], "object");
        assert_eq!(input_schema(&json!({"type": ["object", "null"]}))["type"], "object");
        assert_eq!(
            input_schema(&json!({"type": "string"})),
            *json!({"type": "object", "additionalProperties": true}).as_object().unwrap()
        );
        assert!(tool_for_model(&json!({"metadata": {}})).is_none());
    }

    #[test]
    fn bearer_is_read_as_key() {
        let v = normalize_authorization(&HeaderValue::from_static("Bearer abc:def"));
        assert_eq!(v, "Key abc:def");
        let v = normalize_authorization(&HeaderValue::from_static("Key abc:def"));
        assert_eq!(v, "Key abc:def");
    }

    #[test]
    fn progress_values_increase() {
        let mut p = Progress { token: None, peer: None, last_state: None, last_value: None };
        let a = p.next_value(None, false);
        let b = p.next_value(None, false);
        let c = p.next_value(Some(0.5), false);
        let d = p.next_value(Some(0.4), false);
        let e = p.next_value(None, true);
        assert!(a < b && b < c && c < d && d < e, "{a} {b} {c} {d} {e}");
        assert_eq!(c, 50.0);
        assert_eq!(e, 100.0);
    }

    /// An in-memory server: the catalog and a queue whose request completes after two polls.
    struct FakeApi {
        calls: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Api for FakeApi {
        async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
            let n = {
                let mut c = self.calls.lock().unwrap();
                c.push(format!("{method} {path}"));
                c.iter().filter(|c| c.contains("/status")).count()
            };
            let base = "https://x/dr/queue/darkroom/diagnostics/requests/r1";
            Ok(match (method, path) {
                (Method::GET, p) if p.starts_with("/v1/models") => (
                    200,
                    json!({"models": [{"endpoint_id": "darkroom/diagnostics", "input_schema": {"type": "object"}}],
                           "next_cursor": null, "has_more": false}),
                ),
                (Method::POST, "/queue/darkroom/diagnostics") => {
                    if body.as_ref().and_then(|b| b.get("bad")).is_some() {
                        (422, json!({"detail": [{"loc": ["body", "bad"]}], "error_type": "validation_error"}))
                    } else {
                        (
                            200,
                            json!({"request_id": "r1", "status_url": format!("{base}/status"),
                                     "response_url": base, "cancel_url": format!("{base}/cancel")}),
                        )
                    }
                }
                (Method::GET, p) if p.starts_with("/queue/darkroom/diagnostics/requests/r1/status") => {
                    if n < 3 {
                        (202, json!({"status": "IN_PROGRESS"}))
                    } else {
                        (200, json!({"status": "COMPLETED"}))
                    }
                }
                (Method::GET, "/queue/darkroom/diagnostics/requests/r1") => (200, json!({"echo": body})),
                _ => (404, json!({"detail": "not found"})),
            })
        }
    }

    #[tokio::test]
    async fn tool_call_through_a_queue() {
        let api = Arc::new(FakeApi { calls: Mutex::new(vec![]) });
        let server = McpServer::new(api.clone(), "/dr");
        let tools = server.tools(api.as_ref()).await.unwrap();
        assert_eq!(tools.len(), 1);
        assert_eq!(server.names.get("darkroom__diagnostics").as_deref(), Some("darkroom/diagnostics"));
        let calls = api.calls.lock().unwrap().clone();
        assert_eq!(calls, vec!["GET /v1/models?expand=schemas&limit=100"]);

        let ct = CancellationToken::new();
        let progress = || Progress { token: None, peer: None, last_state: None, last_value: None };
        let endpoint = server.endpoint(api.as_ref(), "darkroom__diagnostics").await.unwrap();
        let r = run_tool(api.clone(), "/dr", &endpoint, json!({"x": 1}), &ct, progress()).await;
        assert_eq!(r.is_error, Some(false), "{r:?}");
        assert_eq!(r.structured_content, Some(json!({"echo": null})));
        let calls = api.calls.lock().unwrap().clone();
        assert_eq!(calls[1], "POST /queue/darkroom/diagnostics");
        assert_eq!(calls[2], "GET /queue/darkroom/diagnostics/requests/r1/status");
        assert_eq!(calls.last().unwrap(), "GET /queue/darkroom/diagnostics/requests/r1");

        let r = run_tool(api.clone(), "/dr", &endpoint, json!({"bad": 1}), &ct, progress()).await;
        assert_eq!(r.is_error, Some(true));
        let text = &r.content[0].as_text().unwrap().text;
        assert!(text.contains("422 (validation_error)") && text.contains("\"bad\""), "{text}");

        // A cancelled call cancels its request.
        ct.cancel();
        let r = run_tool(api.clone(), "/dr", &endpoint, json!({}), &ct, progress()).await;
        assert_eq!(r.is_error, Some(true));
        assert_eq!(api.calls.lock().unwrap().last().unwrap(), "PUT /queue/darkroom/diagnostics/requests/r1/cancel");

        // Unknown tools are invalid parameters.
        let e = server.endpoint(api.as_ref(), "nope").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::INVALID_PARAMS);
    }
}
