//! Whisper's text decoder with key/value caches, on plain f32 buffers: the prompt is run once, then each step feeds
//! only the newest token (candle's decoder re-runs the whole sequence every step). Cross-attention keys and values
//! are computed once per window. Every product is a `gemm` call on the weights in place (a dot-product GEMV for one
//! token), so a step is a handful of passes over memory and no tensor dispatch. Same weights, same arithmetic as
//! OpenAI's (exact GELU).

use candle_core::Result;
use candle_nn::VarBuilder;

use super::layers::{LayerNorm, Linear, gelu, split};
use crate::conv::{SendPtr, softmax};

struct Attn {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

impl Attn {
    fn load(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Attn {
            q: Linear::load(d, d, true, vb.pp("q_proj"))?,
            k: Linear::load(d, d, false, vb.pp("k_proj"))?,
            v: Linear::load(d, d, true, vb.pp("v_proj"))?,
            o: Linear::load(d, d, true, vb.pp("out_proj"))?,
        })
    }
}

struct Layer {
    attn: Attn,
    attn_ln: LayerNorm,
    cross: Attn,
    cross_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    mlp_ln: LayerNorm,
}

/// Whisper's decoder (`model.decoder.*` weights).
pub(crate) struct Decoder {
    /// `[vocab, d]`: the token embedding, also the output projection (used as stored, never transposed).
    embed: Vec<f32>,
    /// `[max_target_positions, d]`.
    pos: Vec<f32>,
    layers: Vec<Layer>,
    ln: LayerNorm,
    heads: usize,
    d: usize,
    vocab: usize,
    ctx: usize,
}

/// Per-window state: each layer's self-attention keys/values so far (`[len, d]`) and its cross-attention
/// keys/values (`[frames, d]`).
pub(crate) struct State {
    self_k: Vec<Vec<f32>>,
    self_v: Vec<Vec<f32>>,
    cross_k: Vec<Vec<f32>>,
    cross_v: Vec<Vec<f32>>,
    frames: usize,
    pub(crate) len: usize,
}

impl Decoder {
    /// From the same weights candle's Whisper loads.
    pub(crate) fn load(vb: VarBuilder, cfg: &candle_transformers::models::whisper::Config) -> Result<Self> {
        let d = cfg.d_model;
        let layers = (0..cfg.decoder_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(Layer {
                    attn: Attn::load(d, vb.pp("self_attn"))?,
                    attn_ln: LayerNorm::load(d, vb.pp("self_attn_layer_norm"))?,
                    cross: Attn::load(d, vb.pp("encoder_attn"))?,
                    cross_ln: LayerNorm::load(d, vb.pp("encoder_attn_layer_norm"))?,
                    fc1: Linear::load(d, 4 * d, true, vb.pp("fc1"))?,
                    fc2: Linear::load(4 * d, d, true, vb.pp("fc2"))?,
                    mlp_ln: LayerNorm::load(d, vb.pp("final_layer_norm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let get = |shape: (usize, usize), name: &str| -> Result<Vec<f32>> {
            vb.get(shape, name)?.flatten_all()?.to_vec1::<f32>()
        };
        Ok(Decoder {
            embed: get((cfg.vocab_size, d), "embed_tokens.weight")?,
            pos: get((cfg.max_target_positions, d), "embed_positions.weight")?,
            layers,
            ln: LayerNorm::load(d, vb.pp("layer_norm"))?,
            heads: cfg.decoder_attention_heads,
            d,
            vocab: cfg.vocab_size,
            ctx: cfg.max_target_positions,
        })
    }

    /// Cross-attention keys and values for encoder output `xa` (`[frames, d]`).
    pub(crate) fn start(&self, xa: &[f32], frames: usize) -> Result<State> {
        let d = self.d;
        if xa.len() != frames * d {
            candle_core::bail!("encoder output of {} floats for {frames} frames of {d}", xa.len());
        }
        let (mut cross_k, mut cross_v) = (vec![], vec![]);
        for l in &self.layers {
            let (mut k, mut v) = (vec![0f32; frames * d], vec![0f32; frames * d]);
            l.cross.k.apply(xa, frames, &mut k, false);
            l.cross.v.apply(xa, frames, &mut v, false);
            cross_k.push(k);
            cross_v.push(v);
        }
        let n = self.layers.len();
        Ok(State { self_k: vec![vec![]; n], self_v: vec![vec![]; n], cross_k, cross_v, frames, len: 0 })
    }

    /// Feeds `tokens` (the prompt first, then one token at a time) and returns the logits after the last one.
    pub(crate) fn step(&self, st: &mut State, tokens: &[u32]) -> Result<Vec<f32>> {
        let (d, n, past) = (self.d, tokens.len(), st.len);
        if n == 0 || past + n > self.ctx {
            candle_core::bail!("{n} tokens after {past} do not fit a context of {}", self.ctx);
        }
        let mut x = vec![0f32; n * d];
        for (i, (row, &t)) in x.chunks_exact_mut(d).zip(tokens).enumerate() {
            let t = t as usize;
            if t >= self.vocab {
                candle_core::bail!("token {t} is outside the vocabulary of {}", self.vocab);
            }
            let (e, p) = (&self.embed[t * d..(t + 1) * d], &self.pos[(past + i) * d..(past + i + 1) * d]);
            row.iter_mut().zip(e.iter().zip(p)).for_each(|(x, (e, p))| *x = e + p);
        }
        let (mut h, mut q, mut a) = (vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n * d]);
        let mut ff = vec![0f32; n * 4 * d];
        for (i, l) in self.layers.iter().enumerate() {
            l.attn_ln.apply(&x, &mut h);
            l.attn.q.apply(&h, n, &mut q, false);
            for (cache, lin) in [(&mut st.self_k[i], &l.attn.k), (&mut st.self_v[i], &l.attn.v)] {
                cache.resize((past + n) * d, 0.0);
                lin.apply(&h, n, &mut cache[past * d..], false);
            }
            attend(&q, &st.self_k[i], &st.self_v[i], (n, past + n), Some(past), (self.heads, d), &mut a);
            l.attn.o.apply(&a, n, &mut x, true);
            l.cross_ln.apply(&x, &mut h);
            l.cross.q.apply(&h, n, &mut q, false);
            attend(&q, &st.cross_k[i], &st.cross_v[i], (n, st.frames), None, (self.heads, d), &mut a);
            l.cross.o.apply(&a, n, &mut x, true);
            l.mlp_ln.apply(&x, &mut h);
            l.fc1.apply(&h, n, &mut ff, false);
            gelu(&mut ff);
            l.fc2.apply(&ff, n, &mut x, true);
        }
        st.len += n;
        let mut last = vec![0f32; d];
        self.ln.apply(&x[(n - 1) * d..], &mut last);
        Ok(self.logits(&last))
    }

    /// `embed × h`: one dot product per vocabulary entry, the rows shared among the threads (the 80 MB pass over
    /// the embedding is the largest cost of a step).
    fn logits(&self, h: &[f32]) -> Vec<f32> {
        let (d, vocab) = (self.d, self.vocab);
        let mut out = vec![0f32; vocab];
        let dst = SendPtr(out.as_mut_ptr());
        split(vocab, 1024, |r0, r1| {
            // SAFETY: rows r0..r1 of the [vocab, d] embedding, into their own entries of `out`.
            unsafe {
                gemm::gemm(
                    1,
                    r1 - r0,
                    d,
                    dst.get().add(r0),
                    1,
                    vocab as isize,
                    false,
                    h.as_ptr(),
                    1,
                    d as isize,
                    self.embed.as_ptr().add(r0 * d),
                    d as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
        out
    }

    /// Greedy argmax over a language subset, for detection.
    pub(crate) fn first_logits_argmax(&self, st: &mut State, sot: u32, subset: &[u32]) -> Result<u32> {
        let logits = self.step(st, &[sot])?;
        let mut best = (subset[0], f32::NEG_INFINITY);
        for &t in subset {
            if logits[t as usize] > best.1 {
                best = (t, logits[t as usize]);
            }
        }
        Ok(best.0)
    }
}

/// Softmax attention of `n` queries (`[n, d]`) over `m` keys and values (`[m, d]`) in `heads` heads, into `out`
/// (`[n, d]`). With `causal = Some(past)`, query `i` sees keys `..= past + i`. Per head: the scores as one product,
/// the softmax in place, the values as a second product. Heads are shared among the threads when the work is large
/// (cross-attention over 1500 frames).
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (n, m): (usize, usize),
    causal: Option<usize>,
    (heads, d): (usize, usize),
    out: &mut [f32],
) {
    assert!(q.len() >= n * d && k.len() >= m * d && v.len() >= m * d && out.len() >= n * d, "attention shapes");
    let dh = d / heads;
    let scale = (dh as f32).powf(-0.5);
    let dst = SendPtr(out.as_mut_ptr());
    let head = |h: usize, s: &mut Vec<f32>| {
        s.resize(n * m, 0.0);
        // SAFETY: head h reads columns h·dh .. (h+1)·dh of q, k, v and writes the same columns of `out`, inside the
        // asserted lengths; heads write disjoint columns.
        unsafe {
            gemm::gemm(
                n,
                m,
                dh,
                s.as_mut_ptr(),
                1,
                m as isize,
                false,
                q.as_ptr().add(h * dh),
                1,
                d as isize,
                k.as_ptr().add(h * dh),
                d as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (i, row) in s.chunks_exact_mut(m).enumerate() {
            let seen = causal.map_or(m, |past| (past + i + 1).min(m));
            let (row, hidden) = row.split_at_mut(seen);
            hidden.fill(0.0);
            softmax(row);
        }
        unsafe {
            gemm::gemm(
                n,
                dh,
                m,
                dst.get().add(h * dh),
                1,
                d as isize,
                false,
                s.as_ptr(),
                1,
                m as isize,
                v.as_ptr().add(h * dh),
                1,
                d as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    // Heads in contiguous groups, one per thread, when there is enough work (cross-attention over 1500 frames).
    let min = if n * m * d < (1 << 16) { heads } else { 1 };
    split(heads, min, |h0, h1| {
        let mut s = vec![];
        (h0..h1).for_each(|h| head(h, &mut s));
    });
}
