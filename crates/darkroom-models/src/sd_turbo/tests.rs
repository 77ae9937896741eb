//! SD-Turbo's pipeline on tiny random-weight checkpoints of the same architecture (no registry carries the real
//! weights): every stage runs through the real loading code, scheduler and VAE.

use super::*;
use crate::ModelEvent;
use crate::files::parse_data_uri;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn tiny() -> (tempfile::TempDir, Pipeline) {
    let d = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(d.path()).unwrap();
    let p = Pipeline::from_dir(d.path(), Device::Cpu).unwrap();
    (d, p)
}

fn request(seed: u64) -> Request {
    Request {
        prompt: "the cat".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 48,
        steps: 2,
        guidance_scale: 0.0,
        seed,
        init_image: None,
        strength: 1.0,
    }
}

fn run(p: &Pipeline, req: &Request, count: usize) -> (Vec<RgbImage>, Vec<(usize, usize, usize)>) {
    let mut steps = vec![];
    let imgs = p
        .generate(req, count, &|| false, &mut |e| {
            if let Event::Step { image, step, steps: n, preview } = e {
                let f = p.vae_factor();
                assert_eq!(preview.dimensions(), (req.width / f, req.height / f), "previews are at latent size");
                steps.push((image, step, n));
            }
        })
        .unwrap();
    (imgs, steps)
}

fn differ(a: &RgbImage, b: &RgbImage) -> usize {
    a.as_raw().iter().zip(b.as_raw()).filter(|(x, y)| x != y).count()
}

#[test]
fn trailing_euler_matches_diffusers() {
    let j = json!({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "num_train_timesteps": 1000, "timestep_spacing": "trailing"});
    let s = EulerScheduler::from_json(&j).unwrap();
    assert_eq!(s.timesteps(1), vec![999.0]);
    assert_eq!(s.timesteps(2), vec![999.0, 499.0]);
    assert_eq!(s.timesteps(4), vec![999.0, 749.0, 499.0, 249.0]);
    // diffusers: EulerDiscreteScheduler(...).sigmas for SD's betas: σ(999) = 14.6146, σ(499) = 0.9986 (approx.).
    assert!((s.sigma(999.0) - 14.6146).abs() < 1e-3, "{}", s.sigma(999.0));
    assert!((s.sigma(0.0) - 0.02916).abs() < 1e-4, "{}", s.sigma(0.0));
    // One step from pure noise ends at σ = 0.
    let plan = s.plan(1, 1.0);
    assert_eq!(plan.len(), 1);
    assert_eq!((plan[0].0, plan[0].2), (999.0, 0.0));
    // Image-to-image: strength 0.5 with one step runs the second half of a 2-step schedule.
    assert_eq!(s.plan(1, 0.5).iter().map(|p| p.0).collect::<Vec<_>>(), vec![499.0]);
    assert_eq!(s.plan(2, 0.5).iter().map(|p| p.0).collect::<Vec<_>>(), vec![499.0, 249.0]);
    assert_eq!(s.plan(2, 1.0).iter().map(|p| p.0).collect::<Vec<_>>(), vec![999.0, 499.0]);
    let lead = EulerScheduler::from_json(&json!({"timestep_spacing": "leading", "steps_offset": 1})).unwrap();
    assert_eq!(lead.timesteps(4), vec![751.0, 501.0, 251.0, 1.0]);
    assert!(lead.init_sigma(lead.sigma(751.0)) > lead.sigma(751.0));
}

#[test]
fn configs_are_read_from_diffusers_json() {
    // SD-Turbo's own UNet config (stabilityai/sd-turbo unet/config.json, the fields that matter).
    let j = json!({"block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "layers_per_block": 2,
        "use_linear_projection": true, "norm_num_groups": 32, "in_channels": 4, "out_channels": 4});
    let (c, i, o) = unet_config(&j).unwrap();
    assert_eq!((i, o, c.cross_attention_dim, c.layers_per_block), (4, 4, 1024, 2));
    assert_eq!(c.blocks[0].use_cross_attn, Some(1));
    assert_eq!(c.blocks[3].use_cross_attn, None);
    assert_eq!(c.blocks[2].attention_head_dim, 20);
    assert!(c.use_linear_projection);
    let bad = json!({"block_out_channels": [32], "down_block_types": ["SimpleDownBlock"], "cross_attention_dim": 8});
    assert!(unet_config(&bad).unwrap_err().contains("SimpleDownBlock"));
    let clip = json!({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                      "num_attention_heads": 16, "hidden_act": "gelu"});
    let c = ClipConfig::from_json(&clip).unwrap();
    assert!(!c.quick_gelu && c.vocab_size == 49408 && c.max_position_embeddings == 77);
    assert!(ClipConfig::from_json(&json!({"hidden_act": "relu"})).is_err());
}

#[test]
fn the_tokenizer_splits_lowercases_and_pads() {
    let (_d, p) = tiny();
    let ids = p.token_ids("The   CAT").unwrap();
    let id = |t: &str| p.tokenizer.token_to_id(t).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(&ids[..4], &[id("<|startoftext|>"), id("the</w>"), id("cat</w>"), id("<|endoftext|>")]);
    assert!(ids[4..].iter().all(|&i| i == id("!")), "padded with the checkpoint's pad token");
    // Long prompts are cut to fit, keeping the end token.
    let long = "a ".repeat(200);
    let ids = p.token_ids(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], id("<|endoftext|>"));
}

#[test]
fn text_to_image_is_deterministic_by_seed() {
    let (_d, p) = tiny();
    let t = Instant::now();
    let (a, steps) = run(&p, &request(7), 1);
    eprintln!("tiny text-to-image, 2 steps: {:?}", t.elapsed());
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].dimensions(), (64, 48));
    assert_eq!(steps, vec![(0, 1, 2), (0, 2, 2)]);
    let (b, _) = run(&p, &request(7), 1);
    assert_eq!(a[0], b[0], "same seed, same image");
    let (c, _) = run(&p, &request(8), 1);
    assert!(differ(&a[0], &c[0]) > 100, "another seed, another image");
    // A batch: image i uses seed + i.
    let (batch, steps) = run(&p, &request(7), 2);
    assert_eq!(batch[0], a[0]);
    assert_eq!(batch[1], c[0]);
    assert_eq!(steps.len(), 4);
    // Guidance runs the negative prompt too and changes the result.
    let mut g = request(7);
    g.guidance_scale = 3.0;
    g.negative_prompt = "the".into();
    let (gi, _) = run(&p, &g, 1);
    assert!(differ(&gi[0], &a[0]) > 0);
}

#[test]
fn image_to_image_starts_from_the_image() {
    let (_d, p) = tiny();
    let init = RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 128]));
    let mut req = request(3);
    req.init_image = Some(init.clone());
    req.strength = 0.5;
    req.steps = 1;
    let (a, steps) = run(&p, &req, 1);
    assert_eq!(steps, vec![(0, 1, 1)]);
    assert_eq!(a[0].dimensions(), (64, 48));
    let (b, _) = run(&p, &req, 1);
    assert_eq!(a[0], b[0], "same seed, same image");
    // Another starting image gives another result.
    req.init_image = Some(RgbImage::from_pixel(64, 48, image::Rgb([250, 10, 10])));
    let (c, _) = run(&p, &req, 1);
    assert!(differ(&a[0], &c[0]) > 0);
    // Strength 1 ignores the image's content only in the noise level, but still runs.
    req.strength = 1.0;
    req.steps = 2;
    let (_, steps) = run(&p, &req, 1);
    assert_eq!(steps.len(), 2);
}

#[test]
fn cancellation_stops_between_steps() {
    let (_d, p) = tiny();
    let seen = std::cell::Cell::new(0);
    let mut req = request(1);
    req.steps = 4;
    let r = p.generate(&req, 1, &|| seen.get() >= 1, &mut |e| {
        if let Event::Step { .. } = e {
            seen.set(seen.get() + 1);
        }
    });
    assert!(matches!(r, Err(GenError::Cancelled)));
    assert_eq!(seen.get(), 1, "stopped after the first step");
}

fn ctx(path: &str, cancel: CancellationToken) -> (RunContext, mpsc::UnboundedReceiver<ModelEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (RunContext::new("r".into(), 1, path.into(), cancel, tx), rx)
}

fn png_uri(img: &RgbImage) -> String {
    let mut buf = vec![];
    img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut buf)).unwrap();
    crate::files::data_uri("image/png", &buf)
}

fn loc(e: &ModelError) -> Value {
    match e {
        ModelError::App { status: 422, body } => body["detail"][0]["loc"].clone(),
        other => panic!("not a 422: {other:?}"),
    }
}

#[tokio::test]
async fn the_app_draws_streams_previews_and_validates() {
    let (_d, p) = tiny();
    let app = SdTurbo::with_pipeline(p);
    let input = json!({"prompt": "the cat", "image_size": {"width": 64, "height": 72}, "num_inference_steps": 2,
                       "seed": 11, "output_format": "png", "num_images": 2});
    let (c, mut rx) = ctx("", CancellationToken::new());
    let out = app.run(input.clone(), c).await.unwrap();
    assert_eq!(out["seed"], 11);
    assert_eq!(out["prompt"], "the cat");
    assert!(out["timings"]["inference"].as_f64().unwrap() > 0.0);
    assert!(out.get("has_nsfw_concepts").is_none(), "no safety checker runs, so none is reported");
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let first = parse_data_uri(images[0]["url"].as_str().unwrap(), u64::MAX).unwrap();
    let img = image::load_from_memory(&first.data).unwrap();
    assert_eq!((img.width(), img.height()), (64, 72));
    assert_eq!(images[0]["content_type"], "image/png");
    assert_eq!((images[0]["width"].as_u64(), images[0]["height"].as_u64()), (Some(64), Some(72)));
    let (mut previews, mut progress, mut billed) = (0, vec![], None);
    while let Ok(e) = rx.try_recv() {
        match e {
            ModelEvent::Partial(v) => {
                assert_eq!(v["preview"], true);
                assert!(v["images"][0]["url"].as_str().unwrap().starts_with("data:image/jpeg;base64,"));
                previews += 1;
            }
            ModelEvent::Progress { fraction, .. } => progress.push(fraction),
            ModelEvent::BillableUnits(u) => billed = Some(u),
            ModelEvent::Log { .. } => {}
        }
    }
    assert_eq!(previews, 4, "one preview per step per image");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(progress.last(), Some(&1.0));
    assert_eq!(billed, Some(64.0 * 72.0 * 2.0 / 1e6));
    // Same input, same images.
    let (c, _rx) = ctx("", CancellationToken::new());
    let again = app.run(input, c).await.unwrap();
    assert_eq!(again["images"][0]["url"], images[0]["url"]);

    // Image-to-image takes the image's size (rounded to a multiple of 8) by default.
    let init = RgbImage::from_fn(90, 70, |x, y| image::Rgb([(x * 3) as u8, (y * 6) as u8, 90]));
    let (c, _rx) = ctx(IMAGE_TO_IMAGE, CancellationToken::new());
    let out = app
        .run(json!({"prompt": "the cat", "image_url": png_uri(&init), "strength": 0.5, "seed": 1}), c)
        .await
        .unwrap();
    assert_eq!((out["images"][0]["width"].as_u64(), out["images"][0]["height"].as_u64()), (Some(88), Some(64)));
    assert_eq!(out["images"][0]["content_type"], "image/jpeg");

    // Bad input: 422s naming the field.
    let bad = [
        (
            "",
            json!({"prompt": "x", "image_size": {"width": 100, "height": 64}}),
            json!(["body", "image_size", "width"]),
        ),
        ("", json!({"prompt": "  "}), json!(["body", "prompt"])),
        ("", json!({"prompt": "x", "image_url": png_uri(&init)}), json!(["body", "image_url"])),
        (IMAGE_TO_IMAGE, json!({"prompt": "x"}), json!(["body", "image_url"])),
        (
            IMAGE_TO_IMAGE,
            json!({"prompt": "x", "image_url": "data:image/png;base64,AAAA"}),
            json!(["body", "image_url"]),
        ),
    ];
    for (path, input, want) in bad {
        let (c, _rx) = ctx(path, CancellationToken::new());
        let e = app.run(input.clone(), c).await.unwrap_err();
        assert_eq!(loc(&e), want, "{input}");
    }
    // A cancelled request stops.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (c, _rx) = ctx("", cancel);
    assert_eq!(
        app.run(json!({"prompt": "the cat", "image_size": {"width": 64, "height": 64}}), c).await.unwrap_err(),
        ModelError::Cancelled
    );
}

#[test]
fn the_gateway_schema_rejects_bad_sizes_without_weights() {
    let app = darkroom_core::app::CompiledApp::compile(SdTurbo::new().spec()).unwrap();
    assert!(app.validate(&json!({"prompt": "a fox"})).is_ok());
    assert!(app.validate(&json!({"prompt": "a fox", "image_size": "landscape_16_9", "seed": 3})).is_ok());
    assert!(app.validate(&json!({"prompt": "a fox", "image_size": {"width": 512, "height": 768}})).is_ok());
    for bad in [
        json!({"prompt": "a fox", "image_size": {"width": 500, "height": 512}}),
        json!({"prompt": "a fox", "image_size": {"width": 2048, "height": 512}}),
        json!({"prompt": "a fox", "image_size": "square_xl"}),
        json!({"prompt": "a fox", "num_inference_steps": 0}),
        json!({"prompt": "a fox", "num_images": 9}),
        json!({"prompt": "a fox", "output_format": "gif"}),
        json!({"image_size": "square"}),
    ] {
        let e = app.validate(&bad).unwrap_err();
        assert_eq!(e.status, 422, "{bad}");
        let loc = &e.detail.unwrap()[0]["loc"];
        assert_eq!(loc[0], "body", "{bad}");
    }
    let e = app.validate(&json!({"prompt": "a fox", "image_size": {"width": 500, "height": 512}})).unwrap_err();
    let d = e.detail.unwrap();
    assert_eq!(d[0]["loc"], json!(["body", "image_size", "width"]), "{d}");
    assert!(d[0]["msg"].as_str().unwrap().contains("multiple of 8"), "{d}");
    let d = app.validate(&json!({"prompt": "a fox", "image_size": "square_xl"})).unwrap_err().detail.unwrap();
    assert_eq!((d[0]["loc"].clone(), d[0]["type"].clone()), (json!(["body", "image_size"]), json!("enum")), "{d}");
}

#[tokio::test]
async fn setup_without_weights_offline_names_the_pull_command() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = crate::store::StoreConfig::from_env();
    cfg.root = d.path().join("models");
    cfg.hf_cache = d.path().join("hf");
    cfg.offline = true;
    let app = SdTurbo::with_store(ModelStore::new(cfg));
    let (tx, _rx) = mpsc::unbounded_channel();
    let e = app.setup(&SetupReporter(tx)).await.unwrap_err();
    assert!(e.contains("sd-turbo"), "{e}");
    assert!(e.contains("darkroom models pull"), "{e}");
}

#[tokio::test]
async fn a_tiny_checkpoint_is_reproducible_and_registers_as_a_fine_tune() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_tiny_checkpoint(a.path()).unwrap();
    write_tiny_checkpoint(b.path()).unwrap();
    for f in FILES {
        assert!(std::fs::read(a.path().join(f)).unwrap() == std::fs::read(b.path().join(f)).unwrap(), "{f} differs");
    }
    // `darkroom models add sd-turbo-tiny --base sd-turbo --from DIR`: the files the base loads, hashed and installed.
    let d = tempfile::tempdir().unwrap();
    let mut cfg = crate::store::StoreConfig::from_env();
    cfg.root = d.path().join("models");
    cfg.hf_cache = d.path().join("hf");
    cfg.offline = true;
    let store = ModelStore::new(cfg);
    let installed =
        store.register_local("sd-turbo-tiny", builtin::SD_TURBO, a.path(), &crate::store::Quiet).await.unwrap();
    let p = Pipeline::from_dir(&installed.dir, Device::Cpu).unwrap();
    let (imgs, _) = run(&p, &request(5), 1);
    assert_eq!(imgs[0].dimensions(), (64, 48));
    // A folder without the UNet is refused, naming what is missing.
    std::fs::remove_file(b.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let e = store.register_local("broken", builtin::SD_TURBO, b.path(), &crate::store::Quiet).await.unwrap_err();
    assert!(e.to_string().contains("unet/diffusion_pytorch_model.safetensors"), "{e}");
}

#[test]
fn the_full_size_architecture_builds_and_runs_both_endpoints() {
    let d = tempfile::tempdir().unwrap();
    write_sd_turbo_architecture(d.path()).unwrap();
    let t = Instant::now();
    let p = Pipeline::with_zero_weights(d.path(), Device::Cpu).unwrap();
    assert_eq!(p.vae_factor(), 8);
    let mut req = request(1);
    (req.width, req.height, req.steps) = (64, 64, 1);
    let (imgs, steps) = run(&p, &req, 1);
    assert_eq!(imgs[0].dimensions(), (64, 64));
    assert_eq!(steps.len(), 1);
    req.init_image = Some(RgbImage::from_pixel(64, 64, image::Rgb([9, 99, 199])));
    req.strength = 0.5;
    let (imgs, _) = run(&p, &req, 1);
    assert_eq!(imgs[0].dimensions(), (64, 64));
    eprintln!("full-size SD-Turbo, zero weights, 64x64 text-to-image + image-to-image: {:?}", t.elapsed());
}

/// The tokenizer against CLIP's real BPE: OpenAI's merges file (in PyPI `open_clip_torch`), turned into the
/// `vocab.json` + `merges.txt` pair transformers ships (the ids are the merges' order after the 512 byte tokens),
/// gives the ids CLIP's own tokenizer gives.
#[tokio::test]
async fn the_tokenizer_matches_clips_on_the_real_vocabulary() {
    use crate::store::manifest::{FileSpec, Manifest, Source};
    use std::io::Read;
    if std::env::var("DARKROOM_TEST_REGISTRIES").ok().as_deref() != Some("1") {
        eprintln!("not run: CLIP's vocabulary from PyPI (set DARKROOM_TEST_REGISTRIES=1)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut cfg = crate::store::StoreConfig::from_env();
    cfg.root = std::env::var("DARKROOM_TEST_MODEL_CACHE").map(Into::into).unwrap_or(d.path().join("models"));
    let store = ModelStore::new(cfg);
    const GZ: &str = "bpe_simple_vocab_16e6.txt.gz";
    let m = Manifest {
        id: "test-clip-bpe".into(),
        description: "CLIP's BPE merges (test fixture)".into(),
        license: "MIT".into(),
        files: vec![FileSpec::new(GZ, "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a", 1356917)],
        inputs: vec![],
        convert: vec![],
        sources: vec![Source::Pip {
            package: "open_clip_torch".into(),
            version: "3.3.0".into(),
            python_version: None,
            platforms: vec![],
            files: [(GZ.to_string(), format!("open_clip/{GZ}"))].into_iter().collect(),
        }],
        base: None,
    };
    let inst = store.pull(&m, &crate::store::Quiet, false).await.unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(inst.path(GZ)).unwrap()).read_to_string(&mut text).unwrap();
    let merges: Vec<&str> = text.split('\n').skip(1).take(49152 - 256 - 2).collect();
    // GPT-2's byte ↔ unicode table, as CLIP builds it.
    let mut bytes: Vec<u32> = (b'!'..=b'~').chain(0xA1..=0xAC).chain(0xAE..=0xFF).map(u32::from).collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let base: Vec<String> = chars.iter().map(|c| char::from_u32(*c).unwrap().to_string()).collect();
    let mut vocab: Vec<String> = base.clone();
    vocab.extend(base.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    let map: serde_json::Map<String, Value> = vocab.iter().enumerate().map(|(i, v)| (v.clone(), json!(i))).collect();
    assert_eq!(map.len(), 49408);
    std::fs::write(d.path().join("vocab.json"), serde_json::to_vec(&map).unwrap()).unwrap();
    std::fs::write(d.path().join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
    let tok = clip_tokenizer(&d.path().join("vocab.json"), &d.path().join("merges.txt")).unwrap();
    let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    // transformers' CLIPTokenizer: "a photo of a cat" → 49406, 320, 1125, 539, 320, 2368, 49407.
    assert_eq!(ids("a photo of a cat"), vec![320, 1125, 539, 320, 2368]);
    assert_eq!(ids("  A   PHOTO of a\tcat "), vec![320, 1125, 539, 320, 2368]);
    assert_eq!(ids("cat!"), vec![2368, 256], "punctuation is a word of its own");
    assert_eq!(tok.token_to_id("<|startoftext|>"), Some(49406));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(49407));
    assert_eq!(tok.token_to_id("!"), Some(0), "SD 2.x pads with '!'");
}

#[test]
fn the_fast_vae_decoder_computes_what_candles_does() {
    let d = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(d.path()).unwrap();
    let cfg = vae_config(&read_json(&d.path().join("vae/config.json")).unwrap()).unwrap();
    let path = d.path().join("vae/diffusion_pytorch_model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }.unwrap();
    let reference = AutoEncoderKL::new(vb.clone(), 3, 3, cfg.kl.clone()).unwrap();
    let ours = VaeDecoder::new(vb, &cfg.kl).unwrap();
    let z = Noise::new(4).tensor((1, 4, 12, 20), &Device::Cpu, DType::F32).unwrap();
    let want = reference.decode(&z).unwrap();
    let got = ours.decode(&z).unwrap();
    assert_eq!(got.dims(), want.dims());
    assert_eq!(got.dims(), &[1, 3, 24, 40]);
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(scale > 1e-3 && diff <= 1e-4 * scale.max(1.0), "max |diff| {diff} for values up to {scale}");
}

#[test]
fn the_fast_vae_encoder_computes_what_candles_blocks_do() {
    let d = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(d.path()).unwrap();
    let cfg = vae_config(&read_json(&d.path().join("vae/config.json")).unwrap()).unwrap();
    let path = d.path().join("vae/diffusion_pytorch_model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }.unwrap();
    let reference = VaeEncoder::new(vb.clone(), &cfg.kl).unwrap();
    let ours = FastVaeEncoder::new(vb, &cfg.kl).unwrap();
    let x = Noise::new(9).tensor((1, 3, 24, 40), &Device::Cpu, DType::F32).unwrap();
    let (wm, ws) = reference.moments(&x).unwrap();
    let (gm, gs) = ours.moments(&x).unwrap();
    assert_eq!(gm.dims(), &[1, 4, 12, 20]);
    for (got, want) in [(gm, wm), (gs, ws)] {
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 1e-3 && diff <= 1e-4 * scale.max(1.0), "max |diff| {diff} for values up to {scale}");
    }
}

#[test]
fn the_decoders_other_paths_and_flop_count_agree() {
    let d = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(d.path()).unwrap();
    let cfg = vae_config(&read_json(&d.path().join("vae/config.json")).unwrap()).unwrap();
    let path = d.path().join("vae/diffusion_pytorch_model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }.unwrap();
    let ours = VaeDecoder::new(vb, &cfg.kl).unwrap();
    let z = Noise::new(5).tensor((1, 4, 12, 20), &Device::Cpu, DType::F32).unwrap();
    let before = crate::conv::conv_flops();
    let fused = ours.decode(&z).unwrap();
    let counted = (crate::conv::conv_flops() - before) as f64;
    // Every convolution of the fused path is counted, and the architecture's count agrees.
    assert_eq!(counted, flops::vae_decoder(&cfg.kl, (12, 20)).0);
    // The operation-by-operation path (what a GPU runs) computes the same.
    let unfused = ours.decode_unfused(&z).unwrap();
    let diff = (&fused - &unfused).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "fused and unfused differ by {diff}");
    // A tile covering the whole latent is the whole decode.
    let whole = ours.decode_tiled(&z, 20, 4).unwrap();
    assert!(
        whole.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == fused.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // Tiles of 8 latents overlapping by 4: the full image, close to the whole decode on average (each tile is
    // normalised on its own statistics, as diffusers' tiling does), with every pixel covered.
    let tiled = ours.decode_tiled(&z, 8, 4).unwrap();
    assert_eq!(tiled.dims(), fused.dims());
    let v = tiled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    let mean_diff = (&tiled - &fused).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    let spread = fused.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!("tiled vs whole: mean |diff| {mean_diff}, mean |value| {spread}");
    assert!(mean_diff > 0.0 && mean_diff < 0.5 * spread, "mean |diff| {mean_diff} for mean |value| {spread}");
}

/// The fast pipeline (fused VAE) draws what the straightforward one on candle's blocks draws, text-to-image and
/// image-to-image, to within one level of 255 per channel.
#[test]
fn the_fast_pipeline_draws_what_the_reference_pipeline_draws() {
    let d = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(d.path()).unwrap();
    let fast = Pipeline::from_dir(d.path(), Device::Cpu).unwrap();
    let reference = Pipeline::reference(d.path(), Device::Cpu, false).unwrap();
    assert!(matches!(reference.decoder, Decoder::Reference(_)) && matches!(fast.decoder, Decoder::Fast(_)));
    let mut img2img = request(3);
    img2img.init_image = Some(run(&fast, &request(2), 1).0.remove(0));
    img2img.strength = 0.6;
    for req in [request(1), img2img] {
        let (a, _) = run(&fast, &req, 1);
        let (b, _) = run(&reference, &req, 1);
        let worst = a[0].as_raw().iter().zip(b[0].as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        let varied = a[0].as_raw().iter().any(|&x| x != a[0].as_raw()[0]);
        assert!(varied && worst <= 1, "fast and reference differ by up to {worst} levels");
    }
    // Stage FLOPs are counted for the same shapes either way.
    assert_eq!(fast.flops(64, 48, true), reference.flops(64, 48, true));
    let f = fast.flops(64, 48, false);
    assert!(f.text_encoder > 0.0 && f.unet_step > 0.0 && f.vae_decode > 0.0 && f.vae_encode > 0.0);
    assert_eq!(fast.flops(64, 48, true).unet_step, 2.0 * f.unet_step);
}

/// The architecture's FLOPs at SD-Turbo's real shapes, against counts made by hand from its configs (the UNet's
/// convolutions and transformers, the VAE decoder's 2.5 TFLOPs at 512²).
#[test]
fn stage_flops_at_sd_turbos_shapes() {
    let d = tempfile::tempdir().unwrap();
    write_sd_turbo_architecture(d.path()).unwrap();
    let clip = ClipConfig::from_json(&read_json(&d.path().join("text_encoder/config.json")).unwrap()).unwrap();
    let (unet, i, o) = unet_config(&read_json(&d.path().join("unet/config.json")).unwrap()).unwrap();
    let vae = vae_config(&read_json(&d.path().join("vae/config.json")).unwrap()).unwrap().kl;
    // CLIP ViT-H's text tower, 23 layers of 1024 over 77 tokens: 23 · (4·2·77·1024² + 2·2·77·1024·4096 + 4·77²·1024).
    let text = 23.0 * (8.0 * 77.0 * 1048576.0 + 4.0 * 77.0 * 4194304.0 + 4.0 * 5929.0 * 1024.0);
    assert_eq!(flops::text_encoder(&clip, 77), text);
    let (dc, da) = flops::vae_decoder(&vae, (64, 64));
    // Decoder convolutions at 512²: 64² 512-wide (conv_in, 2 + 6 resnet convs), 128² and 256² upsampling, …
    assert!((dc / 1e9 - 2440.0).abs() < 40.0, "{}", dc / 1e9);
    assert!((da / 1e9 - 43.0).abs() < 1.0, "{}", da / 1e9);
    let u = flops::unet(&unet, i, o, (64, 64), 77, 1);
    assert!((u / 1e9 - 800.0).abs() < 40.0, "{}", u / 1e9);
}

/// The fused UNet computes what candle's does (up to its GEGLU's exact GELU against candle's tanh approximation),
/// for a batch of two (classifier-free guidance) at two timesteps, on an odd latent size too.
#[test]
fn the_fast_unet_computes_what_candles_does() {
    let d = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(d.path()).unwrap();
    let (cfg, i, o) = unet_config(&read_json(&d.path().join("unet/config.json")).unwrap()).unwrap();
    let path = d.path().join("unet/diffusion_pytorch_model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }.unwrap();
    let reference = UNet2DConditionModel::new(vb.clone(), i, o, false, cfg.clone()).unwrap();
    let ours = unet::FastUnet::new(vb, i, o, &cfg).unwrap();
    assert!(ours.usable());
    let mut noise = Noise::new(11);
    for (h, w) in [(8, 12), (5, 7)] {
        let x = noise.tensor((2, i, h, w), &Device::Cpu, DType::F32).unwrap();
        let ctx =
            noise.tensor((2, 77, cfg.cross_attention_dim, 1), &Device::Cpu, DType::F32).unwrap().squeeze(3).unwrap();
        for t in [999.0, 499.0] {
            let want = reference.forward(&x, t, &ctx).unwrap();
            let got = ours.forward(&x, t, &ctx).unwrap();
            assert_eq!(got.dims(), want.dims());
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(
                scale > 1e-3 && diff <= 2e-3 * scale.max(1.0),
                "{h}x{w} t={t}: max |diff| {diff}, values up to {scale}"
            );
        }
    }
}
