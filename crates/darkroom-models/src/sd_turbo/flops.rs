//! The floating-point work of each stage, counted from the architecture: two FLOPs per multiply-add of every
//! convolution, linear layer and attention product (normalisations, activations and other element-wise work are
//! left out, as they are in the usual FLOP counts). The benchmark divides these by the measured times to say how
//! close each stage runs to the machine's matrix-multiply peak.

use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModelConfig;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;

use super::ClipConfig;

/// FLOPs per stage of one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageFlops {
    pub text_encoder: f64,
    /// One UNet evaluation (both halves when classifier-free guidance doubles the batch).
    pub unet_step: f64,
    pub vae_decode: f64,
    /// Image-to-image only.
    pub vae_encode: f64,
}

/// A k×k convolution at its output size.
pub(super) fn conv(ci: usize, co: usize, k: usize, (h, w): (usize, usize)) -> f64 {
    2.0 * (ci * co * k * k * h * w) as f64
}

fn linear(n: usize, din: usize, dout: usize) -> f64 {
    2.0 * (n * din * dout) as f64
}

/// Scores and the weighted sum: two `n × m × d` products.
fn attention(n: usize, m: usize, d: usize) -> f64 {
    4.0 * (n * m * d) as f64
}

/// CLIP's text transformer over `n` tokens.
pub(super) fn text_encoder(c: &ClipConfig, n: usize) -> f64 {
    let (d, i) = (c.hidden_size, c.intermediate_size);
    c.num_hidden_layers as f64 * (4.0 * linear(n, d, d) + linear(n, d, i) + linear(n, i, d) + attention(n, n, d))
}

/// The resnet's two 3×3 convolutions, its 1×1 shortcut when the width changes, and its time-embedding projection.
fn resnet(ci: usize, co: usize, size: (usize, usize), temb: Option<usize>) -> f64 {
    conv(ci, co, 3, size)
        + conv(co, co, 3, size)
        + if ci != co { conv(ci, co, 1, size) } else { 0.0 }
        + temb.map_or(0.0, |t| linear(1, t, co))
}

/// diffusers' `Transformer2DModel` at width `d`: projections in and out, then `depth` blocks of self-attention,
/// cross-attention to `ctx_len × ctx_dim` text states and a GEGLU feed-forward (×4).
fn transformer(d: usize, (h, w): (usize, usize), depth: usize, ctx_len: usize, ctx_dim: usize) -> f64 {
    let n = h * w;
    let block = 4.0 * linear(n, d, d)
        + attention(n, n, d)
        + 2.0 * linear(n, d, d)
        + 2.0 * linear(ctx_len, ctx_dim, d)
        + attention(n, ctx_len, d)
        + linear(n, d, 8 * d)
        + linear(n, 4 * d, d);
    2.0 * linear(n, d, d) + depth as f64 * block
}

/// One evaluation of the conditional UNet on a `batch × in × h × w` latent, walked as candle builds it.
pub(super) fn unet(
    c: &UNet2DConditionModelConfig,
    cin: usize,
    cout: usize,
    (h, w): (usize, usize),
    ctx_len: usize,
    batch: usize,
) -> f64 {
    let c0 = c.blocks[0].out_channels;
    let temb = Some(4 * c0);
    let mut size = (h, w);
    let mut f = conv(cin, c0, 3, size) + linear(1, c0, 4 * c0) + linear(1, 4 * c0, 4 * c0);
    let mut skips = vec![c0];
    let mut sizes = vec![size];
    let mut ch = c0;
    let n = c.blocks.len();
    for (i, b) in c.blocks.iter().enumerate() {
        for _ in 0..c.layers_per_block {
            f += resnet(ch, b.out_channels, size, temb);
            ch = b.out_channels;
            if let Some(depth) = b.use_cross_attn {
                f += transformer(ch, size, depth, ctx_len, c.cross_attention_dim);
            }
            skips.push(ch);
            sizes.push(size);
        }
        if i + 1 < n {
            size = (size.0.div_ceil(2), size.1.div_ceil(2));
            f += conv(ch, ch, 3, size);
            skips.push(ch);
            sizes.push(size);
        }
    }
    let last = c.blocks[n - 1];
    f += 2.0 * resnet(ch, ch, size, temb)
        + transformer(ch, size, last.use_cross_attn.unwrap_or(1), ctx_len, c.cross_attention_dim);
    for i in 0..n {
        let b = c.blocks[n - 1 - i];
        for _ in 0..c.layers_per_block + 1 {
            let skip = skips.pop().expect("a skip per up-block resnet");
            f += resnet(ch + skip, b.out_channels, size, temb);
            ch = b.out_channels;
            if let Some(depth) = b.use_cross_attn {
                f += transformer(ch, size, depth, ctx_len, c.cross_attention_dim);
            }
            sizes.pop();
        }
        if i + 1 < n {
            size = *sizes.last().expect("the next block's size");
            f += conv(ch, ch, 3, size);
        }
    }
    (f + conv(c0, cout, 3, size)) * batch as f64
}

/// The VAE decoder on an `h × w` latent: (convolutions, the mid-block attention).
pub(super) fn vae_decoder(c: &AutoEncoderKLConfig, (h, w): (usize, usize)) -> (f64, f64) {
    let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
    let lat = c.latent_channels;
    let mut size = (h, w);
    let mut f = if c.use_post_quant_conv { conv(lat, lat, 1, size) } else { 0.0 };
    f += conv(lat, rev[0], 3, size) + 2.0 * resnet(rev[0], rev[0], size, None);
    let attn = 4.0 * linear(h * w, rev[0], rev[0]) + attention(h * w, h * w, rev[0]);
    let mut ch = rev[0];
    for (i, &out) in rev.iter().enumerate() {
        for _ in 0..c.layers_per_block + 1 {
            f += resnet(ch, out, size, None);
            ch = out;
        }
        if i + 1 < rev.len() {
            size = (2 * size.0, 2 * size.1);
            f += conv(ch, ch, 3, size);
        }
    }
    (f + conv(ch, 3, 3, size), attn)
}

/// The VAE encoder on an `h × w` image: (convolutions, the mid-block attention).
pub(super) fn vae_encoder(c: &AutoEncoderKLConfig, (h, w): (usize, usize)) -> (f64, f64) {
    let ch = &c.block_out_channels;
    let mut size = (h, w);
    let mut f = conv(3, ch[0], 3, size);
    let mut cur = ch[0];
    for (i, &out) in ch.iter().enumerate() {
        for _ in 0..c.layers_per_block {
            f += resnet(cur, out, size, None);
            cur = out;
        }
        if i + 1 < ch.len() {
            size = (size.0 / 2, size.1 / 2);
            f += conv(cur, cur, 3, size);
        }
    }
    f += 2.0 * resnet(cur, cur, size, None);
    let n = size.0 * size.1;
    let attn = 4.0 * linear(n, cur, cur) + attention(n, n, cur);
    let lat2 = 2 * c.latent_channels;
    f += conv(cur, lat2, 3, size) + if c.use_quant_conv { conv(lat2, lat2, 1, size) } else { 0.0 };
    (f, attn)
}

/// The best rate (GFLOP/s) of three `n × n` by `n × n` matrix products in `dtype` on the CPU with candle's matmul
/// (the `gemm` crate, on candle's thread count): the machine's practical peak the stages are measured against.
pub fn matmul_gflops(dtype: candle_core::DType, n: usize) -> candle_core::Result<f64> {
    let dev = candle_core::Device::Cpu;
    let a = candle_core::Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(dtype)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(dtype)?;
    a.matmul(&b)?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        a.matmul(&b)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

/// [`matmul_gflops`] at 2048 in f32, f16 and bf16 (the reduced-precision rates of the same kernels).
pub fn matmul_peaks() -> Result<[f64; 3], String> {
    use candle_core::DType;
    let f = |d| matmul_gflops(d, 2048).map_err(|e| e.to_string());
    Ok([f(DType::F32)?, f(DType::F16)?, f(DType::BF16)?])
}
