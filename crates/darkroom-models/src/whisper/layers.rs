//! The pieces Whisper's fused encoder and cached decoder share, on plain f32 buffers: linear layers as `gemm`
//! calls on the weights in place (bias and residual folded in), layer norm and exact GELU on both threads.

use candle_core::Result;
use candle_nn::VarBuilder;

use crate::conv::{SendPtr, exp, simd_fn};

/// `[o, i]` weights (PyTorch's layout) and an optional bias.
pub(super) struct Linear {
    pub(super) w: Vec<f32>,
    pub(super) b: Option<Vec<f32>>,
    pub(super) o: usize,
    pub(super) i: usize,
}

/// Up to this many rows, [`Linear::apply`] is a pass over the weights bound by memory bandwidth (a decoder step):
/// the outputs are split among the threads, each reading its own rows of the weights (one core alone reads memory
/// at about half the rate two do on this class of machine).
const GEMV_ROWS: usize = 4;

impl Linear {
    pub(super) fn load(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((o, i), "weight")?.flatten_all()?.to_vec1::<f32>()?;
        let b = if bias { Some(vb.get(o, "bias")?.to_vec1::<f32>()?) } else { None };
        Ok(Linear { w, b, o, i })
    }

    /// `y = x·Wᵀ + b` for `n` rows of `x`; with `accumulate`, added to what `y` holds (a residual connection).
    pub(super) fn apply(&self, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
        assert!(x.len() >= n * self.i && y.len() >= n * self.o, "linear shapes");
        if let Some(b) = &self.b {
            for row in y[..n * self.o].chunks_exact_mut(self.o) {
                if accumulate {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                } else {
                    row.copy_from_slice(b);
                }
            }
        }
        let read = accumulate || self.b.is_some();
        let dst = SendPtr(y.as_mut_ptr());
        // Output columns c0..c1 of all n rows: W's rows c0..c1.
        let part = |c0: usize, c1: usize, par: gemm::Parallelism| {
            // SAFETY: the views are inside the asserted lengths: x is [n, i] row-major, W [o, i] read as Wᵀ
            // through its strides, y [n, o]; concurrent parts write disjoint columns.
            unsafe {
                gemm::gemm(
                    n,
                    c1 - c0,
                    self.i,
                    dst.get().add(c0),
                    1,
                    self.o as isize,
                    read,
                    x.as_ptr(),
                    1,
                    self.i as isize,
                    self.w.as_ptr().add(c0 * self.i),
                    self.i as isize,
                    1,
                    if read { 1.0 } else { 0.0 },
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        };
        if n <= GEMV_ROWS {
            split(self.o, 64, |c0, c1| part(c0, c1, gemm::Parallelism::None));
        } else {
            part(0, self.o, parallelism());
        }
    }
}

pub(super) fn parallelism() -> gemm::Parallelism {
    match threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

pub(super) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs `f(start, end)` over `threads()` contiguous spans of `0..total` on rayon's threads, or inline when `total`
/// is under `min` per thread.
pub(super) fn split(total: usize, min: usize, f: impl Fn(usize, usize) + Sync) {
    let t = threads().min(total / min.max(1)).max(1);
    if t == 1 {
        return f(0, total);
    }
    let per = total.div_ceil(t);
    rayon::scope(|s| {
        for start in (per..total).step_by(per) {
            let f = &f;
            s.spawn(move |_| f(start, (start + per).min(total)));
        }
        f(0, per);
    });
}

/// Below this many floats, [`par_rows`] and [`par_rows2`] stay on the calling thread (a decoder step's rows).
const PAR_MIN: usize = 1 << 15;

/// Runs `f` on `threads()` spans of whole rows of `x`.
pub(super) fn par_rows(x: &mut [f32], row: usize, f: impl Fn(&mut [f32]) + Sync) {
    let rows = x.len() / row;
    let per = rows.div_ceil(threads()).max(1) * row;
    if per >= x.len() || x.len() < PAR_MIN {
        return f(x);
    }
    rayon::scope(|s| {
        let mut parts = x.chunks_mut(per);
        let first = parts.next();
        for part in parts {
            let f = &f;
            s.spawn(move |_| f(part));
        }
        first.map(&f);
    });
}

/// [`par_rows`] over two buffers of the same shape, read one and write the other.
pub(super) fn par_rows2(x: &[f32], y: &mut [f32], row: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    let rows = x.len() / row;
    let per = rows.div_ceil(threads()).max(1) * row;
    if per >= x.len() || x.len() < PAR_MIN {
        return f(x, y);
    }
    rayon::scope(|s| {
        let mut parts = x.chunks(per).zip(y.chunks_mut(per));
        let first = parts.next();
        for (a, b) in parts {
            let f = &f;
            s.spawn(move |_| f(a, b));
        }
        if let Some((a, b)) = first {
            f(a, b);
        }
    });
}

pub(super) struct LayerNorm {
    g: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    pub(super) fn load(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm { g: vb.get(d, "weight")?.to_vec1::<f32>()?, b: vb.get(d, "bias")?.to_vec1::<f32>()? })
    }

    /// Normalises each row of `x` into `y` (eps 1e-5, statistics in f64).
    pub(super) fn apply(&self, x: &[f32], y: &mut [f32]) {
        let d = self.g.len();
        par_rows2(x, y, d, |x, y| layer_norm_rows(x, y, &self.g, &self.b));
    }
}

simd_fn! {
    fn layer_norm_rows(x: &[f32], y: &mut [f32], g: &[f32], b: &[f32]) {
        let d = g.len();
        for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = (1.0 / (var + 1e-5).sqrt()) as f32;
            let mean = mean as f32;
            for (((y, &x), g), b) in y.iter_mut().zip(x).zip(g).zip(b) {
                *y = (x - mean) * inv * g + b;
            }
        }
    }
}

/// `erf(x)` to within 5e-7 absolute (Abramowitz & Stegun's 7.1.26 form with [`exp`]), and to within 1e-6 relative
/// below 0.5 in magnitude (its Maclaurin series there, where the first form loses digits to cancellation). Both
/// forms are computed and one selected, so loops over it vectorise.
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let far = (1.0 - p * exp(-a * a)).copysign(x);
    let z = x * x;
    let near = x
        * std::f32::consts::FRAC_2_SQRT_PI
        * (1.0
            + z * (-1.0 / 3.0
                + z * (1.0 / 10.0 + z * (-1.0 / 42.0 + z * (1.0 / 216.0 + z * (-1.0 / 1320.0 + z * (1.0 / 9360.0)))))));
    if a < 0.5 { near } else { far }
}

/// Exact GELU, `x·Φ(x)`, in place on both threads.
pub(super) fn gelu(x: &mut [f32]) {
    par_rows(x, 1, gelu_slice);
}

simd_fn! {
    fn gelu_slice(x: &mut [f32]) {
        for v in x {
            *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_gelu_are_exact_to_float_precision() {
        for i in -4000..=4000 {
            let x = i as f64 / 500.0;
            let want = candle_core::cpu::erf::erf_f64(x);
            let got = erf(x as f32) as f64;
            assert!((got - want).abs() <= 5e-7, "erf({x}) = {got}, want {want}");
            if x.abs() < 0.5 {
                assert!((got - want).abs() <= 1e-6 * want.abs(), "erf({x}) = {got}, want {want}");
            }
        }
        let mut v: Vec<f32> = (-200..=200).map(|i| i as f32 / 25.0).collect();
        let want: Vec<f64> = v
            .iter()
            .map(|&x| 0.5 * x as f64 * (1.0 + candle_core::cpu::erf::erf_f64(x as f64 / 2f64.sqrt())))
            .collect();
        gelu(&mut v);
        for (g, w) in v.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
}
