//! `darkroom bench`: a closed-loop HTTP load generator for the benchmarks in BENCHMARKS.md (never run in CI).
//!
//! `load` sends the same request over `--concurrency` keep-alive connections for `--duration` and prints one JSON
//! line of results; with `--started-field`, each response's runner start time (microseconds since the Unix epoch,
//! from the no-op app's `"timing": true`) gives the queue overhead: request sent → runner started.
//! `poll` submits one request per client and has every client poll its status at a fixed interval.
//! `realtime` opens realtime WebSocket sessions and times each msgpack frame's round trip to the app and back.

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
    /// Open --sessions realtime WebSocket sessions to an app at once; each sends a msgpack frame, waits for its echo
    /// and repeats (one frame in flight per session). Prints the round-trip latency and frames/s as JSON.
    Realtime(RealtimeArgs),
    /// Time SD-Turbo (darkroom/sd-turbo's pipeline, in process) stage by stage: text encoder, each UNet step, VAE
    /// decode, image encode; JSON lines. Without --model or --dir it runs SD-Turbo's real architecture with zero
    /// weights (the same compute as the real weights; the images are flat).
    Diffusion(DiffusionArgs),
    /// Time an upscaler (darkroom/upscale's code, in process) on an image: per run the network time (all tiles)
    /// and the whole request (decode, network, PNG encode); the median of --runs after one warm-up; one JSON line.
    /// Without --image it uses the RDN package's own 128x128 sample.
    Upscale(UpscaleArgs),
}

#[derive(Debug, Args)]
#[command(after_help = "Examples (RAYON_NUM_THREADS sets the cores the network uses):
  darkroom bench upscale --model rdn-slim --scale 4
  RAYON_NUM_THREADS=1 darkroom bench upscale --model realesr-animevideov3 --scale 4 --runs 3
scripts/bench-upscale runs these against UpscalerJS on TensorFlow.js (WASM) on the same model and image.")]
pub struct UpscaleArgs {
    /// rdn-slim, rdn-medium, realesr-animevideov3, realesrgan-x4plus or realesrgan-x4plus-anime.
    #[arg(long, default_value = "rdn-slim")]
    model: String,
    #[arg(long, default_value_t = 4)]
    scale: u32,
    /// A PNG, JPEG or WebP image (default: the rdn-slim package's samples/fixture.png, 128x128).
    #[arg(long)]
    image: Option<std::path::PathBuf>,
    /// Timed runs (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples (about half a minute per run on 2 cores; two minutes with --reference):
  darkroom bench diffusion --width 512 --height 512 --steps 1 --runs 2
  darkroom bench diffusion --reference

The first line measures the machine's peak: the best of three 2048x2048 f32 matrix products with candle (and the
f16 and bf16 rates of the same kernels). Each run's line gives every stage's time, its FLOPs (counted from the
architecture: convolutions, linear layers and attention products) and the rate as a fraction of that peak. Without
--model or --dir the weights are zeros in SD-Turbo's real architecture (the compute does not depend on them).")]
pub struct DiffusionArgs {
    /// A model in the model store (e.g. `sd-turbo`, fetched if needed).
    #[arg(long, conflicts_with = "dir")]
    model: Option<String>,
    /// A checkpoint folder in diffusers' layout.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 512)]
    width: u32,
    #[arg(long, default_value_t = 512)]
    height: u32,
    /// UNet steps per image.
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Image-to-image from a gray image at this strength (0-1] (adds the VAE encoder).
    #[arg(long)]
    strength: Option<f64>,
    /// Timed runs (the first one included: every run does the same work).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Run the straightforward pipeline instead (candle's own VAE blocks), the baseline the fast one is measured
    /// against.
    #[arg(long)]
    reference: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Example, against `darkroom serve` on this machine (its URL is in server.json, the key in \
local-admin.key, both in the data folder):
  darkroom bench realtime --url http://127.0.0.1:PORT --key \"$(cat DATA/local-admin.key)\" --sessions 50 --frames 200

Each frame is the msgpack map {\"data\": \"<frame number, padded to --payload-bytes>\"}; the app must echo its
input (darkroom/diagnostics does). An echo counts when its bytes equal the frame sent. Plain ws:// on 127.0.0.1
only.")]
pub struct RealtimeArgs {
    /// The gateway's base URL (http://127.0.0.1:PORT; loopback, no TLS).
    #[arg(long)]
    url: String,
    /// An API key, sent as `Authorization: Key <key>` on the WebSocket handshake.
    #[arg(long)]
    key: String,
    /// The app whose realtime endpoint to open (`/run/{app}/realtime`); it must echo each input.
    #[arg(long, default_value = "darkroom/diagnostics")]
    app: String,
    /// Concurrent sessions (one WebSocket each), each with one frame in flight.
    #[arg(long, short = 'c', default_value_t = 1)]
    sessions: usize,
    /// Timed frames per session (after --warmup-frames).
    #[arg(long, default_value_t = 1000)]
    frames: u64,
    /// Untimed frames per session first (the session opening on its runner, first allocations).
    #[arg(long, default_value_t = 20)]
    warmup_frames: u64,
    /// Size of the frame's string field in bytes (the msgpack frame is 7 to 11 bytes more).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Stop timing after this many seconds even if --frames are not all sent.
    #[arg(long, alias = "duration-secs")]
    duration: Option<f64>,
    /// Seconds to wait for the handshake or for any one echo before counting an error and closing that session.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Authenticate with a short-lived token from `POST /rest/tokens/` (`?fal_jwt_token=`) instead of the key header.
    #[arg(long)]
    token: bool,
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
        BenchCommand::Realtime(a) => realtime(a).await,
        BenchCommand::Diffusion(a) => diffusion(a).await,
        BenchCommand::Upscale(a) => upscale(a).await,
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

async fn diffusion(a: DiffusionArgs) -> anyhow::Result<()> {
    use darkroom_models::sd_turbo::{self, Event, OutputFormat, Pipeline, Request};
    let scratch = tempfile::tempdir()?;
    let (dir, zeros, what) = match (&a.model, &a.dir) {
        (Some(m), _) => {
            let store = darkroom_models::store::ModelStore::from_env();
            (store.ensure(m, &darkroom_models::store::Quiet).await?.dir, false, m.clone())
        }
        (None, Some(d)) => (d.clone(), false, d.display().to_string()),
        (None, None) => {
            sd_turbo::write_sd_turbo_architecture(scratch.path()).map_err(anyhow::Error::msg)?;
            (scratch.path().to_path_buf(), true, "sd-turbo architecture, zero weights".to_string())
        }
    };
    let device = sd_turbo::pick_device();
    let [f32_peak, f16_peak, bf16_peak] =
        tokio::task::spawn_blocking(sd_turbo::flops::matmul_peaks).await?.map_err(anyhow::Error::msg)?;
    println!(
        "{}",
        json!({"peak_matmul_gflops": {"f32": f32_peak, "f16": f16_peak, "bf16": bf16_peak, "n": 2048},
               "threads": candle_threads()})
    );
    let t = Instant::now();
    let reference = a.reference;
    let p = tokio::task::spawn_blocking(move || {
        if reference {
            Pipeline::reference(&dir, device, zeros)
        } else if zeros {
            Pipeline::with_zero_weights(&dir, device)
        } else {
            Pipeline::from_dir(&dir, device)
        }
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    println!(
        "{}",
        json!({"model": what, "pipeline": if reference { "reference" } else { "fast" },
               "load_s": t.elapsed().as_secs_f64(), "width": a.width, "height": a.height, "steps": a.steps,
               "strength": a.strength})
    );
    let flops = p.flops(a.width, a.height, false);
    let p = Arc::new(p);
    for run in 0..a.runs {
        let req = Request {
            prompt: "a photo of a red fox in the snow".into(),
            negative_prompt: String::new(),
            width: a.width,
            height: a.height,
            steps: a.steps,
            guidance_scale: 0.0,
            seed: run as u64,
            init_image: a.strength.map(|_| image::RgbImage::from_pixel(a.width, a.height, image::Rgb([128, 128, 128]))),
            strength: a.strength.unwrap_or(1.0),
        };
        let p = p.clone();
        let bar = indicatif::ProgressBar::new(a.steps as u64 + 2 + u64::from(a.strength.is_some()));
        bar.set_message(format!("run {}", run + 1));
        let b2 = bar.clone();
        let line = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
            let start = Instant::now();
            let mut last = start;
            let (mut text_s, mut encode_s, mut steps_s, mut vae_s) = (0.0, None, vec![], 0.0);
            let mut lap = || {
                let now = Instant::now();
                let d = now.duration_since(last).as_secs_f64();
                last = now;
                d
            };
            let imgs = p
                .generate(&req, 1, &|| false, &mut |e| {
                    b2.inc(1);
                    match e {
                        Event::Encoded => text_s = lap(),
                        Event::ImageEncoded => encode_s = Some(lap()),
                        Event::Step { .. } => steps_s.push(lap()),
                        Event::Decoded { .. } => vae_s = lap(),
                    }
                })
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let t = Instant::now();
            let jpeg = sd_turbo::encode_image(&imgs[0], OutputFormat::Jpeg, 90).map_err(anyhow::Error::msg)?;
            let jpeg_s = t.elapsed().as_secs_f64();
            let stage = |secs: f64, flops: f64| {
                json!({"s": secs, "gflop": flops / 1e9, "gflops": flops / 1e9 / secs,
                       "of_peak": flops / 1e9 / secs / f32_peak})
            };
            let mut stages = serde_json::Map::new();
            stages.insert("text_encoder".into(), stage(text_s, flops.text_encoder));
            if let Some(s) = encode_s {
                stages.insert("vae_encode".into(), stage(s, flops.vae_encode));
            }
            for (i, s) in steps_s.iter().enumerate() {
                stages.insert(format!("unet_step_{}", i + 1), stage(*s, flops.unet_step));
            }
            stages.insert("vae_decode".into(), stage(vae_s, flops.vae_decode));
            stages.insert("jpeg_encode".into(), json!({"s": jpeg_s, "bytes": jpeg.len()}));
            let total = start.elapsed().as_secs_f64();
            let all = flops.text_encoder
                + flops.unet_step * steps_s.len() as f64
                + flops.vae_decode
                + encode_s.map_or(0.0, |_| flops.vae_encode);
            Ok(json!({"run": run + 1, "stages": stages, "total_s": total, "total_gflop": all / 1e9,
                      "total_of_peak": all / 1e9 / total / f32_peak}))
        })
        .await??;
        bar.finish_and_clear();
        println!("{line}");
    }
    Ok(())
}

async fn upscale(a: UpscaleArgs) -> anyhow::Result<()> {
    use darkroom_models::Model;
    let store = darkroom_models::store::ModelStore::from_env();
    let image = match &a.image {
        Some(p) => std::fs::read(p)?,
        None => {
            let dir =
                store.ensure(darkroom_models::store::builtin::RDN_SLIM, &darkroom_models::store::Quiet).await?.dir;
            std::fs::read(dir.join("samples/fixture.png"))?
        }
    };
    let (width, height) = image::load_from_memory(&image).map(|i| (i.width(), i.height()))?;
    let uri = darkroom_models::files::data_uri("image/png", &image);
    let app = darkroom_models::upscale::UpscaleApp::with_store(store);
    let input = json!({"image_url": uri, "model": a.model, "scale": a.scale, "output_format": "png"});
    let (mut net, mut total) = (vec![], vec![]);
    let bar = indicatif::ProgressBar::new(a.runs as u64 + 1);
    for i in 0..=a.runs {
        let ctx = bench_context(i);
        let t = Instant::now();
        let out = app.run(input.clone(), ctx).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if i > 0 {
            total.push(t.elapsed().as_secs_f64());
            net.push(out["timings"]["inference"].as_f64().unwrap_or(f64::NAN));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{}",
        json!({"model": a.model, "scale": a.scale, "input": [width, height],
               "output": [width * a.scale, height * a.scale], "threads": candle_threads(), "runs": a.runs,
               "median_s": median(&mut net), "min_s": net[0], "max_s": net[net.len() - 1],
               "request_median_s": median(&mut total)})
    );
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
            let ctx = bench_context(i);
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

/// A request context for an in-process benchmark run: outputs inline, events dropped.
fn bench_context(run: usize) -> darkroom_models::RunContext {
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    darkroom_models::RunContext::new(
        format!("bench-{run}"),
        1,
        String::new(),
        tokio_util::sync::CancellationToken::new(),
        events,
    )
    .with_files(Arc::new(darkroom_models::InlineFiles), true)
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

/// A minimal RFC 6455 client over plain TCP, enough for the realtime benchmark on 127.0.0.1: no TLS, no extensions,
/// whole messages on send; pings are answered, fragmented messages reassembled. (The server's
/// `Sec-WebSocket-Accept` is not checked: it only guards against caches that do not speak WebSocket.)
struct WsClient {
    r: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    /// xorshift state for the frame masks.
    mask: u64,
    out: Vec<u8>,
}

/// What a whole WebSocket message was.
enum WsMsg {
    Binary(Vec<u8>),
    Text(String),
    Close(Option<u16>, String),
}

/// Standard base64 (for the handshake's key).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            s.push(if i <= c.len() { A[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    s
}

impl WsClient {
    async fn connect(url: &url::Url, authorization: Option<&str>, seed: u64) -> anyhow::Result<WsClient> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let addrs = url.socket_addrs(|| None)?;
        let tcp = tokio::net::TcpStream::connect(&*addrs).await?;
        tcp.set_nodelay(true)?;
        let (r, mut w) = tcp.into_split();
        let mut r = tokio::io::BufReader::new(r);
        let mut mask = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let key: Vec<u8> = (0..16).map(|_| xorshift(&mut mask) as u8).collect();
        let host = format!("{}:{}", url.host_str().unwrap_or("127.0.0.1"), url.port_or_known_default().unwrap_or(80));
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            &url[url::Position::BeforePath..],
            base64(&key)
        );
        if let Some(a) = authorization {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        w.write_all(req.as_bytes()).await?;
        // The response head, bounded; then the body of a refusal (the gateway's JSON error), bounded too.
        let mut status_line = String::new();
        r.read_line(&mut status_line).await?;
        let mut content_length = 0usize;
        for _ in 0..100 {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        let status = status_line.split_whitespace().nth(1).unwrap_or("");
        if status != "101" {
            let mut body = vec![0; content_length.min(4096)];
            let _ = r.read_exact(&mut body).await;
            bail!("handshake refused: {} {}", status_line.trim(), String::from_utf8_lossy(&body));
        }
        Ok(WsClient { r, w, mask, out: Vec::new() })
    }

    /// Sends one whole message (opcode 1 text, 2 binary, 8 close, 10 pong), masked as a client must.
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let f = &mut self.out;
        f.clear();
        f.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let m = (xorshift(&mut self.mask) as u32).to_be_bytes();
        f.extend_from_slice(&m);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i & 3]));
        self.w.write_all(f).await
    }

    /// The next whole data or close message.
    async fn recv(&mut self) -> anyhow::Result<WsMsg> {
        use tokio::io::AsyncReadExt;
        let mut partial: Option<(u8, Vec<u8>)> = None;
        loop {
            let mut h = [0u8; 2];
            self.r.read_exact(&mut h).await?;
            let (fin, op, masked) = (h[0] & 0x80 != 0, h[0] & 0x0f, h[1] & 0x80 != 0);
            let len = match h[1] & 0x7f {
                126 => u64::from(self.r.read_u16().await?),
                127 => self.r.read_u64().await?,
                n => u64::from(n),
            };
            if len > 256 << 20 {
                bail!("a {len}-byte frame");
            }
            let mut key = [0u8; 4];
            if masked {
                self.r.read_exact(&mut key).await?;
            }
            let mut data = vec![0u8; len as usize];
            self.r.read_exact(&mut data).await?;
            if masked {
                data.iter_mut().enumerate().for_each(|(i, b)| *b ^= key[i & 3]);
            }
            let (op, data) = match op {
                0x9 => {
                    self.send(0xA, &data).await?;
                    continue;
                }
                0xA => continue,
                0x8 => {
                    let code = (data.len() >= 2).then(|| u16::from_be_bytes([data[0], data[1]]));
                    let reason = String::from_utf8_lossy(data.get(2..).unwrap_or_default()).into_owned();
                    return Ok(WsMsg::Close(code, reason));
                }
                0x0 => match partial.as_mut() {
                    Some((_, buf)) => {
                        buf.extend_from_slice(&data);
                        if !fin {
                            continue;
                        }
                        partial.take().unwrap()
                    }
                    None => bail!("a continuation frame with no message to continue"),
                },
                0x1 | 0x2 if !fin => {
                    partial = Some((op, data));
                    continue;
                }
                0x1 | 0x2 => (op, data),
                other => bail!("unknown WebSocket opcode {other}"),
            };
            return Ok(if op == 0x1 {
                WsMsg::Text(String::from_utf8_lossy(&data).into_owned())
            } else {
                WsMsg::Binary(data)
            });
        }
    }

    async fn close(mut self) {
        let _ = self.send(0x8, &1000u16.to_be_bytes()).await;
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The msgpack frame `{"data": s}`, where `s` is the frame number padded with `x` to `size` bytes, encoded as
/// `rmp_serde::to_vec_named` encodes the app's JSON output (the smallest string format), so the echo's bytes equal
/// the frame's.
fn realtime_frame(seq: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0x81, 0xa4]);
    out.extend_from_slice(b"data");
    match size {
        n if n < 32 => out.push(0xa0 | n as u8),
        n if n < 256 => out.extend_from_slice(&[0xd9, n as u8]),
        n if n < 65_536 => {
            out.push(0xda);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0xdb);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
    let start = out.len();
    out.extend(seq.to_string().bytes().take(size));
    out.resize(start + size, b'x');
}

/// One session's results.
#[derive(Default)]
struct RtSession {
    connect_us: Option<u64>,
    /// Round trips of the timed frames, µs.
    rtt: Vec<u64>,
    /// When the session stopped timing.
    end: Option<Instant>,
    errors: Vec<String>,
}

/// A short name for an error, to count errors by kind.
fn rt_error_kind(m: &WsMsg) -> String {
    match m {
        WsMsg::Binary(_) => "echo differs from the frame sent".into(),
        WsMsg::Text(t) => match serde_json::from_str::<Value>(t) {
            Ok(v) if v.get("type").and_then(Value::as_str) == Some("x-fal-error") => {
                format!("x-fal-error {}", v["error"].as_str().unwrap_or("?"))
            }
            _ => "unexpected text frame".into(),
        },
        WsMsg::Close(code, reason) => format!("closed by the server ({} {reason})", code.unwrap_or(0)),
    }
}

async fn realtime(a: RealtimeArgs) -> anyhow::Result<()> {
    check_loopback(&a.url)?;
    if a.sessions == 0 || a.sessions > 10_000 {
        bail!("--sessions must be 1 to 10000");
    }
    if a.payload_bytes > 16 << 20 {
        bail!("--payload-bytes must be at most 16 MiB");
    }
    let seconds = |what: &str, x: f64| {
        Duration::try_from_secs_f64(x)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| format!("{what} {x} is not a positive number of seconds"))
    };
    let timeout = seconds("--timeout", a.timeout)?;
    let duration = a.duration.map(|d| seconds("--duration", d)).transpose()?;
    let base = url::Url::parse(a.url.trim_end_matches('/'))?;
    let scheme = match base.scheme() {
        "http" | "ws" => "ws",
        _ => bail!("plain http:// (ws://) only: this benchmark has no TLS client"),
    };
    let app = a.app.trim_matches('/');
    let mut ws_url = base.clone();
    ws_url.set_scheme(scheme).map_err(|_| anyhow::anyhow!("cannot make a ws:// URL from {}", a.url))?;
    ws_url.set_path(&format!("{}/run/{app}/realtime", base.path().trim_end_matches('/')));
    let authorization = if a.token {
        let r = client(1)?
            .post(format!("{}/rest/tokens/", a.url.trim_end_matches('/')))
            .header("authorization", format!("Key {}", a.key))
            .json(&json!({"allowed_apps": [app], "token_expiration": 3600}))
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let t = body.as_str().with_context(|| format!("POST /rest/tokens/ answered {status}: {body}"))?;
        ws_url.query_pairs_mut().append_pair("fal_jwt_token", t);
        None
    } else {
        Some(format!("Key {}", a.key))
    };
    let total = a.sessions as u64 * a.frames;
    let done = Arc::new(AtomicU64::new(0));
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}").unwrap());
    bar.set_message(format!("{} sessions {}", a.sessions, app));
    // Every session connects and warms up, then all start timing together.
    let start = Arc::new(tokio::sync::Barrier::new(a.sessions + 1));
    let t0 = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut tasks = Vec::with_capacity(a.sessions);
    for i in 0..a.sessions {
        let (url, auth, start, t0, done) =
            (ws_url.clone(), authorization.clone(), start.clone(), t0.clone(), done.clone());
        let (frames, warmup, size) = (a.frames, a.warmup_frames, a.payload_bytes);
        tasks.push(tokio::spawn(async move {
            let mut res = RtSession::default();
            let mut frame = Vec::new();
            // One frame's round trip: Ok(µs), or the error's kind (the session is then closed).
            async fn round_trip(ws: &mut WsClient, frame: &[u8], timeout: Duration) -> Result<u64, String> {
                let t = Instant::now();
                ws.send(0x2, frame).await.map_err(|e| format!("send: {e}"))?;
                match tokio::time::timeout(timeout, ws.recv()).await {
                    Err(_) => Err("no echo within --timeout".into()),
                    Ok(Err(e)) => Err(format!("receive: {e}")),
                    Ok(Ok(WsMsg::Binary(b))) if b == frame => Ok(t.elapsed().as_micros() as u64),
                    Ok(Ok(m)) => Err(rt_error_kind(&m)),
                }
            }
            let t = Instant::now();
            let mut ws =
                match tokio::time::timeout(timeout, WsClient::connect(&url, auth.as_deref(), i as u64 + 1)).await {
                    Ok(Ok(ws)) => {
                        res.connect_us = Some(t.elapsed().as_micros() as u64);
                        Some(ws)
                    }
                    Ok(Err(e)) => {
                        res.errors.push(format!("connect: {e}"));
                        None
                    }
                    Err(_) => {
                        res.errors.push("connect: no handshake within --timeout".into());
                        None
                    }
                };
            for seq in 0..warmup {
                let Some(w) = ws.as_mut() else { break };
                realtime_frame(seq, size, &mut frame);
                if let Err(e) = round_trip(w, &frame, timeout).await {
                    res.errors.push(format!("warm-up: {e}"));
                    ws = None;
                }
            }
            start.wait().await;
            let t0 = *t0.get_or_init(Instant::now);
            let deadline = duration.map(|d| t0 + d);
            res.rtt.reserve(frames as usize);
            for seq in warmup..warmup + frames {
                let Some(w) = ws.as_mut() else { break };
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                realtime_frame(seq, size, &mut frame);
                match round_trip(w, &frame, timeout).await {
                    Ok(us) => res.rtt.push(us),
                    Err(e) => {
                        res.errors.push(e);
                        ws = None;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            res.end = Some(Instant::now());
            if let Some(w) = ws {
                w.close().await;
            }
            res
        }));
    }
    start.wait().await;
    let t0 = *t0.get_or_init(Instant::now);
    let ticker = {
        let (bar, done) = (bar.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                bar.set_position(done.load(Ordering::Relaxed));
            }
        })
    };
    let mut sessions = Vec::with_capacity(tasks.len());
    for t in tasks {
        sessions.push(t.await?);
    }
    ticker.abort();
    bar.finish_and_clear();
    let end = sessions.iter().filter_map(|s| s.end).max().unwrap_or(t0);
    let seconds = end.duration_since(t0).as_secs_f64();
    let per_session: Vec<f64> = sessions
        .iter()
        .filter_map(|s| Some(s.rtt.len() as f64 / s.end?.duration_since(t0).as_secs_f64().max(1e-9)))
        .collect();
    let mut kinds = serde_json::Map::new();
    for e in sessions.iter().flat_map(|s| &s.errors) {
        let n = kinds.entry(e.clone()).or_insert(json!(0));
        *n = json!(n.as_u64().unwrap_or(0) + 1);
    }
    let frames: usize = sessions.iter().map(|s| s.rtt.len()).sum();
    let mut frame = Vec::new();
    realtime_frame(0, a.payload_bytes, &mut frame);
    let out = json!({
        "url": ws_url.as_str().split('?').next().unwrap_or(""), "app": app, "sessions": a.sessions,
        "payload_bytes": a.payload_bytes, "frame_bytes": frame.len(), "warmup_frames": a.warmup_frames,
        "seconds": seconds, "frames": frames,
        "errors": sessions.iter().map(|s| s.errors.len()).sum::<usize>(), "error_kinds": kinds,
        "fps": frames as f64 / seconds.max(1e-9),
        "fps_per_session": if per_session.is_empty() { Value::Null } else { json!({
            "mean": per_session.iter().sum::<f64>() / per_session.len() as f64,
            "min": per_session.iter().copied().fold(f64::INFINITY, f64::min),
            "max": per_session.iter().copied().fold(0.0, f64::max),
        })},
        "rtt": summary(sessions.iter().flat_map(|s| s.rtt.iter().copied()).collect()),
        "connect": summary(sessions.iter().filter_map(|s| s.connect_us).collect()),
    });
    println!("{out}");
    if frames == 0
        && let Some(e) = sessions.iter().flat_map(|s| &s.errors).next()
    {
        bail!("no frame came back: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    /// The hand-made frame is the map {"data": "<seq>xxx…"} in msgpack's smallest encoding, so an echo re-encoded
    /// by the runner has the same bytes.
    #[test]
    fn realtime_frame_is_canonical_msgpack() {
        let mut f = Vec::new();
        for size in [0, 1, 31, 32, 255, 256, 65_535, 65_536] {
            realtime_frame(1234, size, &mut f);
            let v = rmpv::decode::read_value(&mut f.as_slice()).unwrap();
            let s = v.as_map().unwrap()[0].1.as_str().unwrap().to_string();
            assert_eq!(v.as_map().unwrap()[0].0.as_str(), Some("data"));
            assert_eq!(s.len(), size);
            assert!(s.starts_with(&"1234"[..size.min(4)]) && s[size.min(4)..].bytes().all(|b| b == b'x'));
            let mut again = Vec::new();
            rmpv::encode::write_value(&mut again, &v).unwrap();
            assert_eq!(again, f, "size {size}");
        }
    }
}
