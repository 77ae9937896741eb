//! The store conformance suite on SQLite (a fresh database file per test).

use std::sync::Arc;

use darkroom_store::sqlite::{Durability, SqliteStore};
use darkroom_store::{Store, conformance_tests};

async fn fresh() -> Arc<dyn Store> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    // The directory must outlive the store; leak it for the test's lifetime.
    std::mem::forget(dir);
    Arc::new(SqliteStore::open(&path, Durability::Full).await.unwrap())
}

conformance_tests!(fresh());

#[tokio::test]
async fn reopening_keeps_committed_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let s = SqliteStore::open(&path, Durability::Full).await.unwrap();
        s.enqueue(&darkroom_store::conformance::job("kept", "app")).await.unwrap();
        s.close().await;
    }
    let s = SqliteStore::open(&path, Durability::Full).await.unwrap();
    assert!(s.get_job("kept").await.unwrap().is_some());
}

/// Group commit: many concurrent writes share commits, one that fails (a duplicate id) fails alone, and the
/// in-memory index agrees with the database afterwards (and after a reopen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_isolates_failures_and_keeps_the_index() {
    use darkroom_store::conformance::job;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let s = Arc::new(SqliteStore::open(&path, Durability::Full).await.unwrap());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        // Every tenth write reuses an id that another write also uses: exactly one of each pair lands.
        let id = if i % 10 == 9 { format!("j{:03}", i - 1) } else { format!("j{i:03}") };
        tasks.push(tokio::spawn(async move { s.enqueue(&job(&id, "app")).await.is_ok() }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap() as i64;
    }
    assert_eq!(ok, 180);
    assert_eq!(s.count_queued("app").await.unwrap(), 180);
    let all = s.list_jobs(&darkroom_store::JobFilter { limit: 1000, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 180);
    // Positions are a permutation of 0..180 in submit order.
    let mut by_seq = all.clone();
    by_seq.sort_by_key(|j| j.seq);
    for (i, j) in by_seq.iter().enumerate() {
        assert_eq!(s.queue_position(&j.id).await.unwrap(), Some(i as i64));
    }
    // Claim half in one batch, finish some, then reopen: the index rebuilt from disk says the same.
    let next = s.next_queued("app", 90).await.unwrap();
    let claims: Vec<(String, String)> = next.into_iter().map(|(id, _)| (id, "r".to_string())).collect();
    let got = s.claim_many(&claims, 50_000, 2_000).await.unwrap();
    assert!(got.iter().all(Option::is_some));
    for j in got.iter().flatten().take(30) {
        s.complete(&j.id, j.attempts, &darkroom_core::job::Outcome::success("{}".into(), None), 3_000).await.unwrap();
    }
    let depths = s.app_depths().await.unwrap();
    assert_eq!((depths[0].queued, depths[0].running), (90, 60));
    let first_queued = s.next_queued("app", 1).await.unwrap().remove(0).0;
    s.close().await;
    let s = SqliteStore::open(&path, Durability::Full).await.unwrap();
    assert_eq!(s.app_depths().await.unwrap(), depths);
    assert_eq!(s.queue_position(&first_queued).await.unwrap(), Some(0));
}

/// Batches that mix the writer's direct (rusqlite) operations with sqlx ones: a failure of either kind rolls back
/// alone, whatever ran before or after it in the same transaction, on either connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batches_isolate_failures_on_both_paths() {
    use darkroom_store::conformance::job;
    use darkroom_store::{KeyRecord, StoreError};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let s = Arc::new(SqliteStore::open(&path, Durability::Full).await.unwrap());
    let key = |id: String| KeyRecord {
        key_id: id,
        owner_id: "o".into(),
        secret_hash: "h".into(),
        scope: "client".into(),
        name: "n".into(),
        created_at: 1,
        revoked_at: None,
        webhook_dialect: None,
    };
    let mut tasks = Vec::new();
    for i in 0..300usize {
        let s = s.clone();
        // Jobs (direct) and keys (sqlx) interleaved; every seventh of each reuses the previous one's id.
        let n = if i % 14 >= 12 { i - 2 } else { i };
        tasks.push(tokio::spawn(async move {
            let r = if i % 2 == 0 {
                s.enqueue(&job(&format!("j{n}"), "app")).await.map(|_| ())
            } else {
                s.insert_key(&key(format!("k{n}"))).await
            };
            match r {
                Ok(()) => (i % 2, 1),
                Err(StoreError::Duplicate(_)) => (i % 2, 0),
                Err(e) => panic!("{e}"),
            }
        }));
    }
    let mut landed = [0, 0];
    for t in tasks {
        let (kind, ok) = t.await.unwrap();
        landed[kind] += ok;
    }
    let dups = (0..300usize).filter(|i| i % 14 >= 12).count() / 2;
    assert_eq!(landed, [150 - dups, 150 - dups]);
    assert_eq!(s.count_queued("app").await.unwrap(), (150 - dups) as i64);
    assert_eq!(s.list_keys(None).await.unwrap().len(), 150 - dups);
    s.close().await;
    // Everything answered as landed is on disk.
    let s = SqliteStore::open(&path, Durability::Full).await.unwrap();
    assert_eq!(s.count_queued("app").await.unwrap(), (150 - dups) as i64);
    assert_eq!(s.list_keys(None).await.unwrap().len(), 150 - dups);
}
