//! Darkroom's gateway: the fal-compatible HTTP/TLS API, authentication, and the runner control channel.
//!
//! One module per resource, each with a `router()`: [`queue`] (submit, status, status stream, result, cancel),
//! [`run`] (sync run and stream), [`admin`] (keys, runner tokens, runners, requests, apps), [`proxy`] (the JS
//! client's `x-fal-target-url` proxy protocol), [`hub`] (runner connections and dispatch), [`openapi`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use darkroom_core::app::{AppSpec, CompiledApp};
use darkroom_core::auth::{NewSecret, Scope, keyed_hash, random_token};
use darkroom_core::job::JobRecord;
use darkroom_core::{Clock, Millis};
use darkroom_store::{AttemptResult, KeyRecord, RunnerTokenRecord, Store};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

pub mod admin;
pub mod auth;
pub mod billing;
pub mod catalog;
pub mod cluster;
pub mod deploy;
pub mod error;
pub mod falapp;
pub mod files;
pub mod fleet;
pub mod http;
pub mod hub;
pub mod mcp;
pub mod metrics;
pub mod openapi;
pub mod payloads;
pub mod proxy;
pub mod queue;
pub mod realtime;
pub mod run;
pub mod server;
pub mod tls;
pub mod webhooks;

/// Gateway settings (the CLI fills them from flags and environment).
#[derive(Clone)]
pub struct GatewayConfig {
    /// External base URL (scheme, host, port, optional path) for absolute URLs in responses.
    pub public_url: Option<url::Url>,
    /// Whether the listener speaks TLS (used for URLs when no public URL is set).
    pub tls: bool,
    /// Accept every request as the local admin. Only allowed on loopback listeners.
    pub no_auth: bool,
    /// Attempts per job before it fails (fal retries up to 10 times).
    pub max_attempts: i64,
    /// Lease length; runners heartbeat at a third of it.
    pub lease_ms: i64,
    /// How many sync or stream requests per key may wait at interactive priority.
    pub interactive_cap: i64,
    /// Queued requests per app beyond which submits get 429 (`fal_max_queue_length` may ask for less).
    pub max_queue_length: i64,
    /// Requests one key may have queued or running at once (0: no limit).
    pub max_concurrent_per_key: i64,
    /// Submits, runs and streams per second per key, as a token bucket with a burst of the same size (0: no limit).
    pub rate_limit_per_key: f64,
    /// How long an `Idempotency-Key` keeps returning its first request.
    pub idempotency_window: Duration,
    /// How long results, inputs and logs of completed requests are kept (None: forever).
    pub retention: Option<Duration>,
    /// Largest request body accepted.
    pub body_limit: usize,
    /// The keyed-hash secret for API keys and runner tokens.
    pub server_secret: Vec<u8>,
    /// A key the proxy endpoint acts with when a browser request carries none.
    pub proxy_key: Option<String>,
    /// Delay before each webhook attempt; its length is the number of attempts.
    pub webhook_schedule: darkroom_core::webhook::Schedule,
    /// Which addresses webhooks may reach (private ranges only through the allow-list).
    pub webhook_policy: darkroom_core::webhook::AddressPolicy,
    /// Header dialect when a request asks for none.
    pub webhook_dialect: darkroom_core::webhook::Dialect,
    /// Standard Webhooks `v1` HMAC secret (adds a `v1` signature beside `v1a`).
    pub webhook_hmac_secret: Option<Vec<u8>>,
    /// Per-attempt timeout.
    pub webhook_timeout: Duration,
    /// How long a retired signing key stays in the JWKS.
    pub webhook_key_overlap: Duration,
    /// Sharing the store with other gateways (None: this gateway is the store's only one).
    pub cluster: Option<cluster::ClusterConfig>,
    /// Object storage for files (None: process memory, for tests).
    pub storage: Option<darkroom_storage::Storage>,
    /// Largest file accepted (uploads, parts and outputs).
    pub max_file_size: u64,
    /// How long a signed file URL stays valid (never past the file's own expiry).
    pub file_url_ttl: Duration,
    /// Expiry of files whose upload asks for none (None: kept until deleted).
    pub files_expire_after: Option<Duration>,
    /// Forget every app's run-time scaling changes at start (a redeploy keeps them otherwise).
    pub reset_scale: bool,
    /// What each app costs (the operator's price book).
    pub prices: darkroom_core::billing::PriceBook,
    /// A realtime session with no input for this long gets fal's `TIMEOUT` error frame and is closed.
    pub realtime_idle_timeout: Duration,
    /// How long a realtime connection waits for a runner of its app to become ready.
    pub realtime_start_timeout: Duration,
    /// The Python with the `fal` SDK that reads a `fal.App`'s settings at deploy time (runners get their own).
    pub python: String,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("public_url", &self.public_url.as_ref().map(|u| u.as_str()))
            .field("tls", &self.tls)
            .field("no_auth", &self.no_auth)
            .field("max_attempts", &self.max_attempts)
            .field("lease_ms", &self.lease_ms)
            .field("server_secret", &"<redacted>")
            .field("proxy_key", &self.proxy_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            public_url: None,
            tls: false,
            no_auth: false,
            max_attempts: 10,
            lease_ms: 30_000,
            interactive_cap: 8,
            max_queue_length: 100_000,
            idempotency_window: Duration::from_secs(24 * 3600),
            max_concurrent_per_key: 0,
            rate_limit_per_key: 0.0,
            retention: None,
            body_limit: 32 * 1024 * 1024,
            server_secret: vec![],
            proxy_key: None,
            webhook_schedule: Default::default(),
            webhook_policy: Default::default(),
            webhook_dialect: darkroom_core::webhook::Dialect::Fal,
            webhook_hmac_secret: None,
            webhook_timeout: Duration::from_secs(15),
            webhook_key_overlap: Duration::from_secs(48 * 3600),
            cluster: None,
            storage: None,
            max_file_size: 2 << 30,
            file_url_ttl: Duration::from_secs(7 * 24 * 3600),
            files_expire_after: Some(Duration::from_secs(30 * 24 * 3600)),
            reset_scale: false,
            prices: Default::default(),
            realtime_idle_timeout: Duration::from_secs(60),
            realtime_start_timeout: Duration::from_secs(300),
            python: "python3".into(),
        }
    }
}

/// The apps this gateway serves: a snapshot map swapped on each change, so readers never wait on a deploy.
pub struct AppRegistry {
    map: std::sync::RwLock<Arc<HashMap<String, Arc<CompiledApp>>>>,
}

impl AppRegistry {
    pub fn new(apps: HashMap<String, Arc<CompiledApp>>) -> AppRegistry {
        AppRegistry { map: std::sync::RwLock::new(Arc::new(apps)) }
    }

    pub fn get(&self, id: &str) -> Option<Arc<CompiledApp>> {
        self.map.read().unwrap().get(id).cloned()
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.map.read().unwrap().contains_key(id)
    }

    /// Every app now.
    pub fn all(&self) -> Arc<HashMap<String, Arc<CompiledApp>>> {
        self.map.read().unwrap().clone()
    }

    /// Every app id, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.map.read().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }

    pub(crate) fn insert(&self, app: Arc<CompiledApp>) {
        let mut m = self.map.write().unwrap();
        let mut next = (**m).clone();
        next.insert(app.spec.id.clone(), app);
        *m = Arc::new(next);
    }

    pub(crate) fn remove(&self, id: &str) -> Option<Arc<CompiledApp>> {
        let mut m = self.map.write().unwrap();
        let mut next = (**m).clone();
        let old = next.remove(id);
        *m = Arc::new(next);
        old
    }
}

/// What a stream subscriber receives.
#[derive(Debug, Clone)]
pub enum StreamMsg {
    Partial(Value),
    Done,
}

/// The gateway's shared state.
pub struct Gateway {
    pub cfg: GatewayConfig,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub boot_id: String,
    /// When this gateway started.
    pub started_at: Millis,
    /// Built-in apps and deployed ones (deploys and removals change it at run time).
    pub apps: AppRegistry,
    /// Deployed apps' records (code bundle, manifest, version).
    pub deployments: deploy::Deployments,
    pub hub: hub::Hub,
    /// Scaling knobs, local runner processes, the autoscaler.
    pub fleet: fleet::Fleet,
    pub keys: auth::KeyCache,
    /// Job ids whose state changed (status streams and waiters filter on it).
    pub events: broadcast::Sender<String>,
    /// Partial outputs for open `/stream` requests.
    pub streams: Mutex<HashMap<String, mpsc::UnboundedSender<StreamMsg>>>,
    /// Per-key token buckets: (tokens, last refill).
    pub rate_buckets: Mutex<HashMap<String, (f64, std::time::Instant)>>,
    /// Latest progress report of running jobs.
    pub progress: Mutex<HashMap<String, Value>>,
    pub shutdown: CancellationToken,
    /// Wakes the webhook dispatcher (a request finished, or a redelivery was asked for).
    pub webhook_kick: tokio::sync::Notify,
    /// Webhook signing keys, oldest first.
    pub signing_keys: std::sync::RwLock<Vec<darkroom_store::SigningKeyRecord>>,
    /// TLS for webhook targets: the system's CAs.
    pub webhook_tls: Arc<rustls::ClientConfig>,
    /// Whether this gateway runs the sweepers (always, alone on its store; the lock holder in a cluster).
    pub leader: std::sync::atomic::AtomicBool,
    /// Cancelled when the cluster declared this gateway dead.
    pub dead: CancellationToken,
    /// Stream jobs running here whose clients are on other gateways.
    pub relays: Mutex<HashMap<String, cluster::Relay>>,
    /// Gateway-to-gateway credentials and client.
    pub cluster_token: String,
    pub cluster_http: reqwest::Client,
    /// Where files live, and the key their URLs are signed with.
    pub storage: darkroom_storage::Storage,
    pub signer: darkroom_storage::Signer,
    /// Owners' budgets, read through a short cache.
    pub budgets: billing::BudgetCache,
    /// Realtime sessions and their token key.
    pub realtime: realtime::Realtime,
    pub(crate) router: OnceLock<Router>,
}

impl Gateway {
    /// Starts a boot: records it in the store (revoking the previous boot's runner tokens and ending its leases).
    pub async fn new(
        cfg: GatewayConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        apps: Vec<AppSpec>,
    ) -> anyhow::Result<Arc<Gateway>> {
        let boot_id = darkroom_core::ids::new_request_id();
        let now = clock.now_ms();
        let report = match &cfg.cluster {
            None => store.start_boot(&boot_id, now).await?,
            Some(c) => {
                store.join_cluster(&boot_id, c.url.as_deref(), now).await?;
                match &c.previous_boot {
                    Some(prev) => store.reap_boots(i64::MIN, Some(prev), now).await?,
                    None => darkroom_store::BootReport::default(),
                }
            }
        };
        tracing::info!(
            %boot_id,
            store = store.kind(),
            cluster = cfg.cluster.is_some(),
            requeued = report.requeued.len(),
            failed = report.failed.len(),
            tokens_revoked = report.tokens_revoked,
            "boot recorded"
        );
        let mut compiled = HashMap::new();
        for spec in apps {
            let app = CompiledApp::compile(spec).map_err(|e| anyhow::anyhow!(e))?;
            compiled.insert(app.spec.id.clone(), Arc::new(app));
        }
        metrics::install();
        let cluster_token = cluster::cluster_token(&cfg.server_secret);
        let leader = cfg.cluster.is_none();
        let cluster_http = reqwest::Client::builder()
            .use_preconfigured_tls((*darkroom_core::tls::client_config(None).map_err(anyhow::Error::msg)?).clone())
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let storage = match &cfg.storage {
            Some(s) => s.clone(),
            None => {
                darkroom_storage::Storage::open(&darkroom_storage::StorageConfig::Memory).map_err(anyhow::Error::msg)?
            }
        };
        let signer = darkroom_storage::Signer::from_server_secret(&cfg.server_secret);
        let gw = Arc::new(Gateway {
            storage,
            signer,
            cfg,
            store,
            clock,
            boot_id,
            started_at: now,
            apps: AppRegistry::new(compiled),
            deployments: Default::default(),
            hub: hub::Hub::default(),
            fleet: fleet::Fleet::default(),
            keys: auth::KeyCache::default(),
            events: broadcast::channel(4096).0,
            streams: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            rate_buckets: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            webhook_kick: tokio::sync::Notify::new(),
            signing_keys: std::sync::RwLock::new(vec![]),
            webhook_tls: darkroom_core::tls::client_config(None).map_err(anyhow::Error::msg)?,
            leader: std::sync::atomic::AtomicBool::new(leader),
            dead: CancellationToken::new(),
            relays: Mutex::new(HashMap::new()),
            cluster_token,
            cluster_http,
            budgets: Default::default(),
            realtime: Default::default(),
            router: OnceLock::new(),
        });
        webhooks::load_keys(&gw).await?;
        gw.fleet.init(gw.apps.all().values().map(|a| (a.spec.id.clone(), a.spec.scaling.clone())));
        deploy::load(&gw).await?;
        if gw.cfg.reset_scale {
            for app in gw.apps.ids() {
                gw.store.set_app_scaling(&app, None, now).await?;
            }
            tracing::info!("run-time scaling changes reset to the apps' deployed knobs");
        }
        gw.fleet.load_patches(&gw).await;
        metrics::set_leader(leader);
        let _ = gw.router.set(http::router(gw.clone()));
        Ok(gw)
    }

    /// Takes a token from the key's bucket; on refusal, the seconds until one is available.
    pub fn take_rate_token(&self, key_id: &str) -> Result<(), u64> {
        let rate = self.cfg.rate_limit_per_key;
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = rate.max(1.0);
        let now = std::time::Instant::now();
        let mut m = self.rate_buckets.lock().unwrap();
        if m.len() > 100_000 {
            // Full buckets carry no state worth keeping.
            m.retain(|_, (t, at)| *t + at.elapsed().as_secs_f64() * rate < burst);
        }
        let (tokens, at) = m.entry(key_id.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }

    /// When this gateway started, as RFC 3339.
    pub fn boot_started_iso(&self) -> String {
        darkroom_core::iso8601(self.started_at)
    }

    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    /// The full HTTP service.
    pub fn router(&self) -> Router {
        self.router.get().expect("router is set in new()").clone()
    }

    /// Tells status streams and waiters that a job changed.
    pub fn job_changed(&self, id: &str) {
        let _ = self.events.send(id.to_string());
    }

    /// A job reached COMPLETED: wake waiters and streams, count it.
    pub fn job_finished(&self, job: &JobRecord) {
        self.progress.lock().unwrap().remove(&job.id);
        if let Some(tx) = self.streams.lock().unwrap().get(&job.id) {
            let _ = tx.send(StreamMsg::Done);
        }
        metrics::job_completed(job);
        if job.webhook_url.is_some() {
            self.webhook_kick.notify_one();
        }
        tracing::info!(
            request_id = %job.id,
            app = %job.app_id,
            attempts = job.attempts,
            status = job.result_status,
            error_type = job.error_type.as_deref().unwrap_or(""),
            "request completed"
        );
        self.job_changed(&job.id);
    }

    /// Another gateway completed a job: wake this one's waiters and streams (it counted and logged it).
    pub fn finished_elsewhere(&self, id: &str) {
        self.progress.lock().unwrap().remove(id);
        if let Some(tx) = self.streams.lock().unwrap().get(id) {
            let _ = tx.send(StreamMsg::Done);
        }
        self.webhook_kick.notify_one();
        self.job_changed(id);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// [`Gateway::job_finished`] by id; streams and waiters are woken even if the job cannot be re-read.
    pub async fn finished_by_id(&self, id: &str) {
        match self.store.get_job(id).await {
            Ok(Some(j)) => self.job_finished(&j),
            _ => {
                if let Some(tx) = self.streams.lock().unwrap().get(id) {
                    let _ = tx.send(StreamMsg::Done);
                }
                self.job_changed(id);
            }
        }
    }

    /// Starts the background tasks: sweeper, dispatchers, webhook delivery.
    pub fn start_background(self: &Arc<Self>) {
        hub::start_dispatchers(self);
        tokio::spawn(self.clone().run_sweeper());
        tokio::spawn(webhooks::run_dispatcher(self.clone()));
        if let Some(c) = &self.cfg.cluster {
            tokio::spawn(cluster::run_heartbeat(self.clone(), c.clone()));
        }
        if let Some(rx) = self.store.subscribe() {
            tokio::spawn(cluster::follow_events(self.clone(), rx));
        }
    }

    /// Applies the results of ended attempts: requeued jobs wake their dispatcher, completed ones their waiters.
    pub async fn attempts_ended(&self, results: &[(String, AttemptResult)]) {
        for (id, r) in results {
            self.relays.lock().unwrap().remove(id);
            match r {
                AttemptResult::Completed => self.finished_by_id(id).await,
                AttemptResult::Requeued => {
                    self.job_changed(id);
                    if let Ok(Some(j)) = self.store.get_job(id).await {
                        self.hub.kick(&j.app_id);
                    }
                }
                AttemptResult::Stale => {}
            }
        }
    }

    /// Creates an API key; returns the credential (`key_id:secret`), shown once.
    pub async fn create_key(&self, owner_id: &str, scope: Scope, name: &str) -> anyhow::Result<(KeyRecord, String)> {
        self.create_key_with(owner_id, scope, name, None).await
    }

    /// [`Gateway::create_key`] with a webhook dialect for the key's requests.
    pub async fn create_key_with(
        &self,
        owner_id: &str,
        scope: Scope,
        name: &str,
        webhook_dialect: Option<String>,
    ) -> anyhow::Result<(KeyRecord, String)> {
        let s = NewSecret::generate();
        let rec = KeyRecord {
            key_id: s.key_id.clone(),
            owner_id: owner_id.into(),
            secret_hash: keyed_hash(&self.cfg.server_secret, &s.secret),
            scope: scope.as_str().into(),
            name: name.into(),
            created_at: self.now(),
            revoked_at: None,
            webhook_dialect,
        };
        self.store.insert_key(&rec).await?;
        Ok((rec, s.credential()))
    }

    /// Checks that a key credential is valid and active (the local admin key file is checked at start).
    pub async fn key_is_valid(&self, credential: &str) -> bool {
        let mut h = axum::http::HeaderMap::new();
        match format!("Key {credential}").parse() {
            Ok(v) => {
                h.insert("authorization", v);
                self.authenticate(&h).await.is_ok()
            }
            Err(_) => false,
        }
    }

    /// Mints a runner token for this boot (optionally bound to one app).
    pub async fn mint_runner_token(&self, app_id: Option<&str>) -> anyhow::Result<String> {
        let token = random_token();
        self.store
            .insert_runner_token(&RunnerTokenRecord {
                token_hash: keyed_hash(&self.cfg.server_secret, &token),
                boot_id: self.boot_id.clone(),
                app_id: app_id.map(str::to_string),
                created_at: self.now(),
                revoked_at: None,
            })
            .await?;
        Ok(token)
    }

    /// Cancels a job wherever it is; pushes a cancel to its runner if it was running.
    pub async fn cancel_job(&self, id: &str) -> Result<darkroom_store::CancelResult, darkroom_store::StoreError> {
        let res = self.store.cancel(id, self.now()).await?;
        if let darkroom_store::CancelResult::Cancelled { running_on } = &res {
            if let Some((runner, token)) = running_on {
                self.hub
                    .send(runner, darkroom_core::protocol::GatewayFrame::Cancel { job_id: id.into(), token: *token });
            }
            self.finished_by_id(id).await;
        }
        Ok(res)
    }

    /// Background work: lease expiry, start deadlines, gauges. Runs until shutdown.
    pub async fn run_sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_purge = 0;
        let mut last_file_sweep = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let now = self.now();
            if let Ok(depths) = self.store.app_depths().await {
                metrics::set_depths(&self.apps.all(), &depths);
            }
            if !self.is_leader() {
                // Another gateway sweeps the shared store.
                continue;
            }
            match self.store.expire_leases(now).await {
                Ok(r) if !r.is_empty() => {
                    tracing::warn!(count = r.len(), "leases expired");
                    for (id, _) in &r {
                        self.hub.lease_lost(id);
                        self.relays.lock().unwrap().remove(id);
                    }
                    self.attempts_ended(&r).await;
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "lease expiry failed"),
            }
            match self.store.expire_start_deadlines(now).await {
                Ok(ids) => {
                    for id in ids {
                        self.finished_by_id(&id).await;
                    }
                }
                Err(e) => tracing::error!(error = %e, "deadline expiry failed"),
            }
            if now - last_file_sweep >= 10_000 {
                last_file_sweep = now;
                self.sweep_files(now).await;
            }
            if let Some(keep) = self.cfg.retention
                && now - last_purge >= 60_000
            {
                last_purge = now;
                match self.store.purge_payloads(now - keep.as_millis() as i64, now, 1_000).await {
                    Ok(ids) if !ids.is_empty() => {
                        for id in &ids {
                            payloads::delete(&self, id).await;
                        }
                        tracing::info!(count = ids.len(), "retention: payloads deleted");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                }
            }
        }
    }
}
