//! Webhook delivery: the outbox dispatcher, signing, the JWKS, and the delivery log API.
//!
//! The outbox row is written by the store in the same transaction as the request's completion. This dispatcher
//! claims due rows (leased, so a crash only delays them), signs each attempt, resolves the target and connects
//! only to an address the policy permits (pinned, so a second DNS answer cannot redirect it), follows no redirects,
//! and records every attempt. Only 2xx counts. After the schedule's last attempt the delivery is dead-lettered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use darkroom_core::ErrorType;
use darkroom_core::webhook::{Dialect, WebhookKey, sign};
use darkroom_store::{DeliveryNext, SigningKeyRecord, WebhookAttempt, WebhookDelivery, WebhookFilter};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::Gateway;
use crate::error::{ApiErr, ApiPath, ApiQuery, ApiResult, err};
use crate::http::json_response;

/// Loads the signing keys, making the first one if there is none.
pub async fn load_keys(gw: &Gateway) -> anyhow::Result<()> {
    let mut recs = gw.store.list_signing_keys().await?;
    if !recs.iter().any(|k| k.retired_at.is_none()) {
        let k = WebhookKey::generate();
        gw.store
            .insert_signing_key(
                &SigningKeyRecord {
                    kid: k.kid.clone(),
                    secret: k.secret_b64(),
                    created_at: gw.now(),
                    retired_at: None,
                },
                true,
            )
            .await?;
        recs = gw.store.list_signing_keys().await?;
    }
    *gw.signing_keys.write().unwrap() = recs;
    Ok(())
}

fn active_key(gw: &Gateway) -> Option<WebhookKey> {
    let keys = gw.signing_keys.read().unwrap();
    keys.iter().rev().find(|k| k.retired_at.is_none()).and_then(|k| WebhookKey::from_secret_b64(&k.kid, &k.secret))
}

/// Runs until shutdown.
pub async fn run_dispatcher(gw: Arc<Gateway>) {
    let permits = Arc::new(Semaphore::new(32));
    loop {
        let now = gw.now();
        let lease = now + gw.cfg.webhook_timeout.as_millis() as i64 * 2 + 5_000;
        match gw.store.claim_due_webhooks(now, lease, 32).await {
            Ok(due) => {
                for d in due {
                    let gw = gw.clone();
                    let permit = permits.clone().acquire_owned().await.expect("semaphore open");
                    tokio::spawn(async move {
                        deliver(&gw, d).await;
                        drop(permit);
                    });
                }
            }
            Err(e) => {
                if gw.shutdown.is_cancelled() {
                    return;
                }
                tracing::error!(error = %e, "claiming webhook deliveries failed");
            }
        }
        let wait = match gw.store.next_webhook_due().await {
            Ok(Some(t)) => Duration::from_millis((t - gw.now()).clamp(0, 1_000) as u64),
            _ => Duration::from_secs(1),
        };
        tokio::select! {
            _ = gw.webhook_kick.notified() => {}
            _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
            _ = gw.shutdown.cancelled() => return,
        }
    }
}

async fn attempt(gw: &Gateway, d: &WebhookDelivery) -> (Option<i64>, Option<String>) {
    let url = match gw.cfg.webhook_policy.check_url(&d.url) {
        Ok(u) => u,
        Err(e) => return (None, Some(format!("refused: {e}"))),
    };
    let (domain, addr) = match gw.cfg.webhook_policy.resolve(&url, "--webhook-allow").await {
        Ok(x) => x,
        Err(e) => return (None, Some(e)),
    };
    let Some(key) = active_key(gw) else { return (None, Some("no signing key".into())) };
    // A large result lives in object storage: the receiver gets it in full.
    let body = match crate::payloads::resolve_webhook_body(gw, &d.job_id, &d.body).await {
        Ok(b) => b,
        Err(e) => return (None, Some(format!("reading the result: {e}"))),
    };
    let dialect = Dialect::parse(&d.dialect).unwrap_or(gw.cfg.webhook_dialect);
    let ts = gw.now() / 1000;
    let signed = darkroom_core::webhook::Delivery {
        delivery_id: &d.id,
        request_id: &d.job_id,
        user_id: &d.owner_id,
        timestamp: ts,
        body: body.as_bytes(),
    };
    let headers = sign(dialect, &key, gw.cfg.webhook_hmac_secret.as_deref(), signed);
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls((*gw.webhook_tls).clone())
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(gw.cfg.webhook_timeout.min(Duration::from_secs(10)))
        .timeout(gw.cfg.webhook_timeout)
        .user_agent(concat!("darkroom-webhooks/", env!("CARGO_PKG_VERSION")));
    if let Some(dom) = &domain {
        b = b.resolve(dom, addr);
    }
    let client = match b.build() {
        Ok(c) => c,
        Err(e) => return (None, Some(format!("client: {e}"))),
    };
    let mut rb = client.post(url).header("content-type", "application/json").body(body);
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    if let Some(tp) = &d.traceparent {
        rb = rb.header("traceparent", tp);
    }
    match rb.send().await {
        Ok(r) => {
            let st = r.status();
            // Drain a little of the body so the connection closes cleanly; ignore it otherwise.
            let _ = tokio::time::timeout(Duration::from_millis(200), r.bytes()).await;
            let err = (!st.is_success()).then(|| format!("HTTP {}", st.as_u16()));
            (Some(st.as_u16() as i64), err)
        }
        Err(e) if e.is_timeout() => (None, Some("timed out".into())),
        Err(e) if e.is_connect() => (None, Some(format!("connection failed: {e}"))),
        Err(e) => (None, Some(e.to_string())),
    }
}

async fn deliver(gw: &Gateway, d: WebhookDelivery) {
    let started = gw.now();
    let t0 = Instant::now();
    // The whole attempt, name resolution included, ends well inside the delivery's lease.
    let limit = gw.cfg.webhook_timeout + Duration::from_secs(2);
    let (status, error) =
        tokio::time::timeout(limit, attempt(gw, &d)).await.unwrap_or((None, Some("timed out".into())));
    let ok = status.is_some_and(|s| (200..300).contains(&s));
    let now = gw.now();
    let done_in_round = (d.attempts - d.round_start + 1).max(1) as u32;
    let next = if ok {
        DeliveryNext::Delivered
    } else {
        match gw.cfg.webhook_schedule.next_at(done_in_round, now, rand::random::<f64>()) {
            Some(at) => DeliveryNext::Retry { at },
            None => DeliveryNext::Dead,
        }
    };
    let rec = WebhookAttempt {
        attempt: d.attempts + 1,
        started_at: started,
        duration_ms: t0.elapsed().as_millis() as i64,
        status,
        error: error.clone(),
    };
    let outcome = match next {
        DeliveryNext::Delivered => "delivered",
        DeliveryNext::Retry { .. } => "retry",
        DeliveryNext::Dead => "dead",
    };
    metrics::counter!("darkroom_webhook_attempts_total", "outcome" => outcome).increment(1);
    if ok {
        metrics::histogram!("darkroom_webhook_delivery_seconds").record((now - d.created_at).max(0) as f64 / 1000.0);
    }
    tracing::info!(delivery = %d.id, request_id = %d.job_id, attempt = rec.attempt, status = ?status, error = ?error, outcome, "webhook attempt");
    if let Err(e) = gw.store.record_webhook_attempt(&d.id, &rec, next, now).await {
        tracing::error!(error = %e, "recording webhook attempt failed");
    }
}

/// `GET /.well-known/jwks.json`: the active key and keys retired within the overlap period.
async fn jwks(State(gw): State<Arc<Gateway>>) -> Response {
    let now = gw.now();
    let overlap = gw.cfg.webhook_key_overlap.as_millis() as i64;
    let keys: Vec<Value> = gw
        .signing_keys
        .read()
        .unwrap()
        .iter()
        .rev()
        .filter(|k| k.retired_at.is_none_or(|r| now - r < overlap))
        .filter_map(|k| WebhookKey::from_secret_b64(&k.kid, &k.secret))
        .map(|k| k.jwk())
        .collect();
    let mut r = json_response(StatusCode::OK, &json!({"keys": keys}), None);
    r.headers_mut().insert("cache-control", axum::http::HeaderValue::from_static("public, max-age=300"));
    r
}

pub fn router() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/v1/webhooks", get(list))
        .route("/v1/webhooks/keys/rotate", post(rotate))
        .route("/v1/webhooks/{id}", get(show))
        .route("/v1/webhooks/{id}/redeliver", post(redeliver))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    request_id: Option<String>,
    limit: Option<i64>,
}

fn delivery_json(d: &WebhookDelivery) -> Value {
    use darkroom_core::iso8601;
    json!({
        "id": d.id, "request_id": d.job_id, "url": d.url, "dialect": if d.dialect.is_empty() { "default" } else { &d.dialect },
        "state": d.state, "attempts": d.attempts, "last_status": d.last_status, "last_error": d.last_error,
        "next_attempt_at": d.next_attempt_at.map(iso8601), "created_at": iso8601(d.created_at),
        "delivered_at": d.delivered_at.map(iso8601), "owner_id": d.owner_id,
    })
}

async fn list(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<Value>> {
    let caller = gw.authenticate(&headers).await?;
    if let Some(s) = &q.state
        && !matches!(s.as_str(), "pending" | "delivered" | "dead")
    {
        return Err(err(ErrorType::InvalidRequest, "state must be pending, delivered or dead"));
    }
    let f = WebhookFilter {
        owner_id: (!caller.is_admin()).then(|| caller.owner_id.clone()),
        job_id: q.request_id,
        state: q.state,
        limit: q.limit.unwrap_or(100),
    };
    let ds = gw.store.list_webhooks(&f).await?;
    Ok(Json(json!({"webhooks": ds.iter().map(delivery_json).collect::<Vec<_>>()})))
}

async fn visible(gw: &Gateway, headers: &HeaderMap, id: &str) -> ApiResult<(WebhookDelivery, Vec<WebhookAttempt>)> {
    let caller = gw.authenticate(headers).await?;
    match gw.store.get_webhook(id).await? {
        Some((d, a)) if caller.can_see(&d.owner_id) => Ok((d, a)),
        _ => Err(err(ErrorType::NotFound, format!("No webhook delivery '{}'", id.escape_default()))),
    }
}

async fn show(State(gw): State<Arc<Gateway>>, headers: HeaderMap, ApiPath(id): ApiPath) -> ApiResult<Json<Value>> {
    let (d, attempts) = visible(&gw, &headers, &id).await?;
    let mut v = delivery_json(&d);
    v["body"] = serde_json::from_str(&d.body).unwrap_or(Value::Null);
    v["attempt_log"] = json!(attempts
        .iter()
        .map(|a| json!({"attempt": a.attempt, "started_at": darkroom_core::iso8601(a.started_at), "duration_ms": a.duration_ms,
                          "status": a.status, "error": a.error}))
        .collect::<Vec<_>>());
    Ok(Json(v))
}

async fn redeliver(State(gw): State<Arc<Gateway>>, headers: HeaderMap, ApiPath(id): ApiPath) -> ApiResult<Response> {
    visible(&gw, &headers, &id).await?;
    if !gw.store.redeliver_webhook(&id, gw.now()).await? {
        return Err(err(ErrorType::Conflict, "An attempt of this delivery is in flight; try again when it has ended"));
    }
    gw.webhook_kick.notify_one();
    Ok(json_response(StatusCode::ACCEPTED, &json!({"id": id, "state": "pending"}), None))
}

async fn rotate(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult<Response> {
    gw.authenticate(&headers).await?.require_admin()?;
    let k = WebhookKey::generate();
    gw.store
        .insert_signing_key(
            &SigningKeyRecord { kid: k.kid.clone(), secret: k.secret_b64(), created_at: gw.now(), retired_at: None },
            true,
        )
        .await?;
    load_keys(&gw).await.map_err(|e| {
        tracing::error!(error = %e, "reloading keys failed");
        ApiErr(darkroom_core::ApiError::internal())
    })?;
    Ok(json_response(StatusCode::CREATED, &json!({"kid": k.kid, "jwk": k.jwk()}), None))
}
