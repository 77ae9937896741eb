//! Deployed apps (Serverless) and secrets, as the store keeps them.

use darkroom_core::Millis;

/// An app deployed at run time: its registry entry, the manifest its runners run, and its code bundle.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeploymentRecord {
    /// `owner/alias`.
    pub app_id: String,
    /// Who deployed it (the key's owner).
    pub owner_id: String,
    /// 1 for the first deploy, one more for each redeploy.
    pub version: i64,
    /// The app's `AppSpec`, JSON.
    pub spec: String,
    /// The resolved `darkroom.toml` manifest (for a `fal.App`, the one Darkroom derived from its class), JSON.
    pub manifest: String,
    /// SHA-256 of the code bundle (a gzipped tar), hex; it is stored as `apps/{digest}.tar.gz`.
    pub bundle_digest: String,
    pub bundle_size: i64,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A secret, its value sealed by the gateway (the store never sees it in the clear).
#[derive(Debug, Clone, PartialEq)]
pub struct SecretRecord {
    pub name: String,
    pub sealed: Vec<u8>,
    pub updated_at: Millis,
}

macro_rules! deployment_from_row {
    ($r:expr) => {{
        use sqlx::Row as _;
        let r = $r;
        $crate::deploy::DeploymentRecord {
            app_id: r.try_get("app_id")?,
            owner_id: r.try_get("owner_id")?,
            version: r.try_get("version")?,
            spec: r.try_get("spec")?,
            manifest: r.try_get("manifest")?,
            bundle_digest: r.try_get("bundle_digest")?,
            bundle_size: r.try_get("bundle_size")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        }
    }};
}
pub(crate) use deployment_from_row;

macro_rules! secret_from_row {
    ($r:expr) => {{
        use sqlx::Row as _;
        let r = $r;
        $crate::deploy::SecretRecord {
            name: r.try_get("name")?,
            sealed: r.try_get("value")?,
            updated_at: r.try_get("updated_at")?,
        }
    }};
}
pub(crate) use secret_from_row;
