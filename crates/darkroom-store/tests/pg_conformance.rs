//! The store conformance suite on PostgreSQL (a fresh schema per test on `DARKROOM_TEST_DATABASE_URL`), and what
//! only a shared store has: notifications between gateways and the leader lock.

use std::sync::Arc;
use std::time::Duration;

use darkroom_store::conformance::job;
use darkroom_store::{CancelResult, PgStore, Store, StoreEvent, conformance_tests, testing};

async fn fresh() -> Arc<dyn Store> {
    Arc::new(PgStore::connect(&testing::pg_url().await).await.unwrap())
}

conformance_tests!(fresh());

/// The next event, past the late ones of the warm-up.
async fn next_event(rx: &mut tokio::sync::broadcast::Receiver<StoreEvent>) -> StoreEvent {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("no event in time").unwrap();
        if e != (StoreEvent::Queued { app_id: "warm".into() }) {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_gateways_hear_of_queued_claimed_finished_and_cancelled_jobs() {
    let url = testing::pg_url().await;
    let a = PgStore::connect(&url).await.unwrap();
    let b = PgStore::connect(&url).await.unwrap();
    let mut rx = b.subscribe().unwrap();
    let mut own = a.subscribe().unwrap();
    // LISTEN is asynchronous to connect: wait until b hears a.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        a.enqueue(&job(&format!("warm{n}"), "warm")).await.unwrap();
        n += 1;
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "listener never started");
    }
    while rx.try_recv().is_ok() {}
    a.enqueue(&job("j", "app")).await.unwrap();
    assert_eq!(next_event(&mut rx).await, StoreEvent::Queued { app_id: "app".into() });
    a.claim("j", "r1", 60_000, 1).await.unwrap().unwrap();
    assert_eq!(next_event(&mut rx).await, StoreEvent::Changed { job_id: "j".into() });
    assert!(matches!(a.cancel("j", 2).await.unwrap(), CancelResult::Cancelled { running_on: Some(_) }));
    assert_eq!(
        next_event(&mut rx).await,
        StoreEvent::Cancelled { job_id: "j".into(), runner_id: "r1".into(), token: 1 }
    );
    assert_eq!(next_event(&mut rx).await, StoreEvent::Finished { job_id: "j".into() });
    // A lease that runs out on one gateway is heard by the one holding the runner.
    a.enqueue(&job("k", "app")).await.unwrap();
    a.claim("k", "r1", 10, 1).await.unwrap().unwrap();
    b.expire_leases(100).await.unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(&StoreEvent::AttemptEnded { job_id: "k".into(), token: 1 }) {
        assert!(std::time::Instant::now() < deadline, "{seen:?}");
        if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(500), own.recv()).await {
            seen.push(e);
        }
    }
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_successor_when_it_dies() {
    let url = testing::pg_url().await;
    let a = PgStore::connect(&url).await.unwrap();
    let b = PgStore::connect(&url).await.unwrap();
    assert!(a.try_lead().await.unwrap());
    assert!(a.try_lead().await.unwrap(), "the leader keeps leading");
    assert!(!b.try_lead().await.unwrap());
    assert!(!b.try_lead().await.unwrap());
    a.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !b.try_lead().await.unwrap() {
        assert!(std::time::Instant::now() < deadline, "no successor");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_across_stores_are_exclusive() {
    let url = testing::pg_url().await;
    let stores: Vec<Arc<dyn Store>> = vec![
        Arc::new(PgStore::connect(&url).await.unwrap()),
        Arc::new(PgStore::connect(&url).await.unwrap()),
        Arc::new(PgStore::connect(&url).await.unwrap()),
    ];
    for i in 0..90 {
        stores[i % 3].enqueue(&job(&format!("j{i:03}"), "app")).await.unwrap();
    }
    let mut tasks = Vec::new();
    for (w, s) in stores.iter().cycle().take(9).enumerate() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some((id, _)) = s.next_queued("app", 1).await.unwrap().into_iter().next() {
                if let Some(j) = s.claim(&id, &format!("w{w}"), 60_000, 1).await.unwrap() {
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
    let n = all.len();
    all.dedup();
    assert_eq!((n, all.len()), (90, 90), "every job claimed exactly once");
}
