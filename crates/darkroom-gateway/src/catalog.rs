//! The models catalog: `GET /v1/models` (fal's model search: list, find by `endpoint_id`, search by `q`,
//! `category`, `owner`; paginated), `GET /v1/models/{owner}/{alias}` (everything about one app: endpoints with
//! schemas and examples, pricing, runner state), and a per-app `llms.txt` for coding assistants.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use darkroom_core::ErrorType;
use darkroom_core::app::{AppSpec, CompiledApp};
use darkroom_core::ids::AppRef;
use serde_json::{Value, json};

use crate::Gateway;
use crate::error::{ApiErr, ApiResult, err};
use crate::http::{Routed, base_url};

pub fn router() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/models", get(search))
        .route("/v1/models/{owner}/{alias}", get(detail))
        .route("/v1/models/{owner}/{alias}/llms.txt", get(llms_txt))
        .route("/{owner}/{alias}/llms.txt", get(llms_txt))
}

/// The endpoint ids of an app (`owner/alias` for the root, `owner/alias/path` for the others).
pub fn endpoint_ids(spec: &AppSpec) -> Vec<String> {
    spec.paths.iter().map(|p| endpoint_id(&spec.id, p)).collect()
}

fn endpoint_id(app_id: &str, path: &str) -> String {
    if path.is_empty() { app_id.to_string() } else { format!("{app_id}/{path}") }
}

/// fal's license classes: weights under a non-commercial license are `research`.
fn license_type(license: &str) -> &'static str {
    let l = license.to_ascii_lowercase();
    if l.contains("nc") && (l.contains("cc-by-nc") || l.contains("non-commercial") || l.contains("noncommercial")) {
        "research"
    } else {
        "commercial"
    }
}

/// What the fleet says of an app's runners.
fn runner_state(gw: &Gateway, app_id: &str) -> Value {
    let runners: Vec<_> =
        gw.fleet.list(gw).into_iter().filter(|r| r.app_id == app_id && r.state != "TERMINATED").collect();
    let count = |states: &[&str]| runners.iter().filter(|r| states.contains(&r.state)).count();
    let (idle, busy) = (count(&["IDLE"]), count(&["RUNNING"]));
    let starting = count(&["PENDING", "PULL", "SETUP"]);
    let knobs = gw.fleet.knobs(app_id);
    let state = if idle + busy > 0 {
        "warm"
    } else if starting > 0 {
        "starting"
    } else {
        "cold"
    };
    json!({"state": state, "warm": idle + busy > 0, "idle": idle, "busy": busy, "starting": starting,
           "min_concurrency": knobs.min_concurrency, "max_concurrency": knobs.max_concurrency,
           "keep_alive": knobs.keep_alive})
}

fn metadata(gw: &Gateway, app: &CompiledApp, path: &str, run_base: &str) -> Value {
    let s = &app.spec;
    let id = endpoint_id(&s.id, path);
    let boot = gw.boot_started_iso();
    let mut m = json!({
        "display_name": if path.is_empty() { s.title.clone() } else { format!("{} ({path})", s.title) },
        "category": s.catalog.category,
        "description": s.description,
        "status": "active",
        "tags": s.catalog.tags,
        "updated_at": boot,
        "is_favorited": null,
        "thumbnail_url": null,
        "model_url": format!("{run_base}/{id}"),
        "date": boot,
        "highlighted": false,
        "pinned": false,
        "kind": "inference",
        "owner": s.id.split('/').rev().nth(1).unwrap_or(""),
        "app_id": s.id,
        "license": s.catalog.license,
        "streaming": s.streaming,
        "pricing": crate::billing::pricing_json(gw, s),
        "runners": runner_state(gw, &s.id),
    });
    if let Some(l) = &s.catalog.license {
        m["license_type"] = json!(license_type(l));
    }
    m
}

fn matches(app: &CompiledApp, path: &str, terms: &[String]) -> bool {
    let s = &app.spec;
    let hay = format!(
        "{} {} {} {} {}",
        endpoint_id(&s.id, path),
        s.title,
        s.description,
        s.catalog.category,
        s.catalog.tags.join(" ")
    )
    .to_lowercase();
    terms.iter().all(|t| hay.contains(t.as_str()))
}

fn bad_param(name: &str, msg: &str) -> ApiErr {
    ApiErr(darkroom_core::app::validation_error(vec![
        json!({"loc": ["query", name], "msg": msg, "type": "value_error"}),
    ]))
}

/// `GET /v1/models`.
async fn search(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    routed: Routed,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?;
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()).into_owned().collect();
    let get = |n: &str| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| v.trim().to_string()).filter(|v| !v.is_empty());
    let all = |n: &str| -> Vec<String> {
        pairs
            .iter()
            .filter(|(k, _)| k == n)
            .flat_map(|(_, v)| v.split(',').map(|x| x.trim().to_string()))
            .filter(|x| !x.is_empty())
            .collect()
    };
    let limit = match get("limit") {
        None => 50,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| bad_param("limit", "limit must be 1 to 100"))?,
    };
    let offset = match get("cursor") {
        None => 0,
        Some(c) => base64::engine::general_purpose::STANDARD
            .decode(c.as_bytes())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| bad_param("cursor", "cursor is not one this server gave"))?,
    };
    let terms: Vec<String> =
        get("q").map(|q| q.to_lowercase().split_whitespace().map(str::to_string).collect()).unwrap_or_default();
    let category = get("category");
    let owner = get("owner");
    let ids = all("endpoint_id");
    if let Some(st) = get("status")
        && st != "active"
        && st != "deprecated"
    {
        return Err(bad_param("status", "status must be active or deprecated"));
    }
    let deprecated_only = get("status").as_deref() == Some("deprecated");
    let expand = all("expand");
    let with_schemas = expand.iter().any(|e| e == "schemas");
    let with_openapi = expand.iter().any(|e| e == "openapi-3.0" || e == "openapi");

    let all = gw.apps.all();
    let mut apps: Vec<&Arc<CompiledApp>> = all.values().collect();
    apps.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
    let mut found = Vec::new();
    for a in apps {
        for p in &a.spec.paths {
            let id = endpoint_id(&a.spec.id, p);
            let keep = !deprecated_only
                && (ids.is_empty() || ids.contains(&id))
                && category.as_ref().is_none_or(|c| *c == a.spec.catalog.category)
                && owner.as_ref().is_none_or(|o| a.spec.id.split('/').rev().nth(1) == Some(o.as_str()))
                && matches(a, p, &terms);
            if keep {
                found.push((a, p.clone()));
            }
        }
    }
    let run_base = base_url(&gw, &headers, &routed, "run");
    let page: Vec<Value> = found
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(a, p)| {
            let mut v = json!({"endpoint_id": endpoint_id(&a.spec.id, p), "app_id": a.spec.id, "path": p,
                               "metadata": metadata(&gw, a, p, &run_base)});
            if with_schemas {
                let (input, output) = crate::openapi::endpoint_schemas(&gw, &a.spec, p);
                v["input_schema"] = input;
                v["output_schema"] = output;
            }
            if with_openapi {
                v["openapi"] = crate::openapi::app_openapi_doc(&gw, &a.spec.id).unwrap_or(Value::Null);
            }
            v
        })
        .collect();
    let next = (offset + limit < found.len())
        .then(|| base64::engine::general_purpose::STANDARD.encode((offset + limit).to_string()));
    Ok(Json(json!({"models": page, "has_more": next.is_some(), "next_cursor": next, "total": found.len()})))
}

fn find_app(gw: &Gateway, owner: &str, alias: &str) -> ApiResult<Arc<CompiledApp>> {
    let r = AppRef::parse(&format!("{owner}/{alias}")).map_err(ApiErr)?;
    gw.apps.get(&r.id()).ok_or_else(|| err(ErrorType::AppNotFound, format!("App '{}' not found", r.id())))
}

/// `GET /v1/models/{owner}/{alias}`.
async fn detail(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    routed: Routed,
    Path((owner, alias)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?;
    let a = find_app(&gw, &owner, &alias)?;
    let s = &a.spec;
    let run_base = base_url(&gw, &headers, &routed, "run");
    let queue_base = base_url(&gw, &headers, &routed, "queue");
    let endpoints: Vec<Value> = s
        .paths
        .iter()
        .map(|p| {
            let id = endpoint_id(&s.id, p);
            let examples: Vec<&darkroom_core::app::Example> = s.catalog.examples.iter().filter(|e| e.path == *p).collect();
            let (input, output) = crate::openapi::endpoint_schemas(&gw, s, p);
            json!({"endpoint_id": id, "path": p, "queue_url": format!("{queue_base}/{id}"), "run_url": format!("{run_base}/{id}"),
                   "input_schema": input, "output_schema": output, "examples": examples})
        })
        .collect();
    let depth = gw.store.app_depths().await?.into_iter().find(|d| d.app_id == s.id);
    let mut runners = runner_state(&gw, &s.id);
    runners["queued"] = json!(depth.as_ref().map(|d| d.queued).unwrap_or(0));
    runners["running"] = json!(depth.as_ref().map(|d| d.running).unwrap_or(0));
    let root = run_base.trim_end_matches("/run").to_string();
    Ok(Json(json!({
        "app_id": s.id,
        "title": s.title,
        "description": s.description,
        "category": s.catalog.category,
        "tags": s.catalog.tags,
        "license": s.catalog.license,
        "license_type": s.catalog.license.as_deref().map(license_type),
        "kind": s.kind,
        "streaming": s.streaming,
        "endpoints": endpoints,
        "pricing": crate::billing::pricing_json(&gw, s),
        "billing": s.billing,
        "runners": runners,
        "scaling": gw.fleet.knobs(&s.id),
        "openapi_url": format!("{root}/{}/openapi.json", s.id),
        "llms_txt_url": format!("{root}/{}/llms.txt", s.id),
    })))
}

/// A short description of a schema's top-level fields, one Markdown list item each.
fn fields(schema: &Value) -> String {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = String::new();
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, p) in props {
            let ty = match p.get("type") {
                Some(Value::String(t)) => t.clone(),
                Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" | "),
                _ if p.get("enum").is_some() => "enum".into(),
                _ => "any".into(),
            };
            let mut line =
                format!("- `{name}` ({ty}{})", if required.contains(&name.as_str()) { ", required" } else { "" });
            if let Some(e) = p.get("enum").and_then(Value::as_array) {
                let vals: Vec<String> = e.iter().map(|v| v.to_string()).collect();
                line.push_str(&format!(", one of {}", vals.join(", ")));
            }
            if let Some(d) = p.get("default") {
                line.push_str(&format!(", default {d}"));
            }
            if let Some(d) = p.get("description").and_then(Value::as_str) {
                line.push_str(&format!(": {}", d.replace('\n', " ")));
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    if out.is_empty() {
        out.push_str("- (no fields)\n");
    }
    out
}

/// `GET /{owner}/{alias}/llms.txt`: the app for a coding assistant, in Markdown.
async fn llms_txt(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    routed: Routed,
    Path((owner, alias)): Path<(String, String)>,
) -> ApiResult<Response> {
    gw.authenticate(&headers).await?;
    let a = find_app(&gw, &owner, &alias)?;
    let s = &a.spec;
    let run_base = base_url(&gw, &headers, &routed, "run");
    let queue_base = base_url(&gw, &headers, &routed, "queue");
    let root = run_base.trim_end_matches("/run").to_string();
    let p = gw.cfg.prices.prices(&s.id);
    let cur = &gw.cfg.prices.currency;
    let mut t = format!("# {}\n\n> {}\n\n", s.title, s.description.replace('\n', " "));
    t.push_str(&format!(
        "- Model ID: `{}`\n- Category: {}\n",
        s.id,
        if s.catalog.category.is_empty() { "-" } else { &s.catalog.category }
    ));
    if !s.catalog.tags.is_empty() {
        t.push_str(&format!("- Tags: {}\n", s.catalog.tags.join(", ")));
    }
    t.push_str(&format!("- License of the weights: {}\n", s.catalog.license.as_deref().unwrap_or("none (no weights)")));
    t.push_str(&format!(
        "- Pricing: {} {cur} per {}{}\n",
        p.unit_price,
        s.billing.unit.as_str().replace('_', " "),
        if p.runner_second_price > 0.0 {
            format!(" plus {} {cur} per runner-second", p.runner_second_price)
        } else {
            String::new()
        }
    ));
    t.push_str(&format!("- OpenAPI: {root}/{}/openapi.json\n\n", s.id));
    t.push_str(
        "## Calling it\n\nAuthenticate with `Authorization: Key $FAL_KEY`. The official fal clients work unchanged \
                when pointed at this server.\n\n",
    );
    for path in &s.paths {
        let id = endpoint_id(&s.id, path);
        t.push_str(&format!(
            "### `{id}`\n\n- Queue: `POST {queue_base}/{id}` then poll the returned `status_url` and \
                             fetch `response_url`\n- Synchronous: `POST {run_base}/{id}`\n"
        ));
        if s.streaming {
            t.push_str(&format!("- Streaming (server-sent events): `POST {run_base}/{id}/stream`\n"));
        }
        t.push_str("\nInput:\n\n");
        t.push_str(&fields(&s.input_schema));
        t.push_str("\nOutput:\n\n");
        t.push_str(&fields(&s.output_schema));
        for e in s.catalog.examples.iter().filter(|e| e.path == *path) {
            t.push_str(&format!(
                "\nExample: {}\n\n```python\nimport fal_client\nresult = fal_client.subscribe(\"{id}\", arguments={})\n```\n",
                e.title,
                serde_json::to_string(&e.input).unwrap_or_default()
            ));
        }
        t.push('\n');
    }
    Ok(([("content-type", "text/markdown; charset=utf-8")], t).into_response())
}
