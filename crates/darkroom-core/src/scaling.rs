//! Scaling: fal's per-app knobs, the autoscaler (a pure function of queue, in-flight work, runners, knobs and the
//! clock) and placement of runners on the machine's CPU cores and GPUs, with least-recently-used eviction.
//!
//! Nothing here does I/O; the gateway's fleet manager feeds it and carries its decisions out.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::Millis;

/// fal's scaling knobs for one app, plus the resources one runner of it needs. Times are in seconds, as in fal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ScalingKnobs {
    /// Runners kept alive even with no work (0: scale to zero).
    pub min_concurrency: u32,
    /// Most runners the app may have.
    pub max_concurrency: u32,
    /// Warm runners kept above current demand.
    pub concurrency_buffer: u32,
    /// Warm headroom as a percentage of current demand; the larger of this and `concurrency_buffer` applies.
    pub concurrency_buffer_perc: u32,
    /// Seconds an idle runner is kept before it is stopped (a fresh runner that never got a request: at most 10).
    pub keep_alive: u64,
    /// Seconds a request waits in the queue before a new runner is started for it.
    pub scaling_delay: u64,
    /// Requests one runner serves at once.
    pub max_multiplexing: u32,
    /// Seconds a runner has from start to ready (weights fetched, model set up) before it is stopped.
    pub startup_timeout: u64,
    /// Seconds a request may run before it fails with `request_timeout`.
    pub request_timeout: u64,
    /// CPU cores one runner gets, pinned and never shared (more than the runner budget: all of it). 0: none
    /// reserved and not pinned, for apps that do no CPU work of their own.
    pub cpu_threads: u32,
    /// GPU memory one runner needs, in MiB; 0: no GPU.
    pub gpu_memory_mb: u64,
}

impl Default for ScalingKnobs {
    fn default() -> Self {
        ScalingKnobs {
            min_concurrency: 0,
            max_concurrency: 2,
            concurrency_buffer: 0,
            concurrency_buffer_perc: 0,
            keep_alive: 60,
            scaling_delay: 0,
            max_multiplexing: 1,
            startup_timeout: 600,
            request_timeout: 3600,
            cpu_threads: 1,
            gpu_memory_mb: 0,
        }
    }
}

/// Run-time changes to an app's knobs (`darkroom apps scale`, `PATCH /v1/apps/{id}/scale`): only the fields set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScalingPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_buffer: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_buffer_perc: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_delay: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_multiplexing: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_mb: Option<u64>,
}

impl ScalingPatch {
    /// This patch on top of `base`.
    pub fn apply(&self, base: &ScalingKnobs) -> ScalingKnobs {
        ScalingKnobs {
            min_concurrency: self.min_concurrency.unwrap_or(base.min_concurrency),
            max_concurrency: self.max_concurrency.unwrap_or(base.max_concurrency),
            concurrency_buffer: self.concurrency_buffer.unwrap_or(base.concurrency_buffer),
            concurrency_buffer_perc: self.concurrency_buffer_perc.unwrap_or(base.concurrency_buffer_perc),
            keep_alive: self.keep_alive.unwrap_or(base.keep_alive),
            scaling_delay: self.scaling_delay.unwrap_or(base.scaling_delay),
            max_multiplexing: self.max_multiplexing.unwrap_or(base.max_multiplexing),
            startup_timeout: self.startup_timeout.unwrap_or(base.startup_timeout),
            request_timeout: self.request_timeout.unwrap_or(base.request_timeout),
            cpu_threads: self.cpu_threads.unwrap_or(base.cpu_threads),
            gpu_memory_mb: self.gpu_memory_mb.unwrap_or(base.gpu_memory_mb),
        }
    }

    /// `other`'s fields over this patch's.
    pub fn merge(&self, other: &ScalingPatch) -> ScalingPatch {
        ScalingPatch {
            min_concurrency: other.min_concurrency.or(self.min_concurrency),
            max_concurrency: other.max_concurrency.or(self.max_concurrency),
            concurrency_buffer: other.concurrency_buffer.or(self.concurrency_buffer),
            concurrency_buffer_perc: other.concurrency_buffer_perc.or(self.concurrency_buffer_perc),
            keep_alive: other.keep_alive.or(self.keep_alive),
            scaling_delay: other.scaling_delay.or(self.scaling_delay),
            max_multiplexing: other.max_multiplexing.or(self.max_multiplexing),
            startup_timeout: other.startup_timeout.or(self.startup_timeout),
            request_timeout: other.request_timeout.or(self.request_timeout),
            cpu_threads: other.cpu_threads.or(self.cpu_threads),
            gpu_memory_mb: other.gpu_memory_mb.or(self.gpu_memory_mb),
        }
    }

    pub fn is_empty(&self) -> bool {
        self == &ScalingPatch::default()
    }
}

impl ScalingKnobs {
    /// Checks the knobs; the error is a FastAPI `detail` list, one entry per bad field (under `loc_prefix`).
    pub fn validate(&self, loc_prefix: &[&str]) -> Result<(), Vec<Value>> {
        let mut detail = Vec::new();
        let mut bad = |field: &str, msg: String| {
            let mut loc: Vec<Value> = loc_prefix.iter().map(|s| json!(s)).collect();
            loc.push(json!(field));
            detail.push(json!({"loc": loc, "msg": msg, "type": "value_error"}));
        };
        let range = |v: u64, lo: u64, hi: u64| v >= lo && v <= hi;
        if !range(self.max_concurrency as u64, 1, 1024) {
            bad("max_concurrency", "must be between 1 and 1024".into());
        }
        if self.min_concurrency > self.max_concurrency {
            bad("min_concurrency", format!("must not exceed max_concurrency ({})", self.max_concurrency));
        }
        if self.concurrency_buffer > 1024 {
            bad("concurrency_buffer", "must be at most 1024".into());
        }
        if self.concurrency_buffer_perc > 1000 {
            bad("concurrency_buffer_perc", "must be at most 1000".into());
        }
        if self.keep_alive > 7 * 86_400 {
            bad("keep_alive", "must be at most 604800 seconds".into());
        }
        if self.scaling_delay > 86_400 {
            bad("scaling_delay", "must be at most 86400 seconds".into());
        }
        if !range(self.max_multiplexing as u64, 1, 1024) {
            bad("max_multiplexing", "must be between 1 and 1024".into());
        }
        if !range(self.startup_timeout, 1, 86_400) {
            bad("startup_timeout", "must be between 1 and 86400 seconds".into());
        }
        if !range(self.request_timeout, 1, 7 * 86_400) {
            bad("request_timeout", "must be between 1 and 604800 seconds".into());
        }
        if self.cpu_threads > 4096 {
            bad("cpu_threads", "must be at most 4096".into());
        }
        if detail.is_empty() { Ok(()) } else { Err(detail) }
    }
}

/// The queue of one app, as the autoscaler sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppLoad {
    /// Requests waiting for a runner.
    pub queued: u64,
    /// When the oldest of them was submitted.
    pub oldest_queued_at: Option<Millis>,
    /// Requests running on the app's runners.
    pub in_flight: u64,
}

/// Where a runner is in its life, as the autoscaler needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not ready yet (PENDING, PULL, SETUP): started at `RunnerView::started_at`.
    Starting,
    /// Ready, no requests.
    Idle,
    /// Ready, serving requests.
    Running,
    /// Finishing its requests before it stops; takes no new ones.
    Draining,
}

/// One runner of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerView {
    pub id: String,
    pub phase: Phase,
    /// Started and stopped by this gateway (a remote runner is counted but never stopped).
    pub managed: bool,
    pub in_flight: u32,
    pub started_at: Millis,
    /// When it last finished a request or, if it never had one, when it became ready.
    pub last_active_at: Millis,
    /// Requests it has served.
    pub served: u64,
}

/// Why a runner is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Idle past `keep_alive`, above what demand needs.
    Idle,
    /// More runners than `max_concurrency` (lowered at run time).
    OverMax,
    /// Not ready within `startup_timeout`.
    StartupTimeout,
    /// Still fetching weights or its environment (PULL) after the pull timeout.
    PullTimeout,
    /// Idle, and stopped to make room for another app's runner (least recently used first).
    Evicted,
    /// Its app was redeployed or removed: it finishes what it holds; new runners run the new version.
    Redeployed,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Idle => "idle",
            StopReason::OverMax => "over_max_concurrency",
            StopReason::StartupTimeout => "startup_timeout",
            StopReason::PullTimeout => "pull_timeout",
            StopReason::Evicted => "evicted",
            StopReason::Redeployed => "redeployed",
        }
    }
}

/// What the autoscaler wants done now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Runners the app should have.
    pub desired: u32,
    /// New runners to start.
    pub start: u32,
    /// Runners to stop now (idle or not yet ready).
    pub stop: Vec<(String, StopReason)>,
    /// Busy runners to drain (finish their requests, then stop).
    pub drain: Vec<String>,
}

/// A fresh runner that never got a request is stopped after this long, whatever `keep_alive` says (fal).
pub const FRESH_RUNNER_IDLE_MS: Millis = 10_000;

/// Runners the app needs for its load: `clamp(max(min, ceil(load / max_multiplexing) + buffer), .., max)`, where
/// `buffer = max(concurrency_buffer, ceil(perc × demand))` and queued requests count once the queue's head has
/// waited `scaling_delay`.
pub fn desired_runners(load: &AppLoad, knobs: &ScalingKnobs, now: Millis) -> u32 {
    let delay_ms = (knobs.scaling_delay as i64).saturating_mul(1000);
    let queued = match load.oldest_queued_at {
        Some(t) if now.saturating_sub(t) >= delay_ms => load.queued,
        _ => 0,
    };
    let mux = knobs.max_multiplexing.max(1) as u64;
    let demand = (queued + load.in_flight).div_ceil(mux);
    let perc = (demand * knobs.concurrency_buffer_perc as u64).div_ceil(100);
    let buffer = (knobs.concurrency_buffer as u64).max(perc);
    let want = (knobs.min_concurrency as u64).max(demand + buffer);
    want.min(knobs.max_concurrency as u64) as u32
}

/// The autoscaler. `start_allowed_at` holds new starts back (a crashing app's restart backoff).
pub fn autoscale(
    load: &AppLoad,
    runners: &[RunnerView],
    knobs: &ScalingKnobs,
    now: Millis,
    start_allowed_at: Option<Millis>,
) -> Decision {
    let desired = desired_runners(load, knobs, now);
    let mut d = Decision { desired, ..Decision::default() };
    let startup_ms = (knobs.startup_timeout as i64).saturating_mul(1000);
    let mut live: Vec<&RunnerView> = Vec::new();
    for r in runners {
        if r.phase == Phase::Draining {
            continue;
        }
        if r.managed && r.phase == Phase::Starting && now.saturating_sub(r.started_at) > startup_ms {
            d.stop.push((r.id.clone(), StopReason::StartupTimeout));
            continue;
        }
        live.push(r);
    }
    let n = live.len() as u32;
    if n < desired {
        if start_allowed_at.is_none_or(|t| now >= t) {
            d.start = desired - n;
        }
        return d;
    }
    let mut excess = n - desired;
    if excess == 0 {
        return d;
    }
    // Over the cap: stop what does not serve (starting, then the longest idle), then drain the least busy.
    let over_max = n.saturating_sub(knobs.max_concurrency);
    let mut taken: Vec<&str> = Vec::new();
    if over_max > 0 {
        let mut order: Vec<&RunnerView> = live.iter().copied().filter(|r| r.managed).collect();
        order.sort_by_key(|r| {
            let rank = match r.phase {
                Phase::Starting => 0,
                Phase::Idle => 1,
                _ => 2,
            };
            (rank, r.in_flight, r.last_active_at)
        });
        for r in order.into_iter().take(over_max as usize) {
            if r.phase == Phase::Running && r.in_flight > 0 {
                d.drain.push(r.id.clone());
            } else {
                d.stop.push((r.id.clone(), StopReason::OverMax));
            }
            taken.push(&r.id);
        }
        excess -= over_max.min(excess);
    }
    // Above demand: idle runners past keep_alive go, longest idle first.
    let keep_ms = (knobs.keep_alive as i64).saturating_mul(1000);
    let mut idle: Vec<&RunnerView> = live
        .iter()
        .copied()
        .filter(|r| r.managed && r.phase == Phase::Idle && r.in_flight == 0 && !taken.contains(&r.id.as_str()))
        .filter(|r| {
            let limit = if r.served == 0 { keep_ms.min(FRESH_RUNNER_IDLE_MS) } else { keep_ms };
            now.saturating_sub(r.last_active_at) >= limit
        })
        .collect();
    idle.sort_by_key(|r| r.last_active_at);
    for r in idle.into_iter().take(excess as usize) {
        d.stop.push((r.id.clone(), StopReason::Idle));
    }
    d
}

/// A GPU of the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    pub index: u32,
    pub total_mb: u64,
    /// Memory used by processes that are not Darkroom runners.
    pub used_mb: u64,
}

/// What runners may use: CPU core ids for pinning, and GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub cpus: Vec<usize>,
    pub gpus: Vec<Gpu>,
}

impl Inventory {
    /// Parses a GPU inventory: `none`, or `INDEX:MEMORY[,…]` with memory like `24GiB`, `16384MiB` (a simulated or
    /// hand-declared set of GPUs).
    pub fn parse_gpus(spec: &str) -> Result<Vec<Gpu>, String> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "none" {
            return Ok(vec![]);
        }
        spec.split(',')
            .map(|part| {
                let (i, mem) = part
                    .trim()
                    .split_once(':')
                    .ok_or_else(|| format!("'{part}': expected INDEX:MEMORY, e.g. 0:24GiB"))?;
                let index = i.trim().parse::<u32>().map_err(|_| format!("'{i}' is not a GPU index"))?;
                Ok(Gpu { index, total_mb: parse_mib(mem)?, used_mb: 0 })
            })
            .collect()
    }
}

/// Parses `24GiB`, `512MiB`, `24G`, or a plain number of MiB.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("'{s}' is not a memory size"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return Err(format!("'{s}': unknown unit (use MiB or GiB)")),
    };
    Ok(n * mult)
}

/// Resources held by one runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub runner: String,
    pub app_id: String,
    pub cpus: Vec<usize>,
    /// GPU index and MiB reserved on it.
    pub gpu: Option<(u32, u64)>,
    /// Since when it has been idle and may be evicted; None while it is starting or busy.
    pub idle_since: Option<Millis>,
}

/// Resources a new runner asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub app_id: String,
    /// CPU cores (0: none reserved; more than the budget: all of it).
    pub threads: u32,
    /// GPU memory in MiB (0: no GPU).
    pub gpu_mb: u64,
}

/// Where a new runner goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// It fits now, on these cores and this GPU.
    Fits { cpus: Vec<usize>, gpu: Option<(u32, u64)> },
    /// It fits once these idle runners (least recently used first) are stopped.
    Evict { victims: Vec<String>, cpus: Vec<usize>, gpu: Option<(u32, u64)> },
    /// It cannot fit even with every idle runner gone: wait for busy ones to finish.
    Wait,
    /// It can never fit on this machine (asks for more GPU memory than any GPU has).
    Never(String),
}

/// Cores and a GPU share (index, MiB).
type Fit = (Vec<usize>, Option<(u32, u64)>);

fn try_fit(inv: &Inventory, allocs: &[&Allocation], req: &Request) -> Result<Fit, Short> {
    let used: std::collections::HashSet<usize> = allocs.iter().flat_map(|a| a.cpus.iter().copied()).collect();
    let free: Vec<usize> = inv.cpus.iter().copied().filter(|c| !used.contains(c)).collect();
    let want = (req.threads as usize).min(inv.cpus.len());
    let cpu_short = free.len() < want;
    let mut gpu = None;
    let mut gpu_short = false;
    if req.gpu_mb > 0 {
        let best = inv
            .gpus
            .iter()
            .map(|g| {
                let ours: u64 =
                    allocs.iter().filter_map(|a| a.gpu).filter(|(i, _)| *i == g.index).map(|(_, mb)| mb).sum();
                (g.index, g.total_mb.saturating_sub(g.used_mb).saturating_sub(ours))
            })
            .filter(|(_, free)| *free >= req.gpu_mb)
            .max_by_key(|(i, free)| (*free, std::cmp::Reverse(*i)));
        match best {
            Some((i, _)) => gpu = Some((i, req.gpu_mb)),
            None => gpu_short = true,
        }
    }
    if cpu_short || gpu_short {
        return Err(Short { cpu: cpu_short, gpu: gpu_short });
    }
    Ok((free.into_iter().take(want).collect(), gpu))
}

struct Short {
    cpu: bool,
    gpu: bool,
}

/// Places a new runner: on free cores and the GPU with the most free memory; if nothing is free, by evicting idle
/// runners of other apps, least recently used first (only those whose release helps what is short). The app's own
/// runners are never evicted for it: that would trade one runner for another.
pub fn place(inv: &Inventory, allocs: &[Allocation], req: &Request) -> Placement {
    if req.gpu_mb > 0 && !inv.gpus.iter().any(|g| g.total_mb.saturating_sub(g.used_mb) >= req.gpu_mb) {
        return Placement::Never(format!("no GPU has {} MiB free", req.gpu_mb));
    }
    if inv.cpus.is_empty() && req.threads > 0 {
        return Placement::Never("no CPU cores in the runner budget".into());
    }
    let mut kept: Vec<&Allocation> = allocs.iter().collect();
    let mut short = match try_fit(inv, &kept, req) {
        Ok((cpus, gpu)) => return Placement::Fits { cpus, gpu },
        Err(s) => s,
    };
    let mut candidates: Vec<&Allocation> =
        allocs.iter().filter(|a| a.idle_since.is_some() && a.app_id != req.app_id).collect();
    candidates.sort_by_key(|a| (a.idle_since, a.runner.clone()));
    let mut victims = Vec::new();
    for c in candidates {
        let helps = (short.cpu && !c.cpus.is_empty()) || (short.gpu && c.gpu.is_some());
        if !helps {
            continue;
        }
        kept.retain(|a| a.runner != c.runner);
        victims.push(c.runner.clone());
        match try_fit(inv, &kept, req) {
            Ok((cpus, gpu)) => return Placement::Evict { victims, cpus, gpu },
            Err(s) => short = s,
        }
    }
    Placement::Wait
}

#[cfg(test)]
mod tests;
