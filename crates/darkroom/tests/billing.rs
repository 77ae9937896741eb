//! Catalog, usage and billing end to end: a real `darkroom serve` with a price book, real runner processes, on
//! 127.0.0.1.

mod common;

use common::{APP, Server};
use serde_json::{Value, json};

const PRICES: &str = r#"
currency = "EUR"
[default]
runner_second_price = 0.0
[apps."darkroom/diagnostics"]
unit_price = 0.25
[apps."darkroom/whisper"]
unit_price = 0.0001
runner_second_price = 0.002
"#;

async fn get(s: &Server, key: &str, path: &str) -> (u16, Value) {
    let r = s.http.get(format!("{}{path}", s.url)).header("authorization", format!("Key {key}")).send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

async fn send(s: &Server, key: &str, method: reqwest::Method, path: &str, body: Value) -> (u16, Value, Option<String>) {
    let r = s
        .http
        .request(method, format!("{}{path}", s.url))
        .header("authorization", format!("Key {key}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    (code, r.json().await.unwrap_or(Value::Null), retry)
}

async fn submit_as(s: &Server, key: &str, input: Value) -> (u16, Value, Option<String>) {
    send(s, key, reqwest::Method::POST, &format!("/queue/{APP}"), input).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_search_detail_and_llms_txt() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.toml");
    std::fs::write(&prices, PRICES).unwrap();
    let s = Server::start(dir.path(), &["--pricing", prices.to_str().unwrap()]);
    let admin = s.admin.clone();

    let (code, v) = get(&s, &admin, "/v1/models").await;
    assert_eq!(code, 200, "{v}");
    let ids: Vec<&str> = v["models"].as_array().unwrap().iter().map(|m| m["endpoint_id"].as_str().unwrap()).collect();
    for id in ["darkroom/diagnostics", "darkroom/image-utils", "darkroom/piper-tts", "darkroom/whisper"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    assert_eq!(v["has_more"], false);
    let whisper = v["models"].as_array().unwrap().iter().find(|m| m["endpoint_id"] == "darkroom/whisper").unwrap();
    let meta = &whisper["metadata"];
    assert_eq!(meta["category"], "speech-to-text");
    assert_eq!(meta["status"], "active");
    assert_eq!(meta["license"], "MIT");
    assert_eq!(meta["license_type"], "commercial");
    assert_eq!(
        meta["pricing"],
        json!({"unit": "audio_second", "unit_price": 0.0001, "runner_second_price": 0.002, "currency": "EUR"})
    );
    assert!(meta["model_url"].as_str().unwrap().ends_with("/run/darkroom/whisper"), "{meta}");
    assert!(whisper.get("input_schema").is_none(), "schemas only with expand=schemas");

    // Search by text, category, owner, id; pagination.
    let (_, v) = get(&s, &admin, "/v1/models?q=speech%20text").await;
    let found: Vec<&str> = v["models"].as_array().unwrap().iter().map(|m| m["endpoint_id"].as_str().unwrap()).collect();
    assert!(found.contains(&"darkroom/whisper") && found.contains(&"darkroom/piper-tts"), "{found:?}");
    assert!(!found.contains(&"darkroom/diagnostics"), "{found:?}");
    let (_, v) = get(&s, &admin, "/v1/models?category=text-to-speech&expand=schemas").await;
    assert_eq!(v["models"].as_array().unwrap().len(), 1);
    assert_eq!(v["models"][0]["endpoint_id"], "darkroom/piper-tts");
    assert!(v["models"][0]["input_schema"]["properties"]["text"].is_object());
    let (_, v) = get(&s, &admin, "/v1/models?owner=nobody").await;
    assert_eq!(v["models"], json!([]));
    let (_, v) = get(&s, &admin, "/v1/models?endpoint_id=darkroom/diagnostics&expand=openapi-3.0").await;
    assert_eq!(v["models"].as_array().unwrap().len(), 1);
    assert_eq!(v["models"][0]["openapi"]["openapi"], "3.1.0");
    let (_, p1) = get(&s, &admin, "/v1/models?limit=2").await;
    assert_eq!(p1["models"].as_array().unwrap().len(), 2);
    assert_eq!(p1["has_more"], true);
    let cursor = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = get(&s, &admin, &format!("/v1/models?limit=2&cursor={cursor}")).await;
    assert_ne!(p1["models"][0]["endpoint_id"], p2["models"][0]["endpoint_id"]);
    let (code, v) = get(&s, &admin, "/v1/models?limit=0").await;
    assert_eq!((code, v["error_type"].as_str()), (422, Some("validation_error")));
    let (code, v) = get(&s, &admin, "/v1/models?cursor=!!").await;
    assert_eq!(code, 422, "{v}");

    // Detail.
    let (code, d) = get(&s, &admin, "/v1/models/darkroom/diagnostics").await;
    assert_eq!(code, 200, "{d}");
    assert_eq!(d["category"], "test");
    assert_eq!(d["pricing"]["unit_price"], 0.25);
    assert_eq!(d["billing"]["unit"], "request");
    let ep = &d["endpoints"][0];
    assert_eq!(ep["endpoint_id"], APP);
    assert!(ep["input_schema"]["properties"]["echo"].is_object());
    assert!(ep["examples"].as_array().unwrap().iter().any(|e| e["input"]["echo"].is_object()));
    assert!(matches!(d["runners"]["state"].as_str(), Some("warm" | "starting" | "cold")), "{d}");
    assert!(d["runners"]["warm"].is_boolean());
    let (code, v) = get(&s, &admin, "/v1/models/nobody/nothing").await;
    assert_eq!((code, v["error_type"].as_str()), (404, Some("app_not_found")));

    // llms.txt, at the app's root and under /v1/models.
    for path in ["/darkroom/diagnostics/llms.txt", "/v1/models/darkroom/diagnostics/llms.txt"] {
        let r = s.http.get(format!("{}{path}", s.url)).header("authorization", s.auth()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/markdown"));
        let t = r.text().await.unwrap();
        assert!(t.contains("Model ID: `darkroom/diagnostics`"), "{t}");
        assert!(t.contains("`echo`") && t.contains("`sleep_ms`"), "{t}");
        assert!(t.contains("0.25 EUR per request"), "{t}");
        assert!(t.contains("fal_client.subscribe(\"darkroom/diagnostics\""), "{t}");
    }

    // Pricing in fal's shape.
    let (_, v) = get(&s, &admin, "/v1/models/pricing?endpoint_id=darkroom/whisper,darkroom/diagnostics").await;
    assert_eq!(
        v["prices"][0],
        json!({"endpoint_id": "darkroom/whisper", "unit_price": 0.0001, "unit": "audio_second", "runner_second_price": 0.002, "currency": "EUR"})
    );
    assert_eq!(v["prices"].as_array().unwrap().len(), 2);

    // Without a key: 401.
    let r = s.http.get(format!("{}/v1/models", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_estimates_and_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.toml");
    std::fs::write(&prices, PRICES).unwrap();
    let s = Server::start(dir.path(), &["--pricing", prices.to_str().unwrap()]);
    s.wait_runners(1).await;
    let admin = s.admin.clone();
    // A client key of another owner.
    let (code, k, _) =
        send(&s, &admin, reqwest::Method::POST, "/v1/keys", json!({"name": "team", "owner_id": "team-a"})).await;
    assert_eq!(code, 201, "{k}");
    let team = k["key"].as_str().unwrap().to_string();

    // The estimate of an input, before running it.
    let (code, est, _) =
        send(&s, &team, reqwest::Method::POST, "/v1/models/darkroom/diagnostics/estimate", json!({"bill_units": 3}))
            .await;
    assert_eq!(code, 200, "{est}");
    assert_eq!(
        (est["quantity"].as_f64(), est["cost"].as_f64(), est["currency"].as_str()),
        (Some(3.0), Some(0.75), Some("EUR"))
    );
    let (code, bad, _) =
        send(&s, &team, reqwest::Method::POST, "/v1/models/darkroom/diagnostics/estimate", json!({"sleep_ms": -1}))
            .await;
    assert_eq!((code, bad["detail"][0]["loc"].clone()), (422, json!(["body", "sleep_ms"])));
    let (code, w, _) = send(
        &s,
        &team,
        reqwest::Method::POST,
        "/v1/models/darkroom/whisper/estimate",
        json!({"audio_url": "https://example.com/a.wav"}),
    )
    .await;
    assert_eq!(code, 200, "{w}");
    assert!(
        w["quantity"].is_null() && w["cost"].is_null() && w["note"].as_str().unwrap().contains("unit_quantity"),
        "{w}"
    );
    let (_, w, _) = send(
        &s,
        &team,
        reqwest::Method::POST,
        "/v1/models/darkroom/whisper/estimate?unit_quantity=60",
        json!({"audio_url": "https://example.com/a.wav"}),
    )
    .await;
    assert_eq!(w["quantity"], 60.0);
    assert!(w["cost"].is_null(), "runner time is priced and whisper has no history: {w}");
    let (code, f, _) = send(
        &s,
        &team,
        reqwest::Method::POST,
        "/v1/models/pricing/estimate",
        json!({"estimate_type": "unit_price", "endpoints": {"darkroom/diagnostics": {"unit_quantity": 4}}}),
    )
    .await;
    assert_eq!((code, f["total_cost"].as_f64()), (200, Some(1.0)), "{f}");

    // Requests: billed success with reported units, a default success, the app's 422, a 500 (not billed), a cancel.
    let mut ids = Vec::new();
    for input in [
        json!({"bill_units": 3}),
        json!({"echo": 1}),
        json!({"fail": {"status": 422, "message": "bad input"}}),
        json!({"fail": {"status": 500, "message": "boom"}}),
    ] {
        let (code, sub, _) = submit_as(&s, &team, input).await;
        assert_eq!(code, 200, "{sub}");
        ids.push(sub["request_id"].as_str().unwrap().to_string());
    }
    let (_, long, _) = submit_as(&s, &team, json!({"sleep_ms": 60_000})).await;
    let lid = long["request_id"].as_str().unwrap().to_string();
    for id in &ids {
        s.result(id).await;
    }
    s.wait_status(&lid, "IN_PROGRESS").await;
    let r = s.http.put(long["cancel_url"].as_str().unwrap()).header("authorization", s.auth()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    s.wait_status(&lid, "COMPLETED").await;

    let (code, lines) = get(&s, &team, "/v1/usage/lines").await;
    assert_eq!(code, 200, "{lines}");
    let lines = lines["lines"].as_array().unwrap().clone();
    let line = |id: &str| lines.iter().filter(|l| l["request_id"] == id).cloned().collect::<Vec<_>>();
    assert_eq!(lines.len(), 4, "one line per finished request, none for the 500: {lines:?}");
    let first = &line(&ids[0])[0];
    assert_eq!(first["status"], 200);
    assert_eq!(first["quantity"], 3.0);
    assert_eq!(first["cost"].as_f64(), est["cost"].as_f64(), "the estimate matches what the run is billed");
    assert_eq!(first["owner_id"], "team-a");
    assert_eq!(first["api_key_id"], k["key_id"]);
    assert_eq!(line(&ids[1])[0]["quantity"], 1.0);
    assert_eq!(line(&ids[1])[0]["cost"], 0.25);
    assert_eq!((line(&ids[2])[0]["status"].as_i64(), line(&ids[2])[0]["cost"].as_f64()), (Some(422), Some(0.0)));
    assert!(line(&ids[3]).is_empty(), "5xx failures are not billed");
    assert_eq!(line(&lid)[0]["status"], 499);

    // Sums, grouped; CSV; owner scoping.
    let (_, u) = get(&s, &team, "/v1/usage?timeframe=none&group_by=app,key").await;
    let sum = &u["summary"][0];
    assert_eq!(
        (sum["endpoint_id"].as_str(), sum["requests"].as_i64(), sum["cost"].as_f64()),
        (Some(APP), Some(4), Some(1.0)),
        "{u}"
    );
    assert_eq!(sum["api_key_id"], k["key_id"]);
    let (_, u) = get(&s, &team, "/v1/usage?timeframe=minute").await;
    let buckets = u["time_series"].as_array().unwrap();
    assert!(!buckets.is_empty() && buckets[0]["bucket"].as_str().unwrap().ends_with(":00.000Z"), "{u}");
    let r = s
        .http
        .get(format!("{}/v1/usage?format=csv&group_by=owner", s.url))
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = r.text().await.unwrap();
    assert!(csv.starts_with("bucket,endpoint_id,api_key_id,owner_id,unit,quantity"), "{csv}");
    assert!(csv.lines().any(|l| l.contains(",team-a,request,")), "{csv}");
    let (code, _) = get(&s, &team, "/v1/usage?owner_id=local").await;
    assert_eq!(code, 403, "a client key cannot read another owner's usage");
    let (_, mine) = get(&s, &admin, "/v1/usage/lines?owner_id=local").await;
    assert_eq!(mine["lines"], json!([]), "the admin's own owner used nothing");
    let (code, v) = get(&s, &team, "/v1/usage?group_by=colour").await;
    assert_eq!(code, 422, "{v}");

    // Budgets: spent ≥ limit refuses new requests with 429 and Retry-After.
    let (code, _, _) = send(&s, &team, reqwest::Method::PUT, "/v1/budgets/team-a", json!({"limit": 1.0})).await;
    assert_eq!(code, 403, "only admins set budgets");
    let (code, b, _) =
        send(&s, &admin, reqwest::Method::PUT, "/v1/budgets/team-a", json!({"limit": 1.0, "period": "day"})).await;
    assert_eq!(code, 200, "{b}");
    assert_eq!((b["spent"].as_f64(), b["remaining"].as_f64()), (Some(1.0), Some(0.0)));
    let (code, v, retry) = submit_as(&s, &team, json!({})).await;
    assert_eq!((code, v["error_type"].as_str()), (429, Some("budget_exhausted")), "{v}");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=86_401).contains(&retry), "until the day ends: {retry}");
    let r = s
        .http
        .post(format!("{}/run/{APP}", s.url))
        .header("authorization", format!("Key {team}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "sync runs too");
    let (code, _, _) = submit_as(&s, &admin, json!({})).await;
    assert_eq!(code, 200, "other owners are not limited");
    let (code, v, _) =
        send(&s, &admin, reqwest::Method::PUT, "/v1/budgets/team-a", json!({"limit": -1, "period": "year"})).await;
    assert_eq!(code, 422);
    assert_eq!(v["detail"].as_array().unwrap().len(), 2, "{v}");
    let (_, list) = get(&s, &team, "/v1/budgets").await;
    assert_eq!(list["budgets"].as_array().unwrap().len(), 1);
    let (code, _, _) = send(&s, &admin, reqwest::Method::DELETE, "/v1/budgets/team-a", Value::Null).await;
    assert_eq!(code, 204);
    let (code, _, _) = submit_as(&s, &team, json!({})).await;
    assert_eq!(code, 200, "budget removed");
}
