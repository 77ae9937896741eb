//! Test support: a fresh, empty PostgreSQL schema per test on the server `DARKROOM_TEST_DATABASE_URL` names.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection};

/// The variable naming the test server.
pub const TEST_DATABASE_URL: &str = "DARKROOM_TEST_DATABASE_URL";

/// Schemas of earlier runs older than this are dropped when a new one is made.
const STALE_SECS: u64 = 3_600;

/// Creates an empty schema and returns a URL whose connections use it (`options=-c search_path=…`). Panics with a
/// clear message if the variable is unset or the server cannot be reached: PostgreSQL tests never skip silently.
pub async fn pg_url() -> String {
    let base = std::env::var(TEST_DATABASE_URL).unwrap_or_else(|_| {
        panic!(
            "{TEST_DATABASE_URL} is not set: the PostgreSQL tests need a server \
             (scripts/test sets postgres://postgres@127.0.0.1:5432/test)"
        )
    });
    let mut c = PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {TEST_DATABASE_URL}={base}: {e}"));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let stale: Vec<String> = sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'dk\\_%'")
        .fetch_all(&mut c)
        .await
        .unwrap_or_default();
    for name in stale {
        let born = name.split('_').nth(1).and_then(|t| t.parse::<u64>().ok()).unwrap_or(now);
        if born + STALE_SECS < now {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")))
                .execute(&mut c)
                .await;
        }
    }
    let schema = format!("dk_{now}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\""))).execute(&mut c).await.unwrap();
    let _ = c.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}
