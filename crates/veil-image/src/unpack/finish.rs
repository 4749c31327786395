//! Directory owners, modes and modification times, applied once the whole
//! layer is written (a read-only directory must not block its own contents,
//! and writing into a directory changes its modification time).
//!
//! They are applied through descriptors: the walk opens each directory from
//! its parent with `O_DIRECTORY | O_NOFOLLOW`, starting from the root, and
//! applies a directory's metadata after its children's (`fchown`, `fchmod`,
//! `futimens` on its descriptor). A directory that a later entry replaced
//! (by a symlink, say) is no longer in the bookkeeping, and even if it were,
//! the walk could not follow the symlink out of the root.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;

use nix::errno::Errno;

use super::entry::Unpacker;
use super::fsat;
use super::names::quote;
use super::tree::{NodeId, ROOT};
use crate::Error;

struct Frame {
    node: NodeId,
    fd: OwnedFd,
    children: Vec<(Rc<OsStr>, NodeId)>,
    next: usize,
}

impl Unpacker<'_> {
    pub(super) fn finish(&mut self) -> Result<(), Error> {
        self.last = None;
        let marked = self.tree.with_meta_below();
        if !marked.get(ROOT).copied().unwrap_or(false) {
            return Ok(());
        }
        let root = self
            .root_fd
            .try_clone()
            .map_err(|e| Error::io(self.root, "opening the unpack root", e))?;
        let mut stack = vec![Frame {
            node: ROOT,
            fd: root,
            children: self.tree.marked_children(ROOT, &marked),
            next: 0,
        }];
        while let Some(top) = stack.last_mut() {
            if let Some((name, child)) = top.children.get(top.next).cloned() {
                top.next += 1;
                match fsat::open_dir_at(top.fd.as_fd(), &name) {
                    Ok(fd) => {
                        let children = self.tree.marked_children(child, &marked);
                        stack.push(Frame {
                            node: child,
                            fd,
                            children,
                            next: 0,
                        });
                    }
                    // Not a directory (any more): nothing to apply there.
                    Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => {
                        let mut rel = self.tree.path(top.node);
                        rel.push(&*name);
                        tracing::debug!(
                            path = %quote(std::os::unix::ffi::OsStrExt::as_bytes(rel.as_os_str())),
                            "not a directory at the end of the layer; its metadata is not applied"
                        );
                    }
                    Err(e) => return Err(self.io_at(top.node, &name, "opening a directory", e)),
                }
                continue;
            }
            let Some(done) = stack.pop() else {
                break;
            };
            if done.node == ROOT {
                continue;
            }
            if let Some(meta) = self.tree.meta(done.node) {
                let file = File::from(done.fd);
                self.set_meta(&file, meta)
                    .map_err(|(action, e)| self.io_at(done.node, OsStr::new(""), action, e))?;
            }
        }
        Ok(())
    }
}
