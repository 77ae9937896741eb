//! The runner fleet with real processes: scale from zero to max_concurrency and back, runner states, run-time knobs
//! that survive restarts, startup and request timeouts, crash restarts, CPU pinning and GPU placement with LRU
//! eviction, drain on SIGTERM, and a SIGSTOPped remote runner losing its lease.

mod common;

use std::time::{Duration, Instant};

use common::{APP, Server};
use reqwest::Method;
use serde_json::{Value, json};

const IMAGE_UTILS: &str = "darkroom/image-utils";
const PNG_1X1: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

fn count(rs: &[Value], app: &str, states: &[&str]) -> usize {
    rs.iter().filter(|r| r["app_id"] == app && states.contains(&r["state"].as_str().unwrap_or(""))).count()
}

const LIVE: &[&str] = &["PENDING", "PULL", "SETUP", "IDLE", "RUNNING"];

async fn scale(s: &Server, app: &str, patch: Value) -> Value {
    let (code, v) = s.call(Method::PATCH, &format!("/v1/apps/{app}/scale"), Some(patch)).await;
    assert_eq!(code, 200, "{v}");
    v
}

async fn submit_to(s: &Server, app: &str, input: Value) -> String {
    let (code, v) = s.call(Method::POST, &format!("/queue/{app}"), Some(input)).await;
    assert_eq!(code, 200, "{v}");
    v["request_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_from_zero_to_max_concurrency_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    s.wait_runners(1).await;
    // One request per runner, at most 3 runners, idle ones gone after 1 s.
    scale(&s, APP, json!({"min_concurrency": 0, "max_concurrency": 3, "max_multiplexing": 1, "keep_alive": 1})).await;
    s.wait_fleet("scaled to zero", |rs| count(rs, APP, LIVE) == 0 && count(rs, APP, &["DRAINING"]) == 0).await;

    let ids: Vec<String> = futures::future::join_all((0..6).map(|i| s.submit(json!({"echo": i, "sleep_ms": 2000}))))
        .await
        .into_iter()
        .map(|v| v["request_id"].as_str().unwrap().to_string())
        .collect();
    // Requests wait in the queue while runners start; never more than max_concurrency at once.
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut done = false;
    while !done {
        let rs = s.runners().await;
        let live = count(&rs, APP, LIVE) + count(&rs, APP, &["DRAINING"]);
        peak = peak.max(count(&rs, APP, &["IDLE", "RUNNING"]));
        assert!(live <= 3, "over max_concurrency: {rs:#?}");
        done = true;
        for id in &ids {
            if s.status(id).await["status"] != "COMPLETED" {
                done = false;
            }
        }
        assert!(Instant::now() < deadline, "requests did not complete");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(peak, 3, "scaled up to max_concurrency");
    let mut cold = 0;
    for (i, id) in ids.iter().enumerate() {
        let (code, out) = s.result(id).await;
        assert_eq!((code, out["echo"].clone(), out["attempt"].clone()), (200, json!(i), json!(1)), "{out}");
        let st = s.status(id).await;
        if st["metrics"]["cold_start"] == true {
            assert!(st["metrics"]["cold_start_time"].as_f64().unwrap() > 0.0, "{st}");
            cold += 1;
        }
    }
    assert!(cold >= 3, "the first wave waited for cold starts ({cold})");
    // And back to zero after keep_alive, the ended runners listed as TERMINATED.
    let rs =
        s.wait_fleet("scaled back to zero", |rs| count(rs, APP, LIVE) == 0 && count(rs, APP, &["DRAINING"]) == 0).await;
    assert!(count(&rs, APP, &["TERMINATED"]) >= 3, "{rs:#?}");
    let text = s.http.get(format!("{}/metrics", s.url)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(&format!("darkroom_runners{{app=\"{APP}\",state=\"TERMINATED\"}}")), "{text}");
    assert!(text.contains("darkroom_cold_starts_total"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knobs_change_at_run_time_survive_a_restart_and_reset() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &["--no-local-runners"]);
    // Field-level validation, unknown apps, unknown knobs, scopes.
    let (code, v) = s.call(Method::PATCH, &format!("/v1/apps/{APP}/scale"), Some(json!({"min_concurrency": 9}))).await;
    assert_eq!((code, v["error_type"].as_str()), (422, Some("validation_error")), "{v}");
    assert_eq!(v["detail"][0]["loc"], json!(["body", "min_concurrency"]), "{v}");
    let (code, v) = s.call(Method::PATCH, &format!("/v1/apps/{APP}/scale"), Some(json!({"min_concurency": 1}))).await;
    assert_eq!(code, 422, "{v}");
    let (code, v) = s.call(Method::PATCH, "/v1/apps/nobody/nothing/scale", Some(json!({}))).await;
    assert_eq!((code, v["error_type"].as_str()), (404, Some("app_not_found")));
    let client = s.post_json("/v1/keys", json!({"name": "c"})).await["key"].as_str().unwrap().to_string();
    let r = s
        .http
        .patch(format!("{}/v1/apps/{APP}/scale", s.url))
        .header("authorization", format!("Key {client}"))
        .json(&json!({"keep_alive": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let v = scale(&s, APP, json!({"keep_alive": 7, "scaling_delay": 2})).await;
    assert_eq!((v["scaling"]["keep_alive"].clone(), v["deployed"]["keep_alive"].clone()), (json!(7), json!(60)));
    assert_eq!(v["overrides"], json!({"keep_alive": 7, "scaling_delay": 2}));
    // Patches merge.
    let v = scale(&s, APP, json!({"keep_alive": 8})).await;
    assert_eq!(v["overrides"], json!({"keep_alive": 8, "scaling_delay": 2}));

    // A restart (a redeploy of the built-in apps) keeps run-time scale...
    s.kill9();
    let mut s = Server::start(dir.path(), &["--no-local-runners"]);
    let (_, v) = s.call(Method::GET, &format!("/v1/apps/{APP}/scale"), None).await;
    assert_eq!(v["scaling"]["keep_alive"], 8, "{v}");
    let apps = s.call(Method::GET, "/v1/apps", None).await.1;
    let diag = apps["apps"].as_array().unwrap().iter().find(|a| a["id"] == APP).unwrap().clone();
    assert_eq!(diag["scaling"]["scaling_delay"], 2);
    // ...unless asked to reset it.
    s.kill9();
    let s = Server::start(dir.path(), &["--no-local-runners", "--reset-scale"]);
    let (_, v) = s.call(Method::GET, &format!("/v1/apps/{APP}/scale"), None).await;
    assert_eq!((v["scaling"]["keep_alive"].clone(), v["overrides"].clone()), (json!(60), json!({})), "{v}");
    // And DELETE resets at run time.
    scale(&s, APP, json!({"keep_alive": 3})).await;
    let (code, v) = s.call(Method::DELETE, &format!("/v1/apps/{APP}/scale"), None).await;
    assert_eq!((code, v["scaling"]["keep_alive"].clone()), (200, json!(60)));

    // The CLI.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_darkroom"))
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = cli(&["apps", "scale", APP, "--keep-alive", "9", "--max-concurrency", "2"]);
    assert!(ok, "{err}");
    assert!(
        out.lines().any(|l| l.contains("keep_alive") && l.contains('9') && l.contains("changed at run time")),
        "{out}"
    );
    let (ok, out, _) = cli(&["apps", "ls"]);
    assert!(ok && out.lines().any(|l| l.starts_with(APP) && l.contains("9s")), "{out}");
    let (ok, _, err) = cli(&["apps", "scale", APP, "--min-concurrency", "5"]);
    assert!(!ok && err.contains("min_concurrency"), "{err}");
    let (ok, out, _) = cli(&["apps", "scale", APP, "--reset"]);
    assert!(ok && !out.contains("changed at run time"), "{out}");
    let (ok, out, _) = cli(&["runners", "ls"]);
    assert!(ok && out.starts_with("RUNNER"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_go_through_setup_and_slow_starters_time_out_without_failing_requests() {
    let dir = tempfile::tempdir().unwrap();
    // Every diagnostics runner takes 2.5 s to set up.
    let s = Server::start_with_env(dir.path(), &[], &[("DARKROOM_DIAGNOSTICS_SETUP_MS", "2500")]);
    let rs = s.wait_fleet("a runner in SETUP", |rs| count(rs, APP, &["SETUP"]) == 1).await;
    let r = rs.iter().find(|r| r["state"] == "SETUP").unwrap();
    assert!(r["slot"].is_string() && r["pid"].as_u64().unwrap() > 0, "{r}");
    s.wait_runners(1).await;

    // A startup_timeout shorter than setup: runners are stopped as they start, with backoff, and the request waits.
    scale(&s, APP, json!({"min_concurrency": 0, "keep_alive": 1, "startup_timeout": 1})).await;
    s.wait_fleet("scaled to zero", |rs| count(rs, APP, LIVE) == 0).await;
    let id = s.submit(json!({"echo": "patient"})).await["request_id"].as_str().unwrap().to_string();
    let rs = s
        .wait_fleet("a runner stopped for startup_timeout", |rs| {
            rs.iter().any(|r| r["state"] == "TERMINATED" && r["message"] == "startup_timeout")
        })
        .await;
    assert_eq!(s.status(&id).await["status"], "IN_QUEUE", "{rs:#?}");
    // Given time, it starts and the request runs, reporting its cold start.
    scale(&s, APP, json!({"startup_timeout": 60})).await;
    let (code, out) = s.result(&id).await;
    assert_eq!((code, out["echo"].clone()), (200, json!("patient")));
    let st = s.status(&id).await;
    assert_eq!(st["metrics"]["cold_start"], true, "{st}");
    assert!(st["metrics"]["cold_start_time"].as_f64().unwrap() >= 2.0, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_request_timeout_fail_and_crashed_runners_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let runner = s.wait_runners(1).await[0].clone();
    scale(&s, APP, json!({"request_timeout": 1})).await;
    let id = s.submit(json!({"sleep_ms": 20_000})).await["request_id"].as_str().unwrap().to_string();
    let (code, body) = s.result(&id).await;
    assert_eq!((code, body["error_type"].as_str()), (504, Some("request_timeout")), "{body}");

    // kill -9 the runner: it is listed as TERMINATED with the reason, and a new one takes its place (min 1).
    let pid = runner["pid"].as_i64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let rs = s
        .wait_fleet("a replacement runner", |rs| {
            count(rs, APP, &["IDLE"]) == 1
                && rs.iter().any(|r| {
                    r["state"] == "TERMINATED" && r["message"].as_str().is_some_and(|m| m.contains("unexpectedly"))
                })
        })
        .await;
    let new_pid = rs.iter().find(|r| r["state"] == "IDLE").unwrap()["pid"].as_i64().unwrap() as i32;
    assert_ne!(new_pid, pid);
    let text = s.http.get(format!("{}/metrics", s.url)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("reason=\"crashed\""), "{text}");
}

/// The first core this test process may run on (the server's runner budget starts there).
fn first_core() -> u64 {
    let list = cpus_allowed(std::process::id() as i64);
    list.split([',', '-']).next().unwrap().trim().parse().unwrap()
}

/// This test process's niceness.
fn own_nice() -> i64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    stat.rsplit_once(')').unwrap().1.split_whitespace().nth(16).unwrap().parse().unwrap()
}

fn cpus_allowed(pid: i64) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string()
}

fn environ(pid: i64, key: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_core_is_never_shared_and_the_least_recently_used_idle_runner_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    // A runner budget of one core, and a simulated GPU.
    let s = Server::start(dir.path(), &["--runner-cpus", "1", "--gpus", "0:8GiB"]);
    let first = s.wait_runners(1).await[0].clone();
    assert_eq!(first["cpus"], json!([]), "diagnostics reserves no core by default");
    // Give diagnostics a core: its next runner is pinned to it.
    scale(&s, APP, json!({"cpu_threads": 1, "min_concurrency": 0, "keep_alive": 1})).await;
    s.wait_fleet("scaled to zero", |rs| count(rs, APP, LIVE) == 0).await;
    scale(&s, APP, json!({"min_concurrency": 1})).await;
    let diag = s.wait_runners(1).await[0].clone();
    let core = first_core();
    assert_eq!(diag["cpus"], json!([core]));
    // Niced by 10 more than the server and more OOM-killable than it.
    let pid = diag["pid"].as_i64().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    assert_eq!(fields[16], (own_nice() + 10).min(19).to_string(), "nice: {stat}");
    assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap().trim(), "500");
    assert_eq!(cpus_allowed(diag["pid"].as_i64().unwrap()), core.to_string(), "pinned to its core");
    assert_eq!(environ(diag["pid"].as_i64().unwrap(), "DARKROOM_THREADS").as_deref(), Some("1"));
    assert_eq!(environ(diag["pid"].as_i64().unwrap(), "CUDA_VISIBLE_DEVICES").as_deref(), Some(""));

    // image-utils needs the core: the idle diagnostics runner (least recently used) is evicted for it.
    scale(&s, IMAGE_UTILS, json!({"keep_alive": 1, "gpu_memory_mb": 6000})).await;
    let id = submit_to(&s, IMAGE_UTILS, json!({"image_url": PNG_1X1, "width": 2, "height": 2})).await;
    let (code, out) = s.result_in(IMAGE_UTILS, &id).await;
    assert_eq!(code, 200, "{out}");
    let rs = s.runners().await;
    let iu = rs.iter().find(|r| r["app_id"] == IMAGE_UTILS && r["state"] != "TERMINATED").cloned();
    if let Some(iu) = &iu {
        // Its GPU share went to the simulated GPU 0.
        assert_eq!(iu["gpu"], json!([0, 6000]), "{iu}");
        if let Some(pid) = iu["pid"].as_i64().filter(|p| *p > 0) {
            assert_eq!(environ(pid, "CUDA_VISIBLE_DEVICES").as_deref(), Some("0"));
        }
    }
    assert!(
        rs.iter().any(|r| r["app_id"] == APP && r["state"] == "TERMINATED" && r["message"] == "evicted"),
        "diagnostics was evicted: {rs:#?}"
    );
    // Never two runners on the one core at once; once image-utils idles out, diagnostics (min 1) comes back.
    let rs = s.wait_fleet("diagnostics back", |rs| count(rs, APP, &["IDLE"]) == 1).await;
    assert!(count(&rs, IMAGE_UTILS, &["IDLE", "RUNNING", "SETUP", "PULL"]) == 0, "{rs:#?}");
    // A request to diagnostics now is served by it.
    let d = s.submit(json!({"echo": "back"})).await["request_id"].as_str().unwrap().to_string();
    assert_eq!(s.result(&d).await.0, 200);

    // An app asking for more GPU memory than the machine has stays PENDING with the reason; nothing crashes.
    scale(&s, IMAGE_UTILS, json!({"gpu_memory_mb": 100_000})).await;
    let _ = submit_to(&s, IMAGE_UTILS, json!({"image_url": PNG_1X1, "width": 2, "height": 2})).await;
    s.wait_fleet("an unplaceable runner", |rs| {
        rs.iter().any(|r| {
            r["app_id"] == IMAGE_UTILS
                && r["state"] == "PENDING"
                && r["message"].as_str().is_some_and(|m| m.contains("cannot be placed"))
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_requests_and_keeps_queued_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &["--drain-timeout-secs", "20"]);
    s.wait_runners(1).await;
    let running =
        s.submit(json!({"echo": "running", "sleep_ms": 1500})).await["request_id"].as_str().unwrap().to_string();
    s.wait_status(&running, "IN_PROGRESS").await;
    let child = s.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Submits are still accepted (and kept); synchronous runs are turned away with Retry-After.
    let queued = s.submit(json!({"echo": "queued"})).await["request_id"].as_str().unwrap().to_string();
    let r = s
        .http
        .post(format!("{}/{APP}", s.url))
        .header("host", "fal.run")
        .header("authorization", s.auth())
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    // The running request finishes (on its first attempt) before the server exits.
    let mut child = child;
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(25), "serve did not exit after draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    let s = Server::start(dir.path(), &[]);
    let (code, out) = s.result(&running).await;
    assert_eq!((code, out["echo"].clone(), out["attempt"].clone()), (200, json!("running"), json!(1)));
    let (code, out) = s.result(&queued).await;
    assert_eq!((code, out["echo"].clone()), (200, json!("queued")));
}

fn remote_runner(s: &Server, token: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_darkroom"))
        .args(["runner", "--gateway", &s.url, "--app", APP])
        .env("DARKROOM_RUNNER_TOKEN", token)
        .env("DARKROOM_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigstopped_remote_runner_loses_its_lease_and_its_late_work_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--no-local-runners", "--lease-ms", "2000"]);
    let token = s.post_json("/v1/runner-tokens", json!({"app_id": APP})).await["token"].as_str().unwrap().to_string();
    let mut a = remote_runner(&s, &token);
    let rs = s.wait_runners(1).await;
    assert!(rs[0]["slot"].is_null(), "a remote runner has no fleet slot: {}", rs[0]);
    let id = s.submit(json!({"echo": "once", "sleep_ms": 2500})).await["request_id"].as_str().unwrap().to_string();
    s.wait_status(&id, "IN_PROGRESS").await;
    // Freeze runner A mid-request: its heartbeats stop, its lease runs out, the request goes back to the queue.
    unsafe { libc::kill(a.id() as i32, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = s.status(&id).await;
        if st["status"] == "IN_QUEUE" {
            break;
        }
        assert!(Instant::now() < deadline, "the lease never expired: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A wakes up on the same channel: what it sends for attempt 1 is refused, and attempt 2 runs.
    unsafe { libc::kill(a.id() as i32, libc::SIGCONT) };
    let (code, out) = s.result(&id).await;
    assert_eq!((code, out["echo"].clone(), out["attempt"].clone()), (200, json!("once"), json!(2)), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.metric("darkroom_runner_frames_refused_total").await.unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < deadline, "no late frame was refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second remote runner joins and serves like a local one.
    let mut b = remote_runner(&s, &token);
    s.wait_runners(2).await;
    let ids: Vec<String> = futures::future::join_all((0..4).map(|i| s.submit(json!({"echo": i, "sleep_ms": 200}))))
        .await
        .into_iter()
        .map(|v| v["request_id"].as_str().unwrap().to_string())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let (code, out) = s.result(id).await;
        assert_eq!((code, out["echo"].clone()), (200, json!(i)));
    }
    // SIGTERM drains a remote runner: it exits cleanly.
    for c in [&mut a, &mut b] {
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        let st = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "runner did not exit on SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(st.success(), "{st:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_stuck_fetching_weights_hits_the_pull_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let s =
        Server::start_with_env(dir.path(), &["--pull-timeout-secs", "1"], &[("DARKROOM_DIAGNOSTICS_PULL_MS", "30000")]);
    // PULL, with what it is fetching.
    s.wait_fleet("a runner in PULL", |rs| {
        rs.iter().any(|r| r["state"] == "PULL" && r["message"].as_str().is_some_and(|m| m.contains("download")))
    })
    .await;
    s.wait_fleet("stopped for pull_timeout", |rs| {
        rs.iter().any(|r| r["state"] == "TERMINATED" && r["message"] == "pull_timeout")
    })
    .await;
}
