//! Files: fal's upload flows for both official clients, signed downloads, the `/v1/files` API, and expiry.
//!
//! - JS (`fal.storage.upload`) and the Python fallback: `POST /rest/storage/upload/initiate[-multipart]` gives
//!   `{upload_url, file_url}`; `PUT upload_url` (no credentials: the URL is the capability); in parts,
//!   `PUT {upload_url}/{n}` answering `{"partNumber","etag"}` and `POST {upload_url}/complete`.
//! - Python (`fal_v3`): `POST /rest/storage/auth/token` gives a short-lived bearer token; `POST /cdn/files/upload`
//!   takes the bytes; in parts, `POST /cdn/files/upload/multipart` gives `{access_url, uploadId}`, then
//!   `PUT {access_url}/multipart/{uploadId}/{n}` (with an `ETag` header) and `POST …/complete`.
//! - Downloads: `GET /cdn/files/{id}.{exp}.{sig}/{name}` with ranges; public files also at `/cdn/files/{id}/{name}`.
//!
//! Parts are temporary objects (`parts/{id}/{n}`), joined at completion. Expired files and stale uploads are
//! deleted by the leader's sweeper.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use darkroom_core::ErrorType;
use darkroom_core::auth::{Credential, parse_authorization};
use darkroom_core::job::JobState;
use darkroom_storage::{Op, SignError, StorageError, TokenClaims, object_key, part_key};
use darkroom_store::{FileFilter, FileRecord};
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Gateway;
use crate::error::{ApiErr, ApiPath, ApiQuery, ApiResult, err};
use crate::http::{Routed, base_url, json_response};

/// How long an upload (its PUT URL, or a multipart upload) may stay unfinished.
const UPLOAD_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of the bearer tokens handed to Python's uploader.
const CDN_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// fal's clients number parts from 1; S3 allows 10,000.
const MAX_PARTS: u32 = 10_000;

pub fn router() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/rest/storage/upload/initiate", post(initiate))
        // Both flows start the same way: a pending file and a PUT capability (parts are PUT under it).
        .route("/rest/storage/upload/initiate-multipart", post(initiate))
        .route("/rest/storage/auth/token", post(cdn_token))
        .route("/cdn/{*rest}", axum::routing::any(cdn))
        .route("/v1/files", get(list_files))
        .route("/v1/files/{id}", get(show_file).delete(delete_file))
}

/// The key id of deployed apps' upload-only keys.
const APP_UPLOAD_KEY_ID: &str = "darkroom-upload";
const APP_UPLOAD_PREFIX: &str = "app-upload/";

/// Who files are uploaded for.
#[derive(Debug, Clone)]
pub struct Uploader {
    pub owner_id: String,
    pub job_id: Option<String>,
}

fn now_s(gw: &Gateway) -> i64 {
    gw.now().div_euclid(1000)
}

fn sign_err(e: SignError) -> ApiErr {
    match e {
        SignError::Expired => err(ErrorType::FileUrlExpired, "This file URL has expired; ask for a new one"),
        SignError::BadSignature | SignError::Malformed => err(ErrorType::FileUrlInvalid, "Invalid file URL signature"),
    }
}

fn storage_err(e: StorageError) -> ApiErr {
    match e {
        StorageError::NotFound => err(ErrorType::FileNotFound, "File not found"),
        StorageError::TooLarge(n) => {
            err(ErrorType::FileTooLarge, format!("The file is larger than the limit of {n} bytes"))
        }
        StorageError::BadRange => err(ErrorType::RangeNotSatisfiable, "The requested range is not satisfiable"),
        StorageError::Body(m) => err(ErrorType::InvalidRequest, format!("Reading the upload failed: {m}")),
        StorageError::Backend(m) => {
            tracing::error!(error = %m, "object storage failed");
            err(ErrorType::StorageUnavailable, "Object storage is unavailable")
        }
    }
}

impl Gateway {
    /// Authenticates an uploader: an API key, or an upload token (Python's CDN token, or a runner's per-job token).
    pub async fn uploader(&self, headers: &HeaderMap) -> Result<Uploader, ApiErr> {
        let bearer =
            headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| match parse_authorization(v) {
                Ok(Credential::Bearer(t)) => Some(t),
                _ => None,
            });
        if let Some(up) = self.app_uploader(headers).await? {
            return Ok(up);
        }
        let Some(token) = bearer else {
            let c = self.authenticate(headers).await?;
            return Ok(Uploader { owner_id: c.owner_id, job_id: None });
        };
        let claims = self.signer.check_token(&token, now_s(self)).map_err(|e| match e {
            SignError::Expired => err(ErrorType::Unauthorized, "The upload token has expired"),
            _ => err(ErrorType::Unauthorized, "Invalid upload token"),
        })?;
        if let Some(k) = &claims.key_id {
            match self.store.get_key(k).await? {
                Some(rec) if rec.revoked_at.is_none() => {}
                _ => return Err(err(ErrorType::Unauthorized, "The key this upload token was issued to is revoked")),
            }
        }
        if let Some(j) = &claims.job_id {
            match self.store.get_job(j).await? {
                Some(job) if job.state != JobState::Completed && job.owner_id == claims.owner_id => {}
                _ => {
                    return Err(err(ErrorType::Unauthorized, "The request this upload token was issued for has ended"));
                }
            }
        }
        Ok(Uploader { owner_id: claims.owner_id, job_id: claims.job_id })
    }

    /// The upload-only key a deployed app's runners give the app as `FAL_KEY`, so that the fal toolkit's file
    /// outputs upload here: `darkroom-upload:{signed token naming the app}`. It can do nothing but start uploads,
    /// and only for a request of that app that is running now (the toolkit sends its `x-fal-request-id`); the
    /// file is filed under the request's owner.
    pub fn app_upload_key(&self, app_id: &str) -> String {
        let token = self.signer.token(&TokenClaims {
            owner_id: format!("{APP_UPLOAD_PREFIX}{app_id}"),
            key_id: None,
            job_id: None,
            exp: now_s(self) + 365 * 24 * 3600,
        });
        format!("{APP_UPLOAD_KEY_ID}:{token}")
    }

    /// An app's upload-only key, if that is what the request carries.
    async fn app_uploader(&self, headers: &HeaderMap) -> Result<Option<Uploader>, ApiErr> {
        let Some(Ok(Credential::Key { key_id, secret })) =
            headers.get("authorization").and_then(|v| v.to_str().ok()).map(parse_authorization)
        else {
            return Ok(None);
        };
        if key_id != APP_UPLOAD_KEY_ID {
            return Ok(None);
        }
        let claims = self
            .signer
            .check_token(&secret, now_s(self))
            .map_err(|_| err(ErrorType::Unauthorized, "Invalid upload key"))?;
        let Some(app_id) = claims.owner_id.strip_prefix(APP_UPLOAD_PREFIX) else {
            return Err(err(ErrorType::Unauthorized, "Invalid upload key"));
        };
        let Some(request_id) = headers.get("x-fal-request-id").and_then(|v| v.to_str().ok()) else {
            return Err(err(
                ErrorType::Forbidden,
                "An app's uploads must name the request they belong to (x-fal-request-id)",
            ));
        };
        match self.store.get_job(request_id).await? {
            Some(job) if job.app_id == app_id && job.state == JobState::Running => {
                Ok(Some(Uploader { owner_id: job.owner_id, job_id: Some(job.id) }))
            }
            _ => Err(err(
                ErrorType::Forbidden,
                format!("Request '{}' is not running on {app_id}", request_id.escape_default()),
            )),
        }
    }

    /// An upload token for a running job's outputs (filed under the job's owner; useless once the job ends).
    pub fn job_upload_token(&self, job_id: &str, owner_id: &str) -> String {
        self.signer.token(&TokenClaims {
            owner_id: owner_id.into(),
            key_id: None,
            job_id: Some(job_id.into()),
            exp: now_s(self) + 7 * 24 * 3600,
        })
    }

    /// The signed download URL of a file, valid for `--file-url-ttl` (never past the file's own expiry).
    pub fn file_url(&self, base: &str, f: &FileRecord) -> String {
        let mut exp = now_s(self) + self.cfg.file_url_ttl.as_secs() as i64;
        if let Some(e) = f.expires_at {
            exp = exp.min((e + 999).div_euclid(1000));
        }
        let cap = self.signer.capability(Op::Get, &f.id, exp);
        format!("{base}/files/{cap}/{}", encode_segment(&f.file_name))
    }

    /// Deletes expired files and abandoned uploads (objects first, then their records). Answers how many.
    pub async fn sweep_files(&self, now: i64) -> usize {
        let stale = now - UPLOAD_WINDOW.as_millis() as i64;
        let due = match self.store.expired_files(now, stale, 500).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "file expiry query failed");
                return 0;
            }
        };
        let mut n = 0;
        for f in due {
            let gone = async {
                self.storage.delete(&object_key(&f.id)).await?;
                self.storage.delete_prefix(&format!("parts/{}", f.id)).await?;
                Ok::<_, StorageError>(())
            }
            .await;
            match gone {
                Ok(()) => {
                    if self.store.delete_file(&f.id).await.unwrap_or(false) {
                        n += 1;
                    }
                }
                Err(e) => tracing::warn!(file = %f.id, error = %e, "could not delete an expired file; will retry"),
            }
        }
        if n > 0 {
            tracing::info!(count = n, "expired files deleted");
        }
        n
    }
}

/// Percent-encodes a file name as one path segment.
fn encode_segment(name: &str) -> String {
    let mut u = url::Url::parse("http://x/").expect("static URL");
    u.path_segments_mut().expect("base").push(name);
    u.path().trim_start_matches('/').to_string()
}

/// A safe display name: the last path component, no control characters, at most 200 characters.
pub fn clean_file_name(raw: Option<&str>, content_type: &str) -> String {
    let raw = raw.unwrap_or("");
    let last = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let mut name: String = last.chars().filter(|c| !c.is_control()).take(200).collect();
    name = name.trim().trim_start_matches('.').to_string();
    if name.is_empty() {
        let ext = content_type.split('/').nth(1).and_then(|s| s.split([';', '+', '-']).next()).unwrap_or("bin");
        let ext: String = ext.chars().filter(|c| c.is_ascii_alphanumeric()).take(10).collect();
        name = format!("file.{}", if ext.is_empty() { "bin" } else { &ext });
    }
    name
}

fn clean_content_type(raw: Option<&str>) -> String {
    match raw.map(str::trim) {
        Some(ct) if ct.len() <= 200 && ct.contains('/') && ct.bytes().all(|b| (0x20..0x7f).contains(&b)) => {
            ct.to_string()
        }
        _ => "application/octet-stream".into(),
    }
}

/// `X-Fal-Object-Lifecycle-Preference` / `X-Fal-Object-Lifecycle`: expiry and initial ACL.
#[derive(Debug, Default, Deserialize)]
struct Lifecycle {
    #[serde(default)]
    expiration_duration_seconds: Option<i64>,
    #[serde(default)]
    initial_acl: Option<Acl>,
}

#[derive(Debug, Default, Deserialize)]
struct Acl {
    #[serde(default)]
    default: Option<String>,
}

/// (expires_at, public) for a new file.
fn lifecycle(gw: &Gateway, headers: &HeaderMap) -> Result<(Option<i64>, bool), ApiErr> {
    let raw = ["x-fal-object-lifecycle-preference", "x-fal-object-lifecycle"]
        .iter()
        .find_map(|h| headers.get(*h))
        .map(|v| v.to_str().map_err(|_| err(ErrorType::InvalidRequest, "Lifecycle header is not ASCII")))
        .transpose()?;
    let lc: Lifecycle = match raw {
        Some(s) if !s.trim().is_empty() => serde_json::from_str(s).map_err(|e| {
            err(ErrorType::InvalidRequest, format!("X-Fal-Object-Lifecycle-Preference is not valid JSON: {e}"))
        })?,
        _ => Lifecycle::default(),
    };
    let now = gw.now();
    let expires_at = match lc.expiration_duration_seconds {
        Some(s) if s <= 0 => {
            return Err(err(ErrorType::InvalidRequest, "expiration_duration_seconds must be positive"));
        }
        Some(s) => Some(now.saturating_add(s.saturating_mul(1000))),
        None => gw.cfg.files_expire_after.map(|d| now + d.as_millis() as i64),
    };
    let public = lc.initial_acl.and_then(|a| a.default).is_some_and(|d| d.eq_ignore_ascii_case("allow"));
    Ok((expires_at, public))
}

#[derive(Debug, Default, Deserialize)]
struct Initiate {
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    file_name: Option<String>,
}

fn new_file(up: &Uploader, name: String, content_type: String, gw: &Gateway, lc: (Option<i64>, bool)) -> FileRecord {
    FileRecord {
        id: uuid::Uuid::now_v7().simple().to_string(),
        owner_id: up.owner_id.clone(),
        file_name: name,
        content_type,
        size: 0,
        state: "pending".into(),
        public: lc.1,
        job_id: up.job_id.clone(),
        created_at: gw.now(),
        completed_at: None,
        expires_at: lc.0,
    }
}

async fn initiate(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    routed: Routed,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let (gw, headers, routed) = (&gw, &headers, &routed);
    let up = gw.uploader(headers).await?;
    let req: Initiate = if body.iter().all(u8::is_ascii_whitespace) {
        Initiate::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiErr(darkroom_core::app::json_decode_error(&e.to_string())))?
    };
    let ct = clean_content_type(req.content_type.as_deref());
    let name = clean_file_name(req.file_name.as_deref(), &ct);
    let f = new_file(&up, name, ct, gw, lifecycle(gw, headers)?);
    gw.store.insert_file(&f).await?;
    let base = base_url(gw, headers, routed, "cdn");
    let put = gw.signer.capability(Op::Put, &f.id, now_s(gw) + UPLOAD_WINDOW.as_secs() as i64);
    Ok(json_response(
        StatusCode::OK,
        &json!({"upload_url": format!("{base}/upload/{put}"), "file_url": gw.file_url(&base, &f)}),
        None,
    ))
}

async fn cdn_token(State(gw): State<Arc<Gateway>>, headers: HeaderMap, routed: Routed) -> ApiResult<Response> {
    let caller = gw.authenticate(&headers).await?;
    let exp = now_s(&gw) + CDN_TOKEN_TTL.as_secs() as i64;
    let token = gw.signer.token(&TokenClaims {
        owner_id: caller.owner_id,
        key_id: (caller.key_id != "no-auth").then_some(caller.key_id),
        job_id: None,
        exp,
    });
    let expires_at = chrono::DateTime::from_timestamp(exp, 0).unwrap_or_default().to_rfc3339();
    Ok(json_response(
        StatusCode::OK,
        &json!({"token": token, "token_type": "Bearer", "base_url": base_url(&gw, &headers, &routed, "cdn"),
                "expires_at": expires_at}),
        None,
    ))
}

/// Everything under `/cdn`: Python's uploads, part uploads for both clients, and downloads.
async fn cdn(State(gw): State<Arc<Gateway>>, routed: Routed, req: Request) -> Response {
    match cdn_inner(gw, routed, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn cdn_inner(gw: Arc<Gateway>, routed: Routed, req: Request) -> ApiResult<Response> {
    let path = req.uri().path().strip_prefix("/cdn/").unwrap_or("").to_string();
    let segs: Vec<&str> = path.split('/').collect();
    let method = req.method().clone();
    let headers = req.headers().clone();
    let base = base_url(&gw, &headers, &routed, "cdn");
    match (&method, segs.as_slice()) {
        (&Method::POST, ["files", "upload"]) => python_upload(&gw, &headers, &base, req).await,
        (&Method::POST, ["files", "upload", "multipart"]) => python_multipart(&gw, &headers, &base).await,
        // Single PUT (JS, Python fallback), and parts and completion addressed from the upload URL (JS).
        (&Method::PUT, ["upload", cap]) => put_whole(&gw, cap, &base, req).await,
        (&Method::PUT, ["upload", cap, n]) => put_part(&gw, cap, n, req).await,
        (&Method::POST, ["upload", cap, "complete"]) => complete(&gw, cap, &base, req).await,
        // Parts and completion addressed from the file URL (Python).
        (&Method::PUT, ["files", _, .., "multipart", cap, n]) => put_part(&gw, cap, n, req).await,
        (&Method::POST, ["files", _, .., "multipart", cap, "complete"]) => complete(&gw, cap, &base, req).await,
        (&Method::GET | &Method::HEAD, ["files", cap, ..]) => {
            download(&gw, cap, &headers, method == Method::HEAD).await
        }
        (&Method::OPTIONS, _) => Ok(StatusCode::NO_CONTENT.into_response()),
        _ => Err(err(ErrorType::NotFound, format!("No route for {method} /cdn/{}", path.escape_default()))),
    }
}

fn body_stream(req: Request) -> impl futures::Stream<Item = Result<bytes::Bytes, axum::Error>> + Send {
    req.into_body().into_data_stream()
}

async fn python_upload(gw: &Arc<Gateway>, headers: &HeaderMap, base: &str, req: Request) -> ApiResult<Response> {
    let up = gw.uploader(headers).await?;
    let ct = clean_content_type(headers.get("content-type").and_then(|v| v.to_str().ok()));
    let name = clean_file_name(headers.get("x-fal-file-name").and_then(|v| v.to_str().ok()), &ct);
    let mut f = new_file(&up, name, ct, gw, lifecycle(gw, headers)?);
    let w =
        gw.storage.put_stream(&object_key(&f.id), body_stream(req), gw.cfg.max_file_size).await.map_err(storage_err)?;
    f.state = "ready".into();
    f.size = w.size as i64;
    f.completed_at = Some(gw.now());
    if let Err(e) = gw.store.insert_file(&f).await {
        let _ = gw.storage.delete(&object_key(&f.id)).await;
        return Err(e.into());
    }
    crate::metrics::file_uploaded(w.size);
    let url = gw.file_url(base, &f);
    Ok(json_response(StatusCode::OK, &file_json(&f, &url, Some(&url)), None))
}

/// fal's `File` shape, plus the upload's `access_url` for Python.
fn file_json(f: &FileRecord, url: &str, access_url: Option<&str>) -> Value {
    let mut v = json!({
        "url": url, "file_url": url, "content_type": f.content_type, "file_name": f.file_name,
        "file_size": f.size,
    });
    if let Some(a) = access_url {
        v["access_url"] = json!(a);
    }
    v
}

async fn python_multipart(gw: &Arc<Gateway>, headers: &HeaderMap, base: &str) -> ApiResult<Response> {
    let up = gw.uploader(headers).await?;
    let ct = clean_content_type(headers.get("content-type").and_then(|v| v.to_str().ok()));
    let name = clean_file_name(headers.get("x-fal-file-name").and_then(|v| v.to_str().ok()), &ct);
    let f = new_file(&up, name, ct, gw, lifecycle(gw, headers)?);
    gw.store.insert_file(&f).await?;
    let put = gw.signer.capability(Op::Put, &f.id, now_s(gw) + UPLOAD_WINDOW.as_secs() as i64);
    let url = gw.file_url(base, &f);
    Ok(json_response(StatusCode::OK, &json!({"access_url": url, "file_url": url, "uploadId": put}), None))
}

/// The pending file an upload capability is for.
async fn pending_file(gw: &Gateway, cap: &str) -> ApiResult<FileRecord> {
    let id = gw.signer.check(Op::Put, cap, now_s(gw)).map_err(sign_err)?;
    match gw.store.get_file(&id).await? {
        Some(f) if !f.is_ready() => Ok(f),
        Some(_) => Err(err(ErrorType::Conflict, "This upload is already complete")),
        None => Err(err(ErrorType::FileNotFound, "This upload no longer exists")),
    }
}

async fn put_whole(gw: &Arc<Gateway>, cap: &str, base: &str, req: Request) -> ApiResult<Response> {
    let mut f = pending_file(gw, cap).await?;
    let w =
        gw.storage.put_stream(&object_key(&f.id), body_stream(req), gw.cfg.max_file_size).await.map_err(storage_err)?;
    if !gw.store.finish_file(&f.id, w.size as i64, gw.now()).await? {
        return Err(err(ErrorType::Conflict, "This upload was completed concurrently"));
    }
    crate::metrics::file_uploaded(w.size);
    f.size = w.size as i64;
    let url = gw.file_url(base, &f);
    Ok(json_response(StatusCode::OK, &file_json(&f, &url, None), None))
}

async fn put_part(gw: &Arc<Gateway>, cap: &str, n: &str, req: Request) -> ApiResult<Response> {
    let f = pending_file(gw, cap).await?;
    let n: u32 = match n.parse() {
        Ok(n) if (1..=MAX_PARTS).contains(&n) => n,
        _ => return Err(err(ErrorType::InvalidRequest, format!("Part numbers go from 1 to {MAX_PARTS}"))),
    };
    let w = gw
        .storage
        .put_stream(&part_key(&f.id, n), body_stream(req), gw.cfg.max_file_size)
        .await
        .map_err(storage_err)?;
    let etag = format!("\"{}\"", w.etag);
    let mut r = json_response(StatusCode::OK, &json!({"partNumber": n, "etag": etag}), None);
    if let Ok(v) = HeaderValue::from_str(&etag) {
        r.headers_mut().insert("etag", v);
    }
    Ok(r)
}

#[derive(Debug, Deserialize)]
struct Complete {
    #[serde(default)]
    parts: Vec<PartRef>,
}

#[derive(Debug, Deserialize)]
struct PartRef {
    #[serde(rename = "partNumber", alias = "part_number")]
    part_number: u32,
    #[serde(default)]
    etag: Option<String>,
}

async fn complete(gw: &Arc<Gateway>, cap: &str, base: &str, req: Request) -> ApiResult<Response> {
    let mut f = pending_file(gw, cap).await?;
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .map_err(|_| err(ErrorType::PayloadTooLarge, "The completion body is too large"))?;
    let c: Complete =
        serde_json::from_slice(&body).map_err(|e| ApiErr(darkroom_core::app::json_decode_error(&e.to_string())))?;
    let stored = gw.storage.parts(&f.id).await.map_err(storage_err)?;
    let mut listed = c.parts;
    listed.sort_by_key(|p| p.part_number);
    if listed.is_empty() {
        return Err(err(
            ErrorType::UploadIncomplete,
            "List the uploaded parts: {\"parts\": [{\"partNumber\", \"etag\"}]}",
        ));
    }
    let mut keys = vec![];
    let mut total = 0u64;
    for (i, p) in listed.iter().enumerate() {
        if i > 0 && listed[i - 1].part_number == p.part_number {
            return Err(err(ErrorType::UploadIncomplete, format!("Part {} is listed twice", p.part_number)));
        }
        let Some((_, w)) = stored.iter().find(|(n, _)| *n == p.part_number) else {
            return Err(err(ErrorType::UploadIncomplete, format!("Part {} was not uploaded", p.part_number)));
        };
        if let Some(e) = &p.etag
            && e.trim_matches('"') != w.etag
        {
            return Err(err(ErrorType::UploadIncomplete, format!("Part {} does not match its ETag", p.part_number)));
        }
        total += w.size;
        keys.push(part_key(&f.id, p.part_number));
    }
    if total > gw.cfg.max_file_size {
        return Err(storage_err(StorageError::TooLarge(gw.cfg.max_file_size)));
    }
    let w = gw.storage.concat(&keys, &object_key(&f.id)).await.map_err(storage_err)?;
    if !gw.store.finish_file(&f.id, w.size as i64, gw.now()).await? {
        return Err(err(ErrorType::Conflict, "This upload was completed concurrently"));
    }
    if let Err(e) = gw.storage.delete_prefix(&format!("parts/{}", f.id)).await {
        tracing::warn!(file = %f.id, error = %e, "could not delete upload parts");
    }
    crate::metrics::file_uploaded(w.size);
    f.size = w.size as i64;
    let url = gw.file_url(base, &f);
    Ok(json_response(StatusCode::OK, &file_json(&f, &url, Some(&url)), None))
}

/// `Range: bytes=a-b | a- | -n` (one range; anything else is served whole).
fn parse_range(h: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ApiErr> {
    let Some(spec) = h.and_then(|v| v.to_str().ok()).and_then(|s| s.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let unsat = || err(ErrorType::RangeNotSatisfiable, format!("The file has {size} bytes"));
    let (a, b) = spec.split_once('-').ok_or_else(unsat)?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| unsat())?;
        if n == 0 {
            return Err(unsat());
        }
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().map_err(|_| unsat())?;
        let end = if b.is_empty() { size } else { b.parse::<u64>().map_err(|_| unsat())?.saturating_add(1).min(size) };
        (start, end)
    };
    if start >= end || start >= size {
        return Err(unsat());
    }
    Ok(Some((start, end)))
}

/// The file a download capability (or a public file's bare id) names, if it may be read now.
pub async fn readable_file(gw: &Gateway, cap: &str) -> ApiResult<FileRecord> {
    let (id, signed) = if cap.contains('.') {
        (gw.signer.check(Op::Get, cap, now_s(gw)).map_err(sign_err)?, true)
    } else {
        (cap.to_string(), false)
    };
    let f = match gw.store.get_file(&id).await? {
        Some(f) if f.is_ready() && f.expires_at.is_none_or(|e| e > gw.now()) => f,
        _ => return Err(err(ErrorType::FileNotFound, "File not found")),
    };
    if !signed && !f.public {
        // Without a signature only public files are served; say nothing about whether this one exists.
        return Err(err(ErrorType::FileNotFound, "File not found"));
    }
    Ok(f)
}

async fn download(gw: &Arc<Gateway>, cap: &str, headers: &HeaderMap, head_only: bool) -> ApiResult<Response> {
    let f = readable_file(gw, cap).await?;
    let size = f.size as u64;
    let range = parse_range(headers.get("range"), size)?;
    let disposition = format!("inline; filename*=UTF-8''{}", encode_segment(&f.file_name));
    let mut b = Response::builder()
        .header("content-type", &f.content_type)
        .header("accept-ranges", "bytes")
        .header("content-disposition", disposition)
        .header("x-content-type-options", "nosniff")
        // Uploaded HTML or SVG must not run as a page of this origin.
        .header("content-security-policy", "sandbox; default-src 'none'")
        .header("cache-control", if f.public { "public, max-age=3600" } else { "private, max-age=3600" });
    let status = match range {
        Some((s, e)) => {
            b = b.header("content-range", format!("bytes {s}-{}/{size}", e - 1)).header("content-length", e - s);
            StatusCode::PARTIAL_CONTENT
        }
        None => {
            b = b.header("content-length", size);
            StatusCode::OK
        }
    };
    b = b.status(status);
    if head_only {
        return Ok(b.body(Body::empty()).expect("valid response"));
    }
    let reading = gw.storage.get(&object_key(&f.id), range.map(|(s, e)| (s, Some(e)))).await.map_err(storage_err)?;
    let bytes = reading.stream.map_err(|e| std::io::Error::other(e.to_string()));
    crate::metrics::file_downloaded(range.map(|(s, e)| e - s).unwrap_or(size));
    Ok(b.body(Body::from_stream(bytes)).expect("valid response"))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    before: Option<String>,
    /// Admins: another owner's files.
    #[serde(default)]
    owner_id: Option<String>,
}

async fn list_files(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    routed: Routed,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    let caller = gw.authenticate(&headers).await?;
    let owner = match q.owner_id {
        Some(o) if caller.is_admin() => Some(o),
        Some(_) => return Err(err(ErrorType::Forbidden, "Only admins can list other owners' files")),
        None if caller.is_admin() => None,
        None => Some(caller.owner_id.clone()),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let files = gw.store.list_files(&FileFilter { owner_id: owner, before: q.before, limit }).await?;
    let base = base_url(&gw, &headers, &routed, "cdn");
    let now = gw.now();
    let items: Vec<Value> =
        files.iter().filter(|f| f.expires_at.is_none_or(|e| e > now)).map(|f| file_info(&gw, &base, f)).collect();
    let next = if files.len() as i64 == limit { files.last().map(|f| f.id.clone()) } else { None };
    Ok(json_response(StatusCode::OK, &json!({"files": items, "next_before": next}), None))
}

fn file_info(gw: &Gateway, base: &str, f: &FileRecord) -> Value {
    let ms = |m: Option<i64>| m.and_then(chrono::DateTime::from_timestamp_millis).map(|d| d.to_rfc3339());
    json!({
        "id": f.id, "owner_id": f.owner_id, "file_name": f.file_name, "content_type": f.content_type,
        "file_size": f.size, "public": f.public, "request_id": f.job_id,
        "created_at": ms(Some(f.created_at)), "expires_at": ms(f.expires_at),
        "url": gw.file_url(base, f),
    })
}

async fn owned_file(gw: &Gateway, headers: &HeaderMap, id: &str) -> ApiResult<FileRecord> {
    let caller = gw.authenticate(headers).await?;
    match gw.store.get_file(id).await? {
        Some(f) if caller.can_see(&f.owner_id) && f.is_ready() && f.expires_at.is_none_or(|e| e > gw.now()) => Ok(f),
        _ => Err(err(ErrorType::FileNotFound, format!("No file {}", id.escape_default()))),
    }
}

async fn show_file(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    routed: Routed,
    ApiPath(id): ApiPath,
) -> ApiResult<Response> {
    let f = owned_file(&gw, &headers, &id).await?;
    let base = base_url(&gw, &headers, &routed, "cdn");
    Ok(json_response(StatusCode::OK, &file_info(&gw, &base, &f), None))
}

async fn delete_file(State(gw): State<Arc<Gateway>>, headers: HeaderMap, ApiPath(id): ApiPath) -> ApiResult<Response> {
    let f = owned_file(&gw, &headers, &id).await?;
    gw.storage.delete(&object_key(&f.id)).await.map_err(storage_err)?;
    gw.store.delete_file(&f.id).await?;
    Ok(Json(json!({"id": f.id, "deleted": true})).into_response())
}
