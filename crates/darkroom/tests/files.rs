//! Files end to end: a real `darkroom serve` with its runner processes, on a local folder and on S3 (SeaweedFS on
//! loopback). Upload an image, run `darkroom/image-utils` on its URL, download the output; inputs fetched by a
//! remote runner through the gateway; the guard on external input URLs.

mod common;

use common::Server;
use darkroom_storage::testing::SeaweedFs;
use serde_json::{Value, json};

const IMG: &str = "darkroom/image-utils";

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 11) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn upload(s: &Server, data: &[u8], name: &str) -> String {
    let v: Value = s
        .http
        .post(format!("{}/rest/storage/upload/initiate?storage_type=fal-cdn-v3", s.url))
        .header("authorization", s.auth())
        .json(&json!({"content_type": "image/png", "file_name": name}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = s.http.put(v["upload_url"].as_str().unwrap()).body(data.to_vec()).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    v["file_url"].as_str().unwrap().to_string()
}

/// Submits to image-utils and waits for the result (status code, body).
async fn run(s: &Server, input: Value) -> (u16, Value) {
    let sub: Value = s
        .http
        .post(format!("{}/queue/{IMG}", s.url))
        .header("authorization", s.auth())
        .json(&input)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sub["request_id"].as_str().unwrap_or_else(|| panic!("{sub}"));
    s.result_in(IMG, id).await
}

async fn round_trip(s: &Server) {
    let url = upload(s, &png(40, 20), "source.png").await;
    let (code, out) = run(s, json!({"image_url": url, "operation": "resize", "width": 10})).await;
    assert_eq!(code, 200, "{out}");
    let img = &out["image"];
    assert_eq!((img["width"].as_u64(), img["height"].as_u64()), (Some(10), Some(5)), "{out}");
    assert_eq!(img["content_type"], "image/png");
    let out_url = img["url"].as_str().unwrap();
    assert!(out_url.starts_with(&format!("{}/cdn/files/", s.url)), "{out_url}");
    let r = s.http.get(out_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let bytes = r.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, img["file_size"].as_u64().unwrap());
    let decoded = image::load_from_memory(&bytes).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (10, 5));

    // The output is the requester's file, linked to its request.
    let files: Value = s
        .http
        .get(format!("{}/v1/files", s.url))
        .header("authorization", s.auth())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let outputs: Vec<&Value> =
        files["files"].as_array().unwrap().iter().filter(|f| f["request_id"].is_string()).collect();
    assert_eq!(outputs.len(), 1, "{files}");
    assert_eq!(outputs[0]["file_name"], "image.png");

    // sync_mode: the output comes back inline, and nothing more is stored.
    let (code, out) =
        run(s, json!({"image_url": url, "operation": "convert", "output_format": "jpeg", "sync_mode": true})).await;
    assert_eq!(code, 200, "{out}");
    assert!(out["image"]["url"].as_str().unwrap().starts_with("data:image/jpeg;base64,"));
    // A data URI input works too.
    let data_uri = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, png(8, 8))
    );
    let (code, out) = run(s, json!({"image_url": data_uri, "operation": "crop", "width": 4, "height": 2})).await;
    assert_eq!((code, out["image"]["width"].as_u64()), (200, Some(4)), "{out}");
    // A tampered input URL is the caller's error, naming the field.
    let (head, tail) = url.split_once("/cdn/files/").unwrap();
    let bad = format!("{head}/cdn/files/{}", tail.replacen('.', ".1", 1));
    let (code, out) = run(s, json!({"image_url": bad})).await;
    assert_eq!(code, 422, "{out}");
    assert_eq!(out["detail"][0]["loc"], json!(["body", "image_url"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_run_image_utils_and_download_on_a_local_folder() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--tls"]);
    round_trip(&s).await;
    assert!(dir.path().join("objects/objects").is_dir(), "files are in the data folder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_run_image_utils_and_download_on_s3() {
    let weed = tokio::task::spawn_blocking(SeaweedFs::start).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--tls", "--storage", &weed.storage_url()]);
    round_trip(&s).await;
    assert!(!dir.path().join("objects").exists(), "nothing is written to the data folder");
}

/// A tiny HTTP server on 127.0.0.1 that answers every request with `body` as a PNG.
async fn serve_png(body: Vec<u8>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut c, _)) = l.accept().await else { return };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(head.as_bytes()).await;
                let _ = c.write_all(&body).await;
            });
        }
    });
    format!("http://{addr}/picture.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_input_urls_are_guarded_against_private_addresses() {
    let url = serve_png(png(12, 6)).await;
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    for blocked in [
        url.clone(),
        "http://localhost:1/x.png".into(),
        "http://[::1]:1/x.png".into(),
        "http://169.254.169.254/latest".into(),
    ] {
        let (code, out) = run(&s, json!({"image_url": blocked})).await;
        assert_eq!(code, 422, "{blocked}: {out}");
        assert_eq!(out["detail"][0]["type"], "url_not_allowed", "{blocked}: {out}");
    }
    let (code, out) = run(&s, json!({"image_url": "file:///etc/passwd"})).await;
    assert_eq!((code, out["detail"][0]["type"].as_str()), (422, Some("invalid_url")), "{out}");
    drop(s);
    // Allowed explicitly, the same URL is fetched.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--fetch-allow", "127.0.0.1/32"]);
    let (code, out) = run(&s, json!({"image_url": url, "operation": "convert"})).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["image"]["width"], 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_runner_reads_stored_inputs_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--no-local-runners"]);
    let token = s.post_json("/v1/runner-tokens", json!({"app_id": IMG})).await["token"].as_str().unwrap().to_string();
    // No DARKROOM_STORAGE or key: this runner is "on another machine" and fetches inputs over HTTP.
    let mut runner = std::process::Command::new(env!("CARGO_BIN_EXE_darkroom"))
        .args(["runner", "--gateway", &s.url, "--token", &token, "--app", IMG])
        .env("DARKROOM_LOG", "warn")
        .env_remove("DARKROOM_STORAGE")
        .env_remove("DARKROOM_FILES_KEY")
        .spawn()
        .unwrap();
    let url = upload(&s, &png(30, 30), "in.png").await;
    let (code, out) = run(&s, json!({"image_url": url, "operation": "resize", "width": 6, "height": 6})).await;
    let _ = runner.kill();
    let _ = runner.wait();
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["image"]["width"], 6);
    let r = s.http.get(out["image"]["url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(image::load_from_memory(&r.bytes().await.unwrap()).unwrap().width(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_cli_uploads_lists_downloads_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &["--tls"]);
    let d = dir.path().to_str().unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_darkroom")).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("clip data.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let (ok, url, err) = cli(&["files", "upload", "--data-dir", d, src.to_str().unwrap(), "--expires-in", "3600"]);
    assert!(ok, "{err}");
    let url = url.trim();
    assert!(url.ends_with("/clip%20data.bin"), "{url}");
    assert_eq!(s.http.get(url).send().await.unwrap().bytes().await.unwrap().len(), data.len());
    let (ok, ls, err) = cli(&["files", "ls", "--data-dir", d]);
    assert!(ok, "{err}");
    let line = ls.lines().find(|l| l.ends_with("clip data.bin")).unwrap_or_else(|| panic!("{ls}"));
    assert!(line.contains("3000000") && line.contains("application/octet-stream"), "{line}");
    let id = line.split_whitespace().next().unwrap().to_string();
    let dest = work.path().join("back.bin");
    let (ok, _, err) = cli(&["files", "get", "--data-dir", d, &id, "-o", dest.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(std::fs::read(&dest).unwrap() == data);
    let (ok, _, err) = cli(&["files", "rm", "--data-dir", d, &id]);
    assert!(ok, "{err}");
    assert_eq!(s.http.get(url).send().await.unwrap().status(), 404);
    let (ok, _, err) = cli(&["files", "get", "--data-dir", d, &id]);
    assert!(!ok && err.contains("file_not_found"), "{err}");
}
