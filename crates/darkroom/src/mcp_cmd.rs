//! `darkroom mcp`: Darkroom's apps as MCP tools on standard input and output, for MCP clients that start a local
//! command. Every tool call goes to a running server over its HTTP API, with an API key.

use std::path::PathBuf;

use anyhow::Context;

use crate::client::ServerInfo;

#[derive(clap::Args)]
pub struct McpArgs {
    #[command(flatten)]
    pub data: crate::DataDirArg,
    /// The server's base URL, e.g. https://127.0.0.1:8080 (default: the running server of the data folder).
    #[arg(long, env = "DARKROOM_URL")]
    pub url: Option<String>,
    /// The API key (`key_id:secret`) the tools act with. Default: FAL_KEY, then the client key `darkroom env` saved
    /// in the data folder (when the server is the data folder's).
    #[arg(long, env = "DARKROOM_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Extra CA certificate (PEM) to trust for the server's TLS (default: the data folder's, for its server).
    #[arg(long, env = "DARKROOM_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

/// Serves MCP on stdin/stdout until the client closes stdin. Standard output carries only MCP messages: logs go to
/// standard error.
pub async fn run(a: McpArgs) -> anyhow::Result<()> {
    let dir = &a.data.data_dir;
    let local: Option<ServerInfo> =
        std::fs::read(dir.join("server.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let same_server =
        |url: &str| local.as_ref().is_some_and(|i| i.url.trim_end_matches('/') == url.trim_end_matches('/'));
    let url = match &a.url {
        Some(u) => u.clone(),
        None => local.as_ref().map(|i| i.url.clone()).with_context(|| {
            format!("no --url given and no running server found in {} (start one with `darkroom serve`)", dir.display())
        })?,
    };
    let is_local = same_server(&url);
    let ca_cert = a
        .ca_cert
        .clone()
        .or_else(|| if is_local { local.as_ref().and_then(|i| i.ca_cert.as_ref()).map(PathBuf::from) } else { None });
    let key = a
        .key
        .clone()
        .filter(|k| !k.trim().is_empty())
        .or_else(|| std::env::var("FAL_KEY").ok().filter(|k| !k.trim().is_empty()))
        .or_else(|| {
            if !is_local {
                return None;
            }
            std::fs::read_to_string(dir.join("client.key")).ok().map(|k| k.trim().to_string()).filter(|k| !k.is_empty())
        })
        .map(|k| k.trim().to_string());
    if key.is_none() {
        tracing::warn!("no API key (--key, DARKROOM_KEY or FAL_KEY): only a --no-auth server will accept the calls");
    }
    let api = darkroom_gateway::mcp::HttpApi::new(&url, key, ca_cert.as_deref()).map_err(anyhow::Error::msg)?;
    tracing::info!(%url, "serving Darkroom's apps as MCP tools on stdin/stdout");
    darkroom_gateway::mcp::serve_stdio(api).await
}
