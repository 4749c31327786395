//! Tests against the real vectors in testdata/snp (copied from shared/testdata: virtee/sev and trustee).
#![allow(clippy::unwrap_used)]

use super::*;
use std::path::Path;
use std::time::Duration;

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/snp");

/// 2025-07-01T00:00:00Z: inside the validity window of every certificate in the vectors
/// (the trustee VLEK is valid only 2024-12-10 .. 2025-12-10).
fn now() -> SystemTime {
    at_secs(1_751_328_000)
}

fn at_secs(secs: u64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs)
}

fn read(rel: &str) -> Vec<u8> {
    let p = Path::new(TESTDATA).join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[derive(Clone)]
struct Vector {
    report: Vec<u8>,
    vcek: Option<Vec<u8>>,
    vlek: Option<Vec<u8>>,
    ca_chain: Option<String>,
}

impl Vector {
    fn evidence(&self) -> serde_json::Value {
        evidence_json(
            &self.report,
            self.vcek.as_deref(),
            self.vlek.as_deref(),
            self.ca_chain.clone(),
        )
    }
    fn own_report_data(&self) -> [u8; 64] {
        self.report[0x50..0x90].try_into().unwrap()
    }
}

fn virtee_milan() -> Vector {
    let hex_text = read("virtee-sev/report_milan.hex");
    Vector {
        report: hex::decode(String::from_utf8(hex_text).unwrap().trim()).unwrap(),
        vcek: Some(read("virtee-sev/vcek_milan.der")),
        vlek: None,
        ca_chain: None,
    }
}

fn trustee_vcek() -> Vector {
    Vector {
        report: read("trustee/test-report.bin"),
        vcek: Some(read("trustee/test-vcek.der")),
        vlek: None,
        ca_chain: None,
    }
}

fn trustee_vlek() -> Vector {
    Vector {
        report: read("trustee/test-vlek-report.bin"),
        vcek: None,
        vlek: Some(read("trustee/test-vlek.der")),
        ca_chain: None,
    }
}

fn trustee_genoa() -> Vector {
    let v: serde_json::Value = serde_json::from_slice(&read("trustee/evidence.json")).unwrap();
    let ev: SnpEvidence = serde_json::from_value(evidence_from_coco(&v).unwrap()).unwrap();
    Vector {
        report: B64.decode(ev.report).unwrap(),
        vcek: ev.vcek.map(|c| B64.decode(c).unwrap()),
        vlek: ev.vlek.map(|c| B64.decode(c).unwrap()),
        ca_chain: ev.ca_chain,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Ok,
    Invalid,
    Malformed,
    Mismatch,
    /// Invalid or Malformed (a flipped bit may make the report unparsable first).
    Rejected,
}

fn outcome(r: &Result<Claims, Error>) -> Expect {
    match r {
        Ok(_) => Expect::Ok,
        Err(Error::Invalid { .. }) => Expect::Invalid,
        Err(Error::Malformed { .. }) => Expect::Malformed,
        Err(Error::ReportDataMismatch { .. }) => Expect::Mismatch,
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

/// Verify `base` after `mutate`, with the report's own (unmutated) report data expected.
fn check(
    name: &str,
    base: &Vector,
    mutate: &dyn Fn(&mut Vector),
    expect: Expect,
) -> Option<Claims> {
    check_at(name, base, mutate, expect, now(), SnpVerifier::new())
}

fn check_at(
    name: &str,
    base: &Vector,
    mutate: &dyn Fn(&mut Vector),
    expect: Expect,
    at: SystemTime,
    verifier: SnpVerifier,
) -> Option<Claims> {
    let rd = base.own_report_data();
    let mut v = base.clone();
    mutate(&mut v);
    let r = verifier.verify(&v.evidence(), &rd, at);
    let got = outcome(&r);
    if expect == Expect::Rejected {
        assert!(
            matches!(got, Expect::Invalid | Expect::Malformed),
            "{name}: {r:?}"
        );
    } else {
        assert_eq!(got, expect, "{name}: {r:?}");
    }
    r.ok()
}

fn none(_: &mut Vector) {}

fn flip_report(off: usize, mask: u8) -> impl Fn(&mut Vector) {
    move |v| v.report[off] ^= mask
}

fn add_report(off: usize) -> impl Fn(&mut Vector) {
    move |v| v.report[off] = v.report[off].wrapping_add(1)
}

fn flip_vek(off: usize, mask: u8) -> impl Fn(&mut Vector) {
    move |v| {
        let c = v.vcek.as_mut().or(v.vlek.as_mut()).unwrap();
        c[off] ^= mask;
    }
}

#[test]
fn real_vectors_verify() {
    let c = check("virtee milan", &virtee_milan(), &none, Expect::Ok).unwrap();
    assert_eq!(c.tee, TeeKind::Snp);
    assert!(!c.insecure && !c.debug);
    assert_eq!(c.measurement, "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f");
    assert_eq!(c.report_data, "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd");
    assert_eq!(c.init_data, "00".repeat(32));
    assert_eq!(c.details["version"], 2);
    assert_eq!(c.details["product"], "Milan");
    assert_eq!(c.details["signing_key"], "VCEK");
    assert_eq!(c.details["policy"]["raw"], "0x30000");
    for t in ["reported_tcb", "committed_tcb", "current_tcb", "launch_tcb"] {
        assert_eq!(
            c.details[t],
            json!({"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}),
            "{t}"
        );
    }
    assert_eq!(c.details["chip_id"], "d49554ec717f4e5b0fe6b143bcf0405bd7ae304727edf46603f2a76aef6a3abc15d7af38db757039029f0efacfd08e244324884738c72b082e2f87a44d541eb6");

    let c = check("trustee vcek (v2)", &trustee_vcek(), &none, Expect::Ok).unwrap();
    assert_eq!(c.measurement, "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c");
    assert_eq!(
        c.report_data,
        format!(
            "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2{}",
            "00".repeat(32)
        )
    );
    assert_eq!(c.details["policy"]["raw"], "0x3001f");
    assert_eq!(c.details["current_tcb"]["microcode"], 206);
    assert_eq!(c.details["reported_tcb"]["microcode"], 115);
    assert_ne!(c.details["id_key_digest"], "00".repeat(48));

    let c = check("trustee vlek (v3)", &trustee_vlek(), &none, Expect::Ok).unwrap();
    assert_eq!(c.details["version"], 3);
    assert_eq!(c.details["vmpl"], 1);
    assert_eq!(c.details["signing_key"], "VLEK");
    assert_eq!(c.details["intermediate"], "SEV-VLEK-Milan");
    assert_eq!(
        c.details["cpuid"],
        json!({"family": 0x19, "model": 1, "stepping": 1})
    );
    assert_eq!(
        c.details["reported_tcb"],
        json!({"bootloader": 4, "tee": 0, "snp": 24, "microcode": 217})
    );
    assert_eq!(c.measurement, "8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc94e740dbe92c93c4e8c9af857f5ceeb5a493df2a570d7bf0");

    let c = check(
        "trustee genoa evidence.json",
        &trustee_genoa(),
        &none,
        Expect::Ok,
    )
    .unwrap();
    assert_eq!(c.details["product"], "Genoa");
    assert_eq!(c.details["current_firmware"], "1.55.40");
    assert_eq!(c.measurement, "6a6519d757e68c2e939c9dbbbc1828498e8de35d2766dd05f1a2cca5059d0cf4ae62a36d75c837974dd50b315506e73e");
    assert_eq!(c.details["chip_id"], "371c55d6d15cb50f16dc31d39a24e300caaabff4431e841111429b73ec45ad67ea6e687ffae7bf84b54a5d0e6d79b3ef6ff0bd8b4cff94c2163af5c5de8718e8");
}

#[test]
fn report_data_binding() {
    for (name, v) in [
        ("virtee", virtee_milan()),
        ("trustee vcek", trustee_vcek()),
        ("trustee vlek", trustee_vlek()),
        ("genoa", trustee_genoa()),
    ] {
        let mut other = v.own_report_data();
        other[0] ^= 1;
        let e = SnpVerifier::new()
            .verify(&v.evidence(), &other, now())
            .unwrap_err();
        assert!(matches!(e, Error::ReportDataMismatch { .. }), "{name}: {e}");
    }
}

#[test]
fn tampering_fails() {
    let vectors = [
        ("virtee", virtee_milan()),
        ("trustee vcek", trustee_vcek()),
        ("trustee vlek", trustee_vlek()),
        ("genoa", trustee_genoa()),
    ];
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Box<dyn Fn(&mut Vector)>, Expect)> = vec![
        // Report body (signed part).
        (
            "version byte",
            Box::new(flip_report(0x00, 0x01)),
            Expect::Rejected,
        ),
        (
            "policy bit 19 (debug)",
            Box::new(flip_report(0x0A, 0x08)),
            Expect::Invalid,
        ),
        (
            "family_id (byte 21)",
            Box::new(flip_report(21, 0x80)),
            Expect::Invalid,
        ),
        (
            "image_id (byte 42 += 1)",
            Box::new(add_report(42)),
            Expect::Invalid,
        ),
        ("vmpl", Box::new(flip_report(0x30, 0x01)), Expect::Invalid),
        (
            "report_data",
            Box::new(flip_report(0x50, 0x01)),
            Expect::Invalid,
        ),
        (
            "measurement",
            Box::new(flip_report(0x90, 0x80)),
            Expect::Invalid,
        ),
        (
            "host_data",
            Box::new(flip_report(0xC0, 0x01)),
            Expect::Invalid,
        ),
        (
            "reported_tcb.bootloader (byte 384 += 1)",
            Box::new(add_report(384)),
            Expect::Invalid,
        ),
        (
            "chip_id",
            Box::new(flip_report(0x1A0, 0x01)),
            Expect::Invalid,
        ),
        (
            "launch_tcb",
            Box::new(flip_report(0x1F0, 0x01)),
            Expect::Invalid,
        ),
        (
            "reserved byte 0x1EB",
            Box::new(flip_report(0x1EB, 0x01)),
            Expect::Rejected,
        ),
        (
            "reserved byte 0x250",
            Box::new(flip_report(0x250, 0x01)),
            Expect::Rejected,
        ),
        (
            "last signed byte (reserved)",
            Box::new(flip_report(0x29F, 0x01)),
            Expect::Rejected,
        ),
        // Signature.
        (
            "signature r",
            Box::new(flip_report(0x2A0, 0x01)),
            Expect::Invalid,
        ),
        (
            "signature s",
            Box::new(flip_report(0x2E8 + 20, 0x10)),
            Expect::Invalid,
        ),
        (
            "signature r padding",
            Box::new(flip_report(0x2A0 + 60, 0x01)),
            Expect::Invalid,
        ),
        (
            "signature reserved tail",
            Box::new(flip_report(0x4A0 - 1, 0x01)),
            Expect::Invalid,
        ),
        // Endorsement certificate: SHA-384 OID in the TBS algorithm (virtee's byte 40 ^ 0xff,
        // trustee's byte 42 += 1), the subject public key, and the ASK's signature.
        ("vek byte 40", Box::new(flip_vek(40, 0xff)), Expect::Invalid),
        ("vek byte 42", Box::new(flip_vek(42, 0x07)), Expect::Invalid),
        (
            "vek signature",
            Box::new(|v: &mut Vector| {
                let c = v.vcek.as_mut().or(v.vlek.as_mut()).unwrap();
                let n = c.len();
                c[n - 10] ^= 0x01;
            }),
            Expect::Invalid,
        ),
        (
            "vek public key",
            Box::new(|v: &mut Vector| {
                let c = v.vcek.as_mut().or(v.vlek.as_mut()).unwrap();
                // The P-384 point's last coordinate byte sits right before the extensions; find
                // the SEC1 point and flip a byte in it.
                let cert = x509_cert::Certificate::from_der(c).unwrap();
                let key = cert
                    .tbs_certificate
                    .subject_public_key_info
                    .subject_public_key
                    .raw_bytes()
                    .to_vec();
                let at = c
                    .windows(key.len())
                    .position(|w| w == key.as_slice())
                    .unwrap();
                c[at + 30] ^= 0x01;
            }),
            Expect::Invalid,
        ),
        // Truncated / wrong-size report.
        (
            "truncated report",
            Box::new(|v: &mut Vector| v.report.truncate(1000)),
            Expect::Malformed,
        ),
    ];
    for (vname, v) in &vectors {
        for (cname, mutate, expect) in &cases {
            check(&format!("{vname}: {cname}"), v, mutate.as_ref(), *expect);
        }
    }
}

#[test]
fn wrong_keys_and_chains_fail() {
    // The VLEK report with its VLEK passed as a VCEK, and the VCEK report with the VLEK.
    check(
        "vlek as vcek",
        &trustee_vlek(),
        &|v| {
            v.vcek = v.vlek.take();
        },
        Expect::Invalid,
    );
    check(
        "vcek report with the vlek",
        &trustee_vcek(),
        &|v| {
            v.vcek = Some(read("trustee/test-vlek.der"));
        },
        Expect::Invalid,
    );
    // Another chip's genuine VCEK: the chain verifies, the report signature does not.
    check(
        "virtee report, trustee vcek",
        &virtee_milan(),
        &|v| {
            v.vcek = Some(read("trustee/test-vcek.der"));
        },
        Expect::Invalid,
    );
    // Synthetic certificates whose TBS was edited after signing.
    for f in [
        "trustee/test-vcek-invalid-legacy.der",
        "trustee/test-vcek-invalid-new.der",
    ] {
        check(
            f,
            &trustee_vcek(),
            &|v| v.vcek = Some(read(f)),
            Expect::Invalid,
        );
    }
    // Both keys, or none.
    check(
        "both keys",
        &trustee_vcek(),
        &|v| {
            v.vlek = Some(read("trustee/test-vlek.der"));
        },
        Expect::Malformed,
    );
    check(
        "no key",
        &trustee_vcek(),
        &|v| v.vcek = None,
        Expect::Malformed,
    );
    // ...unless the verifier is configured with it.
    check_at(
        "configured vcek",
        &trustee_vcek(),
        &|v| v.vcek = None,
        Expect::Ok,
        now(),
        SnpVerifier::new().with_endorsement_certs(vec![
            read("virtee-sev/vcek_milan.der"),
            read("trustee/test-vcek.der"),
        ]),
    );
    // trustee requires v3: the v2 reports fail with a minimum of 3, the v3 one passes.
    for (name, v, expect) in [
        ("v2", trustee_vcek(), Expect::Invalid),
        ("v2", virtee_milan(), Expect::Invalid),
        ("v3", trustee_vlek(), Expect::Ok),
    ] {
        check_at(
            name,
            &v,
            &none,
            expect,
            now(),
            SnpVerifier::new().with_min_report_version(3),
        );
    }
}

#[test]
fn certificate_validity_uses_now() {
    // The VLEK expired on 2025-12-10; 2026-06-01 is after that.
    let after = at_secs(1_780_272_000);
    check_at(
        "vlek expired",
        &trustee_vlek(),
        &none,
        Expect::Invalid,
        after,
        SnpVerifier::new(),
    );
    let v = trustee_vlek();
    let e = SnpVerifier::new()
        .verify(&v.evidence(), &v.own_report_data(), after)
        .unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    // The wall clock (after 2025-12-10) rejects it too.
    check_at(
        "vlek wall clock",
        &trustee_vlek(),
        &none,
        Expect::Invalid,
        SystemTime::now(),
        SnpVerifier::new(),
    );
    // Before the VLEK existed.
    check_at(
        "vlek not yet",
        &trustee_vlek(),
        &none,
        Expect::Invalid,
        at_secs(1_700_000_000),
        SnpVerifier::new(),
    );
    // The VCEKs are valid until 2030.
    check_at(
        "vcek 2026",
        &virtee_milan(),
        &none,
        Expect::Ok,
        after,
        SnpVerifier::new(),
    );
}

#[test]
fn ca_chain_handling() {
    let milan = String::from_utf8(read("trustee/milan_ask_ark_asvk.pem")).unwrap();
    let genoa = String::from_utf8(read("trustee/genoa_ask_ark_asvk.pem")).unwrap();
    check(
        "milan bundle",
        &trustee_vlek(),
        &|v| v.ca_chain = Some(milan.clone()),
        Expect::Ok,
    );
    check(
        "virtee chain",
        &virtee_milan(),
        &|v| {
            v.ca_chain = Some(String::from_utf8(read("virtee-sev/cert_chain_milan")).unwrap());
        },
        Expect::Ok,
    );
    // The Genoa evidence with the Milan bundle: the Milan ARK is not Genoa's.
    check(
        "genoa with milan bundle",
        &trustee_genoa(),
        &|v| v.ca_chain = Some(milan.clone()),
        Expect::Invalid,
    );
    check(
        "genoa with genoa bundle",
        &trustee_genoa(),
        &|v| v.ca_chain = Some(genoa.clone()),
        Expect::Ok,
    );
    // A tampered bundle is rejected rather than ignored: flip one base64 char in each cert.
    let pems: Vec<&str> = milan
        .split_inclusive("-----END CERTIFICATE-----\n")
        .collect();
    assert_eq!(pems.len(), 3);
    for i in 0..3 {
        let mut tampered: Vec<String> = pems.iter().map(|s| s.to_string()).collect();
        let der = x509_cert::Certificate::load_pem_chain(tampered[i].as_bytes()).unwrap()[0]
            .to_der()
            .unwrap();
        let mut der = der;
        let n = der.len();
        der[n - 20] ^= 0x01; // inside the signature
        tampered[i] = ders_to_pem(&[der]).unwrap();
        let bundle = tampered.concat();
        check(
            &format!("tampered bundle cert {i}"),
            &trustee_vlek(),
            &|v| v.ca_chain = Some(bundle.clone()),
            Expect::Invalid,
        );
    }
    check(
        "garbage bundle",
        &trustee_vlek(),
        &|v| {
            v.ca_chain =
                Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into())
        },
        Expect::Malformed,
    );
}

#[test]
fn evidence_shape_is_strict() {
    let v = trustee_vcek();
    let rd = v.own_report_data();
    let mut ev = v.evidence();
    ev["extra"] = json!(1);
    for bad in [
        ev,
        json!({}),
        json!({"report": "!!", "vcek": null, "vlek": null}),
        json!("x"),
    ] {
        let e = SnpVerifier::new().verify(&bad, &rd, now()).unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e}");
    }
}

#[test]
fn embedded_roots() {
    for p in Product::ALL {
        let ark = Cert::embedded(p.ark_pem()).unwrap();
        assert_eq!(ark.common_name(), format!("ARK-{}", p.name()));
        assert!(ark.signed_by(&ark), "{p:?} ARK self-signed");
        let ask = Cert::embedded(p.ask_pem()).unwrap();
        assert_eq!(ask.common_name(), format!("SEV-{}", p.name()));
        assert!(ask.signed_by(&ark), "{p:?} ARK signs ASK");
        if let Some(pem) = p.asvk_pem() {
            let asvk = Cert::embedded(pem).unwrap();
            assert_eq!(asvk.common_name(), format!("SEV-VLEK-{}", p.name()));
            assert!(asvk.signed_by(&ark), "{p:?} ARK signs ASVK");
            assert!(!asvk.signed_by(&ask));
        }
        // Flipped bits in the ARK and the ASK break those signatures.
        for (what, pem, off) in [
            ("ark tbs", p.ark_pem(), 200),
            ("ark sig", p.ark_pem(), 0),
            ("ask tbs", p.ask_pem(), 200),
            ("ask sig", p.ask_pem(), 0),
        ] {
            let mut der = Cert::embedded(pem).unwrap().der();
            let n = der.len();
            let i = if off == 0 { n - 30 } else { off };
            der[i] ^= 0x01;
            let Ok(bad) = Cert::from_der(&der, "x") else {
                continue;
            };
            if what.starts_with("ark") {
                assert!(!bad.signed_by(&bad), "{p:?} {what}");
                if what == "ark tbs" {
                    assert!(!ask.signed_by(&bad), "{p:?} {what}");
                }
            } else {
                assert!(!bad.signed_by(&ark), "{p:?} {what}");
            }
        }
    }
    // Embedded Milan ASK/ARK are the same as the virtee and trustee copies.
    let virtee = Cert::from_pem_bundle(
        &String::from_utf8(read("virtee-sev/cert_chain_milan")).unwrap(),
        "x",
    )
    .unwrap();
    assert_eq!(
        virtee[0].der(),
        Cert::embedded(Product::Milan.ask_pem()).unwrap().der()
    );
    assert_eq!(
        virtee[1].der(),
        Cert::embedded(Product::Milan.ark_pem()).unwrap().der()
    );
}

#[test]
fn turin_and_cross_product_chains() {
    let turin = Cert::from_der(&read("virtee-sev/vcek_turin.der"), "VCEK").unwrap();
    let chain = verify_chain(KeyKind::Vcek, &turin, &Product::ALL, &[], now()).unwrap();
    assert_eq!(chain.product, Product::Turin);
    assert!(verify_chain(KeyKind::Vcek, &turin, &[Product::Milan], &[], now()).is_err());
    assert_eq!(
        turin.hw_id().unwrap(),
        hex::decode("1e550a8ee5cf9f4d").unwrap()
    );
    assert_eq!(turin.spl(OID_FMC_SPL).unwrap(), Some(0));
    assert_eq!(turin.spl(OID_UCODE_SPL).unwrap(), Some(9));

    let genoa = Cert::from_der(trustee_genoa().vcek.as_ref().unwrap(), "VCEK").unwrap();
    assert_eq!(
        verify_chain(KeyKind::Vcek, &genoa, &Product::ALL, &[], now())
            .unwrap()
            .product,
        Product::Genoa
    );
    assert!(verify_chain(KeyKind::Vcek, &genoa, &[Product::Milan], &[], now()).is_err());

    // VCEK under the ASVK (wrong intermediate) and VLEK under the ASK.
    let vcek = Cert::from_der(&read("trustee/test-vcek.der"), "VCEK").unwrap();
    assert!(verify_chain(KeyKind::Vlek, &vcek, &Product::ALL, &[], now()).is_err());
    let vlek = Cert::from_der(&read("trustee/test-vlek.der"), "VLEK").unwrap();
    assert!(verify_chain(KeyKind::Vcek, &vlek, &Product::ALL, &[], now()).is_err());
    assert!(vlek.hw_id().is_none());
}

#[test]
fn vcek_extension_parsing() {
    let vcek = Cert::from_der(&read("trustee/test-vcek.der"), "VCEK").unwrap();
    assert_eq!(
        [OID_BL_SPL, OID_TEE_SPL, OID_SNP_SPL, OID_UCODE_SPL].map(|o| vcek.spl(o).unwrap()),
        [Some(3), Some(0), Some(8), Some(115)]
    );
    let counting: Vec<u8> = (0u8..64).collect();
    for (f, spl) in [
        ("trustee/test-vcek-invalid-legacy.der", [3, 0, 10, 169]),
        ("trustee/test-vcek-invalid-new.der", [0, 0, 0, 30]),
    ] {
        let c = Cert::from_der(&read(f), "VCEK").unwrap();
        assert_eq!(c.hw_id().unwrap(), counting, "{f}");
        assert_eq!(
            [OID_BL_SPL, OID_TEE_SPL, OID_SNP_SPL, OID_UCODE_SPL].map(|o| c.spl(o).unwrap()),
            spl.map(Some),
            "{f}"
        );
    }
    let vlek = Cert::from_der(&read("trustee/test-vlek.der"), "VLEK").unwrap();
    assert_eq!(
        [OID_BL_SPL, OID_TEE_SPL, OID_SNP_SPL, OID_UCODE_SPL].map(|o| vlek.spl(o).unwrap()),
        [Some(4), Some(0), Some(24), Some(217)]
    );
}

#[test]
fn attester_without_device_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let a = SnpAttester::with_paths(dir.path().join("tsm/report"), dir.path().join("sev-guest"));
    let e = a.evidence(&[0u8; 64]).unwrap_err();
    assert!(matches!(e, Error::Unavailable(TeeKind::Snp, _)), "{e}");
    assert!(e.to_string().contains("not an SEV-SNP guest"), "{e}");
}

#[test]
fn configfs_attester_with_fake_tree() {
    // configfs cannot be emulated by a plain directory (the kernel creates the attribute files
    // on mkdir), so a plain directory gives a clear I/O error naming the missing file.
    let dir = tempfile::tempdir().unwrap();
    let a = SnpAttester::with_paths(dir.path(), dir.path().join("sev-guest"));
    let e = a.evidence(&[0u8; 64]).unwrap_err();
    assert!(e.to_string().contains("provider"), "{e}");
    // The entry is removed again.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn cert_table_parsing() {
    let vcek = read("trustee/test-vcek.der");
    let ask_ark = Cert::from_pem_bundle(
        &String::from_utf8(read("virtee-sev/cert_chain_milan")).unwrap(),
        "x",
    )
    .unwrap();
    let guid = |s: &str| hex::decode(s.replace('-', "")).unwrap();
    let entries = [
        (guid(GUID_ASK), ask_ark[0].der()),
        (guid(GUID_VCEK), vcek.clone()),
        (guid(GUID_ARK), ask_ark[1].der()),
    ];
    let header_len = 24 * (entries.len() + 1);
    let mut table = Vec::new();
    let mut data = Vec::new();
    for (g, d) in &entries {
        table.extend_from_slice(g);
        table.extend_from_slice(&((header_len + data.len()) as u32).to_le_bytes());
        table.extend_from_slice(&(d.len() as u32).to_le_bytes());
        data.extend_from_slice(d);
    }
    table.extend_from_slice(&[0u8; 24]);
    table.extend_from_slice(&data);
    let (c, l, ca) = certs_from_table(&table);
    assert_eq!(c.unwrap(), vcek);
    assert!(l.is_none());
    let ca = Cert::from_pem_bundle(&ca.unwrap(), "ca").unwrap();
    assert_eq!(ca.len(), 2);
    // Out-of-range entries are skipped, not trusted and not a panic.
    let mut bad = table.clone();
    bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let _ = certs_from_table(&bad);
    let _ = certs_from_table(&table[..30]);
}

/// Evidence in the shape guest-components sends (trustee's own vector, as is) is verified by
/// `SnpVerifier` directly; veil's shape converts to it and back without loss; and tampering in
/// that shape fails.
#[test]
fn coco_evidence_shape_verifies() {
    let v: serde_json::Value = serde_json::from_slice(&read("trustee/evidence.json")).unwrap();
    let g = trustee_genoa();
    let rd = g.own_report_data();
    let c = SnpVerifier::new().verify(&v, &rd, now()).unwrap();
    assert_eq!(c.details["product"], "Genoa");

    for (name, vec) in [("virtee", virtee_milan()), ("trustee vlek", trustee_vlek())] {
        let coco = evidence_to_coco(&vec.evidence()).unwrap();
        assert!(coco["attestation_report"].is_object(), "{name}");
        let back: SnpEvidence = serde_json::from_value(evidence_from_coco(&coco).unwrap()).unwrap();
        assert_eq!(B64.decode(&back.report).unwrap(), vec.report, "{name}");
        assert!(
            SnpVerifier::new()
                .verify(&coco, &vec.own_report_data(), now())
                .is_ok(),
            "{name}"
        );
    }

    let mut bad = v.clone();
    bad["attestation_report"]["guest_svn"] = json!(7);
    assert!(SnpVerifier::new().verify(&bad, &rd, now()).is_err());
    let mut bad = v.clone();
    bad["attestation_report"] = json!("nope");
    assert!(matches!(
        SnpVerifier::new().verify(&bad, &rd, now()),
        Err(Error::Malformed { .. })
    ));
}
