//! Pure parsing and validation of protocol inputs (no state, no I/O), so that they can be
//! fuzzed on their own. Each returns a [`ProtocolError`] with the status the broker answers.

use crate::error::ProtocolError;
use crate::jwe;
use kbs_types::{Attestation, Request, Tee, TeePubKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use std::str::FromStr;
use veil_attest::{TeeKind, REPORT_DATA_LEN};

/// The KBS attestation protocol version this broker speaks.
pub const PROTOCOL_VERSION: &str = "0.4.0";

/// Largest request body the broker accepts (1 MiB); larger ones get 413.
pub const MAX_BODY: usize = 1 << 20;

/// The report data that binds evidence to one session and one key:
/// `SHA-512(nonce ‖ 0x0a ‖ serde_json::to_vec(tee_pubkey) ‖ 0x0a ‖ init_data)`, where `nonce`
/// is the challenge's nonce string as sent and `init_data` the init-data body bytes as sent.
pub fn binding(nonce: &str, tee_pubkey: &TeePubKey, init_data: &[u8]) -> [u8; REPORT_DATA_LEN] {
    let mut h = Sha512::new();
    h.update(nonce.as_bytes());
    h.update(b"\n");
    // Serializing a plain struct of strings cannot fail; an empty encoding would only make
    // the binding fail to match, never match wrongly.
    h.update(serde_json::to_vec(tee_pubkey).unwrap_or_default());
    h.update(b"\n");
    h.update(init_data);
    h.finalize().into()
}

/// veil's assignment of a sandbox, carried as the attestation's init data (format `json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The tenant (also the resource repository the sandbox may read).
    pub tenant: String,
    /// The function.
    pub function: String,
    /// The image manifest digest, `sha256:<64 hex>`.
    pub image_digest: String,
}

/// A parsed and checked `/attest` body.
#[derive(Debug, Clone)]
pub struct ParsedAttestation {
    /// The wire message.
    pub attestation: Attestation,
    /// The init data body bytes exactly as sent (bound into the report data).
    pub init_data_body: Vec<u8>,
    /// The init data parsed as JSON (policy input).
    pub init_data: serde_json::Value,
    /// The assignment within it.
    pub assignment: Assignment,
}

/// A resource path `<repo>/<type>/<tag>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourcePath {
    /// The repository (for veil, the tenant).
    pub repository: String,
    /// The type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The tag.
    pub tag: String,
}

impl std::fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.repository, self.kind, self.tag)
    }
}

/// Check one path segment: 1–128 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn check_segment(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 128 {
        return Err(format!("{what} must be 1 to 128 characters"));
    }
    if s == "." || s == ".." {
        return Err(format!("{what} must not be {s:?}"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{what} may only contain letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Parse `<repo>/<type>/<tag>`.
pub fn parse_resource_path(path: &str) -> Result<ResourcePath, ProtocolError> {
    let bad = |reason: String| {
        ProtocolError::bad_request(
            "InvalidResourcePath",
            format!("invalid resource path {path:?}: {reason}"),
        )
    };
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let [repo, kind, tag] = parts.as_slice() else {
        return Err(bad("expected <repository>/<type>/<tag>".into()));
    };
    check_segment("repository", repo).map_err(bad)?;
    check_segment("type", kind).map_err(bad)?;
    check_segment("tag", tag).map_err(bad)?;
    Ok(ResourcePath {
        repository: repo.to_string(),
        kind: kind.to_string(),
        tag: tag.to_string(),
    })
}

fn json_error(what: &str, e: &serde_json::Error) -> ProtocolError {
    ProtocolError::bad_request("MalformedRequest", format!("malformed {what}: {e}"))
}

/// Map a KBS TEE name to the TEE kinds veil verifies.
pub fn tee_kind(tee: Tee) -> Result<TeeKind, ProtocolError> {
    match tee {
        Tee::Sample => Ok(TeeKind::Software),
        Tee::Snp => Ok(TeeKind::Snp),
        Tee::Tdx => Ok(TeeKind::Tdx),
        other => Err(ProtocolError::bad_request(
            "UnsupportedTee",
            format!("TEE {other} is not supported by this broker (supported: sample, snp, tdx)"),
        )),
    }
}

/// The KBS TEE name for a veil TEE kind.
pub fn kbs_tee(kind: TeeKind) -> Tee {
    match kind {
        TeeKind::Software => Tee::Sample,
        TeeKind::Snp => Tee::Snp,
        TeeKind::Tdx => Tee::Tdx,
    }
}

/// Parse an `/auth` body: JSON, a compatible protocol version and a TEE veil knows.
pub fn parse_request(body: &[u8]) -> Result<(Request, TeeKind), ProtocolError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| json_error("request", &e))?;
    if let Some(t) = v.get("tee").and_then(|t| t.as_str()) {
        if Tee::from_str(t).is_err() {
            return Err(ProtocolError::bad_request(
                "UnsupportedTee",
                format!("unknown TEE {t:?} (supported: sample, snp, tdx)"),
            ));
        }
    }
    let req: Request = serde_json::from_value(v).map_err(|e| json_error("request", &e))?;
    check_version(&req.version)?;
    let kind = tee_kind(req.tee)?;
    Ok((req, kind))
}

/// Require `version` to be semver-compatible with [`PROTOCOL_VERSION`].
pub fn check_version(version: &str) -> Result<(), ProtocolError> {
    let mismatch = || {
        ProtocolError::bad_request(
            "ProtocolVersion",
            format!(
                "protocol version {version:?} is not compatible with this broker's version {PROTOCOL_VERSION}"
            ),
        )
    };
    let v = semver::Version::parse(version).map_err(|_| mismatch())?;
    let req = semver::VersionReq::parse(&format!("^{PROTOCOL_VERSION}"))
        .map_err(|e| ProtocolError::internal(e.to_string()))?;
    if !req.matches(&v) {
        return Err(mismatch());
    }
    Ok(())
}

/// Parse and check veil's assignment from an init-data body.
pub fn parse_assignment(body: &[u8]) -> Result<(serde_json::Value, Assignment), ProtocolError> {
    let bad = |m: String| ProtocolError::bad_request("InvalidInitData", m);
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("init data is not JSON: {e}")))?;
    let a: Assignment = serde_json::from_value(value.clone())
        .map_err(|e| bad(format!("init data is not a veil assignment: {e}")))?;
    check_segment("tenant", &a.tenant).map_err(|m| bad(format!("init data: {m}")))?;
    if a.function.is_empty() || a.function.len() > 253 {
        return Err(bad("init data: function must be 1 to 253 characters".into()));
    }
    let hex = a.image_digest.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad(
            "init data: image_digest must be sha256:<64 lowercase hex digits>".into(),
        ));
    }
    Ok((value, a))
}

/// Parse an `/attest` body: JSON `Attestation`, `json` init data holding an assignment, and a
/// P-256 `tee-pubkey` on the curve.
pub fn parse_attestation(body: &[u8]) -> Result<ParsedAttestation, ProtocolError> {
    let attestation: Attestation =
        serde_json::from_slice(body).map_err(|e| json_error("attestation", &e))?;
    let init = attestation.init_data.as_ref().ok_or_else(|| {
        ProtocolError::bad_request(
            "InvalidInitData",
            "init-data is required: it carries the sandbox's assignment",
        )
    })?;
    if init.format != "json" {
        return Err(ProtocolError::bad_request(
            "InvalidInitData",
            format!(
                "init-data format {:?} is not supported (only \"json\")",
                init.format
            ),
        ));
    }
    let init_data_body = init.body.as_bytes().to_vec();
    let (init_data, assignment) = parse_assignment(&init_data_body)?;
    jwe::tee_public_key(&attestation.runtime_data.tee_pubkey)
        .map_err(|e| ProtocolError::bad_request("InvalidTeePubKey", e.to_string()))?;
    Ok(ParsedAttestation {
        attestation,
        init_data_body,
        init_data,
        assignment,
    })
}

/// Reference values that are names, not digests: the image reference a deployment names and
/// the broker resource of its signature policy. They are kept as written (tags are
/// case-sensitive).
pub const NAME_REFERENCE_VALUES: [&str; 3] = ["image", "signature_policy", "software_tee_tenants"];

/// Parse a reference-value list for `name`: a JSON array of 1–256 values, each hex or
/// `<alg>:<hex>` (at most 200 characters), returned lowercase; or, for the names in
/// [`NAME_REFERENCE_VALUES`], printable strings of at most 512 characters, kept as written.
pub fn parse_reference_values(name: &str, body: &[u8]) -> Result<Vec<String>, ProtocolError> {
    let bad = |m: String| ProtocolError::bad_request("InvalidReferenceValue", m);
    let values: Vec<String> = serde_json::from_slice(body)
        .map_err(|e| bad(format!("expected a JSON array of strings: {e}")))?;
    check_reference_values(name, &values).map_err(bad)?;
    Ok(normalize_reference_values(name, &values))
}

/// Lowercase digest-like values; keep name-like ones as written.
pub fn normalize_reference_values(name: &str, values: &[String]) -> Vec<String> {
    if NAME_REFERENCE_VALUES.contains(&name) {
        values.to_vec()
    } else {
        values.iter().map(|v| v.to_ascii_lowercase()).collect()
    }
}

/// Check reference values (see [`parse_reference_values`]).
pub fn check_reference_values(name: &str, values: &[String]) -> Result<(), String> {
    if values.len() > 256 {
        return Err("at most 256 reference values per name".into());
    }
    if NAME_REFERENCE_VALUES.contains(&name) {
        for v in values {
            if v.is_empty() || v.len() > 512 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "reference value {v:?} for {name} must be 1-512 printable characters without spaces"
                ));
            }
        }
        return Ok(());
    }
    for v in values {
        let hex = match v.split_once(':') {
            Some((alg, hex))
                if !alg.is_empty() && alg.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                hex
            }
            Some(_) => return Err(format!("reference value {v:?} is not <alg>:<hex>")),
            None => v.as_str(),
        };
        if v.len() > 200 || hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "reference value {v:?} is not hex (or <alg>:<hex>, at most 200 characters)"
            ));
        }
    }
    Ok(())
}

/// The `kbs-session-id` cookie value in a `Cookie` header, if any.
pub fn session_cookie(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == crate::SESSION_COOKIE)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(check_version("0.4.0").is_ok());
        assert!(check_version("0.4.7").is_ok());
        for v in ["0.1.0", "0.3.0", "0.5.0", "1.0.0", "x"] {
            let e = check_version(v).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.detail.contains("0.4.0"), "{e}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(
            parse_resource_path("t1/key/image").unwrap().to_string(),
            "t1/key/image"
        );
        for p in ["a/b", "a/b/c/d", "../b/c", "a/./c", "a/b/c d", "", "a//c"] {
            assert_eq!(parse_resource_path(p).unwrap_err().status, 400, "{p}");
        }
    }

    #[test]
    fn cookies() {
        assert_eq!(session_cookie("a=b; kbs-session-id=xyz; c=d"), Some("xyz"));
        assert_eq!(session_cookie("a=b"), None);
    }

    #[test]
    fn reference_values() {
        assert_eq!(
            parse_reference_values("measurement", br#"["AB", "sha256:00"]"#).unwrap(),
            vec!["ab", "sha256:00"]
        );
        for bad in [&br#"["zz"]"#[..], br#"[""]"#, br#"{"a":1}"#, br#"[":00"]"#] {
            assert!(parse_reference_values("measurement", bad).is_err());
        }
    }

    /// Truncations and byte flips of valid bodies: parsers answer 400 or succeed, never panic.
    #[test]
    fn mutated_inputs_never_panic() {
        let key = crate::jwe::TeeKeyPair::generate();
        let init = r#"{"tenant":"t","function":"f","image_digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"}"#;
        let att = serde_json::to_vec(&serde_json::json!({
            "init-data": {"format": "json", "body": init},
            "runtime-data": {"nonce": "bm9uY2U=", "tee-pubkey": key.public_key()},
            "tee-evidence": {"primary_evidence": {}, "additional_evidence": ""},
        }))
        .unwrap();
        assert!(parse_attestation(&att).is_ok());
        let req = br#"{"version":"0.4.0","tee":"sample","extra-params":{}}"#.to_vec();
        assert!(parse_request(&req).is_ok());
        let jwe =
            serde_json::to_vec(&crate::jwe::encrypt(&key.public_key(), b"x").unwrap()).unwrap();
        for body in [att, req, jwe] {
            for cut in 0..body.len() {
                let mut m = body[..cut].to_vec();
                for r in [parse_request(&m).err(), parse_attestation(&m).err()]
                    .into_iter()
                    .flatten()
                {
                    assert_eq!(r.status, 400);
                }
                let _ = key.decrypt(&m);
                if let Some(b) = m.last_mut() {
                    *b ^= 0x20;
                }
                let _ = parse_request(&m);
                let _ = parse_attestation(&m);
                let _ = key.decrypt(&m);
            }
        }
    }
}
