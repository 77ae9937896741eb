//! Large payloads live in object storage, not in job rows.
//!
//! An input or result over [`INLINE_MAX`] bytes is written to `payloads/{request_id}/{input|result}.json` and the row
//! keeps a small marker in its place. Which object a marker means comes from the request's own id and the column it
//! is in, never from the marker's text, so a marker cannot point anywhere else; and a payload that merely looks like
//! a marker is stored as an object too, so every marker in a row is one the gateway wrote.

use bytes::Bytes;
use serde_json::Value;

use crate::Gateway;

/// Payloads up to this size stay in the row.
pub const INLINE_MAX: usize = 64 * 1024;
/// The largest payload read back (the request body limit is far below this).
const READ_MAX: u64 = 1 << 30;
const MARKER_PREFIX: &str = "{\"$darkroom_object\":";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Input,
    Result,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Input => "input",
            Kind::Result => "result",
        }
    }
}

pub fn key(request_id: &str, kind: Kind) -> String {
    format!("payloads/{request_id}/{}.json", kind.as_str())
}

/// Whether a stored payload is a marker (all stored payloads are compact JSON, so the prefix is exact).
pub fn is_marker(stored: &str) -> bool {
    stored.starts_with(MARKER_PREFIX)
}

/// What the row keeps for `text`: the text itself, or, for a large one, a marker once the object is written.
pub async fn offload(gw: &Gateway, request_id: &str, kind: Kind, text: String) -> Result<String, String> {
    if text.len() <= INLINE_MAX && !is_marker(&text) {
        return Ok(text);
    }
    let bytes = text.len();
    gw.storage.put_bytes(&key(request_id, kind), Bytes::from(text)).await.map_err(|e| e.to_string())?;
    metrics::counter!("darkroom_payload_objects_total", "kind" => kind.as_str()).increment(1);
    Ok(serde_json::json!({"$darkroom_object": kind.as_str(), "bytes": bytes}).to_string())
}

/// The payload a row holds: the text, or the object its marker stands for.
pub async fn load(gw: &Gateway, request_id: &str, kind: Kind, stored: &str) -> Result<String, String> {
    if !is_marker(stored) {
        return Ok(stored.to_string());
    }
    let b = gw.storage.read_all(&key(request_id, kind), READ_MAX).await.map_err(|e| e.to_string())?;
    String::from_utf8(b.to_vec()).map_err(|e| e.to_string())
}

/// [`load`], parsed.
pub async fn load_json(gw: &Gateway, request_id: &str, kind: Kind, stored: &str) -> Result<Value, String> {
    let text = load(gw, request_id, kind, stored).await?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// A job with its input and result read back from storage where the row holds markers.
pub async fn resolve(gw: &Gateway, job: &mut darkroom_core::job::JobRecord) -> Result<(), String> {
    if is_marker(&job.input) {
        job.input = load(gw, &job.id, Kind::Input, &job.input).await?;
    }
    if let Some(body) = &job.result_body
        && is_marker(body)
    {
        job.result_body = Some(load(gw, &job.id, Kind::Result, body).await?);
    }
    Ok(())
}

/// A webhook body whose `payload` is a result marker, with the result put back in.
pub async fn resolve_webhook_body(gw: &Gateway, request_id: &str, body: &str) -> Result<String, String> {
    if !body.contains("\"payload\":{\"$darkroom_object\":") {
        return Ok(body.to_string());
    }
    let mut v: Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let marker = v.get("payload").map(Value::to_string).unwrap_or_default();
    if is_marker(&marker) {
        v["payload"] = load_json(gw, request_id, Kind::Result, &marker).await?;
    }
    Ok(v.to_string())
}

/// Deletes a request's payload objects (when its payloads are deleted or swept).
pub async fn delete(gw: &Gateway, request_id: &str) {
    if let Err(e) = gw.storage.delete_prefix(&format!("payloads/{request_id}/")).await {
        tracing::warn!(error = %e, %request_id, "deleting a request's payload objects failed");
    }
}
