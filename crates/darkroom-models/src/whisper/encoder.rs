//! Whisper's audio encoder on plain f32 buffers, for the CPU: token-major activations (`[frames, d]`, as linear
//! layers want them), every product a `gemm` call on the weights in place, bias and residual folded into the
//! products, and [`crate::conv::attention`] for the 1500 × 1500 self-attention (its score tensor never exists).
//! Same weights and the same arithmetic as OpenAI's encoder, with exact (erf) GELU, where candle's encoder uses the
//! tanh approximation and materialises the scores.

use candle_core::Result;
use candle_nn::VarBuilder;

use super::layers::{LayerNorm, Linear, gelu, parallelism};
use crate::conv::attention;

/// A kernel-3, padding-1 convolution over time, `[o, i, 3]` weights.
struct Conv1d {
    w: Vec<f32>,
    b: Vec<f32>,
    o: usize,
    i: usize,
}

impl Conv1d {
    fn load(i: usize, o: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Conv1d {
            w: vb.get((o, i, 3), "weight")?.flatten_all()?.to_vec1::<f32>()?,
            b: vb.get(o, "bias")?.to_vec1::<f32>()?,
            o,
            i,
        })
    }

    /// `xp` is the input, token-major, with one zero row before and after (`[frames + 2, i]`); the result is
    /// `[frames / stride, o]`: three products over row-shifted views of `xp`, one per tap, each reading its
    /// `[i, o]` slice of the weights in place through strides.
    fn apply(&self, xp: &[f32], frames: usize, stride: usize, y: &mut [f32]) {
        let n = frames / stride;
        assert!(xp.len() == (frames + 2) * self.i && y.len() == n * self.o, "conv1d shapes");
        for row in y.chunks_exact_mut(self.o) {
            row.copy_from_slice(&self.b);
        }
        for k in 0..3 {
            // SAFETY: output row t reads input rows stride·t + k ≤ frames + 1 of the padded buffer; W[o, c, k] is at
            // (o·i + c)·3 + k.
            unsafe {
                gemm::gemm(
                    n,
                    self.o,
                    self.i,
                    y.as_mut_ptr(),
                    1,
                    self.o as isize,
                    true,
                    xp.as_ptr().add(k * self.i),
                    1,
                    (stride * self.i) as isize,
                    self.w.as_ptr().add(k),
                    (3 * self.i) as isize,
                    3,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
        }
    }
}

struct Layer {
    attn_ln: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    mlp_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Whisper's audio encoder (`model.encoder.*` weights).
pub(crate) struct Encoder {
    conv1: Conv1d,
    conv2: Conv1d,
    /// `[max_source_positions, d]` sinusoids, as OpenAI's (and candle's) encoder computes them.
    pos: Vec<f32>,
    layers: Vec<Layer>,
    ln_post: LayerNorm,
    d: usize,
    heads: usize,
    mels: usize,
}

impl Encoder {
    pub(crate) fn load(vb: VarBuilder, cfg: &candle_transformers::models::whisper::Config) -> Result<Self> {
        let d = cfg.d_model;
        let layers = (0..cfg.encoder_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                let a = vb.pp("self_attn");
                Ok(Layer {
                    attn_ln: LayerNorm::load(d, vb.pp("self_attn_layer_norm"))?,
                    q: Linear::load(d, d, true, a.pp("q_proj"))?,
                    k: Linear::load(d, d, false, a.pp("k_proj"))?,
                    v: Linear::load(d, d, true, a.pp("v_proj"))?,
                    out: Linear::load(d, d, true, a.pp("out_proj"))?,
                    mlp_ln: LayerNorm::load(d, vb.pp("final_layer_norm"))?,
                    fc1: Linear::load(d, 4 * d, true, vb.pp("fc1"))?,
                    fc2: Linear::load(4 * d, d, true, vb.pp("fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder {
            conv1: Conv1d::load(cfg.num_mel_bins, d, vb.pp("conv1"))?,
            conv2: Conv1d::load(d, d, vb.pp("conv2"))?,
            pos: sinusoids(cfg.max_source_positions, d),
            layers,
            ln_post: LayerNorm::load(d, vb.pp("layer_norm"))?,
            d,
            heads: cfg.encoder_attention_heads,
            mels: cfg.num_mel_bins,
        })
    }

    /// Encodes `frames` mel frames (`mel` is `[mels, stride]` channel-major, the window starting at column
    /// `start`); the result is `[frames / 2, d]`.
    pub(crate) fn forward(&self, mel: &[f32], stride: usize, start: usize, frames: usize) -> Result<Vec<f32>> {
        let (d, c) = (self.d, self.mels);
        let n = frames / 2;
        if n > self.pos.len() / d || start + frames > stride || mel.len() < c * stride {
            candle_core::bail!("{frames} frames at {start} do not fit the encoder");
        }
        // Token-major, zero-padded input: row t + 1 holds frame start + t.
        let mut xp = vec![0f32; (frames + 2) * c];
        for ch in 0..c {
            for (t, &v) in mel[ch * stride + start..ch * stride + start + frames].iter().enumerate() {
                xp[(t + 1) * c + ch] = v;
            }
        }
        let mut h1 = vec![0f32; (frames + 2) * d];
        self.conv1.apply(&xp, frames, 1, &mut h1[d..(frames + 1) * d]);
        gelu(&mut h1[d..(frames + 1) * d]);
        let mut x = vec![0f32; n * d];
        self.conv2.apply(&h1, frames, 2, &mut x);
        drop(h1);
        gelu(&mut x);
        x.iter_mut().zip(&self.pos).for_each(|(x, p)| *x += p);
        let mut h = vec![0f32; n * d];
        let (mut q, mut k, mut v) = (vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n * d]);
        let mut ff = vec![0f32; n * 4 * d];
        let dh = d / self.heads;
        // OpenAI scales q and k by dh^-1/4 each; one dh^-1/2 on the scores is the same product.
        let scale = (dh as f32).powf(-0.5);
        for l in &self.layers {
            l.attn_ln.apply(&x, &mut h);
            l.q.apply(&h, n, &mut q, false);
            l.k.apply(&h, n, &mut k, false);
            l.v.apply(&h, n, &mut v, false);
            let a = attention(&q, &k, &v, (n, n), (self.heads, dh), scale);
            l.out.apply(&a, n, &mut x, true);
            l.mlp_ln.apply(&x, &mut h);
            l.fc1.apply(&h, n, &mut ff, false);
            gelu(&mut ff);
            l.fc2.apply(&ff, n, &mut x, true);
        }
        self.ln_post.apply(&x, &mut h);
        Ok(h)
    }
}

/// OpenAI's positional sinusoids: `[length, channels]`, sines then cosines.
fn sinusoids(length: usize, channels: usize) -> Vec<f32> {
    let half = channels / 2;
    let inc = 10000f32.ln() / (half.max(2) - 1) as f32;
    let inv: Vec<f32> = (0..half).map(|i| (i as f32 * -inc).exp()).collect();
    let mut out = vec![0f32; length * channels];
    for (t, row) in out.chunks_exact_mut(channels).enumerate() {
        for (i, &f) in inv.iter().enumerate() {
            let a = t as f32 * f;
            row[i] = a.sin();
            row[half + i] = a.cos();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;
    use candle_transformers::models::whisper::model::Whisper;

    /// The fused encoder computes what candle's encoder computes (up to candle's tanh-approximated GELU), on a
    /// window that starts inside a longer mel.
    #[test]
    fn the_fast_encoder_equals_candles() {
        let cfg = crate::whisper::tests::tiny_config();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let mut net = Whisper::load(&vb, cfg.clone()).unwrap();
        crate::whisper::tests::randomize(&vm);
        let enc = Encoder::load(vb.pp("model.encoder"), &cfg).unwrap();
        let (mels, total, start, frames) = (cfg.num_mel_bins, 3400, 200, 3000);
        let mel: Vec<f32> = (0..mels * total).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let got = enc.forward(&mel, total, start, frames).unwrap();
        let got = Tensor::from_vec(got, (1, frames / 2, cfg.d_model), &Device::Cpu).unwrap();
        let window = Tensor::from_vec(mel, (1, mels, total), &Device::Cpu).unwrap().narrow(2, start, frames).unwrap();
        let want = net.encoder.forward(&window, true).unwrap();
        assert_eq!(got.dims(), want.dims());
        let (got, want) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = got.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(scale > 0.1 && diff <= 1e-2 * scale, "max difference {diff} at scale {scale}");
    }
}
