//! The queue host: submit, status, status stream (SSE), result, cancel (fal-protocol.md §1.3, §2, §10.3–10.7).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use darkroom_core::app::{CompiledApp, json_decode_error};
use darkroom_core::ids::AppRef;
use darkroom_core::job::{
    JobMode, JobRecord, JobState, NewJob, parse_flag, parse_priority, parse_request_timeout, priority,
};
use darkroom_core::route::{QueueRoute, route_queue};
use darkroom_core::{ApiError, ErrorType, iso8601};
use darkroom_store::CancelResult;
use serde_json::{Value, json};

use crate::Gateway;
use crate::auth::Caller;
use crate::error::{ApiErr, ApiPath, ApiResult, err};
use crate::http::{Routed, base_url, json_response, request_id_header};

fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiErr> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| err(ErrorType::InvalidRequest, format!("header {name} is not valid ASCII"))),
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Whether `?logs=` asks for logs (`1` or `true`).
pub fn wants_logs(query: Option<&str>) -> bool {
    query_param(query, "logs").is_some_and(|v| parse_flag(&v))
}

/// Validates and durably enqueues a request; the shared path of submit, sync run and stream.
#[allow(clippy::too_many_arguments)]
pub async fn enqueue_request(
    gw: &Arc<Gateway>,
    caller: &Caller,
    app: &AppRef,
    path: &str,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
    mode: JobMode,
) -> ApiResult<(Arc<CompiledApp>, JobRecord)> {
    enqueue_request_with(gw, caller, app, path, method, query, headers, body, mode, |_| {}).await
}

/// [`enqueue_request`], calling `before_enqueue` with the new id just before the job becomes visible.
#[allow(clippy::too_many_arguments)]
pub async fn enqueue_request_with(
    gw: &Arc<Gateway>,
    caller: &Caller,
    app: &AppRef,
    path: &str,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
    mode: JobMode,
    before_enqueue: impl FnOnce(&str),
) -> ApiResult<(Arc<CompiledApp>, JobRecord)> {
    let Some(compiled) = gw.apps.get(&app.id()) else {
        return Err(err(ErrorType::AppNotFound, format!("App '{}' not found", app.id())));
    };
    if !compiled.has_path(path) {
        return Err(err(ErrorType::EndpointNotFound, format!("Path /{path} not found")));
    }
    let input: Value = if method == Method::GET {
        let map: serde_json::Map<String, Value> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .filter(|(k, _)| !k.starts_with("fal_"))
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        Value::Object(map)
    } else if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| ApiErr(json_decode_error(&e.to_string())))?
    };
    compiled.validate(&input).map_err(ApiErr)?;

    let now = gw.now();
    let start_deadline = match header(headers, "x-fal-request-timeout")? {
        Some(v) => Some(now + parse_request_timeout(v).map_err(ApiErr)?),
        None => None,
    };
    let runner_hint = header(headers, "x-fal-runner-hint")?.map(|s| s.chars().take(256).collect());
    let no_retry = header(headers, "x-fal-no-retry")?.is_some_and(parse_flag);
    let store_io = header(headers, "x-fal-store-io")?.is_none_or(|v| v.trim() != "0");
    let prio = match mode {
        JobMode::Queue => match header(headers, "x-fal-queue-priority")? {
            Some(v) => parse_priority(v).map_err(ApiErr)?,
            None => priority::NORMAL,
        },
        // Interactive requests jump the queue, but only a few per key at a time so bursts cannot starve it.
        JobMode::Sync | JobMode::Stream => {
            if gw.store.count_queued_for_key(&caller.key_id, priority::INTERACTIVE).await? < gw.cfg.interactive_cap {
                priority::INTERACTIVE
            } else {
                priority::NORMAL
            }
        }
    };
    let webhook_url = match (mode, query_param(query, "fal_webhook")) {
        (JobMode::Queue, Some(u)) => match gw.cfg.webhook_policy.check_url(&u) {
            Ok(_) => Some(u),
            Err(msg) => {
                return Err(ApiErr(darkroom_core::app::validation_error(vec![json!({
                    "loc": ["query", "fal_webhook"], "msg": format!("webhook URL {msg}"), "type": "url_parsing"
                })])));
            }
        },
        _ => None,
    };
    let webhook_dialect = match header(headers, "x-darkroom-webhook-dialect")? {
        None => caller.webhook_dialect.clone(),
        Some(v) => Some(
            darkroom_core::webhook::Dialect::parse(v)
                .ok_or_else(|| {
                    err(ErrorType::InvalidRequest, "X-Darkroom-Webhook-Dialect must be 'fal' or 'standard'")
                })?
                .as_str()
                .to_string(),
        ),
    };
    let traceparent = match header(headers, "traceparent")? {
        Some(t) if darkroom_core::webhook::valid_traceparent(t) => t.to_string(),
        _ => darkroom_core::webhook::new_traceparent(),
    };
    let mut job = NewJob {
        id: darkroom_core::ids::new_request_id(),
        app_id: compiled.spec.id.clone(),
        path: path.to_string(),
        owner_id: caller.owner_id.clone(),
        key_id: caller.key_id.clone(),
        mode,
        priority: prio,
        input: input.to_string(),
        max_attempts: gw.cfg.max_attempts,
        no_retry,
        start_deadline,
        runner_hint,
        webhook_url,
        webhook_dialect,
        traceparent: Some(traceparent),
        store_io,
        boot_id: gw.boot_id.clone(),
        created_at: now,
        prices: crate::billing::job_prices(gw, &compiled.spec),
    };
    // Per-key limits: rate, then requests queued or running.
    if let Err(wait) = gw.take_rate_token(&caller.key_id) {
        let mut e = darkroom_core::ApiError::new(ErrorType::RateLimited, "Too many requests for this key; slow down");
        e.retry_after = Some(wait);
        return Err(ApiErr(e));
    }
    if gw.cfg.max_concurrent_per_key > 0
        && gw.store.count_active_for_key(&caller.key_id).await? >= gw.cfg.max_concurrent_per_key
    {
        let mut e = darkroom_core::ApiError::new(
            ErrorType::ConcurrencyLimit,
            format!("This key already has {} requests queued or running", gw.cfg.max_concurrent_per_key),
        );
        e.retry_after = Some(1);
        return Err(ApiErr(e));
    }
    crate::billing::check_budget(gw, &caller.owner_id, now).await?;
    // Backpressure: the app's queue length, as fal's `fal_max_queue_length` or the server's limit.
    let limit = match query_param(query, "fal_max_queue_length") {
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 => n.min(gw.cfg.max_queue_length),
            _ => return Err(err(ErrorType::InvalidRequest, "fal_max_queue_length must be a non-negative integer")),
        },
        None => gw.cfg.max_queue_length,
    };
    let queued = gw.store.count_queued(&job.app_id).await?;
    if queued >= limit {
        let mut e = darkroom_core::ApiError::new(
            ErrorType::QueueFull,
            format!("The queue of {} is full ({limit} requests)", job.app_id),
        );
        e.retry_after = Some(1);
        return Err(ApiErr(e));
    }
    let idempotency_key = match (mode, header(headers, "idempotency-key")?) {
        (JobMode::Queue, Some(k)) if !k.is_empty() && k.len() <= 255 => Some(k.to_string()),
        (JobMode::Queue, Some(_)) => {
            return Err(err(ErrorType::InvalidRequest, "Idempotency-Key must be 1 to 255 characters"));
        }
        _ => None,
    };
    // The fingerprint is of the input itself; a large input then moves to object storage.
    let fingerprint =
        idempotency_key.as_ref().map(|_| darkroom_core::job::input_fingerprint(&job.app_id, &job.path, &job.input));
    let offloaded = job.input.len() > crate::payloads::INLINE_MAX || crate::payloads::is_marker(&job.input);
    job.input = crate::payloads::offload(gw, &job.id, crate::payloads::Kind::Input, std::mem::take(&mut job.input))
        .await
        .map_err(|e| err(ErrorType::StorageUnavailable, format!("Storing the request's input failed: {e}")))?;
    before_enqueue(&job.id);
    let res = enqueue_job(gw, &job, idempotency_key.zip(fingerprint), queued, now).await;
    if offloaded && !matches!(res, Ok((_, true))) {
        // Not enqueued (an error, or the first request of an idempotency key answered instead): no orphan object.
        crate::payloads::delete(gw, &job.id).await;
    }
    let rec = res?.0;
    tracing::info!(request_id = %rec.id, app = %rec.app_id, mode = mode.as_str(), owner = %rec.owner_id, priority = rec.priority, "request accepted");
    metrics::counter!("darkroom_requests_submitted_total", "app" => rec.app_id.clone(), "mode" => mode.as_str())
        .increment(1);
    gw.hub.kick(&rec.app_id);
    Ok((compiled, rec))
}

/// Records a validated job: claimed at submit where it can be, idempotently where a key was given. The flag is
/// false when an earlier request with the same idempotency key is returned instead.
async fn enqueue_job(
    gw: &Arc<Gateway>,
    job: &NewJob,
    idempotency: Option<(String, String)>,
    queued: i64,
    now: i64,
) -> ApiResult<(JobRecord, bool)> {
    let rec = match idempotency {
        // Nothing waits ahead of it and a runner has a free place: the job starts in the transaction that
        // records it (claim at submit), with no trip through the dispatcher.
        None if queued == 0 => {
            let mux = gw.fleet.knobs(&job.app_id).max_multiplexing;
            match gw.hub.reserve_at_submit(&job.app_id, job.runner_hint.as_deref(), mux, now) {
                Some(runner) => match gw.store.enqueue_claimed(job, &runner, now + gw.cfg.lease_ms, now).await {
                    Ok((rec, true)) => {
                        crate::hub::assign(gw, rec.clone(), &runner, now).await?;
                        rec
                    }
                    Ok((rec, false)) => {
                        gw.hub.unreserve(&runner);
                        rec
                    }
                    Err(e) => {
                        gw.hub.unreserve(&runner);
                        return Err(e.into());
                    }
                },
                None => gw.store.enqueue(job).await?,
            }
        }
        None => gw.store.enqueue(job).await?,
        Some((k, fp)) => {
            let not_before = now - gw.cfg.idempotency_window.as_millis() as i64;
            match gw.store.enqueue_idempotent(job, &k, &fp, not_before).await {
                Ok((rec, true)) => rec,
                // The same request again: answer with the first one, enqueue nothing.
                Ok((rec, false)) => return Ok((rec, false)),
                Err(darkroom_store::StoreError::IdempotencyMismatch(first)) => {
                    return Err(err(
                        ErrorType::IdempotencyKeyReused,
                        format!("Idempotency-Key was already used for a different request ({first})"),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok((rec, true))
}

/// The URLs of a request: `{base}/{app}/requests/{id}`.
fn urls(base: &str, job: &JobRecord) -> (String, String, String) {
    let r = format!("{base}/{}/requests/{}", job.app_id, job.id);
    (r.clone(), format!("{r}/status"), format!("{r}/cancel"))
}

/// A status object as fal's clients read it (fal-protocol.md §1.5).
pub async fn status_body(gw: &Gateway, job: &JobRecord, base: &str, logs: bool) -> ApiResult<Value> {
    let (response_url, status_url, cancel_url) = urls(base, job);
    let mut v = json!({
        "status": job.state.fal_status(),
        "request_id": job.id,
        "response_url": response_url,
        "status_url": status_url,
        "cancel_url": cancel_url,
        "logs": Value::Null,
    });
    if logs && job.state != JobState::Queued {
        let entries = gw.store.get_logs(&job.id).await?;
        v["logs"] = Value::Array(
            entries
                .into_iter()
                .map(|e| json!({"message": e.message, "level": e.level, "source": "USER", "timestamp": iso8601(e.timestamp)}))
                .collect(),
        );
    }
    match job.state {
        JobState::Queued => {
            v["queue_position"] = json!(gw.store.queue_position(&job.id).await?.unwrap_or(0));
        }
        JobState::Running => {
            if let Some(p) = gw.progress.lock().unwrap().get(&job.id) {
                v["progress"] = p.clone();
            }
            v["metrics"] = cold_start_metrics(job.cold_start_ms);
        }
        JobState::Completed => {
            let mut metrics = if job.started_at.is_some() { cold_start_metrics(job.cold_start_ms) } else { json!({}) };
            if let Some(ms) = job.inference_ms {
                metrics["inference_time"] = json!(ms as f64 / 1000.0);
            }
            v["metrics"] = metrics;
            if let Some(t) = &job.error_type {
                v["error"] = json!(job.error.clone().unwrap_or_default());
                v["error_type"] = json!(t);
            }
        }
    }
    Ok(v)
}

/// A status object for an active request from the store's index (the same fields as [`status_body`] without logs).
async fn brief_status_body(gw: &Gateway, b: &darkroom_store::JobBrief, base: &str) -> ApiResult<Value> {
    let r = format!("{base}/{}/requests/{}", b.app_id, b.id);
    let mut v = json!({
        "status": b.state.fal_status(),
        "request_id": b.id,
        "response_url": r,
        "status_url": format!("{r}/status"),
        "cancel_url": format!("{r}/cancel"),
        "logs": Value::Null,
    });
    if b.state == JobState::Queued {
        v["queue_position"] = json!(gw.store.queue_position(&b.id).await?.unwrap_or(0));
    } else {
        if let Some(p) = gw.progress.lock().unwrap().get(&b.id) {
            v["progress"] = p.clone();
        }
        v["metrics"] = cold_start_metrics(b.cold_start_ms);
    }
    Ok(v)
}

/// Whether the request waited for a runner to start, and for how long (seconds).
fn cold_start_metrics(cold_start_ms: Option<i64>) -> Value {
    match cold_start_ms {
        Some(ms) => json!({"cold_start": true, "cold_start_time": ms as f64 / 1000.0}),
        None => json!({"cold_start": false}),
    }
}

/// A job with its payloads read back from object storage where they were moved there.
pub async fn resolved(gw: &Gateway, mut job: JobRecord) -> ApiResult<JobRecord> {
    crate::payloads::resolve(gw, &mut job)
        .await
        .map_err(|e| err(ErrorType::StorageUnavailable, format!("Reading the request's payload failed: {e}")))?;
    Ok(job)
}

/// Loads a job the caller may see, for the app in the URL.
pub async fn visible_job(gw: &Gateway, caller: &Caller, app: &AppRef, id: &str) -> ApiResult<JobRecord> {
    match gw.store.get_job(id).await? {
        Some(j) if caller.can_see(&j.owner_id) && j.app_id == app.id() => Ok(j),
        _ => Err(err(ErrorType::RequestNotFound, format!("Request '{id}' not found"))),
    }
}

/// `/queue/{*rest}`, any method.
pub async fn handle(
    State(gw): State<Arc<Gateway>>,
    method: Method,
    ApiPath(rest): ApiPath,
    RawQuery(query): RawQuery,
    routed: Routed,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match handle_inner(gw, method, rest, query, routed, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle_inner(
    gw: Arc<Gateway>,
    method: Method,
    rest: String,
    query: Option<String>,
    routed: Routed,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let route = route_queue(method.as_str(), &rest).map_err(ApiErr)?;
    if let QueueRoute::OpenApi { app } = &route {
        return crate::openapi::app_openapi(&gw, app);
    }
    let caller = gw.authenticate(&headers).await?;
    let base = base_url(&gw, &headers, &routed, "queue");
    match route {
        QueueRoute::Submit { app, path } => {
            let body = body.map_err(body_error)?;
            let (_, job) =
                enqueue_request(&gw, &caller, &app, &path, &method, query.as_deref(), &headers, &body, JobMode::Queue)
                    .await?;
            let (response_url, status_url, cancel_url) = urls(&base, &job);
            let pos = gw.store.queue_position(&job.id).await?.unwrap_or(0);
            let body = json!({
                "request_id": job.id, "gateway_request_id": job.id, "status": "IN_QUEUE", "queue_position": pos,
                "response_url": response_url, "status_url": status_url, "cancel_url": cancel_url,
            });
            Ok(json_response(StatusCode::OK, &body, Some(&job.id)))
        }
        QueueRoute::Status { app, request_id } => {
            // An active request, without logs: answered from the store's in-memory index, no database read.
            if !wants_logs(query.as_deref())
                && let Some(b) = gw.store.job_brief(&request_id).await?
                && caller.can_see(&b.owner_id)
                && b.app_id == app.id()
            {
                let v = brief_status_body(&gw, &b, &base).await?;
                return Ok(json_response(StatusCode::ACCEPTED, &v, Some(&b.id)));
            }
            let job = visible_job(&gw, &caller, &app, &request_id).await?;
            let v = status_body(&gw, &job, &base, wants_logs(query.as_deref())).await?;
            let code = if job.state == JobState::Completed { StatusCode::OK } else { StatusCode::ACCEPTED };
            Ok(json_response(code, &v, Some(&job.id)))
        }
        QueueRoute::StatusStream { app, request_id } => {
            let job = visible_job(&gw, &caller, &app, &request_id).await?;
            Ok(status_stream(gw, job, base, wants_logs(query.as_deref())))
        }
        QueueRoute::Result { app, request_id } => {
            let job = resolved(&gw, visible_job(&gw, &caller, &app, &request_id).await?).await?;
            Ok(result_response(&job))
        }
        QueueRoute::Cancel { app, request_id } => {
            let job = visible_job(&gw, &caller, &app, &request_id).await?;
            let (code, status) = match gw.cancel_job(&job.id).await? {
                CancelResult::Cancelled { .. } => (StatusCode::ACCEPTED, "CANCELLATION_REQUESTED"),
                // 2xx, as fal-protocol.md §10.7: the clients raise on >= 400 and fire cancels from timeout paths.
                CancelResult::AlreadyCompleted => (StatusCode::OK, "ALREADY_COMPLETED"),
                CancelResult::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            };
            Ok(json_response(code, &json!({"status": status}), Some(&job.id)))
        }
        QueueRoute::OpenApi { .. } => unreachable!("handled above"),
    }
}

pub fn body_error(e: axum::extract::rejection::BytesRejection) -> ApiErr {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        err(ErrorType::PayloadTooLarge, "Request body is too large")
    } else {
        err(ErrorType::InvalidRequest, format!("Could not read the request body: {e}"))
    }
}

/// The stored result: the output (200) or the failure's status and body.
pub fn result_response(job: &JobRecord) -> Response {
    if job.state != JobState::Completed {
        let mut r =
            ApiErr(ApiError::new(ErrorType::RequestNotCompleted, "Request is still in progress")).into_response();
        r.headers_mut().insert("x-fal-request-id", request_id_header(&job.id));
        return r;
    }
    if job.payload_deleted_at.is_some() {
        let mut r = ApiErr(ApiError::new(ErrorType::RequestPayloadDeleted, "The result of this request was deleted"))
            .into_response();
        r.headers_mut().insert("x-fal-request-id", request_id_header(&job.id));
        return r;
    }
    let status =
        StatusCode::from_u16(job.result_status.unwrap_or(500) as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = job.result_body.clone().unwrap_or_else(|| "null".into());
    let mut r = (status, [("content-type", "application/json")], body).into_response();
    let h = r.headers_mut();
    h.insert("x-fal-request-id", request_id_header(&job.id));
    if let Some(t) = job.error_type.as_deref() {
        if t != "app_error"
            && let Ok(v) = HeaderValue::from_str(t)
        {
            h.insert("x-fal-error-type", v);
        }
        if t == ErrorType::RequestTimeout.as_str() {
            h.insert("x-fal-request-timeout-type", HeaderValue::from_static("user"));
        }
    }
    r
}

/// Waits until the job changes (or a safety interval passes).
pub async fn wait_change(rx: &mut tokio::sync::broadcast::Receiver<String>, id: &str, max: Duration) {
    let deadline = tokio::time::Instant::now() + max;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(x)) if x == id => return,
            Ok(Ok(_)) => continue,
            // Lagged or closed: re-read the state.
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// `GET …/status/stream`: one event per change, ASCII JSON, comment keep-alives, closed right after COMPLETED.
fn status_stream(gw: Arc<Gateway>, job: JobRecord, base: String, logs: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(16);
    let id = job.id.clone();
    tokio::spawn(async move {
        let mut events = gw.events.subscribe();
        let mut last = String::new();
        loop {
            let job = match gw.store.get_job(&id).await {
                Ok(Some(j)) => j,
                _ => return,
            };
            let Ok(v) = status_body(&gw, &job, &base, logs).await else { return };
            let s = darkroom_core::json::to_ascii_string(&v);
            if s != last {
                if tx.send(Ok(Event::default().data(s.clone()))).await.is_err() {
                    return;
                }
                last = s;
            }
            if job.state == JobState::Completed {
                return;
            }
            tokio::select! {
                _ = wait_change(&mut events, &id, Duration::from_secs(5)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut r =
        Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)).text("ping")).into_response();
    r.headers_mut().insert("x-fal-request-id", request_id_header(&job.id));
    r.headers_mut().insert("cache-control", HeaderValue::from_static("no-store"));
    r
}

/// `GET /v1/requests/{id}` is in admin; this is the JSON for listings.
pub fn summary(job: &JobRecord) -> Value {
    json!({
        "request_id": job.id, "app_id": job.app_id, "path": job.path, "mode": job.mode.as_str(),
        "status": job.state.fal_status(), "attempts": job.attempts, "owner_id": job.owner_id,
        "created_at": iso8601(job.created_at), "started_at": job.started_at.map(iso8601),
        "completed_at": job.completed_at.map(iso8601), "error_type": job.error_type,
    })
}

#[allow(dead_code)]
fn _assert_json<T: serde::Serialize>(_: Json<T>) {}
