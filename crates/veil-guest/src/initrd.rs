//! The initrd: a gzip-compressed SVR4 "newc" cpio archive, the format the kernel unpacks into
//! its initial root filesystem.
//!
//! The archive is reproducible: entries are written in path order, every parent directory
//! before its children, owned by root with modification time 0 and inode numbers by position,
//! and the gzip header carries no time or name. The same inputs give the same bytes, which a
//! measured (SEV-SNP) direct boot needs.

use crate::Error;
use flate2::{Compression, GzBuilder};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { source: Source, mode: u32 },
    Symlink { target: String },
    CharDev { major: u32, minor: u32, mode: u32 },
}

#[derive(Debug, Clone)]
enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// The tree of an initrd, written with [`Initrd::write_gz`].
#[derive(Debug, Default, Clone)]
pub struct Initrd {
    entries: BTreeMap<String, Node>,
}

/// `/a/b` → `a/b`; refuses `..` and empty paths.
fn archive_name(path: &str) -> Result<String, Error> {
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => parts.push(
                p.to_str()
                    .ok_or_else(|| Error::BadInitrdPath(path.to_string()))?,
            ),
            _ => return Err(Error::BadInitrdPath(path.to_string())),
        }
    }
    if parts.is_empty() {
        return Err(Error::BadInitrdPath(path.to_string()));
    }
    Ok(parts.join("/"))
}

impl Initrd {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), Error> {
        let name = archive_name(path)?;
        let mut parent = name.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            self.entries
                .entry(p.to_string())
                .or_insert(Node::Dir { mode: 0o755 });
            parent = p;
        }
        self.entries.insert(name, node);
        Ok(())
    }

    /// A directory (parents are created as needed, mode 0755).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), Error> {
        self.insert(path, Node::Dir { mode })
    }

    /// A regular file with the contents of `source` on this machine (read when written).
    pub fn file(&mut self, path: &str, source: &Path, mode: u32) -> Result<(), Error> {
        let source = Source::Path(source.to_path_buf());
        self.insert(path, Node::File { source, mode })
    }

    /// A regular file with the given contents.
    pub fn bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), Error> {
        let source = Source::Bytes(data);
        self.insert(path, Node::File { source, mode })
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), Error> {
        let target = target.to_string();
        self.insert(path, Node::Symlink { target })
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32, mode: u32) -> Result<(), Error> {
        self.insert(path, Node::CharDev { major, minor, mode })
    }

    /// The archive paths, in the order they are written.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Write the gzip-compressed cpio archive to `out`.
    pub fn write_gz<W: Write>(&self, out: W) -> Result<W, Error> {
        let gz = GzBuilder::new().mtime(0).write(out, Compression::default());
        let gz = self.write_cpio(gz)?;
        gz.finish().map_err(|e| Error::io(Path::new("initrd"), e))
    }

    /// Write the uncompressed cpio archive to `out`.
    pub fn write_cpio<W: Write>(&self, mut out: W) -> Result<W, Error> {
        let werr = |e| Error::io(Path::new("initrd"), e);
        for (i, (name, node)) in self.entries.iter().enumerate() {
            let ino = u32::try_from(i + 1).map_err(|_| Error::TooLarge(name.clone()))?;
            let b = cpio::newc::Builder::new(name)
                .ino(ino)
                .uid(0)
                .gid(0)
                .mtime(0);
            out = match node {
                Node::Dir { mode } => {
                    let w = b.mode(S_IFDIR | mode).nlink(2).write(out, 0);
                    w.finish().map_err(werr)?
                }
                Node::Symlink { target } => {
                    let len = size32(name, target.len() as u64)?;
                    let mut w = b.mode(S_IFLNK | 0o777).write(out, len);
                    w.write_all(target.as_bytes()).map_err(werr)?;
                    w.finish().map_err(werr)?
                }
                Node::CharDev { major, minor, mode } => {
                    let w = b
                        .mode(S_IFCHR | mode)
                        .rdev_major(*major)
                        .rdev_minor(*minor)
                        .write(out, 0);
                    w.finish().map_err(werr)?
                }
                Node::File {
                    source: Source::Bytes(data),
                    mode,
                } => {
                    let len = size32(name, data.len() as u64)?;
                    let mut w = b.mode(S_IFREG | mode).write(out, len);
                    w.write_all(data).map_err(werr)?;
                    w.finish().map_err(werr)?
                }
                Node::File {
                    source: Source::Path(p),
                    mode,
                } => {
                    let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
                    let meta = f.metadata().map_err(|e| Error::io(p, e))?;
                    let len = size32(name, meta.len())?;
                    let mut w = b.mode(S_IFREG | mode).write(out, len);
                    let copied = std::io::copy(&mut f, &mut w).map_err(|e| Error::io(p, e))?;
                    if copied != u64::from(len) {
                        return Err(Error::Changed(p.clone()));
                    }
                    w.finish().map_err(werr)?
                }
            };
        }
        cpio::newc::trailer(out).map_err(werr)
    }
}

fn size32(name: &str, len: u64) -> Result<u32, Error> {
    u32::try_from(len).map_err(|_| Error::TooLarge(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = archive;
        loop {
            let mut r = cpio::NewcReader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let name = r.entry().name().to_string();
            let mode = r.entry().mode();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut data).unwrap();
            out.push((name, mode, data));
            rest = r.finish().unwrap();
        }
        out
    }

    #[test]
    fn parents_first_and_reproducible() {
        let mut t = Initrd::new();
        t.bytes("/lib/x86_64-linux-gnu/libc.so.6", b"elf".to_vec(), 0o755)
            .unwrap();
        t.bytes("/init", b"agent".to_vec(), 0o755).unwrap();
        t.symlink("/lib64/ld-linux-x86-64.so.2", "/lib/ld.so")
            .unwrap();
        t.char_dev("/dev/console", 5, 1, 0o600).unwrap();
        t.dir("/rootfs", 0o755).unwrap();
        let a = t.write_cpio(Vec::new()).unwrap();
        let got = entries(&a);
        let names: Vec<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib64",
                "lib64/ld-linux-x86-64.so.2",
                "rootfs"
            ]
        );
        assert_eq!(got[2].1, S_IFREG | 0o755);
        assert_eq!(got[2].2, b"agent");
        assert_eq!(got[1].1, S_IFCHR | 0o600);
        assert_eq!(got[7].2, b"/lib/ld.so");
        assert_eq!(
            t.write_gz(Vec::new()).unwrap(),
            t.write_gz(Vec::new()).unwrap()
        );
    }

    #[test]
    fn bad_paths() {
        let mut t = Initrd::new();
        for p in ["/", "", "/a/../b"] {
            assert!(t.dir(p, 0o755).is_err(), "{p:?}");
        }
    }
}
