//! Convolutions as matrix products on the CPU, shared by the upscalers and SD-Turbo's VAE.

use candle_core::{Result as CResult, Tensor};

/// Floats of patch matrix per band in [`conv_gemm`] (16 MiB): bounds its memory whatever the tile size.
const GEMM_BAND_FLOATS: usize = 4 << 20;

/// A stride-1, ungrouped convolution of `[1, I, H, W]` as matrix products over bands of output rows: a band's input
/// patches are laid out as an `[I·kh·kw, rows·W]` matrix (im2col, zeros outside the image) and `matrix`
/// (`[O, I·kh·kw]`, the OIHW weights) times it is the band's output, already in channel-major order. Candle's own
/// conv2d spends most of its time copying and transposing around the same product (5x slower here for RDN's 5x5
/// 64-channel layer). The output has the input's size; no bias.
pub(crate) fn conv_gemm(
    x: &Tensor,
    matrix: &Tensor,
    kernel: (usize, usize),
    pad: [usize; 4],
    dilation: usize,
) -> CResult<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let k = matrix.dim(1)?;
    let rows = (GEMM_BAND_FLOATS / (k * w).max(1)).clamp(1, h.max(1));
    conv_gemm_rows(x, matrix, kernel, pad, dilation, rows)
}

/// [`conv_gemm`] with `rows` output rows per band.
pub(crate) fn conv_gemm_rows(
    x: &Tensor,
    matrix: &Tensor,
    (kh, kw): (usize, usize),
    pad: [usize; 4],
    dilation: usize,
    rows: usize,
) -> CResult<Tensor> {
    let (_, ci, h, w) = x.dims4()?;
    let (co, k) = matrix.dims2()?;
    if k != ci * kh * kw {
        candle_core::bail!("{ci} input channels for a {kh}x{kw} kernel of {k} taps");
    }
    if kh == 1 && kw == 1 && pad == [0; 4] {
        // A 1x1 convolution is the product with the image itself.
        return matrix.matmul(&x.reshape((ci, h * w))?)?.reshape((1, co, h, w));
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("the patch-matrix convolution runs on the CPU")
    };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("input not contiguous") };
    let data = &cpu.as_slice::<f32>()?[start..end];
    let (pt, pl) = (pad[0] as isize, pad[2] as isize);
    let rows = rows.max(1);
    let mut bands = Vec::with_capacity(h.div_ceil(rows));
    for y0 in (0..h).step_by(rows) {
        let y1 = (y0 + rows).min(h);
        let n = (y1 - y0) * w;
        let mut cols = vec![0f32; k * n];
        for i in 0..ci {
            for ky in 0..kh {
                for kx in 0..kw {
                    let r = (i * kh + ky) * kw + kx;
                    let shift = (kx * dilation) as isize - pl;
                    let lo = (-shift).max(0) as usize;
                    let hi = (w as isize - shift).min(w as isize).max(0) as usize;
                    if lo >= hi {
                        continue;
                    }
                    for y in y0..y1 {
                        let sy = (y + ky * dilation) as isize - pt;
                        if sy < 0 || sy >= h as isize {
                            continue;
                        }
                        let src = &data[(i * h + sy as usize) * w..(i * h + sy as usize + 1) * w];
                        let dst = &mut cols[r * n + (y - y0) * w..r * n + (y - y0 + 1) * w];
                        dst[lo..hi]
                            .copy_from_slice(&src[(lo as isize + shift) as usize..(hi as isize + shift) as usize]);
                    }
                }
            }
        }
        let cols = Tensor::from_vec(cols, (k, n), x.device())?;
        bands.push(matrix.matmul(&cols)?);
    }
    let y = if bands.len() == 1 { bands.pop().expect("one band") } else { Tensor::cat(&bands, 1)? };
    y.reshape((1, co, h, w))
}

// ---------------------------------------------------------------------------------------------------------------
// Fused convolutions on plain f32 buffers (SD-Turbo's VAE on the CPU)
// ---------------------------------------------------------------------------------------------------------------

thread_local! {
    static CONV_FLOPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// FLOPs (two per multiply-add) of the [`Conv::forward`] calls made on this thread so far (a test holds the
/// architecture's count, [`crate::sd_turbo::flops`], to it).
#[cfg_attr(not(test), allow(dead_code))]
pub fn conv_flops() -> u64 {
    CONV_FLOPS.with(|c| c.get())
}

/// Output columns per band in [`Conv::forward`]: a band's accumulator (`co` × this) stays in the caches while the
/// taps' products are summed into it.
const BAND_COLUMNS: usize = 2048;

/// What [`Conv::forward`] does to its input on the way into the padded buffer it multiplies, so that no separate
/// pass (and no separate tensor) is needed for it.
#[derive(Clone, Copy)]
pub(crate) enum Prologue<'a> {
    /// The input as it is.
    Copy,
    /// `silu(x · scale[c] + shift[c])`: a group normalisation folded into per-channel factors
    /// ([`group_norm_factors`]), then SiLU.
    NormSilu { scale: &'a [f32], shift: &'a [f32] },
    /// Nearest-neighbour upsampling by 2 (the output is twice the input's size).
    Upsample,
}

/// An ungrouped, stride-1, "same"-padded k×k convolution (k odd) with bias on `[C, H, W]` f32 buffers.
///
/// Rather than building a patch matrix (im2col, k² copies of the input), the input is copied once into a
/// zero-padded buffer whose rows are `W + 2p` wide. On that grid, tap (ky, kx) of every output pixel reads the
/// input at a fixed offset `ky·(W + 2p) + kx`, so the convolution is the sum over taps of `weights[tap]` (`[O, I]`)
/// times a strided view of the padded buffer: k² GEMMs accumulating into one band of outputs at a time, with the
/// 2p junk columns per row dropped when the band is written out (plus bias, plus an optional residual).
pub(crate) struct Conv {
    co: usize,
    ci: usize,
    k: usize,
    /// PyTorch's OIHW layout: tap t's `[co, ci]` matrix is the view with row stride `ci·k²` and column stride `k²`
    /// from element t (the GEMM packs it, so the strides cost nothing measurable and loading copies nothing).
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Conv {
    /// From PyTorch's OIHW weights.
    pub(crate) fn from_oihw(weight: Vec<f32>, bias: Vec<f32>, co: usize, ci: usize, k: usize) -> Self {
        assert_eq!(weight.len(), co * ci * k * k, "weight shape");
        assert_eq!(bias.len(), co, "bias shape");
        Conv { co, ci, k, weight, bias }
    }

    pub(crate) fn out_channels(&self) -> usize {
        self.co
    }

    /// `x` is `[ci, h, w]`; the output is `[co, H, W]` (twice h and w with [`Prologue::Upsample`]), plus
    /// `residual` (`[co, H, W]`) when given.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        size: (usize, usize),
        prologue: Prologue,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        self.forward_biased(x, size, prologue, residual, None)
    }

    /// [`Conv::forward`] with a per-channel `extra` bias added to the convolution's own (a UNet resnet's time
    /// embedding).
    pub(crate) fn forward_biased(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        prologue: Prologue,
        residual: Option<&[f32]>,
        extra: Option<&[f32]>,
    ) -> Vec<f32> {
        let (co, ci, k) = (self.co, self.ci, self.k);
        assert_eq!(x.len(), ci * h * w, "input shape");
        let (oh, ow) = if matches!(prologue, Prologue::Upsample) { (2 * h, 2 * w) } else { (h, w) };
        if let Some(r) = residual {
            assert_eq!(r.len(), co * oh * ow, "residual shape");
        }
        let p = k / 2;
        let wp = ow + 2 * p;
        // One spare row so the last taps' reads past the last padded row stay inside the buffer.
        let plane = (oh + 2 * p + usize::from(p > 0)) * wp;
        let threads = candle_core::utils::get_num_threads().max(1);
        let mut xp = vec![0f32; ci * plane];
        let fill = |c0: usize, chunk: &mut [f32]| {
            for (dc, dst) in chunk.chunks_mut(plane).enumerate() {
                let c = c0 + dc;
                let src = &x[c * h * w..(c + 1) * h * w];
                for y in 0..oh {
                    let row = &mut dst[(y + p) * wp + p..(y + p) * wp + p + ow];
                    match prologue {
                        Prologue::Copy => row.copy_from_slice(&src[y * w..(y + 1) * w]),
                        Prologue::NormSilu { scale, shift } => {
                            let (a, b) = (scale[c], shift[c]);
                            for (d, &s) in row.iter_mut().zip(&src[y * w..(y + 1) * w]) {
                                *d = silu(s * a + b);
                            }
                        }
                        Prologue::Upsample => {
                            let s = &src[(y / 2) * w..(y / 2 + 1) * w];
                            for (d, pair) in row.chunks_exact_mut(2).zip(s) {
                                d[0] = *pair;
                                d[1] = *pair;
                            }
                        }
                    }
                }
            }
        };
        let per = ci.div_ceil(threads);
        if threads == 1 || ci * oh * ow < 1 << 16 {
            fill(0, &mut xp);
        } else {
            std::thread::scope(|s| {
                for (i, chunk) in xp.chunks_mut(per * plane).enumerate() {
                    s.spawn(move || fill(i * per, chunk));
                }
            });
        }

        // Bands of output rows; each worker takes every `threads`-th band.
        let rows = (BAND_COLUMNS / wp).clamp(1, oh.div_ceil(threads).max(1));
        let bands = oh.div_ceil(rows);
        let mut out = vec![0f32; co * oh * ow];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let xp = &xp;
        let work = |first: usize| {
            let mut acc = vec![0f32; co * rows * wp];
            for b in (first..bands).step_by(threads) {
                let y0 = b * rows;
                let r = rows.min(oh - y0);
                let n = r * wp;
                for t in 0..k * k {
                    let (ky, kx) = (t / k, t % k);
                    // SAFETY: the view's last read is at (ci − 1)·plane + (y0 + r − 1 + ky)·wp + wp − 1 + kx, inside
                    // `xp` by the spare row; `acc` holds co × n floats; the weight view's last element is
                    // (co − 1)·ci·k² + (ci − 1)·k² + t, inside the weights.
                    unsafe {
                        gemm::gemm(
                            co,
                            n,
                            ci,
                            acc.as_mut_ptr(),
                            1,
                            n as isize,
                            t > 0,
                            self.weight.as_ptr().add(t),
                            (k * k) as isize,
                            (ci * k * k) as isize,
                            xp.as_ptr().add((y0 + ky) * wp + kx),
                            1,
                            plane as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
                for o in 0..co {
                    for y in 0..r {
                        let src = &acc[o * n + y * wp..o * n + y * wp + ow];
                        let at = (o * oh + y0 + y) * ow;
                        // SAFETY: each (o, y) row of the output belongs to exactly one band, so the workers'
                        // writes never overlap, and `out` outlives the scope.
                        let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(at), ow) };
                        let bias = self.bias[o] + extra.map_or(0.0, |e| e[o]);
                        match residual {
                            Some(res) => {
                                for ((d, &s), &q) in dst.iter_mut().zip(src).zip(&res[at..at + ow]) {
                                    *d = s + bias + q;
                                }
                            }
                            None => {
                                for (d, &s) in dst.iter_mut().zip(src) {
                                    *d = s + bias;
                                }
                            }
                        }
                    }
                }
            }
        };
        if threads == 1 {
            work(0);
        } else {
            std::thread::scope(|s| {
                for first in 0..threads.min(bands) {
                    s.spawn(move || work(first));
                }
            });
        }
        CONV_FLOPS.with(|c| c.set(c.get() + (2 * co * ci * k * k * oh * ow) as u64));
        out
    }
}

#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only for the disjoint per-band writes in `Conv::forward`.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Defines `fn $name(args)` three times over the same body: compiled for AVX-512 and for AVX2 + FMA, used when the CPU
/// has them, so that its loops (softmax, GELU, layer norm; [`exp`], [`sum`] and [`max`] are inlined and branch-free
/// for this) vectorise 16 or 8 wide, and as built (baseline x86-64 is SSE2) for other CPUs.
macro_rules! simd_fn {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn wide($($arg: $t),*) $body
                #[target_feature(enable = "avx2,fma")]
                fn fast($($arg: $t),*) $body
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the CPU has the features `wide` is compiled for (AVX-512 implies AVX2 and FMA).
                    return unsafe { wide($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `fast` is compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            #[allow(unreachable_code)]
            fn plain($($arg: $t),*) $body
            plain($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

simd_fn! {
    /// Each `m`-wide row of `s` becomes `e^(x - max)`; `inv[i]` is one over row i's sum (to normalise later).
    fn exp_rows(s: &mut [f32], m: usize, inv: &mut [f32]) {
        for (row, inv) in s.chunks_exact_mut(m).zip(inv.iter_mut()) {
            let top = max(row);
            for x in row.iter_mut() {
                *x = exp(*x - top);
            }
            *inv = 1.0 / sum(row);
        }
    }
}

/// The sum of `x` in 16 interleaved partial sums (a sequential f32 sum is one add per 4 cycles; this vectorises).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest of `x` (−∞ when empty), in 16 interleaved partial maxima so that it vectorises.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(tail, |a, &b| a.max(b))
}

simd_fn! {
    /// Softmax of `row` in place: `e^(x - max) / Σ`.
    pub(crate) fn softmax(row: &mut [f32]) {
        let m = max(row);
        for x in row.iter_mut() {
            *x = exp(*x - m);
        }
        let inv = 1.0 / sum(row);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `e^x` to within 2 ulp for x in [-87, 88] (clamped outside), branch-free so loops over it vectorise:
/// `2^n · p(r)` with `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2` and p the degree-7 Taylor polynomial.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and removing 1.5·2^23 rounds to an integer without a rounding instruction.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Softmax attention of `n` queries over `m` keys in `heads` heads of `dh`: `q` is `[n, heads·dh]`, `k` and `v`
/// `[m, heads·dh]` (token-major, as linear layers give them); the result is `[n, heads·dh]`. For each head and block
/// of queries, the scores are one GEMM into a buffer that stays in cache, the softmax runs in place on it (with
/// [`exp`]), and a second GEMM multiplies it with the values, normalising after: the `heads × n × m` score tensor
/// of the unfused form (and its separate softmax pass) never exists. Heads × blocks are shared among the threads.
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (n, m): (usize, usize),
    (heads, dh): (usize, usize),
    scale: f32,
) -> Vec<f32> {
    const BLOCK: usize = 64;
    let hd = heads * dh;
    assert!(q.len() == n * hd && k.len() == m * hd && v.len() == m * hd, "attention shapes");
    let blocks = n.div_ceil(BLOCK);
    let items = heads * blocks;
    let threads = candle_core::utils::get_num_threads().clamp(1, items.max(1));
    let mut out = vec![0f32; n * hd];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let work = |first: usize| {
        let mut s = vec![0f32; BLOCK * m];
        let mut inv = [0f32; BLOCK];
        for item in (first..items).step_by(threads) {
            let (h, b) = (item / blocks, item % blocks);
            let r0 = b * BLOCK;
            let r = BLOCK.min(n - r0);
            // SAFETY: every view is inside its slice by the asserted shapes; each (head, block) writes its own
            // rows × columns of `out`, which outlives the scope.
            unsafe {
                gemm::gemm(
                    r,
                    m,
                    dh,
                    s.as_mut_ptr(),
                    1,
                    m as isize,
                    false,
                    q.as_ptr().add(r0 * hd + h * dh),
                    1,
                    hd as isize,
                    k.as_ptr().add(h * dh),
                    hd as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            exp_rows(&mut s[..r * m], m, &mut inv[..r]);
            unsafe {
                let dst = out_ptr.get().add(r0 * hd + h * dh);
                gemm::gemm(
                    r,
                    dh,
                    m,
                    dst,
                    1,
                    hd as isize,
                    false,
                    s.as_ptr(),
                    1,
                    m as isize,
                    v.as_ptr().add(h * dh),
                    1,
                    hd as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                for (i, f) in inv.iter().enumerate().take(r) {
                    for x in std::slice::from_raw_parts_mut(dst.add(i * hd), dh) {
                        *x *= f;
                    }
                }
            }
        }
    };
    if threads == 1 {
        work(0);
    } else {
        std::thread::scope(|sc| {
            for first in 0..threads {
                sc.spawn(move || work(first));
            }
        });
    }
    out
}

#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// Group normalisation of `x` (`[c, hw]`) with affine `gamma`, `beta`, as per-channel factors: `x·scale + shift` is
/// the normalised value. Statistics are accumulated in f64 (PyTorch's biased variance).
pub(crate) fn group_norm_factors(
    x: &[f32],
    c: usize,
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    assert!(c.is_multiple_of(groups) && x.len().is_multiple_of(c), "group norm shape");
    let hw = x.len() / c;
    let stats = |ch: std::ops::Range<usize>| -> Vec<(f64, f64)> {
        ch.map(|i| {
            let (mut s, mut q) = (0f64, 0f64);
            for part in x[i * hw..(i + 1) * hw].chunks(256) {
                let (mut s32, mut q32) = (0f32, 0f32);
                for &v in part {
                    s32 += v;
                    q32 += v * v;
                }
                s += s32 as f64;
                q += q32 as f64;
            }
            (s, q)
        })
        .collect()
    };
    let threads = candle_core::utils::get_num_threads().clamp(1, c);
    let per_channel: Vec<(f64, f64)> = if threads == 1 || x.len() < 1 << 16 {
        stats(0..c)
    } else {
        let per = c.div_ceil(threads);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..c).step_by(per).map(|a| s.spawn(move || stats(a..(a + per).min(c)))).collect();
            hs.into_iter().flat_map(|h| h.join().expect("group norm statistics")).collect()
        })
    };
    let cg = c / groups;
    let n = (cg * hw) as f64;
    let (mut scale, mut shift) = (vec![0f32; c], vec![0f32; c]);
    for g in 0..groups {
        let (s, q) = per_channel[g * cg..(g + 1) * cg].iter().fold((0f64, 0f64), |a, b| (a.0 + b.0, a.1 + b.1));
        let mean = s / n;
        let var = (q / n - mean * mean).max(0.0);
        let inv = 1.0 / (var + eps).sqrt();
        for i in g * cg..(g + 1) * cg {
            let a = gamma[i] as f64 * inv;
            scale[i] = a as f32;
            shift[i] = (beta[i] as f64 - mean * a) as f32;
        }
    }
    (scale, shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The shifted-view convolution, with each prologue and a residual, equals candle's conv2d on the transformed
    /// input.
    #[test]
    fn the_fused_convolution_equals_candles() {
        let dev = Device::Cpu;
        for &(ci, co, k, h, w) in &[(3, 5, 3, 7, 9), (8, 4, 1, 5, 6), (16, 24, 3, 33, 20), (4, 4, 3, 1, 1)] {
            let x = random(ci * h * w, 1);
            let wt = random(co * ci * k * k, 2);
            let bias = random(co, 3);
            let conv = Conv::from_oihw(wt.clone(), bias.clone(), co, ci, k);
            let xt = Tensor::from_slice(&x, (1, ci, h, w), &dev).unwrap();
            let wtt = Tensor::from_slice(&wt, (co, ci, k, k), &dev).unwrap();
            let bt = Tensor::from_slice(&bias, (1, co, 1, 1), &dev).unwrap();
            let reference = |input: &Tensor| {
                input.conv2d(&wtt, k / 2, 1, 1, 1).unwrap().broadcast_add(&bt).unwrap().flatten_all().unwrap()
            };
            let close = |got: &[f32], want: Vec<f32>| {
                assert_eq!(got.len(), want.len());
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{ci}->{co} k{k} {h}x{w}: off by {worst}");
            };
            // Plain, with a residual.
            let res = random(co * h * w, 4);
            let got = conv.forward(&x, (h, w), Prologue::Copy, Some(&res));
            let want = (reference(&xt) + Tensor::from_slice(&res, co * h * w, &dev).unwrap()).unwrap();
            close(&got, want.to_vec1().unwrap());
            // Group norm (as factors) + SiLU.
            let groups = if ci % 4 == 0 { 4 } else { 1 };
            let (gamma, beta) = (random(ci, 5), random(ci, 6));
            let (scale, shift) = group_norm_factors(&x, ci, groups, 1e-6, &gamma, &beta);
            let gn = candle_nn::GroupNorm::new(
                Tensor::from_slice(&gamma, ci, &dev).unwrap(),
                Tensor::from_slice(&beta, ci, &dev).unwrap(),
                ci,
                groups,
                1e-6,
            )
            .unwrap();
            let normed = candle_nn::ops::silu(&candle_core::Module::forward(&gn, &xt).unwrap()).unwrap();
            let got = conv.forward(&x, (h, w), Prologue::NormSilu { scale: &scale, shift: &shift }, None);
            close(&got, reference(&normed).to_vec1().unwrap());
            // Nearest upsampling by 2.
            let got = conv.forward(&x, (h, w), Prologue::Upsample, None);
            close(&got, reference(&xt.upsample_nearest2d(2 * h, 2 * w).unwrap()).to_vec1().unwrap());
        }
    }

    #[test]
    fn exp_is_within_two_ulp_and_attention_equals_the_unfused_form() {
        for i in -8700..8800 {
            let x = i as f32 * 0.01 + 0.003;
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 2.5 * f32::EPSILON * want, "exp({x}) = {got}, not {want}");
        }
        let dev = Device::Cpu;
        for &(n, m, heads, dh) in &[(70, 77, 2, 8), (130, 130, 3, 5), (1, 3, 1, 4)] {
            let (q, k, v) = (random(n * heads * dh, 1), random(m * heads * dh, 2), random(m * heads * dh, 3));
            let scale = 1.0 / (dh as f32).sqrt();
            let got = attention(&q, &k, &v, (n, m), (heads, dh), scale);
            let t = |x: &[f32], len| {
                Tensor::from_slice(x, (len, heads, dh), &dev).unwrap().transpose(0, 1).unwrap().contiguous().unwrap()
            };
            let (qt, kt, vt) = (t(&q, n), t(&k, m), t(&v, m));
            let scores = (qt.matmul(&kt.t().unwrap()).unwrap() * scale as f64).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&vt).unwrap();
            let want = want.transpose(0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{n}x{m}, {heads} heads of {dh}: off by {worst}");
        }
    }

    /// `cargo test --release -p darkroom-models --lib conv::tests::speed -- --ignored --nocapture`: the fused
    /// convolution against the patch-matrix one at SD's VAE sizes.
    #[test]
    #[ignore]
    fn speed() {
        let dev = Device::Cpu;
        for &(c, s) in &[(512usize, 64usize), (512, 128), (256, 256), (128, 512)] {
            let x = random(c * s * s, 1);
            let wt = random(c * c * 9, 2);
            let conv = Conv::from_oihw(wt.clone(), vec![0.0; c], c, c, 3);
            let xt = Tensor::from_slice(&x, (1, c, s, s), &dev).unwrap();
            let m = Tensor::from_slice(&wt, (c, c * 9), &dev).unwrap();
            let flops = 2.0 * (c * c * 9 * s * s) as f64;
            let time = |f: &mut dyn FnMut()| {
                f();
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            };
            let a = time(&mut || drop(conv.forward(&x, (s, s), Prologue::Copy, None)));
            let b = time(&mut || drop(conv_gemm(&xt, &m, (3, 3), [1; 4], 1).unwrap()));
            println!(
                "{c}@{s}: fused {a:.3}s {:.0} GFLOP/s, patch matrix {b:.3}s {:.0} GFLOP/s",
                flops / a / 1e9,
                flops / b / 1e9
            );
        }
    }
}
