//! Layer tarballs are attacker-controlled. Unpacking arbitrary bytes must never panic and never
//! write outside the root: the fuzzer unpacks into a directory inside a sentinel directory and
//! checks that nothing appeared next to the root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_image::manifest::Compression;
use veil_image::unpack::{unpack_layer, UnpackOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(outer) = tempfile::tempdir() else { return };
    let root = outer.path().join("root");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    let opts = UnpackOptions {
        max_bytes: 1 << 20,
        max_entries: 1000,
        preserve_owner: false,
    };
    let compression = match data.first() {
        Some(b) if b % 3 == 1 => Compression::Gzip,
        Some(b) if b % 3 == 2 => Compression::Zstd,
        _ => Compression::None,
    };
    let _ = unpack_layer(data.get(1..).unwrap_or_default(), compression, &root, &opts);
    let siblings: Vec<_> = std::fs::read_dir(outer.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(siblings, vec![std::ffi::OsString::from("root")], "unpack wrote outside its root");
});
