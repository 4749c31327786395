//! The admin API's and local store's parsers with hostile input: a deployment body (JSON,
//! then every validation rule), a token request, a `/v2/` route, and an `Authorization`
//! header. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn auth() -> &'static veil_gateway::auth::Auth {
    static AUTH: OnceLock<(tempfile::TempDir, veil_gateway::auth::Auth)> = OnceLock::new();
    &AUTH
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let a = veil_gateway::auth::Auth::open(dir.path()).expect("token store");
            a.create_token("acme").expect("token");
            (dir, a)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    // First byte picks the split between the function name / path and the body.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = (split as usize).min(rest.len());
    let (head, body) = rest.split_at(split);
    let name = String::from_utf8_lossy(head);
    veil_gateway::fuzzing::admin_body(&name, body);
    veil_gateway::fuzzing::registry_path(&String::from_utf8_lossy(data));
    veil_gateway::fuzzing::authorization(auth(), body);
});
