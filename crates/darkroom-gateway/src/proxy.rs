//! The JS client's proxy protocol (`proxyUrl`): the original method and body arrive at `/api/fal/proxy`, the
//! original URL in `x-fal-target-url`. The target must be one of fal's hosts (or this server); the request is
//! dispatched to the matching route here. Without an `Authorization` header (a browser), the configured proxy key
//! is used, or the request is refused.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use darkroom_core::ErrorType;
use tower::ServiceExt;

use crate::Gateway;
use crate::error::err;
use crate::http::FAL_HOSTS;

pub async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let Some(target) = req.headers().get("x-fal-target-url").and_then(|v| v.to_str().ok()) else {
        return err(ErrorType::ProxyTargetInvalid, "Missing the x-fal-target-url header").into_response();
    };
    let Ok(url) = url::Url::parse(target) else {
        return err(ErrorType::ProxyTargetInvalid, "x-fal-target-url is not a URL").into_response();
    };
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    // fal's hosts map to their routes; this server's public URL is accepted for the URLs it returned. The Host
    // header is the caller's to choose, so it is never trusted here.
    let (prefix, path) = if let Some((_, p)) = FAL_HOSTS.iter().find(|(h, _)| *h == host) {
        (*p, url.path().to_string())
    } else if gw.cfg.public_url.as_ref().and_then(|u| u.host_str()).is_some_and(|h| h.eq_ignore_ascii_case(&host)) {
        let base = gw.cfg.public_url.as_ref().map(|u| u.path().trim_end_matches('/').to_string()).unwrap_or_default();
        ("", url.path().strip_prefix(base.as_str()).unwrap_or(url.path()).to_string())
    } else {
        return err(
            ErrorType::ProxyTargetInvalid,
            format!("Proxy target host '{}' is not allowed", host.escape_default()),
        )
        .into_response();
    };
    // Only the fal API surfaces: never the platform API, whatever key the proxy would add.
    let full = format!("{prefix}{path}");
    if !["/run/", "/queue/", "/rest/", "/cdn/"].iter().any(|p| full.starts_with(p)) || full.contains("/../") {
        return err(ErrorType::ProxyTargetInvalid, "The proxy only forwards to the run, queue, rest and cdn APIs")
            .into_response();
    }
    let mut pq = full;
    if let Some(q) = url.query() {
        pq.push('?');
        pq.push_str(q);
    }
    let (mut parts, body) = req.into_parts();
    let Ok(uri) = pq.parse() else {
        return err(ErrorType::ProxyTargetInvalid, "x-fal-target-url has an invalid path").into_response();
    };
    parts.uri = uri;
    parts.headers.remove("x-fal-target-url");
    if !parts.headers.contains_key("authorization")
        && let Some(k) = &gw.cfg.proxy_key
        && let Ok(v) = HeaderValue::from_str(&format!("Key {k}"))
    {
        parts.headers.insert("authorization", v);
    }
    parts.extensions.remove::<crate::http::Routed>();
    let router = gw.router();
    match router.oneshot(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}
