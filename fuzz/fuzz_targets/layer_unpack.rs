//! Layer tarballs are attacker-controlled. Unpacking arbitrary bytes must never panic and never
//! touch anything outside the root: the fuzzer unpacks into `root/` inside a temp dir that also
//! holds `outside/`, a small tree with known owners, modes and times, and checks that nothing
//! appeared next to the root and that `outside/` is unchanged.
//!
//! The first byte picks the input's form. Below 0x80 the rest is the layer itself (compression
//! chosen by the byte % 3). From 0x80 the rest is a program that builds a tar archive from
//! hostile pieces the raw form rarely reaches: directories with other owners and modes whose
//! parents are later replaced by symlinks to `outside/` (absolute or relative), hard links
//! through such symlinks, whiteouts, nesting hundreds of levels deep, GNU long-name/link and PAX
//! headers claiming huge sizes (and followed by that many bytes), PAX path and size records, and
//! raw bytes that break the framing.
#![no_main]

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use veil_image::manifest::Compression;
use veil_image::unpack::{unpack_layer, UnpackOptions};

/// Mode, owner and modification time of every path below `dir`, sorted.
fn snapshot(dir: &Path) -> Vec<(String, u32, u32, u32, i64, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                todo.push(p.clone());
            }
            let rel = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
            out.push((rel, m.mode(), m.uid(), m.gid(), m.mtime(), m.len()));
        }
    }
    out.sort();
    out
}

/// A tar archive written block by block, so that headers can lie.
struct Tar(Vec<u8>);

/// A numeric header field: octal, or GNU base-256 when it does not fit.
fn number(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    if digits < 22 && v >= 1u64 << (3 * digits) {
        field.fill(0);
        field[0] = 0x80;
        let at = field.len() - 8;
        field[at..].copy_from_slice(&v.to_be_bytes());
        return;
    }
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

impl Tar {
    /// One header block: GNU magic, `name`/`link` truncated to 100 bytes.
    fn block(&mut self, kind: u8, name: &[u8], link: &[u8], size: u64, mode: u32, uid: u32) {
        let mut h = [0u8; 512];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        number(&mut h[100..108], u64::from(mode));
        number(&mut h[108..116], u64::from(uid));
        number(&mut h[116..124], u64::from(uid));
        number(&mut h[124..136], size);
        number(&mut h[136..148], 1_700_000_000);
        h[156] = kind;
        let l = link.len().min(100);
        h[157..157 + l].copy_from_slice(&link[..l]);
        h[257..265].copy_from_slice(b"ustar  \0");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        number(&mut h[148..155], u64::from(sum));
        h[155] = b' ';
        self.0.extend_from_slice(&h);
    }

    fn data(&mut self, d: &[u8]) {
        self.0.extend_from_slice(d);
        let pad = d.len().next_multiple_of(512) - d.len();
        self.0.extend(std::iter::repeat_n(0u8, pad));
    }

    /// An entry, with GNU long name / long link members where needed.
    fn entry(&mut self, kind: u8, name: &[u8], link: &[u8], data: &[u8], mode: u32, uid: u32) {
        for (long, k) in [(name, b'L'), (link, b'K')] {
            if long.len() > 100 {
                self.block(k, b"././@LongLink", b"", long.len() as u64 + 1, 0o644, 0);
                let mut d = long.to_vec();
                d.push(0);
                self.data(&d);
            }
        }
        self.block(kind, name, link, data.len() as u64, mode, uid);
        self.data(data);
    }
}

/// One PAX record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while base + len.to_string().len() != len {
        len = base + len.to_string().len();
    }
    [len.to_string().as_bytes(), b" ", key, b"=", value, b"\n"].concat()
}

/// Make every directory under `dir` writable again, so the temp dir can be removed.
fn unlock(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o755));
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
}

/// Bytes of the program, read one at a time (zero once exhausted).
struct Program<'a>(&'a [u8]);

impl Program<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
    /// A path of 1 to 4 components from a small vocabulary, so entries collide.
    fn path(&mut self) -> Vec<u8> {
        const PARTS: [&[u8]; 12] = [
            b"x",
            b"tmp",
            b"acpi",
            b"a",
            b"b",
            b"outside",
            b"..",
            b".",
            b".wh.x",
            b".wh..wh..opq",
            b"d",
            b"",
        ];
        let n = 1 + self.byte() % 4;
        let mut p = Vec::new();
        for i in 0..n {
            if i > 0 {
                p.push(b'/');
            }
            p.extend_from_slice(PARTS[usize::from(self.byte()) % PARTS.len()]);
        }
        p
    }
}

/// A built layer: the archive, then `tail` bytes of `p` (produced as read, never stored).
struct Layer {
    tar: Vec<u8>,
    tail: u64,
}

fn build(mut prog: Program<'_>, outside: &Path) -> Layer {
    let outside_abs = outside.display().to_string();
    let targets: [&[u8]; 8] = [
        outside_abs.as_bytes(),
        b"../outside",
        b"..",
        b".",
        b"a",
        b"a/b",
        b"x/tmp",
        b"/a",
    ];
    let mut tar = Tar(Vec::new());
    let mut ops = 0;
    while !prog.done() && ops < 64 {
        ops += 1;
        let op = prog.byte();
        let mode = [0o755, 0o700, 0o555, 0o000, 0o1777, 0o4755][usize::from(op >> 3) % 6];
        let uid = [0, 4242, 65534][usize::from(op >> 6) % 3];
        match op % 8 {
            0 => {
                let p = prog.path();
                tar.entry(b'5', &p, b"", b"", mode, uid);
            }
            1 => {
                let p = prog.path();
                tar.entry(b'0', &p, b"", b"data", mode, uid);
            }
            2 => {
                let p = prog.path();
                let t = targets[usize::from(prog.byte()) % targets.len()];
                tar.entry(b'2', &p, t, b"", 0o777, uid);
            }
            3 => {
                let p = prog.path();
                let t = prog.path();
                tar.entry(b'1', &p, &t, b"", mode, uid);
            }
            4 => {
                // Deep nesting, one entry per level (up to a little past the unpacker's bound).
                let depth = usize::from(prog.byte()) * 2;
                let mut p = Vec::new();
                for _ in 0..depth {
                    p.extend_from_slice(b"n/");
                    tar.entry(b'5', &p, b"", b"", mode, uid);
                }
            }
            5 => {
                // An extension header claiming up to 512 GiB, and that many bytes after it (see
                // `Layer`): the last thing in the layer. The unpacker must refuse it before
                // reading them, or hold them in memory (the fuzzer's RSS limit) or take its time.
                let kind = [b'L', b'K', b'x', b'g'][usize::from(prog.byte()) % 4];
                let size = 1u64 << (prog.byte() % 40);
                tar.block(kind, b"././@LongLink", b"", size, 0o644, 0);
                return Layer {
                    tar: tar.0,
                    tail: size,
                };
            }
            6 => {
                // A PAX header with path and size records.
                let p = prog.path();
                let size = format!("{}", prog.byte());
                let mut rec = pax_record(b"path", &p);
                rec.extend(pax_record(b"size", size.as_bytes()));
                tar.block(b'x', b"PaxHeaders/e", b"", rec.len() as u64, 0o644, 0);
                tar.data(&rec);
                tar.entry(b'0', b"pax-entry", b"", b"hello", mode, uid);
            }
            _ => {
                // Raw bytes, to break framing.
                let n = usize::from(prog.byte());
                let raw: Vec<u8> = (0..n).map(|_| prog.byte()).collect();
                tar.0.extend_from_slice(&raw);
            }
        }
    }
    tar.0.extend_from_slice(&[0u8; 1024]);
    Layer {
        tar: tar.0,
        tail: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(outer) = tempfile::tempdir() else {
        return;
    };
    let root = outer.path().join("root");
    let outside = outer.path().join("outside");
    if fs::create_dir(&root).is_err()
        || fs::create_dir_all(outside.join("tmp")).is_err()
        || fs::create_dir_all(outside.join("acpi/d")).is_err()
        || fs::write(outside.join("x"), b"sentinel").is_err()
    {
        return;
    }
    let before = snapshot(outer.path());
    // Owners are applied (and checked outside) when the fuzzer runs as root.
    let as_root = fs::metadata(outer.path()).is_ok_and(|m| m.uid() == 0);
    let opts = UnpackOptions {
        max_bytes: 1 << 20,
        max_entries: 1000,
        preserve_owner: as_root,
    };
    let (compression, layer) = match data.split_first() {
        Some((&b, rest)) if b >= 0x80 => (Compression::None, build(Program(rest), &outside)),
        Some((&b, rest)) => {
            let c = match b % 3 {
                1 => Compression::Gzip,
                2 => Compression::Zstd,
                _ => Compression::None,
            };
            (
                c,
                Layer {
                    tar: rest.to_vec(),
                    tail: 0,
                },
            )
        }
        None => (
            Compression::None,
            Layer {
                tar: Vec::new(),
                tail: 0,
            },
        ),
    };
    let blob = io::Read::chain(&layer.tar[..], io::repeat(b'p').take(layer.tail));
    let _ = unpack_layer(blob, compression, &root, &opts);
    let mut siblings: Vec<_> = fs::read_dir(outer.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    siblings.sort();
    assert_eq!(
        siblings,
        ["outside", "root"],
        "unpack wrote outside its root"
    );
    let after: Vec<_> = snapshot(outer.path())
        .into_iter()
        .filter(|e| !e.0.starts_with("root"))
        .collect();
    let before: Vec<_> = before
        .into_iter()
        .filter(|e| !e.0.starts_with("root"))
        .collect();
    assert_eq!(after, before, "unpack changed something outside its root");
    // Read-only directories from the layer would keep the temp dir from being removed.
    unlock(&root);
});
