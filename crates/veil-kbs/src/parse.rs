//! Pure parsing and validation of protocol inputs (no state, no I/O), so that they can be
//! fuzzed on their own. Each returns a [`ProtocolError`] with the status the broker answers.

use crate::error::ProtocolError;
use crate::jwe;
pub use kbs_types::HashAlgorithm;
use kbs_types::{Attestation, Request, Tee, TeePubKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::str::FromStr;
use veil_attest::TeeKind;

/// The KBS attestation protocol version this broker speaks.
pub const PROTOCOL_VERSION: &str = "0.4.0";

/// Largest request body the broker accepts (1 MiB); larger ones get 413.
pub const MAX_BODY: usize = 1 << 20;

/// Key of the request's `extra-params` listing the hash algorithms a client supports.
pub const SUPPORTED_HASH_ALGORITHMS: &str = "supported-hash-algorithms";
/// Key of the challenge's `extra-params` naming the hash algorithm of the runtime-data binding.
pub const SELECTED_HASH_ALGORITHM: &str = "selected-hash-algorithm";
/// veil's extension: the key of the challenge's `extra-params` by which veil's broker says it
/// accepts the init-data digest in the additional evidence (value
/// [`VEIL_INIT_DATA_IN_ADDITIONAL_EVIDENCE`]), and the key of that digest inside the
/// additional evidence.
pub const VEIL_INIT_DATA: &str = "veil-init-data";
/// Value of [`VEIL_INIT_DATA`] in a challenge.
pub const VEIL_INIT_DATA_IN_ADDITIONAL_EVIDENCE: &str = "additional-evidence";
/// The init-data version veil writes (CoCo init-data specification).
pub const INIT_DATA_VERSION: &str = "0.1.0";
/// Prefix of the init-data `data` keys that carry veil's assignment.
pub const VEIL_DATA_PREFIX: &str = "veil.";

/// Hash algorithms in the order the broker prefers them (SHA-384 first: the protocol's default).
const PREFERRED: [HashAlgorithm; 3] = [
    HashAlgorithm::Sha384,
    HashAlgorithm::Sha512,
    HashAlgorithm::Sha256,
];

/// The broker's choice of hash algorithm for a request's `extra-params`: SHA-384 when the
/// client names none, else the first of SHA-384, SHA-512, SHA-256 the client supports.
pub fn select_hash_algorithm(
    extra_params: &serde_json::Value,
) -> Result<HashAlgorithm, ProtocolError> {
    let Some(list) = extra_params.get(SUPPORTED_HASH_ALGORITHMS) else {
        return Ok(HashAlgorithm::Sha384);
    };
    let names: Vec<String> = list
        .as_array()
        .ok_or_else(|| {
            ProtocolError::bad_request(
                "MalformedRequest",
                format!("{SUPPORTED_HASH_ALGORITHMS} must be an array of algorithm names"),
            )
        })?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_ascii_lowercase))
        .collect();
    PREFERRED
        .into_iter()
        .find(|a| names.iter().any(|n| *n == a.as_ref()))
        .ok_or_else(|| {
            ProtocolError::bad_request(
                "UnsupportedHashAlgorithm",
                format!(
                    "none of the client's hash algorithms {names:?} is supported (sha384, sha512, sha256)"
                ),
            )
        })
}

/// The client's reading of a challenge's `extra-params`: the selected algorithm, SHA-384 when
/// none is named (trustee's KBS sends an empty string there).
pub fn challenge_hash_algorithm(extra_params: &serde_json::Value) -> Result<HashAlgorithm, String> {
    match extra_params.get(SELECTED_HASH_ALGORITHM) {
        None => Ok(HashAlgorithm::Sha384),
        Some(v) => {
            let name = v
                .as_str()
                .ok_or_else(|| format!("{SELECTED_HASH_ALGORITHM} is not a string"))?
                .to_ascii_lowercase();
            match name.parse::<HashAlgorithm>() {
                Ok(a) if PREFERRED.contains(&a) => Ok(a),
                _ => Err(format!("unsupported {SELECTED_HASH_ALGORITHM} {name:?}")),
            }
        }
    }
}

/// The runtime-data binding of the KBS protocol (guest-components' `kbs_protocol`, trustee):
/// `alg(JCS({"additional-evidence", "nonce", "tee-pubkey"}))`, the hash of the RFC 8785
/// canonical JSON of the nonce as sent, the TEE key as a JWK and the additional-evidence string.
/// The evidence carries it as its report data (padded with zeros to 64 bytes on SNP and TDX).
pub fn runtime_data_digest(
    alg: HashAlgorithm,
    nonce: &str,
    tee_pubkey: &TeePubKey,
    additional_evidence: &str,
) -> Vec<u8> {
    let v = serde_json::json!({
        "additional-evidence": additional_evidence,
        "nonce": nonce,
        "tee-pubkey": tee_pubkey,
    });
    // Canonicalising a JSON value of strings cannot fail; an empty encoding would only make the
    // binding fail to match, never match wrongly.
    alg.digest(&serde_json_canonicalizer::to_vec(&v).unwrap_or_default())
}

/// The additional evidence by which veil's agent binds its init data into the runtime data:
/// the canonical JSON `{"veil-init-data": "<hex digest of the init-data body>"}`.
pub fn veil_additional_evidence(init_data_digest: &[u8]) -> String {
    let v = serde_json::json!({ VEIL_INIT_DATA: hex::encode(init_data_digest) });
    String::from_utf8(serde_json_canonicalizer::to_vec(&v).unwrap_or_default()).unwrap_or_default()
}

/// An init-data document (Confidential Containers init-data specification, TOML):
/// `version`, `algorithm` (of its digest) and `data`, a map of names to strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitDataDoc {
    /// Specification version (`0.1.0`).
    pub version: String,
    /// Hash algorithm of the document's digest.
    pub algorithm: String,
    /// The data.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// Init data as received: the document, its digest and veil's assignment in it, if any.
#[derive(Debug, Clone)]
pub struct ParsedInitData {
    /// The body exactly as sent.
    pub body: String,
    /// Its digest with its own algorithm (the value HOSTDATA/MRCONFIGID or veil's additional
    /// evidence binds).
    pub digest: Vec<u8>,
    /// The document.
    pub doc: InitDataDoc,
    /// veil's assignment within it (the `veil.*` data), as the policy sees it, and its checked
    /// core.
    pub assignment: Option<(serde_json::Value, Assignment)>,
    /// For init data of tenant scope (`veil.scope = "tenant"`: a pooled sandbox attesting to
    /// its tenant before it has a function), the tenant.
    pub tenant_scope: Option<String>,
}

/// The `veil.scope` of init data that binds a sandbox to a tenant only; its function comes
/// later, in an assignment statement ([`crate::statement`]).
pub const TENANT_SCOPE: &str = "tenant";

/// The function a host endorses a software-TEE sandbox for when it attests with tenant scope.
pub const ANY_FUNCTION: &str = "*";

/// Largest init-data body accepted (64 KiB).
pub const MAX_INIT_DATA: usize = 64 << 10;

/// Parse an init-data TOML body and compute its digest.
pub fn parse_init_data(body: &str) -> Result<ParsedInitData, ProtocolError> {
    let bad = |m: String| ProtocolError::bad_request("InvalidInitData", m);
    if body.len() > MAX_INIT_DATA {
        return Err(bad(format!(
            "init-data is larger than {MAX_INIT_DATA} bytes"
        )));
    }
    let doc: InitDataDoc = toml::from_str(body).map_err(|e| {
        bad(format!(
            "init-data is not a CoCo init-data TOML document: {e}"
        ))
    })?;
    let alg = doc
        .algorithm
        .to_ascii_lowercase()
        .parse::<HashAlgorithm>()
        .ok()
        .filter(|a| PREFERRED.contains(a))
        .ok_or_else(|| {
            bad(format!(
                "init-data algorithm {:?} is not sha256, sha384 or sha512",
                doc.algorithm
            ))
        })?;
    if semver::Version::parse(&doc.version).map_or(true, |v| v.major != 0 || v.minor != 1) {
        return Err(bad(format!(
            "init-data version {:?} is not supported (expected {INIT_DATA_VERSION})",
            doc.version
        )));
    }
    let (assignment, tenant_scope) = match doc.data.get("veil.scope").map(String::as_str) {
        None => (assignment_from_data(&doc.data)?, None),
        Some(TENANT_SCOPE) => {
            let tenant = doc.data.get("veil.tenant").cloned().unwrap_or_default();
            check_segment("tenant", &tenant).map_err(|m| bad(format!("init data: {m}")))?;
            if let Some(k) = doc.data.keys().find(|k| {
                k.starts_with(VEIL_DATA_PREFIX)
                    && !["veil.tenant", "veil.scope"].contains(&k.as_str())
            }) {
                return Err(bad(format!(
                    "init data of tenant scope names only the tenant, not {k}"
                )));
            }
            (None, Some(tenant))
        }
        Some(other) => return Err(bad(format!("init data: unknown veil.scope {other:?}"))),
    };
    Ok(ParsedInitData {
        body: body.to_string(),
        digest: alg.digest(body.as_bytes()),
        doc,
        assignment,
        tenant_scope,
    })
}

/// The init-data document veil's agent sends: its assignment as `veil.*` data. String fields
/// are kept as strings; structured ones (`secrets`, `image_keys`, `env`) as compact JSON.
pub fn veil_init_data(assignment: &serde_json::Value) -> Result<String, String> {
    if !assignment.is_object() {
        return Err("the assignment must be a JSON object".into());
    }
    let data = veil_data(assignment);
    let doc = InitDataDoc {
        version: INIT_DATA_VERSION.into(),
        algorithm: HashAlgorithm::Sha384.as_ref().to_string(),
        data,
    };
    toml::to_string(&doc).map_err(|e| e.to_string())
}

/// An assignment object as init-data `data`: `veil.<member>` for every member that is not
/// null, strings as they are, anything else as compact JSON.
pub fn veil_data(assignment: &serde_json::Value) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    for (k, v) in assignment.as_object().into_iter().flatten() {
        let text = match v {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        data.insert(format!("{VEIL_DATA_PREFIX}{k}"), text);
    }
    data
}

/// The `veil.*` data as the policy's `init_data` object and the checked [`Assignment`], or
/// `None` when the document carries no veil assignment (no `veil.tenant`).
fn assignment_from_data(
    data: &BTreeMap<String, String>,
) -> Result<Option<(serde_json::Value, Assignment)>, ProtocolError> {
    if !data.contains_key("veil.tenant") {
        return Ok(None);
    }
    let bad = |m: String| ProtocolError::bad_request("InvalidInitData", m);
    let mut obj = serde_json::Map::new();
    for (k, v) in data {
        let Some(name) = k.strip_prefix(VEIL_DATA_PREFIX) else {
            continue;
        };
        let value = match name {
            "secrets" | "image_keys" | "env" => serde_json::from_str(v)
                .map_err(|e| bad(format!("init data: {k} is not JSON: {e}")))?,
            _ => serde_json::Value::String(v.clone()),
        };
        obj.insert(name.to_string(), value);
    }
    let value = serde_json::Value::Object(obj);
    let (value, a) = parse_assignment(&serde_json::to_vec(&value).unwrap_or_default())?;
    Ok(Some((value, a)))
}

/// What the additional evidence carries for veil.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdditionalEvidence {
    /// The init-data digest veil's agent bound into the runtime data.
    pub veil_init_data: Option<Vec<u8>>,
}

/// Parse the additional evidence: empty, or a JSON object whose only member veil understands
/// is [`VEIL_INIT_DATA`]. Device evidence (members named by a TEE) is refused: this broker does
/// not verify it, and must not pretend to.
pub fn parse_additional_evidence(s: &str) -> Result<AdditionalEvidence, ProtocolError> {
    if s.is_empty() {
        return Ok(AdditionalEvidence::default());
    }
    let bad = |m: String| ProtocolError::bad_request("UnsupportedAdditionalEvidence", m);
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(s)
        .map_err(|e| bad(format!("additional-evidence is not a JSON object: {e}")))?;
    let mut out = AdditionalEvidence::default();
    for (k, v) in v {
        if k == VEIL_INIT_DATA {
            let d = v
                .as_str()
                .and_then(|h| hex::decode(h).ok())
                .filter(|d| (32..=64).contains(&d.len()))
                .ok_or_else(|| bad(format!("{VEIL_INIT_DATA} must be a hex digest")))?;
            out.veil_init_data = Some(d);
        } else {
            return Err(bad(format!(
                "additional evidence for {k:?} (device attestation) is not verified by this broker"
            )));
        }
    }
    Ok(out)
}

/// veil's assignment of a sandbox, carried in the attestation's init data as `veil.*` data.
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
    /// The init data, if any was sent.
    pub init_data: Option<ParsedInitData>,
    /// The additional evidence.
    pub additional: AdditionalEvidence,
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

/// Check an assignment stated by a tenant-attested sandbox (the JSON object of
/// [`crate::statement`]).
pub fn check_stated_assignment(v: &serde_json::Value) -> Result<Assignment, ProtocolError> {
    parse_assignment(&serde_json::to_vec(v).unwrap_or_default()).map(|(_, a)| a)
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

/// Parse an `/attest` body: JSON `Attestation`; init data absent (`null`) or a CoCo init-data
/// TOML document (format `toml`), possibly holding veil's assignment; the additional evidence;
/// and a P-256 `tee-pubkey` on the curve. Init data whose digest does not match the one the
/// additional evidence binds is refused here.
pub fn parse_attestation(body: &[u8]) -> Result<ParsedAttestation, ProtocolError> {
    let attestation: Attestation =
        serde_json::from_slice(body).map_err(|e| json_error("attestation", &e))?;
    let init_data = match &attestation.init_data {
        None => None,
        Some(init) if init.format == "toml" => Some(parse_init_data(&init.body)?),
        Some(init) => {
            return Err(ProtocolError::bad_request(
                "InvalidInitData",
                format!(
                    "init-data format {:?} is not supported (only \"toml\", the CoCo init-data \
                     format, or no init-data)",
                    init.format
                ),
            ))
        }
    };
    let additional = parse_additional_evidence(&attestation.tee_evidence.additional_evidence)?;
    if let Some(bound) = &additional.veil_init_data {
        let init = init_data.as_ref().ok_or_else(|| {
            ProtocolError::bad_request(
                "InvalidInitData",
                format!(
                    "the additional evidence binds {VEIL_INIT_DATA}, but no init-data was sent"
                ),
            )
        })?;
        if *bound != init.digest {
            return Err(ProtocolError::unauthorized(
                "InitDataMismatch",
                format!(
                    "the init-data digest is {}, but the evidence binds {}",
                    hex::encode(&init.digest),
                    hex::encode(bound)
                ),
            ));
        }
    }
    jwe::tee_public_key(&attestation.runtime_data.tee_pubkey)
        .map_err(|e| ProtocolError::bad_request("InvalidTeePubKey", e.to_string()))?;
    Ok(ParsedAttestation {
        attestation,
        init_data,
        additional,
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

/// Whether reference value `name` holds names (also in its per-tenant form `<name>.<tenant>`).
fn is_name_like(name: &str) -> bool {
    NAME_REFERENCE_VALUES
        .iter()
        .any(|n| name == *n || name.strip_prefix(n).is_some_and(|t| t.starts_with('.')))
}

/// Lowercase digest-like values; keep name-like ones as written.
pub fn normalize_reference_values(name: &str, values: &[String]) -> Vec<String> {
    if is_name_like(name) {
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
    if is_name_like(name) {
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

    /// The binding is the hash of the sorted, compact JSON of the three members, as trustee and
    /// its client compute it (checked against trustee's binaries in `tests/trustee.rs`).
    #[test]
    fn runtime_data_binding_is_canonical_json() {
        let key = crate::jwe::TeeKeyPair::generate().public_key();
        let manual = format!(
            r#"{{"additional-evidence":"","nonce":"n0","tee-pubkey":{}}}"#,
            {
                let v = serde_json::to_value(&key).unwrap();
                let o = v.as_object().unwrap();
                let mut keys: Vec<_> = o.keys().collect();
                keys.sort();
                let parts: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{:?}:{}", k, o[k.as_str()]))
                    .collect();
                format!("{{{}}}", parts.join(","))
            }
        );
        for alg in PREFERRED {
            assert_eq!(
                runtime_data_digest(alg, "n0", &key, ""),
                alg.digest(manual.as_bytes())
            );
        }
        assert_ne!(
            runtime_data_digest(HashAlgorithm::Sha384, "n0", &key, "x"),
            runtime_data_digest(HashAlgorithm::Sha384, "n0", &key, "")
        );
    }

    #[test]
    fn hash_algorithm_negotiation() {
        use serde_json::json;
        assert_eq!(
            select_hash_algorithm(&json!({})).unwrap(),
            HashAlgorithm::Sha384
        );
        assert_eq!(
            select_hash_algorithm(&json!("")).unwrap(),
            HashAlgorithm::Sha384
        );
        assert_eq!(
            select_hash_algorithm(&json!({SUPPORTED_HASH_ALGORITHMS: ["SHA256", "sha512"]}))
                .unwrap(),
            HashAlgorithm::Sha512
        );
        assert_eq!(
            select_hash_algorithm(&json!({SUPPORTED_HASH_ALGORITHMS: ["sm3"]}))
                .unwrap_err()
                .status,
            400
        );
        assert!(select_hash_algorithm(&json!({SUPPORTED_HASH_ALGORITHMS: "sha384"})).is_err());
        assert_eq!(
            challenge_hash_algorithm(&json!("")).unwrap(),
            HashAlgorithm::Sha384
        );
        assert_eq!(
            challenge_hash_algorithm(&json!({SELECTED_HASH_ALGORITHM: "sha256"})).unwrap(),
            HashAlgorithm::Sha256
        );
        assert!(challenge_hash_algorithm(&json!({SELECTED_HASH_ALGORITHM: "md5"})).is_err());
    }

    #[test]
    fn init_data_documents() {
        let a = serde_json::json!({"tenant": "acme", "function": "hello",
            "image": "localhost/acme/hello:1",
            "image_digest": format!("sha256:{}", "a".repeat(64)),
            "secrets": {"K": "acme/key/k"}, "image_keys": [], "signature_policy": null,
            "env": {"A": "b"}});
        let body = veil_init_data(&a).unwrap();
        let p = parse_init_data(&body).unwrap();
        assert_eq!(p.digest, HashAlgorithm::Sha384.digest(body.as_bytes()));
        let (value, core) = p.assignment.unwrap();
        assert_eq!(core.tenant, "acme");
        assert_eq!(value["secrets"]["K"], "acme/key/k");
        assert_eq!(value["env"]["A"], "b");
        assert!(value.get("signature_policy").is_none());
        // Tenant scope: the tenant only.
        let t = veil_init_data(&serde_json::json!({"tenant": "acme", "scope": "tenant"})).unwrap();
        let p = parse_init_data(&t).unwrap();
        assert_eq!(p.tenant_scope.as_deref(), Some("acme"));
        assert!(p.assignment.is_none());
        for bad in [
            serde_json::json!({"tenant": "acme", "scope": "tenant", "function": "f"}),
            serde_json::json!({"tenant": "a/b", "scope": "tenant"}),
            serde_json::json!({"tenant": "acme", "scope": "node"}),
        ] {
            let d = veil_init_data(&bad).unwrap();
            assert_eq!(parse_init_data(&d).unwrap_err().status, 400, "{bad}");
        }
        // A CoCo document without veil data is init data without an assignment.
        let coco = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"aa.toml\" = \"x\"\n";
        let p = parse_init_data(coco).unwrap();
        assert!(p.assignment.is_none());
        assert_eq!(p.digest.len(), 32);
        for bad in [
            "not toml = = =",
            "version = \"0.1.0\"\nalgorithm = \"md5\"\n",
            "version = \"9.0.0\"\nalgorithm = \"sha384\"\n",
            "version = \"0.1.0\"\nalgorithm = \"sha384\"\nextra = 1\n",
            "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"veil.tenant\" = \"a\"\n",
            "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"veil.tenant\" = \"a\"\n\"veil.function\" = \"f\"\n\"veil.image_digest\" = \"sha256:00\"\n",
        ] {
            assert_eq!(parse_init_data(bad).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn additional_evidence() {
        assert_eq!(
            parse_additional_evidence("").unwrap(),
            AdditionalEvidence::default()
        );
        let d = [7u8; 48];
        assert_eq!(
            parse_additional_evidence(&veil_additional_evidence(&d))
                .unwrap()
                .veil_init_data
                .unwrap(),
            d
        );
        for bad in [
            r#"{"sampledevice": {}}"#,
            r#"{"veil-init-data": "zz"}"#,
            "[1]",
            "x",
        ] {
            assert_eq!(
                parse_additional_evidence(bad).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }

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
        let init = veil_init_data(&serde_json::json!({"tenant": "t", "function": "f",
            "image_digest": format!("sha256:{}", "0".repeat(64))}))
        .unwrap();
        let digest = parse_init_data(&init).unwrap().digest;
        let att = serde_json::to_vec(&serde_json::json!({
            "init-data": {"format": "toml", "body": init},
            "runtime-data": {"nonce": "bm9uY2U=", "tee-pubkey": key.public_key()},
            "tee-evidence": {"primary_evidence": {},
                "additional_evidence": veil_additional_evidence(&digest)},
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
