//! Python environments for deployed apps: one virtual environment per (base Python, requirements), built once
//! and cached; it sees the base Python's packages (the `fal` SDK, for `fal.App` apps) below its own through a
//! `.pth` file. Requirements the base already satisfies are not installed again, so an app whose requirements
//! are all in the base builds its environment without touching a package index. Others are installed with `uv`
//! when it is on PATH, else with pip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sha2::Digest;

use crate::{SetupReporter, SetupStage};

/// Darkroom's launcher for `fal.App` apps (`inspect` and `serve`).
pub const FAL_LAUNCHER: &str = include_str!("fal_launcher.py");

/// A ready environment.
#[derive(Debug, Clone)]
pub struct PyEnv {
    pub dir: PathBuf,
    pub python: PathBuf,
    pub bin: PathBuf,
}

/// Facts about the base Python.
#[derive(Debug, serde::Deserialize)]
struct BaseInfo {
    executable: String,
    version: String,
    site: Vec<String>,
}

const BASE_PROBE: &str = r#"import json, site, sys, sysconfig
paths = []
for p in site.getsitepackages() + [sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]:
    if p not in paths: paths.append(p)
print(json.dumps({'executable': sys.executable, 'version': sys.version, 'site': paths}))
"#;

/// Prints the requirements the running Python does not satisfy, one per line.
const UNSATISFIED: &str = r#"import sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
from importlib import metadata
for line in sys.argv[1:]:
    try:
        r = Requirement(line)
    except Exception:
        print(line); continue
    if r.marker is not None and not r.marker.evaluate():
        continue
    try:
        v = metadata.version(r.name)
    except metadata.PackageNotFoundError:
        print(line); continue
    if r.specifier and not r.specifier.contains(v, prereleases=True):
        print(line)
"#;

async fn output(cmd: &mut tokio::process::Command, what: &str, limit: Duration) -> Result<String, String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| format!("{what} took longer than {} s", limit.as_secs()))?
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(format!("{what} failed ({}): {}", out.status, tail.join("\n")));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The environment for `requirements` on `base`, built under `cache` if it is not there yet.
pub async fn ensure(
    base: &str,
    cache: &Path,
    requirements: &[String],
    report: &SetupReporter,
    install_timeout: Duration,
) -> Result<PyEnv, String> {
    let probe = output(
        tokio::process::Command::new(base).arg("-c").arg(BASE_PROBE),
        &format!("running the base Python `{base}`"),
        Duration::from_secs(60),
    )
    .await?;
    let info: BaseInfo =
        serde_json::from_str(probe.trim()).map_err(|e| format!("the base Python `{base}` said something odd: {e}"))?;
    let mut reqs: Vec<String> = requirements.iter().map(|r| r.trim().to_string()).collect();
    reqs.sort();
    reqs.dedup();
    let mut h = sha2::Sha256::new();
    h.update(info.executable.as_bytes());
    h.update(b"\0");
    h.update(info.version.as_bytes());
    for r in &reqs {
        h.update(b"\0");
        h.update(r.as_bytes());
    }
    let key = hex::encode(&h.finalize()[..10]);
    let dir = cache.join(&key);
    let env = PyEnv { python: dir.join("bin/python"), bin: dir.join("bin"), dir: dir.clone() };
    if dir.join(".darkroom-ready").is_file() {
        return Ok(env);
    }
    report.stage(SetupStage::Pull, format!("building the Python environment {key} ({} requirements)", reqs.len()));
    tokio::fs::create_dir_all(cache).await.map_err(|e| format!("{}: {e}", cache.display()))?;
    let tmp = cache.join(format!(".build-{key}-{}", std::process::id()));
    let _ = tokio::fs::remove_dir_all(&tmp).await;
    let built = build(base, &info, &tmp, &reqs, report, install_timeout).await;
    if let Err(e) = built {
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        return Err(e);
    }
    match tokio::fs::rename(&tmp, &dir).await {
        Ok(()) => {}
        // Another runner built the same environment first.
        Err(_) if dir.join(".darkroom-ready").is_file() => {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(format!("{}: {e}", dir.display()));
        }
    }
    tracing::info!(env = %dir.display(), "Python environment ready");
    Ok(env)
}

async fn build(
    base: &str,
    info: &BaseInfo,
    tmp: &Path,
    reqs: &[String],
    report: &SetupReporter,
    install_timeout: Duration,
) -> Result<(), String> {
    output(
        tokio::process::Command::new(base).args(["-m", "venv", "--without-pip"]).arg(tmp),
        "creating a virtual environment",
        Duration::from_secs(120),
    )
    .await?;
    let py = tmp.join("bin/python");
    let purelib = output(
        tokio::process::Command::new(&py).args(["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]),
        "probing the new environment",
        Duration::from_secs(60),
    )
    .await?;
    // The base's packages, below the environment's own.
    let pth: String = info.site.iter().map(|s| format!("{s}\n")).collect();
    let pth_file = Path::new(purelib.trim()).join("_darkroom_base.pth");
    tokio::fs::write(&pth_file, pth).await.map_err(|e| format!("{}: {e}", pth_file.display()))?;
    let missing: Vec<String> = if reqs.is_empty() {
        vec![]
    } else {
        output(
            tokio::process::Command::new(&py).arg("-c").arg(UNSATISFIED).args(reqs),
            "checking the requirements",
            Duration::from_secs(60),
        )
        .await?
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
    };
    if !missing.is_empty() {
        report.stage(SetupStage::Pull, format!("installing {}", missing.join(" ")));
        let uv = which("uv");
        let mut cmd = match &uv {
            Some(uv) => {
                let mut c = tokio::process::Command::new(uv);
                c.args(["pip", "install", "--python"]).arg(&py);
                c
            }
            None => {
                let mut c = tokio::process::Command::new(&py);
                c.args(["-m", "pip", "install", "--disable-pip-version-check"]);
                c
            }
        };
        cmd.args(&missing);
        output(&mut cmd, "installing the requirements", install_timeout).await?;
    }
    tokio::fs::write(tmp.join(".darkroom-ready"), reqs.join("\n"))
        .await
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    Ok(())
}

/// A program on PATH.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// Writes the launcher into the environment (once) and returns its path.
pub async fn launcher(env: &PyEnv) -> Result<PathBuf, String> {
    let path = env.dir.join("darkroom_fal_launcher.py");
    let current = tokio::fs::read_to_string(&path).await.ok();
    if current.as_deref() != Some(FAL_LAUNCHER) {
        let tmp = env.dir.join(format!(".launcher-{}", std::process::id()));
        tokio::fs::write(&tmp, FAL_LAUNCHER).await.map_err(|e| format!("{}: {e}", tmp.display()))?;
        tokio::fs::rename(&tmp, &path).await.map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(path)
}
