//! Short-lived realtime tokens (fal's `POST /tokens/`): compact JWTs signed with Ed25519 (`alg: EdDSA`), the key
//! family of webhook signatures under their own key id. A browser gets one from its own backend and connects to
//! `…/realtime?fal_jwt_token=…` without ever holding an API key.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, Verifier};
use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::webhook::WebhookKey;

/// The audience every realtime token carries.
pub const AUDIENCE: &str = "darkroom-realtime";

/// What a realtime token grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The owner the sessions run as.
    pub sub: String,
    /// The key that asked for the token.
    pub key_id: String,
    /// App aliases (`flux`) or ids (`owner/flux`) it may connect to.
    pub allowed_apps: Vec<String>,
    /// Seconds since the epoch.
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

impl Claims {
    /// Whether the token lets its holder connect to the app `owner/alias` (or `ns/owner/alias`).
    pub fn allows(&self, app_id: &str) -> bool {
        let alias = app_id.rsplit('/').next().unwrap_or(app_id);
        self.allowed_apps.iter().any(|a| a == app_id || a == alias)
    }
}

/// Signs claims into a compact JWT.
pub fn sign(key: &WebhookKey, claims: &Claims) -> String {
    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": key.kid});
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let p = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialise"));
    let input = format!("{h}.{p}");
    let sig = key.key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token was not signed by this server")]
    BadSignature,
    #[error("the token expired")]
    Expired,
}

/// Verifies a token against the key and the time (`now`, ms), and returns its claims.
pub fn verify(key: &WebhookKey, token: &str, now: Millis) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    let header: serde_json::Value =
        URL_SAFE_NO_PAD.decode(h).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(TokenError::Malformed)?;
    if header["alg"] != "EdDSA" || header["kid"].as_str() != Some(key.kid.as_str()) {
        return Err(TokenError::BadSignature);
    }
    let sig: [u8; 64] = URL_SAFE_NO_PAD.decode(s).ok().and_then(|b| b.try_into().ok()).ok_or(TokenError::Malformed)?;
    key.key
        .verifying_key()
        .verify(format!("{h}.{p}").as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| TokenError::BadSignature)?;
    let claims: Claims =
        URL_SAFE_NO_PAD.decode(p).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(TokenError::Malformed)?;
    if claims.aud != AUDIENCE {
        return Err(TokenError::BadSignature);
    }
    if claims.exp * 1000 <= now {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: "darkroom".into(),
            aud: AUDIENCE.into(),
            sub: "team".into(),
            key_id: "k".into(),
            allowed_apps: vec!["diagnostics".into()],
            iat: 0,
            exp,
            jti: "j".into(),
        }
    }

    #[test]
    fn sign_verify_expiry_and_tampering() {
        let key = WebhookKey::generate();
        let t = sign(&key, &claims(100));
        assert_eq!(verify(&key, &t, 99_000).unwrap().sub, "team");
        assert_eq!(verify(&key, &t, 100_000), Err(TokenError::Expired));
        assert_eq!(verify(&WebhookKey::generate(), &t, 0), Err(TokenError::BadSignature));
        let mut forged = claims(100);
        forged.allowed_apps = vec!["other".into()];
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(verify(&key, &format!("{}.{body}.{}", parts[0], parts[2]), 0), Err(TokenError::BadSignature));
        assert_eq!(verify(&key, "a.b", 0), Err(TokenError::Malformed));
        let c = claims(1);
        assert!(c.allows("darkroom/diagnostics") && !c.allows("darkroom/whisper"));
    }
}
