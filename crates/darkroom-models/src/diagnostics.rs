//! `darkroom/diagnostics`: the built-in test app. It echoes, sleeps, logs, fails on request and streams partial
//! outputs, so clients, runners and the queue can be exercised without a model. It is documented as a test app and
//! does no work of its own.

use std::time::Duration;

use async_trait::async_trait;
use darkroom_core::app::AppSpec;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Model, ModelError, RunContext, builtin_spec};

pub const APP_ID: &str = "darkroom/diagnostics";

/// Input of `darkroom/diagnostics`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
pub struct DiagnosticsInput {
    /// Any JSON value; returned unchanged as `echo` in the output.
    #[serde(default)]
    pub echo: Option<Value>,
    /// Milliseconds to sleep before answering (cancellable). With `parts`, spread over the partial outputs.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3_600_000))]
    pub sleep_ms: u64,
    /// Messages to write to the request's log, one INFO line each.
    #[serde(default)]
    #[schemars(length(max = 10_000))]
    pub logs: Vec<String>,
    /// Fail the request with this HTTP status and message instead of answering.
    #[serde(default)]
    pub fail: Option<FailSpec>,
    /// Number of partial outputs `{"part": i}` to emit before the final output (seen by `/stream` clients).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10_000))]
    pub parts: u32,
    /// Report when the runner started the request (`started_unix_us`), for measuring queue overhead.
    #[serde(default)]
    pub timing: bool,
    /// Bill this many units instead of one request (exercises metering).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub bill_units: Option<f64>,
}

/// A failure to produce.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct FailSpec {
    /// HTTP status of the failure (400–599). 503 and 504 are retried by the queue unless `x-fal-no-retry` is set.
    #[schemars(range(min = 400, max = 599))]
    pub status: u16,
    /// The failure's `detail` message.
    #[serde(default)]
    pub message: String,
}

/// Output of `darkroom/diagnostics`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct DiagnosticsOutput {
    /// The input's `echo`.
    pub echo: Option<Value>,
    /// Which attempt produced this output (1 on the first).
    pub attempt: i64,
    /// With `timing`: when the runner started the request, in microseconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_unix_us: Option<u64>,
}

pub struct Diagnostics;

async fn sleep_or_cancel(ctx: &RunContext, ms: u64) -> Result<(), ModelError> {
    if ms == 0 {
        return if ctx.cancel.is_cancelled() { Err(ModelError::Cancelled) } else { Ok(()) };
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(()),
        _ = ctx.cancel.cancelled() => Err(ModelError::Cancelled),
    }
}

#[async_trait]
impl Model for Diagnostics {
    fn spec(&self) -> AppSpec {
        let spec = builtin_spec::<DiagnosticsInput, DiagnosticsOutput>(
            APP_ID,
            "Diagnostics (test app)",
            "Built-in test app: echoes its input, sleeps, logs, fails on request and streams partial outputs. \
             It runs no model.",
            // Cheap enough to keep one warm, so the test app answers without a cold start.
            darkroom_core::scaling::ScalingKnobs {
                min_concurrency: 1,
                max_concurrency: 4,
                max_multiplexing: 8,
                // It does no CPU work of its own: no cores reserved.
                cpu_threads: 0,
                ..Default::default()
            },
            true,
        );
        crate::with_catalog(
            spec,
            "test",
            &["diagnostics", "echo", "test"],
            None,
            vec![("Echo a value", json!({"echo": {"hello": "world"}})), ("Stream three parts", json!({"parts": 3}))],
            darkroom_core::billing::Billing {
                unit: darkroom_core::billing::BillingUnit::Request,
                estimate: darkroom_core::billing::UnitEstimate::Field { field: "bill_units".into(), default: 1.0 },
            },
        )
    }

    /// `DARKROOM_DIAGNOSTICS_PULL_MS` and `DARKROOM_DIAGNOSTICS_SETUP_MS` make its PULL and SETUP take that long (to
    /// exercise cold starts and their timeouts). It needs no weights, but `DARKROOM_DIAGNOSTICS_WEIGHTS=MODEL` makes
    /// it fetch a model through the model store in its PULL state, as a real model does (to exercise the store from
    /// a runner: progress, offline mode, failures).
    async fn setup(&self, report: &crate::SetupReporter) -> Result<(), String> {
        if let Ok(id) = std::env::var("DARKROOM_DIAGNOSTICS_WEIGHTS")
            && !id.is_empty()
        {
            let store = crate::store::ModelStore::from_env();
            let installed = crate::store::pull_for_setup(&store, &id, report).await?;
            report.stage(crate::SetupStage::Setup, format!("weights {id} in {}", installed.dir.display()));
        }
        let env_ms = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let pull = env_ms("DARKROOM_DIAGNOSTICS_PULL_MS");
        if pull > 0 {
            report.stage(crate::SetupStage::Pull, format!("simulated download of {pull} ms"));
            tokio::time::sleep(Duration::from_millis(pull)).await;
        }
        let ms = env_ms("DARKROOM_DIAGNOSTICS_SETUP_MS");
        if ms > 0 {
            report.stage(crate::SetupStage::Setup, format!("simulated setup of {ms} ms"));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(())
    }

    fn has_realtime(&self, path: &str) -> bool {
        path.is_empty()
    }

    /// The realtime echo: each input comes back as it came, after `sleep_ms` if it asks; `fail` (a message) fails
    /// the frame.
    async fn realtime(&self, _path: &str, input: Value, ctx: &crate::RealtimeContext) -> Result<Value, ModelError> {
        if let Some(ms) = input.get("sleep_ms").and_then(Value::as_u64) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms.min(60_000))) => {}
                _ = ctx.cancel.cancelled() => return Err(ModelError::Cancelled),
            }
        }
        if let Some(msg) = input.get("fail").and_then(Value::as_str) {
            return Err(ModelError::app(500, msg.to_string()));
        }
        Ok(input)
    }

    async fn run(&self, input: Value, ctx: RunContext) -> Result<Value, ModelError> {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let input: DiagnosticsInput = serde_json::from_value(input).map_err(|e| ModelError::App {
            status: 422,
            body: json!({"detail": [{"loc": ["body"], "msg": e.to_string(), "type": "value_error"}]}),
        })?;
        for m in &input.logs {
            ctx.log("INFO", m.clone());
        }
        if input.parts > 0 {
            let step = input.sleep_ms / u64::from(input.parts);
            for i in 0..input.parts {
                sleep_or_cancel(&ctx, step).await?;
                ctx.progress(f64::from(i + 1) / f64::from(input.parts), None);
                ctx.partial(json!({"part": i}));
            }
        } else {
            sleep_or_cancel(&ctx, input.sleep_ms).await?;
        }
        if let Some(fail) = input.fail {
            return Err(ModelError::App {
                status: fail.status,
                body: json!({"detail": fail.message, "attempt": ctx.attempt}),
            });
        }
        if let Some(units) = input.bill_units {
            ctx.bill(units);
        }
        Ok(serde_json::to_value(DiagnosticsOutput {
            echo: input.echo,
            attempt: ctx.attempt,
            started_unix_us: input.timing.then_some(started),
        })
        .expect("serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    fn ctx(cancel: CancellationToken) -> (RunContext, mpsc::UnboundedReceiver<crate::ModelEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (RunContext::new("r".into(), 2, String::new(), cancel, tx), rx)
    }

    #[tokio::test]
    async fn echoes_logs_and_streams() {
        let (c, mut rx) = ctx(CancellationToken::new());
        let out = Diagnostics.run(json!({"echo": {"a": [1]}, "logs": ["x"], "parts": 2}), c).await.unwrap();
        assert_eq!(out, json!({"echo": {"a": [1]}, "attempt": 2}));
        let mut partials = 0;
        let mut logs = 0;
        while let Ok(e) = rx.try_recv() {
            match e {
                crate::ModelEvent::Partial(_) => partials += 1,
                crate::ModelEvent::Log { .. } => logs += 1,
                _ => {}
            }
        }
        assert_eq!((partials, logs), (2, 1));
    }

    #[tokio::test]
    async fn fails_and_cancels() {
        let (c, _rx) = ctx(CancellationToken::new());
        let e = Diagnostics.run(json!({"fail": {"status": 418, "message": "teapot"}}), c).await.unwrap_err();
        assert_eq!(e, ModelError::App { status: 418, body: json!({"detail": "teapot", "attempt": 2}) });
        let cancel = CancellationToken::new();
        let (c, _rx) = ctx(cancel.clone());
        let h = tokio::spawn(async move { Diagnostics.run(json!({"sleep_ms": 60_000}), c).await });
        cancel.cancel();
        assert_eq!(h.await.unwrap().unwrap_err(), ModelError::Cancelled);
    }

    #[test]
    fn schema_validates_in_the_gateway() {
        let app = darkroom_core::app::CompiledApp::compile(Diagnostics.spec()).unwrap();
        assert!(app.validate(&json!({"echo": 1, "sleep_ms": 5})).is_ok());
        let e = app.validate(&json!({"sleep_ms": "x", "fail": {"status": 200}})).unwrap_err();
        let d = e.detail.unwrap();
        assert!(d.as_array().unwrap().len() >= 2, "{d}");
    }
}
