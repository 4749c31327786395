//! Client configuration.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Configuration of a [`crate::RegistryClient`].
///
/// Deserializable (unknown fields are rejected, missing ones defaulted);
/// `timeout` is given in seconds (integer or fractional).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Hosts (`host[:port]`) reached over plain HTTP; `localhost`,
    /// `127.0.0.0/8` and `[::1]` are always plain HTTP.
    pub insecure: Vec<String>,
    /// Registry host -> (username, password), used for basic auth or for the
    /// bearer token request.
    pub credentials: HashMap<String, (String, String)>,
    /// Registry host -> mirror hosts tried first (for reads), falling back to
    /// the registry itself.
    pub mirrors: HashMap<String, Vec<String>>,
    /// Per request limit for connecting and receiving the response headers
    /// (also the limit for a stalled body read).
    #[serde(deserialize_with = "deserialize_secs")]
    pub timeout: Duration,
    /// Overall deadline of one manifest fetch from one endpoint (mirror or registry), from
    /// sending the request to the last byte, authentication and throttling retries included.
    /// `timeout` alone bounds only a stalled read: a registry that trickles a byte every few
    /// seconds would otherwise hold a deploy for ever. Seconds in the serialized form.
    #[serde(deserialize_with = "deserialize_secs")]
    pub manifest_deadline: Duration,
    /// Base of a blob download's overall deadline: a download (resumptions included) must
    /// finish within `blob_deadline_base + size / blob_min_bytes_per_sec`, where `size` is the
    /// length the registry announced (without one, the base alone applies). Seconds in the
    /// serialized form.
    #[serde(deserialize_with = "deserialize_secs")]
    pub blob_deadline_base: Duration,
    /// The slowest transfer rate a blob download is given time for (bytes per second).
    pub blob_min_bytes_per_sec: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure: Vec::new(),
            credentials: HashMap::new(),
            mirrors: HashMap::new(),
            timeout: Duration::from_secs(30),
            manifest_deadline: Duration::from_secs(30),
            blob_deadline_base: Duration::from_secs(60),
            blob_min_bytes_per_sec: 1 << 20,
        }
    }
}

impl RegistryConfig {
    /// The overall deadline of a blob download of `size` bytes (announced), see
    /// [`RegistryConfig::blob_deadline_base`].
    pub fn blob_deadline(&self, size: Option<u64>) -> Duration {
        let rate = self.blob_min_bytes_per_sec.max(1);
        let transfer = size
            .map(|s| Duration::from_secs(s.div_ceil(rate)))
            .unwrap_or_default();
        self.blob_deadline_base.saturating_add(transfer)
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print passwords.
        let creds: Vec<(&String, &String)> = self
            .credentials
            .iter()
            .map(|(host, (user, _))| (host, user))
            .collect();
        f.debug_struct("RegistryConfig")
            .field("insecure", &self.insecure)
            .field("credentials (host, user)", &creds)
            .field("mirrors", &self.mirrors)
            .field("timeout", &self.timeout)
            .field("manifest_deadline", &self.manifest_deadline)
            .field("blob_deadline_base", &self.blob_deadline_base)
            .field("blob_min_bytes_per_sec", &self.blob_min_bytes_per_sec)
            .finish()
    }
}

fn deserialize_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let secs = f64::deserialize(d)?;
    Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
}

/// The host part of `host[:port]` (brackets kept for IPv6 literals).
pub(crate) fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    }
}

/// Whether `host` (`host[:port]`) is always reached over plain HTTP.
pub(crate) fn is_loopback(host: &str) -> bool {
    let h = host_without_port(host);
    if h.eq_ignore_ascii_case("localhost") || h == "[::1]" {
        return true;
    }
    match h.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

impl RegistryConfig {
    /// Whether `host` is to be reached over plain HTTP.
    pub(crate) fn is_plain_http(&self, host: &str) -> bool {
        is_loopback(host)
            || self.insecure.iter().any(|i| {
                i.eq_ignore_ascii_case(host) || i.eq_ignore_ascii_case(host_without_port(host))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("localhost"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.3.2.1"));
        assert!(is_loopback("[::1]:5000"));
        assert!(is_loopback("[::1]"));
        assert!(!is_loopback("128.0.0.1"));
        assert!(!is_loopback("registry-1.docker.io"));
        assert!(!is_loopback("localhost.example.com"));
    }

    #[test]
    fn insecure_hosts() {
        let cfg = RegistryConfig {
            insecure: vec!["reg.lan:5000".into(), "other.lan".into()],
            ..Default::default()
        };
        assert!(cfg.is_plain_http("reg.lan:5000"));
        assert!(!cfg.is_plain_http("reg.lan:5001"));
        assert!(cfg.is_plain_http("other.lan:1234"));
        assert!(cfg.is_plain_http("other.lan"));
        assert!(!cfg.is_plain_http("ghcr.io"));
    }

    #[test]
    fn deserialize_with_defaults_and_unknown_fields() {
        let cfg: RegistryConfig =
            serde_json::from_str(r#"{"timeout": 2.5, "credentials": {"r.io": ["u", "p"]}}"#)
                .expect("valid config");
        assert_eq!(cfg.timeout, Duration::from_millis(2500));
        assert_eq!(cfg.credentials["r.io"], ("u".to_string(), "p".to_string()));
        assert!(cfg.insecure.is_empty());
        let cfg: RegistryConfig = serde_json::from_str("{}").expect("empty config");
        assert_eq!(cfg.timeout, Duration::from_secs(30));
        assert!(serde_json::from_str::<RegistryConfig>(r#"{"bogus": 1}"#).is_err());
        assert!(serde_json::from_str::<RegistryConfig>(r#"{"timeout": -1}"#).is_err());
        let cfg: RegistryConfig = serde_json::from_str(
            r#"{"manifest_deadline": 5, "blob_deadline_base": 10, "blob_min_bytes_per_sec": 1000}"#,
        )
        .expect("deadlines");
        assert_eq!(cfg.manifest_deadline, Duration::from_secs(5));
        assert_eq!(cfg.blob_deadline(None), Duration::from_secs(10));
        assert_eq!(cfg.blob_deadline(Some(1)), Duration::from_secs(11));
        assert_eq!(cfg.blob_deadline(Some(20_000)), Duration::from_secs(30));
    }

    #[test]
    fn default_blob_deadline_allows_a_slow_but_working_link() {
        let cfg = RegistryConfig::default();
        assert_eq!(cfg.manifest_deadline, Duration::from_secs(30));
        // 1 GiB at the minimum rate of 1 MiB/s, plus the base.
        assert_eq!(
            cfg.blob_deadline(Some(1 << 30)),
            Duration::from_secs(60 + 1024)
        );
    }

    #[test]
    fn debug_hides_passwords() {
        let mut cfg = RegistryConfig::default();
        cfg.credentials
            .insert("r.io".into(), ("alice".into(), "s3cret".into()));
        let s = format!("{cfg:?}");
        assert!(s.contains("alice"));
        assert!(!s.contains("s3cret"));
    }
}
