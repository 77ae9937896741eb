//! An ncnn model (text `.param` graph + `.bin` weights) → safetensors, tensors named `{layer}.weight`,
//! `{layer}.bias` and `{layer}.slope`.
//!
//! The `.param` (ncnn `src/net.cpp`, `src/paramdict.cpp`): the magic `7767517`, a line `layer_count blob_count`,
//! then one line per layer: `type name n_in n_out in_blobs... out_blobs... k=v ...`; an array parameter is
//! written `-233xx=count,v1,v2,...` (its key is `-23300 - k`).
//!
//! The `.bin` is read in layer order (ncnn `src/modelbin.cpp` and each layer's `load_model`):
//!
//! - Convolution, ConvolutionDepthWise, Deconvolution, DeconvolutionDepthWise: the weights, tagged
//!   (`weight_data_size` = param 6 values), then, if `bias_term` (5), `num_output` (0) raw f32 biases. The weight
//!   is written with the shape `[num_output, 6 / (num_output·kh·kw), kh, kw]` (kw = param 1, kh = param 11,
//!   defaulting to kw), as ncnn stores it. A layer with `dynamic_weight` (19, or 28 for deconvolutions) has none.
//! - InnerProduct: tagged weights (param 2 values, shape `[num_output, 2 / num_output]`), then the bias if
//!   `bias_term` (1).
//! - PReLU: `num_slope` (0) raw f32 slopes.
//!
//! A tagged array starts with a u32 tag: `0x01306B47` is f16 data (padded to 4 bytes, written as F16); `0` and
//! `0x0002C056` are raw f32. Other tags (int8 `0x000D4B38`, or a 256-entry quantization table) are refused, as
//! are int8 layers (`int8_scale_term`, param 8) and layer types that may carry weights this reader does not know.
//! The `.bin` must be consumed exactly.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::ConvertError;
use super::write_safetensors;

const MAGIC: &str = "7767517";
const TAG_F16: u32 = 0x0130_6B47;
const TAG_INT8: u32 = 0x000D_4B38;
const TAG_F32_RAW: u32 = 0x0002_C056;

/// Layer types whose `load_model` reads nothing from the `.bin`.
const WEIGHTLESS: &[&str] = &[
    "AbsVal",
    "BinaryOp",
    "BNLL",
    "Cast",
    "Clip",
    "Concat",
    "Crop",
    "Dropout",
    "Eltwise",
    "ELU",
    "Erf",
    "Exp",
    "ExpandDims",
    "Flatten",
    "Flip",
    "GELU",
    "HardSigmoid",
    "HardSwish",
    "Input",
    "Interp",
    "Log",
    "Mish",
    "Noop",
    "Permute",
    "PixelShuffle",
    "Pooling",
    "Power",
    "Reduction",
    "ReLU",
    "Reshape",
    "SELU",
    "ShuffleChannel",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Squeeze",
    "Swish",
    "TanH",
    "Threshold",
    "Tile",
    "UnaryOp",
];

/// One layer line of the `.param`.
pub(crate) struct Layer {
    pub(crate) kind: String,
    pub(crate) name: String,
    /// Raw values by key (array keys already mapped from `-233xx` to `xx`).
    pub(crate) params: HashMap<i32, String>,
}

impl Layer {
    pub(crate) fn int(&self, key: i32, default: i64) -> Result<i64, String> {
        match self.params.get(&key) {
            None => Ok(default),
            Some(v) => {
                v.parse::<i64>().map_err(|_| format!("layer {}: parameter {key}={v} is not an integer", self.name))
            }
        }
    }
    /// A parameter that must be a positive count.
    pub(crate) fn count(&self, key: i32, default: i64, what: &str) -> Result<usize, String> {
        let v = self.int(key, default)?;
        if v <= 0 {
            return Err(format!("layer {} ({}): {what} (param {key}) is {v}", self.name, self.kind));
        }
        usize::try_from(v).map_err(|_| format!("layer {}: {what} {v} is too large", self.name))
    }
}

/// Converts `param` + `bin` into the safetensors file `output`.
pub fn convert(param: &Path, bin: &Path, output: &Path) -> Result<(), ConvertError> {
    let text = std::fs::read_to_string(param)?;
    let layers = parse_param(&text).map_err(|m| ConvertError::format(param, m))?;
    let data = std::fs::read(bin)?;
    let tensors = read_weights(&layers, &data).map_err(|m| ConvertError::format(bin, m))?;
    write_safetensors(tensors, output)
}

pub(crate) fn parse_param(text: &str) -> Result<Vec<Layer>, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    match lines.next() {
        Some(MAGIC) => {}
        Some(other) => return Err(format!("not an ncnn text param: magic {other:?}, expected {MAGIC}")),
        None => return Err("empty param file".into()),
    }
    let counts = lines.next().ok_or("no layer and blob counts")?;
    let layer_count: usize = counts
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad counts line {counts:?}"))?;
    let mut layers = Vec::with_capacity(layer_count);
    for line in lines {
        layers.push(parse_layer(line)?);
    }
    if layers.len() != layer_count {
        return Err(format!("the header announces {layer_count} layers but {} are listed", layers.len()));
    }
    Ok(layers)
}

fn parse_layer(line: &str) -> Result<Layer, String> {
    let mut tokens = line.split_whitespace();
    let mut next = |what: &str| tokens.next().ok_or_else(|| format!("layer line {line:?}: no {what}"));
    let kind = next("type")?.to_string();
    let name = next("name")?.to_string();
    let n_in: usize = next("input count")?.parse().map_err(|_| format!("layer {name}: bad input count"))?;
    let n_out: usize = next("output count")?.parse().map_err(|_| format!("layer {name}: bad output count"))?;
    for _ in 0..n_in + n_out {
        next("blob name")?;
    }
    let mut params = HashMap::new();
    while let Some(tok) = tokens.next() {
        let (k, v) = tok.split_once('=').ok_or_else(|| format!("layer {name}: {tok:?} is not key=value"))?;
        let mut key: i32 = k.parse().map_err(|_| format!("layer {name}: bad parameter key {k:?}"))?;
        if key <= -23300 {
            key = -key - 23300;
        }
        let mut value = v.to_string();
        // A quoted string may hold spaces: gather tokens up to the closing quote.
        if value.starts_with('"') && (value.len() == 1 || !value.ends_with('"')) {
            loop {
                let more = tokens.next().ok_or_else(|| format!("layer {name}: unterminated string"))?;
                value.push(' ');
                value.push_str(more);
                if more.ends_with('"') {
                    break;
                }
            }
        }
        params.insert(key, value);
    }
    Ok(Layer { kind, name, params })
}

struct BinReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> BinReader<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!(
                "truncated: {} needs {n} bytes at offset {} but the .bin has {} bytes",
                what(),
                self.pos,
                self.buf.len()
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// `n` raw f32 values.
    fn raw_f32(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        let bytes = n.checked_mul(4).ok_or_else(|| format!("{}: {n} values overflow", what()))?;
        self.take(bytes, what)
    }

    /// `n` values behind a storage tag.
    fn tagged(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<(Dtype, &'a [u8]), String> {
        let at = self.pos;
        let t = self.take(4, &|| format!("the tag of {}", what()))?;
        let tag = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        match tag {
            TAG_F16 => {
                let bytes = n.checked_mul(2).ok_or_else(|| format!("{}: {n} values overflow", what()))?;
                let data = self.take(bytes, what)?;
                let pad = bytes.next_multiple_of(4) - bytes;
                self.take(pad, &|| format!("the padding after {}", what()))?;
                Ok((Dtype::F16, data))
            }
            0 | TAG_F32_RAW => Ok((Dtype::F32, self.raw_f32(n, what)?)),
            TAG_INT8 => {
                Err(format!("{}: int8 quantized weights (tag 0x{tag:08X} at offset {at}) are not supported", what()))
            }
            _ => Err(format!(
                "{}: unsupported storage tag 0x{tag:08X} at offset {at} (quantized with a table, or not an ncnn .bin)",
                what()
            )),
        }
    }
}

fn read_weights<'a>(layers: &[Layer], bin: &'a [u8]) -> Result<Vec<(String, TensorView<'a>)>, String> {
    let mut r = BinReader { buf: bin, pos: 0 };
    let mut tensors = Vec::new();
    let mut push = |name: String, dtype: Dtype, shape: Vec<usize>, data: &'a [u8]| -> Result<(), String> {
        let view = TensorView::new(dtype, shape, data).map_err(|e| format!("{name}: {e}"))?;
        tensors.push((name, view));
        Ok(())
    };
    for l in layers {
        let kind = l.kind.as_str();
        let name = &l.name;
        match kind {
            "Convolution" | "ConvolutionDepthWise" | "Deconvolution" | "DeconvolutionDepthWise" | "InnerProduct" => {
                let deconv = kind.starts_with("Deconvolution");
                let inner = kind == "InnerProduct";
                let dynamic_key = if deconv { 28 } else { 19 };
                if !inner && l.int(dynamic_key, 0)? != 0 {
                    continue; // weights come from an input blob
                }
                if !deconv && l.int(8, 0)? != 0 {
                    return Err(format!("layer {name} ({kind}): int8 layers (int8_scale_term) are not supported"));
                }
                let num_output = l.count(0, 0, "num_output")?;
                let (bias_key, size_key) = if inner { (1, 2) } else { (5, 6) };
                let size = l.count(size_key, 0, "weight_data_size")?;
                let shape = if inner {
                    if size % num_output != 0 {
                        return Err(format!("layer {name}: weight_data_size {size} is not a multiple of {num_output}"));
                    }
                    vec![num_output, size / num_output]
                } else {
                    let kw = l.count(1, 0, "kernel_w")?;
                    let kh = l.count(11, kw as i64, "kernel_h")?;
                    let per_input = num_output * kw * kh;
                    if size % per_input != 0 {
                        return Err(format!(
                            "layer {name}: weight_data_size {size} is not a multiple of num_output·kh·kw = {per_input}"
                        ));
                    }
                    vec![num_output, size / per_input, kh, kw]
                };
                let (dtype, data) = r.tagged(size, &|| format!("the weights of layer {name}"))?;
                push(format!("{name}.weight"), dtype, shape, data)?;
                if l.int(bias_key, 0)? != 0 {
                    let data = r.raw_f32(num_output, &|| format!("the bias of layer {name}"))?;
                    push(format!("{name}.bias"), Dtype::F32, vec![num_output], data)?;
                }
            }
            "PReLU" => {
                let n = l.count(0, 0, "num_slope")?;
                let data = r.raw_f32(n, &|| format!("the slopes of layer {name}"))?;
                push(format!("{name}.slope"), Dtype::F32, vec![n], data)?;
            }
            "Padding" if l.int(6, 0)? == 0 => {}
            k if WEIGHTLESS.contains(&k) => {}
            other => {
                return Err(format!("layer {name}: type {other} is not supported (it may carry weights)"));
            }
        }
    }
    if r.pos != bin.len() {
        return Err(format!(
            "oversized: {} bytes left after the last layer's weights ({} of {} read)",
            bin.len() - r.pos,
            r.pos,
            bin.len()
        ));
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
        v.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    /// f16 bit patterns 0x3C00 + i (the converter copies them, so any u16s do).
    fn f16_bytes(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (0x3C00u16 + i as u16).to_le_bytes()).collect()
    }

    const PARAM: &str = "7767517
8 9
Input            data     0 1 data
Convolution      conv_a   1 1 data a 0=2 1=3 11=1 4=1 5=1 6=12
PReLU            act_a    1 1 a b 0=2
Split            split    1 2 b b0 b1
Convolution      conv_b   1 1 b0 c 0=1 1=1 11=3 5=0 6=3 9=2 -23310=1,2.000000e-01
Interp           up       1 1 c d 0=1 1=2.000000e+00 2=2.000000e+00
InnerProduct     fc       1 1 d e 0=2 1=1 2=6
Eltwise          sum      2 1 b1 e f 0=1 -23301=2,1.000000e+00,1.000000e+00
";

    /// The `.bin` matching [`PARAM`]: conv_a f16 (12 values) + f32 bias, PReLU slopes, conv_b f32 behind tag 0
    /// (3 values, no bias), fc f32 behind tag 0x0002C056 (6 values) + bias.
    fn bin() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&TAG_F16.to_le_bytes());
        b.extend(f16_bytes(12));
        b.extend(f32_bytes([0.5, -0.5]));
        b.extend(f32_bytes([0.25, 0.125]));
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend(f32_bytes([1.0, 2.0, 3.0]));
        b.extend_from_slice(&TAG_F32_RAW.to_le_bytes());
        b.extend(f32_bytes((0..6).map(|i| i as f32)));
        b.extend(f32_bytes([9.0, 8.0]));
        b
    }

    fn run(param: &str, bin: &[u8]) -> (tempfile::TempDir, Result<(), ConvertError>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("m.param"), param).unwrap();
        std::fs::write(d.path().join("m.bin"), bin).unwrap();
        let r = convert(&d.path().join("m.param"), &d.path().join("m.bin"), &d.path().join("m.safetensors"));
        (d, r)
    }

    #[test]
    fn converts_conv_prelu_and_inner_product() {
        let (d, r) = run(PARAM, &bin());
        r.unwrap();
        let bytes = std::fs::read(d.path().join("m.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(names, ["act_a.slope", "conv_a.bias", "conv_a.weight", "conv_b.weight", "fc.bias", "fc.weight"]);
        let check = |n: &str, dtype: Dtype, shape: &[usize], data: &[u8]| {
            let t = st.tensor(n).unwrap();
            assert_eq!((t.dtype(), t.shape(), t.data()), (dtype, shape, data), "{n}");
        };
        check("conv_a.weight", Dtype::F16, &[2, 2, 1, 3], &f16_bytes(12));
        check("conv_a.bias", Dtype::F32, &[2], &f32_bytes([0.5, -0.5]));
        check("act_a.slope", Dtype::F32, &[2], &f32_bytes([0.25, 0.125]));
        check("conv_b.weight", Dtype::F32, &[1, 1, 3, 1], &f32_bytes([1.0, 2.0, 3.0]));
        check("fc.weight", Dtype::F32, &[2, 3], &f32_bytes((0..6).map(|i| i as f32)));
        check("fc.bias", Dtype::F32, &[2], &f32_bytes([9.0, 8.0]));

        let (d2, r2) = run(PARAM, &bin());
        r2.unwrap();
        assert_eq!(std::fs::read(d2.path().join("m.safetensors")).unwrap(), bytes);
    }

    #[test]
    fn f16_data_is_padded_to_four_bytes() {
        // 3 f16 values = 6 bytes + 2 bytes of padding, then the bias.
        let param = "7767517\n2 2\nInput in 0 1 x\nConvolution c 1 1 x y 0=1 1=1 11=3 5=1 6=3\n";
        let mut b = TAG_F16.to_le_bytes().to_vec();
        b.extend(f16_bytes(3));
        b.extend([0, 0]);
        b.extend(f32_bytes([7.0]));
        let (d, r) = run(param, &b);
        r.unwrap();
        let bytes = std::fs::read(d.path().join("m.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("c.weight").unwrap().data(), f16_bytes(3));
        assert_eq!(st.tensor("c.bias").unwrap().data(), f32_bytes([7.0]));
        // Without the padding the bias is short.
        b.drain(10..12);
        let (_d, r) = run(param, &b);
        assert!(r.unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn refuses_truncated_and_oversized_bin() {
        let full = bin();
        for cut in [0, 2, 10, full.len() - 1] {
            let (d, r) = run(PARAM, &full[..cut]);
            let e = r.unwrap_err().to_string();
            assert!(e.contains("truncated"), "{cut}: {e}");
            assert!(!d.path().join("m.safetensors").exists());
        }
        let mut longer = full.clone();
        longer.extend([0; 4]);
        let (d, r) = run(PARAM, &longer);
        assert!(r.unwrap_err().to_string().contains("oversized: 4 bytes left"));
        assert!(!d.path().join("m.safetensors").exists());
    }

    #[test]
    fn refuses_quantized_tags_and_layers() {
        let mut b = bin();
        b[0..4].copy_from_slice(&TAG_INT8.to_le_bytes());
        let (_d, r) = run(PARAM, &b);
        assert!(r.unwrap_err().to_string().contains("int8 quantized"));

        let mut b = bin();
        b[0..4].copy_from_slice(&0x0000_0101u32.to_le_bytes());
        let (_d, r) = run(PARAM, &b);
        assert!(r.unwrap_err().to_string().contains("unsupported storage tag 0x00000101"));

        let (_d, r) = run(&PARAM.replace("5=1 6=12", "5=1 6=12 8=2"), &bin());
        assert!(r.unwrap_err().to_string().contains("int8 layers"));
    }

    #[test]
    fn refuses_unknown_weight_layers_and_bad_params() {
        let (_d, r) = run(&PARAM.replace("Interp           up", "BatchNorm        up"), &bin());
        assert!(r.unwrap_err().to_string().contains("type BatchNorm is not supported"));

        let (_d, r) = run(&PARAM.replace("6=12", "6=13"), &bin());
        assert!(r.unwrap_err().to_string().contains("not a multiple"));

        let (_d, r) = run(&PARAM.replace("8 9", "9 9"), &bin());
        assert!(r.unwrap_err().to_string().contains("announces 9 layers"));

        let (_d, r) = run(&PARAM.replace("7767517", "7767518"), &bin());
        assert!(r.unwrap_err().to_string().contains("magic"));

        let (_d, r) = run(&PARAM.replace("0=2 1=3", "0=2.5 1=3"), &bin());
        assert!(r.unwrap_err().to_string().contains("not an integer"));
    }

    #[test]
    fn dynamic_weight_layers_read_nothing() {
        let param = "7767517\n2 3\nInput in 0 1 x\nConvolution c 2 1 x w y 0=1 1=1 6=1 19=1\n";
        let (d, r) = run(param, &[]);
        r.unwrap();
        let bytes = std::fs::read(d.path().join("m.safetensors")).unwrap();
        assert!(SafeTensors::deserialize(&bytes).unwrap().is_empty());
    }
}
