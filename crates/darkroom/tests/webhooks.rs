//! Webhook delivery across real failures: server kill -9, silent receivers, private targets, dialects, rotation.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{APP, Server};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde_json::{Value, json};

/// A minimal HTTP/1.1 receiver on a std thread: records bodies and headers, answers 200.
struct Receiver {
    port: u16,
    calls: Arc<Mutex<Vec<(String, String)>>>,
    /// While set, requests are read and never answered.
    silent: Arc<AtomicBool>,
}

fn spawn_receiver(listener: TcpListener, silent: bool) -> Receiver {
    let port = listener.local_addr().unwrap().port();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let silent = Arc::new(AtomicBool::new(silent));
    let quiet = silent.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let c = c.clone();
            let quiet = quiet.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head, body) = loop {
                    let Ok(n) = s.read(&mut chunk) else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_string();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        while buf.len() < i + 4 + len {
                            let Ok(n) = s.read(&mut chunk) else { return };
                            if n == 0 {
                                break;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        break (head, String::from_utf8_lossy(&buf[i + 4..]).to_string());
                    }
                };
                c.lock().unwrap().push((head, body));
                if quiet.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            });
        }
    });
    Receiver { port, calls, silent }
}

impl Receiver {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }
    async fn wait(&self, n: usize) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = self.calls.lock().unwrap().clone();
            if c.len() >= n {
                return c;
            }
            assert!(Instant::now() < deadline, "expected {n} deliveries, got {}", c.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn submit_hook(s: &Server, url: &str, input: Value, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut rb = s
        .http
        .post(format!(
            "{}/queue/{APP}?fal_webhook={}",
            s.url,
            url::form_urlencoded::byte_serialize(url.as_bytes()).collect::<String>()
        ))
        .header("authorization", s.auth())
        .json(&input);
    for (k, v) in extra {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap()
}

async fn deliveries(s: &Server, request_id: &str) -> Vec<Value> {
    let v: Value = s
        .http
        .get(format!("{}/v1/webhooks?request_id={request_id}", s.url))
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["webhooks"].as_array().cloned().unwrap_or_default()
}

async fn wait_delivery_state(s: &Server, request_id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = deliveries(s, request_id).await;
        if let Some(x) = d.first().filter(|x| x["state"] == state) {
            return x.clone();
        }
        assert!(Instant::now() < deadline, "delivery never reached {state}: {d:?}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_between_completion_and_delivery_still_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--webhook-allow", "127.0.0.1/32", "--webhook-schedule", "0,400ms,400ms,400ms,400ms,400ms,400ms,400ms"];
    let mut s = Server::start(dir.path(), &args);
    s.wait_runners(1).await;
    // The receiver's port is reserved, then closed: the first attempts are refused.
    let reserved = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = reserved.local_addr().unwrap().port();
    drop(reserved);
    let url = format!("http://127.0.0.1:{port}/hook");
    let sub: Value = submit_hook(&s, &url, json!({"echo": "survives"}), &[]).await.json().await.unwrap();
    let id = sub["request_id"].as_str().unwrap().to_string();
    let (code, _) = s.result(&id).await;
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = deliveries(&s, &id).await;
        if d.first().is_some_and(|x| x["attempts"].as_i64().unwrap_or(0) >= 1) {
            assert_eq!(d[0]["state"], "pending");
            break;
        }
        assert!(Instant::now() < deadline, "no failed attempt recorded: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.kill9();
    let rx = spawn_receiver(TcpListener::bind(("127.0.0.1", port)).unwrap(), false);
    let s = Server::start(dir.path(), &args);
    let calls = rx.wait(1).await;
    let body: Value = serde_json::from_str(&calls[0].1).unwrap();
    assert_eq!(body["request_id"], id.as_str());
    assert_eq!(body["payload"], json!({"echo": "survives", "attempt": 1}));
    let d = wait_delivery_state(&s, &id, "delivered").await;
    assert!(d["attempts"].as_i64().unwrap() >= 2, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_receiver_is_dead_lettered_and_can_be_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        dir.path(),
        &["--webhook-allow", "127.0.0.1/32", "--webhook-schedule", "0,50ms,50ms", "--webhook-timeout-ms", "300"],
    );
    s.wait_runners(1).await;
    let silent = spawn_receiver(TcpListener::bind("127.0.0.1:0").unwrap(), true);
    let sub: Value = submit_hook(&s, &silent.url(), json!({"echo": "kept"}), &[]).await.json().await.unwrap();
    let id = sub["request_id"].as_str().unwrap().to_string();
    let d = wait_delivery_state(&s, &id, "dead").await;
    assert_eq!(d["attempts"], 3);
    assert_eq!(d["last_error"], "timed out");
    assert_eq!(silent.calls.lock().unwrap().len(), 3);
    // The result is still there.
    let (code, out) = s.result(&id).await;
    assert_eq!((code, out), (200, json!({"echo": "kept", "attempt": 1})));
    // The CLI shows it and redelivers it; this time the receiver answers.
    let dd = dir.path().to_str().unwrap();
    let cli = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_darkroom")).args(args).output().unwrap();
    let ls = String::from_utf8(cli(&["webhooks", "ls", "--data-dir", dd, "--state", "dead"]).stdout).unwrap();
    let delivery_id = d["id"].as_str().unwrap();
    assert!(ls.contains(delivery_id), "{ls}");
    let show = String::from_utf8(cli(&["webhooks", "show", "--data-dir", dd, delivery_id]).stdout).unwrap();
    assert!(show.contains("\"attempt_log\""), "{show}");
    // The receiver comes back; a manual redelivery reaches it.
    silent.calls.lock().unwrap().clear();
    silent.silent.store(false, Ordering::SeqCst);
    let out = cli(&["webhooks", "redeliver", "--data-dir", dd, delivery_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let calls = silent.wait(1).await;
    assert_eq!(serde_json::from_str::<Value>(&calls[0].1).unwrap()["payload"]["echo"], "kept");
    let d = wait_delivery_state(&s, &id, "delivered").await;
    assert_eq!(d["attempts"], 4, "three dead attempts, then the redelivery: {d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_by_default_and_allowed_by_the_list() {
    // Default policy: literal private addresses are a 422 at submit.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--webhook-schedule", "0,20ms"]);
    s.wait_runners(1).await;
    let rx = spawn_receiver(TcpListener::bind("127.0.0.1:0").unwrap(), false);
    let r = submit_hook(&s, &rx.url(), json!({}), &[]).await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["detail"][0]["loc"], json!(["query", "fal_webhook"]));
    // A host name is resolved at delivery: this machine's own name resolves to a private address, so the delivery
    // is refused there (a DNS trick cannot reach the private network either).
    let mut name = [0u8; 256];
    unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    let host = String::from_utf8_lossy(&name[..name.iter().position(|b| *b == 0).unwrap()]).to_string();
    let resolved: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), rx.port)).unwrap().collect();
    assert!(resolved.iter().all(|a| darkroom_core::webhook::is_private(a.ip())), "{host} -> {resolved:?}");
    let r = submit_hook(&s, &format!("http://{host}:{}/hook", rx.port), json!({}), &[]).await;
    assert_eq!(r.status(), 200, "a host name passes the submit check");
    let id = r.json::<Value>().await.unwrap()["request_id"].as_str().unwrap().to_string();
    let d = wait_delivery_state(&s, &id, "dead").await;
    assert!(d["last_error"].as_str().unwrap().contains("private"), "{d}");
    assert!(rx.calls.lock().unwrap().is_empty(), "nothing reached the private receiver");
    drop(s);

    // With the allow-list, the same receiver gets it.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--webhook-allow", "127.0.0.0/8"]);
    s.wait_runners(1).await;
    let r = submit_hook(&s, &format!("http://{host}:{}/hook", rx.port), json!({"echo": 1}), &[]).await;
    assert_eq!(r.status(), 200);
    let calls = rx.wait(1).await;
    assert!(calls[0].1.contains("\"echo\":1"));
}

fn jwks_keys(v: &Value) -> Vec<(String, VerifyingKey)> {
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(k["x"].as_str().unwrap()).unwrap();
            (k["kid"].as_str().unwrap().to_string(), VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_webhooks_dialect_and_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let secret = base64::engine::general_purpose::STANDARD.encode(b"0123456789abcdef0123456789abcdef");
    let s = Server::start(
        dir.path(),
        &["--webhook-allow", "127.0.0.1/32", "--webhook-hmac-secret", &format!("whsec_{secret}")],
    );
    s.wait_runners(1).await;
    let rx = spawn_receiver(TcpListener::bind("127.0.0.1:0").unwrap(), false);
    let jwks1: Value =
        s.http.get(format!("{}/.well-known/jwks.json", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks1["keys"].as_array().unwrap().len(), 1);

    submit_hook(&s, &rx.url(), json!({"echo": "std"}), &[("x-darkroom-webhook-dialect", "standard")]).await;
    let (head, body) = rx.wait(1).await[0].clone();
    let id = header(&head, "webhook-id").unwrap();
    let ts = header(&head, "webhook-timestamp").unwrap();
    let sigs = header(&head, "webhook-signature").unwrap();
    let signed = format!("{id}.{ts}.{body}");
    let v1a = sigs.split(' ').find_map(|x| x.strip_prefix("v1a,")).unwrap();
    let sig = Signature::from_slice(&base64::engine::general_purpose::STANDARD.decode(v1a).unwrap()).unwrap();
    assert!(jwks_keys(&jwks1)[0].1.verify(signed.as_bytes(), &sig).is_ok());
    let v1 = sigs.split(' ').find_map(|x| x.strip_prefix("v1,")).unwrap();
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"0123456789abcdef0123456789abcdef").unwrap();
    mac.update(signed.as_bytes());
    assert_eq!(v1, base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    assert!(header(&head, "x-fal-webhook-signature").is_none());

    // Rotation: both keys are published during the overlap; new deliveries use the new key.
    let rot = s.post_json("/v1/webhooks/keys/rotate", json!({})).await;
    let new_kid = rot["kid"].as_str().unwrap().to_string();
    let jwks2: Value =
        s.http.get(format!("{}/.well-known/jwks.json", s.url)).send().await.unwrap().json().await.unwrap();
    let keys2 = jwks_keys(&jwks2);
    assert_eq!(keys2.len(), 2);
    assert_eq!(keys2[0].0, new_kid, "newest first");
    submit_hook(&s, &rx.url(), json!({"echo": "fal"}), &[]).await;
    let (head, body) = rx.wait(2).await[1].clone();
    assert_eq!(header(&head, "x-fal-webhook-key-id"), Some(new_kid.as_str()));
    let msg = darkroom_core::webhook::fal_message(
        header(&head, "x-fal-webhook-request-id").unwrap(),
        header(&head, "x-fal-webhook-user-id").unwrap(),
        header(&head, "x-fal-webhook-timestamp").unwrap().parse().unwrap(),
        body.as_bytes(),
    );
    let sig = Signature::from_slice(&hex::decode(header(&head, "x-fal-webhook-signature").unwrap()).unwrap()).unwrap();
    assert!(keys2[0].1.verify(msg.as_bytes(), &sig).is_ok());
    assert!(keys2[1].1.verify(msg.as_bytes(), &sig).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_can_choose_the_standard_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--webhook-allow", "127.0.0.1/32"]);
    s.wait_runners(1).await;
    let rx = spawn_receiver(TcpListener::bind("127.0.0.1:0").unwrap(), false);
    let k = s.post_json("/v1/keys", json!({"name": "std", "webhook_dialect": "standard"})).await;
    assert_eq!(k["webhook_dialect"], "standard");
    let key = format!("Key {}", k["key"].as_str().unwrap());
    let hook = url::form_urlencoded::byte_serialize(rx.url().as_bytes()).collect::<String>();
    let r = s
        .http
        .post(format!("{}/queue/{APP}?fal_webhook={hook}", s.url))
        .header("authorization", &key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (head, _) = rx.wait(1).await[0].clone();
    assert!(header(&head, "webhook-signature").is_some_and(|v| v.starts_with("v1a,")), "{head}");
    assert!(header(&head, "x-fal-webhook-signature").is_none());
    // A request may still ask for fal's headers.
    let r = s
        .http
        .post(format!("{}/queue/{APP}?fal_webhook={hook}", s.url))
        .header("authorization", &key)
        .header("x-darkroom-webhook-dialect", "fal")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (head, _) = rx.wait(2).await[1].clone();
    assert!(header(&head, "x-fal-webhook-signature").is_some(), "{head}");
    let bad = s.post_json("/v1/keys", json!({"webhook_dialect": "soap"})).await;
    assert_eq!(bad["error_type"], "validation_error");
}
