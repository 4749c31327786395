//! The Confidential Containers (CoCo) key-provider scheme: layer keys
//! wrapped with a key-encryption key (KEK) held as a resource by a key
//! broker (KBS), in the [`ANNOTATION_KEYS_COCO`] annotation written by the
//! CoCo attestation agent's key provider.
//!
//! Each annotation packet names its KEK by a KBS resource URI (`kid`) and
//! carries the ocicrypt private options JSON wrapped with that KEK
//! (AES-256-GCM or AES-256-CTR). See the module documentation of
//! [`crate::crypt`] for the format.

use std::fmt;
use std::str::FromStr;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ctr::cipher::{KeyIvInit, StreamCipher};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::{
    b64std, invalid_key, random, Aes256Ctr, DecryptFailure, ANNOTATION_KEYS_COCO, GCM_IV_LEN,
    GCM_TAG_LEN, NONCE_LEN,
};
use crate::Error;

/// Length of a KBS key-encryption key (AES-256).
pub const KBS_KEK_LEN: usize = 32;
/// At most this many packets in one annotation (bounds the work hostile
/// metadata can cause).
const MAX_PACKETS: usize = 16;
/// Longest accepted `kid`.
const MAX_KID_LEN: usize = 1024;
/// The only annotation packet version veil reads.
const PACKET_VERSION: &str = "0.1.0";
/// The only key provider veil reads.
const PROVIDER_KBS: &str = "kbs";
/// Scheme of KBS resource URIs.
const KBS_SCHEME: &str = "kbs://";

/// `s` quoted for an error message: escaped and cut to a readable length
/// (packet fields come from registries and may be anything).
pub(super) fn quoted(s: &str) -> String {
    const MAX: usize = 80;
    let mut t: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        t.push_str("...");
    }
    format!("'{t}'")
}

// ---------------------------------------------------------------------------
// KBS resource URIs
// ---------------------------------------------------------------------------

/// A key broker resource URI: `kbs:///<repository>/<type>/<tag>` or
/// `kbs://<host>/<repository>/<type>/<tag>`.
///
/// The host, when present, is only a hint (the agent fetches from its own
/// broker); the resource is identified by its [`path`](Self::path). Each
/// path segment is non-empty, not `.` or `..`, and made of ASCII letters,
/// digits and `-._~+=@:`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KbsResource {
    host: String,
    repository: String,
    resource_type: String,
    tag: String,
}

fn check_segment(name: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("its {name} segment is empty"));
    }
    if s == "." || s == ".." {
        return Err(format!("its {name} segment is {s:?}"));
    }
    if let Some(c) = s
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "-._~+=@:".contains(c)))
    {
        return Err(format!(
            "its {name} segment contains {c:?} (allowed: ASCII letters, digits and -._~+=@:)"
        ));
    }
    Ok(())
}

/// The `repository/type/tag` path, checked.
fn parse_path(path: &str) -> Result<[&str; 3], String> {
    let segments: Vec<&str> = path.split('/').collect();
    let [repository, resource_type, tag] = segments[..] else {
        return Err(format!(
            "its path has {} segment(s); exactly three (<repository>/<type>/<tag>) are required",
            segments.len()
        ));
    };
    check_segment("repository", repository)?;
    check_segment("type", resource_type)?;
    check_segment("tag", tag)?;
    Ok([repository, resource_type, tag])
}

/// Parse a KBS resource URI; the error says why it is not one.
fn parse_uri(uri: &str) -> Result<KbsResource, String> {
    if uri.len() > MAX_KID_LEN {
        return Err(format!("it is longer than {MAX_KID_LEN} bytes"));
    }
    let rest = uri
        .strip_prefix(KBS_SCHEME)
        .ok_or_else(|| format!("it does not start with {KBS_SCHEME}"))?;
    let (host, path) = rest
        .split_once('/')
        .ok_or("it has no /<repository>/<type>/<tag> path")?;
    if let Some(c) = host
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "-._:[]".contains(c)))
    {
        return Err(format!("its host contains {c:?}"));
    }
    let [repository, resource_type, tag] = parse_path(path)?;
    Ok(KbsResource {
        host: host.to_string(),
        repository: repository.to_string(),
        resource_type: resource_type.to_string(),
        tag: tag.to_string(),
    })
}

impl KbsResource {
    /// Parse `kbs://[<host>]/<repository>/<type>/<tag>`.
    pub fn parse(uri: &str) -> Result<Self, Error> {
        parse_uri(uri).map_err(|why| {
            invalid_key(format!(
                "{} is not a KBS resource URI (kbs://[<host>]/<repository>/<type>/<tag>): {why}",
                quoted(uri)
            ))
        })
    }

    /// The broker host named by the URI, if any (`kbs:///…` names none).
    pub fn host(&self) -> Option<&str> {
        Some(self.host.as_str()).filter(|h| !h.is_empty())
    }

    /// The repository (first path segment).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The resource type (second path segment).
    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// The tag (third path segment).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// `<repository>/<type>/<tag>`: what the broker's
    /// `/resource/<repository>/<type>/<tag>` endpoint serves.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.repository, self.resource_type, self.tag)
    }
}

impl fmt::Display for KbsResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KBS_SCHEME}{}/{}", self.host, self.path())
    }
}

impl FromStr for KbsResource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

/// The `repository/type/tag` path a key-ring name stands for: a KBS
/// resource URI, or the bare path (a leading `/` allowed).
pub(super) fn normalized_path(name: &str) -> Option<String> {
    if name.starts_with(KBS_SCHEME) {
        return parse_uri(name).ok().map(|r| r.path());
    }
    let path = name.strip_prefix('/').unwrap_or(name);
    parse_path(path).ok().map(|_| path.to_string())
}

// ---------------------------------------------------------------------------
// Wrap types
// ---------------------------------------------------------------------------

/// How a CoCo annotation packet wraps the private options with the KEK.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CocoWrap {
    /// `A256GCM`: AES-256-GCM, 12-byte IV, 16-byte tag appended to the
    /// ciphertext, no additional data. Authenticated; the default.
    #[default]
    A256Gcm,
    /// `A256CTR`: AES-256-CTR, the 16-byte IV is the initial big-endian
    /// counter block. Not authenticated: the wrapped key relies on the
    /// manifest digest the layer is pinned by.
    A256Ctr,
}

impl CocoWrap {
    /// The `wrap_type` string: `"A256GCM"` or `"A256CTR"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CocoWrap::A256Gcm => "A256GCM",
            CocoWrap::A256Ctr => "A256CTR",
        }
    }

    fn iv_len(self) -> usize {
        match self {
            CocoWrap::A256Gcm => GCM_IV_LEN,
            CocoWrap::A256Ctr => NONCE_LEN,
        }
    }
}

impl fmt::Display for CocoWrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn unsupported_wrap(w: &str) -> String {
    format!(
        "wrap_type {} is not supported (A256GCM and A256CTR are)",
        quoted(w)
    )
}

impl FromStr for CocoWrap {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "A256GCM" => Ok(CocoWrap::A256Gcm),
            "A256CTR" => Ok(CocoWrap::A256Ctr),
            other => Err(invalid_key(unsupported_wrap(other))),
        }
    }
}

// ---------------------------------------------------------------------------
// Annotation packets
// ---------------------------------------------------------------------------

/// An annotation packet as written (v1 fields) or read (v1 or v2; unknown
/// fields ignored).
#[derive(Deserialize)]
struct RawPacket {
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    wrapped_data: Option<String>,
    #[serde(default)]
    iv: Option<String>,
    #[serde(default)]
    wrap_type: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    // v2 fields veil has no use for, but whose shape is checked.
    #[serde(default)]
    #[allow(dead_code)]
    provider_settings: Option<Map<String, Value>>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: Option<Map<String, Value>>,
}

#[derive(Serialize)]
struct PacketOut<'a> {
    kid: &'a str,
    wrapped_data: String,
    iv: String,
    wrap_type: &'static str,
}

/// One packet of the annotation, parsed.
pub(super) struct Packet {
    /// The `kid` exactly as written.
    pub(super) kid: String,
    /// The wrapped options, or why veil cannot use this packet (an
    /// unsupported version, provider or wrap type).
    pub(super) body: Result<Wrapped, String>,
}

/// The private options wrapped under a KBS key.
pub(super) struct Wrapped {
    pub(super) resource: KbsResource,
    pub(super) wrap: CocoWrap,
    iv: Vec<u8>,
    data: Vec<u8>,
}

type ParseError = (DecryptFailure, String);

fn parse_packet(n: usize, part: &str) -> Result<Packet, ParseError> {
    let place = format!("CoCo packet #{n} in the {ANNOTATION_KEYS_COCO} annotation");
    let malformed = |why: String| (DecryptFailure::Malformed, format!("{place}: {why}"));
    let json = b64std(part).map_err(malformed)?;
    let raw: RawPacket = serde_json::from_slice(&json)
        .map_err(|e| malformed(format!("not a valid annotation packet JSON object: {e}")))?;
    let kid = match raw.kid {
        Some(k) if !k.is_empty() => k,
        _ => return Err(malformed("it has no kid".into())),
    };
    let version = raw.version.as_deref().unwrap_or(PACKET_VERSION);
    if version != PACKET_VERSION {
        return Ok(Packet {
            kid,
            body: Err(format!(
                "annotation packet version {} is not supported; only {PACKET_VERSION}",
                quoted(version)
            )),
        });
    }
    let provider = raw.provider.as_deref().unwrap_or(PROVIDER_KBS);
    if provider != PROVIDER_KBS {
        return Ok(Packet {
            kid,
            body: Err(format!(
                "key provider {} is not supported; only '{PROVIDER_KBS}'",
                quoted(provider)
            )),
        });
    }
    let resource = parse_uri(&kid).map_err(|why| {
        malformed(format!(
            "its kid {} is not a KBS resource URI (kbs://[<host>]/<repository>/<type>/<tag>): {why}",
            quoted(&kid)
        ))
    })?;
    let data = match raw.wrapped_data.as_deref() {
        Some(w) if !w.is_empty() => {
            b64std(w).map_err(|e| malformed(format!("wrapped_data: {e}")))?
        }
        _ => return Err(malformed("it has no wrapped_data".into())),
    };
    let wrap = match raw.wrap_type.as_deref() {
        Some("A256GCM") => CocoWrap::A256Gcm,
        Some("A256CTR") => CocoWrap::A256Ctr,
        Some(other) => {
            return Ok(Packet {
                kid,
                body: Err(unsupported_wrap(other)),
            })
        }
        None => {
            return Err(malformed(
                "it has no wrap_type (required with the kbs provider)".into(),
            ))
        }
    };
    let iv = match raw.iv.as_deref() {
        Some(iv) => b64std(iv).map_err(|e| malformed(format!("iv: {e}")))?,
        None => {
            return Err(malformed(
                "it has no iv (required with the kbs provider)".into(),
            ))
        }
    };
    if iv.len() != wrap.iv_len() {
        return Err(malformed(format!(
            "its {wrap} iv is {} bytes; {} are required",
            iv.len(),
            wrap.iv_len()
        )));
    }
    if wrap == CocoWrap::A256Gcm && data.len() < GCM_TAG_LEN {
        return Err(malformed(format!(
            "its A256GCM wrapped_data is {} bytes, shorter than the {GCM_TAG_LEN}-byte tag",
            data.len()
        )));
    }
    Ok(Packet {
        kid,
        body: Ok(Wrapped {
            resource,
            wrap,
            iv,
            data,
        }),
    })
}

/// The packets of an [`ANNOTATION_KEYS_COCO`] annotation (`,`-separated,
/// each base64). Malformed packets fail the whole annotation; packets of an
/// unsupported version, provider or wrap type are returned with the reason.
pub(super) fn parse_annotation(annotation: &str) -> Result<Vec<Packet>, ParseError> {
    let parts: Vec<&str> = annotation.split(',').collect();
    if parts.len() > MAX_PACKETS {
        return Err((
            DecryptFailure::Malformed,
            format!(
                "the {ANNOTATION_KEYS_COCO} annotation holds {} packets; at most {MAX_PACKETS} are accepted",
                parts.len()
            ),
        ));
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| parse_packet(i + 1, part))
        .collect()
}

impl Wrapped {
    /// Unwrap the private options with `kek`. The error says why this key
    /// does not fit (never any key material).
    pub(super) fn open(&self, kek: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        if kek.len() != KBS_KEK_LEN {
            return Err(format!(
                "the key ring's key for this kid is {} bytes, but a KBS key-encryption key \
                 must be {KBS_KEK_LEN} bytes (AES-256)",
                kek.len()
            ));
        }
        if self.iv.len() != self.wrap.iv_len() {
            return Err(format!("the {} iv has the wrong length", self.wrap));
        }
        match self.wrap {
            CocoWrap::A256Gcm => Aes256Gcm::new_from_slice(kek)
                .map_err(|_| "cannot key AES-256-GCM".to_string())?
                .decrypt(Nonce::from_slice(&self.iv), self.data.as_slice())
                .map(Zeroizing::new)
                .map_err(|_| {
                    "wrong key (A256GCM tag mismatch): the key ring's key for this kid does not \
                     unwrap wrapped_data, or wrapped_data was tampered with"
                        .to_string()
                }),
            CocoWrap::A256Ctr => {
                let mut buf = Zeroizing::new(self.data.clone());
                Aes256Ctr::new_from_slices(kek, &self.iv)
                    .map_err(|_| "cannot key AES-256-CTR".to_string())?
                    .apply_keystream(&mut buf);
                Ok(buf)
            }
        }
    }
}

/// One annotation packet (base64 of its v1-shaped JSON) wrapping the
/// private options `opts` for `kid` with `kek`.
pub(super) fn wrap_packet(
    kid: &str,
    kek: &[u8],
    wrap: CocoWrap,
    opts: &[u8],
) -> Result<String, String> {
    if kek.len() != KBS_KEK_LEN {
        return Err(format!(
            "the key-encryption key for {kid} is {} bytes; {KBS_KEK_LEN} (AES-256) are required",
            kek.len()
        ));
    }
    let (iv, data) = match wrap {
        CocoWrap::A256Gcm => {
            let iv = random::<GCM_IV_LEN>();
            let data = Aes256Gcm::new_from_slice(kek)
                .map_err(|_| "cannot key AES-256-GCM".to_string())?
                .encrypt(Nonce::from_slice(iv.as_ref()), opts)
                .map_err(|_| "A256GCM key wrapping failed".to_string())?;
            (iv.to_vec(), data)
        }
        CocoWrap::A256Ctr => {
            let iv = random::<NONCE_LEN>();
            let mut data = opts.to_vec();
            Aes256Ctr::new_from_slices(kek, iv.as_ref())
                .map_err(|_| "cannot key AES-256-CTR".to_string())?
                .apply_keystream(&mut data);
            (iv.to_vec(), data)
        }
    };
    let json = serde_json::to_vec(&PacketOut {
        kid,
        wrapped_data: STANDARD.encode(data),
        iv: STANDARD.encode(iv),
        wrap_type: wrap.as_str(),
    })
    .map_err(|e| format!("cannot serialize the annotation packet: {e}"))?;
    Ok(STANDARD.encode(json))
}
