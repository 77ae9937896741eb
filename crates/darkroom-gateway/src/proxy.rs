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
    let prefix = FAL_HOSTS.iter().find(|(h, _)| *h == host).map(|(_, p)| *p).or_else(|| {
        // This server's own URLs (e.g. status URLs it returned) are allowed too.
        let own = gw.cfg.public_url.as_ref().and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        let same = own.as_deref() == Some(host.as_str())
            || req
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(|h| h.split(':').next().unwrap_or(h).to_ascii_lowercase())
                == Some(host.clone());
        same.then_some("")
    });
    let Some(prefix) = prefix else {
        return err(
            ErrorType::ProxyTargetInvalid,
            format!("Proxy target host '{}' is not allowed", host.escape_default()),
        )
        .into_response();
    };
    let mut pq = format!("{prefix}{}", url.path());
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
