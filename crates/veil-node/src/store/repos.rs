//! Repositories of the local image store: which blobs and manifests were pushed to which
//! repository (`repos/<repository>/_blobs/<hex>`, `repos/<repository>/_manifests/<hex>`), and
//! the listing of a repository's tags. A blob is served under a repository's name only if it
//! is linked there; links are written only after the blob was verified and published.
//! (`_` cannot start a repository path component, so link directories never collide with
//! nested repositories.)

use super::{check_name, check_repository, io, BlobStore};
use crate::NodeError;
use veil_image::manifest::{self, Manifest};
use veil_image::Digest;

/// What a repository holds a digest as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// A blob (config, layer, signature payload).
    Blob,
    /// A manifest or index.
    Manifest,
}

impl Member {
    fn dir(self) -> &'static str {
        match self {
            Member::Blob => "_blobs",
            Member::Manifest => "_manifests",
        }
    }
}

impl BlobStore {
    fn link_path(&self, repository: &str, member: Member, d: &Digest) -> std::path::PathBuf {
        self.root
            .join("repos")
            .join(repository)
            .join(member.dir())
            .join(d.hex())
    }

    /// Record that `repository` holds `d` (already verified and present in the store).
    pub fn link(&self, repository: &str, member: Member, d: &Digest) -> Result<(), NodeError> {
        check_repository(repository)?;
        let p = self.link_path(repository, member, d);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        std::fs::write(&p, b"").map_err(|e| io(&p, e))
    }

    /// Whether `repository` of the local store holds `d` as `member` (and the bytes are
    /// present). Upstream-cached blobs are never members of any repository.
    pub fn is_member(&self, repository: &str, member: Member, d: &Digest) -> bool {
        check_repository(repository).is_ok()
            && self.link_path(repository, member, d).is_file()
            && self.contains(d)
    }

    /// Let `repository` hold blob `d` that repository `from` holds (a cross-repository mount).
    /// Returns false, linking nothing, if `from` does not hold it.
    pub fn mount(&self, repository: &str, from: &str, d: &Digest) -> Result<bool, NodeError> {
        check_repository(repository)?;
        if !self.is_member(from, Member::Blob, d) {
            return Ok(false);
        }
        let _publishing = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        self.link(repository, Member::Blob, d)?;
        Ok(true)
    }

    /// The tags of `repository`, sorted; `None` if the repository has none (unknown).
    pub fn tags(&self, repository: &str) -> Result<Option<Vec<String>>, NodeError> {
        check_repository(repository)?;
        let dir = self.root.join("tags").join(repository);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&dir, e)),
        };
        let mut tags = Vec::new();
        for e in rd {
            let e = e.map_err(|e| io(&dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // Files only (directories are nested repositories), valid tag names only (temporary
            // files start with a dot).
            if e.file_type().map(|t| t.is_file()).unwrap_or(false)
                && check_name(repository, &name).is_ok()
            {
                tags.push(name);
            }
        }
        if tags.is_empty() {
            return Ok(None);
        }
        tags.sort();
        Ok(Some(tags))
    }

    /// Stores from before repositories were recorded have only tags: link every tagged
    /// manifest and what it names (if present) into its repository, once. Built in a
    /// temporary directory and renamed into place, so a crash leaves no half-migrated store.
    pub(super) fn migrate_repositories(&self) -> Result<(), NodeError> {
        let repos = self.root.join("repos");
        if repos.is_dir() {
            return Ok(());
        }
        let building = self.root.join("repos.migrating");
        let _ = std::fs::remove_dir_all(&building);
        std::fs::create_dir_all(&building).map_err(|e| io(&building, e))?;
        let mut tagged = Vec::new();
        collect_tags(&self.root.join("tags"), "", &mut tagged);
        let mut linked = 0usize;
        for (repository, tag) in tagged {
            let Ok(Some(top)) = self.get_tag(&repository, &tag) else {
                continue;
            };
            let mut manifests = vec![top];
            while let Some(md) = manifests.pop() {
                let Ok(bytes) = self.read(&md) else {
                    continue;
                };
                let link = |member: Member, d: &Digest| -> Result<(), NodeError> {
                    let p = building.join(&repository).join(member.dir()).join(d.hex());
                    if let Some(dir) = p.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                    }
                    std::fs::write(&p, b"").map_err(|e| io(&p, e))?;
                    let local = self.root.join("local").join(d.hex());
                    std::fs::write(&local, b"").map_err(|e| io(&local, e))
                };
                link(Member::Manifest, &md)?;
                linked += 1;
                match manifest::parse_manifest(&bytes, None) {
                    Ok(Manifest::Image(m)) => {
                        for d in std::iter::once(&m.config.digest)
                            .chain(m.layers.iter().map(|l| &l.digest))
                        {
                            if self.contains(d) {
                                link(Member::Blob, d)?;
                            }
                        }
                    }
                    Ok(Manifest::Index(entries)) => {
                        manifests.extend(entries.into_iter().map(|e| e.digest));
                    }
                    Err(_) => {}
                }
            }
        }
        std::fs::rename(&building, &repos).map_err(|e| io(&repos, e))?;
        if linked > 0 {
            tracing::info!(
                manifests = linked,
                "recorded the repositories of an older local store"
            );
        }
        Ok(())
    }
}

/// Every `(repository, tag)` under the tags directory `dir` (repositories may be nested).
fn collect_tags(dir: &std::path::Path, prefix: &str, out: &mut Vec<(String, String)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            let repo = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            collect_tags(&e.path(), &repo, out);
        } else if !prefix.is_empty() && check_name(prefix, &name).is_ok() {
            out.push((prefix.to_string(), name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_manifest(config: &Digest, layer: &Digest) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{config}","size":2}},"layers":[{{"mediaType":"{}","digest":"{layer}","size":5}}]}}"#,
            manifest::OCI_MANIFEST,
            manifest::OCI_CONFIG,
            manifest::OCI_LAYER_TAR
        )
        .into_bytes()
    }

    fn upload(s: &BlobStore, repo: &str, data: &[u8]) -> Digest {
        let p = s.temp_path();
        std::fs::write(&p, data).unwrap();
        s.import_file(&p, &Digest::sha256(data), repo).unwrap()
    }

    #[test]
    fn blobs_are_members_only_of_the_repository_they_were_pushed_to() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        let d = upload(&s, "team/app", b"layer");
        assert!(s.is_member("team/app", Member::Blob, &d));
        assert!(!s.is_member("other", Member::Blob, &d));
        assert!(!s.is_member("team/app", Member::Manifest, &d));
        // A blob cached from upstream belongs to no repository.
        let cached = s.put(b"upstream", None).unwrap();
        s.mark_cached(&cached);
        assert!(!s.is_member("team/app", Member::Blob, &cached));
        assert!(!s.mount("thief", "team/app", &cached).unwrap());
        assert!(!s.is_member("thief", Member::Blob, &cached));
        // Mounting from a repository that holds it works.
        assert!(s.mount("friend", "team/app", &d).unwrap());
        assert!(s.is_member("friend", Member::Blob, &d));
        // Hostile names never become paths.
        assert!(!s.is_member("../blobs", Member::Blob, &d));
        assert!(s.link("../x", Member::Blob, &d).is_err());
    }

    #[test]
    fn a_failed_import_links_nothing() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        let p = s.temp_path();
        std::fs::write(&p, b"tampered").unwrap();
        let claimed = Digest::sha256(b"layer");
        assert!(s.import_file(&p, &claimed, "app").is_err());
        assert!(!s.is_member("app", Member::Blob, &claimed));
        assert!(!p.exists());
    }

    #[test]
    fn tag_listing_is_sorted_and_skips_nested_repositories() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        assert_eq!(s.tags("app").unwrap(), None);
        let d = Digest::sha256(b"m");
        for tag in ["v2", "latest", "v10", "v1"] {
            s.set_tag("app", tag, &d).unwrap();
        }
        s.set_tag("app/nested", "x", &d).unwrap();
        assert_eq!(
            s.tags("app").unwrap().unwrap(),
            vec!["latest", "v1", "v10", "v2"]
        );
        assert_eq!(s.tags("app/nested").unwrap().unwrap(), vec!["x"]);
        assert!(s.tags("../app").is_err());
    }

    #[test]
    fn an_older_store_gets_its_repositories_from_its_tags() {
        let t = tempfile::tempdir().unwrap();
        let (config, layer, md) = {
            let s = BlobStore::open(t.path()).unwrap();
            let config = s.put(b"{}", None).unwrap();
            let layer = s.put(b"layer", None).unwrap();
            let md = s.put(&image_manifest(&config, &layer), None).unwrap();
            s.set_tag("team/app", "v1", &md).unwrap();
            (config, layer, md)
        };
        // Simulate a store written before repositories were recorded.
        std::fs::remove_dir_all(t.path().join("repos")).unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        assert!(s.is_member("team/app", Member::Manifest, &md));
        assert!(s.is_member("team/app", Member::Blob, &config));
        assert!(s.is_member("team/app", Member::Blob, &layer));
        assert!(!s.is_member("other", Member::Blob, &layer));
        assert!(!t.path().join("repos.migrating").exists());
    }
}
