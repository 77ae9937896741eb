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
