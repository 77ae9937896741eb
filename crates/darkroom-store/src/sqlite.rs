//! SQLite: WAL, `synchronous=FULL`, one writer connection (every write transaction `BEGIN IMMEDIATE`), and a
//! small pool of readers. See reference/infra.md §1.4.

use std::time::Duration;

use async_trait::async_trait;
use darkroom_core::Millis;
use darkroom_core::error::{ApiError, ErrorType};
use darkroom_core::job::{JobRecord, LogEntry, NewJob, Outcome};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, SqliteConnection, SqlitePool};

use crate::index::{Index, JobBrief};
use crate::usage::{Budget, UsageBucket, UsageFilter, UsageGroup, UsageLine};
use crate::writer::Writer;
use crate::*;

/// Reads every active job, for the writer's index.
fn load_index(c: &mut SqliteConnection) -> futures::future::BoxFuture<'_, StoreResult<Index>> {
    Box::pin(async move {
        let rows =
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE state != 'completed'")))
                .fetch_all(&mut *c)
                .await?;
        let briefs = rows.iter().map(|r| job_from_row(r).map(|j| JobBrief::of(&j))).collect::<StoreResult<Vec<_>>>()?;
        Ok(Index::from_records(briefs))
    })
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Durability profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced (the default).
    #[default]
    Full,
    /// `synchronous=NORMAL`: survives a process crash, may lose the last commits on power loss.
    Normal,
}

pub struct SqliteStore {
    /// The one write connection, behind its group-commit task, with the active-job index it keeps.
    writer: Writer,
    reader: SqlitePool,
    /// The boot claims are recorded under.
    boot: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

const JOB_COLUMNS: &str = "seq, id, app_id, path, owner_id, key_id, mode, priority, state, input, attempts, \
    max_attempts, no_retry, lease_runner, lease_expires_at, start_deadline, runner_hint, cancel_requested, \
    webhook_url, webhook_dialect, traceparent, store_io, boot_id, created_at, started_at, completed_at, result_status, result_body, error, \
    error_type, inference_ms, payload_deleted_at, cold_start_ms";

fn job_from_row(r: &SqliteRow) -> StoreResult<JobRecord> {
    job_from_row!(r)
}

fn key_from_row(r: &SqliteRow) -> StoreResult<KeyRecord> {
    key_from_row!(r)
}

async fn write_outcome(c: &mut SqliteConnection, job_id: &str, o: &Outcome, now: Millis) -> StoreResult<()> {
    sqlx::query(
        "UPDATE jobs SET state = 'completed', completed_at = ?, result_status = ?, result_body = ?, error = ?, \
         error_type = ?, inference_ms = ?, lease_runner = NULL, lease_expires_at = NULL WHERE id = ?",
    )
    .bind(now)
    .bind(o.status as i64)
    .bind(&o.body)
    .bind(&o.error)
    .bind(&o.error_type)
    .bind(o.inference_ms)
    .bind(job_id)
    .execute(&mut *c)
    .await?;
    enqueue_webhook_in(&mut *c, job_id, o, now).await?;
    record_usage_in(c, job_id, o, now).await
}

/// The usage line, in the same transaction as the completion (none for a 5xx).
async fn record_usage_in(c: &mut SqliteConnection, job_id: &str, o: &Outcome, now: Millis) -> StoreResult<()> {
    let row =
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {} FROM jobs WHERE id = ?", crate::usage::BILLING_COLUMNS)))
            .bind(job_id)
            .fetch_optional(&mut *c)
            .await?;
    let Some(row) = row else { return Ok(()) };
    let b = crate::usage::billing_row!(&row);
    if let Some(line) = crate::usage::line_for(job_id, b, o, now) {
        crate::usage::insert_line!(
            sqlx::AssertSqlSafe(format!(
                "INSERT INTO usage_lines ({}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                crate::usage::LINE_COLUMNS
            )),
            &line,
            &mut *c
        );
    }
    Ok(())
}

/// The outbox: in the same transaction as the completion, a delivery row for a request that asked for a webhook.
async fn enqueue_webhook_in(c: &mut SqliteConnection, job_id: &str, o: &Outcome, now: Millis) -> StoreResult<()> {
    let row = sqlx::query("SELECT webhook_url, webhook_dialect, traceparent, owner_id FROM jobs WHERE id = ?")
        .bind(job_id)
        .fetch_optional(&mut *c)
        .await?;
    let Some(row) = row else { return Ok(()) };
    let Some(url) = row.try_get::<Option<String>, _>("webhook_url")? else { return Ok(()) };
    let dialect: Option<String> = row.try_get("webhook_dialect")?;
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, job_id, owner_id, url, body, dialect, state, next_attempt_at, traceparent, \
         created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
    )
    .bind(darkroom_core::ids::new_request_id())
    .bind(job_id)
    .bind(row.try_get::<String, _>("owner_id")?)
    .bind(url)
    .bind(darkroom_core::webhook::payload(job_id, o))
    .bind(dialect.unwrap_or_default())
    .bind(now)
    .bind(row.try_get::<Option<String>, _>("traceparent")?)
    .bind(now)
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// A statement of the writer's direct path, built once, with the names of the columns it returns.
struct DirectSql {
    sql: String,
    columns: Vec<&'static str>,
}

impl DirectSql {
    fn new(sql: String, columns: &'static str) -> DirectSql {
        DirectSql { sql, columns: columns.split(',').map(str::trim).filter(|c| !c.is_empty()).collect() }
    }

    fn row<'a, 'b>(&'a self, row: &'a rusqlite::Row<'b>) -> Direct<'a, 'b> {
        Direct { row, columns: &self.columns }
    }

    fn job(&self, row: &rusqlite::Row<'_>) -> StoreResult<JobRecord> {
        job_from_row!(&self.row(row))
    }
}

/// A rusqlite row read through the same `try_get(name)` as sqlx's, so that the row macros decode both; a name is
/// found in the statement's own column list (rusqlite's lookup asks SQLite for every column's name).
struct Direct<'a, 'b> {
    row: &'a rusqlite::Row<'b>,
    columns: &'a [&'static str],
}

impl Direct<'_, '_> {
    fn try_get<T: rusqlite::types::FromSql>(&self, name: &str) -> rusqlite::Result<T> {
        match self.columns.iter().position(|c| *c == name) {
            Some(i) => self.row.get(i),
            None => self.row.get(name),
        }
    }
}

static INSERT_JOB: std::sync::LazyLock<DirectSql> = std::sync::LazyLock::new(|| {
    DirectSql::new(
        format!(
            "INSERT INTO jobs (id, app_id, path, owner_id, key_id, mode, priority, state, input, max_attempts, \
             no_retry, start_deadline, runner_hint, webhook_url, webhook_dialect, traceparent, store_io, boot_id, \
             created_at, bill_unit, unit_price, runner_second_price) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {JOB_COLUMNS}"
        ),
        JOB_COLUMNS,
    )
});

static CLAIM_JOB: std::sync::LazyLock<DirectSql> = std::sync::LazyLock::new(|| {
    DirectSql::new(
        format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_runner = ?, lease_expires_at = ?, \
             started_at = ?, start_deadline = NULL, lease_boot = ? WHERE id = ? AND state = 'queued' \
             RETURNING {JOB_COLUMNS}"
        ),
        JOB_COLUMNS,
    )
});

const COMPLETION_COLUMNS: &str = "webhook_url, webhook_dialect, traceparent, owner_id, key_id, app_id, path, \
    started_at, cold_start_ms, bill_unit, unit_price, runner_second_price";

static COMPLETION_ROW: std::sync::LazyLock<DirectSql> = std::sync::LazyLock::new(|| {
    DirectSql::new(format!("SELECT {COMPLETION_COLUMNS} FROM jobs WHERE id = ?"), COMPLETION_COLUMNS)
});

static INSERT_USAGE_LINE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO usage_lines ({}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        crate::usage::LINE_COLUMNS
    )
});

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation
        && matches!(f.extended_code, rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY | rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE))
}

/// [`insert_job_in`] on the writer's direct handle.
fn insert_job_direct(c: &rusqlite::Connection, j: &NewJob) -> StoreResult<JobRecord> {
    let q = &*INSERT_JOB;
    let mut st = c.prepare_cached(&q.sql)?;
    let res = st.query_row(
        rusqlite::params![
            j.id,
            j.app_id,
            j.path,
            j.owner_id,
            j.key_id,
            j.mode.as_str(),
            j.priority,
            j.input,
            j.max_attempts,
            j.no_retry,
            j.start_deadline,
            j.runner_hint,
            j.webhook_url,
            j.webhook_dialect,
            j.traceparent,
            j.store_io,
            j.boot_id,
            j.created_at,
            j.prices.unit.as_str(),
            j.prices.unit_price,
            j.prices.runner_second_price,
        ],
        |r| Ok(q.job(r)),
    );
    match res {
        Err(e) if is_unique_violation(&e) => Err(StoreError::Duplicate(j.id.clone())),
        r => r?,
    }
}

/// Starts a queued job's next attempt on `runner_id`; None if it is not queued.
fn claim_direct(
    c: &rusqlite::Connection,
    job_id: &str,
    runner_id: &str,
    lease_until: Millis,
    now: Millis,
    boot: Option<&str>,
) -> StoreResult<Option<JobRecord>> {
    let q = &*CLAIM_JOB;
    let mut st = c.prepare_cached(&q.sql)?;
    let mut rows = st.query(rusqlite::params![runner_id, lease_until, now, boot, job_id])?;
    match rows.next()? {
        Some(r) => Ok(Some(q.job(r)?)),
        None => Ok(None),
    }
}

/// [`enqueue_webhook_in`] and [`record_usage_in`] on the writer's direct handle: a completion's outbox row and
/// usage line, in its transaction.
fn after_completion_direct(c: &rusqlite::Connection, job_id: &str, o: &Outcome, now: Millis) -> StoreResult<()> {
    let q = &*COMPLETION_ROW;
    let mut st = c.prepare_cached(&q.sql)?;
    let mut rows = st.query([job_id])?;
    let Some(row) = rows.next()? else { return Ok(()) };
    let r = q.row(row);
    let url: Option<String> = r.try_get("webhook_url")?;
    let dialect: Option<String> = r.try_get("webhook_dialect")?;
    let traceparent: Option<String> = r.try_get("traceparent")?;
    let b = crate::usage::billing_row!(&r);
    drop(rows);
    if let Some(url) = url {
        c.prepare_cached(
            "INSERT INTO webhook_deliveries (id, job_id, owner_id, url, body, dialect, state, next_attempt_at, \
             traceparent, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
        )?
        .execute(rusqlite::params![
            darkroom_core::ids::new_request_id(),
            job_id,
            b.owner_id,
            url,
            darkroom_core::webhook::payload(job_id, o),
            dialect.unwrap_or_default(),
            now,
            traceparent,
            now,
        ])?;
    }
    if let Some(l) = crate::usage::line_for(job_id, b, o, now) {
        c.prepare_cached(&INSERT_USAGE_LINE)?.execute(rusqlite::params![
            l.id,
            l.job_id,
            l.owner_id,
            l.key_id,
            l.app_id,
            l.path,
            l.status,
            l.unit,
            l.units,
            l.unit_price,
            l.runner_second_price,
            l.runner_ms,
            l.cold_start_ms,
            l.cost_nanos,
            l.created_at,
        ])?;
    }
    Ok(())
}

fn delivery_from_row(r: &SqliteRow) -> StoreResult<WebhookDelivery> {
    delivery_from_row!(r)
}

/// Ends the running attempt `token` of a job inside a transaction: requeue or complete.
async fn fail_attempt_in(
    c: &mut SqliteConnection,
    job_id: &str,
    token: i64,
    outcome: &Outcome,
    now: Millis,
) -> StoreResult<AttemptResult> {
    let row = sqlx::query("SELECT attempts, max_attempts, no_retry, cancel_requested, state FROM jobs WHERE id = ?")
        .bind(job_id)
        .fetch_optional(&mut *c)
        .await?;
    let Some(row) = row else { return Ok(AttemptResult::Stale) };
    let attempts: i64 = row.try_get("attempts")?;
    let state: String = row.try_get("state")?;
    if state != "running" || attempts != token {
        return Ok(AttemptResult::Stale);
    }
    let max: i64 = row.try_get("max_attempts")?;
    let no_retry: bool = row.try_get("no_retry")?;
    let cancel: bool = row.try_get("cancel_requested")?;
    if cancel {
        write_outcome(c, job_id, &Outcome::cancelled(), now).await?;
        return Ok(AttemptResult::Completed);
    }
    if !no_retry && attempts < max {
        sqlx::query(
            "UPDATE jobs SET state = 'queued', lease_runner = NULL, lease_expires_at = NULL, started_at = NULL \
             WHERE id = ?",
        )
        .bind(job_id)
        .execute(&mut *c)
        .await?;
        Ok(AttemptResult::Requeued)
    } else {
        write_outcome(c, job_id, outcome, now).await?;
        Ok(AttemptResult::Completed)
    }
}

/// Ends the current attempt of each (id, attempts) row as "runner lost".
async fn fail_rows_in(
    c: &mut SqliteConnection,
    rows: Vec<SqliteRow>,
    now: Millis,
) -> StoreResult<Vec<(String, AttemptResult)>> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get("id")?;
        let token: i64 = r.try_get("attempts")?;
        let res = fail_attempt_in(c, &id, token, &runner_lost(), now).await?;
        out.push((id, res));
    }
    Ok(out)
}

async fn insert_job_in(tx: &mut SqliteConnection, j: &NewJob) -> StoreResult<JobRecord> {
    // The same statement as the writer's direct path.
    let res = sqlx::query(INSERT_JOB.sql.as_str())
        .bind(&j.id)
        .bind(&j.app_id)
        .bind(&j.path)
        .bind(&j.owner_id)
        .bind(&j.key_id)
        .bind(j.mode.as_str())
        .bind(j.priority)
        .bind(&j.input)
        .bind(j.max_attempts)
        .bind(j.no_retry)
        .bind(j.start_deadline)
        .bind(&j.runner_hint)
        .bind(&j.webhook_url)
        .bind(&j.webhook_dialect)
        .bind(&j.traceparent)
        .bind(j.store_io)
        .bind(&j.boot_id)
        .bind(j.created_at)
        .bind(j.prices.unit.as_str())
        .bind(j.prices.unit_price)
        .bind(j.prices.runner_second_price)
        .fetch_one(&mut *tx)
        .await;
    let row = match res {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(StoreError::Duplicate(j.id.clone()));
        }
        r => r?,
    };
    job_from_row(&row)
}

/// Deletes a completed job's input, result and logs; its metadata (state, times, status, error type) stays.
async fn purge_in(c: &mut SqliteConnection, job_id: &str, now: Millis) -> StoreResult<()> {
    sqlx::query("UPDATE jobs SET input = 'null', result_body = NULL, payload_deleted_at = ? WHERE id = ?")
        .bind(now)
        .bind(job_id)
        .execute(&mut *c)
        .await?;
    sqlx::query("DELETE FROM job_logs WHERE job_id = ?").bind(job_id).execute(&mut *c).await?;
    Ok(())
}

/// Reaps one dead boot: its tokens, its ephemeral requests, the attempts its runners held.
async fn reap_in(c: &mut SqliteConnection, boot_id: &str, now: Millis, report: &mut BootReport) -> StoreResult<()> {
    sqlx::query("UPDATE boots SET reaped_at = ? WHERE id = ? AND reaped_at IS NULL")
        .bind(now)
        .bind(boot_id)
        .execute(&mut *c)
        .await?;
    report.tokens_revoked +=
        sqlx::query("UPDATE runner_tokens SET revoked_at = ? WHERE revoked_at IS NULL AND boot_id = ?")
            .bind(now)
            .bind(boot_id)
            .execute(&mut *c)
            .await?
            .rows_affected();
    let rows = sqlx::query("SELECT id FROM jobs WHERE state != 'completed' AND mode != 'queue' AND boot_id = ?")
        .bind(boot_id)
        .fetch_all(&mut *c)
        .await?;
    for r in rows {
        let id: String = r.try_get("id")?;
        write_outcome(c, &id, &crate::gateway_restarted(), now).await?;
        report.failed.push(id);
    }
    let rows = sqlx::query("SELECT id, attempts FROM jobs WHERE state = 'running' AND lease_boot = ? ORDER BY seq")
        .bind(boot_id)
        .fetch_all(&mut *c)
        .await?;
    report.record(fail_rows_in(c, rows, now).await?);
    Ok(())
}

use crate::runner_lost;

/// Index updates for attempts that ended: requeued jobs go back in the queue, completed ones leave.
fn apply_attempts(ended: &[(String, AttemptResult)], ix: &mut Index) {
    for (id, r) in ended {
        match r {
            AttemptResult::Requeued => ix.requeue(id),
            AttemptResult::Completed => ix.remove(id),
            AttemptResult::Stale => {}
        }
    }
}

fn apply_report(r: &BootReport, ix: &mut Index) {
    r.requeued.iter().for_each(|id| ix.requeue(id));
    r.failed.iter().for_each(|id| ix.remove(id));
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and migrates it.
    pub async fn open(path: &std::path::Path, durability: Durability) -> StoreResult<SqliteStore> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            .pragma("journal_size_limit", "67108864");
        let mut conn = opts.connect().await?;
        MIGRATOR.run(&mut conn).await?;
        let writer = Writer::start(conn, load_index).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.read_only(true))
            .await?;
        Ok(SqliteStore { writer, reader, boot: std::sync::Mutex::new(None) })
    }

    pub(crate) fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// Marks a boot reaped (the migration's own, once it has recovered the queue).
    pub(crate) async fn mark_reaped(&self, boot_id: &str, now: Millis) -> StoreResult<()> {
        let boot_id = boot_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        sqlx::query("UPDATE boots SET reaped_at = ? WHERE id = ?")
                            .bind(now)
                            .bind(&boot_id)
                            .execute(&mut *tx)
                            .await?;
                        Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    /// Closes the reader pool and the writer (checkpointing the WAL).
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.writer.index.read().unwrap()
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn start_boot(&self, boot_id: &str, now: Millis) -> StoreResult<BootReport> {
        let boot_id = boot_id.to_owned();
        let id = boot_id.clone();
        let (report, _) = self
            .writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let boot_id = &id;
                        sqlx::query("UPDATE boots SET reaped_at = ? WHERE reaped_at IS NULL")
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("INSERT INTO boots (id, started_at, heartbeat_at) VALUES (?, ?, ?)")
                            .bind(boot_id)
                            .bind(now)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        let revoked = sqlx::query(
                            "UPDATE runner_tokens SET revoked_at = ? WHERE revoked_at IS NULL AND boot_id != ?",
                        )
                        .bind(now)
                        .bind(boot_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        let mut report = BootReport { tokens_revoked: revoked, ..Default::default() };
                        // Deliveries in flight when the previous boot died are due again now.
                        sqlx::query("UPDATE webhook_deliveries SET lease_until = NULL WHERE state = 'pending'")
                            .execute(&mut *tx)
                            .await?;
                        // Ephemeral jobs of earlier boots: nobody waits for them any more.
                        let restarted = crate::gateway_restarted();
                        let rows = sqlx::query(
                            "SELECT id FROM jobs WHERE state != 'completed' AND mode != 'queue' AND boot_id != ?",
                        )
                        .bind(boot_id)
                        .fetch_all(&mut *tx)
                        .await?;
                        for r in rows {
                            let id: String = r.try_get("id")?;
                            write_outcome(&mut *tx, &id, &restarted, now).await?;
                            report.failed.push(id);
                        }
                        // Queue jobs that were running: their runners belonged to the old boot.
                        let rows = sqlx::query("SELECT id, attempts FROM jobs WHERE state = 'running' ORDER BY seq")
                            .fetch_all(&mut *tx)
                            .await?;
                        for r in rows {
                            let id: String = r.try_get("id")?;
                            let token: i64 = r.try_get("attempts")?;
                            match fail_attempt_in(&mut *tx, &id, token, &runner_lost(), now).await? {
                                AttemptResult::Requeued => report.requeued.push(id),
                                AttemptResult::Completed => report.failed.push(id),
                                AttemptResult::Stale => {}
                            }
                        }
                        let fresh = load_index(&mut *tx).await?;
                        Ok((report, fresh))
                    })
                },
                |(_, fresh), ix| *ix = std::mem::take(fresh),
            )
            .await?;
        *self.boot.lock().unwrap() = Some(boot_id);
        Ok(report)
    }

    async fn join_cluster(&self, boot_id: &str, url: Option<&str>, now: Millis) -> StoreResult<()> {
        let boot_id = boot_id.to_owned();
        let id = boot_id.clone();
        let url = url.map(str::to_owned);
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let boot_id = &id;
                        let url = url.as_deref();
                        sqlx::query("INSERT INTO boots (id, url, started_at, heartbeat_at) VALUES (?, ?, ?, ?)")
                            .bind(boot_id)
                            .bind(url)
                            .bind(now)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        Ok(())
                    })
                },
                |_, _| {},
            )
            .await?;
        *self.boot.lock().unwrap() = Some(boot_id);
        Ok(())
    }

    async fn heartbeat_boot(&self, boot_id: &str, now: Millis) -> StoreResult<bool> {
        let boot_id = boot_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let boot_id = &boot_id;
                        let n = sqlx::query("UPDATE boots SET heartbeat_at = ? WHERE id = ? AND reaped_at IS NULL")
                            .bind(now)
                            .bind(boot_id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        Ok(n == 1)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn reap_boots(&self, dead_before: Millis, also: Option<&str>, now: Millis) -> StoreResult<BootReport> {
        let also = also.map(str::to_owned);
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let also = also.as_deref();
                        let rows = sqlx::query(
                "SELECT id FROM boots WHERE reaped_at IS NULL AND (heartbeat_at < ? OR id = ?) ORDER BY started_at",
            )
            .bind(dead_before)
            .bind(also)
            .fetch_all(&mut *tx)
            .await?;
                        let mut report = BootReport::default();
                        for r in rows {
                            let id: String = r.try_get("id")?;
                            reap_in(&mut *tx, &id, now, &mut report).await?;
                        }
                        Ok(report)
                    })
                },
                |report, ix| apply_report(report, ix),
            )
            .await
    }

    async fn get_boot(&self, boot_id: &str) -> StoreResult<Option<BootRecord>> {
        let row = sqlx::query("SELECT * FROM boots WHERE id = ?").bind(boot_id).fetch_optional(&self.reader).await?;
        row.map(|r| boot_from_row!(&r)).transpose()
    }

    async fn try_lead(&self) -> StoreResult<bool> {
        Ok(true)
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        None
    }

    async fn ensure_setting(&self, name: &str, value: &str) -> StoreResult<String> {
        let name = name.to_owned();
        let value = value.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let name = &name;
                        let value = &value;
                        sqlx::query("INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING")
                            .bind(name)
                            .bind(value)
                            .execute(&mut *tx)
                            .await?;
                        let row = sqlx::query("SELECT value FROM settings WHERE name = ?")
                            .bind(name)
                            .fetch_one(&mut *tx)
                            .await?;
                        Ok(row.try_get("value")?)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn insert_key(&self, k: &KeyRecord) -> StoreResult<()> {
        let k = k.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
            let k = &k;
            let res = sqlx::query(
                "INSERT INTO api_keys (key_id, owner_id, secret_hash, scope, name, created_at, revoked_at, webhook_dialect) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&k.key_id)
            .bind(&k.owner_id)
            .bind(&k.secret_hash)
            .bind(&k.scope)
            .bind(&k.name)
            .bind(k.created_at)
            .bind(k.revoked_at)
            .bind(&k.webhook_dialect)
            .execute(&mut *tx)
            .await;
            if let Err(sqlx::Error::Database(e)) = &res
                && e.is_unique_violation()
            {
                return Err(StoreError::Duplicate(k.key_id.clone()));
            }
            res?;
            Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn get_key(&self, key_id: &str) -> StoreResult<Option<KeyRecord>> {
        let row =
            sqlx::query("SELECT * FROM api_keys WHERE key_id = ?").bind(key_id).fetch_optional(&self.reader).await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn list_keys(&self, owner_id: Option<&str>) -> StoreResult<Vec<KeyRecord>> {
        let rows =
            sqlx::query("SELECT * FROM api_keys WHERE (?1 IS NULL OR owner_id = ?1) ORDER BY created_at, key_id")
                .bind(owner_id)
                .fetch_all(&self.reader)
                .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, key_id: &str, now: Millis) -> StoreResult<bool> {
        let key_id = key_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let key_id = &key_id;
                        let n =
                            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL")
                                .bind(now)
                                .bind(key_id)
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                        Ok(n == 1)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn insert_runner_token(&self, t: &RunnerTokenRecord) -> StoreResult<()> {
        let t = t.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
            let t = &t;
            sqlx::query(
                "INSERT INTO runner_tokens (token_hash, boot_id, app_id, created_at, revoked_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&t.token_hash)
            .bind(&t.boot_id)
            .bind(&t.app_id)
            .bind(t.created_at)
            .bind(t.revoked_at)
            .execute(&mut *tx)
            .await?;
            Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn get_runner_token(&self, token_hash: &str) -> StoreResult<Option<RunnerTokenRecord>> {
        let row = sqlx::query("SELECT * FROM runner_tokens WHERE token_hash = ?")
            .bind(token_hash)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| token_from_row!(&r)).transpose()
    }

    async fn enqueue(&self, j: &NewJob) -> StoreResult<JobRecord> {
        let j = j.to_owned();
        self.writer.write_sync(move |c| insert_job_direct(c, &j), |rec, ix| ix.record(rec)).await
    }

    async fn enqueue_idempotent(
        &self,
        j: &NewJob,
        key: &str,
        input_hash: &str,
        not_before: Millis,
    ) -> StoreResult<(JobRecord, bool)> {
        let j = j.to_owned();
        let key = key.to_owned();
        let input_hash = input_hash.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
            let j = &j;
            let key = &key;
            let input_hash = &input_hash;
            let row =
                sqlx::query("SELECT job_id, input_hash, created_at FROM idempotency_keys WHERE owner_id = ? AND key = ?")
                    .bind(&j.owner_id)
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(row) = row {
                let created: Millis = row.try_get("created_at")?;
                let job_id: String = row.try_get("job_id")?;
                if created >= not_before {
                    if row.try_get::<String, _>("input_hash")? != *input_hash {
                        return Err(StoreError::IdempotencyMismatch(job_id));
                    }
                    let existing = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?")))
                        .bind(&job_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if let Some(r) = existing {
                        let rec = job_from_row(&r)?;
                                                return Ok((rec, false));
                    }
                }
                sqlx::query("DELETE FROM idempotency_keys WHERE owner_id = ? AND key = ?")
                    .bind(&j.owner_id)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
            }
            let rec = insert_job_in(&mut *tx, j).await?;
            sqlx::query(
                "INSERT INTO idempotency_keys (owner_id, key, job_id, input_hash, created_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&j.owner_id)
            .bind(key)
            .bind(&j.id)
            .bind(input_hash)
            .bind(j.created_at)
            .execute(&mut *tx)
            .await?;
            Ok((rec, true))
                    })
                },
                |(rec, _), ix| ix.record(rec),
            )
            .await
    }

    async fn count_active_for_key(&self, key_id: &str) -> StoreResult<i64> {
        Ok(self.index().active_for_key(key_id))
    }

    async fn count_queued(&self, app_id: &str) -> StoreResult<i64> {
        Ok(self.index().queued(app_id))
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<JobRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?")))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn queue_position(&self, id: &str) -> StoreResult<Option<i64>> {
        Ok(self.index().position(id))
    }

    async fn count_queued_for_key(&self, key_id: &str, min_priority: i64) -> StoreResult<i64> {
        Ok(self.index().queued_for_key(key_id, min_priority))
    }

    async fn next_queued(&self, app_id: &str, limit: i64) -> StoreResult<Vec<(String, Option<String>)>> {
        Ok(self.index().next_queued(app_id, limit.max(1) as usize))
    }

    async fn job_brief(&self, id: &str) -> StoreResult<Option<JobBrief>> {
        Ok(self.index().get(id).cloned())
    }

    async fn claim_many(
        &self,
        claims: &[(String, String)],
        lease_until: Millis,
        now: Millis,
    ) -> StoreResult<Vec<Option<JobRecord>>> {
        let boot = self.boot.lock().unwrap().clone();
        let claims = claims.to_vec();
        let asked: Vec<String> = claims.iter().map(|c| c.0.clone()).collect();
        self.writer
            .write_sync(
                move |c| {
                    claims
                        .iter()
                        .map(|(job_id, runner_id)| {
                            claim_direct(c, job_id, runner_id, lease_until, now, boot.as_deref())
                        })
                        .collect::<StoreResult<Vec<_>>>()
                },
                move |recs, ix| {
                    for (rec, id) in recs.iter().zip(&asked) {
                        match rec {
                            Some(r) => ix.record(r),
                            None => ix.forget_queued(id),
                        }
                    }
                },
            )
            .await
    }

    async fn enqueue_claimed(
        &self,
        j: &NewJob,
        runner_id: &str,
        lease_until: Millis,
        now: Millis,
    ) -> StoreResult<(JobRecord, bool)> {
        let boot = self.boot.lock().unwrap().clone();
        let j = j.clone();
        let runner_id = runner_id.to_owned();
        self.writer
            .write_sync(
                move |c| {
                    let rec = insert_job_direct(c, &j)?;
                    match claim_direct(c, &j.id, &runner_id, lease_until, now, boot.as_deref())? {
                        Some(r) => Ok((r, true)),
                        None => Ok((rec, false)),
                    }
                },
                |(rec, _), ix| ix.record(rec),
            )
            .await
    }

    async fn claim(
        &self,
        job_id: &str,
        runner_id: &str,
        lease_until: Millis,
        now: Millis,
    ) -> StoreResult<Option<JobRecord>> {
        let mut v = self.claim_many(&[(job_id.to_owned(), runner_id.to_owned())], lease_until, now).await?;
        Ok(v.pop().flatten())
    }

    async fn extend_leases(&self, runner_id: &str, job_ids: &[String], lease_until: Millis) -> StoreResult<u64> {
        if job_ids.is_empty() {
            return Ok(0);
        }
        let ids = serde_json::to_string(job_ids).expect("strings serialise");
        let runner_id = runner_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let runner_id = &runner_id;
                        let n = sqlx::query(
                            "UPDATE jobs SET lease_expires_at = ? WHERE state = 'running' AND lease_runner = ? \
                 AND id IN (SELECT value FROM json_each(?))",
                        )
                        .bind(lease_until)
                        .bind(runner_id)
                        .bind(ids)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        Ok(n)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn complete(&self, job_id: &str, token: i64, o: &Outcome, now: Millis) -> StoreResult<CompleteResult> {
        let job_id = job_id.to_owned();
        let o = o.to_owned();
        let done = job_id.to_owned();
        self.writer
            .write_sync(
                move |c| {
                    let n = c
                        .prepare_cached(
                            "UPDATE jobs SET state = 'completed', completed_at = ?, result_status = ?, \
                             result_body = ?, error = ?, error_type = ?, inference_ms = ?, lease_runner = NULL, \
                             lease_expires_at = NULL WHERE id = ? AND state = 'running' AND attempts = ?",
                        )?
                        .execute(rusqlite::params![
                            now,
                            o.status as i64,
                            o.body,
                            o.error,
                            o.error_type,
                            o.inference_ms,
                            job_id,
                            token
                        ])?;
                    if n == 1 {
                        after_completion_direct(c, &job_id, &o, now)?;
                    }
                    Ok(if n == 1 { CompleteResult::Applied } else { CompleteResult::Stale })
                },
                move |res, ix| {
                    if *res == CompleteResult::Applied {
                        ix.remove(&done);
                    }
                },
            )
            .await
    }

    async fn fail_attempt(&self, job_id: &str, token: i64, o: &Outcome, now: Millis) -> StoreResult<AttemptResult> {
        let job_id = job_id.to_owned();
        let o = o.to_owned();
        let done = job_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let job_id = &job_id;
                        let o = &o;
                        let r = fail_attempt_in(&mut *tx, job_id, token, o, now).await?;
                        Ok(r)
                    })
                },
                move |res, ix| apply_attempts(&[(done, res.clone())], ix),
            )
            .await
    }

    async fn release_runner(&self, runner_id: &str, now: Millis) -> StoreResult<Vec<(String, AttemptResult)>> {
        let runner_id = runner_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let runner_id = &runner_id;
                        let rows = sqlx::query(
                            "SELECT id, attempts FROM jobs WHERE state = 'running' AND lease_runner = ? ORDER BY seq",
                        )
                        .bind(runner_id)
                        .fetch_all(&mut *tx)
                        .await?;
                        let out = fail_rows_in(&mut *tx, rows, now).await?;
                        Ok(out)
                    })
                },
                |ended, ix| apply_attempts(ended, ix),
            )
            .await
    }

    async fn expire_leases(&self, now: Millis) -> StoreResult<Vec<(String, AttemptResult)>> {
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
            let rows =
                sqlx::query("SELECT id, attempts FROM jobs WHERE state = 'running' AND lease_expires_at < ? ORDER BY seq")
                    .bind(now)
                    .fetch_all(&mut *tx)
                    .await?;
            let out = fail_rows_in(&mut *tx, rows, now).await?;
            Ok(out)
                    })
                },
                |ended, ix| apply_attempts(ended, ix),
            )
            .await
    }

    async fn expire_start_deadlines(&self, now: Millis) -> StoreResult<Vec<String>> {
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let timeout = Outcome::platform(&ApiError::new(
                            ErrorType::RequestTimeout,
                            "Request did not start before its X-Fal-Request-Timeout deadline",
                        ));
                        let rows = sqlx::query(
                "SELECT id FROM jobs WHERE state = 'queued' AND start_deadline IS NOT NULL AND start_deadline <= ?",
            )
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
                        let mut out = Vec::new();
                        for r in rows {
                            let id: String = r.try_get("id")?;
                            write_outcome(&mut *tx, &id, &timeout, now).await?;
                            out.push(id);
                        }
                        Ok(out)
                    })
                },
                |ended, ix| ended.iter().for_each(|id| ix.remove(id)),
            )
            .await
    }

    async fn cancel(&self, job_id: &str, now: Millis) -> StoreResult<CancelResult> {
        let job_id = job_id.to_owned();
        let done = job_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let job_id = &job_id;
                        let row = sqlx::query("SELECT state, lease_runner, attempts FROM jobs WHERE id = ?")
                            .bind(job_id)
                            .fetch_optional(&mut *tx)
                            .await?;
                        let Some(row) = row else { return Ok(CancelResult::NotFound) };
                        let state: String = row.try_get("state")?;
                        let res = match state.as_str() {
                            "completed" => CancelResult::AlreadyCompleted,
                            s => {
                                let running_on = if s == "running" {
                                    let runner: Option<String> = row.try_get("lease_runner")?;
                                    runner.map(|r| (r, row.try_get::<i64, _>("attempts").unwrap_or(0)))
                                } else {
                                    None
                                };
                                sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = ?")
                                    .bind(job_id)
                                    .execute(&mut *tx)
                                    .await?;
                                write_outcome(&mut *tx, job_id, &Outcome::cancelled(), now).await?;
                                CancelResult::Cancelled { running_on }
                            }
                        };
                        Ok(res)
                    })
                },
                move |res, ix| {
                    if matches!(res, CancelResult::Cancelled { .. }) {
                        ix.remove(&done);
                    }
                },
            )
            .await
    }

    async fn append_logs(&self, job_id: &str, token: i64, entries: &[LogEntry]) -> StoreResult<bool> {
        let job_id = job_id.to_owned();
        let entries = entries.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let job_id = &job_id;
                        let entries = &entries;
                        let ok = sqlx::query("SELECT 1 FROM jobs WHERE id = ? AND state = 'running' AND attempts = ?")
                            .bind(job_id)
                            .bind(token)
                            .fetch_optional(&mut *tx)
                            .await?
                            .is_some();
                        if ok {
                            for e in entries {
                                sqlx::query("INSERT INTO job_logs (job_id, ts, level, message) VALUES (?, ?, ?, ?)")
                                    .bind(job_id)
                                    .bind(e.timestamp)
                                    .bind(&e.level)
                                    .bind(&e.message)
                                    .execute(&mut *tx)
                                    .await?;
                            }
                        }
                        Ok(ok)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn get_logs(&self, job_id: &str) -> StoreResult<Vec<LogEntry>> {
        let rows = sqlx::query("SELECT ts, level, message FROM job_logs WHERE job_id = ? ORDER BY seq")
            .bind(job_id)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(|r| log_from_row!(r)).collect()
    }

    async fn list_jobs(&self, f: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let limit = if f.limit <= 0 { 100 } else { f.limit.min(1000) };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR owner_id = ?1) AND (?2 IS NULL OR app_id = ?2) \
             AND (?3 IS NULL OR state = ?3) AND (?5 IS NULL OR created_at >= ?5) AND (?6 IS NULL OR created_at < ?6) \
             ORDER BY seq DESC LIMIT ?4"
        )))
        .bind(&f.owner_id)
        .bind(&f.app_id)
        .bind(&f.state)
        .bind(limit)
        .bind(f.created_after)
        .bind(f.created_before)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn app_depths(&self) -> StoreResult<Vec<AppDepth>> {
        Ok(self.index().depths())
    }

    async fn claim_due_webhooks(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let rows = sqlx::query(
                "UPDATE webhook_deliveries SET lease_until = ?1 WHERE id IN (SELECT id FROM webhook_deliveries \
                 WHERE state = 'pending' AND next_attempt_at <= ?2 AND (lease_until IS NULL OR lease_until < ?2) \
                 ORDER BY next_attempt_at LIMIT ?3) RETURNING *",
            )
            .bind(lease_until)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
                        let out = rows.iter().map(delivery_from_row).collect::<StoreResult<Vec<_>>>()?;
                        Ok(out)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn next_webhook_due(&self) -> StoreResult<Option<Millis>> {
        let row = sqlx::query(
            "SELECT min(max(next_attempt_at, coalesce(lease_until, 0))) AS t FROM webhook_deliveries \
             WHERE state = 'pending'",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(row.try_get("t")?)
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        a: &WebhookAttempt,
        next: DeliveryNext,
        now: Millis,
    ) -> StoreResult<()> {
        let id = id.to_owned();
        let a = a.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
            let id = &id;
            let a = &a;
            sqlx::query(
                "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, status, error) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(a.attempt)
            .bind(a.started_at)
            .bind(a.duration_ms)
            .bind(a.status)
            .bind(&a.error)
            .execute(&mut *tx)
            .await?;
            let (state, next_at, delivered_at) = match next {
                DeliveryNext::Delivered => ("delivered", None, Some(now)),
                DeliveryNext::Retry { at } => ("pending", Some(at), None),
                DeliveryNext::Dead => ("dead", None, None),
            };
            sqlx::query(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, state = ?, next_attempt_at = ?, lease_until = NULL, \
                 last_status = ?, last_error = ?, delivered_at = coalesce(?, delivered_at) \
                 WHERE id = ? AND lease_until IS NOT NULL",
            )
            .bind(state)
            .bind(next_at)
            .bind(a.status)
            .bind(&a.error)
            .bind(delivered_at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn list_webhooks(&self, f: &WebhookFilter) -> StoreResult<Vec<WebhookDelivery>> {
        let limit = if f.limit <= 0 { 100 } else { f.limit.min(1000) };
        let rows = sqlx::query(
            "SELECT * FROM webhook_deliveries WHERE (?1 IS NULL OR owner_id = ?1) AND (?2 IS NULL OR job_id = ?2) \
             AND (?3 IS NULL OR state = ?3) ORDER BY created_at DESC, id DESC LIMIT ?4",
        )
        .bind(&f.owner_id)
        .bind(&f.job_id)
        .bind(&f.state)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn get_webhook(&self, id: &str) -> StoreResult<Option<(WebhookDelivery, Vec<WebhookAttempt>)>> {
        let Some(row) =
            sqlx::query("SELECT * FROM webhook_deliveries WHERE id = ?").bind(id).fetch_optional(&self.reader).await?
        else {
            return Ok(None);
        };
        let d = delivery_from_row(&row)?;
        let rows = sqlx::query("SELECT * FROM webhook_attempts WHERE delivery_id = ? ORDER BY seq")
            .bind(id)
            .fetch_all(&self.reader)
            .await?;
        let attempts = rows.iter().map(|r| attempt_from_row!(r)).collect::<StoreResult<Vec<_>>>()?;
        Ok(Some((d, attempts)))
    }

    async fn redeliver_webhook(&self, id: &str, now: Millis) -> StoreResult<bool> {
        let id = id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
            let id = &id;
            let n = sqlx::query(
                "UPDATE webhook_deliveries SET state = 'pending', round_start = attempts, next_attempt_at = ?1, lease_until = NULL \
                 WHERE id = ?2 AND (lease_until IS NULL OR lease_until < ?1)",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            Ok(n == 1)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn list_signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>> {
        let rows = sqlx::query("SELECT * FROM signing_keys ORDER BY created_at, kid").fetch_all(&self.reader).await?;
        rows.iter().map(|r| signing_key_from_row!(r)).collect()
    }

    async fn insert_signing_key(&self, k: &SigningKeyRecord, retire_others: bool) -> StoreResult<()> {
        let k = k.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let k = &k;
                        if retire_others {
                            sqlx::query("UPDATE signing_keys SET retired_at = ? WHERE retired_at IS NULL")
                                .bind(k.created_at)
                                .execute(&mut *tx)
                                .await?;
                        }
                        sqlx::query(
                            "INSERT INTO signing_keys (kid, secret, created_at, retired_at) VALUES (?, ?, ?, ?)",
                        )
                        .bind(&k.kid)
                        .bind(&k.secret)
                        .bind(k.created_at)
                        .bind(k.retired_at)
                        .execute(&mut *tx)
                        .await?;
                        Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn set_cold_start(&self, job_id: &str, token: i64, ms: i64) -> StoreResult<bool> {
        let job_id = job_id.to_owned();
        let done = job_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let job_id = &job_id;
                        let n = sqlx::query(
                            "UPDATE jobs SET cold_start_ms = ? WHERE id = ? AND attempts = ? AND state != 'completed'",
                        )
                        .bind(ms)
                        .bind(job_id)
                        .bind(token)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        Ok(n == 1)
                    })
                },
                move |ok, ix| {
                    if *ok {
                        ix.set_cold_start(&done, ms);
                    }
                },
            )
            .await
    }

    async fn list_app_scaling(&self) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT app_id, patch FROM app_scaling ORDER BY app_id").fetch_all(&self.reader).await?;
        rows.iter().map(|r| Ok((r.try_get("app_id")?, r.try_get("patch")?))).collect()
    }

    async fn set_app_scaling(&self, app_id: &str, patch: Option<&str>, now: Millis) -> StoreResult<()> {
        let app_id = app_id.to_owned();
        let patch = patch.map(str::to_owned);
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let app_id = &app_id;
                        let patch = patch.as_deref();
                        match patch {
                            Some(p) => {
                                sqlx::query(
                                    "INSERT INTO app_scaling (app_id, patch, updated_at) VALUES (?, ?, ?) \
                         ON CONFLICT (app_id) DO UPDATE SET patch = excluded.patch, updated_at = excluded.updated_at",
                                )
                                .bind(app_id)
                                .bind(p)
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                            }
                            None => {
                                sqlx::query("DELETE FROM app_scaling WHERE app_id = ?")
                                    .bind(app_id)
                                    .execute(&mut *tx)
                                    .await?;
                            }
                        }
                        Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn insert_file(&self, f: &FileRecord) -> StoreResult<()> {
        let f = f.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let f = &f;
                        sqlx::query(
                "INSERT INTO files (id, owner_id, file_name, content_type, size, state, public, job_id, created_at, \
                 completed_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .bind(&f.id)
            .bind(&f.owner_id)
            .bind(&f.file_name)
            .bind(&f.content_type)
            .bind(f.size)
            .bind(&f.state)
            .bind(f.public)
            .bind(&f.job_id)
            .bind(f.created_at)
            .bind(f.completed_at)
            .bind(f.expires_at)
            .execute(&mut *tx)
            .await?;
                        Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn get_file(&self, id: &str) -> StoreResult<Option<FileRecord>> {
        let row = sqlx::query("SELECT * FROM files WHERE id = ?1").bind(id).fetch_optional(&self.reader).await?;
        row.as_ref().map(|r| file_from_row!(r)).transpose()
    }

    async fn finish_file(&self, id: &str, size: i64, now: Millis) -> StoreResult<bool> {
        let id = id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let id = &id;
                        let n = sqlx::query(
                "UPDATE files SET state = 'ready', size = ?1, completed_at = ?2 WHERE id = ?3 AND state = 'pending'",
            )
            .bind(size)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
                        Ok(n == 1)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn list_files(&self, filter: &FileFilter) -> StoreResult<Vec<FileRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM files WHERE (?1 IS NULL OR owner_id = ?1) AND (?2 IS NULL OR id < ?2) \
             AND state = 'ready' ORDER BY id DESC LIMIT ?3",
        )
        .bind(&filter.owner_id)
        .bind(&filter.before)
        .bind(filter.limit.clamp(1, 1000))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|r| file_from_row!(r)).collect()
    }

    async fn delete_file(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let id = &id;
                        let n = sqlx::query("DELETE FROM files WHERE id = ?1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        Ok(n == 1)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn expired_files(&self, now: Millis, pending_before: Millis, limit: i64) -> StoreResult<Vec<FileRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM files WHERE (expires_at IS NOT NULL AND expires_at <= ?1) \
             OR (state = 'pending' AND created_at < ?2) ORDER BY created_at LIMIT ?3",
        )
        .bind(now)
        .bind(pending_before)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|r| file_from_row!(r)).collect()
    }

    async fn disable_retries(&self, job_id: &str) -> StoreResult<()> {
        let job_id = job_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let job_id = &job_id;
                        sqlx::query("UPDATE jobs SET no_retry = 1 WHERE id = ?").bind(job_id).execute(&mut *tx).await?;
                        Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn delete_payload(&self, job_id: &str, now: Millis) -> StoreResult<DeleteResult> {
        let job_id = job_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let job_id = &job_id;
                        let row = sqlx::query("SELECT state FROM jobs WHERE id = ?")
                            .bind(job_id)
                            .fetch_optional(&mut *tx)
                            .await?;
                        let res = match row {
                            None => DeleteResult::NotFound,
                            Some(r) if r.try_get::<String, _>("state")? != "completed" => DeleteResult::NotCompleted,
                            Some(_) => {
                                purge_in(&mut *tx, job_id, now).await?;
                                DeleteResult::Deleted
                            }
                        };
                        Ok(res)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn purge_payloads(&self, completed_before: Millis, now: Millis, limit: i64) -> StoreResult<Vec<String>> {
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let rows = sqlx::query(
                "SELECT id FROM jobs WHERE state = 'completed' AND payload_deleted_at IS NULL AND completed_at < ? \
                 ORDER BY completed_at LIMIT ?",
            )
            .bind(completed_before)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
                        let mut out = Vec::with_capacity(rows.len());
                        for r in rows {
                            let id: String = r.try_get("id")?;
                            purge_in(&mut *tx, &id, now).await?;
                            out.push(id);
                        }
                        Ok(out)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn list_usage(&self, f: &UsageFilter) -> StoreResult<Vec<UsageLine>> {
        let (sql, args) = crate::usage::list_sql(crate::usage::Dialect::Sqlite, f);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for a in args {
            q = match a {
                crate::usage::Arg::S(v) => q.bind(v),
                crate::usage::Arg::I(v) => q.bind(v),
            };
        }
        let rows = q.fetch_all(&self.reader).await?;
        rows.iter().map(|r| Ok(crate::usage::line_from_row!(r))).collect()
    }

    async fn summarize_usage(
        &self,
        f: &UsageFilter,
        bucket_ms: Option<i64>,
        groups: &[UsageGroup],
    ) -> StoreResult<Vec<UsageBucket>> {
        let (sql, args) = crate::usage::summary_sql(crate::usage::Dialect::Sqlite, f, bucket_ms, groups);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for a in args {
            q = match a {
                crate::usage::Arg::S(v) => q.bind(v),
                crate::usage::Arg::I(v) => q.bind(v),
            };
        }
        let rows = q.fetch_all(&self.reader).await?;
        rows.iter().map(|r| Ok(crate::usage::bucket_from_row!(r, bucket_ms.is_some(), groups))).collect()
    }

    async fn owner_spend(&self, owner_id: &str, since: Millis) -> StoreResult<i64> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) AS spent FROM usage_lines \
             WHERE owner_id = ? AND created_at >= ?",
        )
        .bind(owner_id)
        .bind(since)
        .fetch_one(&self.reader)
        .await?;
        Ok(row.try_get("spent")?)
    }

    async fn set_budget(&self, b: &Budget) -> StoreResult<()> {
        let b = b.clone();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        sqlx::query(
                            "INSERT INTO budgets (owner_id, limit_nanos, period, updated_at) VALUES (?, ?, ?, ?) \
                             ON CONFLICT (owner_id) DO UPDATE SET limit_nanos = excluded.limit_nanos, \
                             period = excluded.period, updated_at = excluded.updated_at",
                        )
                        .bind(&b.owner_id)
                        .bind(b.limit_nanos)
                        .bind(&b.period)
                        .bind(b.updated_at)
                        .execute(&mut *tx)
                        .await?;
                        Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn delete_budget(&self, owner_id: &str) -> StoreResult<bool> {
        let owner_id = owner_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let n = sqlx::query("DELETE FROM budgets WHERE owner_id = ?")
                            .bind(&owner_id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        Ok(n == 1)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn list_budgets(&self, owner_id: Option<&str>) -> StoreResult<Vec<Budget>> {
        let rows = sqlx::query(
            "SELECT owner_id, limit_nanos, period, updated_at FROM budgets \
             WHERE ? IS NULL OR owner_id = ? ORDER BY owner_id",
        )
        .bind(owner_id)
        .bind(owner_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|r| Ok(crate::usage::budget_from_row!(r))).collect()
    }

    async fn put_deployment(&self, d: &DeploymentRecord, expect_version: Option<i64>) -> StoreResult<bool> {
        let d = d.clone();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        if let Some(expect) = expect_version {
                            let cur: Option<i64> =
                                sqlx::query_scalar("SELECT version FROM deployments WHERE app_id = ?")
                                    .bind(&d.app_id)
                                    .fetch_optional(&mut *tx)
                                    .await?;
                            if cur.unwrap_or(0) != expect {
                                return Ok(false);
                            }
                        }
                        sqlx::query(
                            "INSERT INTO deployments (app_id, owner_id, version, spec, manifest, bundle_digest, \
                             bundle_size, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
                             ON CONFLICT (app_id) DO UPDATE SET owner_id = excluded.owner_id, \
                             version = excluded.version, spec = excluded.spec, manifest = excluded.manifest, \
                             bundle_digest = excluded.bundle_digest, bundle_size = excluded.bundle_size, \
                             updated_at = excluded.updated_at",
                        )
                        .bind(&d.app_id)
                        .bind(&d.owner_id)
                        .bind(d.version)
                        .bind(&d.spec)
                        .bind(&d.manifest)
                        .bind(&d.bundle_digest)
                        .bind(d.bundle_size)
                        .bind(d.created_at)
                        .bind(d.updated_at)
                        .execute(&mut *tx)
                        .await?;
                        Ok(true)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn get_deployment(&self, app_id: &str) -> StoreResult<Option<DeploymentRecord>> {
        let row = sqlx::query(
            "SELECT app_id, owner_id, version, spec, manifest, bundle_digest, bundle_size, created_at, updated_at \
             FROM deployments WHERE app_id = ?",
        )
        .bind(app_id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(match row {
            Some(r) => Some(crate::deploy::deployment_from_row!(&r)),
            None => None,
        })
    }

    async fn list_deployments(&self) -> StoreResult<Vec<DeploymentRecord>> {
        let rows = sqlx::query(
            "SELECT app_id, owner_id, version, spec, manifest, bundle_digest, bundle_size, created_at, updated_at \
             FROM deployments ORDER BY app_id",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|r| Ok(crate::deploy::deployment_from_row!(r))).collect()
    }

    async fn delete_deployment(&self, app_id: &str) -> StoreResult<bool> {
        let app_id = app_id.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let n = sqlx::query("DELETE FROM deployments WHERE app_id = ?")
                            .bind(&app_id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        Ok(n == 1)
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn set_secret(&self, sec: &SecretRecord) -> StoreResult<()> {
        let sec = sec.clone();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        sqlx::query(
                            "INSERT INTO secrets (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) \
                             DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                        )
                        .bind(&sec.name)
                        .bind(&sec.sealed)
                        .bind(sec.updated_at)
                        .execute(&mut *tx)
                        .await?;
                        Ok(())
                    })
                },
                |_, _| {},
            )
            .await
    }

    async fn list_secrets(&self) -> StoreResult<Vec<SecretRecord>> {
        let rows =
            sqlx::query("SELECT name, value, updated_at FROM secrets ORDER BY name").fetch_all(&self.reader).await?;
        rows.iter().map(|r| Ok(crate::deploy::secret_from_row!(r))).collect()
    }

    async fn delete_secret(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_owned();
        self.writer
            .write(
                move |tx| {
                    Box::pin(async move {
                        let n = sqlx::query("DELETE FROM secrets WHERE name = ?")
                            .bind(&name)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        Ok(n == 1)
                    })
                },
                |_, _| {},
            )
            .await
    }
}
