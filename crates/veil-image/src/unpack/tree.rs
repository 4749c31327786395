//! What the unpacker remembers about the tree one layer writes, by resolved
//! name: which paths this layer created (whiteouts and opaque markers only
//! hide lower layers' files), and the owner, mode and time of the
//! directories it listed, applied once the whole layer is written.
//!
//! This is bookkeeping, not a source of truth about the file system: every
//! operation still opens its directories from the root without following
//! symlinks, so a mistake here can misplace metadata inside the root but
//! never reach outside it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::rc::Rc;

/// Index of a node; nodes of removed subtrees are reused.
pub(super) type NodeId = usize;

/// The unpack root.
pub(super) const ROOT: NodeId = 0;

/// Owner, mode and modification time of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Meta {
    /// Permission bits including set-id and sticky bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: u64,
}

#[derive(Default)]
struct Node {
    parent: NodeId,
    /// The name in the parent directory (shared with the parent's map key);
    /// `None` for the root and for free nodes.
    name: Option<Rc<OsStr>>,
    alive: bool,
    /// Created by this layer, or an ancestor of something it created.
    touched: bool,
    /// Opened as a directory (not through a symlink) by its name.
    dir: bool,
    children: HashMap<Rc<OsStr>, NodeId>,
}

pub(super) struct Tree {
    nodes: Vec<Node>,
    free: Vec<NodeId>,
    /// Metadata of directory entries, applied by the unpacker at the end.
    meta: HashMap<NodeId, Meta>,
}

impl Tree {
    pub(super) fn new() -> Self {
        Tree {
            nodes: vec![Node {
                alive: true,
                dir: true,
                ..Node::default()
            }],
            free: Vec::new(),
            meta: HashMap::new(),
        }
    }

    fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    fn node_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.nodes.get_mut(id)
    }

    pub(super) fn child(&self, parent: NodeId, name: &OsStr) -> Option<NodeId> {
        self.node(parent)?.children.get(name).copied()
    }

    /// The node for `name` in `parent`, created (untouched) if new.
    pub(super) fn child_or_insert(&mut self, parent: NodeId, name: &OsStr) -> NodeId {
        if let Some(id) = self.child(parent, name) {
            return id;
        }
        let name: Rc<OsStr> = Rc::from(name);
        let node = Node {
            parent,
            name: Some(Rc::clone(&name)),
            alive: true,
            ..Node::default()
        };
        let id = match self.free.pop() {
            Some(id) => {
                if let Some(slot) = self.node_mut(id) {
                    *slot = node;
                }
                id
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        if let Some(p) = self.node_mut(parent) {
            p.children.insert(name, id);
        }
        id
    }

    /// Forget `name` in `parent` and everything below it (it was removed).
    pub(super) fn remove(&mut self, parent: NodeId, name: &OsStr) {
        let Some(first) = self.node_mut(parent).and_then(|p| p.children.remove(name)) else {
            return;
        };
        let mut stack = vec![first];
        while let Some(id) = stack.pop() {
            self.meta.remove(&id);
            if let Some(n) = self.node_mut(id) {
                stack.extend(std::mem::take(&mut n.children).into_values());
                *n = Node::default();
                self.free.push(id);
            }
        }
    }

    pub(super) fn mark_dir(&mut self, id: NodeId) {
        if let Some(n) = self.node_mut(id) {
            n.dir = true;
        }
    }

    pub(super) fn is_dir(&self, id: NodeId) -> bool {
        self.node(id).is_some_and(|n| n.dir)
    }

    pub(super) fn is_alive(&self, id: NodeId) -> bool {
        self.node(id).is_some_and(|n| n.alive)
    }

    pub(super) fn parent(&self, id: NodeId) -> NodeId {
        self.node(id).map_or(ROOT, |n| n.parent)
    }

    /// Mark `id` and its ancestors as created by this layer.
    pub(super) fn touch(&mut self, mut id: NodeId) {
        while let Some(n) = self.node_mut(id) {
            if n.touched {
                break;
            }
            n.touched = true;
            if id == ROOT {
                break;
            }
            id = n.parent;
        }
    }

    pub(super) fn is_touched(&self, id: NodeId) -> bool {
        self.node(id).is_some_and(|n| n.touched)
    }

    /// Record a directory entry's metadata (a later entry for the same
    /// directory replaces it).
    pub(super) fn set_meta(&mut self, id: NodeId, meta: Meta) {
        self.meta.insert(id, meta);
    }

    pub(super) fn meta(&self, id: NodeId) -> Option<Meta> {
        self.meta.get(&id).copied()
    }

    /// The nodes that have metadata or a descendant with metadata, for a
    /// walk that visits only those.
    pub(super) fn with_meta_below(&self) -> Vec<bool> {
        let mut marked = vec![false; self.nodes.len()];
        for &id in self.meta.keys() {
            let mut id = id;
            while let Some(m) = marked.get_mut(id) {
                if *m {
                    break;
                }
                *m = true;
                if id == ROOT {
                    break;
                }
                id = self.parent(id);
            }
        }
        marked
    }

    /// Children of `id` that are `marked`.
    pub(super) fn marked_children(&self, id: NodeId, marked: &[bool]) -> Vec<(Rc<OsStr>, NodeId)> {
        self.node(id).map_or_else(Vec::new, |n| {
            n.children
                .iter()
                .filter(|(_, &c)| marked.get(c).copied().unwrap_or(false))
                .map(|(name, &c)| (Rc::clone(name), c))
                .collect()
        })
    }

    /// The root-relative path of `id`, for messages.
    pub(super) fn path(&self, mut id: NodeId) -> PathBuf {
        let mut names = Vec::new();
        while let Some(n) = self.node(id) {
            let Some(name) = &n.name else { break };
            names.push(OsStr::from_bytes(name.as_bytes()));
            id = n.parent;
        }
        names.iter().rev().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn touch_remove_and_reuse() {
        let mut t = Tree::new();
        let a = t.child_or_insert(ROOT, os("a"));
        let b = t.child_or_insert(a, os("b"));
        let c = t.child_or_insert(b, os("c"));
        assert_eq!(t.child_or_insert(a, os("b")), b);
        assert_eq!(t.path(c), PathBuf::from("a/b/c"));
        t.touch(c);
        assert!(t.is_touched(a) && t.is_touched(b) && t.is_touched(c));
        let other = t.child_or_insert(ROOT, os("other"));
        assert!(!t.is_touched(other));
        t.set_meta(
            b,
            Meta {
                mode: 0o700,
                uid: 1,
                gid: 2,
                mtime: 3,
            },
        );
        let marked = t.with_meta_below();
        assert!(marked[ROOT] && marked[a] && marked[b]);
        assert!(!marked[c] && !marked[other]);
        assert_eq!(t.marked_children(ROOT, &marked).len(), 1);

        t.remove(ROOT, os("a"));
        assert!(!t.is_alive(a) && !t.is_alive(b) && !t.is_alive(c));
        assert_eq!(t.child(ROOT, os("a")), None);
        assert_eq!(
            t.meta(b),
            None,
            "metadata of a removed directory is dropped"
        );
        // Freed nodes are reused, fresh.
        let again = t.child_or_insert(ROOT, os("a"));
        assert!([a, b, c].contains(&again));
        assert!(t.is_alive(again) && !t.is_touched(again) && t.meta(again).is_none());
        assert_eq!(t.path(again), PathBuf::from("a"));
    }
}
