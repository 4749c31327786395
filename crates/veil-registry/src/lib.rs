//! A client for the OCI distribution API (pull and push of manifests and
//! blobs), with basic and bearer-token authentication, mirrors, throttling
//! retries and resumable blob downloads.
#![forbid(unsafe_code)]

pub mod challenge;
mod client;
mod config;
mod error;

pub use challenge::{parse_challenges, Challenge};
pub use client::{BlobStream, FetchedManifest, RegistryClient, ResolvedImage, MAX_MANIFEST_SIZE};
pub use config::RegistryConfig;
pub use error::Error;
