//! Webhooks: fal's payload, the two signing dialects (fal's Ed25519 headers and Standard Webhooks), the JWKS,
//! the retry schedule, and the address policy that keeps deliveries off private networks.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signer, SigningKey};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::Millis;
use crate::job::Outcome;

/// fal's webhook body for a finished request (fal-protocol.md §5).
pub fn payload(request_id: &str, outcome: &Outcome) -> String {
    let parsed: Result<Value, _> = serde_json::from_str(&outcome.body);
    let mut v = if outcome.error_type.is_none() && (200..300).contains(&outcome.status) {
        json!({"request_id": request_id, "gateway_request_id": request_id, "status": "OK"})
    } else {
        let error = match outcome.error.as_deref() {
            Some(e) if outcome.error_type.as_deref() != Some("app_error") => e.to_string(),
            _ => format!("Invalid status code: {}", outcome.status),
        };
        json!({"request_id": request_id, "gateway_request_id": request_id, "status": "ERROR", "error": error})
    };
    match parsed {
        Ok(p) => v["payload"] = p,
        Err(e) => {
            v["payload"] = Value::Null;
            v["payload_error"] = json!(format!("Response payload is not valid JSON: {e}"));
        }
    }
    v.to_string()
}

/// Which headers a delivery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// fal's: `X-Fal-Webhook-{Request-Id,User-Id,Timestamp,Signature}`, Ed25519 hex.
    Fal,
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature` with `v1a` (Ed25519) and, when a
    /// secret is configured, `v1` (HMAC-SHA256).
    Standard,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Fal => "fal",
            Dialect::Standard => "standard",
        }
    }
    pub fn parse(s: &str) -> Option<Dialect> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fal" => Some(Dialect::Fal),
            "standard" | "standard-webhooks" => Some(Dialect::Standard),
            _ => None,
        }
    }
}

/// An Ed25519 signing key with its key id.
#[derive(Clone)]
pub struct WebhookKey {
    pub kid: String,
    pub key: SigningKey,
}

impl std::fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookKey").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl WebhookKey {
    pub fn generate() -> WebhookKey {
        let mut seed = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut seed);
        let key = SigningKey::from_bytes(&seed);
        let kid = hex::encode(&Sha256::digest(key.verifying_key().as_bytes())[..8]);
        WebhookKey { kid, key }
    }
    pub fn from_secret_b64(kid: &str, secret: &str) -> Option<WebhookKey> {
        let bytes: [u8; 32] = URL_SAFE_NO_PAD.decode(secret).ok()?.try_into().ok()?;
        Some(WebhookKey { kid: kid.to_string(), key: SigningKey::from_bytes(&bytes) })
    }
    pub fn secret_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key.to_bytes())
    }
    /// The public key as a JWK (`kty: OKP`, `crv: Ed25519`).
    pub fn jwk(&self) -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "use": "sig", "alg": "EdDSA",
               "x": URL_SAFE_NO_PAD.encode(self.key.verifying_key().as_bytes())})
    }
}

/// The message fal signs: `"{request_id}\n{user_id}\n{timestamp}\n{sha256_hex(body)}"`.
pub fn fal_message(request_id: &str, user_id: &str, timestamp: i64, body: &[u8]) -> String {
    format!("{request_id}\n{user_id}\n{timestamp}\n{}", hex::encode(Sha256::digest(body)))
}

/// What one delivery attempt signs.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub delivery_id: &'a str,
    pub request_id: &'a str,
    /// The owner of the request.
    pub user_id: &'a str,
    /// Unix seconds.
    pub timestamp: i64,
    pub body: &'a [u8],
}

/// The headers of one signed delivery attempt.
pub fn sign(
    dialect: Dialect,
    key: &WebhookKey,
    hmac_secret: Option<&[u8]>,
    d: Delivery<'_>,
) -> Vec<(&'static str, String)> {
    let Delivery { delivery_id, request_id, user_id, timestamp, body } = d;
    match dialect {
        Dialect::Fal => {
            let sig = key.key.sign(fal_message(request_id, user_id, timestamp, body).as_bytes());
            vec![
                ("x-fal-webhook-request-id", request_id.to_string()),
                ("x-fal-webhook-user-id", user_id.to_string()),
                ("x-fal-webhook-timestamp", timestamp.to_string()),
                ("x-fal-webhook-signature", hex::encode(sig.to_bytes())),
                ("x-fal-webhook-key-id", key.kid.clone()),
            ]
        }
        Dialect::Standard => {
            let mut msg = format!("{delivery_id}.{timestamp}.").into_bytes();
            msg.extend_from_slice(body);
            let mut sigs = vec![format!("v1a,{}", STANDARD.encode(key.key.sign(&msg).to_bytes()))];
            if let Some(secret) = hmac_secret {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
                mac.update(&msg);
                sigs.push(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())));
            }
            vec![
                ("webhook-id", delivery_id.to_string()),
                ("webhook-timestamp", timestamp.to_string()),
                ("webhook-signature", sigs.join(" ")),
            ]
        }
    }
}

/// Decodes a Standard Webhooks secret (`whsec_` + base64).
pub fn decode_whsec(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s.strip_prefix("whsec_").unwrap_or(s)).ok()
}

/// A retry schedule: the delay before each attempt (the first is usually 0). Its length is the attempt count.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule(pub Vec<Duration>);

impl Default for Schedule {
    /// 10 attempts over about 2 hours.
    fn default() -> Self {
        Schedule([0u64, 10, 30, 60, 180, 300, 600, 1200, 1800, 3000].iter().map(|s| Duration::from_secs(*s)).collect())
    }
}

impl Schedule {
    /// Parses `0,10s,30s,1m` (units ms, s, m, h; a bare number is seconds).
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (num, unit) = match part.find(|c: char| !c.is_ascii_digit() && c != '.') {
                Some(i) => part.split_at(i),
                None => (part, "s"),
            };
            let n: f64 = num.parse().map_err(|_| format!("bad duration '{part}'"))?;
            let ms = match unit {
                "ms" => n,
                "s" => n * 1e3,
                "m" => n * 60e3,
                "h" => n * 3600e3,
                _ => return Err(format!("bad unit in '{part}' (use ms, s, m or h)")),
            };
            v.push(Duration::from_millis(ms as u64));
        }
        if v.is_empty() || v.len() > 100 {
            return Err("a schedule has 1 to 100 attempts".into());
        }
        if v[0] != Duration::ZERO {
            return Err("the first attempt is made at completion: start the schedule with 0".into());
        }
        Ok(Schedule(v))
    }

    pub fn attempts(&self) -> u32 {
        self.0.len() as u32
    }

    /// When attempt `n` (0-based) is due, `now` being when the previous one ended; `jitter` in [0, 1) spreads it
    /// ±20%. None when the schedule is exhausted (dead letter).
    pub fn next_at(&self, n: u32, now: Millis, jitter: f64) -> Option<Millis> {
        let d = self.0.get(n as usize)?.as_millis() as f64;
        Some(now + (d * (0.8 + 0.4 * jitter.clamp(0.0, 1.0))).round() as Millis)
    }
}

/// Which addresses deliveries may reach.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Private ranges that are allowed anyway (e.g. `127.0.0.1/32` for tests, `10.0.0.0/8` on a trusted network).
    pub allow: Vec<ipnet::IpNet>,
}

/// Whether an address is loopback, private, link-local, metadata, or otherwise not a public unicast address.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // CGNAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || (o[0] == 198 && (18..20).contains(&o[1])) // benchmarking
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // IPv4-compatible (::a.b.c.d), 6to4 (2002::/16) and Teredo (2001::/32) embed an IPv4 address.
            let v4 = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8))
            };
            if s[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
                return is_private(v4(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return is_private(v4(s[1], s[2]));
            }
            v6.is_loopback()
                || (s[0] == 0x2001 && s[1] == 0) // Teredo
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local, incl. fd00:ec2::254
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64
                || s[0] == 0x2001 && s[1] == 0xdb8 // documentation
        }
    }
}

impl AddressPolicy {
    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_private(ip) || self.allow.iter().any(|n| n.contains(&ip))
    }

    /// Parses a comma-separated list of CIDRs or addresses.
    pub fn parse(s: &str) -> Result<AddressPolicy, String> {
        let mut allow = Vec::new();
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match p.parse::<ipnet::IpNet>() {
                Ok(n) => n,
                Err(_) => p
                    .parse::<IpAddr>()
                    .map(ipnet::IpNet::from)
                    .map_err(|_| format!("'{p}' is not a CIDR or address"))?,
            };
            allow.push(net);
        }
        Ok(AddressPolicy { allow })
    }

    /// Resolves a URL's host and picks an address this policy permits, to connect to pinned (so a second DNS
    /// answer cannot redirect the request). Answers the domain (if the host is a name) and the address. `flag`
    /// names the setting that allows private addresses, for the error message.
    pub async fn resolve(&self, url: &url::Url, flag: &str) -> Result<(Option<String>, std::net::SocketAddr), String> {
        use std::net::SocketAddr;
        let port = url.port_or_known_default().ok_or("no port")?;
        let host = url.host().ok_or("no host")?;
        let addrs: Vec<SocketAddr> = match host {
            url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
            url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
            url::Host::Domain(d) => {
                tokio::net::lookup_host((d, port)).await.map_err(|e| format!("DNS: {e}"))?.collect()
            }
        };
        let domain = match host {
            url::Host::Domain(d) => Some(d.to_string()),
            _ => None,
        };
        match addrs.iter().find(|a| self.permits(a.ip())) {
            Some(a) => Ok((domain, *a)),
            None => Err(format!(
                "refused: {} resolves only to private addresses ({}); allow them with {flag}",
                url.host_str().unwrap_or(""),
                addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// The check at submit: a well-formed http(s) URL whose host, if a literal address, is permitted. Host names
    /// are checked when resolved at delivery.
    pub fn check_url(&self, raw: &str) -> Result<url::Url, String> {
        let u = url::Url::parse(raw).map_err(|e| format!("not a valid URL: {e}"))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("must be an http or https URL".into());
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("must not carry credentials".into());
        }
        match u.host() {
            None => Err("has no host".into()),
            Some(url::Host::Ipv4(ip)) if !self.permits(IpAddr::V4(ip)) => Err(format!("{ip} is a private address")),
            Some(url::Host::Ipv6(ip)) if !self.permits(IpAddr::V6(ip)) => Err(format!("{ip} is a private address")),
            Some(url::Host::Domain(d))
                if {
                    let d = d.trim_end_matches('.').to_ascii_lowercase();
                    d == "localhost" || d.ends_with(".localhost")
                } =>
            {
                if self.permits(IpAddr::from([127, 0, 0, 1])) {
                    Ok(u.clone())
                } else {
                    Err("localhost is a private address".into())
                }
            }
            _ => Ok(u),
        }
    }
}

/// A W3C `traceparent` for a new trace.
pub fn new_traceparent() -> String {
    let mut b = [0u8; 24];
    rand::Rng::fill(&mut rand::rng(), &mut b);
    format!("00-{}-{}-01", hex::encode(&b[..16]), hex::encode(&b[16..]))
}

/// Validates an incoming `traceparent` (version 00).
pub fn valid_traceparent(s: &str) -> bool {
    let p: Vec<&str> = s.split('-').collect();
    p.len() == 4
        && p[0] == "00"
        && p[1].len() == 32
        && p[2].len() == 16
        && p[3].len() == 2
        && p[1..].iter().all(|x| x.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()))
        && p[1] != "0".repeat(32)
        && p[2] != "0".repeat(16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier};

    #[test]
    fn payload_shapes() {
        let ok: Value = serde_json::from_str(&payload("r", &Outcome::success(r#"{"a":1}"#.into(), None))).unwrap();
        assert_eq!(ok, json!({"request_id": "r", "gateway_request_id": "r", "status": "OK", "payload": {"a": 1}}));
        let app = Outcome {
            status: 422,
            body: r#"{"detail":[]}"#.into(),
            error: Some("x".into()),
            error_type: Some("app_error".into()),
            inference_ms: None,
            units: None,
        };
        let e: Value = serde_json::from_str(&payload("r", &app)).unwrap();
        assert_eq!(e["status"], "ERROR");
        assert_eq!(e["error"], "Invalid status code: 422");
        assert_eq!(e["payload"], json!({"detail": []}));
        let bad = Outcome::success("not json".into(), None);
        let b: Value = serde_json::from_str(&payload("r", &bad)).unwrap();
        assert!(b["payload"].is_null() && b["payload_error"].is_string());
    }

    #[test]
    fn fal_signature_verifies_and_detects_tampering() {
        let k = WebhookKey::generate();
        let h = sign(
            Dialect::Fal,
            &k,
            None,
            Delivery { delivery_id: "d", request_id: "req", user_id: "owner", timestamp: 1_700_000_000, body: b"{}" },
        );
        let sig_hex = &h.iter().find(|(n, _)| *n == "x-fal-webhook-signature").unwrap().1;
        let sig = Signature::from_slice(&hex::decode(sig_hex).unwrap()).unwrap();
        let vk = k.key.verifying_key();
        assert!(vk.verify(fal_message("req", "owner", 1_700_000_000, b"{}").as_bytes(), &sig).is_ok());
        assert!(vk.verify(fal_message("req", "owner", 1_700_000_000, b"{ }").as_bytes(), &sig).is_err());
        let k2 = WebhookKey::from_secret_b64(&k.kid, &k.secret_b64()).unwrap();
        assert_eq!(k2.jwk(), k.jwk());
    }

    #[test]
    fn standard_dialect_has_both_signatures() {
        let k = WebhookKey::generate();
        let h = sign(
            Dialect::Standard,
            &k,
            Some(b"secret"),
            Delivery { delivery_id: "msg_1", request_id: "req", user_id: "o", timestamp: 5, body: b"body" },
        );
        let sig = &h.iter().find(|(n, _)| *n == "webhook-signature").unwrap().1;
        assert!(sig.starts_with("v1a,") && sig.contains(" v1,"), "{sig}");
    }

    #[test]
    fn schedules() {
        let s = Schedule::default();
        assert_eq!(s.attempts(), 10);
        let total: u64 = s.0.iter().map(|d| d.as_secs()).sum();
        assert!((6_600..=7_800).contains(&total), "about two hours: {total}");
        assert!(Schedule::parse("5s,10s").is_err(), "the first entry is the immediate attempt");
        let t = Schedule::parse("0, 50ms, 1s, 2m").unwrap();
        assert_eq!(
            t.0,
            vec![Duration::ZERO, Duration::from_millis(50), Duration::from_secs(1), Duration::from_secs(120)]
        );
        assert_eq!(t.next_at(1, 1_000, 0.5), Some(1_050));
        assert_eq!(t.next_at(1, 1_000, 0.0), Some(1_040));
        assert_eq!(t.next_at(4, 1_000, 0.5), None);
        assert!(Schedule::parse("5x").is_err() && Schedule::parse("").is_err());
    }

    #[test]
    fn private_addresses_are_refused_unless_allowed() {
        let p = AddressPolicy::default();
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "100.64.0.1",
            "::10.0.0.1",
            "2002:a00:1::1",
            "2002:7f00:1::",
            "fec0::1",
            "2001:0:1::1",
        ] {
            assert!(!p.permits(a.parse().unwrap()), "{a}");
        }
        for a in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(p.permits(a.parse().unwrap()), "{a}");
        }
        assert!(p.check_url("http://127.0.0.1:9/x").is_err());
        assert!(p.check_url("http://[::1]/x").is_err());
        assert!(p.check_url("http://localhost/x").is_err());
        assert!(p.check_url("http://LocalHost./x").is_err());
        assert!(p.check_url("ftp://example.com/x").is_err());
        assert!(p.check_url("http://user:pw@example.com/").is_err());
        assert!(p.check_url("not a url").is_err());
        assert!(p.check_url("https://example.com/hook?a=1").is_ok());
        let allow = AddressPolicy::parse("127.0.0.1/32, ::1").unwrap();
        assert!(allow.check_url("http://127.0.0.1:9/x").is_ok());
        assert!(allow.check_url("http://localhost:9/x").is_ok());
        assert!(allow.check_url("http://10.0.0.1/x").is_err());
    }

    #[test]
    fn traceparents() {
        let t = new_traceparent();
        assert!(valid_traceparent(&t), "{t}");
        assert!(!valid_traceparent("00-abc-def-01"));
    }
}
