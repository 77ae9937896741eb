//! Converters: run once at fetch time so runtimes load only safetensors or ONNX.
//!
//! Every converter reads its inputs from the folder the sources filled and writes its outputs into the install
//! folder. Outputs are deterministic: the same inputs give the same bytes, so a manifest can pin their sha256.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub mod concat;
pub mod ct2;
pub mod ncnn;
pub mod tfjs;

/// One conversion step of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Converter {
    /// A CTranslate2 Whisper model (`model.bin` and its `config.json`) → `model.safetensors` with Hugging Face
    /// tensor names (fused projections split) and a Hugging Face `config.json`.
    Ct2Whisper { model: String, config: String, output: String, output_config: String },
    /// A TensorFlow.js layers model (`model.json` and its weight shards) → safetensors, one tensor per weight
    /// under its TF.js name. The `model.json` itself (the graph) is kept by listing it among the files.
    TfjsLayers { model: String, output: String },
    /// An ncnn model (`.param` graph + `.bin` weights) → safetensors, tensors named `{layer}.weight`,
    /// `{layer}.bias`, `{layer}.slope`. The `.param` is kept by listing it among the files.
    Ncnn { param: String, bin: String, output: String },
    /// Chunks joined in order into one file (ONNX models shipped in parts).
    Concat { inputs: Vec<String>, output: String },
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{file}: {message}")]
    Format { file: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ConvertError {
    pub fn format(file: &Path, message: impl Into<String>) -> Self {
        ConvertError::Format { file: file.display().to_string(), message: message.into() }
    }
}

impl Converter {
    /// A short name for progress messages.
    pub fn name(&self) -> &'static str {
        match self {
            Converter::Ct2Whisper { .. } => "CTranslate2 → safetensors",
            Converter::TfjsLayers { .. } => "TF.js layers → safetensors",
            Converter::Ncnn { .. } => "ncnn → safetensors",
            Converter::Concat { .. } => "chunks → one file",
        }
    }
    /// The files this step writes.
    pub fn outputs(&self) -> Vec<&str> {
        match self {
            Converter::Ct2Whisper { output, output_config, .. } => vec![output, output_config],
            Converter::TfjsLayers { output, .. }
            | Converter::Ncnn { output, .. }
            | Converter::Concat { output, .. } => {
                vec![output]
            }
        }
    }
    /// The files this step reads.
    pub fn inputs(&self) -> Vec<&str> {
        match self {
            Converter::Ct2Whisper { model, config, .. } => vec![model, config],
            Converter::TfjsLayers { model, .. } => vec![model],
            Converter::Ncnn { param, bin, .. } => vec![param, bin],
            Converter::Concat { inputs, .. } => inputs.iter().map(String::as_str).collect(),
        }
    }

    /// Runs the step: inputs under `input_dir`, outputs under `output_dir` (parent folders are created).
    pub fn run(&self, input_dir: &Path, output_dir: &Path) -> Result<(), ConvertError> {
        for o in self.outputs() {
            if let Some(p) = output_dir.join(o).parent() {
                std::fs::create_dir_all(p)?;
            }
        }
        match self {
            Converter::Ct2Whisper { model, config, output, output_config } => ct2::convert(
                &input_dir.join(model),
                &input_dir.join(config),
                &output_dir.join(output),
                &output_dir.join(output_config),
            ),
            Converter::TfjsLayers { model, output } => tfjs::convert(&input_dir.join(model), &output_dir.join(output)),
            Converter::Ncnn { param, bin, output } => {
                ncnn::convert(&input_dir.join(param), &input_dir.join(bin), &output_dir.join(output))
            }
            Converter::Concat { inputs, output } => {
                let parts: Vec<_> = inputs.iter().map(|i| input_dir.join(i)).collect();
                concat::convert(&parts, &output_dir.join(output))
            }
        }
    }
}

/// Writes `tensors` as a safetensors file at `output`, through a temporary file next to it that is synced and then
/// renamed into place. Tensor order in the file is fixed by the safetensors crate (dtype, then name) and no
/// `__metadata__` is written, so the same tensors always give the same bytes. Duplicate names are refused.
pub(crate) fn write_safetensors(
    tensors: Vec<(String, safetensors::tensor::TensorView<'_>)>,
    output: &Path,
) -> Result<(), ConvertError> {
    let mut seen = std::collections::HashSet::with_capacity(tensors.len());
    for (name, _) in &tensors {
        if !seen.insert(name.as_str()) {
            return Err(ConvertError::format(output, format!("two tensors are named {name:?}")));
        }
    }
    write_atomically(output, |tmp| {
        safetensors::tensor::serialize_to_file(tensors, None, tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => ConvertError::Io(io),
            other => ConvertError::format(output, format!("cannot write safetensors: {other}")),
        })
    })
}

/// Calls `write` with a temporary path next to `output` (`.{name}.partial`), syncs what it wrote and renames it to
/// `output`. On failure the temporary file is removed and `output` is left as it was.
pub(crate) fn write_atomically(
    output: &Path,
    write: impl FnOnce(&Path) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let name = output.file_name().ok_or_else(|| ConvertError::format(output, "the output path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".partial");
    let tmp: std::path::PathBuf = output.with_file_name(tmp_name);
    let result = (|| {
        write(&tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, output)?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            // Make the rename itself durable; not every platform lets a directory be opened and synced.
            if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty())
                && let Ok(d) = std::fs::File::open(dir)
            {
                let _ = d.sync_all();
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
