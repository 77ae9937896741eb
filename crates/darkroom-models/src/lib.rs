//! Darkroom's built-in models behind one [`Model`] trait. A model is loaded once per runner process and run with a
//! [`RunContext`] that gives it logs, progress, partial outputs and cancellation.

use std::sync::Arc;

use async_trait::async_trait;
use darkroom_core::app::{AppKind, AppSpec};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod audio;
pub mod background;
mod conv;
pub mod diagnostics;
pub mod files;
pub mod http_app;
pub mod image_utils;
pub mod piper;
pub mod pyenv;
pub mod sd_turbo;
pub mod store;
pub mod upscale;
pub mod whisper;

pub use files::{Fetched, File, FileError, FileIo, InlineFiles};

/// What a model reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelEvent {
    Log {
        level: String,
        message: String,
    },
    Progress {
        fraction: f64,
        message: Option<String>,
    },
    Partial(Value),
    /// How many units of its billing unit the request used (the last report wins).
    BillableUnits(f64),
}

/// Everything a model needs from its surroundings for one request.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub request_id: String,
    /// 1 on the first attempt.
    pub attempt: i64,
    /// The endpoint path within the app (`""` for the root).
    pub path: String,
    /// Cancelled when the request is cancelled or its client went away.
    pub cancel: CancellationToken,
    events: mpsc::UnboundedSender<ModelEvent>,
    /// Input fetching and output storage.
    pub files: Arc<dyn FileIo>,
    /// Return output files as data URIs instead of storing them (`sync_mode`, or `X-Fal-Store-IO: 0`).
    pub inline_outputs: bool,
}

impl RunContext {
    pub fn new(
        request_id: String,
        attempt: i64,
        path: String,
        cancel: CancellationToken,
        events: mpsc::UnboundedSender<ModelEvent>,
    ) -> Self {
        RunContext { request_id, attempt, path, cancel, events, files: Arc::new(InlineFiles), inline_outputs: false }
    }
    /// Sets where input files come from and output files go.
    pub fn with_files(mut self, files: Arc<dyn FileIo>, inline_outputs: bool) -> Self {
        self.files = files;
        self.inline_outputs = inline_outputs;
        self
    }
    /// Fetches an input file (a data URI, a URL of Darkroom's storage, or an external http(s) URL). Failures are
    /// the caller's fault and answer 422 naming `field`.
    pub async fn fetch_input(&self, field: &str, url: &str) -> Result<Fetched, ModelError> {
        self.files.fetch(url).await.map_err(|e| e.into_model_error(field))
    }
    /// Stores an output file and describes it in fal's shape; a data URI when outputs are inline.
    pub async fn output_file(
        &self,
        data: bytes::Bytes,
        content_type: &str,
        file_name: &str,
        dimensions: Option<(u32, u32)>,
    ) -> Result<File, ModelError> {
        let size = data.len() as u64;
        let url = if self.inline_outputs {
            files::data_uri(content_type, &data)
        } else {
            self.files.store(data, content_type, file_name).await.map_err(|e| {
                tracing::error!(request_id = %self.request_id, error = %e, "output upload failed");
                ModelError::App {
                    status: 500,
                    body: json!({"detail": format!("Could not store the output file: {e}")}),
                }
            })?
        };
        Ok(File {
            url,
            content_type: content_type.into(),
            file_name: file_name.into(),
            file_size: size,
            width: dimensions.map(|d| d.0),
            height: dimensions.map(|d| d.1),
        })
    }
    pub fn log(&self, level: &str, message: impl Into<String>) {
        let _ = self.events.send(ModelEvent::Log { level: level.into(), message: message.into() });
    }
    pub fn progress(&self, fraction: f64, message: Option<String>) {
        let _ = self.events.send(ModelEvent::Progress { fraction: fraction.clamp(0.0, 1.0), message });
    }
    pub fn partial(&self, data: Value) {
        let _ = self.events.send(ModelEvent::Partial(data));
    }
    /// Reports the billable units of this request in the app's billing unit (images, megapixels, audio seconds…),
    /// as fal apps do with `x-fal-billable-units`. Without a report a success bills the app's default.
    pub fn bill(&self, units: f64) {
        if units.is_finite() && units >= 0.0 {
            let _ = self.events.send(ModelEvent::BillableUnits(units));
        }
    }
}

/// How a run failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelError {
    /// The request was cancelled; the runner reports `request_cancelled`.
    Cancelled,
    /// The app's own failure: an HTTP status and the JSON body clients get as the result.
    App { status: u16, body: Value },
}

impl ModelError {
    pub fn app(status: u16, message: impl Into<String>) -> Self {
        ModelError::App { status, body: json!({"detail": message.into()}) }
    }
    /// A 422 in FastAPI's shape naming one input field (`["body", field]`).
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ModelError::App {
            status: 422,
            body: json!({"detail": [{"loc": ["body", field], "msg": message.into(), "type": "value_error"}]}),
        }
    }
}

/// A built-in model.
#[async_trait]
pub trait Model: Send + Sync + 'static {
    /// The app this model serves.
    fn spec(&self) -> AppSpec;
    /// Runs one request. Input has been validated against the input schema by the gateway.
    async fn run(&self, input: Value, ctx: RunContext) -> Result<Value, ModelError>;
    /// Gets the model ready before its first request: fetch weights (report [`SetupStage::Pull`]) and load them
    /// (report [`SetupStage::Setup`]). The runner takes no work until it returns; an error stops the runner.
    async fn setup(&self, _report: &SetupReporter) -> Result<(), String> {
        Ok(())
    }
    /// The app's realtime endpoint (`/{app}[/{path}]/realtime`): one output per input, in order, for the life of a
    /// session pinned to this runner. Inputs arrive as JSON (msgpack binary values become `data:` URIs); the
    /// default has none.
    async fn realtime(&self, path: &str, _input: Value, _ctx: &RealtimeContext) -> Result<Value, ModelError> {
        Err(ModelError::app(404, format!("this app has no realtime endpoint at /{path}")))
    }
    /// Whether the app has a realtime endpoint at this path (checked when a session opens).
    fn has_realtime(&self, _path: &str) -> bool {
        false
    }
    /// A WebSocket URL that serves this realtime path itself (a deployed app's own route): the runner then pipes
    /// the session's frames to it unchanged instead of calling [`Model::realtime`] per input.
    fn realtime_passthrough(&self, _path: &str) -> Option<String> {
        None
    }
    /// Returns (with the reason) once the model can serve nothing more, e.g. a deployed app's server died: the
    /// runner then exits and the fleet starts another. The default never returns.
    async fn fatal(&self) -> String {
        std::future::pending().await
    }
}

/// What a realtime handler gets besides its input.
#[derive(Debug, Clone)]
pub struct RealtimeContext {
    pub session_id: String,
    /// Cancelled when the session ends.
    pub cancel: CancellationToken,
}

/// What a model is doing while it gets ready (the runner's PULL and SETUP states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupStage {
    /// Fetching weights or an environment.
    Pull,
    /// Loading the model.
    Setup,
}

/// Reports a model's setup stages to the runner (and so to the gateway).
#[derive(Debug, Clone)]
pub struct SetupReporter(pub tokio::sync::mpsc::UnboundedSender<(SetupStage, String)>);

impl SetupReporter {
    pub fn stage(&self, stage: SetupStage, message: impl Into<String>) {
        let _ = self.0.send((stage, message.into()));
    }
}

/// Every built-in model's app spec.
pub fn builtin_specs() -> Vec<AppSpec> {
    vec![
        diagnostics::Diagnostics.spec(),
        image_utils::ImageUtils.spec(),
        whisper::WhisperApp::new().spec(),
        piper::PiperTts::new().spec(),
        background::RemoveBackground::new().spec(),
        sd_turbo::SdTurbo::new().spec(),
        upscale::UpscaleApp::new().spec(),
    ]
}

/// Loads a built-in model by app id.
pub fn load_builtin(app_id: &str) -> Option<Arc<dyn Model>> {
    match app_id {
        diagnostics::APP_ID => Some(Arc::new(diagnostics::Diagnostics)),
        image_utils::APP_ID => Some(Arc::new(image_utils::ImageUtils)),
        whisper::APP_ID => Some(Arc::new(whisper::WhisperApp::new())),
        piper::APP_ID => Some(Arc::new(piper::PiperTts::new())),
        background::APP_ID => Some(Arc::new(background::RemoveBackground::new())),
        sd_turbo::APP_ID => Some(Arc::new(sd_turbo::SdTurbo::new())),
        upscale::APP_ID => Some(Arc::new(upscale::UpscaleApp::new())),
        _ => None,
    }
}

/// Helper for specs of built-in apps.
pub fn builtin_spec<I: schemars::JsonSchema, O: schemars::JsonSchema>(
    id: &str,
    title: &str,
    description: &str,
    scaling: darkroom_core::scaling::ScalingKnobs,
    streaming: bool,
) -> AppSpec {
    AppSpec {
        id: id.into(),
        title: title.into(),
        description: description.into(),
        kind: AppKind::Builtin,
        paths: vec![String::new()],
        input_schema: serde_json::to_value(inline_schema::<I>()).expect("schema serialises"),
        output_schema: serde_json::to_value(inline_schema::<O>()).expect("schema serialises"),
        scaling,
        streaming,
        catalog: Default::default(),
        billing: Default::default(),
        realtime: vec![],
    }
}

/// Sets an app's catalog entry and metering.
pub fn with_catalog(
    mut spec: AppSpec,
    category: &str,
    tags: &[&str],
    license: Option<&str>,
    examples: Vec<(&str, Value)>,
    billing: darkroom_core::billing::Billing,
) -> AppSpec {
    spec.catalog = darkroom_core::app::CatalogInfo {
        category: category.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        license: license.map(str::to_string),
        examples: examples
            .into_iter()
            .map(|(title, input)| darkroom_core::app::Example { path: String::new(), title: title.into(), input })
            .collect(),
    };
    spec.billing = billing;
    spec
}

/// A JSON Schema with subschemas inlined: optional nested objects become `type: [object, null]` rather than
/// `anyOf`, so validation errors name the failing field (`["body", "fail", "status"]`).
fn inline_schema<T: schemars::JsonSchema>() -> schemars::Schema {
    schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>()
}
