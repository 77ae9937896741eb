//! PostgreSQL: several gateways share one database. Claims use `FOR UPDATE SKIP LOCKED`; leases and fencing are
//! the same as on SQLite; every write that others may wait on sends a `NOTIFY` in its transaction (delivered at
//! commit), a wake-up hint only, since every waiter also polls. One gateway at a time leads (runs the sweepers),
//! holding a session advisory lock that PostgreSQL releases when its connection dies. See reference/infra.md §2.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use darkroom_core::Millis;
use darkroom_core::error::{ApiError, ErrorType};
use darkroom_core::job::{JobRecord, LogEntry, NewJob, Outcome};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::broadcast;

use crate::usage::{Budget, UsageBucket, UsageFilter, UsageGroup, UsageLine};
use crate::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel every gateway of a deployment listens on; one per schema, so deployments (and tests) sharing a
/// database never hear each other.
fn channel_for(schema: &str) -> String {
    let mut c = format!("darkroom:{schema}");
    c.truncate(63);
    c
}

const JOB_COLUMNS: &str = "seq, id, app_id, path, owner_id, key_id, mode, priority, state, input, attempts, \
    max_attempts, no_retry, lease_runner, lease_expires_at, start_deadline, runner_hint, cancel_requested, \
    webhook_url, webhook_dialect, traceparent, store_io, boot_id, created_at, started_at, completed_at, result_status, \
    result_body, error, error_type, inference_ms, payload_deleted_at, cold_start_ms";

pub struct PgStore {
    pool: PgPool,
    opts: PgConnectOptions,
    /// Tells this store's own notifications from other gateways'.
    origin: String,
    channel: String,
    events: broadcast::Sender<StoreEvent>,
    listener: Option<tokio::task::JoinHandle<()>>,
    /// The boot claims are recorded under.
    boot: std::sync::Mutex<Option<String>>,
    /// The connection holding (or trying for) the leader lock, and whether it holds it.
    leader: tokio::sync::Mutex<Option<(PgConnection, bool)>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(l) = &self.listener {
            l.abort();
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    o: String,
    ev: StoreEvent,
}

fn job_from_row(r: &PgRow) -> StoreResult<JobRecord> {
    job_from_row!(r)
}

/// Events of one transaction, sent just before it commits.
type Events = Vec<StoreEvent>;

async fn write_outcome(
    c: &mut PgConnection,
    ev: &mut Events,
    job_id: &str,
    o: &Outcome,
    now: Millis,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE jobs SET state = 'completed', completed_at = $1, result_status = $2, result_body = $3, error = $4, \
         error_type = $5, inference_ms = $6, lease_runner = NULL, lease_expires_at = NULL, lease_boot = NULL \
         WHERE id = $7",
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
    ev.push(StoreEvent::Finished { job_id: job_id.into() });
    enqueue_webhook_in(&mut *c, job_id, o, now).await?;
    record_usage_in(c, job_id, o, now).await
}

/// The usage line, in the same transaction as the completion (none for a 5xx).
async fn record_usage_in(c: &mut PgConnection, job_id: &str, o: &Outcome, now: Millis) -> StoreResult<()> {
    let row =
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {} FROM jobs WHERE id = $1", crate::usage::BILLING_COLUMNS)))
            .bind(job_id)
            .fetch_optional(&mut *c)
            .await?;
    let Some(row) = row else { return Ok(()) };
    let b = crate::usage::billing_row!(&row);
    if let Some(line) = crate::usage::line_for(job_id, b, o, now) {
        crate::usage::insert_line!(
            sqlx::AssertSqlSafe(format!(
                "INSERT INTO usage_lines ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                crate::usage::LINE_COLUMNS
            )),
            &line,
            &mut *c
        );
    }
    Ok(())
}

/// The outbox: in the same transaction as the completion, a delivery row for a request that asked for a webhook.
async fn enqueue_webhook_in(c: &mut PgConnection, job_id: &str, o: &Outcome, now: Millis) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, job_id, owner_id, url, body, dialect, state, next_attempt_at, traceparent, \
         created_at) SELECT $1, id, owner_id, webhook_url, $2, coalesce(webhook_dialect, ''), 'pending', $3, \
         traceparent, $3 FROM jobs WHERE id = $4 AND webhook_url IS NOT NULL",
    )
    .bind(darkroom_core::ids::new_request_id())
    .bind(darkroom_core::webhook::payload(job_id, o))
    .bind(now)
    .bind(job_id)
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Ends the running attempt `token` of a job inside a transaction: requeue or complete.
async fn fail_attempt_in(
    c: &mut PgConnection,
    ev: &mut Events,
    job_id: &str,
    token: i64,
    outcome: &Outcome,
    now: Millis,
) -> StoreResult<AttemptResult> {
    let row = sqlx::query(
        "SELECT app_id, attempts, max_attempts, no_retry, cancel_requested, state FROM jobs WHERE id = $1 FOR UPDATE",
    )
    .bind(job_id)
    .fetch_optional(&mut *c)
    .await?;
    let Some(row) = row else { return Ok(AttemptResult::Stale) };
    let attempts: i64 = row.try_get("attempts")?;
    let state: String = row.try_get("state")?;
    if state != "running" || attempts != token {
        return Ok(AttemptResult::Stale);
    }
    ev.push(StoreEvent::AttemptEnded { job_id: job_id.into(), token });
    let max: i64 = row.try_get("max_attempts")?;
    let no_retry: bool = row.try_get("no_retry")?;
    let cancel: bool = row.try_get("cancel_requested")?;
    if cancel {
        write_outcome(c, ev, job_id, &Outcome::cancelled(), now).await?;
        return Ok(AttemptResult::Completed);
    }
    if !no_retry && attempts < max {
        sqlx::query(
            "UPDATE jobs SET state = 'queued', lease_runner = NULL, lease_expires_at = NULL, lease_boot = NULL, \
             started_at = NULL WHERE id = $1",
        )
        .bind(job_id)
        .execute(&mut *c)
        .await?;
        ev.push(StoreEvent::Queued { app_id: row.try_get("app_id")? });
        Ok(AttemptResult::Requeued)
    } else {
        write_outcome(c, ev, job_id, outcome, now).await?;
        Ok(AttemptResult::Completed)
    }
}

/// Ends the current attempt of each (id, attempts) row as "runner lost".
async fn fail_rows_in(
    c: &mut PgConnection,
    ev: &mut Events,
    rows: Vec<PgRow>,
    now: Millis,
) -> StoreResult<Vec<(String, AttemptResult)>> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get("id")?;
        let token: i64 = r.try_get("attempts")?;
        let res = fail_attempt_in(c, ev, &id, token, &runner_lost(), now).await?;
        out.push((id, res));
    }
    Ok(out)
}

/// Reaps one dead boot: its tokens, its ephemeral requests, the attempts its runners held.
async fn reap_in(
    c: &mut PgConnection,
    ev: &mut Events,
    boot_id: &str,
    now: Millis,
    report: &mut BootReport,
) -> StoreResult<()> {
    sqlx::query("UPDATE boots SET reaped_at = $1 WHERE id = $2 AND reaped_at IS NULL")
        .bind(now)
        .bind(boot_id)
        .execute(&mut *c)
        .await?;
    report.tokens_revoked +=
        sqlx::query("UPDATE runner_tokens SET revoked_at = $1 WHERE revoked_at IS NULL AND boot_id = $2")
            .bind(now)
            .bind(boot_id)
            .execute(&mut *c)
            .await?
            .rows_affected();
    let rows = sqlx::query(
        "SELECT id FROM jobs WHERE state != 'completed' AND mode != 'queue' AND boot_id = $1 ORDER BY seq FOR UPDATE",
    )
    .bind(boot_id)
    .fetch_all(&mut *c)
    .await?;
    for r in rows {
        let id: String = r.try_get("id")?;
        write_outcome(c, ev, &id, &crate::gateway_restarted(), now).await?;
        report.failed.push(id);
    }
    let rows = sqlx::query("SELECT id, attempts FROM jobs WHERE state = 'running' AND lease_boot = $1 ORDER BY seq")
        .bind(boot_id)
        .fetch_all(&mut *c)
        .await?;
    report.record(fail_rows_in(c, ev, rows, now).await?);
    Ok(())
}

async fn insert_job_in(c: &mut PgConnection, ev: &mut Events, j: &NewJob) -> StoreResult<JobRecord> {
    let res = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO jobs (id, app_id, path, owner_id, key_id, mode, priority, state, input, max_attempts, \
         no_retry, start_deadline, runner_hint, webhook_url, webhook_dialect, traceparent, store_io, boot_id, \
         created_at, bill_unit, unit_price, runner_second_price) VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9, $10, \
         $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21) \
         RETURNING {JOB_COLUMNS}"
    )))
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
    .fetch_one(&mut *c)
    .await;
    let row = match res {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(StoreError::Duplicate(j.id.clone()));
        }
        r => r?,
    };
    ev.push(StoreEvent::Queued { app_id: j.app_id.clone() });
    job_from_row(&row)
}

/// Deletes a completed job's input, result and logs; its metadata (state, times, status, error type) stays.
async fn purge_in(c: &mut PgConnection, job_id: &str, now: Millis) -> StoreResult<()> {
    sqlx::query("UPDATE jobs SET input = 'null', result_body = NULL, payload_deleted_at = $1 WHERE id = $2")
        .bind(now)
        .bind(job_id)
        .execute(&mut *c)
        .await?;
    sqlx::query("DELETE FROM job_logs WHERE job_id = $1").bind(job_id).execute(&mut *c).await?;
    Ok(())
}

/// Forwards other gateways' notifications to subscribers; reconnects (and keeps trying) when the connection drops.
async fn listen(pool: PgPool, channel: String, origin: String, tx: broadcast::Sender<StoreEvent>) {
    loop {
        let mut l = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "store listener: connect failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = l.listen(&channel).await {
            tracing::warn!(error = %e, "store listener: LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            match l.recv().await {
                Ok(n) => match serde_json::from_str::<Wire>(n.payload()) {
                    Ok(w) if w.o != origin => {
                        let _ = tx.send(w.ev);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "store listener: bad payload"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "store listener: connection lost; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`) and runs migrations.
    pub async fn connect(url: &str) -> StoreResult<PgStore> {
        Self::connect_with(PgConnectOptions::from_str(url)?).await
    }

    /// Connects with explicit options (tests use them to pick a schema).
    pub async fn connect_with(opts: PgConnectOptions) -> StoreResult<PgStore> {
        let opts = opts.application_name("darkroom");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        let origin = uuid::Uuid::new_v4().simple().to_string();
        let schema: String = sqlx::query_scalar("SELECT current_schema()::text").fetch_one(&pool).await?;
        let channel = channel_for(&schema);
        let events = broadcast::channel(4096).0;
        let listener = tokio::spawn(listen(pool.clone(), channel.clone(), origin.clone(), events.clone()));
        Ok(PgStore {
            pool,
            opts,
            origin,
            channel,
            events,
            listener: Some(listener),
            boot: std::sync::Mutex::new(None),
            leader: tokio::sync::Mutex::new(None),
        })
    }

    async fn begin(&self) -> StoreResult<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }

    /// Sends the transaction's events, then commits (PostgreSQL delivers them only if the commit succeeds).
    async fn commit(&self, mut tx: Transaction<'static, Postgres>, ev: Events) -> StoreResult<()> {
        for e in ev {
            let payload = serde_json::to_string(&Wire { o: self.origin.clone(), ev: e }).expect("events serialise");
            sqlx::query("SELECT pg_notify($1, $2)").bind(&self.channel).bind(payload).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Closes the pool and gives up leadership.
    pub async fn close(&self) {
        if let Some(l) = &self.listener {
            l.abort();
        }
        if let Some((c, _)) = self.leader.lock().await.take() {
            let _ = c.close().await;
        }
        self.pool.close().await;
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn start_boot(&self, boot_id: &str, now: Millis) -> StoreResult<BootReport> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        // One gateway at a time may do this: others starting at once wait here.
        sqlx::query("LOCK TABLE boots IN EXCLUSIVE MODE").execute(&mut *tx).await?;
        let others =
            sqlx::query("SELECT id FROM boots WHERE reaped_at IS NULL ORDER BY started_at").fetch_all(&mut *tx).await?;
        let mut report = BootReport::default();
        for r in others {
            let id: String = r.try_get("id")?;
            reap_in(&mut tx, &mut ev, &id, now, &mut report).await?;
        }
        sqlx::query("INSERT INTO boots (id, started_at, heartbeat_at) VALUES ($1, $2, $2)")
            .bind(boot_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        report.tokens_revoked +=
            sqlx::query("UPDATE runner_tokens SET revoked_at = $1 WHERE revoked_at IS NULL AND boot_id != $2")
                .bind(now)
                .bind(boot_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        sqlx::query("UPDATE webhook_deliveries SET lease_until = NULL WHERE state = 'pending'")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE state != 'completed' AND mode != 'queue' AND boot_id != $1 ORDER BY seq \
             FOR UPDATE",
        )
        .bind(boot_id)
        .fetch_all(&mut *tx)
        .await?;
        for r in rows {
            let id: String = r.try_get("id")?;
            write_outcome(&mut tx, &mut ev, &id, &crate::gateway_restarted(), now).await?;
            report.failed.push(id);
        }
        let rows = sqlx::query("SELECT id, attempts FROM jobs WHERE state = 'running' ORDER BY seq")
            .fetch_all(&mut *tx)
            .await?;
        report.record(fail_rows_in(&mut tx, &mut ev, rows, now).await?);
        self.commit(tx, ev).await?;
        *self.boot.lock().unwrap() = Some(boot_id.to_string());
        Ok(report)
    }

    async fn join_cluster(&self, boot_id: &str, url: Option<&str>, now: Millis) -> StoreResult<()> {
        sqlx::query("INSERT INTO boots (id, url, started_at, heartbeat_at) VALUES ($1, $2, $3, $3)")
            .bind(boot_id)
            .bind(url)
            .bind(now)
            .execute(&self.pool)
            .await?;
        *self.boot.lock().unwrap() = Some(boot_id.to_string());
        Ok(())
    }

    async fn heartbeat_boot(&self, boot_id: &str, now: Millis) -> StoreResult<bool> {
        let n = sqlx::query("UPDATE boots SET heartbeat_at = $1 WHERE id = $2 AND reaped_at IS NULL")
            .bind(now)
            .bind(boot_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn reap_boots(&self, dead_before: Millis, also: Option<&str>, now: Millis) -> StoreResult<BootReport> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        let rows = sqlx::query(
            "SELECT id FROM boots WHERE reaped_at IS NULL AND (heartbeat_at < $1 OR id = $2) ORDER BY started_at \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(dead_before)
        .bind(also)
        .fetch_all(&mut *tx)
        .await?;
        let mut report = BootReport::default();
        for r in rows {
            let id: String = r.try_get("id")?;
            reap_in(&mut tx, &mut ev, &id, now, &mut report).await?;
        }
        self.commit(tx, ev).await?;
        Ok(report)
    }

    async fn get_boot(&self, boot_id: &str) -> StoreResult<Option<BootRecord>> {
        let row = sqlx::query("SELECT * FROM boots WHERE id = $1").bind(boot_id).fetch_optional(&self.pool).await?;
        row.map(|r| boot_from_row!(&r)).transpose()
    }

    async fn try_lead(&self) -> StoreResult<bool> {
        let mut slot = self.leader.lock().await;
        if let Some((c, held)) = slot.as_mut() {
            let res = if *held {
                sqlx::query("SELECT 1").execute(&mut *c).await.map(|_| true)
            } else {
                sqlx::query_scalar::<_, bool>(
                    "SELECT pg_try_advisory_lock(hashtextextended('darkroom-leader:' || current_schema(), 0))",
                )
                .fetch_one(&mut *c)
                .await
            };
            match res {
                Ok(h) => {
                    *held = h;
                    return Ok(h);
                }
                Err(e) => {
                    // The connection is gone, and the lock with it.
                    *slot = None;
                    return Err(e.into());
                }
            }
        }
        let mut c = PgConnection::connect_with(&self.opts).await?;
        let held = sqlx::query_scalar::<_, bool>(
            "SELECT pg_try_advisory_lock(hashtextextended('darkroom-leader:' || current_schema(), 0))",
        )
        .fetch_one(&mut c)
        .await?;
        *slot = Some((c, held));
        Ok(held)
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        Some(self.events.subscribe())
    }

    async fn ensure_setting(&self, name: &str, value: &str) -> StoreResult<String> {
        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(sqlx::query_scalar("SELECT value FROM settings WHERE name = $1").bind(name).fetch_one(&self.pool).await?)
    }

    async fn insert_key(&self, k: &KeyRecord) -> StoreResult<()> {
        let res = sqlx::query(
            "INSERT INTO api_keys (key_id, owner_id, secret_hash, scope, name, created_at, revoked_at, webhook_dialect) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&k.key_id)
        .bind(&k.owner_id)
        .bind(&k.secret_hash)
        .bind(&k.scope)
        .bind(&k.name)
        .bind(k.created_at)
        .bind(k.revoked_at)
        .bind(&k.webhook_dialect)
        .execute(&self.pool)
        .await;
        match res {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Duplicate(k.key_id.clone())),
            r => r.map(|_| ()).map_err(Into::into),
        }
    }

    async fn get_key(&self, key_id: &str) -> StoreResult<Option<KeyRecord>> {
        let row =
            sqlx::query("SELECT * FROM api_keys WHERE key_id = $1").bind(key_id).fetch_optional(&self.pool).await?;
        row.map(|r| key_from_row!(&r)).transpose()
    }

    async fn list_keys(&self, owner_id: Option<&str>) -> StoreResult<Vec<KeyRecord>> {
        let rows =
            sqlx::query("SELECT * FROM api_keys WHERE ($1::text IS NULL OR owner_id = $1) ORDER BY created_at, key_id")
                .bind(owner_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| key_from_row!(r)).collect()
    }

    async fn revoke_key(&self, key_id: &str, now: Millis) -> StoreResult<bool> {
        let n = sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(key_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn insert_runner_token(&self, t: &RunnerTokenRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO runner_tokens (token_hash, boot_id, app_id, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&t.token_hash)
        .bind(&t.boot_id)
        .bind(&t.app_id)
        .bind(t.created_at)
        .bind(t.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_runner_token(&self, token_hash: &str) -> StoreResult<Option<RunnerTokenRecord>> {
        let row = sqlx::query("SELECT * FROM runner_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| token_from_row!(&r)).transpose()
    }

    async fn enqueue(&self, j: &NewJob) -> StoreResult<JobRecord> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        let rec = insert_job_in(&mut tx, &mut ev, j).await?;
        self.commit(tx, ev).await?;
        Ok(rec)
    }

    async fn enqueue_idempotent(
        &self,
        j: &NewJob,
        key: &str,
        input_hash: &str,
        not_before: Millis,
    ) -> StoreResult<(JobRecord, bool)> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        // Two gateways given the same key at once: the second waits for the first's commit.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended(length($1)::text || ':' || $1 || $2, 1))")
            .bind(&j.owner_id)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let row =
            sqlx::query("SELECT job_id, input_hash, created_at FROM idempotency_keys WHERE owner_id = $1 AND key = $2")
                .bind(&j.owner_id)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(row) = row {
            let created: Millis = row.try_get("created_at")?;
            let job_id: String = row.try_get("job_id")?;
            if created >= not_before {
                if row.try_get::<String, _>("input_hash")? != input_hash {
                    return Err(StoreError::IdempotencyMismatch(job_id));
                }
                let existing =
                    sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")))
                        .bind(&job_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if let Some(r) = existing {
                    let rec = job_from_row(&r)?;
                    tx.commit().await?;
                    return Ok((rec, false));
                }
            }
            sqlx::query("DELETE FROM idempotency_keys WHERE owner_id = $1 AND key = $2")
                .bind(&j.owner_id)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        let rec = insert_job_in(&mut tx, &mut ev, j).await?;
        sqlx::query(
            "INSERT INTO idempotency_keys (owner_id, key, job_id, input_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&j.owner_id)
        .bind(key)
        .bind(&j.id)
        .bind(input_hash)
        .bind(j.created_at)
        .execute(&mut *tx)
        .await?;
        self.commit(tx, ev).await?;
        Ok((rec, true))
    }

    async fn count_active_for_key(&self, key_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM jobs WHERE key_id = $1 AND state != 'completed'")
            .bind(key_id)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn count_queued(&self, app_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'queued' AND app_id = $1")
            .bind(app_id)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<JobRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn queue_position(&self, id: &str) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM jobs q WHERE q.state = 'queued' AND q.app_id = j.app_id \
               AND (q.priority > j.priority OR (q.priority = j.priority AND q.seq < j.seq))) \
             FROM jobs j WHERE j.id = $1 AND j.state = 'queued'",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn count_queued_for_key(&self, key_id: &str, min_priority: i64) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'queued' AND key_id = $1 AND priority >= $2")
            .bind(key_id)
            .bind(min_priority)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn next_queued(&self, app_id: &str, limit: i64) -> StoreResult<Vec<(String, Option<String>)>> {
        // Skips jobs another gateway is claiming right now.
        let rows = sqlx::query(
            "SELECT id, runner_hint FROM jobs WHERE state = 'queued' AND app_id = $1 ORDER BY priority DESC, seq \
             LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(app_id)
        .bind(limit.max(1))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("runner_hint")?))).collect()
    }

    async fn claim(
        &self,
        job_id: &str,
        runner_id: &str,
        lease_until: Millis,
        now: Millis,
    ) -> StoreResult<Option<JobRecord>> {
        let boot = self.boot.lock().unwrap().clone();
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_runner = $1, lease_expires_at = $2, \
             started_at = $3, start_deadline = NULL, lease_boot = $4 \
             WHERE seq = (SELECT seq FROM jobs WHERE id = $5 AND state = 'queued' FOR UPDATE SKIP LOCKED) \
             RETURNING {JOB_COLUMNS}"
        )))
        .bind(runner_id)
        .bind(lease_until)
        .bind(now)
        .bind(boot)
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?;
        let rec = row.as_ref().map(job_from_row).transpose()?;
        if rec.is_some() {
            ev.push(StoreEvent::Changed { job_id: job_id.into() });
        }
        self.commit(tx, ev).await?;
        Ok(rec)
    }

    async fn extend_leases(&self, runner_id: &str, job_ids: &[String], lease_until: Millis) -> StoreResult<u64> {
        if job_ids.is_empty() {
            return Ok(0);
        }
        Ok(sqlx::query(
            "UPDATE jobs SET lease_expires_at = $1 WHERE state = 'running' AND lease_runner = $2 AND id = ANY($3)",
        )
        .bind(lease_until)
        .bind(runner_id)
        .bind(job_ids)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn complete(&self, job_id: &str, token: i64, o: &Outcome, now: Millis) -> StoreResult<CompleteResult> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        let n = sqlx::query(
            "UPDATE jobs SET state = 'completed', completed_at = $1, result_status = $2, result_body = $3, error = $4, \
             error_type = $5, inference_ms = $6, lease_runner = NULL, lease_expires_at = NULL, lease_boot = NULL \
             WHERE id = $7 AND state = 'running' AND attempts = $8",
        )
        .bind(now)
        .bind(o.status as i64)
        .bind(&o.body)
        .bind(&o.error)
        .bind(&o.error_type)
        .bind(o.inference_ms)
        .bind(job_id)
        .bind(token)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            enqueue_webhook_in(&mut tx, job_id, o, now).await?;
            record_usage_in(&mut tx, job_id, o, now).await?;
            ev.push(StoreEvent::Finished { job_id: job_id.into() });
        }
        self.commit(tx, ev).await?;
        Ok(if n == 1 { CompleteResult::Applied } else { CompleteResult::Stale })
    }

    async fn fail_attempt(&self, job_id: &str, token: i64, o: &Outcome, now: Millis) -> StoreResult<AttemptResult> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        let r = fail_attempt_in(&mut tx, &mut ev, job_id, token, o, now).await?;
        self.commit(tx, ev).await?;
        Ok(r)
    }

    async fn release_runner(&self, runner_id: &str, now: Millis) -> StoreResult<Vec<(String, AttemptResult)>> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        let rows =
            sqlx::query("SELECT id, attempts FROM jobs WHERE state = 'running' AND lease_runner = $1 ORDER BY seq")
                .bind(runner_id)
                .fetch_all(&mut *tx)
                .await?;
        let out = fail_rows_in(&mut tx, &mut ev, rows, now).await?;
        self.commit(tx, ev).await?;
        Ok(out)
    }

    async fn expire_leases(&self, now: Millis) -> StoreResult<Vec<(String, AttemptResult)>> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        let rows = sqlx::query(
            "SELECT id, attempts FROM jobs WHERE state = 'running' AND lease_expires_at < $1 ORDER BY seq \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let out = fail_rows_in(&mut tx, &mut ev, rows, now).await?;
        self.commit(tx, ev).await?;
        Ok(out)
    }

    async fn expire_start_deadlines(&self, now: Millis) -> StoreResult<Vec<String>> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        let timeout = Outcome::platform(&ApiError::new(
            ErrorType::RequestTimeout,
            "Request did not start before its X-Fal-Request-Timeout deadline",
        ));
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE state = 'queued' AND start_deadline IS NOT NULL AND start_deadline <= $1 \
             ORDER BY seq FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let id: String = r.try_get("id")?;
            write_outcome(&mut tx, &mut ev, &id, &timeout, now).await?;
            out.push(id);
        }
        self.commit(tx, ev).await?;
        Ok(out)
    }

    async fn cancel(&self, job_id: &str, now: Millis) -> StoreResult<CancelResult> {
        let mut tx = self.begin().await?;
        let mut ev = Events::new();
        let row = sqlx::query("SELECT state, lease_runner, attempts FROM jobs WHERE id = $1 FOR UPDATE")
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
                    let token: i64 = row.try_get("attempts")?;
                    runner.map(|r| (r, token))
                } else {
                    None
                };
                if let Some((runner, token)) = &running_on {
                    ev.push(StoreEvent::Cancelled { job_id: job_id.into(), runner_id: runner.clone(), token: *token });
                }
                sqlx::query("UPDATE jobs SET cancel_requested = TRUE WHERE id = $1")
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                write_outcome(&mut tx, &mut ev, job_id, &Outcome::cancelled(), now).await?;
                CancelResult::Cancelled { running_on }
            }
        };
        self.commit(tx, ev).await?;
        Ok(res)
    }

    async fn append_logs(&self, job_id: &str, token: i64, entries: &[LogEntry]) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let ok = sqlx::query("SELECT 1 FROM jobs WHERE id = $1 AND state = 'running' AND attempts = $2 FOR SHARE")
            .bind(job_id)
            .bind(token)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !ok {
            return Ok(false);
        }
        let ts: Vec<i64> = entries.iter().map(|e| e.timestamp).collect();
        let levels: Vec<&str> = entries.iter().map(|e| e.level.as_str()).collect();
        let messages: Vec<&str> = entries.iter().map(|e| e.message.as_str()).collect();
        sqlx::query(
            "INSERT INTO job_logs (job_id, ts, level, message) \
             SELECT $1, t, l, m FROM unnest($2::bigint[], $3::text[], $4::text[]) WITH ORDINALITY AS u(t, l, m, n) \
             ORDER BY n",
        )
        .bind(job_id)
        .bind(ts)
        .bind(levels)
        .bind(messages)
        .execute(&mut *tx)
        .await?;
        self.commit(tx, vec![StoreEvent::Changed { job_id: job_id.into() }]).await?;
        Ok(true)
    }

    async fn get_logs(&self, job_id: &str) -> StoreResult<Vec<LogEntry>> {
        let rows = sqlx::query("SELECT ts, level, message FROM job_logs WHERE job_id = $1 ORDER BY seq")
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| log_from_row!(r)).collect()
    }

    async fn list_jobs(&self, f: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let limit = if f.limit <= 0 { 100 } else { f.limit.min(1000) };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1::text IS NULL OR owner_id = $1) \
             AND ($2::text IS NULL OR app_id = $2) AND ($3::text IS NULL OR state = $3) \
             AND ($5::bigint IS NULL OR created_at >= $5) AND ($6::bigint IS NULL OR created_at < $6) \
             ORDER BY seq DESC LIMIT $4"
        )))
        .bind(&f.owner_id)
        .bind(&f.app_id)
        .bind(&f.state)
        .bind(limit)
        .bind(f.created_after)
        .bind(f.created_before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn app_depths(&self) -> StoreResult<Vec<AppDepth>> {
        let rows = sqlx::query(
            "SELECT app_id, count(*) FILTER (WHERE state = 'queued') AS queued, \
             count(*) FILTER (WHERE state = 'running') AS running, \
             min(created_at) FILTER (WHERE state = 'queued') AS oldest_queued_at FROM jobs \
             WHERE state != 'completed' GROUP BY app_id ORDER BY app_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| depth_from_row!(r)).collect()
    }

    async fn claim_due_webhooks(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        let rows = sqlx::query(
            "UPDATE webhook_deliveries SET lease_until = $1 WHERE id IN (SELECT id FROM webhook_deliveries \
             WHERE state = 'pending' AND next_attempt_at <= $2 AND (lease_until IS NULL OR lease_until < $2) \
             ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING *",
        )
        .bind(lease_until)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows.iter().map(|r| delivery_from_row!(r)).collect::<StoreResult<Vec<_>>>()?;
        out.sort_by_key(|d| d.next_attempt_at);
        Ok(out)
    }

    async fn next_webhook_due(&self) -> StoreResult<Option<Millis>> {
        Ok(sqlx::query_scalar(
            "SELECT min(greatest(next_attempt_at, coalesce(lease_until, 0))) FROM webhook_deliveries \
             WHERE state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        a: &WebhookAttempt,
        next: DeliveryNext,
        now: Millis,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, status, error) \
             VALUES ($1, $2, $3, $4, $5, $6)",
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
            "UPDATE webhook_deliveries SET attempts = attempts + 1, state = $1, next_attempt_at = $2, \
             lease_until = NULL, last_status = $3, last_error = $4, delivered_at = coalesce($5, delivered_at) \
             WHERE id = $6 AND lease_until IS NOT NULL",
        )
        .bind(state)
        .bind(next_at)
        .bind(a.status)
        .bind(&a.error)
        .bind(delivered_at)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_webhooks(&self, f: &WebhookFilter) -> StoreResult<Vec<WebhookDelivery>> {
        let limit = if f.limit <= 0 { 100 } else { f.limit.min(1000) };
        let rows = sqlx::query(
            "SELECT * FROM webhook_deliveries WHERE ($1::text IS NULL OR owner_id = $1) \
             AND ($2::text IS NULL OR job_id = $2) AND ($3::text IS NULL OR state = $3) \
             ORDER BY created_at DESC, id DESC LIMIT $4",
        )
        .bind(&f.owner_id)
        .bind(&f.job_id)
        .bind(&f.state)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| delivery_from_row!(r)).collect()
    }

    async fn get_webhook(&self, id: &str) -> StoreResult<Option<(WebhookDelivery, Vec<WebhookAttempt>)>> {
        let Some(row) =
            sqlx::query("SELECT * FROM webhook_deliveries WHERE id = $1").bind(id).fetch_optional(&self.pool).await?
        else {
            return Ok(None);
        };
        let d = delivery_from_row!(&row)?;
        let rows = sqlx::query("SELECT * FROM webhook_attempts WHERE delivery_id = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        let attempts = rows.iter().map(|r| attempt_from_row!(r)).collect::<StoreResult<Vec<_>>>()?;
        Ok(Some((d, attempts)))
    }

    async fn redeliver_webhook(&self, id: &str, now: Millis) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', round_start = attempts, next_attempt_at = $1, \
             lease_until = NULL WHERE id = $2 AND (lease_until IS NULL OR lease_until < $1)",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn delete_payload(&self, job_id: &str, now: Millis) -> StoreResult<DeleteResult> {
        let mut tx = self.begin().await?;
        let row = sqlx::query("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?;
        let res = match row {
            None => DeleteResult::NotFound,
            Some(r) if r.try_get::<String, _>("state")? != "completed" => DeleteResult::NotCompleted,
            Some(_) => {
                purge_in(&mut tx, job_id, now).await?;
                DeleteResult::Deleted
            }
        };
        tx.commit().await?;
        Ok(res)
    }

    async fn purge_payloads(&self, completed_before: Millis, now: Millis, limit: i64) -> StoreResult<Vec<String>> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE state = 'completed' AND payload_deleted_at IS NULL AND completed_at < $1 \
             ORDER BY completed_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(completed_before)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.try_get("id")?;
            purge_in(&mut tx, &id, now).await?;
            out.push(id);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn disable_retries(&self, job_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE jobs SET no_retry = TRUE WHERE id = $1").bind(job_id).execute(&self.pool).await?;
        Ok(())
    }

    async fn list_signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>> {
        let rows = sqlx::query("SELECT * FROM signing_keys ORDER BY created_at, kid").fetch_all(&self.pool).await?;
        rows.iter().map(|r| signing_key_from_row!(r)).collect()
    }

    async fn insert_signing_key(&self, k: &SigningKeyRecord, retire_others: bool) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if retire_others {
            sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
                .bind(k.created_at)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("INSERT INTO signing_keys (kid, secret, created_at, retired_at) VALUES ($1, $2, $3, $4)")
            .bind(&k.kid)
            .bind(&k.secret)
            .bind(k.created_at)
            .bind(k.retired_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_cold_start(&self, job_id: &str, token: i64, ms: i64) -> StoreResult<bool> {
        let n =
            sqlx::query("UPDATE jobs SET cold_start_ms = $1 WHERE id = $2 AND attempts = $3 AND state != 'completed'")
                .bind(ms)
                .bind(job_id)
                .bind(token)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(n == 1)
    }

    async fn list_app_scaling(&self) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT app_id, patch FROM app_scaling ORDER BY app_id").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((r.try_get("app_id")?, r.try_get("patch")?))).collect()
    }

    async fn set_app_scaling(&self, app_id: &str, patch: Option<&str>, now: Millis) -> StoreResult<()> {
        match patch {
            Some(p) => {
                sqlx::query(
                    "INSERT INTO app_scaling (app_id, patch, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (app_id) DO UPDATE SET patch = excluded.patch, updated_at = excluded.updated_at",
                )
                .bind(app_id)
                .bind(p)
                .bind(now)
                .execute(&self.pool)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM app_scaling WHERE app_id = $1").bind(app_id).execute(&self.pool).await?;
            }
        }
        Ok(())
    }

    async fn insert_file(&self, f: &FileRecord) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO files (id, owner_id, file_name, content_type, size, state, public, job_id, created_at, \
             completed_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
        tx.commit().await?;
        Ok(())
    }

    async fn get_file(&self, id: &str) -> StoreResult<Option<FileRecord>> {
        let row = sqlx::query("SELECT * FROM files WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(|r| file_from_row!(r)).transpose()
    }

    async fn finish_file(&self, id: &str, size: i64, now: Millis) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE files SET state = 'ready', size = $1, completed_at = $2 WHERE id = $3 AND state = 'pending'",
        )
        .bind(size)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn list_files(&self, filter: &FileFilter) -> StoreResult<Vec<FileRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM files WHERE ($1 IS NULL OR owner_id = $1) AND ($2 IS NULL OR id < $2) \
             AND state = 'ready' ORDER BY id DESC LIMIT $3",
        )
        .bind(&filter.owner_id)
        .bind(&filter.before)
        .bind(filter.limit.clamp(1, 1000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| file_from_row!(r)).collect()
    }

    async fn delete_file(&self, id: &str) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("DELETE FROM files WHERE id = $1").bind(id).execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn expired_files(&self, now: Millis, pending_before: Millis, limit: i64) -> StoreResult<Vec<FileRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM files WHERE (expires_at IS NOT NULL AND expires_at <= $1) \
             OR (state = 'pending' AND created_at < $2) ORDER BY created_at LIMIT $3",
        )
        .bind(now)
        .bind(pending_before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| file_from_row!(r)).collect()
    }

    async fn list_usage(&self, f: &UsageFilter) -> StoreResult<Vec<UsageLine>> {
        let (sql, args) = crate::usage::list_sql(crate::usage::Dialect::Postgres, f);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for a in args {
            q = match a {
                crate::usage::Arg::S(v) => q.bind(v),
                crate::usage::Arg::I(v) => q.bind(v),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(crate::usage::line_from_row!(r))).collect()
    }

    async fn summarize_usage(
        &self,
        f: &UsageFilter,
        bucket_ms: Option<i64>,
        groups: &[UsageGroup],
    ) -> StoreResult<Vec<UsageBucket>> {
        let (sql, args) = crate::usage::summary_sql(crate::usage::Dialect::Postgres, f, bucket_ms, groups);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for a in args {
            q = match a {
                crate::usage::Arg::S(v) => q.bind(v),
                crate::usage::Arg::I(v) => q.bind(v),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(crate::usage::bucket_from_row!(r, bucket_ms.is_some(), groups))).collect()
    }

    async fn owner_spend(&self, owner_id: &str, since: Millis) -> StoreResult<i64> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) AS spent FROM usage_lines \
             WHERE owner_id = $1 AND created_at >= $2",
        )
        .bind(owner_id)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("spent")?)
    }

    async fn set_budget(&self, b: &Budget) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO budgets (owner_id, limit_nanos, period, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (owner_id) DO UPDATE SET limit_nanos = excluded.limit_nanos, period = excluded.period, \
             updated_at = excluded.updated_at",
        )
        .bind(&b.owner_id)
        .bind(b.limit_nanos)
        .bind(&b.period)
        .bind(b.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_budget(&self, owner_id: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM budgets WHERE owner_id = $1")
            .bind(owner_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn list_budgets(&self, owner_id: Option<&str>) -> StoreResult<Vec<Budget>> {
        let rows = sqlx::query(
            "SELECT owner_id, limit_nanos, period, updated_at FROM budgets \
             WHERE $1 IS NULL OR owner_id = $1 ORDER BY owner_id",
        )
        .bind(owner_id)
        .bind(owner_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(crate::usage::budget_from_row!(r))).collect()
    }

    async fn put_deployment(&self, d: &DeploymentRecord, expect_version: Option<i64>) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        if let Some(expect) = expect_version {
            let cur: Option<i64> = sqlx::query_scalar("SELECT version FROM deployments WHERE app_id = $1 FOR UPDATE")
                .bind(&d.app_id)
                .fetch_optional(&mut *tx)
                .await?;
            if cur.unwrap_or(0) != expect {
                return Ok(false);
            }
        }
        let res = sqlx::query(
            "INSERT INTO deployments (app_id, owner_id, version, spec, manifest, bundle_digest, bundle_size, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (app_id) DO UPDATE SET owner_id = excluded.owner_id, version = excluded.version, \
             spec = excluded.spec, manifest = excluded.manifest, bundle_digest = excluded.bundle_digest, \
             bundle_size = excluded.bundle_size, updated_at = excluded.updated_at",
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
        .await;
        match res {
            Ok(_) => {}
            // Two first deploys raced: the other one won.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") && expect_version.is_some() => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn get_deployment(&self, app_id: &str) -> StoreResult<Option<DeploymentRecord>> {
        let row = sqlx::query(
            "SELECT app_id, owner_id, version, spec, manifest, bundle_digest, bundle_size, created_at, updated_at \
             FROM deployments WHERE app_id = $1",
        )
        .bind(app_id)
        .fetch_optional(&self.pool)
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
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(crate::deploy::deployment_from_row!(r))).collect()
    }

    async fn delete_deployment(&self, app_id: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM deployments WHERE app_id = $1")
            .bind(app_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn set_secret(&self, sec: &SecretRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO secrets (name, value, updated_at) VALUES ($1, $2, $3) ON CONFLICT (name) \
             DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )
        .bind(&sec.name)
        .bind(&sec.sealed)
        .bind(sec.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_secrets(&self) -> StoreResult<Vec<SecretRecord>> {
        let rows =
            sqlx::query("SELECT name, value, updated_at FROM secrets ORDER BY name").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(crate::deploy::secret_from_row!(r))).collect()
    }

    async fn delete_secret(&self, name: &str) -> StoreResult<bool> {
        let n =
            sqlx::query("DELETE FROM secrets WHERE name = $1").bind(name).execute(&self.pool).await?.rows_affected();
        Ok(n == 1)
    }
}
