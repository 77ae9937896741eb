//! `darkroom bench`: a closed-loop HTTP load generator for the benchmarks in BENCHMARKS.md (never run in CI).
//!
//! `load` sends the same request over `--concurrency` keep-alive connections for `--duration` and prints one JSON
//! line of results; with `--started-field`, each response's runner start time (microseconds since the Unix epoch,
//! from the no-op app's `"timing": true`) gives the queue overhead: request sent → runner started.
//! `poll` submits one request per client and has every client poll its status at a fixed interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Send one request in a closed loop over keep-alive connections; print throughput and latency as JSON.
    Load(LoadArgs),
    /// Submit one queue request per client, then poll each one's status every --interval-ms; print status latency.
    Poll(PollArgs),
    /// Time Whisper (darkroom/whisper's code, in process) on audio files: load time, then per file the median wall
    /// time of --runs transcriptions after one warm-up, the real-time factor and the stage split; JSON lines.
    Stt(SttArgs),
    /// Time Piper (darkroom/piper-tts's code, in process: espeak-ng, ONNX Runtime, WAV) on text files: setup time,
    /// then per file the median wall time of --runs syntheses after one warm-up and the real-time factor; JSON lines.
    Tts(TtsArgs),
}

#[derive(Debug, Args)]
pub struct TtsArgs {
    /// Text files, one request each.
    #[arg(required = true)]
    files: Vec<std::path::PathBuf>,
    /// Timed runs per file (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(Debug, Args)]
pub struct SttArgs {
    /// Audio files (WAV, MP3, FLAC, OGG, M4A).
    #[arg(required = true)]
    files: Vec<std::path::PathBuf>,
    /// The model store's Whisper model.
    #[arg(long, default_value = "whisper-tiny.en")]
    model: String,
    /// Timed runs per file (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The URL to send to (127.0.0.1 only).
    #[arg(long)]
    url: String,
    /// HTTP method.
    #[arg(long, default_value = "POST")]
    method: String,
    /// JSON body to send.
    #[arg(long, default_value = "{}")]
    body: String,
    /// Extra header, `Name: value` (repeatable), e.g. the Authorization header.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Connections, each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    /// Seconds to run (after --warmup).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// A response field holding the runner's start time in µs since the epoch: report request sent → started.
    #[arg(long)]
    started_field: Option<String>,
}

#[derive(Debug, Args)]
pub struct PollArgs {
    /// The gateway's base URL (127.0.0.1 only).
    #[arg(long)]
    url: String,
    /// The app to submit to, e.g. darkroom/diagnostics.
    #[arg(long)]
    app: String,
    /// The input each client submits (choose one that keeps the request queued or running for the whole run).
    #[arg(long, default_value = "{}")]
    body: String,
    /// Extra header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Polling clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Milliseconds between one client's polls.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Seconds to poll.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Cancel the submitted requests at the end.
    #[arg(long)]
    cancel: bool,
}

fn check_loopback(url: &str) -> anyhow::Result<()> {
    let u = url::Url::parse(url).context("--url")?;
    match u.host_str() {
        Some("127.0.0.1") | Some("localhost") | Some("[::1]") => Ok(()),
        _ => bail!("benchmarks talk to 127.0.0.1 only, not {url}"),
    }
}

fn header_map(headers: &[String]) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut m = reqwest::header::HeaderMap::new();
    for h in headers {
        let (k, v) = h.split_once(':').with_context(|| format!("header {h:?} is not `Name: value`"))?;
        m.insert(reqwest::header::HeaderName::from_bytes(k.trim().as_bytes())?, v.trim().parse()?);
    }
    m.insert("content-type", "application/json".parse()?);
    Ok(m)
}

fn client(conns: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(conns)
        .danger_accept_invalid_certs(false)
        .tcp_nodelay(true)
        .build()?)
}

/// p50/p90/p99/max of microsecond samples, in milliseconds.
fn summary(mut v: Vec<u64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_unstable();
    let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0;
    json!({"n": v.len(), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": q(1.0)})
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Load(a) => load(a).await,
        BenchCommand::Poll(a) => poll(a).await,
        BenchCommand::Stt(a) => stt(a).await,
        BenchCommand::Tts(a) => tts(a).await,
    }
}

async fn stt(a: SttArgs) -> anyhow::Result<()> {
    use darkroom_models::whisper;
    let store = darkroom_models::store::ModelStore::from_env();
    let inst = store.ensure(&a.model, &darkroom_models::store::Quiet).await?;
    let t = Instant::now();
    let m = whisper::Loaded::from_dir(&inst.dir).map_err(anyhow::Error::msg)?;
    println!("{}", json!({"model": a.model, "load_s": t.elapsed().as_secs_f64(), "threads": candle_threads()}));
    let input: whisper::WhisperInput = serde_json::from_value(json!({"audio_url": "file"}))?;
    for f in &a.files {
        let ext = f.extension().and_then(|e| e.to_str()).map(str::to_string);
        let pcm = darkroom_models::audio::decode(std::fs::read(f)?, ext.as_deref()).map_err(anyhow::Error::msg)?;
        let pcm = darkroom_models::audio::resample(&pcm, 16_000);
        let dur = pcm.duration();
        let bar = indicatif::ProgressBar::new(a.runs as u64 + 1);
        bar.set_message(f.display().to_string());
        let mut times = vec![];
        let mut text = String::new();
        for i in 0..=a.runs {
            let t = Instant::now();
            let out = whisper::transcribe(&m, &pcm.samples, &input, &|| false, &|_| {})
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
            text = out.text;
            bar.inc(1);
        }
        bar.finish_and_clear();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{}",
            json!({"file": f.display().to_string(), "audio_s": dur, "median_s": median, "min_s": times[0],
                   "max_s": times[times.len() - 1], "rtf": median / dur, "text": text})
        );
    }
    Ok(())
}

async fn tts(a: TtsArgs) -> anyhow::Result<()> {
    use darkroom_models::Model;
    let app = darkroom_models::piper::PiperTts::new();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    app.setup(&darkroom_models::SetupReporter(tx)).await.map_err(anyhow::Error::msg)?;
    println!("{}", json!({"model": "piper-en_us-joe-medium", "setup_s": t.elapsed().as_secs_f64()}));
    for f in &a.files {
        let text = std::fs::read_to_string(f)?;
        let mut times = vec![];
        let mut duration = 0.0;
        for i in 0..=a.runs {
            let (etx, _erx) = tokio::sync::mpsc::unbounded_channel();
            let ctx = darkroom_models::RunContext::new(
                format!("bench-{i}"),
                1,
                String::new(),
                tokio_util::sync::CancellationToken::new(),
                etx,
            )
            .with_files(Arc::new(darkroom_models::InlineFiles), true);
            let t = Instant::now();
            let out = app.run(json!({"text": text}), ctx).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
            duration = out["duration"].as_f64().unwrap_or(0.0);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{}",
            json!({"file": f.display().to_string(), "audio_s": duration, "median_s": median, "min_s": times[0],
                   "max_s": times[times.len() - 1], "rtf": median / duration.max(1e-9)})
        );
    }
    Ok(())
}

fn candle_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

async fn load(a: LoadArgs) -> anyhow::Result<()> {
    check_loopback(&a.url)?;
    let method: reqwest::Method = a.method.parse().context("--method")?;
    let headers = header_map(&a.headers)?;
    let http = client(a.concurrency)?;
    let body: Arc<str> = Arc::from(a.body.as_str());
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let bar = indicatif::ProgressBar::new(((a.warmup + a.duration) * 10.0) as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {elapsed}").unwrap());
    bar.set_message(format!("c={} {}", a.concurrency, a.url));
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (http, url, method, headers, body) =
            (http.clone(), a.url.clone(), method.clone(), headers.clone(), body.clone());
        let (measuring, stop, errors, field) =
            (measuring.clone(), stop.clone(), errors.clone(), a.started_field.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut overhead = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent_us = unix_us();
                let t = Instant::now();
                let r = http.request(method.clone(), &url).headers(headers.clone()).body(body.to_string()).send().await;
                let ok = match r {
                    Ok(r) if r.status().is_success() => match &field {
                        None => r.bytes().await.is_ok(),
                        Some(f) => match r.json::<Value>().await {
                            Ok(v) => match v.get(f).and_then(Value::as_u64) {
                                Some(started) => {
                                    if measuring.load(Ordering::Relaxed) {
                                        overhead.push(started.saturating_sub(sent_us));
                                    }
                                    true
                                }
                                None => false,
                            },
                            Err(_) => false,
                        },
                    },
                    Ok(r) => {
                        let _ = r.bytes().await;
                        false
                    }
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        lat.push(t.elapsed().as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (lat, overhead)
        }));
    }
    let tick = |secs: f64| {
        let bar = bar.clone();
        async move {
            let end = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(100)).await;
                bar.inc(1);
            }
        }
    };
    tick(a.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tick(a.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    bar.finish_and_clear();
    let mut lat = Vec::new();
    let mut overhead = Vec::new();
    for t in tasks {
        let (l, o) = t.await?;
        lat.extend(l);
        overhead.extend(o);
    }
    let out = json!({
        "url": a.url, "concurrency": a.concurrency, "seconds": elapsed,
        "requests": lat.len(), "errors": errors.load(Ordering::Relaxed),
        "rps": lat.len() as f64 / elapsed,
        "latency": summary(lat),
        "overhead": if a.started_field.is_some() { summary(overhead) } else { Value::Null },
    });
    println!("{out}");
    Ok(())
}

async fn poll(a: PollArgs) -> anyhow::Result<()> {
    check_loopback(&a.url)?;
    let headers = header_map(&a.headers)?;
    let http = client(a.clients)?;
    let base = a.url.trim_end_matches('/').to_string();
    // Submit one request per client (a few at a time).
    let bar = indicatif::ProgressBar::new(a.clients as u64);
    bar.set_message("submitting");
    let mut ids = Vec::with_capacity(a.clients);
    for chunk in (0..a.clients).collect::<Vec<_>>().chunks(32) {
        let mut js = Vec::new();
        for _ in chunk {
            let (http, headers, url, body) =
                (http.clone(), headers.clone(), format!("{base}/queue/{}", a.app), a.body.clone());
            js.push(tokio::spawn(async move {
                let r = http.post(url).headers(headers).body(body).send().await?.error_for_status()?;
                let v: Value = r.json().await?;
                anyhow::Ok(v["status_url"].as_str().unwrap_or_default().to_string())
            }));
        }
        for j in js {
            ids.push(j.await??);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_millis(a.interval_ms);
    let mut tasks = Vec::new();
    for (i, status_url) in ids.iter().enumerate() {
        let (http, headers, url, stop, errors) =
            (http.clone(), headers.clone(), status_url.clone(), stop.clone(), errors.clone());
        // Spread the clients' phases over one interval.
        let offset = interval.mul_f64(i as f64 / a.clients.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                match http.get(&url).headers(headers.clone()).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    if a.cancel {
        for s in &ids {
            let cancel = s.trim_end_matches("/status").to_string() + "/cancel";
            let _ = http.put(cancel).headers(headers.clone()).send().await;
        }
    }
    let out = json!({
        "clients": a.clients, "interval_ms": a.interval_ms, "seconds": elapsed,
        "polls": lat.len(), "errors": errors.load(Ordering::Relaxed),
        "polls_per_s": lat.len() as f64 / elapsed,
        "latency": summary(lat),
    });
    println!("{out}");
    Ok(())
}
