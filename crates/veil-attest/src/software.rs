//! The software TEE: **insecure**, for development and tests only.
//!
//! Its "evidence" is a JSON object holding the report data and a self-declared measurement
//! (by default the SHA-384 of the running agent binary). Nothing is signed, so any process can
//! forge it; that is why the claims are marked `insecure` and a key broker accepts them only
//! when its policy explicitly allows the software TEE.

use crate::{check_report_data, Attester, Claims, Error, TeeKind, Verifier, REPORT_DATA_LEN};
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

/// Marker every software evidence carries, so no one mistakes it for hardware evidence.
pub const WARNING: &str = "INSECURE software TEE: this evidence proves nothing; development only";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Evidence {
    warning: String,
    measurement: String,
    report_data: String,
    #[serde(default)]
    init_data: String,
}

/// The software attester.
pub struct SoftwareAttester {
    measurement: String,
    init_data: String,
}

impl SoftwareAttester {
    /// An attester declaring `measurement` (hex) and `init_data` (hex).
    pub fn new(measurement: &str, init_data: &str) -> Self {
        tracing::warn!("{WARNING}");
        Self {
            measurement: measurement.to_string(),
            init_data: init_data.to_string(),
        }
    }

    /// Declare the SHA-384 of the running executable as the measurement. Reads
    /// `/proc/self/exe`, which works even after the process pivoted away from the file's path.
    pub fn measuring_self(init_data: &str) -> Result<Self, Error> {
        let bytes = std::fs::read("/proc/self/exe")
            .map_err(|e| Error::Io(format!("/proc/self/exe: {e}")))?;
        use sha2::Digest;
        Ok(Self::new(
            &hex::encode(sha2::Sha384::digest(&bytes)),
            init_data,
        ))
    }
}

impl Attester for SoftwareAttester {
    fn tee(&self) -> TeeKind {
        TeeKind::Software
    }

    fn evidence(&self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<serde_json::Value, Error> {
        serde_json::to_value(Evidence {
            warning: WARNING.into(),
            measurement: self.measurement.clone(),
            report_data: hex::encode(report_data),
            init_data: self.init_data.clone(),
        })
        .map_err(|e| Error::Io(e.to_string()))
    }
}

/// The software verifier: parses, checks the binding, and marks the claims insecure.
#[derive(Default)]
pub struct SoftwareVerifier;

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        tee: TeeKind::Software,
        reason: reason.into(),
    }
}

fn hex_field(name: &str, v: &str, max: usize) -> Result<Vec<u8>, Error> {
    let b = hex::decode(v).map_err(|e| malformed(format!("{name} is not hex: {e}")))?;
    if b.len() > max {
        return Err(malformed(format!("{name} is longer than {max} bytes")));
    }
    Ok(b)
}

impl Verifier for SoftwareVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Software
    }

    fn verify(
        &self,
        evidence: &serde_json::Value,
        expected_report_data: &[u8; REPORT_DATA_LEN],
        _now: SystemTime,
    ) -> Result<Claims, Error> {
        let ev: Evidence =
            serde_json::from_value(evidence.clone()).map_err(|e| malformed(e.to_string()))?;
        if ev.warning != WARNING {
            return Err(malformed("missing the insecure-TEE warning"));
        }
        let rd = hex_field("report_data", &ev.report_data, REPORT_DATA_LEN)?;
        hex_field("measurement", &ev.measurement, 64)?;
        hex_field("init_data", &ev.init_data, 64)?;
        check_report_data(TeeKind::Software, &rd, expected_report_data)?;
        Ok(Claims {
            tee: TeeKind::Software,
            insecure: true,
            measurement: ev.measurement.to_lowercase(),
            report_data: ev.report_data.to_lowercase(),
            init_data: ev.init_data.to_lowercase(),
            debug: false,
            details: serde_json::json!({ "warning": WARNING }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let a = SoftwareAttester::new("ab", "cd");
        let rd = [7u8; 64];
        let ev = a.evidence(&rd).unwrap();
        let c = SoftwareVerifier
            .verify(&ev, &rd, SystemTime::now())
            .unwrap();
        assert!(c.insecure);
        assert_eq!(c.measurement, "ab");
        assert_eq!(c.init_data, "cd");
        let e = SoftwareVerifier
            .verify(&ev, &[8u8; 64], SystemTime::now())
            .unwrap_err();
        assert!(matches!(e, Error::ReportDataMismatch { .. }), "{e}");
        assert!(e.to_string().contains("INSECURE"), "{e}");
    }

    #[test]
    fn malformed_evidence() {
        let rd = [0u8; 64];
        for bad in [
            serde_json::json!({}),
            serde_json::json!("x"),
            serde_json::json!({"warning": "hi", "measurement": "", "report_data": ""}),
            serde_json::json!({"warning": WARNING, "measurement": "zz", "report_data": ""}),
            serde_json::json!({"warning": WARNING, "measurement": "", "report_data": "", "extra": 1}),
        ] {
            assert!(matches!(
                SoftwareVerifier.verify(&bad, &rd, SystemTime::now()),
                Err(Error::Malformed { .. })
            ));
        }
    }
}
