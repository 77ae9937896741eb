//! Authentication: `Authorization: Key key_id:secret`, verified against the stored keyed hash.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use darkroom_core::ErrorType;
use darkroom_core::auth::{Credential, Scope, hashes_equal, keyed_hash, parse_authorization};
use darkroom_store::KeyRecord;

use crate::Gateway;
use crate::error::{ApiErr, err};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub owner_id: String,
    pub key_id: String,
    pub scope: Scope,
    /// The key's webhook dialect, if it has one.
    pub webhook_dialect: Option<String>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.scope == Scope::Admin
    }
    /// Whether the caller may see something owned by `owner_id`.
    pub fn can_see(&self, owner_id: &str) -> bool {
        self.is_admin() || self.owner_id == owner_id
    }
    pub fn require_admin(&self) -> Result<(), ApiErr> {
        if self.is_admin() { Ok(()) } else { Err(err(ErrorType::Forbidden, "This operation needs an admin key")) }
    }
}

/// The owner that `--no-auth` requests and the local admin key belong to.
pub const LOCAL_OWNER: &str = "local";

/// Positive verifications are cached briefly; revocation through this gateway invalidates at once.
#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, (KeyRecord, Instant)>>,
}

const CACHE_TTL: Duration = Duration::from_secs(30);

impl KeyCache {
    pub fn invalidate(&self, key_id: &str) {
        self.entries.lock().unwrap().remove(key_id);
    }
    fn get(&self, key_id: &str) -> Option<KeyRecord> {
        let mut m = self.entries.lock().unwrap();
        match m.get(key_id) {
            Some((k, at)) if at.elapsed() < CACHE_TTL => Some(k.clone()),
            Some(_) => {
                m.remove(key_id);
                None
            }
            None => None,
        }
    }
    fn put(&self, k: KeyRecord) {
        let mut m = self.entries.lock().unwrap();
        if m.len() > 10_000 {
            m.clear();
        }
        m.insert(k.key_id.clone(), (k, Instant::now()));
    }
}

impl Gateway {
    /// Authenticates a request from its headers.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiErr> {
        let header = headers.get("authorization");
        if self.cfg.no_auth {
            return Ok(Caller {
                owner_id: LOCAL_OWNER.into(),
                key_id: "no-auth".into(),
                scope: Scope::Admin,
                webhook_dialect: None,
            });
        }
        let Some(header) = header else {
            return Err(err(
                ErrorType::Unauthorized,
                "Missing credentials: send 'Authorization: Key <key_id>:<secret>'",
            ));
        };
        let value = header.to_str().map_err(|_| err(ErrorType::Unauthorized, "Authorization header is not ASCII"))?;
        let (key_id, secret) = match parse_authorization(value) {
            Ok(Credential::Key { key_id, secret }) => (key_id, secret),
            Ok(Credential::Bearer(_)) => {
                return Err(err(
                    ErrorType::Unauthorized,
                    "Bearer tokens are not accepted here; use 'Key <key_id>:<secret>'",
                ));
            }
            Err(m) => return Err(err(ErrorType::Unauthorized, m)),
        };
        let hash = keyed_hash(&self.cfg.server_secret, &secret);
        let rec = match self.keys.get(&key_id) {
            Some(k) => k,
            None => match self.store.get_key(&key_id).await? {
                Some(k) => {
                    self.keys.put(k.clone());
                    k
                }
                None => return Err(err(ErrorType::Unauthorized, "Invalid API key")),
            },
        };
        if rec.revoked_at.is_some() || !hashes_equal(&rec.secret_hash, &hash) {
            return Err(err(ErrorType::Unauthorized, "Invalid API key"));
        }
        let scope = Scope::parse(&rec.scope).unwrap_or(Scope::Client);
        Ok(Caller { owner_id: rec.owner_id, key_id: rec.key_id, scope, webhook_dialect: rec.webhook_dialect })
    }
}
