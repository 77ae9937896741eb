//! Serverless end to end: apps deployed at run time (a folder with a `darkroom.toml` around the fixture HTTP app),
//! secrets in their runners' environment, redeploys and removal, scale from zero, and apps that fail: at start,
//! mid-request, or never becoming healthy.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{APP, Server};
use reqwest::Method;
use serde_json::{Value, json};

const LIVE: &[&str] = &["PENDING", "PULL", "SETUP", "IDLE", "RUNNING"];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../darkroom-models/tests/fixtures/http_app/server.py")
}

/// An app folder under `root`: the fixture server and a manifest with `[run]` extras and a `[scaling]` body.
fn write_app(root: &Path, name: &str, id: &str, run_extra: &str, scaling: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture(), dir.join("server.py")).unwrap();
    write_manifest(&dir, id, run_extra, scaling);
    dir
}

fn write_manifest(dir: &Path, id: &str, run_extra: &str, scaling: &str) {
    let toml = format!(
        "[app]\nid = \"{id}\"\ntitle = \"Echo\"\nendpoints = [\"\", \"fast\"]\n\n\
         [run]\ncommand = [\"python3\", \"server.py\"]\n{run_extra}\n\n[scaling]\n{scaling}\n"
    );
    std::fs::write(dir.join("darkroom.toml"), toml).unwrap();
}

/// A gzipped tar of the given files (name, contents).
fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// A bundle of an app folder written by [`write_app`].
fn bundle_of(dir: &Path) -> Vec<u8> {
    let manifest = std::fs::read(dir.join("darkroom.toml")).unwrap();
    let server = std::fs::read(dir.join("server.py")).unwrap();
    tarball(&[("darkroom.toml", &manifest), ("server.py", &server)])
}

/// Runs the CLI against the server's data folder: (success, stdout, stderr).
fn cli(s: &Server, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_darkroom"))
        .args(args)
        .arg("--data-dir")
        .arg(&s.dir)
        .env("DARKROOM_LOG", "warn")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Deploys with the CLI (`--json`); returns the deployment.
fn cli_deploy(s: &Server, dir: &Path) -> Value {
    let (ok, out, err) = cli(s, &["apps", "deploy", dir.to_str().unwrap(), "--json"]);
    assert!(ok, "deploy failed: {out} {err}");
    serde_json::from_str(&out).unwrap()
}

/// `POST /v1/apps` with a raw body and a key: (status, JSON body).
async fn post_bundle(s: &Server, key: &str, body: Vec<u8>) -> (u16, Value) {
    let r = s
        .http
        .post(format!("{}/v1/apps", s.url))
        .header("authorization", format!("Key {key}"))
        .header("content-type", "application/gzip")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// A synchronous call: (status, JSON body).
async fn run(s: &Server, app: &str, input: Value) -> (u16, Value) {
    s.call(Method::POST, &format!("/run/{app}"), Some(input)).await
}

async fn submit_to(s: &Server, app: &str, input: Value) -> String {
    let (code, v) = s.call(Method::POST, &format!("/queue/{app}"), Some(input)).await;
    assert_eq!(code, 200, "{v}");
    v["request_id"].as_str().unwrap().to_string()
}

/// A server whose data folder is `root/data` (apps are written next to it).
fn start(root: &Path, args: &[&str]) -> Server {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    Server::start(&data, args)
}

fn count(rs: &[Value], app: &str, states: &[&str]) -> usize {
    rs.iter().filter(|r| r["app_id"] == app && states.contains(&r["state"].as_str().unwrap_or(""))).count()
}

/// Waits (bounded) until the request's logs (`GET /v1/requests/{id}`) hold a line containing `text`.
async fn wait_log(s: &Server, id: &str, text: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, v) = s.call(Method::GET, &format!("/v1/requests/{id}"), None).await;
        assert_eq!(code, 200, "{v}");
        let logs = v["logs"].as_array().cloned().unwrap_or_default();
        if logs.iter().any(|l| l["message"].as_str().is_some_and(|m| m.contains(text))) {
            return v;
        }
        assert!(Instant::now() < deadline, "no log line with {text:?}: {v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server still answers and still runs the built-in app.
async fn assert_server_healthy(s: &Server) {
    let r = s.http.get(format!("{}/health", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (code, out) = run(s, APP, json!({"echo": "still here"})).await;
    assert_eq!((code, &out["echo"]), (200, &json!("still here")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_run_redeploy_remove() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[]);
    let app = write_app(dir.path(), "echo", "acme/echo", "env = { MODEL = \"small\", VERSION = \"1\" }", "");

    // A secret set before the first runner starts reaches it.
    let (ok, out, err) = cli(&s, &["secrets", "set", "HF_TOKEN=hf_very_secret_value"]);
    assert!(ok, "{out} {err}");
    let d = cli_deploy(&s, &app);
    assert_eq!((d["app_id"].as_str(), d["version"].as_i64()), (Some("acme/echo"), Some(1)), "{d}");

    let (code, out) = run(&s, "acme/echo", json!({"hello": "world"})).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["input"], json!({"hello": "world"}));
    assert_eq!(out["path"], "");
    assert_eq!(out["env"]["MODEL"], "small");
    assert_eq!(out["env"]["VERSION"], "1");
    assert_eq!(out["env"]["HF_TOKEN"], "hf_very_secret_value");
    assert_eq!(out["env"]["DARKROOM_APP_ID"], "acme/echo");
    assert_eq!(out["env"]["HOST"], "127.0.0.1");
    let sync_id = out["request_id"].as_str().unwrap().to_string();
    assert!(!sync_id.is_empty(), "{out}");
    // What the app printed is the request's log.
    wait_log(&s, &sync_id, "handling root").await;

    // The other endpoint, synchronously.
    let (code, out) = run(&s, "acme/echo/fast", json!({"x": 1})).await;
    assert_eq!((code, out["path"].as_str()), (200, Some("fast")), "{out}");

    // Through the queue.
    let id = submit_to(&s, "acme/echo", json!({"n": 7})).await;
    let (code, out) = s.result_in("acme/echo", &id).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!((out["input"].clone(), out["request_id"].as_str()), (json!({"n": 7}), Some(id.as_str())), "{out}");
    wait_log(&s, &id, "handling root").await;

    // The app's own 422 passes through unchanged.
    let (code, out) = run(&s, "acme/echo", json!({"status": 422})).await;
    assert_eq!(code, 422, "{out}");
    assert_eq!(
        out["detail"],
        json!([{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]),
        "{out}"
    );

    // Listed, shown, and described.
    let (code, v) = s.call(Method::GET, "/v1/apps", None).await;
    assert_eq!(code, 200);
    assert!(v["apps"].as_array().unwrap().iter().any(|a| a["id"] == "acme/echo"), "{v}");
    let (code, v) = s.call(Method::GET, "/v1/apps/acme/echo", None).await;
    assert_eq!((code, v["version"].as_i64(), v["kind"].as_str()), (200, Some(1), Some("http")), "{v}");
    let (code, v) = s.call(Method::GET, "/acme/echo/openapi.json", None).await;
    assert_eq!(code, 200, "{v}");
    assert!(v["openapi"].is_string() && v["paths"].is_object(), "{v}");

    // `apps logs` prints the app's lines.
    let (ok, out, err) = cli(&s, &["apps", "logs", "acme/echo"]);
    assert!(ok && out.contains("handling root"), "{out} {err}");

    // Secrets are listed by name, never with their value.
    let (ok, out, err) = cli(&s, &["secrets", "ls"]);
    assert!(ok && out.contains("HF_TOKEN"), "{out} {err}");
    assert!(!out.contains("hf_very_secret_value") && !err.contains("hf_very_secret_value"), "{out} {err}");
    let (code, v) = s.call(Method::GET, "/v1/secrets", None).await;
    assert_eq!(code, 200);
    assert_eq!(v["secrets"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["secrets"][0]["name"], "HF_TOKEN");
    assert!(!v.to_string().contains("hf_very_secret_value"), "{v}");
    // Nor does the deployment show it.
    let (_, v) = s.call(Method::GET, "/v1/apps/acme/echo", None).await;
    assert!(!v.to_string().contains("hf_very_secret_value"), "{v}");

    // Redeploy (over HTTP this time) with another VERSION: version 2, 200, and new requests run the new code.
    write_manifest(&app, "acme/echo", "env = { MODEL = \"small\", VERSION = \"2\" }", "");
    let (code, v) = post_bundle(&s, &s.admin, bundle_of(&app)).await;
    assert_eq!((code, v["version"].as_i64()), (200, Some(2)), "{v}");
    let (code, out) = run(&s, "acme/echo", json!({"after": "redeploy"})).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!((out["env"]["VERSION"].as_str(), out["env"]["MODEL"].as_str()), (Some("2"), Some("small")), "{out}");
    assert_eq!(out["env"]["HF_TOKEN"], "hf_very_secret_value");
    let id = submit_to(&s, "acme/echo", json!({"queued": "after redeploy"})).await;
    let (code, out) = s.result_in("acme/echo", &id).await;
    assert_eq!((code, out["env"]["VERSION"].as_str()), (200, Some("2")), "{out}");
    let (_, v) = s.call(Method::GET, "/v1/apps/acme/echo", None).await;
    assert_eq!(v["version"], 2, "{v}");

    // Removal: gone from the registry and the API.
    let (ok, out, err) = cli(&s, &["apps", "rm", "acme/echo"]);
    assert!(ok, "{out} {err}");
    let (code, out) = run(&s, "acme/echo", json!({})).await;
    assert_eq!(code, 404, "{out}");
    let (code, _) = s.call(Method::POST, "/queue/acme/echo", Some(json!({}))).await;
    assert_eq!(code, 404);
    let (code, _) = s.call(Method::GET, "/v1/apps/acme/echo", None).await;
    assert_eq!(code, 404);
    let (code, _) = s.call(Method::DELETE, "/v1/apps/acme/echo", None).await;
    assert_eq!(code, 404);
    let (_, v) = s.call(Method::GET, "/v1/apps", None).await;
    assert!(!v["apps"].as_array().unwrap().iter().any(|a| a["id"] == "acme/echo"), "{v}");
    // Its runners end.
    s.wait_fleet("the removed app's runners end", |rs| count(rs, "acme/echo", LIVE) == 0).await;
    // And the secret can be removed.
    let (ok, out, err) = cli(&s, &["secrets", "rm", "HF_TOKEN"]);
    assert!(ok, "{out} {err}");
    let (_, v) = s.call(Method::GET, "/v1/secrets", None).await;
    assert_eq!(v["secrets"], json!([]), "{v}");
    assert_server_healthy(&s).await;
}

/// Bundles larger than the server's request body limit (32 MiB) deploy: they carry weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bundles_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[]);
    let app = write_app(dir.path(), "big", "acme/big", "", "");
    let manifest = std::fs::read(app.join("darkroom.toml")).unwrap();
    let server = std::fs::read(app.join("server.py")).unwrap();
    // 40 MiB that gzip cannot shrink.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let weights: Vec<u8> = (0..40 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let body = tarball(&[("darkroom.toml", &manifest), ("server.py", &server), ("weights.bin", &weights)]);
    assert!(body.len() > 32 << 20);
    let (code, v) = post_bundle(&s, &s.admin, body).await;
    assert_eq!(code, 201, "{v}");
    assert!(v["bundle_size"].as_u64().unwrap() > 32 << 20, "{v}");
    let (code, v) = run(&s, "acme/big", json!({"hello": 1})).await;
    assert_eq!(code, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deploys() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[]);
    let server = std::fs::read(fixture()).unwrap();

    // Not a gzipped tar.
    let (code, v) = post_bundle(&s, &s.admin, b"this is not a tarball".to_vec()).await;
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["detail"][0]["loc"], json!(["body"]), "{v}");

    // A tar without a manifest.
    let (code, v) = post_bundle(&s, &s.admin, tarball(&[("server.py", &server)])).await;
    assert_eq!(code, 422, "{v}");
    assert!(v["detail"][0]["msg"].as_str().unwrap().contains("darkroom.toml"), "{v}");

    // A manifest without a title: field-level detail naming the manifest.
    let toml = "[app]\nid = \"acme/untitled\"\n\n[run]\ncommand = [\"python3\", \"server.py\"]\n";
    let (code, v) =
        post_bundle(&s, &s.admin, tarball(&[("darkroom.toml", toml.as_bytes()), ("server.py", &server)])).await;
    assert_eq!(code, 422, "{v}");
    let detail = v["detail"].as_array().unwrap();
    assert!(
        detail.iter().any(|d| d["loc"][0] == "darkroom.toml" && d.to_string().contains("title")),
        "the detail names darkroom.toml and the field: {v}"
    );

    // The id of a built-in app.
    let toml =
        "[app]\nid = \"darkroom/diagnostics\"\ntitle = \"Impostor\"\n\n[run]\ncommand = [\"python3\", \"server.py\"]\n";
    let (code, v) =
        post_bundle(&s, &s.admin, tarball(&[("darkroom.toml", toml.as_bytes()), ("server.py", &server)])).await;
    assert_eq!(code, 409, "{v}");
    // Built-in apps cannot be removed either.
    let (code, v) = s.call(Method::DELETE, "/v1/apps/darkroom/diagnostics", None).await;
    assert_eq!(code, 409, "{v}");

    // A client key may not deploy, nor touch secrets.
    let (code, k) = s.call(Method::POST, "/v1/keys", Some(json!({"name": "client", "scope": "client"}))).await;
    assert!(code == 200 || code == 201, "{k}");
    let client = k["key"].as_str().unwrap().to_string();
    let toml = "[app]\nid = \"acme/echo\"\ntitle = \"Echo\"\n\n[run]\ncommand = [\"python3\", \"server.py\"]\n";
    let good = tarball(&[("darkroom.toml", toml.as_bytes()), ("server.py", &server)]);
    let (code, v) = post_bundle(&s, &client, good.clone()).await;
    assert_eq!(code, 403, "{v}");
    let r = s
        .http
        .put(format!("{}/v1/secrets/HF_TOKEN", s.url))
        .header("authorization", format!("Key {client}"))
        .json(&json!({"value": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = s.http.get(format!("{}/v1/secrets", s.url)).header("authorization", format!("Key {client}")).send().await;
    assert_eq!(r.unwrap().status(), 403);
    // Nor without any key.
    let r = s.http.post(format!("{}/v1/apps", s.url)).body(good.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // Secret names that Darkroom sets itself are refused.
    for bad in ["PORT", "DARKROOM_X", "1ABC"] {
        let (code, v) = s.call(Method::PUT, &format!("/v1/secrets/{bad}"), Some(json!({"value": "x"}))).await;
        assert_eq!(code, 422, "{bad}: {v}");
    }

    // None of these deployed anything; the good bundle with the admin key does (201).
    let (_, v) = s.call(Method::GET, "/v1/apps", None).await;
    let ids: Vec<&str> = v["apps"].as_array().unwrap().iter().filter_map(|a| a["id"].as_str()).collect();
    assert!(!ids.iter().any(|i| i.starts_with("acme/")), "{ids:?}");
    let (code, v) = post_bundle(&s, &s.admin, good).await;
    assert_eq!((code, v["version"].as_i64()), (201, Some(1)), "{v}");
    assert_server_healthy(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[]);
    let app = write_app(dir.path(), "lazy", "acme/lazy", "", "min_concurrency = 0\nkeep_alive = 2");
    let d = cli_deploy(&s, &app);
    assert_eq!(d["scaling"]["keep_alive"], 2, "{d}");
    assert_eq!(d["scaling"]["min_concurrency"], 0, "{d}");

    // Nothing runs before the first request (watched for a while: the fleet ticks often).
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let rs = s.runners().await;
        assert_eq!(count(&rs, "acme/lazy", LIVE), 0, "a runner started without a request: {rs:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The first request waits for the cold start and succeeds.
    let id = submit_to(&s, "acme/lazy", json!({"first": true})).await;
    let (code, out) = s.result_in("acme/lazy", &id).await;
    assert_eq!((code, &out["input"]), (200, &json!({"first": true})), "{out}");
    let st = s.status_in("acme/lazy", &id).await;
    assert_eq!(st["metrics"]["cold_start"], true, "{st}");
    let rs = s.runners().await;
    assert!(rs.iter().any(|r| r["app_id"] == "acme/lazy"), "{rs:#?}");

    // After keep_alive the idle runner ends.
    let rs = s
        .wait_fleet("the idle runner ends after keep_alive", |rs| {
            count(rs, "acme/lazy", LIVE) == 0 && count(rs, "acme/lazy", &["DRAINING"]) == 0
        })
        .await;
    assert!(count(&rs, "acme/lazy", &["TERMINATED"]) >= 1, "{rs:#?}");
    // And a later request scales from zero again.
    let (code, out) = run(&s, "acme/lazy", json!({"second": true})).await;
    assert_eq!(code, 200, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_in_setup() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &[]);
    let app = write_app(dir.path(), "broken", "acme/broken", "env = { CRASH_AT_START = \"1\" }", "");
    cli_deploy(&s, &app);

    let id = submit_to(&s, "acme/broken", json!({})).await;
    let (code, out) = s.result_in("acme/broken", &id).await;
    assert_eq!(code, 503, "{out}");
    let (_, req) = s.call(Method::GET, &format!("/v1/requests/{id}"), None).await;
    let etype = out["error_type"].as_str().or(req["error_type"].as_str());
    assert_eq!(etype, Some("app_setup_failed"), "{out} {req}");

    // A synchronous call fails the same way rather than hang.
    let (code, out) = run(&s, "acme/broken", json!({})).await;
    assert_eq!(code, 503, "{out}");

    assert_server_healthy(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_request() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &["--max-attempts", "2"]);
    let app = write_app(dir.path(), "crashy", "acme/crashy", "", "");
    cli_deploy(&s, &app);

    let id = submit_to(&s, "acme/crashy", json!({"crash": true})).await;
    let (code, out) = s.result_in("acme/crashy", &id).await;
    assert!(code >= 500, "a request that crashes its app fails: {code} {out}");
    let (_, req) = s.call(Method::GET, &format!("/v1/requests/{id}"), None).await;
    assert!(req["attempts"].as_i64().is_none_or(|a| a <= 2), "bounded by --max-attempts: {req}");
    // Every attempt that ran the app printed its line (the crash happened in the app, not before it).
    assert!(req["logs"].to_string().contains("about to crash"), "{req}");

    // A normal request afterwards runs on a restarted runner (the crashed one must not take it).
    let id = submit_to(&s, "acme/crashy", json!({"fine": true})).await;
    let (code, out) = s.result_in("acme/crashy", &id).await;
    assert_eq!((code, &out["input"]), (200, &json!({"fine": true})), "{out}");
    let (code, out) = run(&s, "acme/crashy", json!({"sync": true})).await;
    assert_eq!(code, 200, "{out}");
    assert_server_healthy(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &["--max-attempts", "2"]);
    let app =
        write_app(dir.path(), "sleepy", "acme/sleepy", "env = { HEALTH_DELAY = \"1000\" }\nstartup_timeout = 3", "");
    cli_deploy(&s, &app);

    // The runner gives up after startup_timeout and reports a failed setup: the queued request fails with it
    // rather than wait for a runner that cannot come.
    let t0 = Instant::now();
    let id = submit_to(&s, "acme/sleepy", json!({})).await;
    let deadline = t0 + Duration::from_secs(40);
    loop {
        let st = s.status_in("acme/sleepy", &id).await;
        if st["status"] == "COMPLETED" {
            assert_eq!(st["error_type"], "app_setup_failed", "{st}");
            assert!(st["error"].as_str().unwrap().contains("did not become healthy within 3 s"), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "the request still waits after 40 s (startup_timeout 3 s): {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t0.elapsed() >= Duration::from_secs(3), "not before startup_timeout: {:?}", t0.elapsed());
    let (code, out) = s.result_in("acme/sleepy", &id).await;
    assert_eq!((code, out["detail"].as_str().is_some()), (503, true), "{out}");
    // The starting runner is stopped (its app process with it), and the app can be removed.
    s.wait_fleet("the unhealthy app's runners end", |rs| count(rs, "acme/sleepy", LIVE) == 0).await;
    let (code, v) = s.call(Method::DELETE, "/v1/apps/acme/sleepy", None).await;
    assert_eq!(code, 200, "{v}");
    assert_server_healthy(&s).await;
}
