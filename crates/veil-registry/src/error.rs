//! Error type of the registry client.

use veil_image::Digest;

/// Everything that can go wrong while talking to a registry.
///
/// Messages name the registry and the object concerned (`what`, e.g.
/// `manifest docker.io/library/alpine:3.20` or
/// `blob 127.0.0.1:5000/app@sha256:…`), never credentials or tokens.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 404, or a distribution error code such as `MANIFEST_UNKNOWN` /
    /// `BLOB_UNKNOWN` / `NAME_UNKNOWN`.
    #[error("{what} not found: {detail}")]
    NotFound {
        what: String,
        /// Distribution error code of the first error in the body, if any.
        code: Option<String>,
        /// `CODE: message` from the body, or the HTTP status.
        detail: String,
    },
    /// 401 that could not be answered (no credentials configured, or they
    /// were rejected).
    #[error("unauthorized at registry {registry}: {detail}")]
    Unauthorized { registry: String, detail: String },
    /// 403.
    #[error("access to {what} denied by registry {registry}: {detail}")]
    Denied {
        registry: String,
        what: String,
        detail: String,
    },
    /// 429 / 503 still answered after the bounded retries.
    #[error("registry {registry} kept throttling requests for {what} (HTTP {status}) after {attempts} attempts")]
    Throttled {
        registry: String,
        what: String,
        status: u16,
        attempts: u32,
    },
    /// Any other unexpected HTTP status.
    #[error("registry {registry} answered HTTP {status} for {what}: {body}")]
    Status {
        registry: String,
        what: String,
        status: u16,
        /// A short, lossy excerpt of the response body.
        body: String,
    },
    /// A manifest or blob fetch did not complete within its overall deadline (see
    /// [`crate::RegistryConfig::manifest_deadline`] and
    /// [`crate::RegistryConfig::blob_deadline_base`]), however steadily bytes arrived.
    #[error("{what} did not arrive within its deadline of {limit:?} (the registry is too slow or stalls)")]
    Deadline {
        what: String,
        limit: std::time::Duration,
    },
    /// Connection, TLS, timeout or body read failure.
    #[error("transport error: {0}")]
    Transport(String),
    /// The content does not hash to the digest it was asked for by.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    /// A response body exceeded the size limit.
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// The manifest could not be parsed or no suitable platform was found.
    #[error("manifest error: {0}")]
    Manifest(#[from] veil_image::Error),
    /// The registry answered in a way that breaks the protocol (missing
    /// `Location`, malformed token response, bad `Content-Range`, …).
    #[error("protocol error from registry {registry}: {detail}")]
    Protocol { registry: String, detail: String },
    /// The client configuration is unusable.
    #[error("invalid registry client configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether this error is worth retrying on the same endpoint
    /// (a transport failure).
    pub(crate) fn is_transport(&self) -> bool {
        matches!(self, Error::Transport(_))
    }
}
