//! End-to-end tests against a real `darkroom serve` with real runner processes, on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{APP, Server};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_flow_status_logs_result_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    s.wait_runners(1).await;
    let sub = s.submit(json!({"echo": {"x": [1, "é"]}, "logs": ["first", "second"], "sleep_ms": 100})).await;
    let id = sub["request_id"].as_str().unwrap();
    assert_eq!(sub["gateway_request_id"], sub["request_id"]);
    assert_eq!(sub["status"], "IN_QUEUE");
    assert!(sub["queue_position"].is_u64());
    for k in ["response_url", "status_url", "cancel_url"] {
        assert!(sub[k].as_str().unwrap().starts_with(&format!("{}/queue/{APP}/requests/{id}", s.url)), "{k}: {sub}");
    }
    let (code, out) = s.result(id).await;
    assert_eq!(code, 200);
    assert_eq!(out, json!({"echo": {"x": [1, "é"]}, "attempt": 1}));
    let st = s.status(id).await;
    assert_eq!(st["status"], "COMPLETED");
    let logs: Vec<_> = st["logs"].as_array().unwrap().iter().map(|l| l["message"].as_str().unwrap()).collect();
    assert_eq!(logs, ["first", "second"]);
    assert_eq!(st["logs"][0]["level"], "INFO");
    assert!(st["metrics"]["inference_time"].as_f64().unwrap() >= 0.1);
    // Without logs=1 the key is there but null.
    let r = s
        .http
        .get(format!("{}/queue/{APP}/requests/{id}/status/", s.url))
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-fal-request-id"));
    let v: Value = r.json().await.unwrap();
    assert!(v.get("logs").is_some_and(Value::is_null));

    // Cancel a queued-or-running request; it completes as request_cancelled and its result is a 4xx.
    let long = s.submit(json!({"sleep_ms": 60_000})).await;
    let lid = long["request_id"].as_str().unwrap();
    s.wait_status(lid, "IN_PROGRESS").await;
    let r = s.http.put(long["cancel_url"].as_str().unwrap()).header("authorization", s.auth()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "CANCELLATION_REQUESTED");
    let st = s.wait_status(lid, "COMPLETED").await;
    assert_eq!(st["error_type"], "request_cancelled");
    let (code, body) = s.result(lid).await;
    assert!((400..500).contains(&code), "{code}");
    assert_eq!(body["error_type"], "request_cancelled");
    let r = s.http.put(long["cancel_url"].as_str().unwrap()).header("authorization", s.auth()).send().await.unwrap();
    assert_eq!(r.status(), 200, "2xx, as the clients expect");
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ALREADY_COMPLETED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_run_stream_host_routing_and_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    s.wait_runners(1).await;
    let r = s
        .http
        .post(format!("{}/run/{APP}", s.url))
        .header("authorization", s.auth())
        .json(&json!({"echo": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-fal-request-id"));
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"echo": 7, "attempt": 1}));

    let r = s
        .http
        .post(format!("{}/run/{APP}/stream", s.url))
        .header("authorization", s.auth())
        .json(&json!({"echo": "ü", "parts": 3, "sleep_ms": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    assert!(text.is_ascii(), "SSE JSON must be ASCII: {text}");
    let events: Vec<Value> =
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(
        events,
        vec![json!({"part": 0}), json!({"part": 1}), json!({"part": 2}), json!({"echo": "ü", "attempt": 1})]
    );

    // A failing stream before its first event is a JSON error with the app's status.
    let r = s
        .http
        .post(format!("{}/run/{APP}/stream", s.url))
        .header("authorization", s.auth())
        .json(&json!({"fail": {"status": 418, "message": "teapot"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 418);
    assert_eq!(r.json::<Value>().await.unwrap()["detail"], "teapot");

    // Host-based routing: fal's own host names on the same port.
    let r = s
        .http
        .post(format!("{}/{APP}", s.url))
        .header("host", "queue.fal.run")
        .header("authorization", s.auth())
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["status_url"].as_str().unwrap().starts_with("https://queue.fal.run/darkroom/diagnostics/requests/"),
        "{v}"
    );

    // The proxy protocol: original URL in x-fal-target-url.
    let r = s
        .http
        .post(format!("{}/api/fal/proxy", s.url))
        .header("x-fal-target-url", format!("https://fal.run/{APP}"))
        .header("authorization", s.auth())
        .json(&json!({"echo": "proxied"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["echo"], "proxied");
    let r = s
        .http
        .post(format!("{}/api/fal/proxy", s.url))
        .header("x-fal-target-url", "https://evil.example/x")
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error_type"], "proxy_target_invalid");
    // CORS preflight for the browser path.
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/api/fal/proxy", s.url))
        .header("origin", "http://localhost:5173")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "x-fal-target-url,content-type")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(r.headers()["access-control-allow-origin"], "http://localhost:5173");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_clear_and_typed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let post = |path: &str, auth: Option<&str>, body: &'static str| {
        let mut rb = s.http.post(format!("{}{path}", s.url)).header("content-type", "application/json").body(body);
        if let Some(a) = auth {
            rb = rb.header("authorization", a.to_string());
        }
        rb
    };
    let check = |r: reqwest::Response, code: u16, t: &'static str| async move {
        assert_eq!(r.status().as_u16(), code);
        assert!(r.headers().contains_key("x-fal-request-id"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error_type"], t, "{v}");
        v
    };
    let a = s.auth();
    check(post(&format!("/queue/{APP}"), None, "{}").send().await.unwrap(), 401, "unauthorized").await;
    check(post(&format!("/queue/{APP}"), Some("Key nope:nope"), "{}").send().await.unwrap(), 401, "unauthorized").await;
    check(post(&format!("/queue/{APP}"), Some("Basic abc"), "{}").send().await.unwrap(), 401, "unauthorized").await;
    check(post("/queue/nobody/nothing", Some(&a), "{}").send().await.unwrap(), 404, "app_not_found").await;
    check(post(&format!("/queue/{APP}/nopath"), Some(&a), "{}").send().await.unwrap(), 404, "endpoint_not_found").await;
    check(post("/queue/justone", Some(&a), "{}").send().await.unwrap(), 400, "invalid_request").await;
    let v = check(post(&format!("/queue/{APP}"), Some(&a), "{not json").send().await.unwrap(), 422, "validation_error")
        .await;
    assert_eq!(v["detail"][0]["loc"], json!(["body"]));
    let v = check(
        post(&format!("/queue/{APP}"), Some(&a), r#"{"sleep_ms": "x", "fail": {"status": 200}}"#).send().await.unwrap(),
        422,
        "validation_error",
    )
    .await;
    let locs: Vec<Value> = v["detail"].as_array().unwrap().iter().map(|d| d["loc"].clone()).collect();
    assert!(locs.contains(&json!(["body", "sleep_ms"])) && locs.contains(&json!(["body", "fail", "status"])), "{v}");
    check(
        post(&format!("/queue/{APP}"), Some(&a), "{}").header("x-fal-queue-priority", "urgent").send().await.unwrap(),
        400,
        "invalid_request",
    )
    .await;
    check(
        post(&format!("/queue/{APP}"), Some(&a), "{}").header("x-fal-request-timeout", "soon").send().await.unwrap(),
        400,
        "invalid_request",
    )
    .await;
    let r = s
        .http
        .get(format!("{}/queue/{APP}/requests/not-a-uuid/status", s.url))
        .header("authorization", &a)
        .send()
        .await
        .unwrap();
    check(r, 400, "invalid_request").await;
    let r = s
        .http
        .get(format!("{}/queue/{APP}/requests/01a1fcbe-670e-7330-8662-3b6101740f05", s.url))
        .header("authorization", &a)
        .send()
        .await
        .unwrap();
    check(r, 404, "request_not_found").await;
    let r = s.http.delete(format!("{}/queue/{APP}", s.url)).header("authorization", &a).send().await.unwrap();
    check(r, 405, "method_not_allowed").await;
    let r = s.http.get(format!("{}/nowhere", s.url)).send().await.unwrap();
    check(r, 404, "not_found").await;

    // Owners and scopes: a client key of another owner sees nothing of ours and cannot manage keys.
    let other = s.post_json("/v1/keys", json!({"name": "other", "scope": "client", "owner_id": "team-b"})).await;
    let other_key = format!("Key {}", other["key"].as_str().unwrap());
    let mine = s.submit(json!({})).await;
    let r = s.http.get(mine["status_url"].as_str().unwrap()).header("authorization", &other_key).send().await.unwrap();
    check(r, 404, "request_not_found").await;
    let r = s
        .http
        .post(format!("{}/v1/keys", s.url))
        .header("authorization", &other_key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    check(r, 403, "forbidden").await;
    // Revoked keys stop working at once.
    let r = s
        .http
        .delete(format!("{}/v1/keys/{}", s.url, other["key_id"].as_str().unwrap()))
        .header("authorization", &a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .http
        .post(format!("{}/queue/{APP}", s.url))
        .header("authorization", &other_key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    check(r, 401, "unauthorized").await;

    // Observability.
    let h: Value = s.http.get(format!("{}/health", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(h["status"], "ok");
    let m = s.http.get(format!("{}/metrics", s.url)).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("darkroom_requests_submitted_total"), "{m}");
    let o: Value = s.http.get(format!("{}/{APP}/openapi.json", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(o["openapi"], "3.1.0");
    assert!(o["components"]["schemas"]["Input"]["properties"]["sleep_ms"].is_object(), "{o}");
    assert!(!o.to_string().contains("#/$defs/"), "refs rewritten");
    let p: Value = s.http.get(format!("{}/openapi.json", s.url)).send().await.unwrap().json().await.unwrap();
    assert!(p["paths"]["/queue/{app_id}"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_503_unless_no_retry_and_start_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--max-attempts", "3"]);
    s.wait_runners(1).await;
    let sub = s.submit(json!({"fail": {"status": 503, "message": "busy"}})).await;
    let (code, body) = s.result(sub["request_id"].as_str().unwrap()).await;
    assert_eq!((code, body["attempt"].clone()), (503, json!(3)), "retried up to the limit: {body}");
    let sub = s.submit_with(json!({"fail": {"status": 503, "message": "busy"}}), &[("x-fal-no-retry", "1")]).await;
    let (code, body) = s.result(sub["request_id"].as_str().unwrap()).await;
    assert_eq!((code, body["attempt"].clone()), (503, json!(1)));
    let sub = s.submit(json!({"fail": {"status": 500, "message": "boom"}})).await;
    let st = s.wait_status(sub["request_id"].as_str().unwrap(), "COMPLETED").await;
    assert_eq!(st["error"], "boom");
    assert_eq!(st["error_type"], "app_error");
    drop(s);

    // With no runner, a start timeout expires: 504 with X-Fal-Request-Timeout-Type: user.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--no-local-runners"]);
    let sub = s.submit_with(json!({}), &[("x-fal-request-timeout", "1.5")]).await;
    let id = sub["request_id"].as_str().unwrap();
    s.wait_status(id, "COMPLETED").await;
    let r = s.http.get(sub["response_url"].as_str().unwrap()).header("authorization", s.auth()).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-fal-request-timeout-type"], "user");
    let r = s
        .http
        .post(format!("{}/run/{APP}", s.url))
        .header("authorization", s.auth())
        .header("x-fal-request-timeout", "1")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-fal-request-timeout-type"], "user");
    assert_eq!(r.json::<Value>().await.unwrap()["error_type"], "request_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    s.wait_runners(1).await;
    for path in [format!("/run/{APP}"), format!("/run/{APP}/stream")] {
        let body = if path.ends_with("stream") {
            json!({"parts": 2, "sleep_ms": 60_000})
        } else {
            json!({"sleep_ms": 60_000})
        };
        let fut = s.http.post(format!("{}{path}", s.url)).header("authorization", s.auth()).json(&body).send();
        // Give up on the request once it is running: the connection closes.
        let started = async {
            loop {
                let v: Value = s
                    .http
                    .get(format!("{}/v1/requests?status=IN_PROGRESS", s.url))
                    .header("authorization", s.auth())
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if let Some(r) = v["requests"].as_array().and_then(|a| a.first()) {
                    return r["request_id"].as_str().unwrap().to_string();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let id = tokio::select! {
            id = started => id,
            r = fut => panic!("returned early: {r:?}"),
        };
        let st = s.wait_status(&id, "COMPLETED").await;
        assert_eq!(st["error_type"], "request_cancelled", "{path}: {st}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_mid_job_reruns_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let runners = s.wait_runners(1).await;
    let pid = runners[0]["pid"].as_i64().unwrap() as i32;
    let sub = s.submit(json!({"echo": "again", "sleep_ms": 1500})).await;
    let id = sub["request_id"].as_str().unwrap();
    s.wait_status(id, "IN_PROGRESS").await;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (code, out) = s.result(id).await;
    assert_eq!(code, 200);
    assert_eq!(out, json!({"echo": "again", "attempt": 2}), "the job ran again on the restarted runner");
    let rs = s.wait_runners(1).await;
    assert_ne!(rs[0]["pid"].as_i64().unwrap() as i32, pid, "the supervisor restarted the runner");
}

/// Inputs and results over 64 KiB are kept as objects (not in job rows) and come back whole through every way of
/// reading them; a small input that looks like the row's marker is stored as an object too; deleting the request's
/// payloads deletes the objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_live_in_object_storage() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    s.wait_runners(1).await;
    let big = "é".repeat(60 * 1024); // 120 KiB of UTF-8
    let db_bytes = |d: &std::path::Path| -> i64 {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".db"))
            .map(|e| e.metadata().unwrap().len() as i64)
            .sum()
    };
    let db_before = db_bytes(dir.path());
    let sub = s.submit(json!({"echo": {"big": big}})).await;
    let id = sub["request_id"].as_str().unwrap().to_string();
    let (code, out) = s.result(&id).await;
    assert_eq!(code, 200);
    assert_eq!(out["echo"]["big"].as_str().unwrap(), big);
    let objects = dir.path().join("objects").join("payloads").join(&id);
    assert!(objects.join("input.json").is_file(), "the input is an object");
    assert!(objects.join("result.json").is_file(), "the result is an object");
    let input: Value = serde_json::from_slice(&std::fs::read(objects.join("input.json")).unwrap()).unwrap();
    assert_eq!(input["echo"]["big"].as_str().unwrap(), big);
    // The row holds only a marker: the database file stays small although 240 KiB passed through it.
    let grew = db_bytes(dir.path()) - db_before;
    assert!(grew < 160 * 1024, "database and WAL grew by {grew} bytes");
    let (code, shown) = s.call(reqwest::Method::GET, &format!("/v1/requests/{id}"), None).await;
    assert_eq!(code, 200);
    assert_eq!(shown["input"]["echo"]["big"].as_str().unwrap(), big);
    assert_eq!(shown["result"]["echo"]["big"].as_str().unwrap(), big);
    // A synchronous run reads its large result back too.
    let r = s
        .http
        .post(format!("{}/run/{APP}", s.url))
        .header("authorization", s.auth())
        .json(&json!({"echo": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["echo"].as_str().unwrap(), big);

    // Small, but shaped like the marker: stored as an object, so it cannot stand for anything else.
    let r = s
        .http
        .post(format!("{}/queue/{APP}", s.url))
        .header("authorization", s.auth())
        .json(&json!({"$darkroom_object": "result", "bytes": 1, "echo": 7}))
        .send()
        .await
        .unwrap();
    if r.status() == 200 {
        let fid = r.json::<Value>().await.unwrap()["request_id"].as_str().unwrap().to_string();
        let (code, out) = s.result(&fid).await;
        assert_eq!((code, &out["echo"]), (200, &json!(7)));
        assert!(dir.path().join("objects/payloads").join(&fid).join("input.json").is_file());
    } else {
        assert_eq!(r.status(), 422, "the app's schema may refuse the extra fields");
    }

    let (code, _) = s.call(reqwest::Method::DELETE, &format!("/v1/requests/{id}"), None).await;
    assert_eq!(code, 200);
    assert!(!objects.join("input.json").exists() && !objects.join("result.json").exists(), "objects deleted");
    let (code, body) = s.call(reqwest::Method::GET, &format!("/queue/{APP}/requests/{id}"), None).await;
    assert_eq!((code, body["error_type"].as_str()), (410, Some("request_payload_deleted")));
}
