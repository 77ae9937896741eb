//! The store conformance suite: the specification every [`Store`] implementation must meet. Each check takes a
//! fresh, empty store. [`conformance_tests!`](crate::conformance_tests) turns them into `#[tokio::test]`s for an
//! implementation; the SQLite tests use it, and the PostgreSQL implementation runs the same suite.

use std::sync::Arc;

use darkroom_core::job::{JobMode, JobState, LogEntry, NewJob, Outcome, priority};

use crate::*;

/// A queue job for `app` with defaults.
pub fn job(id: &str, app: &str) -> NewJob {
    NewJob {
        id: id.into(),
        app_id: app.into(),
        path: String::new(),
        owner_id: "owner-a".into(),
        key_id: "key-a".into(),
        mode: JobMode::Queue,
        priority: priority::NORMAL,
        input: "{}".into(),
        max_attempts: 3,
        no_retry: false,
        start_deadline: None,
        runner_hint: None,
        webhook_url: None,
        webhook_dialect: None,
        traceparent: None,
        store_io: true,
        boot_id: "boot-1".into(),
        created_at: 1_000,
        prices: Default::default(),
    }
}

fn ok_outcome() -> Outcome {
    Outcome::success(r#"{"ok":true}"#.into(), Some(5))
}

fn err_outcome() -> Outcome {
    Outcome {
        status: 500,
        body: r#"{"detail":"boom"}"#.into(),
        error: Some("boom".into()),
        error_type: Some("app_error".into()),
        inference_ms: None,
        units: None,
    }
}

pub async fn fifo_within_priority_and_positions(s: &dyn Store) {
    s.enqueue(&job("a", "app")).await.unwrap();
    s.enqueue(&job("b", "app")).await.unwrap();
    s.enqueue(&NewJob { priority: priority::LOW, ..job("low", "app") }).await.unwrap();
    s.enqueue(&NewJob { priority: priority::INTERACTIVE, ..job("hi", "app") }).await.unwrap();
    s.enqueue(&job("other", "other-app")).await.unwrap();
    assert_eq!(s.queue_position("hi").await.unwrap(), Some(0));
    assert_eq!(s.queue_position("a").await.unwrap(), Some(1));
    assert_eq!(s.queue_position("b").await.unwrap(), Some(2));
    assert_eq!(s.queue_position("low").await.unwrap(), Some(3));
    assert_eq!(s.queue_position("other").await.unwrap(), Some(0), "positions are per app");
    assert_eq!(s.queue_position("missing").await.unwrap(), None);
    let mut order = Vec::new();
    while let Some((id, _)) = s.next_queued("app", 1).await.unwrap().into_iter().next() {
        assert!(s.claim(&id, "r1", 10_000, 2_000).await.unwrap().is_some());
        order.push(id);
    }
    assert_eq!(order, ["hi", "a", "b", "low"]);
    assert_eq!(s.queue_position("a").await.unwrap(), None, "running jobs have no position");
    let dup = s.enqueue(&job("a", "app")).await;
    assert!(matches!(dup, Err(StoreError::Duplicate(_))));
}

pub async fn claim_and_complete_with_fencing(s: &dyn Store) {
    s.enqueue(&job("j", "app")).await.unwrap();
    let c = s.claim("j", "r1", 10_000, 2_000).await.unwrap().unwrap();
    assert_eq!(c.state, JobState::Running);
    assert_eq!(c.attempts, 1);
    assert_eq!(c.lease_runner.as_deref(), Some("r1"));
    assert!(s.claim("j", "r2", 10_000, 2_000).await.unwrap().is_none(), "a running job cannot be claimed again");
    assert_eq!(s.complete("j", 0, &ok_outcome(), 3_000).await.unwrap(), CompleteResult::Stale);
    assert_eq!(s.complete("j", 2, &ok_outcome(), 3_000).await.unwrap(), CompleteResult::Stale);
    assert_eq!(s.complete("j", 1, &ok_outcome(), 3_000).await.unwrap(), CompleteResult::Applied);
    assert_eq!(
        s.complete("j", 1, &err_outcome(), 4_000).await.unwrap(),
        CompleteResult::Stale,
        "never completes twice"
    );
    let j = s.get_job("j").await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.result_status, Some(200));
    assert_eq!(j.result_body.as_deref(), Some(r#"{"ok":true}"#));
    assert_eq!(j.completed_at, Some(3_000));
    assert_eq!(j.inference_ms, Some(5));
    assert!(j.succeeded());
    assert_eq!(j.lease_runner, None);
}

pub async fn retries_until_the_attempt_limit(s: &dyn Store) {
    s.enqueue(&job("j", "app")).await.unwrap();
    for attempt in 1..=3 {
        let c = s.claim("j", "r1", 10_000, 2_000).await.unwrap().unwrap();
        assert_eq!(c.attempts, attempt);
        if attempt > 1 {
            assert_eq!(s.fail_attempt("j", attempt - 1, &err_outcome(), 2_500).await.unwrap(), AttemptResult::Stale);
        }
        let r = s.fail_attempt("j", attempt, &err_outcome(), 3_000).await.unwrap();
        if attempt < 3 {
            assert_eq!(r, AttemptResult::Requeued);
            assert_eq!(s.get_job("j").await.unwrap().unwrap().state, JobState::Queued);
            assert_eq!(s.queue_position("j").await.unwrap(), Some(0));
        } else {
            assert_eq!(r, AttemptResult::Completed);
        }
    }
    let j = s.get_job("j").await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(j.error_type.as_deref(), Some("app_error"));
    assert_eq!(j.result_status, Some(500));

    s.enqueue(&NewJob { no_retry: true, ..job("n", "app") }).await.unwrap();
    s.claim("n", "r1", 10_000, 2_000).await.unwrap().unwrap();
    assert_eq!(
        s.fail_attempt("n", 1, &err_outcome(), 3_000).await.unwrap(),
        AttemptResult::Completed,
        "x-fal-no-retry"
    );
}

pub async fn a_requeued_job_keeps_its_place(s: &dyn Store) {
    s.enqueue(&job("first", "app")).await.unwrap();
    s.enqueue(&job("second", "app")).await.unwrap();
    s.claim("first", "r1", 10_000, 2_000).await.unwrap().unwrap();
    assert_eq!(s.release_runner("r1", 3_000).await.unwrap(), vec![("first".to_string(), AttemptResult::Requeued)]);
    assert_eq!(s.next_queued("app", 1).await.unwrap().into_iter().next().unwrap().0, "first");
}

pub async fn cancel_queued_running_and_completed(s: &dyn Store) {
    s.enqueue(&job("q", "app")).await.unwrap();
    s.enqueue(&job("r", "app")).await.unwrap();
    assert_eq!(s.cancel("missing", 1).await.unwrap(), CancelResult::NotFound);
    assert_eq!(s.cancel("q", 2_000).await.unwrap(), CancelResult::Cancelled { running_on: None });
    let q = s.get_job("q").await.unwrap().unwrap();
    assert_eq!(q.state, JobState::Completed);
    assert_eq!(q.error_type.as_deref(), Some("request_cancelled"));
    assert!(q.result_status.unwrap() >= 400 && q.result_status.unwrap() < 500);
    assert_eq!(
        s.next_queued("app", 1).await.unwrap().into_iter().next().unwrap().0,
        "r",
        "a cancelled job leaves the queue"
    );
    s.claim("r", "r1", 10_000, 2_000).await.unwrap().unwrap();
    assert_eq!(s.cancel("r", 3_000).await.unwrap(), CancelResult::Cancelled { running_on: Some(("r1".into(), 1)) });
    assert_eq!(
        s.complete("r", 1, &ok_outcome(), 4_000).await.unwrap(),
        CompleteResult::Stale,
        "late completion refused"
    );
    assert_eq!(s.get_job("r").await.unwrap().unwrap().error_type.as_deref(), Some("request_cancelled"));
    assert_eq!(s.cancel("r", 5_000).await.unwrap(), CancelResult::AlreadyCompleted);
    assert!(s.release_runner("r1", 6_000).await.unwrap().is_empty());
}

pub async fn leases_extend_and_expire(s: &dyn Store) {
    s.enqueue(&job("a", "app")).await.unwrap();
    s.enqueue(&NewJob { max_attempts: 1, ..job("b", "app") }).await.unwrap();
    s.claim("a", "r1", 10_000, 2_000).await.unwrap().unwrap();
    s.claim("b", "r1", 10_000, 2_000).await.unwrap().unwrap();
    let both = vec!["a".to_string(), "b".to_string()];
    assert_eq!(s.extend_leases("r2", &both, 20_000).await.unwrap(), 0, "only the holder extends");
    assert_eq!(s.extend_leases("r1", &["a".to_string()], 12_000).await.unwrap(), 1, "only the listed jobs");
    assert_eq!(s.get_job("b").await.unwrap().unwrap().lease_expires_at, Some(10_000));
    assert_eq!(s.extend_leases("r1", &both, 20_000).await.unwrap(), 2);
    assert!(s.expire_leases(15_000).await.unwrap().is_empty());
    let mut expired = s.expire_leases(25_000).await.unwrap();
    expired.sort();
    assert_eq!(expired, vec![("a".into(), AttemptResult::Requeued), ("b".into(), AttemptResult::Completed)]);
    let b = s.get_job("b").await.unwrap().unwrap();
    assert_eq!(b.error_type.as_deref(), Some("runner_disconnected"));
    assert_eq!(b.result_status, Some(503));
}

pub async fn start_deadlines_expire_queued_jobs(s: &dyn Store) {
    s.enqueue(&NewJob { start_deadline: Some(5_000), ..job("late", "app") }).await.unwrap();
    s.enqueue(&NewJob { start_deadline: Some(5_000), ..job("started", "app") }).await.unwrap();
    s.enqueue(&NewJob { start_deadline: Some(50_000), ..job("early", "app") }).await.unwrap();
    s.claim("started", "r1", 100_000, 2_000).await.unwrap().unwrap();
    assert_eq!(s.expire_start_deadlines(6_000).await.unwrap(), vec!["late".to_string()]);
    let late = s.get_job("late").await.unwrap().unwrap();
    assert_eq!(late.error_type.as_deref(), Some("request_timeout"));
    assert_eq!(late.result_status, Some(504));
    assert_eq!(s.get_job("started").await.unwrap().unwrap().state, JobState::Running, "the deadline is time-to-start");
    assert_eq!(s.get_job("early").await.unwrap().unwrap().state, JobState::Queued);
    // Once started, the deadline is met: a retry is not failed by it.
    assert_eq!(s.fail_attempt("started", 1, &err_outcome(), 7_000).await.unwrap(), AttemptResult::Requeued);
    assert!(s.expire_start_deadlines(8_000).await.unwrap().is_empty());
    assert_eq!(s.get_job("started").await.unwrap().unwrap().state, JobState::Queued);
    // Retries can be switched off while running.
    s.claim("started", "r1", 100_000, 9_000).await.unwrap().unwrap();
    s.disable_retries("started").await.unwrap();
    assert_eq!(s.fail_attempt("started", 2, &err_outcome(), 9_500).await.unwrap(), AttemptResult::Completed);
}

pub async fn logs_belong_to_the_current_attempt(s: &dyn Store) {
    s.enqueue(&job("j", "app")).await.unwrap();
    let line = |m: &str| LogEntry { timestamp: 1, level: "INFO".into(), message: m.into() };
    assert!(!s.append_logs("j", 1, &[line("queued")]).await.unwrap(), "not running");
    s.claim("j", "r1", 10_000, 2_000).await.unwrap().unwrap();
    assert!(s.append_logs("j", 1, &[line("one"), line("two")]).await.unwrap());
    assert!(!s.append_logs("j", 7, &[line("stale")]).await.unwrap());
    let logs = s.get_logs("j").await.unwrap();
    assert_eq!(logs.iter().map(|l| l.message.as_str()).collect::<Vec<_>>(), ["one", "two"]);
}

pub async fn a_new_boot_revokes_tokens_and_ends_old_leases(s: &dyn Store) {
    s.start_boot("boot-1", 1_000).await.unwrap();
    s.insert_runner_token(&RunnerTokenRecord {
        token_hash: "h1".into(),
        boot_id: "boot-1".into(),
        app_id: None,
        created_at: 1,
        revoked_at: None,
    })
    .await
    .unwrap();
    s.enqueue(&job("running", "app")).await.unwrap();
    s.enqueue(&job("queued", "app")).await.unwrap();
    s.enqueue(&NewJob { mode: JobMode::Sync, ..job("sync", "app") }).await.unwrap();
    s.enqueue(&NewJob { mode: JobMode::Stream, ..job("stream", "app") }).await.unwrap();
    s.enqueue(&NewJob { max_attempts: 1, ..job("last-try", "app") }).await.unwrap();
    s.claim("running", "r1", 10_000, 2_000).await.unwrap().unwrap();
    s.claim("stream", "r1", 10_000, 2_000).await.unwrap().unwrap();
    s.claim("last-try", "r1", 10_000, 2_000).await.unwrap().unwrap();
    let mut report = s.start_boot("boot-2", 3_000).await.unwrap();
    report.failed.sort();
    assert_eq!(report.requeued, vec!["running".to_string()]);
    assert_eq!(report.failed, vec!["last-try".to_string(), "stream".to_string(), "sync".to_string()]);
    assert_eq!(report.tokens_revoked, 1);
    assert_eq!(s.get_runner_token("h1").await.unwrap().unwrap().revoked_at, Some(3_000));
    assert_eq!(s.get_job("sync").await.unwrap().unwrap().error_type.as_deref(), Some("gateway_restarted"));
    assert_eq!(s.get_job("queued").await.unwrap().unwrap().state, JobState::Queued);
    assert_eq!(
        s.complete("running", 1, &ok_outcome(), 4_000).await.unwrap(),
        CompleteResult::Stale,
        "old attempt fenced"
    );
    let again = s.claim("running", "r2", 10_000, 4_000).await.unwrap().unwrap();
    assert_eq!(again.attempts, 2);
}

pub async fn keys_insert_list_revoke(s: &dyn Store) {
    let k = KeyRecord {
        key_id: "k1".into(),
        owner_id: "o1".into(),
        secret_hash: "h".into(),
        scope: "client".into(),
        name: "n".into(),
        created_at: 1,
        revoked_at: None,
        webhook_dialect: Some("standard".into()),
    };
    s.insert_key(&k).await.unwrap();
    s.insert_key(&KeyRecord { key_id: "k2".into(), owner_id: "o2".into(), ..k.clone() }).await.unwrap();
    assert!(matches!(s.insert_key(&k).await, Err(StoreError::Duplicate(_))));
    assert_eq!(s.get_key("k1").await.unwrap().unwrap(), k);
    assert_eq!(s.list_keys(Some("o1")).await.unwrap().len(), 1);
    assert_eq!(s.list_keys(None).await.unwrap().len(), 2);
    assert!(s.revoke_key("k1", 9).await.unwrap());
    assert!(!s.revoke_key("k1", 10).await.unwrap());
    assert!(!s.revoke_key("nope", 10).await.unwrap());
    assert_eq!(s.get_key("k1").await.unwrap().unwrap().revoked_at, Some(9));
}

pub async fn listing_and_depths(s: &dyn Store) {
    s.enqueue(&job("a", "app")).await.unwrap();
    s.enqueue(&NewJob { owner_id: "owner-b".into(), ..job("b", "app") }).await.unwrap();
    s.enqueue(&job("c", "app2")).await.unwrap();
    s.claim("a", "r", 10, 1).await.unwrap();
    let mine = s.list_jobs(&JobFilter { owner_id: Some("owner-a".into()), ..Default::default() }).await.unwrap();
    assert_eq!(mine.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["c", "a"], "newest first, owner-scoped");
    let q = s
        .list_jobs(&JobFilter { state: Some("queued".into()), app_id: Some("app".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(
        s.app_depths().await.unwrap(),
        vec![
            AppDepth { app_id: "app".into(), queued: 1, running: 1, oldest_queued_at: Some(1_000) },
            AppDepth { app_id: "app2".into(), queued: 1, running: 0, oldest_queued_at: Some(1_000) }
        ]
    );
    // By submission time: [after, before).
    s.enqueue(&NewJob { created_at: 5_000, ..job("d", "app") }).await.unwrap();
    let ids = |v: Vec<darkroom_core::job::JobRecord>| v.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let late = s.list_jobs(&JobFilter { created_after: Some(5_000), ..Default::default() }).await.unwrap();
    assert_eq!(ids(late), ["d"]);
    let early = s.list_jobs(&JobFilter { created_before: Some(5_000), ..Default::default() }).await.unwrap();
    assert_eq!(ids(early), ["c", "b", "a"]);
    let none = s
        .list_jobs(&JobFilter { created_after: Some(1_001), created_before: Some(5_000), ..Default::default() })
        .await
        .unwrap();
    assert!(none.is_empty());
    s.cancel("d", 5_001).await.unwrap();
    assert_eq!(s.count_queued_for_key("key-a", priority::NORMAL).await.unwrap(), 2);
    assert_eq!(s.count_queued_for_key("key-a", priority::INTERACTIVE).await.unwrap(), 0);
    assert_eq!(s.count_active_for_key("key-a").await.unwrap(), 3, "queued and running, whatever the owner");
    assert_eq!(s.count_active_for_key("nobody").await.unwrap(), 0);
}

pub async fn the_webhook_outbox_is_written_with_the_completion(s: &dyn Store) {
    let hook = |id: &str| NewJob {
        webhook_url: Some(format!("https://example.com/{id}")),
        traceparent: Some("tp".into()),
        ..job(id, "app")
    };
    s.enqueue(&hook("ok")).await.unwrap();
    s.enqueue(&hook("cancelled")).await.unwrap();
    s.enqueue(&NewJob { start_deadline: Some(5), ..hook("late") }).await.unwrap();
    s.enqueue(&job("plain", "app")).await.unwrap();
    s.claim("ok", "r", 100, 1).await.unwrap().unwrap();
    s.claim("plain", "r", 100, 1).await.unwrap().unwrap();
    assert!(s.list_webhooks(&WebhookFilter::default()).await.unwrap().is_empty(), "nothing before completion");
    s.complete("ok", 1, &ok_outcome(), 10).await.unwrap();
    s.complete("plain", 1, &ok_outcome(), 10).await.unwrap();
    s.cancel("cancelled", 11).await.unwrap();
    s.expire_start_deadlines(12).await.unwrap();
    let all = s.list_webhooks(&WebhookFilter::default()).await.unwrap();
    let mut jobs: Vec<_> = all.iter().map(|d| d.job_id.as_str()).collect();
    jobs.sort();
    assert_eq!(jobs, ["cancelled", "late", "ok"], "one delivery per finished request with a webhook");
    let ok = all.iter().find(|d| d.job_id == "ok").unwrap();
    assert_eq!(ok.state, "pending");
    assert_eq!(ok.next_attempt_at, Some(10));
    assert_eq!(ok.owner_id, "owner-a");
    assert_eq!(ok.traceparent.as_deref(), Some("tp"));
    let body: serde_json::Value = serde_json::from_str(&ok.body).unwrap();
    assert_eq!(body["status"], "OK");
    assert_eq!(body["payload"], serde_json::json!({"ok": true}));
    let c: serde_json::Value =
        serde_json::from_str(&all.iter().find(|d| d.job_id == "cancelled").unwrap().body).unwrap();
    assert_eq!(c["status"], "ERROR");
}

pub async fn webhook_deliveries_are_leased_retried_and_dead_lettered(s: &dyn Store) {
    s.enqueue(&NewJob { webhook_url: Some("https://example.com/h".into()), ..job("j", "app") }).await.unwrap();
    s.claim("j", "r", 100, 1).await.unwrap().unwrap();
    s.complete("j", 1, &ok_outcome(), 10).await.unwrap();
    assert_eq!(s.next_webhook_due().await.unwrap(), Some(10));
    assert!(s.claim_due_webhooks(9, 1_000, 10).await.unwrap().is_empty(), "not due yet");
    let got = s.claim_due_webhooks(10, 1_000, 10).await.unwrap();
    assert_eq!(got.len(), 1);
    let id = got[0].id.clone();
    assert!(s.claim_due_webhooks(20, 1_000, 10).await.unwrap().is_empty(), "leased");
    assert_eq!(s.next_webhook_due().await.unwrap(), Some(1_000), "a leased delivery is not due before its lease ends");
    let fail = WebhookAttempt { attempt: 1, started_at: 20, duration_ms: 3, status: Some(500), error: None };
    s.record_webhook_attempt(&id, &fail, DeliveryNext::Retry { at: 50 }, 23).await.unwrap();
    assert!(s.claim_due_webhooks(49, 1_000, 10).await.unwrap().is_empty());
    assert_eq!(s.claim_due_webhooks(50, 1_000, 10).await.unwrap().len(), 1);
    let dead =
        WebhookAttempt { attempt: 2, started_at: 50, duration_ms: 3, status: None, error: Some("timeout".into()) };
    s.record_webhook_attempt(&id, &dead, DeliveryNext::Dead, 53).await.unwrap();
    let (d, attempts) = s.get_webhook(&id).await.unwrap().unwrap();
    assert_eq!((d.state.as_str(), d.attempts, d.last_error.as_deref()), ("dead", 2, Some("timeout")));
    assert_eq!(attempts.iter().map(|a| a.status).collect::<Vec<_>>(), [Some(500), None]);
    assert_eq!(s.next_webhook_due().await.unwrap(), None);
    assert!(s.redeliver_webhook(&id, 60).await.unwrap());
    s.claim_due_webhooks(60, 1_000, 10).await.unwrap();
    assert!(!s.redeliver_webhook(&id, 61).await.unwrap(), "not while an attempt holds the lease");
    s.record_webhook_attempt(
        &id,
        &WebhookAttempt { attempt: 3, started_at: 60, duration_ms: 1, status: Some(500), error: None },
        DeliveryNext::Dead,
        61,
    )
    .await
    .unwrap();
    assert!(s.redeliver_webhook(&id, 62).await.unwrap());
    let (d, _) = s.get_webhook(&id).await.unwrap().unwrap();
    assert_eq!(d.attempts, 3);
    assert!(!s.redeliver_webhook("missing", 60).await.unwrap());
    let again = s.claim_due_webhooks(62, 1_000, 10).await.unwrap();
    assert_eq!((again[0].round_start, again[0].attempts), (3, 3));
    let ok = WebhookAttempt { attempt: 4, started_at: 62, duration_ms: 1, status: Some(204), error: None };
    s.record_webhook_attempt(&id, &ok, DeliveryNext::Delivered, 63).await.unwrap();
    let (d, _) = s.get_webhook(&id).await.unwrap().unwrap();
    assert_eq!((d.state.as_str(), d.delivered_at), ("delivered", Some(63)));
    let mine = s
        .list_webhooks(&WebhookFilter {
            job_id: Some("j".into()),
            state: Some("delivered".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
}

pub async fn a_new_boot_releases_webhook_leases(s: &dyn Store) {
    s.start_boot("b1", 1).await.unwrap();
    s.enqueue(&NewJob { webhook_url: Some("https://example.com/h".into()), ..job("j", "app") }).await.unwrap();
    s.claim("j", "r", 100, 1).await.unwrap().unwrap();
    s.complete("j", 1, &ok_outcome(), 10).await.unwrap();
    assert_eq!(s.claim_due_webhooks(10, 1_000_000, 10).await.unwrap().len(), 1);
    s.start_boot("b2", 20).await.unwrap();
    assert_eq!(s.claim_due_webhooks(20, 1_000_000, 10).await.unwrap().len(), 1, "in-flight delivery due again");
}

pub async fn signing_keys_rotate(s: &dyn Store) {
    let k = |kid: &str, at| SigningKeyRecord { kid: kid.into(), secret: "s".into(), created_at: at, retired_at: None };
    s.insert_signing_key(&k("a", 1), true).await.unwrap();
    s.insert_signing_key(&k("b", 5), true).await.unwrap();
    let keys = s.list_signing_keys().await.unwrap();
    assert_eq!(keys.iter().map(|k| (k.kid.as_str(), k.retired_at)).collect::<Vec<_>>(), [("a", Some(5)), ("b", None)]);
}

pub async fn idempotency_keys_return_the_first_request(s: &dyn Store) {
    let (a, created) = s.enqueue_idempotent(&job("a", "app"), "k1", "h1", 0).await.unwrap();
    assert!(created);
    let (again, created) = s.enqueue_idempotent(&job("b", "app"), "k1", "h1", 0).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, a.id, "the same request");
    assert!(s.get_job("b").await.unwrap().is_none(), "nothing new enqueued");
    assert!(matches!(
        s.enqueue_idempotent(&job("c", "app"), "k1", "other", 0).await,
        Err(StoreError::IdempotencyMismatch(_))
    ));
    // Keys belong to their owner, and expire with the window.
    let (other, created) =
        s.enqueue_idempotent(&NewJob { owner_id: "owner-b".into(), ..job("d", "app") }, "k1", "h1", 0).await.unwrap();
    assert!(created && other.id == "d");
    let (late, created) = s.enqueue_idempotent(&job("e", "app"), "k1", "h1", 2_000).await.unwrap();
    assert!(created && late.id == "e", "outside the window a key starts a new request");
    assert_eq!(s.count_queued("app").await.unwrap(), 3);
}

pub async fn payloads_are_deleted_on_request_and_by_retention(s: &dyn Store) {
    let line = LogEntry { timestamp: 1, level: "INFO".into(), message: "secret prompt".into() };
    for (id, done_at) in [("old", 100), ("new", 5_000)] {
        s.enqueue(&NewJob { input: r#"{"prompt":"secret"}"#.into(), ..job(id, "app") }).await.unwrap();
        s.claim(id, "r", 100_000, 10).await.unwrap().unwrap();
        s.append_logs(id, 1, std::slice::from_ref(&line)).await.unwrap();
        s.complete(id, 1, &ok_outcome(), done_at).await.unwrap();
    }
    s.enqueue(&job("running", "app")).await.unwrap();
    s.claim("running", "r", 100_000, 10).await.unwrap().unwrap();
    assert_eq!(s.delete_payload("running", 6_000).await.unwrap(), DeleteResult::NotCompleted);
    assert_eq!(s.delete_payload("missing", 6_000).await.unwrap(), DeleteResult::NotFound);
    assert_eq!(s.purge_payloads(1_000, 6_000, 100).await.unwrap(), vec!["old".to_string()]);
    let old = s.get_job("old").await.unwrap().unwrap();
    assert_eq!((old.input.as_str(), old.result_body.as_deref(), old.payload_deleted_at), ("null", None, Some(6_000)));
    assert_eq!(old.state, JobState::Completed, "metadata stays");
    assert!(s.get_logs("old").await.unwrap().is_empty());
    assert_eq!(s.get_logs("new").await.unwrap().len(), 1);
    assert!(s.purge_payloads(1_000, 7_000, 100).await.unwrap().is_empty(), "once");
    assert_eq!(s.delete_payload("new", 8_000).await.unwrap(), DeleteResult::Deleted);
    assert!(s.get_job("new").await.unwrap().unwrap().result_body.is_none());
}

/// Gateways sharing a store: heartbeats keep a boot alive; a dead one is reaped without touching the others.
pub async fn dead_gateways_are_reaped_and_live_ones_kept(s: &dyn Store) {
    let token = |h: &str, boot: &str| RunnerTokenRecord {
        token_hash: h.into(),
        boot_id: boot.into(),
        app_id: None,
        created_at: 1,
        revoked_at: None,
    };
    s.join_cluster("g1", Some("http://127.0.0.1:1"), 1_000).await.unwrap();
    s.insert_runner_token(&token("t1", "g1")).await.unwrap();
    s.enqueue(&NewJob { boot_id: "g1".into(), ..job("q1", "app") }).await.unwrap();
    s.enqueue(&NewJob { boot_id: "g1".into(), mode: JobMode::Sync, ..job("sync1", "app") }).await.unwrap();
    s.claim("q1", "r1", 60_000, 1_000).await.unwrap().unwrap();
    // The same store now serves a second gateway's claims.
    s.join_cluster("g2", None, 1_500).await.unwrap();
    s.insert_runner_token(&token("t2", "g2")).await.unwrap();
    s.enqueue(&NewJob { boot_id: "g2".into(), ..job("q2", "app") }).await.unwrap();
    s.enqueue(&NewJob { boot_id: "g2".into(), mode: JobMode::Stream, ..job("stream2", "app") }).await.unwrap();
    s.claim("q2", "r2", 60_000, 1_500).await.unwrap().unwrap();
    assert_eq!(s.get_boot("g1").await.unwrap().unwrap().url.as_deref(), Some("http://127.0.0.1:1"));
    assert!(s.heartbeat_boot("g2", 5_000).await.unwrap());
    let mut report = s.reap_boots(3_000, None, 6_000).await.unwrap();
    report.failed.sort();
    assert_eq!(report.requeued, vec!["q1".to_string()], "the dead gateway's runner attempts end");
    assert_eq!(report.failed, vec!["sync1".to_string()]);
    assert_eq!(report.tokens_revoked, 1);
    assert_eq!(s.get_runner_token("t1").await.unwrap().unwrap().revoked_at, Some(6_000));
    assert_eq!(s.get_runner_token("t2").await.unwrap().unwrap().revoked_at, None, "live gateways keep theirs");
    assert_eq!(s.get_job("q2").await.unwrap().unwrap().state, JobState::Running);
    assert_eq!(s.get_job("stream2").await.unwrap().unwrap().state, JobState::Queued);
    assert_eq!(s.get_boot("g1").await.unwrap().unwrap().reaped_at, Some(6_000));
    assert!(!s.heartbeat_boot("g1", 7_000).await.unwrap(), "a reaped gateway learns it is dead");
    assert_eq!(s.reap_boots(3_000, None, 7_000).await.unwrap(), BootReport::default(), "reaped once");
    // A gateway known dead (its data folder restarted) is reaped at once, heartbeat or not.
    let r = s.reap_boots(0, Some("g2"), 8_000).await.unwrap();
    assert_eq!(r.requeued, vec!["q2".to_string()]);
    assert_eq!(r.failed, vec!["stream2".to_string()]);
    assert_eq!(s.complete("q2", 1, &ok_outcome(), 9_000).await.unwrap(), CompleteResult::Stale);
}

pub async fn settings_keep_their_first_value(s: &dyn Store) {
    assert_eq!(s.ensure_setting("secret_check", "a").await.unwrap(), "a");
    assert_eq!(s.ensure_setting("secret_check", "b").await.unwrap(), "a");
    assert_eq!(s.ensure_setting("other", "b").await.unwrap(), "b");
}

fn file(id: &str, owner: &str, state: &str, created_at: Millis, expires_at: Option<Millis>) -> FileRecord {
    FileRecord {
        id: id.into(),
        owner_id: owner.into(),
        file_name: "cat picture.png".into(),
        content_type: "image/png".into(),
        size: if state == "ready" { 10 } else { 0 },
        state: state.into(),
        public: false,
        job_id: None,
        created_at,
        completed_at: None,
        expires_at,
    }
}

pub async fn files_are_recorded_listed_finished_and_expired(s: &dyn Store) {
    s.insert_file(&file("f1", "a", "ready", 100, None)).await.unwrap();
    s.insert_file(&file("f2", "a", "pending", 200, Some(10_000))).await.unwrap();
    s.insert_file(&FileRecord { public: true, job_id: Some("j".into()), ..file("f3", "b", "ready", 300, Some(500)) })
        .await
        .unwrap();
    assert!(s.insert_file(&file("f1", "a", "ready", 100, None)).await.is_err(), "ids are unique");
    let f3 = s.get_file("f3").await.unwrap().unwrap();
    assert!(f3.public && f3.is_ready());
    assert_eq!(f3.job_id.as_deref(), Some("j"));
    assert_eq!(s.get_file("nope").await.unwrap(), None);
    // Only ready files are listed, newest (highest id) first, per owner, in pages.
    let all = s.list_files(&FileFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), vec!["f3", "f1"]);
    let mine = s.list_files(&FileFilter { owner_id: Some("a".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(mine.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), vec!["f1"]);
    let page = s.list_files(&FileFilter { before: Some("f3".into()), limit: 1, ..Default::default() }).await.unwrap();
    assert_eq!(page.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), vec!["f1"]);
    // Finishing happens once.
    assert!(s.finish_file("f2", 42, 250).await.unwrap());
    assert!(!s.finish_file("f2", 43, 260).await.unwrap());
    let f2 = s.get_file("f2").await.unwrap().unwrap();
    assert_eq!((f2.state.as_str(), f2.size, f2.completed_at), ("ready", 42, Some(250)));
    // Expired: past expiry, or pending for too long.
    s.insert_file(&file("f4", "a", "pending", 50, None)).await.unwrap();
    let due = s.expired_files(400, 60, 10).await.unwrap();
    assert_eq!(due.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), vec!["f4"]);
    let due = s.expired_files(600, 60, 10).await.unwrap();
    assert_eq!(due.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), vec!["f4", "f3"]);
    assert_eq!(s.expired_files(20_000, 0, 10).await.unwrap().len(), 2, "f2 expires at 10000, f4 is not pending-old");
    assert!(s.delete_file("f3").await.unwrap());
    assert!(!s.delete_file("f3").await.unwrap());
    assert_eq!(s.get_file("f3").await.unwrap(), None);
}

/// Many concurrent claimers: every job is claimed exactly once.
pub async fn usage_lines_are_written_with_the_completion(s: &dyn Store) {
    use darkroom_core::billing::BillingUnit;
    use darkroom_core::job::JobPrices;
    let priced = |id: &str, unit: BillingUnit, unit_price: f64, sec: f64| NewJob {
        prices: JobPrices { unit, unit_price, runner_second_price: sec },
        ..job(id, "app")
    };
    // A success with reported units, runner time and a cold start.
    s.enqueue(&priced("img", BillingUnit::Image, 0.01, 0.001)).await.unwrap();
    s.claim("img", "r1", 100_000, 2_000).await.unwrap().unwrap();
    assert!(s.set_cold_start("img", 1, 1_500).await.unwrap());
    let done = Outcome::success("{}".into(), Some(1)).with_units(Some(3.0));
    assert_eq!(s.complete("img", 1, &done, 4_000).await.unwrap(), CompleteResult::Applied);
    assert_eq!(s.complete("img", 1, &done, 4_500).await.unwrap(), CompleteResult::Stale);
    // A per-request app that reports nothing: one unit.
    s.enqueue(&NewJob { owner_id: "owner-b".into(), ..priced("req", BillingUnit::Request, 0.5, 0.0) }).await.unwrap();
    s.claim("req", "r1", 100_000, 2_000).await.unwrap().unwrap();
    s.complete("req", 1, &ok_outcome(), 2_100).await.unwrap();
    // The app's own 4xx: no units, but the runner time.
    s.enqueue(&priced("bad", BillingUnit::Image, 0.01, 0.001)).await.unwrap();
    s.claim("bad", "r1", 100_000, 2_000).await.unwrap().unwrap();
    let bad = Outcome { status: 422, ..err_outcome() }.with_units(Some(9.0));
    s.complete("bad", 1, &bad, 3_000).await.unwrap();
    // 5xx failures are not billed, wherever they end.
    s.enqueue(&priced("boom", BillingUnit::Image, 0.01, 0.001)).await.unwrap();
    s.claim("boom", "r1", 100_000, 2_000).await.unwrap().unwrap();
    s.complete("boom", 1, &err_outcome(), 3_000).await.unwrap();
    s.enqueue(&NewJob { start_deadline: Some(5), ..priced("late", BillingUnit::Request, 1.0, 0.0) }).await.unwrap();
    assert_eq!(s.expire_start_deadlines(6).await.unwrap(), vec!["late".to_string()]);
    s.enqueue(&NewJob { max_attempts: 1, ..priced("lost", BillingUnit::Request, 1.0, 0.0) }).await.unwrap();
    s.claim("lost", "r9", 100_000, 2_000).await.unwrap().unwrap();
    s.release_runner("r9", 3_000).await.unwrap();
    // Cancellations: queued (nothing used) and running (its runner time).
    s.enqueue(&priced("cq", BillingUnit::Image, 0.01, 0.001)).await.unwrap();
    s.cancel("cq", 2_500).await.unwrap();
    s.enqueue(&priced("cr", BillingUnit::Image, 0.01, 0.001)).await.unwrap();
    s.claim("cr", "r1", 100_000, 2_000).await.unwrap().unwrap();
    s.cancel("cr", 3_000).await.unwrap();
    // A retried request is billed once, for the attempt that finished it.
    s.enqueue(&priced("retry", BillingUnit::Image, 0.01, 0.001)).await.unwrap();
    s.claim("retry", "r1", 100_000, 2_000).await.unwrap().unwrap();
    let busy = Outcome { status: 503, ..err_outcome() };
    assert_eq!(s.fail_attempt("retry", 1, &busy, 2_500).await.unwrap(), AttemptResult::Requeued);
    s.claim("retry", "r2", 100_000, 3_000).await.unwrap().unwrap();
    s.complete("retry", 2, &Outcome::success("{}".into(), None).with_units(Some(1.0)), 3_200).await.unwrap();

    let all = s.list_usage(&UsageFilter { limit: 100, ..Default::default() }).await.unwrap();
    let by_job = |id: &str| all.iter().filter(|l| l.job_id == id).cloned().collect::<Vec<_>>();
    let mut jobs: Vec<_> = all.iter().map(|l| l.job_id.clone()).collect();
    jobs.sort();
    assert_eq!(jobs, ["bad", "cq", "cr", "img", "req", "retry"], "one line per finished request, none for 5xx");
    let img = &by_job("img")[0];
    assert_eq!((img.status, img.unit.as_str(), img.units, img.runner_ms), (200, "image", 3.0, 2_000));
    assert_eq!(img.cold_start_ms, Some(1_500));
    assert_eq!(img.cost_nanos, 32_000_000, "3 images at 0.01 and 2 runner-seconds at 0.001");
    assert_eq!((img.owner_id.as_str(), img.key_id.as_str(), img.app_id.as_str()), ("owner-a", "key-a", "app"));
    let req = &by_job("req")[0];
    assert_eq!((req.units, req.cost_nanos), (1.0, 500_000_000));
    let bad = &by_job("bad")[0];
    assert_eq!((bad.status, bad.units, bad.runner_ms, bad.cost_nanos), (422, 0.0, 1_000, 1_000_000));
    let cq = &by_job("cq")[0];
    assert_eq!((cq.status, cq.units, cq.runner_ms, cq.cost_nanos), (499, 0.0, 0, 0));
    let cr = &by_job("cr")[0];
    assert_eq!((cr.status, cr.runner_ms, cr.cost_nanos), (499, 1_000, 1_000_000));
    let retry = &by_job("retry")[0];
    assert_eq!((retry.units, retry.runner_ms, retry.cost_nanos), (1.0, 200, 10_200_000));

    // Filters, paging, sums.
    let b = UsageFilter { owner_id: Some("owner-b".into()), limit: 100, ..Default::default() };
    assert_eq!(s.list_usage(&b).await.unwrap().len(), 1);
    let page = s.list_usage(&UsageFilter { limit: 2, ..Default::default() }).await.unwrap();
    let next = UsageFilter { limit: 100, before: Some(page[1].id.clone()), ..Default::default() };
    assert_eq!(s.list_usage(&next).await.unwrap().len(), 4);
    let sums = s.summarize_usage(&UsageFilter::default(), None, &[UsageGroup::Owner]).await.unwrap();
    let a_image = sums.iter().find(|r| r.owner_id.as_deref() == Some("owner-a") && r.unit == "image").unwrap();
    assert_eq!(a_image.requests, 5);
    assert_eq!(a_image.units, 4.0);
    assert_eq!(a_image.cold_starts, 1);
    assert_eq!(a_image.cost_nanos, 32_000_000 + 1_000_000 + 1_000_000 + 10_200_000);
    let buckets = s.summarize_usage(&UsageFilter::default(), Some(1_000), &[UsageGroup::App]).await.unwrap();
    assert!(buckets.iter().all(|r| r.app_id.as_deref() == Some("app") && r.bucket.unwrap() % 1_000 == 0));
    assert_eq!(buckets.iter().map(|r| r.requests).sum::<i64>(), 6);
    let window = UsageFilter { since: Some(3_000), until: Some(3_500), ..Default::default() };
    let w = s.summarize_usage(&window, None, &[]).await.unwrap();
    assert_eq!(
        w.iter().map(|r| r.requests).sum::<i64>(),
        3,
        "bad, cr at 3000 and retry at 3200; boom and lost unbilled"
    );
    assert_eq!(s.owner_spend("owner-a", 0).await.unwrap(), a_image.cost_nanos);
    assert_eq!(s.owner_spend("owner-a", 3_500).await.unwrap(), 32_000_000);
    assert_eq!(s.owner_spend("nobody", 0).await.unwrap(), 0);

    // Budgets.
    let budget = Budget { owner_id: "owner-a".into(), limit_nanos: 5, period: "day".into(), updated_at: 1 };
    s.set_budget(&budget).await.unwrap();
    s.set_budget(&Budget { limit_nanos: 7, period: "month".into(), ..budget.clone() }).await.unwrap();
    s.set_budget(&Budget { owner_id: "owner-b".into(), ..budget.clone() }).await.unwrap();
    let mine = s.list_budgets(Some("owner-a")).await.unwrap();
    assert_eq!((mine.len(), mine[0].limit_nanos, mine[0].period.as_str()), (1, 7, "month"));
    assert_eq!(s.list_budgets(None).await.unwrap().len(), 2);
    assert!(s.delete_budget("owner-b").await.unwrap());
    assert!(!s.delete_budget("owner-b").await.unwrap());
}

pub async fn concurrent_claims_are_exclusive(s: Arc<dyn Store>) {
    for i in 0..60 {
        s.enqueue(&job(&format!("j{i:03}"), "app")).await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..6 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let Some((id, _)) = s.next_queued("app", 1).await.unwrap().into_iter().next() else { break };
                if let Some(j) = s.claim(&id, &format!("w{w}"), 10_000, 1).await.unwrap() {
                    assert_eq!(s.complete(&j.id, j.attempts, &ok_outcome(), 2).await.unwrap(), CompleteResult::Applied);
                    got.push(j.id);
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(before, 60, "every job claimed once");
    assert_eq!(all.len(), 60);
}

pub async fn scaling_overrides_and_cold_starts_are_kept(s: &dyn Store) {
    assert!(s.list_app_scaling().await.unwrap().is_empty());
    s.set_app_scaling("o/a", Some(r#"{"min_concurrency":1}"#), 10).await.unwrap();
    s.set_app_scaling("o/b", Some(r#"{"keep_alive":5}"#), 10).await.unwrap();
    s.set_app_scaling("o/a", Some(r#"{"max_concurrency":3}"#), 20).await.unwrap();
    let all = s.list_app_scaling().await.unwrap();
    assert_eq!(
        all,
        vec![("o/a".into(), r#"{"max_concurrency":3}"#.into()), ("o/b".into(), r#"{"keep_alive":5}"#.into())]
    );
    s.set_app_scaling("o/b", None, 30).await.unwrap();
    s.set_app_scaling("o/none", None, 30).await.unwrap();
    assert_eq!(s.list_app_scaling().await.unwrap().len(), 1);

    s.enqueue(&job("j1", "o/a")).await.unwrap();
    s.enqueue(&NewJob { created_at: 900, ..job("j0", "o/a") }).await.unwrap();
    let d = s.app_depths().await.unwrap();
    assert_eq!((d[0].queued, d[0].oldest_queued_at), (2, Some(900)));
    let c = s.claim("j1", "r1", 5_000, 1_100).await.unwrap().unwrap();
    assert!(!s.set_cold_start("j1", c.attempts + 1, 40).await.unwrap(), "stale token");
    assert!(s.set_cold_start("j1", c.attempts, 40).await.unwrap());
    assert_eq!(s.get_job("j1").await.unwrap().unwrap().cold_start_ms, Some(40));
    assert_eq!(s.get_job("j0").await.unwrap().unwrap().cold_start_ms, None);
}

/// The dispatcher's batch: the next jobs in order, claimed together; claim at submit; counts stay right.
pub async fn batched_claims_and_claim_at_submit(s: &dyn Store) {
    for id in ["a", "b", "c", "d"] {
        s.enqueue(&job(id, "app")).await.unwrap();
    }
    s.enqueue(&NewJob { key_id: "key-b".into(), runner_hint: Some("h".into()), ..job("e", "app") }).await.unwrap();
    let next = s.next_queued("app", 3).await.unwrap();
    assert_eq!(next.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(s.next_queued("app", 10).await.unwrap().last().unwrap(), &("e".to_string(), Some("h".to_string())));
    assert!(s.next_queued("none", 5).await.unwrap().is_empty());
    // b is cancelled before the batch is claimed: its claim is None, the others run.
    s.cancel("b", 1_500).await.unwrap();
    let claims: Vec<(String, String)> =
        ["a", "b", "c"].iter().map(|id| (id.to_string(), format!("runner-{id}"))).collect();
    let got = s.claim_many(&claims, 9_000, 2_000).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].as_ref().unwrap().lease_runner.as_deref(), Some("runner-a"));
    assert!(got[1].is_none());
    assert_eq!(got[2].as_ref().unwrap().state, JobState::Running);
    assert_eq!(s.count_queued("app").await.unwrap(), 2);
    assert_eq!(s.queue_position("d").await.unwrap(), Some(0));
    assert_eq!(s.queue_position("e").await.unwrap(), Some(1));
    assert_eq!(s.count_active_for_key("key-a").await.unwrap(), 3, "a, c running and d queued");
    assert_eq!(s.count_queued_for_key("key-b", priority::NORMAL).await.unwrap(), 1);

    // Claim at submit: the job is running on the runner as soon as it exists.
    let (rec, claimed) = s.enqueue_claimed(&job("f", "app"), "runner-f", 9_000, 2_100).await.unwrap();
    assert!(claimed);
    assert_eq!((rec.state, rec.attempts, rec.lease_runner.as_deref()), (JobState::Running, 1, Some("runner-f")));
    assert_eq!(rec.started_at, Some(2_100));
    assert_eq!(s.get_job("f").await.unwrap().unwrap().state, JobState::Running);
    assert_eq!(s.queue_position("f").await.unwrap(), None);
    let d = s.app_depths().await.unwrap();
    assert_eq!((d[0].queued, d[0].running), (2, 3));
    assert_eq!(s.complete("f", 1, &ok_outcome(), 2_200).await.unwrap(), CompleteResult::Applied);
    // A duplicate id is refused and changes nothing.
    assert!(matches!(
        s.enqueue_claimed(&job("f", "app"), "runner-f", 9_000, 2_300).await,
        Err(StoreError::Duplicate(_))
    ));
    assert_eq!(s.get_job("f").await.unwrap().unwrap().state, JobState::Completed);
    let d = s.app_depths().await.unwrap();
    assert_eq!((d[0].queued, d[0].running), (2, 2));

    // Where the store keeps a status index, it agrees with the rows.
    for id in ["a", "d", "f", "b"] {
        if let Some(b) = s.job_brief(id).await.unwrap() {
            let j = s.get_job(id).await.unwrap().unwrap();
            assert_eq!((b.state, b.app_id.as_str(), b.owner_id.as_str()), (j.state, "app", "owner-a"), "{id}");
            assert_ne!(j.state, JobState::Completed, "completed jobs leave the index");
        }
    }
}

fn deployment(app_id: &str, version: i64, at: i64) -> DeploymentRecord {
    DeploymentRecord {
        app_id: app_id.into(),
        owner_id: "owner-a".into(),
        version,
        spec: format!(r#"{{"id":"{app_id}","v":{version}}}"#),
        manifest: format!(r#"{{"v":{version}}}"#),
        bundle_digest: format!("digest-{version}"),
        bundle_size: 100 + version,
        created_at: at,
        updated_at: at,
    }
}

/// Deployments are versioned (a put naming the version it expects fails if another deploy came first); secrets are
/// opaque bytes by name.
pub async fn deployments_and_secrets_are_kept(s: &dyn Store) {
    assert_eq!(s.get_deployment("acme/echo").await.unwrap(), None);
    assert!(s.list_deployments().await.unwrap().is_empty());
    // First deploy: expects none (version 0).
    let v1 = deployment("acme/echo", 1, 1_000);
    assert!(s.put_deployment(&v1, Some(0)).await.unwrap());
    assert_eq!(s.get_deployment("acme/echo").await.unwrap().as_ref(), Some(&v1));
    // A second "first deploy" lost the race: refused, nothing changes.
    assert!(!s.put_deployment(&deployment("acme/echo", 1, 1_500), Some(0)).await.unwrap());
    assert_eq!(s.get_deployment("acme/echo").await.unwrap().as_ref(), Some(&v1));
    // Expecting a version that is not the current one is refused too.
    assert!(!s.put_deployment(&deployment("acme/echo", 3, 1_600), Some(2)).await.unwrap());
    // Redeploy over version 1: every field but created_at is replaced.
    let v2 = deployment("acme/echo", 2, 2_000);
    assert!(s.put_deployment(&v2, Some(1)).await.unwrap());
    let got = s.get_deployment("acme/echo").await.unwrap().unwrap();
    assert_eq!(got, DeploymentRecord { created_at: 1_000, ..v2.clone() });
    // Without an expected version, a put always applies.
    let other = deployment("acme/another", 7, 3_000);
    assert!(s.put_deployment(&other, None).await.unwrap());
    let ids: Vec<String> = s.list_deployments().await.unwrap().into_iter().map(|d| d.app_id).collect();
    assert_eq!(ids, vec!["acme/another", "acme/echo"], "listed by app id");
    assert!(s.delete_deployment("acme/echo").await.unwrap());
    assert!(!s.delete_deployment("acme/echo").await.unwrap(), "already gone");
    assert_eq!(s.get_deployment("acme/echo").await.unwrap(), None);
    assert_eq!(s.list_deployments().await.unwrap(), vec![other]);
    // Deployed again after removal: a first deploy again.
    assert!(s.put_deployment(&deployment("acme/echo", 1, 4_000), Some(0)).await.unwrap());

    assert!(s.list_secrets().await.unwrap().is_empty());
    let sealed: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    let tok = SecretRecord { name: "HF_TOKEN".into(), sealed: sealed.clone(), updated_at: 1_000 };
    s.set_secret(&tok).await.unwrap();
    s.set_secret(&SecretRecord { name: "API_KEY".into(), sealed: vec![1, 2, 3], updated_at: 1_100 }).await.unwrap();
    let list = s.list_secrets().await.unwrap();
    assert_eq!(list.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), vec!["API_KEY", "HF_TOKEN"], "by name");
    assert_eq!(list[1], tok, "bytes kept exactly");
    // Setting again replaces the value.
    let tok2 = SecretRecord { name: "HF_TOKEN".into(), sealed: vec![9; 40], updated_at: 2_000 };
    s.set_secret(&tok2).await.unwrap();
    let list = s.list_secrets().await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1], tok2);
    assert!(s.delete_secret("HF_TOKEN").await.unwrap());
    assert!(!s.delete_secret("HF_TOKEN").await.unwrap(), "already gone");
    assert!(!s.delete_secret("NEVER_SET").await.unwrap());
    let names: Vec<String> = s.list_secrets().await.unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, vec!["API_KEY"]);
}

/// Generates one `#[tokio::test]` per conformance check, given an async expression producing an
/// `Arc<dyn Store>` that is fresh and empty each time.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            fifo_within_priority_and_positions, claim_and_complete_with_fencing, retries_until_the_attempt_limit,
            a_requeued_job_keeps_its_place, cancel_queued_running_and_completed, leases_extend_and_expire,
            start_deadlines_expire_queued_jobs, logs_belong_to_the_current_attempt,
            a_new_boot_revokes_tokens_and_ends_old_leases, keys_insert_list_revoke, listing_and_depths,
            the_webhook_outbox_is_written_with_the_completion, webhook_deliveries_are_leased_retried_and_dead_lettered,
            a_new_boot_releases_webhook_leases, signing_keys_rotate, idempotency_keys_return_the_first_request,
            payloads_are_deleted_on_request_and_by_retention, dead_gateways_are_reaped_and_live_ones_kept,
            settings_keep_their_first_value, files_are_recorded_listed_finished_and_expired,
            scaling_overrides_and_cold_starts_are_kept, batched_claims_and_claim_at_submit,
            usage_lines_are_written_with_the_completion, deployments_and_secrets_are_kept);
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_claims_are_exclusive() {
            let s: std::sync::Arc<dyn $crate::Store> = $make.await;
            $crate::conformance::concurrent_claims_are_exclusive(s).await;
        }
    };
    (@each $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let s: std::sync::Arc<dyn $crate::Store> = $make.await;
                $crate::conformance::$name(&*s).await;
            }
        )*
    };
}
