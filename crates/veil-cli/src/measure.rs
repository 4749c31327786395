//! `veil measure` (a module of the `veil` binary): the expected SEV-SNP launch measurement.
//! Flag names, defaults and output follow `sev-snp-measure` (its `--mode` is `--tee` here,
//! the old name kept as an alias); the computation is `veil_sandbox::cvm`.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use veil_sandbox::cvm::measure::{measure_files, MeasureFiles, DEFAULT_GUEST_FEATURES};
use veil_sandbox::cvm::vmsa::{cpu_signature, cpu_type_names, cpu_type_signature};
use veil_sandbox::cvm::{Measurement, OutputFormat, VmmType};

/// The TEE whose measurement to compute.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MeasureTee {
    /// AMD SEV-SNP.
    #[value(alias = "sev-snp", alias = "SNP", alias = "SEV-SNP")]
    Snp,
}

/// `--output-format`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// Lowercase hex.
    Hex,
    /// Base64.
    Base64,
}

#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// The TEE (sev-snp-measure's --mode).
    #[arg(long, alias = "mode")]
    tee: MeasureTee,
    /// Number of guest vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: u32,
    /// Type of guest vCPU (QEMU's CPU model).
    #[arg(long, value_name = "CPUTYPE", value_parser = cpu_type)]
    vcpu_type: Option<String>,
    /// Guest vCPU signature value.
    #[arg(long, value_name = "VALUE", value_parser = int::<u32>)]
    vcpu_sig: Option<u32>,
    /// Guest vCPU family (with --vcpu-model and --vcpu-stepping).
    #[arg(long, value_name = "FAMILY", requires_all = ["vcpu_model", "vcpu_stepping"])]
    vcpu_family: Option<u32>,
    /// Guest vCPU model.
    #[arg(long, value_name = "MODEL")]
    vcpu_model: Option<u32>,
    /// Guest vCPU stepping.
    #[arg(long, value_name = "STEPPING")]
    vcpu_stepping: Option<u32>,
    /// Type of guest VMM (QEMU, ec2, gce).
    #[arg(long, value_name = "VMMTYPE", default_value = "QEMU", value_parser = vmm_type)]
    vmm_type: VmmType,
    /// OVMF file to calculate the measurement from.
    #[arg(long, value_name = "PATH")]
    ovmf: PathBuf,
    /// Kernel file (measured direct boot).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initrd file (with --kernel).
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel).
    #[arg(long, value_name = "CMDLINE", requires = "kernel")]
    append: Option<String>,
    /// The VMSA's SEV_FEATURES (guest kernel features).
    #[arg(long, value_name = "VALUE", value_parser = int::<u64>, default_value_t = DEFAULT_GUEST_FEATURES)]
    guest_features: u64,
    /// Measurement output format.
    #[arg(long, value_enum, default_value = "hex")]
    output_format: Format,
    /// Precalculated hash of the OVMF binary (hex), as `sev-snp-measure --mode snp:ovmf-hash`
    /// prints it.
    #[arg(long, value_name = "HASH")]
    snp_ovmf_hash: Option<String>,
    /// Print "Calculated SEV_SNP guest measurement: …".
    #[arg(short, long)]
    verbose: bool,
}

/// An integer in Python's `int(s, 0)` notations: decimal, `0x…`, `0o…`, `0b…`.
fn int<T: TryFrom<u64>>(s: &str) -> Result<T, String> {
    let t = s.trim().replace('_', "");
    let lower = t.to_ascii_lowercase();
    let parsed = if let Some(h) = lower.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else if let Some(o) = lower.strip_prefix("0o") {
        u64::from_str_radix(o, 8)
    } else if let Some(b) = lower.strip_prefix("0b") {
        u64::from_str_radix(b, 2)
    } else {
        lower.parse::<u64>()
    };
    let value = parsed.map_err(|e| format!("{s:?}: {e}"))?;
    T::try_from(value).map_err(|_| format!("{s:?} is out of range"))
}

fn cpu_type(s: &str) -> Result<String, String> {
    if cpu_type_signature(s).is_some() {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "unknown vCPU type (known: {})",
            cpu_type_names().collect::<Vec<_>>().join(", ")
        ))
    }
}

fn vmm_type(s: &str) -> Result<VmmType, String> {
    VmmType::from_name(s).ok_or_else(|| format!("unknown VMM type {s:?} (QEMU, ec2, gce)"))
}

/// Computes and prints the measurement.
pub fn run(a: &MeasureArgs) -> Result<()> {
    let MeasureTee::Snp = a.tee;
    // Which vCPU signature, in sev-snp-measure's order of precedence.
    let cpu = match (a.vcpu_family, a.vcpu_model, a.vcpu_stepping) {
        (Some(f), Some(m), Some(s)) => Some(cpu_signature(f, m, s)),
        _ => a
            .vcpu_sig
            .or_else(|| a.vcpu_type.as_deref().and_then(cpu_type_signature)),
    };
    if cpu.is_none() && a.vmm_type == VmmType::Qemu {
        bail!("missing --vcpu-type or --vcpu-sig or --vcpu-family in guest mode 'snp'");
    }
    let ovmf_digest =
        match &a.snp_ovmf_hash {
            None => None,
            Some(h) => {
                let bytes = hex::decode(h.trim()).context("--snp-ovmf-hash is not hex")?;
                Some(<[u8; 48]>::try_from(bytes.as_slice()).map_err(|_| {
                    anyhow::anyhow!("--snp-ovmf-hash must be 48 bytes (96 hex digits)")
                })?)
            }
        };
    let digest = measure_files(&MeasureFiles {
        ovmf: &a.ovmf,
        kernel: a.kernel.as_deref(),
        initrd: a.initrd.as_deref(),
        append: a.append.as_deref(),
        vcpus: a.vcpus,
        cpu_signature: cpu,
        guest_features: a.guest_features,
        vmm: a.vmm_type,
        ovmf_digest,
    })?;
    let m = Measurement(digest).format(match a.output_format {
        Format::Hex => OutputFormat::Hex,
        Format::Base64 => OutputFormat::Base64,
    });
    if a.verbose {
        println!("Calculated SEV_SNP guest measurement: {m}");
    } else {
        println!("{m}");
    }
    Ok(())
}
