//! Chunked files (an ONNX model shipped in parts) joined into one.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::ConvertError;

/// Joins `parts` in order into `output`.
pub fn convert(parts: &[PathBuf], output: &Path) -> Result<(), ConvertError> {
    if parts.is_empty() {
        return Err(ConvertError::format(output, "no parts to join"));
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(output)?);
    for p in parts {
        let mut f = std::fs::File::open(p)?;
        std::io::copy(&mut f, &mut out)?;
    }
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn joins_in_order() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::write(&a, b"hello ").unwrap();
        std::fs::write(&b, b"world").unwrap();
        super::convert(&[a, b], &d.path().join("out")).unwrap();
        assert_eq!(std::fs::read(d.path().join("out")).unwrap(), b"hello world");
    }
}
