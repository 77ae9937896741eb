//! The runner agent: connects to the gateway, receives assignments and runs them with a built-in model.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use darkroom_core::protocol::{GatewayFrame, PROTOCOL_VERSION, RunnerFrame};
use darkroom_models::{Model, ModelError, ModelEvent, RunContext};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

/// How a runner finds and joins its gateway.
#[derive(Clone)]
pub struct RunnerConfig {
    /// The gateway's base URL (`http://` or `https://`).
    pub gateway: url::Url,
    pub token: String,
    pub app_id: String,
    /// Extra CA certificate (PEM) to trust, e.g. Darkroom's local CA.
    pub ca_cert: Option<PathBuf>,
    /// Exit when standard input closes: set for runners spawned by `darkroom serve`, so they die with it.
    pub parent_stdin: bool,
    /// Overrides the model's `max_multiplexing`.
    pub max_multiplexing: Option<u32>,
    /// Which addresses input URLs may reach (private ones only through its allow-list).
    pub fetch_policy: darkroom_core::webhook::AddressPolicy,
    /// Largest input file a model may fetch.
    pub max_input_size: u64,
    /// The gateway's storage and file-URL key, when this runner shares them (local runners): inputs stored in
    /// Darkroom are then read directly instead of over HTTP.
    pub local_storage: Option<(darkroom_storage::Storage, darkroom_storage::Signer)>,
    /// The fleet slot, for runners the gateway started (`DARKROOM_RUNNER_SLOT`).
    pub slot: Option<String>,
    /// A deployed app's folder: serve it with the `http` executor instead of a built-in model.
    pub app_dir: Option<PathBuf>,
}

impl std::fmt::Debug for RunnerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerConfig")
            .field("gateway", &self.gateway.as_str())
            .field("token", &"<redacted>")
            .field("app_id", &self.app_id)
            .finish()
    }
}

/// The gateway refused the runner's credentials: retrying will not help.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the gateway refused this runner: {}", self.0)
    }
}
impl std::error::Error for Refused {}

/// Where the runner is in its life, as it tells the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Pull(String),
    Setup(String),
    Ready,
    Failed(String),
}

impl Phase {
    fn wire(&self) -> (&'static str, Option<String>) {
        match self {
            Phase::Pull(m) => ("pull", Some(m.clone())),
            Phase::Setup(m) => ("setup", Some(m.clone())),
            Phase::Ready => ("ready", None),
            Phase::Failed(m) => ("failed", Some(m.clone())),
        }
    }
}

/// A deployed app: the manifest from `DARKROOM_APP_MANIFEST` (JSON) or the folder's `darkroom.toml`, secrets from
/// `DARKROOM_APP_SECRETS` (a JSON object), environments under `DARKROOM_ENV_CACHE` on `DARKROOM_PYTHON`.
fn deployed_app(app_id: &str, dir: &std::path::Path) -> anyhow::Result<Arc<dyn Model>> {
    use darkroom_models::http_app::{HttpApp, HttpAppManifest};
    let app = match std::env::var("DARKROOM_APP_MANIFEST") {
        Ok(json) => {
            let mut m: HttpAppManifest = serde_json::from_str(&json).context("DARKROOM_APP_MANIFEST")?;
            m.normalize();
            m.validate().map_err(|e| anyhow::anyhow!("DARKROOM_APP_MANIFEST: {e}"))?;
            HttpApp::new(m, dir)
        }
        Err(_) => HttpApp::from_dir(dir).map_err(anyhow::Error::msg)?,
    };
    if app.manifest().app.id != app_id {
        bail!("the folder holds app '{}', not '{app_id}'", app.manifest().app.id);
    }
    let secrets: std::collections::BTreeMap<String, String> = match std::env::var("DARKROOM_APP_SECRETS") {
        Ok(json) => serde_json::from_str(&json).context("DARKROOM_APP_SECRETS")?,
        Err(_) => Default::default(),
    };
    let mut app = app.with_env(secrets);
    if let Ok(data) = std::env::var("DARKROOM_APP_DATA_DIR") {
        app = app.with_data_dir(data);
    }
    if let Ok(origin) = std::env::var("DARKROOM_APP_FILES_ORIGIN") {
        app = app.with_env([("DARKROOM_FILES_ORIGIN".to_string(), origin)]);
    }
    // The fal toolkit's file outputs upload to the gateway with an upload-only key (never the runner token).
    if let (Ok(key), Ok(host)) = (std::env::var("DARKROOM_APP_UPLOAD_KEY"), std::env::var("DARKROOM_APP_REST_HOST")) {
        let mut env = vec![("FAL_KEY".to_string(), key), ("FAL_REST_HOST".to_string(), host)];
        if let Ok(bundle) = std::env::var("DARKROOM_APP_CA_BUNDLE") {
            env.push(("SSL_CERT_FILE".into(), bundle.clone()));
            env.push(("REQUESTS_CA_BUNDLE".into(), bundle));
        }
        app = app.with_env(env);
    }
    if let Ok(cache) = std::env::var("DARKROOM_ENV_CACHE") {
        app = app.with_env_cache(cache, std::env::var("DARKROOM_PYTHON").unwrap_or_else(|_| "python3".into()));
    }
    Ok(Arc::new(app))
}

/// Runs until the gateway refuses us, SIGTERM has drained us, or (with `parent_stdin`) the parent goes away.
pub async fn run_runner(cfg: RunnerConfig) -> anyhow::Result<()> {
    let model = match &cfg.app_dir {
        Some(dir) => deployed_app(&cfg.app_id, dir)?,
        None => darkroom_models::load_builtin(&cfg.app_id)
            .with_context(|| format!("no built-in app '{}' in this binary", cfg.app_id))?,
    };
    // Setup (weights, loading) runs while the control channel comes up, so the gateway sees PULL and SETUP.
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Setup(String::new()));
    {
        let model = model.clone();
        tokio::spawn(async move {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let report = darkroom_models::SetupReporter(tx);
            let setup = model.setup(&report);
            tokio::pin!(setup);
            let res = loop {
                tokio::select! {
                    r = &mut setup => break r,
                    Some((stage, msg)) = rx.recv() => {
                        tracing::info!(stage = ?stage, "{msg}");
                        let _ = phase_tx.send(match stage {
                            darkroom_models::SetupStage::Pull => Phase::Pull(msg),
                            darkroom_models::SetupStage::Setup => Phase::Setup(msg),
                        });
                    }
                }
            };
            match res {
                Ok(()) => {
                    tracing::info!("model ready");
                    let _ = phase_tx.send(Phase::Ready);
                }
                Err(e) => {
                    tracing::error!(error = %e, "model setup failed");
                    let _ = phase_tx.send(Phase::Failed(e));
                }
            }
        });
    }
    // SIGTERM drains: no new work, running jobs finish, then the process exits. A second SIGTERM exits at once.
    let drain = CancellationToken::new();
    // A model that can serve nothing more (a deployed app's server died) ends the runner: it drains at once (the
    // gateway stops assigning to it), the fleet restarts it with backoff, and the request that was running is
    // retried within its attempts.
    {
        let (model, drain) = (model.clone(), drain.clone());
        tokio::spawn(async move {
            let why = model.fatal().await;
            tracing::error!(reason = %why, "the app cannot serve any more; exiting so that a new runner starts");
            drain.cancel();
            // Lets the failing request's answer and the draining notice reach the gateway first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::process::exit(70);
        });
    }
    {
        let drain = drain.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            term.recv().await;
            tracing::info!("SIGTERM: draining (finishing running requests, taking no new ones)");
            drain.cancel();
            term.recv().await;
            tracing::warn!("second SIGTERM: exiting now");
            std::process::exit(143);
        });
    }
    if cfg.parent_stdin {
        // Liveness: a local runner's stdin is a pipe from `darkroom serve`; EOF means the parent died.
        tokio::spawn(async {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 256];
            loop {
                match tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await {
                    Ok(0) | Err(_) => {
                        tracing::info!("parent closed stdin; exiting");
                        std::process::exit(0);
                    }
                    Ok(_) => {}
                }
            }
        });
    }
    let files = Arc::new(crate::files::FileSettings {
        gateway: cfg.gateway.clone(),
        gateway_http: reqwest::Client::builder()
            .use_preconfigured_tls((*crate::tls::client_config(cfg.ca_cert.as_deref())?).clone())
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .build()?,
        external_tls: crate::tls::client_config(None)?,
        local: cfg.local_storage.clone(),
        policy: cfg.fetch_policy.clone(),
        max_input_size: cfg.max_input_size,
        fetch_timeout: Duration::from_secs(120),
    });
    let mut backoff = Duration::from_millis(200);
    let mut reconnect = false;
    loop {
        // A failed setup is reported to the gateway once (its queued requests fail with the reason), then exits.
        if reconnect && let Phase::Failed(e) = &*phase_rx.borrow() {
            bail!("model setup failed: {e}");
        }
        let res =
            connect_and_serve(&cfg, model.clone(), files.clone(), phase_rx.clone(), drain.clone(), reconnect).await;
        reconnect = true;
        match res {
            Ok(Ended::Drained) => {
                tracing::info!("drained; exiting");
                return Ok(());
            }
            Ok(Ended::Lost) => backoff = Duration::from_millis(200),
            Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
            Err(e) => tracing::warn!(error = %e, "control channel lost"),
        }
        if drain.is_cancelled() {
            // Draining with no channel: nothing can be delivered any more.
            return Ok(());
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn ws_url(gateway: &url::Url) -> anyhow::Result<url::Url> {
    let mut u = gateway.join("/internal/runner/connect")?;
    let scheme = match u.scheme() {
        "https" | "wss" => "wss",
        "http" | "ws" => "ws",
        s => bail!("unsupported gateway scheme '{s}'"),
    };
    u.set_scheme(scheme).map_err(|_| anyhow::anyhow!("bad gateway URL"))?;
    Ok(u)
}

struct Running {
    token: i64,
    cancel: CancellationToken,
}

/// How a control channel ended without an error.
enum Ended {
    /// The gateway closed it or is shutting down: reconnect.
    Lost,
    /// Drained after SIGTERM: exit.
    Drained,
}

async fn connect_and_serve(
    cfg: &RunnerConfig,
    model: Arc<dyn Model>,
    files: Arc<crate::files::FileSettings>,
    mut phase: tokio::sync::watch::Receiver<Phase>,
    drain: CancellationToken,
    reconnect: bool,
) -> anyhow::Result<Ended> {
    let url = ws_url(&cfg.gateway)?;
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {}", cfg.token).parse()?);
    let connector = if url.scheme() == "wss" {
        Some(tokio_tungstenite::Connector::Rustls(crate::tls::client_config(cfg.ca_cert.as_deref())?))
    } else {
        None
    };
    let (ws, _) = match tokio_tungstenite::connect_async_tls_with_config(req, None, true, connector).await {
        Ok(x) => x,
        Err(tungstenite::Error::Http(resp)) if resp.status() == 401 || resp.status() == 403 => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).to_string()).unwrap_or_default();
            return Err(Refused(format!("{} {}", resp.status(), body)).into());
        }
        Err(e) => return Err(e.into()),
    };
    let (mut sink, mut stream) = ws.split();
    // The app's max_multiplexing (set at the gateway, changeable at run time) applies below this.
    let capacity = cfg.max_multiplexing.unwrap_or(1024).max(1);
    let (state, _) = phase.borrow_and_update().wire();
    // Told to drain before it could connect: it says so at once and gets nothing.
    let state = if drain.is_cancelled() { "draining" } else { state };
    let hello = RunnerFrame::Hello {
        protocol: PROTOCOL_VERSION,
        app_id: cfg.app_id.clone(),
        max_multiplexing: capacity,
        slot: cfg.slot.clone(),
        state: Some(state.into()),
        reconnect,
        pid: std::process::id(),
        hints: vec![],
        version: env!("CARGO_PKG_VERSION").into(),
    };
    sink.send(Message::text(serde_json::to_string(&hello)?)).await?;
    let heartbeat_ms = match stream.next().await {
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<GatewayFrame>(&t)? {
            GatewayFrame::Welcome { runner_id, heartbeat_ms, .. } => {
                tracing::info!(%runner_id, app = %cfg.app_id, capacity, "runner connected");
                heartbeat_ms
            }
            // Refused at hello (wrong app, old protocol): retrying would only be refused again.
            GatewayFrame::Shutdown { reason } => return Err(Refused(reason).into()),
            other => bail!("expected welcome, got {other:?}"),
        },
        other => bail!("expected welcome, got {other:?}"),
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<RunnerFrame>();
    let mut jobs: HashMap<String, Running> = HashMap::new();
    let mut sessions = crate::realtime::Sessions::default();
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_ms.max(100)));
    let mut draining = false;
    // What it is doing while not ready yet (the hello carries the state, this the message).
    let (state, message) = phase.borrow().wire();
    if state != "ready" {
        let _ = out_tx.send(RunnerFrame::State { state: state.into(), message });
    }
    if drain.is_cancelled() {
        draining = true;
        let _ = out_tx.send(RunnerFrame::State { state: "draining".into(), message: None });
    }
    // Once setup's sender is gone, `changed()` returns at once forever: stop polling it.
    let mut phase_open = true;
    let result = loop {
        if let Phase::Failed(e) = &*phase.borrow() {
            // The failed state (queued above or below) goes out with the flush after the loop.
            break Err(anyhow::anyhow!("model setup failed: {e}"));
        }
        if draining && jobs.is_empty() {
            break Ok(Ended::Drained);
        }
        tokio::select! {
            _ = drain.cancelled(), if !draining => {
                draining = true;
                let _ = out_tx.send(RunnerFrame::State { state: "draining".into(), message: None });
            }
            changed = phase.changed(), if phase_open => {
                if changed.is_err() { phase_open = false; continue; }
                let (state, message) = phase.borrow_and_update().wire();
                let _ = out_tx.send(RunnerFrame::State { state: state.into(), message });
            }
            msg = stream.next() => {
                let frame = match msg {
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<GatewayFrame>(&t) {
                        Ok(f) => f,
                        Err(e) => { tracing::warn!(error = %e, "bad frame from gateway"); continue; }
                    },
                    Some(Ok(Message::Close(_))) | None => break Ok(Ended::Lost),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Err(e.into()),
                };
                match frame {
                    GatewayFrame::Assign { job_id, token, .. } if draining => {
                        // Crossed our draining notice: hand it back to the queue (503 is retried).
                        let _ = out_tx.send(RunnerFrame::Complete {
                            job_id, token, status: 503,
                            body: json!({"detail": "The runner is draining", "error_type": "runner_disconnected"}),
                            error_type: Some("runner_disconnected".into()), inference_ms: None, units: None,
                        });
                    }
                    GatewayFrame::Assign { job_id, token, attempt, path, input, inline_outputs, upload_token, .. } => {
                        let cancel = CancellationToken::new();
                        jobs.insert(job_id.clone(), Running { token, cancel: cancel.clone() });
                        let _ = out_tx.send(RunnerFrame::Ack { job_id: job_id.clone(), token });
                        let io = Arc::new(crate::files::JobFiles { settings: files.clone(), upload_token });
                        let job = Job { job_id, token, attempt, path, input, inline_outputs, files: io };
                        tokio::spawn(execute(model.clone(), job, cancel, out_tx.clone()));
                    }
                    GatewayFrame::Cancel { job_id, token } => {
                        if let Some(r) = jobs.get(&job_id)
                            && r.token == token { r.cancel.cancel(); }
                    }
                    GatewayFrame::Refused { job_id, reason, .. } => {
                        tracing::warn!(%job_id, %reason, "gateway refused a frame");
                    }
                    GatewayFrame::Shutdown { reason } => {
                        tracing::info!(%reason, "gateway shutting down");
                        break Ok(if draining { Ended::Drained } else { Ended::Lost });
                    }
                    GatewayFrame::RealtimeOpen { session_id, path } => {
                        sessions.open(model.clone(), session_id, path, out_tx.clone());
                    }
                    GatewayFrame::RealtimeInput { session_id, binary, data } => {
                        sessions.input(&session_id, binary, data);
                    }
                    GatewayFrame::RealtimeClose { session_id } => sessions.close(&session_id),
                    GatewayFrame::Welcome { .. } => {}
                }
            }
            Some(frame) = out_rx.recv() => {
                // Whatever else is queued goes out in the same write (realtime frames under load), then one flush.
                let mut batch = vec![frame];
                while batch.len() < 64 {
                    match out_rx.try_recv() {
                        Ok(f) => batch.push(f),
                        Err(_) => break,
                    }
                }
                let mut failed = None;
                for frame in batch {
                    if let RunnerFrame::Complete { job_id, token, .. } = &frame
                        && jobs.get(job_id).is_some_and(|r| r.token == *token) {
                            jobs.remove(job_id);
                        }
                    if let Err(e) = sink.feed(Message::text(serde_json::to_string(&frame)?)).await {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    break Err(e.into());
                }
                if let Err(e) = sink.flush().await {
                    break Err(e.into());
                }
            }
            _ = heartbeat.tick() => {
                let running = jobs.keys().cloned().collect();
                if let Err(e) = sink.send(Message::text(serde_json::to_string(&RunnerFrame::Heartbeat { running })?)).await {
                    break Err(e.into());
                }
            }
        }
    };
    // Frames already queued (a drained runner's last completion, its draining notice) still go out.
    while let Ok(frame) = out_rx.try_recv() {
        if sink.send(Message::text(serde_json::to_string(&frame)?)).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
    // Our leases are gone with the channel: stop everything.
    for (_, r) in jobs.drain() {
        r.cancel.cancel();
    }
    // Sessions are pinned to this channel; the gateway tells their clients.
    sessions.close_all();
    result
}

/// One assignment.
struct Job {
    job_id: String,
    token: i64,
    attempt: i64,
    path: String,
    input: serde_json::Value,
    inline_outputs: bool,
    files: Arc<crate::files::JobFiles>,
}

async fn execute(model: Arc<dyn Model>, job: Job, cancel: CancellationToken, out: mpsc::UnboundedSender<RunnerFrame>) {
    let Job { job_id, token, attempt, path, input, inline_outputs, files } = job;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let ctx = RunContext::new(job_id.clone(), attempt, path, cancel, ev_tx).with_files(files, inline_outputs);
    let fwd = {
        let out = out.clone();
        let job_id = job_id.clone();
        tokio::spawn(async move {
            let mut units = None;
            while let Some(ev) = ev_rx.recv().await {
                let frame = match ev {
                    ModelEvent::BillableUnits(u) => {
                        units = Some(u);
                        continue;
                    }
                    ModelEvent::Log { level, message } => RunnerFrame::Log {
                        job_id: job_id.clone(),
                        token,
                        level,
                        message,
                        timestamp: darkroom_core::Clock::now_ms(&darkroom_core::SystemClock),
                    },
                    ModelEvent::Progress { fraction, message } => {
                        RunnerFrame::Progress { job_id: job_id.clone(), token, fraction, message }
                    }
                    ModelEvent::Partial(data) => RunnerFrame::Partial { job_id: job_id.clone(), token, data },
                };
                let _ = out.send(frame);
            }
            units
        })
    };
    let started = std::time::Instant::now();
    // A panicking model fails its request (500) instead of leaving it running.
    let res = match tokio::spawn(async move { model.run(input, ctx).await }).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(request_id = %job_id, error = %e, "model panicked");
            Err(ModelError::App { status: 500, body: json!({"detail": "Internal error in the model"}) })
        }
    };
    let inference_ms = Some(started.elapsed().as_millis() as i64);
    // Every event the model sent goes out before the completion.
    let units = fwd.await.unwrap_or(None);
    let frame = match res {
        Ok(body) => RunnerFrame::Complete { job_id, token, status: 200, body, error_type: None, inference_ms, units },
        Err(ModelError::Cancelled) => RunnerFrame::Complete {
            job_id,
            token,
            status: 499,
            body: json!({"detail": "Request was cancelled", "error_type": "request_cancelled"}),
            error_type: Some("request_cancelled".into()),
            inference_ms,
            units: None,
        },
        Err(ModelError::App { status, body }) => {
            RunnerFrame::Complete { job_id, token, status, body, error_type: None, inference_ms, units: None }
        }
    };
    let _ = out.send(frame);
}
