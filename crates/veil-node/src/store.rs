//! The node's content-addressed blob store: blobs by digest, plus the local image store's
//! repositories and tags.
//!
//! Layout under the store directory: `blobs/sha256/<hex>` (complete, verified blobs only, of
//! both the local store and the upstream cache), `tmp/` (downloads and uploads in progress;
//! renamed into place only after the digest checks out), `cached/<hex>` (marks blobs that came
//! from an upstream registry: evictable, and never part of a local repository), `local/<hex>`
//! (marks blobs some local repository holds: never evicted), `repos/<repository>/_blobs/<hex>`
//! and `repos/<repository>/_manifests/<hex>` (which blobs and manifests were pushed to a
//! repository of the local store: only those are served under its name),
//! `sources/<hex>/<source key>` (which upstream repositories a blob or manifest was downloaded
//! from: only those images count it as present, see [`sources`]) and
//! `tags/<repository>/<tag>` (the local store's tags, each file holding a manifest digest).
//! A crash mid-write leaves at most a stray file in `tmp/`, which is cleared on open, or a
//! verified blob that no repository links yet (invisible; a later push links it).

use crate::NodeError;
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use veil_image::Digest;

mod repos;
mod sources;

pub use repos::Member;
pub use sources::Source;

/// Content-addressed blob storage on local disk.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    /// Held while eviction removes blobs and while a local push publishes one, so a blob a
    /// repository is about to link is never evicted under it.
    publish: Mutex<()>,
    /// Bytes of the blobs (and manifests) the local store holds, each counted once however
    /// many repositories link it. They are never evicted; this is what bounds them.
    local_bytes: AtomicU64,
}

fn io(path: &Path, e: std::io::Error) -> NodeError {
    NodeError::Storage(format!("{}: {e}", path.display()))
}

impl BlobStore {
    /// Open (creating if needed) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<Self, NodeError> {
        for d in ["blobs/sha256", "tags", "cached", "local", "sources"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| io(&root.join(d), e))?;
        }
        let tmp = root.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let store = Self {
            root: root.to_path_buf(),
            publish: Mutex::new(()),
            local_bytes: AtomicU64::new(0),
        };
        store.migrate_repositories()?;
        store.count_local_bytes();
        Ok(store)
    }

    /// Where the blob `d` lives (whether or not it is present).
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Whether the blob is present.
    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Read a whole (small) blob.
    pub fn read(&self, d: &Digest) -> Result<Vec<u8>, NodeError> {
        let p = self.path(d);
        std::fs::read(&p).map_err(|e| io(&p, e))
    }

    /// Store `data`; if `expected` is given, refuse data that does not hash to it.
    pub fn put(&self, data: &[u8], expected: Option<&Digest>) -> Result<Digest, NodeError> {
        let mut w = self.writer()?;
        w.write(data)?;
        w.commit(expected)
    }

    /// Begin a streaming write.
    pub fn writer(&self) -> Result<BlobWriter<'_>, NodeError> {
        let name = format!("{:016x}", rand::random::<u64>());
        let path = self.root.join("tmp").join(name);
        let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        Ok(BlobWriter {
            store: self,
            file: Some(file),
            path,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Record that blob `d` came from an upstream registry and may be evicted (it can be
    /// fetched again), and mark it as just used.
    pub fn mark_cached(&self, d: &Digest) {
        if self.is_local(d) {
            return;
        }
        let _ = std::fs::write(self.root.join("cached").join(d.hex()), b"");
    }

    /// Whether some local repository holds blob `d` (it is then never evicted).
    fn is_local(&self, d: &Digest) -> bool {
        self.root.join("local").join(d.hex()).exists()
    }

    /// Bytes of the blobs and manifests the local store holds (each counted once, however
    /// many repositories link it; uploads in progress not included).
    pub fn local_bytes(&self) -> u64 {
        self.local_bytes.load(Ordering::SeqCst)
    }

    /// Sum the sizes of the local store's blobs (at open).
    fn count_local_bytes(&self) {
        let dir = self.root.join("local");
        let total = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let d = format!("sha256:{name}").parse::<Digest>().ok()?;
                        std::fs::metadata(self.path(&d)).ok().map(|m| m.len())
                    })
                    .sum()
            })
            .unwrap_or(0);
        self.local_bytes.store(total, Ordering::SeqCst);
    }

    /// Mark an evictable blob as just used (no-op for blobs that are not evictable).
    pub fn touch(&self, d: &Digest) {
        let marker = self.root.join("cached").join(d.hex());
        if marker.exists() {
            let _ = std::fs::write(marker, b"");
        }
    }

    /// Evict least recently used upstream blobs until those total at most `limit` bytes,
    /// skipping any for which `in_use` is true. Blobs of the local store, manifests and tags are
    /// never evicted. Returns the evicted digests.
    pub fn evict(&self, limit: u64, in_use: impl Fn(&Digest) -> bool) -> Vec<Digest> {
        let dir = self.root.join("cached");
        let mut entries: Vec<(std::time::SystemTime, Digest, u64)> = Vec::new();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(d) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            let used = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            match std::fs::metadata(self.path(&d)) {
                Ok(m) => entries.push((used, d, m.len())),
                Err(_) => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _publishing = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        // A blob a local repository also holds is not the cache's to evict.
        entries.retain(|(_, d, _)| {
            let local = self.is_local(d);
            if local {
                let _ = std::fs::remove_file(dir.join(d.hex()));
            }
            !local
        });
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        entries.sort_by_key(|e| e.0);
        let mut evicted = Vec::new();
        for (_, d, size) in entries {
            if total <= limit {
                break;
            }
            if in_use(&d) {
                continue;
            }
            if std::fs::remove_file(self.path(&d)).is_ok() {
                let _ = std::fs::remove_file(dir.join(d.hex()));
                self.forget_sources(&d);
                total = total.saturating_sub(size);
                evicted.push(d);
            }
        }
        evicted
    }

    /// A fresh path under the store's temporary directory (for uploads in progress).
    pub fn temp_path(&self) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("up-{:016x}", rand::random::<u64>()))
    }

    /// Publish a complete upload written at `path` (under [`BlobStore::temp_path`]) as a blob
    /// of the local repository `repository` if it hashes to `expected`: verified and synced
    /// first, then renamed into place, then linked into the repository. The file is removed
    /// either way.
    pub fn import_file(
        &self,
        path: &Path,
        expected: &Digest,
        repository: &str,
    ) -> Result<Digest, NodeError> {
        let res = (|| {
            check_repository(repository)?;
            let mut f = std::fs::File::open(path).map_err(|e| io(path, e))?;
            let mut h = Sha256::new();
            std::io::copy(&mut f, &mut h).map_err(|e| io(path, e))?;
            let actual = format!("sha256:{}", hex::encode(h.finalize()));
            if actual != expected.as_str() {
                return Err(NodeError::DigestMismatch {
                    expected: expected.to_string(),
                    actual,
                });
            }
            f.sync_all().map_err(|e| io(path, e))?;
            let size = f.metadata().map_err(|e| io(path, e))?.len();
            let _publishing = self.publish.lock().unwrap_or_else(|p| p.into_inner());
            let had = self.is_local_blob(expected);
            self.mark_local(expected)?;
            let dest = self.path(expected);
            std::fs::rename(path, &dest).map_err(|e| io(&dest, e))?;
            if !had {
                self.local_bytes.fetch_add(size, Ordering::SeqCst);
            }
            self.link(repository, Member::Blob, expected)?;
            Ok(expected.clone())
        })();
        let _ = std::fs::remove_file(path);
        res
    }

    /// Store manifest `bytes` in the local repository `repository` (refusing bytes that do not
    /// hash to `expected`, if given) and link it there. The caller has checked that everything
    /// the manifest names is in the repository.
    pub fn put_manifest(
        &self,
        repository: &str,
        bytes: &[u8],
        expected: Option<&Digest>,
    ) -> Result<Digest, NodeError> {
        check_repository(repository)?;
        let mut w = self.writer()?;
        w.write(bytes)?;
        let _publishing = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let had = self.is_local_blob(&Digest::sha256(bytes));
        let d = w.commit(expected)?;
        self.mark_local(&d)?;
        if !had {
            self.local_bytes
                .fetch_add(bytes.len() as u64, Ordering::SeqCst);
        }
        self.link(repository, Member::Manifest, &d)?;
        Ok(d)
    }

    /// Whether `d` is a local-store blob present in the store (counted in
    /// [`BlobStore::local_bytes`]; a publish that finds it so adds nothing).
    fn is_local_blob(&self, d: &Digest) -> bool {
        self.is_local(d) && self.contains(d)
    }

    /// Mark blob `d` as held by the local store: never evicted, no longer an upstream blob.
    fn mark_local(&self, d: &Digest) -> Result<(), NodeError> {
        let p = self.root.join("local").join(d.hex());
        std::fs::write(&p, b"").map_err(|e| io(&p, e))?;
        let _ = std::fs::remove_file(self.root.join("cached").join(d.hex()));
        Ok(())
    }

    /// Point `repository:tag` of the local store at a manifest digest.
    pub fn set_tag(&self, repository: &str, tag: &str, d: &Digest) -> Result<(), NodeError> {
        check_name(repository, tag)?;
        let dir = self.root.join("tags").join(repository);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let tmp = dir.join(format!(".{tag}.{:016x}.tmp", rand::random::<u64>()));
        std::fs::write(&tmp, d.as_str()).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, dir.join(tag)).map_err(|e| io(&dir, e))
    }

    /// The manifest digest `repository:tag` points at in the local store.
    pub fn get_tag(&self, repository: &str, tag: &str) -> Result<Option<Digest>, NodeError> {
        check_name(repository, tag)?;
        let p = self.root.join("tags").join(repository).join(tag);
        match std::fs::read_to_string(&p) {
            Ok(s) => {
                s.trim().parse().map(Some).map_err(|e| {
                    NodeError::Storage(format!("{}: corrupt tag file: {e}", p.display()))
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p, e)),
        }
    }
}

/// A repository must be what an image reference allows (it becomes a path).
fn check_repository(repository: &str) -> Result<(), NodeError> {
    format!("local/{repository}:latest")
        .parse::<veil_image::Reference>()
        .map(|_| ())
        .map_err(|e| NodeError::BadReference(format!("{repository}: {e}")))
}

/// Repository and tag must be what an image reference allows (lowercase path components, no
/// `..`, no leading `/`; a tag of `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`): they become paths.
fn check_name(repository: &str, tag: &str) -> Result<(), NodeError> {
    format!("local/{repository}:{tag}")
        .parse::<veil_image::Reference>()
        .map(|_| ())
        .map_err(|e| NodeError::BadReference(format!("{repository}:{tag}: {e}")))
}

/// A blob being written; it becomes visible only through [`BlobWriter::commit`].
pub struct BlobWriter<'a> {
    store: &'a BlobStore,
    file: Option<std::fs::File>,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter<'_> {
    /// Append bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<(), NodeError> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        match self.file.as_mut() {
            Some(f) => f.write_all(data).map_err(|e| io(&self.path, e)),
            None => Err(NodeError::Storage("write after commit".into())),
        }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Verify and publish the blob. On a digest mismatch nothing is published.
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<Digest, NodeError> {
        let hasher = std::mem::take(&mut self.hasher);
        let actual: Digest = format!("sha256:{}", hex::encode(hasher.finalize()))
            .parse()
            .map_err(|e| NodeError::Storage(format!("digest: {e}")))?;
        if let Some(exp) = expected {
            if exp != &actual {
                return Err(NodeError::DigestMismatch {
                    expected: exp.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        let file = self.file.take();
        if let Some(f) = file {
            f.sync_all().map_err(|e| io(&self.path, e))?;
        }
        let dest = self.store.path(&actual);
        if let Err(e) = std::fs::rename(&self.path, &dest) {
            let _ = std::fs::remove_file(&self.path);
            return Err(io(&dest, e));
        }
        Ok(actual)
    }
}

impl Drop for BlobWriter<'_> {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_mismatch() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        let d = s.put(b"hello", None).unwrap();
        assert_eq!(d, Digest::sha256(b"hello"));
        assert!(s.contains(&d));
        assert_eq!(s.read(&d).unwrap(), b"hello");
        let wrong = Digest::sha256(b"other");
        let e = s.put(b"tampered", Some(&wrong)).unwrap_err();
        assert!(matches!(e, NodeError::DigestMismatch { .. }), "{e}");
        assert!(!s.contains(&Digest::sha256(b"tampered")));
        assert_eq!(std::fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn hostile_tag_names_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        let d = Digest::sha256(b"m");
        for (repo, tag) in [
            ("x", "/etc/passwd"),
            ("x", "../../kbs/token.key"),
            ("x", ".."),
            ("../x", "v1"),
            ("/abs", "v1"),
            ("x", ""),
        ] {
            assert!(s.get_tag(repo, tag).is_err(), "{repo}:{tag}");
            assert!(s.set_tag(repo, tag, &d).is_err(), "{repo}:{tag}");
        }
    }

    #[test]
    fn eviction_is_lru_over_upstream_blobs_only() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        let local = s.put(&[1u8; 100], None).unwrap();
        let a = s.put(&[2u8; 100], None).unwrap();
        s.mark_cached(&a);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = s.put(&[3u8; 100], None).unwrap();
        s.mark_cached(&b);
        std::thread::sleep(std::time::Duration::from_millis(20));
        s.touch(&a); // a is now more recent than b
        let c = s.put(&[4u8; 100], None).unwrap();
        s.mark_cached(&c);
        // Limit 150: keep one of the three cached blobs; c is in use.
        let evicted = s.evict(150, |d| d == &c);
        assert_eq!(evicted, vec![b.clone(), a.clone()]);
        assert!(s.contains(&local) && s.contains(&c));
        assert!(!s.contains(&a) && !s.contains(&b));
        assert!(s.evict(0, |_| false) == vec![c]);
        assert!(s.contains(&local), "local-store blobs are never evicted");
    }

    #[test]
    fn local_blobs_are_never_evicted_even_if_also_fetched_from_upstream() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        // Cached from upstream first, then pushed to a local repository.
        let d = s.put(&[5u8; 100], None).unwrap();
        s.mark_cached(&d);
        let up = s.temp_path();
        std::fs::write(&up, [5u8; 100]).unwrap();
        s.import_file(&up, &d, "mine").unwrap();
        assert!(s.evict(0, |_| false).is_empty());
        assert!(s.contains(&d));
        // And the other way round: a local blob fetched again is not marked evictable.
        s.mark_cached(&d);
        assert!(s.evict(0, |_| false).is_empty());
        assert!(s.contains(&d));
    }

    /// The local store's size counts each blob and manifest it holds once: not a second
    /// push or a mount of the same bytes, not upstream blobs (until pushed), and the same
    /// after reopening.
    #[test]
    fn local_bytes_count_what_the_local_store_holds() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        let import = |repo: &str, data: &[u8]| {
            let p = s.temp_path();
            std::fs::write(&p, data).unwrap();
            s.import_file(&p, &Digest::sha256(data), repo).unwrap()
        };
        import("a", &[1u8; 100]);
        assert_eq!(s.local_bytes(), 100);
        let d = import("a", &[1u8; 100]);
        import("b", &[1u8; 100]);
        assert!(s.mount("c", "a", &d).unwrap());
        assert_eq!(s.local_bytes(), 100, "the same bytes counted twice");
        let up = s.put(&[2u8; 50], None).unwrap();
        s.mark_cached(&up);
        assert_eq!(s.local_bytes(), 100, "an upstream blob counted");
        import("a", &[2u8; 50]);
        assert_eq!(s.local_bytes(), 150);
        // A failed push adds nothing.
        let p = s.temp_path();
        std::fs::write(&p, b"tampered").unwrap();
        assert!(s.import_file(&p, &Digest::sha256(b"x"), "a").is_err());
        s.put_manifest("a", br#"{"m":1}"#, None).unwrap();
        s.put_manifest("b", br#"{"m":1}"#, None).unwrap();
        assert_eq!(s.local_bytes(), 157);
        drop(s);
        assert_eq!(BlobStore::open(t.path()).unwrap().local_bytes(), 157);
    }

    #[test]
    fn tags() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        assert_eq!(s.get_tag("hello", "v1").unwrap(), None);
        let d = Digest::sha256(b"m");
        s.set_tag("hello", "v1", &d).unwrap();
        assert_eq!(s.get_tag("hello", "v1").unwrap(), Some(d));
    }
}
