//! TEE evidence for veil: attesters that produce evidence inside a sandbox, and verifiers that
//! check it in the key broker.
//!
//! Evidence is JSON (what goes into the KBS protocol's `tee-evidence` field); each TEE kind has
//! its own shape. Every verifier checks that the report data in the evidence equals the value
//! the relying party expects (the hash binding the KBS nonce and the sandbox's ephemeral public
//! key) and returns [`Claims`] for policy evaluation.
//!
//! Hardware TEEs: [`snp`] (AMD SEV-SNP, checked against AMD's embedded roots with the `sev`
//! crate) and [`tdx`] (Intel TDX, DCAP quotes checked offline with collateral by `dcap-qvl`).
//! [`detect`] finds the attester of the machine; [`report`] verifies evidence files for the
//! operator command `veil attest verify`.
//!
//! The [`software`] TEE exists for development and tests on machines without SEV-SNP or TDX.
//! It proves nothing: anyone can produce its evidence. It is called *insecure* in every message,
//! its claims carry `insecure: true`, and a key broker refuses it unless its policy says so.
#![forbid(unsafe_code)]

pub mod report;
pub mod snp;
pub mod software;
pub mod tdx;
mod tsm;

use serde::{Deserialize, Serialize};
use std::time::SystemTime;

/// Size of the report-data field that binds evidence to a session (SNP and TDX both have 64).
pub const REPORT_DATA_LEN: usize = 64;

/// Kinds of TEE veil knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeeKind {
    /// AMD SEV-SNP.
    Snp,
    /// Intel TDX.
    Tdx,
    /// The insecure software TEE for development.
    Software,
}

impl std::fmt::Display for TeeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TeeKind::Snp => "snp",
            TeeKind::Tdx => "tdx",
            TeeKind::Software => "software (INSECURE, development only)",
        })
    }
}

/// Verified facts about a TEE, input to the key broker's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Which TEE produced the evidence.
    pub tee: TeeKind,
    /// True for evidence that proves nothing (the software TEE).
    pub insecure: bool,
    /// Launch measurement, lowercase hex (SNP `MEASUREMENT`, TDX `MRTD`).
    pub measurement: String,
    /// The 64 report-data bytes, lowercase hex.
    pub report_data: String,
    /// Host-provided data bound at launch (SNP `HOST_DATA`, TDX `MRCONFIGID`), lowercase hex,
    /// where veil puts the hash of the sandbox's init data.
    pub init_data: String,
    /// True if the guest was launched with debugging allowed (its memory is readable).
    pub debug: bool,
    /// TEE-specific details (TCB versions, policy bits, chip id, RTMRs, …) for policies.
    pub details: serde_json::Value,
}

/// Errors of attesters and verifiers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The evidence could not be parsed.
    #[error("malformed {tee} evidence: {reason}")]
    Malformed {
        /// TEE kind.
        tee: TeeKind,
        /// Why.
        reason: String,
    },
    /// A signature or certificate chain did not verify.
    #[error("{tee} evidence does not verify: {reason}")]
    Invalid {
        /// TEE kind.
        tee: TeeKind,
        /// Why.
        reason: String,
    },
    /// The report data does not bind the expected nonce and key.
    #[error("{tee} evidence: report data {actual} does not match the expected binding {expected}")]
    ReportDataMismatch {
        /// TEE kind.
        tee: TeeKind,
        /// Expected (hex).
        expected: String,
        /// In the evidence (hex).
        actual: String,
    },
    /// This kind of TEE is not available here.
    #[error("no {0} device available: {1}")]
    Unavailable(TeeKind, String),
    /// Other I/O failures.
    #[error("{0}")]
    Io(String),
}

/// Produces evidence inside a sandbox.
pub trait Attester: Send + Sync {
    /// The TEE this attester speaks for.
    fn tee(&self) -> TeeKind;
    /// Evidence (JSON) whose report data is `report_data` (at most [`REPORT_DATA_LEN`] bytes;
    /// hardware TEEs pad it with zeros to their 64-byte field, as Confidential Containers'
    /// attesters do).
    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, Error>;
    /// The launch-time data (HOSTDATA/MRCONFIGID) in `evidence` this attester produced, read
    /// without verifying it; `None` where the TEE has none (see [`launch_data`]).
    fn launch_data(&self, evidence: &serde_json::Value) -> Result<Option<Vec<u8>>, Error> {
        launch_data(self.tee(), evidence)
    }
}

/// Checks evidence of one TEE kind.
pub trait Verifier: Send + Sync {
    /// The TEE this verifier checks.
    fn tee(&self) -> TeeKind;
    /// Verify `evidence`, require its report data to equal `expected_report_data`, and return
    /// the claims. `now` is the time used for certificate and collateral validity.
    fn verify(
        &self,
        evidence: &serde_json::Value,
        expected_report_data: &[u8; REPORT_DATA_LEN],
        now: SystemTime,
    ) -> Result<Claims, Error>;
}

/// `report_data` padded with zeros to the 64-byte report-data field (what Confidential
/// Containers' attesters put into SNP and TDX reports); longer input is an error.
pub fn pad_report_data(tee: TeeKind, report_data: &[u8]) -> Result<[u8; REPORT_DATA_LEN], Error> {
    if report_data.len() > REPORT_DATA_LEN {
        return Err(Error::Io(format!(
            "{tee}: report data is {} bytes, at most {REPORT_DATA_LEN} fit",
            report_data.len()
        )));
    }
    let mut out = [0u8; REPORT_DATA_LEN];
    out[..report_data.len()].copy_from_slice(report_data);
    Ok(out)
}

/// The launch-time data the host set for this guest — SNP `HOST_DATA`, TDX `MRCONFIGID` — read
/// from `evidence` of `tee` without verifying it (`None` for the software TEE). A guest uses it
/// to refuse to attest when the host launched it with init data that is not its own.
pub fn launch_data(tee: TeeKind, evidence: &serde_json::Value) -> Result<Option<Vec<u8>>, Error> {
    match tee {
        TeeKind::Snp => snp::launch_data(evidence).map(Some),
        TeeKind::Tdx => tdx::launch_data(evidence).map(Some),
        TeeKind::Software => Ok(None),
    }
}

/// Whether a launch-time field (SNP HOSTDATA, 32 bytes; TDX MRCONFIGID, 48) holds `digest` the
/// way Confidential Containers puts it there: truncated to the field, or padded with zeros.
pub fn launch_bound(field: &[u8], digest: &[u8]) -> bool {
    let mut want = digest.to_vec();
    want.resize(field.len(), 0);
    !field.is_empty() && field == want.as_slice()
}

/// Compare report data in constant shape and produce the standard mismatch error.
pub fn check_report_data(
    tee: TeeKind,
    actual: &[u8],
    expected: &[u8; REPORT_DATA_LEN],
) -> Result<(), Error> {
    if actual != expected.as_slice() {
        return Err(Error::ReportDataMismatch {
            tee,
            expected: hex::encode(expected),
            actual: hex::encode(actual),
        });
    }
    Ok(())
}

/// The hardware attester of this machine: SNP when `/dev/sev-guest` exists, TDX when
/// `/dev/tdx_guest` exists, else `None`. Never the software TEE (callers opt into that).
pub fn detect() -> Option<Box<dyn Attester>> {
    detect_at(
        std::path::Path::new(snp::SEV_GUEST_DEVICE),
        std::path::Path::new(tdx::TDX_GUEST_DEVICE),
    )
}

fn detect_at(
    sev_guest: &std::path::Path,
    tdx_guest: &std::path::Path,
) -> Option<Box<dyn Attester>> {
    if sev_guest.exists() {
        return Some(Box::new(snp::SnpAttester::new()));
    }
    if tdx_guest.exists() {
        return Some(Box::new(tdx::TdxAttester::new()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_none_without_devices() {
        let dir = tempfile::tempdir().unwrap();
        assert!(detect_at(&dir.path().join("sev-guest"), &dir.path().join("tdx_guest")).is_none());
        std::fs::write(dir.path().join("tdx_guest"), b"").unwrap();
        let a = detect_at(&dir.path().join("sev-guest"), &dir.path().join("tdx_guest")).unwrap();
        assert_eq!(a.tee(), TeeKind::Tdx);
        std::fs::write(dir.path().join("sev-guest"), b"").unwrap();
        let a = detect_at(&dir.path().join("sev-guest"), &dir.path().join("tdx_guest")).unwrap();
        assert_eq!(a.tee(), TeeKind::Snp);
    }
}
