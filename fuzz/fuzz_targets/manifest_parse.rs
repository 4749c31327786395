//! Manifests, indexes and image configs come from registries and through the node: untrusted.
//! Parsing must never panic, whatever the bytes and the claimed content type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_image::manifest;

fuzz_target!(|data: &[u8]| {
    for ct in [None, Some(manifest::OCI_MANIFEST), Some(manifest::OCI_INDEX), Some("application/json")] {
        if let Ok(manifest::Manifest::Index(entries)) = manifest::parse_manifest(data, ct) {
            let _ = manifest::select_platform(&entries, "linux", "amd64");
        }
    }
    if let Ok(cfg) = manifest::parse_config(data) {
        let _ = cfg.argv();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<veil_image::Reference>();
        let _ = s.parse::<veil_image::Digest>();
        let _ = manifest::layer_compression(s);
    }
});
