//! The gateway's durable state behind one trait: functions, their immutable revisions and
//! traffic, and asynchronous invocations. [`sqlite::SqliteStore`] (`<state>/state.db`) is the
//! embedded implementation `veil up` uses; the multi-node work puts etcd behind the same trait.
//!
//! Every method is one transaction: it either happened, durably, before it returns `Ok`, or
//! not at all. Callers change their in-memory state only after the store said yes, so an
//! acknowledged change survives a SIGKILL at any moment, and a refused one leaves nothing.

pub mod sqlite;

use crate::functions::FunctionRecord;
use std::collections::HashMap;
use std::path::PathBuf;

/// Where a share of a function's requests goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficTarget {
    /// The revision; absent: the latest one (`@latest`), which follows every new deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// Percent of the untagged requests (all targets together: 100).
    pub percent: u32,
    /// A name that addresses this target alone (`/f/<fn>@<tag>/`, `Host: <tag>.<fn><suffix>`),
    /// whatever its percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

impl TrafficTarget {
    /// All traffic to the latest revision: what a new function gets.
    pub fn latest() -> Vec<TrafficTarget> {
        vec![TrafficTarget {
            revision: None,
            percent: 100,
            tag: None,
        }]
    }
}

/// One function as stored.
#[derive(Debug, Clone)]
pub struct StoredFunction {
    /// Its revisions, oldest first (at least one).
    pub revisions: Vec<FunctionRecord>,
    /// Where its requests go.
    pub traffic: Vec<TrafficTarget>,
}

/// An asynchronous invocation's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvocationState {
    /// Accepted, waiting for a worker (also after a crash interrupted an attempt).
    Queued,
    /// An attempt is running.
    Running,
    /// The function answered (any status below 500).
    Succeeded,
    /// Every attempt failed; `error` says why.
    Failed,
}

/// An asynchronous invocation: the request as accepted, and the result once there is one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Invocation {
    /// Unguessable id (128 random bits, hex).
    pub id: String,
    /// The function and its tenant, fixed at acceptance.
    pub function: String,
    /// Owning tenant (who may read the result, with the operator).
    pub tenant: String,
    /// The tag the request addressed, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Progress.
    pub state: InvocationState,
    /// Attempts started so far.
    pub attempts: u32,
    /// When it was accepted and last changed (milliseconds since the Unix epoch).
    pub created_ms: u64,
    /// Last change.
    pub updated_ms: u64,
    /// The request: method, function-relative path and query, headers, body.
    pub request: StoredRequest,
    /// The function's answer, once it succeeded (or the last one, if it failed with a 5xx).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<StoredResponse>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A request kept for an asynchronous invocation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredRequest {
    /// HTTP method.
    pub method: String,
    /// Function-relative path and query.
    pub path: String,
    /// Headers (name, value), hop-by-hop and veil's own removed.
    pub headers: Vec<(String, String)>,
    /// Body.
    #[serde(with = "b64")]
    pub body: Vec<u8>,
}

/// A function's answer kept for an asynchronous invocation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers (name, value).
    pub headers: Vec<(String, String)>,
    /// Body.
    #[serde(with = "b64")]
    pub body: Vec<u8>,
}

mod b64 {
    use base64::Engine;
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database (or a legacy file being imported) is not what veil wrote: veil refuses
    /// to start on it rather than carry on with what it could read.
    #[error(
        "state database {path} is corrupt: {reason} (move it away to start empty, or restore \
         a backup)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Written by a newer veil: its schema is unknown here.
    #[error(
        "state database {path} has schema version {found}; this veil knows versions up to \
         {known} (was it written by a newer veil?)"
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// Another process holds the database.
    #[error("state database {path} is in use by another veil (one state directory per veil)")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// SQLite failed (disk full, I/O error, …).
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store's worker thread failed.
    #[error("state database: {0}")]
    Io(#[from] std::io::Error),
    /// A value could not be encoded.
    #[error("state database: cannot encode {what}: {source}")]
    Encode {
        /// What.
        what: &'static str,
        /// Why.
        source: serde_json::Error,
    },
}

/// Everything the gateway keeps across restarts.
pub trait Store: Send + Sync {
    /// Every function, by name.
    fn load(&self) -> Result<HashMap<String, StoredFunction>, StoreError>;

    /// Add a revision of `record.name` (creating the function, with `traffic`, if it is new;
    /// otherwise setting its traffic to `traffic`) and drop the revisions in `prune`. The store
    /// numbers the revision — one more than any this name ever had, also before a delete — and
    /// writes the number into `record`.
    fn add_revision(
        &self,
        record: &mut FunctionRecord,
        traffic: &[TrafficTarget],
        prune: &[u64],
    ) -> Result<(), StoreError>;

    /// Set a function's traffic.
    fn set_traffic(&self, name: &str, traffic: &[TrafficTarget]) -> Result<(), StoreError>;

    /// Delete a function with its revisions and its asynchronous invocations (its revision
    /// counter stays). False if absent.
    fn delete_function(&self, name: &str) -> Result<bool, StoreError>;

    /// Store a new asynchronous invocation.
    fn insert_invocation(&self, inv: &Invocation) -> Result<(), StoreError>;

    /// Replace an invocation's state; false if it is gone (its function was deleted).
    fn update_invocation(&self, inv: &Invocation) -> Result<bool, StoreError>;

    /// One invocation.
    fn invocation(&self, id: &str) -> Result<Option<Invocation>, StoreError>;

    /// Invocations not finished (queued, or running when the process died), oldest first.
    fn unfinished_invocations(&self) -> Result<Vec<Invocation>, StoreError>;

    /// Delete the finished invocations last changed before `before_ms`; returns how many.
    fn expire_invocations(&self, before_ms: u64) -> Result<usize, StoreError>;
}
