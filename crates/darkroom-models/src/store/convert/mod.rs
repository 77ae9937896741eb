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
