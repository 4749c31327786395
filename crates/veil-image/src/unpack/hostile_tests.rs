//! Hostile layers: parents replaced by symlinks before deferred metadata is
//! applied, deep nesting, oversized extension headers, and bytes meant for a
//! terminal in error messages.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use tar::{Builder, EntryType, GnuExtSparseHeader, Header};

use super::tests::{header, require_root, tar_of, Sandbox, E};
use super::*;

/// Mode, owner and modification time of `p`.
fn stat(p: &Path) -> (u32, u32, u32, i64) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid(), m.mtime())
}

#[test]
fn directory_metadata_never_reaches_through_a_replaced_parent() {
    // x/, x/tmp/ and x/acpi/ with other owners and modes, then x becomes a
    // symlink to a directory outside the root (the real attack used / and
    // /proc): the outside directories must keep their owner, mode and time.
    require_root("directory_metadata_never_reaches_through_a_replaced_parent");
    let outside = tempfile::tempdir().unwrap();
    for d in ["tmp", "acpi"] {
        fs::create_dir(outside.path().join(d)).unwrap();
        fs::set_permissions(outside.path().join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let before = [
        stat(&outside.path().join("tmp")),
        stat(&outside.path().join("acpi")),
    ];
    let sb = Sandbox::new();
    let outer_parent = sb.outer.path().parent().unwrap();
    assert_eq!(outside.path().parent().unwrap(), outer_parent);
    // Absolute (clamped at resolution, but followed by a late path) and
    // relative (from root/x up to the outside directory).
    let relative = format!(
        "../../{}",
        outside.path().file_name().unwrap().to_str().unwrap()
    );
    for target in [outside.path().to_str().unwrap(), relative.as_str()] {
        let layer = [
            E::DirOwned("x", 0o755, 0),
            E::DirOwned("x/tmp", 0o700, 4242),
            E::DirOwned("x/acpi", 0o750, 4343),
            E::Sym("x", target),
        ];
        let opts = UnpackOptions {
            preserve_owner: true,
            ..UnpackOptions::default()
        };
        sb.unpack_with(&layer, &opts).unwrap();
        let after = [
            stat(&outside.path().join("tmp")),
            stat(&outside.path().join("acpi")),
        ];
        assert_eq!(
            after, before,
            "outside directories changed through {target}"
        );
        assert!(fs::symlink_metadata(sb.root().join("x"))
            .unwrap()
            .file_type()
            .is_symlink());
        sb.assert_contained();
    }
}

#[test]
fn the_last_directory_entry_wins_and_sets_the_time() {
    let sb = Sandbox::new();
    sb.unpack(&[
        E::DirMode("d", 0o700),
        E::File("d/f", b"x"),
        E::DirMode("d", 0o750),
        E::DirMode("d/sub", 0o711),
        E::File("d/sub/g", b"y"),
    ])
    .unwrap();
    let (mode, _, _, mtime) = stat(&sb.root().join("d"));
    assert_eq!(mode, 0o750);
    // Applied after the directory's contents were written.
    assert_eq!(mtime, 1_700_000_000);
    assert_eq!(stat(&sb.root().join("d/sub")).0, 0o711);
    assert_eq!(stat(&sb.root().join("d/sub")).3, 1_700_000_000);
    assert_eq!(sb.read("d/sub/g"), b"y");
}

/// `depth` nested directories `a/a/…`, one entry each, in depth-first order.
fn nested(depth: usize) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    let mut path = String::new();
    for _ in 0..depth {
        path.push_str("a/");
        let mut h = header(EntryType::Directory, 0o700, 0);
        b.append_data(&mut h, &path, io::empty()).unwrap();
    }
    let mut h = header(EntryType::Regular, 0o644, 4);
    b.append_data(&mut h, format!("{path}f"), &b"deep"[..])
        .unwrap();
    b.into_inner().unwrap()
}

#[test]
fn nesting_to_the_depth_limit_unpacks() {
    let sb = Sandbox::new();
    let tar = nested(MAX_PATH_DEPTH - 1);
    let stats = unpack_layer(
        &tar[..],
        Compression::None,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap();
    assert_eq!(stats.entries, MAX_PATH_DEPTH as u64);
    let deepest = "a/".repeat(MAX_PATH_DEPTH - 1);
    assert_eq!(sb.read(&format!("{deepest}f")), b"deep");
    assert_eq!(stat(&sb.root().join(&deepest)).0, 0o700);
    assert_eq!(stat(&sb.root().join("a")).0, 0o700);
    sb.assert_contained();
}

#[test]
fn deep_nesting_is_refused() {
    // 2,000 levels (88 KB gzipped) took minutes before; refused at the limit now.
    let sb = Sandbox::new();
    let tar = nested(2000);
    let e = unpack_layer(
        &tar[..],
        Compression::None,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    match &e {
        Error::PathTooLong { what, limit, .. } => {
            assert_eq!(*limit, MAX_PATH_DEPTH as u64);
            assert!(what.contains("number of path components"), "{e}");
        }
        other => panic!("not PathTooLong: {other}"),
    }
    assert!(e.to_string().len() < 600, "the path is shortened: {e}");
    sb.assert_contained();
}

#[test]
fn symlinks_cannot_deepen_a_path_past_the_limit() {
    let sb = Sandbox::new();
    let deep_target = "a/".repeat(200);
    let below = format!("s/{}f", "b/".repeat(100));
    let e = sb
        .unpack(&[E::Sym("s", &deep_target), E::File(&below, b"x")])
        .unwrap_err();
    assert!(
        matches!(&e, Error::PathTooLong { what, .. } if what.contains("after following symbolic links")),
        "{e}"
    );
    // A symlink whose target walks back and forth is bounded too.
    let sb = Sandbox::new();
    let zigzag = "d/../".repeat(MAX_RESOLVE_STEPS / 2 + 1);
    let e = sb
        .unpack(&[E::Dir("d"), E::Sym("w", &zigzag), E::File("w/f", b"x")])
        .unwrap_err();
    assert!(
        matches!(&e, Error::PathTooLong { what, .. } if what.contains("walked")),
        "{e}"
    );
    sb.assert_contained();
}

#[test]
fn over_long_components_are_refused() {
    let sb = Sandbox::new();
    let name = "n".repeat(MAX_NAME_BYTES + 1);
    let e = sb.unpack(&[E::File(&name, b"x")]).unwrap_err();
    assert!(matches!(e, Error::PathTooLong { .. }), "{e}");
    sb.unpack(&[E::File(&"n".repeat(MAX_NAME_BYTES), b"x")])
        .unwrap();
}

/// A reader that fails the test's unpack if anything reads from it: what
/// follows a refused header must never be read.
struct Untouchable;

impl Read for Untouchable {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::other(
            "read past a header that should have been refused",
        ))
    }
}

/// A header block of `kind` claiming `size` bytes.
fn claim(kind: EntryType, size: u64, gnu: bool) -> Vec<u8> {
    let mut h = if gnu {
        Header::new_gnu()
    } else {
        Header::new_ustar()
    };
    h.set_path("././@LongLink").unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h.as_bytes().to_vec()
}

#[test]
fn huge_extension_headers_are_refused_before_they_are_read() {
    for (kind, gnu, name) in [
        (EntryType::XHeader, false, "PAX extended"),
        (EntryType::XHeader, true, "PAX extended"),
        (EntryType::GNULongName, true, "GNU long name"),
        (EntryType::GNULongLink, true, "GNU long link name"),
        (EntryType::XGlobalHeader, false, "PAX global extended"),
    ] {
        let sb = Sandbox::new();
        let head = claim(kind, 1 << 30, gnu);
        let layer = io::Read::chain(&head[..], Untouchable);
        let e = unpack_layer(
            layer,
            Compression::None,
            &sb.root(),
            &UnpackOptions::default(),
        )
        .unwrap_err();
        match e {
            Error::ExtensionHeaderTooLarge { kind, size, limit } => {
                assert_eq!(
                    (kind, size, limit),
                    (name, 1 << 30, MAX_EXTENSION_HEADER_BYTES)
                );
            }
            other => panic!("{name}: not ExtensionHeaderTooLarge: {other}"),
        }
        // The same inside gzip: the guard sits after decompression.
        let mut gz = super::tests::gzip(&head);
        gz.extend(super::tests::gzip(&vec![0u8; 64 * 1024]));
        let e = unpack_layer(
            &gz[..],
            Compression::Gzip,
            &sb.root(),
            &UnpackOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::ExtensionHeaderTooLarge { .. }), "{e}");
    }
}

#[test]
fn extension_headers_are_bounded_per_entry_in_total() {
    // A PAX header of more than half the bound is fine alone; with a GNU
    // long name of as much before it, the entry's headers are too large.
    let half = MAX_EXTENSION_HEADER_BYTES / 2 + 1;
    let long = "l".repeat(usize::try_from(half).unwrap());
    let mut one = Vec::new();
    {
        let mut b = Builder::new(&mut one);
        b.append_pax_extensions([("comment", long.as_bytes())])
            .unwrap();
        let mut h = header(EntryType::Regular, 0o644, 2);
        b.append_data(&mut h, "ok", &b"ok"[..]).unwrap();
        b.finish().unwrap();
    }
    let sb = Sandbox::new();
    unpack_layer(
        &one[..],
        Compression::None,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap();
    assert_eq!(sb.read("ok"), b"ok");

    let mut two = claim(EntryType::GNULongName, half, true);
    two.extend(vec![
        b'n';
        usize::try_from(half.next_multiple_of(512)).unwrap()
    ]);
    two.extend(claim(EntryType::XHeader, half, false));
    let e = unpack_layer(
        io::Read::chain(&two[..], Untouchable),
        Compression::None,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::ExtensionHeaderTooLarge { size, .. } if size == 2 * half),
        "{e}"
    );
}

#[test]
fn pax_paths_sizes_and_sparse_files_are_followed() {
    // The guard learns each entry's length from the parser: a PAX size
    // record (overriding the header's) and a GNU sparse file's extension
    // blocks must not throw it off the next header.
    let mut tar = Vec::new();
    {
        let mut b = Builder::new(&mut tar);
        b.append_pax_extensions([("path", &b"pax/named"[..]), ("size", b"5")])
            .unwrap();
        let mut h = header(EntryType::Regular, 0o644, 0);
        h.set_path("short").unwrap();
        h.set_cksum();
        b.append(&h, &b"hello"[..]).unwrap();
        let mut h = header(EntryType::Regular, 0o644, 5);
        b.append_data(&mut h, "after-pax", &b"again"[..]).unwrap();
        b.finish().unwrap();
    }
    // Drop the end-of-archive blocks: more entries follow.
    tar.truncate(tar.len() - 1024);
    // Sparse: 512 bytes at 0 in the header, 512 at 4096 in an extension
    // block; 1024 bytes in the archive, 4608 expanded.
    let mut h = header(EntryType::GNUSparse, 0o644, 1024);
    h.set_path("sparse").unwrap();
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset(0);
        gnu.sparse[0].set_length(512);
        gnu.set_real_size(4608);
        gnu.set_is_extended(true);
    }
    h.set_cksum();
    let mut ext = GnuExtSparseHeader::new();
    ext.sparse[0].set_offset(4096);
    ext.sparse[0].set_length(512);
    tar.extend(h.as_bytes());
    tar.extend(ext.as_bytes());
    tar.extend([b'a'; 512]);
    tar.extend([b'b'; 512]);
    let mut after = Vec::new();
    {
        let mut b = Builder::new(&mut after);
        let mut h = header(EntryType::Regular, 0o644, 4);
        b.append_data(&mut h, "after-sparse", &b"last"[..]).unwrap();
        b.finish().unwrap();
    }
    tar.extend(after);

    let sb = Sandbox::new();
    let stats = unpack_layer(
        &tar[..],
        Compression::None,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap();
    assert_eq!(stats.entries, 4);
    assert_eq!(sb.read("pax/named"), b"hello");
    assert!(!sb.exists("short"));
    assert_eq!(sb.read("after-pax"), b"again");
    let sparse = sb.read("sparse");
    assert_eq!(sparse.len(), 4608);
    assert!(sparse[..512].iter().all(|&b| b == b'a'));
    assert!(sparse[512..4096].iter().all(|&b| b == 0));
    assert!(sparse[4096..].iter().all(|&b| b == b'b'));
    assert_eq!(sb.read("after-sparse"), b"last");
}

/// Every message in `e`'s source chain: printable, and not too long.
fn assert_printable(e: &Error) {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        assert!(
            !msg.chars().any(char::is_control),
            "unescaped bytes in {msg:?}"
        );
        assert!(
            msg.len() < 1500,
            "message not shortened: {} bytes",
            msg.len()
        );
        cur = err.source();
    }
}

/// A single header of `kind` named `name` with one raw field overwritten.
fn raw_header(name: &[u8], field: fn(&mut tar::OldHeader) -> &mut [u8], value: &[u8]) -> Vec<u8> {
    let mut h = header(EntryType::Regular, 0o644, 0);
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    let f = field(h.as_old_mut());
    f.fill(0);
    f[..value.len()].copy_from_slice(value);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend([0u8; 1024]);
    tar
}

#[test]
fn image_bytes_in_errors_are_escaped() {
    let name: &[u8] = b"evil\x1b]0;owned\x07\xff";
    // A malformed mode field: the unpacker's own message.
    let tar = raw_header(name, |h| &mut h.mode[..], b"\x1b[2J\n\xfe");
    let sb = Sandbox::new();
    let e = unpack_layer(
        &tar[..],
        Compression::None,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidEntry { .. }), "{e}");
    assert_printable(&e);
    let msg = e.to_string();
    assert!(msg.contains(r#""evil\u{1b}]0;owned\u{7}\xff""#), "{msg}");
    assert!(msg.contains(r#"mode field "\u{1b}[2J\n\xfe"#), "{msg}");

    // A malformed size field: the tar parser's message, which quotes the
    // field and the name.
    let tar = raw_header(name, |h| &mut h.size[..], b"\x1b[2J\x1b[31m\xfe");
    let e = unpack_layer(
        &tar[..],
        Compression::None,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::CorruptLayer { .. }), "{e}");
    assert_printable(&e);
    assert!(e.to_string().contains(r"\u{1b}[2J"), "{e}");

    // A long hostile name through a GNU long name header.
    let mut long = b"\x1b[2J/../".to_vec();
    long.extend(vec![b'a'; 10_000]);
    let mut tar = claim(EntryType::GNULongName, long.len() as u64, true);
    tar.extend(&long);
    tar.resize(tar.len().next_multiple_of(512), 0);
    tar.extend(tar_of(&[E::File("placeholder", b"x")]));
    let e = unpack_layer(
        &tar[..],
        Compression::None,
        &sb.root(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::PathEscape { .. }), "{e}");
    assert_printable(&e);
    assert!(e.to_string().contains("(10008 bytes in all)"), "{e}");
    sb.assert_contained();
}

#[test]
fn one_directory_at_a_time_without_openat2() {
    // Kernels before 5.6 have no openat2: resolution then opens each
    // component in turn, with the same result.
    let layer = tar_of(&[
        E::Dir("usr/lib"),
        E::Sym("lib", "/usr/lib"),
        E::File("lib/a/b/c/x", b"x"),
        E::File("usr/lib/a/b/d/y", b"y"),
        E::File("lib/a/b/c/z", b"z"),
        E::DirMode("usr/lib/a", 0o750),
        E::Sym("up", "usr/../usr/lib/a/../a/b"),
        E::File("up/w", b"w"),
        E::File("usr/lib/a/b/.wh.d", b""),
    ]);
    for openat2 in [true, false] {
        let sb = Sandbox::new();
        let (root, opts) = (sb.root(), UnpackOptions::default());
        let mut st = entry::Unpacker::new(&root, &opts).unwrap();
        st.openat2 = openat2;
        apply(&mut &layer[..], st).unwrap();
        assert_eq!(sb.read("usr/lib/a/b/c/x"), b"x", "openat2: {openat2}");
        assert_eq!(sb.read("usr/lib/a/b/c/z"), b"z");
        assert_eq!(sb.read("usr/lib/a/b/w"), b"w");
        assert_eq!(
            sb.read("usr/lib/a/b/d/y"),
            b"y",
            "same-layer files are kept"
        );
        assert_eq!(stat(&sb.root().join("usr/lib/a")).0, 0o750);
        sb.assert_contained();
    }
}

#[test]
fn stale_bookkeeping_cannot_lead_outside_the_root() {
    // Containment does not rest on what the unpacker remembers: swap a
    // directory it has opened for a symlink to the outside behind its back.
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(outside.path().join("c/d")).unwrap();
    fs::set_permissions(outside.path().join("c"), fs::Permissions::from_mode(0o755)).unwrap();
    for openat2 in [true, false] {
        let sb = Sandbox::new();
        let (root, opts) = (sb.root(), UnpackOptions::default());
        let mut st = entry::Unpacker::new(&root, &opts).unwrap();
        st.openat2 = openat2;
        let first = tar_of(&[E::DirMode("a/b/c", 0o700), E::File("a/b/c/f1", b"1")]);
        let mut archive = tar::Archive::new(&first[..]);
        for e in archive.entries().unwrap() {
            st.apply_entry(&mut e.unwrap()).unwrap();
        }
        fs::rename(sb.root().join("a/b"), sb.root().join("a/moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), sb.root().join("a/b")).unwrap();
        let second = tar_of(&[E::File("a/b/c/d/f2", b"2")]);
        let mut archive = tar::Archive::new(&second[..]);
        for e in archive.entries().unwrap() {
            st.apply_entry(&mut e.unwrap()).unwrap();
        }
        st.finish().unwrap();
        assert!(
            !outside.path().join("c/d/f2").exists(),
            "openat2: {openat2}"
        );
        assert_eq!(stat(&outside.path().join("c")).0, 0o755);
        // The symlink was resolved inside the root instead.
        let inside = sb
            .root()
            .join(outside.path().strip_prefix("/").unwrap())
            .join("c/d/f2");
        assert_eq!(fs::read(inside).unwrap(), b"2");
        sb.assert_contained();
    }
}
