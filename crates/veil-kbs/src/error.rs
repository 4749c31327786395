//! Errors of the library API and of the HTTP protocol.

#[cfg(feature = "server")]
use std::path::PathBuf;

/// Prefix of the `type` field of every error body (the same namespace trustee uses, so KBS
/// clients that look at it understand ours).
pub const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";

#[cfg(feature = "server")]
/// Errors of the broker's library API (opening it, admin operations).
#[derive(Debug, thiserror::Error)]
pub enum KbsError {
    /// A file or directory of the broker's state could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The SQLite store failed.
    #[error("key broker storage: {0}")]
    Storage(#[from] rusqlite::Error),
    /// A key file exists but does not hold a key.
    #[error("invalid key file {}: {reason}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A Rego policy does not compile or does not have the expected shape.
    #[error("policy does not compile: {0}")]
    Policy(String),
    /// A resource path is not `<repo>/<type>/<tag>` with safe segments.
    #[error("invalid resource path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// Why.
        reason: String,
    },
    /// A resource value or reference value is not acceptable.
    #[error("invalid value: {0}")]
    InvalidValue(String),
    /// A token could not be made.
    #[error("token: {0}")]
    Token(String),
}

#[cfg(feature = "server")]
/// Result of the library API.
pub type Result<T, E = KbsError> = std::result::Result<T, E>;

/// An error answered over HTTP: a status, a kind (last part of the `type` field) and a clear,
/// secret-free message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {kind}: {detail}")]
pub struct ProtocolError {
    /// HTTP status code.
    pub status: u16,
    /// Short machine-readable kind, e.g. `ProtocolVersion`.
    pub kind: &'static str,
    /// Human-readable message; never contains a secret.
    pub detail: String,
}

impl ProtocolError {
    /// A new error.
    pub fn new(status: u16, kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            detail: detail.into(),
        }
    }
    /// 400 Bad Request.
    pub fn bad_request(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::new(400, kind, detail)
    }
    /// 401 Unauthorized.
    pub fn unauthorized(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::new(401, kind, detail)
    }
    /// 403 Forbidden.
    pub fn forbidden(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::new(403, kind, detail)
    }
    /// 404 Not Found.
    pub fn not_found(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::new(404, kind, detail)
    }
    /// 500 Internal Server Error.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(500, "InternalError", detail)
    }

    /// The JSON body: `{"type": "<prefix><kind>", "detail": "..."}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "type": format!("{ERROR_TYPE_PREFIX}{}", self.kind),
            "detail": self.detail,
        })
    }
}

#[cfg(feature = "server")]
impl From<KbsError> for ProtocolError {
    fn from(e: KbsError) -> Self {
        match e {
            e @ KbsError::Policy(_) => ProtocolError::bad_request("PolicyInvalid", e.to_string()),
            e @ KbsError::InvalidPath { .. } => {
                ProtocolError::bad_request("InvalidResourcePath", e.to_string())
            }
            e @ KbsError::InvalidValue(_) => {
                ProtocolError::bad_request("InvalidValue", e.to_string())
            }
            e => ProtocolError::internal(e.to_string()),
        }
    }
}
