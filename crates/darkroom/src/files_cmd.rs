//! `darkroom files upload|ls|get|rm`: the running server's files, through its API, with progress bars.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::client::Client;

#[derive(Subcommand)]
pub enum FilesCommand {
    /// Upload a file; prints its signed URL.
    Upload {
        path: PathBuf,
        /// Content type (default: guessed from the extension).
        #[arg(long)]
        content_type: Option<String>,
        /// Seconds until the file expires (default: the server's).
        #[arg(long)]
        expires_in: Option<u64>,
        /// Readable by anyone at its bare URL, without a signature.
        #[arg(long)]
        public: bool,
    },
    /// List files, newest first.
    Ls {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this file id (the last of the previous page).
        #[arg(long)]
        before: Option<String>,
    },
    /// Download a file by id to a path (default: its name, in the current folder; `-` for standard output).
    Get {
        id: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Delete a file.
    Rm { id: String },
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn guess_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        Some("flac") => "audio/flac",
        Some("json") => "application/json",
        Some("txt") => "text/plain",
        _ => "application/octet-stream",
    }
}

pub async fn run(dir: &Path, cmd: FilesCommand) -> anyhow::Result<()> {
    let c = Client::admin(dir)?;
    match cmd {
        FilesCommand::Upload { path, content_type, expires_in, public } => {
            let meta = tokio::fs::metadata(&path).await.with_context(|| format!("reading {}", path.display()))?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file").to_string();
            let ct = content_type.unwrap_or_else(|| guess_type(&path).to_string());
            let mut lifecycle = serde_json::Map::new();
            if let Some(s) = expires_in {
                lifecycle.insert("expiration_duration_seconds".into(), json!(s));
            }
            if public {
                lifecycle.insert("initial_acl".into(), json!({"default": "allow"}));
            }
            let mut rb = c
                .transfer
                .post(c.url("/rest/storage/upload/initiate?storage_type=fal-cdn-v3"))
                .header("authorization", c.authorization())
                .json(&json!({"content_type": ct, "file_name": name}));
            if !lifecycle.is_empty() {
                rb = rb.header("x-fal-object-lifecycle", Value::Object(lifecycle).to_string());
            }
            let init = checked(rb.send().await.context("cannot reach the server")?).await?;
            let pb = bar(meta.len(), &name);
            let file = tokio::fs::File::open(&path).await?;
            let pbc = pb.clone();
            let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).inspect(move |c| {
                if let Ok(c) = c {
                    pbc.inc(c.len() as u64);
                }
            });
            let put = c
                .transfer
                .put(init["upload_url"].as_str().context("no upload_url")?)
                .header("content-type", &ct)
                .header("content-length", meta.len())
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .context("upload failed")?;
            checked(put).await?;
            pb.finish_and_clear();
            println!("{}", init["file_url"].as_str().unwrap_or(""));
        }
        FilesCommand::Ls { limit, before } => {
            let mut q = format!("/v1/files?limit={limit}");
            if let Some(b) = before {
                q.push_str(&format!("&before={b}"));
            }
            let v = c.get(&q).await?;
            println!("{:<34} {:>12} {:<24} {:<25} NAME", "ID", "SIZE", "TYPE", "EXPIRES");
            for f in v["files"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<34} {:>12} {:<24} {:<25} {}",
                    f["id"].as_str().unwrap_or(""),
                    f["file_size"],
                    f["content_type"].as_str().unwrap_or(""),
                    f["expires_at"].as_str().unwrap_or("never"),
                    f["file_name"].as_str().unwrap_or("")
                );
            }
            if let Some(n) = v["next_before"].as_str() {
                eprintln!("more: darkroom files ls --before {n}");
            }
        }
        FilesCommand::Get { id, output } => {
            let info = c.get(&format!("/v1/files/{id}")).await?;
            let url = info["url"].as_str().context("no url")?;
            let resp = checked_stream(c.transfer.get(url).send().await.context("download failed")?).await?;
            let len = resp.content_length().unwrap_or(0);
            let mut s = resp.bytes_stream();
            let to_stdout = output.as_deref() == Some(Path::new("-"));
            if to_stdout {
                let mut out = tokio::io::stdout();
                while let Some(chunk) = s.next().await {
                    out.write_all(&chunk?).await?;
                }
                out.flush().await?;
                return Ok(());
            }
            let name = info["file_name"].as_str().unwrap_or("file");
            let path = output.unwrap_or_else(|| PathBuf::from(Path::new(name).file_name().unwrap_or("file".as_ref())));
            let tmp = path.with_extension("part");
            let mut f = tokio::fs::File::create(&tmp).await.with_context(|| format!("creating {}", tmp.display()))?;
            let pb = bar(len, name);
            while let Some(chunk) = s.next().await {
                let chunk = chunk?;
                pb.inc(chunk.len() as u64);
                f.write_all(&chunk).await?;
            }
            f.sync_all().await?;
            tokio::fs::rename(&tmp, &path).await?;
            pb.finish_and_clear();
            eprintln!("saved {}", path.display());
        }
        FilesCommand::Rm { id } => {
            c.delete(&format!("/v1/files/{id}")).await?;
            println!("deleted {id}");
        }
    }
    Ok(())
}

async fn checked_stream(r: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if r.status().is_success() {
        return Ok(r);
    }
    let st = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    bail!("{st}: {} ({})", body["detail"], body["error_type"].as_str().unwrap_or("unknown"))
}

async fn checked(r: reqwest::Response) -> anyhow::Result<Value> {
    let r = checked_stream(r).await?;
    Ok(r.json().await.unwrap_or(Value::Null))
}
