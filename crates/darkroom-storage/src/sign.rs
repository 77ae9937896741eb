//! Signed file URLs and upload tokens.
//!
//! A capability is `{id}.{exp}.{sig}`: the file id, an expiry in Unix seconds, and the first 16 bytes of
//! HMAC-SHA256(key, "{op}\n{id}\n{exp}") in unpadded base64url. It sits in the URL's *path*, not its query, because
//! fal's clients build part URLs by appending to the path (`{access_url}/multipart/{uploadId}/{n}`). The key is
//! derived from the server secret, so every gateway sharing that secret verifies every other's URLs.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// What a capability allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Download the file.
    Get,
    /// Upload the file's bytes (whole, or in parts).
    Put,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
        }
    }
}

/// Why a capability or token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("malformed")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("expired")]
    Expired,
}

/// Who an upload token acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// The owner files are filed under.
    #[serde(rename = "o")]
    pub owner_id: String,
    /// The API key it was issued to (checked for revocation on use).
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The job it was issued for (valid only while the job runs).
    #[serde(rename = "j", default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Expiry, Unix seconds.
    #[serde(rename = "e")]
    pub exp: i64,
}

const TOKEN_PREFIX: &str = "dkt1.";

/// Signs and checks file capabilities and upload tokens.
#[derive(Clone)]
pub struct Signer {
    key: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

impl Signer {
    /// Derives the file-signing key from the server secret.
    pub fn from_server_secret(secret: &[u8]) -> Signer {
        let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        m.update(b"darkroom-files-v1");
        Signer { key: m.finalize().into_bytes().into() }
    }

    /// The derived key, hex (handed to local runners so they can check URLs without asking the gateway).
    pub fn key_hex(&self) -> String {
        self.key.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_key_hex(s: &str) -> Option<Signer> {
        if s.len() != 64 {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(Signer { key })
    }

    fn mac(&self, msg: &str) -> [u8; 16] {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(msg.as_bytes());
        let full = m.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// A capability for `op` on file `id` until `exp` (Unix seconds).
    pub fn capability(&self, op: Op, id: &str, exp: i64) -> String {
        let sig = self.mac(&format!("{}\n{id}\n{exp}", op.as_str()));
        format!("{id}.{exp}.{}", B64.encode(sig))
    }

    /// Checks a capability; answers the file id.
    pub fn check(&self, op: Op, cap: &str, now_s: i64) -> Result<String, SignError> {
        let mut it = cap.split('.');
        let (Some(id), Some(exp), Some(sig), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(SignError::Malformed);
        };
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(SignError::Malformed);
        }
        let exp_n: i64 = exp.parse().map_err(|_| SignError::Malformed)?;
        if exp_n.to_string() != exp {
            return Err(SignError::Malformed);
        }
        let given = B64.decode(sig).map_err(|_| SignError::Malformed)?;
        let want = self.mac(&format!("{}\n{id}\n{exp}", op.as_str()));
        if given.len() != want.len() || !bool::from(given.ct_eq(&want)) {
            return Err(SignError::BadSignature);
        }
        if exp_n < now_s {
            return Err(SignError::Expired);
        }
        Ok(id.to_string())
    }

    /// An upload token carrying `claims`.
    pub fn token(&self, claims: &TokenClaims) -> String {
        let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialise"));
        let sig = self.mac(&format!("token\n{payload}"));
        format!("{TOKEN_PREFIX}{payload}.{}", B64.encode(sig))
    }

    /// Whether a string looks like one of our upload tokens (as opposed to an API key).
    pub fn is_token(s: &str) -> bool {
        s.starts_with(TOKEN_PREFIX)
    }

    /// Checks an upload token; answers its claims.
    pub fn check_token(&self, token: &str, now_s: i64) -> Result<TokenClaims, SignError> {
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or(SignError::Malformed)?;
        let (payload, sig) = rest.split_once('.').ok_or(SignError::Malformed)?;
        let given = B64.decode(sig).map_err(|_| SignError::Malformed)?;
        let want = self.mac(&format!("token\n{payload}"));
        if given.len() != want.len() || !bool::from(given.ct_eq(&want)) {
            return Err(SignError::BadSignature);
        }
        let claims: TokenClaims = serde_json::from_slice(&B64.decode(payload).map_err(|_| SignError::Malformed)?)
            .map_err(|_| SignError::Malformed)?;
        if claims.exp < now_s {
            return Err(SignError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_check_op_expiry_and_tampering() {
        let s = Signer::from_server_secret(b"secret-a");
        let cap = s.capability(Op::Get, "abc123", 1000);
        assert_eq!(s.check(Op::Get, &cap, 999).unwrap(), "abc123");
        assert_eq!(s.check(Op::Get, &cap, 1000).unwrap(), "abc123");
        assert_eq!(s.check(Op::Get, &cap, 1001), Err(SignError::Expired));
        assert_eq!(s.check(Op::Put, &cap, 999), Err(SignError::BadSignature));
        // Another id, a later expiry, another secret: all refused.
        let forged = cap.replacen("abc123", "abc124", 1);
        assert_eq!(s.check(Op::Get, &forged, 999), Err(SignError::BadSignature));
        let later = cap.replacen(".1000.", ".9999.", 1);
        assert_eq!(s.check(Op::Get, &later, 999), Err(SignError::BadSignature));
        let other = Signer::from_server_secret(b"secret-b");
        assert_eq!(other.check(Op::Get, &cap, 999), Err(SignError::BadSignature));
        for bad in ["", "a.b", "a.1.x.y", "../x.1.AAAA", "a.01000.AAAA", "a.1.!!"] {
            assert!(s.check(Op::Get, bad, 0).is_err(), "{bad}");
        }
        assert_eq!(Signer::from_key_hex(&s.key_hex()).unwrap().check(Op::Get, &cap, 0).unwrap(), "abc123");
    }

    #[test]
    fn tokens_round_trip_and_refuse_tampering() {
        let s = Signer::from_server_secret(b"secret-a");
        let c = TokenClaims { owner_id: "o".into(), key_id: Some("k".into()), job_id: None, exp: 50 };
        let t = s.token(&c);
        assert!(Signer::is_token(&t));
        assert_eq!(s.check_token(&t, 10).unwrap(), c);
        assert_eq!(s.check_token(&t, 51), Err(SignError::Expired));
        let (p, sig) = t.rsplit_once('.').unwrap();
        let forged_payload = B64.encode(br#"{"o":"admin","e":99999}"#);
        assert_eq!(s.check_token(&format!("dkt1.{forged_payload}.{sig}"), 10), Err(SignError::BadSignature));
        assert!(s.check_token(&format!("{p}.AAAA"), 10).is_err());
        assert!(Signer::from_server_secret(b"x").check_token(&t, 10).is_err());
    }
}
