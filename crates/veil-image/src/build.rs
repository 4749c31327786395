//! Building OCI images: deterministically from a directory, or from raw
//! layer blobs.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::Serialize;

use crate::digest::Hasher;
use crate::manifest::{
    image_manifest_json, layer_compression, Compression, Descriptor, ImageManifest, RawExecConfig,
    RunConfig, OCI_CONFIG, OCI_LAYER_TAR_GZIP, OCI_MANIFEST,
};
use crate::{Digest, Error};

/// What to build: a context directory and the process configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildSpec {
    /// Directory whose contents become the image's single layer.
    pub context: PathBuf,
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.Env` (`KEY=value`).
    pub env: Vec<String>,
    /// `config.WorkingDir`.
    pub working_dir: Option<String>,
    /// `config.User`.
    pub user: Option<String>,
}

impl BuildSpec {
    /// The run configuration described by this spec.
    pub fn run_config(&self) -> RunConfig {
        RunConfig {
            entrypoint: self.entrypoint.clone(),
            cmd: self.cmd.clone(),
            env: self.env.clone(),
            working_dir: self.working_dir.clone(),
            user: self.user.clone(),
        }
    }
}

/// A blob with its media type and digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Media type of the blob.
    pub media_type: String,
    /// Digest of `data` (as stated; [`assemble_image`] does not recheck it).
    pub digest: Digest,
    /// The blob bytes.
    pub data: Vec<u8>,
}

impl Blob {
    /// A blob whose digest is computed from `data`.
    pub fn new(media_type: impl Into<String>, data: Vec<u8>) -> Self {
        Blob {
            media_type: media_type.into(),
            digest: Digest::sha256(&data),
            data,
        }
    }

    /// A descriptor for this blob.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.media_type.clone(),
            self.digest.clone(),
            self.data.len() as u64,
        )
    }
}

/// A built image: manifest, config and layer blobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltImage {
    /// The OCI image manifest blob.
    pub manifest: Blob,
    /// The OCI image config blob.
    pub config: Blob,
    /// Layer blobs, bottom first.
    pub layers: Vec<Blob>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: &'a [Digest],
}

#[derive(Serialize)]
struct ConfigOut<'a> {
    architecture: &'static str,
    os: &'static str,
    config: RawExecConfig,
    rootfs: RootFs<'a>,
}

/// Build an OCI image from `spec.context`.
///
/// The image has one `tar+gzip` layer holding the directory's contents,
/// written deterministically: entries sorted by name, mtime 0, uid/gid 0,
/// permission bits kept, symlinks kept as symlinks (hard links become
/// separate files; sockets, devices and FIFOs are skipped). The config is
/// for linux/amd64 with `created` omitted, so the same directory always
/// yields the same digests.
pub fn build_image(spec: &BuildSpec) -> Result<BuiltImage, Error> {
    let meta = fs::metadata(&spec.context)
        .map_err(|e| Error::io(&spec.context, "inspecting the build context", e))?;
    if !meta.is_dir() {
        return Err(Error::Build {
            path: spec.context.display().to_string(),
            reason: "the build context is not a directory".into(),
        });
    }
    let mut builder = tar::Builder::new(Vec::new());
    add_dir(&mut builder, &spec.context, Path::new(""))?;
    let tar = builder
        .into_inner()
        .map_err(|e| Error::io(&spec.context, "finishing the layer archive", e))?;
    let diff_id = Digest::sha256(&tar);

    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    let gz = gz
        .write_all(&tar)
        .and_then(|_| gz.finish())
        .map_err(|e| Error::io(&spec.context, "compressing the layer", e))?;
    let layer = Blob::new(OCI_LAYER_TAR_GZIP, gz);
    tracing::debug!(
        context = %spec.context.display(),
        layer = %layer.digest,
        diff_id = %diff_id,
        "built layer"
    );
    assemble(vec![layer], vec![diff_id], &spec.run_config())
}

/// Build an image from explicit layer blobs (compressed tar bytes with
/// their media types) and a run configuration.
///
/// Used to craft test images, including hostile ones: the blobs' stated
/// digests are used as-is in the manifest. Each `rootfs.diff_ids` entry is
/// the sha256 of the decompressed layer; if a layer cannot be decompressed
/// (unknown media type or corrupt data) its blob digest is used instead.
pub fn assemble_image(layers: Vec<Blob>, run: &RunConfig) -> Result<BuiltImage, Error> {
    let diff_ids = layers
        .iter()
        .map(|l| match diff_id(l) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(layer = %l.digest, error = %e, "cannot compute diff_id; using the blob digest");
                l.digest.clone()
            }
        })
        .collect();
    assemble(layers, diff_ids, run)
}

fn diff_id(layer: &Blob) -> Result<Digest, Error> {
    let mut h = Hasher::new();
    let data = &layer.data[..];
    let res = match layer_compression(&layer.media_type)? {
        Compression::None => io::copy(&mut &data[..], &mut h),
        Compression::Gzip => io::copy(&mut MultiGzDecoder::new(data), &mut h),
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(data).and_then(|mut d| io::copy(&mut d, &mut h))
        }
    };
    res.map_err(|source| Error::CorruptLayer { source })?;
    Ok(h.finish())
}

fn assemble(
    layers: Vec<Blob>,
    diff_ids: Vec<Digest>,
    run: &RunConfig,
) -> Result<BuiltImage, Error> {
    let cfg = ConfigOut {
        architecture: "amd64",
        os: "linux",
        config: RawExecConfig::from_run(run),
        rootfs: RootFs {
            kind: "layers",
            diff_ids: &diff_ids,
        },
    };
    let cfg_bytes = serde_json::to_vec(&cfg).map_err(|e| Error::InvalidConfig {
        reason: format!("cannot serialize the image config: {e}"),
    })?;
    let config = Blob::new(OCI_CONFIG, cfg_bytes);
    let manifest = ImageManifest {
        media_type: OCI_MANIFEST.to_string(),
        config: config.descriptor(),
        layers: layers.iter().map(Blob::descriptor).collect(),
    };
    let manifest = Blob::new(OCI_MANIFEST, image_manifest_json(&manifest));
    Ok(BuiltImage {
        manifest,
        config,
        layers,
    })
}

fn base_header(mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    h
}

fn add_dir(builder: &mut tar::Builder<Vec<u8>>, abs: &Path, rel: &Path) -> Result<(), Error> {
    let mut children: Vec<_> = fs::read_dir(abs)
        .map_err(|e| Error::io(abs, "listing a build context directory", e))?
        .map(|c| c.map(|c| c.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| Error::io(abs, "listing a build context directory", e))?;
    children.sort();
    for name in children {
        let child_abs = abs.join(&name);
        let child_rel = rel.join(&name);
        let meta = fs::symlink_metadata(&child_abs)
            .map_err(|e| Error::io(&child_abs, "inspecting a build context entry", e))?;
        let mode = meta.permissions().mode();
        let ft = meta.file_type();
        let io_err = |e: io::Error| Error::io(&child_abs, "adding an entry to the layer", e);
        if ft.is_dir() {
            let mut h = base_header(mode, tar::EntryType::Directory);
            builder
                .append_data(&mut h, &child_rel, io::empty())
                .map_err(io_err)?;
            add_dir(builder, &child_abs, &child_rel)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&child_abs)
                .map_err(|e| Error::io(&child_abs, "reading a symbolic link", e))?;
            let mut h = base_header(0o777, tar::EntryType::Symlink);
            builder
                .append_link(&mut h, &child_rel, &target)
                .map_err(io_err)?;
        } else if ft.is_file() {
            let mut data = Vec::new();
            fs::File::open(&child_abs)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(|e| Error::io(&child_abs, "reading a build context file", e))?;
            let mut h = base_header(mode, tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            builder
                .append_data(&mut h, &child_rel, &data[..])
                .map_err(io_err)?;
        } else {
            tracing::warn!(path = %child_abs.display(), "skipping special file in build context");
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::manifest::{parse_config, parse_manifest, Manifest, OCI_LAYER_TAR_ZSTD};
    use std::os::unix::fs::symlink;
    use std::time::{Duration, UNIX_EPOCH};

    pub(crate) fn sample_context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::create_dir_all(p.join("bin")).unwrap();
        fs::create_dir_all(p.join("app/data")).unwrap();
        fs::write(p.join("bin/run"), b"#!/bin/sh\nexec /app/main\n").unwrap();
        fs::set_permissions(p.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(p.join("app/data/z.txt"), b"zzz").unwrap();
        fs::write(p.join("app/data/a.txt"), b"aaa").unwrap();
        fs::write(p.join("app/empty"), b"").unwrap();
        symlink("data/a.txt", p.join("app/link")).unwrap();
        symlink("/nonexistent/abs", p.join("app/abs")).unwrap();
        dir
    }

    pub(crate) fn spec(dir: &Path) -> BuildSpec {
        BuildSpec {
            context: dir.to_path_buf(),
            entrypoint: vec!["/bin/run".into()],
            cmd: vec!["--flag".into()],
            env: vec!["A=1".into(), "PATH=/bin".into()],
            working_dir: Some("/app".into()),
            user: Some("1000:1000".into()),
        }
    }

    #[test]
    fn deterministic() {
        let ctx = sample_context();
        let a = build_image(&spec(ctx.path())).unwrap();
        // Touching mtimes must not change anything.
        let f = fs::File::options()
            .write(true)
            .open(ctx.path().join("app/data/z.txt"))
            .unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(12345))
            .unwrap();
        let b = build_image(&spec(ctx.path())).unwrap();
        assert_eq!(a, b);
        // Content changes do.
        fs::write(ctx.path().join("app/empty"), b"x").unwrap();
        let c = build_image(&spec(ctx.path())).unwrap();
        assert_ne!(a.layers[0].digest, c.layers[0].digest);
        assert_ne!(a.manifest.digest, c.manifest.digest);
    }

    #[test]
    fn manifest_and_config_contents() {
        let ctx = sample_context();
        let img = build_image(&spec(ctx.path())).unwrap();
        assert_eq!(img.manifest.digest, Digest::sha256(&img.manifest.data));
        let Manifest::Image(m) = parse_manifest(&img.manifest.data, None).unwrap() else {
            panic!("expected image manifest");
        };
        assert_eq!(m.media_type, OCI_MANIFEST);
        assert_eq!(m.config, img.config.descriptor());
        assert_eq!(m.layers, vec![img.layers[0].descriptor()]);
        let run = parse_config(&img.config.data).unwrap();
        assert_eq!(run, spec(ctx.path()).run_config());
        assert_eq!(run.argv().unwrap(), vec!["/bin/run", "--flag"]);

        let cfg: serde_json::Value = serde_json::from_slice(&img.config.data).unwrap();
        assert_eq!(cfg["architecture"], "amd64");
        assert_eq!(cfg["os"], "linux");
        assert!(cfg.get("created").is_none());
        let mut tar = Vec::new();
        MultiGzDecoder::new(&img.layers[0].data[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(cfg["rootfs"]["type"], "layers");
        assert_eq!(cfg["rootfs"]["diff_ids"][0], Digest::sha256(&tar).as_str());

        // Tar entries sorted, with zero mtimes and owners.
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                assert_eq!(e.header().mtime().unwrap(), 0);
                assert_eq!(e.header().uid().unwrap(), 0);
                assert_eq!(e.header().gid().unwrap(), 0);
                e.path().unwrap().display().to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "app",
                "app/abs",
                "app/data",
                "app/data/a.txt",
                "app/data/z.txt",
                "app/empty",
                "app/link",
                "bin",
                "bin/run"
            ]
        );
    }

    #[test]
    fn assemble_computes_diff_ids() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, "f", &b"hi"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let zst = zstd::stream::encode_all(&tar[..], 3).unwrap();
        let layers = vec![
            Blob::new(OCI_LAYER_TAR_ZSTD, zst),
            Blob::new("application/x-garbage", b"junk".to_vec()),
        ];
        let run = RunConfig {
            cmd: vec!["/f".into()],
            ..RunConfig::default()
        };
        let img = assemble_image(layers.clone(), &run).unwrap();
        let cfg: serde_json::Value = serde_json::from_slice(&img.config.data).unwrap();
        assert_eq!(cfg["rootfs"]["diff_ids"][0], Digest::sha256(&tar).as_str());
        assert_eq!(cfg["rootfs"]["diff_ids"][1], layers[1].digest.as_str());
        assert_eq!(parse_config(&img.config.data).unwrap(), run);
        assert_eq!(img.layers, layers);
    }

    #[test]
    fn context_must_be_a_directory() {
        let ctx = sample_context();
        let e = build_image(&spec(&ctx.path().join("bin/run"))).unwrap_err();
        assert!(matches!(e, Error::Build { .. }), "{e}");
        let e = build_image(&spec(&ctx.path().join("missing"))).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }
}
