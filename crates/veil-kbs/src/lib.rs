//! veil's key broker (KBS).
//!
//! It speaks the Confidential Containers KBS attestation protocol, version 0.4.0, with the wire
//! types of `kbs-types`:
//!
//! 1. `POST /kbs/v0/auth` — `Request {version, tee, extra-params}` → `Challenge {nonce,
//!    extra-params}` and a `kbs-session-id` cookie.
//! 2. `POST /kbs/v0/attest` — `Attestation {init-data, runtime-data {nonce, tee-pubkey},
//!    tee-evidence}`: the evidence's report data must equal the runtime-data binding
//!    ([`runtime_data_digest`]: the hash, SHA-384 unless the challenge selected another, of
//!    the canonical JSON of the nonce, the key and the additional evidence, exactly as
//!    guest-components and trustee compute it). Init data is a CoCo init-data TOML document
//!    (or absent); veil's [`Assignment`] travels in it as `veil.*` data, and veil's agent binds
//!    its digest through the additional evidence (`{"veil-init-data": "<hex>"}`, announced in
//!    the challenge) because a pooled sandbox learns its assignment after launch; a guest that
//!    bound its init data at launch (HOSTDATA/MRCONFIGID) is accepted as Confidential
//!    Containers binds it. The claims then go through the attestation policy (Rego). Success →
//!    `{"token": "<JWS>"}` and an attested session.
//! 3. `GET /kbs/v0/resource/<repo>/<type>/<tag>` — with the attested session or the token as a
//!    bearer: only the attested tenant's repository, only if the resource policy allows; the
//!    value comes back as a JWE (`ECDH-ES+A256KW`, `A256GCM`) to the sandbox's key.
//!
//! The admin API (`PUT` resources, reference values and policies; `GET` listings) requires a
//! short-lived token signed with the admin key the broker creates at first start
//! ([`admin_token`]). The insecure software TEE (`sample` on the wire) is refused by the default
//! policy unless [`KbsConfig::allow_insecure_software_tee`] is set, and even then only evidence
//! endorsed by a trusted node ([`KbsConfig::software_tee_hosts`]) for the very tenant and
//! function it asks for passes, and only for tenants listed in the reference value
//! [`SOFTWARE_TEE_TENANTS`]. That trusts the host (see `veil_attest::software`).
#![forbid(unsafe_code)]

// The client side (used inside sandboxes) builds without the `server` feature, so the agent
// links no server code: no HTTP server, SQLite, Rego or signing keys.
#[cfg(feature = "server")]
mod broker;
pub mod client;
#[cfg(feature = "server")]
mod decisions;
mod error;
pub mod jwe;
pub mod parse;
#[cfg(feature = "server")]
mod policy;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
mod session;
pub mod statement;
#[cfg(feature = "server")]
mod store;
#[cfg(feature = "server")]
mod token;

#[cfg(feature = "server")]
pub use broker::*;
#[cfg(feature = "reqwest")]
pub use client::ReqwestTransport;
pub use client::{ClientError, KbsClient, Transport};
#[cfg(feature = "server")]
pub use error::{KbsError, Result};
pub use error::{ProtocolError, ERROR_TYPE_PREFIX};
pub use jwe::TeeKeyPair;
pub use parse::{
    parse_attestation, parse_init_data, parse_reference_values, parse_request, parse_resource_path,
    runtime_data_digest, veil_init_data, Assignment, HashAlgorithm, MAX_BODY, PROTOCOL_VERSION,
};
#[cfg(feature = "server")]
pub use policy::{
    Decision, DEFAULT_ATTESTATION_POLICY, DEFAULT_RESOURCE_POLICY, SOFTWARE_TEE_TENANTS,
};
#[cfg(feature = "server")]
#[doc(hidden)]
pub use token::admin_token_at;
#[cfg(feature = "server")]
pub use token::{admin_token, admin_token_with_ttl, TokenClaims, ADMIN_TOKEN_MAX_TTL_SECS};
pub use zeroize::Zeroizing;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "kbs-session-id";
