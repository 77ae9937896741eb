//! The platform API under `/v1`: keys, runner tokens, runners, requests, apps.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use darkroom_core::ErrorType;
use darkroom_core::auth::Scope;
use darkroom_store::JobFilter;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Gateway;
use crate::error::{ApiErr, ApiPath, ApiQuery, ApiResult, err};
use crate::http::json_response;

pub fn router() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{key_id}", delete(revoke_key))
        .route("/v1/runner-tokens", post(create_runner_token))
        .route("/v1/runners", get(list_runners))
        .route("/v1/requests", get(list_requests))
        .route("/v1/requests/{id}", get(show_request).delete(delete_request))
        .route(
            "/v1/apps",
            get(list_apps)
                .post(crate::deploy::deploy)
                // Bundles may carry weights: their own limit, above the server's body limit.
                .layer(axum::extract::DefaultBodyLimit::max(crate::deploy::MAX_BUNDLE)),
        )
        .route("/v1/apps/{owner}/{alias}/scale", get(get_scale).patch(patch_scale).delete(reset_scale))
}

fn json_body<T: serde::de::DeserializeOwned + Default>(body: &axum::body::Bytes) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiErr(darkroom_core::app::json_decode_error(&e.to_string())))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    #[serde(default)]
    name: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    owner_id: Option<String>,
    /// `fal` or `standard`: the webhook headers this key's requests get unless a request asks otherwise.
    #[serde(default)]
    webhook_dialect: Option<String>,
}

async fn create_key(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let caller = gw.authenticate(&headers).await?;
    caller.require_admin()?;
    let req: CreateKey = json_body(&body)?;
    let scope = match req.scope.as_deref() {
        None => Scope::Client,
        Some(s) => Scope::parse(s).ok_or_else(|| {
            ApiErr(darkroom_core::app::validation_error(vec![
                json!({"loc": ["body", "scope"], "msg": "must be 'client' or 'admin'", "type": "enum"}),
            ]))
        })?,
    };
    let owner = req.owner_id.unwrap_or_else(|| caller.owner_id.clone());
    if owner.is_empty() || owner.len() > 128 {
        return Err(err(ErrorType::ValidationError, "owner_id must be 1 to 128 characters"));
    }
    let dialect = match req.webhook_dialect.as_deref() {
        None => None,
        Some(d) => Some(
            darkroom_core::webhook::Dialect::parse(d)
                .ok_or_else(|| {
                    ApiErr(darkroom_core::app::validation_error(vec![
                        json!({"loc": ["body", "webhook_dialect"], "msg": "must be 'fal' or 'standard'", "type": "enum"}),
                    ]))
                })?
                .as_str()
                .to_string(),
        ),
    };
    let (rec, credential) = gw.create_key_with(&owner, scope, &req.name, dialect).await.map_err(|e| {
        tracing::error!(error = %e, "creating key failed");
        ApiErr(darkroom_core::ApiError::internal())
    })?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"key_id": rec.key_id, "key": credential, "owner_id": rec.owner_id, "scope": rec.scope, "name": rec.name,
                "webhook_dialect": rec.webhook_dialect}),
        None,
    ))
}

async fn list_keys(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let caller = gw.authenticate(&headers).await?;
    let owner = if caller.is_admin() { None } else { Some(caller.owner_id.as_str()) };
    let keys = gw.store.list_keys(owner).await?;
    Ok(Json(json!({"keys": keys})))
}

async fn revoke_key(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ApiPath(key_id): ApiPath,
) -> ApiResult<Json<Value>> {
    let caller = gw.authenticate(&headers).await?;
    caller.require_admin()?;
    if !gw.store.revoke_key(&key_id, gw.now()).await? {
        return Err(err(ErrorType::NotFound, format!("No active key '{}'", key_id.escape_default())));
    }
    gw.keys.invalidate(&key_id);
    Ok(Json(json!({"key_id": key_id, "revoked": true})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRunnerToken {
    #[serde(default)]
    app_id: Option<String>,
}

async fn create_runner_token(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let caller = gw.authenticate(&headers).await?;
    caller.require_admin()?;
    let req: CreateRunnerToken = json_body(&body)?;
    if let Some(app) = &req.app_id
        && !gw.apps.contains_key(app)
    {
        return Err(err(ErrorType::AppNotFound, format!("App '{}' not found", app.escape_default())));
    }
    let token = gw.mint_runner_token(req.app_id.as_deref()).await.map_err(|e| {
        tracing::error!(error = %e, "minting runner token failed");
        ApiErr(darkroom_core::ApiError::internal())
    })?;
    Ok(json_response(StatusCode::CREATED, &json!({"token": token, "boot_id": gw.boot_id, "app_id": req.app_id}), None))
}

async fn list_runners(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?.require_admin()?;
    Ok(Json(json!({"runners": gw.fleet.list(&gw)})))
}

fn scale_view(gw: &Gateway, app_id: &str) -> ApiResult<Value> {
    let (deployed, patch, effective) = gw
        .fleet
        .knobs_detail(app_id)
        .ok_or_else(|| err(ErrorType::AppNotFound, format!("No app '{}'", app_id.escape_default())))?;
    let runners: Vec<Value> = gw
        .fleet
        .list(gw)
        .into_iter()
        .filter(|r| r.app_id == app_id && r.state != "TERMINATED")
        .map(|r| json!({"runner_id": r.runner_id, "state": r.state}))
        .collect();
    Ok(json!({"app_id": app_id, "scaling": effective, "deployed": deployed, "overrides": patch, "runners": runners}))
}

/// `GET /v1/apps/{owner}/{alias}/scale`: the knobs in effect, as deployed, and the run-time overrides.
async fn get_scale(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path((owner, alias)): axum::extract::Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?;
    Ok(Json(scale_view(&gw, &format!("{owner}/{alias}"))?))
}

/// `PATCH /v1/apps/{owner}/{alias}/scale`: changes knobs at run time (kept across restarts and redeploys).
async fn patch_scale(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path((owner, alias)): axum::extract::Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?.require_admin()?;
    let app_id = format!("{owner}/{alias}");
    let (deployed, current, _) = gw
        .fleet
        .knobs_detail(&app_id)
        .ok_or_else(|| err(ErrorType::AppNotFound, format!("No app '{}'", app_id.escape_default())))?;
    let change: darkroom_core::scaling::ScalingPatch = serde_json::from_slice(&body).map_err(|e| {
        ApiErr(darkroom_core::app::validation_error(vec![
            json!({"loc": ["body"], "msg": e.to_string(), "type": "value_error"}),
        ]))
    })?;
    let patch = current.merge(&change);
    patch.apply(&deployed).validate(&["body"]).map_err(|d| ApiErr(darkroom_core::app::validation_error(d)))?;
    let stored = serde_json::to_string(&patch).map_err(|_| ApiErr(darkroom_core::ApiError::internal()))?;
    gw.store.set_app_scaling(&app_id, (!patch.is_empty()).then_some(stored.as_str()), gw.now()).await?;
    gw.fleet.set_patch(&app_id, patch);
    gw.hub.kick(&app_id);
    tracing::info!(app = %app_id, change = %String::from_utf8_lossy(&body), "scaling changed");
    Ok(Json(scale_view(&gw, &app_id)?))
}

/// `DELETE /v1/apps/{owner}/{alias}/scale`: back to the knobs as deployed.
async fn reset_scale(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path((owner, alias)): axum::extract::Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?.require_admin()?;
    let app_id = format!("{owner}/{alias}");
    scale_view(&gw, &app_id)?;
    gw.store.set_app_scaling(&app_id, None, gw.now()).await?;
    gw.fleet.set_patch(&app_id, Default::default());
    gw.hub.kick(&app_id);
    Ok(Json(scale_view(&gw, &app_id)?))
}

#[derive(Debug, Deserialize)]
struct ListRequests {
    app_id: Option<String>,
    status: Option<String>,
    /// Submitted at or after: RFC 3339, epoch ms, or a duration ago (`2h`).
    since: Option<String>,
    /// Submitted before (same forms).
    until: Option<String>,
    limit: Option<i64>,
}

async fn list_requests(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ListRequests>,
) -> ApiResult<Json<Value>> {
    let caller = gw.authenticate(&headers).await?;
    let state = match q.status.as_deref() {
        None => None,
        Some("IN_QUEUE") => Some("queued"),
        Some("IN_PROGRESS") => Some("running"),
        Some("COMPLETED") => Some("completed"),
        Some(_) => return Err(err(ErrorType::InvalidRequest, "status must be IN_QUEUE, IN_PROGRESS or COMPLETED")),
    };
    let now = gw.now();
    let time = |name: &str, v: Option<String>| -> ApiResult<Option<i64>> {
        v.map(|s| {
            darkroom_core::parse_time(&s, now).map_err(|e| err(ErrorType::InvalidRequest, format!("{name}: {e}")))
        })
        .transpose()
    };
    let filter = JobFilter {
        owner_id: if caller.is_admin() { None } else { Some(caller.owner_id.clone()) },
        app_id: q.app_id,
        state: state.map(str::to_string),
        created_after: time("since", q.since)?,
        created_before: time("until", q.until)?,
        limit: q.limit.unwrap_or(100),
    };
    let jobs = gw.store.list_jobs(&filter).await?;
    Ok(Json(json!({"requests": jobs.iter().map(crate::queue::summary).collect::<Vec<_>>()})))
}

async fn list_apps(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?;
    let all = gw.apps.all();
    let mut apps: Vec<Value> = all
        .values()
        .map(|a| {
            json!({"id": a.spec.id, "title": a.spec.title, "description": a.spec.description, "kind": a.spec.kind,
                         "scaling": gw.fleet.knobs(&a.spec.id), "streaming": a.spec.streaming})
        })
        .collect();
    apps.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(Json(json!({"apps": apps})))
}

async fn visible_request(gw: &Gateway, headers: &HeaderMap, id: &str) -> ApiResult<darkroom_core::job::JobRecord> {
    let caller = gw.authenticate(headers).await?;
    let id = darkroom_core::ids::parse_request_id(id).map_err(ApiErr)?;
    match gw.store.get_job(&id).await? {
        Some(j) if caller.can_see(&j.owner_id) => Ok(j),
        _ => Err(err(ErrorType::RequestNotFound, format!("Request '{id}' not found"))),
    }
}

fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

/// `GET /v1/requests/{id}`: metadata, input, result and logs (while kept).
async fn show_request(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<Value>> {
    let j = crate::queue::resolved(&gw, visible_request(&gw, &headers, &id).await?).await?;
    let mut v = crate::queue::summary(&j);
    v["input"] = parse_json(&j.input);
    v["result"] = j.result_body.as_deref().map(parse_json).unwrap_or(Value::Null);
    v["result_status"] = json!(j.result_status);
    v["error"] = json!(j.error);
    v["payload_deleted_at"] = json!(j.payload_deleted_at.map(darkroom_core::iso8601));
    let logs = gw.store.get_logs(&j.id).await?;
    v["logs"] =
        json!(logs
        .iter()
        .map(|l| json!({"message": l.message, "level": l.level, "timestamp": darkroom_core::iso8601(l.timestamp)}))
        .collect::<Vec<_>>());
    Ok(Json(v))
}

/// `DELETE /v1/requests/{id}`: deletes a completed request's input, result and logs.
async fn delete_request(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<Value>> {
    let j = visible_request(&gw, &headers, &id).await?;
    match gw.store.delete_payload(&j.id, gw.now()).await? {
        darkroom_store::DeleteResult::Deleted => {
            crate::payloads::delete(&gw, &j.id).await;
            Ok(Json(json!({"request_id": j.id, "deleted": true})))
        }
        darkroom_store::DeleteResult::NotCompleted => {
            Err(err(ErrorType::Conflict, "Only completed requests can be deleted; cancel it first"))
        }
        darkroom_store::DeleteResult::NotFound => Err(err(ErrorType::RequestNotFound, "Request not found")),
    }
}
