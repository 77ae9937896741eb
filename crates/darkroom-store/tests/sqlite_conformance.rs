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
