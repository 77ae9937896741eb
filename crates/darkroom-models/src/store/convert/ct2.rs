//! A CTranslate2 Whisper model (`model.bin` + `config.json`) → `model.safetensors` with Hugging Face tensor names
//! (as candle's `whisper::model::Whisper::load` reads them) and a Hugging Face style `config.json`.
//!
//! `model.bin` (CTranslate2 `src/models/model.cc`, written by `python/ctranslate2/specs/model_spec.py`), all
//! little-endian:
//!
//! ```text
//! u32 binary_version                       (1..=6)
//! [v>=2] string spec_name, u32 spec_revision
//! u32 num_variables
//!   string name, u8 rank, u32 dims[rank],
//!   [v>=4] u8 dtype_id, u32 num_bytes | [v<4] u8 item_size, u32 num_items
//!   data
//! [v>=3] u32 num_aliases, (string alias, string variable) * num_aliases
//! ```
//!
//! where a string is a u16 length counting a trailing NUL, then that many bytes. Dtype ids: 0 f32, 1 i8, 2 i16,
//! 3 i32, 4 f16, 5 bf16.
//!
//! The mapping (HF side under `model.encoder.` / `model.decoder.`):
//!
//! | CTranslate2                                  | Hugging Face                                   |
//! |----------------------------------------------|------------------------------------------------|
//! | `encoder/conv{1,2}/{weight,bias}`            | `conv{1,2}.{weight,bias}`                      |
//! | `*/position_encodings/encodings`             | `embed_positions.weight`                       |
//! | `*/layer_norm/{gamma,beta}`                  | `layer_norm.{weight,bias}`                     |
//! | `decoder/embeddings/weight`                  | `embed_tokens.weight` (the projection is tied) |
//! | `*/layer_i/self_attention/layer_norm`        | `layers.i.self_attn_layer_norm`                |
//! | `*/layer_i/self_attention/linear_0` (QKV)    | `layers.i.self_attn.{q,k,v}_proj` (no k bias)  |
//! | `*/layer_i/self_attention/linear_1`          | `layers.i.self_attn.out_proj`                  |
//! | `decoder/layer_i/attention/layer_norm`       | `layers.i.encoder_attn_layer_norm`             |
//! | `decoder/layer_i/attention/linear_0`         | `layers.i.encoder_attn.q_proj`                 |
//! | `decoder/layer_i/attention/linear_1` (KV)    | `layers.i.encoder_attn.{k,v}_proj` (no k bias) |
//! | `decoder/layer_i/attention/linear_2`         | `layers.i.encoder_attn.out_proj`               |
//! | `*/layer_i/ffn/layer_norm`                   | `layers.i.final_layer_norm`                    |
//! | `*/layer_i/ffn/linear_{0,1}`                 | `layers.i.fc{1,2}`                             |
//!
//! The K part of a fused bias is dropped: Hugging Face's `k_proj` has none (CTranslate2's converter stores zeros
//! there, and a bias on the keys adds the same amount to every score of a query, which softmax ignores).
//! Dtypes are kept (f16 stays F16). Quantized (int8/int16) weights are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

use super::{ConvertError, write_atomically, write_safetensors};

/// The newest `model.bin` layout this reader knows.
const MAX_BINARY_VERSION: u32 = 6;

/// Converts `model` (+ `config`) into `output` (safetensors) and `output_config` (Hugging Face `config.json`).
pub fn convert(model: &Path, config: &Path, output: &Path, output_config: &Path) -> Result<(), ConvertError> {
    let ct2_config: Value = {
        let text = std::fs::read(config)?;
        serde_json::from_slice(&text).map_err(|e| ConvertError::format(config, format!("invalid JSON: {e}")))?
    };
    let bytes = std::fs::read(model)?;
    let file = parse(&bytes).map_err(|m| ConvertError::format(model, m))?;
    let converted = map_to_hf(&file).map_err(|m| ConvertError::format(model, m))?;
    let hf_config = build_config(&converted.dims, &ct2_config).map_err(|m| ConvertError::format(config, m))?;

    write_safetensors(converted.tensors, output)?;
    let mut text =
        serde_json::to_string_pretty(&hf_config).map_err(|e| ConvertError::format(output_config, e.to_string()))?;
    text.push('\n');
    write_atomically(output_config, |tmp| Ok(std::fs::write(tmp, text.as_bytes())?))
}

// ---------------------------------------------------------------------------------------------------------------
// Reading `model.bin`.

/// CTranslate2's `DataType`, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ct2Dtype {
    F32,
    I8,
    I16,
    I32,
    F16,
    Bf16,
}

impl Ct2Dtype {
    fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::Bf16,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::Bf16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::I32 => "int32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }
}

struct Variable<'a> {
    name: String,
    shape: Vec<usize>,
    dtype: Ct2Dtype,
    data: &'a [u8],
}

struct Ct2File<'a> {
    variables: Vec<Variable<'a>>,
    aliases: Vec<(String, String)>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!(
                "truncated: {what} needs {n} bytes at offset {} but the file has {} bytes",
                self.pos,
                self.buf.len()
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u16(what)? as usize;
        if len == 0 {
            return Err(format!("invalid empty string ({what}) at offset {}", self.pos - 2));
        }
        let bytes = self.take(len, what)?;
        // The length counts a trailing NUL, which CTranslate2 drops.
        String::from_utf8(bytes[..len - 1].to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

fn parse(buf: &[u8]) -> Result<Ct2File<'_>, String> {
    let mut r = Reader { buf, pos: 0 };
    let version = r.u32("the binary version")?;
    if version == 0 || version > MAX_BINARY_VERSION {
        return Err(format!(
            "unsupported CTranslate2 binary version {version} (this reader knows 1 to {MAX_BINARY_VERSION})"
        ));
    }
    if version >= 2 {
        let spec = r.string("the spec name")?;
        let _revision = r.u32("the spec revision")?;
        if spec != "WhisperSpec" {
            return Err(format!("not a Whisper model: the spec is {spec:?}, expected \"WhisperSpec\""));
        }
    }
    let count = r.u32("the variable count")?;
    let mut variables = Vec::new();
    for _ in 0..count {
        let name = r.string("a variable name")?;
        let rank = r.u8("a rank")? as usize;
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            shape.push(r.u32("a dimension")? as usize);
        }
        let (dtype, num_bytes) = if version >= 4 {
            let id = r.u8("a dtype")?;
            let dtype = Ct2Dtype::from_id(id).ok_or_else(|| format!("{name}: unknown dtype id {id}"))?;
            (dtype, r.u32("a byte count")? as usize)
        } else {
            let item = r.u8("an item size")?;
            let dtype = match item {
                4 => Ct2Dtype::F32,
                2 => Ct2Dtype::I16,
                1 => Ct2Dtype::I8,
                _ => return Err(format!("{name}: unknown item size {item}")),
            };
            (dtype, (r.u32("an item count")? as usize) * item as usize)
        };
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("{name}: shape {shape:?} overflows"))?;
        if expected != num_bytes {
            return Err(format!(
                "{name}: {num_bytes} bytes stored but shape {shape:?} of {} needs {expected}",
                dtype.name()
            ));
        }
        let data = r.take(num_bytes, &format!("the data of {name}"))?;
        variables.push(Variable { name, shape, dtype, data });
    }
    let mut aliases = Vec::new();
    if version >= 3 {
        let n = r.u32("the alias count")?;
        for _ in 0..n {
            let alias = r.string("an alias")?;
            let target = r.string("an alias target")?;
            aliases.push((alias, target));
        }
    }
    if r.pos != buf.len() {
        return Err(format!("{} unexpected bytes after the end of the model", buf.len() - r.pos));
    }
    Ok(Ct2File { variables, aliases })
}

// ---------------------------------------------------------------------------------------------------------------
// Mapping to Hugging Face names.

/// The model's dimensions, read off the tensors and scalars.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dims {
    d_model: usize,
    encoder_layers: usize,
    decoder_layers: usize,
    encoder_heads: usize,
    decoder_heads: usize,
    encoder_ffn_dim: usize,
    decoder_ffn_dim: usize,
    num_mel_bins: usize,
    max_source_positions: usize,
    max_target_positions: usize,
    vocab_size: usize,
}

struct Converted<'a> {
    tensors: Vec<(String, TensorView<'a>)>,
    dims: Dims,
}

/// Where one CTranslate2 tensor goes: split into `targets.len()` equal row blocks, block `i` written under
/// `targets[i]` (a `None` block is dropped).
fn hf_targets(name: &str) -> Option<Vec<Option<String>>> {
    fn one(s: String) -> Option<Vec<Option<String>>> {
        Some(vec![Some(s)])
    }
    fn ln(g: &str) -> Option<&'static str> {
        match g {
            "gamma" => Some("weight"),
            "beta" => Some("bias"),
            _ => None,
        }
    }
    fn wb(p: &str) -> Option<&str> {
        matches!(p, "weight" | "bias").then_some(p)
    }
    let segs: Vec<&str> = name.split('/').collect();
    match segs.as_slice() {
        ["encoder", conv @ ("conv1" | "conv2"), p] => one(format!("model.encoder.{conv}.{}", wb(p)?)),
        [stack @ ("encoder" | "decoder"), "position_encodings", "encodings"] => {
            one(format!("model.{stack}.embed_positions.weight"))
        }
        [stack @ ("encoder" | "decoder"), "layer_norm", g] => one(format!("model.{stack}.layer_norm.{}", ln(g)?)),
        ["decoder", "embeddings", "weight"] => one("model.decoder.embed_tokens.weight".to_string()),
        [stack @ ("encoder" | "decoder"), layer, rest @ ..] => {
            let i: usize = layer.strip_prefix("layer_")?.parse().ok()?;
            let pre = format!("model.{stack}.layers.{i}");
            let is_decoder = *stack == "decoder";
            match rest {
                ["self_attention", "layer_norm", g] => one(format!("{pre}.self_attn_layer_norm.{}", ln(g)?)),
                ["self_attention", "linear_0", "weight"] => Some(
                    ["q_proj", "k_proj", "v_proj"]
                        .iter()
                        .map(|p| Some(format!("{pre}.self_attn.{p}.weight")))
                        .collect(),
                ),
                ["self_attention", "linear_0", "bias"] => Some(vec![
                    Some(format!("{pre}.self_attn.q_proj.bias")),
                    None,
                    Some(format!("{pre}.self_attn.v_proj.bias")),
                ]),
                ["self_attention", "linear_1", p] => one(format!("{pre}.self_attn.out_proj.{}", wb(p)?)),
                ["attention", "layer_norm", g] if is_decoder => {
                    one(format!("{pre}.encoder_attn_layer_norm.{}", ln(g)?))
                }
                ["attention", "linear_0", p] if is_decoder => one(format!("{pre}.encoder_attn.q_proj.{}", wb(p)?)),
                ["attention", "linear_1", "weight"] if is_decoder => Some(vec![
                    Some(format!("{pre}.encoder_attn.k_proj.weight")),
                    Some(format!("{pre}.encoder_attn.v_proj.weight")),
                ]),
                ["attention", "linear_1", "bias"] if is_decoder => {
                    Some(vec![None, Some(format!("{pre}.encoder_attn.v_proj.bias"))])
                }
                ["attention", "linear_2", p] if is_decoder => one(format!("{pre}.encoder_attn.out_proj.{}", wb(p)?)),
                ["ffn", "layer_norm", g] => one(format!("{pre}.final_layer_norm.{}", ln(g)?)),
                ["ffn", "linear_0", p] => one(format!("{pre}.fc1.{}", wb(p)?)),
                ["ffn", "linear_1", p] => one(format!("{pre}.fc2.{}", wb(p)?)),
                _ => None,
            }
        }
        _ => None,
    }
}

fn safetensors_dtype(name: &str, d: Ct2Dtype) -> Result<Dtype, String> {
    match d {
        Ct2Dtype::F32 => Ok(Dtype::F32),
        Ct2Dtype::F16 => Ok(Dtype::F16),
        Ct2Dtype::Bf16 => Ok(Dtype::BF16),
        other => Err(format!(
            "{name} is {}: quantized CTranslate2 models are not supported (convert with float16 or float32)",
            other.name()
        )),
    }
}

/// A rank-0 integer variable's value.
fn scalar(v: &Variable<'_>) -> Option<i64> {
    let d = v.data;
    Some(match v.dtype {
        Ct2Dtype::I8 => d[0] as i8 as i64,
        Ct2Dtype::I16 => i16::from_le_bytes([d[0], d[1]]) as i64,
        Ct2Dtype::I32 => i32::from_le_bytes([d[0], d[1], d[2], d[3]]) as i64,
        _ => return None,
    })
}

fn map_to_hf<'a>(file: &Ct2File<'a>) -> Result<Converted<'a>, String> {
    let mut tensors: Vec<(String, TensorView<'a>)> = Vec::new();
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut scalars: BTreeMap<&str, i64> = BTreeMap::new();
    let mut projection: Option<&Variable<'a>> = None;
    let mut embeddings: Option<&Variable<'a>> = None;

    for v in &file.variables {
        if v.shape.is_empty() {
            // Spec attributes stored as scalars (num_heads, flags): not tensors.
            if let Some(x) = scalar(v) {
                scalars.insert(v.name.as_str(), x);
            }
            continue;
        }
        if v.name == "decoder/projection/weight" {
            projection = Some(v);
            continue;
        }
        if v.name == "decoder/embeddings/weight" {
            embeddings = Some(v);
        }
        if v.name.ends_with("_scale") || v.name.ends_with("_zero") {
            return Err(format!("{}: quantized CTranslate2 models are not supported", v.name));
        }
        let targets = hf_targets(&v.name).ok_or_else(|| format!("unexpected variable {:?} {:?}", v.name, v.shape))?;
        let dtype = safetensors_dtype(&v.name, v.dtype)?;
        let parts = targets.len();
        if v.shape[0] % parts != 0 {
            return Err(format!("{}: {} rows cannot be split in {parts}", v.name, v.shape[0]));
        }
        let mut shape = v.shape.clone();
        shape[0] /= parts;
        let step = v.data.len() / parts;
        for (i, target) in targets.into_iter().enumerate() {
            let Some(target) = target else { continue };
            let view = TensorView::new(dtype, shape.clone(), &v.data[i * step..(i + 1) * step])
                .map_err(|e| format!("{}: {e}", v.name))?;
            shapes.insert(target.clone(), shape.clone());
            tensors.push((target, view));
        }
    }

    // The output projection must be the token embedding (candle's Whisper ties them).
    let embeddings = embeddings.ok_or("no decoder/embeddings/weight")?;
    for (alias, target) in &file.aliases {
        if alias == "decoder/projection/weight" && target != "decoder/embeddings/weight" {
            return Err(format!("the output projection is an alias of {target:?}, not of the token embedding"));
        }
    }
    if let Some(p) = projection
        && (p.shape != embeddings.shape || p.dtype != embeddings.dtype || p.data != embeddings.data)
    {
        return Err("decoder/projection/weight differs from the token embedding (untied output projection)".into());
    }

    let dims = infer_dims(&shapes, &scalars)?;
    check_flags(&scalars)?;

    // Every tensor candle's loader reads must be there with the right shape; nothing unknown may be left over.
    let expected = expected_tensors(&dims);
    let mut remaining: BTreeSet<&str> = shapes.keys().map(String::as_str).collect();
    for (name, shape) in &expected {
        match shapes.get(name) {
            None => return Err(format!("missing {name} (shape {shape:?})")),
            Some(s) if s != shape => return Err(format!("{name} has shape {s:?}, expected {shape:?}")),
            Some(_) => {}
        }
        remaining.remove(name.as_str());
    }
    let enc_pos = "model.encoder.embed_positions.weight";
    remaining.remove(enc_pos);
    if let Some(extra) = remaining.first() {
        return Err(format!("unexpected tensor {extra} (a layer index past the stack?)"));
    }
    if let Some(s) = shapes.get(enc_pos)
        && s != &vec![dims.max_source_positions, dims.d_model]
    {
        return Err(format!("{enc_pos} has shape {s:?}"));
    }
    Ok(Converted { tensors, dims })
}

fn infer_dims(shapes: &BTreeMap<String, Vec<usize>>, scalars: &BTreeMap<&str, i64>) -> Result<Dims, String> {
    let get = |name: &str| shapes.get(name).ok_or_else(|| format!("missing {name}"));
    let conv1 = get("model.encoder.conv1.weight")?;
    let embed = get("model.decoder.embed_tokens.weight")?;
    let dec_pos = get("model.decoder.embed_positions.weight")?;
    let enc_pos = get("model.encoder.embed_positions.weight")?;
    if conv1.len() != 3 || embed.len() != 2 || dec_pos.len() != 2 || enc_pos.len() != 2 {
        return Err("conv1, embeddings or position encodings have an unexpected rank".into());
    }
    let d_model = embed[1];
    let layers = |stack: &str| {
        let prefix = format!("model.{stack}.layers.");
        shapes
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix)?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    };
    let ffn = |stack: &str| shapes.get(&format!("model.{stack}.layers.0.fc1.weight")).map_or(0, |s| s[0]);
    let heads = |stack: &str| -> Result<usize, String> {
        let h = match scalars.get(format!("{stack}/num_heads").as_str()) {
            Some(&h) if h > 0 => h as usize,
            Some(&h) => return Err(format!("{stack}/num_heads is {h}")),
            None => d_model / 64,
        };
        if h == 0 || d_model % h != 0 {
            return Err(format!("{stack}: d_model {d_model} is not divisible by {h} heads"));
        }
        Ok(h)
    };
    Ok(Dims {
        d_model,
        encoder_layers: layers("encoder"),
        decoder_layers: layers("decoder"),
        encoder_heads: heads("encoder")?,
        decoder_heads: heads("decoder")?,
        encoder_ffn_dim: ffn("encoder"),
        decoder_ffn_dim: ffn("decoder"),
        num_mel_bins: conv1[1],
        max_source_positions: enc_pos[0],
        max_target_positions: dec_pos[0],
        vocab_size: embed[0],
    })
}

/// Refuses spec flags that would make the model compute something other than Whisper as candle runs it.
fn check_flags(scalars: &BTreeMap<&str, i64>) -> Result<(), String> {
    const GELU: i64 = 3; // CTranslate2's Activation::GELU
    let want = [
        ("decoder/activation", GELU),
        ("decoder/pre_norm", 1),
        ("decoder/alibi", 0),
        ("decoder/scale_embeddings", 0),
        ("decoder/start_from_zero_embedding", 0),
    ];
    for (name, value) in want {
        if let Some(&v) = scalars.get(name)
            && v != value
        {
            return Err(format!("{name} is {v}, a Whisper model has {value}"));
        }
    }
    Ok(())
}

/// The tensors candle's `Whisper::load` reads, with their shapes (the encoder's `embed_positions` is not among
/// them: candle computes the encoder's sinusoids itself).
fn expected_tensors(d: &Dims) -> Vec<(String, Vec<usize>)> {
    let n = d.d_model;
    let mut out = vec![
        ("model.encoder.conv1.weight".to_string(), vec![n, d.num_mel_bins, 3]),
        ("model.encoder.conv1.bias".to_string(), vec![n]),
        ("model.encoder.conv2.weight".to_string(), vec![n, n, 3]),
        ("model.encoder.conv2.bias".to_string(), vec![n]),
        ("model.encoder.layer_norm.weight".to_string(), vec![n]),
        ("model.encoder.layer_norm.bias".to_string(), vec![n]),
        ("model.decoder.embed_tokens.weight".to_string(), vec![d.vocab_size, n]),
        ("model.decoder.embed_positions.weight".to_string(), vec![d.max_target_positions, n]),
        ("model.decoder.layer_norm.weight".to_string(), vec![n]),
        ("model.decoder.layer_norm.bias".to_string(), vec![n]),
    ];
    let attention = |out: &mut Vec<(String, Vec<usize>)>, pre: &str| {
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push((format!("{pre}.{p}.weight"), vec![n, n]));
            if p != "k_proj" {
                out.push((format!("{pre}.{p}.bias"), vec![n]));
            }
        }
    };
    let norm = |out: &mut Vec<(String, Vec<usize>)>, pre: &str| {
        out.push((format!("{pre}.weight"), vec![n]));
        out.push((format!("{pre}.bias"), vec![n]));
    };
    for (stack, layers, ffn) in
        [("encoder", d.encoder_layers, d.encoder_ffn_dim), ("decoder", d.decoder_layers, d.decoder_ffn_dim)]
    {
        for i in 0..layers {
            let pre = format!("model.{stack}.layers.{i}");
            attention(&mut out, &format!("{pre}.self_attn"));
            norm(&mut out, &format!("{pre}.self_attn_layer_norm"));
            if stack == "decoder" {
                attention(&mut out, &format!("{pre}.encoder_attn"));
                norm(&mut out, &format!("{pre}.encoder_attn_layer_norm"));
            }
            out.push((format!("{pre}.fc1.weight"), vec![ffn, n]));
            out.push((format!("{pre}.fc1.bias"), vec![ffn]));
            out.push((format!("{pre}.fc2.weight"), vec![n, ffn]));
            out.push((format!("{pre}.fc2.bias"), vec![n]));
            norm(&mut out, &format!("{pre}.final_layer_norm"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// config.json.

fn token_list(ct2: &Value, key: &str) -> Result<Option<Value>, String> {
    let Some(v) = ct2.get(key) else { return Ok(None) };
    if v.is_null() {
        return Ok(None);
    }
    let ids = v
        .as_array()
        .ok_or_else(|| format!("{key} is not a list"))?
        .iter()
        .map(|x| x.as_u64().filter(|&i| i <= u32::MAX as u64).ok_or_else(|| format!("{key}: {x} is not a token id")))
        .collect::<Result<Vec<u64>, String>>()?;
    Ok(Some(Value::from(ids)))
}

fn build_config(d: &Dims, ct2: &Value) -> Result<BTreeMap<String, Value>, String> {
    if !ct2.is_object() {
        return Err("the CTranslate2 config is not a JSON object".into());
    }
    let mut c: BTreeMap<String, Value> = BTreeMap::new();
    let mut put = |k: &str, v: Value| {
        c.insert(k.to_string(), v);
    };
    put("model_type", "whisper".into());
    put("d_model", d.d_model.into());
    put("encoder_layers", d.encoder_layers.into());
    put("decoder_layers", d.decoder_layers.into());
    put("encoder_attention_heads", d.encoder_heads.into());
    put("decoder_attention_heads", d.decoder_heads.into());
    put("encoder_ffn_dim", d.encoder_ffn_dim.into());
    put("decoder_ffn_dim", d.decoder_ffn_dim.into());
    put("num_mel_bins", d.num_mel_bins.into());
    put("max_source_positions", d.max_source_positions.into());
    put("max_target_positions", d.max_target_positions.into());
    put("vocab_size", d.vocab_size.into());
    if let Some(v) = token_list(ct2, "suppress_ids")? {
        put("suppress_tokens", v);
    }
    if let Some(v) = token_list(ct2, "suppress_ids_begin")? {
        put("begin_suppress_tokens", v);
    }
    if let Some(v) = token_list(ct2, "lang_ids")? {
        put("lang_ids", v);
    }
    if let Some(v) = ct2.get("alignment_heads").filter(|v| !v.is_null()) {
        let pairs = v
            .as_array()
            .ok_or("alignment_heads is not a list")?
            .iter()
            .map(|p| match p.as_array().map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>()) {
                Some(a) if a.len() == 2 && a.iter().all(Option::is_some) => {
                    Ok(Value::from(a.into_iter().flatten().collect::<Vec<u64>>()))
                }
                _ => Err(format!("alignment_heads: {p} is not a [layer, head] pair")),
            })
            .collect::<Result<Vec<Value>, String>>()?;
        put("alignment_heads", Value::Array(pairs));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    /// Writes a CTranslate2 `model.bin` (binary version 6).
    struct Ct2Writer {
        vars: Vec<(String, Vec<u32>, u8, Vec<u8>)>,
        aliases: Vec<(String, String)>,
    }

    fn put_string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    impl Ct2Writer {
        fn f32(&mut self, name: &str, shape: &[u32], f: impl Fn(usize) -> f32) {
            let n: u32 = shape.iter().product();
            let data = (0..n as usize).flat_map(|i| f(i).to_le_bytes()).collect();
            self.vars.push((name.to_string(), shape.to_vec(), 0, data));
        }
        fn raw(&mut self, name: &str, shape: &[u32], dtype: u8, data: Vec<u8>) {
            self.vars.push((name.to_string(), shape.to_vec(), dtype, data));
        }
        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&6u32.to_le_bytes());
            put_string(&mut out, "WhisperSpec");
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(self.vars.len() as u32).to_le_bytes());
            for (name, shape, dtype, data) in &self.vars {
                put_string(&mut out, name);
                out.push(shape.len() as u8);
                for d in shape {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.push(*dtype);
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                out.extend_from_slice(data);
            }
            out.extend_from_slice(&(self.aliases.len() as u32).to_le_bytes());
            for (a, t) in &self.aliases {
                put_string(&mut out, a);
                put_string(&mut out, t);
            }
            out
        }
    }

    const D: u32 = 4;
    const MELS: u32 = 3;
    const VOCAB: u32 = 7;

    /// A tiny Whisper: d_model 4, 2 heads, 1 encoder layer, 2 decoder layers, values = index + an offset per
    /// tensor so every tensor is distinct.
    fn tiny_model() -> Ct2Writer {
        let mut w = Ct2Writer { vars: Vec::new(), aliases: Vec::new() };
        let mut k = 0.0f32;
        let mut next = || {
            k += 1000.0;
            k
        };
        for stack in ["encoder", "decoder"] {
            w.raw(&format!("{stack}/num_heads"), &[], 2, 2i16.to_le_bytes().to_vec());
        }
        w.raw("decoder/activation", &[], 1, vec![3]);
        w.raw("decoder/pre_norm", &[], 1, vec![1]);
        let o = next();
        w.f32("encoder/conv1/weight", &[D, MELS, 3], |i| o + i as f32);
        let o = next();
        w.f32("encoder/conv1/bias", &[D], |i| o + i as f32);
        let o = next();
        w.f32("encoder/conv2/weight", &[D, D, 3], |i| o + i as f32);
        let o = next();
        w.f32("encoder/conv2/bias", &[D], |i| o + i as f32);
        let o = next();
        w.f32("encoder/position_encodings/encodings", &[10, D], |i| o + i as f32);
        let o = next();
        w.f32("decoder/position_encodings/encodings", &[6, D], |i| o + i as f32);
        let o = next();
        w.f32("decoder/embeddings/weight", &[VOCAB, D], |i| o + i as f32);
        for stack in ["encoder", "decoder"] {
            for g in ["gamma", "beta"] {
                let o = next();
                w.f32(&format!("{stack}/layer_norm/{g}"), &[D], |i| o + i as f32);
            }
            let layers = if stack == "encoder" { 1 } else { 2 };
            for l in 0..layers {
                let p = format!("{stack}/layer_{l}");
                let mut blocks = vec![("self_attention", vec![("linear_0", 3 * D, D), ("linear_1", D, D)])];
                if stack == "decoder" {
                    blocks.push(("attention", vec![("linear_0", D, D), ("linear_1", 2 * D, D), ("linear_2", D, D)]));
                }
                blocks.push(("ffn", vec![("linear_0", 4 * D, D), ("linear_1", D, 4 * D)]));
                for (block, linears) in blocks {
                    for g in ["gamma", "beta"] {
                        let o = next();
                        w.f32(&format!("{p}/{block}/layer_norm/{g}"), &[D], |i| o + i as f32);
                    }
                    for (lin, rows, cols) in linears {
                        let o = next();
                        w.f32(&format!("{p}/{block}/{lin}/weight"), &[rows, cols], |i| o + i as f32);
                        let o = next();
                        w.f32(&format!("{p}/{block}/{lin}/bias"), &[rows], |i| o + i as f32);
                    }
                }
            }
        }
        w.aliases.push(("decoder/projection/weight".into(), "decoder/embeddings/weight".into()));
        w
    }

    fn ct2_config() -> &'static str {
        r#"{"alignment_heads": [[1, 0], [1, 1]], "lang_ids": [50259], "suppress_ids": [1, 2, 50257],
            "suppress_ids_begin": [220, 50256], "layer_norm_epsilon": null}"#
    }

    fn run(model: &[u8], config: &str) -> (tempfile::TempDir, Result<(), ConvertError>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("model.bin"), model).unwrap();
        std::fs::write(d.path().join("config.json"), config).unwrap();
        let r = convert(
            &d.path().join("model.bin"),
            &d.path().join("config.json"),
            &d.path().join("model.safetensors"),
            &d.path().join("hf_config.json"),
        );
        (d, r)
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn converts_names_shapes_and_splits() {
        let (d, r) = run(&tiny_model().bytes(), ct2_config());
        r.unwrap();
        let bytes = std::fs::read(d.path().join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();

        let dims = Dims {
            d_model: 4,
            encoder_layers: 1,
            decoder_layers: 2,
            encoder_heads: 2,
            decoder_heads: 2,
            encoder_ffn_dim: 16,
            decoder_ffn_dim: 16,
            num_mel_bins: 3,
            max_source_positions: 10,
            max_target_positions: 6,
            vocab_size: 7,
        };
        let mut expected: Vec<(String, Vec<usize>)> = expected_tensors(&dims);
        expected.push(("model.encoder.embed_positions.weight".into(), vec![10, 4]));
        let mut names: Vec<&str> = st.names();
        names.sort();
        let mut want: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        want.sort();
        assert_eq!(names, want);
        for (name, shape) in &expected {
            let t = st.tensor(name).unwrap();
            assert_eq!(t.shape(), shape.as_slice(), "{name}");
            assert_eq!(t.dtype(), Dtype::F32, "{name}");
        }
        assert!(st.tensor("model.decoder.layers.0.self_attn.k_proj.bias").is_err());
        assert!(st.tensor("proj_out.weight").is_err());

        // The fused QKV is split by rows: q = rows 0..4, k = 4..8, v = 8..12 of the CTranslate2 weight.
        let model = tiny_model();
        let find = |n: &str| f32s(&model.vars.iter().find(|v| v.0 == n).unwrap().3);
        let qkv = find("decoder/layer_1/self_attention/linear_0/weight");
        let hf = |n: &str| f32s(st.tensor(n).unwrap().data());
        assert_eq!(hf("model.decoder.layers.1.self_attn.q_proj.weight"), qkv[0..16]);
        assert_eq!(hf("model.decoder.layers.1.self_attn.k_proj.weight"), qkv[16..32]);
        assert_eq!(hf("model.decoder.layers.1.self_attn.v_proj.weight"), qkv[32..48]);
        let qkv_b = find("decoder/layer_1/self_attention/linear_0/bias");
        assert_eq!(hf("model.decoder.layers.1.self_attn.q_proj.bias"), qkv_b[0..4]);
        assert_eq!(hf("model.decoder.layers.1.self_attn.v_proj.bias"), qkv_b[8..12]);
        let kv = find("decoder/layer_0/attention/linear_1/weight");
        assert_eq!(hf("model.decoder.layers.0.encoder_attn.k_proj.weight"), kv[0..16]);
        assert_eq!(hf("model.decoder.layers.0.encoder_attn.v_proj.weight"), kv[16..32]);
        let kv_b = find("decoder/layer_0/attention/linear_1/bias");
        assert_eq!(hf("model.decoder.layers.0.encoder_attn.v_proj.bias"), kv_b[4..8]);
        let pairs = [
            ("decoder/layer_0/attention/linear_0/weight", "model.decoder.layers.0.encoder_attn.q_proj.weight"),
            ("decoder/layer_0/attention/linear_2/bias", "model.decoder.layers.0.encoder_attn.out_proj.bias"),
            ("decoder/layer_0/attention/layer_norm/gamma", "model.decoder.layers.0.encoder_attn_layer_norm.weight"),
            ("encoder/layer_0/self_attention/layer_norm/beta", "model.encoder.layers.0.self_attn_layer_norm.bias"),
            ("encoder/layer_0/self_attention/linear_1/weight", "model.encoder.layers.0.self_attn.out_proj.weight"),
            ("encoder/layer_0/ffn/layer_norm/gamma", "model.encoder.layers.0.final_layer_norm.weight"),
            ("encoder/layer_0/ffn/linear_0/weight", "model.encoder.layers.0.fc1.weight"),
            ("decoder/layer_1/ffn/linear_1/bias", "model.decoder.layers.1.fc2.bias"),
            ("decoder/layer_norm/gamma", "model.decoder.layer_norm.weight"),
            ("encoder/layer_norm/beta", "model.encoder.layer_norm.bias"),
            ("decoder/embeddings/weight", "model.decoder.embed_tokens.weight"),
            ("decoder/position_encodings/encodings", "model.decoder.embed_positions.weight"),
            ("encoder/conv1/weight", "model.encoder.conv1.weight"),
            ("encoder/conv2/bias", "model.encoder.conv2.bias"),
        ];
        for (ct2, name) in pairs {
            assert_eq!(hf(name), find(ct2), "{ct2} -> {name}");
        }

        let cfg: Value = serde_json::from_slice(&std::fs::read(d.path().join("hf_config.json")).unwrap()).unwrap();
        let want = serde_json::json!({
            "alignment_heads": [[1, 0], [1, 1]], "begin_suppress_tokens": [220, 50256], "d_model": 4,
            "decoder_attention_heads": 2, "decoder_ffn_dim": 16, "decoder_layers": 2, "encoder_attention_heads": 2,
            "encoder_ffn_dim": 16, "encoder_layers": 1, "lang_ids": [50259], "max_source_positions": 10,
            "max_target_positions": 6, "model_type": "whisper", "num_mel_bins": 3, "suppress_tokens": [1, 2, 50257],
            "vocab_size": 7
        });
        assert_eq!(cfg, want);
        // No temporary file is left behind.
        let mut files: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        files.sort();
        assert_eq!(files, ["config.json", "hf_config.json", "model.bin", "model.safetensors"]);
    }

    #[test]
    fn output_is_deterministic_and_keeps_f16() {
        // The same model with every float tensor as f16 (bit patterns, not real halves: the converter copies).
        let mut m = tiny_model();
        for v in &mut m.vars {
            if v.2 == 0 {
                v.2 = 4;
                v.3 = v.3.chunks_exact(4).flat_map(|c| [c[0], c[1]]).collect();
            }
        }
        let (d1, r1) = run(&m.bytes(), ct2_config());
        r1.unwrap();
        let (d2, r2) = run(&m.bytes(), ct2_config());
        r2.unwrap();
        for f in ["model.safetensors", "hf_config.json"] {
            assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap());
        }
        let bytes = std::fs::read(d1.path().join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("model.encoder.layers.0.self_attn.v_proj.weight").unwrap();
        assert_eq!(t.dtype(), Dtype::F16);
        assert_eq!(t.shape(), &[4, 4]);
        // Keys come out sorted.
        let text = std::fs::read_to_string(d1.path().join("hf_config.json")).unwrap();
        assert!(text.find("\"alignment_heads\"").unwrap() < text.find("\"vocab_size\"").unwrap());
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn heads_default_to_d_model_over_64() {
        let mut shapes = BTreeMap::new();
        shapes.insert("model.encoder.conv1.weight".to_string(), vec![384, 80, 3]);
        shapes.insert("model.decoder.embed_tokens.weight".to_string(), vec![51864, 384]);
        shapes.insert("model.decoder.embed_positions.weight".to_string(), vec![448, 384]);
        shapes.insert("model.encoder.embed_positions.weight".to_string(), vec![1500, 384]);
        let mut scalars = BTreeMap::new();
        let dims = infer_dims(&shapes, &scalars).unwrap();
        assert_eq!((dims.encoder_heads, dims.decoder_heads), (6, 6));
        scalars.insert("decoder/num_heads", 8);
        let dims = infer_dims(&shapes, &scalars).unwrap();
        assert_eq!((dims.encoder_heads, dims.decoder_heads), (6, 8));
        scalars.insert("encoder/num_heads", 5);
        assert!(infer_dims(&shapes, &scalars).unwrap_err().contains("not divisible by 5 heads"));

        // d_model 4 / 64 = 0 heads: refused rather than guessed.
        let mut m = tiny_model();
        m.vars.retain(|v| !v.0.ends_with("num_heads"));
        let (_d, r) = run(&m.bytes(), "{}");
        assert!(r.unwrap_err().to_string().contains("heads"));
    }

    #[test]
    fn refuses_truncated_and_trailing_bytes() {
        let bytes = tiny_model().bytes();
        for cut in [3, 20, bytes.len() / 2, bytes.len() - 1] {
            let (_d, r) = run(&bytes[..cut], ct2_config());
            let e = r.unwrap_err().to_string();
            assert!(e.contains("truncated"), "{cut}: {e}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let (d, r) = run(&longer, ct2_config());
        assert!(r.unwrap_err().to_string().contains("unexpected bytes"));
        assert!(!d.path().join("model.safetensors").exists());
        assert!(!d.path().join("hf_config.json").exists());
    }

    #[test]
    fn refuses_unknown_dtype_quantized_and_unknown_variables() {
        let mut m = tiny_model();
        m.raw("decoder/extra", &[1], 9, vec![0]);
        let (_d, r) = run(&m.bytes(), ct2_config());
        assert!(r.unwrap_err().to_string().contains("unknown dtype id 9"));

        let mut m = tiny_model();
        let v = m.vars.iter_mut().find(|v| v.0 == "encoder/layer_0/ffn/linear_0/weight").unwrap();
        v.2 = 1; // int8
        v.3.truncate(v.3.len() / 4);
        let (_d, r) = run(&m.bytes(), ct2_config());
        assert!(r.unwrap_err().to_string().contains("quantized"));

        let mut m = tiny_model();
        m.f32("encoder/layer_0/ffn/linear_9/weight", &[2], |_| 0.0);
        let (_d, r) = run(&m.bytes(), ct2_config());
        assert!(r.unwrap_err().to_string().contains("unexpected variable"));

        let mut m = tiny_model();
        m.vars.retain(|v| v.0 != "decoder/layer_1/attention/linear_2/bias");
        let (_d, r) = run(&m.bytes(), ct2_config());
        assert!(r.unwrap_err().to_string().contains("missing model.decoder.layers.1.encoder_attn.out_proj.bias"));

        let mut m = tiny_model();
        m.aliases[0].1 = "encoder/conv1/weight".into();
        let (_d, r) = run(&m.bytes(), ct2_config());
        assert!(r.unwrap_err().to_string().contains("output projection"));

        let (_d, r) = run(&tiny_model().bytes(), r#"{"suppress_ids": ["x"]}"#);
        assert!(r.unwrap_err().to_string().contains("not a token id"));
    }

    #[test]
    fn refuses_payload_size_mismatch() {
        let mut m = tiny_model();
        m.vars.iter_mut().find(|v| v.0 == "encoder/conv1/bias").unwrap().3.push(0);
        let (_d, r) = run(&m.bytes(), ct2_config());
        assert!(r.unwrap_err().to_string().contains("encoder/conv1/bias"));
    }
}
