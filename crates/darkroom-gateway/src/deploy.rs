//! Serverless: apps deployed at run time, and the secrets their runners get.
//!
//! `POST /v1/apps` takes a code bundle (a gzipped tar of the app's folder) with a `darkroom.toml` manifest at its
//! root, or a `fal.App` file named by `?entry=app.py::MyApp` (see [`crate::falapp`]). The bundle is stored in object
//! storage as `apps/{sha256}.tar.gz`; the app's spec and resolved manifest go to the store with a version that
//! counts redeploys. The app is served at once (this gateway's registry; other gateways of a cluster reload every
//! few seconds); runners of an earlier version finish what they hold and stop, and new runners run the new code.
//!
//! Runners started here unpack the bundle once per digest under the fleet's work folder and get the manifest and
//! the secrets in their environment (never on the command line).
//!
//! Secrets (`/v1/secrets`) are server-wide, as a team's secrets are on fal: every deployed app gets each of them as
//! an environment variable. Values are sealed (ChaCha20-Poly1305, key derived from the server secret) before they
//! reach the store and are never returned or logged.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Json, Router};
use darkroom_core::ErrorType;
use darkroom_core::app::{AppKind, AppSpec, CompiledApp};
use darkroom_core::scaling::StopReason;
use darkroom_models::http_app::HttpAppManifest;
use darkroom_store::{DeploymentRecord, SecretRecord};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;

use crate::Gateway;
use crate::error::{ApiErr, ApiResult, err};
use crate::http::json_response;

/// Largest bundle (gzipped) accepted by `POST /v1/apps` (it is held in memory while it is checked and stored).
pub const MAX_BUNDLE: usize = 1 << 30;
/// Largest number of entries in a bundle.
const MAX_BUNDLE_ENTRIES: usize = 100_000;
/// Largest unpacked size of a bundle.
const MAX_UNPACKED: u64 = 8 << 30;
/// Largest secret value.
const MAX_SECRET: usize = 64 << 10;

/// The deployed apps this gateway knows, by app id.
#[derive(Default)]
pub struct Deployments {
    map: Mutex<HashMap<String, DeploymentRecord>>,
}

impl Deployments {
    pub fn get(&self, app_id: &str) -> Option<DeploymentRecord> {
        self.map.lock().unwrap().get(app_id).cloned()
    }
}

pub fn router() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/apps/{owner}/{alias}", get(show).delete(remove))
        .route("/v1/secrets", get(list_secrets))
        .route("/v1/secrets/{name}", put(set_secret).delete(delete_secret))
}

/// Reads every deployment from the store into the registry (at start; in a cluster, every few seconds).
pub async fn load(gw: &Arc<Gateway>) -> anyhow::Result<()> {
    let rows = gw.store.list_deployments().await?;
    let known: Vec<String> = gw.deployments.map.lock().unwrap().keys().cloned().collect();
    for id in known {
        if !rows.iter().any(|d| d.app_id == id) {
            unregister(gw, &id);
        }
    }
    for d in rows {
        let same = gw.deployments.get(&d.app_id).is_some_and(|cur| cur.version == d.version);
        if same {
            continue;
        }
        if let Err(e) = register(gw, d.clone()) {
            tracing::error!(app = %d.app_id, version = d.version, error = %e, "cannot serve a deployed app");
        }
    }
    Ok(())
}

/// Serves a deployment: registry, scaling knobs, and the old version's runners told to finish and stop.
fn register(gw: &Arc<Gateway>, d: DeploymentRecord) -> Result<(), String> {
    let spec: AppSpec = serde_json::from_str(&d.spec).map_err(|e| format!("unreadable spec: {e}"))?;
    if spec.kind != AppKind::Http {
        return Err("a deployment must be an http app".into());
    }
    if gw.apps.get(&spec.id).is_some_and(|a| a.spec.kind == AppKind::Builtin) {
        return Err("a built-in app has this id".into());
    }
    let knobs = spec.scaling.clone();
    let app = CompiledApp::compile(spec)?;
    let id = d.app_id.clone();
    let earlier = gw.deployments.map.lock().unwrap().insert(id.clone(), d);
    gw.apps.insert(Arc::new(app));
    gw.fleet.register(&id, knobs);
    crate::hub::ensure_dispatcher(gw, &id);
    if earlier.is_some() {
        gw.fleet.retire(gw, &id, StopReason::Redeployed);
    }
    tracing::info!(app = %id, "deployed app registered");
    Ok(())
}

fn unregister(gw: &Gateway, app_id: &str) {
    gw.deployments.map.lock().unwrap().remove(app_id);
    gw.apps.remove(app_id);
    gw.fleet.retire(gw, app_id, StopReason::Redeployed);
    tracing::info!(app = %app_id, "deployed app removed");
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeployQuery {
    /// `file.py::Class`: deploy a `fal.App` from the bundle.
    #[serde(default)]
    entry: Option<String>,
    /// For a `fal.App`: the app id (default `{owner}/{app_name}`).
    #[serde(default)]
    app_id: Option<String>,
}

/// `POST /v1/apps`: deploys (or redeploys) an app from a gzipped tar.
pub(crate) async fn deploy(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(q): Query<DeployQuery>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let caller = gw.authenticate(&headers).await?;
    caller.require_admin()?;
    let scan = tokio::task::spawn_blocking({
        let body = body.clone();
        move || scan_bundle(&body)
    })
    .await
    .map_err(|_| ApiErr(darkroom_core::ApiError::internal()))?
    .map_err(|e| bundle_error(&e))?;
    let manifest = match &q.entry {
        None => {
            let text = scan.manifest.as_deref().ok_or_else(|| {
                bundle_error(
                    "the bundle has no darkroom.toml at its root (or name a fal.App with ?entry=file.py::Class)",
                )
            })?;
            HttpAppManifest::from_toml(text).map_err(|e| manifest_error(&e))?
        }
        Some(entry) => crate::falapp::inspect(&gw, &body, entry, q.app_id.as_deref(), &caller.owner_id).await?,
    };
    let spec = manifest.spec();
    let app_id = spec.id.clone();
    if gw.apps.get(&app_id).is_some_and(|a| a.spec.kind == AppKind::Builtin) {
        return Err(err(ErrorType::Conflict, format!("'{app_id}' is a built-in app; deploy under another id")));
    }
    CompiledApp::compile(spec.clone()).map_err(|e| err(ErrorType::ValidationError, e))?;
    let digest = hex::encode(sha2::Sha256::digest(&body));
    gw.storage.put_bytes(&bundle_key(&digest), body.clone()).await.map_err(|e| {
        tracing::error!(error = %e, "storing an app bundle failed");
        err(ErrorType::StorageUnavailable, "Could not store the app's bundle")
    })?;
    let now = gw.now();
    let current = gw.store.get_deployment(&app_id).await?;
    let record = DeploymentRecord {
        app_id: app_id.clone(),
        owner_id: caller.owner_id.clone(),
        version: current.as_ref().map_or(1, |c| c.version + 1),
        spec: serde_json::to_string(&spec).expect("spec serializes"),
        manifest: serde_json::to_string(&manifest).expect("manifest serializes"),
        bundle_digest: digest,
        bundle_size: body.len() as i64,
        created_at: current.as_ref().map_or(now, |c| c.created_at),
        updated_at: now,
    };
    if !gw.store.put_deployment(&record, Some(current.as_ref().map_or(0, |c| c.version))).await? {
        return Err(err(ErrorType::Conflict, "Another deploy of this app finished first; deploy again"));
    }
    register(&gw, record.clone()).map_err(|e| err(ErrorType::Conflict, e))?;
    let status = if record.version == 1 { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json_response(status, &view(&gw, &record, &spec), None))
}

fn view(gw: &Gateway, d: &DeploymentRecord, spec: &AppSpec) -> Value {
    let manifest: Value = serde_json::from_str(&d.manifest).unwrap_or(Value::Null);
    json!({
        "app_id": d.app_id,
        "version": d.version,
        "kind": spec.kind,
        "title": spec.title,
        "endpoints": spec.paths,
        "owner_id": d.owner_id,
        "bundle_digest": d.bundle_digest,
        "bundle_size": d.bundle_size,
        "created_at": darkroom_core::iso8601(d.created_at),
        "updated_at": darkroom_core::iso8601(d.updated_at),
        "scaling": gw.fleet.knobs(&d.app_id),
        "fal": manifest.get("fal"),
        "runners": gw.fleet.list(gw).iter().filter(|r| r.app_id == d.app_id && r.state != "TERMINATED").count(),
    })
}

/// `GET /v1/apps/{owner}/{alias}`: an app (built in or deployed) with its deployment and scaling.
async fn show(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path((owner, alias)): axum::extract::Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?;
    let id = format!("{owner}/{alias}");
    let app = gw
        .apps
        .get(&id)
        .ok_or_else(|| err(ErrorType::AppNotFound, format!("App '{}' not found", id.escape_default())))?;
    Ok(Json(match gw.deployments.get(&id) {
        Some(d) => view(&gw, &d, &app.spec),
        None => json!({"app_id": id, "kind": app.spec.kind, "title": app.spec.title, "endpoints": app.spec.paths,
                       "scaling": gw.fleet.knobs(&id), "version": null}),
    }))
}

/// `DELETE /v1/apps/{owner}/{alias}`: removes a deployed app. Refused while it has requests queued or running
/// (they would have nothing to run them): cancel them or wait.
async fn remove(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Path((owner, alias)): axum::extract::Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?.require_admin()?;
    let id = format!("{owner}/{alias}");
    match gw.apps.get(&id) {
        None => return Err(err(ErrorType::AppNotFound, format!("App '{}' not found", id.escape_default()))),
        Some(a) if a.spec.kind == AppKind::Builtin => {
            return Err(err(ErrorType::Conflict, format!("'{id}' is a built-in app and cannot be removed")));
        }
        Some(_) => {}
    }
    let depth = gw.store.app_depths().await?.into_iter().find(|d| d.app_id == id);
    let queued = depth.as_ref().map_or(0, |d| d.queued.max(0));
    let running: usize =
        gw.hub.runners.lock().unwrap().values().filter(|c| c.app_id == id).map(|c| c.in_flight.len()).sum();
    if queued > 0 || running > 0 {
        return Err(err(
            ErrorType::Conflict,
            format!("'{id}' has {queued} queued and {running} running requests; cancel them or wait, then remove it"),
        ));
    }
    let removed = gw.store.delete_deployment(&id).await?;
    unregister(&gw, &id);
    Ok(Json(json!({"app_id": id, "removed": removed})))
}

fn bundle_key(digest: &str) -> String {
    format!("apps/{digest}.tar.gz")
}

fn bundle_error(msg: &str) -> ApiErr {
    ApiErr(darkroom_core::app::validation_error(vec![json!({"loc": ["body"], "msg": msg, "type": "bundle_invalid"})]))
}

/// The manifest's problems (`section.field: message`, `; `-separated) as field-level 422 detail.
fn manifest_error(msg: &str) -> ApiErr {
    let detail: Vec<Value> = msg
        .trim_start_matches("invalid darkroom.toml: ")
        .split("; ")
        .map(|p| {
            let (field, m) = p.split_once(": ").unwrap_or(("", p));
            let mut loc = vec![json!("darkroom.toml")];
            loc.extend(field.split('.').filter(|s| !s.is_empty() && !s.contains(' ')).map(|s| json!(s)));
            json!({"loc": loc, "msg": m, "type": "manifest_invalid"})
        })
        .collect();
    ApiErr(darkroom_core::app::validation_error(detail))
}

/// What a bundle holds, checked without unpacking it.
#[derive(Debug, Default)]
pub(crate) struct BundleScan {
    pub manifest: Option<String>,
    pub files: Vec<String>,
    pub unpacked: u64,
}

/// A bundle's entry path, relative and without `..` (None: refused).
fn entry_path(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Checks a bundle: gzip + tar, only regular files and folders with relative paths, bounded count and size.
pub(crate) fn scan_bundle(data: &[u8]) -> Result<BundleScan, String> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(data));
    let mut scan = BundleScan::default();
    for (n, entry) in ar.entries().map_err(|e| format!("not a gzipped tar: {e}"))?.enumerate() {
        let mut entry = entry.map_err(|e| format!("not a gzipped tar: {e}"))?;
        if n >= MAX_BUNDLE_ENTRIES {
            return Err(format!("more than {MAX_BUNDLE_ENTRIES} entries"));
        }
        let raw = entry.path().map_err(|e| format!("bad entry name: {e}"))?.into_owned();
        let path = entry_path(&raw).ok_or_else(|| format!("'{}' leaves the bundle's folder", raw.display()))?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(format!("'{}' is not a regular file (links and devices are refused)", raw.display()));
        }
        scan.unpacked += entry.size();
        if scan.unpacked > MAX_UNPACKED {
            return Err(format!("unpacks to more than {} GiB", MAX_UNPACKED >> 30));
        }
        let name = path.to_string_lossy().into_owned();
        if name == "darkroom.toml" {
            let mut text = String::new();
            entry.by_ref().take(1 << 20).read_to_string(&mut text).map_err(|e| format!("darkroom.toml: {e}"))?;
            scan.manifest = Some(text);
        }
        scan.files.push(name);
    }
    if scan.files.is_empty() {
        return Err("the bundle is empty".into());
    }
    Ok(scan)
}

/// Unpacks a (scanned) bundle into `dest`, which must not exist: into a sibling first, then renamed.
pub(crate) fn unpack_bundle(data: &[u8], dest: &Path) -> Result<(), String> {
    scan_bundle(data)?;
    let parent = dest.parent().ok_or("no parent folder")?;
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let tmp = parent.join(format!(".unpack-{}", &darkroom_core::auth::random_token()[..12]));
    let res = (|| {
        std::fs::create_dir(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(data));
        ar.set_preserve_permissions(true);
        ar.set_overwrite(true);
        for entry in ar.entries().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let raw = entry.path().map_err(|e| e.to_string())?.into_owned();
            let path = entry_path(&raw).ok_or("an entry leaves the bundle's folder")?;
            if path.as_os_str().is_empty() {
                continue;
            }
            if !entry.unpack_in(&tmp).map_err(|e| format!("{}: {e}", raw.display()))? {
                return Err(format!("'{}' leaves the bundle's folder", raw.display()));
            }
        }
        match std::fs::rename(&tmp, dest) {
            Ok(()) => Ok(()),
            // Another runner start unpacked it first.
            Err(_) if dest.is_dir() => Ok(()),
            Err(e) => Err(format!("{}: {e}", dest.display())),
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    res
}

/// What a runner of a deployed app needs: its unpacked code, manifest and secrets.
pub(crate) struct RunnerApp {
    pub dir: PathBuf,
    pub manifest_json: String,
    pub secrets_json: String,
}

/// Makes a deployed app's code ready under `work` (once per bundle digest) and gathers its runner's settings.
pub(crate) async fn runner_app(gw: &Gateway, work: &Path, app_id: &str) -> Result<RunnerApp, String> {
    let d = gw.deployments.get(app_id).ok_or_else(|| format!("'{app_id}' is not deployed"))?;
    let dir = work.join("bundles").join(&d.bundle_digest);
    if !dir.is_dir() {
        let data = gw
            .storage
            .read_all(&bundle_key(&d.bundle_digest), MAX_UNPACKED)
            .await
            .map_err(|e| format!("reading the app's bundle: {e}"))?;
        let dest = dir.clone();
        tokio::task::spawn_blocking(move || unpack_bundle(&data, &dest))
            .await
            .map_err(|e| format!("unpacking the app's bundle: {e}"))??;
    }
    let secrets = read_secrets(gw).await?;
    Ok(RunnerApp {
        dir,
        manifest_json: d.manifest.clone(),
        secrets_json: serde_json::to_string(&secrets).expect("a map serializes"),
    })
}

async fn read_secrets(gw: &Gateway) -> Result<BTreeMap<String, String>, String> {
    let rows = gw.store.list_secrets().await.map_err(|e| format!("reading secrets: {e}"))?;
    let key = secrets_key(&gw.cfg.server_secret);
    let mut out = BTreeMap::new();
    for r in rows {
        match open_secret(&key, &r.name, &r.sealed) {
            Some(v) => {
                out.insert(r.name, v);
            }
            None => tracing::error!(secret = %r.name, "a secret cannot be opened (was the server secret changed?)"),
        }
    }
    Ok(out)
}

fn secrets_key(server_secret: &[u8]) -> ring::aead::LessSafeKey {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, server_secret);
    let tag = ring::hmac::sign(&k, b"darkroom secrets v1");
    let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, tag.as_ref()).expect("32-byte key");
    ring::aead::LessSafeKey::new(unbound)
}

/// `nonce || ciphertext || tag`, the secret's name bound as associated data.
fn seal_secret(key: &ring::aead::LessSafeKey, name: &str, value: &str) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rand::Rng::fill(&mut rand::rng(), &mut nonce[..]);
    let mut buf = value.as_bytes().to_vec();
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key(nonce),
        ring::aead::Aad::from(name.as_bytes()),
        &mut buf,
    )
    .expect("sealing cannot fail for short input");
    let mut out = nonce.to_vec();
    out.extend(buf);
    out
}

fn open_secret(key: &ring::aead::LessSafeKey, name: &str, sealed: &[u8]) -> Option<String> {
    if sealed.len() < 12 + 16 {
        return None;
    }
    let nonce = ring::aead::Nonce::try_assume_unique_for_key(&sealed[..12]).ok()?;
    let mut buf = sealed[12..].to_vec();
    let plain = key.open_in_place(nonce, ring::aead::Aad::from(name.as_bytes()), &mut buf).ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

fn check_secret_name(name: &str) -> Result<(), ApiErr> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let reserved = name == "HOST" || name == "PORT" || name.starts_with("DARKROOM_") || name.starts_with("FAL_");
    if !ok || reserved {
        return Err(ApiErr(darkroom_core::app::validation_error(vec![json!({
            "loc": ["path", "name"],
            "msg": "a secret's name is an environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most 128); HOST, \
                    PORT, DARKROOM_* and FAL_* are set by Darkroom",
            "type": "value_error"
        })])));
    }
    Ok(())
}

/// `GET /v1/secrets`: names and when each was set (values are never returned).
async fn list_secrets(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?.require_admin()?;
    let rows = gw.store.list_secrets().await?;
    let list: Vec<Value> =
        rows.iter().map(|r| json!({"name": r.name, "updated_at": darkroom_core::iso8601(r.updated_at)})).collect();
    Ok(Json(json!({"secrets": list})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    value: String,
}

/// `PUT /v1/secrets/{name}` with `{"value": "…"}`: sets a secret. Runners started afterwards get it.
async fn set_secret(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    crate::error::ApiPath(name): crate::error::ApiPath,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?.require_admin()?;
    check_secret_name(&name)?;
    let b: SecretBody =
        serde_json::from_slice(&body).map_err(|e| ApiErr(darkroom_core::app::json_decode_error(&e.to_string())))?;
    if b.value.len() > MAX_SECRET || b.value.contains('\0') {
        return Err(ApiErr(darkroom_core::app::validation_error(vec![json!({
            "loc": ["body", "value"], "msg": "at most 64 KiB, without NUL", "type": "value_error"
        })])));
    }
    let key = secrets_key(&gw.cfg.server_secret);
    let now = gw.now();
    gw.store
        .set_secret(&SecretRecord { name: name.clone(), sealed: seal_secret(&key, &name, &b.value), updated_at: now })
        .await?;
    tracing::info!(secret = %name, "secret set");
    Ok(Json(json!({"name": name, "updated_at": darkroom_core::iso8601(now)})))
}

/// `DELETE /v1/secrets/{name}`.
async fn delete_secret(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    crate::error::ApiPath(name): crate::error::ApiPath,
) -> ApiResult<Json<Value>> {
    gw.authenticate(&headers).await?.require_admin()?;
    if !gw.store.delete_secret(&name).await? {
        return Err(err(ErrorType::NotFound, format!("No secret '{}'", name.escape_default())));
    }
    Ok(Json(json!({"name": name, "deleted": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // `append_data` refuses `..`; write the raw name to test the scan's own check.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn bundles_are_checked() {
        let ok = bundle(&[("darkroom.toml", b"[app]\n"), ("./src/server.py", b"print(1)")]);
        let s = scan_bundle(&ok).unwrap();
        assert_eq!(s.manifest.as_deref(), Some("[app]\n"));
        assert_eq!(s.files, vec!["darkroom.toml", "src/server.py"]);
        let e = scan_bundle(&bundle(&[("../evil", b"x")])).unwrap_err();
        assert!(e.contains("leaves the bundle"), "{e}");
        let e = scan_bundle(&bundle(&[("/etc/evil", b"x")])).unwrap_err();
        assert!(e.contains("leaves the bundle"), "{e}");
        assert!(scan_bundle(b"not a tarball").is_err());
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("b");
        unpack_bundle(&ok, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("src/server.py")).unwrap(), "print(1)");
        assert!(unpack_bundle(&bundle(&[("../x", b"x")]), &dir.path().join("c")).is_err());
        assert!(!dir.path().join("x").exists() && !dir.path().join("c").exists());
    }

    #[test]
    fn secrets_are_sealed() {
        let key = secrets_key(b"server secret");
        let sealed = seal_secret(&key, "HF_TOKEN", "hf_abc");
        assert!(!sealed.windows(6).any(|w| w == b"hf_abc"));
        assert_eq!(open_secret(&key, "HF_TOKEN", &sealed).as_deref(), Some("hf_abc"));
        // Bound to its name, and to the server secret.
        assert_eq!(open_secret(&key, "OTHER", &sealed), None);
        assert_eq!(open_secret(&secrets_key(b"another"), "HF_TOKEN", &sealed), None);
        assert!(check_secret_name("HF_TOKEN").is_ok());
        for bad in ["", "1X", "A-B", "PORT", "DARKROOM_X", "FAL_KEY"] {
            assert!(check_secret_name(bad).is_err(), "{bad}");
        }
    }
}
