//! The SQLite store's single writer, with group commit.
//!
//! One task owns the write connection. Every write is an operation sent to it; the task takes everything queued
//! when it wakes, runs the operations in one transaction (each in its own savepoint, so one that fails rolls back
//! alone), commits once, updates the in-memory [`Index`], and only then answers each caller. There is no timer:
//! a lone write commits at once, and writes that arrive while a commit's fsync is in progress share the next one.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::index::Index;
use crate::{StoreError, StoreResult};

/// Runs after the batch's commit (with whether it committed), with the index to update.
type Finish = Box<dyn FnOnce(bool, &mut Index) + Send>;
/// An operation: its statements, then whether they succeeded and what to do once the batch is committed.
type Op = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, (bool, Finish)> + Send>;

/// Reads the active jobs for a rebuild of the index.
pub(crate) type Loader = for<'c> fn(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<Index>>;

enum Msg {
    Op(Op),
    Close(oneshot::Sender<()>),
}

/// The most operations one transaction takes.
const MAX_BATCH: usize = 512;
/// How often the index is checked against the database.
const REBUILD_EVERY: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::UnboundedSender<Msg>,
    pub(crate) index: Arc<RwLock<Index>>,
}

fn closed() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}

impl Writer {
    pub(crate) async fn start(mut conn: SqliteConnection, load: Loader) -> StoreResult<Writer> {
        let index = Arc::new(RwLock::new(load(&mut conn).await?));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, rx, index.clone(), load));
        Ok(Writer { tx, index })
    }

    /// Runs `f` in the next group commit; `on_commit` updates the index once it is durable.
    pub(crate) async fn write<T, F, C>(&self, f: F, on_commit: C) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>> + Send + 'static,
        C: FnOnce(&mut T, &mut Index) + Send + 'static,
    {
        let (done, rx) = oneshot::channel::<StoreResult<T>>();
        let op: Op = Box::new(move |c| {
            Box::pin(async move {
                let res = match AssertUnwindSafe(f(c)).catch_unwind().await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Corrupt("a store operation panicked".into())),
                };
                let ok = res.is_ok();
                let finish: Finish = Box::new(move |committed, ix| {
                    let out = match res {
                        Ok(mut v) if committed => {
                            on_commit(&mut v, ix);
                            Ok(v)
                        }
                        Ok(_) => Err(StoreError::Database(sqlx::Error::Protocol("the commit failed".into()))),
                        Err(e) => Err(e),
                    };
                    let _ = done.send(out);
                });
                (ok, finish)
            })
        });
        self.tx.send(Msg::Op(op)).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Stops the writer after what is queued, closing the connection (which checkpoints the WAL).
    pub(crate) async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn exec(c: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sql).execute(c).await.map(|_| ())
}

async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    index: Arc<RwLock<Index>>,
    load: Loader,
) {
    let mut next_check = tokio::time::Instant::now() + REBUILD_EVERY;
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = tokio::time::sleep_until(next_check) => {
                next_check = tokio::time::Instant::now() + REBUILD_EVERY;
                check_index(&mut conn, &index, load).await;
                continue;
            }
        };
        let mut batch = Vec::new();
        let mut closing = None;
        match first {
            None => break,
            Some(Msg::Close(t)) => closing = Some(t),
            Some(Msg::Op(op)) => batch.push(op),
        }
        while closing.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Op(op)) => batch.push(op),
                Ok(Msg::Close(t)) => closing = Some(t),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            run_batch(&mut conn, batch, &index).await;
        }
        if let Some(t) = closing {
            let _ = conn.close().await;
            let _ = t.send(());
            return;
        }
    }
    let _ = conn.close().await;
}

async fn run_batch(conn: &mut SqliteConnection, batch: Vec<Op>, index: &RwLock<Index>) {
    tracing::trace!(ops = batch.len(), "store: group commit");
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE").await {
        tracing::error!(error = %e, "store: BEGIN failed");
        // Dropping the operations answers their callers with an error.
        return;
    }
    let mut finishes = Vec::with_capacity(batch.len());
    let single = batch.len() == 1;
    let mut broken = false;
    for op in batch {
        if broken {
            // The transaction is unusable: the rest fail without running.
            continue;
        }
        if !single && exec(conn, "SAVEPOINT op").await.is_err() {
            broken = true;
            continue;
        }
        let (ok, finish) = op(conn).await;
        finishes.push(finish);
        if single {
            if !ok {
                // Nothing of a failed lone operation is kept.
                let _ = exec(conn, "ROLLBACK").await;
                let mut ix = index.write().unwrap();
                for f in finishes {
                    f(false, &mut ix);
                }
                return;
            }
        } else {
            if !ok && exec(conn, "ROLLBACK TO op").await.is_err() {
                broken = true;
            }
            if exec(conn, "RELEASE op").await.is_err() {
                broken = true;
            }
        }
    }
    let committed = !broken && exec(conn, "COMMIT").await.is_ok();
    if !committed {
        tracing::error!("store: a group commit failed; its writes were rolled back");
        let _ = exec(conn, "ROLLBACK").await;
    }
    let mut ix = index.write().unwrap();
    for f in finishes {
        f(committed, &mut ix);
    }
}

/// Rebuilds the index from the database; a difference means a transition was missed, which is logged.
async fn check_index(conn: &mut SqliteConnection, index: &RwLock<Index>, load: Loader) {
    match load(conn).await {
        Ok(fresh) => {
            let mut ix = index.write().unwrap();
            if !ix.same_as(&fresh) {
                tracing::warn!(
                    indexed = ix.len(),
                    stored = fresh.len(),
                    "store: the active-job index was out of date; rebuilt"
                );
            }
            *ix = fresh;
        }
        Err(e) => tracing::warn!(error = %e, "store: checking the active-job index failed"),
    }
}
