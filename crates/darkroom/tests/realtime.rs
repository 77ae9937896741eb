//! Realtime end to end: tokens, the msgpack WebSocket pinned to a real runner process, errors, idle timeouts, a
//! runner dying mid-session, and 100 concurrent sessions, on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{APP, Server};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn pack(v: &Value) -> Vec<u8> {
    fn conv(v: &Value) -> rmpv::Value {
        match v {
            Value::Null => rmpv::Value::Nil,
            Value::Bool(b) => rmpv::Value::from(*b),
            Value::Number(n) => {
                n.as_i64().map(rmpv::Value::from).unwrap_or_else(|| rmpv::Value::from(n.as_f64().unwrap()))
            }
            Value::String(s) => rmpv::Value::from(s.as_str()),
            Value::Array(a) => rmpv::Value::Array(a.iter().map(conv).collect()),
            Value::Object(o) => {
                rmpv::Value::Map(o.iter().map(|(k, v)| (rmpv::Value::from(k.as_str()), conv(v))).collect())
            }
        }
    }
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &conv(v)).unwrap();
    buf
}

fn unpack(b: &[u8]) -> Value {
    fn conv(v: rmpv::Value) -> Value {
        match v {
            rmpv::Value::Nil => Value::Null,
            rmpv::Value::Boolean(b) => json!(b),
            rmpv::Value::Integer(i) => json!(i.as_i64().unwrap()),
            rmpv::Value::F64(f) => json!(f),
            rmpv::Value::F32(f) => json!(f),
            rmpv::Value::String(s) => json!(s.into_str().unwrap()),
            rmpv::Value::Array(a) => Value::Array(a.into_iter().map(conv).collect()),
            rmpv::Value::Map(m) => {
                Value::Object(m.into_iter().map(|(k, v)| (k.as_str().unwrap().to_string(), conv(v))).collect())
            }
            other => panic!("unexpected msgpack {other:?}"),
        }
    }
    conv(rmpv::decode::read_value(&mut &b[..]).unwrap())
}

fn ws_url(s: &Server, query: &str) -> String {
    format!("{}/run/{APP}/realtime{query}", s.url.replacen("http", "ws", 1))
}

async fn token(s: &Server, apps: Value, ttl: i64) -> String {
    let r = s
        .http
        .post(format!("{}/rest/tokens/", s.url))
        .header("authorization", s.auth())
        .json(&json!({"allowed_apps": apps, "token_expiration": ttl}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap().as_str().unwrap().to_string()
}

async fn connect(url: &str, key: Option<&str>) -> Result<Ws, u16> {
    let mut req = url.into_client_request().unwrap();
    if let Some(k) = key {
        req.headers_mut().insert("authorization", format!("Key {k}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

/// The next data frame (binary: msgpack-decoded; text: JSON), skipping pings.
async fn next(ws: &mut Ws) -> Option<Result<Value, Value>> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("a frame in time")?;
        match m.ok()? {
            Message::Binary(b) => return Some(Ok(unpack(&b))),
            Message::Text(t) => return Some(Err(serde_json::from_str(&t).unwrap())),
            Message::Close(c) => return Some(Err(json!({"close": c.map(|c| u16::from(c.code))}))),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_frames_errors_and_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--realtime-idle-secs", "2"]);
    s.wait_runners(1).await;

    // A token for the app's alias: frames come back in order.
    let t = token(&s, json!(["diagnostics"]), 120).await;
    assert_eq!(t.split('.').count(), 3, "a compact JWT: {t}");
    let mut ws = connect(&ws_url(&s, &format!("?fal_jwt_token={t}&max_buffering=8")), None).await.unwrap();
    for i in 0..5 {
        ws.send(Message::Binary(pack(&json!({"i": i, "s": "é"})).into())).await.unwrap();
    }
    for i in 0..5 {
        assert_eq!(next(&mut ws).await.unwrap().unwrap(), json!({"i": i, "s": "é"}));
    }
    // The app's failure is fal's error frame; the session goes on.
    ws.send(Message::Binary(pack(&json!({"fail": "boom"})).into())).await.unwrap();
    let e = next(&mut ws).await.unwrap().unwrap_err();
    assert_eq!(
        (e["type"].as_str(), e["error"].as_str(), e["reason"].as_str()),
        (Some("x-fal-error"), Some("INTERNAL_ERROR"), Some("boom"))
    );
    ws.send(Message::Binary(pack(&json!({"after": true})).into())).await.unwrap();
    assert_eq!(next(&mut ws).await.unwrap().unwrap(), json!({"after": true}));
    // Idle: TIMEOUT, then a normal close.
    let e = next(&mut ws).await.unwrap().unwrap_err();
    assert_eq!(e["error"], "TIMEOUT", "{e}");
    assert_eq!(next(&mut ws).await.unwrap().unwrap_err()["close"], 1000);

    // The API key on the handshake instead of a token (the Python client's use_jwt=False).
    let mut ws = connect(&ws_url(&s, ""), Some(&s.admin)).await.unwrap();
    ws.send(Message::Binary(pack(&json!({"k": 1})).into())).await.unwrap();
    assert_eq!(next(&mut ws).await.unwrap().unwrap(), json!({"k": 1}));
    ws.close(None).await.unwrap();

    // Refusals: another app's token, an expired or forged token, no credentials, a bad max_buffering, no app.
    let other = token(&s, json!(["whisper"]), 120).await;
    assert_eq!(connect(&ws_url(&s, &format!("?fal_jwt_token={other}")), None).await.err(), Some(403));
    let full_id = token(&s, json!([APP]), 120).await;
    assert!(connect(&ws_url(&s, &format!("?fal_jwt_token={full_id}")), None).await.is_ok(), "owner/alias works too");
    let short = token(&s, json!(["diagnostics"]), 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(connect(&ws_url(&s, &format!("?fal_jwt_token={short}")), None).await.err(), Some(401));
    let forged = format!("{}x", &t[..t.len() - 1]);
    assert_eq!(connect(&ws_url(&s, &format!("?fal_jwt_token={forged}")), None).await.err(), Some(401));
    assert_eq!(connect(&ws_url(&s, ""), None).await.err(), Some(401));
    assert_eq!(connect(&ws_url(&s, "?max_buffering=100"), Some(&s.admin)).await.err(), Some(422));
    let nowhere = ws_url(&s, "").replace(APP, "nobody/nothing");
    assert_eq!(connect(&nowhere, Some(&s.admin)).await.err(), Some(404));
    // Bad token requests.
    let r = s
        .http
        .post(format!("{}/rest/tokens/", s.url))
        .header("authorization", s.auth())
        .json(&json!({"allowed_apps": [], "token_expiration": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = s.http.post(format!("{}/rest/tokens/", s.url)).json(&json!({"allowed_apps": ["x"]})).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_runner_ends_its_sessions_and_many_sessions_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let runners = s.wait_runners(1).await;
    let pid = runners[0]["pid"].as_i64().unwrap() as i32;

    let mut ws = connect(&ws_url(&s, ""), Some(&s.admin)).await.unwrap();
    ws.send(Message::Binary(pack(&json!({"n": 1})).into())).await.unwrap();
    assert_eq!(next(&mut ws).await.unwrap().unwrap(), json!({"n": 1}));
    ws.send(Message::Binary(pack(&json!({"sleep_ms": 10_000})).into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SAFETY: kill(2) on the runner process's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let e = next(&mut ws).await.unwrap().unwrap_err();
    assert_eq!((e["type"].as_str(), e["error"].as_str()), (Some("x-fal-error"), Some("RUNNER_LOST")), "{e}");
    assert_eq!(next(&mut ws).await.unwrap().unwrap_err()["close"], 1011);

    // The next connection waits for the replacement runner and works.
    let mut ws = connect(&ws_url(&s, ""), Some(&s.admin)).await.unwrap();
    ws.send(Message::Binary(pack(&json!({"again": 1})).into())).await.unwrap();
    assert_eq!(next(&mut ws).await.unwrap().unwrap(), json!({"again": 1}));
    ws.close(None).await.unwrap();

    // 100 sessions at once, each with its frames in order.
    let url = ws_url(&s, "");
    let mut tasks = Vec::new();
    for n in 0..100 {
        let (url, key) = (url.clone(), s.admin.clone());
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(&url, Some(&key)).await.unwrap();
            for i in 0..3 {
                ws.send(Message::Binary(pack(&json!({"session": n, "i": i})).into())).await.unwrap();
            }
            for i in 0..3 {
                assert_eq!(next(&mut ws).await.unwrap().unwrap(), json!({"session": n, "i": i}));
            }
            ws.close(None).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    s.wait_runners(1).await;
    let url = format!("{}/ws/{APP}", s.url.replacen("http", "ws", 1));
    assert_eq!(connect(&url, None).await.err(), Some(401));
    let mut ws = connect(&url, Some(&s.admin)).await.unwrap();
    // Two requests sent back to back are answered in turn, each between its start and end frames.
    ws.send(Message::Text(json!({"echo": "one"}).to_string().into())).await.unwrap();
    ws.send(Message::Text(json!({"echo": "two", "sleep_ms": 50}).to_string().into())).await.unwrap();
    ws.send(Message::Text(json!({"sleep_ms": -1}).to_string().into())).await.unwrap();
    for (want, status) in [(json!({"echo": "one", "attempt": 1}), 200), (json!({"echo": "two", "attempt": 1}), 200)] {
        let start = next(&mut ws).await.unwrap().unwrap_err();
        assert_eq!((start["type"].as_str(), start["status"].as_u64()), (Some("start"), Some(status)));
        let body = next(&mut ws).await.unwrap().unwrap_err();
        assert_eq!(body, want);
        let end = next(&mut ws).await.unwrap().unwrap_err();
        assert_eq!((end["type"].as_str(), &end["request_id"]), (Some("end"), &start["request_id"]));
    }
    let start = next(&mut ws).await.unwrap().unwrap_err();
    assert_eq!(start["status"], 422);
    let body = next(&mut ws).await.unwrap().unwrap_err();
    assert_eq!(body["detail"][0]["loc"], json!(["body", "sleep_ms"]));
    assert_eq!(next(&mut ws).await.unwrap().unwrap_err()["type"], "end");
    ws.close(None).await.unwrap();
}

/// A PNG of `w`×`h` pixels.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_utils_resizes_frames_in_realtime_after_a_cold_start() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    // image-utils scales from zero: the session waits for its runner to start.
    let url = format!("{}/run/darkroom/image-utils/realtime", s.url.replacen("http", "ws", 1));
    let mut ws = connect(&url, Some(&s.admin)).await.unwrap();
    for (i, w) in [32u32, 48, 64].into_iter().enumerate() {
        // The frame as msgpack with the image as a binary value.
        let v = rmpv::Value::Map(vec![
            (rmpv::Value::from("image_url"), rmpv::Value::Binary(png(w, 16))),
            (rmpv::Value::from("operation"), rmpv::Value::from("resize")),
            (rmpv::Value::from("width"), rmpv::Value::from(w / 2)),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &v).unwrap();
        ws.send(Message::Binary(buf.into())).await.unwrap();
        let out = next(&mut ws).await.unwrap().unwrap_or_else(|e| panic!("frame {i}: {e}"));
        assert_eq!(
            (out["image"]["width"].as_u64(), out["image"]["height"].as_u64()),
            (Some(u64::from(w / 2)), Some(8))
        );
        assert!(out["image"]["url"].as_str().unwrap().starts_with("data:image/png;base64,"), "{out}");
    }
    ws.close(None).await.unwrap();
}
