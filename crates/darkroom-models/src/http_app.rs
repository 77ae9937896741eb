//! The `http` executor: a user app that is its own HTTP server, described by a `darkroom.toml` manifest.
//!
//! The runner starts the app's command in the app's directory with `HOST=127.0.0.1` and a `PORT` it picked, waits
//! until `GET {health_path}` answers 2xx, then forwards each request as `POST /{path}` with `x-fal-request-id`
//! (fal-protocol.md §8.3). Cancelling a request forwards it as `POST /{path}/cancel` with the same request id and
//! stops waiting at once. The app's stdout and stderr become the request's logs.
//!
//! ```toml
//! [app]
//! id = "acme/echo"                      # owner/alias: segments of [a-z0-9._-], starting with a letter or digit
//! title = "Echo"
//! description = "Echoes its input."     # optional
//! category = "utility"                  # optional
//! tags = ["demo"]                       # optional
//! license = "MIT"                       # optional
//! endpoints = ["", "fast"]              # endpoint paths the app serves ("" is the root); default [""]
//! examples = [{ title = "Hello", path = "", input = { text = "hi" } }]   # optional
//!
//! [run]
//! command = ["python3", "server.py"]    # argv, run in the app's directory, never through a shell
//! health_path = "/health"               # default "/health"; GET must answer 2xx once the app is ready
//! env = { MODEL = "small" }             # optional
//! startup_timeout = 300                 # seconds from start to healthy (default: Darkroom's, 600)
//! request_timeout = 3600                # seconds per request (default 3600)
//! data = true                           # optional: a persistent folder at /data (needs bubblewrap)
//!
//! [scaling]                             # optional; fal's knobs, unset ones keep Darkroom's defaults
//! min_concurrency = 0
//! max_concurrency = 2
//! concurrency_buffer = 0
//! concurrency_buffer_perc = 0
//! keep_alive = 60
//! scaling_delay = 0
//! max_multiplexing = 1
//! cpu_threads = 1
//! gpu_memory_mb = 0
//! machine_type = "S"                    # fal's XS|S (1 thread), M (2), L (4), GPU-… (any GPU); the two above win
//!
//! [billing]                             # optional
//! unit = "request"                      # request | image | megapixel | audio_second | video_second | character
//! estimate = { kind = "field", field = "num_images", default = 1 }   # optional; see `UnitEstimate`
//! ```
//!
//! **Logs.** Each line the app prints (lines longer than 16 KiB are split) goes to a request through
//! [`RunContext::log`] with level `STDOUT` or `STDERR`. With `max_multiplexing = 1` the request in flight owns every
//! line. With more, a line goes to a request only if it contains that request's id (the app gets it in
//! `x-fal-request-id` and can print it, e.g. as `[{request_id}] …`); fal itself labels lines through its isolate
//! agent, which has no equivalent here. Lines that belong to no request go to the runner's own log (`tracing`, info
//! level, with the app id). Python apps get `PYTHONUNBUFFERED=1` unless their manifest sets it, so that lines
//! arrive while the request is still running.
//!
//! **Environment.** The app does not inherit the runner's environment (which holds the runner token and may hold
//! the operator's storage credentials): only a fixed list of harmless variables ([`INHERITED_ENV`], plus `LC_*`)
//! passes, then the manifest's `env`, then `HOST`, `PORT` and `DARKROOM_APP_ID`.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use darkroom_core::app::{AppKind, AppSpec, CatalogInfo, Example};
use darkroom_core::billing::{Billing, BillingUnit, UnitEstimate};
use darkroom_core::scaling::{ScalingKnobs, ScalingPatch};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Model, ModelError, RunContext, SetupReporter, SetupStage};

/// The variables of the runner's environment an app inherits (besides every `LC_*`).
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "VIRTUAL_ENV",
    "PYENV_ROOT",
    "PYENV_VERSION",
];

/// Endpoint path segments the gateway's routes or fal's cancel convention already use.
const RESERVED_LAST_SEGMENTS: &[&str] = &["stream", "cancel", "realtime"];

/// Connecting to the app (it is on 127.0.0.1: anything slower means it is not listening).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One health probe.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Between health probes: starts at the first value and doubles up to the second.
const HEALTH_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_millis(500));
/// How often setup reports that it is still waiting.
const SETUP_REPORT_EVERY: Duration = Duration::from_secs(10);
/// Forwarding a cancellation.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);
/// Past the app's `request_timeout` (which the gateway enforces) before the runner gives up on its own.
const REQUEST_TIMEOUT_MARGIN: Duration = Duration::from_secs(30);
/// Idle keep-alive connections are dropped before typical servers (uvicorn: 5 s) close them.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// The largest response body taken from the app.
const MAX_BODY: usize = 256 << 20;
/// Longer log lines are split.
const MAX_LINE: usize = 16 << 10;
/// Lines of each stream kept for error messages.
const TAIL_LINES: usize = 20;
/// After an answer, how often the pipes are checked for lines printed before it…
const SETTLE_QUIET: Duration = Duration::from_millis(1);
/// …and at most this long in all.
const SETTLE_MAX: Duration = Duration::from_millis(100);
/// How long a dead app's last output is waited for.
const EOF_WAIT: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------------------------
// The manifest

/// A `darkroom.toml`: an app that serves HTTP itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAppManifest {
    pub app: AppSection,
    pub run: RunSection,
    #[serde(default)]
    pub scaling: ScalingSection,
    #[serde(default)]
    pub billing: BillingSection,
    /// `[python]`: the app runs in its own Python environment with these requirements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonSection>,
    /// `[fal]`: a `fal.App` served by Darkroom's launcher (set by `darkroom apps deploy file.py::Class`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fal: Option<FalSection>,
}

/// `[python]`: a Python environment built for the app, one per set of requirements, cached and shared by the
/// apps that ask for the same. It sees the packages of the base Python (DARKROOM_PYTHON) below its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonSection {
    /// pip requirement specifiers.
    #[serde(default)]
    pub requirements: Vec<String>,
}

/// `[fal]`: the `fal.App` class the launcher serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FalSection {
    /// `path/to/file.py::ClassName`, relative to the app's folder.
    pub entry: String,
    /// The app's OpenAPI document, as its FastAPI app describes it (read at deploy time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openapi: Option<Value>,
}

impl FalSection {
    /// (file, class) of a valid entry.
    pub fn parse_entry(entry: &str) -> Result<(String, String), String> {
        let (file, class) = entry.split_once("::").ok_or("must be file.py::ClassName")?;
        let file_ok = file.ends_with(".py")
            && !file.starts_with('/')
            && file.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
            && !file.chars().any(|c| c.is_control());
        if !file_ok {
            return Err(format!(
                "'{}' must be a relative path to a .py file inside the app's folder",
                file.escape_default()
            ));
        }
        let class_ok = class.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && class.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !class_ok {
            return Err(format!("'{}' is not a Python class name", class.escape_default()));
        }
        Ok((file.to_string(), class.to_string()))
    }
}

/// `[app]`: identity and catalog entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSection {
    /// `owner/alias`.
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// Endpoint paths relative to the app, `""` for the root (leading and trailing slashes are dropped).
    #[serde(default = "root_endpoint")]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub examples: Vec<ExampleSection>,
    /// Paths whose fal realtime WebSocket the app serves itself at `/{path}/realtime` (`""`: `/realtime`); clients
    /// connect to `/{app}/{path}/realtime` and the runner pipes the msgpack frames through unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub realtime: Vec<String>,
}

/// An example input shown in the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleSection {
    pub title: String,
    #[serde(default)]
    pub path: String,
    pub input: Value,
}

/// `[run]`: how the app's server is started and checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The program and its arguments; a program with a `/` in it is relative to the app's directory.
    pub command: Vec<String>,
    #[serde(default = "default_health_path")]
    pub health_path: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<u64>,
    /// A persistent folder for the app at `/data` (kept across restarts and redeploys), mounted with bubblewrap
    /// (`bwrap`), which must then be installed. `fal.App` apps get it whenever `bwrap` is there, as on fal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<bool>,
}

/// `[scaling]`: fal's knobs; unset ones keep [`ScalingKnobs::default`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingSection {
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
    pub cpu_threads: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_mb: Option<u64>,
    /// fal's machine types: `XS` and `S` (1 CPU thread), `M` (2), `L` (4), `GPU-…` (any GPU); `cpu_threads` and
    /// `gpu_memory_mb` win over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
}

/// What one of fal's machine types needs here: (CPU threads, GPU memory in MB); None for an unknown type.
pub fn machine_resources(machine_type: &str) -> Option<(u32, Option<u64>)> {
    match machine_type.to_ascii_uppercase().as_str() {
        "XS" | "S" => Some((1, None)),
        "M" => Some((2, None)),
        "L" => Some((4, None)),
        m if m.starts_with("GPU") => Some((1, Some(1))),
        _ => None,
    }
}

/// `[billing]`: what a request is metered by.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSection {
    #[serde(default)]
    pub unit: BillingUnit,
    /// Units an input will cost, known before it runs. Default: one per request for the `request` unit, unknown
    /// for the others (the app reports them with `x-fal-billable-units`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<UnitEstimate>,
}

fn root_endpoint() -> Vec<String> {
    vec![String::new()]
}

fn default_health_path() -> String {
    "/health".into()
}

impl HttpAppManifest {
    /// Parses and checks a `darkroom.toml`.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let mut m: HttpAppManifest = toml::from_str(text).map_err(|e| format!("invalid darkroom.toml: {e}"))?;
        m.normalize();
        m.validate()?;
        Ok(m)
    }

    /// Writes endpoint paths without leading or trailing slashes (`"/"` is the root, `"/fast/"` is `fast`).
    pub fn normalize(&mut self) {
        for p in &mut self.app.endpoints {
            *p = p.trim_matches('/').to_string();
        }
        for p in &mut self.app.realtime {
            *p = p.trim_matches('/').to_string();
        }
        for e in &mut self.app.examples {
            e.path = e.path.trim_matches('/').to_string();
        }
    }

    /// Checks every field; the error lists each problem, `; `-separated.
    pub fn validate(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        let a = &self.app;
        if let Err(e) = check_app_id(&a.id) {
            bad.push(format!("app.id: {e}"));
        }
        if a.title.trim().is_empty() || a.title.chars().count() > 200 {
            bad.push("app.title: must be 1 to 200 characters".to_string());
        }
        if a.description.chars().count() > 20_000 {
            bad.push("app.description: must be at most 20000 characters".to_string());
        }
        if let Some(c) = &a.category
            && (c.is_empty()
                || c.len() > 64
                || !c.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        {
            bad.push(format!("app.category: '{}' must be 1 to 64 of [a-z0-9-]", c.escape_default()));
        }
        if a.tags.len() > 32 || a.tags.iter().any(|t| t.trim().is_empty() || t.chars().count() > 64) {
            bad.push("app.tags: at most 32 tags of 1 to 64 characters".to_string());
        }
        if a.license.as_ref().is_some_and(|l| l.trim().is_empty() || l.len() > 128) {
            bad.push("app.license: must be 1 to 128 characters".to_string());
        }
        if (a.endpoints.is_empty() && a.realtime.is_empty()) || a.endpoints.len() > 64 {
            bad.push("app.endpoints: must list 1 to 64 paths".to_string());
        }
        for (i, p) in a.endpoints.iter().enumerate() {
            if let Err(e) = check_endpoint(p) {
                bad.push(format!("app.endpoints: '{}' {e}", p.escape_default()));
            }
            if a.endpoints[..i].contains(p) {
                bad.push(format!("app.endpoints: '{}' is listed twice", p.escape_default()));
            }
        }
        if a.realtime.len() > 64 {
            bad.push("app.realtime: at most 64 paths".to_string());
        }
        for p in &a.realtime {
            let ok = p.is_empty()
                || p.split('/').all(|s| {
                    !s.is_empty()
                        && s != "."
                        && s != ".."
                        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                });
            if !ok {
                bad.push(format!("app.realtime: '{}' must be segments of [A-Za-z0-9._-]", p.escape_default()));
            }
        }
        for e in &a.examples {
            if e.title.trim().is_empty() {
                bad.push("app.examples: every example needs a title".to_string());
            }
            if !a.endpoints.contains(&e.path) {
                bad.push(format!("app.examples: '{}' is not one of the app's endpoints", e.path.escape_default()));
            }
            if !e.input.is_object() {
                bad.push(format!("app.examples: the input of '{}' must be a table", e.title.escape_default()));
            }
        }
        let r = &self.run;
        if let Some(f) = &self.fal
            && let Err(e) = FalSection::parse_entry(&f.entry)
        {
            bad.push(format!("fal.entry: {e}"));
        }
        if let Some(py) = &self.python
            && (py.requirements.len() > 500
                || py.requirements.iter().any(|r| r.trim().is_empty() || r.len() > 1000 || r.contains(['\0', '\n'])))
        {
            bad.push("python.requirements: at most 500 requirement specifiers, one line each".to_string());
        }
        match r.command.first() {
            // The launcher is the command of a fal app.
            None if self.fal.is_some() => {}
            None => bad.push("run.command: must name a program".to_string()),
            Some(p) if p.is_empty() => bad.push("run.command: the program must not be empty".to_string()),
            Some(_) => {}
        }
        if r.command.iter().any(|a| a.contains('\0')) {
            bad.push("run.command: arguments must not contain NUL".to_string());
        }
        if !r.health_path.starts_with('/')
            || r.health_path.len() > 1024
            || r.health_path.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#')
        {
            bad.push(format!(
                "run.health_path: '{}' must start with '/' and hold no spaces, controls or '#'",
                r.health_path.escape_default()
            ));
        }
        for (k, v) in &r.env {
            if let Err(e) = check_env_name(k) {
                bad.push(format!("run.env: '{}' {e}", k.escape_default()));
            }
            if v.contains('\0') {
                bad.push(format!("run.env: the value of '{}' must not contain NUL", k.escape_default()));
            }
        }
        if let Some(m) = &self.scaling.machine_type
            && machine_resources(m).is_none()
        {
            bad.push(format!("scaling.machine_type: '{}' is not one of XS, S, M, L, GPU-…", m.escape_default()));
        }
        if let Err(detail) = self.knobs().validate(&[]) {
            for d in detail {
                let field = d["loc"].as_array().and_then(|l| l.last()).and_then(Value::as_str).unwrap_or("?");
                let section = if matches!(field, "startup_timeout" | "request_timeout") { "run" } else { "scaling" };
                bad.push(format!("{section}.{field}: {}", d["msg"].as_str().unwrap_or("invalid")));
            }
        }
        match &self.billing.estimate {
            Some(UnitEstimate::Field { field, default })
                if field.is_empty() || !default.is_finite() || *default < 0.0 =>
            {
                bad.push("billing.estimate: needs a field name and a default of at least 0".to_string());
            }
            Some(UnitEstimate::Length { field }) if field.is_empty() => {
                bad.push("billing.estimate: needs a field name".to_string());
            }
            _ => {}
        }
        if bad.is_empty() { Ok(()) } else { Err(bad.join("; ")) }
    }

    /// The app's scaling knobs: `[scaling]` and `[run]`'s timeouts over Darkroom's defaults.
    pub fn knobs(&self) -> ScalingKnobs {
        let s = &self.scaling;
        let machine = s.machine_type.as_deref().and_then(machine_resources);
        ScalingPatch {
            min_concurrency: s.min_concurrency,
            max_concurrency: s.max_concurrency,
            concurrency_buffer: s.concurrency_buffer,
            concurrency_buffer_perc: s.concurrency_buffer_perc,
            keep_alive: s.keep_alive,
            scaling_delay: s.scaling_delay,
            max_multiplexing: s.max_multiplexing,
            startup_timeout: self.run.startup_timeout,
            request_timeout: self.run.request_timeout,
            cpu_threads: s.cpu_threads.or(machine.map(|m| m.0)),
            gpu_memory_mb: s.gpu_memory_mb.or(machine.and_then(|m| m.1)),
        }
        .apply(&ScalingKnobs::default())
    }

    /// The app's metering.
    pub fn billing(&self) -> Billing {
        let unit = self.billing.unit;
        let estimate = self.billing.estimate.clone().unwrap_or(if unit == BillingUnit::Request {
            UnitEstimate::PerRequest
        } else {
            UnitEstimate::Unknown
        });
        Billing { unit, estimate }
    }

    /// The app as the registry knows it. Its schemas accept any JSON object: the app validates its own input and
    /// its 422 reaches the client unchanged.
    pub fn spec(&self) -> AppSpec {
        let a = &self.app;
        AppSpec {
            id: a.id.clone(),
            title: a.title.clone(),
            description: a.description.clone(),
            kind: AppKind::Http,
            paths: a.endpoints.clone(),
            input_schema: json!({"type": "object"}),
            output_schema: json!({"type": "object"}),
            scaling: self.knobs(),
            streaming: false,
            catalog: CatalogInfo {
                category: a.category.clone().unwrap_or_default(),
                tags: a.tags.clone(),
                license: a.license.clone(),
                examples: a
                    .examples
                    .iter()
                    .map(|e| Example { path: e.path.clone(), title: e.title.clone(), input: e.input.clone() })
                    .collect(),
            },
            billing: self.billing(),
            realtime: a.realtime.clone(),
        }
    }
}

fn check_app_id(id: &str) -> Result<(), String> {
    let segs: Vec<&str> = id.split('/').collect();
    let [owner, alias] = segs[..] else {
        return Err(format!("'{}' must be owner/alias", id.escape_default()));
    };
    for s in [owner, alias] {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(format!(
                "'{}' is not a valid segment: 1 to 128 of [a-z0-9._-], starting with a letter or digit",
                s.escape_default()
            ));
        }
    }
    if darkroom_core::ids::NAMESPACES.contains(&owner) {
        return Err(format!("'{owner}' is a namespace and cannot own an app"));
    }
    Ok(())
}

fn check_endpoint(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    let segs: Vec<&str> = path.split('/').collect();
    for s in &segs {
        let ok = !s.is_empty()
            && s.len() <= 128
            && *s != "."
            && *s != ".."
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err("must be segments of [A-Za-z0-9._-] separated by '/'".into());
        }
    }
    if segs[0] == "requests" || path == "openapi.json" {
        return Err("is reserved by the queue API".into());
    }
    if let Some(last) = segs.last()
        && RESERVED_LAST_SEGMENTS.contains(last)
    {
        return Err(format!("may not end in '{last}' (the gateway routes /stream, /realtime and /cancel)"));
    }
    Ok(())
}

fn check_env_name(k: &str) -> Result<(), String> {
    let ok = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err("is not a valid variable name".into());
    }
    if k == "HOST" || k == "PORT" || k.starts_with("DARKROOM_") {
        return Err("is set by the runner".into());
    }
    Ok(())
}

/// The app's environment: the harmless part of the runner's, the manifest's `env`, then the runner's settings.
fn child_env(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    manifest: &HttpAppManifest,
    extra: &BTreeMap<String, String>,
    port: u16,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = parent
        .into_iter()
        .filter(|(k, _)| k.to_str().is_some_and(|k| INHERITED_ENV.contains(&k) || k.starts_with("LC_")))
        .collect();
    env.insert("PYTHONUNBUFFERED".into(), "1".into());
    for (k, v) in manifest.run.env.iter().chain(extra) {
        env.insert(k.into(), v.into());
    }
    env.insert("HOST".into(), "127.0.0.1".into());
    env.insert("PORT".into(), port.to_string().into());
    env.insert("DARKROOM_APP_ID".into(), manifest.app.id.clone().into());
    env
}

/// bubblewrap, once it has been seen to work here (it needs mount namespaces, which a container may deny).
async fn usable_bwrap() -> Result<PathBuf, String> {
    static PROBE: tokio::sync::OnceCell<Result<PathBuf, String>> = tokio::sync::OnceCell::const_new();
    PROBE
        .get_or_init(|| async {
            let bwrap = crate::pyenv::which("bwrap").ok_or_else(|| {
                "bubblewrap (bwrap) is not installed (Debian and Ubuntu: apt install bubblewrap)".to_string()
            })?;
            let out = tokio::process::Command::new(&bwrap)
                // The machine's root as it is (nothing is mounted over it, so nothing is created on it).
                .args(["--die-with-parent", "--dev-bind", "/", "/", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| format!("bubblewrap could not run: {e}"))?;
            if out.status.success() {
                Ok(bwrap)
            } else {
                Err(format!(
                    "bubblewrap does not work here ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        })
        .await
        .clone()
}

/// A program with a `/` in its name is relative to the app's directory (not to the runner's).
fn program_path(dir: &Path, program: &str) -> PathBuf {
    let p = Path::new(program);
    if program.contains('/') && p.is_relative() { dir.join(p) } else { p.to_path_buf() }
}

// ---------------------------------------------------------------------------------------------------------------
// The executor

/// An app served by its own HTTP server, started by [`Model::setup`] and stopped (killed) when this is dropped.
///
/// The server stays in the runner's process group, so the local runner backend's group kill reaches it too.
pub struct HttpApp {
    manifest: HttpAppManifest,
    knobs: ScalingKnobs,
    dir: PathBuf,
    /// Variables the runner adds (secrets, the toolkit's upload settings), after the manifest's `env`.
    extra_env: BTreeMap<String, String>,
    /// Where `[python]` environments are built, and the base Python they sit on.
    env_cache: Option<(PathBuf, String)>,
    /// The app's persistent folder, mounted at `/data`.
    data_dir: Option<PathBuf>,
    logs: Arc<LogRouter>,
    /// Set once the app answered its health check.
    running: OnceLock<Running>,
    /// The outcome of setup, which runs once.
    setup_outcome: tokio::sync::Mutex<Option<Result<(), String>>>,
    /// Kills the app's process.
    stop: CancellationToken,
    /// Set when the app's server exited on its own after it was started.
    died: watch::Sender<Option<String>>,
}

struct Running {
    port: u16,
    client: reqwest::Client,
    /// `Some(exit status)` once the app's process has exited.
    exit: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for HttpApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpApp")
            .field("id", &self.manifest.app.id)
            .field("dir", &self.dir)
            .field("port", &self.port())
            .finish()
    }
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        // The supervisor kills and reaps the process; if the runtime is gone, `kill_on_drop` kills it.
        self.stop.cancel();
    }
}

impl HttpApp {
    /// An app from its manifest (already validated) and its directory. Nothing starts before [`Model::setup`].
    pub fn new(manifest: HttpAppManifest, dir: impl Into<PathBuf>) -> Self {
        let knobs = manifest.knobs();
        let logs = Arc::new(LogRouter::new(manifest.app.id.clone(), knobs.max_multiplexing <= 1));
        HttpApp {
            manifest,
            knobs,
            dir: dir.into(),
            extra_env: BTreeMap::new(),
            env_cache: None,
            data_dir: None,
            died: watch::channel(None).0,
            logs,
            running: OnceLock::new(),
            setup_outcome: tokio::sync::Mutex::new(None),
            stop: CancellationToken::new(),
        }
    }

    /// Reads `darkroom.toml` from the app's directory.
    pub fn from_dir(dir: impl Into<PathBuf>) -> Result<Self, String> {
        let dir = dir.into();
        let file = dir.join("darkroom.toml");
        let text = std::fs::read_to_string(&file).map_err(|e| format!("could not read {}: {e}", file.display()))?;
        let manifest = HttpAppManifest::from_toml(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(HttpApp::new(manifest, dir))
    }

    /// Adds variables to the app's environment (after the manifest's `env`; `HOST`, `PORT` and `DARKROOM_APP_ID`
    /// still win). Their values are never logged.
    pub fn with_env(mut self, env: impl IntoIterator<Item = (String, String)>) -> Self {
        self.extra_env.extend(env);
        self
    }

    /// Where `[python]` (and `[fal]`) apps get their environments built, on which base Python (default: under
    /// `~/.cache/darkroom/envs`, on `python3`).
    pub fn with_env_cache(mut self, cache: impl Into<PathBuf>, python: impl Into<String>) -> Self {
        self.env_cache = Some((cache.into(), python.into()));
        self
    }

    /// The app's persistent folder, mounted at `/data` when the manifest asks for it (`[run] data = true`) or the
    /// app is a `fal.App` and bubblewrap is installed.
    pub fn with_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Wraps the command in bubblewrap with the app's folder at `/data`, when it gets one.
    async fn with_data_mount(&self, command: Vec<String>, dir: &Path) -> Result<Vec<String>, String> {
        let wanted = match self.manifest.run.data {
            Some(w) => w,
            None => self.manifest.fal.is_some(),
        };
        let required = self.manifest.run.data == Some(true);
        if !wanted {
            return Ok(command);
        }
        let bwrap = match usable_bwrap().await {
            Ok(b) => b,
            Err(why) => {
                if required {
                    return Err(format!("the app asks for /data ([run] data = true), which needs bubblewrap: {why}"));
                }
                tracing::warn!(app = %self.manifest.app.id, "the app runs without /data: {why}");
                return Ok(command);
            }
        };
        let Some(data) = &self.data_dir else {
            if required {
                return Err("the app asks for /data, but this runner was given no data folder".into());
            }
            return Ok(command);
        };
        tokio::fs::create_dir_all(data).await.map_err(|e| format!("the app's data folder {}: {e}", data.display()))?;
        let mut args = vec![bwrap.display().to_string(), "--die-with-parent".into(), "--tmpfs".into(), "/".into()];
        // Everything of the machine's root but /data, which is the app's own.
        let mut entries = tokio::fs::read_dir("/").await.map_err(|e| format!("reading /: {e}"))?;
        while let Some(e) = entries.next_entry().await.map_err(|e| format!("reading /: {e}"))? {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "data" {
                continue;
            }
            let path = format!("/{name}");
            let meta = tokio::fs::symlink_metadata(&path).await.map_err(|e| format!("{path}: {e}"))?;
            if meta.file_type().is_symlink() {
                let target = tokio::fs::read_link(&path).await.map_err(|e| format!("{path}: {e}"))?;
                args.extend(["--symlink".into(), target.display().to_string(), path]);
            } else {
                args.extend(["--dev-bind".into(), path.clone(), path]);
            }
        }
        args.extend(["--bind".into(), data.display().to_string(), "/data".into()]);
        args.extend(["--chdir".into(), dir.display().to_string(), "--".into()]);
        args.extend(command);
        Ok(args)
    }

    /// The command to start, and variables it needs: a `[python]` app's environment is built first (PULL), and a
    /// `[fal]` app runs Darkroom's launcher in it.
    async fn resolve_command(&self, report: &SetupReporter) -> Result<(Vec<String>, BTreeMap<String, String>), String> {
        let m = &self.manifest;
        if m.python.is_none() && m.fal.is_none() {
            return Ok((m.run.command.clone(), BTreeMap::new()));
        }
        let (cache, base) = match &self.env_cache {
            Some((c, b)) => (c.clone(), b.clone()),
            None => {
                let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
                (home.join(".cache/darkroom/envs"), "python3".to_string())
            }
        };
        let reqs = m.python.as_ref().map(|p| p.requirements.clone()).unwrap_or_default();
        let install = Duration::from_secs(self.knobs.startup_timeout.max(600));
        let env = crate::pyenv::ensure(&base, &cache, &reqs, report, install).await?;
        let mut vars = BTreeMap::new();
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
        vars.insert("PATH".to_string(), format!("{}:{path}", env.bin.display()));
        vars.insert("VIRTUAL_ENV".to_string(), env.dir.display().to_string());
        let command = match &m.fal {
            Some(f) => {
                let (file, class) = FalSection::parse_entry(&f.entry)?;
                let launcher = crate::pyenv::launcher(&env).await?;
                vec![env.python.display().to_string(), launcher.display().to_string(), "serve".to_string(), file, class]
            }
            None => m.run.command.clone(),
        };
        Ok((command, vars))
    }

    pub fn manifest(&self) -> &HttpAppManifest {
        &self.manifest
    }

    /// The port the app listens on, once it is healthy.
    pub fn port(&self) -> Option<u16> {
        self.running.get().map(|r| r.port)
    }

    /// Whether the app's server was started, became healthy and has not exited since.
    pub fn is_alive(&self) -> bool {
        self.running.get().is_some_and(|r| r.exit.borrow().is_none())
    }

    fn command_line(&self) -> String {
        self.manifest.run.command.join(" ")
    }

    async fn start(&self, report: &SetupReporter) -> Result<(), String> {
        let run = &self.manifest.run;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .user_agent(concat!("darkroom-runner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("could not build an HTTP client: {e}"))?;
        let dir = tokio::fs::canonicalize(&self.dir)
            .await
            .map_err(|e| format!("the app's directory {}: {e}", self.dir.display()))?;
        if !dir.is_dir() {
            return Err(format!("the app's directory {} is not a directory", dir.display()));
        }
        let (command, mut env_vars) = self.resolve_command(report).await?;
        let command = self.with_data_mount(command, &dir).await?;
        let Some(program) = command.first() else {
            return Err("run.command names no program".into());
        };
        env_vars.extend(self.extra_env.clone());
        let port = free_port()?;
        let mut cmd = tokio::process::Command::new(program_path(&dir, program));
        cmd.args(&command[1..])
            .current_dir(&dir)
            .env_clear()
            .envs(child_env(std::env::vars_os(), &self.manifest, &env_vars, port))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The app must not outlive a runner that dies without cleaning up (SIGKILL, OOM): the kernel kills it.
        // SAFETY: prctl is async-signal-safe and touches only the child's own process state.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let line = command.join(" ");
        report.stage(SetupStage::Setup, format!("starting `{line}` on 127.0.0.1:{port}"));
        let mut child = cmd.spawn().map_err(|e| format!("could not start `{line}` in {}: {e}", dir.display()))?;
        let pid = child.id();
        tracing::info!(app = %self.manifest.app.id, pid, port, "started the app's server");

        // Its output, line by line.
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        self.logs.open.send_replace(usize::from(stdout.is_some()) + usize::from(stderr.is_some()));
        if let Some(out) = stdout {
            lock(&self.logs.fds).push(std::os::fd::AsRawFd::as_raw_fd(&out));
            tokio::spawn(pump(out, Stream::Stdout, self.logs.clone()));
        }
        if let Some(err) = stderr {
            lock(&self.logs.fds).push(std::os::fd::AsRawFd::as_raw_fd(&err));
            tokio::spawn(pump(err, Stream::Stderr, self.logs.clone()));
        }

        // Its life: the supervisor owns the process, reaps it and publishes its exit status.
        let (exit_tx, exit_rx) = watch::channel(None);
        {
            let stop = self.stop.clone();
            let app_id = self.manifest.app.id.clone();
            let logs = self.logs.clone();
            let died = self.died.clone();
            tokio::spawn(async move {
                let (status, stopped) = tokio::select! {
                    s = child.wait() => (s, false),
                    _ = stop.cancelled() => {
                        let _ = child.start_kill();
                        (child.wait().await, true)
                    }
                };
                let status = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("unknown exit status ({e})"),
                };
                if stopped {
                    tracing::info!(app = %app_id, %status, "stopped the app's server");
                } else {
                    logs.wait_closed(EOF_WAIT).await;
                    tracing::error!(app = %app_id, %status, last_output = %logs.tail(), "the app's server exited");
                }
                if !stopped {
                    died.send_replace(Some(status.clone()));
                }
                exit_tx.send_replace(Some(status));
            });
        }

        // Ready when the health check answers 2xx.
        let started = Instant::now();
        let budget = Duration::from_secs(self.knobs.startup_timeout);
        let deadline = started + budget;
        let health_url = format!("http://127.0.0.1:{port}{}", run.health_path);
        let mut exit = exit_rx.clone();
        let mut last = "no answer yet".to_string();
        let mut pause = HEALTH_BACKOFF.0;
        let mut next_report = started + SETUP_REPORT_EVERY;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let mut msg = format!(
                    "the app did not become healthy within {} s: GET {} on 127.0.0.1:{port} never answered 2xx \
                     (last: {last})",
                    budget.as_secs(),
                    run.health_path
                );
                msg.push_str(&self.logs.tail_note());
                return Err(msg);
            }
            let probe = client.get(&health_url).timeout(HEALTH_PROBE_TIMEOUT.min(deadline - now)).send();
            let answer = tokio::select! {
                r = probe => r,
                _ = exited(&mut exit) => return Err(self.exited_early(&exit_rx).await),
            };
            match answer {
                Ok(resp) if resp.status().is_success() => break,
                Ok(resp) => last = format!("HTTP {}", resp.status()),
                Err(e) => last = probe_error(&e),
            }
            let now = Instant::now();
            if now >= next_report {
                report.stage(
                    SetupStage::Setup,
                    format!(
                        "waiting for GET {} to answer 2xx ({} s of {} s; last: {last})",
                        run.health_path,
                        started.elapsed().as_secs(),
                        budget.as_secs()
                    ),
                );
                next_report = now + SETUP_REPORT_EVERY;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause.min(deadline.saturating_duration_since(now))) => {}
                _ = exited(&mut exit) => return Err(self.exited_early(&exit_rx).await),
            }
            pause = (pause * 2).min(HEALTH_BACKOFF.1);
        }
        report.stage(
            SetupStage::Setup,
            format!("healthy after {:.1} s on 127.0.0.1:{port}", started.elapsed().as_secs_f64()),
        );
        let _ = self.running.set(Running { port, client, exit: exit_rx });
        Ok(())
    }

    async fn exited_early(&self, exit: &watch::Receiver<Option<String>>) -> String {
        self.logs.wait_closed(EOF_WAIT).await;
        let status = exit.borrow().clone().unwrap_or_else(|| "unknown exit status".into());
        format!(
            "the app's command `{}` exited before it became healthy ({status}){}",
            self.command_line(),
            self.logs.tail_note()
        )
    }

    /// Fails a request because the app's process is gone (503: the queue runs it again elsewhere).
    fn crashed(&self, status: &str, during: bool) -> ModelError {
        let when = if during { "during the request" } else { "earlier" };
        ModelError::app(
            503,
            format!("The app's server exited {when} ({status}); this runner cannot serve app {}", self.manifest.app.id),
        )
    }

    /// Tells the app a request was cancelled, as fal does: `POST /{path}/cancel` with its `x-fal-request-id`.
    fn forward_cancel(&self, running: &Running, ctx: &RunContext) {
        let url = cancel_url(running.port, &ctx.path);
        let client = running.client.clone();
        let request_id = ctx.request_id.clone();
        let app_id = self.manifest.app.id.clone();
        tokio::spawn(async move {
            let sent = client
                .post(&url)
                .header("x-fal-request-id", &request_id)
                .json(&json!({}))
                .timeout(CANCEL_TIMEOUT)
                .send()
                .await;
            match sent {
                Ok(r) => {
                    tracing::debug!(app = %app_id, %request_id, status = r.status().as_u16(), "forwarded a cancel")
                }
                Err(e) => {
                    tracing::debug!(app = %app_id, %request_id, error = %error_chain(&e), "could not forward a cancel")
                }
            }
        });
    }
}

#[async_trait]
impl Model for HttpApp {
    fn spec(&self) -> AppSpec {
        self.manifest.spec()
    }

    fn has_realtime(&self, path: &str) -> bool {
        self.manifest.app.realtime.iter().any(|p| p == path)
    }

    fn realtime_passthrough(&self, path: &str) -> Option<String> {
        if !self.has_realtime(path) {
            return None;
        }
        let port = self.port()?;
        Some(if path.is_empty() {
            format!("ws://127.0.0.1:{port}/realtime")
        } else {
            format!("ws://127.0.0.1:{port}/{path}/realtime")
        })
    }

    async fn fatal(&self) -> String {
        let mut rx = self.died.subscribe();
        let res = rx.wait_for(Option::is_some).await.map(|s| s.clone().unwrap_or_default());
        let Ok(status) = res else { return std::future::pending().await };
        format!("the app's server exited ({status})")
    }

    async fn setup(&self, report: &SetupReporter) -> Result<(), String> {
        let mut outcome = self.setup_outcome.lock().await;
        if let Some(done) = &*outcome {
            return done.clone();
        }
        let res = self.start(report).await;
        if res.is_err() {
            self.stop.cancel();
        }
        *outcome = Some(res.clone());
        res
    }

    async fn run(&self, input: Value, ctx: RunContext) -> Result<Value, ModelError> {
        let Some(running) = self.running.get() else {
            return Err(ModelError::app(
                503,
                format!("app {} is not running (setup did not finish)", self.manifest.app.id),
            ));
        };
        if let Some(status) = running.exit.borrow().clone() {
            return Err(self.crashed(&status, false));
        }
        if !self.manifest.app.endpoints.contains(&ctx.path) {
            return Err(ModelError::app(404, format!("Path /{} not found", ctx.path)));
        }
        let _registered = self.logs.register(&ctx);
        let timeout = Duration::from_secs(self.knobs.request_timeout).saturating_add(REQUEST_TIMEOUT_MARGIN);
        let call = async {
            let resp = running
                .client
                .post(format!("http://127.0.0.1:{}/{}", running.port, ctx.path))
                .header("x-fal-request-id", &ctx.request_id)
                .json(&input)
                .timeout(timeout)
                .send()
                .await
                .map_err(CallError::Http)?;
            let status = resp.status();
            let units = resp
                .headers()
                .get("x-fal-billable-units")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok());
            let body = read_body(resp).await?;
            Ok::<_, CallError>((status, units, body))
        };
        let mut exit = running.exit.clone();
        let outcome = tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => {
                self.forward_cancel(running, &ctx);
                return Err(ModelError::Cancelled);
            }
            r = call => r,
            _ = exited(&mut exit) => Err(CallError::Exited),
        };
        match outcome {
            Ok((status, units, body)) => {
                self.logs.settle().await;
                if let Some(units) = units {
                    ctx.bill(units);
                }
                answer(status, &body)
            }
            Err(e) => {
                // The app may have died under the request: give its exit a moment to show.
                let died = tokio::time::timeout(EOF_WAIT, exited(&mut exit)).await.is_ok();
                if died {
                    self.logs.wait_closed(EOF_WAIT).await;
                    let status = running.exit.borrow().clone().unwrap_or_else(|| "unknown exit status".into());
                    return Err(self.crashed(&status, true));
                }
                self.logs.settle().await;
                Err(match e {
                    CallError::Http(e) if e.is_timeout() => {
                        ModelError::app(504, format!("The app did not answer within {} s", timeout.as_secs()))
                    }
                    CallError::Http(e) => ModelError::app(
                        503,
                        format!("Could not reach the app's server on 127.0.0.1:{}: {}", running.port, error_chain(&e)),
                    ),
                    CallError::TooLarge => {
                        ModelError::app(502, format!("The app's answer is larger than {} MiB", MAX_BODY >> 20))
                    }
                    CallError::Exited => self.crashed("unknown exit status", true),
                })
            }
        }
    }
}

/// Resolves once the app's process has exited (or its supervisor is gone).
async fn exited(exit: &mut watch::Receiver<Option<String>>) {
    let _ = exit.wait_for(Option::is_some).await;
}

enum CallError {
    Http(reqwest::Error),
    TooLarge,
    Exited,
}

async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, CallError> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(CallError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(CallError::Http)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(CallError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The request's outcome from the app's answer: a 2xx JSON body is the output; a 4xx or 5xx passes through as is
/// (a body that is not JSON becomes `{"detail": text}`).
fn answer(status: reqwest::StatusCode, body: &[u8]) -> Result<Value, ModelError> {
    let parsed = serde_json::from_slice::<Value>(body);
    let code = status.as_u16();
    if status.is_success() {
        return parsed
            .map_err(|_| ModelError::app(500, format!("The app answered HTTP {status} with a body that is not JSON")));
    }
    if !(400..=599).contains(&code) {
        return Err(ModelError::app(502, format!("The app answered with an unexpected HTTP {status}")));
    }
    let body = match parsed {
        Ok(v) => v,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                json!({"detail": status.canonical_reason().unwrap_or("Error")})
            } else {
                json!({"detail": truncate(text, 64 << 10)})
            }
        }
    };
    Err(ModelError::App { status: code, body })
}

fn cancel_url(port: u16, path: &str) -> String {
    if path.is_empty() {
        format!("http://127.0.0.1:{port}/cancel")
    } else {
        format!("http://127.0.0.1:{port}/{path}/cancel")
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, String> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("could not find a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("could not find a free port: {e}"))
}

/// An error with its causes (`error sending request: connection refused`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cur = c.source();
    }
    s
}

/// Why a health probe failed, briefly (`cannot connect: Connection refused (os error 111)`).
fn probe_error(e: &reqwest::Error) -> String {
    let mut root: &dyn std::error::Error = e;
    while let Some(c) = root.source() {
        root = c;
    }
    if e.is_timeout() {
        format!("no answer within {} s", HEALTH_PROBE_TIMEOUT.as_secs())
    } else if e.is_connect() {
        format!("cannot connect: {root}")
    } else {
        root.to_string()
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

// ---------------------------------------------------------------------------------------------------------------
// Logs

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn level(self) -> &'static str {
        match self {
            Stream::Stdout => "STDOUT",
            Stream::Stderr => "STDERR",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// Sends each line of the app's output to the request it belongs to.
struct LogRouter {
    app_id: String,
    /// `max_multiplexing` is 1: the request in flight owns every line.
    single: bool,
    /// Requests in flight, by registration key.
    active: Mutex<Vec<(u64, RunContext)>>,
    next_key: AtomicU64,
    /// Bytes taken out of the pipes, and bytes of those cut into lines (equal: nothing read is waiting).
    pulled: AtomicU64,
    consumed: AtomicU64,
    /// The pipes' descriptors while their readers live (asked how much is unread).
    fds: Mutex<Vec<std::os::fd::RawFd>>,
    /// The last lines of stdout and stderr.
    tails: Mutex<[VecDeque<String>; 2]>,
    /// Streams still open.
    open: watch::Sender<usize>,
}

/// A request in flight, as long as this lives.
struct Registration<'a> {
    router: &'a LogRouter,
    key: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        lock(&self.router.active).retain(|(k, _)| *k != self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogRouter {
    fn new(app_id: String, single: bool) -> Self {
        LogRouter {
            app_id,
            single,
            active: Mutex::new(Vec::new()),
            next_key: AtomicU64::new(0),
            pulled: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            fds: Mutex::new(Vec::new()),
            tails: Mutex::new([VecDeque::new(), VecDeque::new()]),
            open: watch::Sender::new(0),
        }
    }

    fn register(&self, ctx: &RunContext) -> Registration<'_> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        lock(&self.active).push((key, ctx.clone()));
        Registration { router: self, key }
    }

    fn line(&self, stream: Stream, raw: &[u8]) {
        let mut text = String::from_utf8_lossy(raw).into_owned();
        while text.ends_with(['\n', '\r']) {
            text.pop();
        }
        {
            let mut tails = lock(&self.tails);
            let tail = &mut tails[stream.index()];
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text.clone());
        }
        let mut delivered = false;
        {
            let active = lock(&self.active);
            if self.single && active.len() == 1 {
                active[0].1.log(stream.level(), text.clone());
                delivered = true;
            } else {
                for (_, ctx) in active.iter() {
                    if !ctx.request_id.is_empty() && text.contains(&ctx.request_id) {
                        ctx.log(stream.level(), text.clone());
                        delivered = true;
                    }
                }
            }
        }
        if !delivered {
            tracing::info!(app = %self.app_id, stream = stream.name(), "{text}");
        }
    }

    /// The last lines of stderr (of stdout if stderr was silent), one per line.
    fn tail(&self) -> String {
        let tails = lock(&self.tails);
        let tail = if tails[1].is_empty() { &tails[0] } else { &tails[1] };
        tail.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }

    /// The tail, as the end of an error message.
    fn tail_note(&self) -> String {
        let tails = lock(&self.tails);
        let (which, tail) = if tails[1].is_empty() { ("stdout", &tails[0]) } else { ("stderr", &tails[1]) };
        if tail.is_empty() {
            return "; it printed nothing".into();
        }
        let lines: Vec<String> = tail.iter().map(|l| format!("  {l}")).collect();
        format!("; last {which} lines:\n{}", lines.join("\n"))
    }

    /// Whether everything the app printed so far has been cut into lines: the pipes hold no unread bytes and the
    /// readers have nothing buffered.
    fn drained(&self) -> bool {
        let fds = lock(&self.fds);
        let pipes_empty = fds.iter().all(|&fd| {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int; the descriptor stays open while it is in `fds` (a reader removes
            // it, under this lock, before it closes the pipe).
            let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
            r != 0 || n == 0
        });
        pipes_empty && self.pulled.load(Ordering::Acquire) == self.consumed.load(Ordering::Acquire)
    }

    /// Waits until lines already printed have been read: an app writes its output before its answer, so once the
    /// pipes are empty and the readers idle, every line of the request has been routed. At most [`SETTLE_MAX`].
    async fn settle(&self) {
        let deadline = Instant::now() + SETTLE_MAX;
        loop {
            tokio::task::yield_now().await;
            if self.drained() || *self.open.borrow() == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(SETTLE_QUIET).await;
        }
    }

    /// Waits (at most `limit`) until both streams reached their end.
    async fn wait_closed(&self, limit: Duration) {
        let mut rx = self.open.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
    }
}

/// Reads one of the app's streams line by line until it closes.
async fn pump(reader: impl AsyncRead + Unpin + std::os::fd::AsRawFd, stream: Stream, router: Arc<LogRouter>) {
    let fd = reader.as_raw_fd();
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let mut lines = Lines::default();
    loop {
        let before = reader.buffer().len();
        let buf = match reader.fill_buf().await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(app = %router.app_id, stream = stream.name(), error = %e, "could not read the app's output");
                break;
            }
        };
        if buf.is_empty() {
            break;
        }
        if buf.len() > before {
            router.pulled.fetch_add((buf.len() - before) as u64, Ordering::Release);
        }
        let (n, line) = lines.feed(buf, MAX_LINE);
        reader.consume(n);
        if let Some(line) = line {
            router.line(stream, &line);
        }
        router.consumed.fetch_add(n as u64, Ordering::Release);
    }
    lock(&router.fds).retain(|&f| f != fd);
    drop(reader);
    if let Some(line) = lines.finish() {
        router.line(stream, &line);
    }
    router.open.send_modify(|n| *n = n.saturating_sub(1));
}

/// Cuts a byte stream into lines of at most `max` bytes (longer ones are split).
#[derive(Debug, Default)]
struct Lines {
    line: Vec<u8>,
    /// The last line given out was cut at `max`, not at a newline.
    split: bool,
}

impl Lines {
    /// Takes bytes from `buf` up to the end of a line: how many it took, and the line it completed, if any.
    fn feed(&mut self, buf: &[u8], max: usize) -> (usize, Option<Vec<u8>>) {
        let max = max.max(1);
        let newline = buf.iter().position(|&b| b == b'\n');
        let n = newline.map_or(buf.len(), |i| i + 1).min(max - self.line.len());
        self.line.extend_from_slice(&buf[..n]);
        let ended = newline.is_some_and(|i| n == i + 1);
        if !ended && self.line.len() < max {
            return (n, None);
        }
        let line = std::mem::take(&mut self.line);
        let after_split = std::mem::replace(&mut self.split, !ended);
        // The newline that ends a split line starts no line of its own.
        if after_split && ended && (line == b"\n" || line == b"\r\n") {
            return (n, None);
        }
        (n, Some(line))
    }

    /// What is left when the stream ends.
    fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.line.is_empty()).then(|| std::mem::take(&mut self.line))
    }
}

// ---------------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelEvent;
    use tokio::sync::mpsc;

    const LIMIT: Duration = Duration::from_secs(15);

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/http_app")
    }

    /// The fixture server's manifest, with extra TOML appended to `[run]` (`run_extra`) and after it (`rest`).
    fn manifest(run_extra: &str, rest: &str) -> HttpAppManifest {
        let text = format!(
            "[app]\nid = \"acme/echo\"\ntitle = \"Echo\"\nendpoints = [\"/\", \"fast\"]\n\n\
             [run]\ncommand = [\"python3\", \"server.py\"]\nstartup_timeout = 10\n{run_extra}\n{rest}"
        );
        HttpAppManifest::from_toml(&text).unwrap()
    }

    fn reporter() -> (SetupReporter, mpsc::UnboundedReceiver<(SetupStage, String)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (SetupReporter(tx), rx)
    }

    async fn started(m: HttpAppManifest) -> HttpApp {
        let app = HttpApp::new(m, fixture_dir());
        let (report, _rx) = reporter();
        app.setup(&report).await.unwrap();
        app
    }

    struct Call {
        ctx: RunContext,
        events: mpsc::UnboundedReceiver<ModelEvent>,
        cancel: CancellationToken,
    }

    fn call(request_id: &str, path: &str) -> Call {
        let (tx, events) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let ctx = RunContext::new(request_id.into(), 1, path.into(), cancel.clone(), tx);
        Call { ctx, events, cancel }
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<ModelEvent>) -> Vec<ModelEvent> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
    }

    fn logs(events: &[ModelEvent]) -> Vec<(String, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                ModelEvent::Log { level, message } => Some((level.clone(), message.clone())),
                _ => None,
            })
            .collect()
    }

    async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(LIMIT, f).await.expect("the test took too long")
    }

    #[test]
    fn machine_types_set_resources() {
        let k = manifest("", "[scaling]\nmachine_type = \"M\"").knobs();
        assert_eq!((k.cpu_threads, k.gpu_memory_mb), (2, 0));
        let k = manifest("", "[scaling]\nmachine_type = \"GPU-H100\"").knobs();
        assert!(k.gpu_memory_mb > 0);
        let k = manifest("", "[scaling]\nmachine_type = \"L\"\ncpu_threads = 3").knobs();
        assert_eq!(k.cpu_threads, 3);
        let text =
            "[app]\nid = \"acme/echo\"\ntitle = \"Echo\"\n[run]\ncommand = [\"x\"]\n[scaling]\nmachine_type = \"XXL\"";
        let e = HttpAppManifest::from_toml(text).unwrap_err();
        assert!(e.contains("scaling.machine_type"), "{e}");
    }

    #[test]
    fn manifest_parses_and_maps_onto_the_spec() {
        let m = HttpAppManifest::from_toml(
            r#"
            [app]
            id = "acme/echo"
            title = "Echo"
            description = "Echoes its input."
            category = "utility"
            tags = ["demo", "test"]
            license = "MIT"
            endpoints = ["/", "/fast/"]
            examples = [{ title = "Hello", input = { text = "hi", n = 2 } }]

            [run]
            command = ["python3", "server.py"]
            env = { MODEL = "small" }
            startup_timeout = 300

            [scaling]
            max_multiplexing = 4
            keep_alive = 120
            gpu_memory_mb = 8000

            [billing]
            unit = "image"
            estimate = { kind = "field", field = "num_images", default = 1 }
            "#,
        )
        .unwrap();
        assert_eq!(m.app.endpoints, vec!["", "fast"]);
        assert_eq!(m.run.health_path, "/health");
        let spec = m.spec();
        assert_eq!(spec.id, "acme/echo");
        assert_eq!(spec.paths, vec!["", "fast"]);
        assert_eq!(spec.kind, AppKind::Http);
        assert_eq!(spec.scaling.max_multiplexing, 4);
        assert_eq!(spec.scaling.keep_alive, 120);
        assert_eq!(spec.scaling.gpu_memory_mb, 8000);
        assert_eq!(spec.scaling.startup_timeout, 300);
        assert_eq!(spec.scaling.request_timeout, ScalingKnobs::default().request_timeout);
        assert_eq!(spec.scaling.max_concurrency, ScalingKnobs::default().max_concurrency);
        assert_eq!(spec.catalog.category, "utility");
        assert_eq!(spec.catalog.tags, vec!["demo", "test"]);
        assert_eq!(spec.catalog.license.as_deref(), Some("MIT"));
        assert_eq!(spec.catalog.examples[0].input, json!({"text": "hi", "n": 2}));
        assert_eq!(spec.billing.unit, BillingUnit::Image);
        assert_eq!(spec.billing.estimate_units(&json!({"num_images": 3})), Some(3.0));
        assert!(darkroom_core::app::CompiledApp::compile(spec.clone()).unwrap().validate(&json!({"x": 1})).is_ok());

        // Defaults: the root endpoint, per-request billing, an unknown estimate for other units.
        let m = HttpAppManifest::from_toml("[app]\nid = \"a/b\"\ntitle = \"T\"\n[run]\ncommand = [\"x\"]\n").unwrap();
        assert_eq!(m.spec().paths, vec![""]);
        assert_eq!(m.billing(), Billing { unit: BillingUnit::Request, estimate: UnitEstimate::PerRequest });
        let m = HttpAppManifest::from_toml(
            "[app]\nid = \"a/b\"\ntitle = \"T\"\n[run]\ncommand = [\"x\"]\n[billing]\nunit = \"megapixel\"\n",
        )
        .unwrap();
        assert_eq!(m.billing().estimate, UnitEstimate::Unknown);
    }

    #[test]
    fn manifest_problems_are_named() {
        let base = |app: &str, run: &str, rest: &str| {
            format!("[app]\nid = \"acme/echo\"\ntitle = \"Echo\"\n{app}\n[run]\ncommand = [\"x\"]\n{run}\n{rest}")
        };
        let err = |text: String| HttpAppManifest::from_toml(&text).unwrap_err();
        assert!(err(base("colour = \"red\"", "", "")).contains("colour"));
        assert!(err(base("", "", "[scaling]\nstartup_timeout = 3")).contains("startup_timeout"));
        let e = err("[app]\nid = \"Acme/echo\"\ntitle = \"E\"\n[run]\ncommand = [\"x\"]\n".into());
        assert!(e.contains("app.id"), "{e}");
        let e = err("[app]\nid = \"acme\"\ntitle = \"E\"\n[run]\ncommand = [\"x\"]\n".into());
        assert!(e.contains("owner/alias"), "{e}");
        let e = err("[app]\nid = \"workflows/echo\"\ntitle = \"E\"\n[run]\ncommand = [\"x\"]\n".into());
        assert!(e.contains("namespace"), "{e}");
        assert!(err(base("endpoints = [\"a\", \"/a\"]", "", "")).contains("twice"));
        assert!(err(base("endpoints = [\"x/stream\"]", "", "")).contains("stream"));
        assert!(err(base("endpoints = [\"cancel\"]", "", "")).contains("cancel"));
        assert!(err(base("endpoints = [\"requests\"]", "", "")).contains("reserved"));
        assert!(err(base("endpoints = [\"a b\"]", "", "")).contains("app.endpoints"));
        assert!(err(base("endpoints = []", "", "")).contains("app.endpoints"));
        assert!(err(base("", "health_path = \"health\"", "")).contains("run.health_path"));
        assert!(err(base("", "env = { PORT = \"1\" }", "")).contains("set by the runner"));
        assert!(err(base("", "env = { DARKROOM_RUNNER_TOKEN = \"t\" }", "")).contains("set by the runner"));
        assert!(err(base("", "env = { \"A-B\" = \"1\" }", "")).contains("variable name"));
        assert!(err(base("", "startup_timeout = 0", "")).contains("run.startup_timeout"));
        let e = err(base("", "", "[scaling]\nmax_multiplexing = 0\nmin_concurrency = 9"));
        assert!(e.contains("scaling.max_multiplexing") && e.contains("scaling.min_concurrency"), "{e}");
        assert!(err(base("", "", "[billing]\nunit = \"token\"")).contains("unit"));
        let e = err("[app]\nid = \"a/b\"\ntitle = \"T\"\n[run]\ncommand = []\n".into());
        assert!(e.contains("run.command"), "{e}");
        assert!(err(base("examples = [{ title = \"x\", path = \"nope\", input = {} }]", "", "")).contains("examples"));
    }

    #[test]
    fn the_app_gets_a_clean_environment() {
        let m = manifest("env = { MODEL = \"small\", PYTHONUNBUFFERED = \"0\" }", "");
        let parent = [
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("DARKROOM_RUNNER_TOKEN", "secret"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("HOST", "0.0.0.0"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_env(parent, &m, &BTreeMap::from([("HF_TOKEN".to_string(), "s3cret".to_string())]), 4321);
        let get = |k: &str| env.get(&OsString::from(k)).map(|v| v.to_string_lossy().into_owned());
        assert_eq!(get("PATH").as_deref(), Some("/usr/bin"));
        assert_eq!(get("LC_ALL").as_deref(), Some("C.UTF-8"));
        assert_eq!(get("DARKROOM_RUNNER_TOKEN"), None);
        assert_eq!(get("AWS_SECRET_ACCESS_KEY"), None);
        assert_eq!(get("HOST").as_deref(), Some("127.0.0.1"));
        assert_eq!(get("PORT").as_deref(), Some("4321"));
        assert_eq!(get("DARKROOM_APP_ID").as_deref(), Some("acme/echo"));
        assert_eq!(get("MODEL").as_deref(), Some("small"));
        assert_eq!(get("PYTHONUNBUFFERED").as_deref(), Some("0"));
        assert_eq!(get("HF_TOKEN").as_deref(), Some("s3cret"));
        assert_eq!(program_path(Path::new("/app"), "./serve.sh"), PathBuf::from("/app/./serve.sh"));
        assert_eq!(program_path(Path::new("/app"), "python3"), PathBuf::from("python3"));
        assert_eq!(cancel_url(1, ""), "http://127.0.0.1:1/cancel");
        assert_eq!(cancel_url(1, "fast"), "http://127.0.0.1:1/fast/cancel");
    }

    #[test]
    fn output_is_cut_into_bounded_lines() {
        let mut lines = Lines::default();
        let mut out = Vec::new();
        for chunk in [&b"ab"[..], b"c\nabcdefgh\nxy", b"z\r\n", b"tail"] {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (n, line) = lines.feed(rest, 4);
                out.extend(line.map(|l| String::from_utf8(l).unwrap()));
                rest = &rest[n..];
            }
        }
        out.extend(lines.finish().map(|l| String::from_utf8(l).unwrap()));
        // `xyz\r` fills a line; the newline after it is not a line of its own.
        assert_eq!(out, vec!["abc\n", "abcd", "efgh", "xyz\r", "tail"]);
    }

    #[tokio::test]
    async fn setup_waits_for_health_and_both_endpoints_answer() {
        bounded(async {
            let app = HttpApp::new(manifest("env = { MODEL = \"small\", HEALTH_DELAY = \"0.3\" }", ""), fixture_dir());
            assert!(!app.is_alive());
            let (report, mut stages) = reporter();
            app.setup(&report).await.unwrap();
            assert!(app.is_alive());
            let mut msgs = Vec::new();
            while let Ok((stage, msg)) = stages.try_recv() {
                assert_eq!(stage, SetupStage::Setup);
                msgs.push(msg);
            }
            assert!(msgs.first().is_some_and(|m| m.starts_with("starting `python3 server.py`")), "{msgs:?}");
            assert!(msgs.last().is_some_and(|m| m.starts_with("healthy after")), "{msgs:?}");
            // A second setup changes nothing.
            app.setup(&report).await.unwrap();

            let port = app.port().unwrap().to_string();
            let c = call("req-root", "");
            let out = app.run(json!({"x": 1}), c.ctx).await.unwrap();
            assert_eq!(out["path"], "");
            assert_eq!(out["request_id"], "req-root");
            assert_eq!(out["input"], json!({"x": 1}));
            assert_eq!(
                out["env"],
                json!({"HOST": "127.0.0.1", "PORT": port, "DARKROOM_APP_ID": "acme/echo", "MODEL": "small",
                       "HF_TOKEN": null, "VERSION": null})
            );
            let c = call("req-fast", "fast");
            let out = app.run(json!({}), c.ctx).await.unwrap();
            assert_eq!((out["path"].as_str(), out["request_id"].as_str()), (Some("fast"), Some("req-fast")));
            // A path the app does not serve.
            let c = call("req-nope", "nope");
            let e = app.run(json!({}), c.ctx).await.unwrap_err();
            assert!(matches!(e, ModelError::App { status: 404, .. }), "{e:?}");
        })
        .await
    }

    #[tokio::test]
    async fn the_apps_errors_pass_through() {
        bounded(async {
            let app = started(manifest("", "")).await;
            let mut c = call("req-422", "");
            let e = app.run(json!({"status": 422}), c.ctx).await.unwrap_err();
            let want = json!({"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]});
            assert_eq!(e, ModelError::App { status: 422, body: want });
            assert!(drain(&mut c.events).contains(&ModelEvent::BillableUnits(0.0)));
            let c = call("req-500", "fast");
            let e = app.run(json!({"text_error": true}), c.ctx).await.unwrap_err();
            assert_eq!(e, ModelError::App { status: 500, body: json!({"detail": "boom: something broke"}) });
            assert!(app.is_alive());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_lines_land_on_the_requests_log() {
        bounded(async {
            let app = started(manifest("", "")).await;
            let mut c = call("req-logs", "");
            app.run(json!({}), c.ctx).await.unwrap();
            let lines = logs(&drain(&mut c.events));
            assert!(lines.contains(&("STDOUT".into(), "handling root".into())), "{lines:?}");
            assert!(lines.contains(&("STDERR".into(), "warming up req-logs".into())), "{lines:?}");
            // What the app printed while starting belongs to no request.
            assert!(!lines.iter().any(|(_, m)| m == "app starting"), "{lines:?}");
        })
        .await
    }

    #[tokio::test]
    async fn with_multiplexing_lines_go_by_request_id() {
        bounded(async {
            let app = started(manifest("", "[scaling]\nmax_multiplexing = 2")).await;
            let (a, b) = ("0190b6b0-0000-7000-8000-00000000000a", "0190b6b0-0000-7000-8000-00000000000b");
            let (mut ca, mut cb) = (call(a, ""), call(b, "fast"));
            let (ra, rb) =
                tokio::join!(app.run(json!({"tagged": true}), ca.ctx), app.run(json!({"tagged": true}), cb.ctx));
            ra.unwrap();
            rb.unwrap();
            for (id, events) in [(a, &mut ca.events), (b, &mut cb.events)] {
                // Each stream keeps its order; the two streams interleave as they are read.
                let lines = logs(&drain(events));
                let of = |level: &str| lines.iter().filter(|l| l.0 == level).map(|l| l.1.clone()).collect::<Vec<_>>();
                assert_eq!(of("STDOUT"), vec![format!("[{id}] step 1"), format!("[{id}] step 2")], "{lines:?}");
                assert_eq!(of("STDERR"), vec![format!("warming up {id}")], "{lines:?}");
            }
        })
        .await
    }

    #[tokio::test]
    async fn billable_units_are_reported() {
        bounded(async {
            let app = started(manifest("", "")).await;
            let mut c = call("req-units", "");
            app.run(json!({"units": 2.5}), c.ctx).await.unwrap();
            let units: Vec<_> = drain(&mut c.events)
                .into_iter()
                .filter_map(|e| match e {
                    ModelEvent::BillableUnits(u) => Some(u),
                    _ => None,
                })
                .collect();
            assert_eq!(units, vec![2.5]);
        })
        .await
    }

    #[tokio::test]
    async fn cancelling_stops_waiting_and_tells_the_app() {
        bounded(async {
            let app = started(manifest("", "")).await;
            let c = call("req-cancel", "fast");
            let cancel = c.cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                cancel.cancel();
            });
            let t = Instant::now();
            let e = app.run(json!({"sleep": 30}), c.ctx).await.unwrap_err();
            assert_eq!(e, ModelError::Cancelled);
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            // The app saw `POST /fast/cancel` with the request's id.
            let url = format!("http://127.0.0.1:{}/cancelled", app.port().unwrap());
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            loop {
                let seen: Vec<String> = client.get(&url).send().await.unwrap().json().await.unwrap();
                if seen.contains(&"req-cancel".to_string()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // An already-cancelled request is not sent at all.
            let c = call("req-early", "");
            c.cancel.cancel();
            assert_eq!(app.run(json!({"sleep": 30}), c.ctx).await.unwrap_err(), ModelError::Cancelled);
            assert!(app.is_alive());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_fails_the_request_with_503_and_later_ones_fast() {
        bounded(async {
            let app = started(manifest("", "")).await;
            let mut c = call("req-crash", "");
            let e = app.run(json!({"crash": true}), c.ctx).await.unwrap_err();
            let ModelError::App { status: 503, body } = &e else { panic!("{e:?}") };
            let detail = body["detail"].as_str().unwrap();
            assert!(detail.contains("exited during the request") && detail.contains("exit status: 3"), "{detail}");
            let lines = logs(&drain(&mut c.events));
            assert!(lines.contains(&("STDOUT".into(), "about to crash".into())), "{lines:?}");
            assert!(!app.is_alive());
            let t = Instant::now();
            let c = call("req-after", "");
            let e = app.run(json!({}), c.ctx).await.unwrap_err();
            assert!(matches!(e, ModelError::App { status: 503, .. }), "{e:?}");
            assert!(t.elapsed() < Duration::from_millis(200));
        })
        .await
    }

    #[tokio::test]
    async fn an_app_that_never_gets_healthy_times_out() {
        bounded(async {
            let mut m = manifest("health_path = \"/not-health\"", "");
            m.run.startup_timeout = Some(1);
            let app = HttpApp::new(m, fixture_dir());
            let t = Instant::now();
            let e = app.setup(&reporter().0).await.unwrap_err();
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
            assert!(e.contains("within 1 s") && e.contains("GET /not-health"), "{e}");
            // The server answers 404 once it listens (a loaded machine may take longer than 1 s to start it).
            assert!(e.contains("(last: HTTP 404 Not Found)") || e.contains("(last: cannot connect"), "{e}");
            assert!(!app.is_alive());
            // Setup does not run twice.
            assert_eq!(app.setup(&reporter().0).await.unwrap_err(), e);
            let c = call("req-x", "");
            assert!(matches!(app.run(json!({}), c.ctx).await, Err(ModelError::App { status: 503, .. })));
        })
        .await
    }

    #[tokio::test]
    async fn a_command_that_exits_reports_its_status_and_stderr() {
        bounded(async {
            let mut m = manifest("", "");
            m.run.command = vec![
                "python3".into(),
                "-c".into(),
                "import sys; print('loading'); print('bad config: MODEL missing', file=sys.stderr); sys.exit(7)".into(),
            ];
            let app = HttpApp::new(m, fixture_dir());
            let e = app.setup(&reporter().0).await.unwrap_err();
            assert!(e.contains("exited before it became healthy (exit status: 7)"), "{e}");
            assert!(e.contains("last stderr lines:\n  bad config: MODEL missing"), "{e}");

            let mut m = manifest("", "");
            m.run.command = vec!["./no-such-program".into()];
            let e = HttpApp::new(m, fixture_dir()).setup(&reporter().0).await.unwrap_err();
            assert!(e.contains("could not start `./no-such-program`"), "{e}");
        })
        .await
    }
}
