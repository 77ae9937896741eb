//! A TensorFlow.js model (`model.json` + weight shards) → safetensors, one tensor per weight under its TF.js name.
//!
//! `model.json` carries `weightsManifest: [{paths: [shard, ...], weights: [{name, shape, dtype}, ...]}, ...]`.
//! Within a group the shards (paths relative to `model.json`'s folder) are concatenated in order and the weights
//! lie back to back, little-endian, with no padding. `float32` and `int32` are converted; quantized weights (a
//! `quantization` entry) and other dtypes are refused. The byte counts must add up exactly.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

use super::ConvertError;
use super::write_safetensors;

struct Weight {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    bytes: usize,
}

struct Group {
    shards: Vec<PathBuf>,
    weights: Vec<Weight>,
}

/// Converts the TF.js model at `model_json` (its shards beside it) into the safetensors file `output`.
pub fn convert(model_json: &Path, output: &Path) -> Result<(), ConvertError> {
    let text = std::fs::read(model_json)?;
    let json: Value =
        serde_json::from_slice(&text).map_err(|e| ConvertError::format(model_json, format!("invalid JSON: {e}")))?;
    let dir = model_json.parent().unwrap_or_else(|| Path::new(""));
    let groups = parse_manifest(&json, dir).map_err(|m| ConvertError::format(model_json, m))?;

    // Each group's shards, concatenated: as much memory as the input, which the views below borrow.
    let mut buffers: Vec<Vec<u8>> = Vec::with_capacity(groups.len());
    for (g, group) in groups.iter().enumerate() {
        let expected: usize = group.weights.iter().map(|w| w.bytes).sum();
        let mut buf = Vec::with_capacity(expected);
        for shard in &group.shards {
            std::fs::File::open(shard)?.read_to_end(&mut buf)?;
        }
        if buf.len() != expected {
            let what = if buf.len() < expected { "truncated" } else { "oversized" };
            return Err(ConvertError::format(
                group.shards.first().map_or(model_json, PathBuf::as_path),
                format!(
                    "{what}: the shards of weight group {g} hold {} bytes but its weights need {expected}",
                    buf.len()
                ),
            ));
        }
        buffers.push(buf);
    }

    let mut tensors = Vec::new();
    for (group, buf) in groups.iter().zip(&buffers) {
        let mut offset = 0;
        for w in &group.weights {
            let view = TensorView::new(w.dtype, w.shape.clone(), &buf[offset..offset + w.bytes])
                .map_err(|e| ConvertError::format(model_json, format!("{}: {e}", w.name)))?;
            offset += w.bytes;
            tensors.push((w.name.clone(), view));
        }
    }
    write_safetensors(tensors, output)
}

fn parse_manifest(json: &Value, dir: &Path) -> Result<Vec<Group>, String> {
    let manifest = json
        .get("weightsManifest")
        .and_then(Value::as_array)
        .ok_or("no weightsManifest list: not a TensorFlow.js model.json")?;
    let mut groups = Vec::with_capacity(manifest.len());
    for (g, entry) in manifest.iter().enumerate() {
        let paths = entry
            .get("paths")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("weight group {g} has no paths list"))?;
        let shards = paths
            .iter()
            .map(|p| {
                let p = p.as_str().ok_or_else(|| format!("weight group {g}: a path is not a string"))?;
                shard_path(dir, p)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let list = entry
            .get("weights")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("weight group {g} has no weights list"))?;
        let weights = list.iter().map(parse_weight).collect::<Result<Vec<_>, String>>()?;
        if shards.is_empty() && !weights.is_empty() {
            return Err(format!("weight group {g} lists weights but no shard"));
        }
        groups.push(Group { shards, weights });
    }
    Ok(groups)
}

/// A shard path, which must stay inside `model.json`'s folder.
fn shard_path(dir: &Path, p: &str) -> Result<PathBuf, String> {
    let rel = Path::new(p);
    if p.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!("shard path {p:?} leaves the model's folder"));
    }
    Ok(dir.join(rel))
}

fn parse_weight(w: &Value) -> Result<Weight, String> {
    let name = w.get("name").and_then(Value::as_str).ok_or("a weight has no name")?.to_string();
    if let Some(q) = w.get("quantization").filter(|q| !q.is_null()) {
        return Err(format!("{name}: quantized weights are not supported ({q})"));
    }
    let shape = w
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{name}: no shape"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(|| format!("{name}: bad dimension {d}")))
        .collect::<Result<Vec<usize>, String>>()?;
    let dtype_name = w.get("dtype").and_then(Value::as_str).ok_or_else(|| format!("{name}: no dtype"))?;
    let dtype = match dtype_name {
        "float32" => Dtype::F32,
        "int32" => Dtype::I32,
        other => return Err(format!("{name}: unsupported dtype {other:?} (only float32 and int32 are converted)")),
    };
    let bytes = shape
        .iter()
        .try_fold(4usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("{name}: shape {shape:?} overflows"))?;
    Ok(Weight { name, shape, dtype, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;
    use serde_json::json;

    fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
        v.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    /// Two groups: the first split over two shards (a weight straddles them), the second with an int32.
    fn write_model(dir: &Path, manifest: Value, shards: &[(&str, Vec<u8>)]) -> PathBuf {
        let model = json!({"format": "layers-model", "modelTopology": {}, "weightsManifest": manifest});
        std::fs::create_dir_all(dir.join("m")).unwrap();
        let path = dir.join("m/model.json");
        std::fs::write(&path, serde_json::to_vec(&model).unwrap()).unwrap();
        for (name, bytes) in shards {
            std::fs::write(dir.join("m").join(name), bytes).unwrap();
        }
        path
    }

    fn good_manifest() -> Value {
        json!([
            {"paths": ["group1-shard1of2.bin", "group1-shard2of2.bin"], "weights": [
                {"name": "conv/kernel", "shape": [1, 1, 2, 3], "dtype": "float32"},
                {"name": "conv/bias", "shape": [3], "dtype": "float32"},
                {"name": "scalar", "shape": [], "dtype": "float32"}
            ]},
            {"paths": ["group2-shard1of1.bin"], "weights": [
                {"name": "steps", "shape": [2], "dtype": "int32"}
            ]}
        ])
    }

    fn good_shards() -> Vec<(&'static str, Vec<u8>)> {
        let g1 = f32_bytes((0..10).map(|i| i as f32 * 0.5));
        vec![
            ("group1-shard1of2.bin", g1[..14].to_vec()),
            ("group1-shard2of2.bin", g1[14..].to_vec()),
            ("group2-shard1of1.bin", [7i32.to_le_bytes(), (-1i32).to_le_bytes()].concat()),
        ]
    }

    #[test]
    fn converts_weights_across_shards_and_groups() {
        let d = tempfile::tempdir().unwrap();
        let model = write_model(d.path(), good_manifest(), &good_shards());
        let out = d.path().join("out.safetensors");
        convert(&model, &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 4);
        let k = st.tensor("conv/kernel").unwrap();
        assert_eq!((k.dtype(), k.shape()), (Dtype::F32, &[1usize, 1, 2, 3][..]));
        assert_eq!(k.data(), f32_bytes((0..6).map(|i| i as f32 * 0.5)));
        let b = st.tensor("conv/bias").unwrap();
        assert_eq!((b.dtype(), b.shape()), (Dtype::F32, &[3usize][..]));
        assert_eq!(b.data(), f32_bytes([3.0, 3.5, 4.0]));
        let s = st.tensor("scalar").unwrap();
        assert_eq!((s.shape(), s.data()), (&[][..], &f32_bytes([4.5])[..]));
        let i = st.tensor("steps").unwrap();
        assert_eq!((i.dtype(), i.shape()), (Dtype::I32, &[2usize][..]));
        assert_eq!(i.data(), [7i32.to_le_bytes(), (-1i32).to_le_bytes()].concat());

        // Deterministic, and nothing left beside the output.
        let again = d.path().join("again.safetensors");
        convert(&model, &again).unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), bytes);
        let mut files: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        files.sort();
        assert_eq!(files, ["again.safetensors", "m", "out.safetensors"]);
    }

    #[test]
    fn refuses_truncated_and_oversized_shards() {
        let d = tempfile::tempdir().unwrap();
        let mut shards = good_shards();
        shards[1].1.pop();
        let model = write_model(d.path(), good_manifest(), &shards);
        let out = d.path().join("out.safetensors");
        let e = convert(&model, &out).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("group 0"), "{e}");
        assert!(!out.exists());

        let mut shards = good_shards();
        shards[2].1.extend_from_slice(&[0; 4]);
        let model = write_model(d.path(), good_manifest(), &shards);
        let e = convert(&model, &out).unwrap_err().to_string();
        assert!(e.contains("oversized") && e.contains("group 1"), "{e}");
        assert!(!out.exists());
    }

    #[test]
    fn refuses_unknown_dtype_quantization_and_escaping_paths() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out.safetensors");
        let mut m = good_manifest();
        m[1]["weights"][0]["dtype"] = json!("float16");
        let model = write_model(d.path(), m, &good_shards());
        let e = convert(&model, &out).unwrap_err().to_string();
        assert!(e.contains("unsupported dtype \"float16\""), "{e}");

        let mut m = good_manifest();
        m[0]["weights"][1]["quantization"] = json!({"dtype": "uint8", "scale": 0.1, "min": -1.0});
        let model = write_model(d.path(), m, &good_shards());
        let e = convert(&model, &out).unwrap_err().to_string();
        assert!(e.contains("quantized"), "{e}");

        let mut m = good_manifest();
        m[1]["paths"][0] = json!("../secret.bin");
        let model = write_model(d.path(), m, &good_shards());
        let e = convert(&model, &out).unwrap_err().to_string();
        assert!(e.contains("leaves the model's folder"), "{e}");

        let mut m = good_manifest();
        m[1]["weights"][0]["name"] = json!("conv/bias");
        let model = write_model(d.path(), m, &good_shards());
        let e = convert(&model, &out).unwrap_err().to_string();
        assert!(e.contains("two tensors are named"), "{e}");

        let model = write_model(d.path(), json!(null), &[]);
        assert!(convert(&model, &out).unwrap_err().to_string().contains("weightsManifest"));
        assert!(!out.exists());
    }
}
