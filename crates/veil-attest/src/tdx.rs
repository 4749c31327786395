//! Intel TDX: the [`TdxVerifier`] checks DCAP quotes offline with collateral (via `dcap-qvl`),
//! and the [`TdxAttester`] fetches quotes inside a TD through configfs-tsm.
//!
//! # Evidence
//! ```json
//! {"quote": "<base64 of the DCAP quote>", "collateral": { ...QuoteCollateralV3 JSON... } | null}
//! ```
//! The collateral object is the one PCCS clients produce (`tcb_info`, `qe_identity`, CRLs as hex,
//! issuer chains as PEM). When it is null or absent, the verifier uses the collateral files of
//! [`TdxVerifier::with_collateral_dir`].
//!
//! # Trust
//! Intel's SGX Root CA is compiled in (`certs/tdx/intel_sgx_root_ca.der`). `dcap-qvl` checks the
//! PCK chain in the quote and the collateral's issuer chains up to it, the CRLs, the QE report
//! signature and the quote signature, the TCB Info and QE Identity signatures and freshness at
//! `now`, and matches the TCB level. A `Revoked` TCB fails; any other status (UpToDate,
//! SWHardeningNeeded, OutOfDate, …) verifies and is reported in `details.tcb_status` so that
//! policy decides. Debug TDs verify too, with `Claims.debug = true`.

use crate::{check_report_data, Attester, Claims, Error, TeeKind, Verifier, REPORT_DATA_LEN};
use base64::Engine as _;
use dcap_qvl::quote::{Quote, Report};
use dcap_qvl::QuoteCollateralV3;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Intel SGX Root CA (DER), the trust anchor for DCAP quotes.
pub const INTEL_SGX_ROOT_CA_DER: &[u8] = include_bytes!("../certs/tdx/intel_sgx_root_ca.der");

/// DCAP `tee_type` of TDX quotes.
const TEE_TYPE_TDX: u32 = 0x81;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The TDX evidence shape (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdxEvidence {
    /// Base64 of the raw DCAP quote.
    pub quote: String,
    /// The collateral JSON object, or null to use the verifier's collateral directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collateral: Option<serde_json::Value>,
    /// Base64 of the CC event log (ACPI CCEL table), as Confidential Containers' attester sends
    /// it. Carried for policies that replay it; veil does not check it against the RTMRs.
    #[serde(default)]
    pub cc_eventlog: Option<String>,
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        tee: TeeKind::Tdx,
        reason: reason.into(),
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::Invalid {
        tee: TeeKind::Tdx,
        reason: reason.into(),
    }
}

/// Verifier of TDX evidence.
pub struct TdxVerifier {
    root_ca_der: Vec<u8>,
    collateral_dir: Option<PathBuf>,
}

impl Default for TdxVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl TdxVerifier {
    /// A verifier anchored at the embedded Intel SGX Root CA.
    pub fn new() -> Self {
        Self {
            root_ca_der: INTEL_SGX_ROOT_CA_DER.to_vec(),
            collateral_dir: None,
        }
    }

    /// Use the collateral JSON files (`*.json`) in `dir` for evidence that carries none. They
    /// are tried newest TCB Info first; the first that verifies wins.
    pub fn with_collateral_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.collateral_dir = Some(dir.into());
        self
    }

    fn collateral_candidates(
        &self,
        ev: &TdxEvidence,
    ) -> Result<Vec<(String, QuoteCollateralV3)>, Error> {
        if let Some(c) = ev.collateral.as_ref().filter(|c| !c.is_null()) {
            return Ok(vec![("evidence".into(), parse_collateral(c.clone())?)]);
        }
        let Some(dir) = &self.collateral_dir else {
            return Err(malformed(
                "evidence carries no collateral and no collateral directory is configured",
            ));
        };
        let rd =
            std::fs::read_dir(dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
        let mut found = Vec::new();
        for entry in rd.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match load_collateral(&path) {
                Ok(c) => found.push((path.display().to_string(), c)),
                Err(e) => tracing::debug!("skipping {}: {e}", path.display()),
            }
        }
        if found.is_empty() {
            return Err(malformed(format!(
                "no collateral JSON files in {}",
                dir.display()
            )));
        }
        found.sort_by_key(|(_, c)| std::cmp::Reverse(tcb_info_issue_date(c)));
        Ok(found)
    }

    /// Verify; `expected == None` skips the report-data binding (for operator inspection).
    pub(crate) fn verify_inner(
        &self,
        evidence: &serde_json::Value,
        expected: Option<&[u8; REPORT_DATA_LEN]>,
        now: SystemTime,
    ) -> Result<Claims, Error> {
        let ev: TdxEvidence = serde_json::from_value(evidence.clone())
            .map_err(|e| malformed(format!("evidence: {e}")))?;
        let raw = B64
            .decode(ev.quote.trim())
            .map_err(|e| malformed(format!("quote is not base64: {e}")))?;
        let quote = Quote::parse(&raw).map_err(|e| malformed(format!("quote: {e:#}")))?;
        if quote.header.tee_type != TEE_TYPE_TDX {
            return Err(invalid(format!(
                "not a TDX quote (tee_type {:#x}; SGX enclave quotes are not accepted)",
                quote.header.tee_type
            )));
        }
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| invalid("time is before 1970"))?
            .as_secs();
        let verifier =
            dcap_qvl::verify::QuoteVerifier::new(self.root_ca_der.clone()).allow_debug(true);
        let mut errors = Vec::new();
        for (source, collateral) in self.collateral_candidates(&ev)? {
            match verifier.verify(&raw, &collateral, now_secs) {
                Ok(verified) => {
                    if verified.status == "Revoked" {
                        return Err(invalid("TCB status is Revoked"));
                    }
                    let claims = claims(&quote, Some(&verified))?;
                    if let Some(expected) = expected {
                        let rd = hex::decode(&claims.report_data).unwrap_or_default();
                        check_report_data(TeeKind::Tdx, &rd, expected)?;
                    }
                    return Ok(claims);
                }
                Err(e) => errors.push(format!("{e:#} (collateral from {source})")),
            }
        }
        Err(invalid(errors.join("; ")))
    }
}

fn parse_collateral(v: serde_json::Value) -> Result<QuoteCollateralV3, Error> {
    serde_json::from_value(v).map_err(|e| malformed(format!("collateral: {e}")))
}

/// Load a collateral JSON file.
pub(crate) fn load_collateral(path: &Path) -> Result<QuoteCollateralV3, Error> {
    let text = std::fs::read(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| malformed(format!("{}: {e}", path.display())))?;
    parse_collateral(v)
}

fn tcb_info_issue_date(c: &QuoteCollateralV3) -> String {
    serde_json::from_str::<serde_json::Value>(&c.tcb_info)
        .ok()
        .and_then(|v| v["issueDate"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// MRCONFIGID of the quote in TDX evidence (veil's or Confidential Containers' shape), read
/// without verifying anything: what the guest itself checks against its own init data.
pub fn launch_data(evidence: &serde_json::Value) -> Result<Vec<u8>, Error> {
    let q = evidence
        .get("quote")
        .and_then(|q| q.as_str())
        .ok_or_else(|| malformed("evidence without a quote"))?;
    let raw = B64
        .decode(q.trim())
        .map_err(|e| malformed(format!("quote is not base64: {e}")))?;
    let quote = Quote::parse(&raw).map_err(|e| malformed(format!("quote: {e:#}")))?;
    let td = quote
        .report
        .as_td10()
        .ok_or_else(|| malformed("not a TD report"))?;
    Ok(td.mr_config_id.to_vec())
}

/// The report data of a raw TDX quote, if it parses.
#[cfg(test)]
pub(crate) fn quote_report_data(raw: &[u8]) -> Option<[u8; REPORT_DATA_LEN]> {
    let quote = Quote::parse(raw).ok()?;
    quote.report.as_td10().map(|r| r.report_data)
}

fn claims(
    quote: &Quote,
    verified: Option<&dcap_qvl::verify::VerifiedReport>,
) -> Result<Claims, Error> {
    let td: &dcap_qvl::quote::TDReport10 = quote
        .report
        .as_td10()
        .ok_or_else(|| invalid("the quote holds no TD report"))?;
    let tud = td.td_attributes[0];
    let mut details = json!({
        "quote_version": quote.header.version,
        "qe_svn": quote.header.qe_svn,
        "pce_svn": quote.header.pce_svn,
        "tee_tcb_svn": hex::encode(td.tee_tcb_svn),
        "mr_seam": hex::encode(td.mr_seam),
        "mr_signer_seam": hex::encode(td.mr_signer_seam),
        "seam_attributes": hex::encode(td.seam_attributes),
        "td_attributes": hex::encode(td.td_attributes),
        "xfam": hex::encode(td.xfam),
        "mr_td": hex::encode(td.mr_td),
        "mr_config_id": hex::encode(td.mr_config_id),
        "mr_owner": hex::encode(td.mr_owner),
        "mr_owner_config": hex::encode(td.mr_owner_config),
        "rtmr0": hex::encode(td.rt_mr0),
        "rtmr1": hex::encode(td.rt_mr1),
        "rtmr2": hex::encode(td.rt_mr2),
        "rtmr3": hex::encode(td.rt_mr3),
        "debug": tud & 0x01 != 0,
    });
    if let Report::TD15(r) = &quote.report {
        details["tee_tcb_svn2"] = json!(hex::encode(r.tee_tcb_svn2));
        details["mr_service_td"] = json!(hex::encode(r.mr_service_td));
    }
    if let Some(v) = verified {
        details["tcb_status"] = json!(v.status);
        details["advisory_ids"] = json!(v.advisory_ids);
        details["platform_tcb_status"] = json!(v.platform_status.status.to_string());
        details["qe_tcb_status"] = json!(v.qe_status.status.to_string());
    }
    Ok(Claims {
        tee: TeeKind::Tdx,
        insecure: false,
        measurement: hex::encode(td.mr_td),
        report_data: hex::encode(td.report_data),
        init_data: hex::encode(td.mr_config_id),
        // Any TUD bit (DEBUG, or the profiling bits 4-6) means the host can inspect the TD.
        debug: tud != 0,
        details,
    })
}

/// Parse evidence without checking anything, for display next to a failure. UNVERIFIED.
pub(crate) fn unverified_claims(evidence: &serde_json::Value) -> Option<Claims> {
    let ev: TdxEvidence = serde_json::from_value(evidence.clone()).ok()?;
    let raw = B64.decode(ev.quote.trim()).ok()?;
    let quote = Quote::parse(&raw).ok()?;
    claims(&quote, None).ok()
}

impl Verifier for TdxVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Tdx
    }

    fn verify(
        &self,
        evidence: &serde_json::Value,
        expected_report_data: &[u8; REPORT_DATA_LEN],
        now: SystemTime,
    ) -> Result<Claims, Error> {
        self.verify_inner(evidence, Some(expected_report_data), now)
    }
}

/// Build TDX evidence JSON from a raw quote and optional collateral JSON.
pub fn evidence_json(quote: &[u8], collateral: Option<serde_json::Value>) -> serde_json::Value {
    serde_json::to_value(TdxEvidence {
        quote: B64.encode(quote),
        collateral,
        cc_eventlog: None,
    })
    .unwrap_or_default()
}

/// The CC event log ACPI table, where the guest kernel exposes it.
pub const CCEL_TABLE: &str = "/sys/firmware/acpi/tables/data/CCEL";

/// The TDX guest device.
pub const TDX_GUEST_DEVICE: &str = "/dev/tdx_guest";

/// Attester inside a TD, through configfs-tsm. The evidence carries no collateral (a TD has no
/// network access to a PCCS here); the verifier supplies it from its collateral directory.
pub struct TdxAttester {
    configfs: PathBuf,
}

impl Default for TdxAttester {
    fn default() -> Self {
        Self::new()
    }
}

impl TdxAttester {
    /// The attester at the standard configfs-tsm path.
    pub fn new() -> Self {
        Self {
            configfs: PathBuf::from(crate::snp::CONFIGFS_TSM_REPORT),
        }
    }

    /// Use another configfs-tsm report directory.
    pub fn with_configfs(path: impl Into<PathBuf>) -> Self {
        Self {
            configfs: path.into(),
        }
    }
}

impl Attester for TdxAttester {
    fn tee(&self) -> TeeKind {
        TeeKind::Tdx
    }

    /// Evidence in the shape Confidential Containers' attester sends (`{"cc_eventlog",
    /// "quote"}`), which both trustee and veil verify.
    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, Error> {
        let rd = crate::pad_report_data(TeeKind::Tdx, report_data)?;
        let out = crate::tsm::report(&self.configfs, &rd, None, "tdx_guest", TeeKind::Tdx)?;
        let cc_eventlog = std::fs::read(CCEL_TABLE).ok().map(|b| B64.encode(b));
        Ok(serde_json::json!({"cc_eventlog": cc_eventlog, "quote": B64.encode(&out.outblob)}))
    }
}

#[cfg(test)]
mod tests;
