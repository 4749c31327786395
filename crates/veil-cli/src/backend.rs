//! Which sandboxes `veil up` runs functions in, and how each backend is started.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use veil_node::{Node, NodeConfig};
use veil_sandbox::microvm::{Accel, Confidential, MicroVmBackend, MicroVmConfig};

/// The backend choice of `veil up --backend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    /// Namespace sandboxes (the default): the host can read them.
    Process,
    /// QEMU microVMs booting the veil guest (kernel + initrd whose `/init` is veil-agent).
    MicroVm(MicroVmOptions),
    /// Confidential VMs (SEV-SNP or TDX guests with measured direct boot).
    Cvm(CvmOptions),
}

/// Options of the microVM backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroVmOptions {
    /// A prebuilt guest (`veil guest build --out DIR`); default: built afresh into
    /// `<state dir>/guest` at every start from the running veil's agent.
    pub guest_dir: Option<PathBuf>,
    /// Accelerator: auto (KVM if a probe guest boots under it in time, else TCG), kvm, tcg.
    pub accel: Accel,
    /// Memory of each VM in bytes.
    pub memory_bytes: u64,
}

impl Default for MicroVmOptions {
    fn default() -> Self {
        Self {
            guest_dir: None,
            accel: Accel::Auto,
            memory_bytes: 256 << 20,
        }
    }
}

/// The TEE of a confidential VM (the sandbox crate's, which its host check takes).
pub use veil_sandbox::cvm::Tee;

/// Options of the confidential-VM backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CvmOptions {
    /// Which TEE.
    pub tee: Tee,
    /// The firmware (an OVMF with the SNP kernel-hashes section, or TDVF).
    pub firmware: Option<PathBuf>,
    /// A prebuilt (measured) guest; default: built at start like the microVM backend's.
    pub guest_dir: Option<PathBuf>,
}

impl BackendChoice {
    /// Parse `--backend` with its companion flags.
    pub fn parse(
        backend: &str,
        tee: Option<Tee>,
        accel: Accel,
        guest_dir: Option<PathBuf>,
        firmware: Option<PathBuf>,
    ) -> Result<Self> {
        Ok(match backend {
            "process" | "namespace" => Self::Process,
            "microvm" => Self::MicroVm(MicroVmOptions {
                guest_dir,
                accel,
                ..MicroVmOptions::default()
            }),
            "cvm" => match tee {
                Some(tee) => Self::Cvm(CvmOptions {
                    tee,
                    firmware,
                    guest_dir,
                }),
                None => bail!("--backend cvm needs --tee snp or --tee tdx"),
            },
            o => bail!("--backend {o:?} is not process, microvm or cvm"),
        })
    }
}

/// Build the guest into `out` from the agent next to this veil; a confidential guest from the
/// confidential guests' kernel ([`veil_guest::CVM_KERNEL_DIR`]), whose drivers let the agent
/// get attestation reports.
fn build_guest(out: &Path, confidential: bool) -> Result<veil_guest::GuestArtifacts> {
    let agent = veil_node::find_agent();
    let mut cfg = veil_guest::GuestConfig::new(agent, out.to_path_buf());
    if confidential {
        if !Path::new(veil_guest::CVM_KERNEL_DIR).is_dir() {
            bail!(
                "no kernel for confidential guests in {} (run scripts/install-deps.sh: it \
                 unpacks Debian trixie's cloud kernel there, whose SEV-SNP/TDX guest drivers \
                 the attester needs)",
                veil_guest::CVM_KERNEL_DIR
            );
        }
        cfg.kernel_dir = PathBuf::from(veil_guest::CVM_KERNEL_DIR);
    }
    let built = veil_guest::build(&cfg).with_context(|| {
        format!(
            "build the microVM guest into {} (the kernel comes from scripts/install-deps.sh)",
            out.display()
        )
    })?;
    tracing::info!(
        kernel = %built.kernel.path.display(),
        initrd = %built.initrd.path.display(),
        initrd_bytes = built.initrd.size,
        initrd_sha256 = %built.initrd.sha256,
        "guest built"
    );
    Ok(built)
}

/// Start the node on the chosen backend.
pub async fn start_node(choice: &BackendChoice, ncfg: NodeConfig) -> Result<Arc<Node>> {
    match choice {
        BackendChoice::Process => Ok(Node::new(ncfg).context("start the node")?),
        BackendChoice::MicroVm(o) => vm_node(ncfg, o, None).await,
        BackendChoice::Cvm(o) => {
            // Refuse before building anything, naming what this host lacks.
            cvm_host_check(o)?;
            let firmware = o.firmware.clone().unwrap_or_default();
            let confidential = match o.tee {
                Tee::Snp => Confidential::Snp {
                    firmware,
                    cpu_model: "EPYC-v4".into(),
                },
                Tee::Tdx => Confidential::Tdx { firmware },
            };
            let vm = MicroVmOptions {
                guest_dir: o.guest_dir.clone(),
                accel: Accel::Kvm,
                ..MicroVmOptions::default()
            };
            vm_node(ncfg, &vm, Some(confidential)).await
        }
    }
}

/// A node whose sandboxes are VMs booting the veil guest: plain microVMs, or confidential
/// guests launched with measured direct boot.
async fn vm_node(
    mut ncfg: NodeConfig,
    o: &MicroVmOptions,
    confidential: Option<Confidential>,
) -> Result<Arc<Node>> {
    let state = ncfg.state_dir.clone();
    let (kernel, initrd, cmdline) = match &o.guest_dir {
        Some(dir) => {
            let cmdline = std::fs::read_to_string(dir.join("cmdline")).with_context(|| {
                format!(
                    "read {} (build the guest with `veil guest build --out {}`)",
                    dir.join("cmdline").display(),
                    dir.display()
                )
            })?;
            (dir.join("vmlinuz"), dir.join("initrd.img"), cmdline)
        }
        None => {
            let g = build_guest(&state.join("guest"), confidential.is_some())?;
            (g.kernel.path, g.initrd.path, g.cmdline)
        }
    };
    let mut vcfg = MicroVmConfig::new(kernel, initrd, cmdline, state.join("vms"));
    vcfg.accel = o.accel;
    // Only ever added under TCG, and never to a confidential (measured) command line.
    vcfg.tcg_append = veil_guest::tcg_clock_param();
    vcfg.confidential = confidential;
    let backend = MicroVmBackend::start(vcfg)
        .await
        .context("start the VM backend")?;
    ncfg.memory_bytes = o.memory_bytes;
    // The function's root is unpacked into guest memory, within the VM's memory.
    ncfg.rootfs_bytes = ncfg.rootfs_bytes.min(o.memory_bytes / 2);
    Node::with_backend(ncfg, Arc::new(backend)).context("start the node")
}

/// Confidential VMs need SEV-SNP or TDX hardware, a kernel that exposes it to KVM, a QEMU
/// that launches such guests and the matching firmware: refuse, naming what is missing.
fn cvm_host_check(o: &CvmOptions) -> Result<()> {
    let Some(firmware) = &o.firmware else {
        bail!(
            "--backend cvm needs --firmware: {}",
            match o.tee {
                Tee::Snp =>
                    "an OVMF built from edk2's AmdSevX64 (with the SNP kernel-hashes section)",
                Tee::Tdx => "a TDVF (edk2's IntelTdx OVMF)",
            }
        );
    };
    let probe = veil_sandbox::cvm::HostProbe::system("qemu-system-x86_64", firmware);
    veil_sandbox::cvm::check_host(o.tee, &probe).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_flags() {
        assert_eq!(
            BackendChoice::parse("process", None, Accel::Auto, None, None).unwrap(),
            BackendChoice::Process
        );
        assert!(matches!(
            BackendChoice::parse("microvm", None, Accel::Tcg, None, None).unwrap(),
            BackendChoice::MicroVm(MicroVmOptions {
                accel: Accel::Tcg,
                ..
            })
        ));
        let e = BackendChoice::parse("cvm", None, Accel::Auto, None, None).unwrap_err();
        assert!(e.to_string().contains("--tee"), "{e}");
        let e = BackendChoice::parse("firecracker", None, Accel::Auto, None, None).unwrap_err();
        assert!(e.to_string().contains("process, microvm or cvm"), "{e}");
    }

    /// This machine has no SEV-SNP or TDX: the refusal names what is missing.
    #[test]
    fn cvm_refuses_naming_what_is_missing() {
        let e = cvm_host_check(&CvmOptions {
            tee: Tee::Snp,
            firmware: None,
            guest_dir: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--firmware"), "{e}");
        if Path::new("/dev/sev").exists() {
            return; // a real SNP host: what follows is this machine's refusal
        }
        let e = cvm_host_check(&CvmOptions {
            tee: Tee::Snp,
            firmware: Some("/nonexistent/OVMF.fd".into()),
            guest_dir: None,
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/dev/sev") && e.contains("/nonexistent/OVMF.fd"),
            "{e}"
        );
        let e = cvm_host_check(&CvmOptions {
            tee: Tee::Tdx,
            firmware: Some("/nonexistent/tdvf.fd".into()),
            guest_dir: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("tdx"), "{e}");
    }
}
