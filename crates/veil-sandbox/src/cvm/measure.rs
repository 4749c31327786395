//! The SEV-SNP launch measurement: what the AMD secure processor's launch digest will be
//! after QEMU has launched a guest from given firmware, boot blobs and vCPUs.
//!
//! The secure processor keeps a SHA-384 launch digest, starting at 48 zero bytes. Every page
//! the hypervisor adds before launch (`SNP_LAUNCH_UPDATE`) updates it (SEV-SNP firmware ABI
//! specification, "PAGE_INFO"): the new digest is the SHA-384 of a 0x70-byte structure
//!
//! ```text
//! 0x00 DIGEST_CUR[48]  0x30 CONTENTS[48]  0x60 LENGTH:u16 (= 0x70)  0x62 PAGE_TYPE:u8
//! 0x63 IMI_PAGE:u8     0x64 VMPL3_PERMS, VMPL2_PERMS, VMPL1_PERMS:u8, reserved:u8
//! 0x68 GPA:u64
//! ```
//!
//! where CONTENTS is the SHA-384 of the page for normal and VMSA pages and zero for the
//! others. QEMU adds, in this order: the firmware's pages; the SEV metadata sections of the
//! firmware (SEC memory as zero pages, the secrets page, the CPUID page, and the kernel
//! hashes page — the table of [`super::hashes`] when booting a kernel directly, zero pages
//! otherwise); then one VMSA page per vCPU (BSP first), at the fixed GPA `0xFFFFFFFFF000`.

use sha2::{Digest, Sha384};
use std::path::Path;

use super::hashes::{HashesError, KernelHashes};
use super::ovmf::{Ovmf, OvmfError, SectionKind, PAGE_SIZE};
use super::vmsa::{vmsa_page, VmmType, VmsaConfig, BSP_EIP};

/// A launch digest (SHA-384).
pub type Digest48 = [u8; 48];

/// Page types of the PAGE_INFO structure.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum PageType {
    Normal = 1,
    Vmsa = 2,
    Zero = 3,
    Unmeasured = 4,
    Secrets = 5,
    Cpuid = 6,
}

/// VMSA pages are recorded at GPA -1, page-aligned, with the bits above 51 clear.
const VMSA_GPA: u64 = 0x0000_FFFF_FFFF_F000;

/// Errors computing a launch measurement.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// Reading the firmware file failed.
    #[error("reading firmware {path}: {source}")]
    ReadFirmware {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The firmware image is malformed.
    #[error(transparent)]
    Ovmf(#[from] OvmfError),
    /// Hashing the boot blobs failed.
    #[error(transparent)]
    Hashes(#[from] HashesError),
    /// A kernel was given but the firmware cannot verify one.
    #[error("a kernel was given but the firmware's SEV metadata has no SNP_KERNEL_HASHES section (use an OVMF built from OvmfPkg/AmdSev/AmdSevX64.dsc)")]
    NoKernelHashesSection,
    /// The kernel hashes section is not a single page or its table address is missing.
    #[error("the firmware's SNP_KERNEL_HASHES section is {0}")]
    KernelHashesSection(&'static str),
    /// The firmware has no SEV-ES reset block, so no vCPU can be set up.
    #[error("the firmware has no SEV-ES reset block (SEV_ES_RESET_BLOCK_GUID) in its footer table: it cannot start SEV-ES/SNP vCPUs")]
    NoResetBlock,
    /// More than one vCPU but the firmware's AP reset address is 0.
    #[error("{0} vCPUs need an AP reset address, but the firmware's SEV-ES reset block names 0")]
    NoApResetAddress(u32),
    /// A metadata section is not a whole number of pages.
    #[error("the firmware's SEV metadata section at {gpa:#x} is {size:#x} bytes, not whole pages")]
    SectionSize {
        /// The section's guest physical address.
        gpa: u32,
        /// Its size.
        size: u32,
    },
    /// Zero vCPUs.
    #[error("a guest needs at least one vCPU")]
    NoVcpus,
    /// QEMU guests need the CPU signature of their vCPU model.
    #[error("a QEMU guest needs its vCPU type or signature")]
    NoCpuSignature,
}

/// The SNP launch digest being accumulated (the secure processor's GCTX.LD).
#[derive(Debug, Clone)]
pub struct LaunchDigest {
    ld: Digest48,
}

impl Default for LaunchDigest {
    fn default() -> Self {
        LaunchDigest { ld: [0u8; 48] }
    }
}

impl LaunchDigest {
    /// Starts from a given digest instead of zeros (`sev-snp-measure --snp-ovmf-hash`: the
    /// digest after the firmware's pages, computed once for a firmware).
    pub fn from_seed(ld: Digest48) -> Self {
        LaunchDigest { ld }
    }

    /// The current digest.
    pub fn digest(&self) -> Digest48 {
        self.ld
    }

    fn update(&mut self, page_type: PageType, gpa: u64, contents: &Digest48) {
        let mut info = [0u8; 0x70];
        info[..0x30].copy_from_slice(&self.ld);
        info[0x30..0x60].copy_from_slice(contents);
        info[0x60..0x62].copy_from_slice(&0x70u16.to_le_bytes());
        info[0x62] = page_type as u8;
        // IMI_PAGE, the three VMPL permission bytes and the reserved byte stay 0.
        info[0x68..0x70].copy_from_slice(&gpa.to_le_bytes());
        self.ld = Sha384::digest(info).into();
    }

    /// Adds pages with contents (`data` is a whole number of pages).
    pub fn add_normal_pages(&mut self, gpa: u64, data: &[u8]) {
        for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
            let contents: Digest48 = Sha384::digest(page).into();
            self.update(PageType::Normal, gpa + (i * PAGE_SIZE) as u64, &contents);
        }
    }

    /// Adds `len` bytes of zero / unmeasured / secrets / CPUID pages.
    fn add_empty_pages(&mut self, page_type: PageType, gpa: u64, len: u64) {
        for offset in (0..len).step_by(PAGE_SIZE) {
            self.update(page_type, gpa + offset, &[0u8; 48]);
        }
    }

    /// Adds one vCPU's VMSA page.
    pub fn add_vmsa_page(&mut self, page: &[u8]) {
        let contents: Digest48 = Sha384::digest(page).into();
        self.update(PageType::Vmsa, VMSA_GPA, &contents);
    }
}

/// The firmware-only digest: the launch digest after the firmware's own pages
/// (`sev-snp-measure --mode snp:ovmf-hash`).
pub fn ovmf_digest(ovmf: &Ovmf) -> Digest48 {
    let mut ld = LaunchDigest::default();
    ld.add_normal_pages(ovmf.gpa(), ovmf.data());
    ld.digest()
}

/// Everything an SNP launch measurement depends on.
#[derive(Debug, Clone)]
pub struct SnpLaunch<'a> {
    /// The firmware (`-bios`).
    pub ovmf: &'a Ovmf,
    /// Hashes of the directly booted kernel, initrd and command line (`-kernel` with
    /// `kernel-hashes=on`), or `None` for firmware-only boot.
    pub kernel_hashes: Option<&'a KernelHashes>,
    /// The number of vCPUs (`-smp`).
    pub vcpus: u32,
    /// The vCPU model's CPUID signature ([`super::vmsa::cpu_type_signature`]); required for
    /// QEMU.
    pub cpu_signature: Option<u32>,
    /// The VMSA's SEV_FEATURES (QEMU's default: `0x1`, SNP active).
    pub guest_features: u64,
    /// The VMM.
    pub vmm: VmmType,
    /// A precomputed [`ovmf_digest`] of the firmware to start from instead of hashing it.
    pub ovmf_digest: Option<Digest48>,
}

/// Computes the launch measurement.
pub fn snp_launch_digest(launch: &SnpLaunch<'_>) -> Result<Digest48, MeasureError> {
    let ovmf = launch.ovmf;
    if launch.vcpus == 0 {
        return Err(MeasureError::NoVcpus);
    }
    let ap_eip = ovmf.sev_es_reset_eip()?.ok_or(MeasureError::NoResetBlock)?;
    if launch.vcpus > 1 && ap_eip == 0 {
        return Err(MeasureError::NoApResetAddress(launch.vcpus));
    }
    let cpu_signature = match (launch.vmm, launch.cpu_signature) {
        (VmmType::Qemu, None) => return Err(MeasureError::NoCpuSignature),
        (_, sig) => sig.unwrap_or(0),
    };
    if launch.kernel_hashes.is_some() && !ovmf.has_section(SectionKind::KernelHashes) {
        return Err(MeasureError::NoKernelHashesSection);
    }

    let mut ld = match launch.ovmf_digest {
        Some(seed) => LaunchDigest::from_seed(seed),
        None => {
            let mut ld = LaunchDigest::default();
            ld.add_normal_pages(ovmf.gpa(), ovmf.data());
            ld
        }
    };
    for section in ovmf.sections() {
        if !(section.size as usize).is_multiple_of(PAGE_SIZE) {
            return Err(MeasureError::SectionSize {
                gpa: section.gpa,
                size: section.size,
            });
        }
    }
    for section in ovmf.sections() {
        let (gpa, size) = (u64::from(section.gpa), u64::from(section.size));
        match section.kind {
            SectionKind::SecMemory if launch.vmm == VmmType::Gce => {
                ld.add_empty_pages(PageType::Unmeasured, gpa, size)
            }
            SectionKind::SecMemory | SectionKind::SvsmCallingArea => {
                ld.add_empty_pages(PageType::Zero, gpa, size)
            }
            SectionKind::Secrets => ld.add_empty_pages(PageType::Secrets, gpa, PAGE_SIZE as u64),
            // EC2 adds the CPUID page after every other section.
            SectionKind::Cpuid if launch.vmm == VmmType::Ec2 => {}
            SectionKind::Cpuid => ld.add_empty_pages(PageType::Cpuid, gpa, PAGE_SIZE as u64),
            SectionKind::KernelHashes => match launch.kernel_hashes {
                None => ld.add_empty_pages(PageType::Zero, gpa, size),
                Some(hashes) => {
                    if section.size as usize != PAGE_SIZE {
                        return Err(MeasureError::KernelHashesSection("not one page"));
                    }
                    let table_gpa = ovmf
                        .hashes_table_gpa()?
                        .ok_or(MeasureError::KernelHashesSection("without a table address"))?;
                    let offset = (table_gpa as usize) & (PAGE_SIZE - 1);
                    ld.add_normal_pages(gpa, &hashes.page(offset)?);
                }
            },
        }
    }
    if launch.vmm == VmmType::Ec2 {
        for section in ovmf.sections() {
            if section.kind == SectionKind::Cpuid {
                ld.add_empty_pages(PageType::Cpuid, u64::from(section.gpa), PAGE_SIZE as u64);
            }
        }
    }

    let vmsa = VmsaConfig {
        vmm: launch.vmm,
        cpu_signature,
        guest_features: launch.guest_features,
    };
    let bsp = vmsa_page(&vmsa, BSP_EIP);
    let ap = vmsa_page(&vmsa, ap_eip);
    ld.add_vmsa_page(&bsp);
    for _ in 1..launch.vcpus {
        ld.add_vmsa_page(&ap);
    }
    Ok(ld.digest())
}

/// The inputs of `veil measure`, by file.
#[derive(Debug, Clone)]
pub struct MeasureFiles<'a> {
    /// The firmware file.
    pub ovmf: &'a Path,
    /// The kernel (enables measured direct boot).
    pub kernel: Option<&'a Path>,
    /// The initrd (with a kernel).
    pub initrd: Option<&'a Path>,
    /// The kernel command line (with a kernel).
    pub append: Option<&'a str>,
    /// The number of vCPUs.
    pub vcpus: u32,
    /// The vCPU model's CPUID signature.
    pub cpu_signature: Option<u32>,
    /// The VMSA's SEV_FEATURES.
    pub guest_features: u64,
    /// The VMM.
    pub vmm: VmmType,
    /// A precomputed firmware digest.
    pub ovmf_digest: Option<Digest48>,
}

/// The default SEV_FEATURES of an SNP guest: SNP active.
pub const DEFAULT_GUEST_FEATURES: u64 = 0x1;

/// Reads and hashes the files and computes the launch measurement.
pub fn measure_files(files: &MeasureFiles<'_>) -> Result<Digest48, MeasureError> {
    let data = std::fs::read(files.ovmf).map_err(|source| MeasureError::ReadFirmware {
        path: files.ovmf.to_owned(),
        source,
    })?;
    let ovmf = Ovmf::parse(data)?;
    let hashes = match files.kernel {
        Some(kernel) => Some(KernelHashes::from_files(
            kernel,
            files.initrd,
            files.append,
        )?),
        None => None,
    };
    snp_launch_digest(&SnpLaunch {
        ovmf: &ovmf,
        kernel_hashes: hashes.as_ref(),
        vcpus: files.vcpus,
        cpu_signature: files.cpu_signature,
        guest_features: files.guest_features,
        vmm: files.vmm,
        ovmf_digest: files.ovmf_digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cvm::ovmf::{synthetic_image, TEST_HASH_TABLE_GUID, TEST_RESET_BLOCK_GUID};

    fn image(reset: Option<u32>, sections: &[(u32, u32, u32)]) -> Ovmf {
        let mut entries = vec![(TEST_HASH_TABLE_GUID, {
            let mut v = 0x0080_fc00u32.to_le_bytes().to_vec();
            v.extend_from_slice(&0x400u32.to_le_bytes());
            v
        })];
        if let Some(eip) = reset {
            entries.push((TEST_RESET_BLOCK_GUID, eip.to_le_bytes().to_vec()));
        }
        Ovmf::parse(synthetic_image(8, &entries, Some(sections))).expect("parse")
    }

    fn launch<'a>(ovmf: &'a Ovmf, hashes: Option<&'a KernelHashes>, vcpus: u32) -> SnpLaunch<'a> {
        SnpLaunch {
            ovmf,
            kernel_hashes: hashes,
            vcpus,
            cpu_signature: Some(0x0080_0f12),
            guest_features: DEFAULT_GUEST_FEATURES,
            vmm: VmmType::Qemu,
            ovmf_digest: None,
        }
    }

    #[test]
    fn page_info_update_rule() {
        // One zero page at GPA 0x1000 from the zero digest: SHA-384 of the 0x70-byte
        // PAGE_INFO built by hand.
        let mut ld = LaunchDigest::default();
        ld.add_empty_pages(PageType::Zero, 0x1000, PAGE_SIZE as u64);
        let mut info = vec![0u8; 0x70];
        info[0x60] = 0x70;
        info[0x62] = 3;
        info[0x69] = 0x10;
        assert_eq!(ld.digest(), <Digest48>::from(Sha384::digest(&info)));
    }

    #[test]
    fn seeded_digest_equals_hashing_the_firmware() {
        let ovmf = image(Some(0x0080_b004), &[(0x80_0000, 0x2000, 1)]);
        let plain = snp_launch_digest(&launch(&ovmf, None, 2)).expect("digest");
        let seeded = snp_launch_digest(&SnpLaunch {
            ovmf_digest: Some(ovmf_digest(&ovmf)),
            ..launch(&ovmf, None, 2)
        })
        .expect("digest");
        assert_eq!(plain, seeded);
    }

    /// Inputs that must be refused, with the error each must name.
    #[test]
    fn refusals() {
        fn check(result: Result<Digest48, MeasureError>, expect: &str) {
            let err = result.expect_err("must fail").to_string();
            assert!(err.contains(expect), "{err:?} does not contain {expect:?}");
        }
        let hashes = KernelHashes::from_bytes(b"k", b"i", Some("x"));
        let no_hashes_section = image(Some(0x0080_b004), &[(0x80_0000, 0x1000, 1)]);
        let with_hashes = image(Some(0x0080_b004), &[(0x80_f000, 0x1000, 0x10)]);
        let two_page_hashes = image(Some(0x0080_b004), &[(0x80_f000, 0x2000, 0x10)]);
        let no_reset = image(None, &[]);
        let zero_reset = image(Some(0), &[]);
        let odd_section = image(Some(0x0080_b004), &[(0x80_0000, 0x800, 1)]);

        check(
            snp_launch_digest(&launch(&no_hashes_section, Some(&hashes), 1)),
            "SNP_KERNEL_HASHES",
        );
        check(
            snp_launch_digest(&launch(&two_page_hashes, Some(&hashes), 1)),
            "not one page",
        );
        check(
            snp_launch_digest(&launch(&no_reset, None, 1)),
            "reset block",
        );
        check(
            snp_launch_digest(&launch(&odd_section, None, 1)),
            "not whole pages",
        );
        check(snp_launch_digest(&launch(&zero_reset, None, 2)), "2 vCPUs");
        check(
            snp_launch_digest(&launch(&with_hashes, None, 0)),
            "at least one",
        );
        check(
            snp_launch_digest(&SnpLaunch {
                cpu_signature: None,
                ..launch(&with_hashes, None, 1)
            }),
            "vCPU type",
        );
        // One vCPU with AP address 0 is fine, and a kernel changes the digest.
        let a = snp_launch_digest(&launch(&zero_reset, None, 1)).expect("one vCPU");
        let b = snp_launch_digest(&launch(&with_hashes, None, 1)).expect("no kernel");
        let c = snp_launch_digest(&launch(&with_hashes, Some(&hashes), 1)).expect("kernel");
        assert_ne!(a, b);
        assert_ne!(b, c);
    }

    #[test]
    fn every_input_changes_the_digest() {
        let ovmf = image(
            Some(0x0080_b004),
            &[
                (0x80_0000, 0x1000, 1),
                (0x80_d000, 0x1000, 2),
                (0x80_e000, 0x1000, 3),
                (0x80_f000, 0x1000, 0x10),
            ],
        );
        let hashes = KernelHashes::from_bytes(b"k", b"i", Some("x"));
        let base = launch(&ovmf, Some(&hashes), 2);
        let variants = [
            SnpLaunch {
                vcpus: 3,
                ..base.clone()
            },
            SnpLaunch {
                cpu_signature: Some(0x00a0_0f11),
                ..base.clone()
            },
            SnpLaunch {
                guest_features: 0x21,
                ..base.clone()
            },
            SnpLaunch {
                vmm: VmmType::Ec2,
                ..base.clone()
            },
            SnpLaunch {
                vmm: VmmType::Gce,
                ..base.clone()
            },
            SnpLaunch {
                kernel_hashes: None,
                ..base.clone()
            },
        ];
        let base_digest = snp_launch_digest(&base).expect("base");
        let mut seen = vec![base_digest];
        for v in &variants {
            let d = snp_launch_digest(v).expect("variant");
            assert!(!seen.contains(&d), "{v:?} gave a digest already seen");
            seen.push(d);
        }
    }
}
