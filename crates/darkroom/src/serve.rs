//! `darkroom serve`: the gateway on the embedded defaults (SQLite and files in the data folder, runner processes
//! on this machine).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use darkroom_core::auth::Scope;
use darkroom_gateway::{Gateway, GatewayConfig};
use darkroom_store::Store;
use darkroom_store::sqlite::{Durability, SqliteStore};

use crate::DataDirArg;
use crate::client::ServerInfo;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// Address to listen on. Port 0 picks a free port (see server.json for the one chosen).
    #[arg(long, env = "DARKROOM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Serve HTTPS. Without --tls-cert/--tls-key, a local CA and certificate are made in the data folder on first
    /// start (the Python fal client only speaks HTTPS).
    #[arg(long, env = "DARKROOM_TLS")]
    pub tls: bool,
    /// TLS certificate chain (PEM) to serve instead of the local CA's.
    #[arg(long, env = "DARKROOM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, env = "DARKROOM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The URL clients reach this server at, when behind a proxy (e.g. https://darkroom.example.com). Used for the
    /// absolute URLs in responses.
    #[arg(long, env = "DARKROOM_PUBLIC_URL")]
    pub public_url: Option<url::Url>,
    /// Accept requests without keys, as the local admin. Refused unless listening on loopback.
    #[arg(long, env = "DARKROOM_NO_AUTH")]
    pub no_auth: bool,
    /// Attempts per request before it fails (runner lost, or the app answered 503/504).
    #[arg(long, env = "DARKROOM_MAX_ATTEMPTS", default_value_t = 10)]
    pub max_attempts: i64,
    /// Runner lease length in milliseconds; runners heartbeat at a third of it.
    #[arg(long, env = "DARKROOM_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: i64,
    /// Queued requests per app beyond which submits are refused with 429 and Retry-After (a request's
    /// `fal_max_queue_length` may ask for less).
    #[arg(long, env = "DARKROOM_MAX_QUEUE_LENGTH", default_value_t = 100_000)]
    pub max_queue_length: i64,
    /// Requests one API key may have queued or running at once; more get 429 (0: no limit).
    #[arg(long, env = "DARKROOM_MAX_CONCURRENT_PER_KEY", default_value_t = 0)]
    pub max_concurrent_per_key: i64,
    /// Submits, runs and streams per second per API key (a token bucket with an equal burst); more get 429 with
    /// Retry-After (0: no limit). Status polls are not counted.
    #[arg(long, env = "DARKROOM_RATE_LIMIT_PER_KEY", default_value_t = 0.0)]
    pub rate_limit_per_key: f64,
    /// Seconds an `Idempotency-Key` on submit keeps returning its first request.
    #[arg(long, env = "DARKROOM_IDEMPOTENCY_WINDOW_SECS", default_value_t = 86_400)]
    pub idempotency_window_secs: u64,
    /// Days the inputs, results and logs of completed requests are kept before they are deleted (0: forever).
    #[arg(long, env = "DARKROOM_RETENTION_DAYS", default_value_t = 30)]
    pub retention_days: u64,
    /// Largest request body, in bytes.
    #[arg(long, env = "DARKROOM_BODY_LIMIT", default_value_t = 32 * 1024 * 1024)]
    pub body_limit: usize,
    /// The store: a PostgreSQL URL (`postgres://user:password@host:5432/db`) shared by every gateway of a cluster.
    /// Without it, a SQLite database in the data folder (one gateway). Every gateway sharing a database must have
    /// the same DARKROOM_SERVER_SECRET.
    #[arg(long, env = "DARKROOM_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the other gateways of a cluster reach this one (for streams whose runner is on another gateway).
    /// Default: the listening address.
    #[arg(long, env = "DARKROOM_CLUSTER_URL")]
    pub cluster_url: Option<url::Url>,
    /// Milliseconds between a clustered gateway's heartbeats; one silent for 10 heartbeats is reaped as dead.
    #[arg(long, env = "DARKROOM_HEARTBEAT_MS", default_value_t = 1_000)]
    pub heartbeat_ms: u64,
    /// SQLite durability: `full` (fsync every commit) or `normal` (survives process crashes only).
    #[arg(long, env = "DARKROOM_SQLITE_SYNC", default_value = "full")]
    pub sqlite_sync: String,
    /// A key (`key_id:secret`) the /api/fal/proxy endpoint acts with for requests that carry none (browsers).
    #[arg(long, env = "DARKROOM_PROXY_KEY", hide_env_values = true)]
    pub proxy_key: Option<String>,
    /// Webhook retry schedule: the delay before each attempt (ms, s, m, h). Default: 10 attempts over about 2 hours.
    #[arg(long, env = "DARKROOM_WEBHOOK_SCHEDULE", default_value = "0,10s,30s,1m,3m,5m,10m,20m,30m,50m")]
    pub webhook_schedule: String,
    /// Private addresses webhooks may reach anyway: comma-separated CIDRs or addresses (e.g. 127.0.0.1/32,10.0.0.0/8).
    #[arg(long, env = "DARKROOM_WEBHOOK_ALLOW", default_value = "")]
    pub webhook_allow: String,
    /// Webhook header dialect when a request asks for none: `fal` or `standard` (Standard Webhooks).
    #[arg(long, env = "DARKROOM_WEBHOOK_DIALECT", default_value = "fal")]
    pub webhook_dialect: String,
    /// Standard Webhooks secret (`whsec_…`): adds an HMAC `v1` signature beside the Ed25519 `v1a` one.
    #[arg(long, env = "DARKROOM_WEBHOOK_HMAC_SECRET", hide_env_values = true)]
    pub webhook_hmac_secret: Option<String>,
    /// Per-attempt webhook timeout, in milliseconds.
    #[arg(long, env = "DARKROOM_WEBHOOK_TIMEOUT_MS", default_value_t = 15_000)]
    pub webhook_timeout_ms: u64,
    /// Hours a rotated-out signing key stays published in the JWKS.
    #[arg(long, env = "DARKROOM_WEBHOOK_KEY_OVERLAP_HOURS", default_value_t = 48)]
    pub webhook_key_overlap_hours: u64,
    /// Where files live: a folder, or an S3-compatible bucket (`s3://BUCKET?endpoint=http://host:port&region=…`,
    /// credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Default: `objects/` in the data folder.
    #[arg(long, env = "DARKROOM_STORAGE", hide_env_values = true)]
    pub storage: Option<String>,
    /// Largest file accepted (uploads and outputs), in bytes.
    #[arg(long, env = "DARKROOM_MAX_FILE_SIZE", default_value_t = 2 << 30)]
    pub max_file_size: u64,
    /// Seconds a signed file URL stays valid (never past the file's own expiry).
    #[arg(long, env = "DARKROOM_FILE_URL_TTL_SECS", default_value_t = 7 * 86_400)]
    pub file_url_ttl_secs: u64,
    /// Days until a file expires when its upload asks for no expiry (X-Fal-Object-Lifecycle-Preference); 0: never.
    #[arg(long, env = "DARKROOM_FILES_EXPIRE_DAYS", default_value_t = 30)]
    pub files_expire_days: u64,
    /// Private addresses that apps may fetch input URLs from anyway: comma-separated CIDRs or addresses.
    #[arg(long, env = "DARKROOM_FETCH_ALLOW", default_value = "")]
    pub fetch_allow: String,
    /// Largest input file an app fetches (data URI, stored file or URL), in bytes.
    #[arg(long, env = "DARKROOM_MAX_INPUT_SIZE", default_value_t = 512 << 20)]
    pub max_input_size: u64,
    /// Do not start local runner processes for the built-in apps (runners join with `darkroom runner`).
    #[arg(long, env = "DARKROOM_NO_LOCAL_RUNNERS")]
    pub no_local_runners: bool,
    /// CPU cores local runners may use (each runner is pinned to its app's `cpu_threads` of them; they are never
    /// shared). Default: every core this process may use.
    #[arg(long, env = "DARKROOM_RUNNER_CPUS")]
    pub runner_cpus: Option<usize>,
    /// GPUs for local runners: `auto` (nvidia-smi), `none`, or a list like `0:24GiB,1:16GiB` (declared by hand or
    /// simulated). Runners of apps with `gpu_memory_mb` go to the GPU with the most free memory.
    #[arg(long, env = "DARKROOM_GPUS", default_value = "auto")]
    pub gpus: String,
    /// Forget run-time scaling changes (`darkroom apps scale`) and start from the apps' deployed knobs.
    #[arg(long)]
    pub reset_scale: bool,
    /// A TOML price book: `currency`, `[default]` and `[apps."owner/alias"]` tables with `unit_price` (per unit of
    /// the app's billing unit) and `runner_second_price`. Without one every app costs 0 (usage is still metered).
    #[arg(long, env = "DARKROOM_PRICING", value_name = "FILE")]
    pub pricing: Option<std::path::PathBuf>,
    /// Seconds a realtime session may go without input before it gets fal's TIMEOUT error frame and is closed.
    #[arg(long, env = "DARKROOM_REALTIME_IDLE_SECS", default_value_t = 60)]
    pub realtime_idle_secs: u64,
    /// Seconds a realtime connection waits for a runner of its app to become ready (a cold start).
    #[arg(long, env = "DARKROOM_REALTIME_START_TIMEOUT_SECS", default_value_t = 300)]
    pub realtime_start_timeout_secs: u64,
    /// On SIGTERM, seconds to let running requests finish before the rest are handed back to the queue.
    #[arg(long, env = "DARKROOM_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Seconds a local runner may spend fetching weights (its PULL state) before it is stopped; the app's
    /// startup_timeout counts from the end of PULL.
    #[arg(long, env = "DARKROOM_PULL_TIMEOUT_SECS", default_value_t = 3600)]
    pub pull_timeout_secs: u64,
    /// The Python that deployed `fal.App` apps run on: it must have the `fal` SDK installed (`pip install fal`).
    /// Each app gets its own environment on top of it, one per set of requirements, cached in DATA/apps/envs.
    #[arg(long, env = "DARKROOM_PYTHON", default_value = "python3")]
    pub python: String,
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub(crate) fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("serve.lock"))?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!("another `darkroom serve` is using the data folder {}", dir.display());
    }
    Ok(f)
}

fn server_secret(dir: &Path) -> anyhow::Result<Vec<u8>> {
    if let Ok(s) = std::env::var("DARKROOM_SERVER_SECRET") {
        if s.len() < 32 {
            bail!("DARKROOM_SERVER_SECRET must be at least 32 characters");
        }
        return Ok(s.into_bytes());
    }
    let path = dir.join("server.secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => Ok(s.trim().as_bytes().to_vec()),
        _ => {
            let s = darkroom_core::auth::random_token();
            write_private(&path, &s)?;
            Ok(s.into_bytes())
        }
    }
}

pub async fn run(a: ServeArgs) -> anyhow::Result<()> {
    let dir = std::path::absolute(&a.data.data_dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating data folder {}", dir.display()))?;
    let _lock = lock_data_dir(&dir)?;
    crate::check_no_auth(&a.listen, a.no_auth)?;
    let durability = match a.sqlite_sync.as_str() {
        "full" => Durability::Full,
        "normal" => Durability::Normal,
        other => bail!("--sqlite-sync must be full or normal, not {other}"),
    };
    let secret = server_secret(&dir)?;
    let (store, closer): (Arc<dyn Store>, StoreCloser) = match &a.database_url {
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            let s = Arc::new(darkroom_store::PgStore::connect(u).await.context("connecting to PostgreSQL")?);
            (s.clone(), StoreCloser::Pg(s))
        }
        Some(u) => bail!("--database-url must be a postgres:// URL (got {:?})", u.split(':').next().unwrap_or("")),
        None => {
            let s = Arc::new(
                SqliteStore::open(&dir.join("darkroom.db"), durability).await.context("opening the database")?,
            );
            (s.clone(), StoreCloser::Sqlite(s))
        }
    };
    // Keys are stored as keyed hashes: a gateway with another secret would refuse every key. Say so instead.
    let check = darkroom_core::auth::keyed_hash(&secret, "darkroom-secret-check-v1");
    if store.ensure_setting("server_secret_check", &check).await? != check {
        bail!(
            "this database was set up with a different server secret (keys could not be checked): give every gateway \
             sharing it the same DARKROOM_SERVER_SECRET"
        );
    }
    let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if a.tls { "https" } else { "http" };
    let local_host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let local_host = if local_host.contains(':') { format!("[{local_host}]") } else { local_host };
    let local_url = format!("{scheme}://{local_host}:{}", addr.port());
    let boot_file = dir.join("boot.id");
    let cluster = (store.kind() == "postgres").then(|| darkroom_gateway::cluster::ClusterConfig {
        url: Some(
            a.cluster_url.as_ref().map(|u| u.as_str().trim_end_matches('/').to_string()).unwrap_or(local_url.clone()),
        ),
        previous_boot: std::fs::read_to_string(&boot_file).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()),
        heartbeat: std::time::Duration::from_millis(a.heartbeat_ms.max(50)),
        dead_after: std::time::Duration::from_millis(a.heartbeat_ms.max(50) * 10),
    });

    let tls_files = if a.tls {
        Some(match (&a.tls_cert, &a.tls_key) {
            (Some(c), Some(k)) => {
                darkroom_gateway::tls::TlsFiles { cert: c.clone(), key: k.clone(), ca_cert: None, ca_bundle: None }
            }
            _ => {
                let extra: Vec<String> = a.public_url.iter().filter_map(|u| u.host_str().map(str::to_string)).collect();
                darkroom_gateway::tls::ensure_local_ca(&dir.join("tls"), &extra)?
            }
        })
    } else {
        None
    };
    let tls_config = tls_files.as_ref().map(|t| darkroom_gateway::tls::server_config(&t.cert, &t.key)).transpose()?;

    let storage_spec = a.storage.clone().unwrap_or_else(|| dir.join("objects").display().to_string());
    let storage = darkroom_storage::Storage::open(
        &darkroom_storage::StorageConfig::parse(&storage_spec).map_err(|e| anyhow::anyhow!("--storage: {e}"))?,
    )
    .map_err(|e| anyhow::anyhow!("--storage: {e}"))?;
    darkroom_core::webhook::AddressPolicy::parse(&a.fetch_allow).map_err(|e| anyhow::anyhow!("--fetch-allow: {e}"))?;
    tracing::info!(storage = storage.describe(), "files");
    let cfg = GatewayConfig {
        public_url: a.public_url.clone(),
        tls: a.tls,
        no_auth: a.no_auth,
        max_attempts: a.max_attempts.max(1),
        lease_ms: a.lease_ms.max(300),
        body_limit: a.body_limit,
        max_queue_length: a.max_queue_length.max(0),
        max_concurrent_per_key: a.max_concurrent_per_key.max(0),
        rate_limit_per_key: a.rate_limit_per_key.max(0.0),
        retention: (a.retention_days > 0).then(|| std::time::Duration::from_secs(a.retention_days * 86_400)),
        idempotency_window: std::time::Duration::from_secs(a.idempotency_window_secs),
        server_secret: secret,
        proxy_key: a.proxy_key.clone(),
        webhook_schedule: darkroom_core::webhook::Schedule::parse(&a.webhook_schedule)
            .map_err(|e| anyhow::anyhow!("--webhook-schedule: {e}"))?,
        webhook_policy: darkroom_core::webhook::AddressPolicy::parse(&a.webhook_allow)
            .map_err(|e| anyhow::anyhow!("--webhook-allow: {e}"))?,
        webhook_dialect: darkroom_core::webhook::Dialect::parse(&a.webhook_dialect)
            .ok_or_else(|| anyhow::anyhow!("--webhook-dialect must be fal or standard"))?,
        webhook_hmac_secret: match &a.webhook_hmac_secret {
            Some(s) => Some(darkroom_core::webhook::decode_whsec(s).context("--webhook-hmac-secret is not base64")?),
            None => None,
        },
        webhook_timeout: std::time::Duration::from_millis(a.webhook_timeout_ms.max(1)),
        webhook_key_overlap: std::time::Duration::from_secs(a.webhook_key_overlap_hours * 3600),
        cluster,
        storage: Some(storage.clone()),
        max_file_size: a.max_file_size,
        file_url_ttl: std::time::Duration::from_secs(a.file_url_ttl_secs.max(60)),
        files_expire_after: (a.files_expire_days > 0)
            .then(|| std::time::Duration::from_secs(a.files_expire_days * 86_400)),
        reset_scale: a.reset_scale,
        realtime_idle_timeout: std::time::Duration::from_secs(a.realtime_idle_secs.max(1)),
        realtime_start_timeout: std::time::Duration::from_secs(a.realtime_start_timeout_secs.max(1)),
        python: a.python.clone(),
        prices: match &a.pricing {
            None => Default::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read the price book {}: {e}", p.display()))?;
                darkroom_core::billing::PriceBook::from_toml(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
            }
        },
        ..GatewayConfig::default()
    };
    let apps = darkroom_models::builtin_specs();
    let gw = Gateway::new(cfg, store.clone(), Arc::new(darkroom_core::SystemClock), apps).await?;
    write_private(&boot_file, &gw.boot_id)?;

    // The local admin key: kept across restarts while the database knows it.
    let admin_path = dir.join("local-admin.key");
    let existing = std::fs::read_to_string(&admin_path).ok().map(|s| s.trim().to_string());
    let valid = match &existing {
        Some(k) if !a.no_auth => gw.key_is_valid(k).await,
        Some(k) => store.get_key(k.split(':').next().unwrap_or("")).await?.is_some_and(|r| r.revoked_at.is_none()),
        None => false,
    };
    if !valid {
        let (_, credential) = gw.create_key(darkroom_gateway::auth::LOCAL_OWNER, Scope::Admin, "local admin").await?;
        write_private(&admin_path, &credential)?;
    }

    if let Some(k) = &a.proxy_key {
        if !gw.key_is_valid(k).await {
            bail!("--proxy-key is not a valid, active key");
        }
        let id = k.split(':').next().unwrap_or("");
        if store.get_key(id).await?.is_some_and(|r| r.scope != "client") {
            bail!("--proxy-key must be a client-scoped key: browsers use it without holding it");
        }
    }

    let url = a
        .public_url
        .as_ref()
        .map(|u| u.as_str().trim_end_matches('/').to_string())
        .unwrap_or_else(|| local_url.clone());

    gw.start_background();
    let server = tokio::spawn(darkroom_gateway::server::serve(listener, gw.router(), tls_config, gw.shutdown.clone()));

    let gpus = match a.gpus.trim() {
        "auto" => darkroom_gateway::fleet::detect_gpus(),
        spec => darkroom_core::scaling::Inventory::parse_gpus(spec).map_err(|e| anyhow::anyhow!("--gpus: {e}"))?,
    };
    let local = if a.no_local_runners {
        None
    } else {
        Some(darkroom_gateway::fleet::LocalRunners {
            exe: std::env::current_exe().context("finding the darkroom executable")?,
            gateway_url: local_url.clone(),
            ca_cert: tls_files.as_ref().and_then(|t| t.ca_cert.clone()),
            nice: 10,
            // Local runners share the storage and read stored inputs directly.
            env: vec![
                ("DARKROOM_STORAGE".into(), storage_spec.clone()),
                ("DARKROOM_FILES_KEY".into(), gw.signer.key_hex()),
                ("DARKROOM_FETCH_ALLOW".into(), a.fetch_allow.clone()),
                ("DARKROOM_MAX_INPUT_SIZE".into(), a.max_input_size.to_string()),
                ("DARKROOM_PYTHON".into(), a.python.clone()),
            ]
            .into_iter()
            .chain(
                // Deployed apps trust the system's CAs and ours (the fal toolkit uploads to us over TLS).
                tls_files
                    .as_ref()
                    .and_then(|t| t.ca_bundle.as_ref())
                    .map(|b| ("DARKROOM_APP_CA_BUNDLE".to_string(), b.display().to_string())),
            )
            .collect(),
            inventory: darkroom_core::scaling::Inventory {
                cpus: darkroom_gateway::fleet::cpu_inventory(a.runner_cpus),
                gpus,
            },
            stop_grace: std::time::Duration::from_secs(a.drain_timeout_secs.max(1)),
            pull_timeout: std::time::Duration::from_secs(a.pull_timeout_secs.max(1)),
            work_dir: dir.join("apps"),
        })
    };
    darkroom_gateway::fleet::Fleet::start(&gw, local);

    let info = ServerInfo {
        url: url.clone(),
        listen: addr.to_string(),
        ca_cert: tls_files.as_ref().and_then(|t| t.ca_cert.as_ref().map(|p| p.display().to_string())),
        ca_bundle: tls_files.as_ref().and_then(|t| t.ca_bundle.as_ref().map(|p| p.display().to_string())),
        pid: std::process::id(),
        boot_id: gw.boot_id.clone(),
    };
    write_private(&dir.join("server.json"), &serde_json::to_string_pretty(&info)?)?;
    tracing::info!(%url, data_dir = %dir.display(), tls = a.tls, "darkroom is serving");
    eprintln!(
        "Darkroom is serving at {url}\nPoint the fal clients at it with: eval \"$(darkroom env --data-dir {})\"",
        dir.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = gw.dead.cancelled() => {}
    }
    // Drain: nothing new is assigned or started; running requests get --drain-timeout-secs to finish. Queued ones
    // stay queued (durable) for the next start; submits are still accepted meanwhile.
    let drain = std::time::Duration::from_secs(a.drain_timeout_secs);
    let in_flight = gw.hub.in_flight_count();
    tracing::info!(in_flight, timeout_s = drain.as_secs(), "draining");
    gw.fleet.drain(&gw);
    let deadline = std::time::Instant::now() + drain;
    while !gw.dead.is_cancelled() && gw.hub.in_flight_count() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let left = gw.hub.in_flight_count();
    if left > 0 {
        tracing::warn!(left, "drain timeout: the requests still running go back to the queue");
    }
    tracing::info!("shutting down");
    let _ = std::fs::remove_file(dir.join("server.json"));
    // Runners first, so leases still held are released (requeued) while the store is still open.
    gw.fleet.stop_all(std::time::Duration::from_secs(2)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gw.hub.list().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gw.shutdown.cancel();
    let _ = server.await;
    if gw.cfg.cluster.is_some() && !gw.dead.is_cancelled() {
        // Leave the cluster now rather than when the others notice the silence.
        match store.reap_boots(i64::MIN, Some(&gw.boot_id), gw.now()).await {
            Ok(r) => tracing::info!(failed = r.failed.len(), requeued = r.requeued.len(), "left the cluster"),
            Err(e) => tracing::warn!(error = %e, "leaving the cluster failed; the others will reap this gateway"),
        }
    }
    // Let in-flight store calls of background tasks finish before the pools close.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    match closer {
        StoreCloser::Sqlite(s) => s.close().await,
        StoreCloser::Pg(s) => s.close().await,
    }
    if gw.dead.is_cancelled() {
        bail!("stopped: the cluster declared this gateway dead");
    }
    Ok(())
}

/// The concrete store, to close it at exit.
enum StoreCloser {
    Sqlite(Arc<SqliteStore>),
    Pg(Arc<darkroom_store::PgStore>),
}
