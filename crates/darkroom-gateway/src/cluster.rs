//! Several gateways sharing one store (PostgreSQL): heartbeats, the leader that runs the sweepers, events from the
//! other gateways, and the relay that carries a stream's partial outputs from the gateway holding the runner's
//! channel to the gateway holding the client's connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use darkroom_core::ErrorType;
use darkroom_core::auth::keyed_hash;
use darkroom_core::job::JobRecord;
use darkroom_core::protocol::GatewayFrame;
use darkroom_store::{BootReport, StoreEvent};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::{ApiPath, err};
use crate::{Gateway, StreamMsg};

/// How a gateway shares its store with others.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where the other gateways reach this one (its listener), for stream relays.
    pub url: Option<String>,
    /// This data folder's previous boot: dead for sure (we hold the folder's lock), so reaped at once.
    pub previous_boot: Option<String>,
    /// How often the gateway records that it is alive and checks the leader lock.
    pub heartbeat: Duration,
    /// A gateway silent this long is dead: the leader reaps it.
    pub dead_after: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            url: None,
            previous_boot: None,
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(10),
        }
    }
}

/// The bearer token gateways of one cluster use with each other (all share the server secret).
pub fn cluster_token(secret: &[u8]) -> String {
    keyed_hash(secret, "darkroom-cluster-relay-v1")
}

/// Applies a reaping: finished requests wake their waiters, requeued ones their dispatchers.
pub async fn apply_reaped(gw: &Gateway, report: &BootReport) {
    if report.requeued.is_empty() && report.failed.is_empty() && report.tokens_revoked == 0 {
        return;
    }
    tracing::warn!(
        requeued = report.requeued.len(),
        failed = report.failed.len(),
        tokens_revoked = report.tokens_revoked,
        "reaped a dead gateway"
    );
    for id in &report.failed {
        gw.finished_by_id(id).await;
    }
    for id in &report.requeued {
        gw.hub.lease_lost(id);
        gw.job_changed(id);
        if let Ok(Some(j)) = gw.store.get_job(id).await {
            gw.hub.kick(&j.app_id);
        }
    }
}

/// Heartbeat, leadership and reaping of dead gateways. Stops the gateway if the cluster declared it dead.
pub async fn run_heartbeat(gw: Arc<Gateway>, c: ClusterConfig) {
    let mut tick = tokio::time::interval(c.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = gw.shutdown.cancelled() => return,
        }
        let now = gw.now();
        match gw.store.heartbeat_boot(&gw.boot_id, now).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(
                    boot_id = %gw.boot_id,
                    "the other gateways declared this one dead (no heartbeat for {:?}); its requests were ended: \
                     shutting down",
                    c.dead_after
                );
                gw.dead.cancel();
                gw.shutdown.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        let leading = match gw.store.try_lead().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "leader check failed");
                false
            }
        };
        if gw.leader.swap(leading, Ordering::SeqCst) != leading {
            tracing::info!(boot_id = %gw.boot_id, leading, "leadership changed");
        }
        crate::metrics::set_leader(leading);
        if leading {
            match gw.store.reap_boots(now - c.dead_after.as_millis() as i64, None, now).await {
                Ok(r) => apply_reaped(&gw, &r).await,
                Err(e) => tracing::error!(error = %e, "reaping dead gateways failed"),
            }
        }
    }
}

/// Acts on what other gateways wrote: wake dispatchers and waiters, stop runners whose attempts ended elsewhere.
pub async fn follow_events(gw: Arc<Gateway>, mut rx: tokio::sync::broadcast::Receiver<StoreEvent>) {
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = gw.shutdown.cancelled() => return,
        };
        match ev {
            Ok(StoreEvent::Queued { app_id }) => gw.hub.kick(&app_id),
            Ok(StoreEvent::Changed { job_id }) => gw.job_changed(&job_id),
            Ok(StoreEvent::Finished { job_id }) => gw.finished_elsewhere(&job_id),
            Ok(StoreEvent::AttemptEnded { job_id, token }) => {
                gw.hub.attempt_ended(&job_id, token);
                gw.relays.lock().unwrap().remove(&job_id);
                gw.job_changed(&job_id);
            }
            Ok(StoreEvent::Cancelled { job_id, runner_id, token }) => {
                gw.hub.send(&runner_id, GatewayFrame::Cancel { job_id, token });
            }
            // Missed events: waiters and dispatchers poll, so nothing is lost but time.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "store events lagged");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// A stream job whose client is on another gateway: its partials are posted there, in order.
pub struct Relay {
    tx: mpsc::UnboundedSender<Value>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub fn send(&self, v: Value) {
        let _ = self.tx.send(v);
    }
}

/// Opens the relay of a stream job claimed here but opened on another gateway.
pub fn open_relay(gw: &Arc<Gateway>, job: &JobRecord) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
    let gw2 = gw.clone();
    let job_id = job.id.clone();
    let boot = job.boot_id.clone();
    let task = tokio::spawn(async move {
        let url = match gw2.store.get_boot(&boot).await {
            Ok(Some(b)) => b.url,
            _ => None,
        };
        let Some(url) = url else {
            tracing::warn!(request_id = %job_id, %boot, "the stream's gateway has no address; partials dropped");
            while rx.recv().await.is_some() {}
            return;
        };
        let target = format!("{}/internal/streams/{job_id}", url.trim_end_matches('/'));
        let mut warned = false;
        while let Some(v) = rx.recv().await {
            let res = gw2
                .cluster_http
                .post(&target)
                .bearer_auth(&gw2.cluster_token)
                .json(&v)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            let ok = matches!(&res, Ok(r) if r.status().is_success());
            if !ok && !warned {
                warned = true;
                tracing::warn!(request_id = %job_id, %target, status = ?res.map(|r| r.status()).ok(),
                    "relaying a stream partial failed (the client may have gone)");
            }
        }
    });
    gw.relays.lock().unwrap().insert(job.id.clone(), Relay { tx, task });
}

/// Closes a job's relay and waits until what it carries has been delivered (so the client gets every partial
/// before it learns that the job finished).
pub async fn close_relay(gw: &Gateway, job_id: &str) {
    let relay = gw.relays.lock().unwrap().remove(job_id);
    if let Some(Relay { tx, task }) = relay {
        drop(tx);
        if tokio::time::timeout(Duration::from_secs(15), task).await.is_err() {
            tracing::warn!(request_id = %job_id, "stream relay did not drain in time");
        }
    }
}

/// `POST /internal/streams/{id}`: a partial output relayed by the gateway holding the runner.
pub async fn receive_partial(
    State(gw): State<Arc<Gateway>>,
    ApiPath(id): ApiPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok: bool = subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), gw.cluster_token.as_bytes()).into();
    if !ok {
        return err(ErrorType::Unauthorized, "Gateway credentials required").into_response();
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return err(ErrorType::InvalidRequest, "Body must be JSON").into_response();
    };
    match gw.streams.lock().unwrap().get(&id) {
        Some(tx) if tx.send(StreamMsg::Partial(v)).is_ok() => StatusCode::NO_CONTENT.into_response(),
        _ => err(ErrorType::RequestNotFound, "No open stream with this id here").into_response(),
    }
}
