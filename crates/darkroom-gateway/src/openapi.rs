//! OpenAPI documents: each app's (from its JSON Schemas) and the platform API's.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use darkroom_core::ErrorType;
use darkroom_core::ids::AppRef;
use serde_json::{Map, Value, json};

use crate::Gateway;
use crate::error::{ApiResult, err};
use crate::http::json_response;

/// Moves a schema's `$defs` into `components.schemas` and rewrites its references.
fn hoist(schema: &Value, defs: &mut Map<String, Value>) -> Value {
    let mut s = schema.clone();
    if let Some(obj) = s.as_object_mut() {
        obj.remove("$schema");
        if let Some(Value::Object(d)) = obj.remove("$defs") {
            for (k, v) in d {
                defs.insert(k, v);
            }
        }
    }
    fn rewrite(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get_mut("$ref")
                    && let Some(rest) = r.strip_prefix("#/$defs/")
                {
                    *r = format!("#/components/schemas/{rest}");
                }
                m.values_mut().for_each(rewrite);
            }
            Value::Array(a) => a.iter_mut().for_each(rewrite),
            _ => {}
        }
    }
    rewrite(&mut s);
    for v in defs.values_mut() {
        rewrite(v);
    }
    s
}

fn error_schemas() -> Value {
    json!({
        "HTTPValidationError": {"type": "object", "properties": {
            "detail": {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}},
            "error_type": {"type": "string"}}},
        "ValidationError": {"type": "object", "required": ["loc", "msg", "type"], "properties": {
            "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"type": "string"}, "type": {"type": "string"}}},
        "Error": {"type": "object", "required": ["detail", "error_type"], "properties": {
            "detail": {}, "error_type": {"type": "string"}}},
    })
}

/// `/{owner}/{alias}/openapi.json`.
pub fn app_openapi(gw: &Gateway, app: &AppRef) -> ApiResult<Response> {
    match app_openapi_doc(gw, &app.id()) {
        Some(doc) => Ok(json_response(StatusCode::OK, &doc, None)),
        None => Err(err(ErrorType::AppNotFound, format!("App '{}' not found", app.id()))),
    }
}

/// An endpoint's input and output schemas: a deployed fal app's own (from its OpenAPI, self-contained with
/// `$defs`), else the app's.
pub fn endpoint_schemas(gw: &Gateway, spec: &darkroom_core::app::AppSpec, path: &str) -> (Value, Value) {
    let own = (spec.input_schema.clone(), spec.output_schema.clone());
    let Some(d) = gw.deployments.get(&spec.id) else { return own };
    let Ok(m) = serde_json::from_str::<Value>(&d.manifest) else { return own };
    let doc = &m["fal"]["openapi"];
    let op = &doc["paths"][format!("/{path}")]["post"];
    if !op.is_object() {
        return own;
    }
    let defs = doc["components"]["schemas"].clone();
    let standalone = |s: &Value| -> Value {
        if s.is_null() {
            return json!({});
        }
        // `#/components/schemas/X` → `#/$defs/X`, with the components as `$defs`.
        let text = serde_json::to_string(s).unwrap_or_default().replace("#/components/schemas/", "#/$defs/");
        let mut v: Value = serde_json::from_str(&text).unwrap_or(json!({}));
        if let (Some(obj), Some(_)) = (v.as_object_mut(), defs.as_object()) {
            let defs_text =
                serde_json::to_string(&defs).unwrap_or_default().replace("#/components/schemas/", "#/$defs/");
            obj.insert("$defs".into(), serde_json::from_str(&defs_text).unwrap_or(json!({})));
        }
        v
    };
    let input = standalone(&op["requestBody"]["content"]["application/json"]["schema"]);
    let output = standalone(&op["responses"]["200"]["content"]["application/json"]["schema"]);
    (input, output)
}

/// An app's OpenAPI document; None for an unknown app.
pub fn app_openapi_doc(gw: &Gateway, app_id: &str) -> Option<Value> {
    let a = gw.apps.get(app_id)?;
    // A deployed fal app: its own document, read at deploy time.
    if let Some(d) = gw.deployments.get(app_id)
        && let Ok(m) = serde_json::from_str::<Value>(&d.manifest)
        && let Some(doc) = m["fal"]["openapi"].as_object()
    {
        let mut doc = Value::Object(doc.clone());
        doc["info"]["x-darkroom-app-id"] = json!(app_id);
        return Some(doc);
    }
    let mut defs = Map::new();
    let input = hoist(&a.spec.input_schema, &mut defs);
    let output = hoist(&a.spec.output_schema, &mut defs);
    defs.insert("Input".into(), input);
    defs.insert("Output".into(), output);
    if let Value::Object(e) = error_schemas() {
        defs.extend(e);
    }
    let mut paths = Map::new();
    for p in &a.spec.paths {
        let path = if p.is_empty() { "/".to_string() } else { format!("/{p}") };
        paths.insert(
            path,
            json!({"post": {
                "summary": a.spec.title, "description": a.spec.description,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Input"}}}},
                "responses": {
                    "200": {"description": "Output", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Output"}}}},
                    "422": {"description": "Validation error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}
                }
            }}),
        );
    }
    let doc = json!({
        "openapi": "3.1.0",
        "info": {"title": a.spec.title, "description": a.spec.description, "version": env!("CARGO_PKG_VERSION"),
                  "x-darkroom-app-id": a.spec.id},
        "paths": paths,
        "components": {"schemas": defs},
    });
    Some(doc)
}

pub async fn root_app_openapi(
    State(gw): State<Arc<Gateway>>,
    Path((owner, alias)): Path<(String, String)>,
) -> Response {
    match AppRef::parse(&format!("{owner}/{alias}")) {
        Ok(app) => app_openapi(&gw, &app).unwrap_or_else(|e| e.into_response()),
        Err(e) => crate::error::ApiErr(e).into_response(),
    }
}

/// `/openapi.json`: the platform API.
pub async fn platform_openapi() -> Response {
    let key = json!([{"falKey": []}]);
    let err_ref = json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let op = |summary: &str, desc: &str| json!({"summary": summary, "description": desc, "security": key, "responses": {"200": {"description": "OK"}, "default": err_ref}});
    let doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "Darkroom platform API", "version": env!("CARGO_PKG_VERSION"),
                  "description": "fal-compatible queue and run API, plus Darkroom's platform endpoints. Apps document their own input and output at /{owner}/{alias}/openapi.json."},
        "components": {
            "securitySchemes": {"falKey": {"type": "apiKey", "in": "header", "name": "Authorization", "description": "Key <key_id>:<secret>"}},
            "schemas": error_schemas(),
        },
        "paths": {
            "/queue/{app_id}": {"post": op("Submit a request", "Enqueues; answers request_id and the status, response and cancel URLs. Headers: X-Fal-Queue-Priority, X-Fal-Request-Timeout, X-Fal-Runner-Hint, x-fal-no-retry, X-Fal-Store-IO; query fal_webhook.")},
            "/queue/{app_id}/requests/{request_id}/status": {"get": op("Request status", "202 while IN_QUEUE or IN_PROGRESS, 200 when COMPLETED; ?logs=1 includes logs.")},
            "/queue/{app_id}/requests/{request_id}/status/stream": {"get": op("Status stream", "text/event-stream of status objects until COMPLETED.")},
            "/queue/{app_id}/requests/{request_id}": {"get": op("Result", "The output, or the failure's status and body.")},
            "/queue/{app_id}/requests/{request_id}/cancel": {"put": op("Cancel", "202 CANCELLATION_REQUESTED, 400 ALREADY_COMPLETED.")},
            "/run/{app_id}": {"post": op("Run synchronously", "Waits for the output; the request is cancelled if the client disconnects.")},
            "/run/{app_id}/stream": {"post": op("Stream", "text/event-stream of partial outputs, the final output last.")},
            "/api/fal/proxy": {"post": op("Proxy protocol", "The JS client's proxyUrl protocol: x-fal-target-url names the fal URL.")},
            "/v1/keys": {"get": op("List keys", "Admin: all keys; client: the owner's."), "post": op("Create a key", "Admin only. Body {name, scope: client|admin, owner_id}. The secret is shown once.")},
            "/v1/keys/{key_id}": {"delete": op("Revoke a key", "Admin only.")},
            "/v1/runner-tokens": {"post": op("Mint a runner token", "Admin only. Valid for this server boot. Body {app_id}.")},
            "/v1/runners": {"get": op("List runners", "Admin only. Connected runners and the fleet's starting and ended ones, with their state.")},
            "/v1/apps/{owner}/{alias}/scale": {
                "get": op("App scaling", "The knobs in effect, as deployed, and the run-time overrides."),
                "patch": op("Change scaling", "Admin only. Body: any of fal's knobs; kept across restarts until reset."),
                "delete": op("Reset scaling", "Admin only. Back to the knobs as deployed."),
            },
            "/v1/requests": {"get": op("List requests", "Owner-scoped, newest first. Query app_id, status, since and until (RFC 3339, epoch ms, or a duration ago like 2h), limit.")},
            "/v1/apps": {"get": op("List apps", "Every registered app.")},
            "/health": {"get": {"summary": "Health", "responses": {"200": {"description": "OK"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OK"}}}},
        }
    });
    json_response(StatusCode::OK, &doc, None)
}
