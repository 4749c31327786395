//! Tests against the real vectors in testdata/tdx/dcap-qvl (copied from shared/testdata).
#![allow(clippy::unwrap_used)]

use super::*;
use std::time::Duration;

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tdx/dcap-qvl");

/// Upstream's `now` for `tdx_quote` (the last second of its collateral window).
const TDX_NOW: u64 = 1_752_919_234;
/// Upstream's `now` for `tdx_quote_outdated`.
const OUTDATED_NOW: u64 = 1_774_003_274;
/// Upstream's `now` for `sgx_quote`.
const SGX_NOW: u64 = 1_752_919_277;
/// Inside both the TDX and SGX windows.
const COMMON_NOW: u64 = 1_751_000_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn read(name: &str) -> Vec<u8> {
    let p = Path::new(TESTDATA).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn collateral(name: &str) -> serde_json::Value {
    serde_json::from_slice(&read(name)).unwrap()
}

#[derive(Clone)]
struct Vector {
    quote: Vec<u8>,
    collateral: serde_json::Value,
}

fn tdx() -> Vector {
    Vector {
        quote: read("tdx_quote"),
        collateral: collateral("tdx_quote_collateral.json"),
    }
}

/// The quote's own report data (SGX quotes: "Hello, world!" padded, per the README).
fn own_report_data(v: &Vector) -> [u8; 64] {
    quote_report_data(&v.quote).unwrap_or_else(|| {
        let mut rd = [0u8; 64];
        rd[..13].copy_from_slice(b"Hello, world!");
        rd
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Ok,
    Invalid,
    Malformed,
}

/// Verify `base` after `mutate` at `now`, expecting the quote's own report data; returns the
/// claims or the error text.
fn check(
    name: &str,
    base: &Vector,
    mutate: &dyn Fn(&mut Vector),
    now: u64,
    expect: Expect,
) -> Result<Claims, String> {
    let rd = own_report_data(base);
    let mut v = base.clone();
    mutate(&mut v);
    let ev = evidence_json(&v.quote, Some(v.collateral.clone()));
    let r = TdxVerifier::new().verify(&ev, &rd, at(now));
    let got = match &r {
        Ok(_) => Expect::Ok,
        Err(Error::Invalid { .. }) => Expect::Invalid,
        Err(Error::Malformed { .. }) => Expect::Malformed,
        Err(e) => panic!("{name}: unexpected {e}"),
    };
    assert_eq!(got, expect, "{name}: {r:?}");
    r.map_err(|e| e.to_string())
}

fn none(_: &mut Vector) {}

#[test]
fn tdx_quote_verifies() {
    let c = check("tdx_quote", &tdx(), &none, TDX_NOW, Expect::Ok).unwrap();
    assert_eq!(c.tee, TeeKind::Tdx);
    assert!(!c.insecure);
    assert!(!c.debug);
    assert_eq!(c.measurement, "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7");
    assert_eq!(c.report_data, "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20");
    assert_eq!(c.init_data.len(), 96);
    let d = &c.details;
    assert_eq!(d["tcb_status"], "UpToDate");
    assert_eq!(d["advisory_ids"], json!([]));
    assert_eq!(d["quote_version"], 4);
    assert_eq!(d["tee_tcb_svn"], "06010300000000000000000000000000");
    assert_eq!(d["td_attributes"], "0000001000000000");
    assert_eq!(d["xfam"], "e702060000000000");
    assert_eq!(d["mr_seam"], "5b38e33a6487958b72c3c12a938eaa5e3fd4510c51aeeab58c7d5ecee41d7c436489d6c8e4f92f160b7cad34207b00c1");
    assert_eq!(d["rtmr0"], "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0");
    for k in ["rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner"] {
        assert_eq!(d[k].as_str().unwrap().len(), 96, "{k}");
    }
    // One constant inside the window works too.
    check(
        "tdx_quote common now",
        &tdx(),
        &none,
        COMMON_NOW,
        Expect::Ok,
    )
    .unwrap();
}

#[test]
fn report_data_mismatch() {
    let v = tdx();
    let mut other = own_report_data(&v);
    other[63] ^= 1;
    let e = TdxVerifier::new()
        .verify(
            &evidence_json(&v.quote, Some(v.collateral.clone())),
            &other,
            at(TDX_NOW),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ReportDataMismatch {
                tee: TeeKind::Tdx,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn other_vectors_fail_for_the_documented_reasons() {
    // No TCB level matches the outdated quote's platform (SGX component 8 is 3 < 5).
    let outdated = Vector {
        quote: read("tdx_quote_outdated"),
        collateral: collateral("tdx_quote_outdated_collateral.json"),
    };
    let e = check("outdated", &outdated, &none, OUTDATED_NOW, Expect::Invalid).unwrap_err();
    assert!(e.contains("No matching TCB level"), "{e}");
    // Its fields still parse (a TD 1.5 report in a v5 quote).
    let un = unverified_claims(&evidence_json(&outdated.quote, None)).unwrap();
    assert_eq!(un.measurement, "273828c46252fcbdd8ad2dd907130222b03466d52a2911d70c1a5950895d6bd1ae451d382d5a9b1b4c0ed0e5ae9a3dbd");
    assert_eq!(
        un.details["tee_tcb_svn2"],
        "0d010300000000000000000000000000"
    );

    // The SGX quote is genuine but is not a TDX quote.
    let sgx = Vector {
        quote: read("sgx_quote"),
        collateral: collateral("sgx_quote_collateral.json"),
    };
    let e = check("sgx", &sgx, &none, SGX_NOW, Expect::Invalid).unwrap_err();
    assert!(e.contains("not a TDX quote"), "{e}");

    // Wrong collateral.
    let e = check(
        "tdx + sgx collateral",
        &tdx(),
        &|v| v.collateral = collateral("sgx_quote_collateral.json"),
        COMMON_NOW,
        Expect::Invalid,
    )
    .unwrap_err();
    assert!(e.contains("QE Identity"), "{e}");
    let e = check(
        "tdx + outdated collateral",
        &tdx(),
        &|v| v.collateral = collateral("tdx_quote_outdated_collateral.json"),
        OUTDATED_NOW,
        Expect::Invalid,
    )
    .unwrap_err();
    assert!(e.to_lowercase().contains("fmspc"), "{e}");
}

#[test]
fn time_window() {
    for (name, now, needle) in [
        (
            "python example time",
            1_750_320_802,
            "issue date is in the future",
        ),
        (
            "one second early",
            1_750_329_146,
            "issue date is in the future",
        ),
        ("one second late", TDX_NOW + 1, "Crl"),
    ] {
        let e = check(name, &tdx(), &none, now, Expect::Invalid).unwrap_err();
        assert!(e.contains(needle), "{name}: {e}");
    }
    check(
        "wall clock",
        &tdx(),
        &none,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        Expect::Invalid,
    )
    .unwrap_err();
}

fn set_collateral_str(key: &'static str, f: fn(&str) -> String) -> impl Fn(&mut Vector) {
    move |v| {
        let s = v.collateral[key].as_str().unwrap().to_string();
        v.collateral[key] = json!(f(&s));
    }
}

fn flip_hex_char(s: &str) -> String {
    let mut c: Vec<char> = s.chars().collect();
    c[10] = if c[10] == '0' { '1' } else { '0' };
    c.into_iter().collect()
}

#[test]
fn tampering_fails() {
    let v = tdx();
    // Offsets in a v4 TDX quote: header 0..48, TD report 48..632, signature data length at
    // 632, ECDSA signature 636..700, attestation key 700..764, then the QE report.
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Box<dyn Fn(&mut Vector)>, Expect)> = vec![
        (
            "quote header qe_svn",
            Box::new(|v: &mut Vector| v.quote[8] ^= 1),
            Expect::Invalid,
        ),
        (
            "quote body byte 148 (mr_seam)",
            Box::new(|v: &mut Vector| v.quote[148] ^= 1),
            Expect::Invalid,
        ),
        (
            "quote body td_attributes debug",
            Box::new(|v: &mut Vector| v.quote[48 + 120] ^= 1),
            Expect::Invalid,
        ),
        (
            "quote body mr_td",
            Box::new(|v: &mut Vector| v.quote[48 + 136 + 5] ^= 0x80),
            Expect::Invalid,
        ),
        (
            "quote body report_data",
            Box::new(|v: &mut Vector| v.quote[48 + 520] ^= 1),
            Expect::Invalid,
        ),
        (
            "quote signature r",
            Box::new(|v: &mut Vector| v.quote[640] ^= 1),
            Expect::Invalid,
        ),
        (
            "quote signature s",
            Box::new(|v: &mut Vector| v.quote[690] ^= 1),
            Expect::Invalid,
        ),
        (
            "attestation key",
            Box::new(|v: &mut Vector| v.quote[720] ^= 1),
            Expect::Invalid,
        ),
        (
            "QE report",
            Box::new(|v: &mut Vector| v.quote[800] ^= 1),
            Expect::Invalid,
        ),
        (
            "truncated quote",
            Box::new(|v: &mut Vector| v.quote.truncate(600)),
            Expect::Malformed,
        ),
        (
            "tcb_info text",
            Box::new(set_collateral_str("tcb_info", |s| {
                s.replacen("UpToDate", "OutOfDate", 1)
            })),
            Expect::Invalid,
        ),
        (
            "tcb_info_signature",
            Box::new(set_collateral_str("tcb_info_signature", flip_hex_char)),
            Expect::Invalid,
        ),
        (
            "qe_identity text",
            Box::new(set_collateral_str("qe_identity", |s| {
                s.replacen("\"isvsvn\":", "\"isvsvn\": ", 1)
            })),
            Expect::Invalid,
        ),
        (
            "qe_identity_signature",
            Box::new(set_collateral_str("qe_identity_signature", flip_hex_char)),
            Expect::Invalid,
        ),
        (
            "root_ca_crl",
            Box::new(set_collateral_str("root_ca_crl", |s| {
                let n = s.len();
                let mut c: Vec<char> = s.chars().collect();
                c[n - 10] = if c[n - 10] == '0' { '1' } else { '0' };
                c.into_iter().collect()
            })),
            Expect::Invalid,
        ),
        (
            "pck_crl",
            Box::new(set_collateral_str("pck_crl", |s| {
                let n = s.len();
                let mut c: Vec<char> = s.chars().collect();
                c[n - 10] = if c[n - 10] == '0' { '1' } else { '0' };
                c.into_iter().collect()
            })),
            Expect::Invalid,
        ),
        (
            "tcb_info_issuer_chain",
            Box::new(set_collateral_str("tcb_info_issuer_chain", |s| {
                // Replace one base64 character inside the first certificate's signature area.
                let end = s.find("-----END CERTIFICATE-----").unwrap();
                let mut c: Vec<char> = s.chars().collect();
                let i = end - 20;
                c[i] = if c[i] == 'A' { 'B' } else { 'A' };
                c.into_iter().collect()
            })),
            Expect::Invalid,
        ),
        (
            "collateral not an object",
            Box::new(|v: &mut Vector| v.collateral = json!("x")),
            Expect::Malformed,
        ),
    ];
    for (name, mutate, expect) in &cases {
        let _ = check(name, &v, mutate.as_ref(), TDX_NOW, *expect);
    }
}

#[test]
fn collateral_dir() {
    let dir = tempfile::tempdir().unwrap();
    // No collateral anywhere.
    let v = tdx();
    let rd = own_report_data(&v);
    let ev = evidence_json(&v.quote, None);
    let e = TdxVerifier::new()
        .verify(&ev, &rd, at(TDX_NOW))
        .unwrap_err();
    assert!(matches!(e, Error::Malformed { .. }), "{e}");
    // A directory with all three collateral files: the matching one is found.
    for f in [
        "tdx_quote_collateral.json",
        "sgx_quote_collateral.json",
        "tdx_quote_outdated_collateral.json",
    ] {
        std::fs::write(dir.path().join(f), read(f)).unwrap();
    }
    std::fs::write(dir.path().join("junk.json"), b"{}").unwrap();
    let c = TdxVerifier::new()
        .with_collateral_dir(dir.path())
        .verify(&ev, &rd, at(TDX_NOW))
        .unwrap();
    assert_eq!(c.details["tcb_status"], "UpToDate");
    // Collateral in the evidence takes precedence over the directory.
    let ev = evidence_json(&v.quote, Some(collateral("sgx_quote_collateral.json")));
    assert!(TdxVerifier::new()
        .with_collateral_dir(dir.path())
        .verify(&ev, &rd, at(TDX_NOW))
        .is_err());
}

#[test]
fn evidence_shape_is_strict() {
    let v = tdx();
    let rd = own_report_data(&v);
    let mut ev = evidence_json(&v.quote, Some(v.collateral.clone()));
    ev["extra"] = json!(1);
    for bad in [ev, json!({}), json!({"quote": "***"}), json!([1])] {
        let e = TdxVerifier::new()
            .verify(&bad, &rd, at(TDX_NOW))
            .unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e}");
    }
}

#[test]
fn embedded_root_is_intels() {
    use sha2::Digest;
    assert_eq!(
        hex::encode(sha2::Sha256::digest(INTEL_SGX_ROOT_CA_DER)),
        "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    );
}

#[test]
fn attester_without_configfs_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let e = TdxAttester::with_configfs(dir.path().join("nope"))
        .evidence(&[0u8; 64])
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable(TeeKind::Tdx, _)), "{e}");
    assert!(e.to_string().contains("configfs-tsm"), "{e}");
}

/// The shape Confidential Containers' attester sends (`{"cc_eventlog", "quote"}`, collateral
/// from the verifier's directory) verifies the real quote; a tampered quote in that shape fails.
#[test]
fn coco_evidence_shape_verifies() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tdx_quote_collateral.json"),
        read("tdx_quote_collateral.json"),
    )
    .unwrap();
    let v = tdx();
    let rd = own_report_data(&v);
    let verifier = TdxVerifier::new().with_collateral_dir(dir.path());
    for eventlog in [json!(null), json!(b64.encode(b"an event log"))] {
        let ev = json!({"cc_eventlog": eventlog, "quote": b64.encode(&v.quote)});
        let c = verifier.verify(&ev, &rd, at(TDX_NOW)).unwrap();
        assert_eq!(c.details["tcb_status"], "UpToDate");
    }
    let mut q = v.quote.clone();
    let n = q.len();
    q[n / 2] ^= 1;
    let ev = json!({"cc_eventlog": null, "quote": b64.encode(&q)});
    assert!(verifier.verify(&ev, &rd, at(TDX_NOW)).is_err());
}
