//! `veil guest build`: the microVM guest artifacts (kernel, initrd with veil-agent as `/init`,
//! kernel command line), built by the veil-guest library and reported with their digests.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::PathBuf;
use veil_guest::{GuestArtifacts, GuestConfig};

/// Options of `veil guest build`.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Output directory (default: `<state dir>/guest`, where the microVM backend looks).
    pub out: Option<PathBuf>,
    /// The veil-agent binary (default: found like the node finds it).
    pub agent: Option<PathBuf>,
    /// Kernel image instead of the newest in the kernel directory.
    pub kernel: Option<PathBuf>,
    /// Its `lib/modules/<version>` directory.
    pub modules_dir: Option<PathBuf>,
    /// Where the kernel package was unpacked.
    pub kernel_dir: Option<PathBuf>,
    /// Kernel command line instead of [`veil_guest::DEFAULT_CMDLINE`].
    pub cmdline: Option<String>,
    /// Keep the agent's symbols.
    pub no_strip: bool,
}

/// Where `veil guest build` puts the artifacts by default.
pub fn default_out_dir() -> PathBuf {
    crate::default_state_dir().join("guest")
}

/// Build the guest artifacts.
pub fn build(o: &BuildOptions) -> Result<GuestArtifacts> {
    let agent = o.agent.clone().unwrap_or_else(veil_node::find_agent);
    let mut cfg = GuestConfig::new(agent, o.out.clone().unwrap_or_else(default_out_dir));
    if let Some(d) = &o.kernel_dir {
        cfg.kernel_dir = d.clone();
    }
    cfg.kernel = o.kernel.clone();
    cfg.modules_dir = o.modules_dir.clone();
    if let Some(c) = &o.cmdline {
        cfg.cmdline = c.clone();
    }
    cfg.strip = !o.no_strip;
    veil_guest::build(&cfg).context("build the guest")
}

/// What `veil guest build` prints: one line per artifact with path, size and SHA-256, the
/// kernel command line, and the modules in the initrd.
pub fn report(a: &GuestArtifacts) -> String {
    let mut s = String::new();
    for (what, f) in [("kernel", &a.kernel), ("initrd", &a.initrd)] {
        let _ = writeln!(
            s,
            "{what:<8} {}  {} bytes  sha256:{}",
            f.path.display(),
            f.size,
            f.sha256
        );
    }
    let _ = writeln!(s, "cmdline  {}  {:?}", a.cmdline_path.display(), a.cmdline);
    let _ = writeln!(
        s,
        "kernel {} with modules: {}",
        a.kernel_version,
        a.modules.join(" ")
    );
    s
}

/// The SEV-SNP launch measurement of this guest booted with `firmware` (an OVMF built from
/// edk2's AmdSevX64, which has the kernel-hashes section measured direct boot needs) on
/// `vcpus` vCPUs of QEMU's default `EPYC-v4` model, and the broker command that registers it.
pub fn measurement_report(
    a: &GuestArtifacts,
    firmware: &std::path::Path,
    vcpus: u32,
) -> anyhow::Result<String> {
    let mut g = veil_sandbox::cvm::qemu::SnpGuest::new(firmware, &a.kernel.path, 256, vcpus);
    g.initrd = Some(&a.initrd.path);
    g.append = Some(&a.cmdline);
    let m = g.measurement().map_err(|e| {
        anyhow::anyhow!("SNP measurement with firmware {}: {e}", firmware.display())
    })?;
    Ok(format!(
        "snp-measurement {m}  ({vcpus} vCPU, {}, firmware {})\n\
         register it: veil kbs set-reference-values measurement {m}\n",
        g.cpu_model,
        firmware.display()
    ))
}
