//! The crate-wide error type.

use crate::digest::Digest;

/// Every failure this crate can report.
///
/// Messages are complete sentences that name the thing at fault (digest,
/// reference, path, media type, ...) and the reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string is not a valid `sha256:<64 lowercase hex>` digest.
    #[error("invalid digest {value:?}: {reason}")]
    InvalidDigest {
        /// The offending text.
        value: String,
        /// Why it was rejected.
        reason: String,
    },

    /// Content hashed to a different digest than expected.
    #[error("content digest mismatch: expected {expected}, but the content hashes to {actual}")]
    DigestMismatch {
        /// The digest the content should have.
        expected: Digest,
        /// The digest the content actually has.
        actual: Digest,
    },

    /// Content has a different size than expected.
    #[error("content size mismatch: expected {expected} bytes, but read {actual} bytes")]
    SizeMismatch {
        /// The expected size in bytes.
        expected: u64,
        /// The number of bytes actually read.
        actual: u64,
    },

    /// An image reference could not be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The offending reference text.
        reference: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A manifest or index document is malformed.
    #[error("invalid manifest: {reason}")]
    InvalidManifest {
        /// Why it was rejected.
        reason: String,
    },

    /// A document is larger than this crate is willing to parse.
    #[error("{what} is too large: {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was too large (e.g. "manifest").
        what: &'static str,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },

    /// A media type is unknown or not supported here.
    #[error("unsupported media type {media_type:?}")]
    UnsupportedMediaType {
        /// The offending media type.
        media_type: String,
    },

    /// A layer is encrypted (`+encrypted` media type) and no key was used
    /// to decrypt it (see [`crate::crypt`]).
    #[error(
        "layer {} has encrypted media type {media_type:?}; it must be decrypted with a private key first",
        describe_digest(.digest)
    )]
    EncryptedLayer {
        /// The layer's media type.
        media_type: String,
        /// The layer's digest, when known.
        digest: Option<Digest>,
    },

    /// An encrypted layer cannot be decrypted: no or wrong key, malformed
    /// or unsupported encryption metadata, or a failed integrity check.
    #[error("cannot decrypt layer {digest}: {reason}")]
    LayerDecryption {
        /// The (encrypted) layer's digest.
        digest: Digest,
        /// What kind of failure this is.
        kind: crate::crypt::DecryptFailure,
        /// Why, in words.
        reason: String,
    },

    /// A layer cannot be encrypted.
    #[error("cannot encrypt layer {digest}: {reason}")]
    LayerEncryption {
        /// The (plaintext) layer's digest.
        digest: Digest,
        /// Why.
        reason: String,
    },

    /// A public or private key cannot be used.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// Why it was rejected.
        reason: String,
    },

    /// An index has no entry for the requested platform.
    #[error(
        "no image for platform {os}/{arch} in the index; platforms found: {}",
        describe_list(.found)
    )]
    NoMatchingPlatform {
        /// Requested operating system.
        os: String,
        /// Requested architecture.
        arch: String,
        /// Platforms present in the index (`os/arch[/variant]`).
        found: Vec<String>,
    },

    /// An image config blob is malformed.
    #[error("invalid image config: {reason}")]
    InvalidConfig {
        /// Why it was rejected.
        reason: String,
    },

    /// The image config yields no command to run.
    #[error("the image config has neither an entrypoint nor a cmd, so there is nothing to run")]
    EmptyCommand,

    /// A layer entry tries to reach outside the unpack root.
    #[error("layer entry {path} escapes the root: {reason}")]
    PathEscape {
        /// The entry path as found in the layer, quoted for display: in double
        /// quotes, unprintable characters and invalid UTF-8 escaped, and long
        /// paths shortened.
        path: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A layer entry is malformed or cannot be applied.
    #[error("layer entry {path} is invalid: {reason}")]
    InvalidEntry {
        /// The entry path as found in the layer, quoted for display like
        /// [`Error::PathEscape`]'s.
        path: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A layer entry's path is deeper or longer than the unpacker accepts
    /// (see [`crate::unpack::MAX_PATH_DEPTH`]).
    #[error("layer entry {path} is too long: {what} exceeds the limit of {limit}")]
    PathTooLong {
        /// The entry path as found in the layer, quoted for display like
        /// [`Error::PathEscape`]'s.
        path: String,
        /// Which bound it exceeds ("its number of path components", ...).
        what: &'static str,
        /// The bound.
        limit: u64,
    },

    /// A layer's tar extension headers (GNU long name or long link name, PAX
    /// records) for one entry claim more bytes than the unpacker reads into
    /// memory (see [`crate::unpack::MAX_EXTENSION_HEADER_BYTES`]). Checked
    /// before any of them is read.
    #[error(
        "a layer entry's tar extension headers are too large: with its {kind} header they \
         hold {size} bytes, more than the limit of {limit} bytes"
    )]
    ExtensionHeaderTooLarge {
        /// The header that crossed the bound ("PAX extended", "GNU long name", ...).
        kind: &'static str,
        /// The bytes the entry's extension headers claim, this one included.
        size: u64,
        /// The bound in bytes.
        limit: u64,
    },

    /// A configured unpack limit was exceeded.
    #[error("layer exceeds the {what} limit of {limit}")]
    LimitExceeded {
        /// Which limit ("file data bytes", "entries").
        what: &'static str,
        /// The limit value.
        limit: u64,
    },

    /// A layer archive stream is corrupt (bad compression or tar framing).
    #[error("layer archive is corrupt: {source}")]
    CorruptLayer {
        /// The underlying decoding error.
        #[source]
        source: std::io::Error,
    },

    /// An I/O operation on a named path failed.
    #[error("I/O error on {path}: {action} failed: {source}")]
    Io {
        /// The path involved.
        path: String,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An OCI layout directory is malformed.
    #[error("invalid OCI layout at {dir}: {reason}")]
    InvalidLayout {
        /// The layout directory.
        dir: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A tag is not present in an OCI layout.
    #[error("tag {tag:?} not found in the OCI layout at {dir}")]
    TagNotFound {
        /// The requested tag.
        tag: String,
        /// The layout directory.
        dir: String,
    },

    /// A blob is not present in an OCI layout.
    #[error("blob {digest} not found at {path}")]
    BlobNotFound {
        /// The blob digest.
        digest: Digest,
        /// Where it was looked for.
        path: String,
    },

    /// An image could not be built.
    #[error("cannot build image from {path}: {reason}")]
    Build {
        /// The path at fault.
        path: String,
        /// Why.
        reason: String,
    },
}

fn describe_digest(d: &Option<Digest>) -> String {
    match d {
        Some(d) => d.to_string(),
        None => "(digest unknown)".to_string(),
    }
}

fn describe_list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

impl Error {
    /// Build an [`Error::Io`] for `path`.
    pub(crate) fn io(
        path: impl AsRef<std::path::Path>,
        action: &'static str,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            action,
            source,
        }
    }
}
