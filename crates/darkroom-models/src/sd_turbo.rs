//! `darkroom/sd-turbo`: text-to-image (the root path) and image-to-image (`/image-to-image`) with Stability AI's
//! SD-Turbo, a 1–4 step distillation of Stable Diffusion 2.1, in candle. Any checkpoint of the SD-2.x architecture
//! in diffusers' folder layout runs (a fine-tune registered with `darkroom models add ID --base sd-turbo`).
//!
//! The pipeline is diffusers' `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline` with the model's
//! `EulerDiscreteScheduler`: CLIP text encoder → UNet denoising steps (classifier-free guidance when
//! `guidance_scale > 1`) → VAE decode. Noise comes from Darkroom's own seeded generator, so the same seed and input
//! give the same image on every machine of the same device kind. No safety checker ships, and the output reports no
//! safety result.
//!
//! On CPU this is slow (a 512² image is one UNet step of ~10 s plus a VAE decode of ~23 s on 2 cores, the decoder's
//! convolutions as GEMMs of our own); with the `cuda` cargo feature it runs on an NVIDIA GPU in f16.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Embedding, GroupNorm, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModel, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use darkroom_core::app::AppSpec;
use image::RgbImage;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::files::File;
use crate::store::{ModelStore, builtin};
use crate::{Model, ModelError, RunContext, SetupReporter, SetupStage};

pub const APP_ID: &str = "darkroom/sd-turbo";
/// The image-to-image endpoint's path.
pub const IMAGE_TO_IMAGE: &str = "image-to-image";
/// The largest width or height.
pub const MAX_SIDE: u32 = 1024;
/// The smallest width or height.
pub const MIN_SIDE: u32 = 64;

// ---------------------------------------------------------------------------------------------------------------
// Input and output
// ---------------------------------------------------------------------------------------------------------------

/// fal's named image sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum ImageSizeName {
    /// 1024×1024
    #[serde(rename = "square_hd")]
    SquareHd,
    /// 512×512 (SD-Turbo's native size)
    #[serde(rename = "square")]
    Square,
    /// 768×1024
    #[serde(rename = "portrait_4_3")]
    Portrait43,
    /// 576×1024
    #[serde(rename = "portrait_16_9")]
    Portrait169,
    /// 1024×768
    #[serde(rename = "landscape_4_3")]
    Landscape43,
    /// 1024×576
    #[serde(rename = "landscape_16_9")]
    Landscape169,
}

impl ImageSizeName {
    pub fn dims(self) -> (u32, u32) {
        match self {
            ImageSizeName::SquareHd => (1024, 1024),
            ImageSizeName::Square => (512, 512),
            ImageSizeName::Portrait43 => (768, 1024),
            ImageSizeName::Portrait169 => (576, 1024),
            ImageSizeName::Landscape43 => (1024, 768),
            ImageSizeName::Landscape169 => (1024, 576),
        }
    }
}

/// A width and height in pixels: multiples of 8 from 64 to 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct CustomSize {
    #[schemars(range(min = 64, max = 1024), extend("multipleOf" = 8))]
    pub width: u32,
    #[schemars(range(min = 64, max = 1024), extend("multipleOf" = 8))]
    pub height: u32,
}

/// A named size or `{width, height}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ImageSize {
    Named(ImageSizeName),
    Custom(CustomSize),
}

impl ImageSize {
    pub fn dims(self) -> (u32, u32) {
        match self {
            ImageSize::Named(n) => n.dims(),
            ImageSize::Custom(c) => (c.width, c.height),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Jpeg,
    Png,
}

impl OutputFormat {
    fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Png => "image/png",
        }
    }
    fn extension(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "jpg",
            OutputFormat::Png => "png",
        }
    }
}

fn one() -> u32 {
    1
}
fn half() -> f64 {
    0.5
}

/// Text-to-image (root path) or image-to-image (`/image-to-image`, which needs `image_url`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct SdTurboInput {
    /// What to draw.
    #[schemars(length(min = 1))]
    pub prompt: String,
    /// What to steer away from (used only when `guidance_scale` > 1).
    #[serde(default)]
    pub negative_prompt: String,
    /// The output size: one of fal's names or `{width, height}` (multiples of 8, 64–1024). Default `square`
    /// (512×512) for text-to-image, the input image's size (rounded down to a multiple of 8) for image-to-image.
    #[serde(default)]
    pub image_size: Option<ImageSize>,
    /// Denoising steps run (UNet evaluations per image). SD-Turbo is trained for 1–4.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 50))]
    pub num_inference_steps: u32,
    /// Classifier-free guidance; SD-Turbo is trained without it (0). Values above 1 run the negative prompt too,
    /// doubling the cost.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 20.0))]
    pub guidance_scale: f64,
    /// How many images; image `i` uses seed `seed + i`.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 4))]
    pub num_images: u32,
    /// The same seed and input give the same image. Random when absent (the output reports it).
    #[serde(default)]
    #[schemars(range(min = 0, max = 4294967295u64))]
    pub seed: Option<u64>,
    #[serde(default)]
    pub output_format: OutputFormat,
    /// Return the images as data URIs in the result instead of storing them.
    #[serde(default)]
    pub sync_mode: bool,
    /// Accepted for compatibility with fal's endpoints and ignored: Darkroom ships no safety checker, so no image
    /// is checked and the output reports no `has_nsfw_concepts`.
    #[serde(default)]
    pub enable_safety_checker: Option<bool>,
    /// Image-to-image only: the starting image (http(s) URL, Darkroom file URL or data URI; PNG, JPEG or WebP).
    #[serde(default)]
    pub image_url: Option<String>,
    /// Image-to-image only: how much of the image is re-drawn, from 0 (keep it) to 1 (ignore it). The schedule
    /// starts at this noise level and runs `num_inference_steps` steps from there.
    #[serde(default = "half")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub strength: f64,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Timings {
    /// Seconds spent in the network (text encoder, denoising, VAE), all images.
    pub inference: f64,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SdTurboOutput {
    pub images: Vec<File>,
    /// The seed of the first image.
    pub seed: u64,
    pub prompt: String,
    pub timings: Timings,
}

// ---------------------------------------------------------------------------------------------------------------
// Noise: a seeded generator of Darkroom's own, so images do not depend on a library's RNG
// ---------------------------------------------------------------------------------------------------------------

/// SplitMix64 with Box–Muller normals.
struct Noise {
    state: u64,
    spare: Option<f32>,
}

impl Noise {
    fn new(seed: u64) -> Self {
        Noise { state: seed ^ 0x5DEE_CE66_D1CE_4E5B, spare: None }
    }
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        self.spare = Some((r * t.sin()) as f32);
        (r * t.cos()) as f32
    }
    fn tensor(
        &mut self,
        shape: (usize, usize, usize, usize),
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n).map(|_| self.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Configs (diffusers' config.json files)
// ---------------------------------------------------------------------------------------------------------------

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: invalid JSON: {e}", path.display()))
}

fn get_usize(j: &Value, key: &str, default: Option<usize>) -> Result<usize, String> {
    match j.get(key) {
        Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| format!("`{key}` is not a whole number")),
        None => default.ok_or_else(|| format!("`{key}` is missing")),
    }
}

fn get_f64(j: &Value, key: &str, default: f64) -> Result<f64, String> {
    match j.get(key) {
        Some(v) => v.as_f64().ok_or_else(|| format!("`{key}` is not a number")),
        None => Ok(default),
    }
}

fn get_bool(j: &Value, key: &str, default: bool) -> bool {
    j.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn usize_list(j: &Value, key: &str) -> Result<Vec<usize>, String> {
    j.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("`{key}` is missing"))?
        .iter()
        .map(|v| v.as_u64().map(|v| v as usize).ok_or_else(|| format!("`{key}` holds a non-integer")))
        .collect()
}

/// An integer or a list with one integer per block.
fn per_block(j: &Value, key: &str, n: usize, default: usize) -> Result<Vec<usize>, String> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(vec![default; n]),
        Some(Value::Array(_)) => {
            let v = usize_list(j, key)?;
            if v.len() != n {
                return Err(format!("`{key}` has {} entries for {n} blocks", v.len()));
            }
            Ok(v)
        }
        Some(v) => Ok(vec![v.as_u64().ok_or_else(|| format!("`{key}` is not a whole number"))? as usize; n]),
    }
}

/// The CLIP text encoder's shape (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `gelu` (exact, SD 2.x) or `quick_gelu` (SD 1.x).
    pub quick_gelu: bool,
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    fn from_json(j: &Value) -> Result<Self, String> {
        let act = j.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu");
        let quick_gelu = match act {
            "quick_gelu" => true,
            "gelu" => false,
            other => return Err(format!("hidden_act {other:?} is not supported (gelu or quick_gelu)")),
        };
        Ok(ClipConfig {
            vocab_size: get_usize(j, "vocab_size", Some(49408))?,
            hidden_size: get_usize(j, "hidden_size", None)?,
            intermediate_size: get_usize(j, "intermediate_size", None)?,
            num_hidden_layers: get_usize(j, "num_hidden_layers", None)?,
            num_attention_heads: get_usize(j, "num_attention_heads", None)?,
            max_position_embeddings: get_usize(j, "max_position_embeddings", Some(77))?,
            quick_gelu,
            layer_norm_eps: get_f64(j, "layer_norm_eps", 1e-5)?,
        })
    }
}

/// The UNet's config and channel counts.
fn unet_config(j: &Value) -> Result<(UNet2DConditionModelConfig, usize, usize), String> {
    let channels = usize_list(j, "block_out_channels")?;
    let n = channels.len();
    if n == 0 {
        return Err("`block_out_channels` is empty".into());
    }
    let types: Vec<String> = j
        .get("down_block_types")
        .and_then(Value::as_array)
        .ok_or("`down_block_types` is missing")?
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    if types.len() != n {
        return Err(format!("`down_block_types` has {} entries for {n} blocks", types.len()));
    }
    // diffusers' `attention_head_dim` of SD 1.x/2.x is the number of heads (a known misnomer), as candle reads it.
    let heads = per_block(j, "attention_head_dim", n, 8)?;
    let layers = per_block(j, "transformer_layers_per_block", n, 1)?;
    let mut blocks = vec![];
    for i in 0..n {
        let cross = match types[i].as_str() {
            "CrossAttnDownBlock2D" => Some(layers[i]),
            "DownBlock2D" => None,
            other => return Err(format!("down block type {other:?} is not supported")),
        };
        blocks.push(BlockConfig { out_channels: channels[i], use_cross_attn: cross, attention_head_dim: heads[i] });
    }
    let cfg = UNet2DConditionModelConfig {
        center_input_sample: get_bool(j, "center_input_sample", false),
        flip_sin_to_cos: get_bool(j, "flip_sin_to_cos", true),
        freq_shift: get_f64(j, "freq_shift", 0.0)?,
        blocks,
        layers_per_block: get_usize(j, "layers_per_block", Some(2))?,
        downsample_padding: get_usize(j, "downsample_padding", Some(1))?,
        mid_block_scale_factor: get_f64(j, "mid_block_scale_factor", 1.0)?,
        norm_num_groups: get_usize(j, "norm_num_groups", Some(32))?,
        norm_eps: get_f64(j, "norm_eps", 1e-5)?,
        cross_attention_dim: get_usize(j, "cross_attention_dim", None)?,
        sliced_attention_size: None,
        use_linear_projection: get_bool(j, "use_linear_projection", false),
    };
    Ok((cfg, get_usize(j, "in_channels", Some(4))?, get_usize(j, "out_channels", Some(4))?))
}

#[derive(Debug, Clone)]
struct VaeConfig {
    kl: AutoEncoderKLConfig,
    scaling_factor: f64,
}

fn vae_config(j: &Value) -> Result<VaeConfig, String> {
    Ok(VaeConfig {
        kl: AutoEncoderKLConfig {
            block_out_channels: usize_list(j, "block_out_channels")?,
            layers_per_block: get_usize(j, "layers_per_block", Some(2))?,
            latent_channels: get_usize(j, "latent_channels", Some(4))?,
            norm_num_groups: get_usize(j, "norm_num_groups", Some(32))?,
            use_quant_conv: get_bool(j, "use_quant_conv", true),
            use_post_quant_conv: get_bool(j, "use_post_quant_conv", true),
        },
        scaling_factor: get_f64(j, "scaling_factor", 0.18215)?,
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Scheduler: diffusers' EulerDiscreteScheduler (no churn: deterministic)
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone)]
pub struct EulerScheduler {
    /// σ for every training timestep.
    train_sigmas: Vec<f64>,
    spacing: Spacing,
    steps_offset: usize,
    v_prediction: bool,
}

impl EulerScheduler {
    fn from_json(j: &Value) -> Result<Self, String> {
        let n = get_usize(j, "num_train_timesteps", Some(1000))?;
        let (b0, b1) = (get_f64(j, "beta_start", 0.00085)?, get_f64(j, "beta_end", 0.012)?);
        let schedule = j.get("beta_schedule").and_then(Value::as_str).unwrap_or("scaled_linear");
        let betas: Vec<f64> = (0..n)
            .map(|i| {
                let f = if n > 1 { i as f64 / (n - 1) as f64 } else { 0.0 };
                match schedule {
                    "scaled_linear" => (b0.sqrt() + f * (b1.sqrt() - b0.sqrt())).powi(2),
                    _ => b0 + f * (b1 - b0),
                }
            })
            .collect();
        if !matches!(schedule, "scaled_linear" | "linear") {
            return Err(format!("beta_schedule {schedule:?} is not supported"));
        }
        let mut acc = 1.0;
        let train_sigmas = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                ((1.0 - acc) / acc).sqrt()
            })
            .collect();
        let spacing = match j.get("timestep_spacing").and_then(Value::as_str).unwrap_or("linspace") {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => return Err(format!("timestep_spacing {other:?} is not supported")),
        };
        let v_prediction = match j.get("prediction_type").and_then(Value::as_str).unwrap_or("epsilon") {
            "epsilon" => false,
            "v_prediction" => true,
            other => return Err(format!("prediction_type {other:?} is not supported")),
        };
        if let Some(t) = j.get("_class_name").and_then(Value::as_str)
            && !t.starts_with("Euler")
        {
            tracing::info!(scheduler = t, "the checkpoint names another scheduler; Darkroom samples with Euler");
        }
        Ok(EulerScheduler { train_sigmas, spacing, steps_offset: get_usize(j, "steps_offset", Some(0))?, v_prediction })
    }

    /// The `n` timesteps of a full schedule, from the noisiest.
    fn timesteps(&self, n: usize) -> Vec<f64> {
        let total = self.train_sigmas.len();
        let n = n.clamp(1, total);
        match self.spacing {
            Spacing::Trailing => {
                let step = total as f64 / n as f64;
                (0..n).map(|i| ((total as f64 - i as f64 * step).round() - 1.0).max(0.0)).collect()
            }
            Spacing::Leading => {
                let ratio = total / n;
                (0..n).rev().map(|i| ((i * ratio) as f64 + self.steps_offset as f64).min(total as f64 - 1.0)).collect()
            }
            Spacing::Linspace => (0..n)
                .rev()
                .map(|i| if n == 1 { total as f64 - 1.0 } else { i as f64 * (total as f64 - 1.0) / (n - 1) as f64 })
                .collect(),
        }
    }

    /// σ at a (possibly fractional) timestep, interpolated as diffusers does.
    fn sigma(&self, t: f64) -> f64 {
        let lo = t.floor() as usize;
        let hi = (lo + 1).min(self.train_sigmas.len() - 1);
        let w = t - lo as f64;
        self.train_sigmas[lo] * (1.0 - w) + self.train_sigmas[hi] * w
    }

    /// The noise a text-to-image run starts from is `noise × init_sigma`.
    fn init_sigma(&self, first_sigma: f64) -> f64 {
        match self.spacing {
            Spacing::Leading => (first_sigma * first_sigma + 1.0).sqrt(),
            _ => first_sigma,
        }
    }

    /// The steps to run: `steps` timesteps of a schedule that starts at noise level `strength` (1: pure noise).
    /// Image-to-image runs the last `steps` of a `ceil(steps / strength)`-step schedule, which is what diffusers
    /// runs for `num_inference_steps = ceil(steps / strength)` and that `strength`.
    fn plan(&self, steps: usize, strength: f64) -> Vec<(f64, f64, f64)> {
        let total = ((steps as f64 / strength.clamp(1e-3, 1.0)) - 1e-9).ceil().max(steps as f64) as usize;
        let ts = self.timesteps(total);
        let skip = ts.len().saturating_sub(steps);
        let ts = &ts[skip..];
        ts.iter()
            .enumerate()
            .map(|(i, &t)| {
                let next = ts.get(i + 1).map_or(0.0, |&n| self.sigma(n));
                (t, self.sigma(t), next)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The CLIP text encoder (transformers' CLIPTextModel; tensors under `text_model.`)
// ---------------------------------------------------------------------------------------------------------------

struct ClipLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipText {
    token: Embedding,
    position: Embedding,
    layers: Vec<ClipLayer>,
    final_ln: LayerNorm,
    heads: usize,
    quick_gelu: bool,
}

impl ClipText {
    pub fn new(vb: VarBuilder, c: &ClipConfig) -> candle_core::Result<Self> {
        let vb = vb.pp("text_model");
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let emb = vb.pp("embeddings");
        let token = candle_nn::embedding(c.vocab_size, d, emb.pp("token_embedding"))?;
        let position = candle_nn::embedding(c.max_position_embeddings, d, emb.pp("position_embedding"))?;
        let mut layers = vec![];
        for i in 0..c.num_hidden_layers {
            let l = vb.pp("encoder").pp("layers").pp(i.to_string());
            let a = l.pp("self_attn");
            layers.push(ClipLayer {
                ln1: candle_nn::layer_norm(d, eps, l.pp("layer_norm1"))?,
                q: candle_nn::linear(d, d, a.pp("q_proj"))?,
                k: candle_nn::linear(d, d, a.pp("k_proj"))?,
                v: candle_nn::linear(d, d, a.pp("v_proj"))?,
                o: candle_nn::linear(d, d, a.pp("out_proj"))?,
                ln2: candle_nn::layer_norm(d, eps, l.pp("layer_norm2"))?,
                fc1: candle_nn::linear(d, c.intermediate_size, l.pp("mlp").pp("fc1"))?,
                fc2: candle_nn::linear(c.intermediate_size, d, l.pp("mlp").pp("fc2"))?,
            });
        }
        let final_ln = candle_nn::layer_norm(d, eps, vb.pp("final_layer_norm"))?;
        Ok(ClipText { token, position, layers, final_ln, heads: c.num_attention_heads, quick_gelu: c.quick_gelu })
    }

    /// Token ids `[batch, len]` → the last hidden state after the final layer norm `[batch, len, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let dev = ids.device();
        let pos = Tensor::arange(0u32, l as u32, dev)?;
        let mut x = self.token.forward(ids)?.broadcast_add(&self.position.forward(&pos)?)?;
        let mask: Vec<f32> =
            (0..l).flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (l, l), dev)?.to_dtype(x.dtype())?;
        let d = x.dim(D::Minus1)?;
        let (h, dh) = (self.heads, d / self.heads);
        let scale = (dh as f64).powf(-0.5);
        for layer in &self.layers {
            let r = x.clone();
            let y = layer.ln1.forward(&x)?;
            let split = |t: Tensor| t.reshape((b, l, h, dh))?.transpose(1, 2)?.contiguous();
            let q = split((layer.q.forward(&y)? * scale)?)?;
            let k = split(layer.k.forward(&y)?)?;
            let v = split(layer.v.forward(&y)?)?;
            let att = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
            x = (r + layer.o.forward(&y)?)?;
            let r = x.clone();
            let y = layer.fc1.forward(&layer.ln2.forward(&x)?)?;
            let y = if self.quick_gelu { (&y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?)? } else { y.gelu_erf()? };
            x = (r + layer.fc2.forward(&y)?)?;
        }
        self.final_ln.forward(&x)
    }
}

/// CLIP's byte-level BPE tokenizer from a `vocab.json` and `merges.txt` (transformers' `CLIPTokenizerFast`:
/// NFC, whitespace collapsed, lower-cased, split by CLIP's pattern, `</w>` ending each word).
pub fn clip_tokenizer(vocab: &Path, merges: &Path) -> Result<Tokenizer, String> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};
    let e = |e: tokenizers::Error| format!("tokenizer: {e}");
    let (v, m) = (vocab.to_string_lossy(), merges.to_string_lossy());
    let bpe = BPE::from_file(&v, &m)
        .end_of_word_suffix("</w>".into())
        .unk_token("<|endoftext|>".into())
        .build()
        .map_err(e)?;
    let mut tok = Tokenizer::new(bpe);
    let ws = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ").map_err(e)?;
    tok.with_normalizer(Some(Normalizers::new(vec![NFC.into(), ws.into(), Lowercase.into()]))).map_err(e)?;
    let pattern = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
    let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Removed, true).map_err(e)?;
    let pre: Vec<PreTokenizerWrapper> = vec![split.into(), ByteLevel::new(false, true, false).into()];
    tok.with_pre_tokenizer(Some(PreTokenizers::new(pre)));
    Ok(tok)
}

// ---------------------------------------------------------------------------------------------------------------
// The VAE's encoder (candle's is private), for image-to-image
// ---------------------------------------------------------------------------------------------------------------

/// The VAE's encoder on candle's blocks: what writes a tiny checkpoint's encoder tensors, and the reference
/// pipeline's encoder ([`Pipeline::reference`]) that [`FastVaeEncoder`] is held equal to.
struct VaeEncoder {
    conv_in: Conv2d,
    down: Vec<DownEncoderBlock2D>,
    mid: UNetMidBlock2D,
    norm: GroupNorm,
    conv_out: Conv2d,
    quant: Option<Conv2d>,
}

impl VaeEncoder {
    fn new(vb: VarBuilder, c: &AutoEncoderKLConfig) -> candle_core::Result<Self> {
        let e = vb.pp("encoder");
        let pad1 = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
        let ch = &c.block_out_channels;
        let conv_in = candle_nn::conv2d(3, ch[0], 3, pad1, e.pp("conv_in"))?;
        let mut down = vec![];
        for (i, &out) in ch.iter().enumerate() {
            let cfg = DownEncoderBlock2DConfig {
                num_layers: c.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: c.norm_num_groups,
                add_downsample: i + 1 < ch.len(),
                downsample_padding: 0,
                ..Default::default()
            };
            let inp = if i > 0 { ch[i - 1] } else { ch[0] };
            down.push(DownEncoderBlock2D::new(e.pp("down_blocks").pp(i.to_string()), inp, out, cfg)?);
        }
        let last = *ch.last().expect("non-empty");
        let mid_cfg = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.,
            attn_num_head_channels: None,
            resnet_groups: Some(c.norm_num_groups),
            ..Default::default()
        };
        let mid = UNetMidBlock2D::new(e.pp("mid_block"), last, None, mid_cfg)?;
        let norm = candle_nn::group_norm(c.norm_num_groups, last, 1e-6, e.pp("conv_norm_out"))?;
        let conv_out = candle_nn::conv2d(last, 2 * c.latent_channels, 3, pad1, e.pp("conv_out"))?;
        let quant = if c.use_quant_conv {
            let n = 2 * c.latent_channels;
            Some(candle_nn::conv2d(n, n, 1, Default::default(), vb.pp("quant_conv"))?)
        } else {
            None
        };
        Ok(VaeEncoder { conv_in, down, mid, norm, conv_out, quant })
    }

    /// Image `[b, 3, h, w]` in [-1, 1] → (mean, std) of the latent distribution.
    fn moments(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = x.apply(&self.conv_in)?;
        for d in &self.down {
            x = x.apply(d)?;
        }
        let x = self.mid.forward(&x, None)?.apply(&self.norm)?;
        let mut x = candle_nn::ops::silu(&x)?.apply(&self.conv_out)?;
        if let Some(q) = &self.quant {
            x = x.apply(q)?;
        }
        let parts = x.chunk(2, 1)?;
        let logvar = parts[1].clamp(-30f32, 20f32)?;
        Ok((parts[0].clone(), (logvar * 0.5)?.exp()?))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The VAE's decoder, with convolutions as patch-matrix GEMMs on the CPU
// ---------------------------------------------------------------------------------------------------------------

/// An activation on the CPU in f32: `[c, h, w]` (batch 1), what the fused CPU paths pass between layers.
#[derive(Clone)]
struct Act {
    c: usize,
    h: usize,
    w: usize,
    data: Vec<f32>,
}

impl Act {
    fn from_tensor(t: &Tensor) -> candle_core::Result<Act> {
        let (_, c, h, w) = t.dims4()?;
        Ok(Act { c, h, w, data: t.flatten_all()?.to_vec1::<f32>()? })
    }

    fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.data, (1, self.c, self.h, self.w), device)
    }
}

/// A 3×3 (padding 1) or 1×1 convolution with bias. On the CPU in f32 the VAE runs it as [`crate::conv::Conv`]
/// (GEMMs over shifted views of a padded input, with the group norm + SiLU or upsampling before it and the bias and
/// residual after it fused in); on other devices, or through [`FastConv::forward`], as patch-matrix GEMMs
/// ([`crate::conv::conv_gemm`]) or candle's conv2d.
struct FastConv {
    /// The weights as a tensor, for [`FastConv::forward`]; dropped on the CPU by [`FastConv::fused`].
    weight: Option<Tensor>,
    bias: Tensor,
    k: usize,
    cpu: Option<crate::conv::Conv>,
}

impl FastConv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, k: usize) -> candle_core::Result<Self> {
        Self::load(vb, cin, cout, k, true)
    }

    /// Without the tensor copy of the weights where the fused CPU form is made: for networks that only ever
    /// [`FastConv::run`] on the CPU (the UNet), so their convolution weights are held once.
    fn fused(vb: VarBuilder, cin: usize, cout: usize, k: usize) -> candle_core::Result<Self> {
        Self::load(vb, cin, cout, k, false)
    }

    fn load(vb: VarBuilder, cin: usize, cout: usize, k: usize, keep: bool) -> candle_core::Result<Self> {
        let weight = vb.get((cout, cin, k, k), "weight")?;
        let bias = vb.get(cout, "bias")?;
        let cpu = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            let w = weight.flatten_all()?.to_vec1::<f32>()?;
            Some(crate::conv::Conv::from_oihw(w, bias.to_vec1::<f32>()?, cout, cin, k))
        } else {
            None
        };
        let weight = if keep || cpu.is_none() { Some(weight) } else { None };
        Ok(FastConv { weight, bias: bias.reshape((1, cout, 1, 1))?, k, cpu })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(weight) = &self.weight else { candle_core::bail!("this convolution only runs fused on the CPU") };
        let p = self.k / 2;
        let y = if x.device().is_cpu() && x.dtype() == DType::F32 && x.dim(0)? == 1 {
            let (co, ci, kh, kw) = weight.dims4()?;
            crate::conv::conv_gemm(x, &weight.reshape((co, ci * kh * kw))?, (self.k, self.k), [p; 4], 1)?
        } else {
            x.conv2d(weight, p, 1, 1, 1)?
        };
        y.broadcast_add(&self.bias)
    }

    /// The fused CPU convolution (only when [`FastConv::cpu`] is there).
    fn run(&self, x: &Act, prologue: crate::conv::Prologue, residual: Option<&[f32]>) -> candle_core::Result<Act> {
        let Some(conv) = &self.cpu else { candle_core::bail!("no CPU convolution") };
        let data = conv.forward(&x.data, (x.h, x.w), prologue, residual);
        let up = usize::from(matches!(prologue, crate::conv::Prologue::Upsample)) + 1;
        Ok(Act { c: conv.out_channels(), h: x.h * up, w: x.w * up, data })
    }

    /// [`FastConv::run`] plus a per-channel bias.
    fn run_biased(
        &self,
        x: &Act,
        prologue: crate::conv::Prologue,
        residual: Option<&[f32]>,
        extra: Option<&[f32]>,
    ) -> candle_core::Result<Act> {
        let Some(conv) = &self.cpu else { candle_core::bail!("no CPU convolution") };
        let data = conv.forward_biased(&x.data, (x.h, x.w), prologue, residual, extra);
        let up = usize::from(matches!(prologue, crate::conv::Prologue::Upsample)) + 1;
        Ok(Act { c: conv.out_channels(), h: x.h * up, w: x.w * up, data })
    }
}

/// A group normalisation, kept with its affine parameters so the fused path can fold it into the next convolution.
struct Norm {
    gn: GroupNorm,
    groups: usize,
    eps: f64,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl Norm {
    fn new(vb: VarBuilder, groups: usize, c: usize, eps: f64) -> candle_core::Result<Self> {
        let (w, b) = (vb.get(c, "weight")?, vb.get(c, "bias")?);
        let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> { t.to_dtype(DType::F32)?.to_vec1::<f32>() };
        let (gamma, beta) = (host(&w)?, host(&b)?);
        Ok(Norm { gn: GroupNorm::new(w, b, c, groups, eps)?, groups, eps, gamma, beta })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.gn.forward(x)
    }

    /// The normalisation of `x` as per-channel (scale, shift).
    fn factors(&self, x: &Act) -> (Vec<f32>, Vec<f32>) {
        crate::conv::group_norm_factors(&x.data, x.c, self.groups, self.eps, &self.gamma, &self.beta)
    }
}

/// diffusers' `ResnetBlock2D` without a time embedding.
struct VaeResnet {
    norm1: Norm,
    conv1: FastConv,
    norm2: Norm,
    conv2: FastConv,
    shortcut: Option<FastConv>,
}

impl VaeResnet {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> candle_core::Result<Self> {
        Self::with_eps(vb, cin, cout, groups, 1e-6, FastConv::new)
    }

    /// With the norms' `eps`, and `conv` making the convolutions ([`FastConv::new`] or [`FastConv::fused`]).
    fn with_eps(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        groups: usize,
        eps: f64,
        conv: fn(VarBuilder, usize, usize, usize) -> candle_core::Result<FastConv>,
    ) -> candle_core::Result<Self> {
        Ok(VaeResnet {
            norm1: Norm::new(vb.pp("norm1"), groups, cin, eps)?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3)?,
            norm2: Norm::new(vb.pp("norm2"), groups, cout, eps)?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3)?,
            shortcut: if cin != cout { Some(conv(vb.pp("conv_shortcut"), cin, cout, 1)?) } else { None },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&candle_nn::ops::silu(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&candle_nn::ops::silu(&self.norm2.forward(&h)?)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }

    /// The fused CPU path: norm + SiLU inside each convolution's input copy, the skip connection added as the
    /// second convolution's output is written.
    fn run(&self, x: &Act) -> candle_core::Result<Act> {
        self.run_biased(x, None)
    }

    /// [`VaeResnet::run`] with a per-channel bias added after the first convolution (a UNet resnet's projected
    /// time embedding).
    fn run_biased(&self, x: &Act, extra: Option<&[f32]>) -> candle_core::Result<Act> {
        use crate::conv::Prologue;
        let (scale, shift) = self.norm1.factors(x);
        let h = self.conv1.run_biased(x, Prologue::NormSilu { scale: &scale, shift: &shift }, None, extra)?;
        let (scale, shift) = self.norm2.factors(&h);
        let skip = match &self.shortcut {
            Some(s) => Some(s.run(x, Prologue::Copy, None)?),
            None => None,
        };
        let residual = skip.as_ref().map_or(&x.data, |s| &s.data);
        self.conv2.run(&h, Prologue::NormSilu { scale: &scale, shift: &shift }, Some(residual))
    }
}

/// The VAE's decoder (`post_quant_conv` then diffusers' `Decoder`), computing what candle's `AutoEncoderKL::decode`
/// computes (a test holds them equal) with [`FastConv`] convolutions.
struct VaeDecoder {
    post_quant: Option<FastConv>,
    conv_in: FastConv,
    mid: (VaeResnet, candle_transformers::models::stable_diffusion::attention::AttentionBlock, VaeResnet),
    /// Per block: resnets, then an upsampling convolution (all but the last).
    up: Vec<(Vec<VaeResnet>, Option<FastConv>)>,
    norm_out: Norm,
    conv_out: FastConv,
}

impl VaeDecoder {
    fn new(vb: VarBuilder, c: &AutoEncoderKLConfig) -> candle_core::Result<Self> {
        use candle_transformers::models::stable_diffusion::attention::{AttentionBlock, AttentionBlockConfig};
        let d = vb.pp("decoder");
        let g = c.norm_num_groups;
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let top = rev[0];
        let post_quant = if c.use_post_quant_conv {
            Some(FastConv::new(vb.pp("post_quant_conv"), c.latent_channels, c.latent_channels, 1)?)
        } else {
            None
        };
        let conv_in = FastConv::new(d.pp("conv_in"), c.latent_channels, top, 3)?;
        let m = d.pp("mid_block");
        let attn_cfg =
            AttentionBlockConfig { num_head_channels: None, num_groups: g, rescale_output_factor: 1.0, eps: 1e-6 };
        let mid = (
            VaeResnet::new(m.pp("resnets").pp("0"), top, top, g)?,
            AttentionBlock::new(m.pp("attentions").pp("0"), top, attn_cfg)?,
            VaeResnet::new(m.pp("resnets").pp("1"), top, top, g)?,
        );
        let mut up = vec![];
        for (i, &out) in rev.iter().enumerate() {
            let b = d.pp("up_blocks").pp(i.to_string());
            let cin = if i == 0 { top } else { rev[i - 1] };
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| VaeResnet::new(b.pp("resnets").pp(j.to_string()), if j == 0 { cin } else { out }, out, g))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample = if i + 1 < rev.len() {
                Some(FastConv::new(b.pp("upsamplers").pp("0").pp("conv"), out, out, 3)?)
            } else {
                None
            };
            up.push((resnets, upsample));
        }
        let last = *rev.last().expect("non-empty");
        Ok(VaeDecoder {
            post_quant,
            conv_in,
            mid,
            up,
            norm_out: Norm::new(d.pp("conv_norm_out"), g, last, 1e-6)?,
            conv_out: FastConv::new(d.pp("conv_out"), last, 3, 3)?,
        })
    }

    /// Latents (unscaled, `[1, 4, h, w]`) → image `[1, 3, f·h, f·w]` in about [-1, 1]: the fused CPU path for one
    /// f32 image on the CPU, else candle's operations.
    fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        if self.conv_in.cpu.is_some() && z.device().is_cpu() && z.dtype() == DType::F32 && z.dim(0)? == 1 {
            self.decode_fused(z)
        } else {
            self.decode_unfused(z)
        }
    }

    /// Decodes in overlapping tiles of at most `tile × tile` latents when the latent is larger, blending the tiles
    /// linearly across their `overlap`: the memory of a large image's decode stays that of one tile. As with
    /// diffusers' `enable_vae_tiling`, each tile is normalised on its own statistics, so a tiled image differs
    /// slightly from a whole one (the blend hides the seams).
    fn decode_tiled(&self, z: &Tensor, tile: usize, overlap: usize) -> candle_core::Result<Tensor> {
        let (_, _, lh, lw) = z.dims4()?;
        if tile == 0 || (lh <= tile && lw <= tile) {
            return self.decode(z);
        }
        let spans = |len: usize| -> Vec<(usize, usize)> {
            if len <= tile {
                return vec![(0, len)];
            }
            let step = tile.saturating_sub(overlap).max(1);
            let n = (len - overlap.min(len)).div_ceil(step).max(2);
            let size = (len + (n - 1) * overlap).div_ceil(n).min(len);
            (0..n).map(|i| ((i * (len - size) + (n - 1) / 2) / (n - 1), size)).collect()
        };
        let (rows, cols) = (spans(lh), spans(lw));
        let f = self.scale_factor();
        let (h, w) = (lh * f, lw * f);
        let mut sum = vec![0f32; 3 * h * w];
        let mut weight = vec![0f32; h * w];
        // Along one axis: 1 inside, ramping down over the overlap towards an edge that another tile covers.
        let ramp = |at: usize, start: usize, size: usize, len: usize| -> f32 {
            let r = (overlap * f).max(1) as f32;
            let mut v = 1f32;
            if start > 0 {
                v = v.min((at as f32 + 0.5) / r);
            }
            if start + size < len {
                v = v.min(((size * f - at) as f32 - 0.5) / r);
            }
            v.clamp(1e-3, 1.0)
        };
        for &(y0, th) in &rows {
            for &(x0, tw) in &cols {
                let part = self.decode(&z.narrow(2, y0, th)?.narrow(3, x0, tw)?)?;
                let data = part.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let (ph, pw) = (th * f, tw * f);
                for y in 0..ph {
                    let wy = ramp(y, y0, th, lh);
                    for x in 0..pw {
                        let wt = wy * ramp(x, x0, tw, lw);
                        let at = (y0 * f + y) * w + x0 * f + x;
                        weight[at] += wt;
                        for c in 0..3 {
                            sum[c * h * w + at] += wt * data[(c * ph + y) * pw + x];
                        }
                    }
                }
            }
        }
        for plane in sum.chunks_mut(h * w) {
            for (v, wt) in plane.iter_mut().zip(&weight) {
                *v /= *wt;
            }
        }
        Tensor::from_vec(sum, (1, 3, h, w), z.device())
    }

    /// Image pixels per latent pixel.
    fn scale_factor(&self) -> usize {
        1 << self.up.len().saturating_sub(1)
    }

    fn decode_unfused(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = match &self.post_quant {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        x = self.conv_in.forward(&x)?;
        x = self.mid.0.forward(&x)?;
        x = self.mid.1.forward(&x)?;
        x = self.mid.2.forward(&x)?;
        for (resnets, upsample) in &self.up {
            for r in resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = upsample {
                let (_, _, h, w) = x.dims4()?;
                x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        let x = candle_nn::ops::silu(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }

    fn decode_fused(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        use crate::conv::Prologue;
        let mut x = Act::from_tensor(z)?;
        if let Some(p) = &self.post_quant {
            x = p.run(&x, Prologue::Copy, None)?;
        }
        x = self.conv_in.run(&x, Prologue::Copy, None)?;
        x = self.mid.0.run(&x)?;
        x = Act::from_tensor(&self.mid.1.forward(&x.to_tensor(z.device())?)?)?;
        x = self.mid.2.run(&x)?;
        for (resnets, upsample) in &self.up {
            for r in resnets {
                x = r.run(&x)?;
            }
            if let Some(conv) = upsample {
                x = conv.run(&x, Prologue::Upsample, None)?;
            }
        }
        let (scale, shift) = self.norm_out.factors(&x);
        self.conv_out.run(&x, Prologue::NormSilu { scale: &scale, shift: &shift }, None)?.to_tensor(z.device())
    }
}

/// The VAE's encoder (diffusers' `Encoder` then `quant_conv`) with [`FastConv`] convolutions, for image-to-image; the
/// downsampling convolutions (stride 2) stay candle's. A test holds it equal to [`VaeEncoder`].
struct FastVaeEncoder {
    conv_in: FastConv,
    /// Per block: resnets, then a stride-2 convolution (all but the last).
    down: Vec<(Vec<VaeResnet>, Option<Conv2d>)>,
    mid: (VaeResnet, candle_transformers::models::stable_diffusion::attention::AttentionBlock, VaeResnet),
    norm_out: Norm,
    conv_out: FastConv,
    quant: Option<FastConv>,
}

impl FastVaeEncoder {
    fn new(vb: VarBuilder, c: &AutoEncoderKLConfig) -> candle_core::Result<Self> {
        use candle_transformers::models::stable_diffusion::attention::{AttentionBlock, AttentionBlockConfig};
        let e = vb.pp("encoder");
        let (g, ch) = (c.norm_num_groups, &c.block_out_channels);
        let conv_in = FastConv::new(e.pp("conv_in"), 3, ch[0], 3)?;
        let mut down = vec![];
        for (i, &out) in ch.iter().enumerate() {
            let b = e.pp("down_blocks").pp(i.to_string());
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..c.layers_per_block)
                .map(|j| VaeResnet::new(b.pp("resnets").pp(j.to_string()), if j == 0 { cin } else { out }, out, g))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsample = if i + 1 < ch.len() {
                let cfg = candle_nn::Conv2dConfig { stride: 2, ..Default::default() };
                Some(candle_nn::conv2d(out, out, 3, cfg, b.pp("downsamplers").pp("0").pp("conv"))?)
            } else {
                None
            };
            down.push((resnets, downsample));
        }
        let last = *ch.last().expect("non-empty");
        let m = e.pp("mid_block");
        let attn_cfg =
            AttentionBlockConfig { num_head_channels: None, num_groups: g, rescale_output_factor: 1.0, eps: 1e-6 };
        let mid = (
            VaeResnet::new(m.pp("resnets").pp("0"), last, last, g)?,
            AttentionBlock::new(m.pp("attentions").pp("0"), last, attn_cfg)?,
            VaeResnet::new(m.pp("resnets").pp("1"), last, last, g)?,
        );
        let n = 2 * c.latent_channels;
        Ok(FastVaeEncoder {
            conv_in,
            down,
            mid,
            norm_out: Norm::new(e.pp("conv_norm_out"), g, last, 1e-6)?,
            conv_out: FastConv::new(e.pp("conv_out"), last, n, 3)?,
            quant: if c.use_quant_conv { Some(FastConv::new(vb.pp("quant_conv"), n, n, 1)?) } else { None },
        })
    }

    /// Image `[1, 3, h, w]` in [-1, 1] → (mean, std) of the latent distribution (the fused CPU path for one f32
    /// image on the CPU, else candle's operations).
    fn moments(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let x = if self.conv_in.cpu.is_some() && x.device().is_cpu() && x.dtype() == DType::F32 && x.dim(0)? == 1 {
            self.encode_fused(x)?
        } else {
            self.encode_unfused(x)?
        };
        let parts = x.chunk(2, 1)?;
        let logvar = parts[1].clamp(-30f32, 20f32)?;
        Ok((parts[0].clone(), (logvar * 0.5)?.exp()?))
    }

    fn encode_unfused(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for (resnets, downsample) in &self.down {
            for r in resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = downsample {
                // diffusers pads only after (right and bottom) before a stride-2 convolution.
                x = x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?.apply(conv)?;
            }
        }
        x = self.mid.0.forward(&x)?;
        x = self.mid.1.forward(&x)?;
        x = self.mid.2.forward(&x)?;
        let x = candle_nn::ops::silu(&self.norm_out.forward(&x)?)?;
        let mut x = self.conv_out.forward(&x)?;
        if let Some(q) = &self.quant {
            x = q.forward(&x)?;
        }
        Ok(x)
    }

    fn encode_fused(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        use crate::conv::Prologue;
        let device = x.device();
        let mut a = self.conv_in.run(&Act::from_tensor(x)?, Prologue::Copy, None)?;
        for (resnets, downsample) in &self.down {
            for r in resnets {
                a = r.run(&a)?;
            }
            if let Some(conv) = downsample {
                // diffusers pads only after (right and bottom) before a stride-2 convolution (candle's here).
                let t = a.to_tensor(device)?;
                a = Act::from_tensor(
                    &t.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?.apply(conv)?,
                )?;
            }
        }
        a = self.mid.0.run(&a)?;
        a = Act::from_tensor(&self.mid.1.forward(&a.to_tensor(device)?)?)?;
        a = self.mid.2.run(&a)?;
        let (scale, shift) = self.norm_out.factors(&a);
        a = self.conv_out.run(&a, Prologue::NormSilu { scale: &scale, shift: &shift }, None)?;
        if let Some(q) = &self.quant {
            a = q.run(&a, Prologue::Copy, None)?;
        }
        a.to_tensor(device)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The pipeline
// ---------------------------------------------------------------------------------------------------------------

/// A loaded checkpoint.
pub struct Pipeline {
    tokenizer: Tokenizer,
    clip: ClipText,
    max_tokens: usize,
    bos: u32,
    eos: u32,
    pad: u32,
    unet: Unet,
    unet_in: usize,
    decoder: Decoder,
    /// The VAE's block count (its scale factor is 2^(blocks − 1)).
    vae_blocks: usize,
    encoder: Encoder,
    vae_scale: f64,
    /// For [`Pipeline::flops`].
    shapes: (ClipConfig, UNet2DConditionModelConfig, AutoEncoderKLConfig),
    scheduler: EulerScheduler,
    device: Device,
    dtype: DType,
}

/// Latent tiles' overlap in tiled decoding (diffusers' 25 % of its 64-latent tiles).
const VAE_TILE_OVERLAP: usize = 16;

/// The largest latent side decoded whole (96: 768 pixels); larger images are decoded in tiles of at most this side.
/// `DARKROOM_SD_VAE_TILE` sets it (0: never tile).
fn vae_tile() -> usize {
    std::env::var("DARKROOM_SD_VAE_TILE").ok().and_then(|v| v.parse().ok()).unwrap_or(96)
}

/// The UNet: ours on the CPU, candle's elsewhere and in the reference pipeline.
enum Unet {
    Fast(Box<unet::FastUnet>),
    Candle(Box<UNet2DConditionModel>),
}

/// The VAE decoder: ours, or (the reference pipeline) candle's.
enum Decoder {
    Fast(Box<VaeDecoder>),
    Reference(Box<AutoEncoderKL>),
}

/// The VAE encoder: ours, or (the reference pipeline) the one on candle's blocks.
enum Encoder {
    Fast(Box<FastVaeEncoder>),
    Reference(Box<VaeEncoder>),
}

/// One generation.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    /// Image-to-image: the starting image, already `width × height`.
    pub init_image: Option<RgbImage>,
    pub strength: f64,
}

/// What the pipeline reports while it runs.
pub enum Event<'a> {
    /// The text is encoded.
    Encoded,
    /// Image-to-image: the starting image is encoded to latents.
    ImageEncoded,
    /// Denoising step `step` (from 1) of `steps` for image `image` is done; `preview` is a cheap RGB approximation
    /// of the predicted image at latent resolution.
    Step { image: usize, step: usize, steps: usize, preview: &'a RgbImage },
    /// Image `image` is decoded.
    Decoded { image: usize },
}

/// Why a generation stopped.
#[derive(Debug)]
pub enum GenError {
    Cancelled,
    Failed(String),
}

impl From<candle_core::Error> for GenError {
    fn from(e: candle_core::Error) -> Self {
        GenError::Failed(e.to_string())
    }
}

/// The device the pipeline runs on: the first CUDA GPU when built with `cuda` and one is present (unless
/// `DARKROOM_DEVICE=cpu`), else the CPU.
pub fn pick_device() -> Device {
    if std::env::var("DARKROOM_DEVICE").is_ok_and(|d| d == "cpu") {
        return Device::Cpu;
    }
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// The files of a checkpoint in diffusers' layout.
pub const FILES: [&str; 10] = [
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
];

fn special_token(map: &Value, key: &str) -> Option<String> {
    match map.get(key)? {
        Value::String(s) => Some(s.clone()),
        v => v.get("content").and_then(Value::as_str).map(str::to_string),
    }
}

impl Pipeline {
    /// Loads a checkpoint in diffusers' folder layout ([`FILES`]).
    pub fn from_dir(dir: &Path, device: Device) -> Result<Self, String> {
        Self::load(dir, device, false, false)
    }

    /// The straightforward pipeline: the same text encoder, UNet and scheduler, with candle's own VAE decoder and
    /// the VAE encoder on candle's blocks. Tests hold the fast pipeline's images equal to its; the benchmark runs it
    /// as the baseline (`darkroom bench diffusion --reference`).
    pub fn reference(dir: &Path, device: Device, zero_weights: bool) -> Result<Self, String> {
        Self::load(dir, device, zero_weights, true)
    }

    /// The checkpoint's architecture (its config files and tokenizer) with every weight zero: the full compute of
    /// the real model without its weight files (shape checks and benchmarks; the images are flat).
    pub fn with_zero_weights(dir: &Path, device: Device) -> Result<Self, String> {
        Self::load(dir, device, true, false)
    }

    fn load(dir: &Path, device: Device, zeros: bool, reference: bool) -> Result<Self, String> {
        let dtype = if device.is_cuda() { DType::F16 } else { DType::F32 };
        let p = |n: &str| dir.join(n);
        let clip_cfg = ClipConfig::from_json(&read_json(&p("text_encoder/config.json"))?)
            .map_err(|e| format!("text_encoder/config.json: {e}"))?;
        let (unet_cfg, unet_in, unet_out) =
            unet_config(&read_json(&p("unet/config.json"))?).map_err(|e| format!("unet/config.json: {e}"))?;
        let vae_cfg = vae_config(&read_json(&p("vae/config.json"))?).map_err(|e| format!("vae/config.json: {e}"))?;
        let scheduler = EulerScheduler::from_json(&read_json(&p("scheduler/scheduler_config.json"))?)
            .map_err(|e| format!("scheduler/scheduler_config.json: {e}"))?;
        if unet_in != vae_cfg.kl.latent_channels || unet_out != vae_cfg.kl.latent_channels {
            return Err(format!(
                "the UNet takes {unet_in} channels and gives {unet_out}, the VAE's latents have {}: only plain \
                 text-to-image checkpoints are supported (not inpainting or depth models)",
                vae_cfg.kl.latent_channels
            ));
        }
        if unet_cfg.cross_attention_dim != clip_cfg.hidden_size {
            return Err(format!(
                "the UNet attends to {}-wide text states, the text encoder gives {}",
                unet_cfg.cross_attention_dim, clip_cfg.hidden_size
            ));
        }
        let tokenizer = clip_tokenizer(&p("tokenizer/vocab.json"), &p("tokenizer/merges.txt"))?;
        let specials = read_json(&p("tokenizer/special_tokens_map.json"))?;
        let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| format!("the tokenizer has no {t:?} token"));
        let bos = id(&special_token(&specials, "bos_token").unwrap_or("<|startoftext|>".into()))?;
        let eos = id(&special_token(&specials, "eos_token").unwrap_or("<|endoftext|>".into()))?;
        let pad = id(&special_token(&specials, "pad_token").unwrap_or("<|endoftext|>".into()))?;
        let load = |n: &str| -> Result<VarBuilder<'static>, String> {
            if zeros {
                return Ok(VarBuilder::zeros(dtype, &device));
            }
            // SAFETY: the store's files are not modified while a runner has them mapped.
            unsafe { VarBuilder::from_mmaped_safetensors(&[p(n)], dtype, &device) }.map_err(|e| format!("{n}: {e}"))
        };
        let vb = load("text_encoder/model.safetensors")?;
        let clip = ClipText::new(vb, &clip_cfg).map_err(|e| format!("text encoder: {e}"))?;
        let vb = load("unet/diffusion_pytorch_model.safetensors")?;
        let unet = if reference || !device.is_cpu() {
            Unet::Candle(Box::new(
                UNet2DConditionModel::new(vb, unet_in, unet_out, false, unet_cfg.clone())
                    .map_err(|e| format!("unet: {e}"))?,
            ))
        } else {
            Unet::Fast(Box::new(
                unet::FastUnet::new(vb, unet_in, unet_out, &unet_cfg).map_err(|e| format!("unet: {e}"))?,
            ))
        };
        let vb = load("vae/diffusion_pytorch_model.safetensors")?;
        let (decoder, encoder) = if reference {
            (
                Decoder::Reference(Box::new(
                    AutoEncoderKL::new(vb.clone(), 3, 3, vae_cfg.kl.clone()).map_err(|e| format!("vae: {e}"))?,
                )),
                Encoder::Reference(Box::new(
                    VaeEncoder::new(vb, &vae_cfg.kl).map_err(|e| format!("vae encoder: {e}"))?,
                )),
            )
        } else {
            (
                Decoder::Fast(Box::new(VaeDecoder::new(vb.clone(), &vae_cfg.kl).map_err(|e| format!("vae: {e}"))?)),
                Encoder::Fast(Box::new(FastVaeEncoder::new(vb, &vae_cfg.kl).map_err(|e| format!("vae encoder: {e}"))?)),
            )
        };
        Ok(Pipeline {
            tokenizer,
            clip,
            max_tokens: clip_cfg.max_position_embeddings,
            bos,
            eos,
            pad,
            unet,
            unet_in,
            decoder,
            vae_blocks: vae_cfg.kl.block_out_channels.len(),
            encoder,
            vae_scale: vae_cfg.scaling_factor,
            shapes: (clip_cfg, unet_cfg, vae_cfg.kl),
            scheduler,
            device,
            dtype,
        })
    }

    /// The floating-point work of each stage for one `width × height` image ([`flops`]).
    pub fn flops(&self, width: u32, height: u32, guidance: bool) -> flops::StageFlops {
        let (clip, unet, vae) = &self.shapes;
        let f = self.vae_factor() as usize;
        let (h, w) = (height as usize, width as usize);
        let (dc, da) = flops::vae_decoder(vae, (h / f, w / f));
        let (ec, ea) = flops::vae_encoder(vae, (h, w));
        let texts = if guidance { 2.0 } else { 1.0 };
        flops::StageFlops {
            text_encoder: texts * flops::text_encoder(clip, self.max_tokens),
            unet_step: flops::unet(
                unet,
                self.unet_in,
                self.unet_in,
                (h / f, w / f),
                self.max_tokens,
                if guidance { 2 } else { 1 },
            ),
            vae_decode: dc + da,
            vae_encode: ec + ea,
        }
    }

    /// How many latent pixels one image pixel is (8 for SD's four-block VAE).
    fn vae_factor(&self) -> u32 {
        1 << (self.vae_blocks - 1)
    }

    /// Token ids for the text encoder: BOS, the text (cut to fit), EOS, padding; one row.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| format!("tokenizer: {e}"))?;
        let mut ids = vec![self.bos];
        ids.extend(enc.get_ids().iter().take(self.max_tokens - 2));
        ids.push(self.eos);
        ids.resize(self.max_tokens, self.pad);
        Ok(ids)
    }

    fn encode_text(&self, text: &str) -> Result<Tensor, GenError> {
        let ids = self.token_ids(text).map_err(GenError::Failed)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.clip.forward(&ids)?)
    }

    /// Image (`[1,3,h,w]` in [0, 255]) → the image in RGB bytes.
    fn to_image(&self, t: &Tensor) -> Result<RgbImage, GenError> {
        let (_, _, h, w) = t.dims4()?;
        let t = ((t.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let t = (t * 255.0)?.round()?.to_dtype(DType::U8)?.to_device(&Device::Cpu)?;
        let data = t.squeeze(0)?.permute((1, 2, 0))?.flatten_all()?.to_vec1::<u8>()?;
        RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| GenError::Failed("image size mismatch".into()))
    }

    /// Latents (scaled, `[1,4,h,w]`) → a rough RGB preview at latent resolution.
    fn preview(&self, lat: &Tensor) -> Result<RgbImage, GenError> {
        // Linear factors from SD 1.x/2.x latents to RGB (as previewers such as ComfyUI's use).
        const F: [[f32; 3]; 4] = [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ];
        let l = lat.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.squeeze(0)?;
        let (c, h, w) = l.dims3()?;
        let v = l.flatten_all()?.to_vec1::<f32>()?;
        let mut img = RgbImage::new(w as u32, h as u32);
        for y in 0..h {
            for x in 0..w {
                let mut rgb = [0f32; 3];
                for (k, f) in F.iter().enumerate().take(c.min(4)) {
                    let s = v[k * h * w + y * w + x];
                    for i in 0..3 {
                        rgb[i] += s * f[i];
                    }
                }
                let px = rgb.map(|u| (((u + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8);
                img.put_pixel(x as u32, y as u32, image::Rgb(px));
            }
        }
        Ok(img)
    }

    /// Runs one request for `count` images (seeds `seed`, `seed + 1`, …). `cancelled` is checked between steps.
    pub fn generate(
        &self,
        req: &Request,
        count: usize,
        cancelled: &dyn Fn() -> bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Vec<RgbImage>, GenError> {
        let f = self.vae_factor();
        if !req.width.is_multiple_of(f) || !req.height.is_multiple_of(f) {
            return Err(GenError::Failed(format!("width and height must be multiples of {f}")));
        }
        let cfg = req.guidance_scale > 1.0;
        let cond = self.encode_text(&req.prompt)?;
        let context = if cfg { Tensor::cat(&[self.encode_text(&req.negative_prompt)?, cond], 0)? } else { cond };
        on_event(Event::Encoded);
        let (lh, lw) = ((req.height / f) as usize, (req.width / f) as usize);
        let strength = if req.init_image.is_some() { req.strength } else { 1.0 };
        let plan = self.scheduler.plan(req.steps, strength);
        let init = match &req.init_image {
            Some(img) => {
                let x = Tensor::from_vec(
                    img.as_raw().clone(),
                    (img.height() as usize, img.width() as usize, 3),
                    &Device::Cpu,
                )?
                .permute((2, 0, 1))?
                .to_dtype(DType::F32)?;
                let x = ((x / 127.5)? - 1.0)?.unsqueeze(0)?.to_dtype(self.dtype)?.to_device(&self.device)?;
                let moments = match &self.encoder {
                    Encoder::Fast(e) => e.moments(&x)?,
                    Encoder::Reference(e) => e.moments(&x)?,
                };
                on_event(Event::ImageEncoded);
                Some(moments)
            }
            None => None,
        };
        let mut out = vec![];
        for i in 0..count {
            if cancelled() {
                return Err(GenError::Cancelled);
            }
            let mut noise = Noise::new(req.seed.wrapping_add(i as u64));
            let shape = (1, self.unet_in, lh, lw);
            let mut x = match &init {
                Some((mean, std)) => {
                    // The image's latents (a sample of the encoder's distribution), noised to the first σ.
                    let sample = (mean + (std * noise.tensor(shape, &self.device, self.dtype)?)?)?;
                    let lat = (sample * self.vae_scale)?;
                    (lat + (noise.tensor(shape, &self.device, self.dtype)? * plan[0].1)?)?
                }
                None => (noise.tensor(shape, &self.device, self.dtype)? * self.scheduler.init_sigma(plan[0].1))?,
            };
            for (s, &(t, sigma, next)) in plan.iter().enumerate() {
                if cancelled() {
                    return Err(GenError::Cancelled);
                }
                let scaled = (&x / (sigma * sigma + 1.0).sqrt())?;
                let input = if cfg { Tensor::cat(&[&scaled, &scaled], 0)? } else { scaled };
                let out = match &self.unet {
                    Unet::Fast(u) if u.usable() => u.forward(&input, t, &context)?,
                    Unet::Fast(_) => return Err(GenError::Failed("the fast UNet runs on the CPU in f32".into())),
                    Unet::Candle(u) => u.forward(&input, t, &context)?,
                };
                let out = if cfg {
                    let parts = out.chunk(2, 0)?;
                    (&parts[0] + ((&parts[1] - &parts[0])? * req.guidance_scale)?)?
                } else {
                    out
                };
                let x0 = if self.scheduler.v_prediction {
                    let c = sigma * sigma + 1.0;
                    ((&out * (-sigma / c.sqrt()))? + (&x / c)?)?
                } else {
                    (&x - (&out * sigma)?)?
                };
                // Euler: x += (x − x̂₀)/σ · (σ_next − σ); at σ_next = 0 this is x̂₀.
                x = if next == 0.0 { x0.clone() } else { (&x + ((&x - &x0)? * ((next - sigma) / sigma))?)? };
                let preview = self.preview(&x0)?;
                on_event(Event::Step { image: i, step: s + 1, steps: plan.len(), preview: &preview });
            }
            if cancelled() {
                return Err(GenError::Cancelled);
            }
            let z = (x / self.vae_scale)?;
            let img = match &self.decoder {
                Decoder::Fast(d) => d.decode_tiled(&z, vae_tile(), VAE_TILE_OVERLAP)?,
                Decoder::Reference(d) => d.decode(&z)?,
            };
            out.push(self.to_image(&img)?);
            on_event(Event::Decoded { image: i });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tiny random-weight checkpoints (tests, and `darkroom models make-tiny sd-turbo DIR`)
// ---------------------------------------------------------------------------------------------------------------

/// Writes a tiny random-weight checkpoint of the SD-Turbo architecture (diffusers layout, [`FILES`]): a 2-layer
/// CLIP, a 2-block UNet with cross-attention, a 2-block VAE (×2 rather than ×8), Euler with trailing timesteps,
/// and a byte-level BPE vocabulary of letters. It exercises every code path of the real pipeline in well under a
/// second; its images are noise. The bytes are the same on every call.
pub fn write_tiny_checkpoint(dir: &Path) -> Result<(), String> {
    use candle_nn::VarMap;
    let e = |e: candle_core::Error| e.to_string();
    let io = |e: std::io::Error| e.to_string();
    for sub in ["text_encoder", "unet", "vae", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io)?;
    }
    let write =
        |name: &str, v: Value| std::fs::write(dir.join(name), serde_json::to_vec_pretty(&v).unwrap()).map_err(io);
    // Tokenizer: every byte-level character alone and as a word end, a few merges, the special tokens.
    let mut vocab = serde_json::Map::new();
    let mut add = |t: String| {
        let n = vocab.len();
        vocab.entry(t).or_insert(json!(n));
    };
    add("!".into());
    for c in ('a'..='z').chain('0'..='9') {
        add(c.to_string());
        add(format!("{c}</w>"));
    }
    for m in ["th", "the</w>", "ca", "cat</w>"] {
        add(m.into());
    }
    add("<|startoftext|>".into());
    add("<|endoftext|>".into());
    let vocab_size = vocab.len();
    write("tokenizer/vocab.json", Value::Object(vocab))?;
    std::fs::write(dir.join("tokenizer/merges.txt"), "#version: 0.2\nt h\nth e</w>\nc a\nca t</w>\n").map_err(io)?;
    write(
        "tokenizer/special_tokens_map.json",
        json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}),
    )?;
    write(
        "scheduler/scheduler_config.json",
        json!({"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
               "timestep_spacing": "trailing", "steps_offset": 1}),
    )?;
    let clip = json!({"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu"});
    let unet = json!({"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                      "attention_head_dim": [2, 4], "cross_attention_dim": 32, "layers_per_block": 1,
                      "norm_num_groups": 32, "use_linear_projection": true, "in_channels": 4, "out_channels": 4});
    let vae = json!({"block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 4,
                     "norm_num_groups": 8, "scaling_factor": 0.18215});
    write("text_encoder/config.json", clip.clone())?;
    write("unet/config.json", unet.clone())?;
    write("vae/config.json", vae.clone())?;
    // Random weights drawn from Darkroom's seeded generator, so the checkpoint is the same bytes on every call.
    let dev = Device::Cpu;
    let save = |vm: &VarMap, name: &str| -> Result<(), String> {
        let mut noise = Noise::new(name.len() as u64);
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for n in names {
            let var = &data[n];
            let t = var.as_tensor();
            let v = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(e)?;
            // Constant initialisations (norm scales, biases) stay; random ones become N(0, 1/fan_in).
            let constant = v.iter().all(|x| *x == v[0]);
            let fan_in = t.elem_count() / t.dims().first().copied().unwrap_or(1).max(1);
            let std = 1.0 / (fan_in.max(1) as f32).sqrt();
            let fresh: Vec<f32> = v.iter().map(|x| if constant { *x } else { std * noise.normal() }).collect();
            var.set(&Tensor::from_vec(fresh, t.shape(), &dev).map_err(e)?).map_err(e)?;
        }
        drop(data);
        vm.save(dir.join(name)).map_err(e)
    };
    let vm = VarMap::new();
    ClipText::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &ClipConfig::from_json(&clip)?).map_err(e)?;
    save(&vm, "text_encoder/model.safetensors")?;
    let vm = VarMap::new();
    let (ucfg, i, o) = unet_config(&unet)?;
    UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), i, o, false, ucfg).map_err(e)?;
    save(&vm, "unet/diffusion_pytorch_model.safetensors")?;
    let vm = VarMap::new();
    let vcfg = vae_config(&vae)?;
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    AutoEncoderKL::new(vb.clone(), 3, 3, vcfg.kl.clone()).map_err(e)?;
    VaeEncoder::new(vb, &vcfg.kl).map_err(e)?;
    save(&vm, "vae/diffusion_pytorch_model.safetensors")
}

/// Writes SD-Turbo's own configs (stabilityai/sd-turbo's `text_encoder`, `unet`, `vae` and `scheduler` config.json,
/// the fields the pipeline reads) over a tiny checkpoint: with [`Pipeline::with_zero_weights`] that is the full
/// compute of the real model without its 2.6 GB of weights (tests of the real shapes, `darkroom bench diffusion`).
pub fn write_sd_turbo_architecture(dir: &Path) -> Result<(), String> {
    write_tiny_checkpoint(dir)?;
    let w = |n: &str, v: Value| {
        std::fs::write(dir.join(n), serde_json::to_vec_pretty(&v).expect("serialises")).map_err(|e| e.to_string())
    };
    w(
        "text_encoder/config.json",
        json!({"architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024,
               "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
               "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512, "vocab_size": 49408}),
    )?;
    w(
        "unet/config.json",
        json!({"_class_name": "UNet2DConditionModel", "attention_head_dim": [5, 10, 20, 20],
               "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
               "cross_attention_dim": 1024,
               "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"],
               "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
               "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
               "out_channels": 4, "sample_size": 64, "use_linear_projection": true,
               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}),
    )?;
    w(
        "vae/config.json",
        json!({"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "in_channels": 3,
               "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
               "sample_size": 768, "scaling_factor": 0.18215}),
    )?;
    w(
        "scheduler/scheduler_config.json",
        json!({"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
               "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "trailing"}),
    )
}

// ---------------------------------------------------------------------------------------------------------------
// The app
// ---------------------------------------------------------------------------------------------------------------

/// The built-in SD-Turbo app. Weights: the model store's `sd-turbo` (from the hub) unless
/// `DARKROOM_SD_TURBO_MODEL` names another model with the same files (a fine-tune registered with
/// `darkroom models add ID --base sd-turbo --from DIR`).
pub struct SdTurbo {
    store: Option<ModelStore>,
    loaded: Mutex<Option<Arc<Pipeline>>>,
}

impl SdTurbo {
    pub fn new() -> Self {
        SdTurbo { store: None, loaded: Mutex::new(None) }
    }
    /// Uses this store instead of the environment's (tests).
    pub fn with_store(store: ModelStore) -> Self {
        SdTurbo { store: Some(store), loaded: Mutex::new(None) }
    }
    /// Uses an already loaded pipeline (tests).
    pub fn with_pipeline(p: Pipeline) -> Self {
        SdTurbo { store: None, loaded: Mutex::new(Some(Arc::new(p))) }
    }
    fn pipeline(&self) -> Result<Arc<Pipeline>, ModelError> {
        self.loaded.lock().unwrap().clone().ok_or_else(|| ModelError::app(500, "the model is not loaded"))
    }
}

impl Default for SdTurbo {
    fn default() -> Self {
        Self::new()
    }
}

/// Encodes an output image (JPEG at `quality`, or PNG).
pub fn encode_image(img: &RgbImage, format: OutputFormat, quality: u8) -> Result<Vec<u8>, String> {
    let mut out = vec![];
    match format {
        OutputFormat::Png => {
            img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut out)).map_err(|e| e.to_string())?
        }
        OutputFormat::Jpeg => img
            .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality))
            .map_err(|e| e.to_string())?,
    }
    Ok(out)
}

/// The output size for a request: `image_size`, else the input image's size (image-to-image, fitted within
/// [`MAX_SIDE`] and rounded down to multiples of 8), else 512×512.
fn output_size(input: &SdTurboInput, init: Option<(u32, u32)>) -> Result<(u32, u32), ModelError> {
    if let Some(size) = input.image_size {
        let (w, h) = size.dims();
        for (name, v) in [("width", w), ("height", h)] {
            if !(MIN_SIDE..=MAX_SIDE).contains(&v) || !v.is_multiple_of(8) {
                return Err(ModelError::App {
                    status: 422,
                    body: json!({"detail": [{"loc": ["body", "image_size", name],
                        "msg": format!("{name} must be a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}, got {v}"),
                        "type": "value_error"}]}),
                });
            }
        }
        return Ok((w, h));
    }
    let Some((w, h)) = init else { return Ok((512, 512)) };
    let scale = (MAX_SIDE as f64 / w.max(h) as f64).min(1.0);
    let fit = |v: u32| (((v as f64 * scale) as u32) / 8 * 8).max(MIN_SIDE);
    Ok((fit(w), fit(h)))
}

#[async_trait]
impl Model for SdTurbo {
    fn spec(&self) -> AppSpec {
        let knobs = darkroom_core::scaling::ScalingKnobs {
            min_concurrency: 0,
            max_concurrency: 1,
            max_multiplexing: 1,
            keep_alive: 300,
            // The UNet and VAE use every core they get.
            cpu_threads: 64,
            ..Default::default()
        };
        let mut spec = crate::builtin_spec::<SdTurboInput, SdTurboOutput>(
            APP_ID,
            "SD-Turbo",
            "Text-to-image and image-to-image (`/image-to-image`) with Stability AI's SD-Turbo (Stable Diffusion 2.1 \
             distilled to 1-4 steps), in Rust on candle; CUDA when built with it. Same seed and input, same image. \
             Progress per step, and a preview image per step on /stream. No safety checker ships: outputs are not \
             screened and no NSFW result is reported. Slow on CPU (about 35 s per 512x512 image in one step on 2 \
             cores).",
            knobs,
            true,
        );
        spec.paths = vec![String::new(), IMAGE_TO_IMAGE.into()];
        let mut spec = crate::with_catalog(
            spec,
            "text-to-image",
            &["stable-diffusion", "sd-turbo", "text-to-image", "image-to-image", "fast"],
            Some("LicenseRef-stability-ai-community"),
            vec![(
                "A photo",
                json!({"prompt": "a photo of a red fox in the snow, golden hour", "num_inference_steps": 1,
                       "seed": 42}),
            )],
            darkroom_core::billing::Billing {
                unit: darkroom_core::billing::BillingUnit::Megapixel,
                estimate: darkroom_core::billing::UnitEstimate::Unknown,
            },
        );
        spec.catalog.examples.push(darkroom_core::app::Example {
            path: IMAGE_TO_IMAGE.into(),
            title: "Restyle an image".into(),
            input: json!({"prompt": "a watercolor painting", "image_url": "https://example.com/photo.png",
                          "strength": 0.5, "num_inference_steps": 2}),
        });
        spec
    }

    async fn setup(&self, report: &SetupReporter) -> Result<(), String> {
        let store = self.store.clone().unwrap_or_else(ModelStore::from_env);
        let id = std::env::var("DARKROOM_SD_TURBO_MODEL")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| builtin::SD_TURBO.into());
        let installed = crate::store::pull_for_setup(&store, &id, report).await?;
        let device = pick_device();
        report.stage(SetupStage::Setup, format!("loading {id} on {device:?}"));
        let dir = installed.dir.clone();
        let loaded = tokio::task::spawn_blocking(move || Pipeline::from_dir(&dir, device))
            .await
            .map_err(|e| format!("app_setup_failed: {e}"))?
            .map_err(|e| format!("app_setup_failed: {id}: {e}"))?;
        *self.loaded.lock().unwrap() = Some(Arc::new(loaded));
        Ok(())
    }

    async fn run(&self, input: Value, ctx: RunContext) -> Result<Value, ModelError> {
        let input: SdTurboInput = serde_json::from_value(input).map_err(|e| ModelError::App {
            status: 422,
            body: json!({"detail": [{"loc": ["body"], "msg": e.to_string(), "type": "value_error"}]}),
        })?;
        let img2img = match ctx.path.trim_matches('/') {
            "" => false,
            IMAGE_TO_IMAGE => true,
            other => return Err(ModelError::app(404, format!("sd-turbo has no endpoint /{other}"))),
        };
        if input.prompt.trim().is_empty() {
            return Err(ModelError::field("prompt", "the prompt is empty"));
        }
        if !img2img && input.image_url.is_some() {
            return Err(ModelError::field(
                "image_url",
                "image_url is for the image-to-image endpoint (/image-to-image); this one draws from text",
            ));
        }
        if !(input.strength > 0.0 && input.strength <= 1.0) {
            return Err(ModelError::field("strength", "strength must be above 0 and at most 1"));
        }
        if input.enable_safety_checker == Some(true) {
            ctx.log("WARNING", "enable_safety_checker is ignored: Darkroom ships no safety checker");
        }
        let init = if img2img {
            let url = input.image_url.as_deref().ok_or_else(|| {
                ModelError::field("image_url", "the image-to-image endpoint needs image_url, the starting image")
            })?;
            ctx.progress(0.0, Some("fetching the image".into()));
            let fetched = ctx.fetch_input("image_url", url).await?;
            let data = fetched.data;
            let img = tokio::task::spawn_blocking(move || crate::image_utils::decode(&data).map(|(i, _)| i))
                .await
                .map_err(|e| ModelError::app(500, e.to_string()))??;
            Some(img)
        } else {
            None
        };
        let (width, height) = output_size(&input, init.as_ref().map(|i| (i.width(), i.height())))?;
        let pipeline = self.pipeline()?;
        let seed = input.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
        let init_image = init.map(|i| {
            let rgb = i.into_rgb8();
            if rgb.dimensions() == (width, height) {
                rgb
            } else {
                image::imageops::resize(&rgb, width, height, image::imageops::FilterType::Lanczos3)
            }
        });
        let req = Request {
            prompt: input.prompt.clone(),
            negative_prompt: input.negative_prompt.clone(),
            width,
            height,
            steps: input.num_inference_steps as usize,
            guidance_scale: input.guidance_scale,
            seed,
            init_image,
            strength: input.strength,
        };
        let count = input.num_images as usize;
        ctx.log(
            "INFO",
            format!(
                "{} {width}x{height}, {} step(s), {count} image(s), seed {seed}",
                if img2img { "image-to-image" } else { "text-to-image" },
                req.steps
            ),
        );
        let started = Instant::now();
        let (c1, c2) = (ctx.clone(), ctx.clone());
        let images = tokio::task::spawn_blocking(move || {
            let total = (count * (req.steps + 1)) as f64;
            let mut on_event = |ev: Event| match ev {
                Event::Encoded => c2.progress(0.02, Some("prompt encoded".into())),
                Event::ImageEncoded => c2.progress(0.03, Some("image encoded".into())),
                Event::Step { image, step, steps, preview } => {
                    let done = (image * (steps + 1) + step) as f64;
                    c2.progress(0.02 + 0.96 * done / total, Some(format!("image {} step {step}/{steps}", image + 1)));
                    let big = image::imageops::resize(
                        preview,
                        preview.width() * 2,
                        preview.height() * 2,
                        image::imageops::FilterType::Nearest,
                    );
                    if let Ok(jpeg) = encode_image(&big, OutputFormat::Jpeg, 70) {
                        c2.partial(json!({
                            "preview": true,
                            "image_index": image,
                            "step": step,
                            "num_inference_steps": steps,
                            "images": [{"url": crate::files::data_uri("image/jpeg", &jpeg),
                                        "content_type": "image/jpeg", "width": big.width(), "height": big.height()}],
                        }));
                    }
                }
                Event::Decoded { image } => {
                    let done = ((image + 1) * (req.steps + 1)) as f64;
                    c2.progress(0.02 + 0.96 * done / total, Some(format!("image {} decoded", image + 1)));
                }
            };
            pipeline.generate(&req, count, &|| c1.cancel.is_cancelled(), &mut on_event)
        })
        .await
        .map_err(|e| ModelError::app(500, e.to_string()))?
        .map_err(|e| match e {
            GenError::Cancelled => ModelError::Cancelled,
            GenError::Failed(m) => ModelError::app(500, format!("generation failed: {m}")),
        })?;
        let inference = started.elapsed().as_secs_f64();
        let mut files = vec![];
        for (i, img) in images.iter().enumerate() {
            let data = encode_image(img, input.output_format, 90)
                .map_err(|e| ModelError::app(500, format!("could not encode the image: {e}")))?;
            let name = format!("image-{i}.{}", input.output_format.extension());
            files.push(
                ctx.output_file(
                    bytes::Bytes::from(data),
                    input.output_format.content_type(),
                    &name,
                    Some((width, height)),
                )
                .await?,
            );
        }
        ctx.progress(1.0, None);
        ctx.bill(f64::from(width) * f64::from(height) * count as f64 / 1e6);
        let out = SdTurboOutput { images: files, seed, prompt: input.prompt, timings: Timings { inference } };
        Ok(serde_json::to_value(out).expect("serialises"))
    }
}

pub mod flops;
mod unet;

#[cfg(test)]
mod tests;
