//! The CLI's HTTP client: finds the running server through `server.json` and `local-admin.key`.

use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What `darkroom serve` writes to `server.json` once it listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    pub url: String,
    pub listen: String,
    pub ca_cert: Option<String>,
    pub ca_bundle: Option<String>,
    pub pid: u32,
    pub boot_id: String,
}

pub struct Client {
    pub info: ServerInfo,
    http: reqwest::Client,
    /// For uploads and downloads: no overall timeout, only on connecting.
    pub transfer: reqwest::Client,
    key: String,
}

impl Client {
    /// A client acting with the local admin key.
    pub fn admin(dir: &Path) -> anyhow::Result<Client> {
        let info: ServerInfo = serde_json::from_slice(&std::fs::read(dir.join("server.json")).with_context(|| {
            format!("no running server found in {} (start one with `darkroom serve`)", dir.display())
        })?)
        .context("server.json is not valid")?;
        let key =
            std::fs::read_to_string(dir.join("local-admin.key")).context("reading local-admin.key")?.trim().to_string();
        let tls = darkroom_runner::tls::client_config(info.ca_cert.as_deref().map(Path::new))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .no_proxy()
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        let transfer = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .no_proxy()
            .connect_timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Client { info, http, transfer, key })
    }

    pub fn authorization(&self) -> String {
        format!("Key {}", self.key)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.info.url.trim_end_matches('/'), path)
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp =
            rb.header("authorization", format!("Key {}", self.key)).send().await.with_context(|| {
                format!("cannot reach the server at {} (is `darkroom serve` running?)", self.info.url)
            })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{}: {} ({})", status, body["detail"], body["error_type"].as_str().unwrap_or("unknown"));
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(self.url(path))).await
    }
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }
    pub async fn patch(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.patch(self.url(path)).json(body)).await
    }
    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }
    /// A GET whose body is returned as text (CSV, Markdown).
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .get(self.url(path))
            .header("authorization", format!("Key {}", self.key))
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {} (is `darkroom serve` running?)", self.info.url))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{status}: {text}");
        }
        Ok(text)
    }
    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.delete(self.url(path))).await
    }

    /// Whether a client key is still accepted.
    pub async fn key_works(&self, key: &str) -> bool {
        self.http
            .get(self.url("/v1/apps"))
            .header("authorization", format!("Key {key}"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }
}
