//! Hardened unpacking of image layers onto a root directory.
//!
//! Layers are hostile input. Entry names are normalised and must stay
//! inside the root; parent directories are resolved like a chroot (symlinks
//! followed but clamped to the root); the final path component is never
//! followed; devices and FIFOs are skipped; OCI whiteouts are applied.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use flate2::read::MultiGzDecoder;
use tar::EntryType;

use crate::manifest::Compression;
use crate::Error;

/// Prefix of whiteout file names.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the opaque-directory marker.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// Maximum number of symlinks followed while resolving one path.
pub const MAX_SYMLINK_HOPS: u32 = 40;

/// Limits and behaviour of [`unpack_layer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Refuse layers expanding beyond this many bytes of file data.
    pub max_bytes: u64,
    /// Refuse layers with more than this many tar entries.
    pub max_entries: u64,
    /// Chown entries to their tar uid/gid (true inside a sandbox running as
    /// root; false in unprivileged tests).
    pub preserve_owner: bool,
}

impl Default for UnpackOptions {
    /// 8 GiB of file data, 1 000 000 entries, owners not preserved.
    fn default() -> Self {
        UnpackOptions {
            max_bytes: 8 * 1024 * 1024 * 1024,
            max_entries: 1_000_000,
            preserve_owner: false,
        }
    }
}

/// What [`unpack_layer`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries processed (including whiteouts and skipped ones).
    pub entries: u64,
    /// Bytes of regular-file data written.
    pub bytes: u64,
    /// Whiteouts (including opaque markers) applied.
    pub whiteouts: u64,
    /// Character/block devices and FIFOs skipped.
    pub skipped_devices: u64,
}

/// Unpack one layer blob (compressed bytes as stored in a registry) onto
/// `root`, an existing directory, applying OCI whiteouts against the lower
/// layers already there.
///
/// On success the reader has been consumed to EOF, even past the tar end
/// marker, so a [`crate::digest::VerifyingReader`] wrapped around the blob
/// has seen every byte. Integrity of the blob itself is the caller's job
/// (verify the digest after this returns).
pub fn unpack_layer<R: Read>(
    blob: R,
    compression: Compression,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, Error> {
    let meta =
        fs::symlink_metadata(root).map_err(|e| Error::io(root, "inspecting the unpack root", e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            root,
            "using the unpack root",
            io::Error::new(
                io::ErrorKind::NotADirectory,
                "the unpack root is not a directory",
            ),
        ));
    }
    let stats = match compression {
        Compression::None => {
            let mut r = blob;
            let stats = apply_tar(&mut r, root, opts)?;
            drain(&mut r)?;
            stats
        }
        Compression::Gzip => {
            let mut d = MultiGzDecoder::new(blob);
            let stats = apply_tar(&mut d, root, opts)?;
            drain(&mut d.into_inner())?;
            stats
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(blob)
                .map_err(|source| Error::CorruptLayer { source })?;
            let stats = apply_tar(&mut d, root, opts)?;
            drain(&mut d.finish())?;
            stats
        }
    };
    tracing::debug!(
        root = %root.display(),
        entries = stats.entries,
        bytes = stats.bytes,
        whiteouts = stats.whiteouts,
        skipped_devices = stats.skipped_devices,
        "unpacked layer"
    );
    Ok(stats)
}

/// Read the raw blob to EOF without interpreting it.
fn drain<R: Read>(r: &mut R) -> Result<(), Error> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(Error::CorruptLayer { source }),
        }
    }
}

fn apply_tar<R: Read>(
    reader: &mut R,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, Error> {
    let mut archive = tar::Archive::new(reader);
    let mut st = Unpacker {
        root,
        opts,
        stats: UnpackStats::default(),
        touched: HashSet::new(),
        dirs: Vec::new(),
    };
    let entries = archive
        .entries()
        .map_err(|source| Error::CorruptLayer { source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| Error::CorruptLayer { source })?;
        st.stats.entries += 1;
        if st.stats.entries > opts.max_entries {
            return Err(Error::LimitExceeded {
                what: "entry count",
                limit: opts.max_entries,
            });
        }
        st.apply_entry(&mut entry)?;
    }
    st.finish()?;
    Ok(st.stats)
}

/// A directory whose metadata is applied once the whole layer is written,
/// so that read-only directories do not block their own contents.
struct PendingDir {
    rel: PathBuf,
    mode: u32,
    uid: u64,
    gid: u64,
}

struct Unpacker<'a> {
    root: &'a Path,
    opts: &'a UnpackOptions,
    stats: UnpackStats,
    /// Resolved root-relative paths created by this layer, plus ancestors.
    touched: HashSet<PathBuf>,
    dirs: Vec<PendingDir>,
}

/// Split a tar entry name into normal components, rejecting absolute paths
/// and `..`.
fn normalize(raw: &[u8], shown: &str) -> Result<Vec<OsString>, Error> {
    if raw.first() == Some(&b'/') {
        return Err(Error::PathEscape {
            path: shown.to_string(),
            reason: "absolute paths are not allowed in a layer".into(),
        });
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::PathEscape {
                    path: shown.to_string(),
                    reason: "'..' path components are not allowed in a layer".into(),
                })
            }
            c => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(out)
}

fn to_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Unpacker<'_> {
    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn touch(&mut self, rel: &Path) {
        for a in rel.ancestors() {
            if !self.touched.insert(a.to_path_buf()) {
                // Ancestors of an already-touched path are already present.
                break;
            }
        }
    }

    /// Resolve directory components inside the root, following symlinks but
    /// clamping to the root. Missing directories are created when `create`;
    /// otherwise `Ok(None)` is returned for a missing component.
    fn resolve_dir(
        &mut self,
        comps: &[OsString],
        shown: &str,
        create: bool,
    ) -> Result<Option<PathBuf>, Error> {
        let mut stack: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0u32;
        while let Some(c) = pending.pop_front() {
            if c == "." {
                continue;
            }
            if c == ".." {
                stack.pop();
                continue;
            }
            let rel: PathBuf = stack.iter().chain(std::iter::once(&c)).collect();
            let abs = self.abs(&rel);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => stack.push(c),
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Error::PathEscape {
                            path: shown.to_string(),
                            reason: format!(
                                "more than {MAX_SYMLINK_HOPS} symbolic links while resolving its parent directory"
                            ),
                        });
                    }
                    let target = fs::read_link(&abs)
                        .map_err(|e| Error::io(&abs, "reading a symbolic link", e))?;
                    let tb = target.as_os_str().as_bytes();
                    if tb.first() == Some(&b'/') {
                        stack.clear();
                    }
                    let mut expanded: VecDeque<OsString> = tb
                        .split(|&b| b == b'/')
                        .filter(|p| !p.is_empty())
                        .map(|p| OsStr::from_bytes(p).to_os_string())
                        .collect();
                    expanded.extend(pending);
                    pending = expanded;
                }
                Ok(_) => {
                    return Err(Error::InvalidEntry {
                        path: shown.to_string(),
                        reason: format!(
                            "its parent path component {:?} exists and is not a directory",
                            rel.display().to_string()
                        ),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&abs)
                        .map_err(|e| Error::io(&abs, "creating a parent directory", e))?;
                    self.touch(&rel);
                    stack.push(c);
                }
                Err(e) => return Err(Error::io(&abs, "inspecting a path", e)),
            }
        }
        Ok(Some(stack.into_iter().collect()))
    }

    /// Remove whatever is at `abs` (recursively for directories; symlinks
    /// are removed, never followed). Missing paths are fine.
    fn remove_any(abs: &Path) -> Result<(), Error> {
        match fs::symlink_metadata(abs) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(abs).map_err(|e| Error::io(abs, "removing a directory", e))
            }
            Ok(_) => fs::remove_file(abs).map_err(|e| Error::io(abs, "removing a file", e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(abs, "inspecting a path", e)),
        }
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), Error> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let mut comps = normalize(&raw_path, &shown)?;
        let header = entry.header();
        let kind = header.entry_type();
        let bad_header = |e: io::Error| Error::InvalidEntry {
            path: shown.clone(),
            reason: format!("its tar header is malformed: {e}"),
        };
        let mode = header.mode().map_err(bad_header)? & 0o7777;
        let uid = header.uid().map_err(bad_header)?;
        let gid = header.gid().map_err(bad_header)?;
        let mtime = header.mtime().unwrap_or(0);
        tracing::trace!(path = %shown, ?kind, "layer entry");

        let Some(name) = comps.pop() else {
            // The root itself ("./"): never modified by a layer.
            if kind.is_dir() {
                return Ok(());
            }
            return Err(Error::InvalidEntry {
                path: shown,
                reason: "a non-directory entry names the root itself".into(),
            });
        };
        let name_bytes = name.as_bytes();

        // Whiteouts.
        if name_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            self.stats.whiteouts += 1;
            if name == WHITEOUT_OPAQUE {
                let Some(dir) = self.resolve_dir(&comps, &shown, true)? else {
                    return Ok(());
                };
                self.touch(&dir);
                return self.make_opaque(&dir);
            }
            let target = &name_bytes[WHITEOUT_PREFIX.len()..];
            if target.is_empty() || target == b"." || target == b".." {
                return Err(Error::InvalidEntry {
                    path: shown,
                    reason: "the whiteout does not name a file".into(),
                });
            }
            let Some(dir) = self.resolve_dir(&comps, &shown, false)? else {
                return Ok(());
            };
            let rel = dir.join(OsStr::from_bytes(target));
            if self.touched.contains(&rel) {
                // Whiteouts hide lower layers only, not this layer's own files.
                return Ok(());
            }
            tracing::trace!(path = %rel.display(), "whiteout");
            return Self::remove_any(&self.abs(&rel));
        }

        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let rel = self.prepare_leaf(&comps, &name, &shown)?;
                self.write_file(entry, &rel, &shown, mode, uid, gid, mtime)
            }
            EntryType::Directory => {
                let dir = self.resolve_dir(&comps, &shown, true)?.unwrap_or_default();
                let rel = dir.join(&name);
                let abs = self.abs(&rel);
                match fs::symlink_metadata(&abs) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        Self::remove_any(&abs)?;
                        Self::mkdir(&abs)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Self::mkdir(&abs)?,
                    Err(e) => return Err(Error::io(&abs, "inspecting a path", e)),
                }
                self.touch(&rel);
                self.dirs.push(PendingDir {
                    rel,
                    mode,
                    uid,
                    gid,
                });
                Ok(())
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| Error::InvalidEntry {
                        path: shown.clone(),
                        reason: "the symbolic link has no target".into(),
                    })?;
                let rel = self.prepare_leaf(&comps, &name, &shown)?;
                let abs = self.abs(&rel);
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &abs)
                    .map_err(|e| Error::io(&abs, "creating a symbolic link", e))?;
                if self.opts.preserve_owner {
                    std::os::unix::fs::lchown(&abs, Some(to_u32(uid)), Some(to_u32(gid)))
                        .map_err(|e| Error::io(&abs, "changing the owner of a symbolic link", e))?;
                }
                Ok(())
            }
            EntryType::Link => {
                let raw_target =
                    entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .ok_or_else(|| Error::InvalidEntry {
                            path: shown.clone(),
                            reason: "the hard link has no target".into(),
                        })?;
                let shown_target = String::from_utf8_lossy(&raw_target).into_owned();
                let mut tcomps = normalize(&raw_target, &shown_target).map_err(|e| match e {
                    Error::PathEscape { reason, .. } => Error::PathEscape {
                        path: shown.clone(),
                        reason: format!("hard link target {shown_target:?}: {reason}"),
                    },
                    other => other,
                })?;
                let not_file = |why: &str| Error::InvalidEntry {
                    path: shown.clone(),
                    reason: format!("hard link target {shown_target:?} {why}"),
                };
                let tname = tcomps.pop().ok_or_else(|| not_file("names the root"))?;
                let tdir = self
                    .resolve_dir(&tcomps, &shown, false)?
                    .ok_or_else(|| not_file("does not exist"))?;
                let src = self.abs(&tdir.join(&tname));
                match fs::symlink_metadata(&src) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => return Err(not_file("is not a regular file")),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(not_file("does not exist"))
                    }
                    Err(e) => return Err(Error::io(&src, "inspecting a hard link target", e)),
                }
                let dir = self.resolve_dir(&comps, &shown, true)?.unwrap_or_default();
                let rel = dir.join(&name);
                let dst = self.abs(&rel);
                if dst == src {
                    return Ok(());
                }
                Self::remove_any(&dst)?;
                fs::hard_link(&src, &dst)
                    .map_err(|e| Error::io(&dst, "creating a hard link", e))?;
                self.touch(&rel);
                Ok(())
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                tracing::debug!(path = %shown, ?kind, "skipping device or FIFO entry");
                self.stats.skipped_devices += 1;
                Ok(())
            }
            other => {
                tracing::debug!(path = %shown, kind = ?other, "skipping unsupported tar entry type");
                Ok(())
            }
        }
    }

    fn mkdir(abs: &Path) -> Result<(), Error> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(abs)
            .map_err(|e| Error::io(abs, "creating a directory", e))
    }

    /// Resolve the parent, clear whatever is at the leaf, and return the
    /// leaf's root-relative path.
    fn prepare_leaf(
        &mut self,
        comps: &[OsString],
        name: &OsStr,
        shown: &str,
    ) -> Result<PathBuf, Error> {
        let dir = self.resolve_dir(comps, shown, true)?.unwrap_or_default();
        let rel = dir.join(name);
        Self::remove_any(&self.abs(&rel))?;
        self.touch(&rel);
        Ok(rel)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        shown: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> Result<(), Error> {
        let limit = self.opts.max_bytes;
        let remaining = limit.saturating_sub(self.stats.bytes);
        let too_big = || Error::LimitExceeded {
            what: "file data bytes",
            limit,
        };
        if entry.size() > remaining {
            return Err(too_big());
        }
        let abs = self.abs(rel);
        // create_new (O_CREAT|O_EXCL) never follows a symlink at the leaf.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&abs)
            .map_err(|e| Error::io(&abs, "creating a file", e))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(Error::CorruptLayer { source }),
            };
            written += n as u64;
            if written > remaining {
                return Err(too_big());
            }
            file.write_all(&buf[..n])
                .map_err(|e| Error::io(&abs, "writing a file", e))?;
        }
        self.stats.bytes += written;
        if self.opts.preserve_owner {
            std::os::unix::fs::fchown(&file, Some(to_u32(uid)), Some(to_u32(gid)))
                .map_err(|e| Error::io(&abs, "changing the owner of a file", e))?;
        }
        // chmod after chown: chown clears set-id bits.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(&abs, "setting file permissions", e))?;
        if let Err(e) = set_mtime(&file, mtime) {
            tracing::debug!(path = %shown, error = %e, "could not set file modification time");
        }
        Ok(())
    }

    /// Remove everything under `dir` that this layer did not create.
    fn make_opaque(&mut self, dir: &Path) -> Result<(), Error> {
        let abs = self.abs(dir);
        let rd =
            fs::read_dir(&abs).map_err(|e| Error::io(&abs, "listing an opaque directory", e))?;
        for child in rd {
            let child = child.map_err(|e| Error::io(&abs, "listing an opaque directory", e))?;
            let rel = dir.join(child.file_name());
            if !self.touched.contains(&rel) {
                tracing::trace!(path = %rel.display(), "removed by opaque whiteout");
                Self::remove_any(&self.abs(&rel))?;
            } else if fs::symlink_metadata(self.abs(&rel)).is_ok_and(|m| m.is_dir()) {
                self.make_opaque(&rel)?;
            }
        }
        Ok(())
    }

    /// Apply deferred directory owners and modes, deepest last-created first.
    fn finish(&mut self) -> Result<(), Error> {
        for d in self.dirs.iter().rev() {
            let abs = self.root.join(&d.rel);
            // The path may have been replaced later in the layer.
            if !fs::symlink_metadata(&abs).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            if self.opts.preserve_owner {
                std::os::unix::fs::lchown(&abs, Some(to_u32(d.uid)), Some(to_u32(d.gid)))
                    .map_err(|e| Error::io(&abs, "changing the owner of a directory", e))?;
            }
            fs::set_permissions(&abs, fs::Permissions::from_mode(d.mode))
                .map_err(|e| Error::io(&abs, "setting directory permissions", e))?;
        }
        Ok(())
    }
}

fn set_mtime(file: &File, mtime: u64) -> io::Result<()> {
    file.set_modified(UNIX_EPOCH + Duration::from_secs(mtime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::VerifyingReader;
    use crate::Digest;
    use std::os::unix::fs::MetadataExt;
    use tar::{Builder, Header};

    /// One entry of an in-memory test layer.
    enum E<'a> {
        File(&'a str, &'a [u8]),
        FileMode(&'a str, &'a [u8], u32),
        Dir(&'a str),
        DirMode(&'a str, u32),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        /// Regular file with hostile raw name bytes (bypasses tar's checks).
        RawFile(&'a [u8], &'a [u8]),
        /// Hard link with hostile raw link-name bytes.
        RawHard(&'a str, &'a [u8]),
        Special(&'a str, EntryType),
    }

    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn tar_of(entries: &[E]) -> Vec<u8> {
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

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zstd_of(data: &[u8]) -> Vec<u8> {
        zstd::stream::encode_all(data, 3).unwrap()
    }

    /// A temp dir holding `root/` plus a sentinel sibling, to detect escapes.
    struct Sandbox {
        outer: tempfile::TempDir,
    }

    impl Sandbox {
        fn new() -> Self {
            let outer = tempfile::tempdir().unwrap();
            fs::create_dir(outer.path().join("root")).unwrap();
            fs::write(outer.path().join("sentinel"), b"untouched").unwrap();
            Sandbox { outer }
        }
        fn root(&self) -> PathBuf {
            self.outer.path().join("root")
        }
        fn unpack(&self, entries: &[E]) -> Result<UnpackStats, Error> {
            self.unpack_with(entries, &UnpackOptions::default())
        }
        fn unpack_with(&self, entries: &[E], opts: &UnpackOptions) -> Result<UnpackStats, Error> {
            unpack_layer(&tar_of(entries)[..], Compression::None, &self.root(), opts)
        }
        /// Nothing outside root changed.
        fn assert_contained(&self) {
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
        fn read(&self, rel: &str) -> Vec<u8> {
            fs::read(self.root().join(rel)).unwrap()
        }
        fn exists(&self, rel: &str) -> bool {
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
    #[test]
    fn preserve_owner_when_root() {
        let sb = Sandbox::new();
        let probe = sb.outer.path().join("probe");
        fs::write(&probe, b"").unwrap();
        if fs::metadata(&probe).unwrap().uid() != 0 {
            println!("note: not running as root; skipping the ownership check");
            return;
        }
        fs::remove_file(&probe).unwrap();
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
}
