//! OCI / Docker schema2 manifests, indexes, layer media types and image configs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Digest, Error};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema2 image manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema2 manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI uncompressed layer media type.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer media type.
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer media type.
pub const OCI_LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker gzip layer media type.
pub const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker foreign (non-distributable) gzip layer media type.
pub const DOCKER_FOREIGN_LAYER_TAR_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// Value for an HTTP `Accept` header listing the four manifest media types.
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Manifests larger than this are refused (4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Image configs larger than this are refused (8 MiB).
pub const MAX_CONFIG_BYTES: usize = 8 * 1024 * 1024;

/// The annotation that names a tag in an OCI layout index.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A platform as found in an index entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `amd64`.
    pub architecture: String,
    /// Architecture variant, e.g. `v8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A content descriptor: media type, digest and size of a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes of the referenced content.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Platform (index entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// A descriptor without annotations or platform.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
        }
    }

    /// Like [`decrypted_layer_compression`] on this descriptor's media type:
    /// the compression of the layer once decrypted (for `+encrypted` media
    /// types), else the same as [`Descriptor::compression`]. Errors name the
    /// layer digest.
    pub fn decrypted_compression(&self) -> Result<Compression, Error> {
        match decrypted_media_type(&self.media_type) {
            Some(inner) => Descriptor::new(inner, self.digest.clone(), self.size).compression(),
            None => self.compression(),
        }
    }

    /// Like [`layer_compression`] on this descriptor's media type, but
    /// errors name the layer digest.
    pub fn compression(&self) -> Result<Compression, Error> {
        layer_compression(&self.media_type).map_err(|e| match e {
            Error::EncryptedLayer { media_type, .. } => Error::EncryptedLayer {
                media_type,
                digest: Some(self.digest.clone()),
            },
            other => other,
        })
    }
}

/// An image manifest (OCI or Docker schema2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageManifest {
    /// The manifest's media type ([`OCI_MANIFEST`] or [`DOCKER_MANIFEST`]).
    pub media_type: String,
    /// The config blob descriptor.
    pub config: Descriptor,
    /// Layer descriptors, bottom layer first.
    pub layers: Vec<Descriptor>,
}

/// A parsed manifest document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Manifest {
    /// A single-platform image manifest.
    Image(ImageManifest),
    /// A multi-platform index / manifest list: its entries.
    Index(Vec<Descriptor>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RawImageManifestOut<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: &'a Descriptor,
    layers: &'a [Descriptor],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RawIndexOut<'a> {
    schema_version: u32,
    media_type: &'a str,
    manifests: &'a [Descriptor],
}

/// Parse manifest bytes.
///
/// The media type comes from the document's `mediaType` field, else from
/// `content_type` (parameters after `;` ignored), else it is inferred from
/// the document's shape (`manifests` → index, `config` + `layers` → OCI
/// manifest). Unknown media types, malformed documents and documents larger
/// than [`MAX_MANIFEST_BYTES`] are rejected.
pub fn parse_manifest(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, Error> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(Error::TooLarge {
            what: "manifest",
            size: bytes.len() as u64,
            limit: MAX_MANIFEST_BYTES as u64,
        });
    }
    let invalid = |reason: String| Error::InvalidManifest { reason };
    let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| {
        invalid(format!(
            "the document is not a valid manifest JSON object: {e}"
        ))
    })?;
    match &raw.schema_version {
        None => {}
        Some(v) if v.as_u64() == Some(2) => {}
        Some(v) => {
            return Err(invalid(format!(
                "schemaVersion is {v}, but only schemaVersion 2 is supported"
            )))
        }
    }
    let header_type = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| !c.is_empty());
    let media_type = match (&raw.media_type, header_type) {
        (Some(m), _) => m.clone(),
        (None, Some(h)) if h != "application/json" && h != "application/octet-stream" => {
            h.to_string()
        }
        (None, _) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, _) if raw.config.is_some() => OCI_MANIFEST.to_string(),
        (None, _) => {
            return Err(invalid(
                "the document has no mediaType and is neither an image manifest nor an index"
                    .into(),
            ))
        }
    };
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw
                .config
                .ok_or_else(|| invalid(format!("the {media_type} document has no config")))?;
            let layers = raw
                .layers
                .ok_or_else(|| invalid(format!("the {media_type} document has no layers")))?;
            Ok(Manifest::Image(ImageManifest {
                media_type,
                config,
                layers,
            }))
        }
        OCI_INDEX | DOCKER_MANIFEST_LIST => {
            let entries = raw
                .manifests
                .ok_or_else(|| invalid(format!("the {media_type} document has no manifests")))?;
            Ok(Manifest::Index(entries))
        }
        other => Err(Error::UnsupportedMediaType {
            media_type: other.to_string(),
        }),
    }
}

fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Pick the entry for `os`/`arch` (e.g. `"linux"`, `"amd64"`) from an index.
///
/// `x86_64` and `aarch64` are accepted as aliases of `amd64` and `arm64`.
/// Among several matches (variants), an entry without a variant or with
/// the canonical variant (`v8` for arm64) is preferred, then the first one.
pub fn select_platform(entries: &[Descriptor], os: &str, arch: &str) -> Result<Descriptor, Error> {
    let arch = normalize_arch(arch);
    let matches: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && normalize_arch(&p.architecture) == arch)
        })
        .collect();
    let preferred = matches.iter().find(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.variant.is_none() || (arch == "arm64" && p.variant.as_deref() == Some("v8"))
        })
    });
    match preferred.or(matches.first()) {
        Some(d) => {
            tracing::debug!(digest = %d.digest, os, arch, "selected platform manifest");
            Ok((*d).clone())
        }
        None => Err(Error::NoMatchingPlatform {
            os: os.to_string(),
            arch: arch.to_string(),
            found: entries
                .iter()
                .map(|d| match &d.platform {
                    Some(p) => p.to_string(),
                    None => format!("(no platform: {})", d.digest),
                })
                .collect(),
        }),
    }
}

/// Compression of a layer blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip-compressed tar.
    Gzip,
    /// zstd-compressed tar.
    Zstd,
}

/// The compression of a layer from its media type.
///
/// Media types ending in `+encrypted` give [`Error::EncryptedLayer`];
/// unknown ones give [`Error::UnsupportedMediaType`].
pub fn layer_compression(media_type: &str) -> Result<Compression, Error> {
    if media_type.ends_with("+encrypted") {
        return Err(Error::EncryptedLayer {
            media_type: media_type.to_string(),
            digest: None,
        });
    }
    match media_type {
        OCI_LAYER_TAR
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        OCI_LAYER_TAR_GZIP
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | DOCKER_LAYER_TAR_GZIP
        | DOCKER_FOREIGN_LAYER_TAR_GZIP => Ok(Compression::Gzip),
        OCI_LAYER_TAR_ZSTD | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
            Ok(Compression::Zstd)
        }
        other => Err(Error::UnsupportedMediaType {
            media_type: other.to_string(),
        }),
    }
}

/// Suffix that ocicrypt appends to the media type of an encrypted layer.
pub const ENCRYPTED_SUFFIX: &str = "+encrypted";

/// The media type of an encrypted layer once decrypted: `mt` without its
/// `+encrypted` suffix, or `None` if `mt` is not an encrypted media type.
pub fn decrypted_media_type(mt: &str) -> Option<&str> {
    mt.strip_suffix(ENCRYPTED_SUFFIX).filter(|m| !m.is_empty())
}

/// The compression of a layer *after decryption*, from its media type.
///
/// For `+encrypted` media types this is the compression of the decrypted
/// media type (e.g. `...tar+gzip+encrypted` → [`Compression::Gzip`]); other
/// media types give the same as [`layer_compression`]. Use it only where
/// the layer will actually be decrypted (see [`crate::crypt`]); elsewhere
/// keep [`layer_compression`], which refuses encrypted layers.
pub fn decrypted_layer_compression(media_type: &str) -> Result<Compression, Error> {
    layer_compression(decrypted_media_type(media_type).unwrap_or(media_type))
}

/// What the function process needs from the image config blob.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.Env` (`KEY=value` strings).
    pub env: Vec<String>,
    /// `config.WorkingDir`, if non-empty.
    pub working_dir: Option<String>,
    /// `config.User`, if non-empty.
    pub user: Option<String>,
}

impl RunConfig {
    /// The process argv: entrypoint followed by cmd. Errors if both are empty.
    pub fn argv(&self) -> Result<Vec<String>, Error> {
        let argv: Vec<String> = self.entrypoint.iter().chain(&self.cmd).cloned().collect();
        if argv.is_empty() {
            return Err(Error::EmptyCommand);
        }
        Ok(argv)
    }
}

/// The `config` object of an image config blob (Docker-style capitalised keys).
#[derive(Default, Deserialize, Serialize)]
pub(crate) struct RawExecConfig {
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl RawExecConfig {
    pub(crate) fn from_run(run: &RunConfig) -> Self {
        let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        RawExecConfig {
            entrypoint: non_empty(&run.entrypoint),
            cmd: non_empty(&run.cmd),
            env: non_empty(&run.env),
            working_dir: run.working_dir.clone().filter(|s| !s.is_empty()),
            user: run.user.clone().filter(|s| !s.is_empty()),
        }
    }
}

#[derive(Deserialize)]
struct RawImageConfig {
    #[serde(default)]
    config: Option<RawExecConfig>,
}

/// Parse an image config blob (OCI or Docker) into a [`RunConfig`].
///
/// Missing or `null` fields become empty; empty `WorkingDir`/`User` become
/// `None`. Blobs larger than [`MAX_CONFIG_BYTES`] are refused.
pub fn parse_config(bytes: &[u8]) -> Result<RunConfig, Error> {
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(Error::TooLarge {
            what: "image config",
            size: bytes.len() as u64,
            limit: MAX_CONFIG_BYTES as u64,
        });
    }
    let raw: RawImageConfig = serde_json::from_slice(bytes).map_err(|e| Error::InvalidConfig {
        reason: format!("the config blob is not a valid image config JSON object: {e}"),
    })?;
    let c = raw.config.unwrap_or_default();
    Ok(RunConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|s| !s.is_empty()),
        user: c.user.filter(|s| !s.is_empty()),
    })
}

/// Serialize an image manifest (with `schemaVersion: 2`) to JSON bytes.
pub fn image_manifest_json(m: &ImageManifest) -> Vec<u8> {
    let out = RawImageManifestOut {
        schema_version: 2,
        media_type: &m.media_type,
        config: &m.config,
        layers: &m.layers,
    };
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

/// Serialize an OCI image index with the given entries to JSON bytes.
pub fn index_json(entries: &[Descriptor]) -> Vec<u8> {
    let out = RawIndexOut {
        schema_version: 2,
        media_type: OCI_INDEX,
        manifests: entries,
    };
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec_pretty(&out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::sha256(s.as_bytes())
    }

    const OCI: &str = r#"{
      "schemaVersion": 2,
      "mediaType": "application/vnd.oci.image.manifest.v1+json",
      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                 "digest": "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "size": 2},
      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                  "digest": "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "size": 10,
                  "annotations": {"a": "b"}}]
    }"#;

    const DOCKER: &str = r#"{
      "schemaVersion": 2,
      "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
      "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1469,
                 "digest": "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 2479,
                  "digest": "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}]
    }"#;

    const INDEX: &str = r#"{
      "schemaVersion": 2,
      "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
      "manifests": [
        {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": 1,
         "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
         "platform": {"architecture": "arm", "os": "linux", "variant": "v7"}},
        {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": 2,
         "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222",
         "platform": {"architecture": "amd64", "os": "linux"}},
        {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": 3,
         "digest": "sha256:3333333333333333333333333333333333333333333333333333333333333333",
         "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}
      ]
    }"#;

    #[test]
    fn parse_oci_manifest() {
        let Manifest::Image(m) = parse_manifest(OCI.as_bytes(), None).unwrap() else {
            panic!("expected image manifest");
        };
        assert_eq!(m.media_type, OCI_MANIFEST);
        assert_eq!(m.config.size, 2);
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].annotations["a"], "b");
        assert_eq!(m.layers[0].compression().unwrap(), Compression::Gzip);
        // Serialization round-trips.
        let again = parse_manifest(&image_manifest_json(&m), None).unwrap();
        assert_eq!(again, Manifest::Image(m));
    }

    #[test]
    fn parse_docker_manifest() {
        let Manifest::Image(m) = parse_manifest(DOCKER.as_bytes(), None).unwrap() else {
            panic!("expected image manifest");
        };
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        assert_eq!(m.config.media_type, DOCKER_CONFIG);
        assert_eq!(
            layer_compression(&m.layers[0].media_type).unwrap(),
            Compression::Gzip
        );
    }

    #[test]
    fn media_type_from_content_type_or_shape() {
        let no_mt = r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":1},"layers":[]}"#;
        let Manifest::Image(m) = parse_manifest(
            no_mt.as_bytes(),
            Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        let Manifest::Image(m) = parse_manifest(no_mt.as_bytes(), None).unwrap() else {
            panic!()
        };
        assert_eq!(m.media_type, OCI_MANIFEST);
        let e = parse_manifest(no_mt.as_bytes(), Some("text/html")).unwrap_err();
        assert!(matches!(e, Error::UnsupportedMediaType { .. }), "{e}");
    }

    #[test]
    fn index_and_platform_selection() {
        let Manifest::Index(entries) = parse_manifest(INDEX.as_bytes(), None).unwrap() else {
            panic!("expected index");
        };
        assert_eq!(entries.len(), 3);
        assert_eq!(select_platform(&entries, "linux", "amd64").unwrap().size, 2);
        assert_eq!(
            select_platform(&entries, "linux", "x86_64").unwrap().size,
            2
        );
        assert_eq!(select_platform(&entries, "linux", "arm64").unwrap().size, 3);
        assert_eq!(select_platform(&entries, "linux", "arm").unwrap().size, 1);
        let e = select_platform(&entries, "windows", "amd64").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::NoMatchingPlatform { .. }));
        assert!(
            msg.contains("linux/arm/v7") && msg.contains("linux/amd64"),
            "{msg}"
        );
    }

    #[test]
    fn garbage_and_oversized_rejected() {
        for bad in [
            &b"not json"[..],
            b"[]",
            b"{}",
            br#"{"schemaVersion":1,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#,
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#,
            br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:bad","size":1},"layers":[]}"#,
        ] {
            let e = parse_manifest(bad, None).unwrap_err();
            assert!(matches!(e, Error::InvalidManifest { .. }), "{e}");
        }
        let e = parse_manifest(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, Error::UnsupportedMediaType { .. }), "{e}");
        let mut big = b"{\"a\":\"".to_vec();
        big.resize(MAX_MANIFEST_BYTES + 1, b'x');
        let e = parse_manifest(&big, None).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    }

    #[test]
    fn layer_media_types() {
        assert_eq!(layer_compression(OCI_LAYER_TAR).unwrap(), Compression::None);
        assert_eq!(
            layer_compression(OCI_LAYER_TAR_GZIP).unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            layer_compression(OCI_LAYER_TAR_ZSTD).unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            layer_compression(DOCKER_LAYER_TAR_GZIP).unwrap(),
            Compression::Gzip
        );
        assert!(matches!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+gzip+encrypted"),
            Err(Error::EncryptedLayer { digest: None, .. })
        ));
        let desc = Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar+encrypted",
            d("x"),
            1,
        );
        let e = desc.compression().unwrap_err();
        assert!(e.to_string().contains(desc.digest.as_str()), "{e}");
        // Once decrypted, the inner media type decides.
        assert_eq!(
            decrypted_layer_compression("application/vnd.oci.image.layer.v1.tar+gzip+encrypted")
                .unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            decrypted_layer_compression(OCI_LAYER_TAR_ZSTD).unwrap(),
            Compression::Zstd
        );
        assert_eq!(desc.decrypted_compression().unwrap(), Compression::None);
        let e = Descriptor::new("application/x-foo+encrypted", d("y"), 1)
            .decrypted_compression()
            .unwrap_err();
        assert!(matches!(e, Error::UnsupportedMediaType { .. }), "{e}");
        assert!(matches!(
            decrypted_layer_compression("x+encrypted+encrypted"),
            Err(Error::EncryptedLayer { .. })
        ));
        assert_eq!(decrypted_media_type("a+encrypted"), Some("a"));
        assert_eq!(decrypted_media_type("+encrypted"), None);
        assert_eq!(decrypted_media_type(OCI_LAYER_TAR), None);
        assert!(matches!(
            layer_compression("application/x-foo"),
            Err(Error::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn config_parsing() {
        let c = parse_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/app"],"Cmd":["--x"],"Env":["A=1"],"WorkingDir":"/w","User":""}}"#,
        )
        .unwrap();
        assert_eq!(c.argv().unwrap(), vec!["/bin/app", "--x"]);
        assert_eq!(c.env, vec!["A=1"]);
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
        assert_eq!(c.user, None);
        let c = parse_config(br#"{"config":{"Entrypoint":null,"Cmd":null}}"#).unwrap();
        assert!(matches!(c.argv(), Err(Error::EmptyCommand)));
        let c = parse_config(br#"{"architecture":"amd64"}"#).unwrap();
        assert_eq!(c, RunConfig::default());
        assert!(matches!(
            parse_config(b"nope"),
            Err(Error::InvalidConfig { .. })
        ));
    }
}
