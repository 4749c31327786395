//! AMD SEV-SNP: the [`SnpVerifier`] checks attestation reports against AMD's certificate chain,
//! and the [`SnpAttester`] fetches reports inside an SNP guest.
//!
//! # Evidence
//! ```json
//! {"report": "<base64 of the 1184-byte ATTESTATION_REPORT>",
//!  "vcek": "<base64 DER>" | null, "vlek": "<base64 DER>" | null,
//!  "ca_chain": "<PEM of ASK/ASVK + ARK>"}
//! ```
//! Exactly one of `vcek`/`vlek` is set, matching the report's `SIGNING_KEY`. `ca_chain` is
//! optional. When an attester could not obtain the endorsement certificate (no extended report
//! and no configfs `auxblob`), both are null and the verifier needs the certificate from its own
//! configuration ([`SnpVerifier::with_endorsement_certs`]).
//!
//! The verifier also takes the shape Confidential Containers' attester (guest-components) sends
//! and trustee verifies: `{"attestation_report": {…}, "cert_chain": [{"cert_type": "VCEK",
//! "data": [bytes]}]}` (the serde form of the `sev` crate's types), and the [`SnpAttester`]
//! produces that shape, so that a sandbox's evidence is accepted by either broker.
//!
//! # Trust
//! The AMD root keys (ARK) of Milan, Genoa and Turin are compiled in (`certs/snp/`), together
//! with their ASKs and (Milan, Genoa) ASVKs. An ARK inside `ca_chain` is never trusted as a root:
//! `ca_chain` only contributes extra intermediates (e.g. the Turin ASVK, which is not embedded),
//! which must themselves be signed by an embedded ARK.
//!
//! Verification: ARK self-signature, ARK→ASK→VCEK or ARK→ASVK→VLEK (RSASSA-PSS/SHA-384, via the
//! `sev` crate), validity of all three certificates at `now`, the report's ECDSA-P384/SHA-384
//! signature over the raw bytes `[0, 0x2A0)` with the VCEK/VLEK key, all unsigned bytes of the
//! signature block zero, the reported TCB equal to the certificate's SPL extensions, the VCEK
//! hwID equal to `CHIP_ID` (unless masked), and finally the report-data binding.

use crate::{check_report_data, Attester, Claims, Error, TeeKind, Verifier, REPORT_DATA_LEN};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sev::certs::snp::{Certificate as SevCert, Verifiable};
use sev::firmware::guest::AttestationReport;
use sev::firmware::host::TcbVersion;
use sev::parser::ByteParser;
use std::path::PathBuf;
use std::time::SystemTime;
use x509_cert::der::{Decode, Encode};

/// Size of an SNP attestation report.
pub const REPORT_LEN: usize = 1184;
/// The signature covers the report bytes `[0, SIGNED_LEN)`.
const SIGNED_LEN: usize = 0x2A0;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The SNP evidence shape (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpEvidence {
    /// Base64 of the raw 1184-byte attestation report.
    pub report: String,
    /// Base64 DER of the VCEK that signed the report (if it was VCEK-signed).
    #[serde(default)]
    pub vcek: Option<String>,
    /// Base64 DER of the VLEK that signed the report (if it was VLEK-signed).
    #[serde(default)]
    pub vlek: Option<String>,
    /// Optional PEM bundle of intermediates (ASK/ASVK) and ARK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_chain: Option<String>,
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        tee: TeeKind::Snp,
        reason: reason.into(),
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::Invalid {
        tee: TeeKind::Snp,
        reason: reason.into(),
    }
}

/// AMD EPYC generations with embedded roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// 3rd generation (Milan).
    Milan,
    /// 4th generation (Genoa).
    Genoa,
    /// 5th generation (Turin).
    Turin,
}

impl Product {
    const ALL: [Product; 3] = [Product::Milan, Product::Genoa, Product::Turin];

    /// Product name as AMD spells it.
    pub fn name(self) -> &'static str {
        match self {
            Product::Milan => "Milan",
            Product::Genoa => "Genoa",
            Product::Turin => "Turin",
        }
    }

    fn ark_pem(self) -> &'static str {
        match self {
            Product::Milan => include_str!("../certs/snp/milan_ark.pem"),
            Product::Genoa => include_str!("../certs/snp/genoa_ark.pem"),
            Product::Turin => include_str!("../certs/snp/turin_ark.pem"),
        }
    }

    fn ask_pem(self) -> &'static str {
        match self {
            Product::Milan => include_str!("../certs/snp/milan_ask.pem"),
            Product::Genoa => include_str!("../certs/snp/genoa_ask.pem"),
            Product::Turin => include_str!("../certs/snp/turin_ask.pem"),
        }
    }

    fn asvk_pem(self) -> Option<&'static str> {
        match self {
            Product::Milan => Some(include_str!("../certs/snp/milan_asvk.pem")),
            Product::Genoa => Some(include_str!("../certs/snp/genoa_asvk.pem")),
            // AMD's Turin ASVK is not embedded; supply it in the evidence's `ca_chain`.
            Product::Turin => None,
        }
    }

    /// From the report's CPUID family/model (reports v3 and later).
    fn from_cpuid(family: u8, model: u8) -> Option<Product> {
        match sev::Generation::identify_cpu(family, model).ok()? {
            sev::Generation::Milan => Some(Product::Milan),
            sev::Generation::Genoa => Some(Product::Genoa),
            sev::Generation::Turin => Some(Product::Turin),
            _ => None,
        }
    }
}

/// Which key signed the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Vcek,
    Vlek,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::Vcek => "VCEK",
            KeyKind::Vlek => "VLEK",
        }
    }
    fn intermediate(self) -> &'static str {
        match self {
            KeyKind::Vcek => "ASK",
            KeyKind::Vlek => "ASVK",
        }
    }
}

/// A parsed X.509 certificate kept both ways: RustCrypto's for fields, `sev`'s for the chain.
struct Cert {
    x509: x509_cert::Certificate,
    sev: SevCert,
}

impl Cert {
    fn from_der(der: &[u8], what: &str) -> Result<Self, Error> {
        let x509 = x509_cert::Certificate::from_der(der)
            .map_err(|e| malformed(format!("{what} certificate: {e}")))?;
        Ok(Self::from_x509(x509))
    }

    fn from_x509(x509: x509_cert::Certificate) -> Self {
        Cert {
            sev: SevCert::from(x509.clone()),
            x509,
        }
    }

    fn from_pem_bundle(pem: &str, what: &str) -> Result<Vec<Self>, Error> {
        let certs = x509_cert::Certificate::load_pem_chain(pem.as_bytes())
            .map_err(|e| malformed(format!("{what}: {e}")))?;
        Ok(certs.into_iter().map(Self::from_x509).collect())
    }

    fn embedded(pem: &str) -> Result<Self, Error> {
        let mut v = Self::from_pem_bundle(pem, "embedded AMD certificate")?;
        v.pop()
            .ok_or_else(|| invalid("embedded AMD certificate missing"))
    }

    fn common_name(&self) -> String {
        let subject = self.x509.tbs_certificate.subject.to_string();
        subject
            .split(',')
            .find_map(|p| p.trim().strip_prefix("CN="))
            .unwrap_or("")
            .to_string()
    }

    fn der(&self) -> Vec<u8> {
        self.x509.to_der().unwrap_or_default()
    }

    /// `signer` signs `self`.
    fn signed_by(&self, signer: &Cert) -> bool {
        (&signer.sev, &self.sev).verify().is_ok()
    }

    fn check_validity(&self, what: &str, now: SystemTime) -> Result<(), Error> {
        let v = &self.x509.tbs_certificate.validity;
        if now < v.not_before.to_system_time() {
            return Err(invalid(format!(
                "{what} certificate ({}) is not valid before {}",
                self.common_name(),
                v.not_before
            )));
        }
        if now > v.not_after.to_system_time() {
            return Err(invalid(format!(
                "{what} certificate ({}) expired at {}",
                self.common_name(),
                v.not_after
            )));
        }
        Ok(())
    }

    fn extension(&self, oid: &str) -> Option<&[u8]> {
        self.x509
            .tbs_certificate
            .extensions
            .as_ref()?
            .iter()
            .find(|e| e.extn_id.to_string() == oid)
            .map(|e| e.extn_value.as_bytes())
    }

    fn spl(&self, oid: &str) -> Result<Option<u8>, Error> {
        let Some(raw) = self.extension(oid) else {
            return Ok(None);
        };
        let v = u64::from_der(raw)
            .map_err(|e| malformed(format!("certificate extension {oid}: {e}")))?;
        u8::try_from(v)
            .map(Some)
            .map_err(|_| malformed(format!("certificate extension {oid} out of range: {v}")))
    }

    /// The hwID extension, raw or DER OCTET STRING encoded.
    fn hw_id(&self) -> Option<Vec<u8>> {
        let raw = self.extension("1.3.6.1.4.1.3704.1.4")?;
        match raw {
            [0x04, n, rest @ ..] if *n as usize == rest.len() && matches!(rest.len(), 8 | 64) => {
                Some(rest.to_vec())
            }
            _ => Some(raw.to_vec()),
        }
    }
}

const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";

/// Verifier of SEV-SNP evidence.
pub struct SnpVerifier {
    endorsement_certs: Vec<Vec<u8>>,
    min_report_version: u32,
}

/// What a successful chain check found.
struct Chain {
    product: Product,
    intermediate_cn: String,
}

impl Default for SnpVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl SnpVerifier {
    /// A verifier with the embedded AMD roots, accepting report versions 2 and later.
    pub fn new() -> Self {
        Self {
            endorsement_certs: Vec::new(),
            min_report_version: 2,
        }
    }

    /// Require at least this report version (trustee requires 3; v2 reports carry no CPUID).
    pub fn with_min_report_version(mut self, version: u32) -> Self {
        self.min_report_version = version.max(2);
        self
    }

    /// VCEK/VLEK certificates (DER) to use for evidence that carries none. Each is tried; the
    /// full chain and signature checks apply as usual.
    pub fn with_endorsement_certs(mut self, ders: Vec<Vec<u8>>) -> Self {
        self.endorsement_certs = ders;
        self
    }

    /// Verify; `expected == None` skips the report-data binding (for operator inspection).
    pub(crate) fn verify_inner(
        &self,
        evidence: &serde_json::Value,
        expected: Option<&[u8; REPORT_DATA_LEN]>,
        now: SystemTime,
    ) -> Result<Claims, Error> {
        let ev = veil_shape(evidence)?;
        let raw = decode_b64("report", &ev.report)?;
        let report = parse_report(&raw)?;

        if report.version < self.min_report_version {
            return Err(invalid(format!(
                "report version {} is older than the minimum {}",
                report.version, self.min_report_version
            )));
        }
        if report.sig_algo != 1 {
            return Err(invalid(format!(
                "unsupported signature algorithm {} (expected 1, ECDSA P-384 with SHA-384)",
                report.sig_algo
            )));
        }
        if report.key_info.mask_chip_key() {
            return Err(invalid("report is unsigned (MASK_CHIP_KEY is set)"));
        }
        let kind = match report.key_info.signing_key() {
            0 => KeyKind::Vcek,
            1 => KeyKind::Vlek,
            k => return Err(invalid(format!("unsupported SIGNING_KEY {k}"))),
        };

        let vek_ders: Vec<Vec<u8>> = match (&ev.vcek, &ev.vlek) {
            (Some(_), Some(_)) => {
                return Err(malformed("evidence has both a VCEK and a VLEK"));
            }
            (Some(c), None) if kind == KeyKind::Vcek => vec![decode_b64("vcek", c)?],
            (None, Some(c)) if kind == KeyKind::Vlek => vec![decode_b64("vlek", c)?],
            (None, None) if !self.endorsement_certs.is_empty() => self.endorsement_certs.clone(),
            (None, None) => {
                return Err(malformed(format!(
                    "evidence carries no {} and none is configured",
                    kind.name()
                )))
            }
            _ => {
                return Err(invalid(format!(
                    "report is signed by the {}, but the evidence carries the other key",
                    kind.name()
                )))
            }
        };
        let extra = match &ev.ca_chain {
            Some(pem) => Cert::from_pem_bundle(pem, "ca_chain")?,
            None => Vec::new(),
        };
        let candidates: Vec<Product> = match (report.cpuid_fam_id, report.cpuid_mod_id) {
            (Some(f), Some(m)) => vec![Product::from_cpuid(f, m).ok_or_else(|| {
                invalid(format!("no AMD root for CPU family {f:#x} model {m:#x}"))
            })?],
            _ => Product::ALL.to_vec(),
        };

        let mut last_err = None;
        for der in &vek_ders {
            let vek = Cert::from_der(der, kind.name())?;
            match self.check_with_vek(&raw, &report, kind, &vek, &candidates, &extra, now) {
                Ok(chain) => {
                    if let Some(expected) = expected {
                        check_report_data(TeeKind::Snp, &report.report_data, expected)?;
                    }
                    return Ok(claims(&report, Some((kind, &chain, &vek))));
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| invalid("no endorsement key")))
    }

    #[allow(clippy::too_many_arguments)]
    fn check_with_vek(
        &self,
        raw: &[u8],
        report: &AttestationReport,
        kind: KeyKind,
        vek: &Cert,
        candidates: &[Product],
        extra: &[Cert],
        now: SystemTime,
    ) -> Result<Chain, Error> {
        let chain = verify_chain(kind, vek, candidates, extra, now)?;
        verify_report_signature(raw, vek)?;
        check_tcb(kind, vek, report)?;
        Ok(chain)
    }
}

fn decode_b64(what: &str, s: &str) -> Result<Vec<u8>, Error> {
    B64.decode(s.trim())
        .map_err(|e| malformed(format!("{what} is not base64: {e}")))
}

fn parse_report(raw: &[u8]) -> Result<AttestationReport, Error> {
    if raw.len() != REPORT_LEN {
        return Err(malformed(format!(
            "report is {} bytes, expected {REPORT_LEN}",
            raw.len()
        )));
    }
    AttestationReport::from_bytes(raw).map_err(|e| malformed(format!("report: {e}")))
}

/// ARK (embedded) self-signed → intermediate (ASK for VCEK, ASVK for VLEK) → VEK, all valid at now.
fn verify_chain(
    kind: KeyKind,
    vek: &Cert,
    candidates: &[Product],
    extra: &[Cert],
    now: SystemTime,
) -> Result<Chain, Error> {
    for &product in candidates {
        let ark = Cert::embedded(product.ark_pem())?;
        let wanted_cn = match kind {
            KeyKind::Vcek => format!("SEV-{}", product.name()),
            KeyKind::Vlek => format!("SEV-VLEK-{}", product.name()),
        };
        let mut intermediates = Vec::new();
        match kind {
            KeyKind::Vcek => intermediates.push(Cert::embedded(product.ask_pem())?),
            KeyKind::Vlek => {
                if let Some(pem) = product.asvk_pem() {
                    intermediates.push(Cert::embedded(pem)?);
                }
            }
        }
        let ark_der = ark.der();
        let intermediates = intermediates.iter().chain(
            extra
                .iter()
                .filter(|c| c.der() != ark_der && c.common_name() == wanted_cn),
        );
        for inter in intermediates {
            if !vek.signed_by(inter) {
                continue;
            }
            if !ark.signed_by(&ark) {
                return Err(invalid(format!(
                    "embedded ARK-{} is not self-signed",
                    product.name()
                )));
            }
            if !inter.signed_by(&ark) {
                return Err(invalid(format!(
                    "{} {} is not signed by ARK-{}",
                    kind.intermediate(),
                    inter.common_name(),
                    product.name()
                )));
            }
            ark.check_validity("ARK", now)?;
            inter.check_validity(kind.intermediate(), now)?;
            vek.check_validity(kind.name(), now)?;
            check_ca_chain(extra, &ark, product)?;
            return Ok(Chain {
                product,
                intermediate_cn: inter.common_name(),
            });
        }
    }
    let names: Vec<&str> = candidates.iter().map(|p| p.name()).collect();
    Err(invalid(format!(
        "the {} ({}) is not signed by the AMD {} of {}",
        kind.name(),
        vek.common_name(),
        kind.intermediate(),
        names.join("/")
    )))
}

/// A supplied `ca_chain` must not be silently ignored when it is bad: its ARK must be the
/// embedded one and every other certificate in it must be signed by that ARK.
fn check_ca_chain(extra: &[Cert], ark: &Cert, product: Product) -> Result<(), Error> {
    let ark_der = ark.der();
    for c in extra {
        if c.der() == ark_der {
            continue;
        }
        if c.common_name().starts_with("ARK-") {
            return Err(invalid(format!(
                "ca_chain holds an ARK ({}) that is not AMD's ARK-{}",
                c.common_name(),
                product.name()
            )));
        }
        if !c.signed_by(ark) {
            return Err(invalid(format!(
                "ca_chain certificate {} is not signed by ARK-{}",
                c.common_name(),
                product.name()
            )));
        }
    }
    Ok(())
}

/// ECDSA P-384/SHA-384 over the raw signed bytes; every unsigned byte of the signature block
/// must be zero so that no bit of the report can change without failing.
fn verify_report_signature(raw: &[u8], vek: &Cert) -> Result<(), Error> {
    use p384::ecdsa::signature::Verifier as _;
    let sig_block = &raw[SIGNED_LEN..];
    let (r_le, rest) = sig_block.split_at(72);
    let (s_le, reserved) = rest.split_at(72);
    if r_le[48..].iter().chain(&s_le[48..]).any(|b| *b != 0) || reserved.iter().any(|b| *b != 0) {
        return Err(invalid(
            "non-zero bytes in the unused part of the signature",
        ));
    }
    let be = |le: &[u8]| -> Vec<u8> { le[..48].iter().rev().copied().collect() };
    let (r, s) = (be(r_le), be(s_le));
    let sig = p384::ecdsa::Signature::from_scalars(
        *p384::FieldBytes::from_slice(&r),
        *p384::FieldBytes::from_slice(&s),
    )
    .map_err(|e| {
        invalid(format!(
            "report signature is not a valid P-384 signature: {e}"
        ))
    })?;
    let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(vek.sev.public_key_sec1())
        .map_err(|e| invalid(format!("endorsement key is not a P-384 key: {e}")))?;
    key.verify(&raw[..SIGNED_LEN], &sig)
        .map_err(|_| invalid("the report signature does not verify with the endorsement key"))
}

/// The reported TCB must equal the certificate's SPLs; a VCEK's hwID must equal CHIP_ID.
fn check_tcb(kind: KeyKind, vek: &Cert, report: &AttestationReport) -> Result<(), Error> {
    let t = &report.reported_tcb;
    let checks = [
        ("bootloader", OID_BL_SPL, Some(t.bootloader)),
        ("tee", OID_TEE_SPL, Some(t.tee)),
        ("snp", OID_SNP_SPL, Some(t.snp)),
        ("microcode", OID_UCODE_SPL, Some(t.microcode)),
        ("fmc", OID_FMC_SPL, t.fmc),
    ];
    for (name, oid, reported) in checks {
        match (vek.spl(oid)?, reported) {
            (Some(cert), Some(rep)) if cert != rep => {
                return Err(invalid(format!(
                    "reported TCB {name} {rep} differs from the {}'s {cert}",
                    kind.name()
                )))
            }
            (None, Some(_)) if name != "fmc" => {
                return Err(invalid(format!(
                    "the {} has no {name} SPL extension",
                    kind.name()
                )))
            }
            _ => {}
        }
    }
    if kind == KeyKind::Vcek && report.chip_id != [0u8; 64] {
        let hw = vek
            .hw_id()
            .ok_or_else(|| invalid("the VCEK has no hwID extension"))?;
        let ok = match hw.len() {
            64 => hw[..] == report.chip_id[..],
            8 => hw[..] == report.chip_id[..8],
            _ => false,
        };
        if !ok {
            return Err(invalid("the VCEK's hwID differs from the report's CHIP_ID"));
        }
    }
    Ok(())
}

fn tcb_json(t: &TcbVersion) -> serde_json::Value {
    let mut v = json!({
        "bootloader": t.bootloader,
        "tee": t.tee,
        "snp": t.snp,
        "microcode": t.microcode,
    });
    if let Some(fmc) = t.fmc {
        v["fmc"] = json!(fmc);
    }
    v
}

/// Claims from a parsed report; `verified` says what signed it when the checks passed.
fn claims(report: &AttestationReport, verified: Option<(KeyKind, &Chain, &Cert)>) -> Claims {
    let p = &report.policy;
    let mut details = json!({
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": {
            "raw": format!("{:#x}", u64::from(*p)),
            "abi_major": p.abi_major(),
            "abi_minor": p.abi_minor(),
            "smt_allowed": p.smt_allowed(),
            "migrate_ma_allowed": p.migrate_ma_allowed(),
            "debug_allowed": p.debug_allowed(),
            "single_socket_required": p.single_socket_required(),
        },
        "family_id": hex::encode(report.family_id),
        "image_id": hex::encode(report.image_id),
        "vmpl": report.vmpl,
        "platform_info": format!("{:#x}", u64::from(report.plat_info)),
        "key_info": format!("{:#x}", u32::from(report.key_info)),
        "reported_tcb": tcb_json(&report.reported_tcb),
        "committed_tcb": tcb_json(&report.committed_tcb),
        "current_tcb": tcb_json(&report.current_tcb),
        "launch_tcb": tcb_json(&report.launch_tcb),
        "current_firmware": report.current.to_string(),
        "committed_firmware": report.committed.to_string(),
        "chip_id": hex::encode(report.chip_id),
        "id_key_digest": hex::encode(report.id_key_digest),
        "author_key_digest": hex::encode(report.author_key_digest),
        "report_id": hex::encode(report.report_id),
    });
    if let (Some(f), Some(m), Some(s)) =
        (report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step)
    {
        details["cpuid"] = json!({"family": f, "model": m, "stepping": s});
    }
    if let Some((kind, chain, vek)) = verified {
        details["signing_key"] = json!(kind.name());
        details["product"] = json!(chain.product.name());
        details["intermediate"] = json!(chain.intermediate_cn);
        details["endorsement_key_expires"] =
            json!(vek.x509.tbs_certificate.validity.not_after.to_string());
    }
    Claims {
        tee: TeeKind::Snp,
        insecure: false,
        measurement: hex::encode(report.measurement),
        report_data: hex::encode(report.report_data),
        init_data: hex::encode(report.host_data),
        debug: p.debug_allowed(),
        details,
    }
}

/// Parse evidence without checking anything, for display next to a failure. UNVERIFIED.
pub(crate) fn unverified_claims(evidence: &serde_json::Value) -> Option<Claims> {
    let ev: SnpEvidence = serde_json::from_value(evidence.clone()).ok()?;
    let raw = B64.decode(ev.report.trim()).ok()?;
    let report = parse_report(&raw).ok()?;
    Some(claims(&report, None))
}

impl Verifier for SnpVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Snp
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

/// Build SNP evidence JSON from a raw report and an endorsement certificate.
pub fn evidence_json(
    report: &[u8],
    vcek_der: Option<&[u8]>,
    vlek_der: Option<&[u8]>,
    ca_chain_pem: Option<String>,
) -> serde_json::Value {
    serde_json::to_value(SnpEvidence {
        report: B64.encode(report),
        vcek: vcek_der.map(|d| B64.encode(d)),
        vlek: vlek_der.map(|d| B64.encode(d)),
        ca_chain: ca_chain_pem,
    })
    .unwrap_or_default()
}

/// Convert SNP evidence in the CoCo attestation-service form (`{"attestation_report": {...},
/// "cert_chain": [{"cert_type": "VCEK", "data": [bytes]}]}`, the serde form of the `sev`
/// crate's types) into veil's [`SnpEvidence`] JSON. The raw report is rebuilt with every
/// reserved byte zero; the signature check then tells whether that was faithful.
pub fn evidence_from_coco(v: &serde_json::Value) -> Result<serde_json::Value, Error> {
    let report: AttestationReport = serde_json::from_value(v["attestation_report"].clone())
        .map_err(|e| malformed(format!("attestation_report: {e}")))?;
    let raw = report
        .to_bytes()
        .map_err(|e| malformed(format!("attestation_report: {e}")))?;
    let mut certs = Endorsements::default();
    for entry in v["cert_chain"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let data: Vec<u8> = serde_json::from_value(entry["data"].clone())
            .map_err(|e| malformed(format!("cert_chain data: {e}")))?;
        certs.add(entry["cert_type"].as_str().unwrap_or(""), data);
    }
    Ok(certs.into_evidence(&raw))
}

/// HOSTDATA of the report in SNP evidence (veil's or Confidential Containers' shape), read
/// without verifying anything: what the guest itself checks against its own init data.
pub fn launch_data(evidence: &serde_json::Value) -> Result<Vec<u8>, Error> {
    let raw = decode_b64("report", &veil_shape(evidence)?.report)?;
    Ok(parse_report(&raw)?.host_data.to_vec())
}

/// Evidence in veil's shape, converted from Confidential Containers' shape if need be.
fn veil_shape(evidence: &serde_json::Value) -> Result<SnpEvidence, Error> {
    let converted;
    let evidence = if evidence.get("attestation_report").is_some() {
        converted = evidence_from_coco(evidence)?;
        &converted
    } else {
        evidence
    };
    serde_json::from_value(evidence.clone()).map_err(|e| malformed(format!("evidence: {e}")))
}

/// Convert veil's [`SnpEvidence`] JSON into the Confidential Containers shape (see
/// [`evidence_from_coco`]): the parsed report and a certificate chain naming each certificate's
/// role (a self-signed CA certificate is the ARK, any other the ASK or ASVK).
pub fn evidence_to_coco(v: &serde_json::Value) -> Result<serde_json::Value, Error> {
    let ev: SnpEvidence =
        serde_json::from_value(v.clone()).map_err(|e| malformed(format!("evidence: {e}")))?;
    let raw = decode_b64("report", &ev.report)?;
    let report = parse_report(&raw)?;
    let mut chain = Vec::new();
    for (role, c) in [("VCEK", &ev.vcek), ("VLEK", &ev.vlek)] {
        if let Some(c) = c {
            chain.push(json!({"cert_type": role, "data": decode_b64(role, c)?}));
        }
    }
    if let Some(pem) = &ev.ca_chain {
        for c in Cert::from_pem_bundle(pem, "ca_chain")? {
            let tbs = &c.x509.tbs_certificate;
            let role = if tbs.issuer == tbs.subject {
                "ARK"
            } else {
                "ASK"
            };
            let der = c
                .x509
                .to_der()
                .map_err(|e| malformed(format!("ca_chain: {e}")))?;
            chain.push(json!({"cert_type": role, "data": der}));
        }
    }
    let report =
        serde_json::to_value(report).map_err(|e| malformed(format!("attestation_report: {e}")))?;
    Ok(json!({"attestation_report": report, "cert_chain": chain}))
}

// ---------------------------------------------------------------------------------------------
// Attester

/// Where configfs-tsm reports are made.
pub const CONFIGFS_TSM_REPORT: &str = "/sys/kernel/config/tsm/report";
/// The SEV guest device.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";

const GUID_VCEK: &str = "63da758d-e664-4564-adc5-f4b93be8accd";
const GUID_VLEK: &str = "a8074bc2-a25a-483e-aae6-39c045a0b8a1";
const GUID_ASK: &str = "4ab7b379-bbac-4fe4-a02f-05aef327c782";
const GUID_ARK: &str = "c0b406a4-a803-4952-9743-3fb6014cd0ae";

/// Attester inside an SEV-SNP guest: configfs-tsm first, else `/dev/sev-guest`.
///
/// The VCEK/VLEK comes from the configfs `auxblob` or the extended report's certificate table
/// when the host provisioned one; otherwise `vcek`/`vlek` are null and the verifier must be
/// given the certificate ([`SnpVerifier::with_endorsement_certs`]).
pub struct SnpAttester {
    configfs: PathBuf,
    device: PathBuf,
    vmpl: Option<u32>,
}

impl Default for SnpAttester {
    fn default() -> Self {
        Self::new()
    }
}

impl SnpAttester {
    /// The attester at the standard paths.
    pub fn new() -> Self {
        Self {
            configfs: PathBuf::from(CONFIGFS_TSM_REPORT),
            device: PathBuf::from(SEV_GUEST_DEVICE),
            vmpl: None,
        }
    }

    /// Use other paths (for tests, or unusual mounts).
    pub fn with_paths(configfs: impl Into<PathBuf>, device: impl Into<PathBuf>) -> Self {
        Self {
            configfs: configfs.into(),
            device: device.into(),
            vmpl: None,
        }
    }

    /// Request the report at this VMPL (configfs `privlevel`).
    pub fn with_vmpl(mut self, vmpl: u32) -> Self {
        self.vmpl = Some(vmpl);
        self
    }

    fn via_configfs(&self, rd: &[u8; REPORT_DATA_LEN]) -> Result<serde_json::Value, Error> {
        let out = crate::tsm::report(&self.configfs, rd, self.vmpl, "sev_guest", TeeKind::Snp)?;
        let (vcek, vlek, ca) = match &out.auxblob {
            Some(blob) => certs_from_table(blob),
            None => (None, None, None),
        };
        Ok(evidence_json(
            &out.outblob,
            vcek.as_deref(),
            vlek.as_deref(),
            ca,
        ))
    }

    #[cfg(target_os = "linux")]
    fn via_device(&self, rd: &[u8; REPORT_DATA_LEN]) -> Result<serde_json::Value, Error> {
        if !self.device.exists() {
            return Err(Error::Unavailable(
                TeeKind::Snp,
                format!(
                    "neither {} nor {} exists (not an SEV-SNP guest?)",
                    self.configfs.display(),
                    self.device.display()
                ),
            ));
        }
        if self.device != std::path::Path::new(SEV_GUEST_DEVICE) {
            return Err(Error::Unavailable(
                TeeKind::Snp,
                "the sev crate only opens /dev/sev-guest".into(),
            ));
        }
        let mut fw = sev::firmware::guest::Firmware::open()
            .map_err(|e| Error::Unavailable(TeeKind::Snp, format!("{SEV_GUEST_DEVICE}: {e}")))?;
        let (report, certs) = fw
            .get_ext_report(None, Some(*rd), self.vmpl)
            .map_err(|e| Error::Io(format!("SNP_GET_EXT_REPORT: {e}")))?;
        let mut endorsements = Endorsements::default();
        for c in certs.unwrap_or_default() {
            endorsements.add(&c.guid_string(), c.data);
        }
        Ok(endorsements.into_evidence(&report))
    }

    #[cfg(not(target_os = "linux"))]
    fn via_device(&self, _rd: &[u8; REPORT_DATA_LEN]) -> Result<serde_json::Value, Error> {
        Err(Error::Unavailable(TeeKind::Snp, "not Linux".into()))
    }
}

fn ders_to_pem(ders: &[Vec<u8>]) -> Option<String> {
    use x509_cert::der::EncodePem;
    let pems: Vec<String> = ders
        .iter()
        .filter_map(|d| x509_cert::Certificate::from_der(d).ok())
        .filter_map(|c| c.to_pem(x509_cert::der::pem::LineEnding::LF).ok())
        .collect();
    (!pems.is_empty()).then(|| pems.concat())
}

/// Parse the GHCB certificate table (`auxblob`): entries of GUID(16) offset(u32) length(u32),
/// ended by an all-zero entry; offsets are from the start of the table. Returns (VCEK, VLEK,
/// PEM of ASK+ARK); a VLEK wins over a VCEK, as the firmware signs with the VLEK when loaded.
pub(crate) fn certs_from_table(blob: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>, Option<String>) {
    let mut certs = Endorsements::default();
    for entry in blob.chunks_exact(24) {
        if entry.iter().all(|b| *b == 0) {
            break;
        }
        let Ok(guid_bytes) = <[u8; 16]>::try_from(&entry[..16]) else {
            break;
        };
        let guid = uuid_string(&guid_bytes);
        let off = u32::from_le_bytes([entry[16], entry[17], entry[18], entry[19]]) as usize;
        let len = u32::from_le_bytes([entry[20], entry[21], entry[22], entry[23]]) as usize;
        let Some(data) = off.checked_add(len).and_then(|end| blob.get(off..end)) else {
            continue;
        };
        certs.add(&guid, data.to_vec());
    }
    certs.finish()
}

/// Endorsement certificates gathered from a certificate table or chain, by role. Roles are
/// named either as in CoCo evidence (`VCEK`, `VLEK`, `ASK`, `ARK`) or by the firmware's GUIDs.
#[derive(Default)]
struct Endorsements {
    vcek: Option<Vec<u8>>,
    vlek: Option<Vec<u8>>,
    ca: Vec<Vec<u8>>,
}

impl Endorsements {
    fn add(&mut self, role: &str, der: Vec<u8>) {
        match role {
            "VCEK" | GUID_VCEK => self.vcek = Some(der),
            "VLEK" | GUID_VLEK => self.vlek = Some(der),
            "ASK" | "ARK" | GUID_ASK | GUID_ARK => self.ca.push(der),
            _ => {}
        }
    }

    /// (VCEK, VLEK, PEM of ASK+ARK); a VLEK wins over a VCEK, as the firmware signs with the
    /// VLEK when one is loaded.
    fn finish(self) -> (Option<Vec<u8>>, Option<Vec<u8>>, Option<String>) {
        let vcek = if self.vlek.is_some() { None } else { self.vcek };
        (vcek, self.vlek, ders_to_pem(&self.ca))
    }

    fn into_evidence(self, report: &[u8]) -> serde_json::Value {
        let (vcek, vlek, ca) = self.finish();
        evidence_json(report, vcek.as_deref(), vlek.as_deref(), ca)
    }
}

/// GUIDs in the table are in the big-endian byte order of their string form.
fn uuid_string(b: &[u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl Attester for SnpAttester {
    fn tee(&self) -> TeeKind {
        TeeKind::Snp
    }

    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, Error> {
        let rd = crate::pad_report_data(TeeKind::Snp, report_data)?;
        let ev = if self.configfs.is_dir() {
            self.via_configfs(&rd)?
        } else {
            self.via_device(&rd)?
        };
        evidence_to_coco(&ev)
    }
}

#[cfg(test)]
mod tests;
