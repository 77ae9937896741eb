//! `darkroom apps deploy|rm|logs` and `darkroom secrets`: Serverless from the command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::client::Client;

/// Folders and files never put in a bundle.
const SKIP_DIRS: &[&str] = &[".git", "__pycache__", ".venv", "venv", "node_modules", ".mypy_cache", ".pytest_cache"];

/// Parses the deploy target: a folder with a `darkroom.toml`, or `path/to/app.py::Class` (a `fal.App`; its folder
/// is the bundle).
pub fn parse_target(target: &str) -> anyhow::Result<(PathBuf, Option<String>)> {
    match target.split_once("::") {
        Some((file, class)) => {
            let file = Path::new(file);
            if !file.is_file() {
                bail!("{} is not a file", file.display());
            }
            let abs = std::path::absolute(file)?;
            let dir = abs.parent().context("the app file has no folder")?.to_path_buf();
            let name = abs.file_name().context("the app file has no name")?.to_string_lossy().into_owned();
            Ok((dir, Some(format!("{name}::{class}"))))
        }
        None => {
            let dir = PathBuf::from(target);
            if !dir.join("darkroom.toml").is_file() {
                bail!(
                    "{} has no darkroom.toml; deploy a folder with one, or a fal app as path/to/app.py::ClassName",
                    dir.display()
                );
            }
            Ok((dir, None))
        }
    }
}

/// A gzipped tar of `dir` (skipping VCS folders, virtual environments, caches and links), and its file count.
pub fn bundle(dir: &Path) -> anyhow::Result<(Vec<u8>, usize)> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    b.mode(tar::HeaderMode::Deterministic);
    let mut count = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(dir.join(&rel))
            .with_context(|| format!("reading {}", dir.join(&rel).display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let path = rel.join(&name);
            let ft = e.file_type()?;
            if ft.is_dir() {
                if !SKIP_DIRS.iter().any(|s| name == *s) {
                    stack.push(path);
                }
            } else if ft.is_file() {
                if name.to_string_lossy().ends_with(".pyc") {
                    continue;
                }
                b.append_path_with_name(dir.join(&path), &path)
                    .with_context(|| format!("adding {}", path.display()))?;
                count += 1;
            } else {
                eprintln!("skipping {} (not a regular file)", path.display());
            }
        }
    }
    Ok((b.into_inner()?.finish()?, count))
}

pub async fn deploy(c: &Client, target: &str, app_id: Option<&str>, json_out: bool) -> anyhow::Result<()> {
    let (dir, entry) = parse_target(target)?;
    let (data, files) = bundle(&dir)?;
    eprintln!("bundled {files} files from {} ({} KiB)", dir.display(), data.len().div_ceil(1024));
    let mut url = url::Url::parse(&c.url("/v1/apps"))?;
    if let Some(e) = &entry {
        url.query_pairs_mut().append_pair("entry", e);
    }
    if let Some(a) = app_id {
        url.query_pairs_mut().append_pair("app_id", a);
    }
    let resp = c
        .transfer
        .post(url)
        .header("authorization", c.authorization())
        .header("content-type", "application/gzip")
        .body(data)
        .send()
        .await
        .with_context(|| format!("cannot reach the server at {}", c.info.url))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let detail = match &body["detail"] {
            Value::Array(items) => items
                .iter()
                .map(|d| {
                    let loc: Vec<String> = d["loc"]
                        .as_array()
                        .map(|l| l.iter().map(|x| x.as_str().map_or(x.to_string(), str::to_string)).collect())
                        .unwrap_or_default();
                    format!("  {}: {}", loc.join("."), d["msg"].as_str().unwrap_or(""))
                })
                .collect::<Vec<_>>()
                .join("\n"),
            d => format!("  {}", d.as_str().map_or(d.to_string(), str::to_string)),
        };
        bail!("deploy refused ({status}, {}):\n{detail}", body["error_type"].as_str().unwrap_or("unknown"));
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let id = body["app_id"].as_str().unwrap_or("");
    println!("deployed {id} (version {})", body["version"]);
    let endpoints: Vec<String> = body["endpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(|p| format!("/{p}")).collect())
        .unwrap_or_default();
    println!("  endpoints: {}", endpoints.join(" "));
    println!("  queue:     {}", c.url(&format!("/{id}")));
    let s = &body["scaling"];
    println!(
        "  scaling:   min {} max {} keep_alive {}s multiplexing {}",
        s["min_concurrency"], s["max_concurrency"], s["keep_alive"], s["max_multiplexing"]
    );
    Ok(())
}

pub async fn remove(c: &Client, app: &str) -> anyhow::Result<()> {
    let v = c.delete(&format!("/v1/apps/{}", app.trim_matches('/'))).await?;
    println!("removed {}", v["app_id"].as_str().unwrap_or(app));
    Ok(())
}

/// The logs of an app's latest requests, oldest first.
pub async fn logs(c: &Client, app: &str, limit: u32) -> anyhow::Result<()> {
    let mut u = url::Url::parse("http://x/v1/requests")?;
    u.query_pairs_mut().append_pair("app_id", app.trim_matches('/')).append_pair("limit", &limit.to_string());
    let list = c.get(&format!("/v1/requests?{}", u.query().unwrap_or(""))).await?;
    let mut reqs = list["requests"].as_array().cloned().unwrap_or_default();
    reqs.reverse();
    for r in reqs {
        let id = r["request_id"].as_str().unwrap_or("");
        let detail = c.get(&format!("/v1/requests/{id}")).await?;
        println!("== {id} {} {}", r["status"].as_str().unwrap_or(""), r["created_at"].as_str().unwrap_or(""));
        for l in detail["logs"].as_array().cloned().unwrap_or_default() {
            println!(
                "{} {:<6} {}",
                l["timestamp"].as_str().unwrap_or(""),
                l["level"].as_str().unwrap_or(""),
                l["message"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum SecretsCommand {
    /// Set a secret: `NAME=VALUE`, or `NAME` alone to read the value from standard input. Deployed apps get every
    /// secret as an environment variable (runners started from now on).
    Set { assignment: String },
    /// List secrets (names only; values are never shown).
    Ls,
    /// Remove a secret.
    Rm { name: String },
}

pub async fn secrets(c: &Client, cmd: SecretsCommand) -> anyhow::Result<()> {
    match cmd {
        SecretsCommand::Set { assignment } => {
            let (name, value) = match assignment.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => {
                    let mut v = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut v)?;
                    (assignment.clone(), v.trim_end_matches(['\n', '\r']).to_string())
                }
            };
            c.put(&format!("/v1/secrets/{name}"), &json!({"value": value})).await?;
            println!("set {name}");
        }
        SecretsCommand::Ls => {
            let v = c.get("/v1/secrets").await?;
            println!("{:<40} UPDATED", "NAME");
            for s in v["secrets"].as_array().cloned().unwrap_or_default() {
                println!("{:<40} {}", s["name"].as_str().unwrap_or(""), s["updated_at"].as_str().unwrap_or(""));
            }
        }
        SecretsCommand::Rm { name } => {
            c.delete(&format!("/v1/secrets/{name}")).await?;
            println!("removed {name}");
        }
    }
    Ok(())
}
