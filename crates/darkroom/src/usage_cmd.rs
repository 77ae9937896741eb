//! `darkroom usage` (what was used and what it cost), `darkroom budgets` (per-owner spending limits) and
//! `darkroom apps show` (an app's catalog entry), over the server's HTTP API.

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::Client;

#[derive(Args)]
pub struct UsageArgs {
    /// Start of the range: RFC 3339, a date (2026-11-01), or a duration back from now (24h, 7d).
    #[arg(long, default_value = "24h")]
    since: String,
    /// End of the range (exclusive; default now).
    #[arg(long)]
    until: Option<String>,
    /// Time buckets: minute, hour, day, week, month, or none for one row per group (default: chosen from the
    /// range, as fal does).
    #[arg(long)]
    timeframe: Option<String>,
    /// Group by app, key and/or owner (comma-separated).
    #[arg(long, default_value = "app")]
    group_by: String,
    /// Only this app (owner/alias).
    #[arg(long)]
    app: Option<String>,
    /// Only this owner (admin keys see every owner).
    #[arg(long)]
    owner: Option<String>,
    /// Only this API key id.
    #[arg(long)]
    key: Option<String>,
    /// Print CSV instead of a table.
    #[arg(long)]
    csv: bool,
    /// Print the line items (one per finished request) instead of sums.
    #[arg(long)]
    lines: bool,
}

fn query(a: &UsageArgs) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("start", &a.since);
    if let Some(u) = &a.until {
        q.append_pair("end", u);
    }
    if let Some(t) = &a.timeframe {
        q.append_pair("timeframe", t);
    }
    q.append_pair("group_by", &a.group_by);
    if let Some(x) = &a.app {
        q.append_pair("endpoint_id", x);
    }
    if let Some(x) = &a.owner {
        q.append_pair("owner_id", x);
    }
    if let Some(x) = &a.key {
        q.append_pair("api_key_id", x);
    }
    q.finish()
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

pub async fn usage(c: &Client, a: UsageArgs) -> anyhow::Result<()> {
    let q = query(&a);
    if a.lines {
        let v = c.get(&format!("/v1/usage/lines?{q}&limit=1000")).await?;
        println!(
            "{:<24} {:<36} {:<28} {:>6} {:>12} {:<13} {:>9} {:>12}",
            "TIME", "REQUEST", "ENDPOINT", "STATUS", "QUANTITY", "UNIT", "RUNNER_S", "COST"
        );
        for l in v["lines"].as_array().cloned().unwrap_or_default() {
            println!(
                "{:<24} {:<36} {:<28} {:>6} {:>12} {:<13} {:>9.3} {:>12.6}",
                s(&l["timestamp"]),
                s(&l["request_id"]),
                s(&l["endpoint_id"]),
                s(&l["status"]),
                s(&l["quantity"]),
                s(&l["unit"]),
                l["runner_seconds"].as_f64().unwrap_or(0.0),
                l["cost"].as_f64().unwrap_or(0.0)
            );
        }
        return Ok(());
    }
    if a.csv {
        print!("{}", c.get_text(&format!("/v1/usage?{q}&format=csv")).await?);
        return Ok(());
    }
    let v = c.get(&format!("/v1/usage?{q}")).await?;
    let cur = s(&v["currency"]);
    println!("Usage from {} to {} ({} buckets)", s(&v["start"]), s(&v["end"]), s(&v["timeframe"]));
    let header = format!(
        "{:<24} {:<28} {:<14} {:<12} {:<13} {:>9} {:>12} {:>10} {:>6} {:>12}",
        "BUCKET", "APP", "KEY", "OWNER", "UNIT", "REQUESTS", "QUANTITY", "RUNNER_S", "COLD", "COST"
    );
    let row = |bucket: &str, r: &Value| {
        println!(
            "{:<24} {:<28} {:<14} {:<12} {:<13} {:>9} {:>12} {:>10.2} {:>6} {:>12.6}",
            bucket,
            s(&r["endpoint_id"]),
            s(&r["api_key_id"]),
            s(&r["owner_id"]),
            s(&r["unit"]),
            s(&r["requests"]),
            s(&r["quantity"]),
            r["runner_seconds"].as_f64().unwrap_or(0.0),
            s(&r["cold_starts"]),
            r["cost"].as_f64().unwrap_or(0.0)
        )
    };
    println!("{header}");
    for b in v["time_series"].as_array().cloned().unwrap_or_default() {
        for r in b["results"].as_array().cloned().unwrap_or_default() {
            row(&s(&b["bucket"]), &r);
        }
    }
    let summary = v["summary"].as_array().cloned().unwrap_or_default();
    let total: f64 = summary.iter().filter_map(|r| r["cost"].as_f64()).sum();
    for r in &summary {
        row("TOTAL", r);
    }
    println!("Total cost: {total:.6} {cur}");
    Ok(())
}

#[derive(Subcommand)]
pub enum BudgetsCommand {
    /// List budgets with what has been spent in the current period.
    Ls,
    /// Set an owner's budget (admin): new requests get 429 budget_exhausted once it is spent.
    Set {
        owner: String,
        /// The limit, in the price book's currency.
        #[arg(long)]
        limit: f64,
        /// day, month (calendar, UTC) or total.
        #[arg(long, default_value = "month")]
        period: String,
    },
    /// Remove an owner's budget (admin).
    Rm { owner: String },
}

pub async fn budgets(c: &Client, cmd: BudgetsCommand) -> anyhow::Result<()> {
    let print = |b: &Value| {
        println!(
            "{:<20} {:>7} {:>12.4} {:>12.4} {:>12.4} {:<4} {}",
            s(&b["owner_id"]),
            s(&b["period"]),
            b["limit"].as_f64().unwrap_or(0.0),
            b["spent"].as_f64().unwrap_or(0.0),
            b["remaining"].as_f64().unwrap_or(0.0),
            s(&b["currency"]),
            b["period_end"].as_str().map(|e| format!("resets {e}")).unwrap_or_default()
        )
    };
    let header =
        || println!("{:<20} {:>7} {:>12} {:>12} {:>12} {:<4}", "OWNER", "PERIOD", "LIMIT", "SPENT", "REMAINING", "CUR");
    match cmd {
        BudgetsCommand::Ls => {
            let v = c.get("/v1/budgets").await?;
            header();
            for b in v["budgets"].as_array().cloned().unwrap_or_default() {
                print(&b);
            }
        }
        BudgetsCommand::Set { owner, limit, period } => {
            let path = format!("/v1/budgets/{}", urlencode(&owner));
            let b = c.put(&path, &json!({"limit": limit, "period": period})).await?;
            header();
            print(&b);
        }
        BudgetsCommand::Rm { owner } => {
            c.delete(&format!("/v1/budgets/{}", urlencode(&owner))).await?;
            println!("Budget of {owner} removed");
        }
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `darkroom apps show APP`: the catalog entry.
pub async fn show_app(c: &Client, app: &str, json_out: bool) -> anyhow::Result<()> {
    let v = c.get(&format!("/v1/models/{}", app.trim_matches('/'))).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{} — {}", s(&v["app_id"]), s(&v["title"]));
    println!("{}", s(&v["description"]));
    println!();
    println!("Category:  {}", s(&v["category"]));
    let tags: Vec<String> = v["tags"].as_array().cloned().unwrap_or_default().iter().map(s).collect();
    println!("Tags:      {}", tags.join(", "));
    println!("License:   {}", v["license"].as_str().unwrap_or("none (no weights)"));
    let p = &v["pricing"];
    println!(
        "Pricing:   {} {} per {}, {} {} per runner-second",
        s(&p["unit_price"]),
        s(&p["currency"]),
        s(&p["unit"]),
        s(&p["runner_second_price"]),
        s(&p["currency"])
    );
    let r = &v["runners"];
    println!(
        "Runners:   {} (idle {}, busy {}, starting {}; queued {}, running {})",
        s(&r["state"]),
        s(&r["idle"]),
        s(&r["busy"]),
        s(&r["starting"]),
        s(&r["queued"]),
        s(&r["running"])
    );
    println!("OpenAPI:   {}", s(&v["openapi_url"]));
    println!("llms.txt:  {}", s(&v["llms_txt_url"]));
    for e in v["endpoints"].as_array().cloned().unwrap_or_default() {
        println!();
        println!("Endpoint {}", s(&e["endpoint_id"]));
        println!("  queue: {}", s(&e["queue_url"]));
        println!("  run:   {}", s(&e["run_url"]));
        let schema = &e["input_schema"];
        let required: Vec<String> = schema["required"].as_array().cloned().unwrap_or_default().iter().map(s).collect();
        if let Some(props) = schema["properties"].as_object() {
            println!("  input:");
            for (name, p) in props {
                let flag = if required.contains(name) { " (required)" } else { "" };
                let desc = p["description"].as_str().unwrap_or("").lines().next().unwrap_or("");
                println!("    {name}{flag}: {desc}");
            }
        }
        for ex in e["examples"].as_array().cloned().unwrap_or_default() {
            println!("  example ({}): {}", s(&ex["title"]), ex["input"]);
        }
    }
    Ok(())
}
