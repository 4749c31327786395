//! Where upstream blobs came from: `sources/<digest hex>/<source key>`, one empty link file
//! per upstream repository (registry host and repository) the blob was downloaded from and
//! verified against its digest. The cache counts a blob as present for an image only if it
//! came from that image's source: the shared blob directory holds the blobs of every tenant,
//! and a digest an image names proves nothing about whether its registry has those bytes.
//!
//! A link is written only after the blob was verified and published, so a crash leaves at
//! most a verified blob without a link (fetched again when next asked for). A link without
//! its blob (evicted, or a crash between eviction's two steps) counts for nothing; if the
//! same bytes come back later from another source, the stale link still only says what was
//! true: that source served bytes with this digest.

use super::{io, BlobStore};
use crate::NodeError;
use sha2::{Digest as _, Sha256};
use veil_image::Digest;

/// An upstream repository blobs are fetched from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    /// Registry host (`host[:port]`).
    pub registry: String,
    /// Repository within the registry.
    pub repository: String,
}

impl Source {
    /// The link file's name: a hash, so registry and repository names never become paths.
    /// (A registry host holds no `\n`, so the pair is encoded unambiguously.)
    fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.registry.as_bytes());
        h.update(b"\n");
        h.update(self.repository.as_bytes());
        hex::encode(h.finalize())
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)
    }
}

impl BlobStore {
    fn sources_dir(&self, d: &Digest) -> std::path::PathBuf {
        self.root.join("sources").join(d.hex())
    }

    /// Record that blob `d` (already verified and published) was downloaded from `source`.
    pub fn record_source(&self, source: &Source, d: &Digest) -> Result<(), NodeError> {
        let dir = self.sources_dir(d);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let p = dir.join(source.key());
        std::fs::write(&p, b"").map_err(|e| io(&p, e))
    }

    /// Whether blob `d` is present and was downloaded from `source`.
    pub fn has_source(&self, source: &Source, d: &Digest) -> bool {
        self.sources_dir(d).join(source.key()).is_file() && self.contains(d)
    }

    /// Forget every source of blob `d` (it was evicted).
    pub(super) fn forget_sources(&self, d: &Digest) {
        let dir = self.sources_dir(d);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove a blob's source links");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(registry: &str, repository: &str) -> Source {
        Source {
            registry: registry.into(),
            repository: repository.into(),
        }
    }

    #[test]
    fn a_blob_has_only_the_sources_it_was_fetched_from() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        let bob = source("reg.example:5000", "bob/private");
        let d = s.put(b"bob's layer", None).unwrap();
        s.mark_cached(&d);
        s.record_source(&bob, &d).unwrap();
        assert!(s.has_source(&bob, &d));
        for other in [
            source("reg.example:5000", "alice/app"),
            source("127.0.0.1:4000", "bob/private"),
            source("reg.example:5000\nbob", "private"),
        ] {
            assert!(!s.has_source(&other, &d), "{other}");
        }
        // Evicted: the bytes and their provenance go together.
        assert_eq!(s.evict(0, |_| false), vec![d.clone()]);
        assert!(!s.has_source(&bob, &d));
        assert!(!t.path().join("sources").join(d.hex()).exists());
        // A link without its blob counts for nothing.
        s.record_source(&bob, &d).unwrap();
        assert!(!s.has_source(&bob, &d));
    }
}
