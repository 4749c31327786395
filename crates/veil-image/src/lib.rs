//! Pure OCI image-format logic for veil.
//!
//! This crate knows nothing about HTTP, sandboxes or registries. It provides:
//!
//! * [`digest`]: content digests (`sha256:<hex>`), incremental hashing and a
//!   verifying reader;
//! * [`reference`]: parsing and printing image references;
//! * [`manifest`]: OCI / Docker schema2 manifests, indexes and image configs;
//! * [`unpack`]: hardened layer unpacking with OCI whiteouts;
//! * [`build`]: deterministic image building from a directory;
//! * [`crypt`]: layer encryption and decryption in the ocicrypt format;
//! * [`signature`]: cosign/sigstore image signatures and containers-policy.json policies;
//! * [`layout`]: OCI image layout directories.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod build;
pub mod crypt;
pub mod digest;
mod error;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod signature;
pub mod unpack;

pub use digest::Digest;
pub use error::Error;
pub use reference::Reference;

/// Convenience result type for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
