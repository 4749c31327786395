//! Verification of evidence files for the operator command `veil attest verify <file>`.
//!
//! Recognized inputs:
//! - a raw SNP attestation report (1184 bytes, or the same as hex text), with the VCEK/VLEK and
//!   optionally the CA chain given in [`VerifyOptions`];
//! - a raw DCAP quote (binary or hex text), with collateral from [`VerifyOptions::collateral`]
//!   (a collateral JSON file, or a directory of them);
//! - evidence JSON in veil's shapes ([`crate::snp::SnpEvidence`], [`crate::tdx::TdxEvidence`]);
//!   certificates/collateral missing from it are taken from the options;
//! - SNP evidence in the CoCo attestation-service JSON form (`attestation_report`, `cert_chain`).
//!
//! Without [`VerifyOptions::report_data`] the report's own report data is accepted, and the
//! output says that the binding was not checked.

use crate::snp::{self, SnpEvidence, SnpVerifier};
use crate::tdx::{self, TdxEvidence, TdxVerifier};
use crate::{Claims, Error, TeeKind, REPORT_DATA_LEN};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Extra inputs for [`verify_file`].
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// VCEK certificate file (DER or PEM) for a raw SNP report.
    pub vcek: Option<PathBuf>,
    /// VLEK certificate file (DER or PEM) for a raw SNP report.
    pub vlek: Option<PathBuf>,
    /// PEM file with ASK/ASVK (+ ARK) for SNP.
    pub ca_chain: Option<PathBuf>,
    /// TDX collateral: a JSON file, or a directory of JSON files.
    pub collateral: Option<PathBuf>,
    /// The report data the evidence must carry; `None` accepts the report's own.
    pub report_data: Option<[u8; REPORT_DATA_LEN]>,
}

/// The outcome of [`verify_file`].
#[derive(Debug, Clone)]
pub struct FileReport {
    /// The TEE kind of the file.
    pub tee: TeeKind,
    /// What the file was recognized as.
    pub format: String,
    /// True if the evidence verified (and, when expected report data was given, matched it).
    pub verified: bool,
    /// Why it did not verify.
    pub failure: Option<String>,
    /// Verified claims (only when `verified`).
    pub claims: Option<Claims>,
    /// True if the report data was compared with an expected value.
    pub report_data_checked: bool,
    /// When verification failed but the report parsed: its fields, UNVERIFIED, for display.
    pub unverified: Option<Claims>,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| io(path, e))
}

/// A certificate file as DER (accepts DER or PEM).
fn read_cert_der(path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = read(path)?;
    if bytes.starts_with(b"-----BEGIN") {
        use x509_cert::der::Encode;
        let certs = x509_cert::Certificate::load_pem_chain(&bytes)
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        let first = certs
            .first()
            .ok_or_else(|| Error::Io(format!("{}: no certificate", path.display())))?;
        return first
            .to_der()
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())));
    }
    Ok(bytes)
}

fn read_text(path: &Path) -> Result<String, Error> {
    String::from_utf8(read(path)?).map_err(|_| Error::Io(format!("{}: not text", path.display())))
}

/// Hex text (whitespace allowed) decoded, or the bytes as they are.
fn maybe_hex(bytes: &[u8]) -> Vec<u8> {
    let text: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !text.is_empty() && text.iter().all(u8::is_ascii_hexdigit) {
        if let Ok(b) = hex::decode(&text) {
            return b;
        }
    }
    bytes.to_vec()
}

fn is_dcap_quote(b: &[u8]) -> bool {
    if b.len() < 48 {
        return false;
    }
    let version = u16::from_le_bytes([b[0], b[1]]);
    let tee_type = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    matches!(version, 3..=5) && matches!(tee_type, 0 | 0x81)
}

enum Input {
    Snp(serde_json::Value),
    Tdx(serde_json::Value),
}

fn snp_evidence_with_options(
    mut ev: SnpEvidence,
    opts: &VerifyOptions,
) -> Result<serde_json::Value, Error> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    if ev.vcek.is_none() && ev.vlek.is_none() {
        if let Some(p) = &opts.vcek {
            ev.vcek = Some(b64.encode(read_cert_der(p)?));
        }
        if let Some(p) = &opts.vlek {
            ev.vlek = Some(b64.encode(read_cert_der(p)?));
        }
    }
    if ev.ca_chain.is_none() {
        if let Some(p) = &opts.ca_chain {
            ev.ca_chain = Some(read_text(p)?);
        }
    }
    serde_json::to_value(ev).map_err(|e| Error::Io(e.to_string()))
}

fn tdx_evidence_with_options(
    mut ev: TdxEvidence,
    opts: &VerifyOptions,
) -> Result<serde_json::Value, Error> {
    if ev.collateral.as_ref().is_none_or(|c| c.is_null()) {
        if let Some(p) = opts.collateral.as_ref().filter(|p| p.is_file()) {
            let text = read(p)?;
            ev.collateral = Some(
                serde_json::from_slice(&text)
                    .map_err(|e| Error::Io(format!("{}: {e}", p.display())))?,
            );
        }
    }
    serde_json::to_value(ev).map_err(|e| Error::Io(e.to_string()))
}

fn recognize(path: &Path, opts: &VerifyOptions) -> Result<(Input, String), Error> {
    let bytes = read(path)?;
    let trimmed = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&bytes[..0], |i| &bytes[i..]);
    if trimmed.starts_with(b"{") {
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Io(format!("{}: invalid JSON: {e}", path.display())))?;
        if v.get("report").is_some() {
            let ev: SnpEvidence = serde_json::from_value(v).map_err(|e| Error::Malformed {
                tee: TeeKind::Snp,
                reason: e.to_string(),
            })?;
            return Ok((
                Input::Snp(snp_evidence_with_options(ev, opts)?),
                "SNP evidence JSON".into(),
            ));
        }
        if v.get("quote").is_some() {
            let ev_is_coco = v.get("cc_eventlog").is_some();
            let ev: TdxEvidence = serde_json::from_value(v).map_err(|e| Error::Malformed {
                tee: TeeKind::Tdx,
                reason: e.to_string(),
            })?;
            return Ok((
                Input::Tdx(tdx_evidence_with_options(ev, opts)?),
                if ev_is_coco {
                    "TDX evidence JSON (Confidential Containers form)".into()
                } else {
                    "TDX evidence JSON".into()
                },
            ));
        }
        if v.get("attestation_report").is_some() {
            let ev: SnpEvidence = serde_json::from_value(snp::evidence_from_coco(&v)?)
                .map_err(|e| Error::Io(e.to_string()))?;
            return Ok((
                Input::Snp(snp_evidence_with_options(ev, opts)?),
                "SNP evidence JSON (CoCo attestation-service form)".into(),
            ));
        }
        return Err(Error::Io(format!(
            "{}: JSON with neither \"report\", \"quote\" nor \"attestation_report\"",
            path.display()
        )));
    }
    let raw = maybe_hex(&bytes);
    let hex_note = if raw.len() != bytes.len() {
        " (hex)"
    } else {
        ""
    };
    if raw.len() == snp::REPORT_LEN {
        let ev = snp::evidence_json(&raw, None, None, None);
        let ev: SnpEvidence = serde_json::from_value(ev).map_err(|e| Error::Io(e.to_string()))?;
        return Ok((
            Input::Snp(snp_evidence_with_options(ev, opts)?),
            format!("raw SNP attestation report{hex_note}"),
        ));
    }
    if is_dcap_quote(&raw) {
        let ev = TdxEvidence {
            quote: {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(&raw)
            },
            collateral: None,
            cc_eventlog: None,
        };
        return Ok((
            Input::Tdx(tdx_evidence_with_options(ev, opts)?),
            format!("raw DCAP quote{hex_note}"),
        ));
    }
    Err(Error::Io(format!(
        "{}: not recognized ({} bytes; expected a {}-byte SNP report, a DCAP quote, or evidence JSON)",
        path.display(),
        raw.len(),
        snp::REPORT_LEN
    )))
}

/// Verify the evidence in `path` at time `now`. I/O problems and unrecognized files are errors;
/// evidence that does not verify gives a [`FileReport`] with `verified == false`.
pub fn verify_file(
    path: &Path,
    opts: &VerifyOptions,
    now: SystemTime,
) -> Result<FileReport, Error> {
    let (input, format) = recognize(path, opts)?;
    let expected = opts.report_data.as_ref();
    let (tee, result, unverified) = match &input {
        Input::Snp(ev) => {
            let mut verifier = SnpVerifier::new();
            if let (Some(p), true) = (&opts.vcek, ev["vcek"].is_null() && ev["vlek"].is_null()) {
                verifier = verifier.with_endorsement_certs(vec![read_cert_der(p)?]);
            }
            let r = verifier.verify_inner(ev, expected, now);
            (TeeKind::Snp, r, snp::unverified_claims(ev))
        }
        Input::Tdx(ev) => {
            let mut verifier = TdxVerifier::new();
            if let Some(dir) = opts.collateral.as_ref().filter(|p| p.is_dir()) {
                verifier = verifier.with_collateral_dir(dir);
            }
            let r = verifier.verify_inner(ev, expected, now);
            (TeeKind::Tdx, r, tdx::unverified_claims(ev))
        }
    };
    Ok(match result {
        Ok(claims) => FileReport {
            tee,
            format,
            verified: true,
            failure: None,
            claims: Some(claims),
            report_data_checked: expected.is_some(),
            unverified: None,
        },
        Err(e) => FileReport {
            tee,
            format,
            verified: false,
            failure: Some(e.to_string()),
            claims: None,
            report_data_checked: expected.is_some(),
            unverified,
        },
    })
}

fn tcb_line(t: &serde_json::Value) -> String {
    let mut s = format!(
        "bootloader {} tee {} snp {} microcode {}",
        t["bootloader"], t["tee"], t["snp"], t["microcode"]
    );
    if !t["fmc"].is_null() {
        s.push_str(&format!(" fmc {}", t["fmc"]));
    }
    s
}

/// Width of the label column in [`FileReport`]'s display.
const W: usize = 24;

impl fmt::Display for FileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tee = match self.tee {
            TeeKind::Snp => "AMD SEV-SNP",
            TeeKind::Tdx => "Intel TDX",
            TeeKind::Software => "software (INSECURE)",
        };
        writeln!(f, "{tee} evidence ({})", self.format)?;
        match (&self.failure, self.verified) {
            (None, true) => writeln!(f, "{:<W$}VERIFIED", "result:")?,
            (Some(why), _) => writeln!(f, "{:<W$}DOES NOT VERIFY: {why}", "result:")?,
            (None, false) => writeln!(f, "{:<W$}DOES NOT VERIFY", "result:")?,
        }
        let c = match (&self.claims, &self.unverified) {
            (Some(c), _) => c,
            (None, Some(c)) => {
                writeln!(
                    f,
                    "UNVERIFIED fields of a report that did not verify; do not trust them:"
                )?;
                c
            }
            (None, None) => return Ok(()),
        };
        writeln!(f, "{:<W$}{}", "measurement:", c.measurement)?;
        writeln!(f, "{:<W$}{}", "report data:", c.report_data)?;
        if self.report_data_checked {
            writeln!(f, "{:<W$}(matches the expected report data)", "")?;
        } else {
            writeln!(
                f,
                "{:<W$}(binding NOT checked: no expected report data was given)",
                ""
            )?;
        }
        let init_name = match self.tee {
            TeeKind::Snp => "HOST_DATA",
            _ => "MRCONFIGID",
        };
        writeln!(
            f,
            "{:<W$}{}",
            format!("init data ({init_name}):"),
            c.init_data
        )?;
        writeln!(f, "{:<W$}{}", "debug allowed:", c.debug)?;
        let d = &c.details;
        match self.tee {
            TeeKind::Snp => {
                if let Some(p) = d["product"].as_str() {
                    writeln!(
                        f,
                        "{:<W$}{} via {} (AMD {p})",
                        "signed by:",
                        d["signing_key"].as_str().unwrap_or("?"),
                        d["intermediate"].as_str().unwrap_or("?")
                    )?;
                }
                writeln!(
                    f,
                    "{:<W$}version {} vmpl {} policy {}",
                    "report:",
                    d["version"],
                    d["vmpl"],
                    d["policy"]["raw"].as_str().unwrap_or("?")
                )?;
                for t in ["reported_tcb", "committed_tcb", "current_tcb", "launch_tcb"] {
                    writeln!(f, "{:<W$}{}", format!("{t}:"), tcb_line(&d[t]))?;
                }
                writeln!(
                    f,
                    "{:<W$}current {} committed {}",
                    "firmware:",
                    d["current_firmware"].as_str().unwrap_or("?"),
                    d["committed_firmware"].as_str().unwrap_or("?")
                )?;
            }
            TeeKind::Tdx => {
                if let Some(s) = d["tcb_status"].as_str() {
                    writeln!(
                        f,
                        "{:<W$}{s} (advisories: {})",
                        "TCB status:", d["advisory_ids"]
                    )?;
                }
                writeln!(
                    f,
                    "{:<W$}{}",
                    "TEE TCB SVN:",
                    d["tee_tcb_svn"].as_str().unwrap_or("?")
                )?;
                writeln!(
                    f,
                    "{:<W$}{}",
                    "MRSEAM:",
                    d["mr_seam"].as_str().unwrap_or("?")
                )?;
                for r in ["rtmr0", "rtmr1", "rtmr2", "rtmr3"] {
                    writeln!(
                        f,
                        "{:<W$}{}",
                        format!("{}:", r.to_uppercase()),
                        d[r].as_str().unwrap_or("?")
                    )?;
                }
            }
            TeeKind::Software => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const SNP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/snp");
    const TDX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tdx/dcap-qvl");

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }
    const SNP_NOW: u64 = 1_751_328_000;
    const TDX_NOW: u64 = 1_752_919_234;

    #[test]
    fn raw_snp_hex_report_with_vcek() {
        let opts = VerifyOptions {
            vcek: Some(format!("{SNP}/virtee-sev/vcek_milan.der").into()),
            ..Default::default()
        };
        let path = PathBuf::from(format!("{SNP}/virtee-sev/report_milan.hex"));
        let r = verify_file(&path, &opts, at(SNP_NOW)).unwrap();
        assert!(r.verified, "{r}");
        assert_eq!(r.tee, TeeKind::Snp);
        assert!(!r.report_data_checked);
        let text = r.to_string();
        assert!(text.contains("VERIFIED"), "{text}");
        assert!(text.contains("binding NOT checked"), "{text}");
        assert!(text.contains("7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"), "{text}");
        assert!(
            text.contains("bootloader 3 tee 0 snp 8 microcode 115"),
            "{text}"
        );

        // With the right and a wrong expected report data.
        let rd: [u8; 64] = hex::decode("d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd").unwrap().try_into().unwrap();
        let ok = verify_file(
            &path,
            &VerifyOptions {
                report_data: Some(rd),
                ..opts.clone()
            },
            at(SNP_NOW),
        )
        .unwrap();
        assert!(ok.verified && ok.report_data_checked);
        assert!(ok.to_string().contains("matches the expected"));
        let bad = verify_file(
            &path,
            &VerifyOptions {
                report_data: Some([0; 64]),
                ..opts.clone()
            },
            at(SNP_NOW),
        )
        .unwrap();
        assert!(!bad.verified);
        assert!(
            bad.failure.as_ref().unwrap().contains("does not match"),
            "{bad}"
        );
    }

    #[test]
    fn raw_snp_without_cert_fails_but_shows_fields() {
        let path = PathBuf::from(format!("{SNP}/trustee/test-report.bin"));
        let r = verify_file(&path, &VerifyOptions::default(), at(SNP_NOW)).unwrap();
        assert!(!r.verified);
        assert!(r.failure.as_ref().unwrap().contains("no VCEK"), "{r}");
        let text = r.to_string();
        assert!(text.contains("UNVERIFIED"), "{text}");
        assert!(text.contains("a1f3930413247bb3"), "{text}");
    }

    #[test]
    fn raw_snp_vlek_with_pem_chain() {
        let opts = VerifyOptions {
            vlek: Some(format!("{SNP}/trustee/test-vlek.der").into()),
            ca_chain: Some(format!("{SNP}/trustee/milan_ask_ark_asvk.pem").into()),
            ..Default::default()
        };
        let path = PathBuf::from(format!("{SNP}/trustee/test-vlek-report.bin"));
        let r = verify_file(&path, &opts, at(SNP_NOW)).unwrap();
        assert!(r.verified, "{r}");
        assert!(r.to_string().contains("VLEK via SEV-VLEK-Milan"), "{r}");
        // Expired at the wall clock.
        let r = verify_file(&path, &opts, SystemTime::now()).unwrap();
        assert!(!r.verified);
        assert!(r.failure.unwrap().contains("expired"));
    }

    #[test]
    fn coco_evidence_json() {
        let path = PathBuf::from(format!("{SNP}/trustee/evidence.json"));
        let r = verify_file(&path, &VerifyOptions::default(), at(SNP_NOW)).unwrap();
        assert!(r.verified, "{r}");
        assert!(r.to_string().contains("AMD Genoa"), "{r}");
    }

    #[test]
    fn veil_evidence_json_files() {
        let dir = tempfile::tempdir().unwrap();
        let report = std::fs::read(format!("{SNP}/trustee/test-report.bin")).unwrap();
        let vcek = std::fs::read(format!("{SNP}/trustee/test-vcek.der")).unwrap();
        let p = dir.path().join("snp.json");
        std::fs::write(
            &p,
            snp::evidence_json(&report, Some(&vcek), None, None).to_string(),
        )
        .unwrap();
        let r = verify_file(&p, &VerifyOptions::default(), at(SNP_NOW)).unwrap();
        assert!(r.verified, "{r}");

        let quote = std::fs::read(format!("{TDX}/tdx_quote")).unwrap();
        let coll: serde_json::Value = serde_json::from_slice(
            &std::fs::read(format!("{TDX}/tdx_quote_collateral.json")).unwrap(),
        )
        .unwrap();
        let p = dir.path().join("tdx.json");
        std::fs::write(&p, tdx::evidence_json(&quote, Some(coll)).to_string()).unwrap();
        let r = verify_file(&p, &VerifyOptions::default(), at(TDX_NOW)).unwrap();
        assert!(r.verified, "{r}");
        let text = r.to_string();
        assert!(text.contains("UpToDate (advisories: [])"), "{text}");
        assert!(text.contains("91eb2b44d141d4ec"), "{text}");

        // Unknown JSON and unknown binaries are errors.
        std::fs::write(dir.path().join("x.json"), b"{\"a\": 1}").unwrap();
        assert!(verify_file(
            &dir.path().join("x.json"),
            &VerifyOptions::default(),
            at(TDX_NOW)
        )
        .is_err());
        std::fs::write(dir.path().join("x.bin"), [1u8; 100]).unwrap();
        assert!(verify_file(
            &dir.path().join("x.bin"),
            &VerifyOptions::default(),
            at(TDX_NOW)
        )
        .is_err());
        assert!(verify_file(
            &dir.path().join("missing"),
            &VerifyOptions::default(),
            at(TDX_NOW)
        )
        .is_err());
    }

    #[test]
    fn raw_tdx_quote_with_collateral_file_or_dir() {
        let path = PathBuf::from(format!("{TDX}/tdx_quote"));
        let r = verify_file(&path, &VerifyOptions::default(), at(TDX_NOW)).unwrap();
        assert!(!r.verified);
        assert!(r.unverified.is_some());
        let opts = VerifyOptions {
            collateral: Some(format!("{TDX}/tdx_quote_collateral.json").into()),
            ..Default::default()
        };
        let r = verify_file(&path, &opts, at(TDX_NOW)).unwrap();
        assert!(r.verified, "{r}");
        let opts = VerifyOptions {
            collateral: Some(TDX.into()),
            ..Default::default()
        };
        let r = verify_file(&path, &opts, at(TDX_NOW)).unwrap();
        assert!(r.verified, "{r}");
        // The SGX quote is recognized as a DCAP quote and refused as not TDX.
        let r = verify_file(
            &PathBuf::from(format!("{TDX}/sgx_quote")),
            &opts,
            at(TDX_NOW),
        )
        .unwrap();
        assert!(!r.verified);
        assert!(r.failure.unwrap().contains("not a TDX quote"));
        // The outdated quote has no matching TCB level.
        let r = verify_file(
            &PathBuf::from(format!("{TDX}/tdx_quote_outdated")),
            &opts,
            at(1_774_003_274),
        )
        .unwrap();
        assert!(!r.verified);
        assert!(r.to_string().contains("UNVERIFIED"));
    }
}
