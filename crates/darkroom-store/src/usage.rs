//! Usage lines and budgets: the types, the costing rule both stores apply when a request completes, and the SQL
//! both share (written once, with the placeholder style of each database).

use darkroom_core::Millis;
use darkroom_core::billing::{BillingUnit, cost_nanos};
use darkroom_core::job::Outcome;

/// What one finished request used and cost. Exactly one per finished request, except failures with a 5xx status,
/// which are not billed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsageLine {
    pub id: String,
    /// The request.
    pub job_id: String,
    pub owner_id: String,
    pub key_id: String,
    pub app_id: String,
    pub path: String,
    /// The request's result status (200, a 4xx of the app, 499 for a cancellation).
    pub status: i64,
    pub unit: String,
    /// Billed units: what the app reported for a success (or its default), 0 otherwise.
    pub units: f64,
    pub unit_price: f64,
    pub runner_second_price: f64,
    /// Runner time of the attempt that finished the request (0 if it never started).
    pub runner_ms: i64,
    /// How long the request waited for a runner to start, if it did.
    pub cold_start_ms: Option<i64>,
    /// units × unit price + runner seconds × runner-second price, in nano-units of currency.
    pub cost_nanos: i64,
    pub created_at: Millis,
}

/// What a store reads from the job row to cost its completion.
#[derive(Debug, Clone)]
pub(crate) struct BillingRow {
    pub owner_id: String,
    pub key_id: String,
    pub app_id: String,
    pub path: String,
    pub started_at: Option<Millis>,
    pub cold_start_ms: Option<i64>,
    pub bill_unit: String,
    pub unit_price: f64,
    pub runner_second_price: f64,
}

/// The columns [`BillingRow`] is read from.
pub(crate) const BILLING_COLUMNS: &str =
    "owner_id, key_id, app_id, path, started_at, cold_start_ms, bill_unit, unit_price, runner_second_price";

macro_rules! billing_row {
    ($r:expr) => {{
        #[allow(unused_imports)]
        use sqlx::Row as _;
        let r = $r;
        $crate::usage::BillingRow {
            owner_id: r.try_get("owner_id")?,
            key_id: r.try_get("key_id")?,
            app_id: r.try_get("app_id")?,
            path: r.try_get("path")?,
            started_at: r.try_get("started_at")?,
            cold_start_ms: r.try_get("cold_start_ms")?,
            bill_unit: r.try_get("bill_unit")?,
            unit_price: r.try_get("unit_price")?,
            runner_second_price: r.try_get("runner_second_price")?,
        }
    }};
}
pub(crate) use billing_row;

/// The usage line of a completion, or None for a 5xx (not billed).
pub(crate) fn line_for(job_id: &str, b: BillingRow, o: &Outcome, now: Millis) -> Option<UsageLine> {
    if o.status >= 500 {
        return None;
    }
    let unit = BillingUnit::parse(&b.bill_unit).unwrap_or_default();
    let units =
        if o.status == 200 { o.units.unwrap_or(if unit == BillingUnit::Request { 1.0 } else { 0.0 }) } else { 0.0 };
    let runner_ms = b.started_at.map(|s| (now - s).max(0)).unwrap_or(0);
    Some(UsageLine {
        id: darkroom_core::ids::new_request_id(),
        job_id: job_id.to_string(),
        cost_nanos: cost_nanos(b.unit_price, units, b.runner_second_price, runner_ms),
        owner_id: b.owner_id,
        key_id: b.key_id,
        app_id: b.app_id,
        path: b.path,
        status: i64::from(o.status),
        unit: b.bill_unit,
        units,
        unit_price: b.unit_price,
        runner_second_price: b.runner_second_price,
        runner_ms,
        cold_start_ms: b.cold_start_ms,
        created_at: now,
    })
}

/// The columns of `usage_lines`, in insert order.
pub(crate) const LINE_COLUMNS: &str = "id, job_id, owner_id, key_id, app_id, path, status, unit, units, unit_price, \
     runner_second_price, runner_ms, cold_start_ms, cost_nanos, created_at";

macro_rules! insert_line {
    ($sql:expr, $l:expr, $conn:expr) => {{
        let l = $l;
        sqlx::query($sql)
            .bind(&l.id)
            .bind(&l.job_id)
            .bind(&l.owner_id)
            .bind(&l.key_id)
            .bind(&l.app_id)
            .bind(&l.path)
            .bind(l.status as i32)
            .bind(&l.unit)
            .bind(l.units)
            .bind(l.unit_price)
            .bind(l.runner_second_price)
            .bind(l.runner_ms)
            .bind(l.cold_start_ms)
            .bind(l.cost_nanos)
            .bind(l.created_at)
            .execute($conn)
            .await?;
    }};
}
pub(crate) use insert_line;

macro_rules! line_from_row {
    ($r:expr) => {{
        use sqlx::Row as _;
        let r = $r;
        $crate::usage::UsageLine {
            id: r.try_get("id")?,
            job_id: r.try_get("job_id")?,
            owner_id: r.try_get("owner_id")?,
            key_id: r.try_get("key_id")?,
            app_id: r.try_get("app_id")?,
            path: r.try_get("path")?,
            status: i64::from(r.try_get::<i32, _>("status")?),
            unit: r.try_get("unit")?,
            units: r.try_get("units")?,
            unit_price: r.try_get("unit_price")?,
            runner_second_price: r.try_get("runner_second_price")?,
            runner_ms: r.try_get("runner_ms")?,
            cold_start_ms: r.try_get("cold_start_ms")?,
            cost_nanos: r.try_get("cost_nanos")?,
            created_at: r.try_get("created_at")?,
        }
    }};
}
pub(crate) use line_from_row;

macro_rules! bucket_from_row {
    ($r:expr, $bucketed:expr, $groups:expr) => {{
        use sqlx::Row as _;
        let r = $r;
        let has = |g: $crate::usage::UsageGroup| $groups.contains(&g);
        $crate::usage::UsageBucket {
            bucket: if $bucketed { Some(r.try_get("bucket")?) } else { None },
            app_id: if has($crate::usage::UsageGroup::App) { Some(r.try_get("app_id")?) } else { None },
            key_id: if has($crate::usage::UsageGroup::Key) { Some(r.try_get("key_id")?) } else { None },
            owner_id: if has($crate::usage::UsageGroup::Owner) { Some(r.try_get("owner_id")?) } else { None },
            unit: r.try_get("unit")?,
            requests: r.try_get("requests")?,
            units: r.try_get("units")?,
            runner_ms: r.try_get("runner_ms")?,
            cold_starts: r.try_get("cold_starts")?,
            cost_nanos: r.try_get("cost_nanos")?,
        }
    }};
}
pub(crate) use bucket_from_row;

/// Which usage lines to read.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub owner_id: Option<String>,
    pub key_id: Option<String>,
    pub app_id: Option<String>,
    /// Lines at or after this time.
    pub since: Option<Millis>,
    /// Lines before this time.
    pub until: Option<Millis>,
    /// Only lines with an id below this (the previous page's last id; listing only).
    pub before: Option<String>,
    /// Listing only.
    pub limit: i64,
}

/// What usage can be summed by (besides time and unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    App,
    Key,
    Owner,
}

impl UsageGroup {
    pub fn parse(s: &str) -> Option<UsageGroup> {
        match s {
            "app" | "endpoint" | "endpoint_id" => Some(UsageGroup::App),
            "key" | "api_key" | "api_key_id" => Some(UsageGroup::Key),
            "owner" | "user" => Some(UsageGroup::Owner),
            _ => None,
        }
    }
    fn column(self) -> &'static str {
        match self {
            UsageGroup::App => "app_id",
            UsageGroup::Key => "key_id",
            UsageGroup::Owner => "owner_id",
        }
    }
}

/// Usage summed over one time bucket and group.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsageBucket {
    /// Start of the bucket (None when not bucketed).
    pub bucket: Option<Millis>,
    pub app_id: Option<String>,
    pub key_id: Option<String>,
    pub owner_id: Option<String>,
    pub unit: String,
    pub requests: i64,
    pub units: f64,
    pub runner_ms: i64,
    /// Requests that waited for a runner to start.
    pub cold_starts: i64,
    pub cost_nanos: i64,
}

/// An owner's spending limit over a period.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Budget {
    pub owner_id: String,
    pub limit_nanos: i64,
    /// `day`, `month` (calendar, UTC) or `total`.
    pub period: String,
    pub updated_at: Millis,
}

macro_rules! budget_from_row {
    ($r:expr) => {{
        use sqlx::Row as _;
        let r = $r;
        $crate::usage::Budget {
            owner_id: r.try_get("owner_id")?,
            limit_nanos: r.try_get("limit_nanos")?,
            period: r.try_get("period")?,
            updated_at: r.try_get("updated_at")?,
        }
    }};
}
pub(crate) use budget_from_row;

/// A value bound to a query built here.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    S(String),
    I(i64),
}

/// Placeholder style.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

struct Sql {
    dialect: Dialect,
    args: Vec<Arg>,
}

impl Sql {
    fn arg(&mut self, a: Arg) -> String {
        self.args.push(a);
        match self.dialect {
            Dialect::Sqlite => "?".into(),
            Dialect::Postgres => format!("${}", self.args.len()),
        }
    }
    fn filter(&mut self, f: &UsageFilter, with_cursor: bool) -> String {
        let mut w = vec!["1 = 1".to_string()];
        if let Some(o) = &f.owner_id {
            w.push(format!("owner_id = {}", self.arg(Arg::S(o.clone()))));
        }
        if let Some(k) = &f.key_id {
            w.push(format!("key_id = {}", self.arg(Arg::S(k.clone()))));
        }
        if let Some(a) = &f.app_id {
            w.push(format!("app_id = {}", self.arg(Arg::S(a.clone()))));
        }
        if let Some(t) = f.since {
            w.push(format!("created_at >= {}", self.arg(Arg::I(t))));
        }
        if let Some(t) = f.until {
            w.push(format!("created_at < {}", self.arg(Arg::I(t))));
        }
        if with_cursor && let Some(b) = &f.before {
            w.push(format!("id < {}", self.arg(Arg::S(b.clone()))));
        }
        w.join(" AND ")
    }
}

/// `SELECT` of usage lines for a filter, newest first.
pub(crate) fn list_sql(d: Dialect, f: &UsageFilter) -> (String, Vec<Arg>) {
    let mut q = Sql { dialect: d, args: vec![] };
    let w = q.filter(f, true);
    let limit = f.limit.clamp(1, 10_000);
    (format!("SELECT {LINE_COLUMNS} FROM usage_lines WHERE {w} ORDER BY id DESC LIMIT {limit}"), q.args)
}

/// The summing query: one row per bucket, group and unit.
pub(crate) fn summary_sql(
    d: Dialect,
    f: &UsageFilter,
    bucket_ms: Option<i64>,
    groups: &[UsageGroup],
) -> (String, Vec<Arg>) {
    let mut q = Sql { dialect: d, args: vec![] };
    let w = q.filter(f, false);
    let mut keys: Vec<String> = Vec::new();
    let mut select: Vec<String> = Vec::new();
    if let Some(b) = bucket_ms {
        // An integer, checked by the caller: safe to inline.
        let b = b.max(1);
        select.push(format!("(created_at / {b}) * {b} AS bucket"));
        keys.push("bucket".into());
    }
    for g in groups {
        select.push(g.column().into());
        keys.push(g.column().into());
    }
    select.push("unit".into());
    keys.push("unit".into());
    select.push(
        "CAST(COUNT(*) AS BIGINT) AS requests, SUM(units) AS units, CAST(SUM(runner_ms) AS BIGINT) AS runner_ms, \
         CAST(SUM(CASE WHEN cold_start_ms IS NULL THEN 0 ELSE 1 END) AS BIGINT) AS cold_starts, \
         CAST(SUM(cost_nanos) AS BIGINT) AS cost_nanos"
            .into(),
    );
    let keys = keys.join(", ");
    (format!("SELECT {} FROM usage_lines WHERE {w} GROUP BY {keys} ORDER BY {keys}", select.join(", ")), q.args)
}
