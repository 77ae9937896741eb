//! `darkroom`: a self-hosted generative-media platform with a fal-compatible API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

mod bench;
mod client;
mod deploy_cmd;
mod files_cmd;
mod mcp_cmd;
mod models_cmd;
mod serve;
mod usage_cmd;

#[derive(Parser)]
#[command(
    name = "darkroom",
    version,
    about = "Darkroom: self-hosted generative media with a fal-compatible API.",
    long_about = "Darkroom serves image, audio and test models behind fal's queue API. The official fal clients \
          (Python fal-client, JS @fal-ai/client) work against it unchanged.\n\nStart a server with `darkroom serve`; \
          point clients at it with `eval \"$(darkroom env)\"`. Every other command talks to the running server \
          found through the data folder."
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `darkroom_gateway=debug`.
    #[arg(long, env = "DARKROOM_LOG", default_value = "info,rmcp=warn", global = true)]
    log: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "DARKROOM_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
pub struct DataDirArg {
    /// The data folder: database, files, TLS material, `local-admin.key`, `server.json`.
    #[arg(long, env = "DARKROOM_DATA_DIR", default_value_os_t = default_data_dir(), global = true)]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("darkroom");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/darkroom"),
        None => PathBuf::from("darkroom-data"),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: gateway, store and local runners for the built-in apps.
    Serve(Box<serve::ServeArgs>),
    /// Run a runner that serves one app, dialling out to a gateway.
    Runner(RunnerArgs),
    /// Print `export` lines that point the fal clients at the running server (use with `eval`).
    Env(EnvArgs),
    /// Manage API keys.
    Keys {
        #[command(flatten)]
        data: DataDirArg,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Apps: list, show, deploy your own, remove, logs, and change their scaling at run time.
    Apps {
        #[command(flatten)]
        data: DataDirArg,
        #[command(subcommand)]
        command: AppsCommand,
    },
    /// Secrets for deployed apps (environment variables in every app's runners; values never shown).
    Secrets {
        #[command(flatten)]
        data: DataDirArg,
        #[command(subcommand)]
        command: deploy_cmd::SecretsCommand,
    },
    /// Inspect runners.
    Runners {
        #[command(flatten)]
        data: DataDirArg,
        #[command(subcommand)]
        command: RunnersCommand,
    },
    /// Request history: list, show, delete payloads.
    Requests {
        #[command(flatten)]
        data: DataDirArg,
        #[command(subcommand)]
        command: RequestsCommand,
    },
    /// Load generators for the benchmarks in BENCHMARKS.md (closed-loop HTTP load, status pollers).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Files in the server's storage: upload (prints a signed URL), list, download, delete.
    Files {
        #[command(flatten)]
        data: DataDirArg,
        #[command(subcommand)]
        command: files_cmd::FilesCommand,
    },
    /// Webhook deliveries: the delivery log, manual redelivery, signing-key rotation.
    Webhooks {
        #[command(flatten)]
        data: DataDirArg,
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Model weights: list, pull (with progress), verify, rm, and register your own (`add`). Works without a
    /// server; the cache is `~/.cache/darkroom/models` unless DARKROOM_MODEL_CACHE says otherwise.
    Models {
        #[command(flatten)]
        store: models_cmd::StoreArgs,
        #[command(subcommand)]
        command: models_cmd::ModelsCommand,
    },
    /// Usage and cost per time bucket and app, key or owner (table, CSV, or line items).
    Usage {
        #[command(flatten)]
        data: DataDirArg,
        #[command(flatten)]
        args: usage_cmd::UsageArgs,
    },
    /// Per-owner spending limits: list, set, remove.
    Budgets {
        #[command(flatten)]
        data: DataDirArg,
        #[command(subcommand)]
        command: usage_cmd::BudgetsCommand,
    },
    /// Serve the apps as MCP (Model Context Protocol) tools on stdin/stdout, for MCP clients that start a local
    /// command; the tools call a running server (`--url`, `--key`). HTTP clients use `/mcp` on the server instead.
    Mcp(mcp_cmd::McpArgs),
    /// Print the error catalog (Markdown).
    Errors,
    /// Copy a SQLite deployment (the data folder's database) into an empty PostgreSQL database, to run several
    /// gateways on it. Stop `darkroom serve` first; then start each gateway with `--database-url` and the data
    /// folder's server secret as DARKROOM_SERVER_SECRET.
    Migrate(MigrateArgs),
}

#[derive(clap::Args)]
struct MigrateArgs {
    #[command(flatten)]
    data: DataDirArg,
    /// The PostgreSQL database to copy into (must hold no Darkroom deployment yet).
    #[arg(long, value_name = "POSTGRES_URL")]
    to: String,
}

#[derive(clap::Args)]
struct RunnerArgs {
    /// The gateway's base URL, e.g. https://127.0.0.1:8080.
    #[arg(long, env = "DARKROOM_GATEWAY")]
    gateway: url::Url,
    /// The runner token (from `darkroom serve` or `POST /v1/runner-tokens`).
    #[arg(long, env = "DARKROOM_RUNNER_TOKEN", hide_env_values = true)]
    token: String,
    /// The app to serve, e.g. darkroom/diagnostics.
    #[arg(long, env = "DARKROOM_APP")]
    app: String,
    /// Extra CA certificate (PEM) to trust for the gateway's TLS.
    #[arg(long, env = "DARKROOM_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Exit when standard input closes (set by `darkroom serve` for its own runners).
    #[arg(long)]
    parent_stdin: bool,
    /// The most requests served at once (the app's max_multiplexing, set at the gateway, applies below it).
    #[arg(long, env = "DARKROOM_MAX_MULTIPLEXING")]
    max_multiplexing: Option<u32>,
    /// Private addresses apps may fetch input URLs from anyway: comma-separated CIDRs or addresses.
    #[arg(long, env = "DARKROOM_FETCH_ALLOW", default_value = "")]
    fetch_allow: String,
    /// Largest input file an app fetches, in bytes.
    #[arg(long, env = "DARKROOM_MAX_INPUT_SIZE", default_value_t = 512 << 20)]
    max_input_size: u64,
    /// The gateway's storage, when this runner shares it (set by `darkroom serve` for its own runners, with
    /// DARKROOM_FILES_KEY): stored inputs are then read directly rather than through the gateway.
    #[arg(long, env = "DARKROOM_STORAGE", hide_env_values = true, hide = true)]
    storage: Option<String>,
    /// The fleet slot of a runner started by `darkroom serve`.
    #[arg(long, env = "DARKROOM_RUNNER_SLOT", hide = true)]
    slot: Option<String>,
    /// Serve a deployed app from this folder (its code) instead of a built-in one: the manifest is
    /// DARKROOM_APP_MANIFEST (JSON, set by `darkroom serve`) or the folder's darkroom.toml.
    #[arg(long, env = "DARKROOM_APP_DIR")]
    app_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct EnvArgs {
    #[command(flatten)]
    data: DataDirArg,
    /// Create a new client key instead of reusing the one saved in the data folder.
    #[arg(long)]
    new_key: bool,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; the secret is printed once.
    Create {
        /// A name to recognise the key by.
        #[arg(long, default_value = "")]
        name: String,
        /// `client` (submit and read own requests) or `admin`.
        #[arg(long, default_value = "client")]
        scope: String,
        /// The owner the key belongs to (defaults to yours).
        #[arg(long)]
        owner: Option<String>,
        /// Webhook headers for this key's requests: `fal` or `standard` (Standard Webhooks).
        #[arg(long)]
        webhook_dialect: Option<String>,
    },
    /// List keys.
    List,
    /// Revoke a key by id.
    Revoke { key_id: String },
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// List deliveries, newest first.
    Ls {
        /// Only pending, delivered or dead deliveries.
        #[arg(long)]
        state: Option<String>,
        /// Only this request's deliveries.
        #[arg(long)]
        request: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Show one delivery with its payload and every attempt.
    Show { id: String },
    /// Deliver again now, with a fresh round of the retry schedule.
    Redeliver { id: String },
    /// Make a new signing key; the old one stays in the JWKS for the overlap period.
    RotateKey,
}

#[derive(Subcommand)]
enum RequestsCommand {
    /// List recent requests, newest first.
    Ls {
        /// Only this app.
        #[arg(long)]
        app: Option<String>,
        /// Only IN_QUEUE, IN_PROGRESS or COMPLETED.
        #[arg(long)]
        status: Option<String>,
        /// Only requests submitted since: RFC 3339 (2026-11-21T10:00:00Z), epoch ms, or a duration ago (30m, 2h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Only requests submitted before (same forms).
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Show one request: metadata, input, result and logs.
    Show { request_id: String },
    /// Delete a completed request's input, result and logs (its metadata stays).
    Rm { request_id: String },
}

#[derive(Subcommand)]
enum RunnersCommand {
    /// List runners: connected ones, ones starting (PENDING, PULL, SETUP) and recently ended ones (TERMINATED).
    Ls,
}

#[derive(Subcommand)]
enum AppsCommand {
    /// List apps with their scaling in effect.
    Ls,
    /// Show an app's catalog entry: description, license, endpoints and inputs, pricing, runner state.
    Show {
        /// The app, e.g. darkroom/whisper.
        app: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or change an app's scaling (fal's knobs). Changes apply at once and are kept across restarts until
    /// `--reset` (or `darkroom serve --reset-scale`). With no options, shows the knobs.
    Scale(ScaleArgs),
    /// Deploy (or redeploy) your own app: a folder with a darkroom.toml (any HTTP server), or an existing fal app
    /// as path/to/app.py::ClassName (its folder is uploaded; Darkroom reads the class's settings, builds its
    /// Python environment on the server's DARKROOM_PYTHON, which needs the `fal` package, and serves it).
    /// Runners of the previous version finish what they hold and stop.
    Deploy {
        /// A folder with a darkroom.toml, or path/to/app.py::ClassName.
        target: String,
        /// For a fal app: the app id (default: OWNER/app_name, the class's app_name or its name in kebab-case).
        #[arg(long)]
        app_id: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a deployed app (refused while it has queued or running requests).
    Rm {
        /// The app, e.g. acme/echo.
        app: String,
    },
    /// Print the logs of an app's latest requests (what the app printed, per request).
    Logs {
        /// The app, e.g. acme/echo.
        app: String,
        /// How many of the latest requests.
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
}

#[derive(clap::Args)]
struct ScaleArgs {
    /// The app, e.g. darkroom/diagnostics.
    app: String,
    /// Runners kept alive with no work (0: scale to zero).
    #[arg(long)]
    min_concurrency: Option<u32>,
    /// Most runners.
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Warm runners kept above demand.
    #[arg(long)]
    concurrency_buffer: Option<u32>,
    /// Warm runners above demand as a percentage of it (the larger of this and --concurrency-buffer applies).
    #[arg(long)]
    concurrency_buffer_perc: Option<u32>,
    /// Seconds an idle runner is kept.
    #[arg(long)]
    keep_alive: Option<u64>,
    /// Seconds a request waits in the queue before a runner is started for it.
    #[arg(long)]
    scaling_delay: Option<u64>,
    /// Requests one runner serves at once.
    #[arg(long)]
    max_multiplexing: Option<u32>,
    /// Seconds a runner has to become ready.
    #[arg(long)]
    startup_timeout: Option<u64>,
    /// Seconds a request may run.
    #[arg(long)]
    request_timeout: Option<u64>,
    /// CPU cores per runner, pinned and never shared (0: none reserved, not pinned).
    #[arg(long)]
    cpu_threads: Option<u32>,
    /// GPU memory per runner in MiB (0: no GPU).
    #[arg(long)]
    gpu_memory_mb: Option<u64>,
    /// Drop every run-time change: back to the app's deployed knobs.
    #[arg(long, conflicts_with_all = ["min_concurrency", "max_concurrency", "concurrency_buffer",
        "concurrency_buffer_perc", "keep_alive", "scaling_delay", "max_multiplexing", "startup_timeout",
        "request_timeout", "cpu_threads", "gpu_memory_mb"])]
    reset: bool,
}

fn init_tracing(filter: &str, format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log, &cli.log_format);
    // One TLS provider for every client the process builds, including the object store's (S3).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let res = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Runner(a) => {
                darkroom_runner::run_runner(darkroom_runner::RunnerConfig {
                    gateway: a.gateway,
                    token: a.token,
                    app_id: a.app,
                    ca_cert: a.ca_cert,
                    parent_stdin: a.parent_stdin,
                    max_multiplexing: a.max_multiplexing,
                    fetch_policy: darkroom_core::webhook::AddressPolicy::parse(&a.fetch_allow)
                        .map_err(|e| anyhow::anyhow!("--fetch-allow: {e}"))?,
                    max_input_size: a.max_input_size,
                    local_storage: match (&a.storage, std::env::var("DARKROOM_FILES_KEY").ok()) {
                        (Some(s), Some(k)) => Some((
                            darkroom_storage::Storage::open(
                                &darkroom_storage::StorageConfig::parse(s).map_err(anyhow::Error::msg)?,
                            )
                            .map_err(anyhow::Error::msg)?,
                            darkroom_storage::Signer::from_key_hex(&k)
                                .ok_or_else(|| anyhow::anyhow!("DARKROOM_FILES_KEY is not a 64-digit hex key"))?,
                        )),
                        _ => None,
                    },
                    slot: a.slot,
                    app_dir: a.app_dir,
                })
                .await
            }
            Command::Env(a) => env_cmd(a).await,
            Command::Keys { data, command } => keys_cmd(&data.data_dir, command).await,
            Command::Runners { data, command: RunnersCommand::Ls } => {
                let c = client::Client::admin(&data.data_dir)?;
                let v = c.get("/v1/runners").await?;
                println!(
                    "{:<38} {:<24} {:<10} {:>7} {:>5}  {:<8} NOTE",
                    "RUNNER", "APP", "STATE", "PID", "JOBS", "CPUS"
                );
                for r in v["runners"].as_array().cloned().unwrap_or_default() {
                    let cpus: Vec<String> =
                        r["cpus"].as_array().map(|a| a.iter().map(|c| c.to_string()).collect()).unwrap_or_default();
                    let kind = if r["slot"].is_null() { "remote" } else { "" };
                    let note = [kind, r["message"].as_str().unwrap_or("")]
                        .into_iter()
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                        .join("; ");
                    println!(
                        "{:<38} {:<24} {:<10} {:>7} {:>2}/{:<2}  {:<8} {}",
                        r["runner_id"].as_str().unwrap_or(""),
                        r["app_id"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["pid"],
                        r["in_flight"].as_array().map_or(0, |a| a.len()),
                        r["max_multiplexing"],
                        cpus.join(","),
                        note
                    );
                }
                Ok(())
            }
            Command::Apps { data, command } => apps_cmd(&data.data_dir, command).await,
            Command::Secrets { data, command } => {
                deploy_cmd::secrets(&client::Client::admin(&data.data_dir)?, command).await
            }
            Command::Requests { data, command } => requests_cmd(&data.data_dir, command).await,
            Command::Webhooks { data, command } => webhooks_cmd(&data.data_dir, command).await,
            Command::Files { data, command } => files_cmd::run(&data.data_dir, command).await,
            Command::Bench(c) => bench::run(c).await,
            Command::Models { store, command } => models_cmd::run(&store, command).await,
            Command::Usage { data, args } => usage_cmd::usage(&client::Client::admin(&data.data_dir)?, args).await,
            Command::Budgets { data, command } => {
                usage_cmd::budgets(&client::Client::admin(&data.data_dir)?, command).await
            }
            Command::Mcp(a) => mcp_cmd::run(a).await,
            Command::Errors => {
                print!("{}", darkroom_core::error::catalog_markdown());
                Ok(())
            }
            Command::Migrate(a) => migrate_cmd(a).await,
        }
    });
    // Blocking reads (a runner's stdin watch) must not hold the exit up.
    rt.shutdown_background();
    res
}

async fn apps_cmd(data_dir: &std::path::Path, command: AppsCommand) -> anyhow::Result<()> {
    let c = client::Client::admin(data_dir)?;
    match command {
        AppsCommand::Ls => {
            let v = c.get("/v1/apps").await?;
            println!("{:<28} {:>4} {:>4} {:>4} {:>10} {:>6}  TITLE", "APP", "MIN", "MAX", "MUX", "KEEP_ALIVE", "CPUS");
            for a in v["apps"].as_array().cloned().unwrap_or_default() {
                let s = &a["scaling"];
                println!(
                    "{:<28} {:>4} {:>4} {:>4} {:>9}s {:>6}  {}",
                    a["id"].as_str().unwrap_or(""),
                    s["min_concurrency"].to_string(),
                    s["max_concurrency"].to_string(),
                    s["max_multiplexing"].to_string(),
                    s["keep_alive"].to_string(),
                    s["cpu_threads"].to_string(),
                    a["title"].as_str().unwrap_or("")
                );
            }
        }
        AppsCommand::Show { app, json } => usage_cmd::show_app(&c, &app, json).await?,
        AppsCommand::Deploy { target, app_id, json } => {
            deploy_cmd::deploy(&c, &target, app_id.as_deref(), json).await?
        }
        AppsCommand::Rm { app } => deploy_cmd::remove(&c, &app).await?,
        AppsCommand::Logs { app, limit } => deploy_cmd::logs(&c, &app, limit).await?,
        AppsCommand::Scale(a) => {
            let path = format!("/v1/apps/{}/scale", a.app.trim_matches('/'));
            let mut patch = serde_json::Map::new();
            let mut put = |k: &str, v: Option<u64>| {
                if let Some(v) = v {
                    patch.insert(k.into(), v.into());
                }
            };
            put("min_concurrency", a.min_concurrency.map(u64::from));
            put("max_concurrency", a.max_concurrency.map(u64::from));
            put("concurrency_buffer", a.concurrency_buffer.map(u64::from));
            put("concurrency_buffer_perc", a.concurrency_buffer_perc.map(u64::from));
            put("keep_alive", a.keep_alive);
            put("scaling_delay", a.scaling_delay);
            put("max_multiplexing", a.max_multiplexing.map(u64::from));
            put("startup_timeout", a.startup_timeout);
            put("request_timeout", a.request_timeout);
            put("cpu_threads", a.cpu_threads.map(u64::from));
            put("gpu_memory_mb", a.gpu_memory_mb);
            let v = if a.reset {
                c.delete(&path).await?
            } else if patch.is_empty() {
                c.get(&path).await?
            } else {
                c.patch(&path, &serde_json::Value::Object(patch)).await?
            };
            let overrides: Vec<&String> = v["overrides"].as_object().map(|o| o.keys().collect()).unwrap_or_default();
            println!("{}", v["app_id"].as_str().unwrap_or(""));
            if let Some(s) = v["scaling"].as_object() {
                for (k, val) in s {
                    let mark = if overrides.contains(&k) { "  (changed at run time)" } else { "" };
                    println!("  {k:<24} {val}{mark}");
                }
            }
            let runners = v["runners"].as_array().map_or(0, |r| r.len());
            println!("  runners now: {runners}");
        }
    }
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

async fn env_cmd(a: EnvArgs) -> anyhow::Result<()> {
    let dir = &a.data.data_dir;
    let c = client::Client::admin(dir)?;
    let key_file = dir.join("client.key");
    let key = match std::fs::read_to_string(&key_file) {
        Ok(k) if !a.new_key && !k.trim().is_empty() && c.key_works(k.trim()).await => k.trim().to_string(),
        _ => {
            let v = c.post("/v1/keys", &json!({"name": "darkroom env", "scope": "client"})).await?;
            let k = v["key"].as_str().context("server returned no key")?.to_string();
            serve::write_private(&key_file, &k)?;
            k
        }
    };
    let info = &c.info;
    let url = url::Url::parse(&info.url)?;
    let hostport =
        format!("{}{}", url.host_str().unwrap_or("127.0.0.1"), url.port().map(|p| format!(":{p}")).unwrap_or_default());
    let path = url.path().trim_end_matches('/');
    println!("# Darkroom at {} (data folder {})", info.url, dir.display());
    println!("export FAL_KEY={}", shell_quote(&key));
    println!("export FAL_RUN_HOST={}", shell_quote(&format!("{hostport}{path}/run")));
    println!("export FAL_QUEUE_RUN_HOST={}", shell_quote(&format!("{hostport}{path}/queue")));
    if let Some(bundle) = &info.ca_bundle {
        println!("export SSL_CERT_FILE={}", shell_quote(bundle));
    }
    if let Some(ca) = &info.ca_cert {
        println!("export NODE_EXTRA_CA_CERTS={}", shell_quote(ca));
    }
    if url.scheme() != "https" {
        println!("# Without --tls the Python client cannot connect (it always uses https); the JS recipe below works.");
    }
    let base = info.url.trim_end_matches('/');
    println!("#");
    println!(
        "# Python uploads (fal_client.upload, upload_file, upload_image) need two lines after `import fal_client`:"
    );
    println!("#   fal_client.client.REST_URL = \"{base}/rest\"");
    println!("#   fal_client.client.CDN_URL = \"{base}/cdn\"");
    println!("#");
    println!("# JavaScript (@fal-ai/client), with FAL_KEY from the environment:");
    println!("#   import {{ createFalClient }} from \"@fal-ai/client\";");
    println!("#   const BASE = \"{base}\";");
    println!("#   const rewrite = (u) => u.replace(/^https:\\/\\/queue\\.fal\\.run\\//, `${{BASE}}/queue/`)");
    println!(
        "#     .replace(/^https:\\/\\/fal\\.run\\//, `${{BASE}}/run/`).replace(/^https:\\/\\/rest\\.fal\\.ai\\//, `${{BASE}}/rest/`);"
    );
    println!(
        "#   export const fal = createFalClient({{ requestMiddleware: async (r) => ({{ ...r, url: rewrite(r.url) }}) }});"
    );
    println!(
        "# Or the proxy protocol: createFalClient({{ proxyUrl: {{ url: \"{base}/api/fal/proxy\", when: \"always\" }} }})"
    );
    Ok(())
}

async fn keys_cmd(dir: &Path, cmd: KeysCommand) -> anyhow::Result<()> {
    let c = client::Client::admin(dir)?;
    match cmd {
        KeysCommand::Create { name, scope, owner, webhook_dialect } => {
            let mut body = json!({"name": name, "scope": scope});
            if let Some(d) = webhook_dialect {
                body["webhook_dialect"] = Value::String(d);
            }
            if let Some(o) = owner {
                body["owner_id"] = Value::String(o);
            }
            let v = c.post("/v1/keys", &body).await?;
            eprintln!(
                "Key created for owner {} with scope {}. The secret is shown only now:",
                v["owner_id"], v["scope"]
            );
            println!("{}", v["key"].as_str().unwrap_or_default());
        }
        KeysCommand::List => {
            let v = c.get("/v1/keys").await?;
            println!("{:<20} {:<16} {:<7} {:<9} NAME", "KEY", "OWNER", "SCOPE", "STATE");
            for k in v["keys"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<20} {:<16} {:<7} {:<9} {}",
                    k["key_id"].as_str().unwrap_or(""),
                    k["owner_id"].as_str().unwrap_or(""),
                    k["scope"].as_str().unwrap_or(""),
                    if k["revoked_at"].is_null() { "active" } else { "revoked" },
                    k["name"].as_str().unwrap_or("")
                );
            }
        }
        KeysCommand::Revoke { key_id } => {
            c.delete(&format!("/v1/keys/{key_id}")).await?;
            println!("revoked {key_id}");
        }
    }
    Ok(())
}

async fn requests_cmd(dir: &Path, cmd: RequestsCommand) -> anyhow::Result<()> {
    let c = client::Client::admin(dir)?;
    match cmd {
        RequestsCommand::Ls { app, status, since, until, limit } => {
            let mut q = format!("/v1/requests?limit={limit}");
            for (k, v) in [("since", since), ("until", until)] {
                if let Some(v) = v {
                    q.push_str(&format!(
                        "&{k}={}",
                        url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
                    ));
                }
            }
            if let Some(a) = app {
                q.push_str(&format!(
                    "&app_id={}",
                    url::form_urlencoded::byte_serialize(a.as_bytes()).collect::<String>()
                ));
            }
            if let Some(s) = status {
                q.push_str(&format!("&status={s}"));
            }
            let v = c.get(&q).await?;
            println!("{:<38} {:<24} {:<12} {:>3} {:<25} ERROR", "REQUEST", "APP", "STATUS", "TRY", "CREATED");
            for r in v["requests"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<38} {:<24} {:<12} {:>3} {:<25} {}",
                    r["request_id"].as_str().unwrap_or(""),
                    r["app_id"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or(""),
                    r["attempts"],
                    r["created_at"].as_str().unwrap_or(""),
                    r["error_type"].as_str().unwrap_or("")
                );
            }
        }
        RequestsCommand::Show { request_id } => {
            let v = c.get(&format!("/v1/requests/{request_id}")).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        RequestsCommand::Rm { request_id } => {
            c.delete(&format!("/v1/requests/{request_id}")).await?;
            println!("deleted the input, result and logs of {request_id}");
        }
    }
    Ok(())
}

async fn webhooks_cmd(dir: &Path, cmd: WebhooksCommand) -> anyhow::Result<()> {
    let c = client::Client::admin(dir)?;
    match cmd {
        WebhooksCommand::Ls { state, request, limit } => {
            let mut q = format!("/v1/webhooks?limit={limit}");
            if let Some(s) = state {
                q.push_str(&format!("&state={s}"));
            }
            if let Some(r) = request {
                q.push_str(&format!("&request_id={r}"));
            }
            let v = c.get(&q).await?;
            println!(
                "{:<38} {:<38} {:<10} {:>4} {:>6} {:<25} URL",
                "DELIVERY", "REQUEST", "STATE", "TRY", "LAST", "NEXT"
            );
            for d in v["webhooks"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<38} {:<38} {:<10} {:>4} {:>6} {:<25} {}",
                    d["id"].as_str().unwrap_or(""),
                    d["request_id"].as_str().unwrap_or(""),
                    d["state"].as_str().unwrap_or(""),
                    d["attempts"],
                    d["last_status"].as_i64().map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    d["next_attempt_at"].as_str().unwrap_or("-"),
                    d["url"].as_str().unwrap_or("")
                );
            }
        }
        WebhooksCommand::Show { id } => {
            let v = c.get(&format!("/v1/webhooks/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        WebhooksCommand::Redeliver { id } => {
            c.post(&format!("/v1/webhooks/{id}/redeliver"), &json!({})).await?;
            println!("redelivery of {id} scheduled");
        }
        WebhooksCommand::RotateKey => {
            let v = c.post("/v1/webhooks/keys/rotate", &json!({})).await?;
            println!("new signing key {}", v["kid"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// Refuses `--no-auth` unless every listen address is loopback.
pub fn check_no_auth(addr: &SocketAddr, no_auth: bool) -> anyhow::Result<()> {
    if no_auth && !addr.ip().is_loopback() {
        bail!("--no-auth is only allowed on a loopback address (listening on {addr})");
    }
    Ok(())
}

#[allow(dead_code)]
fn _unused(_: Arc<()>) {}

async fn migrate_cmd(a: MigrateArgs) -> anyhow::Result<()> {
    use darkroom_store::sqlite::{Durability, SqliteStore};
    let dir = std::path::absolute(&a.data.data_dir)?;
    let db = dir.join("darkroom.db");
    if !db.exists() {
        bail!("no SQLite database at {}", db.display());
    }
    // Holding the data folder's lock: no `darkroom serve` is writing to it meanwhile.
    let _lock = serve::lock_data_dir(&dir).context("stop `darkroom serve` on this data folder first")?;
    let src = SqliteStore::open(&db, Durability::Full).await.context("opening the SQLite database")?;
    let dst = darkroom_store::PgStore::connect(&a.to).await.context("connecting to PostgreSQL")?;
    let counts = darkroom_store::migrate::count_rows(&src).await?;
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let bar = indicatif::ProgressBar::new(total.max(0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>20} [{bar:40}] {pos}/{len} rows ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut base = 0i64;
    let mut current = String::new();
    let mut last = 0i64;
    let report = darkroom_store::migrate::sqlite_to_postgres(&src, &dst, now_ms(), |table, done| {
        if table != current {
            base += last;
            current = table.to_string();
        }
        last = done;
        bar.set_message(table.to_string());
        bar.set_position((base + done) as u64);
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    src.close().await;
    dst.close().await;
    for (t, n) in &report.tables {
        println!("{t:<20} {n:>10} rows");
    }
    if report.requeued + report.ended > 0 {
        println!(
            "recovered first: {} running requests back in the queue, {} open sync/stream requests ended",
            report.requeued, report.ended
        );
    }
    println!(
        "\nDone. Start each gateway with:\n  DARKROOM_SERVER_SECRET=\"$(cat {})\" darkroom serve --database-url '<url>'",
        dir.join("server.secret").display()
    );
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
