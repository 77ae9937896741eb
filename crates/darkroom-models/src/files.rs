//! Files in and out of models: fal's `File` shape, the [`FileIo`] a runner provides, and data URIs.

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::ModelError;

/// A file in an app's output, in fal's shape (`Image` adds `width` and `height`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct File {
    /// Where to download it: a signed URL of this server's storage, or a data URI for inline outputs.
    pub url: String,
    pub content_type: String,
    pub file_name: String,
    /// Size in bytes.
    pub file_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

/// An input file's bytes and what is known about them.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub data: Bytes,
    /// From the data URI, the stored object, or the response's `Content-Type`.
    pub content_type: Option<String>,
}

/// Why a file could not be fetched or stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FileError {
    /// The URL is malformed or of a scheme that is not accepted.
    #[error("{0}")]
    BadUrl(String),
    /// The address is private, loopback or otherwise refused by the fetch policy.
    #[error("{0}")]
    Forbidden(String),
    /// Larger than the limit.
    #[error("the file is larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// The file does not exist, its URL expired, or its signature is wrong.
    #[error("{0}")]
    NotFound(String),
    /// Network or storage failure.
    #[error("{0}")]
    Failed(String),
}

impl FileError {
    /// A 422 in FastAPI's shape, naming the input field.
    pub fn into_model_error(self, field: &str) -> ModelError {
        let kind = match &self {
            FileError::BadUrl(_) => "invalid_url",
            FileError::Forbidden(_) => "url_not_allowed",
            FileError::TooLarge(_) => "file_too_large",
            FileError::NotFound(_) => "file_not_found",
            FileError::Failed(_) => "file_download_error",
        };
        ModelError::App {
            status: 422,
            body: json!({"detail": [{"loc": ["body", field], "msg": format!("Could not read the file: {self}"), "type": kind}]}),
        }
    }
}

/// Fetches inputs and stores outputs for a model; the runner provides it.
#[async_trait]
pub trait FileIo: Send + Sync + 'static {
    async fn fetch(&self, url: &str) -> Result<Fetched, FileError>;
    /// Stores an output and answers its URL.
    async fn store(&self, data: Bytes, content_type: &str, file_name: &str) -> Result<String, FileError>;
}

impl std::fmt::Debug for dyn FileIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileIo")
    }
}

/// Data URIs only: no network, outputs inline. Used where no runner is around (unit tests).
pub struct InlineFiles;

#[async_trait]
impl FileIo for InlineFiles {
    async fn fetch(&self, url: &str) -> Result<Fetched, FileError> {
        if url.starts_with("data:") {
            parse_data_uri(url, u64::MAX)
        } else {
            Err(FileError::BadUrl("only data URIs can be read here".into()))
        }
    }
    async fn store(&self, data: Bytes, content_type: &str, _: &str) -> Result<String, FileError> {
        Ok(data_uri(content_type, &data))
    }
}

/// `data:<type>;base64,<data>`.
pub fn data_uri(content_type: &str, data: &[u8]) -> String {
    format!("data:{content_type};base64,{}", base64::engine::general_purpose::STANDARD.encode(data))
}

/// Decodes a data URI (base64 or percent-encoded), refusing more than `limit` bytes.
pub fn parse_data_uri(url: &str, limit: u64) -> Result<Fetched, FileError> {
    let rest = url.strip_prefix("data:").ok_or_else(|| FileError::BadUrl("not a data URI".into()))?;
    let (meta, payload) = rest.split_once(',').ok_or_else(|| FileError::BadUrl("a data URI needs a comma".into()))?;
    let (mime, base64) = match meta.strip_suffix(";base64") {
        Some(m) => (m, true),
        None => (meta, false),
    };
    // Base64 is 4 characters per 3 bytes: refuse before decoding what is surely too big.
    if (payload.len() as u64 / 4).saturating_mul(3) > limit.saturating_add(3) {
        return Err(FileError::TooLarge(limit));
    }
    let data = if base64 {
        let clean: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(clean.as_bytes())
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(clean.trim_end_matches('=')))
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(clean.trim_end_matches('=')))
            .map_err(|e| FileError::BadUrl(format!("bad base64 in data URI: {e}")))?
    } else {
        percent_decode(payload)
    };
    if data.len() as u64 > limit {
        return Err(FileError::TooLarge(limit));
    }
    let mime = mime.split(';').next().unwrap_or("").trim();
    Ok(Fetched {
        data: Bytes::from(data),
        content_type: Some(if mime.is_empty() { "text/plain".into() } else { mime.to_string() }),
    })
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_uris_round_trip_and_respect_limits() {
        let u = data_uri("image/png", b"\x89PNG");
        let f = parse_data_uri(&u, 100).unwrap();
        assert_eq!(&f.data[..], b"\x89PNG");
        assert_eq!(f.content_type.as_deref(), Some("image/png"));
        assert_eq!(parse_data_uri("data:,a%20b", 100).unwrap().data, Bytes::from_static(b"a b"));
        assert_eq!(parse_data_uri(&data_uri("a/b", &[0u8; 64]), 10).unwrap_err(), FileError::TooLarge(10));
        assert!(matches!(parse_data_uri("data:abc", 10), Err(FileError::BadUrl(_))));
        assert!(matches!(parse_data_uri("data:;base64,***", 10), Err(FileError::BadUrl(_))));
    }
}
