//! Pricing, usage and budgets over HTTP: `GET /v1/usage` (time buckets, grouped, JSON or CSV; also at fal's
//! `/v1/models/usage`), `GET /v1/usage/lines`, cost estimates (`POST /v1/models/{owner}/{alias}/estimate` from an
//! input, fal's `POST /v1/models/pricing/estimate` from quantities), `GET /v1/models/pricing`, and per-owner budgets
//! (`/v1/budgets`), enforced at submit with a 429 `budget_exhausted`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{Datelike, TimeZone};
use darkroom_core::app::AppSpec;
use darkroom_core::billing::{cost_nanos, from_nanos};
use darkroom_core::ids::AppRef;
use darkroom_core::job::JobPrices;
use darkroom_core::{ApiError, ErrorType, Millis};
use darkroom_store::{Budget, UsageBucket, UsageFilter, UsageGroup};
use serde_json::{Value, json};

use crate::Gateway;
use crate::auth::Caller;
use crate::error::{ApiErr, ApiResult, err};

pub fn router() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/models/usage", get(usage))
        .route("/v1/usage/lines", get(usage_lines))
        .route("/v1/models/pricing", get(pricing))
        .route("/v1/models/pricing/estimate", post(fal_estimate))
        .route("/v1/models/{owner}/{alias}/estimate", post(estimate))
        .route("/v1/budgets", get(list_budgets))
        .route("/v1/budgets/{owner}", put(set_budget).get(show_budget).delete(delete_budget))
}

/// The prices a request accepted now is billed at.
pub fn job_prices(gw: &Gateway, spec: &AppSpec) -> JobPrices {
    let p = gw.cfg.prices.prices(&spec.id);
    JobPrices { unit: spec.billing.unit, unit_price: p.unit_price, runner_second_price: p.runner_second_price }
}

type BudgetMap = Arc<HashMap<String, Budget>>;

/// Budgets, read from the store at most every few seconds (changes through this gateway apply at once).
#[derive(Default)]
pub struct BudgetCache {
    inner: Mutex<Option<(Instant, BudgetMap)>>,
}

const BUDGET_TTL: Duration = Duration::from_secs(3);

impl BudgetCache {
    pub fn invalidate(&self) {
        *self.inner.lock().unwrap() = None;
    }
    async fn get(&self, gw: &Gateway) -> ApiResult<BudgetMap> {
        if let Some((at, m)) = self.inner.lock().unwrap().as_ref()
            && at.elapsed() < BUDGET_TTL
        {
            return Ok(m.clone());
        }
        let all = gw.store.list_budgets(None).await?;
        let m = Arc::new(all.into_iter().map(|b| (b.owner_id.clone(), b)).collect::<HashMap<_, _>>());
        *self.inner.lock().unwrap() = Some((Instant::now(), m.clone()));
        Ok(m)
    }
}

/// Start and end (None: never) of a budget period containing `now`.
pub fn period_bounds(period: &str, now: Millis) -> (Millis, Option<Millis>) {
    let t = chrono::Utc.timestamp_millis_opt(now).single().unwrap_or_default();
    let day = t.date_naive();
    let at = |d: chrono::NaiveDate| d.and_hms_opt(0, 0, 0).map(|x| x.and_utc().timestamp_millis()).unwrap_or(0);
    match period {
        "day" => (at(day), day.succ_opt().map(at)),
        "month" => {
            let first = day.with_day(1).unwrap_or(day);
            let next = if first.month() == 12 {
                chrono::NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
            } else {
                chrono::NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
            };
            (at(first), next.map(at))
        }
        _ => (i64::MIN, None),
    }
}

/// Refuses a new request of an owner whose budget for the period is spent.
pub async fn check_budget(gw: &Gateway, owner_id: &str, now: Millis) -> ApiResult<()> {
    let budgets = gw.budgets.get(gw).await?;
    let Some(b) = budgets.get(owner_id) else { return Ok(()) };
    let (start, end) = period_bounds(&b.period, now);
    let spent = gw.store.owner_spend(owner_id, start).await?;
    if spent < b.limit_nanos {
        return Ok(());
    }
    let currency = &gw.cfg.prices.currency;
    let mut e = ApiError::new(
        ErrorType::BudgetExhausted,
        format!(
            "The {} budget of {:.4} {currency} is spent ({:.4} {currency} used)",
            b.period,
            from_nanos(b.limit_nanos),
            from_nanos(spent)
        ),
    );
    e.retry_after = Some(end.map(|e| ((e - now) / 1000 + 1).max(1) as u64).unwrap_or(86_400));
    Err(ApiErr(e))
}

fn query_pairs(q: &Option<String>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()).into_owned().collect()
}

fn one<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

/// Every value of a repeatable parameter (`?x=a&x=b` or `?x=a,b`).
fn many(pairs: &[(String, String)], name: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == name)
        .flat_map(|(_, v)| v.split(',').map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .collect()
}

fn bad_param(name: &str, msg: impl Into<String>) -> ApiErr {
    ApiErr(darkroom_core::app::validation_error(vec![
        json!({"loc": ["query", name], "msg": msg.into(), "type": "value_error"}),
    ]))
}

/// The owner a caller's usage query is about: their own, or (admins) any or all.
fn owner_scope(caller: &Caller, asked: Option<&str>) -> ApiResult<Option<String>> {
    match asked {
        Some(o) if caller.can_see(o) => Ok(Some(o.to_string())),
        Some(_) => Err(err(ErrorType::Forbidden, "Only admin keys can see other owners' usage")),
        None if caller.is_admin() => Ok(None),
        None => Ok(Some(caller.owner_id.clone())),
    }
}

fn usage_filter(gw: &Gateway, caller: &Caller, pairs: &[(String, String)]) -> ApiResult<(UsageFilter, Millis, Millis)> {
    let now = gw.now();
    let time = |name: &str, default: Millis| -> ApiResult<Millis> {
        match one(pairs, name) {
            None => Ok(default),
            Some(v) => {
                // fal also takes a bare date.
                let v = if v.len() == 10 && v.as_bytes()[4] == b'-' { format!("{v}T00:00:00Z") } else { v.to_string() };
                darkroom_core::parse_time(&v, now).map_err(|e| bad_param(name, e))
            }
        }
    };
    let start = time("start", now - 24 * 3600 * 1000)?;
    let end = time("end", now + 1)?;
    if end <= start {
        return Err(bad_param("end", "end must be after start"));
    }
    let apps = many(pairs, "endpoint_id");
    if apps.len() > 1 {
        return Err(bad_param("endpoint_id", "give at most one endpoint_id"));
    }
    let filter = UsageFilter {
        owner_id: owner_scope(caller, one(pairs, "owner_id").or(one(pairs, "owner")))?,
        key_id: one(pairs, "api_key_id").or(one(pairs, "key_id")).map(str::to_string),
        app_id: apps.into_iter().next().or(one(pairs, "app_id").map(str::to_string)),
        since: Some(start),
        until: Some(end),
        before: None,
        limit: 0,
    };
    Ok((filter, start, end))
}

/// fal's automatic timeframe for a range.
fn auto_timeframe(range_ms: i64) -> &'static str {
    const H: i64 = 3600 * 1000;
    match range_ms {
        r if r < 2 * H => "minute",
        r if r < 48 * H => "hour",
        r if r < 64 * 24 * H => "day",
        r if r < 183 * 24 * H => "week",
        _ => "month",
    }
}

fn bucket_ms(timeframe: &str) -> Option<i64> {
    const M: i64 = 60 * 1000;
    match timeframe {
        "minute" => Some(M),
        "hour" => Some(60 * M),
        "day" | "month" => Some(24 * 60 * M),
        "week" => Some(7 * 24 * 60 * M),
        _ => None,
    }
}

fn result_json(gw: &Gateway, r: &UsageBucket) -> Value {
    let mut v = json!({
        "unit": r.unit,
        "quantity": r.units,
        "requests": r.requests,
        "runner_seconds": r.runner_ms as f64 / 1000.0,
        "cold_starts": r.cold_starts,
        "cost": from_nanos(r.cost_nanos),
        "cost_total": from_nanos(r.cost_nanos),
        "currency": gw.cfg.prices.currency,
    });
    if let Some(a) = &r.app_id {
        v["endpoint_id"] = json!(a);
    }
    if let Some(k) = &r.key_id {
        v["api_key_id"] = json!(k);
    }
    if let Some(o) = &r.owner_id {
        v["owner_id"] = json!(o);
    }
    v
}

/// Merges day buckets into calendar months (UTC).
fn into_months(rows: Vec<UsageBucket>) -> Vec<UsageBucket> {
    let mut out: Vec<UsageBucket> = Vec::new();
    for mut r in rows {
        r.bucket = r.bucket.map(|b| period_bounds("month", b).0);
        match out.iter_mut().find(|o| {
            (o.bucket, &o.app_id, &o.key_id, &o.owner_id, &o.unit)
                == (r.bucket, &r.app_id, &r.key_id, &r.owner_id, &r.unit)
        }) {
            Some(o) => {
                o.requests += r.requests;
                o.units += r.units;
                o.runner_ms += r.runner_ms;
                o.cold_starts += r.cold_starts;
                o.cost_nanos += r.cost_nanos;
            }
            None => out.push(r),
        }
    }
    out
}

/// `GET /v1/usage`: usage per time bucket and per app, key or owner.
async fn usage(State(gw): State<Arc<Gateway>>, headers: HeaderMap, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let caller = gw.authenticate(&headers).await?;
    let pairs = query_pairs(&q);
    let (filter, start, end) = usage_filter(&gw, &caller, &pairs)?;
    let timeframe = one(&pairs, "timeframe").unwrap_or_else(|| auto_timeframe(end - start)).to_string();
    if timeframe != "none" && bucket_ms(&timeframe).is_none() {
        return Err(bad_param("timeframe", "timeframe must be minute, hour, day, week, month or none"));
    }
    let mut groups = Vec::new();
    for g in many(&pairs, "group_by") {
        match UsageGroup::parse(&g) {
            Some(g) if !groups.contains(&g) => groups.push(g),
            Some(_) => {}
            None => return Err(bad_param("group_by", format!("cannot group by '{g}': use app, key or owner"))),
        }
    }
    if groups.is_empty() {
        groups.push(UsageGroup::App);
    }
    let expand = many(&pairs, "expand");
    let want = |x: &str| expand.is_empty() || expand.iter().any(|e| e == x);
    let mut rows = gw.store.summarize_usage(&filter, bucket_ms(&timeframe), &groups).await?;
    if timeframe == "month" {
        rows = into_months(rows);
    }
    let csv = one(&pairs, "format") == Some("csv")
        || headers.get("accept").and_then(|v| v.to_str().ok()).is_some_and(|a| a.starts_with("text/csv"));
    if csv {
        let mut out = String::from(
            "bucket,endpoint_id,api_key_id,owner_id,unit,quantity,requests,runner_seconds,cold_starts,cost,currency\n",
        );
        for r in &rows {
            let field = |s: &Option<String>| csv_field(s.as_deref().unwrap_or(""));
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{:.9},{}\n",
                r.bucket.map(darkroom_core::iso8601).unwrap_or_default(),
                field(&r.app_id),
                field(&r.key_id),
                field(&r.owner_id),
                csv_field(&r.unit),
                r.units,
                r.requests,
                r.runner_ms as f64 / 1000.0,
                r.cold_starts,
                from_nanos(r.cost_nanos),
                gw.cfg.prices.currency
            ));
        }
        return Ok(([("content-type", "text/csv; charset=utf-8")], out).into_response());
    }
    let mut body = json!({
        "start": darkroom_core::iso8601(start),
        "end": darkroom_core::iso8601(end),
        "timeframe": timeframe,
        "currency": gw.cfg.prices.currency,
        "next_cursor": null,
        "has_more": false,
    });
    if want("time_series") && timeframe != "none" {
        let mut series: Vec<(Millis, Vec<Value>)> = Vec::new();
        for r in &rows {
            let b = r.bucket.unwrap_or(start);
            match series.last_mut() {
                Some((at, items)) if *at == b => items.push(result_json(&gw, r)),
                _ => series.push((b, vec![result_json(&gw, r)])),
            }
        }
        body["time_series"] = json!(
            series
                .into_iter()
                .map(|(b, results)| json!({"bucket": darkroom_core::iso8601(b), "results": results}))
                .collect::<Vec<_>>()
        );
    }
    if want("summary") {
        let totals = gw.store.summarize_usage(&filter, None, &groups).await?;
        body["summary"] = json!(totals.iter().map(|r| result_json(&gw, r)).collect::<Vec<_>>());
    }
    Ok(Json(body).into_response())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// `GET /v1/usage/lines`: the line items, newest first (`cursor` pages on).
async fn usage_lines(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Value>> {
    let caller = gw.authenticate(&headers).await?;
    let pairs = query_pairs(&q);
    let (mut filter, _, _) = usage_filter(&gw, &caller, &pairs)?;
    filter.limit = match one(&pairs, "limit") {
        None => 100,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| bad_param("limit", "limit must be 1 to 1000"))?,
    };
    filter.before = one(&pairs, "cursor").map(str::to_string);
    let lines = gw.store.list_usage(&filter).await?;
    let next = if lines.len() as i64 == filter.limit { lines.last().map(|l| l.id.clone()) } else { None };
    let items: Vec<Value> = lines
        .iter()
        .map(|l| {
            json!({
                "id": l.id, "request_id": l.job_id, "endpoint_id": if l.path.is_empty() { l.app_id.clone() } else { format!("{}/{}", l.app_id, l.path) },
                "owner_id": l.owner_id, "api_key_id": l.key_id, "status": l.status, "unit": l.unit, "quantity": l.units,
                "unit_price": l.unit_price, "runner_seconds": l.runner_ms as f64 / 1000.0, "runner_second_price": l.runner_second_price,
                "cold_start_ms": l.cold_start_ms, "cost": from_nanos(l.cost_nanos), "cost_nano": l.cost_nanos,
                "currency": gw.cfg.prices.currency, "timestamp": darkroom_core::iso8601(l.created_at),
            })
        })
        .collect();
    Ok(Json(json!({"lines": items, "next_cursor": next, "has_more": next.is_some()})))
}

/// An app's prices as the API shows them.
pub fn pricing_json(gw: &Gateway, spec: &AppSpec) -> Value {
    let p = gw.cfg.prices.prices(&spec.id);
    json!({"unit": spec.billing.unit.as_str(), "unit_price": p.unit_price,
           "runner_second_price": p.runner_second_price, "currency": gw.cfg.prices.currency})
}

fn app_for_endpoint(gw: &Gateway, endpoint: &str) -> ApiResult<(Arc<darkroom_core::app::CompiledApp>, String)> {
    let segs: Vec<&str> = endpoint.trim_matches('/').split('/').collect();
    let (app_ref, rest) = darkroom_core::ids::split_endpoint(&segs).map_err(|_| {
        err(
            ErrorType::AppNotFound,
            format!("'{}' is not an endpoint id (owner/alias[/path])", endpoint.escape_default()),
        )
    })?;
    let (id, path) = (app_ref.id(), rest.join("/"));
    let app = gw.apps.get(&id).ok_or_else(|| err(ErrorType::AppNotFound, format!("App '{id}' not found")))?;
    if !app.has_path(&path) {
        return Err(err(ErrorType::EndpointNotFound, format!("App '{id}' has no endpoint /{path}")));
    }
    Ok((app, path))
}

/// `GET /v1/models/pricing?endpoint_id=…` (fal's shape).
async fn pricing(State(gw): State<Arc<Gateway>>, headers: HeaderMap, RawQuery(q): RawQuery) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?;
    let pairs = query_pairs(&q);
    let mut ids = many(&pairs, "endpoint_id");
    if ids.is_empty() {
        let mut all: Vec<_> = gw.apps.all().values().flat_map(|a| crate::catalog::endpoint_ids(&a.spec)).collect();
        all.sort();
        ids = all;
    }
    let mut prices = Vec::new();
    for id in ids.iter().take(200) {
        let (app, _) = app_for_endpoint(&gw, id)?;
        let p = gw.cfg.prices.prices(&app.spec.id);
        prices.push(json!({"endpoint_id": id, "unit_price": p.unit_price, "unit": app.spec.billing.unit.as_str(),
                           "runner_second_price": p.runner_second_price, "currency": gw.cfg.prices.currency}));
    }
    Ok(Json(json!({"prices": prices, "next_cursor": null, "has_more": false})))
}

/// Mean runner time and cost per request of an app over its recent usage, if it has any.
async fn history(gw: &Gateway, app_id: &str) -> ApiResult<Option<(f64, f64)>> {
    let filter = UsageFilter {
        app_id: Some(app_id.into()),
        since: Some(gw.now() - 30 * 24 * 3600 * 1000),
        ..Default::default()
    };
    let rows = gw.store.summarize_usage(&filter, None, &[]).await?;
    let n: i64 = rows.iter().map(|r| r.requests).sum();
    if n == 0 {
        return Ok(None);
    }
    let ms: i64 = rows.iter().map(|r| r.runner_ms).sum();
    let cost: i64 = rows.iter().map(|r| r.cost_nanos).sum();
    Ok(Some((ms as f64 / n as f64 / 1000.0, from_nanos(cost) / n as f64)))
}

/// `POST /v1/models/{owner}/{alias}/estimate[?path=…][&unit_quantity=…]` with the input as the body: what running
/// it would cost. Units come from the app's rule (or `unit_quantity`), runner time from the app's history.
async fn estimate(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((owner, alias)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?;
    let app_ref = AppRef::parse(&format!("{owner}/{alias}")).map_err(ApiErr)?;
    let pairs = query_pairs(&q);
    let path = one(&pairs, "path").unwrap_or("").trim_matches('/').to_string();
    let endpoint = if path.is_empty() { app_ref.id() } else { format!("{}/{path}", app_ref.id()) };
    let (app, _) = app_for_endpoint(&gw, &endpoint)?;
    let input: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiErr(darkroom_core::app::json_decode_error(&e.to_string())))?
    };
    app.validate(&input).map_err(ApiErr)?;
    let (units, basis) = match one(&pairs, "unit_quantity") {
        Some(v) => match v.parse::<f64>() {
            Ok(u) if u.is_finite() && u >= 0.0 => (Some(u), "unit_quantity"),
            _ => return Err(bad_param("unit_quantity", "unit_quantity must be a number ≥ 0")),
        },
        None => (app.spec.billing.estimate_units(&input), "input"),
    };
    let p = gw.cfg.prices.prices(&app.spec.id);
    let runner_seconds =
        if p.runner_second_price > 0.0 { history(&gw, &app.spec.id).await?.map(|h| h.0) } else { Some(0.0) };
    let cost = match (units, runner_seconds) {
        (Some(u), Some(s)) => {
            Some(from_nanos(cost_nanos(p.unit_price, u, p.runner_second_price, (s * 1000.0).round() as i64)))
        }
        _ => None,
    };
    let note = match (units, runner_seconds) {
        (None, _) => Some(format!(
            "{} is billed per {} and the count depends on what the request fetches or produces: pass ?unit_quantity=N",
            app.spec.id,
            app.spec.billing.unit.as_str()
        )),
        (_, None) => Some("runner time is billed and the app has no usage history yet".to_string()),
        _ => None,
    };
    Ok(Json(json!({
        "endpoint_id": endpoint, "unit": app.spec.billing.unit.as_str(), "quantity": units, "basis": basis,
        "unit_price": p.unit_price, "runner_second_price": p.runner_second_price, "runner_seconds": runner_seconds,
        "cost": cost, "currency": gw.cfg.prices.currency, "note": note,
    })))
}

/// fal's `POST /v1/models/pricing/estimate`: `unit_price` (quantities of units) or `historical_api_price` (calls,
/// priced at each app's mean cost per request).
async fn fal_estimate(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?;
    let req: Value =
        serde_json::from_slice(&body).map_err(|e| ApiErr(darkroom_core::app::json_decode_error(&e.to_string())))?;
    let field = |loc: &[&str], msg: &str| {
        ApiErr(darkroom_core::app::validation_error(vec![
            json!({"loc": std::iter::once("body").chain(loc.iter().copied()).collect::<Vec<_>>(), "msg": msg, "type": "value_error"}),
        ]))
    };
    let kind = req.get("estimate_type").and_then(Value::as_str).unwrap_or("");
    if kind != "unit_price" && kind != "historical_api_price" {
        return Err(field(&["estimate_type"], "estimate_type must be 'unit_price' or 'historical_api_price'"));
    }
    let Some(endpoints) = req.get("endpoints").and_then(Value::as_object).filter(|m| !m.is_empty()) else {
        return Err(field(&["endpoints"], "endpoints must map endpoint ids to quantities"));
    };
    let mut total = 0i64;
    for (id, q) in endpoints {
        let (app, _) = app_for_endpoint(&gw, id)?;
        let p = gw.cfg.prices.prices(&app.spec.id);
        if kind == "unit_price" {
            let u = q.get("unit_quantity").and_then(Value::as_f64).filter(|u| u.is_finite() && *u >= 0.0);
            let u =
                u.ok_or_else(|| field(&["endpoints", id, "unit_quantity"], "unit_quantity must be a number ≥ 0"))?;
            total += cost_nanos(p.unit_price, u, 0.0, 0);
        } else {
            let calls = q.get("call_quantity").and_then(Value::as_i64).filter(|c| *c >= 1);
            let calls = calls
                .ok_or_else(|| field(&["endpoints", id, "call_quantity"], "call_quantity must be an integer ≥ 1"))?;
            let per_call = match history(&gw, &app.spec.id).await? {
                Some((_, c)) => c,
                // No history: one unit per call at the unit price.
                None => p.unit_price,
            };
            total += (per_call * calls as f64 * darkroom_core::billing::NANOS).round() as i64;
        }
    }
    Ok(Json(json!({"estimate_type": kind, "total_cost": from_nanos(total), "currency": gw.cfg.prices.currency})))
}

fn budget_json(gw: &Gateway, b: &Budget, spent: i64) -> Value {
    let (start, end) = period_bounds(&b.period, gw.now());
    json!({
        "owner_id": b.owner_id, "limit": from_nanos(b.limit_nanos), "period": b.period,
        "spent": from_nanos(spent), "remaining": from_nanos((b.limit_nanos - spent).max(0)),
        "period_start": (start != i64::MIN).then(|| darkroom_core::iso8601(start)),
        "period_end": end.map(darkroom_core::iso8601), "currency": gw.cfg.prices.currency,
        "updated_at": darkroom_core::iso8601(b.updated_at),
    })
}

async fn spent(gw: &Gateway, b: &Budget) -> ApiResult<i64> {
    Ok(gw.store.owner_spend(&b.owner_id, period_bounds(&b.period, gw.now()).0).await?)
}

/// `GET /v1/budgets`: every budget (admins) or the caller's own.
async fn list_budgets(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let caller = gw.authenticate(&headers).await?;
    let owner = if caller.is_admin() { None } else { Some(caller.owner_id.as_str()) };
    let mut out = Vec::new();
    for b in gw.store.list_budgets(owner).await? {
        let s = spent(&gw, &b).await?;
        out.push(budget_json(&gw, &b, s));
    }
    Ok(Json(json!({"budgets": out})))
}

async fn show_budget(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(owner): Path<String>,
) -> ApiResult<Json<Value>> {
    let caller = gw.authenticate(&headers).await?;
    let found =
        if caller.can_see(&owner) { gw.store.list_budgets(Some(&owner)).await?.into_iter().next() } else { None };
    let b =
        found.ok_or_else(|| err(ErrorType::NotFound, format!("No budget for owner '{}'", owner.escape_default())))?;
    let s = spent(&gw, &b).await?;
    Ok(Json(budget_json(&gw, &b, s)))
}

/// `PUT /v1/budgets/{owner}` `{"limit": 25.0, "period": "month"}` (admins).
async fn set_budget(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(owner): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    gw.authenticate(&headers).await?.require_admin()?;
    let req: Value =
        serde_json::from_slice(&body).map_err(|e| ApiErr(darkroom_core::app::json_decode_error(&e.to_string())))?;
    let mut detail = Vec::new();
    let limit = req.get("limit").and_then(Value::as_f64).filter(|l| l.is_finite() && *l >= 0.0 && *l < 9e9);
    if limit.is_none() {
        detail.push(json!({"loc": ["body", "limit"], "msg": "limit must be a number ≥ 0 (in the price book's currency)", "type": "value_error"}));
    }
    let period = req.get("period").and_then(Value::as_str).unwrap_or("month");
    if !matches!(period, "day" | "month" | "total") {
        detail.push(
            json!({"loc": ["body", "period"], "msg": "period must be day, month or total", "type": "value_error"}),
        );
    }
    if owner.is_empty() || owner.len() > 200 {
        detail
            .push(json!({"loc": ["path", "owner"], "msg": "owner must be 1 to 200 characters", "type": "value_error"}));
    }
    if !detail.is_empty() {
        return Err(ApiErr(darkroom_core::app::validation_error(detail)));
    }
    let b = Budget {
        owner_id: owner,
        limit_nanos: (limit.unwrap_or(0.0) * darkroom_core::billing::NANOS).round() as i64,
        period: period.to_string(),
        updated_at: gw.now(),
    };
    gw.store.set_budget(&b).await?;
    gw.budgets.invalidate();
    let s = spent(&gw, &b).await?;
    Ok((StatusCode::OK, Json(budget_json(&gw, &b, s))).into_response())
}

async fn delete_budget(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(owner): Path<String>,
) -> ApiResult<Response> {
    gw.authenticate(&headers).await?.require_admin()?;
    if !gw.store.delete_budget(&owner).await? {
        return Err(err(ErrorType::NotFound, format!("No budget for owner '{}'", owner.escape_default())));
    }
    gw.budgets.invalidate();
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_calendar_days_and_months() {
        let t = chrono::Utc.with_ymd_and_hms(2026, 12, 31, 15, 4, 5).unwrap().timestamp_millis();
        let (s, e) = period_bounds("day", t);
        assert_eq!(darkroom_core::iso8601(s), "2026-12-31T00:00:00.000Z");
        assert_eq!(darkroom_core::iso8601(e.unwrap()), "2027-01-01T00:00:00.000Z");
        let (s, e) = period_bounds("month", t);
        assert_eq!(darkroom_core::iso8601(s), "2026-12-01T00:00:00.000Z");
        assert_eq!(darkroom_core::iso8601(e.unwrap()), "2027-01-01T00:00:00.000Z");
        assert_eq!(period_bounds("total", t), (i64::MIN, None));
        assert_eq!(auto_timeframe(3600 * 1000), "minute");
        assert_eq!(auto_timeframe(400 * 24 * 3600 * 1000), "month");
    }
}
