//! Confidential VMs (feature `cvm`): what launching a function in an AMD SEV-SNP or Intel TDX
//! guest needs on the host side, short of running one.
//!
//! - [`measure`]: the SEV-SNP launch measurement a guest will report, computed from the
//!   firmware ([`ovmf`]), the directly booted kernel/initrd/cmdline ([`hashes`]) and one VMSA
//!   per vCPU ([`vmsa`]). It equals what `sev-snp-measure` computes for the same inputs
//!   (tested against the real tool), so the value can be registered with a key broker as the
//!   reference measurement before any guest runs.
//! - [`qemu`]: the QEMU arguments of a confidential guest (`sev-snp-guest` with
//!   `kernel-hashes=on` and a policy that refuses debugging; `tdx-guest`).
//! - [`host`]: whether this host can launch one, naming what is missing.
//!
//! None of this needs SEV-SNP or TDX hardware; nothing here opens a device.

#![forbid(unsafe_code)]

pub mod hashes;
pub mod host;
pub mod measure;
pub mod ovmf;
pub mod qemu;
pub mod vmsa;

#[cfg(test)]
mod tests;

pub use hashes::KernelHashes;
pub use host::{check_host, HostError, HostProbe, Tee};
pub use measure::{measure_files, snp_launch_digest, MeasureError, MeasureFiles, SnpLaunch};
pub use ovmf::Ovmf;
pub use qemu::{snp_args, tdx_args, SnpGuest, SnpPolicy, TdxGuest};
pub use vmsa::VmmType;

use base64::Engine as _;

/// A launch measurement, as `sev-snp-measure` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement(pub measure::Digest48);

/// How to print a measurement (`--output-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Lowercase hex (the default).
    Hex,
    /// Standard base64 with padding.
    Base64,
}

impl Measurement {
    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Standard base64.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// In the given format.
    pub fn format(&self, format: OutputFormat) -> String {
        match format {
            OutputFormat::Hex => self.to_hex(),
            OutputFormat::Base64 => self.to_base64(),
        }
    }
}

impl std::fmt::Display for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}
