//! The SQLite store's single writer, with group commit.
//!
//! One task owns the write connection. Every write is an operation sent to it; the task takes everything queued
//! when it wakes, runs the operations in one transaction (each in its own savepoint, so one that fails rolls back
//! alone), commits once, updates the in-memory [`Index`], and only then answers each caller. There is no timer:
//! a lone write commits at once, and writes that arrive while a commit's fsync is in progress share the next one.
//!
//! The hot writes (submit, claim, completion) are synchronous operations on the connection's own SQLite handle,
//! borrowed from sqlx's worker for a run of them ([`SqliteConnection::lock_handle`]) and driven through rusqlite
//! with cached statements. An asynchronous (sqlx) operation costs two thread hops per statement (to sqlx's worker
//! thread and back), savepoints included; a run of synchronous ones costs one hop in all. The commit itself stays on
//! sqlx's worker thread, so its fsync never blocks the async runtime.

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

/// A synchronous operation on the write connection's SQLite handle, run on the writer's task (no await inside).
type SyncOp = Box<dyn FnOnce(&rusqlite::Connection) -> (bool, Finish) + Send>;

enum Work {
    Async(Op),
    Sync(SyncOp),
}

/// Reads the active jobs for a rebuild of the index.
pub(crate) type Loader = for<'c> fn(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<Index>>;

enum Msg {
    Op(Work),
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
        let raw = conn.lock_handle().await?.as_raw_handle();
        // SAFETY: the handle lives as long as `conn`, which the writer task owns and closes only after dropping
        // this connection (which does not close the handle); the handle is used only while `lock_handle` holds
        // sqlx's worker off it.
        let direct = unsafe { rusqlite::Connection::from_handle(raw.as_ptr()) }?;
        direct.set_prepared_statement_cache_capacity(64);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, direct, rx, index.clone(), load));
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
                let res = AssertUnwindSafe(f(c)).catch_unwind().await;
                answer(res, done, on_commit)
            })
        });
        self.tx.send(Msg::Op(Work::Async(op))).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// [`Writer::write`] for a synchronous operation on the SQLite handle (see the module's notes). `f` must not
    /// block on anything but SQLite: it runs on the writer's task.
    pub(crate) async fn write_sync<T, F, C>(&self, f: F, on_commit: C) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> StoreResult<T> + Send + 'static,
        C: FnOnce(&mut T, &mut Index) + Send + 'static,
    {
        let (done, rx) = oneshot::channel::<StoreResult<T>>();
        let op: SyncOp = Box::new(move |c| {
            let res = std::panic::catch_unwind(AssertUnwindSafe(|| f(c)));
            answer(res, done, on_commit)
        });
        self.tx.send(Msg::Op(Work::Sync(op))).map_err(|_| closed())?;
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

/// Whether an operation succeeded (a panic is a failure), and what answers its caller once the batch has
/// committed (or not).
fn answer<T: Send + 'static, C: FnOnce(&mut T, &mut Index) + Send + 'static>(
    res: std::thread::Result<StoreResult<T>>,
    done: oneshot::Sender<StoreResult<T>>,
    on_commit: C,
) -> (bool, Finish) {
    let res = res.unwrap_or_else(|_| Err(StoreError::Corrupt("a store operation panicked".into())));
    let ok = res.is_ok();
    (
        ok,
        Box::new(move |committed, ix| {
            let _ = done.send(settle(res, committed, ix, on_commit));
        }),
    )
}

/// An operation's answer once its batch has committed (or not).
fn settle<T, C: FnOnce(&mut T, &mut Index)>(
    res: StoreResult<T>,
    committed: bool,
    ix: &mut Index,
    on_commit: C,
) -> StoreResult<T> {
    match res {
        Ok(mut v) if committed => {
            on_commit(&mut v, ix);
            Ok(v)
        }
        Ok(_) => Err(StoreError::Database(sqlx::Error::Protocol("the commit failed".into()))),
        Err(e) => Err(e),
    }
}

async fn exec(c: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sql).execute(c).await.map(|_| ())
}

async fn run(
    mut conn: SqliteConnection,
    mut direct: rusqlite::Connection,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    index: Arc<RwLock<Index>>,
    load: Loader,
) {
    let mut next_check = tokio::time::Instant::now() + REBUILD_EVERY;
    let mut closing = None;
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
            run_batch(&mut conn, &mut direct, batch, &index).await;
        }
        if closing.is_some() {
            break;
        }
    }
    // The direct connection's cached statements are finalised while sqlx's worker is held off the handle, and
    // before sqlx closes it.
    if let Ok(_held) = conn.lock_handle().await {
        direct.flush_prepared_statement_cache();
        drop(direct);
    }
    let _ = conn.close().await;
    if let Some(t) = closing {
        let _ = t.send(());
    }
}

/// Where a batch's transaction stands.
struct Batch {
    /// Only one operation: a failure rolls the whole transaction back, with no savepoint.
    single: bool,
    began: bool,
    /// The transaction is unusable: the rest fail without running.
    broken: bool,
    /// A lone operation failed and was rolled back.
    rolled_back: bool,
    finishes: Vec<Finish>,
}

/// The connection a step's statements go through: sqlx's worker, or the handle held off it.
enum Target<'a> {
    Sqlx(&'a mut SqliteConnection),
    Direct(&'a mut rusqlite::Connection),
}

impl Target<'_> {
    async fn exec(&mut self, sql: &'static str) -> bool {
        match self {
            Target::Sqlx(c) => exec(c, sql).await.is_ok(),
            Target::Direct(d) => d.prepare_cached(sql).and_then(|mut st| st.execute([])).is_ok(),
        }
    }

    async fn run(&mut self, work: Work) -> (bool, Finish) {
        match (work, self) {
            (Work::Async(op), Target::Sqlx(c)) => op(c).await,
            (Work::Sync(op), Target::Direct(d)) => op(d),
            _ => unreachable!("an operation runs on its own kind of connection"),
        }
    }
}

impl Batch {
    /// Runs one operation's statements, in a savepoint unless it is the batch's only operation.
    async fn step(&mut self, t: &mut Target<'_>, work: Work) {
        if self.broken || self.rolled_back {
            // Dropping the operation answers its caller with an error.
            return;
        }
        if !self.began {
            if !t.exec("BEGIN IMMEDIATE").await {
                tracing::error!("store: BEGIN failed");
                self.broken = true;
                return;
            }
            self.began = true;
        }
        if !self.single && !t.exec("SAVEPOINT op").await {
            self.broken = true;
            return;
        }
        let (ok, finish) = t.run(work).await;
        self.finishes.push(finish);
        if self.single {
            if !ok {
                // Nothing of a failed lone operation is kept.
                let _ = t.exec("ROLLBACK").await;
                self.rolled_back = true;
            }
        } else {
            if !ok && !t.exec("ROLLBACK TO op").await {
                self.broken = true;
            }
            if !t.exec("RELEASE op").await {
                self.broken = true;
            }
        }
    }
}

async fn run_batch(
    conn: &mut SqliteConnection,
    direct: &mut rusqlite::Connection,
    batch: Vec<Work>,
    index: &RwLock<Index>,
) {
    tracing::trace!(ops = batch.len(), "store: group commit");
    let mut b =
        Batch { single: batch.len() == 1, began: false, broken: false, rolled_back: false, finishes: Vec::new() };
    let mut ops = batch.into_iter().peekable();
    while let Some(work) = ops.next() {
        if let Work::Async(_) = work {
            b.step(&mut Target::Sqlx(conn), work).await;
            continue;
        }
        // This and the synchronous operations right after it run under one hold of the handle.
        let Ok(_held) = conn.lock_handle().await else {
            b.broken = true;
            continue;
        };
        let mut t = Target::Direct(direct);
        b.step(&mut t, work).await;
        while matches!(ops.peek(), Some(Work::Sync(_))) {
            let next = ops.next().expect("peeked");
            b.step(&mut t, next).await;
        }
    }
    let committed = if b.rolled_back || !b.began {
        false
    } else {
        let ok = !b.broken && exec(conn, "COMMIT").await.is_ok();
        if !ok {
            tracing::error!("store: a group commit failed; its writes were rolled back");
            let _ = exec(conn, "ROLLBACK").await;
        }
        ok
    };
    let mut ix = index.write().unwrap();
    for f in b.finishes {
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
