//! JSON helpers.

use serde_json::Value;

/// Serialises JSON with every non-ASCII character escaped as `\uXXXX`. The JS client decodes SSE chunks without
/// streaming mode, so a multi-byte character split across reads would be corrupted (fal-protocol.md §2).
pub fn to_ascii_string(v: &Value) -> String {
    let s = serde_json::to_string(v).unwrap_or_else(|_| "null".into());
    if s.is_ascii() {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{:04x}", unit));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_non_ascii_and_round_trips() {
        let v = serde_json::json!({"m": "héllo 🎨", "k": ["ü"]});
        let s = to_ascii_string(&v);
        assert!(s.is_ascii());
        let back: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }
}
