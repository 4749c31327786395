//! Applying one tar entry to the root.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use tar::EntryType;

use super::fsat::{self, Kind};
use super::names::{corrupt, normalize, quote};
use super::resolve::{LastParent, Parent};
use super::tree::{Meta, NodeId, Tree};
use super::{UnpackOptions, UnpackStats, WHITEOUT_OPAQUE, WHITEOUT_PREFIX};
use crate::Error;

pub(super) struct Unpacker<'a> {
    pub(super) root: &'a Path,
    pub(super) opts: &'a UnpackOptions,
    pub(super) stats: UnpackStats,
    pub(super) root_fd: Rc<OwnedFd>,
    /// Device and inode of the root.
    pub(super) root_id: (u64, u64),
    pub(super) tree: Tree,
    /// The last resolved parent (see `resolve`).
    pub(super) last: Option<LastParent>,
    /// Whether `openat2` works here (see `resolve`).
    pub(super) openat2: bool,
}

fn to_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl<'a> Unpacker<'a> {
    pub(super) fn new(root: &'a Path, opts: &'a UnpackOptions) -> Result<Self, Error> {
        let fd = open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(root, "opening the unpack root", e.into()))?;
        let root_id = fsat::identity(&fd)
            .map_err(|e| Error::io(root, "inspecting the unpack root", e.into()))?;
        Ok(Unpacker {
            root,
            opts,
            stats: UnpackStats::default(),
            root_fd: Rc::new(fd),
            root_id,
            tree: Tree::new(),
            last: None,
            openat2: true,
        })
    }

    /// An [`Error::Io`] about `name` in `dir`, naming the path inside the
    /// root (quoted) and the root.
    pub(super) fn io(
        &self,
        dir: &Parent,
        name: &OsStr,
        action: &'static str,
        e: impl Into<io::Error>,
    ) -> Error {
        self.io_at(dir.node, name, action, e)
    }

    pub(super) fn io_at(
        &self,
        node: NodeId,
        name: &OsStr,
        action: &'static str,
        e: impl Into<io::Error>,
    ) -> Error {
        let mut rel = self.tree.path(node);
        if !name.is_empty() {
            rel.push(name);
        }
        let path = if rel.as_os_str().is_empty() {
            self.root.display().to_string()
        } else {
            format!(
                "{} in {}",
                quote(rel.as_os_str().as_bytes()),
                self.root.display()
            )
        };
        Error::Io {
            path,
            action,
            source: e.into(),
        }
    }

    pub(super) fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), Error> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = quote(&raw_path);
        let mut comps = normalize(&raw_path, &shown)?;
        let header = entry.header();
        let kind = header.entry_type();
        let bad = |field: &str, raw: &[u8]| Error::InvalidEntry {
            path: shown.clone(),
            reason: format!("its tar header has an invalid {field} field {}", quote(raw)),
        };
        let old = header.as_old();
        let meta = Meta {
            mode: header.mode().map_err(|_| bad("mode", &old.mode))? & 0o7777,
            uid: to_u32(header.uid().map_err(|_| bad("uid", &old.uid))?),
            gid: to_u32(header.gid().map_err(|_| bad("gid", &old.gid))?),
            mtime: header.mtime().unwrap_or(0),
        };
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

        if name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(&comps, &name, &shown);
        }

        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let dir = self.prepare_leaf(&comps, &name, &shown)?;
                self.write_file(entry, &dir, &name, meta)
            }
            EntryType::Directory => {
                let dir = self.parent_dir(&comps, &shown)?;
                match fsat::kind_at(&*dir.fd, &name) {
                    Ok(Some(Kind::Dir)) => {}
                    Ok(Some(_)) => {
                        self.remove_at(&dir, &name)?;
                        self.mkdir(&dir, &name)?;
                    }
                    Ok(None) => self.mkdir(&dir, &name)?,
                    Err(e) => return Err(self.io(&dir, &name, "inspecting a path", e)),
                }
                let node = self.created(&dir, &name);
                self.tree.set_meta(node, meta);
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
                let dir = self.prepare_leaf(&comps, &name, &shown)?;
                fsat::symlink_at(OsStr::from_bytes(&target), &*dir.fd, &name)
                    .map_err(|e| self.io(&dir, &name, "creating a symbolic link", e))?;
                if self.opts.preserve_owner {
                    fsat::lchown_at(&*dir.fd, &name, meta.uid, meta.gid).map_err(|e| {
                        self.io(&dir, &name, "changing the owner of a symbolic link", e)
                    })?;
                }
                self.created(&dir, &name);
                Ok(())
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| Error::InvalidEntry {
                        path: shown.clone(),
                        reason: "the hard link has no target".into(),
                    })?;
                self.hard_link(&comps, &name, &target, &shown)
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

    fn whiteout(&mut self, comps: &[OsString], name: &OsStr, shown: &str) -> Result<(), Error> {
        self.stats.whiteouts += 1;
        if name == WHITEOUT_OPAQUE {
            let dir = self.parent_dir(comps, shown)?;
            self.tree.touch(dir.node);
            return self.make_opaque(&dir);
        }
        let target = &name.as_bytes()[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(Error::InvalidEntry {
                path: shown.to_string(),
                reason: "the whiteout does not name a file".into(),
            });
        }
        let Some(dir) = self.existing_dir(comps, shown)? else {
            return Ok(());
        };
        let target = OsStr::from_bytes(target);
        if self
            .tree
            .child(dir.node, target)
            .is_some_and(|n| self.tree.is_touched(n))
        {
            // Whiteouts hide lower layers only, not this layer's own files.
            return Ok(());
        }
        tracing::trace!(path = %shown, "whiteout");
        self.remove_at(&dir, target)
    }

    fn hard_link(
        &mut self,
        comps: &[OsString],
        name: &OsStr,
        raw_target: &[u8],
        shown: &str,
    ) -> Result<(), Error> {
        let shown_target = quote(raw_target);
        let mut tcomps = normalize(raw_target, &shown_target).map_err(|e| match e {
            Error::PathEscape { reason, .. } => Error::PathEscape {
                path: shown.to_string(),
                reason: format!("hard link target {shown_target}: {reason}"),
            },
            Error::PathTooLong { what, limit, .. } => Error::PathTooLong {
                path: shown.to_string(),
                what,
                limit,
            },
            other => other,
        })?;
        let not_file = |why: &str| Error::InvalidEntry {
            path: shown.to_string(),
            reason: format!("hard link target {shown_target} {why}"),
        };
        let tname = tcomps.pop().ok_or_else(|| not_file("names the root"))?;
        let tdir = self
            .existing_dir(&tcomps, shown)?
            .ok_or_else(|| not_file("does not exist"))?;
        match fsat::kind_at(&*tdir.fd, &tname) {
            Ok(Some(Kind::File)) => {}
            Ok(Some(_)) => return Err(not_file("is not a regular file")),
            Ok(None) => return Err(not_file("does not exist")),
            Err(e) => return Err(self.io(&tdir, &tname, "inspecting a hard link target", e)),
        }
        let dir = self.parent_dir(comps, shown)?;
        if dir.node == tdir.node && name == tname {
            return Ok(());
        }
        self.remove_at(&dir, name)?;
        fsat::link_at(&*tdir.fd, &tname, &*dir.fd, name)
            .map_err(|e| self.io(&dir, name, "creating a hard link", e))?;
        self.created(&dir, name);
        Ok(())
    }

    /// Record `name` in `dir` as created by this layer.
    fn created(&mut self, dir: &Parent, name: &OsStr) -> NodeId {
        let node = self.tree.child_or_insert(dir.node, name);
        self.tree.touch(node);
        node
    }

    fn mkdir(&self, dir: &Parent, name: &OsStr) -> Result<(), Error> {
        fsat::mkdir_at(&*dir.fd, name).map_err(|e| self.io(dir, name, "creating a directory", e))
    }

    /// Resolve the parent and clear whatever is at the leaf.
    fn prepare_leaf(
        &mut self,
        comps: &[OsString],
        name: &OsStr,
        shown: &str,
    ) -> Result<Parent, Error> {
        let dir = self.parent_dir(comps, shown)?;
        self.remove_at(&dir, name)?;
        Ok(dir)
    }

    /// Remove whatever is at `name` in `dir` (recursively for directories;
    /// symlinks are removed, never followed). Missing is fine.
    fn remove_at(&mut self, dir: &Parent, name: &OsStr) -> Result<(), Error> {
        let kind = match fsat::kind_at(&*dir.fd, name) {
            Ok(Some(kind)) => kind,
            Ok(None) => return Ok(()),
            Err(e) => return Err(self.io(dir, name, "inspecting a path", e)),
        };
        match kind {
            Kind::Dir => fsat::remove_tree_at(&*dir.fd, name)
                .map_err(|e| self.io(dir, name, "removing a directory", e))?,
            _ => fsat::unlink_at(&*dir.fd, name)
                .map_err(|e| self.io(dir, name, "removing a file", e))?,
        }
        self.tree.remove(dir.node, name);
        match kind {
            Kind::Dir => self.forget_removed(),
            // Cached resolutions may have gone through it.
            Kind::Symlink => self.last = None,
            Kind::File | Kind::Other => {}
        }
        Ok(())
    }

    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        dir: &Parent,
        name: &OsStr,
        meta: Meta,
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
        // O_CREAT|O_EXCL|O_NOFOLLOW: never follows a symlink at the leaf.
        let mut file = fsat::create_file_at(&*dir.fd, name)
            .map_err(|e| self.io(dir, name, "creating a file", e))?;
        self.created(dir, name);
        let mut buf = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt(e)),
            };
            written += n as u64;
            if written > remaining {
                return Err(too_big());
            }
            file.write_all(&buf[..n])
                .map_err(|e| self.io(dir, name, "writing a file", e))?;
        }
        self.stats.bytes += written;
        self.set_meta(&file, meta)
            .map_err(|(action, e)| self.io(dir, name, action, e))
    }

    /// Apply owner (when preserving owners), mode and modification time
    /// through an open descriptor.
    pub(super) fn set_meta(
        &self,
        file: &File,
        meta: Meta,
    ) -> Result<(), (&'static str, io::Error)> {
        if self.opts.preserve_owner {
            std::os::unix::fs::fchown(file, Some(meta.uid), Some(meta.gid))
                .map_err(|e| ("changing the owner", e))?;
        }
        // chmod after chown: chown clears set-id bits.
        file.set_permissions(fs::Permissions::from_mode(meta.mode))
            .map_err(|e| ("setting permissions", e))?;
        if let Err(e) = file.set_modified(UNIX_EPOCH + Duration::from_secs(meta.mtime)) {
            tracing::debug!(error = %e, "could not set a modification time");
        }
        Ok(())
    }

    /// Remove everything under `dir` that this layer did not create.
    fn make_opaque(&mut self, dir: &Parent) -> Result<(), Error> {
        let names = fsat::list_dir(&*dir.fd)
            .map_err(|e| self.io(dir, OsStr::new(""), "listing an opaque directory", e))?;
        for child in names {
            let node = self.tree.child(dir.node, &child);
            if !node.is_some_and(|n| self.tree.is_touched(n)) {
                tracing::trace!(path = %quote(child.as_bytes()), "removed by opaque whiteout");
                self.remove_at(dir, &child)?;
                continue;
            }
            match fsat::open_dir_at(&*dir.fd, &child) {
                Ok(fd) => {
                    let sub = Parent {
                        fd: Rc::new(fd),
                        node: self.tree.child_or_insert(dir.node, &child),
                        depth: dir.depth + 1,
                    };
                    self.make_opaque(&sub)?;
                }
                // Not a directory: this layer's file, kept.
                Err(Errno::ELOOP | Errno::ENOTDIR) => {}
                Err(e) => return Err(self.io(dir, &child, "opening a directory", e)),
            }
        }
        Ok(())
    }
}
