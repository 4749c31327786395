//! Fuzz the key broker's request parsing: every parser must return a value or a 400-class
//! error for any input, never panic. `cargo fuzz run kbs_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_kbs::parse;

fuzz_target!(|data: &[u8]| {
    for r in [
        parse::parse_request(data).map(|_| ()),
        parse::parse_attestation(data).map(|_| ()),
        parse::parse_reference_values("measurement", data).map(|_| ()),
        parse::parse_reference_values("image", data).map(|_| ()),
        parse::parse_assignment(data).map(|_| ()),
    ] {
        if let Err(e) = r {
            assert_eq!(e.status, 400, "{e}");
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Err(e) = parse::parse_resource_path(s) {
            assert_eq!(e.status, 400);
        }
        let _ = parse::session_cookie(s);
        // Init-data documents and additional evidence come from the (untrusted) sandbox side.
        if let Err(e) = parse::parse_init_data(s) {
            assert_eq!(e.status, 400, "{e}");
        }
        if let Err(e) = parse::parse_additional_evidence(s) {
            assert_eq!(e.status, 400, "{e}");
        }
        let _ = parse::check_version(s);
    }
    // A released-resource JWE from a hostile broker must not panic the client either.
    let key = veil_kbs::TeeKeyPair::generate();
    let _ = key.decrypt(data);
});
