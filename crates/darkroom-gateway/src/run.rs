//! The run host: sync run (`POST /run/{id}`) and streaming (`POST /run/{id}/stream`). Both are ephemeral: they
//! wait for a cold start (bounded by `X-Fal-Request-Timeout`), and the job is cancelled if the client goes away.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use darkroom_core::job::{JobMode, JobRecord, JobState};
use darkroom_core::route::{RunRoute, route_run};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::{ApiErr, ApiPath, ApiResult};
use crate::http::{Routed, request_id_header};
use crate::queue::{body_error, enqueue_request, result_response, wait_change};
use crate::{Gateway, StreamMsg};

/// Cancels the job when dropped while armed: the client disconnected before the result.
struct CancelOnDrop {
    gw: Arc<Gateway>,
    id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.gw.streams.lock().unwrap().remove(&self.id);
        if self.armed {
            let gw = self.gw.clone();
            let id = std::mem::take(&mut self.id);
            tracing::info!(request_id = %id, "client went away; cancelling");
            tokio::spawn(async move {
                if let Err(e) = gw.cancel_job(&id).await {
                    tracing::error!(error = %e, "cancel after disconnect failed");
                }
            });
        }
    }
}

async fn wait_completed(gw: &Gateway, id: &str) -> ApiResult<JobRecord> {
    let mut rx = gw.events.subscribe();
    loop {
        if let Some(j) = gw.store.get_job(id).await?
            && j.state == JobState::Completed
        {
            return Ok(j);
        }
        wait_change(&mut rx, id, Duration::from_secs(2)).await;
    }
}

/// `/run/{*rest}`.
pub async fn handle(
    State(gw): State<Arc<Gateway>>,
    method: Method,
    ApiPath(rest): ApiPath,
    RawQuery(query): RawQuery,
    _routed: Routed,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let route = match route_run(method.as_str(), &rest) {
        Ok(r) => r,
        Err(e) => return ApiErr(e).into_response(),
    };
    if let RunRoute::OpenApi { app } = &route {
        return crate::openapi::app_openapi(&gw, app).unwrap_or_else(|e| e.into_response());
    }
    let result = async {
        let caller = gw.authenticate(&headers).await?;
        let body = body.map_err(body_error)?;
        if gw.hub.draining.load(std::sync::atomic::Ordering::SeqCst) {
            // A synchronous request would only wait for the restart; queue submits are still taken.
            let mut e = darkroom_core::ApiError::new(
                darkroom_core::ErrorType::ServiceUnavailable,
                "The server is draining for a restart; retry shortly or submit to the queue",
            );
            e.retry_after = Some(5);
            return Err(ApiErr(e));
        }
        match route {
            RunRoute::Run { app, path } => {
                let (_, job) = enqueue_request(
                    &gw,
                    &caller,
                    &app,
                    &path,
                    &method,
                    query.as_deref(),
                    &headers,
                    &body,
                    JobMode::Sync,
                )
                .await?;
                let mut guard = CancelOnDrop { gw: gw.clone(), id: job.id.clone(), armed: true };
                let done = wait_completed(&gw, &job.id).await?;
                guard.armed = false;
                Ok(result_response(&crate::queue::resolved(&gw, done).await?))
            }
            RunRoute::Stream { app, path } => {
                stream(gw.clone(), &caller, app, path, &method, query.as_deref(), &headers, &body).await
            }
            RunRoute::OpenApi { .. } => unreachable!(),
        }
    }
    .await;
    result.unwrap_or_else(|e: ApiErr| e.into_response())
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    gw: Arc<Gateway>,
    caller: &crate::auth::Caller,
    app: darkroom_core::ids::AppRef,
    path: String,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Response> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Validate and enqueue, registering the stream under the id before any runner can see the job.
    let (_, job) = {
        let gw2 = gw.clone();
        let registered = std::sync::Mutex::new(None::<String>);
        let reg = |id: &str| {
            *registered.lock().unwrap() = Some(id.to_string());
            gw2.streams.lock().unwrap().insert(id.to_string(), tx.clone())
        };
        let res = enqueue_stream(&gw, caller, &app, &path, method, query, headers, body, reg).await;
        if res.is_err() {
            // The request was refused or not stored: nothing will ever finish this stream.
            if let Some(id) = registered.lock().unwrap().take() {
                gw.streams.lock().unwrap().remove(&id);
            }
        }
        res?
    };
    let mut guard = CancelOnDrop { gw: gw.clone(), id: job.id.clone(), armed: true };
    // Errors before the first event are ordinary JSON errors with a real status code.
    let first = loop {
        match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Some(m)) => break m,
            Ok(None) => break StreamMsg::Done,
            Err(_) => {
                // Completed by another path (cancel, deadline) without a Done reaching us?
                if let Some(j) = gw.store.get_job(&job.id).await?
                    && j.state == JobState::Completed
                {
                    break StreamMsg::Done;
                }
            }
        }
    };
    if let StreamMsg::Done = first {
        let done = gw.store.get_job(&job.id).await?.ok_or_else(|| ApiErr(darkroom_core::ApiError::internal()))?;
        guard.armed = false;
        if !done.succeeded() {
            return Ok(result_response(&crate::queue::resolved(&gw, done).await?));
        }
    }
    let (etx, erx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let id = job.id.clone();
    tokio::spawn(async move {
        let mut guard = guard;
        let mut next = Some(first);
        let mut sent_output = false;
        loop {
            let msg = match next.take() {
                Some(m) => m,
                None => tokio::select! {
                    m = rx.recv() => m.unwrap_or(StreamMsg::Done),
                    _ = etx.closed() => return, // client gone: the guard cancels the job
                    // A safety net: if a Done was ever missed, the stored state still ends the stream.
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {
                        match gw.store.get_job(&id).await {
                            Ok(Some(j)) if j.state == JobState::Completed => StreamMsg::Done,
                            _ => continue,
                        }
                    }
                },
            };
            match msg {
                StreamMsg::Partial(v) => {
                    if !sent_output {
                        // Output has reached the client: a retry would replay it, so there is none.
                        sent_output = true;
                        if let Err(e) = gw.store.disable_retries(&id).await {
                            tracing::error!(error = %e, "disabling retries of a stream failed");
                        }
                    }
                    let ev = Event::default().data(darkroom_core::json::to_ascii_string(&v));
                    if etx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                StreamMsg::Done => {
                    guard.armed = false;
                    let job = match gw.store.get_job(&id).await {
                        Ok(Some(j)) => crate::queue::resolved(&gw, j).await.map(Some).map_err(|e| e.0.message),
                        Ok(None) => Ok(None),
                        Err(e) => Err(e.to_string()),
                    };
                    let final_event = match job {
                        Ok(Some(j)) if j.succeeded() => j
                            .result_body
                            .as_deref()
                            .and_then(|b| serde_json::from_str::<Value>(b).ok())
                            .unwrap_or(Value::Null),
                        Ok(Some(j)) => json!({"error": j.error.unwrap_or_default(), "error_type": j.error_type}),
                        _ => json!({"error": "request lost", "error_type": "internal_error"}),
                    };
                    let _ =
                        etx.send(Ok(Event::default().data(darkroom_core::json::to_ascii_string(&final_event)))).await;
                    return;
                }
            }
        }
    });
    let s = tokio_stream::wrappers::ReceiverStream::new(erx);
    let mut r = Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)).text("ping")).into_response();
    r.headers_mut().insert("x-fal-request-id", request_id_header(&job.id));
    r.headers_mut().insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn enqueue_stream(
    gw: &Arc<Gateway>,
    caller: &crate::auth::Caller,
    app: &darkroom_core::ids::AppRef,
    path: &str,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
    register: impl Fn(&str) -> Option<mpsc::UnboundedSender<StreamMsg>>,
) -> ApiResult<(Arc<darkroom_core::app::CompiledApp>, JobRecord)> {
    crate::queue::enqueue_request_with(gw, caller, app, path, method, query, headers, body, JobMode::Stream, |id| {
        register(id);
    })
    .await
}
