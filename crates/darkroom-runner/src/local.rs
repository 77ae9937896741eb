//! The `local` runner backend: runner processes of this binary, one process group each, niced and more
//! OOM-killable than the gateway, restarted when they die. They see their parent's death as EOF on stdin.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// One supervised runner process.
#[derive(Clone)]
pub struct LocalRunnerSpec {
    /// The `darkroom` executable.
    pub exe: PathBuf,
    pub app_id: String,
    pub gateway_url: String,
    pub token: String,
    pub ca_cert: Option<PathBuf>,
    /// Niceness added to runner processes (the gateway keeps priority).
    pub nice: i32,
    /// Extra environment (storage settings; secrets stay out of the command line).
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for LocalRunnerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRunnerSpec").field("app_id", &self.app_id).field("token", &"<redacted>").finish()
    }
}

fn command(spec: &LocalRunnerSpec) -> Command {
    let mut cmd = Command::new(&spec.exe);
    cmd.arg("runner").arg("--gateway").arg(&spec.gateway_url).arg("--app").arg(&spec.app_id).arg("--parent-stdin");
    if let Some(ca) = &spec.ca_cert {
        cmd.arg("--ca-cert").arg(ca);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    cmd.env("DARKROOM_RUNNER_TOKEN", &spec.token)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    let nice = spec.nice;
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, b"500".as_ptr().cast(), 3);
                libc::close(fd);
            }
            Ok(())
        });
    }
    cmd
}

/// Keeps one runner process alive until `shutdown` fires, restarting it (with backoff) when it exits.
pub async fn supervise(spec: LocalRunnerSpec, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        let mut child = match command(&spec).spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(app = %spec.app_id, error = %e, "could not start runner process");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let pid = child.id().unwrap_or(0);
        tracing::info!(app = %spec.app_id, pid, "runner process started");
        // Holding the pipe keeps the child's stdin open; dropping it (or our death) signals EOF.
        let stdin = child.stdin.take();
        tokio::select! {
            status = child.wait() => {
                drop(stdin);
                tracing::warn!(app = %spec.app_id, pid, status = ?status.ok(), "runner process exited; restarting");
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(100);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            _ = shutdown.cancelled() => {
                drop(stdin);
                if pid > 0 {
                    // SAFETY: signalling the child's own process group.
                    unsafe { libc::kill(-(pid as i32), libc::SIGTERM); }
                }
                if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                    if pid > 0 {
                        unsafe { libc::kill(-(pid as i32), libc::SIGKILL); }
                    }
                    let _ = child.wait().await;
                }
                return;
            }
        }
    }
}
