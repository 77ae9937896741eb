//! Several `darkroom serve` processes sharing one PostgreSQL database (a fresh schema on
//! `DARKROOM_TEST_DATABASE_URL` per test): clients on both gateways, runners on either, the leader killed and
//! replaced, and nothing lost or completed twice.

mod common;

use std::time::{Duration, Instant};

use common::{APP, Server};
use serde_json::{Value, json};

const SECRET: &str = "cluster-test-secret-0123456789abcdef0123456789";

fn gateway(dir: &std::path::Path, url: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--database-url", url, "--heartbeat-ms", "300", "--lease-ms", "3000"];
    args.extend_from_slice(extra);
    Server::start_with_env(dir, &args, &[("DARKROOM_SERVER_SECRET", SECRET)])
}

async fn wait_leader(s: &Server, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.metric("darkroom_leader").await != Some(want) {
        assert!(Instant::now() < deadline, "{} never reported darkroom_leader {want}", s.url);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_serve_one_queue() {
    let url = darkroom_store::testing::pg_url().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A holds the runners; B has none of its own, so every request sent to B runs through A's runners.
    let a = gateway(da.path(), &url, &[]);
    let b = gateway(db.path(), &url, &["--no-local-runners"]);
    a.wait_runners(1).await;
    wait_leader(&a, 1.0).await;
    wait_leader(&b, 0.0).await;

    // Keys are shared: A's admin key works on B.
    let r = b.http.get(format!("{}/v1/keys", b.url)).header("authorization", a.auth()).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Queue: submitted on B, run on A's runner, read back on both.
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(b.submit(json!({"echo": i})).await["request_id"].as_str().unwrap().to_string());
    }
    for (i, id) in ids.iter().enumerate() {
        let (code, out) = b.result(id).await;
        assert_eq!((code, &out["echo"]), (200, &json!(i)), "{out}");
        assert_eq!(a.result(id).await.1, out);
    }

    // Sync run on B: the completion written through A reaches B's waiting client.
    let t = Instant::now();
    let r = b
        .http
        .post(format!("{}/run/{APP}", b.url))
        .header("authorization", b.auth())
        .json(&json!({"echo": "sync"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"echo": "sync", "attempt": 1}));
    assert!(
        t.elapsed() < Duration::from_millis(1_500),
        "woken by the notification, not the 2 s poll: {:?}",
        t.elapsed()
    );

    // Stream on B: the runner's channel is on A, which relays each partial to B before the job completes.
    let r = b
        .http
        .post(format!("{}/run/{APP}/stream", b.url))
        .header("authorization", b.auth())
        .json(&json!({"echo": "s", "parts": 4, "sleep_ms": 40}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events: Vec<Value> =
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(
        events,
        vec![
            json!({"part": 0}),
            json!({"part": 1}),
            json!({"part": 2}),
            json!({"part": 3}),
            json!({"echo": "s", "attempt": 1})
        ]
    );

    // Cancel on B of a request running on A's runner: the runner is told and its slot freed.
    let id = b.submit(json!({"sleep_ms": 30_000})).await["request_id"].as_str().unwrap().to_string();
    b.wait_status(&id, "IN_PROGRESS").await;
    let r = b
        .http
        .put(format!("{}/queue/{APP}/requests/{id}/cancel", b.url))
        .header("authorization", b.auth())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let (code, out) = a.result(&id).await;
    assert_eq!(code, 499, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rs = a.wait_runners(1).await;
        if rs.iter().all(|r| r["in_flight"].as_array().is_some_and(|v| v.is_empty())) {
            break;
        }
        assert!(Instant::now() < deadline, "the cancelled request still holds a slot: {rs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A runner joining B with a token minted on A serves B's queue like a local one would.
    let token = a.post_json("/v1/runner-tokens", json!({"app_id": APP})).await["token"].as_str().unwrap().to_string();
    let mut remote = std::process::Command::new(env!("CARGO_BIN_EXE_darkroom"))
        .args(["runner", "--gateway", &b.url, "--token", &token, "--app", APP])
        .env("DARKROOM_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    b.wait_runners(1).await;
    let id = b.submit(json!({"echo": "remote"})).await["request_id"].as_str().unwrap().to_string();
    assert_eq!(b.result(&id).await.1["echo"], "remote");
    let _ = remote.kill();
    let _ = remote.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_is_killed_and_replaced_and_no_job_is_lost_or_run_twice() {
    let url = darkroom_store::testing::pg_url().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = gateway(da.path(), &url, &[]);
    wait_leader(&a, 1.0).await;
    let b = gateway(db.path(), &url, &[]);
    a.wait_runners(1).await;
    b.wait_runners(1).await;
    wait_leader(&b, 0.0).await;

    // Jobs on both gateways, long enough that some are running on A's runner when A dies.
    let mut ids = Vec::new();
    for i in 0..24 {
        let s = if i % 2 == 0 { &a } else { &b };
        ids.push(s.submit(json!({"echo": i, "sleep_ms": 600})).await["request_id"].as_str().unwrap().to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let runners = a.wait_runners(1).await;
        if runners.iter().any(|r| r["in_flight"].as_array().is_some_and(|v| !v.is_empty())) {
            break;
        }
        assert!(Instant::now() < deadline, "A's runner never took a job");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill9();
    // B takes the lead (the lock died with A's connections) and reaps A after 10 silent heartbeats (3 s).
    wait_leader(&b, 1.0).await;
    b.assert_all_ran_once_more_at_most(&ids).await;

    // A comes back on its data folder: its old boot is reaped at once and it joins as a follower.
    let a2 = gateway(da.path(), &url, &[]);
    wait_leader(&a2, 0.0).await;
    let id = a2.submit(json!({"echo": "again"})).await["request_id"].as_str().unwrap().to_string();
    assert_eq!(a2.result(&id).await.1["echo"], "again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_sqlite_deployment_to_postgres() {
    let url = darkroom_store::testing::pg_url().await;
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    let old_admin;
    {
        let s = Server::start(dir.path(), &[]);
        s.wait_runners(1).await;
        for i in 0..5 {
            ids.push(s.submit(json!({"echo": i, "logs": ["hello"]})).await["request_id"].as_str().unwrap().to_string());
        }
        for id in &ids {
            assert_eq!(s.result(id).await.0, 200);
        }
        old_admin = s.admin.clone();
        // Dropping the server stops it (SIGTERM).
    }
    let bin = env!("CARGO_BIN_EXE_darkroom");
    let out = std::process::Command::new(bin)
        .args(["migrate", "--data-dir", dir.path().to_str().unwrap(), "--to", &url])
        .env("DARKROOM_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("jobs") && l.trim_end().ends_with("5 rows")), "{stdout}");
    // Into a database that already holds a deployment: refused.
    let again = std::process::Command::new(bin)
        .args(["migrate", "--data-dir", dir.path().to_str().unwrap(), "--to", &url])
        .env("DARKROOM_LOG", "warn")
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("migrate into an empty one"));

    // A gateway with another secret is refused with a message saying why.
    let wrong = std::process::Command::new(bin)
        .args(["serve", "--data-dir", tempfile::tempdir().unwrap().path().to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--no-local-runners", "--database-url", &url])
        .env("DARKROOM_SERVER_SECRET", SECRET)
        .env("DARKROOM_LOG", "warn")
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("same DARKROOM_SERVER_SECRET"));

    // The same data folder on PostgreSQL, with its secret: history, keys and the queue carry on.
    let secret = std::fs::read_to_string(dir.path().join("server.secret")).unwrap();
    let s = Server::start_with_env(dir.path(), &["--database-url", &url], &[("DARKROOM_SERVER_SECRET", secret.trim())]);
    assert_eq!(s.admin, old_admin);
    for (i, id) in ids.iter().enumerate() {
        let (code, out) = s.result(id).await;
        assert_eq!((code, &out["echo"]), (200, &json!(i)));
        assert_eq!(s.status(id).await["logs"][0]["message"], "hello");
    }
    let id = s.submit(json!({"echo": "after"})).await["request_id"].as_str().unwrap().to_string();
    assert_eq!(s.result(&id).await.1["echo"], "after");
}
