//! OCI image layout directories (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), readable by skopeo as `oci:<dir>:<tag>`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::build::BuiltImage;
use crate::manifest::{
    index_json, parse_manifest, Descriptor, Manifest, ANNOTATION_REF_NAME, OCI_INDEX,
};
use crate::{Digest, Error};

const LAYOUT_FILE: &str = "oci-layout";
const INDEX_FILE: &str = "index.json";
const LAYOUT_JSON: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// An OCI image layout directory.
#[derive(Clone, Debug)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Create a layout at `dir` (creating the directory if needed), or open
    /// the existing one there.
    pub fn create(dir: &Path) -> Result<Self, Error> {
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs)
            .map_err(|e| Error::io(&blobs, "creating the blob directory", e))?;
        let layout = OciLayout {
            dir: dir.to_path_buf(),
        };
        if !dir.join(LAYOUT_FILE).exists() {
            write_atomic(&dir.join(LAYOUT_FILE), LAYOUT_JSON)?;
        }
        if !dir.join(INDEX_FILE).exists() {
            write_atomic(&dir.join(INDEX_FILE), &index_json(&[]))?;
        }
        layout.read_index()?;
        Ok(layout)
    }

    /// Open an existing layout at `dir`, checking `oci-layout` and `index.json`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(LAYOUT_FILE);
        let bytes =
            fs::read(&path).map_err(|e| Error::io(&path, "reading the oci-layout file", e))?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::InvalidLayout {
                dir: dir.display().to_string(),
                reason: format!("the oci-layout file is not valid JSON: {e}"),
            })?;
        if v.get("imageLayoutVersion")
            .and_then(|v| v.as_str())
            .is_none()
        {
            return Err(Error::InvalidLayout {
                dir: dir.display().to_string(),
                reason: "the oci-layout file has no imageLayoutVersion".into(),
            });
        }
        let layout = OciLayout {
            dir: dir.to_path_buf(),
        };
        layout.read_index()?;
        Ok(layout)
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path where the blob `d` is (or would be) stored.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(d.hex())
    }

    /// Store `data` as a blob (verifying it hashes to `digest`).
    pub fn write_blob(&self, digest: &Digest, data: &[u8]) -> Result<(), Error> {
        let actual = Digest::sha256(data);
        if &actual != digest {
            return Err(Error::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let path = self.blob_path(digest);
        if fs::metadata(&path).is_ok_and(|m| m.len() == data.len() as u64) {
            return Ok(());
        }
        write_atomic(&path, data)
    }

    /// Write all blobs of `image` and point `tag` at its manifest (replacing
    /// any previous image with that tag).
    pub fn write_image(&self, image: &BuiltImage, tag: &str) -> Result<(), Error> {
        crate::reference::validate_tag(tag).map_err(|reason| Error::InvalidLayout {
            dir: self.dir.display().to_string(),
            reason: format!("cannot use tag {tag:?}: {reason}"),
        })?;
        for blob in image.layers.iter().chain([&image.config, &image.manifest]) {
            self.write_blob(&blob.digest, &blob.data)?;
        }
        let mut entries = self.read_index()?;
        entries.retain(|d| d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) != Some(tag));
        let mut desc = image.manifest.descriptor();
        desc.annotations
            .insert(ANNOTATION_REF_NAME.to_string(), tag.to_string());
        entries.push(desc);
        write_atomic(&self.dir.join(INDEX_FILE), &index_json(&entries))?;
        tracing::debug!(dir = %self.dir.display(), tag, manifest = %image.manifest.digest, "wrote image to OCI layout");
        Ok(())
    }

    /// The manifest descriptor tagged `tag`.
    pub fn resolve(&self, tag: &str) -> Result<Descriptor, Error> {
        self.read_index()?
            .into_iter()
            .rev()
            .find(|d| d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(tag))
            .ok_or_else(|| Error::TagNotFound {
                tag: tag.to_string(),
                dir: self.dir.display().to_string(),
            })
    }

    /// The tags present in the index.
    pub fn tags(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .read_index()?
            .into_iter()
            .filter_map(|d| d.annotations.get(ANNOTATION_REF_NAME).cloned())
            .collect())
    }

    /// Read the blob `d`, verifying its digest.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, Error> {
        let path = self.blob_path(d);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::BlobNotFound {
                    digest: d.clone(),
                    path: path.display().to_string(),
                })
            }
            Err(e) => return Err(Error::io(&path, "reading a blob", e)),
        };
        let actual = Digest::sha256(&data);
        if &actual != d {
            return Err(Error::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        Ok(data)
    }

    fn read_index(&self) -> Result<Vec<Descriptor>, Error> {
        let path = self.dir.join(INDEX_FILE);
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, "reading index.json", e))?;
        let invalid = |reason: String| Error::InvalidLayout {
            dir: self.dir.display().to_string(),
            reason,
        };
        match parse_manifest(&bytes, Some(OCI_INDEX)) {
            Ok(Manifest::Index(entries)) => Ok(entries),
            Ok(Manifest::Image(_)) => Err(invalid(
                "index.json holds an image manifest, not an index".into(),
            )),
            Err(e) => Err(invalid(format!("index.json is invalid: {e}"))),
        }
    }
}

/// Write `data` to `path` via a temporary file and rename.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let res = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, "writing a file", e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::build_image;
    use crate::build::tests::{sample_context, spec};
    use crate::manifest::{parse_config, Manifest, OCI_MANIFEST};
    use crate::unpack::{unpack_layer, UnpackOptions};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_build_write_resolve_unpack() {
        let ctx = sample_context();
        let img = build_image(&spec(ctx.path())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let layout_dir = dir.path().join("oci");
        let layout = OciLayout::create(&layout_dir).unwrap();
        layout.write_image(&img, "v1").unwrap();
        // Writing again (same tag) replaces, does not duplicate.
        layout.write_image(&img, "v1").unwrap();
        layout.write_image(&img, "other").unwrap();

        let layout = OciLayout::open(&layout_dir).unwrap();
        let mut tags = layout.tags().unwrap();
        tags.sort();
        assert_eq!(tags, ["other", "v1"]);
        let desc = layout.resolve("v1").unwrap();
        assert_eq!(desc.media_type, OCI_MANIFEST);
        assert_eq!(desc.digest, img.manifest.digest);
        assert_eq!(desc.size, img.manifest.data.len() as u64);

        let Manifest::Image(m) =
            parse_manifest(&layout.read_blob(&desc.digest).unwrap(), None).unwrap()
        else {
            panic!("expected image manifest");
        };
        let run = parse_config(&layout.read_blob(&m.config.digest).unwrap()).unwrap();
        assert_eq!(run.argv().unwrap(), vec!["/bin/run", "--flag"]);

        let root = dir.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        for l in &m.layers {
            let blob = layout.read_blob(&l.digest).unwrap();
            unpack_layer(
                &blob[..],
                l.compression().unwrap(),
                &root,
                &UnpackOptions::default(),
            )
            .unwrap();
        }
        for f in ["bin/run", "app/data/a.txt", "app/data/z.txt", "app/empty"] {
            assert_eq!(
                fs::read(root.join(f)).unwrap(),
                fs::read(ctx.path().join(f)).unwrap(),
                "{f}"
            );
            let want = fs::metadata(ctx.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            let got = fs::metadata(root.join(f)).unwrap().permissions().mode();
            assert_eq!(got & 0o7777, want & 0o7777, "{f}");
        }
        for l in ["app/link", "app/abs"] {
            assert_eq!(
                fs::read_link(root.join(l)).unwrap(),
                fs::read_link(ctx.path().join(l)).unwrap()
            );
        }
    }

    #[test]
    fn errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(OciLayout::open(dir.path()).is_err());
        let layout = OciLayout::create(dir.path()).unwrap();
        let e = layout.resolve("nope").unwrap_err();
        assert!(matches!(e, Error::TagNotFound { .. }), "{e}");
        let d = Digest::sha256(b"blob");
        let e = layout.read_blob(&d).unwrap_err();
        assert!(matches!(e, Error::BlobNotFound { .. }), "{e}");
        layout.write_blob(&d, b"blob").unwrap();
        assert_eq!(layout.read_blob(&d).unwrap(), b"blob");
        let e = layout.write_blob(&d, b"other").unwrap_err();
        assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
        // Corrupted on disk.
        fs::write(layout.blob_path(&d), b"tampered").unwrap();
        let e = layout.read_blob(&d).unwrap_err();
        assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
        fs::write(dir.path().join(INDEX_FILE), b"{bad").unwrap();
        let e = OciLayout::open(dir.path()).unwrap_err();
        assert!(matches!(e, Error::InvalidLayout { .. }), "{e}");
    }

    /// Run skopeo (from PATH) and return its stdout. Fails, not skips,
    /// without skopeo, like the rest of the suite: scripts/install-deps.sh
    /// installs it and CI has it.
    fn skopeo(args: &[&str]) -> Vec<u8> {
        let out = match std::process::Command::new("skopeo").args(args).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "this test needs skopeo on PATH and it is not installed: run \
                 scripts/install-deps.sh (or apt-get install skopeo)"
            ),
            Err(e) => panic!("running skopeo: {e}"),
        };
        assert!(
            out.status.success(),
            "skopeo {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn skopeo_can_read_layout() {
        let ctx = sample_context();
        let img = build_image(&spec(ctx.path())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        layout.write_image(&img, "v1").unwrap();
        let reference = format!("oci:{}:v1", dir.path().display());
        let raw = skopeo(&["inspect", "--raw", &reference]);
        assert_eq!(raw, img.manifest.data);
        // Full inspect parses the config too.
        let out = skopeo(&["inspect", &reference]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["Architecture"], "amd64");
        assert_eq!(v["Os"], "linux");
    }
}
