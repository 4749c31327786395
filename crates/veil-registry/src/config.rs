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
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure: Vec::new(),
            credentials: HashMap::new(),
            mirrors: HashMap::new(),
            timeout: Duration::from_secs(30),
        }
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
