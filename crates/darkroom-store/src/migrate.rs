//! `darkroom migrate`: copies a SQLite deployment into PostgreSQL, table by table, in one PostgreSQL
//! transaction (all or nothing), and checks the row counts afterwards.
//!
//! The SQLite side is first recovered as a restart would (running attempts requeued, open sync and stream requests
//! ended, runner tokens revoked), so the copy holds no lease of a process that no longer exists.

use darkroom_core::Millis;
use sqlx::{QueryBuilder, Row};

use crate::pg::PgStore;
use crate::sqlite::SqliteStore;
use crate::{Store, StoreError, StoreResult};

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Int,
    Bool,
}

use Kind::*;

/// Every table, in copy order, with its columns and their kinds. `seq` columns keep their values, and the
/// PostgreSQL sequences are moved past them.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    ("boots", &[("id", Text), ("url", Text), ("started_at", Int), ("heartbeat_at", Int), ("reaped_at", Int)]),
    ("settings", &[("name", Text), ("value", Text)]),
    (
        "api_keys",
        &[
            ("key_id", Text),
            ("owner_id", Text),
            ("secret_hash", Text),
            ("scope", Text),
            ("name", Text),
            ("created_at", Int),
            ("revoked_at", Int),
            ("webhook_dialect", Text),
        ],
    ),
    (
        "runner_tokens",
        &[("token_hash", Text), ("boot_id", Text), ("app_id", Text), ("created_at", Int), ("revoked_at", Int)],
    ),
    (
        "jobs",
        &[
            ("seq", Int),
            ("id", Text),
            ("app_id", Text),
            ("path", Text),
            ("owner_id", Text),
            ("key_id", Text),
            ("mode", Text),
            ("priority", Int),
            ("state", Text),
            ("input", Text),
            ("attempts", Int),
            ("max_attempts", Int),
            ("no_retry", Bool),
            ("lease_runner", Text),
            ("lease_boot", Text),
            ("lease_expires_at", Int),
            ("start_deadline", Int),
            ("runner_hint", Text),
            ("cancel_requested", Bool),
            ("webhook_url", Text),
            ("webhook_dialect", Text),
            ("traceparent", Text),
            ("store_io", Bool),
            ("boot_id", Text),
            ("created_at", Int),
            ("started_at", Int),
            ("completed_at", Int),
            ("result_status", Int),
            ("result_body", Text),
            ("error", Text),
            ("error_type", Text),
            ("inference_ms", Int),
            ("payload_deleted_at", Int),
            ("cold_start_ms", Int),
        ],
    ),
    ("job_logs", &[("seq", Int), ("job_id", Text), ("ts", Int), ("level", Text), ("message", Text)]),
    (
        "webhook_deliveries",
        &[
            ("id", Text),
            ("job_id", Text),
            ("owner_id", Text),
            ("url", Text),
            ("body", Text),
            ("dialect", Text),
            ("state", Text),
            ("attempts", Int),
            ("round_start", Int),
            ("next_attempt_at", Int),
            ("lease_until", Int),
            ("last_status", Int),
            ("last_error", Text),
            ("traceparent", Text),
            ("created_at", Int),
            ("delivered_at", Int),
        ],
    ),
    (
        "webhook_attempts",
        &[
            ("seq", Int),
            ("delivery_id", Text),
            ("attempt", Int),
            ("started_at", Int),
            ("duration_ms", Int),
            ("status", Int),
            ("error", Text),
        ],
    ),
    ("app_scaling", &[("app_id", Text), ("patch", Text), ("updated_at", Int)]),
    ("signing_keys", &[("kid", Text), ("secret", Text), ("created_at", Int), ("retired_at", Int)]),
    (
        "files",
        &[
            ("id", Text),
            ("owner_id", Text),
            ("file_name", Text),
            ("content_type", Text),
            ("size", Int),
            ("state", Text),
            ("public", Bool),
            ("job_id", Text),
            ("created_at", Int),
            ("completed_at", Int),
            ("expires_at", Int),
        ],
    ),
    (
        "idempotency_keys",
        &[("owner_id", Text), ("key", Text), ("job_id", Text), ("input_hash", Text), ("created_at", Int)],
    ),
];

/// Rows per INSERT (the widest table has 33 columns: well under PostgreSQL's 65,535 parameters).
const BATCH: i64 = 1_000;

enum Val {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(Option<bool>),
}

/// What was copied: (table, rows).
#[derive(Debug, Default, Clone)]
pub struct MigrateReport {
    pub tables: Vec<(String, i64)>,
    pub requeued: usize,
    pub ended: usize,
}

/// Rows in every table of the SQLite database (for progress reporting).
pub async fn count_rows(src: &SqliteStore) -> StoreResult<Vec<(&'static str, i64)>> {
    let mut out = Vec::new();
    for (t, _) in TABLES {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {t}")))
            .fetch_one(src.reader())
            .await?;
        out.push((*t, n));
    }
    Ok(out)
}

/// Copies everything from `src` into `dst`, which must be empty. `progress(table, rows_done)` is called after each
/// batch.
pub async fn sqlite_to_postgres(
    src: &SqliteStore,
    dst: &PgStore,
    now: Millis,
    mut progress: impl FnMut(&str, i64),
) -> StoreResult<MigrateReport> {
    let existing: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM jobs) + (SELECT count(*) FROM api_keys) + (SELECT count(*) FROM boots)",
    )
    .fetch_one(dst.pool())
    .await?;
    if existing > 0 {
        return Err(StoreError::Refused(
            "the PostgreSQL database already holds a Darkroom deployment; migrate into an empty one".into(),
        ));
    }
    // Recover as a restart would, under a boot of the migration's own.
    let boot = format!("migrate-{}", darkroom_core::ids::new_request_id());
    let recovered = src.start_boot(&boot, now).await?;
    src.mark_reaped(&boot, now).await?;
    let mut report =
        MigrateReport { requeued: recovered.requeued.len(), ended: recovered.failed.len(), ..Default::default() };

    let mut tx = dst.pool().begin().await?;
    for (table, cols) in TABLES {
        let names = cols.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        let mut done = 0i64;
        let mut last_rowid = i64::MIN;
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT rowid AS _rowid, {names} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?"
            )))
            .bind(last_rowid)
            .bind(BATCH)
            .fetch_all(src.reader())
            .await?;
            if rows.is_empty() {
                break;
            }
            let mut batch: Vec<Vec<Val>> = Vec::with_capacity(rows.len());
            for r in &rows {
                last_rowid = r.try_get("_rowid")?;
                let mut vals = Vec::with_capacity(cols.len());
                for (name, kind) in cols.iter() {
                    vals.push(match kind {
                        Text => Val::Text(r.try_get(*name)?),
                        Int => Val::Int(r.try_get(*name)?),
                        Bool => Val::Bool(r.try_get(*name)?),
                    });
                }
                batch.push(vals);
            }
            let mut qb: QueryBuilder<sqlx::Postgres> = QueryBuilder::new(format!("INSERT INTO {table} ({names}) "));
            qb.push_values(batch, |mut b, row| {
                for v in row {
                    match v {
                        Val::Text(x) => b.push_bind(x),
                        Val::Int(x) => b.push_bind(x),
                        Val::Bool(x) => b.push_bind(x),
                    };
                }
            });
            qb.build().execute(&mut *tx).await?;
            done += rows.len() as i64;
            progress(table, done);
        }
        if cols.iter().any(|(n, _)| *n == "seq") {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'seq'), coalesce((SELECT max(seq) FROM {table}), 0) + 1, \
                 false)"
            )))
            .execute(&mut *tx)
            .await?;
        }
        let copied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&mut *tx)
            .await?;
        if copied != done {
            return Err(StoreError::Corrupt(format!("{table}: copied {done} rows but PostgreSQL holds {copied}")));
        }
        report.tables.push((table.to_string(), done));
    }
    tx.commit().await?;
    Ok(report)
}
