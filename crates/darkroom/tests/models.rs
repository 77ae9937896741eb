//! Runners get their weights through the model store in their PULL state; weights that cannot be had fail the
//! app's requests with a clear `error_type` instead of leaving them queued.

mod common;

use std::process::Command;

use common::Server;
use serde_json::json;

fn models(cache: &std::path::Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_darkroom"))
        .arg("models")
        .args(args)
        .env("DARKROOM_LOG", "warn")
        .env("DARKROOM_MODEL_CACHE", cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_weights_fail_requests_with_the_store_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("models");
    let s = Server::start_with_env(
        &dir.path().join("data"),
        &[],
        &[
            ("DARKROOM_DIAGNOSTICS_WEIGHTS", "rdn-slim"),
            ("DARKROOM_OFFLINE", "1"),
            ("DARKROOM_MODEL_CACHE", cache.to_str().unwrap()),
        ],
    );
    let ids: Vec<String> = {
        let mut v = vec![];
        for i in 0..3 {
            v.push(s.submit(json!({"echo": i})).await["request_id"].as_str().unwrap().to_string());
        }
        v
    };
    for id in &ids {
        let (code, body) = s.result(id).await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["error_type"], "model_weights_offline", "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("darkroom models pull rdn-slim"), "{detail}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_pulls_missing_weights_before_it_takes_work() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("models");
    // User weights registered, then their installed copy removed: the runner fetches them again in PULL.
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("voice.onnx"), vec![7u8; 3 << 20]).unwrap();
    std::fs::write(ckpt.join("voice.onnx.json"), b"{}").unwrap();
    let c = cache.to_str().unwrap();
    models(&cache, &["add", "my-voice", "--base", "piper-en_us-joe-medium", "--from", ckpt.to_str().unwrap()]);
    models(&cache, &["rm", "my-voice"]);
    assert!(!cache.join("my-voice").exists());
    let s = Server::start_with_env(
        &dir.path().join("data"),
        &[],
        &[("DARKROOM_DIAGNOSTICS_WEIGHTS", "my-voice"), ("DARKROOM_OFFLINE", "1"), ("DARKROOM_MODEL_CACHE", c)],
    );
    let id = s.submit(json!({"echo": "after pull"})).await["request_id"].as_str().unwrap().to_string();
    let (code, body) = s.result(&id).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["echo"], "after pull");
    let installed = std::fs::read_dir(cache.join("my-voice")).unwrap().next().unwrap().unwrap().path();
    assert_eq!(std::fs::metadata(installed.join("voice.onnx")).unwrap().len(), 3 << 20);
}
