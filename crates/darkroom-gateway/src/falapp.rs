//! Deploying an existing `fal.App`: its declared settings are read at deploy time by Darkroom's launcher
//! ([`darkroom_models::pyenv::FAL_LAUNCHER`] `inspect`) on the server's Python (`--python`, which has the `fal`
//! SDK), in a scratch copy of the bundle, and turned into a manifest: `[fal]` (the entry and the app's OpenAPI),
//! `[python]` (its requirements), its scaling knobs and timeouts. Runners then serve it with the launcher's
//! `serve` in the app's own environment (see `darkroom_models::http_app`).
//!
//! Mapping of fal's settings: `app_name` (the alias, under the deployer's owner unless `?app_id=` names one),
//! `keep_alive`, `min_concurrency`, `max_concurrency`, `concurrency_buffer`, `concurrency_buffer_perc`,
//! `scaling_delay`, `max_multiplexing`, `request_timeout` and `startup_timeout` as they are; `requirements` (lists
//! of lists are flattened); `machine_type` `XS`/`S` → 1 CPU thread, `M` → 2, `L` → 4, `GPU-*` → any GPU;
//! WebSocket and realtime endpoints are not served (their HTTP endpoints are); `image` (container apps) is
//! refused: there is no container engine here.

use std::process::Stdio;
use std::time::Duration;

use darkroom_core::ErrorType;
use darkroom_models::http_app::{AppSection, FalSection, HttpAppManifest, PythonSection, RunSection, ScalingSection};
use serde_json::{Value, json};

use crate::Gateway;
use crate::error::{ApiErr, err};

const MARK: &str = "__DARKROOM_INSPECT__ ";
const INSPECT_TIMEOUT: Duration = Duration::from_secs(120);

fn invalid(loc: &[&str], msg: impl Into<String>) -> ApiErr {
    ApiErr(darkroom_core::app::validation_error(vec![
        json!({"loc": loc, "msg": msg.into(), "type": "fal_app_invalid"}),
    ]))
}

/// Reads a `fal.App`'s settings from the bundle and derives its manifest.
pub(crate) async fn inspect(
    gw: &Gateway,
    bundle: &[u8],
    entry: &str,
    app_id: Option<&str>,
    owner: &str,
) -> Result<HttpAppManifest, ApiErr> {
    let (file, class) = FalSection::parse_entry(entry).map_err(|e| invalid(&["query", "entry"], e))?;
    let scratch = std::env::temp_dir().join(format!("darkroom-inspect-{}", &darkroom_core::auth::random_token()[..16]));
    let dest = scratch.join("app");
    let data = bundle.to_vec();
    let unpacked = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || crate::deploy::unpack_bundle(&data, &dest)
    })
    .await
    .map_err(|_| ApiErr(darkroom_core::ApiError::internal()))?;
    let res = async {
        unpacked.map_err(|e| invalid(&["body"], e))?;
        if !dest.join(&file).is_file() {
            return Err(invalid(&["query", "entry"], format!("the bundle has no {file}")));
        }
        run_inspect(gw, &dest, &file, &class).await
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    manifest_from(&res?, entry, app_id, owner)
}

async fn run_inspect(gw: &Gateway, dir: &std::path::Path, file: &str, class: &str) -> Result<Value, ApiErr> {
    let mut cmd = tokio::process::Command::new(&gw.cfg.python);
    cmd.arg("-c")
        .arg(darkroom_models::pyenv::FAL_LAUNCHER)
        .args(["inspect", file, class])
        .current_dir(dir)
        .env_clear()
        .envs(
            std::env::vars()
                .filter(|(k, _)| matches!(k.as_str(), "PATH" | "HOME" | "LANG" | "TMPDIR") || k.starts_with("LC_")),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(INSPECT_TIMEOUT, cmd.output()).await {
        Err(_) => {
            return Err(invalid(
                &["body"],
                format!("importing {file} took longer than {} s", INSPECT_TIMEOUT.as_secs()),
            ));
        }
        Ok(Err(e)) => {
            return Err(err(
                ErrorType::ServiceUnavailable,
                format!("cannot run the server's Python `{}` to read the app: {e}", gw.cfg.python),
            ));
        }
        Ok(Ok(o)) => o,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().rev().find_map(|l| l.strip_prefix(MARK)) {
        Some(j) if out.status.success() => {
            serde_json::from_str(j).map_err(|e| invalid(&["body"], format!("the launcher's report is unreadable: {e}")))
        }
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
            let msg = tail.join("\n");
            if msg.contains("No module named 'fal'") {
                return Err(err(
                    ErrorType::ServiceUnavailable,
                    format!(
                        "the server's Python `{}` has no `fal` package; install it there (pip install fal) or start \
                         darkroom serve with --python pointing at one that has it",
                        gw.cfg.python
                    ),
                ));
            }
            Err(invalid(&["body", file], format!("could not load {file}::{class} ({}): {msg}", out.status)))
        }
    }
}

fn num<T: TryFrom<u64>>(v: &Value) -> Option<T> {
    v.as_u64().and_then(|n| T::try_from(n).ok())
}

/// The manifest of an inspected `fal.App`.
fn manifest_from(info: &Value, entry: &str, app_id: Option<&str>, owner: &str) -> Result<HttpAppManifest, ApiErr> {
    if info["image"].as_bool() == Some(true) {
        return Err(invalid(
            &["body"],
            "this app runs in a container image (`image = ContainerImage(...)`); Darkroom has no container engine \
             here, so deploy it without `image` (its requirements are installed in a Python environment)",
        ));
    }
    let app_name = info["app_name"].as_str().unwrap_or_default();
    let id = match app_id {
        Some(a) => a.to_string(),
        None => format!("{owner}/{app_name}"),
    };
    let endpoints: Vec<String> = info["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["websocket"].as_bool() != Some(true))
                .filter_map(|e| e["path"].as_str())
                .map(|p| p.trim_matches('/').to_string())
                .collect()
        })
        .unwrap_or_default();
    // fal's realtime routes end in `/realtime`: clients reach them at `/{app}/{path}/realtime`. Other WebSocket
    // routes are not served.
    let realtime: Vec<String> = info["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["websocket"].as_bool() == Some(true))
                .filter_map(|e| e["path"].as_str())
                .map(|p| p.trim_matches('/'))
                .filter_map(|p| {
                    if p == "realtime" { Some(String::new()) } else { p.strip_suffix("/realtime").map(str::to_string) }
                })
                .collect()
        })
        .unwrap_or_default();
    if endpoints.is_empty() && realtime.is_empty() {
        return Err(invalid(&["body"], "the app declares no HTTP endpoint (@fal.endpoint) and no realtime endpoint"));
    }
    let s = &info["settings"];
    let machine = match &info["machine_type"] {
        Value::Array(a) => a.first().and_then(Value::as_str).unwrap_or("S").to_string(),
        v => v.as_str().unwrap_or("S").to_string(),
    };
    let (cpu_threads, gpu_memory_mb) = match darkroom_models::http_app::machine_resources(&machine) {
        Some((threads, gpu)) => (Some(threads), gpu),
        None => (Some(1), None),
    };
    let requirements: Vec<String> = info["requirements"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let doc = info["doc"].as_str().unwrap_or_default();
    let mut m = HttpAppManifest {
        app: AppSection {
            id,
            title: app_name.to_string(),
            description: doc.chars().take(20_000).collect(),
            category: None,
            tags: vec!["fal-app".into()],
            license: None,
            endpoints,
            examples: vec![],
            realtime,
        },
        run: RunSection {
            command: vec![],
            health_path: "/health".into(),
            env: Default::default(),
            startup_timeout: num(&s["startup_timeout"]),
            request_timeout: num(&s["request_timeout"]),
            data: None,
        },
        scaling: ScalingSection {
            min_concurrency: num(&s["min_concurrency"]),
            max_concurrency: num(&s["max_concurrency"]),
            concurrency_buffer: num(&s["concurrency_buffer"]),
            concurrency_buffer_perc: num(&s["concurrency_buffer_perc"]),
            keep_alive: num(&s["keep_alive"]),
            scaling_delay: num(&s["scaling_delay"]),
            max_multiplexing: num(&s["max_multiplexing"]),
            cpu_threads,
            gpu_memory_mb,
            machine_type: None,
        },
        billing: Default::default(),
        python: Some(PythonSection { requirements }),
        fal: Some(FalSection {
            entry: entry.to_string(),
            openapi: info.get("openapi").filter(|o| o.is_object()).cloned(),
        }),
    };
    m.normalize();
    m.validate().map_err(|e| {
        let detail: Vec<Value> =
            e.split("; ").map(|p| json!({"loc": ["fal.App"], "msg": p, "type": "fal_app_invalid"})).collect();
        ApiErr(darkroom_core::app::validation_error(detail))
    })?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fal_settings_become_a_manifest() {
        let info = json!({
            "app_name": "hello-app", "doc": "Says hello.", "image": false,
            "requirements": ["pillow"], "machine_type": "M",
            "settings": {"keep_alive": 30, "max_concurrency": 3, "max_multiplexing": 2, "request_timeout": 60,
                         "startup_timeout": 120, "min_concurrency": null},
            "endpoints": [{"path": "/", "websocket": false}, {"path": "/square", "websocket": false},
                          {"path": "/ws", "websocket": true}],
            "openapi": {"openapi": "3.1.0", "paths": {}},
        });
        let m = manifest_from(&info, "app.py::Hello", None, "acme").unwrap();
        assert_eq!(m.app.id, "acme/hello-app");
        assert_eq!(m.app.endpoints, vec!["", "square"]);
        let k = m.knobs();
        assert_eq!((k.keep_alive, k.max_concurrency, k.max_multiplexing), (30, 3, 2));
        assert_eq!((k.request_timeout, k.startup_timeout, k.cpu_threads), (60, 120, 2));
        assert_eq!(m.python.as_ref().unwrap().requirements, vec!["pillow"]);
        assert_eq!(m.fal.as_ref().unwrap().entry, "app.py::Hello");
        assert_eq!(manifest_from(&info, "app.py::Hello", Some("team/hi"), "acme").unwrap().app.id, "team/hi");
        let mut container = info.clone();
        container["image"] = json!(true);
        assert!(manifest_from(&container, "app.py::Hello", None, "acme").is_err());
        let mut bad = info.clone();
        bad["app_name"] = json!("Not Valid");
        assert!(manifest_from(&bad, "app.py::Hello", None, "acme").is_err());
    }
}
