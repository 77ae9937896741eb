//! TLS client configuration (shared with the gateway, in `darkroom-core`).

use std::path::Path;
use std::sync::Arc;

/// A rustls client config trusting the system's CAs and, if given, the CA certificates in `extra_ca` (PEM).
pub fn client_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    darkroom_core::tls::client_config(extra_ca).map_err(anyhow::Error::msg)
}
