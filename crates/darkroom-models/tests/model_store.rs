//! The model store against a local HTTP fixture in the Hugging Face Hub's layout (loopback only): revision
//! pinning, the Hugging Face cache layout, sha256 mismatches refused, resuming a cut download, offline mode, one
//! fetch at a time, plain URLs, and user-supplied weights.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as AxPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use darkroom_models::store::{FileSpec, Manifest, ModelStore, PullEvent, Quiet, Source, StoreConfig, StoreError};
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A hub with repositories, each with commits of files and refs (branch → commit).
#[derive(Default)]
struct Hub {
    commits: HashMap<(String, String), BTreeMap<String, Vec<u8>>>,
    refs: HashMap<(String, String), String>,
    /// Every GET: (path, Range header).
    log: Vec<(String, Option<String>)>,
    /// Cut the next response body of this file whose Range starts with the prefix after this many bytes.
    cut: Option<(String, usize, &'static str)>,
}

type Shared = Arc<Mutex<Hub>>;

async fn resolve(
    State(hub): State<Shared>,
    AxPath((org, name, rev, file)): AxPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = format!("{org}/{name}");
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut h = hub.lock().unwrap();
    h.log.push((format!("{repo}/resolve/{rev}/{file}"), range.clone()));
    let commit = h.refs.get(&(repo.clone(), rev.clone())).cloned().unwrap_or(rev.clone());
    let Some(data) = h.commits.get(&(repo, commit.clone())).and_then(|c| c.get(&file)).cloned() else {
        return Response::builder().status(404).body(Body::from("Entry not found")).unwrap();
    };
    let len = data.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() { len - 1 } else { b.parse::<usize>().unwrap().min(len - 1) };
            (a, b)
        }
        None => (0, len - 1),
    };
    let body = data[start..=end].to_vec();
    let cut = match &h.cut {
        Some((f, n, prefix)) if *f == file && body.len() > 1 && range.as_deref().unwrap_or("").starts_with(prefix) => {
            let n = *n;
            h.cut = None;
            Some(n.min(body.len() - 1))
        }
        _ => None,
    };
    drop(h);
    let mut resp = Response::builder()
        .header("x-repo-commit", &commit)
        .header(header::ETAG, format!("\"{}\"", sha(&data)))
        .header("x-linked-etag", format!("\"{}\"", sha(&data)))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, body.len());
    resp = if range.is_some() {
        resp.status(StatusCode::PARTIAL_CONTENT).header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
    } else {
        resp.status(StatusCode::OK)
    };
    match cut {
        None => resp.body(Body::from(body)).unwrap(),
        Some(n) => {
            // Send n bytes, then break the connection.
            let first = bytes::Bytes::copy_from_slice(&body[..n]);
            use futures::StreamExt;
            let stream =
                futures::stream::iter(vec![Ok::<_, std::io::Error>(first)]).chain(futures::stream::once(async {
                    // Let the bytes reach the client before the connection breaks.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut"))
                }));
            resp.body(Body::from_stream(stream)).unwrap()
        }
    }
}

async fn plain(State(hub): State<Shared>, AxPath(file): AxPath<String>, headers: HeaderMap) -> Response {
    resolve(State(hub), AxPath(("files".into(), "plain".into(), "main".into(), file)), headers).await
}

async fn start_hub() -> (Shared, String) {
    let hub: Shared = Arc::default();
    let app = axum::Router::new()
        .route("/{org}/{name}/resolve/{rev}/{*file}", axum::routing::get(resolve))
        .route("/plain/{*file}", axum::routing::get(plain))
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (hub, format!("http://{addr}"))
}

fn commit_id(n: u8) -> String {
    format!("{:040x}", n as u128 * 0x1111_1111_1111)
}

fn add_commit(hub: &Shared, repo: &str, commit: &str, files: &[(&str, Vec<u8>)]) {
    let mut h = hub.lock().unwrap();
    h.commits.insert((repo.into(), commit.into()), files.iter().map(|(n, d)| (n.to_string(), d.clone())).collect());
}

fn cfg(root: &Path, hf: &Path, endpoint: &str) -> StoreConfig {
    StoreConfig {
        root: root.to_path_buf(),
        hf_cache: hf.to_path_buf(),
        hf_endpoint: endpoint.into(),
        hf_token: None,
        offline: false,
        python: "/nonexistent/python".into(),
        npm: "/nonexistent/npm".into(),
        hub_chunk_size: 1 << 20,
        hub_parallel: 1,
    }
}

fn hub_manifest(id: &str, repo: &str, revision: &str, files: &[(&str, Option<String>)]) -> Manifest {
    Manifest {
        id: id.into(),
        description: "test".into(),
        license: "MIT".into(),
        files: files.iter().map(|(n, h)| FileSpec { name: n.to_string(), sha256: h.clone(), size: None }).collect(),
        inputs: vec![],
        convert: vec![],
        sources: vec![Source::Hub { repo: repo.into(), revision: revision.into(), files: BTreeMap::new() }],
        base: None,
    }
}

fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed).collect()
}

fn gets(hub: &Shared) -> usize {
    hub.lock().unwrap().log.len()
}

#[tokio::test]
async fn hub_pins_the_revision_and_fills_the_hugging_face_cache() {
    let (hub, url) = start_hub().await;
    let (c1, c2) = (commit_id(1), commit_id(2));
    let (v1, v2) = (blob(3000, 1), blob(5000, 2));
    add_commit(&hub, "acme/tiny", &c1, &[("weights.bin", v1.clone()), ("config.json", b"{\"v\":1}".to_vec())]);
    add_commit(&hub, "acme/tiny", &c2, &[("weights.bin", v2.clone()), ("config.json", b"{\"v\":2}".to_vec())]);
    hub.lock().unwrap().refs.insert(("acme/tiny".into(), "main".into()), c2.clone());
    let d = tempfile::tempdir().unwrap();
    let (root, hf) = (d.path().join("models"), d.path().join("hf"));
    let store = ModelStore::new(cfg(&root, &hf, &url));

    // Pinned to the older commit: its bytes, although main has moved on.
    let m = hub_manifest("tiny-old", "acme/tiny", &c1, &[("weights.bin", Some(sha(&v1))), ("config.json", None)]);
    let events = Mutex::new(vec![]);
    let inst = store.pull(&m, &|e: PullEvent| events.lock().unwrap().push(e), false).await.unwrap();
    assert_eq!(std::fs::read(inst.path("weights.bin")).unwrap(), v1);
    assert_eq!(std::fs::read(inst.path("config.json")).unwrap(), b"{\"v\":1}");
    assert!(events.lock().unwrap().iter().any(|e| matches!(e, PullEvent::FileProgress { .. })));
    // The Hugging Face layout: blobs by content hash, the snapshot by commit, links between them.
    let repo_dir = hf.join("models--acme--tiny");
    assert_eq!(std::fs::read(repo_dir.join("blobs").join(sha(&v1))).unwrap(), v1);
    assert_eq!(std::fs::read(repo_dir.join("snapshots").join(&c1).join("weights.bin")).unwrap(), v1);
    // The record holds the hash the file was checked against (the hub's own for config.json).
    let rec = &inst.record;
    assert_eq!(rec.files.iter().find(|f| f.name == "config.json").unwrap().sha256, Some(sha(b"{\"v\":1}")));

    // A second pull is a no-op: nothing is asked of the hub.
    let before = gets(&hub);
    let again = store.ensure_manifest(&m, &Quiet).await.unwrap();
    assert_eq!(again.dir, inst.dir);
    assert_eq!(gets(&hub), before);

    // A branch resolves to its commit at fetch time.
    let main = hub_manifest("tiny-main", "acme/tiny", "main", &[("weights.bin", Some(sha(&v2)))]);
    let inst = store.pull(&main, &Quiet, false).await.unwrap();
    assert_eq!(std::fs::read(inst.path("weights.bin")).unwrap(), v2);
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap().trim(), c2);

    // Verify re-hashes; a changed file is reported.
    assert!(store.verify(&m).await.unwrap().bad.is_empty());
    let target = std::fs::canonicalize(inst.path("weights.bin")).unwrap();
    std::fs::write(&target, b"tampered").unwrap();
    let report = store.verify(&main).await.unwrap();
    assert_eq!(report.bad.len(), 1, "{report:?}");

    // rm frees our folder and leaves the shared Hugging Face cache alone.
    let freed = store.remove(&m, &Quiet).await.unwrap();
    assert!(!root.join("tiny-old").exists());
    assert!(freed > 0 || std::fs::symlink_metadata(&inst.dir).is_ok());
    assert!(repo_dir.join("blobs").join(sha(&v1)).exists());
}

#[tokio::test]
async fn a_sha256_mismatch_is_refused_and_nothing_is_installed() {
    let (hub, url) = start_hub().await;
    let c = commit_id(3);
    let data = blob(4000, 3);
    add_commit(&hub, "acme/bad", &c, &[("weights.bin", data.clone())]);
    let d = tempfile::tempdir().unwrap();
    let (root, hf) = (d.path().join("models"), d.path().join("hf"));
    let store = ModelStore::new(cfg(&root, &hf, &url));
    let wrong = sha(b"something else");
    let m = hub_manifest("bad", "acme/bad", &c, &[("weights.bin", Some(wrong.clone()))]);
    let err = store.pull(&m, &Quiet, false).await.unwrap_err();
    assert_eq!(err.error_type(), "model_weights_unavailable");
    let msg = err.to_string();
    assert!(msg.contains("sha256 mismatch") && msg.contains(&wrong), "{msg}");
    assert!(!root.join("bad").exists(), "nothing installed");
    // The bad blob is gone from the Hugging Face cache, so a later fetch does not reuse it.
    assert!(!hf.join("models--acme--bad/blobs").join(sha(&data)).exists());
    assert!(matches!(store.state(&m), darkroom_models::store::ModelState::Missing));
}

#[tokio::test]
async fn a_cut_hub_download_resumes_where_it_stopped() {
    let (hub, url) = start_hub().await;
    let c = commit_id(4);
    let data = blob(3 << 20, 4); // three 1 MiB chunks
    add_commit(&hub, "acme/big", &c, &[("weights.bin", data.clone())]);
    // The second chunk's response breaks half way.
    hub.lock().unwrap().cut = Some(("weights.bin".into(), 512 << 10, "bytes=1048576-"));
    let d = tempfile::tempdir().unwrap();
    let (root, hf) = (d.path().join("models"), d.path().join("hf"));
    let store = ModelStore::new(cfg(&root, &hf, &url));
    let m = hub_manifest("big", "acme/big", &c, &[("weights.bin", Some(sha(&data)))]);
    let first = store.pull(&m, &Quiet, false).await;
    assert!(first.is_err(), "the cut download fails: {first:?}");
    let ranges_before = hub.lock().unwrap().log.len();
    let inst = store.pull(&m, &Quiet, false).await.unwrap();
    assert_eq!(std::fs::read(inst.path("weights.bin")).unwrap(), data);
    let log = hub.lock().unwrap().log[ranges_before..].to_vec();
    let ranges: Vec<String> = log.iter().filter_map(|(_, r)| r.clone()).filter(|r| r != "bytes=0-0").collect();
    assert!(!ranges.is_empty());
    assert!(
        ranges.iter().all(|r| !r.starts_with("bytes=0-")),
        "the second attempt starts after the committed chunk: {ranges:?}"
    );
}

#[tokio::test]
async fn offline_reads_only_the_cache_and_names_the_command() {
    let (hub, url) = start_hub().await;
    let c = commit_id(5);
    let data = blob(2000, 5);
    add_commit(&hub, "acme/off", &c, &[("weights.bin", data.clone())]);
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    let m = hub_manifest("off", "acme/off", &c, &[("weights.bin", Some(sha(&data)))]);

    let mut offline = cfg(&d.path().join("a"), &hf, &url);
    offline.offline = true;
    let store = ModelStore::new(offline.clone());
    let err = store.pull(&m, &Quiet, false).await.unwrap_err();
    assert_eq!(gets(&hub), 0, "an offline store never touches the network");
    assert!(matches!(err, StoreError::Unavailable { .. } | StoreError::Offline { .. }), "{err}");
    // A manifest with only network sources says which command fetches it.
    let mut remote_only = m.clone();
    remote_only.id = "off-url".into();
    remote_only.sources =
        vec![Source::Url { files: [("weights.bin".to_string(), format!("{url}/plain/weights.bin"))].into() }];
    let err = store.pull(&remote_only, &Quiet, false).await.unwrap_err();
    assert_eq!(err.error_type(), "model_weights_offline");
    assert!(err.to_string().contains("darkroom models pull off-url"), "{err}");
    assert_eq!(gets(&hub), 0);

    // Once something fetched it into the Hugging Face cache, an offline store installs from there.
    ModelStore::new(cfg(&d.path().join("b"), &hf, &url)).pull(&m, &Quiet, false).await.unwrap();
    let n = gets(&hub);
    let inst = store.pull(&m, &Quiet, false).await.unwrap();
    assert_eq!(std::fs::read(inst.path("weights.bin")).unwrap(), data);
    assert_eq!(gets(&hub), n);
}

#[tokio::test]
async fn plain_urls_resume_and_two_pulls_fetch_once() {
    let (hub, url) = start_hub().await;
    let data = blob(300_000, 6);
    add_commit(&hub, "files/plain", "main", &[("w.bin", data.clone())]);
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("models");
    let m = Manifest {
        id: "plain".into(),
        description: "test".into(),
        license: "MIT".into(),
        files: vec![FileSpec::new("sub/w.bin", &sha(&data), data.len() as u64)],
        inputs: vec![],
        convert: vec![],
        sources: vec![Source::Url { files: [("sub/w.bin".to_string(), format!("{url}/plain/w.bin"))].into() }],
        base: None,
    };
    hub.lock().unwrap().cut = Some(("w.bin".into(), 100_000, ""));
    let store = ModelStore::new(cfg(&root, &d.path().join("hf"), &url));
    let cut = store.pull(&m, &Quiet, false).await;
    assert!(cut.is_err(), "{cut:?}");
    let darkroom_models::store::ModelState::Partial { bytes: partial } = store.state(&m) else {
        panic!("a cut download leaves a partial file: {:?}", store.state(&m))
    };
    assert!(partial > 0 && partial <= 100_000, "{partial}");
    let inst = store.pull(&m, &Quiet, false).await.unwrap();
    assert_eq!(std::fs::read(inst.path("sub/w.bin")).unwrap(), data);
    let log = hub.lock().unwrap().log.clone();
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].1, Some(format!("bytes={partial}-")), "resumed: {log:?}");

    // Two processes (here: two stores on one folder) pulling at once: one fetches, the other waits and reuses.
    let mut m2 = m.clone();
    m2.id = "plain2".into();
    let (s1, s2) = (store.clone(), ModelStore::new(cfg(&root, &d.path().join("hf"), &url)));
    let waited = Arc::new(Mutex::new(false));
    let w = waited.clone();
    let (a, b) = tokio::join!(s1.pull(&m2, &Quiet, false), async {
        s2.pull(
            &m2,
            &move |e: PullEvent| {
                if matches!(e, PullEvent::Waiting { .. }) {
                    *w.lock().unwrap() = true;
                }
            },
            false,
        )
        .await
    });
    assert_eq!(a.unwrap().dir, b.unwrap().dir);
    assert_eq!(hub.lock().unwrap().log.len(), 3, "fetched once");
}

#[tokio::test]
async fn user_weights_are_checked_and_registered() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("models");
    let store = ModelStore::new(cfg(&root, &d.path().join("hf"), "http://127.0.0.1:9"));
    let ckpt = d.path().join("my-voice");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("voice.onnx"), b"not really onnx").unwrap();
    // A missing file is named.
    let err = store.register_local("my-voice", "piper-en_us-joe-medium", &ckpt, &Quiet).await.unwrap_err();
    assert!(err.to_string().contains("voice.onnx.json"), "{err}");
    std::fs::write(ckpt.join("voice.onnx.json"), b"{}").unwrap();
    let inst = store.register_local("my-voice", "piper-en_us-joe-medium", &ckpt, &Quiet).await.unwrap();
    assert_eq!(std::fs::read(inst.path("voice.onnx")).unwrap(), b"not really onnx");
    let m = store.manifest("my-voice").unwrap();
    assert_eq!(m.base.as_deref(), Some("piper-en_us-joe-medium"));
    assert_eq!(m.files[0].sha256.as_deref(), Some(sha(b"not really onnx").as_str()));
    assert!(store.manifests().iter().any(|m| m.id == "my-voice"));
    // The registration survives a restart (a new store on the same folder) and is already installed.
    let again = ModelStore::new(cfg(&root, &d.path().join("hf"), "http://127.0.0.1:9"));
    assert_eq!(again.ensure("my-voice", &Quiet).await.unwrap().dir, inst.dir);
    assert!(again.verify(&m).await.unwrap().bad.is_empty());
    // Unknown bases and ids are refused.
    assert_eq!(store.register_local("x", "nope", &ckpt, &Quiet).await.unwrap_err().error_type(), "model_not_found");
    assert!(store.register_local("../evil", "piper-en_us-joe-medium", &ckpt, &Quiet).await.is_err());
    assert!(store.unregister("my-voice"));
    assert!(store.manifest("my-voice").is_err());
}

/// The built-in `sd-turbo` manifest against the hub's layout of `stabilityai/sd-turbo` (the `fp16` variant files
/// under their plain diffusers names, no pinned hashes: each is held to the hub's content hash), with a tiny
/// checkpoint of the same architecture in place of the real 2.6 GB: the installed folder loads and draws.
#[tokio::test]
async fn the_sd_turbo_manifest_installs_from_the_hubs_fp16_variant() {
    use darkroom_models::sd_turbo;
    let (hub, url) = start_hub().await;
    let tiny = tempfile::tempdir().unwrap();
    sd_turbo::write_tiny_checkpoint(tiny.path()).unwrap();
    let remote = |local: &str| {
        local
            .replace("model.safetensors", "model.fp16.safetensors")
            .replace("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    };
    let files: Vec<(String, Vec<u8>)> =
        sd_turbo::FILES.iter().map(|f| (remote(f), std::fs::read(tiny.path().join(f)).unwrap())).collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    let commit = commit_id(7);
    add_commit(&hub, "stabilityai/sd-turbo", &commit, &files);
    hub.lock().unwrap().refs.insert(("stabilityai/sd-turbo".into(), "main".into()), commit);
    let d = tempfile::tempdir().unwrap();
    let store = ModelStore::new(cfg(&d.path().join("models"), &d.path().join("hf"), &url));
    let inst = store.ensure(darkroom_models::store::builtin::SD_TURBO, &Quiet).await.unwrap();
    for f in sd_turbo::FILES {
        assert!(std::fs::read(inst.path(f)).unwrap() == std::fs::read(tiny.path().join(f)).unwrap(), "{f} differs");
    }
    let p = sd_turbo::Pipeline::from_dir(&inst.dir, candle_core::Device::Cpu).unwrap();
    let req = sd_turbo::Request {
        prompt: "the cat".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 1,
        guidance_scale: 0.0,
        seed: 1,
        init_image: None,
        strength: 1.0,
    };
    let imgs = p.generate(&req, 1, &|| false, &mut |_| {}).unwrap();
    assert_eq!(imgs[0].dimensions(), (64, 64));
}
