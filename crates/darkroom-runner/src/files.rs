//! The runner's [`FileIo`]: inputs from data URIs, from Darkroom's storage (read directly when this runner shares
//! the gateway's storage, else through the gateway), or from external http(s) URLs behind a private-address guard;
//! outputs uploaded to the gateway with the job's upload token.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use darkroom_core::webhook::AddressPolicy;
use darkroom_models::files::parse_data_uri;
use darkroom_models::{Fetched, FileError, FileIo};
use darkroom_storage::{Op, Signer, Storage, StorageError, object_key};
use futures::StreamExt;

/// Shared by every job of a runner.
pub struct FileSettings {
    /// The gateway's base URL.
    pub gateway: url::Url,
    /// Client for the gateway (trusts its CA).
    pub gateway_http: reqwest::Client,
    /// TLS for external URLs: the system's CAs.
    pub external_tls: Arc<rustls::ClientConfig>,
    /// Storage shared with the gateway, and the key its URLs are signed with (local runners only).
    pub local: Option<(Storage, Signer)>,
    /// Which addresses external fetches may reach.
    pub policy: AddressPolicy,
    /// Largest input file.
    pub max_input_size: u64,
    pub fetch_timeout: Duration,
}

/// One job's file I/O.
pub struct JobFiles {
    pub settings: Arc<FileSettings>,
    pub upload_token: Option<String>,
}

/// The capability and the rest of the path, when a URL is one of Darkroom's file URLs (`…/cdn/files/{cap}/…`,
/// or `/files/{cap}/…` on fal's CDN host name).
fn own_file_path(u: &url::Url) -> Option<(String, String)> {
    let segs: Vec<&str> = u.path_segments()?.collect();
    let at = segs
        .windows(2)
        .position(|w| w == ["cdn", "files"])
        .map(|i| i + 2)
        .or_else(|| (u.host_str() == Some("v3.fal.media") && segs.first() == Some(&"files")).then_some(1))?;
    let cap = segs.get(at)?.to_string();
    Some((cap, segs[at..].join("/")))
}

async fn read_limited(resp: reqwest::Response, limit: u64) -> Result<Fetched, FileError> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(FileError::TooLarge(limit));
    }
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut out = BytesMut::new();
    let mut s = resp.bytes_stream();
    while let Some(c) = s.next().await {
        let c = c.map_err(|e| FileError::Failed(format!("download failed: {e}")))?;
        if out.len() as u64 + c.len() as u64 > limit {
            return Err(FileError::TooLarge(limit));
        }
        out.extend_from_slice(&c);
    }
    Ok(Fetched { data: out.freeze(), content_type: ct })
}

fn status_error(status: reqwest::StatusCode) -> FileError {
    match status.as_u16() {
        403 | 404 | 410 => FileError::NotFound(format!("the server answered {status}")),
        _ => FileError::Failed(format!("the server answered {status}")),
    }
}

impl JobFiles {
    async fn fetch_own(&self, cap: &str, rest: &str) -> Result<Fetched, FileError> {
        let s = &self.settings;
        if let Some((storage, signer)) = &s.local
            && cap.contains('.')
        {
            let now = darkroom_core::Clock::now_ms(&darkroom_core::SystemClock) / 1000;
            let id = signer.check(Op::Get, cap, now).map_err(|e| FileError::NotFound(format!("file URL {e}")))?;
            return match storage.read_all(&object_key(&id), s.max_input_size).await {
                Ok(data) => Ok(Fetched { data, content_type: None }),
                Err(StorageError::NotFound) => Err(FileError::NotFound("the file no longer exists".into())),
                Err(StorageError::TooLarge(n)) => Err(FileError::TooLarge(n)),
                Err(e) => Err(FileError::Failed(e.to_string())),
            };
        }
        let url = s.gateway.join(&format!("cdn/files/{rest}")).map_err(|e| FileError::BadUrl(e.to_string()))?;
        let resp = tokio::time::timeout(s.fetch_timeout, s.gateway_http.get(url).send())
            .await
            .map_err(|_| FileError::Failed("timed out".into()))?
            .map_err(|e| FileError::Failed(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(status_error(resp.status()));
        }
        read_limited(resp, s.max_input_size).await
    }

    async fn fetch_external(&self, mut url: url::Url) -> Result<Fetched, FileError> {
        let s = &self.settings;
        let fetch = async {
            for _ in 0..5 {
                s.policy.check_url(url.as_str()).map_err(FileError::Forbidden)?;
                let (domain, addr) = s.policy.resolve(&url, "--fetch-allow").await.map_err(FileError::Forbidden)?;
                let mut b = reqwest::Client::builder()
                    .use_preconfigured_tls((*s.external_tls).clone())
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .connect_timeout(Duration::from_secs(10))
                    .user_agent(concat!("darkroom-runner/", env!("CARGO_PKG_VERSION")));
                if let Some(d) = &domain {
                    b = b.resolve(d, addr);
                }
                let client = b.build().map_err(|e| FileError::Failed(e.to_string()))?;
                let resp = client.get(url.clone()).send().await.map_err(|e| FileError::Failed(e.to_string()))?;
                if resp.status().is_redirection() {
                    // Each hop is checked again, so a public URL cannot redirect to a private one.
                    let loc = resp
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .ok_or_else(|| FileError::Failed("redirect without a location".into()))?;
                    url = url.join(loc).map_err(|e| FileError::BadUrl(e.to_string()))?;
                    continue;
                }
                if !resp.status().is_success() {
                    return Err(status_error(resp.status()));
                }
                return read_limited(resp, s.max_input_size).await;
            }
            Err(FileError::Failed("too many redirects".into()))
        };
        tokio::time::timeout(s.fetch_timeout, fetch).await.map_err(|_| FileError::Failed("timed out".into()))?
    }
}

#[async_trait]
impl FileIo for JobFiles {
    async fn fetch(&self, raw: &str) -> Result<Fetched, FileError> {
        let raw = raw.trim();
        if raw.starts_with("data:") {
            return parse_data_uri(raw, self.settings.max_input_size);
        }
        let url = url::Url::parse(raw).map_err(|e| FileError::BadUrl(format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FileError::BadUrl("only data:, http: and https: URLs are accepted".into()));
        }
        if let Some((cap, rest)) = own_file_path(&url) {
            return self.fetch_own(&cap, &rest).await;
        }
        self.fetch_external(url).await
    }

    async fn store(&self, data: Bytes, content_type: &str, file_name: &str) -> Result<String, FileError> {
        let s = &self.settings;
        let token = self.upload_token.as_deref().ok_or_else(|| FileError::Failed("no upload token".into()))?;
        let url = s.gateway.join("cdn/files/upload").map_err(|e| FileError::BadUrl(e.to_string()))?;
        let resp = s
            .gateway_http
            .post(url)
            .bearer_auth(token)
            .header("content-type", content_type)
            .header("x-fal-file-name", file_name)
            .body(data)
            .send()
            .await
            .map_err(|e| FileError::Failed(format!("upload failed: {e}")))?;
        if !resp.status().is_success() {
            let st = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(FileError::Failed(format!("upload answered {st}: {}", &body[..body.len().min(300)])));
        }
        let v: serde_json::Value = resp.json().await.map_err(|e| FileError::Failed(e.to_string()))?;
        v["access_url"].as_str().map(str::to_string).ok_or_else(|| FileError::Failed("no access_url".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_file_urls_are_recognised() {
        let u = url::Url::parse("https://127.0.0.1:8443/cdn/files/abc.1.sig/cat%20a.png").unwrap();
        assert_eq!(own_file_path(&u), Some(("abc.1.sig".into(), "abc.1.sig/cat%20a.png".into())));
        let u = url::Url::parse("https://v3.fal.media/files/abc.1.sig/x.png").unwrap();
        assert_eq!(own_file_path(&u).unwrap().0, "abc.1.sig");
        assert_eq!(own_file_path(&url::Url::parse("https://example.com/files/a/b").unwrap()), None);
        assert_eq!(own_file_path(&url::Url::parse("https://example.com/cdn/other").unwrap()), None);
    }
}
