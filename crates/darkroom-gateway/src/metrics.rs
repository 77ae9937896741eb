//! Prometheus metrics: queue depth per app, queue and run time histograms, runner states, completions.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use darkroom_core::app::CompiledApp;
use darkroom_core::job::JobRecord;
use darkroom_store::AppDepth;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::hub::RunnerInfo;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Installs the process-wide recorder once (several gateways in one test process share it).
pub fn install() {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().set_buckets(BUCKETS).expect("buckets are valid").build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed");
        }
        handle
    });
}

/// The Prometheus text exposition.
pub fn render() -> String {
    HANDLE.get().map(|h| h.render()).unwrap_or_default()
}

pub fn job_started(job: &JobRecord, now: i64) {
    let waited = (now - job.created_at).max(0) as f64 / 1000.0;
    metrics::histogram!("darkroom_queue_seconds", "app" => job.app_id.clone()).record(waited);
}

pub fn job_completed(job: &JobRecord) {
    let outcome = match job.error_type.as_deref() {
        None => "ok".to_string(),
        Some(t) => t.to_string(),
    };
    metrics::counter!("darkroom_requests_completed_total", "app" => job.app_id.clone(), "outcome" => outcome)
        .increment(1);
    if let (Some(s), Some(c)) = (job.started_at, job.completed_at) {
        metrics::histogram!("darkroom_run_seconds", "app" => job.app_id.clone()).record((c - s).max(0) as f64 / 1000.0);
    }
}

pub fn set_depths(apps: &HashMap<String, Arc<CompiledApp>>, depths: &[AppDepth]) {
    for app in apps.keys() {
        let d = depths.iter().find(|d| &d.app_id == app);
        metrics::gauge!("darkroom_queue_depth", "app" => app.clone()).set(d.map_or(0, |d| d.queued) as f64);
        metrics::gauge!("darkroom_in_flight", "app" => app.clone()).set(d.map_or(0, |d| d.running) as f64);
    }
}

/// Runners per app and state (every state of every app, zeros included).
pub fn set_runner_states<'a>(apps: impl Iterator<Item = &'a String>, runners: &'a [RunnerInfo]) {
    let mut counts: HashMap<(String, &'static str), usize> = HashMap::new();
    for app in apps.chain(runners.iter().map(|r| &r.app_id)) {
        for s in ["PENDING", "PULL", "SETUP", "IDLE", "RUNNING", "DRAINING", "TERMINATED"] {
            counts.entry((app.clone(), s)).or_default();
        }
    }
    for r in runners {
        *counts.entry((r.app_id.clone(), r.state)).or_default() += 1;
    }
    for ((app, state), n) in counts {
        metrics::gauge!("darkroom_runners", "app" => app, "state" => state).set(n as f64);
    }
}

/// A request waited `ms` for a runner to start.
pub fn cold_start(app: &str, ms: i64) {
    metrics::counter!("darkroom_cold_starts_total", "app" => app.to_string()).increment(1);
    metrics::histogram!("darkroom_cold_start_wait_seconds", "app" => app.to_string()).record(ms.max(0) as f64 / 1000.0);
}

/// A runner's frame was refused (a stale attempt, a job it does not hold).
pub fn frame_refused() {
    metrics::counter!("darkroom_runner_frames_refused_total").increment(1);
}

/// The fleet started a runner process.
pub fn runner_started(app: &str) {
    metrics::counter!("darkroom_runner_starts_total", "app" => app.to_string()).increment(1);
}

/// A runner process stopped: `idle`, `over_max_concurrency`, `startup_timeout` or `crashed`.
pub fn runner_stopped(app: &str, reason: &str) {
    metrics::counter!("darkroom_runner_stops_total", "app" => app.to_string(), "reason" => reason.to_string())
        .increment(1);
}

/// 1 while this gateway leads its cluster (runs the sweepers).
pub fn set_leader(leading: bool) {
    metrics::gauge!("darkroom_leader").set(if leading { 1.0 } else { 0.0 });
}

/// Bytes of a completed upload.
pub fn file_uploaded(bytes: u64) {
    metrics::counter!("darkroom_files_uploaded_total").increment(1);
    metrics::counter!("darkroom_file_upload_bytes_total").increment(bytes);
}

/// Bytes a download is sending.
pub fn file_downloaded(bytes: u64) {
    metrics::counter!("darkroom_file_download_bytes_total").increment(bytes);
}
