//! Realtime sessions on a runner: the gateway pins a client's WebSocket to this runner and relays its frames over
//! the control channel. Each session handles its inputs in order, one output per input; msgpack in and out, as
//! fal's realtime protocol has it. A deployed app that serves the route itself gets the frames piped to its
//! WebSocket unchanged ([`pipe`]).

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use darkroom_core::protocol::RunnerFrame;
use darkroom_models::{Model, ModelError, RealtimeContext};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// msgpack → JSON: binary values become `data:application/octet-stream;base64,…` URIs (what the built-in apps take
/// for files), extension values an error.
pub fn msgpack_to_json(v: rmpv::Value) -> Result<Value, String> {
    Ok(match v {
        rmpv::Value::Nil => Value::Null,
        rmpv::Value::Boolean(b) => Value::Bool(b),
        rmpv::Value::Integer(i) => {
            if let Some(n) = i.as_i64() {
                json!(n)
            } else if let Some(n) = i.as_u64() {
                json!(n)
            } else {
                return Err("integer out of range".into());
            }
        }
        rmpv::Value::F32(f) => json!(f),
        rmpv::Value::F64(f) => json!(f),
        rmpv::Value::String(s) => Value::String(s.into_str().ok_or("a string that is not UTF-8")?),
        rmpv::Value::Binary(b) => Value::String(format!("data:application/octet-stream;base64,{}", B64.encode(b))),
        rmpv::Value::Array(a) => Value::Array(a.into_iter().map(msgpack_to_json).collect::<Result<_, _>>()?),
        rmpv::Value::Map(m) => {
            let mut o = serde_json::Map::new();
            for (k, v) in m {
                let k = match k {
                    rmpv::Value::String(s) => s.into_str().ok_or("a map key that is not UTF-8")?,
                    other => other.to_string(),
                };
                o.insert(k, msgpack_to_json(v)?);
            }
            Value::Object(o)
        }
        rmpv::Value::Ext(t, _) => return Err(format!("msgpack extension type {t} is not supported")),
    })
}

/// A client frame → the app's input.
pub fn decode_input(binary: bool, data: &str) -> Result<Value, String> {
    if !binary {
        // A text frame: JSON if it parses (the JS client may send JSON text), else the string itself.
        return Ok(serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_string())));
    }
    let bytes = B64.decode(data).map_err(|e| format!("bad frame encoding: {e}"))?;
    let v = rmpv::decode::read_value(&mut bytes.as_slice()).map_err(|e| format!("the frame is not msgpack: {e}"))?;
    msgpack_to_json(v)
}

/// The app's output → a binary msgpack frame (base64 for the control channel).
pub fn encode_output(v: &Value) -> String {
    B64.encode(rmp_serde::to_vec_named(v).unwrap_or_default())
}

fn error_frame(error: &str, reason: &str) -> (bool, String) {
    (false, json!({"type": "x-fal-error", "error": error, "reason": reason}).to_string())
}

struct Session {
    tx: mpsc::UnboundedSender<(bool, String)>,
    cancel: CancellationToken,
}

/// The sessions pinned to this runner.
#[derive(Default)]
pub struct Sessions {
    open: HashMap<String, Session>,
}

impl Sessions {
    pub fn open(
        &mut self,
        model: Arc<dyn Model>,
        session_id: String,
        path: String,
        out: mpsc::UnboundedSender<RunnerFrame>,
    ) {
        if !model.has_realtime(&path) {
            let _ = out.send(RunnerFrame::RealtimeClosed {
                session_id,
                error: Some("NOT_FOUND".into()),
                reason: Some(format!("this app has no realtime endpoint at /{path}")),
            });
            return;
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<(bool, String)>();
        let cancel = CancellationToken::new();
        self.open.insert(session_id.clone(), Session { tx, cancel: cancel.clone() });
        if let Some(url) = model.realtime_passthrough(&path) {
            tokio::spawn(pipe(url, session_id, rx, cancel, out));
            return;
        }
        tokio::spawn(async move {
            let ctx = RealtimeContext { session_id: session_id.clone(), cancel: cancel.clone() };
            loop {
                let (binary, data) = tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = rx.recv() => match m { Some(m) => m, None => break },
                };
                let reply = match decode_input(binary, &data) {
                    Err(e) => error_frame("INVALID_INPUT", &e),
                    Ok(input) => {
                        let m = model.clone();
                        let (p, c) = (path.clone(), ctx.clone());
                        // A panicking handler fails the frame, not the runner.
                        match tokio::spawn(async move { m.realtime(&p, input, &c).await }).await {
                            Ok(Ok(v)) => (true, encode_output(&v)),
                            Ok(Err(ModelError::Cancelled)) => break,
                            Ok(Err(ModelError::App { status, body })) => {
                                let reason = match body.get("detail") {
                                    Some(Value::String(s)) => s.clone(),
                                    Some(d) => d.to_string(),
                                    None => body.to_string(),
                                };
                                let kind = if status == 422 { "INVALID_INPUT" } else { "INTERNAL_ERROR" };
                                error_frame(kind, &reason)
                            }
                            Err(_) => error_frame("INTERNAL_ERROR", "the realtime handler panicked"),
                        }
                    }
                };
                let frame =
                    RunnerFrame::RealtimeOutput { session_id: session_id.clone(), binary: reply.0, data: reply.1 };
                if out.send(frame).is_err() {
                    break;
                }
            }
        });
    }

    pub fn input(&mut self, session_id: &str, binary: bool, data: String) {
        // (A session whose task ended is dropped at its next input.)
        if let Some(s) = self.open.get(session_id)
            && s.tx.send((binary, data)).is_err()
        {
            self.open.remove(session_id);
        }
    }

    pub fn close(&mut self, session_id: &str) {
        if let Some(s) = self.open.remove(session_id) {
            s.cancel.cancel();
        }
    }

    pub fn close_all(&mut self) {
        for (_, s) in self.open.drain() {
            s.cancel.cancel();
        }
    }
}

/// A session on a deployed app's own realtime route: frames go through unchanged both ways (the app speaks fal's
/// msgpack protocol, its `x-fal-error` frames included); the app closing ends the session.
async fn pipe(
    url: String,
    session_id: String,
    mut rx: mpsc::UnboundedReceiver<(bool, String)>,
    cancel: CancellationToken,
    out: mpsc::UnboundedSender<RunnerFrame>,
) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let closed = |error: Option<&str>, reason: String| RunnerFrame::RealtimeClosed {
        session_id: session_id.clone(),
        error: error.map(str::to_string),
        reason: Some(reason),
    };
    let ws = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio_tungstenite::connect_async(url.as_str()) => r,
    };
    let (mut sink, mut stream) = match ws {
        Ok((ws, _)) => ws.split(),
        Err(e) => {
            let _ = out.send(closed(Some("INTERNAL_ERROR"), format!("the app refused the realtime connection: {e}")));
            return;
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                return;
            }
            m = rx.recv() => {
                let Some((binary, data)) = m else {
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                };
                let msg = if binary {
                    match B64.decode(&data) {
                        Ok(b) => Message::Binary(b.into()),
                        Err(e) => {
                            let (b, d) = error_frame("INVALID_INPUT", &format!("bad frame encoding: {e}"));
                            let _ = out.send(RunnerFrame::RealtimeOutput { session_id: session_id.clone(), binary: b, data: d });
                            continue;
                        }
                    }
                } else {
                    Message::Text(data.into())
                };
                if let Err(e) = sink.send(msg).await {
                    let _ = out.send(closed(Some("INTERNAL_ERROR"), format!("the app's realtime connection failed: {e}")));
                    return;
                }
            }
            f = stream.next() => {
                let frame = match f {
                    Some(Ok(Message::Binary(b))) => RunnerFrame::RealtimeOutput {
                        session_id: session_id.clone(), binary: true, data: B64.encode(&b),
                    },
                    Some(Ok(Message::Text(t))) => RunnerFrame::RealtimeOutput {
                        session_id: session_id.clone(), binary: false, data: t.to_string(),
                    },
                    Some(Ok(Message::Close(c))) => {
                        let reason = c.map(|c| c.reason.to_string()).filter(|r| !r.is_empty());
                        let _ = out.send(RunnerFrame::RealtimeClosed { session_id: session_id.clone(), error: None, reason });
                        return;
                    }
                    None => {
                        let _ = out.send(closed(Some("INTERNAL_ERROR"), "the app closed the realtime connection".into()));
                        return;
                    }
                    Some(Err(e)) => {
                        let _ = out.send(closed(Some("INTERNAL_ERROR"), format!("the app's realtime connection failed: {e}")));
                        return;
                    }
                    Some(Ok(_)) => continue,
                };
                if out.send(frame).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msgpack_round_trip_and_binary_as_data_uri() {
        let mut buf = Vec::new();
        let v = rmpv::Value::Map(vec![
            (rmpv::Value::from("prompt"), rmpv::Value::from("a cat")),
            (rmpv::Value::from("n"), rmpv::Value::from(3)),
            (rmpv::Value::from("image"), rmpv::Value::Binary(vec![1, 2, 3])),
        ]);
        rmpv::encode::write_value(&mut buf, &v).unwrap();
        let j = decode_input(true, &B64.encode(&buf)).unwrap();
        assert_eq!(j, json!({"prompt": "a cat", "n": 3, "image": "data:application/octet-stream;base64,AQID"}));
        let out = B64.decode(encode_output(&json!({"a": [1, 2.5, null]}))).unwrap();
        let back = msgpack_to_json(rmpv::decode::read_value(&mut out.as_slice()).unwrap()).unwrap();
        assert_eq!(back, json!({"a": [1, 2.5, null]}));
        assert_eq!(decode_input(false, "{\"x\":1}").unwrap(), json!({"x": 1}));
        assert_eq!(decode_input(false, "hi").unwrap(), json!("hi"));
        assert!(decode_input(true, &B64.encode([0x92, 0x01])).is_err(), "a truncated array");
    }
}
