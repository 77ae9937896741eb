//! The runner fleet: each app's scaling knobs (as deployed, plus run-time changes kept in the store), the
//! autoscaler loop that starts and stops this gateway's local runner processes, placement on CPU cores and GPUs,
//! restart backoff for crashing runners, `request_timeout`, and drain.
//!
//! Runner states, as `GET /v1/runners` shows them: PENDING (waiting for cores, a GPU or backoff, or started and
//! not yet connected), PULL and SETUP (connected, getting ready), IDLE and RUNNING, DRAINING (finishing its
//! requests, taking none), TERMINATED (kept for a few minutes with the reason).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use darkroom_core::Millis;
use darkroom_core::scaling::{
    Allocation, AppLoad, Inventory, Phase, Placement, Request, RunnerView, ScalingKnobs, ScalingPatch, StopReason,
    autoscale, place,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Gateway;
use crate::hub::{ConnPhase, RunnerInfo};
use crate::metrics;

/// How this gateway starts runner processes on its own machine.
#[derive(Clone)]
pub struct LocalRunners {
    /// The `darkroom` executable.
    pub exe: PathBuf,
    pub gateway_url: String,
    pub ca_cert: Option<PathBuf>,
    /// Niceness added to runner processes, on top of the gateway's (the gateway keeps priority).
    pub nice: i32,
    /// Extra environment (storage settings; secrets stay out of the command line).
    pub env: Vec<(String, String)>,
    /// What runners may use.
    pub inventory: Inventory,
    /// How long a stopped runner has to drain and exit before it is killed.
    pub stop_grace: Duration,
    /// How long a runner may stay in PULL (fetching weights); `startup_timeout` counts from the end of PULL.
    pub pull_timeout: Duration,
    /// Where deployed apps' code is unpacked and their Python environments are built (`bundles/`, `envs/`).
    pub work_dir: PathBuf,
}

impl std::fmt::Debug for LocalRunners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRunners").field("exe", &self.exe).field("inventory", &self.inventory).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Waiting for resources or backoff: no process yet.
    Pending,
    /// Its process runs.
    Started,
    /// Asked to stop (SIGTERM sent): draining, then exiting.
    Stopping,
    Terminated,
}

struct Slot {
    id: String,
    app_id: String,
    state: SlotState,
    pid: u32,
    created_at: Millis,
    started_at: Option<Millis>,
    ended_at: Option<Millis>,
    cpus: Vec<usize>,
    gpu: Option<(u32, u64)>,
    reason: Option<String>,
    stop: CancellationToken,
    /// How long it may take to drain once stopped (None: the fleet's stop grace).
    grace: Option<Duration>,
}

/// Restart backoff of an app whose runners crash.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Millis,
    next: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A runner that ran this long before it died resets its app's backoff.
const HEALTHY_AFTER: Millis = 30_000;
/// Ended runners stay in the listing this long.
const KEEP_TERMINATED: Millis = 300_000;

#[derive(Default)]
pub struct Fleet {
    /// Per app: the knobs as deployed, and the run-time patch.
    knobs: Mutex<HashMap<String, (ScalingKnobs, ScalingPatch)>>,
    slots: Mutex<HashMap<String, Slot>>,
    backoff: Mutex<HashMap<String, Backoff>>,
    tokens: tokio::sync::Mutex<HashMap<String, String>>,
    local: OnceLock<LocalRunners>,
    kick: Notify,
    seq: AtomicU64,
    /// Set by [`Fleet::drain`]: no new runners, no new assignments.
    draining: std::sync::atomic::AtomicBool,
    /// Overrides the local runners' stop grace (shutdown after a drain timeout), in ms; 0: unset.
    grace_ms: AtomicU64,
    /// Apps whose placement can never succeed, logged once.
    never_logged: Mutex<std::collections::HashSet<String>>,
}

impl Fleet {
    /// Registers the apps' knobs as deployed.
    pub(crate) fn init(&self, specs: impl Iterator<Item = (String, ScalingKnobs)>) {
        let mut k = self.knobs.lock().unwrap();
        for (id, knobs) in specs {
            k.insert(id, (knobs, ScalingPatch::default()));
        }
    }

    /// Registers (or replaces) a deployed app's knobs, keeping its run-time patch.
    pub(crate) fn register(&self, app_id: &str, knobs: ScalingKnobs) {
        let mut k = self.knobs.lock().unwrap();
        let patch = k.remove(app_id).map(|(_, p)| p).unwrap_or_default();
        k.insert(app_id.to_string(), (knobs, patch));
        drop(k);
        self.kick();
    }

    /// Stops every runner of an app (each finishes what it holds): its code changed or it was removed.
    pub(crate) fn retire(&self, gw: &Gateway, app_id: &str, reason: StopReason) {
        let ids: Vec<String> = self
            .slots
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.app_id == app_id && matches!(s.state, SlotState::Pending | SlotState::Started))
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            stop_slot(gw, &id, reason, false);
        }
        if !gw.apps.contains_key(app_id) {
            self.knobs.lock().unwrap().remove(app_id);
            self.backoff.lock().unwrap().remove(app_id);
        }
        self.kick();
    }

    /// The app's knobs in effect (defaults for an unknown app).
    pub fn knobs(&self, app_id: &str) -> ScalingKnobs {
        match self.knobs.lock().unwrap().get(app_id) {
            Some((spec, patch)) => patch.apply(spec),
            None => ScalingKnobs::default(),
        }
    }

    /// (as deployed, run-time patch, in effect).
    pub fn knobs_detail(&self, app_id: &str) -> Option<(ScalingKnobs, ScalingPatch, ScalingKnobs)> {
        self.knobs.lock().unwrap().get(app_id).map(|(s, p)| (s.clone(), p.clone(), p.apply(s)))
    }

    /// Replaces an app's run-time patch (already validated and stored).
    pub(crate) fn set_patch(&self, app_id: &str, patch: ScalingPatch) {
        if let Some(e) = self.knobs.lock().unwrap().get_mut(app_id) {
            e.1 = patch;
        }
        self.kick();
    }

    /// Loads every app's run-time patch from the store (at start, and now and then for other gateways' changes).
    pub(crate) async fn load_patches(&self, gw: &Gateway) {
        match gw.store.list_app_scaling().await {
            Ok(rows) => {
                let mut stored: HashMap<String, ScalingPatch> = HashMap::new();
                for (app, json) in rows {
                    match serde_json::from_str(&json) {
                        Ok(p) => {
                            stored.insert(app, p);
                        }
                        Err(e) => tracing::warn!(app = %app, error = %e, "ignoring unreadable scaling overrides"),
                    }
                }
                let mut k = self.knobs.lock().unwrap();
                for (app, (_, patch)) in k.iter_mut() {
                    *patch = stored.remove(app).unwrap_or_default();
                }
            }
            Err(e) => tracing::warn!(error = %e, "loading scaling overrides failed"),
        }
    }

    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Whether `slot` is one of ours, for `app_id`, and still alive.
    pub(crate) fn owns_slot(&self, slot: &str, app_id: &str) -> bool {
        self.slots.lock().unwrap().get(slot).is_some_and(|s| s.app_id == app_id && s.state != SlotState::Terminated)
    }

    /// Whether the fleet is stopping this slot's runner.
    pub(crate) fn slot_stopping(&self, slot: &str) -> bool {
        self.slots.lock().unwrap().get(slot).is_some_and(|s| s.state == SlotState::Stopping)
    }

    /// Whether local runners are started and stopped here.
    pub fn manages_local_runners(&self) -> bool {
        self.local.get().is_some()
    }

    /// Every runner: connected ones with their fleet details, then slots without a connection.
    pub fn list(&self, gw: &Gateway) -> Vec<RunnerInfo> {
        let mut conns = gw.hub.list_with(|app| self.knobs(app).max_multiplexing);
        let slots = self.slots.lock().unwrap();
        let connected: std::collections::HashSet<String> = conns.iter().filter_map(|c| c.slot.clone()).collect();
        for c in conns.iter_mut() {
            if let Some(s) = c.slot.as_ref().and_then(|id| slots.get(id)) {
                c.started_at = s.started_at;
                c.cpus = s.cpus.clone();
                c.gpu = s.gpu;
                if s.state == SlotState::Stopping {
                    c.state = "DRAINING";
                }
            }
        }
        for s in slots.values() {
            if connected.contains(&s.id) {
                continue;
            }
            conns.push(RunnerInfo {
                runner_id: s.id.clone(),
                app_id: s.app_id.clone(),
                state: match s.state {
                    SlotState::Pending | SlotState::Started => "PENDING",
                    SlotState::Stopping => "DRAINING",
                    SlotState::Terminated => "TERMINATED",
                },
                slot: Some(s.id.clone()),
                pid: s.pid,
                max_multiplexing: self.knobs(&s.app_id).max_multiplexing,
                in_flight: vec![],
                hints: vec![],
                connected_at: None,
                started_at: s.started_at,
                ready_at: None,
                last_active_at: None,
                served: 0,
                cpus: s.cpus.clone(),
                gpu: s.gpu,
                message: s.reason.clone(),
                ended_at: s.ended_at,
            });
        }
        conns.sort_by(|a, b| {
            (&a.app_id, a.state == "TERMINATED", a.started_at.or(a.connected_at)).cmp(&(
                &b.app_id,
                b.state == "TERMINATED",
                b.started_at.or(b.connected_at),
            ))
        });
        conns
    }

    /// Stops starting runners and assigning requests (SIGTERM on the gateway).
    pub fn drain(&self, gw: &Gateway) {
        self.draining.store(true, Ordering::SeqCst);
        gw.hub.draining.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Stops every local runner (each drains: it finishes what it holds) and waits for them to exit.
    pub async fn stop_all(&self, grace: Duration) {
        self.grace_ms.store(grace.as_millis().max(1) as u64, Ordering::SeqCst);
        let tokens: Vec<CancellationToken> = {
            let mut slots = self.slots.lock().unwrap();
            slots
                .values_mut()
                .filter(|s| matches!(s.state, SlotState::Started | SlotState::Stopping | SlotState::Pending))
                .map(|s| {
                    if s.state == SlotState::Pending {
                        s.state = SlotState::Terminated;
                        s.reason = Some("gateway shutting down".into());
                    } else {
                        s.state = SlotState::Stopping;
                    }
                    s.stop.cancel();
                    s.stop.clone()
                })
                .collect()
        };
        drop(tokens);
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            let alive = self
                .slots
                .lock()
                .unwrap()
                .values()
                .any(|s| matches!(s.state, SlotState::Started | SlotState::Stopping));
            if !alive {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for s in self.slots.lock().unwrap().values() {
            if matches!(s.state, SlotState::Started | SlotState::Stopping) {
                tracing::warn!(slot = %s.id, pid = s.pid, "runner did not stop in time; killing it");
                signal_group(s.pid, libc::SIGKILL);
            }
        }
    }

    /// Starts the fleet loop; with `local`, this gateway starts and stops runner processes itself.
    pub fn start(gw: &Arc<Gateway>, local: Option<LocalRunners>) {
        if let Some(l) = local {
            tracing::info!(cpus = ?l.inventory.cpus, gpus = ?l.inventory.gpus, "local runners");
            let _ = gw.fleet.local.set(l);
        }
        tokio::spawn(run(gw.clone()));
    }
}

async fn run(gw: Arc<Gateway>) {
    let mut last_reload = gw.now();
    let mut last_tick = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = gw.fleet.kick.notified() => {
                // Kicks come with every submit that finds no free runner: at most one tick per 20 ms.
                tokio::time::sleep_until(last_tick + Duration::from_millis(20)).await;
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = gw.shutdown.cancelled() => return,
        }
        last_tick = tokio::time::Instant::now();
        let now = gw.now();
        if gw.cfg.cluster.is_some() && now - last_reload >= 5_000 {
            // Another gateway may have changed an app's scale.
            last_reload = now;
            gw.fleet.load_patches(&gw).await;
        }
        enforce_request_timeouts(&gw, now).await;
        if let Err(e) = tick(&gw, now).await {
            tracing::error!(error = %e, "fleet tick failed");
        }
        let list = gw.fleet.list(&gw);
        metrics::set_runner_states(gw.apps.ids().iter(), &list);
    }
}

/// Requests running past their app's `request_timeout` fail with `request_timeout` and their runner is told to
/// stop them.
async fn enforce_request_timeouts(gw: &Arc<Gateway>, now: Millis) {
    let over: Vec<(String, String, i64, u64)> = {
        let m = gw.hub.runners.lock().unwrap();
        m.values()
            .flat_map(|c| {
                let limit = gw.fleet.knobs(&c.app_id).request_timeout;
                c.in_flight
                    .iter()
                    .filter(move |(_, (_, at))| now.saturating_sub(*at) > (limit as i64).saturating_mul(1000))
                    .map(move |(job, (token, _))| (c.runner_id.clone(), job.clone(), *token, limit))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for (runner, job, token, limit) in over {
        let err = darkroom_core::ApiError::new(
            darkroom_core::ErrorType::RequestTimeout,
            format!("The request ran longer than the app's request_timeout ({limit} s)"),
        );
        match gw.store.complete(&job, token, &darkroom_core::job::Outcome::platform(&err), now).await {
            Ok(darkroom_store::CompleteResult::Applied) => {
                tracing::warn!(request_id = %job, runner = %runner, limit, "request timed out");
                // The runner keeps the place until it answers (a model that ignores the cancel still holds it).
                if let Some(c) = gw.hub.runners.lock().unwrap().get_mut(&runner)
                    && let Some(entry) = c.in_flight.get_mut(&job)
                {
                    entry.1 = Millis::MAX;
                }
                gw.hub.send(&runner, darkroom_core::protocol::GatewayFrame::Cancel { job_id: job.clone(), token });
                gw.finished_by_id(&job).await;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, request_id = %job, "timing out a request failed"),
        }
    }
}

/// The runners of one app as the autoscaler sees them; slot ids stand for managed runners.
fn views(gw: &Gateway, fleet: &Fleet, app_id: &str, now: Millis) -> Vec<RunnerView> {
    let per_runner = gw.realtime.per_runner();
    let slots = fleet.slots.lock().unwrap();
    let m = gw.hub.runners.lock().unwrap();
    let mut out = Vec::new();
    let mut connected = std::collections::HashSet::new();
    for c in m.values().filter(|c| c.app_id == app_id) {
        let slot = c.slot.as_ref().and_then(|s| slots.get(s)).filter(|s| s.state != SlotState::Terminated);
        if let Some(s) = slot {
            connected.insert(s.id.clone());
        }
        let stopping = slot.is_some_and(|s| s.state == SlotState::Stopping);
        // PULL has its own timeout: startup_timeout counts from process start, or from the end of PULL.
        let started_at = match (c.phase, c.pulled_at) {
            (ConnPhase::Pull, _) => now,
            (_, Some(p)) => p,
            _ => slot.and_then(|s| s.started_at).unwrap_or(c.connected_at),
        };
        // A runner holding realtime sessions is busy, whatever its queue work.
        let sessions = per_runner.get(&c.runner_id).copied().unwrap_or(0) as u32;
        let phase = match c.phase {
            _ if stopping => Phase::Draining,
            ConnPhase::Draining => Phase::Draining,
            ConnPhase::Pull | ConnPhase::Setup => Phase::Starting,
            ConnPhase::Ready if c.in_flight.is_empty() && c.reserved == 0 && sessions == 0 => Phase::Idle,
            ConnPhase::Ready => Phase::Running,
        };
        out.push(RunnerView {
            id: slot.map_or_else(|| c.runner_id.clone(), |s| s.id.clone()),
            phase,
            managed: slot.is_some(),
            in_flight: c.in_flight.len() as u32 + c.reserved + sessions,
            started_at,
            last_active_at: c.last_active_at,
            served: c.served,
        });
    }
    for s in slots.values().filter(|s| s.app_id == app_id && !connected.contains(&s.id)) {
        let phase = match s.state {
            SlotState::Pending | SlotState::Started => Phase::Starting,
            SlotState::Stopping => Phase::Draining,
            SlotState::Terminated => continue,
        };
        out.push(RunnerView {
            id: s.id.clone(),
            phase,
            managed: true,
            in_flight: 0,
            // A slot waiting for resources has not started: startup_timeout counts from its process start.
            started_at: s.started_at.unwrap_or(now),
            last_active_at: s.started_at.unwrap_or(now),
            served: 0,
        });
    }
    out
}

async fn tick(gw: &Arc<Gateway>, now: Millis) -> Result<(), darkroom_store::StoreError> {
    let fleet = &gw.fleet;
    // Forget runners that ended long ago.
    fleet
        .slots
        .lock()
        .unwrap()
        .retain(|_, s| s.state != SlotState::Terminated || s.ended_at.is_none_or(|t| now - t < KEEP_TERMINATED));
    let Some(local) = fleet.local.get() else { return Ok(()) };
    if fleet.draining.load(Ordering::SeqCst) {
        return Ok(());
    }
    let depths: HashMap<String, darkroom_store::AppDepth> =
        gw.store.app_depths().await?.into_iter().map(|d| (d.app_id.clone(), d)).collect();
    let app_ids = gw.apps.ids();
    let apps: Vec<&String> = app_ids.iter().collect();
    // Runners stuck fetching weights.
    let pulling: Vec<String> = gw
        .hub
        .runners
        .lock()
        .unwrap()
        .values()
        .filter(|c| c.pull_since.is_some_and(|t| now - t > local.pull_timeout.as_millis() as Millis))
        .filter_map(|c| c.slot.clone())
        .collect();
    for slot in pulling {
        stop_slot(gw, &slot, StopReason::PullTimeout, true);
    }
    let mut queued_apps = std::collections::HashSet::new();
    for app in apps {
        let knobs = fleet.knobs(app);
        let in_flight: u64 = gw
            .hub
            .runners
            .lock()
            .unwrap()
            .values()
            .filter(|c| &c.app_id == app)
            .map(|c| c.in_flight.len() as u64 + c.reserved as u64)
            .sum();
        let d = depths.get(app.as_str());
        // Realtime sessions hold their runners; sessions waiting for one are demand like queued requests.
        let (sessions, waiting, waiting_since) = gw.realtime.load(app);
        let oldest = match (d.and_then(|d| d.oldest_queued_at), waiting_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let load = AppLoad {
            queued: d.map_or(0, |d| d.queued.max(0) as u64) + waiting,
            oldest_queued_at: oldest,
            in_flight: in_flight + sessions,
        };
        if load.queued > 0 {
            queued_apps.insert(app.clone());
        }
        let views = views(gw, fleet, app, now);
        let backoff = fleet.backoff.lock().unwrap().get(app.as_str()).map(|b| b.until);
        let decision = autoscale(&load, &views, &knobs, now, backoff);
        for (id, reason) in &decision.stop {
            stop_slot(gw, id, *reason, true);
        }
        for id in &decision.drain {
            stop_slot(gw, id, StopReason::OverMax, false);
        }
        // Slots still waiting for cores or a GPU that demand no longer needs are dropped before they start.
        let live = views.iter().filter(|v| v.phase != Phase::Draining).count();
        let after = live.saturating_sub(decision.stop.len() + decision.drain.len());
        if after > decision.desired as usize {
            let mut slots = fleet.slots.lock().unwrap();
            let mut waiting: Vec<&mut Slot> =
                slots.values_mut().filter(|s| &s.app_id == app && s.state == SlotState::Pending).collect();
            waiting.sort_by_key(|s| std::cmp::Reverse(s.created_at));
            for s in waiting.into_iter().take(after - decision.desired as usize) {
                s.state = SlotState::Terminated;
                s.ended_at = Some(now);
                s.reason = Some("no longer needed".into());
            }
        }
        for _ in 0..decision.start {
            let id = format!("{}-{}", app.replace('/', "-"), fleet.seq.fetch_add(1, Ordering::SeqCst) + 1);
            tracing::info!(app = %app, slot = %id, desired = decision.desired, queued = load.queued, "starting a runner");
            fleet.slots.lock().unwrap().insert(
                id.clone(),
                Slot {
                    id,
                    app_id: app.clone(),
                    state: SlotState::Pending,
                    pid: 0,
                    created_at: now,
                    started_at: None,
                    ended_at: None,
                    cpus: vec![],
                    gpu: None,
                    reason: Some("waiting for resources".into()),
                    stop: CancellationToken::new(),
                    grace: None,
                },
            );
        }
    }
    // Place pending slots, oldest first.
    let mut pending: Vec<(Millis, String, String)> = fleet
        .slots
        .lock()
        .unwrap()
        .values()
        .filter(|s| s.state == SlotState::Pending)
        .map(|s| (s.created_at, s.id.clone(), s.app_id.clone()))
        .collect();
    pending.sort();
    for (_, id, app) in pending {
        let knobs = fleet.knobs(&app);
        let req = Request { app_id: app.clone(), threads: knobs.cpu_threads, gpu_mb: knobs.gpu_memory_mb };
        let allocs = allocations(gw, fleet);
        match place(&local.inventory, &allocs, &req) {
            Placement::Fits { cpus, gpu } => spawn_slot(gw, local, &id, &app, cpus, gpu).await,
            Placement::Evict { victims, .. } => {
                // Only for requests waiting: warm capacity (min_concurrency, buffer) never evicts another app. And
                // not while runners already stopping will free enough once they exit.
                let stopping: std::collections::HashSet<String> = fleet
                    .slots
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|s| s.state == SlotState::Stopping)
                    .map(|s| s.id.clone())
                    .collect();
                let after: Vec<Allocation> = allocs.into_iter().filter(|a| !stopping.contains(&a.runner)).collect();
                let freeing = matches!(place(&local.inventory, &after, &req), Placement::Fits { .. });
                if queued_apps.contains(&app) && !freeing {
                    for v in victims {
                        tracing::info!(app = %app, evicted = %v, "evicting an idle runner (least recently used)");
                        stop_slot(gw, &v, StopReason::Evicted, true);
                    }
                }
            }
            Placement::Wait => {}
            Placement::Never(why) => {
                if fleet.never_logged.lock().unwrap().insert(app.clone()) {
                    tracing::error!(app = %app, "cannot place a runner: {why}");
                }
                if let Some(s) = fleet.slots.lock().unwrap().get_mut(&id) {
                    s.reason = Some(format!("cannot be placed: {why}"));
                }
            }
        }
    }
    Ok(())
}

/// Resources held by our runner processes (until they exit).
fn allocations(gw: &Gateway, fleet: &Fleet) -> Vec<Allocation> {
    let slots = fleet.slots.lock().unwrap();
    let m = gw.hub.runners.lock().unwrap();
    slots
        .values()
        .filter(|s| matches!(s.state, SlotState::Started | SlotState::Stopping))
        .map(|s| {
            let conn = m.values().find(|c| c.slot.as_deref() == Some(s.id.as_str()));
            let idle_since = match (s.state, conn) {
                (SlotState::Started, Some(c))
                    if c.phase == ConnPhase::Ready && c.in_flight.is_empty() && c.reserved == 0 =>
                {
                    Some(c.last_active_at)
                }
                _ => None,
            };
            Allocation { runner: s.id.clone(), app_id: s.app_id.clone(), cpus: s.cpus.clone(), gpu: s.gpu, idle_since }
        })
        .collect()
}

/// Stops a managed runner: no new requests, SIGTERM (it finishes what it holds and exits). With `only_if_idle`,
/// a runner that just got a request is left alone.
fn stop_slot(gw: &Gateway, slot_id: &str, reason: StopReason, only_if_idle: bool) {
    let conn = gw
        .hub
        .runners
        .lock()
        .unwrap()
        .values()
        .find(|c| c.slot.as_deref() == Some(slot_id))
        .map(|c| c.runner_id.clone());
    if let Some(r) = &conn
        && !gw.hub.mark_draining(r, only_if_idle)
    {
        return;
    }
    let mut slots = gw.fleet.slots.lock().unwrap();
    let Some(s) = slots.get_mut(slot_id) else { return };
    match s.state {
        SlotState::Pending => {
            s.state = SlotState::Terminated;
            s.ended_at = Some(gw.now());
            s.reason = Some(reason.as_str().into());
        }
        SlotState::Started => {
            tracing::info!(app = %s.app_id, slot = %s.id, reason = reason.as_str(), "stopping a runner");
            metrics::runner_stopped(&s.app_id, reason.as_str());
            s.state = SlotState::Stopping;
            s.reason = Some(reason.as_str().into());
            if !only_if_idle {
                // A busy runner drains: its requests get up to their request_timeout, not the stop grace.
                s.grace = Some(Duration::from_secs(gw.fleet.knobs(&s.app_id).request_timeout));
            }
            s.stop.cancel();
            if matches!(reason, StopReason::StartupTimeout | StopReason::PullTimeout) {
                bump_backoff(gw, &s.app_id.clone(), s.started_at);
            }
        }
        SlotState::Stopping | SlotState::Terminated => {}
    }
}

fn bump_backoff(gw: &Gateway, app_id: &str, started_at: Option<Millis>) {
    let now = gw.now();
    let mut b = gw.fleet.backoff.lock().unwrap();
    let healthy = started_at.is_some_and(|t| now - t >= HEALTHY_AFTER);
    let e = b.entry(app_id.to_string()).or_insert(Backoff { until: now, next: BACKOFF_MIN });
    if healthy {
        e.next = BACKOFF_MIN;
    }
    e.until = now + e.next.as_millis() as Millis;
    tracing::warn!(app = %app_id, retry_in_ms = e.next.as_millis() as u64, "runner failed; restarting with backoff");
    e.next = (e.next * 2).min(BACKOFF_MAX);
}

async fn token_for(gw: &Gateway, app_id: &str) -> anyhow::Result<String> {
    let mut t = gw.fleet.tokens.lock().await;
    if let Some(tok) = t.get(app_id) {
        return Ok(tok.clone());
    }
    let tok = gw.mint_runner_token(Some(app_id)).await?;
    t.insert(app_id.to_string(), tok.clone());
    Ok(tok)
}

async fn spawn_slot(
    gw: &Arc<Gateway>,
    local: &LocalRunners,
    slot_id: &str,
    app_id: &str,
    cpus: Vec<usize>,
    gpu: Option<(u32, u64)>,
) {
    let token = match token_for(gw, app_id).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "minting a runner token failed");
            return;
        }
    };
    // Stopped or shutting down while the token was minted: start nothing.
    let still_wanted = gw.fleet.slots.lock().unwrap().get(slot_id).is_some_and(|s| s.state == SlotState::Pending);
    if !still_wanted || gw.fleet.draining.load(Ordering::SeqCst) {
        return;
    }
    // A deployed app: its code unpacked here, its manifest and the secrets in the runner's environment.
    let deployed = match gw.apps.get(app_id).map(|a| a.spec.kind) {
        Some(darkroom_core::app::AppKind::Http) => match crate::deploy::runner_app(gw, &local.work_dir, app_id).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(app = %app_id, error = %e, "cannot start a runner of a deployed app");
                if let Some(s) = gw.fleet.slots.lock().unwrap().get_mut(slot_id) {
                    s.state = SlotState::Terminated;
                    s.ended_at = Some(gw.now());
                    s.reason = Some(format!("could not start: {e}"));
                }
                bump_backoff(gw, app_id, None);
                return;
            }
        },
        _ => None,
    };
    let mut cmd = tokio::process::Command::new(&local.exe);
    cmd.arg("runner").arg("--gateway").arg(&local.gateway_url).arg("--app").arg(app_id).arg("--parent-stdin");
    if let Some(d) = &deployed {
        cmd.arg("--app-dir")
            .arg(&d.dir)
            .env("DARKROOM_APP_MANIFEST", &d.manifest_json)
            .env("DARKROOM_APP_SECRETS", &d.secrets_json)
            .env("DARKROOM_ENV_CACHE", local.work_dir.join("envs"))
            .env("DARKROOM_APP_UPLOAD_KEY", gw.app_upload_key(app_id))
            // fal's /data: one folder per app, kept across restarts and redeploys.
            .env("DARKROOM_APP_DATA_DIR", local.work_dir.join("data").join(app_id));
        // Input files stored here are served from our own (loopback) address: the launcher lets the fal toolkit's
        // download guard through to exactly that origin.
        if let Ok(u) = url::Url::parse(&local.gateway_url)
            && let Some(host) = u.host_str()
        {
            cmd.env("DARKROOM_APP_FILES_ORIGIN", format!("{host}:{}", u.port_or_known_default().unwrap_or(443)));
        }
        // The fal toolkit uploads to https://{FAL_REST_HOST} only: it can reach us when we speak TLS.
        if let Ok(u) = url::Url::parse(&local.gateway_url)
            && u.scheme() == "https"
            && let Some(host) = u.host_str()
        {
            let port = u.port_or_known_default().unwrap_or(443);
            cmd.env("DARKROOM_APP_REST_HOST", format!("{host}:{port}/rest"));
        }
    }
    if let Some(ca) = &local.ca_cert {
        cmd.arg("--ca-cert").arg(ca);
    }
    cmd.envs(local.env.iter().map(|(k, v)| (k, v)))
        .env("DARKROOM_RUNNER_TOKEN", &token)
        .env("DARKROOM_RUNNER_SLOT", slot_id)
        // nvidia-smi numbers GPUs by PCI bus; CUDA must too, or the index names another GPU.
        .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        .env("CUDA_VISIBLE_DEVICES", gpu.map(|(i, _)| i.to_string()).unwrap_or_default());
    if !cpus.is_empty() {
        // Thread pools sized to the cores it is pinned to.
        let threads = cpus.len().to_string();
        cmd.env("DARKROOM_THREADS", &threads).env("RAYON_NUM_THREADS", &threads).env("OMP_NUM_THREADS", &threads);
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::inherit()).stderr(Stdio::inherit()).process_group(0).kill_on_drop(true);
    let nice = local.nice;
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET only writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in &cpus {
        unsafe { libc::CPU_SET(*c, &mut set) };
    }
    let pin = !cpus.is_empty();
    // SAFETY: only async-signal-safe calls (plain syscalls) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::nice(nice);
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, b"500".as_ptr().cast(), 3);
                libc::close(fd);
            }
            if pin {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            Ok(())
        });
    }
    let now = gw.now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(app = %app_id, error = %e, "could not start a runner process");
            if let Some(s) = gw.fleet.slots.lock().unwrap().get_mut(slot_id) {
                s.state = SlotState::Terminated;
                s.ended_at = Some(now);
                s.reason = Some(format!("could not start: {e}"));
            }
            bump_backoff(gw, app_id, None);
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    let stop = {
        let mut slots = gw.fleet.slots.lock().unwrap();
        let Some(s) = slots.get_mut(slot_id) else { return };
        s.state = SlotState::Started;
        s.pid = pid;
        s.started_at = Some(now);
        s.cpus = cpus.clone();
        s.gpu = gpu;
        s.reason = None;
        s.stop.clone()
    };
    metrics::runner_started(app_id);
    tracing::info!(app = %app_id, slot = %slot_id, pid, cpus = ?cpus, gpu = ?gpu, "runner process started");
    let gw = gw.clone();
    let slot_id = slot_id.to_string();
    let app_id = app_id.to_string();
    let grace = local.stop_grace;
    tokio::spawn(async move {
        // Holding the pipe keeps the child's stdin open; dropping it (or our death) signals EOF.
        let stdin = child.stdin.take();
        let (status, requested) = tokio::select! {
            status = child.wait() => (status, false),
            _ = stop.cancelled() => {
                // The runner drains on SIGTERM (its own children are its business until the deadline).
                signal_one(pid, libc::SIGTERM);
                let own = gw.fleet.slots.lock().unwrap().get(&slot_id).and_then(|s| s.grace);
                let grace = match gw.fleet.grace_ms.load(Ordering::SeqCst) {
                    0 => own.unwrap_or(grace),
                    ms => Duration::from_millis(ms),
                };
                let status = match tokio::time::timeout(grace, child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        tracing::warn!(slot = %slot_id, pid, "runner did not exit in time; killing it");
                        signal_group(pid, libc::SIGKILL);
                        child.wait().await
                    }
                };
                (status, true)
            }
        };
        drop(stdin);
        let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        let now = gw.now();
        let started_at = {
            let mut slots = gw.fleet.slots.lock().unwrap();
            let Some(s) = slots.get_mut(&slot_id) else { return };
            s.state = SlotState::Terminated;
            s.ended_at = Some(now);
            if !requested {
                s.reason = Some(format!("exited unexpectedly ({status})"));
            }
            s.started_at
        };
        if requested {
            tracing::info!(app = %app_id, slot = %slot_id, pid, %status, "runner stopped");
        } else {
            tracing::warn!(app = %app_id, slot = %slot_id, pid, %status, "runner process exited");
            metrics::runner_stopped(&app_id, "crashed");
            bump_backoff(&gw, &app_id, started_at);
        }
        gw.fleet.kick();
    });
}

fn signal_one(pid: u32, sig: i32) {
    if pid > 0 {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

fn signal_group(pid: u32, sig: i32) {
    if pid > 0 {
        // SAFETY: signalling the runner's own process group.
        unsafe {
            libc::kill(-(pid as i32), sig);
        }
    }
}

/// The CPU cores this process may run on (its affinity), at most `limit` of them.
pub fn cpu_inventory(limit: Option<usize>) -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    let mut cpus: Vec<usize> = if ok {
        (0..libc::CPU_SETSIZE as usize).filter(|c| unsafe { libc::CPU_ISSET(*c, &set) }).collect()
    } else {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    };
    if let Some(n) = limit {
        cpus.truncate(n.max(1));
    }
    cpus
}

/// GPUs from `nvidia-smi`, if it is installed and sees any.
pub fn detect_gpus() -> Vec<darkroom_core::scaling::Gpu> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=index,memory.total,memory.used", "--format=csv,noheader,nounits"])
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else { return vec![] };
    if !out.status.success() {
        return vec![];
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            Some(darkroom_core::scaling::Gpu {
                index: f.first()?.parse().ok()?,
                total_mb: f.get(1)?.parse().ok()?,
                used_mb: f.get(2)?.parse().ok()?,
            })
        })
        .collect()
}
