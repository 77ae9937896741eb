//! File uploads, downloads and expiry through the router, on a real SQLite store and a local storage folder, with a
//! clock the tests drive.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use darkroom_core::Clock;
use darkroom_core::auth::Scope;
use darkroom_gateway::{Gateway, GatewayConfig};
use darkroom_storage::{Storage, StorageConfig};
use darkroom_store::sqlite::{Durability, SqliteStore};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Manual(AtomicI64);
impl Clock for Manual {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct T {
    gw: Arc<Gateway>,
    clock: Arc<Manual>,
    key: String,
    other: String,
    objects: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

const HOST: &str = "127.0.0.1:9";

async fn gateway(max_file_size: u64) -> T {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db"), Durability::Normal).await.unwrap());
    let objects = dir.path().join("objects");
    let storage = Storage::open(&StorageConfig::Local(objects.clone())).unwrap();
    let cfg = GatewayConfig {
        server_secret: b"0123456789abcdef0123456789abcdef".to_vec(),
        storage: Some(storage),
        max_file_size,
        ..Default::default()
    };
    let clock = Arc::new(Manual(AtomicI64::new(1_800_000_000_000)));
    let gw = Gateway::new(cfg, store, clock.clone(), vec![]).await.unwrap();
    let (_, key) = gw.create_key("owner-a", Scope::Client, "a").await.unwrap();
    let (_, other) = gw.create_key("owner-b", Scope::Client, "b").await.unwrap();
    T { gw, clock, key: format!("Key {key}"), other: format!("Key {other}"), objects, _dir: dir }
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Turns an absolute URL of this server into the path the router sees.
fn path_of(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    assert_eq!(u.host_str(), Some("127.0.0.1"), "{url}");
    format!("{}{}", u.path(), u.query().map(|q| format!("?{q}")).unwrap_or_default())
}

impl T {
    async fn call(&self, method: &str, uri: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Resp {
        let mut b = Request::builder().method(method).uri(uri).header("host", HOST);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self.gw.router().oneshot(b.body(Body::from(body)).unwrap()).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        Resp { status, headers, body }
    }

    fn advance(&self, ms: i64) {
        self.clock.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// JS's flow: initiate, then PUT the bytes to the upload URL without credentials.
    async fn upload_js(&self, data: &[u8], name: &str, ct: &str, lifecycle: Option<&str>) -> String {
        let mut h = vec![("authorization", self.key.as_str()), ("content-type", "application/json")];
        if let Some(l) = lifecycle {
            h.push(("x-fal-object-lifecycle", l));
        }
        let r = self
            .call(
                "POST",
                "/rest/storage/upload/initiate?storage_type=fal-cdn-v3",
                &h,
                json!({"content_type": ct, "file_name": name}).to_string().into_bytes(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        let put =
            self.call("PUT", &path_of(v["upload_url"].as_str().unwrap()), &[("content-type", ct)], data.to_vec()).await;
        assert!(put.status.is_success(), "{}", String::from_utf8_lossy(&put.body));
        v["file_url"].as_str().unwrap().to_string()
    }

    async fn objects_on_disk(&self) -> usize {
        fn count(p: &std::path::Path) -> usize {
            std::fs::read_dir(p)
                .map(|d| d.flatten().map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 }).sum())
                .unwrap_or(0)
        }
        count(&self.objects)
    }
}

#[tokio::test]
async fn js_single_and_multipart_uploads_download_with_type_and_ranges() {
    let t = gateway(64 << 20).await;
    let url = t.upload_js(b"hello, files", "hello.txt", "text/plain", None).await;
    assert!(url.starts_with("http://127.0.0.1:9/cdn/files/") && url.ends_with("/hello.txt"), "{url}");
    let r = t.call("GET", &path_of(&url), &[], vec![]).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::OK, &b"hello, files"[..]));
    assert_eq!(r.headers["content-type"], "text/plain");
    assert_eq!(r.headers["accept-ranges"], "bytes");
    let r = t.call("GET", &path_of(&url), &[("range", "bytes=7-")], vec![]).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::PARTIAL_CONTENT, &b"files"[..]));
    assert_eq!(r.headers["content-range"], "bytes 7-11/12");
    let r = t.call("GET", &path_of(&url), &[("range", "bytes=-3")], vec![]).await;
    assert_eq!(r.body, b"les");
    let r = t.call("GET", &path_of(&url), &[("range", "bytes=50-60")], vec![]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.json()["error_type"], "range_not_satisfiable");
    let r = t.call("HEAD", &path_of(&url), &[], vec![]).await;
    assert_eq!((r.status, r.headers["content-length"].to_str().unwrap(), r.body.len()), (StatusCode::OK, "12", 0));

    // Multipart (JS): initiate-multipart, PUT {upload_url}/{n} answering JSON, POST {upload_url}/complete.
    let r = t
        .call(
            "POST",
            "/rest/storage/upload/initiate-multipart?storage_type=fal-cdn-v3",
            &[("authorization", &t.key)],
            json!({"content_type": "application/octet-stream", "file_name": "big.bin"}).to_string().into_bytes(),
        )
        .await;
    let v = r.json();
    let up = path_of(v["upload_url"].as_str().unwrap());
    let data: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 253) as u8).collect();
    let mut parts = vec![];
    for (i, chunk) in data.chunks(5 << 20).enumerate() {
        let r = t.call("PUT", &format!("{up}/{}", i + 1), &[], chunk.to_vec()).await;
        assert_eq!(r.status, 200);
        let p = r.json();
        assert_eq!(p["partNumber"], i + 1);
        assert_eq!(r.headers["etag"].to_str().unwrap(), p["etag"].as_str().unwrap());
        parts.push(p);
    }
    // A wrong ETag, or a part never uploaded, is refused; the upload can still be completed properly.
    let bad = json!({"parts": [{"partNumber": 1, "etag": "\"nope\""}, parts[1]]});
    let r = t.call("POST", &format!("{up}/complete"), &[], bad.to_string().into_bytes()).await;
    assert_eq!((r.status, r.json()["error_type"].as_str()), (StatusCode::BAD_REQUEST, Some("upload_incomplete")));
    let missing = json!({"parts": [parts[0], parts[1], {"partNumber": 3, "etag": "x"}]});
    let r = t.call("POST", &format!("{up}/complete"), &[], missing.to_string().into_bytes()).await;
    assert_eq!(r.json()["error_type"], "upload_incomplete");
    let r = t.call("POST", &format!("{up}/complete"), &[], json!({"parts": parts}).to_string().into_bytes()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = t.call("GET", &path_of(v["file_url"].as_str().unwrap()), &[], vec![]).await;
    assert_eq!(got.body.len(), data.len());
    assert!(got.body == data);
    // Parts are gone once joined; completing twice is a conflict.
    assert_eq!(t.gw.storage.parts(&got_id(v["file_url"].as_str().unwrap())).await.unwrap().len(), 0);
    let r = t.call("POST", &format!("{up}/complete"), &[], json!({"parts": parts}).to_string().into_bytes()).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

fn got_id(url: &str) -> String {
    let p = path_of(url);
    p.split('/').nth(3).unwrap().split('.').next().unwrap().to_string()
}

#[tokio::test]
async fn python_token_single_and_multipart_uploads() {
    let t = gateway(64 << 20).await;
    let r = t
        .call("POST", "/rest/storage/auth/token?storage_type=fal-cdn-v3", &[("authorization", &t.key)], b"{}".to_vec())
        .await;
    let tok = r.json();
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["base_url"], "http://127.0.0.1:9/cdn");
    let exp = chrono::DateTime::parse_from_rfc3339(tok["expires_at"].as_str().unwrap()).unwrap();
    assert!(exp.timestamp() > 1_800_000_000, "expires_at carries an offset and is in the future");
    let bearer = format!("Bearer {}", tok["token"].as_str().unwrap());
    let r = t
        .call(
            "POST",
            "/cdn/files/upload",
            &[("authorization", &bearer), ("content-type", "image/png"), ("x-fal-file-name", "../../etc/passwd")],
            b"\x89PNG fake".to_vec(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let access = r.json()["access_url"].as_str().unwrap().to_string();
    assert!(access.ends_with("/passwd"), "names are reduced to their last component: {access}");
    let got = t.call("GET", &path_of(&access), &[], vec![]).await;
    assert_eq!(
        (got.body.as_slice(), got.headers["content-type"].to_str().unwrap()),
        (&b"\x89PNG fake"[..], "image/png")
    );
    // Without a token, or with a forged one: 401.
    let r = t.call("POST", "/cdn/files/upload", &[], b"x".to_vec()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let forged = bearer.replace("dkt1.", "dkt1.x");
    let r = t.call("POST", "/cdn/files/upload", &[("authorization", &forged)], b"x".to_vec()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Multipart: {base_url}/files/upload/multipart, PUT {access_url}/multipart/{uploadId}/{n} (ETag), complete.
    let r = t
        .call(
            "POST",
            "/cdn/files/upload/multipart",
            &[("authorization", &bearer), ("content-type", "video/mp4"), ("x-fal-file-name", "clip.mp4")],
            vec![],
        )
        .await;
    let v = r.json();
    let access = path_of(v["access_url"].as_str().unwrap());
    let upload_id = v["uploadId"].as_str().unwrap();
    let mut parts = vec![];
    for n in 1..=3u8 {
        let r = t
            .call("PUT", &format!("{access}/multipart/{upload_id}/{n}"), &[("authorization", &bearer)], vec![n; 1000])
            .await;
        assert_eq!(r.status, 200);
        parts.push(json!({"partNumber": n, "etag": r.headers["etag"].to_str().unwrap()}));
    }
    // Not downloadable before completion.
    assert_eq!(t.call("GET", &access, &[], vec![]).await.status, StatusCode::NOT_FOUND);
    let r = t
        .call(
            "POST",
            &format!("{access}/multipart/{upload_id}/complete"),
            &[("authorization", &bearer)],
            json!({"parts": parts}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = t.call("GET", &access, &[], vec![]).await;
    assert_eq!(got.body.len(), 3000);
    assert_eq!(&got.body[1000..1003], &[2, 2, 2]);
    assert_eq!(got.headers["content-type"], "video/mp4");

    // The token dies with its key.
    let kid = t.key.trim_start_matches("Key ").split(':').next().unwrap().to_string();
    t.gw.store.revoke_key(&kid, t.gw.now()).await.unwrap();
    let r = t.call("POST", "/cdn/files/upload", &[("authorization", &bearer)], b"x".to_vec()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn tampered_expired_and_traversal_urls_get_no_data() {
    let t = gateway(64 << 20).await;
    let url =
        t.upload_js(b"secret bytes", "s.txt", "text/plain", Some(r#"{"expiration_duration_seconds": 3600}"#)).await;
    let p = path_of(&url);
    let cap = p.split('/').nth(3).unwrap().to_string();
    let (id, rest) = cap.split_once('.').unwrap();
    let (exp, sig) = rest.split_once('.').unwrap();
    let flip = |s: &str| {
        let mut c: Vec<char> = s.chars().collect();
        c[3] = if c[3] == 'A' { 'B' } else { 'A' };
        c.into_iter().collect::<String>()
    };
    for bad in [
        format!("{id}.{exp}.{}", flip(sig)),
        format!("{id}.{}.{sig}", exp.parse::<i64>().unwrap() + 100_000),
        format!("{}.{exp}.{sig}", flip(id)),
        format!("{id}.{exp}"),
        "..%2F..%2Fdb".to_string(),
        "..".to_string(),
        id.to_string(), // private files need a signature
    ] {
        let r = t.call("GET", &format!("/cdn/files/{bad}/s.txt"), &[], vec![]).await;
        assert!(matches!(r.status.as_u16(), 403 | 404), "{bad}: {}", r.status);
        assert!(!String::from_utf8_lossy(&r.body).contains("secret bytes"));
        assert!(r.json()["error_type"].is_string());
    }
    let r = t.call("GET", &format!("/cdn/files/{id}.{exp}.{}/s.txt", flip(sig)), &[], vec![]).await;
    assert_eq!(r.json()["error_type"], "file_url_invalid");
    for bad in ["/cdn/files/../../db", "/cdn/../db", "/cdn/files/%2e%2e/%2e%2e/db"] {
        let r = t.call("GET", bad, &[], vec![]).await;
        assert!(matches!(r.status.as_u16(), 403 | 404), "{bad}: {}", r.status);
    }
    // The name segment is cosmetic: another name still serves the same file, and cannot reach anything else.
    let r = t.call("GET", &format!("/cdn/files/{cap}/..%2F..%2Fdb"), &[], vec![]).await;
    assert_eq!(r.body, b"secret bytes");
    // An hour later the URL has expired.
    t.advance(3_601_000);
    let r = t.call("GET", &p, &[], vec![]).await;
    assert_eq!((r.status, r.json()["error_type"].as_str()), (StatusCode::FORBIDDEN, Some("file_url_expired")));
}

#[tokio::test]
async fn oversize_uploads_are_refused_and_leave_nothing() {
    let t = gateway(1000).await;
    let r = t
        .call(
            "POST",
            "/cdn/files/upload",
            &[("authorization", &t.key), ("content-type", "text/plain")],
            vec![b'x'; 1001],
        )
        .await;
    assert_eq!((r.status, r.json()["error_type"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("file_too_large")));
    let r = t
        .call("POST", "/rest/storage/upload/initiate", &[("authorization", &t.key)], br#"{"file_name":"a"}"#.to_vec())
        .await;
    let up = path_of(r.json()["upload_url"].as_str().unwrap());
    let r = t.call("PUT", &up, &[], vec![b'x'; 5000]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(t.objects_on_disk().await, 0);
    // Within the limit, the same upload URL still works.
    assert_eq!(t.call("PUT", &up, &[], vec![b'x'; 1000]).await.status, 200);
    // Parts that add up to more than the limit are refused at completion.
    let r =
        t.call("POST", "/rest/storage/upload/initiate-multipart", &[("authorization", &t.key)], b"{}".to_vec()).await;
    let up = path_of(r.json()["upload_url"].as_str().unwrap());
    let mut parts = vec![];
    for n in 1..=2 {
        let r = t.call("PUT", &format!("{up}/{n}"), &[], vec![b'y'; 600]).await;
        parts.push(r.json());
    }
    let r = t.call("POST", &format!("{up}/complete"), &[], json!({"parts": parts}).to_string().into_bytes()).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn files_belong_to_their_owner_and_expire_by_the_sweeper() {
    let t = gateway(64 << 20).await;
    let keep = t.upload_js(b"kept", "keep.txt", "text/plain", None).await;
    let short =
        t.upload_js(b"short-lived", "short.txt", "text/plain", Some(r#"{"expiration_duration_seconds": 60}"#)).await;
    // A public file is readable at its bare id.
    let public =
        t.upload_js(b"for everyone", "pub.txt", "text/plain", Some(r#"{"initial_acl": {"default": "allow"}}"#)).await;
    let pid = got_id(&public);
    assert_eq!(t.call("GET", &format!("/cdn/files/{pid}/pub.txt"), &[], vec![]).await.body, b"for everyone");
    // An upload that is never finished.
    t.call("POST", "/rest/storage/upload/initiate", &[("authorization", &t.key)], b"{}".to_vec()).await;

    let list = t.call("GET", "/v1/files", &[("authorization", &t.key)], vec![]).await.json();
    assert_eq!(list["files"].as_array().unwrap().len(), 3, "{list}");
    assert_eq!(list["files"][0]["file_name"], "pub.txt", "newest first");
    let theirs = t.call("GET", "/v1/files", &[("authorization", &t.other)], vec![]).await.json();
    assert_eq!(theirs["files"].as_array().unwrap().len(), 0);
    let id = got_id(&keep);
    let r = t.call("GET", &format!("/v1/files/{id}"), &[("authorization", &t.other)], vec![]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t.call("DELETE", &format!("/v1/files/{id}"), &[("authorization", &t.other)], vec![]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let info = t.call("GET", &format!("/v1/files/{id}"), &[("authorization", &t.key)], vec![]).await.json();
    assert_eq!((info["file_size"].as_i64(), info["content_type"].as_str()), (Some(4), Some("text/plain")));
    assert_eq!(t.call("GET", &path_of(info["url"].as_str().unwrap()), &[], vec![]).await.body, b"kept");
    assert_eq!(t.objects_on_disk().await, 3);

    // 61 s later the short-lived file is gone, to readers at once and from storage at the next sweep.
    t.advance(61_000);
    assert_eq!(t.call("GET", &path_of(&short), &[], vec![]).await.status.as_u16() / 100, 4);
    assert_eq!(t.gw.sweep_files(t.gw.now()).await, 1);
    assert_eq!(t.objects_on_disk().await, 2);
    // A day later the unfinished upload's record goes too; the kept file stays (the server default is 30 days).
    t.advance(25 * 3600 * 1000);
    assert_eq!(t.gw.sweep_files(t.gw.now()).await, 1);
    assert_eq!(t.call("GET", &path_of(info["url"].as_str().unwrap()), &[], vec![]).await.body, b"kept");
    // Deleted by its owner: the object and the URL are dead.
    let r = t.call("DELETE", &format!("/v1/files/{id}"), &[("authorization", &t.key)], vec![]).await;
    assert_eq!(r.status, 200);
    assert_eq!(t.call("GET", &path_of(&keep), &[], vec![]).await.status, StatusCode::NOT_FOUND);
    assert_eq!(t.objects_on_disk().await, 1);
    // 30 days on, the server default expiry takes the rest.
    t.advance(30 * 24 * 3600 * 1000);
    assert_eq!(t.gw.sweep_files(t.gw.now()).await, 1);
    assert_eq!(t.objects_on_disk().await, 0);
}
