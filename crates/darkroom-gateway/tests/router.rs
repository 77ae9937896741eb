//! Router tests through `tower::ServiceExt::oneshot`: an in-process gateway on a real SQLite store, no runners.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use darkroom_core::SystemClock;
use darkroom_core::auth::Scope;
use darkroom_gateway::{Gateway, GatewayConfig};
use darkroom_store::sqlite::{Durability, SqliteStore};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

const APP: &str = "darkroom/diagnostics";

struct T {
    gw: Arc<Gateway>,
    key: String,
    _dir: tempfile::TempDir,
}

async fn gateway() -> T {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db"), Durability::Normal).await.unwrap());
    let cfg = GatewayConfig { server_secret: b"0123456789abcdef0123456789abcdef".to_vec(), ..Default::default() };
    let gw = Gateway::new(cfg, store, Arc::new(SystemClock), darkroom_models::builtin_specs()).await.unwrap();
    let (_, key) = gw.create_key("owner-a", Scope::Client, "t").await.unwrap();
    T { gw, key: format!("Key {key}"), _dir: dir }
}

impl T {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut b = Request::builder().method(method).uri(uri).header("authorization", &self.key);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self.gw.router().oneshot(b.body(Body::from(body.to_string())).unwrap()).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        assert!(headers.contains_key("x-fal-request-id"), "{method} {uri}: no x-fal-request-id");
        (status, headers, v)
    }
}

#[tokio::test]
async fn submit_then_status_in_queue_with_positions_and_priorities() {
    let t = gateway().await;
    let (s, h, first) = t.call("POST", &format!("/queue/{APP}"), &[("host", "127.0.0.1:9")], "{}").await;
    assert_eq!(s, 200);
    let id = first["request_id"].as_str().unwrap();
    assert_eq!(h["x-fal-request-id"], id);
    assert_eq!(first["queue_position"], 0);
    assert_eq!(first["status_url"], format!("http://127.0.0.1:9/queue/{APP}/requests/{id}/status"));
    let (_, _, second) = t.call("POST", &format!("/queue/{APP}"), &[], "{}").await;
    assert_eq!(second["queue_position"], 1);
    let (_, _, low) = t.call("POST", &format!("/queue/{APP}"), &[("x-fal-queue-priority", "low")], "{}").await;
    let (_, _, normal) = t.call("POST", &format!("/queue/{APP}"), &[("x-fal-queue-priority", "normal")], "{}").await;
    let low_id = low["request_id"].as_str().unwrap();
    let (s, _, st) = t.call("GET", &format!("/queue/{APP}/requests/{low_id}/status?logs=true"), &[], "").await;
    assert_eq!(s, 202);
    assert_eq!(st["status"], "IN_QUEUE");
    assert_eq!(st["queue_position"], 3, "low priority waits behind every normal request: {st}");
    assert_eq!(normal["queue_position"], 2);
    // Result before completion: 400 with a JSON detail.
    let (s, _, r) = t.call("GET", &format!("/queue/{APP}/requests/{low_id}/"), &[], "").await;
    assert_eq!((s.as_u16(), r["error_type"].as_str()), (400, Some("request_not_completed")));
    // Cancelling a queued request moves everyone behind it up.
    let (s, _, _) = t.call("PUT", &format!("/queue/{APP}/requests/{id}/cancel"), &[], "").await;
    assert_eq!(s, 202);
    let sid = second["request_id"].as_str().unwrap();
    let (_, _, st) = t.call("GET", &format!("/queue/{APP}/requests/{sid}/status"), &[], "").await;
    assert_eq!(st["queue_position"], 0);
    let (s, _, st) = t.call("GET", &format!("/queue/{APP}/requests/{id}/status"), &[], "").await;
    assert_eq!(s, 200);
    assert_eq!(st["status"], "COMPLETED");
    assert_eq!(st["error_type"], "request_cancelled");
    assert!(st.get("logs").is_some());
}

#[tokio::test]
async fn namespaces_paths_and_hosts() {
    let t = gateway().await;
    // Namespaced and unknown apps are 404; the reserved `requests` segment is never an endpoint path.
    let (s, _, v) = t.call("POST", "/queue/workflows/me/wf/sub", &[], "{}").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (404, Some("app_not_found")));
    let (s, _, v) = t.call("POST", &format!("/queue/{APP}/requests"), &[], "{}").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (404, Some("not_found")));
    // By Host: queue.fal.run and fal.run map to the queue and run prefixes.
    let (s, _, v) = t.call("POST", &format!("/{APP}"), &[("host", "queue.fal.run")], "{}").await;
    assert_eq!(s, 200);
    assert!(v["response_url"].as_str().unwrap().starts_with("https://queue.fal.run/darkroom/diagnostics/requests/"));
    // A public URL wins for absolute URLs.
    let (s, _, v) = t.call("GET", &format!("/{APP}/openapi.json"), &[], "").await;
    assert_eq!(s, 200);
    assert_eq!(v["info"]["x-darkroom-app-id"], APP);
    let (s, _, _) = t.call("GET", &format!("/queue/{APP}/openapi.json"), &[], "").await;
    assert_eq!(s, 200);
    // Proxy protocol to the queue host, including a status URL with a query.
    let (s, _, v) =
        t.call("POST", "/api/fal/proxy", &[("x-fal-target-url", &format!("https://queue.fal.run/{APP}"))], "{}").await;
    assert_eq!(s, 200);
    let id = v["request_id"].as_str().unwrap().to_string();
    let target = format!("https://queue.fal.run/{APP}/requests/{id}/status?logs=0");
    let (s, _, v) = t.call("GET", "/api/fal/proxy", &[("x-fal-target-url", &target)], "").await;
    assert_eq!((s.as_u16(), v["status"].as_str()), (202, Some("IN_QUEUE")));
    let (s, _, v) = t.call("GET", "/api/fal/proxy", &[], "").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (400, Some("proxy_target_invalid")));
    // The proxy never reaches the platform API, whatever Host the caller claims.
    for (host, target) in [("x.example", "http://x.example/v1/requests"), ("127.0.0.1", "http://127.0.0.1/v1/keys")] {
        let (s, _, v) = t.call("GET", "/api/fal/proxy", &[("host", host), ("x-fal-target-url", target)], "").await;
        assert_eq!((s.as_u16(), v["error_type"].as_str()), (400, Some("proxy_target_invalid")), "{target}");
    }
    // Dot segments are resolved inside the fal host's own API: an unknown app there, never /v1.
    let (s, _, v) = t.call("GET", "/api/fal/proxy", &[("x-fal-target-url", "https://fal.run/../v1/keys")], "").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (404, Some("app_not_found")));
}

#[tokio::test]
async fn framework_rejections_are_typed_json() {
    let t = gateway().await;
    let (s, _, v) = t.call("DELETE", "/v1/apps", &[], "").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (405, Some("method_not_allowed")));
    let (s, _, v) = t.call("GET", "/v1/requests?limit=lots", &[], "").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (400, Some("invalid_request")));
    let (s, _, v) = t.call("GET", "/internal/runner/connect", &[], "").await;
    assert_eq!(s, 401, "a runner endpoint without a runner token: {v}");
    assert_eq!(v["error_type"], "runner_token_invalid");
    let (s, _, v) = t.call("POST", "/v1/keys", &[], "{}").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (403, Some("forbidden")));
    let big = format!("{{\"echo\": \"{}\"}}", "x".repeat(33 * 1024 * 1024));
    let (s, _, v) = t.call("POST", &format!("/queue/{APP}"), &[], &big).await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (413, Some("payload_too_large")));
}

#[tokio::test]
async fn malformed_input_never_panics_or_500s() {
    let t = gateway().await;
    let paths = [
        "/queue/",
        "/queue//",
        "/queue/a",
        "/queue/a/b/requests/",
        "/queue/a/b/requests/%00/status",
        "/queue/%2e%2e/x",
        "/queue/a/b/requests/00000000-0000-0000-0000-000000000000/status/stream/extra",
        "/run/",
        "/run/a//b",
        "/queue/workflows",
        "/queue/comfy/x",
        "/run/a/b/stream/stream",
        "/queue/a/b?fal_webhook=notaurl",
        "/v1/keys/%ff",
        "/queue/%ff/x",
        "/run/a/%c3",
        "/queue/a/b/requests/../../etc/passwd",
    ];
    let headers: [&[(&str, &str)]; 4] =
        [&[], &[("x-fal-request-timeout", "-1")], &[("x-fal-queue-priority", "🔥")], &[("authorization", "Key \u{0}")]];
    for p in paths {
        for m in ["GET", "POST", "PUT", "DELETE"] {
            for h in headers {
                let Ok(req) = Request::builder().method(m).uri(p).header("authorization", &t.key).body(Body::from("{"))
                else {
                    continue;
                };
                let mut req = req;
                for (k, v) in h {
                    if let Ok(v) = axum::http::HeaderValue::from_bytes(v.as_bytes()) {
                        req.headers_mut().insert(*k, v);
                    }
                }
                let resp = t.gw.router().oneshot(req).await.unwrap();
                let st = resp.status();
                let typed = resp.headers().contains_key("x-fal-error-type");
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let body = String::from_utf8_lossy(&body);
                assert!(st.is_client_error(), "{m} {p} {h:?}: {st} {body}");
                assert!(typed, "{m} {p} {h:?}: untyped error {st} {body}");
            }
        }
    }
}

#[tokio::test]
async fn public_url_sets_the_absolute_urls() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db"), Durability::Normal).await.unwrap());
    let cfg = GatewayConfig {
        server_secret: b"0123456789abcdef0123456789abcdef".to_vec(),
        public_url: Some("https://darkroom.example.com/api/".parse().unwrap()),
        ..Default::default()
    };
    let gw = Gateway::new(cfg, store, Arc::new(SystemClock), darkroom_models::builtin_specs()).await.unwrap();
    let (_, key) = gw.create_key("o", Scope::Client, "t").await.unwrap();
    let t = T { gw, key: format!("Key {key}"), _dir: dir };
    let (s, _, v) = t.call("POST", &format!("/queue/{APP}"), &[("host", "10.0.0.1:8080")], "{}").await;
    assert_eq!(s, 200);
    let id = v["request_id"].as_str().unwrap();
    assert_eq!(v["response_url"], format!("https://darkroom.example.com/api/queue/{APP}/requests/{id}"));
}

#[tokio::test]
async fn queue_limits_answer_429_with_retry_after() {
    let t = gateway().await;
    let (s, _, _) = t.call("POST", &format!("/queue/{APP}?fal_max_queue_length=1"), &[], "{}").await;
    assert_eq!(s, 200);
    let (s, h, v) = t.call("POST", &format!("/queue/{APP}?fal_max_queue_length=1"), &[], "{}").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (429, Some("queue_full")));
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["x-fal-error-type"], "queue_full");
    let (s, _, _) = t.call("POST", &format!("/queue/{APP}?fal_max_queue_length=5"), &[], "{}").await;
    assert_eq!(s, 200, "another request may allow a longer queue");
    let (s, _, v) = t.call("POST", &format!("/queue/{APP}?fal_max_queue_length=-3"), &[], "{}").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (400, Some("invalid_request")));
}

#[tokio::test]
async fn idempotency_key_returns_the_same_request() {
    let t = gateway().await;
    let key = [("idempotency-key", "order-42")];
    let (s1, _, a) = t.call("POST", &format!("/queue/{APP}"), &key, r#"{"echo": 1}"#).await;
    let (s2, h2, b) = t.call("POST", &format!("/queue/{APP}"), &key, r#"{"echo": 1}"#).await;
    assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200));
    assert_eq!(a["request_id"], b["request_id"], "a client retry gets the first request back");
    assert_eq!(h2["x-fal-request-id"], a["request_id"].as_str().unwrap());
    let (_, _, list) = t.call("GET", "/v1/requests", &[], "").await;
    assert_eq!(list["requests"].as_array().unwrap().len(), 1, "enqueued once");
    let (s, _, v) = t.call("POST", &format!("/queue/{APP}"), &key, r#"{"echo": 2}"#).await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (422, Some("idempotency_key_reused")));
    let (_, _, c) =
        t.call("POST", &format!("/queue/{APP}"), &[("idempotency-key", "order-43")], r#"{"echo": 1}"#).await;
    assert_ne!(c["request_id"], a["request_id"]);
}

#[tokio::test]
async fn retention_deletes_old_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db"), Durability::Normal).await.unwrap());
    let cfg = GatewayConfig {
        server_secret: b"0123456789abcdef0123456789abcdef".to_vec(),
        retention: Some(std::time::Duration::from_millis(1)),
        ..Default::default()
    };
    let gw = Gateway::new(cfg, store, Arc::new(SystemClock), darkroom_models::builtin_specs()).await.unwrap();
    let (_, key) = gw.create_key("o", Scope::Client, "t").await.unwrap();
    let t = T { gw: gw.clone(), key: format!("Key {key}"), _dir: dir };
    let (_, _, v) = t.call("POST", &format!("/queue/{APP}"), &[], r#"{"echo": "old"}"#).await;
    let id = v["request_id"].as_str().unwrap().to_string();
    t.call("PUT", &format!("/queue/{APP}/requests/{id}/cancel"), &[], "").await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    tokio::spawn(gw.clone().run_sweeper());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (s, _, v) = t.call("GET", &format!("/queue/{APP}/requests/{id}"), &[], "").await;
        if s == 410 {
            assert_eq!(v["error_type"], "request_payload_deleted");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "retention never ran: {s} {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gw.shutdown.cancel();
}

async fn gateway_with(cfg: GatewayConfig) -> T {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db"), Durability::Normal).await.unwrap());
    let cfg = GatewayConfig { server_secret: b"0123456789abcdef0123456789abcdef".to_vec(), ..cfg };
    let gw = Gateway::new(cfg, store, Arc::new(SystemClock), darkroom_models::builtin_specs()).await.unwrap();
    let (_, key) = gw.create_key("o", Scope::Client, "t").await.unwrap();
    T { gw, key: format!("Key {key}"), _dir: dir }
}

#[tokio::test]
async fn per_key_concurrency_and_rate_limits() {
    let t = gateway_with(GatewayConfig { max_concurrent_per_key: 2, ..Default::default() }).await;
    for _ in 0..2 {
        assert_eq!(t.call("POST", &format!("/queue/{APP}"), &[], "{}").await.0, 200);
    }
    let (s, h, v) = t.call("POST", &format!("/queue/{APP}"), &[], "{}").await;
    assert_eq!((s.as_u16(), v["error_type"].as_str()), (429, Some("concurrency_limit")));
    assert!(h.contains_key("retry-after"));
    // Another key of the same owner has its own allowance.
    let (_, other) = t.gw.create_key("o", Scope::Client, "u").await.unwrap();
    let other = T { gw: t.gw.clone(), key: format!("Key {other}"), _dir: tempfile::tempdir().unwrap() };
    assert_eq!(other.call("POST", &format!("/queue/{APP}"), &[], "{}").await.0, 200);

    let t = gateway_with(GatewayConfig { rate_limit_per_key: 3.0, ..Default::default() }).await;
    let mut codes = Vec::new();
    let mut retry = None;
    for _ in 0..5 {
        let (s, h, _) = t.call("POST", &format!("/queue/{APP}"), &[], "{}").await;
        codes.push(s.as_u16());
        if s == 429 {
            retry = h.get("retry-after").cloned();
        }
    }
    assert_eq!(codes, [200, 200, 200, 429, 429], "a burst of the rate, then 429");
    assert_eq!(retry.unwrap(), "1");
    // Status polls are not rate limited.
    let (_, _, list) = t.call("GET", "/v1/requests", &[], "").await;
    let id = list["requests"][0]["request_id"].as_str().unwrap().to_string();
    for _ in 0..10 {
        assert_eq!(t.call("GET", &format!("/queue/{APP}/requests/{id}/status"), &[], "").await.0, 202);
    }
}
