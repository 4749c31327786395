//! Resolution of an entry's parent directory inside the root, like a chroot:
//! symlinks are followed in user space and clamped to the root, and every
//! directory is opened from its parent without following symlinks.
//!
//! Cost, whatever the order of the entries: the previous entry's parent is
//! kept open, and directories the unpacker has already opened by name (a
//! run of them, with no symlink in between) are reopened with one
//! `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)`, which the kernel
//! refuses if any component is a symlink, so that shortcut relies on the
//! bookkeeping only to save system calls, never for containment. Without
//! `openat2` (kernels before 5.6) each component is opened in turn.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::rc::Rc;

use nix::errno::Errno;

use super::entry::Unpacker;
use super::fsat::{self, Kind};
use super::names::{quote, too_long};
use super::tree::{NodeId, ROOT};
use super::{MAX_PATH_DEPTH, MAX_RESOLVE_STEPS, MAX_SYMLINK_HOPS};
use crate::Error;

/// Longest run of components reopened by one `openat2` (below `PATH_MAX`).
const MAX_SHORTCUT_BYTES: usize = 3072;

/// An open directory inside the root.
#[derive(Clone)]
pub(super) struct Parent {
    pub fd: Rc<OwnedFd>,
    pub node: NodeId,
    /// Components below the root.
    pub depth: usize,
}

/// The last resolved parent, by its name in the layer.
pub(super) struct LastParent {
    raw: Vec<OsString>,
    dir: Parent,
    /// Resolving it went through a symlink.
    via_symlink: bool,
}

impl Unpacker<'_> {
    pub(super) fn root_dir(&self) -> Parent {
        Parent {
            fd: Rc::clone(&self.root_fd),
            node: ROOT,
            depth: 0,
        }
    }

    /// The directory named by `comps`, created (mode 0755) where missing.
    pub(super) fn parent_dir(&mut self, comps: &[OsString], shown: &str) -> Result<Parent, Error> {
        match self.resolve(comps, shown, true)? {
            Some(dir) => Ok(dir),
            None => Err(Error::InvalidEntry {
                path: shown.to_string(),
                reason: "its parent directory could not be created".into(),
            }),
        }
    }

    /// The directory named by `comps`, or `None` if a component is missing.
    pub(super) fn existing_dir(
        &mut self,
        comps: &[OsString],
        shown: &str,
    ) -> Result<Option<Parent>, Error> {
        self.resolve(comps, shown, false)
    }

    fn resolve(
        &mut self,
        comps: &[OsString],
        shown: &str,
        create: bool,
    ) -> Result<Option<Parent>, Error> {
        if let Some(last) = &self.last {
            if last.raw == comps {
                return Ok(Some(last.dir.clone()));
            }
        }
        let mut cur = self.root_dir();
        let mut todo: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0u32;
        let mut steps = 0usize;
        let mut via_symlink = false;
        while !todo.is_empty() {
            if steps + todo.len() > MAX_RESOLVE_STEPS {
                return Err(too_long(
                    shown,
                    "the number of path components walked to resolve its parent directory \
                     through symbolic links",
                    MAX_RESOLVE_STEPS,
                ));
            }
            if let Some(n) = self.shortcut(&mut cur, &todo, shown)? {
                todo.drain(..n);
                steps += n;
                continue;
            }
            let Some(c) = todo.pop_front() else {
                break;
            };
            steps += 1;
            match c.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    cur = self.up(cur)?;
                    continue;
                }
                _ => {}
            }
            match fsat::open_dir_at(&*cur.fd, &c) {
                Ok(fd) => cur = self.enter(&cur, &c, fd, shown)?,
                Err(Errno::ENOENT) if create => {
                    fsat::mkdir_at(&*cur.fd, &c)
                        .map_err(|e| self.io(&cur, &c, "creating a parent directory", e))?;
                    let fd = fsat::open_dir_at(&*cur.fd, &c)
                        .map_err(|e| self.io(&cur, &c, "opening a parent directory", e))?;
                    cur = self.enter(&cur, &c, fd, shown)?;
                    self.tree.touch(cur.node);
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    match fsat::kind_at(&*cur.fd, &c) {
                        Ok(Some(Kind::Symlink)) => {}
                        Ok(_) => {
                            let mut rel = self.tree.path(cur.node);
                            rel.push(&c);
                            return Err(Error::InvalidEntry {
                                path: shown.to_string(),
                                reason: format!(
                                    "its parent path component {} exists and is not a directory",
                                    quote(rel.as_os_str().as_bytes())
                                ),
                            });
                        }
                        Err(e) => return Err(self.io(&cur, &c, "inspecting a path", e)),
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Error::PathEscape {
                            path: shown.to_string(),
                            reason: format!(
                                "more than {MAX_SYMLINK_HOPS} symbolic links while resolving its parent directory"
                            ),
                        });
                    }
                    via_symlink = true;
                    let target = fsat::readlink_at(&*cur.fd, &c)
                        .map_err(|e| self.io(&cur, &c, "reading a symbolic link", e))?;
                    let target = target.as_bytes();
                    if target.first() == Some(&b'/') {
                        cur = self.root_dir();
                    }
                    let mut expanded: VecDeque<OsString> = target
                        .split(|&b| b == b'/')
                        .filter(|p| !p.is_empty())
                        .map(|p| OsStr::from_bytes(p).to_os_string())
                        .collect();
                    expanded.extend(todo);
                    todo = expanded;
                }
                Err(e) => return Err(self.io(&cur, &c, "opening a parent directory", e)),
            }
        }
        self.last = Some(LastParent {
            raw: comps.to_vec(),
            dir: cur.clone(),
            via_symlink,
        });
        Ok(Some(cur))
    }

    /// Reopen the run of already-known directories at the front of `todo`
    /// below `cur` with one system call; returns how many components it
    /// covered, `None` when there is no such run (or it failed).
    fn shortcut(
        &mut self,
        cur: &mut Parent,
        todo: &VecDeque<OsString>,
        shown: &str,
    ) -> Result<Option<usize>, Error> {
        if !self.openat2 {
            return Ok(None);
        }
        let mut node = cur.node;
        let mut path = Vec::new();
        let mut n = 0usize;
        for c in todo {
            let b = c.as_bytes();
            if matches!(b, b"" | b"." | b"..") || path.len() + 1 + b.len() > MAX_SHORTCUT_BYTES {
                break;
            }
            match self.tree.child(node, c) {
                Some(child) if self.tree.is_dir(child) => node = child,
                _ => break,
            }
            if n > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(b);
            n += 1;
        }
        if n < 2 {
            return Ok(None);
        }
        if cur.depth + n >= MAX_PATH_DEPTH {
            return Err(too_deep(shown));
        }
        match fsat::open_dir_beneath(&*cur.fd, OsStr::from_bytes(&path)) {
            Ok(fd) => {
                *cur = Parent {
                    fd: Rc::new(fd),
                    node,
                    depth: cur.depth + n,
                };
                Ok(Some(n))
            }
            // No openat2 here (old kernel, or a seccomp filter).
            Err(Errno::ENOSYS | Errno::EPERM | Errno::EINVAL | Errno::E2BIG) => {
                tracing::debug!("openat2 is not available; opening one directory at a time");
                self.openat2 = false;
                Ok(None)
            }
            // The bookkeeping is stale there: walk one component at a time.
            Err(_) => Ok(None),
        }
    }

    /// `cur`'s child `name`, just opened as `fd`.
    fn enter(
        &mut self,
        cur: &Parent,
        name: &OsStr,
        fd: OwnedFd,
        shown: &str,
    ) -> Result<Parent, Error> {
        // A parent must leave room for the entry itself.
        if cur.depth + 1 >= MAX_PATH_DEPTH {
            return Err(too_deep(shown));
        }
        let node = self.tree.child_or_insert(cur.node, name);
        self.tree.mark_dir(node);
        Ok(Parent {
            fd: Rc::new(fd),
            node,
            depth: cur.depth + 1,
        })
    }

    /// `..` of `cur`, clamped to the root.
    fn up(&self, cur: Parent) -> Result<Parent, Error> {
        // Compared by inode, not by the bookkeeping: `..` of the root
        // itself would leave it.
        let id = fsat::identity(&*cur.fd)
            .map_err(|e| self.io(&cur, OsStr::new(""), "inspecting a directory", e))?;
        if cur.node == ROOT || cur.depth == 0 || id == self.root_id {
            return Ok(self.root_dir());
        }
        let fd = fsat::open_parent(&*cur.fd)
            .map_err(|e| self.io(&cur, OsStr::new(".."), "opening a parent directory", e))?;
        Ok(Parent {
            fd: Rc::new(fd),
            node: self.tree.parent(cur.node),
            depth: cur.depth - 1,
        })
    }

    /// Forget the last parent if it was removed, or (to be safe) if it was
    /// resolved through a symlink.
    pub(super) fn forget_removed(&mut self) {
        if self
            .last
            .as_ref()
            .is_some_and(|l| l.via_symlink || !self.tree.is_alive(l.dir.node))
        {
            self.last = None;
        }
    }
}

fn too_deep(shown: &str) -> Error {
    too_long(
        shown,
        "its number of path components after following symbolic links",
        MAX_PATH_DEPTH,
    )
}
