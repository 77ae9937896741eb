//! Realtime: fal's `POST /tokens/` (short-lived, app-scoped EdDSA tokens) and the msgpack WebSocket at
//! `/run/{app}[/{path}]/realtime`. A session is pinned to one ready runner of the app for its life; its frames go
//! over that runner's control channel. Errors reach the client as fal's `{"type":"x-fal-error"}` text frames.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use darkroom_core::protocol::GatewayFrame;
use darkroom_core::token::{AUDIENCE, Claims};
use darkroom_core::webhook::WebhookKey;
use darkroom_core::{ApiError, ErrorType};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::Gateway;
use crate::error::{ApiErr, ApiResult, err};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What the runner side sends a session.
#[derive(Debug)]
pub(crate) enum RtEvent {
    Output {
        binary: bool,
        data: String,
    },
    /// The runner closed the session, or was lost (`error` set).
    Closed {
        error: Option<String>,
        reason: Option<String>,
    },
}

struct Route {
    runner_id: String,
    app_id: String,
    tx: mpsc::UnboundedSender<RtEvent>,
}

/// Realtime state of a gateway: the token key and the open sessions.
#[derive(Default)]
pub struct Realtime {
    key: tokio::sync::OnceCell<WebhookKey>,
    routes: Mutex<HashMap<String, Route>>,
    /// Sessions waiting for a runner, per app, with when each began waiting (demand for the autoscaler).
    waiting: Mutex<HashMap<String, HashMap<u64, darkroom_core::Millis>>>,
    next_waiter: std::sync::atomic::AtomicU64,
}

impl Realtime {
    /// Sessions pinned to runners of an app, sessions waiting for one, and when the longest waiting began.
    pub fn load(&self, app_id: &str) -> (u64, u64, Option<darkroom_core::Millis>) {
        let open = self.routes.lock().unwrap().values().filter(|r| r.app_id == app_id).count() as u64;
        let w = self.waiting.lock().unwrap();
        let waiting = w.get(app_id);
        (open, waiting.map_or(0, |m| m.len() as u64), waiting.and_then(|m| m.values().min().copied()))
    }

    /// Open sessions per runner.
    pub(crate) fn per_runner(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.routes.lock().unwrap().values() {
            *m.entry(r.runner_id.clone()).or_insert(0) += 1;
        }
        m
    }

    /// A frame from a runner for one of its sessions.
    pub(crate) fn deliver(&self, runner_id: &str, session_id: &str, ev: RtEvent) {
        if let Some(r) = self.routes.lock().unwrap().get(session_id)
            && r.runner_id == runner_id
        {
            let _ = r.tx.send(ev);
        }
    }

    /// A runner's channel closed: its sessions end with an error frame.
    pub(crate) fn runner_lost(&self, runner_id: &str) {
        for r in self.routes.lock().unwrap().values().filter(|r| r.runner_id == runner_id) {
            let _ = r.tx.send(RtEvent::Closed {
                error: Some("RUNNER_LOST".into()),
                reason: Some("the runner serving this session went away; reconnect to get another".into()),
            });
        }
    }
}

async fn token_key(gw: &Gateway) -> ApiResult<&WebhookKey> {
    gw.realtime
        .key
        .get_or_try_init(|| async {
            let fresh = WebhookKey::generate();
            let stored =
                gw.store.ensure_setting("realtime_token_key", &format!("{}:{}", fresh.kid, fresh.secret_b64())).await?;
            let (kid, secret) = stored.split_once(':').unwrap_or(("", ""));
            WebhookKey::from_secret_b64(kid, secret)
                .ok_or_else(|| err(ErrorType::InternalError, "the stored realtime token key is corrupt"))
        })
        .await
}

fn field_error(field: &str, msg: &str) -> ApiErr {
    ApiErr(darkroom_core::app::validation_error(vec![
        json!({"loc": ["body", field], "msg": msg, "type": "value_error"}),
    ]))
}

/// `POST /tokens/` on the REST host: `{"allowed_apps": ["alias"], "token_expiration": 120}` → the token, as a bare
/// JSON string.
pub async fn create_token(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let caller = gw.authenticate(&headers).await?;
    let req: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiErr(darkroom_core::app::json_decode_error(&e.to_string())))?
    };
    let apps: Vec<String> = match req.get("allowed_apps") {
        Some(Value::Array(a)) if !a.is_empty() && a.len() <= 100 => {
            let names: Option<Vec<String>> =
                a.iter().map(|v| v.as_str().filter(|s| !s.is_empty() && s.len() <= 256).map(str::to_string)).collect();
            names.ok_or_else(|| field_error("allowed_apps", "allowed_apps must be app aliases or ids (strings)"))?
        }
        _ => return Err(field_error("allowed_apps", "allowed_apps must list 1 to 100 apps")),
    };
    let ttl = match req.get("token_expiration") {
        None | Some(Value::Null) => 120,
        Some(v) => v
            .as_i64()
            .filter(|t| (1..=86_400).contains(t))
            .ok_or_else(|| field_error("token_expiration", "token_expiration must be 1 to 86400 seconds"))?,
    };
    let key = token_key(&gw).await?;
    let now = gw.now() / 1000;
    let claims = Claims {
        iss: "darkroom".into(),
        aud: AUDIENCE.into(),
        sub: caller.owner_id.clone(),
        key_id: caller.key_id.clone(),
        allowed_apps: apps,
        iat: now,
        exp: now + ttl,
        jti: uuid::Uuid::new_v4().to_string(),
    };
    Ok((StatusCode::CREATED, axum::Json(Value::String(darkroom_core::token::sign(key, &claims)))).into_response())
}

/// The app, endpoint path and max_buffering of a realtime URL (`/run/{app}[/{path}]/realtime`), if it is one.
fn realtime_target(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/run/")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let rest = rest.strip_suffix("/realtime")?;
    Some(rest.to_string())
}

/// Who a realtime connection runs as.
struct Who {
    owner_id: String,
}

async fn authorize(gw: &Gateway, headers: &HeaderMap, query: &[(String, String)], app_id: &str) -> ApiResult<Who> {
    if let Some((_, t)) = query.iter().find(|(k, _)| k == "fal_jwt_token") {
        let key = token_key(gw).await?;
        let claims = darkroom_core::token::verify(key, t, gw.now())
            .map_err(|e| err(ErrorType::Unauthorized, format!("Realtime token refused: {e}")))?;
        if !claims.allows(app_id) {
            return Err(err(ErrorType::Forbidden, format!("The realtime token does not allow {app_id}")));
        }
        return Ok(Who { owner_id: claims.sub });
    }
    let caller = gw.authenticate(headers).await?;
    Ok(Who { owner_id: caller.owner_id })
}

/// Serves realtime WebSocket upgrades before the run router sees them.
pub async fn intercept(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let is_upgrade = req.method() == axum::http::Method::GET
        && req
            .headers()
            .get("upgrade")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_upgrade && let Some(target) = req.uri().path().strip_prefix("/ws/").map(str::to_string) {
        let (mut parts, _) = req.into_parts();
        return match http_over_ws(&gw, &mut parts, target.trim_end_matches('/')).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    }
    let Some(target) = is_upgrade.then(|| realtime_target(req.uri().path())).flatten() else {
        return next.run(req).await;
    };
    let (mut parts, _) = req.into_parts();
    match open(&gw, &mut parts, &target).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn open(gw: &Arc<Gateway>, parts: &mut axum::http::request::Parts, target: &str) -> ApiResult<Response> {
    let segs: Vec<&str> = target.split('/').collect();
    let (app_ref, rest) = darkroom_core::ids::split_endpoint(&segs).map_err(ApiErr)?;
    let (app_id, path) = (app_ref.id(), rest.join("/"));
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    let who = authorize(gw, &parts.headers, &query, &app_id).await?;
    let app = gw.apps.get(&app_id).ok_or_else(|| err(ErrorType::AppNotFound, format!("App '{app_id}' not found")))?;
    if !app.has_path(&path) && !app.spec.realtime.contains(&path) {
        return Err(err(ErrorType::EndpointNotFound, format!("Path /{path} not found")));
    }
    let max_buffering = match query.iter().find(|(k, _)| k == "max_buffering") {
        None => 16,
        Some((_, v)) => v.parse::<usize>().ok().filter(|n| (1..=60).contains(n)).ok_or_else(|| {
            ApiErr(darkroom_core::app::validation_error(vec![
                json!({"loc": ["query", "max_buffering"], "msg": "max_buffering must be 1 to 60", "type": "value_error"}),
            ]))
        })?,
    };
    crate::billing::check_budget(gw, &who.owner_id, gw.now()).await?;
    if gw.hub.draining.load(std::sync::atomic::Ordering::SeqCst) {
        let mut e = ApiError::new(ErrorType::ServiceUnavailable, "The server is draining for a restart");
        e.retry_after = Some(5);
        return Err(ApiErr(e));
    }
    let ws = WebSocketUpgrade::from_request_parts(parts, &())
        .await
        .map_err(|e| err(ErrorType::InvalidRequest, format!("Not a WebSocket upgrade: {e}")))?;
    let gw = gw.clone();
    tracing::info!(app = %app_id, owner = %who.owner_id, "realtime session requested");
    Ok(ws
        .max_message_size(64 << 20)
        .read_buffer_size(8 << 10)
        .on_upgrade(move |socket| session(gw, socket, app_id, path, max_buffering)))
}

fn error_text(error: &str, reason: &str) -> Message {
    Message::Text(json!({"type": "x-fal-error", "error": error, "reason": reason}).to_string().into())
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
}

/// Why a session got no runner.
enum PinFailed {
    NoRunner,
    ClientLeft,
}

/// A client frame as it travels to the runner: binary (base64) or text.
fn client_frame(m: Message) -> Option<(bool, String)> {
    match m {
        Message::Binary(b) => Some((true, B64.encode(&b))),
        Message::Text(t) => Some((false, t.to_string())),
        _ => None,
    }
}

/// Picks the ready runner of the app with the fewest sessions, waiting (bounded) for one to start. Frames the
/// client sends meanwhile are kept in `early` (the newest `max_buffering`).
async fn pin_runner(
    gw: &Gateway,
    app_id: &str,
    socket: &mut WebSocket,
    early: &mut VecDeque<(bool, String)>,
    max_buffering: usize,
) -> Result<String, PinFailed> {
    let deadline = tokio::time::Instant::now() + gw.cfg.realtime_start_timeout;
    let mut waiter: Option<u64> = None;
    let chosen = loop {
        let per = gw.realtime.per_runner();
        let found = gw.hub.ready_runners(app_id, gw.now()).into_iter().min_by_key(|r| per.get(r).copied().unwrap_or(0));
        if let Some(f) = found {
            break Ok(f);
        }
        if tokio::time::Instant::now() >= deadline {
            break Err(PinFailed::NoRunner);
        }
        if waiter.is_none() {
            let id = gw.realtime.next_waiter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            gw.realtime.waiting.lock().unwrap().entry(app_id.to_string()).or_default().insert(id, gw.now());
            waiter = Some(id);
            gw.fleet.kick();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            m = socket.recv() => match m {
                Some(Ok(Message::Close(_))) => {
                    // Our close reply is queued; it goes out with a flush.
                    let _ = futures::SinkExt::flush(socket).await;
                    break Err(PinFailed::ClientLeft);
                }
                None | Some(Err(_)) => break Err(PinFailed::ClientLeft),
                Some(Ok(m)) => if let Some(f) = client_frame(m) {
                    early.push_back(f);
                    if early.len() > max_buffering { early.pop_front(); }
                },
            },
        }
    };
    if let Some(id) = waiter
        && let Some(m) = gw.realtime.waiting.lock().unwrap().get_mut(app_id)
    {
        m.remove(&id);
    }
    chosen
}

async fn session(gw: Arc<Gateway>, mut socket: WebSocket, app_id: String, path: String, max_buffering: usize) {
    let mut buffered: VecDeque<(bool, String)> = VecDeque::new();
    let runner_id = match pin_runner(&gw, &app_id, &mut socket, &mut buffered, max_buffering).await {
        Ok(r) => r,
        Err(PinFailed::ClientLeft) => return,
        Err(PinFailed::NoRunner) => {
            let _ =
                socket.send(error_text("NO_RUNNER", "no runner of this app became ready in time; retry shortly")).await;
            close(&mut socket, 1013, "no runner").await;
            return;
        }
    };
    let session_id = darkroom_core::ids::new_request_id();
    let (tx, mut rx) = mpsc::unbounded_channel();
    gw.realtime
        .routes
        .lock()
        .unwrap()
        .insert(session_id.clone(), Route { runner_id: runner_id.clone(), app_id: app_id.clone(), tx });
    metrics::gauge!("darkroom_realtime_sessions").increment(1.0);
    gw.fleet.kick();
    let opened = gw.hub.send(&runner_id, GatewayFrame::RealtimeOpen { session_id: session_id.clone(), path });
    if !opened {
        gw.realtime.runner_lost(&runner_id);
    }
    let idle = gw.cfg.realtime_idle_timeout;
    let mut in_flight = 0usize;
    let mut last_input = tokio::time::Instant::now();
    let send_input = |binary: bool, data: String| {
        gw.hub.send(&runner_id, GatewayFrame::RealtimeInput { session_id: session_id.clone(), binary, data })
    };
    loop {
        // Inputs go to the runner while fewer than max_buffering are unanswered; the rest wait here, oldest dropped.
        while in_flight < max_buffering
            && let Some((b, d)) = buffered.pop_front()
        {
            send_input(b, d);
            in_flight += 1;
        }
        tokio::select! {
            m = socket.recv() => {
                let frame = match m {
                    Some(Ok(Message::Close(_))) => {
                        let _ = futures::SinkExt::flush(&mut socket).await;
                        break;
                    }
                    None | Some(Err(_)) => break,
                    Some(Ok(m)) => match client_frame(m) { Some(f) => f, None => continue },
                };
                last_input = tokio::time::Instant::now();
                buffered.push_back(frame);
                while buffered.len() > max_buffering {
                    buffered.pop_front();
                    metrics::counter!("darkroom_realtime_frames_dropped_total").increment(1);
                }
            }
            ev = rx.recv() => match ev {
                Some(RtEvent::Output { binary, data }) => {
                    in_flight = in_flight.saturating_sub(1);
                    let msg = if binary {
                        match B64.decode(&data) { Ok(b) => Message::Binary(b.into()), Err(_) => continue }
                    } else {
                        Message::Text(data.into())
                    };
                    if socket.send(msg).await.is_err() { break; }
                }
                Some(RtEvent::Closed { error, reason }) => {
                    let code = if error.is_some() { 1011 } else { 1000 };
                    if let Some(e) = &error {
                        let _ = socket.send(error_text(e, reason.as_deref().unwrap_or(""))).await;
                    }
                    close(&mut socket, code, error.as_deref().unwrap_or("closed")).await;
                    break;
                }
                None => break,
            },
            _ = tokio::time::sleep_until(last_input + idle), if in_flight == 0 && buffered.is_empty() => {
                let _ = socket.send(error_text("TIMEOUT", "no inputs, reconnect when needed!")).await;
                close(&mut socket, 1000, "idle").await;
                break;
            }
            _ = gw.shutdown.cancelled() => {
                let _ = socket.send(error_text("SERVER_SHUTDOWN", "the server is shutting down; reconnect shortly")).await;
                close(&mut socket, 1001, "shutting down").await;
                break;
            }
        }
    }
    gw.realtime.routes.lock().unwrap().remove(&session_id);
    gw.hub.send(&runner_id, GatewayFrame::RealtimeClose { session_id });
    metrics::gauge!("darkroom_realtime_sessions").decrement(1.0);
    gw.fleet.kick();
}

/// fal's HTTP-over-WebSocket surface (`wss://ws.fal.run/{app}[/{path}]`, here also `/ws/{app}[/{path}]`): each
/// JSON text frame is one synchronous run of the endpoint, answered with a `{"type":"start","request_id"}` frame,
/// the response body, and a `{"type":"end","request_id","status"}` frame. Requests run one after another; closing
/// the socket cancels the one running.
async fn http_over_ws(gw: &Arc<Gateway>, parts: &mut axum::http::request::Parts, target: &str) -> ApiResult<Response> {
    let segs: Vec<&str> = target.split('/').collect();
    let (app_ref, rest) = darkroom_core::ids::split_endpoint(&segs).map_err(ApiErr)?;
    let app_id = app_ref.id();
    let path = rest.join("/");
    let app = gw.apps.get(&app_id).ok_or_else(|| err(ErrorType::AppNotFound, format!("App '{app_id}' not found")))?;
    if !app.has_path(&path) {
        return Err(err(ErrorType::EndpointNotFound, format!("Path /{path} not found")));
    }
    gw.authenticate(&parts.headers).await?;
    let auth = parts.headers.get("authorization").cloned();
    let ws = WebSocketUpgrade::from_request_parts(parts, &())
        .await
        .map_err(|e| err(ErrorType::InvalidRequest, format!("Not a WebSocket upgrade: {e}")))?;
    let run_path = if path.is_empty() { format!("/run/{app_id}") } else { format!("/run/{app_id}/{path}") };
    let gw = gw.clone();
    Ok(ws.max_message_size(64 << 20).read_buffer_size(8 << 10).on_upgrade(move |mut socket| async move {
        use tower::ServiceExt;
        let payload = |m: Message| match m {
            Message::Text(t) => Some(axum::body::Bytes::from(t.to_string())),
            Message::Binary(b) => Some(b),
            _ => None,
        };
        let mut pending: VecDeque<axum::body::Bytes> = VecDeque::new();
        'session: loop {
            let body = match pending.pop_front() {
                Some(b) => b,
                None => tokio::select! {
                    m = socket.recv() => match m {
                        Some(Ok(Message::Close(_))) => {
                            let _ = futures::SinkExt::flush(&mut socket).await;
                            break;
                        }
                        Some(Ok(m)) => match payload(m) { Some(b) => b, None => continue },
                        _ => break,
                    },
                    _ = gw.shutdown.cancelled() => break,
                },
            };
            let request_id = darkroom_core::ids::new_request_id();
            let mut req = axum::http::Request::post(&run_path).header("content-type", "application/json");
            if let Some(a) = &auth {
                req = req.header("authorization", a.clone());
            }
            let Ok(req) = req.body(axum::body::Body::from(body)) else { break };
            let mut call = std::pin::pin!(gw.router().oneshot(req));
            // Frames arriving meanwhile wait their turn; the client going away drops the run, which cancels it.
            let resp = loop {
                tokio::select! {
                    r = &mut call => break match r { Ok(r) => r, Err(e) => match e {} },
                    m = socket.recv() => match m {
                        Some(Ok(Message::Close(_))) => {
                            let _ = futures::SinkExt::flush(&mut socket).await;
                            break 'session;
                        }
                        Some(Ok(m)) => if let Some(b) = payload(m) {
                            pending.push_back(b);
                            if pending.len() > 64 {
                                let _ = socket.send(error_text("TOO_MANY_PENDING", "more than 64 requests waiting")).await;
                                close(&mut socket, 1008, "too many pending").await;
                                break 'session;
                            }
                        },
                        _ => break 'session,
                    },
                }
            };
            let status = resp.status().as_u16();
            let id = resp.headers().get("x-fal-request-id").and_then(|v| v.to_str().ok()).unwrap_or(&request_id).to_string();
            let Ok(bytes) = axum::body::to_bytes(resp.into_body(), 1 << 30).await else { break };
            let start = json!({"type": "start", "request_id": id, "status": status});
            let chunk = match std::str::from_utf8(&bytes) {
                Ok(t) => Message::Text(t.to_string().into()),
                Err(_) => Message::Binary(bytes),
            };
            let end = json!({"type": "end", "request_id": id, "status": status});
            if socket.send(Message::Text(start.to_string().into())).await.is_err()
                || socket.send(chunk).await.is_err()
                || socket.send(Message::Text(end.to_string().into())).await.is_err()
            {
                break;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realtime_urls() {
        assert_eq!(realtime_target("/run/darkroom/diagnostics/realtime").as_deref(), Some("darkroom/diagnostics"));
        assert_eq!(realtime_target("/run/o/a/sub/realtime/").as_deref(), Some("o/a/sub"));
        assert_eq!(realtime_target("/queue/o/a/realtime"), None);
        assert_eq!(realtime_target("/run/o/a"), None);
    }
}
