//! The conditional UNet on the CPU with the fused kernels: resnets on [`crate::conv::Conv`] (group norm + SiLU in
//! the input copy, the time embedding in the bias, the skip connection added on output), transformers with
//! [`crate::conv::attention`] (no score tensor, no separate softmax pass), upsampling inside the next convolution.
//! It loads diffusers' (and candle's) weight names and computes what candle's `UNet2DConditionModel` computes, with
//! two differences where it follows diffusers instead: its GEGLU uses the exact GELU (candle's the tanh
//! approximation), and every resnet normalises in the config's `norm_num_groups` (candle's `DownBlock2D` and
//! `UpBlock2D` leave their resnets at 32 groups whatever the config says; SD's configs say 32). A test holds the two
//! within a tolerance on a 32-group checkpoint.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d::{BlockConfig, UNet2DConditionModelConfig};

use super::{Act, FastConv, Norm, VaeResnet};
use crate::conv::Prologue;

type R<T> = candle_core::Result<T>;

/// diffusers' `ResnetBlock2D` with a time embedding: the VAE's resnet with the projected embedding added after its
/// first convolution.
struct Resnet {
    core: VaeResnet,
    temb: Linear,
}

impl Resnet {
    fn new(vb: VarBuilder, cin: usize, cout: usize, temb: usize, c: &UNet2DConditionModelConfig) -> R<Self> {
        Ok(Resnet {
            core: VaeResnet::with_eps(vb.clone(), cin, cout, c.norm_num_groups, c.norm_eps, FastConv::fused)?,
            temb: candle_nn::linear(temb, cout, vb.pp("time_emb_proj"))?,
        })
    }

    /// `emb` is SiLU of the time embedding, `[1, temb]`.
    fn run(&self, x: &Act, emb: &Tensor) -> R<Act> {
        let t = self.temb.forward(emb)?.flatten_all()?.to_vec1::<f32>()?;
        self.core.run_biased(x, Some(&t))
    }
}

/// Multi-head attention over token-major `[n, d]` states.
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, d: usize, ctx: usize, heads: usize) -> R<Self> {
        Ok(Attention {
            q: candle_nn::linear_no_bias(d, d, vb.pp("to_q"))?,
            k: candle_nn::linear_no_bias(ctx, d, vb.pp("to_k"))?,
            v: candle_nn::linear_no_bias(ctx, d, vb.pp("to_v"))?,
            out: candle_nn::linear(d, d, vb.pp("to_out.0"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, ctx: Option<&Tensor>) -> R<Tensor> {
        let c = ctx.unwrap_or(x);
        let host = |t: Tensor| -> R<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
        let (n, d) = x.dims2()?;
        let m = c.dim(0)?;
        let dh = d / self.heads;
        let o = crate::conv::attention(
            &host(self.q.forward(x)?)?,
            &host(self.k.forward(c)?)?,
            &host(self.v.forward(c)?)?,
            (n, m),
            (self.heads, dh),
            1.0 / (dh as f32).sqrt(),
        );
        self.out.forward(&Tensor::from_vec(o, (n, d), x.device())?)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
struct Block {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl Block {
    fn new(vb: VarBuilder, d: usize, ctx: usize, heads: usize) -> R<Self> {
        Ok(Block {
            norm1: candle_nn::layer_norm(d, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), d, d, heads)?,
            norm2: candle_nn::layer_norm(d, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), d, ctx, heads)?,
            norm3: candle_nn::layer_norm(d, 1e-5, vb.pp("norm3"))?,
            ff_in: candle_nn::linear(d, 8 * d, vb.pp("ff.net.0.proj"))?,
            ff_out: candle_nn::linear(4 * d, d, vb.pp("ff.net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> R<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(ctx))? + &x)?;
        let h = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let parts = h.chunk(2, D::Minus1)?;
        self.ff_out.forward(&(&parts[0] * parts[1].gelu_erf()?)?)? + x
    }
}

/// diffusers' `Transformer2DModel` (candle's `SpatialTransformer`): group norm, projection to tokens, blocks,
/// projection back, plus the input. A 1×1-convolution projection (SD 1.x) is the same product as a linear one.
struct Transformer {
    norm: Norm,
    proj_in: Linear,
    blocks: Vec<Block>,
    proj_out: Linear,
}

impl Transformer {
    fn new(vb: VarBuilder, c: usize, depth: usize, heads: usize, cfg: &UNet2DConditionModelConfig) -> R<Self> {
        let proj = |name: &str| -> R<Linear> {
            let p = vb.pp(name);
            let w = if cfg.use_linear_projection { p.get((c, c), "weight")? } else { p.get((c, c, 1, 1), "weight")? };
            Ok(Linear::new(w.reshape((c, c))?, Some(p.get(c, "bias")?)))
        };
        let blocks = (0..depth)
            .map(|i| Block::new(vb.pp("transformer_blocks").pp(i.to_string()), c, cfg.cross_attention_dim, heads))
            .collect::<R<Vec<_>>>()?;
        Ok(Transformer {
            norm: Norm::new(vb.pp("norm"), cfg.norm_num_groups, c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    /// `ctx` is one image's text states, `[tokens, ctx_dim]`.
    fn run(&self, x: &Act, ctx: &Tensor) -> R<Act> {
        let (c, hw) = (x.c, x.h * x.w);
        let (scale, shift) = self.norm.factors(x);
        let mut tokens = vec![0f32; hw * c];
        for ch in 0..c {
            let (a, b) = (scale[ch], shift[ch]);
            for (p, &v) in x.data[ch * hw..(ch + 1) * hw].iter().enumerate() {
                tokens[p * c + ch] = v * a + b;
            }
        }
        let mut t = self.proj_in.forward(&Tensor::from_vec(tokens, (hw, c), ctx.device())?)?;
        for b in &self.blocks {
            t = b.forward(&t, ctx)?;
        }
        let t = self.proj_out.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
        let mut data = x.data.clone();
        for ch in 0..c {
            for (p, d) in data[ch * hw..(ch + 1) * hw].iter_mut().enumerate() {
                *d += t[p * c + ch];
            }
        }
        Ok(Act { c, h: x.h, w: x.w, data })
    }
}

struct Down {
    resnets: Vec<Resnet>,
    attns: Vec<Transformer>,
    downsample: Option<candle_nn::Conv2d>,
}

struct Up {
    resnets: Vec<Resnet>,
    attns: Vec<Transformer>,
    upsample: Option<FastConv>,
}

/// The UNet for one f32 image at a time on the CPU (a batch runs image by image).
pub(super) struct FastUnet {
    conv_in: FastConv,
    time_proj: Timesteps,
    time_emb: TimestepEmbedding,
    down: Vec<Down>,
    mid: (Resnet, Transformer, Resnet),
    up: Vec<Up>,
    norm_out: Norm,
    conv_out: FastConv,
    center: bool,
    downsample_padding: usize,
}

impl FastUnet {
    pub(super) fn new(vb: VarBuilder, cin: usize, cout: usize, c: &UNet2DConditionModelConfig) -> R<Self> {
        let n = c.blocks.len();
        let c0 = c.blocks[0].out_channels;
        let temb = 4 * c0;
        let mut skips = vec![c0];
        let mut ch = c0;
        // The transformer after resnet `j` of a block, in the blocks with cross-attention.
        let cross_attention = |v: &VarBuilder, j: usize, ch: usize, b: BlockConfig| -> R<Option<Transformer>> {
            b.use_cross_attn
                .map(|depth| Transformer::new(v.pp("attentions").pp(j.to_string()), ch, depth, b.attention_head_dim, c))
                .transpose()
        };
        let mut down = vec![];
        for (i, b) in c.blocks.iter().enumerate() {
            let v = vb.pp("down_blocks").pp(i.to_string());
            let (mut resnets, mut attns) = (vec![], vec![]);
            for j in 0..c.layers_per_block {
                resnets.push(Resnet::new(v.pp("resnets").pp(j.to_string()), ch, b.out_channels, temb, c)?);
                ch = b.out_channels;
                attns.extend(cross_attention(&v, j, ch, *b)?);
                skips.push(ch);
            }
            let downsample = if i + 1 < n {
                let cfg = candle_nn::Conv2dConfig { stride: 2, padding: c.downsample_padding, ..Default::default() };
                skips.push(ch);
                Some(candle_nn::conv2d(ch, ch, 3, cfg, v.pp("downsamplers").pp("0").pp("conv"))?)
            } else {
                None
            };
            down.push(Down { resnets, attns, downsample });
        }
        let last = c.blocks[n - 1];
        let m = vb.pp("mid_block");
        let mid = (
            Resnet::new(m.pp("resnets").pp("0"), ch, ch, temb, c)?,
            Transformer::new(
                m.pp("attentions").pp("0"),
                ch,
                last.use_cross_attn.unwrap_or(1),
                last.attention_head_dim,
                c,
            )?,
            Resnet::new(m.pp("resnets").pp("1"), ch, ch, temb, c)?,
        );
        let mut up = vec![];
        for i in 0..n {
            let b = c.blocks[n - 1 - i];
            let v = vb.pp("up_blocks").pp(i.to_string());
            let (mut resnets, mut attns) = (vec![], vec![]);
            for j in 0..c.layers_per_block + 1 {
                let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet skip channels".into()))?;
                resnets.push(Resnet::new(v.pp("resnets").pp(j.to_string()), ch + skip, b.out_channels, temb, c)?);
                ch = b.out_channels;
                attns.extend(cross_attention(&v, j, ch, b)?);
            }
            let upsample =
                if i + 1 < n { Some(FastConv::fused(v.pp("upsamplers").pp("0").pp("conv"), ch, ch, 3)?) } else { None };
            up.push(Up { resnets, attns, upsample });
        }
        Ok(FastUnet {
            conv_in: FastConv::fused(vb.pp("conv_in"), cin, c0, 3)?,
            time_proj: Timesteps::new(c0, c.flip_sin_to_cos, c.freq_shift),
            time_emb: TimestepEmbedding::new(vb.pp("time_embedding"), c0, temb)?,
            down,
            mid,
            up,
            norm_out: Norm::new(vb.pp("conv_norm_out"), c.norm_num_groups, c0, c.norm_eps)?,
            conv_out: FastConv::fused(vb.pp("conv_out"), c0, cout, 3)?,
            center: c.center_input_sample,
            downsample_padding: c.downsample_padding,
        })
    }

    /// Whether this UNet can run here (its convolutions were set up for the CPU in f32).
    pub(super) fn usable(&self) -> bool {
        self.conv_in.cpu.is_some()
    }

    /// `[b, c, h, w]` latents at `timestep`, `[b, tokens, ctx_dim]` text states → the model's output.
    pub(super) fn forward(&self, xs: &Tensor, timestep: f64, context: &Tensor) -> R<Tensor> {
        let dev = xs.device();
        let emb = (Tensor::ones(1, DType::F32, dev)? * timestep)?;
        let emb = candle_nn::ops::silu(&self.time_emb.forward(&self.time_proj.forward(&emb)?)?)?;
        let xs = if self.center { ((xs * 2.0)? - 1.0)? } else { xs.clone() };
        let outs = (0..xs.dim(0)?)
            .map(|i| self.one(&Act::from_tensor(&xs.narrow(0, i, 1)?)?, &emb, &context.get(i)?)?.to_tensor(dev))
            .collect::<R<Vec<_>>>()?;
        Tensor::cat(&outs, 0)
    }

    fn one(&self, x: &Act, emb: &Tensor, ctx: &Tensor) -> R<Act> {
        let dev = ctx.device();
        let mut x = self.conv_in.run(x, Prologue::Copy, None)?;
        let mut skips = vec![x.clone()];
        for d in &self.down {
            for (j, r) in d.resnets.iter().enumerate() {
                x = r.run(&x, emb)?;
                if let Some(t) = d.attns.get(j) {
                    x = t.run(&x, ctx)?;
                }
                skips.push(x.clone());
            }
            if let Some(conv) = &d.downsample {
                let mut t = x.to_tensor(dev)?;
                if self.downsample_padding == 0 {
                    t = t.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
                }
                x = Act::from_tensor(&t.apply(conv)?)?;
                skips.push(x.clone());
            }
        }
        x = self.mid.0.run(&x, emb)?;
        x = self.mid.1.run(&x, ctx)?;
        x = self.mid.2.run(&x, emb)?;
        for u in &self.up {
            for (j, r) in u.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet skips".into()))?;
                if (skip.h, skip.w) != (x.h, x.w) {
                    candle_core::bail!("UNet skip of {}x{} for {}x{}", skip.h, skip.w, x.h, x.w);
                }
                let mut data = x.data;
                data.extend_from_slice(&skip.data);
                x = r.run(&Act { c: x.c + skip.c, h: x.h, w: x.w, data }, emb)?;
                if let Some(t) = u.attns.get(j) {
                    x = t.run(&x, ctx)?;
                }
            }
            if let Some(conv) = &u.upsample {
                let (h, w) = skips.last().map_or((2 * x.h, 2 * x.w), |s| (s.h, s.w));
                x = if (h, w) == (2 * x.h, 2 * x.w) {
                    conv.run(&x, Prologue::Upsample, None)?
                } else {
                    // Odd sizes: upsample to the skip's size first, as diffusers does.
                    let t = x.to_tensor(dev)?.upsample_nearest2d(h, w)?;
                    conv.run(&Act::from_tensor(&t)?, Prologue::Copy, None)?
                };
            }
        }
        let (scale, shift) = self.norm_out.factors(&x);
        self.conv_out.run(&x, Prologue::NormSilu { scale: &scale, shift: &shift }, None)
    }
}
