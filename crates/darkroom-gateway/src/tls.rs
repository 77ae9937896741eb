//! TLS: a local CA and server certificate made on first start (or given files), served through rustls.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Where the TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Darkroom's local CA (None for user-supplied certificates).
    pub ca_cert: Option<PathBuf>,
    /// The system CAs plus Darkroom's, for `SSL_CERT_FILE`.
    pub ca_bundle: Option<PathBuf>,
}

fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(data.as_bytes())?;
    Ok(())
}

const SYSTEM_BUNDLES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Darkroom local CA");
    dn.push(DnType::OrganizationName, "Darkroom");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    Ok(p)
}

/// Makes (once) a local CA and a server certificate for `127.0.0.1`, `::1`, `localhost`, fal's host names and
/// any `extra_names`, under `dir`. The server certificate is re-issued when a name is missing from it.
pub fn ensure_local_ca(dir: &Path, extra_names: &[String]) -> anyhow::Result<TlsFiles> {
    std::fs::create_dir_all(dir)?;
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca-key.pem");
    let cert = dir.join("server.pem");
    let key = dir.join("server-key.pem");
    let names_file = dir.join("server-names.txt");
    let bundle = dir.join("ca-bundle.pem");

    if !ca_cert.exists() || !ca_key.exists() {
        let kp = KeyPair::generate()?;
        let c = ca_params()?.self_signed(&kp)?;
        write_private(&ca_key, &kp.serialize_pem())?;
        std::fs::write(&ca_cert, c.pem())?;
        let _ = std::fs::remove_file(&cert);
    }
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(crate::http::FAL_HOSTS.iter().map(|(h, _)| h.to_string()));
    for n in extra_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let wanted = names.join("\n");
    let have = std::fs::read_to_string(&names_file).unwrap_or_default();
    if !cert.exists() || !key.exists() || have != wanted {
        let ca_kp = KeyPair::from_pem(&std::fs::read_to_string(&ca_key)?)?;
        // The CA's parameters are deterministic, so the issuer (subject and key identifier) is the same one.
        let issuer = Issuer::new(ca_params()?, ca_kp);
        let kp = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, "Darkroom");
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = rcgen::date_time_ymd(2025, 1, 1);
        p.not_after = rcgen::date_time_ymd(2035, 1, 1);
        let c = p.signed_by(&kp, &issuer)?;
        write_private(&key, &kp.serialize_pem())?;
        std::fs::write(&cert, c.pem())?;
        std::fs::write(&names_file, &wanted)?;
    }
    // The bundle: the system's CAs, then ours, so clients that replace their trust store keep the internet working.
    let mut b = String::new();
    if let Some(sys) = SYSTEM_BUNDLES.iter().find_map(|p| std::fs::read_to_string(p).ok()) {
        b.push_str(&sys);
        if !b.ends_with('\n') {
            b.push('\n');
        }
    }
    b.push_str(&std::fs::read_to_string(&ca_cert)?);
    std::fs::write(&bundle, b)?;
    Ok(TlsFiles { cert, key, ca_cert: Some(ca_cert), ca_bundle: Some(bundle) })
}

/// A rustls server config from PEM files, offering HTTP/2 and HTTP/1.1.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = rustls_pemfile::certs(
        &mut std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?.as_slice(),
    )
    .collect::<Result<Vec<_>, _>>()
    .context("parsing certificate")?;
    let key = rustls_pemfile::private_key(
        &mut std::fs::read(key).with_context(|| format!("reading {}", key.display()))?.as_slice(),
    )
    .context("parsing private key")?
    .context("no private key found")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
