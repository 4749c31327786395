//! QEMU arguments of a confidential guest, per QEMU's documentation
//! (`docs/system/i386/amd-memory-encryption.rst`, QEMU 9.1+, and `docs/system/i386/tdx.rst`,
//! QEMU 10.1+).
//!
//! These are the arguments that make a guest confidential and fix what is measured: machine,
//! launch-security object, guest memory, CPU model and count, firmware and the directly
//! booted kernel. The caller adds the rest (`-nodefaults`, `-display none`, the channel's
//! virtio-serial chardev, QMP, …), none of which is measured.
//!
//! An SNP guest's measurement depends on every measured input here, so [`SnpGuest`] also
//! computes it ([`SnpGuest::measurement`]): the command line and the reference value come
//! from one description.

use std::ffi::OsString;
use std::path::Path;

use super::measure::{measure_files, MeasureError, MeasureFiles, DEFAULT_GUEST_FEATURES};
use super::vmsa::{cpu_type_names, cpu_type_signature, VmmType};
use super::Measurement;

/// Errors building a command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QemuError {
    /// The policy allows debugging, which lets the host read and write guest memory.
    #[error("SNP policy {0:#x} allows debugging (bit 19, DEBUG): refused, the host could read the guest's memory")]
    DebugPolicy(u64),
    /// The policy sets bits the SNP ABI reserves.
    #[error("SNP policy {0:#x} sets reserved bits (26 and above)")]
    ReservedPolicyBits(u64),
    /// The policy clears bit 17, which the SNP ABI requires set.
    #[error("SNP policy {0:#x} clears bit 17, which must be one")]
    MustBeOne(u64),
    /// No vCPUs.
    #[error("a confidential guest needs at least one vCPU")]
    NoVcpus,
    /// No memory.
    #[error("a confidential guest needs memory")]
    NoMemory,
    /// A CPU model whose signature (and so the SNP measurement) is unknown.
    #[error("unknown SNP vCPU model {model:?} (known: {known})")]
    UnknownCpuModel {
        /// What was asked for.
        model: String,
        /// The models that are known.
        known: String,
    },
}

/// An SEV-SNP guest policy (SNP firmware ABI, "Guest Policy"): bits 0–7 the minimum ABI
/// minor, 8–15 the minimum ABI major, 16 SMT allowed, 17 reserved (must be one), 18
/// migration agent allowed, 19 debugging allowed, 20 single socket, 21–25 later features.
///
/// Constructing one refuses debugging: a guest whose policy allows it is not confidential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnpPolicy(u64);

impl SnpPolicy {
    /// SMT allowed.
    pub const SMT: u64 = 1 << 16;
    /// Reserved, must be one.
    pub const RESERVED_MBO: u64 = 1 << 17;
    /// A migration agent may be associated.
    pub const MIGRATE_MA: u64 = 1 << 18;
    /// Debugging allowed.
    pub const DEBUG: u64 = 1 << 19;
    /// Single socket only.
    pub const SINGLE_SOCKET: u64 = 1 << 20;

    /// Checks a raw policy.
    pub fn new(bits: u64) -> Result<Self, QemuError> {
        if bits & Self::DEBUG != 0 {
            return Err(QemuError::DebugPolicy(bits));
        }
        if bits >> 26 != 0 {
            return Err(QemuError::ReservedPolicyBits(bits));
        }
        if bits & Self::RESERVED_MBO == 0 {
            return Err(QemuError::MustBeOne(bits));
        }
        Ok(SnpPolicy(bits))
    }

    /// The raw bits.
    pub fn bits(self) -> u64 {
        self.0
    }
}

impl Default for SnpPolicy {
    /// `0x30000`: SMT allowed, the must-be-one bit, no debugging, no migration agent (QEMU's
    /// default too).
    fn default() -> Self {
        SnpPolicy(Self::SMT | Self::RESERVED_MBO)
    }
}

/// An SEV-SNP guest booted directly into a kernel whose hashes the firmware checks.
#[derive(Debug, Clone)]
pub struct SnpGuest<'a> {
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// QEMU's CPU model (`EPYC-v4`, `EPYC-Milan`, …); its signature is measured.
    pub cpu_model: &'a str,
    /// OVMF built from `OvmfPkg/AmdSev/AmdSevX64.dsc` (with the SNP kernel-hashes section).
    pub firmware: &'a Path,
    /// The kernel.
    pub kernel: &'a Path,
    /// The initrd.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub append: Option<&'a str>,
    /// The guest policy.
    pub policy: SnpPolicy,
    /// The C-bit position in page table entries (51 on Milan, Genoa and Turin).
    pub cbitpos: u32,
    /// Physical address bits lost to memory encryption (1 on those CPUs).
    pub reduced_phys_bits: u32,
}

impl<'a> SnpGuest<'a> {
    /// A guest with the usual defaults: `EPYC-v4`, the default policy, C-bit 51, one reduced
    /// physical address bit.
    pub fn new(firmware: &'a Path, kernel: &'a Path, memory_mib: u64, vcpus: u32) -> Self {
        SnpGuest {
            memory_mib,
            vcpus,
            cpu_model: "EPYC-v4",
            firmware,
            kernel,
            initrd: None,
            append: None,
            policy: SnpPolicy::default(),
            cbitpos: 51,
            reduced_phys_bits: 1,
        }
    }

    fn cpu_signature(&self) -> Result<u32, QemuError> {
        cpu_type_signature(self.cpu_model).ok_or_else(|| QemuError::UnknownCpuModel {
            model: self.cpu_model.to_owned(),
            known: cpu_type_names().collect::<Vec<_>>().join(", "),
        })
    }

    /// The launch measurement this guest will report (reads the firmware, kernel and initrd).
    pub fn measurement(&self) -> Result<Measurement, SnpGuestError> {
        let cpu_signature = self.cpu_signature()?;
        Ok(Measurement(measure_files(&MeasureFiles {
            ovmf: self.firmware,
            kernel: Some(self.kernel),
            initrd: self.initrd,
            append: self.append,
            vcpus: self.vcpus,
            cpu_signature: Some(cpu_signature),
            guest_features: DEFAULT_GUEST_FEATURES,
            vmm: VmmType::Qemu,
            ovmf_digest: None,
        })?))
    }
}

/// Errors computing an [`SnpGuest`]'s measurement.
#[derive(Debug, thiserror::Error)]
pub enum SnpGuestError {
    /// The guest's description is refused.
    #[error(transparent)]
    Guest(#[from] QemuError),
    /// The measurement could not be computed.
    #[error(transparent)]
    Measure(#[from] MeasureError),
}

fn common(memory_mib: u64, vcpus: u32) -> Result<(), QemuError> {
    if vcpus == 0 {
        return Err(QemuError::NoVcpus);
    }
    if memory_mib == 0 {
        return Err(QemuError::NoMemory);
    }
    Ok(())
}

/// A confidential guest's arguments: `head` (accelerator, machine, launch objects, CPU), then
/// its vCPUs and memory, then measured direct boot of `kernel` (and `initrd`, `append`) by
/// `firmware`.
fn guest_args(
    head: Vec<String>,
    vcpus: u32,
    memory_mib: u64,
    firmware: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    append: Option<&str>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = head
        .into_iter()
        .chain([
            "-smp".to_owned(),
            vcpus.to_string(),
            "-m".to_owned(),
            format!("{memory_mib}M"),
        ])
        .map(OsString::from)
        .collect();
    args.push("-bios".into());
    args.push(firmware.into());
    args.push("-kernel".into());
    args.push(kernel.into());
    if let Some(initrd) = initrd {
        args.push("-initrd".into());
        args.push(initrd.into());
    }
    if let Some(append) = append {
        args.push("-append".into());
        args.push(append.into());
    }
    args
}

/// The arguments of an SEV-SNP guest.
pub fn snp_args(guest: &SnpGuest<'_>) -> Result<Vec<OsString>, QemuError> {
    common(guest.memory_mib, guest.vcpus)?;
    guest.cpu_signature()?;
    // Re-check: the fields are public, so the policy may have been built by hand.
    let policy = SnpPolicy::new(guest.policy.bits())?;
    let mem = guest.memory_mib;
    let head = vec![
        "-accel".to_owned(),
        "kvm".to_owned(),
        "-machine".to_owned(),
        "q35,confidential-guest-support=sev0,memory-backend=ram1".to_owned(),
        "-object".to_owned(),
        format!("memory-backend-memfd,id=ram1,size={mem}M,share=true,prealloc=false"),
        "-object".to_owned(),
        format!(
            "sev-snp-guest,id=sev0,cbitpos={},reduced-phys-bits={},kernel-hashes=on,policy={:#x}",
            guest.cbitpos,
            guest.reduced_phys_bits,
            policy.bits()
        ),
        "-cpu".to_owned(),
        guest.cpu_model.to_owned(),
    ];
    Ok(guest_args(
        head,
        guest.vcpus,
        mem,
        guest.firmware,
        guest.kernel,
        guest.initrd,
        guest.append,
    ))
}

/// An Intel TDX guest (a trust domain) booted directly into a kernel.
#[derive(Debug, Clone)]
pub struct TdxGuest<'a> {
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// TDVF: an OVMF with TDX support (`OvmfPkg/IntelTdx/IntelTdxX64.dsc`, or an `OVMF.fd`
    /// whose footer table has TDX metadata).
    pub firmware: &'a Path,
    /// The kernel.
    pub kernel: &'a Path,
    /// The initrd.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub append: Option<&'a str>,
}

/// The arguments of a TDX guest. The TD's attributes are QEMU's defaults, in which the
/// DEBUG attribute (bit 0) is clear.
pub fn tdx_args(guest: &TdxGuest<'_>) -> Result<Vec<OsString>, QemuError> {
    common(guest.memory_mib, guest.vcpus)?;
    let head = vec![
        "-accel".to_owned(),
        "kvm".to_owned(),
        "-machine".to_owned(),
        "q35,confidential-guest-support=tdx0,kernel-irqchip=split".to_owned(),
        "-object".to_owned(),
        "tdx-guest,id=tdx0".to_owned(),
        "-cpu".to_owned(),
        "host".to_owned(),
    ];
    Ok(guest_args(
        head,
        guest.vcpus,
        guest.memory_mib,
        guest.firmware,
        guest.kernel,
        guest.initrd,
        guest.append,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.into_string().expect("utf-8"))
            .collect()
    }

    fn check(got: Result<Vec<OsString>, QemuError>, expect: &[&str]) {
        let got = strings(got.expect("arguments"));
        assert_eq!(got, expect);
    }

    #[test]
    fn snp_command_lines() {
        let fw = Path::new("/usr/share/veil/OVMF.amdsev.fd");
        let kernel = Path::new("/var/lib/veil/guest/vmlinuz");
        let initrd = Path::new("/var/lib/veil/guest/initrd.img");
        let mut guest = SnpGuest::new(fw, kernel, 512, 2);
        check(
            snp_args(&guest),
            &[
                "-accel",
                "kvm",
                "-machine",
                "q35,confidential-guest-support=sev0,memory-backend=ram1",
                "-object",
                "memory-backend-memfd,id=ram1,size=512M,share=true,prealloc=false",
                "-object",
                "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,policy=0x30000",
                "-cpu",
                "EPYC-v4",
                "-smp",
                "2",
                "-m",
                "512M",
                "-bios",
                "/usr/share/veil/OVMF.amdsev.fd",
                "-kernel",
                "/var/lib/veil/guest/vmlinuz",
            ],
        );
        guest.initrd = Some(initrd);
        guest.append = Some("console=hvc0 quiet veil.channel=virtio-serial");
        guest.cpu_model = "EPYC-Genoa";
        guest.memory_mib = 128;
        guest.vcpus = 16;
        guest.policy =
            SnpPolicy::new(SnpPolicy::RESERVED_MBO | SnpPolicy::SINGLE_SOCKET).expect("policy");
        check(
            snp_args(&guest),
            &[
                "-accel",
                "kvm",
                "-machine",
                "q35,confidential-guest-support=sev0,memory-backend=ram1",
                "-object",
                "memory-backend-memfd,id=ram1,size=128M,share=true,prealloc=false",
                "-object",
                "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,policy=0x120000",
                "-cpu",
                "EPYC-Genoa",
                "-smp",
                "16",
                "-m",
                "128M",
                "-bios",
                "/usr/share/veil/OVMF.amdsev.fd",
                "-kernel",
                "/var/lib/veil/guest/vmlinuz",
                "-initrd",
                "/var/lib/veil/guest/initrd.img",
                "-append",
                "console=hvc0 quiet veil.channel=virtio-serial",
            ],
        );
    }

    #[test]
    fn tdx_command_lines() {
        let fw = Path::new("/usr/share/ovmf/OVMF.inteltdx.fd");
        let kernel = Path::new("/k");
        check(
            tdx_args(&TdxGuest {
                memory_mib: 256,
                vcpus: 1,
                firmware: fw,
                kernel,
                initrd: Some(Path::new("/i")),
                append: Some("console=hvc0"),
            }),
            &[
                "-accel",
                "kvm",
                "-machine",
                "q35,confidential-guest-support=tdx0,kernel-irqchip=split",
                "-object",
                "tdx-guest,id=tdx0",
                "-cpu",
                "host",
                "-smp",
                "1",
                "-m",
                "256M",
                "-bios",
                "/usr/share/ovmf/OVMF.inteltdx.fd",
                "-kernel",
                "/k",
                "-initrd",
                "/i",
                "-append",
                "console=hvc0",
            ],
        );
    }

    /// Policies and the verdict on each.
    #[test]
    fn policies() {
        fn check(bits: u64, expect: Result<(), QemuError>) {
            assert_eq!(SnpPolicy::new(bits).map(|_| ()), expect, "{bits:#x}");
        }
        check(0x30000, Ok(()));
        check(0x20000, Ok(()));
        check(0x30000 | SnpPolicy::MIGRATE_MA, Ok(()));
        check(0x30000 | 0x1f, Ok(())); // a minimum ABI minor
        check(
            0x30000 | SnpPolicy::DEBUG,
            Err(QemuError::DebugPolicy(0xb0000)),
        );
        check(0xb0000, Err(QemuError::DebugPolicy(0xb0000)));
        check(0x10000, Err(QemuError::MustBeOne(0x10000)));
        check(
            0x30000 | 1 << 26,
            Err(QemuError::ReservedPolicyBits(0x4030000)),
        );
        assert_eq!(SnpPolicy::default().bits(), 0x30000);
    }

    /// Guests that must be refused, and the error each gives.
    #[test]
    fn refused_guests() {
        let fw = Path::new("/fw");
        let k = Path::new("/k");
        let base = SnpGuest::new(fw, k, 512, 1);
        let debug = SnpGuest {
            // Built by hand, bypassing SnpPolicy::new: snp_args still refuses it.
            policy: SnpPolicy(0xb0000),
            ..base.clone()
        };
        assert_eq!(snp_args(&debug), Err(QemuError::DebugPolicy(0xb0000)));
        assert_eq!(
            snp_args(&SnpGuest {
                vcpus: 0,
                ..base.clone()
            }),
            Err(QemuError::NoVcpus)
        );
        assert_eq!(
            snp_args(&SnpGuest {
                memory_mib: 0,
                ..base.clone()
            }),
            Err(QemuError::NoMemory)
        );
        let err = snp_args(&SnpGuest {
            cpu_model: "host",
            ..base
        })
        .expect_err("host CPU model");
        assert!(err.to_string().contains("EPYC-Milan"), "{err}");
        assert_eq!(
            tdx_args(&TdxGuest {
                memory_mib: 1,
                vcpus: 0,
                firmware: fw,
                kernel: k,
                initrd: None,
                append: None,
            }),
            Err(QemuError::NoVcpus)
        );
    }
}
