//! Crash tests: `kill -9` of the server with jobs queued and running, and fencing of stale runners.

mod common;

use std::time::{Duration, Instant};

use common::{APP, Server, pid_alive};
use darkroom_core::protocol::{GatewayFrame, PROTOCOL_VERSION, RunnerFrame};
use futures::{SinkExt, StreamExt};
use serde_json::json;

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_jobs_queued_and_running_loses_nothing() {
    kill9_scenario(&[], &[]).await;
}

/// The same on PostgreSQL: the restarted gateway reaps its data folder's previous boot at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_on_postgres_loses_nothing() {
    let url = darkroom_store::testing::pg_url().await;
    kill9_scenario(&["--database-url", &url], &[("DARKROOM_SERVER_SECRET", "crash-test-secret-0123456789abcdef0123")])
        .await;
}

async fn kill9_scenario(args: &[&str], env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_with_env(dir.path(), args, env);
    let runners = s.wait_runners(1).await;
    let old_runner_pid = runners[0]["pid"].as_i64().unwrap() as i32;
    let old_token =
        s.post_json("/v1/runner-tokens", json!({"app_id": APP})).await["token"].as_str().unwrap().to_string();
    // 8 run at once (max_multiplexing); the rest wait in the queue.
    let mut ids = Vec::new();
    for i in 0..20 {
        let sub = s.submit(json!({"echo": i, "sleep_ms": 2_000})).await;
        ids.push(sub["request_id"].as_str().unwrap().to_string());
    }
    s.wait_status(&ids[0], "IN_PROGRESS").await;
    s.kill9();
    // The old boot's runner sees its stdin close and exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(old_runner_pid) {
        assert!(Instant::now() < deadline, "orphaned runner {old_runner_pid} kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let s = Server::start_with_env(dir.path(), args, env);
    // The previous boot's runner credentials are refused.
    let mut req = format!("{}/internal/runner/connect", s.url.replace("http", "ws")).into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {old_token}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("old boot's token was not refused: {other:?}"),
    }
    s.assert_all_ran_once_more_at_most(&ids).await;
}

async fn fake_runner(
    s: &Server,
    token: &str,
) -> (
    impl SinkExt<Message, Error = impl std::fmt::Debug> + Unpin,
    impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
) {
    let (_, tx, rx) = fake_runner_id(s, token, vec![]).await;
    (tx, rx)
}

async fn fake_runner_id(
    s: &Server,
    token: &str,
    hints: Vec<String>,
) -> (
    String,
    impl SinkExt<Message, Error = impl std::fmt::Debug> + Unpin,
    impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
) {
    let mut req = format!("{}/internal/runner/connect", s.url.replace("http", "ws")).into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let hello = RunnerFrame::Hello {
        protocol: PROTOCOL_VERSION,
        app_id: APP.into(),
        max_multiplexing: 1,
        slot: None,
        state: None,
        reconnect: false,
        pid: 1,
        hints,
        version: "test".into(),
    };
    tx.send(Message::text(serde_json::to_string(&hello).unwrap())).await.unwrap();
    match next_frame(&mut rx).await {
        GatewayFrame::Welcome { runner_id, .. } => (runner_id, tx, rx),
        f => panic!("expected welcome: {f:?}"),
    }
}

async fn next_frame(
    rx: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> GatewayFrame {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.next()).await.expect("no frame in time") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("channel ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_completion_from_a_dead_attempt_is_refused() {
    late_completion_scenario(&[], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_completion_is_refused_on_postgres() {
    let url = darkroom_store::testing::pg_url().await;
    late_completion_scenario(
        &["--database-url", &url],
        &[("DARKROOM_SERVER_SECRET", "crash-test-secret-0123456789abcdef0123")],
    )
    .await;
}

async fn late_completion_scenario(args: &[&str], env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec!["--no-local-runners"];
    all.extend_from_slice(args);
    let s = Server::start_with_env(dir.path(), &all, env);
    let token = s.post_json("/v1/runner-tokens", json!({"app_id": APP})).await["token"].as_str().unwrap().to_string();
    let sub = s.submit(json!({"echo": "fenced"})).await;
    let id = sub["request_id"].as_str().unwrap().to_string();

    // Attempt 1 goes to runner A, which then vanishes.
    let (mut a_tx, mut a_rx) = fake_runner(&s, &token).await;
    let t1 = match next_frame(&mut a_rx).await {
        GatewayFrame::Assign { job_id, token, attempt, .. } => {
            assert_eq!((job_id.as_str(), attempt), (id.as_str(), 1));
            token
        }
        f => panic!("{f:?}"),
    };
    a_tx.close().await.unwrap();
    drop(a_rx);

    // Attempt 2 goes to runner B.
    let (mut b_tx, mut b_rx) = fake_runner(&s, &token).await;
    let t2 = match next_frame(&mut b_rx).await {
        GatewayFrame::Assign { attempt, token, .. } => {
            assert_eq!(attempt, 2);
            token
        }
        f => panic!("{f:?}"),
    };
    // The dead attempt's completion arrives late: refused, nothing changes.
    let late = RunnerFrame::Complete {
        job_id: id.clone(),
        token: t1,
        status: 200,
        body: json!({"from": "stale"}),
        error_type: None,
        inference_ms: None,
        units: None,
    };
    b_tx.send(Message::text(serde_json::to_string(&late).unwrap())).await.unwrap();
    match next_frame(&mut b_rx).await {
        GatewayFrame::Refused { job_id, token, .. } => assert_eq!((job_id, token), (id.clone(), t1)),
        f => panic!("expected refusal: {f:?}"),
    }
    assert_eq!(s.status(&id).await["status"], "IN_PROGRESS");
    let good = RunnerFrame::Complete {
        job_id: id.clone(),
        token: t2,
        status: 200,
        body: json!({"from": "current"}),
        error_type: None,
        inference_ms: Some(3),
        units: None,
    };
    b_tx.send(Message::text(serde_json::to_string(&good).unwrap())).await.unwrap();
    let (code, out) = s.result(&id).await;
    assert_eq!((code, out), (200, json!({"from": "current"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_hint_is_preferred_among_free_runners() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--no-local-runners"]);
    let token = s.post_json("/v1/runner-tokens", json!({"app_id": APP})).await["token"].as_str().unwrap().to_string();
    let (_a_id, _a_tx, mut a_rx) = fake_runner_id(&s, &token, vec!["warm-lora-a".into()]).await;
    let (_b_id, _b_tx, mut b_rx) = fake_runner_id(&s, &token, vec!["warm-lora-b".into()]).await;
    s.wait_runners(2).await;
    for (hint, rx) in [("warm-lora-b", &mut b_rx), ("warm-lora-a", &mut a_rx)] {
        let sub = s.submit_with(json!({}), &[("x-fal-runner-hint", hint)]).await;
        match next_frame(rx).await {
            GatewayFrame::Assign { job_id, .. } => assert_eq!(job_id, sub["request_id"].as_str().unwrap(), "{hint}"),
            f => panic!("{f:?}"),
        }
    }
}
