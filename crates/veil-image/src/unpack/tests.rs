//! Unpacker tests: layers built in memory, unpacked into a root inside a
//! temp dir that also holds a sentinel, to notice writes outside the root.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::{Builder, EntryType, Header};

use super::*;
use crate::digest::VerifyingReader;
use crate::Digest;

/// One entry of an in-memory test layer.
pub(super) enum E<'a> {
    File(&'a str, &'a [u8]),
    FileMode(&'a str, &'a [u8], u32),
    Dir(&'a str),
    DirMode(&'a str, u32),
    /// Directory with a mode and an owner (uid; gid = uid + 100).
    DirOwned(&'a str, u32, u64),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    /// Regular file with hostile raw name bytes (bypasses tar's checks).
    RawFile(&'a [u8], &'a [u8]),
    /// Hard link with hostile raw link-name bytes.
    RawHard(&'a str, &'a [u8]),
    Special(&'a str, EntryType),
}

pub(super) fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

pub(super) fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    for e in entries {
        match *e {
            E::File(p, d) => {
                let mut h = header(EntryType::Regular, 0o644, d.len() as u64);
                b.append_data(&mut h, p, d).unwrap();
            }
            E::FileMode(p, d, m) => {
                let mut h = header(EntryType::Regular, m, d.len() as u64);
                b.append_data(&mut h, p, d).unwrap();
            }
            E::Dir(p) => {
                let mut h = header(EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, p, io::empty()).unwrap();
            }
            E::DirMode(p, m) => {
                let mut h = header(EntryType::Directory, m, 0);
                b.append_data(&mut h, p, io::empty()).unwrap();
            }
            E::DirOwned(p, m, uid) => {
                let mut h = header(EntryType::Directory, m, 0);
                h.set_uid(uid);
                h.set_gid(uid + 100);
                b.append_data(&mut h, p, io::empty()).unwrap();
            }
            E::Sym(p, t) => {
                let mut h = header(EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Hard(p, t) => {
                let mut h = header(EntryType::Link, 0o644, 0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::RawFile(name, d) => {
                let mut h = header(EntryType::Regular, 0o644, d.len() as u64);
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                b.append(&h, d).unwrap();
            }
            E::RawHard(p, target) => {
                let mut h = header(EntryType::Link, 0o644, 0);
                h.set_path(p).unwrap();
                h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
                h.set_cksum();
                b.append(&h, io::empty()).unwrap();
            }
            E::Special(p, kind) => {
                let mut h = header(kind, 0o644, 0);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                b.append_data(&mut h, p, io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub(super) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd_of(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

/// A temp dir holding `root/` plus a sentinel sibling, to detect escapes.
pub(super) struct Sandbox {
    pub(super) outer: tempfile::TempDir,
}

impl Sandbox {
    pub(super) fn new() -> Self {
        let outer = tempfile::tempdir().unwrap();
        fs::create_dir(outer.path().join("root")).unwrap();
        fs::write(outer.path().join("sentinel"), b"untouched").unwrap();
        Sandbox { outer }
    }
    pub(super) fn root(&self) -> PathBuf {
        self.outer.path().join("root")
    }
    pub(super) fn unpack(&self, entries: &[E]) -> Result<UnpackStats, Error> {
        self.unpack_with(entries, &UnpackOptions::default())
    }
    pub(super) fn unpack_with(
        &self,
        entries: &[E],
        opts: &UnpackOptions,
    ) -> Result<UnpackStats, Error> {
        unpack_layer(&tar_of(entries)[..], Compression::None, &self.root(), opts)
    }
    /// Nothing outside root changed.
    pub(super) fn assert_contained(&self) {
        let mut names: Vec<_> = fs::read_dir(self.outer.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["root", "sentinel"]);
        assert_eq!(
            fs::read(self.outer.path().join("sentinel")).unwrap(),
            b"untouched"
        );
    }
    pub(super) fn read(&self, rel: &str) -> Vec<u8> {
        fs::read(self.root().join(rel)).unwrap()
    }
    pub(super) fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.root().join(rel)).is_ok()
    }
}

fn basic_layer() -> Vec<u8> {
    tar_of(&[
        E::Dir("./"),
        E::Dir("./bin"),
        E::FileMode("./bin/app", b"#!/bin/sh\necho hi\n", 0o755),
        E::File("etc/conf", b"k=v"),
        E::Sym("bin/sh", "/bin/busybox"),
        E::Hard("etc/conf2", "etc/conf"),
        E::DirMode("ro", 0o555),
        E::File("ro/inside", b"x"),
    ])
}

fn check_basic(sb: &Sandbox, stats: &UnpackStats) {
    assert_eq!(stats.entries, 8);
    assert_eq!(stats.bytes, 18 + 3 + 1);
    assert_eq!(sb.read("bin/app"), b"#!/bin/sh\necho hi\n");
    let m = fs::metadata(sb.root().join("bin/app")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o755);
    assert_eq!(m.mtime(), 1_700_000_000);
    assert_eq!(
        fs::read_link(sb.root().join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    let a = fs::metadata(sb.root().join("etc/conf")).unwrap();
    let b = fs::metadata(sb.root().join("etc/conf2")).unwrap();
    assert_eq!(a.ino(), b.ino());
    let ro = fs::metadata(sb.root().join("ro")).unwrap();
    assert_eq!(ro.mode() & 0o7777, 0o555);
    assert_eq!(sb.read("ro/inside"), b"x");
    // Make it writable again so the temp dir can be cleaned up.
    fs::set_permissions(sb.root().join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    sb.assert_contained();
}

#[test]
fn plain_gzip_zstd() {
    let tar = basic_layer();
    for (compression, blob) in [
        (Compression::None, tar.clone()),
        (Compression::Gzip, gzip(&tar)),
        (Compression::Zstd, zstd_of(&tar)),
    ] {
        let sb = Sandbox::new();
        let stats = unpack_layer(
            &blob[..],
            compression,
            &sb.root(),
            &UnpackOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{compression:?}: {e}"));
        check_basic(&sb, &stats);
    }
}

#[test]
fn multi_member_gzip() {
    let tar = basic_layer();
    let (a, b) = tar.split_at(700);
    let mut blob = gzip(a);
    blob.extend(gzip(b));
    let sb = Sandbox::new();
    let stats = unpack_layer(
        &blob[..],
        Compression::Gzip,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap();
    check_basic(&sb, &stats);
}

#[test]
fn whiteouts() {
    let sb = Sandbox::new();
    sb.unpack(&[
        E::File("a/b", b"1"),
        E::File("a/c", b"2"),
        E::File("d/e/f", b"3"),
        E::Sym("s", "a"),
    ])
    .unwrap();
    let stats = sb
        .unpack(&[
            E::File("a/.wh.b", b""),
            E::File(".wh.d", b""),
            E::File(".wh.s", b""),
            E::File(".wh.missing", b""),
            E::File("nodir/.wh.x", b""),
        ])
        .unwrap();
    assert_eq!(stats.whiteouts, 5);
    assert!(!sb.exists("a/b"));
    assert_eq!(sb.read("a/c"), b"2");
    assert!(!sb.exists("d"));
    assert!(!sb.exists("s"));
    assert!(sb.exists("a"), "whiteout of a symlink must not follow it");
    assert!(!sb.exists("a/.wh.b") && !sb.exists(".wh.d"));
    assert!(!sb.exists("nodir"));
    sb.assert_contained();
}

#[test]
fn opaque_directory() {
    let sb = Sandbox::new();
    sb.unpack(&[
        E::File("dir/old", b"1"),
        E::File("dir/sub/old", b"2"),
        E::File("dir/keep", b"lower"),
        E::File("other/x", b"3"),
    ])
    .unwrap();
    let stats = sb
        .unpack(&[
            E::Dir("dir"),
            E::File("dir/keep", b"upper"),
            E::File("dir/.wh..wh..opq", b""),
            E::File("dir/new", b"4"),
            E::File("dir/sub/new", b"5"),
        ])
        .unwrap();
    assert_eq!(stats.whiteouts, 1);
    assert!(!sb.exists("dir/old"));
    assert!(!sb.exists("dir/sub/old"));
    assert!(!sb.exists("dir/.wh..wh..opq"));
    assert_eq!(sb.read("dir/keep"), b"upper");
    assert_eq!(sb.read("dir/new"), b"4");
    assert_eq!(sb.read("dir/sub/new"), b"5");
    assert_eq!(sb.read("other/x"), b"3");
    sb.assert_contained();
}

#[test]
fn symlinked_parent_resolves_inside_root() {
    let sb = Sandbox::new();
    sb.unpack(&[
        E::Dir("usr/lib"),
        E::Sym("lib", "/usr/lib"),
        E::Sym("rel", "usr/./lib/"),
    ])
    .unwrap();
    sb.unpack(&[E::File("lib/x", b"x"), E::File("rel/y", b"y")])
        .unwrap();
    assert_eq!(sb.read("usr/lib/x"), b"x");
    assert_eq!(sb.read("usr/lib/y"), b"y");
    assert!(fs::symlink_metadata(sb.root().join("lib"))
        .unwrap()
        .file_type()
        .is_symlink());
    sb.assert_contained();
}

#[test]
fn symlink_escapes_are_clamped() {
    let sb = Sandbox::new();
    sb.unpack(&[
        E::Sym("evil", "/etc"),
        E::File("evil/passwd", b"pwned"),
        E::Sym("up", "../../.."),
        E::File("up/escaped", b"pwned"),
        E::Sym("deep", "a/../../../../sentinel-dir"),
        E::File("deep/f", b"pwned"),
    ])
    .unwrap();
    assert_eq!(sb.read("etc/passwd"), b"pwned");
    assert_eq!(sb.read("escaped"), b"pwned");
    assert_eq!(sb.read("sentinel-dir/f"), b"pwned");
    assert!(fs::read("/etc/passwd")
        .map(|p| p != b"pwned")
        .unwrap_or(true));
    sb.assert_contained();
}

#[test]
fn final_symlink_is_replaced_not_followed() {
    let sb = Sandbox::new();
    sb.unpack(&[E::Sym("link", "../sentinel"), E::Sym("dirlink", "../")])
        .unwrap();
    sb.unpack(&[E::File("link", b"new"), E::Dir("dirlink")])
        .unwrap();
    assert_eq!(sb.read("link"), b"new");
    assert!(fs::symlink_metadata(sb.root().join("dirlink"))
        .unwrap()
        .is_dir());
    sb.assert_contained();
}

#[test]
fn replaces_dir_with_file_and_file_with_dir() {
    let sb = Sandbox::new();
    sb.unpack(&[E::File("a/x", b"1"), E::File("b", b"2")])
        .unwrap();
    sb.unpack(&[E::File("a", b"file"), E::Dir("b"), E::File("b/y", b"3")])
        .unwrap();
    assert_eq!(sb.read("a"), b"file");
    assert_eq!(sb.read("b/y"), b"3");
    sb.assert_contained();
}

#[test]
fn hostile_paths_rejected() {
    let cases: &[(&[u8], &str)] = &[
        (b"/etc/evil", "absolute"),
        (b"../evil", ".."),
        (b"a/../../evil", ".."),
        (b"./a/../b", ".."),
        (b"..", ".."),
    ];
    for (name, why) in cases {
        let sb = Sandbox::new();
        let e = sb.unpack(&[E::RawFile(name, b"pwned")]).unwrap_err();
        assert!(matches!(e, Error::PathEscape { .. }), "{why}: {e}");
        assert!(
            e.to_string().contains(&*String::from_utf8_lossy(name)),
            "{e}"
        );
        sb.assert_contained();
    }
}

#[test]
fn hostile_hard_links_rejected() {
    // (layer, expect PathEscape?)
    let sb = Sandbox::new();
    let e = sb.unpack(&[E::RawHard("h", b"../sentinel")]).unwrap_err();
    assert!(matches!(e, Error::PathEscape { .. }), "{e}");
    let e = sb.unpack(&[E::RawHard("h", b"/etc/passwd")]).unwrap_err();
    assert!(matches!(e, Error::PathEscape { .. }), "{e}");
    // Through a symlink: resolved inside root, where the target does not exist.
    let e = sb
        .unpack(&[E::Sym("esc", "/"), E::Hard("h", "esc/etc/passwd")])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidEntry { .. }), "{e}");
    let e = sb
        .unpack(&[E::Sym("up", "../.."), E::Hard("h", "up/sentinel")])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidEntry { .. }), "{e}");
    // To a directory.
    let e = sb.unpack(&[E::Dir("d"), E::Hard("h", "d")]).unwrap_err();
    assert!(matches!(e, Error::InvalidEntry { .. }), "{e}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    // To a symlink (would otherwise link the symlink's target).
    let e = sb
        .unpack(&[E::Sym("s", "/etc/passwd"), E::Hard("h", "s")])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidEntry { .. }), "{e}");
    // Missing target.
    let e = sb.unpack(&[E::Hard("h", "nope")]).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!sb.exists("h"));
    sb.assert_contained();
}

#[test]
fn devices_and_fifos_skipped() {
    let sb = Sandbox::new();
    let stats = sb
        .unpack(&[
            E::Special("dev/null", EntryType::Char),
            E::Special("dev/sda", EntryType::Block),
            E::Special("fifo", EntryType::Fifo),
            E::File("ok", b"ok"),
        ])
        .unwrap();
    assert_eq!(stats.skipped_devices, 3);
    assert_eq!(stats.entries, 4);
    assert!(!sb.exists("dev/null") && !sb.exists("dev/sda") && !sb.exists("fifo"));
    assert_eq!(sb.read("ok"), b"ok");
}

#[test]
fn long_names() {
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(150));
    let sb = Sandbox::new();
    sb.unpack(&[E::File(&long, b"long"), E::Sym("l", &"t".repeat(200))])
        .unwrap();
    assert_eq!(sb.read(&long), b"long");
    assert_eq!(
        fs::read_link(sb.root().join("l")).unwrap(),
        Path::new(&"t".repeat(200))
    );
}

#[test]
fn symlink_loops_and_file_parents() {
    let sb = Sandbox::new();
    let e = sb
        .unpack(&[E::Sym("a", "b"), E::Sym("b", "a"), E::File("a/x", b"")])
        .unwrap_err();
    assert!(matches!(e, Error::PathEscape { .. }), "{e}");
    assert!(e.to_string().contains("symbolic links"), "{e}");
    let e = sb
        .unpack(&[E::File("f", b""), E::File("f/x", b"")])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidEntry { .. }), "{e}");
    sb.assert_contained();
}

#[test]
fn limits() {
    let sb = Sandbox::new();
    let opts = UnpackOptions {
        max_bytes: 10,
        ..UnpackOptions::default()
    };
    sb.unpack_with(&[E::File("a", b"12345"), E::File("b", b"12345")], &opts)
        .unwrap();
    let e = sb
        .unpack_with(&[E::File("a", b"12345"), E::File("b", b"123456")], &opts)
        .unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { limit: 10, .. }), "{e}");
    let opts = UnpackOptions {
        max_entries: 2,
        ..UnpackOptions::default()
    };
    let e = sb
        .unpack_with(&[E::Dir("a"), E::Dir("b"), E::Dir("c")], &opts)
        .unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { limit: 2, .. }), "{e}");
    assert!(e.to_string().contains("entry count"), "{e}");
}

#[test]
fn drains_to_eof_for_verification() {
    let mut tar = tar_of(&[E::File("a", b"hello")]);
    // Trailing zero padding after the end-of-archive marker.
    tar.extend(std::iter::repeat_n(0u8, 20 * 1024));
    for (compression, blob) in [
        (Compression::None, tar.clone()),
        (Compression::Gzip, gzip(&tar)),
        (Compression::Zstd, zstd_of(&tar)),
    ] {
        let sb = Sandbox::new();
        let mut r = VerifyingReader::new(&blob[..]);
        unpack_layer(&mut r, compression, &sb.root(), &UnpackOptions::default()).unwrap();
        assert_eq!(r.bytes_read(), blob.len() as u64, "{compression:?}");
        r.verify(&Digest::sha256(&blob), Some(blob.len() as u64))
            .unwrap();
        let e = r
            .verify(&Digest::sha256(b"something else"), None)
            .unwrap_err();
        assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
        assert_eq!(sb.read("a"), b"hello");
    }
}

#[test]
fn corrupt_streams_rejected() {
    let sb = Sandbox::new();
    let mut blob = gzip(&tar_of(&[E::File("a", &[7u8; 100_000])]));
    let mid = blob.len() / 2;
    blob[mid] ^= 0xff;
    blob[mid + 1] ^= 0xff;
    let e = unpack_layer(
        &blob[..],
        Compression::Gzip,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::CorruptLayer { .. } | Error::InvalidEntry { .. }),
        "{e}"
    );
    let e = unpack_layer(
        &b"not zstd at all"[..],
        Compression::Zstd,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::CorruptLayer { .. }), "{e}");
    let e = unpack_layer(
        &b"x"[..],
        Compression::None,
        &sb.root().join("missing"),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}
/// Fail (not skip) unless the tests run as root, as they do in CI and
/// under scripts/install-deps.sh: ownership is only checked there.
pub(super) fn require_root(test: &str) {
    let probe = tempfile::NamedTempFile::new().unwrap();
    let uid = fs::metadata(probe.path()).unwrap().uid();
    assert_eq!(
        uid, 0,
        "{test} needs root to check file owners (it creates files owned by other users); the \
         suite runs as root in CI: run it as root (e.g. `sudo -E cargo nextest run -p veil-image`)"
    );
}

#[test]
fn preserve_owner_when_root() {
    require_root("preserve_owner_when_root");
    let sb = Sandbox::new();
    let mut b = Builder::new(Vec::new());
    for (path, kind, uid) in [
        ("d", EntryType::Directory, 1001u64),
        ("d/f", EntryType::Regular, 1002),
    ] {
        let mut h = header(kind, 0o4755, 0);
        h.set_uid(uid);
        h.set_gid(uid + 100);
        b.append_data(&mut h, path, io::empty()).unwrap();
    }
    let mut h = header(EntryType::Symlink, 0o777, 0);
    h.set_uid(1003);
    h.set_gid(1103);
    b.append_link(&mut h, "d/l", "f").unwrap();
    let tar = b.into_inner().unwrap();
    let opts = UnpackOptions {
        preserve_owner: true,
        ..UnpackOptions::default()
    };
    unpack_layer(&tar[..], Compression::None, &sb.root(), &opts).unwrap();
    for (p, uid) in [("d", 1001), ("d/f", 1002), ("d/l", 1003)] {
        let m = fs::symlink_metadata(sb.root().join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, uid + 100), "{p}");
    }
    // Set-id bits survive the chown.
    let m = fs::metadata(sb.root().join("d/f")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4755);
}

#[test]
fn whiteout_does_not_hide_same_layer_files() {
    let sb = Sandbox::new();
    sb.unpack(&[E::File("a", b"lower"), E::File("b", b"lower")])
        .unwrap();
    sb.unpack(&[
        E::File("a", b"upper"),
        E::File(".wh.a", b""),
        E::File(".wh.b", b""),
    ])
    .unwrap();
    assert_eq!(sb.read("a"), b"upper");
    assert!(!sb.exists("b"));
}
