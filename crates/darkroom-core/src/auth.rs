//! API keys and runner tokens: generation, parsing and keyed hashing.
//!
//! A key is `key_id:secret`. Only `HMAC-SHA256(server_secret, secret)` is stored; verification compares in
//! constant time.

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Submit, run, and read the owner's own requests.
    Client,
    /// Everything, including other owners' requests, keys and runners.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Client => "client",
            Scope::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "client" => Some(Scope::Client),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn base62(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// A freshly generated key; `secret` is shown once and never stored.
#[derive(Clone)]
pub struct NewSecret {
    pub key_id: String,
    pub secret: String,
}

impl NewSecret {
    /// `dk_` + 16 base62 characters of id; 43 base62 characters (~256 bits) of secret.
    pub fn generate() -> NewSecret {
        NewSecret { key_id: format!("dk_{}", base62(16)), secret: base62(43) }
    }
    /// The credential as clients send it.
    pub fn credential(&self) -> String {
        format!("{}:{}", self.key_id, self.secret)
    }
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret").field("key_id", &self.key_id).field("secret", &"<redacted>").finish()
    }
}

/// A random opaque token (runner tokens).
pub fn random_token() -> String {
    format!("drt_{}", base62(48))
}

/// `HMAC-SHA256(server_secret, value)` in hex.
pub fn keyed_hash(server_secret: &[u8], value: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(server_secret).expect("hmac accepts any key length");
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time comparison of two hashes.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// What an `Authorization` header carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Key { key_id: String, secret: String },
    Bearer(String),
}

/// Parses `Key id:secret` (or `Bearer token`). Returns a message for the client on failure.
pub fn parse_authorization(value: &str) -> Result<Credential, &'static str> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').ok_or("Authorization must be 'Key <key_id>:<secret>'")?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("key") {
        let (id, secret) = rest.split_once(':').ok_or("API key must be '<key_id>:<secret>'")?;
        if id.is_empty() || secret.is_empty() || id.len() > 64 || secret.len() > 256 {
            return Err("API key must be '<key_id>:<secret>'");
        }
        Ok(Credential::Key { key_id: id.to_string(), secret: secret.to_string() })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() || rest.len() > 4096 {
            return Err("empty bearer token");
        }
        Ok(Credential::Bearer(rest.to_string()))
    } else {
        Err("Authorization scheme must be 'Key'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_hash() {
        let k = NewSecret::generate();
        let cred = parse_authorization(&format!("Key {}", k.credential())).unwrap();
        assert_eq!(cred, Credential::Key { key_id: k.key_id.clone(), secret: k.secret.clone() });
        let h1 = keyed_hash(b"server", &k.secret);
        assert!(hashes_equal(&h1, &keyed_hash(b"server", &k.secret)));
        assert!(!hashes_equal(&h1, &keyed_hash(b"other", &k.secret)));
        assert!(!format!("{k:?}").contains(&k.secret));
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "Key", "Key nocolon", "Basic abc", "Key :x", "Key x:"] {
            assert!(parse_authorization(bad).is_err(), "{bad}");
        }
        assert!(matches!(parse_authorization("Bearer t").unwrap(), Credential::Bearer(_)));
    }
}
