//! Runner connections: the control channel's server side, the registry of connected runners, and one dispatcher
//! per app that hands queued jobs to runners with free slots (claim committed in the store first).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use axum::extract::{State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use darkroom_core::ErrorType;
use darkroom_core::auth::{Credential, keyed_hash, parse_authorization};
use darkroom_core::job::{JobRecord, LogEntry, Outcome, normalize_level};
use darkroom_core::protocol::{GatewayFrame, PROTOCOL_VERSION, RunnerFrame};
use darkroom_store::CompleteResult;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};

use crate::error::{ApiErr, err};
use crate::{Gateway, StreamMsg, metrics};

/// A runner, as the admin API shows it: connected ones, and the fleet's slots that are starting or ended.
#[derive(Debug, Clone, Serialize)]
pub struct RunnerInfo {
    pub runner_id: String,
    pub app_id: String,
    /// PENDING, PULL, SETUP, IDLE, RUNNING, DRAINING or TERMINATED.
    pub state: &'static str,
    /// The fleet slot of a runner this gateway started; None for a remote runner.
    pub slot: Option<String>,
    pub pid: u32,
    /// Requests it may hold at once (the app's max_multiplexing, or less if the runner says so).
    pub max_multiplexing: u32,
    pub in_flight: Vec<String>,
    pub hints: Vec<String>,
    pub connected_at: Option<i64>,
    /// When its process started (fleet runners).
    pub started_at: Option<i64>,
    /// When it became ready for work.
    pub ready_at: Option<i64>,
    pub last_active_at: Option<i64>,
    pub served: u64,
    /// CPU cores it is pinned to, and its GPU (index, MiB).
    pub cpus: Vec<usize>,
    pub gpu: Option<(u32, u64)>,
    /// What it is doing (setup message) or why it ended.
    pub message: Option<String>,
    pub ended_at: Option<i64>,
}

/// What a connected runner told us of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnPhase {
    Pull,
    Setup,
    Ready,
    Draining,
}

pub(crate) struct Conn {
    pub(crate) runner_id: String,
    pub(crate) app_id: String,
    pub(crate) slot: Option<String>,
    pub(crate) pid: u32,
    /// The most the runner itself accepts.
    pub(crate) declared_mux: u32,
    pub(crate) hints: Vec<String>,
    pub(crate) connected_at: i64,
    pub(crate) phase: ConnPhase,
    /// When it entered PULL (None unless pulling), and when it left PULL.
    pub(crate) pull_since: Option<i64>,
    pub(crate) pulled_at: Option<i64>,
    pub(crate) message: Option<String>,
    pub(crate) ready_at: Option<i64>,
    pub(crate) last_active_at: i64,
    pub(crate) served: u64,
    /// When it was last heard from, and how long it may stay silent and still get work.
    pub(crate) last_seen: i64,
    pub(crate) quiet_ms: i64,
    /// Places taken by the dispatcher for a claim in progress (counted as busy until the assignment is sent).
    pub(crate) reserved: u32,
    tx: mpsc::UnboundedSender<GatewayFrame>,
    /// Job id → (fencing token, when it was assigned).
    pub(crate) in_flight: HashMap<String, (i64, i64)>,
}

#[derive(Default)]
pub struct Hub {
    pub(crate) runners: Mutex<HashMap<String, Conn>>,
    kicks: Mutex<HashMap<String, Arc<Notify>>>,
    /// Set while the gateway drains (SIGTERM): nothing new is assigned.
    pub draining: std::sync::atomic::AtomicBool,
    /// Apps with a running dispatcher; None until [`start_dispatchers`] (apps registered before wait for it).
    dispatching: Mutex<Option<std::collections::HashSet<String>>>,
}

impl Conn {
    pub(crate) fn state(&self) -> &'static str {
        match self.phase {
            ConnPhase::Pull => "PULL",
            ConnPhase::Setup => "SETUP",
            ConnPhase::Draining => "DRAINING",
            ConnPhase::Ready if self.in_flight.is_empty() => "IDLE",
            ConnPhase::Ready => "RUNNING",
        }
    }

    pub(crate) fn info(&self, mux: u32) -> RunnerInfo {
        let mut in_flight: Vec<String> = self.in_flight.keys().cloned().collect();
        in_flight.sort();
        RunnerInfo {
            runner_id: self.runner_id.clone(),
            app_id: self.app_id.clone(),
            state: self.state(),
            slot: self.slot.clone(),
            pid: self.pid,
            max_multiplexing: self.declared_mux.min(mux),
            in_flight,
            hints: self.hints.clone(),
            connected_at: Some(self.connected_at),
            started_at: None,
            ready_at: self.ready_at,
            last_active_at: Some(self.last_active_at),
            served: self.served,
            cpus: vec![],
            gpu: None,
            message: self.message.clone(),
            ended_at: None,
        }
    }
}

impl Hub {
    /// Wakes the app's dispatcher.
    pub fn kick(&self, app_id: &str) {
        if let Some(n) = self.kicks.lock().unwrap().get(app_id) {
            n.notify_one();
        }
    }

    pub fn send(&self, runner_id: &str, frame: GatewayFrame) -> bool {
        match self.runners.lock().unwrap().get(runner_id) {
            Some(c) => c.tx.send(frame).is_ok(),
            None => false,
        }
    }

    /// Connected runners (the fleet's [`crate::fleet::Fleet::list`] adds starting and ended ones).
    pub fn list(&self) -> Vec<RunnerInfo> {
        self.list_with(|_| u32::MAX)
    }

    pub(crate) fn list_with(&self, mux: impl Fn(&str) -> u32) -> Vec<RunnerInfo> {
        let m = self.runners.lock().unwrap();
        let mut v: Vec<RunnerInfo> = m.values().map(|c| c.info(mux(&c.app_id))).collect();
        v.sort_by(|a, b| (&a.app_id, a.connected_at).cmp(&(&b.app_id, b.connected_at)));
        v
    }

    /// Connected runners that are ready for work (not starting, not draining).
    pub fn ready_count(&self) -> usize {
        self.runners.lock().unwrap().values().filter(|c| c.phase == ConnPhase::Ready).count()
    }

    /// Requests running on this gateway's runners.
    pub fn in_flight_count(&self) -> usize {
        self.runners.lock().unwrap().values().map(|c| c.in_flight.len() + c.reserved as usize).sum()
    }

    /// Stops assigning to a runner. With `only_if_idle`, only if it holds nothing (else false).
    pub(crate) fn mark_draining(&self, runner_id: &str, only_if_idle: bool) -> bool {
        let mut m = self.runners.lock().unwrap();
        match m.get_mut(runner_id) {
            Some(c) if only_if_idle && (!c.in_flight.is_empty() || c.reserved > 0) => false,
            Some(c) => {
                c.phase = ConnPhase::Draining;
                true
            }
            None => true,
        }
    }

    /// Picks a ready runner of `app_id` with a free slot (at most `mux` requests each), preferring one matching
    /// `hint`.
    /// A runner not heard from for two heartbeats (paused, partitioned) gets nothing new.
    /// With `reserve`, the chosen runner's place is taken until the assignment is recorded: no stop decision sees it
    /// idle while the claim is being committed.
    fn pick(&self, app_id: &str, hint: Option<&str>, mux: u32, now: i64, reserve: bool) -> Option<String> {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let mut m = self.runners.lock().unwrap();
        let busy = |c: &Conn| c.in_flight.len() + c.reserved as usize;
        let free: Vec<&Conn> = m
            .values()
            .filter(|c| {
                c.app_id == app_id
                    && c.phase == ConnPhase::Ready
                    && now - c.last_seen <= c.quiet_ms
                    && busy(c) < c.declared_mux.min(mux) as usize
            })
            .collect();
        let hinted = hint.and_then(|h| free.iter().find(|c| c.runner_id == h || c.hints.iter().any(|x| x == h)));
        let chosen = match hinted {
            Some(c) => Some(c.runner_id.clone()),
            None => free
                .iter()
                .max_by_key(|c| (c.declared_mux.min(mux) as usize - busy(c), std::cmp::Reverse(c.connected_at)))
                .map(|c| c.runner_id.clone()),
        };
        if reserve
            && let Some(id) = &chosen
            && let Some(c) = m.get_mut(id)
        {
            c.reserved += 1;
        }
        chosen
    }

    /// Ready runners of an app that are heard from (realtime sessions are pinned to one of them).
    pub(crate) fn ready_runners(&self, app_id: &str, now: i64) -> Vec<String> {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return vec![];
        }
        let m = self.runners.lock().unwrap();
        m.values()
            .filter(|c| c.app_id == app_id && c.phase == ConnPhase::Ready && now - c.last_seen <= c.quiet_ms)
            .map(|c| c.runner_id.clone())
            .collect()
    }

    /// How many more requests the ready runners of `app_id` can take now.
    fn free_places(&self, app_id: &str, mux: u32, now: i64) -> usize {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return 0;
        }
        let m = self.runners.lock().unwrap();
        m.values()
            .filter(|c| c.app_id == app_id && c.phase == ConnPhase::Ready && now - c.last_seen <= c.quiet_ms)
            .map(|c| (c.declared_mux.min(mux) as usize).saturating_sub(c.in_flight.len() + c.reserved as usize))
            .sum()
    }

    /// Reserves a place on a free runner for a request at submit, if one is free (see [`Hub::pick`]).
    pub(crate) fn reserve_at_submit(&self, app_id: &str, hint: Option<&str>, mux: u32, now: i64) -> Option<String> {
        self.pick(app_id, hint, mux, now, true)
    }

    /// Gives back a place taken by [`Hub::pick`] (the claim failed).
    pub(crate) fn unreserve(&self, runner_id: &str) {
        if let Some(c) = self.runners.lock().unwrap().get_mut(runner_id) {
            c.reserved = c.reserved.saturating_sub(1);
        }
    }

    /// A job's lease ran out while its runner may still be connected: take it off the runner and tell it to stop.
    pub fn lease_lost(&self, job_id: &str) {
        let mut m = self.runners.lock().unwrap();
        for c in m.values_mut() {
            if let Some((token, _)) = c.in_flight.remove(job_id) {
                let _ = c.tx.send(GatewayFrame::Cancel { job_id: job_id.to_string(), token });
                self.kick(&c.app_id);
            }
        }
    }

    /// An attempt ended elsewhere (another gateway expired its lease): its runner, if here, lets go of it.
    pub fn attempt_ended(&self, job_id: &str, token: i64) {
        let mut m = self.runners.lock().unwrap();
        for c in m.values_mut() {
            if c.in_flight.get(job_id).map(|x| x.0) == Some(token) {
                c.in_flight.remove(job_id);
                let _ = c.tx.send(GatewayFrame::Cancel { job_id: job_id.to_string(), token });
                self.kick(&c.app_id);
            }
        }
    }

    fn in_flight_token(&self, runner_id: &str, job_id: &str) -> Option<i64> {
        self.runners.lock().unwrap().get(runner_id).and_then(|c| c.in_flight.get(job_id).map(|x| x.0))
    }

    fn notify_for(&self, app_id: &str) -> Arc<Notify> {
        self.kicks.lock().unwrap().entry(app_id.to_string()).or_default().clone()
    }
}

/// Starts the dispatcher of every registered app.
pub fn start_dispatchers(gw: &Arc<Gateway>) {
    gw.hub.dispatching.lock().unwrap().get_or_insert_default();
    for app_id in gw.apps.ids().iter() {
        ensure_dispatcher(gw, app_id);
    }
}

/// Starts an app's dispatcher unless it runs (an app deployed at run time), once dispatchers are started.
pub(crate) fn ensure_dispatcher(gw: &Arc<Gateway>, app_id: &str) {
    let mut d = gw.hub.dispatching.lock().unwrap();
    let Some(set) = d.as_mut() else { return };
    if set.insert(app_id.to_string()) {
        let notify = gw.hub.notify_for(app_id);
        tokio::spawn(dispatcher(gw.clone(), app_id.to_string(), notify));
    }
}

async fn dispatcher(gw: Arc<Gateway>, app_id: String, notify: Arc<Notify>) {
    loop {
        if !gw.apps.contains_key(&app_id) {
            // Removed: a redeploy under the same id starts a new dispatcher.
            let mut d = gw.hub.dispatching.lock().unwrap();
            if !gw.apps.contains_key(&app_id) {
                if let Some(set) = d.as_mut() {
                    set.remove(&app_id);
                }
                return;
            }
        }
        if let Err(e) = dispatch_app(&gw, &app_id).await {
            if gw.shutdown.is_cancelled() {
                return;
            }
            tracing::error!(app = %app_id, error = %e, "dispatch failed");
        }
        tokio::select! {
            _ = notify.notified() => {}
            // A safety net only: every state change that frees a slot or queues a job kicks the dispatcher.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = gw.shutdown.cancelled() => return,
        }
    }
}

async fn dispatch_app(gw: &Arc<Gateway>, app_id: &str) -> Result<(), darkroom_store::StoreError> {
    loop {
        let mux = gw.fleet.knobs(app_id).max_multiplexing;
        let free = gw.hub.free_places(app_id, mux, gw.now());
        if free == 0 {
            // No free runner: the fleet may need to start one (it looks at the queue itself).
            gw.fleet.kick();
            return Ok(());
        }
        // The next jobs, as many as there are free places, claimed in one transaction.
        let next = gw.store.next_queued(app_id, free as i64).await?;
        if next.is_empty() {
            return Ok(());
        }
        let now = gw.now();
        let mut claims = Vec::with_capacity(next.len());
        for (job_id, hint) in next {
            match gw.hub.pick(app_id, hint.as_deref(), mux, now, true) {
                Some(runner_id) => claims.push((job_id, runner_id)),
                None => break,
            }
        }
        if claims.is_empty() {
            return Ok(());
        }
        let got = match gw.store.claim_many(&claims, now + gw.cfg.lease_ms, now).await {
            Ok(got) => got,
            Err(e) => {
                claims.iter().for_each(|(_, r)| gw.hub.unreserve(r));
                return Err(e);
            }
        };
        for ((_, runner_id), job) in claims.into_iter().zip(got) {
            match job {
                Some(job) => assign(gw, job, &runner_id, now).await?,
                None => gw.hub.unreserve(&runner_id),
            }
        }
    }
}

/// Sends a claimed job to the runner whose place was reserved for it (by the dispatcher, or at submit).
pub(crate) async fn assign(
    gw: &Arc<Gateway>,
    job: JobRecord,
    runner_id: &str,
    now: i64,
) -> Result<(), darkroom_store::StoreError> {
    metrics::job_started(&job, now);
    let input: Value = if crate::payloads::is_marker(&job.input) {
        match crate::payloads::load_json(gw, &job.id, crate::payloads::Kind::Input, &job.input).await {
            Ok(v) => v,
            Err(e) => {
                // The input cannot be read back: the request fails rather than running on nothing.
                gw.hub.unreserve(runner_id);
                tracing::error!(request_id = %job.id, error = %e, "reading a request's input failed");
                let outcome = Outcome::platform(&darkroom_core::ApiError::new(
                    ErrorType::StorageUnavailable,
                    format!("The request's input could not be read from storage: {e}"),
                ));
                if gw.store.complete(&job.id, job.attempts, &outcome, gw.now()).await? == CompleteResult::Applied {
                    gw.job_changed(&job.id);
                }
                return Ok(());
            }
        }
    } else {
        serde_json::from_str(&job.input).unwrap_or(Value::Null)
    };
    let frame = GatewayFrame::Assign {
        job_id: job.id.clone(),
        token: job.attempts,
        attempt: job.attempts,
        app_id: job.app_id.clone(),
        path: job.path.clone(),
        mode: job.mode.as_str().into(),
        inline_outputs: !job.store_io || input.get("sync_mode").and_then(Value::as_bool).unwrap_or(false),
        upload_token: Some(gw.job_upload_token(&job.id, &job.owner_id)),
        input,
    };
    let mut cold_start = None;
    let sent = {
        let mut m = gw.hub.runners.lock().unwrap();
        match m.get_mut(runner_id) {
            Some(c) => {
                c.reserved = c.reserved.saturating_sub(1);
                if c.tx.send(frame).is_ok() {
                    c.in_flight.insert(job.id.clone(), (job.attempts, now));
                    // A runner that became ready after the request came in: the request waited for a cold start.
                    if let Some(ready) = c.ready_at
                        && ready > job.created_at
                    {
                        cold_start = Some(ready - job.created_at);
                    }
                    c.served += 1;
                    true
                } else {
                    false
                }
            }
            None => false,
        }
    };
    if let Some(ms) = cold_start {
        metrics::cold_start(&job.app_id, ms);
        if let Err(e) = gw.store.set_cold_start(&job.id, job.attempts, ms).await {
            tracing::warn!(error = %e, request_id = %job.id, "recording the cold start failed");
        }
    }
    if sent && job.mode == darkroom_core::job::JobMode::Stream && job.boot_id != gw.boot_id {
        // The client is on another gateway.
        crate::cluster::open_relay(gw, &job);
    }
    gw.job_changed(&job.id);
    tracing::debug!(request_id = %job.id, runner = %runner_id, attempt = job.attempts, sent, "request assigned");
    if !sent {
        // The runner went away between pick and send: its leases end now.
        let r = gw.store.release_runner(runner_id, gw.now()).await?;
        gw.attempts_ended(&r).await;
    }
    Ok(())
}

/// `GET /internal/runner/connect`: a runner's control channel. `Authorization: Bearer <runner token>`.
pub async fn connect(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let token = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| parse_authorization(v).ok());
    let Some(Credential::Bearer(token)) = token else {
        return ApiErr::from(darkroom_core::ApiError::new(ErrorType::RunnerTokenInvalid, "Runner token required"))
            .into_response();
    };
    let hash = keyed_hash(&gw.cfg.server_secret, &token);
    let rec = match gw.store.get_runner_token(&hash).await {
        Ok(r) => r,
        Err(e) => return ApiErr::from(e).into_response(),
    };
    // Tokens of earlier boots are revoked when the boot is reaped; any live gateway of a cluster accepts the others'.
    let Some(rec) = rec.filter(|r| r.revoked_at.is_none()) else {
        return err(ErrorType::RunnerTokenInvalid, "Runner token is unknown, revoked or from a previous boot")
            .into_response();
    };
    let Ok(ws) = ws else {
        return err(ErrorType::InvalidRequest, "This endpoint is a WebSocket: connect with an Upgrade request")
            .into_response();
    };
    ws.max_message_size(64 << 20)
        .read_buffer_size(8 << 10)
        .on_upgrade(move |socket| serve_runner(gw, socket, rec.app_id))
}

fn send_frame(f: &GatewayFrame) -> Message {
    Message::Text(serde_json::to_string(f).unwrap_or_default().into())
}

async fn serve_runner(gw: Arc<Gateway>, mut socket: WebSocket, token_app: Option<String>) {
    // Hello first.
    let hello = match tokio::time::timeout(Duration::from_secs(10), socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<RunnerFrame>(&t).ok(),
        _ => None,
    };
    let Some(RunnerFrame::Hello { protocol, app_id, max_multiplexing, pid, hints, slot, state, reconnect, .. }) = hello
    else {
        let _ = socket.send(send_frame(&GatewayFrame::Shutdown { reason: "expected hello".into() })).await;
        return;
    };
    let refuse = |reason: String| GatewayFrame::Shutdown { reason };
    if protocol != PROTOCOL_VERSION {
        let _ = socket.send(send_frame(&refuse(format!("protocol {protocol} not supported")))).await;
        return;
    }
    if !gw.apps.contains_key(&app_id) || token_app.as_ref().is_some_and(|a| a != &app_id) {
        let _ = socket.send(send_frame(&refuse(format!("app '{app_id}' not served by this token or gateway")))).await;
        return;
    }
    let runner_id = darkroom_core::ids::new_request_id();
    let heartbeat_ms = (gw.cfg.lease_ms / 3).max(100) as u64;
    if socket
        .send(send_frame(&GatewayFrame::Welcome {
            runner_id: runner_id.clone(),
            heartbeat_ms,
            lease_ms: gw.cfg.lease_ms as u64,
        }))
        .await
        .is_err()
    {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let now = gw.now();
    let phase = match state.as_deref() {
        Some("pull") => ConnPhase::Pull,
        // A failed runner says why in the State frame that follows; it gets no work meanwhile.
        Some("setup") | Some("failed") => ConnPhase::Setup,
        Some("draining") => ConnPhase::Draining,
        _ => ConnPhase::Ready,
    };
    // A slot is only believed for runners this gateway started (the fleet knows it); one being stopped gets nothing.
    let slot = slot.filter(|s| gw.fleet.owns_slot(s, &app_id));
    let phase = if slot.as_deref().is_some_and(|s| gw.fleet.slot_stopping(s)) { ConnPhase::Draining } else { phase };
    gw.hub.runners.lock().unwrap().insert(
        runner_id.clone(),
        Conn {
            runner_id: runner_id.clone(),
            app_id: app_id.clone(),
            slot: slot.clone(),
            pid,
            declared_mux: max_multiplexing.clamp(1, 1024),
            hints,
            connected_at: now,
            phase,
            pull_since: (phase == ConnPhase::Pull).then_some(now),
            pulled_at: None,
            message: None,
            // A runner reconnecting ready is no cold start.
            ready_at: (phase == ConnPhase::Ready && !reconnect).then_some(now),
            last_active_at: now,
            served: 0,
            last_seen: now,
            quiet_ms: heartbeat_ms as i64 * 2,
            reserved: 0,
            tx,
            in_flight: HashMap::new(),
        },
    );
    tracing::info!(%runner_id, app = %app_id, pid, slot = ?slot, "runner joined");
    gw.fleet.kick();
    gw.hub.kick(&app_id);
    // A silent runner loses its leases when they run out (one lease, the sweeper); its channel is closed only after
    // two, so a runner that was merely paused comes back to find its work gone and its late frames refused.
    let silence = Duration::from_millis(heartbeat_ms * 6);
    loop {
        tokio::select! {
            msg = tokio::time::timeout(silence, socket.recv()) => {
                let text = match msg {
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => break,
                    Ok(Some(Ok(_))) => continue,
                    Err(_) => { tracing::warn!(%runner_id, "runner silent; dropping it"); break; }
                };
                // Log lines that are already waiting go to the store in one transaction, ahead of the next frame.
                if let Some(c) = gw.hub.runners.lock().unwrap().get_mut(&runner_id) {
                    c.last_seen = gw.now();
                }
                let mut frames = vec![text];
                while frames.len() < 512 {
                    match futures::FutureExt::now_or_never(socket.recv()) {
                        Some(Some(Ok(Message::Text(t)))) => frames.push(t),
                        Some(Some(Ok(Message::Close(_)))) | Some(None) | Some(Some(Err(_))) => break,
                        Some(Some(Ok(_))) => continue,
                        None => break,
                    }
                }
                let mut logs: Vec<(String, i64, LogEntry)> = Vec::new();
                for text in frames {
                    match serde_json::from_str::<RunnerFrame>(&text) {
                        Ok(RunnerFrame::Log { job_id, token, level, message, timestamp }) => {
                            logs.push((job_id, token, LogEntry { timestamp, level: normalize_level(&level).into(), message }));
                        }
                        Ok(frame) => {
                            flush_logs(&gw, &runner_id, std::mem::take(&mut logs)).await;
                            handle_frame(&gw, &runner_id, &app_id, frame).await;
                        }
                        Err(e) => tracing::warn!(%runner_id, error = %e, "bad frame from runner"),
                    }
                }
                flush_logs(&gw, &runner_id, logs).await;
            }
            out = rx.recv() => {
                let Some(frame) = out else { break };
                // Whatever else is queued goes out in the same write (realtime frames under load), then one flush.
                let mut failed = futures::SinkExt::feed(&mut socket, send_frame(&frame)).await.is_err();
                let mut more = 0;
                while !failed && more < 64 {
                    let Ok(next) = rx.try_recv() else { break };
                    failed = futures::SinkExt::feed(&mut socket, send_frame(&next)).await.is_err();
                    more += 1;
                }
                if failed || futures::SinkExt::flush(&mut socket).await.is_err() { break; }
            }
            _ = gw.shutdown.cancelled() => {
                let _ = socket.send(send_frame(&GatewayFrame::Shutdown { reason: "gateway shutting down".into() })).await;
                break;
            }
        }
    }
    gw.hub.runners.lock().unwrap().remove(&runner_id);
    gw.realtime.runner_lost(&runner_id);
    tracing::info!(%runner_id, app = %app_id, "runner left");
    gw.fleet.kick();
    match gw.store.release_runner(&runner_id, gw.now()).await {
        Ok(r) => gw.attempts_ended(&r).await,
        Err(e) => tracing::error!(error = %e, "releasing runner failed"),
    }
    gw.hub.kick(&app_id);
}

/// A completion is retried a few times if the store fails (a full disk, a busy writer), so a finished job is not
/// left to its lease.
async fn complete_with_retry(
    gw: &Gateway,
    job_id: &str,
    token: i64,
    outcome: &Outcome,
    now: i64,
) -> Result<bool, darkroom_store::StoreError> {
    let mut delay = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        match gw.store.complete(job_id, token, outcome, now).await {
            Ok(r) => return Ok(r == CompleteResult::Applied),
            Err(e) if tries < 4 && !gw.shutdown.is_cancelled() => {
                tracing::warn!(error = %e, request_id = %job_id, "completion write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes log lines, grouped per attempt, one transaction per attempt; only attempts this runner holds.
async fn flush_logs(gw: &Gateway, runner_id: &str, logs: Vec<(String, i64, LogEntry)>) {
    let mut groups: Vec<((String, i64), Vec<LogEntry>)> = Vec::new();
    for (job, token, entry) in logs {
        match groups.last_mut() {
            Some((k, v)) if k.0 == job && k.1 == token => v.push(entry),
            _ => groups.push(((job, token), vec![entry])),
        }
    }
    for ((job_id, token), entries) in groups {
        if gw.hub.in_flight_token(runner_id, &job_id) != Some(token) {
            refused(gw, runner_id, &job_id, token, "this runner does not hold that attempt");
            continue;
        }
        match gw.store.append_logs(&job_id, token, &entries).await {
            Ok(true) => gw.job_changed(&job_id),
            Ok(false) => refused(gw, runner_id, &job_id, token, "stale token"),
            Err(e) => tracing::error!(error = %e, "appending logs failed"),
        }
    }
}

fn refused(gw: &Gateway, runner_id: &str, job_id: &str, token: i64, reason: &str) {
    tracing::warn!(%runner_id, request_id = %job_id, token, %reason, "refused a frame from a runner");
    metrics::frame_refused();
    gw.hub.send(runner_id, GatewayFrame::Refused { job_id: job_id.into(), token, reason: reason.into() });
}

/// A runner could not get ready (its weights could not be had, say): the app's queued requests fail with the
/// reason rather than wait for a runner that cannot come. The runner's message is `"{error_type}: {detail}"` for
/// the model store's failures; anything else is `app_setup_failed`. Requests submitted later get a new runner (the
/// fleet restarts with backoff), and fail the same way while the cause lasts.
async fn fail_queued_after_setup_failure(gw: &Arc<Gateway>, runner_id: &str, app_id: &str, why: &str) {
    use darkroom_core::ApiError;
    let (etype, detail) = match why.split_once(": ") {
        Some((t, d)) => match ErrorType::from_name(t) {
            Some(
                t @ (ErrorType::ModelWeightsUnavailable
                | ErrorType::ModelWeightsOffline
                | ErrorType::ModelWeightsCorrupt
                | ErrorType::AppSetupFailed),
            ) => (t, d),
            _ => (ErrorType::AppSetupFailed, why),
        },
        None => (ErrorType::AppSetupFailed, why),
    };
    let err = ApiError::new(etype, format!("The app could not get ready: {detail}"));
    let outcome = Outcome::platform(&err);
    for _ in 0..100 {
        let queued = match gw.store.next_queued(app_id, 64).await {
            Ok(q) if !q.is_empty() => q,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(error = %e, app = %app_id, "listing queued requests failed");
                return;
            }
        };
        for (job_id, _) in queued {
            let now = gw.now();
            let claimed = match gw.store.claim(&job_id, runner_id, now + gw.cfg.lease_ms, now).await {
                Ok(Some(rec)) => rec,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, request_id = %job_id, "claiming a request to fail it failed");
                    return;
                }
            };
            match gw.store.complete(&job_id, claimed.attempts, &outcome, now).await {
                Ok(darkroom_store::CompleteResult::Applied) => {
                    tracing::warn!(request_id = %job_id, app = %app_id, error_type = etype.as_str(), "request failed: app setup failed");
                    gw.finished_by_id(&job_id).await;
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, request_id = %job_id, "failing a request failed"),
            }
        }
    }
}

async fn handle_frame(gw: &Arc<Gateway>, runner_id: &str, app_id: &str, frame: RunnerFrame) {
    let now = gw.now();
    match frame {
        RunnerFrame::Hello { .. } | RunnerFrame::Ack { .. } => {}
        RunnerFrame::RealtimeOutput { session_id, binary, data } => {
            gw.realtime.deliver(runner_id, &session_id, crate::realtime::RtEvent::Output { binary, data });
        }
        RunnerFrame::RealtimeClosed { session_id, error, reason } => {
            gw.realtime.deliver(runner_id, &session_id, crate::realtime::RtEvent::Closed { error, reason });
        }
        RunnerFrame::State { state, message } => {
            if state == "failed" {
                let why = message.clone().unwrap_or_default();
                tracing::error!(%runner_id, app = %app_id, reason = %why, "runner setup failed");
                let (gw, runner_id, app_id) = (gw.clone(), runner_id.to_string(), app_id.to_string());
                tokio::spawn(async move { fail_queued_after_setup_failure(&gw, &runner_id, &app_id, &why).await });
            }
            let phase = match state.as_str() {
                "pull" => ConnPhase::Pull,
                "setup" | "failed" => ConnPhase::Setup,
                "ready" => ConnPhase::Ready,
                "draining" => ConnPhase::Draining,
                other => {
                    tracing::warn!(%runner_id, state = other, "unknown runner state");
                    return;
                }
            };
            {
                let mut m = gw.hub.runners.lock().unwrap();
                if let Some(c) = m.get_mut(runner_id) {
                    // A draining runner stays draining.
                    if c.phase != ConnPhase::Draining {
                        if phase == ConnPhase::Ready && c.ready_at.is_none() {
                            c.ready_at = Some(now);
                            c.last_active_at = now;
                        }
                        if phase == ConnPhase::Pull && c.phase != ConnPhase::Pull {
                            c.pull_since = Some(now);
                        } else if phase != ConnPhase::Pull && c.phase == ConnPhase::Pull {
                            c.pull_since = None;
                            c.pulled_at = Some(now);
                        }
                        c.phase = phase;
                    }
                    c.message = message;
                }
            }
            tracing::info!(%runner_id, app = %app_id, %state, "runner state");
            gw.hub.kick(app_id);
            gw.fleet.kick();
        }
        RunnerFrame::Heartbeat { running } => {
            if let Err(e) = gw.store.extend_leases(runner_id, &running, now + gw.cfg.lease_ms).await {
                tracing::error!(error = %e, "extending leases failed");
            }
        }
        RunnerFrame::Log { job_id, token, level, message, timestamp } => {
            let entry = LogEntry { timestamp, level: normalize_level(&level).into(), message };
            flush_logs(gw, runner_id, vec![(job_id, token, entry)]).await;
        }
        RunnerFrame::Progress { job_id, token, fraction, message } => {
            if gw.hub.in_flight_token(runner_id, &job_id) == Some(token) {
                gw.progress
                    .lock()
                    .unwrap()
                    .insert(job_id.clone(), serde_json::json!({"fraction": fraction, "message": message}));
                gw.job_changed(&job_id);
            }
        }
        RunnerFrame::Partial { job_id, token, data } => {
            if gw.hub.in_flight_token(runner_id, &job_id) == Some(token) {
                if let Some(tx) = gw.streams.lock().unwrap().get(&job_id) {
                    let _ = tx.send(StreamMsg::Partial(data));
                } else if let Some(relay) = gw.relays.lock().unwrap().get(&job_id) {
                    relay.send(data);
                }
            } else {
                refused(gw, runner_id, &job_id, token, "stale token");
            }
        }
        RunnerFrame::Complete { job_id, token, status, body, error_type, inference_ms, units } => {
            // The slot is free whatever happens next; only the holder of this attempt may complete it.
            let held = {
                let mut m = gw.hub.runners.lock().unwrap();
                match m.get_mut(runner_id) {
                    Some(c) if c.in_flight.get(&job_id).map(|x| x.0) == Some(token) => {
                        c.in_flight.remove(&job_id);
                        c.last_active_at = now;
                        true
                    }
                    _ => false,
                }
            };
            gw.progress.lock().unwrap().remove(&job_id);
            gw.hub.kick(app_id);
            if !held {
                refused(gw, runner_id, &job_id, token, "this runner does not hold that attempt");
                return;
            }
            // Partials relayed to the client's gateway arrive there before the completion does.
            crate::cluster::close_relay(gw, &job_id).await;
            // A large result goes to object storage; should that fail, the row keeps it whole.
            let body_s =
                match crate::payloads::offload(gw, &job_id, crate::payloads::Kind::Result, body.to_string()).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(request_id = %job_id, error = %e, "storing a large result as an object failed");
                        body.to_string()
                    }
                };
            let result = if status == 200 {
                complete_with_retry(gw, &job_id, token, &Outcome::success(body_s, inference_ms).with_units(units), now)
                    .await
            } else {
                let message = match body.get("detail") {
                    Some(Value::String(s)) => s.clone(),
                    _ => format!("Invalid status code: {status}"),
                };
                let outcome = Outcome {
                    status,
                    body: body_s,
                    error: Some(message),
                    error_type: Some(error_type.unwrap_or_else(|| "app_error".into())),
                    inference_ms,
                    units: None,
                };
                if status == 503 || status == 504 {
                    // fal's queue retries 503 and 504 (unless x-fal-no-retry).
                    match gw.store.fail_attempt(&job_id, token, &outcome, now).await {
                        Ok(r) => {
                            let applied = r != darkroom_store::AttemptResult::Stale;
                            gw.attempts_ended(&[(job_id.clone(), r)]).await;
                            if !applied {
                                refused(gw, runner_id, &job_id, token, "stale token");
                            }
                            return;
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    complete_with_retry(gw, &job_id, token, &outcome, now).await
                }
            };
            match result {
                Ok(true) => gw.finished_by_id(&job_id).await,
                Ok(false) => refused(gw, runner_id, &job_id, token, "stale token: the attempt is no longer current"),
                Err(e) => {
                    // The attempt's lease runs out and the job runs again: never left running forever.
                    tracing::error!(error = %e, request_id = %job_id, "completing job failed; it will be retried");
                }
            }
        }
    }
}
