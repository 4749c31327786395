//! Wire types and the multiplexed channel shared by the node and the agent.
//!
//! The agent's only link to the outside is one byte stream (a unix socket for namespace
//! sandboxes; vsock or a virtio-serial port for VMs). [`mux`] splits that stream into many
//! substreams with yamux; each substream starts with one [`StreamKind`] byte and then carries one
//! HTTP/1.1 exchange. This crate holds no server logic of either side.
#![forbid(unsafe_code)]

pub mod loglimit;
pub mod mux;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a substream carries; the opener writes this byte first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamKind {
    /// Node → agent: control API (`/assign`, `/health`).
    Control = b'C',
    /// Node → agent: one function invocation (any method and path).
    Invoke = b'I',
    /// Agent → node: the OCI distribution API subset (manifests and blobs by digest).
    Registry = b'R',
    /// Agent → node: HTTP requests the node relays, unread, to the tenant's key broker.
    Kbs = b'K',
    /// Agent → node: the sandbox's log, one line per record ([`LogSource`] byte, text,
    /// newline). Not HTTP: a plain line stream, opened once by the agent.
    Log = b'L',
}

/// The version of the node–agent protocol (this crate's wire types and substream kinds). The
/// agent reports it in its health answer and the node refuses an agent that speaks another:
/// an agent baked into a measured guest image cannot be swapped silently.
pub const PROTOCOL_VERSION: u32 = 3;

/// The agent's answer to `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// The agent's own version (its crate version).
    pub agent: String,
    /// Where the agent runs: `namespace` or `guest`.
    pub platform: String,
}

/// Who wrote a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// The function's stdout.
    Stdout,
    /// The function's stderr.
    Stderr,
    /// The agent itself.
    Agent,
}

impl LogSource {
    /// The record's first byte.
    pub fn byte(self) -> u8 {
        match self {
            LogSource::Stdout => b'O',
            LogSource::Stderr => b'E',
            LogSource::Agent => b'A',
        }
    }

    /// Decode a record's first byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'O' => Some(Self::Stdout),
            b'E' => Some(Self::Stderr),
            b'A' => Some(Self::Agent),
            _ => None,
        }
    }
}

/// One log record on the `L` substream: source byte, the line (newlines replaced), newline.
pub fn log_record(source: LogSource, line: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(line.len() + 2);
    v.push(source.byte());
    v.extend(line.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
    v.push(b'\n');
    v
}

impl StreamKind {
    /// Decode the first byte of a substream.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'C' => Some(Self::Control),
            b'I' => Some(Self::Invoke),
            b'R' => Some(Self::Registry),
            b'K' => Some(Self::Kbs),
            b'L' => Some(Self::Log),
            _ => None,
        }
    }
}

/// Path of the control endpoint that binds a sandbox to a function.
pub const ASSIGN_PATH: &str = "/assign";
/// Path of the control endpoint that reports agent liveness.
pub const HEALTH_PATH: &str = "/health";
/// Request header of a tenant-attested sandbox's assignment statement to its key broker
/// (`veil_kbs::statement::STATEMENT_HEADER`), which the node relays with the request.
pub const KBS_STATEMENT_HEADER: &str = "kbs-veil-assignment";
/// Response header by which the agent names the tenant its sandbox is bound to.
pub const SANDBOX_TENANT_HEADER: &str = "x-veil-sandbox-tenant";
/// Path of the control endpoint that attests a pooled sandbox to one tenant ahead of demand.
pub const PREPARE_PATH: &str = "/prepare";

/// Sent by the node to bind an idle pooled sandbox to one tenant ahead of any function: the
/// agent attests to the tenant's broker with init data of tenant scope and keeps the session
/// (and its key) for the function it will be assigned. From then on the sandbox serves that
/// tenant only; an assignment for another tenant is refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preparation {
    /// The tenant.
    pub tenant: String,
    /// Use the insecure software TEE where no SEV-SNP or TDX device exists.
    pub allow_software_tee: bool,
    /// The node's software-TEE credential, endorsed for this tenant and any of its functions.
    #[serde(default)]
    pub software_tee: Option<SoftwareTeeCredential>,
}

/// Reply to a successful preparation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PrepareReply {
    /// When the broker's token expires (seconds since the epoch), if it says.
    pub token_expires_at: Option<u64>,
    /// Time the attestation took, in milliseconds.
    pub attest_ms: f64,
}

/// Sent by the node to bind an idle sandbox to one tenant's function.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// Tenant that owns the function; a sandbox never serves another tenant.
    pub tenant: String,
    /// Function name (for logs and errors).
    pub function: String,
    /// The image reference as the user wrote it. It is bound into the attestation's init data
    /// (a tenant's broker can pin it), selects the signature policy's scope, and a digest it
    /// names must be the assigned manifest's or its index's.
    pub image: String,
    /// Repository the image lives in, as the node's registry endpoint names it.
    pub repository: String,
    /// Manifest digest the deployment resolved the reference to; the agent checks every byte
    /// it receives against this.
    pub manifest_digest: String,
    /// Extra environment for the function (on top of the image's and `PORT`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Port the function must listen on inside the sandbox (`PORT`).
    pub port: u16,
    /// Maximum concurrent invocations the agent lets through.
    pub concurrency: u32,
    /// How long the function may take to accept connections on `port`.
    pub ready_timeout_ms: u64,
    /// Attestation to the tenant's key broker, if the function needs secrets.
    #[serde(default)]
    pub attestation: Option<AttestationPlan>,
    /// Digests of the signature manifests (cosign/sigstore) the node found for the image. A
    /// hint only: the agent checks the signatures against the tenant's policy itself, and a
    /// node that withholds them makes a policy that requires a signature fail.
    #[serde(default)]
    pub signatures: Vec<String>,
    /// The index `manifest_digest` was selected from, for multi-platform images: a signature
    /// of the index covers the manifest once the agent has checked the index lists it.
    #[serde(default)]
    pub index_digest: Option<String>,
}

/// What the agent does with the tenant's key broker before starting the function.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttestationPlan {
    /// Environment variable → broker resource path (`<repo>/<type>/<tag>`). The values are
    /// released to the sandbox only, wrapped to its ephemeral key; the node never sees them.
    pub secrets: BTreeMap<String, String>,
    /// Use the insecure software TEE when no SEV-SNP or TDX device exists (development only;
    /// the broker still refuses it unless its own policy allows it).
    pub allow_software_tee: bool,
    /// Broker resources holding the private keys (PEM) that decrypt the image's encrypted
    /// layers; fetched after attestation, used only inside the sandbox.
    #[serde(default)]
    pub image_keys: Vec<String>,
    /// Broker resource holding the tenant's containers-policy.json; the image must satisfy it
    /// (its `keyPath`s name further broker resources: `kbs:///<repo>/<type>/<tag>`).
    #[serde(default)]
    pub signature_policy: Option<String>,
    /// The host's credential for the INSECURE software TEE: a key for this sandbox and the
    /// node's endorsement of it for this tenant and function. Only used where no SEV-SNP or
    /// TDX device exists; without it the software TEE cannot attest.
    #[serde(default)]
    pub software_tee: Option<SoftwareTeeCredential>,
}

/// A sandbox's software-TEE credential, issued by the node at assignment (see
/// `veil_attest::software`): what lets a broker tell the node's sandboxes from any local
/// process. It trusts the host, like everything about the software TEE.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SoftwareTeeCredential {
    /// The sandbox's Ed25519 signing key (hex seed). Never logged.
    pub signing_key: String,
    /// The node's endorsement of that key (`<payload>.<signature>`, base64url).
    pub endorsement: String,
}

impl std::fmt::Debug for SoftwareTeeCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareTeeCredential")
            .field("signing_key", &"<redacted>")
            .field("endorsement", &self.endorsement)
            .finish()
    }
}

/// Timings of the phases of an assignment, in milliseconds, measured inside the sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseTimings {
    /// Manifest and config fetched and verified.
    pub manifest_ms: f64,
    /// All layers fetched, verified and unpacked (streamed together).
    pub layers_ms: f64,
    /// Function process spawned.
    pub spawn_ms: f64,
    /// From spawn until the function accepted a connection on its port.
    pub ready_ms: f64,
    /// Bytes of layer blobs received.
    pub layer_bytes: u64,
    /// Signatures fetched and checked against the tenant's policy (0 without a policy).
    #[serde(default)]
    pub signature_ms: f64,
    /// Attestation to the key broker (0 when the function has no secrets, and for a sandbox
    /// that attested ahead of its assignment).
    #[serde(default)]
    pub attest_ms: f64,
    /// Release of secrets, image keys and the signature policy by the attested broker.
    #[serde(default)]
    pub release_ms: f64,
    /// The sandbox had attested to its tenant before it was assigned (a tenant-attested pool):
    /// no attestation on the request path.
    #[serde(default)]
    pub attested_ahead: bool,
}

/// Reply to a successful assignment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssignReply {
    /// Host-visible pid of nothing: the pid of the function inside the sandbox's pid namespace.
    pub function_pid: u32,
    /// Phase timings measured by the agent.
    pub timings: PhaseTimings,
}

/// Error body returned by the agent's control API and by the node's registry endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// Short machine-readable code, e.g. `IMAGE_PULL`, `FUNCTION_EXITED`.
    pub code: String,
    /// Human-readable message naming what failed and why.
    pub message: String,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that proxies on the invocation path drop.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Header the agent sets on invocation replies it generated itself (not the function), so that
/// callers can tell a platform error from a function's own response.
pub const AGENT_ERROR_HEADER: &str = "x-veil-agent-error";
