//! The router: path prefixes (`/run`, `/queue`, `/rest`, `/cdn`) and fal's hosts (`fal.run`, `queue.fal.run`,
//! `rest.fal.ai`, `v3.fal.media`) mapped onto them; request ids, CORS, panics and body limits for every route.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use darkroom_core::ErrorType;
use serde_json::{Value, json};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use crate::Gateway;
use crate::error::err;

/// Which fal host the request was addressed to, when it came by `Host` rather than by path prefix.
#[derive(Debug, Clone, Default)]
pub struct Routed {
    pub host: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Routed {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Routed>().cloned().unwrap_or_default())
    }
}

/// fal's host names and the prefix each maps to.
pub const FAL_HOSTS: &[(&str, &str)] = &[
    ("fal.run", "/run"),
    ("queue.fal.run", "/queue"),
    ("rest.fal.ai", "/rest"),
    ("v3.fal.media", "/cdn"),
    ("ws.fal.run", "/ws"),
];

pub fn request_id_header(id: &str) -> HeaderValue {
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A JSON response with `x-fal-request-id`.
pub fn json_response(status: StatusCode, body: &Value, request_id: Option<&str>) -> Response {
    let mut r = (status, Json(body)).into_response();
    if let Some(id) = request_id {
        r.headers_mut().insert("x-fal-request-id", request_id_header(id));
    }
    r
}

/// The absolute base URL for a role's URLs (`…/queue`), as the caller can reach it.
pub fn base_url(gw: &Gateway, headers: &HeaderMap, routed: &Routed, role: &str) -> String {
    if let Some(host) = &routed.host {
        return format!("https://{host}");
    }
    if let Some(u) = &gw.cfg.public_url {
        return format!("{}/{role}", u.as_str().trim_end_matches('/'));
    }
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    let scheme = if gw.cfg.tls { "https" } else { "http" };
    format!("{scheme}://{host}/{role}")
}

async fn host_routing(mut req: Request, next: Next) -> Response {
    // HTTP/2 carries the host as the URI authority, not a Host header: give handlers one place to look.
    if !req.headers().contains_key("host")
        && let Some(v) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert("host", v);
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(|h| h.split(':').next().unwrap_or(h).to_ascii_lowercase());
    if let Some(host) = host
        && let Some((name, prefix)) = FAL_HOSTS.iter().find(|(n, _)| *n == host)
    {
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if let Ok(uri) = format!("{prefix}{pq}").parse() {
            *req.uri_mut() = uri;
            req.extensions_mut().insert(Routed { host: Some(name.to_string()) });
        }
    }
    next.run(req).await
}

async fn request_ids(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = next.run(req).await;
    if !resp.headers().contains_key("x-fal-request-id") {
        let id = uuid::Uuid::now_v7().to_string();
        resp.headers_mut().insert("x-fal-request-id", request_id_header(&id));
    }
    let id = resp.headers().get("x-fal-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
    tracing::debug!(%method, %path, status = resp.status().as_u16(), request_id = %id, "request");
    resp
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    err(ErrorType::InternalError, "Internal server error").into_response()
}

async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"status": "ok", "boot_id": gw.boot_id, "version": env!("CARGO_PKG_VERSION")}),
        None,
    )
}

async fn metrics_text() -> Response {
    ([("content-type", "text/plain; version=0.0.4")], crate::metrics::render()).into_response()
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    // `/{owner}/{alias}/openapi.json` at the root as well as under /run and /queue.
    err(ErrorType::NotFound, format!("No route for {} {}", req.method(), path.escape_default())).into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    err(
        ErrorType::MethodNotAllowed,
        format!("{} is not allowed on {}", req.method(), req.uri().path().escape_default()),
    )
    .into_response()
}

/// With `--no-auth`, any web page the local user opens could call the API (or reach it by DNS rebinding): only
/// loopback host names are served, and CORS stays off.
async fn loopback_hosts_only(req: Request, next: Next) -> Response {
    let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    let ok =
        name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !ok {
        return err(ErrorType::Forbidden, "With --no-auth only loopback host names are served").into_response();
    }
    next.run(req).await
}

/// The complete HTTP service.
pub fn router(gw: Arc<Gateway>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods(AllowMethods::mirror_request())
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            "x-fal-request-id".parse().unwrap(),
            "x-fal-error-type".parse().unwrap(),
            "x-fal-request-timeout-type".parse().unwrap(),
        ])
        .max_age(std::time::Duration::from_secs(600));
    let gw_no_auth = gw.cfg.no_auth;
    let inner = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(crate::openapi::platform_openapi))
        .route("/internal/runner/connect", get(crate::hub::connect))
        .route("/internal/streams/{id}", axum::routing::post(crate::cluster::receive_partial))
        .route("/run/{*rest}", any(crate::run::handle))
        .route("/rest/tokens", axum::routing::post(crate::realtime::create_token))
        .route("/rest/tokens/", axum::routing::post(crate::realtime::create_token))
        .route("/queue/{*rest}", any(crate::queue::handle))
        .route("/api/fal/proxy", any(crate::proxy::handle))
        .route("/{owner}/{alias}/openapi.json", get(crate::openapi::root_app_openapi))
        .merge(crate::admin::router())
        .merge(crate::deploy::router())
        .merge(crate::webhooks::router())
        .merge(crate::files::router())
        .merge(crate::catalog::router())
        .route_service("/mcp", crate::mcp::http_service(gw.clone()))
        .merge(crate::billing::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(gw.cfg.body_limit))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), crate::realtime::intercept))
        .with_state(gw);
    let no_auth = gw_no_auth;
    let mut outer = Router::new().fallback_service(inner).layer(axum::middleware::from_fn(host_routing));
    if no_auth {
        outer = outer.layer(axum::middleware::from_fn(loopback_hosts_only));
    } else {
        outer = outer.layer(cors);
    }
    outer
        .layer(axum::middleware::from_fn(request_ids))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
}
