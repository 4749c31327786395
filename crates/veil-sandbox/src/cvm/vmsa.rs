//! The initial VM save area (VMSA) of each vCPU, which an SEV-SNP launch measures as one page
//! per vCPU.
//!
//! The VMSA is the encrypted register state the CPU loads when a vCPU first runs. Its layout
//! is the SEV-ES state save area of AMD's APM volume 2 (table B-4; `struct sev_es_save_area`
//! in Linux). Only the registers the VMM sets at reset are non-zero. The boot processor (BSP)
//! starts at the architectural reset vector `0xfffffff0`; application processors (APs)
//! start at the SEV-ES reset address OVMF publishes in its footer table. What the VMM puts
//! there differs slightly between QEMU/KVM, AWS EC2 and Google Compute Engine, and the CPU
//! signature (family/model/stepping, which KVM puts into RDX at reset) depends on the vCPU
//! model.

use super::ovmf::PAGE_SIZE;

/// The reset vector of the boot processor.
pub const BSP_EIP: u32 = 0xffff_fff0;

/// Who launched the guest: the initial register state differs between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmType {
    /// QEMU with KVM (the default).
    Qemu,
    /// AWS EC2.
    Ec2,
    /// Google Compute Engine.
    Gce,
}

impl VmmType {
    /// Parses the names `sev-snp-measure --vmm-type` accepts (`QEMU`, `ec2`, `gce`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "QEMU" => Some(Self::Qemu),
            "ec2" => Some(Self::Ec2),
            "gce" => Some(Self::Gce),
            _ => None,
        }
    }

    /// The name `sev-snp-measure` uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qemu => "QEMU",
            Self::Ec2 => "ec2",
            Self::Gce => "gce",
        }
    }
}

/// The 32-bit CPUID signature (CPUID Fn0000_0001 EAX) of a family, model and stepping, with
/// AMD's extended family/model encoding.
pub const fn cpu_signature(family: u32, model: u32, stepping: u32) -> u32 {
    let (family_low, family_high) = if family > 0xf {
        (0xf, (family - 0xf) & 0xff)
    } else {
        (family, 0)
    };
    (family_high << 20)
        | (((model >> 4) & 0xf) << 16)
        | (family_low << 8)
        | ((model & 0xf) << 4)
        | (stepping & 0xf)
}

/// QEMU's AMD EPYC CPU models and their (family, model, stepping).
const CPU_TYPES: &[(&str, (u32, u32, u32))] = &[
    ("EPYC", (23, 1, 2)),
    ("EPYC-v1", (23, 1, 2)),
    ("EPYC-v2", (23, 1, 2)),
    ("EPYC-IBPB", (23, 1, 2)),
    ("EPYC-v3", (23, 1, 2)),
    ("EPYC-v4", (23, 1, 2)),
    ("EPYC-Rome", (23, 49, 0)),
    ("EPYC-Rome-v1", (23, 49, 0)),
    ("EPYC-Rome-v2", (23, 49, 0)),
    ("EPYC-Rome-v3", (23, 49, 0)),
    ("EPYC-Milan", (25, 1, 1)),
    ("EPYC-Milan-v1", (25, 1, 1)),
    ("EPYC-Milan-v2", (25, 1, 1)),
    ("EPYC-Genoa", (25, 17, 0)),
    ("EPYC-Genoa-v1", (25, 17, 0)),
    ("EPYC-Turin", (26, 0, 0)),
];

/// The names of the CPU types [`cpu_type_signature`] knows.
pub fn cpu_type_names() -> impl Iterator<Item = &'static str> {
    CPU_TYPES.iter().map(|(name, _)| *name)
}

/// The CPU signature of a QEMU CPU model name (`EPYC-v4`, `EPYC-Milan`, …).
pub fn cpu_type_signature(name: &str) -> Option<u32> {
    CPU_TYPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, (f, m, s))| cpu_signature(*f, *m, *s))
}

// Offsets in the save area (APM vol. 2, table B-4).
const ES: usize = 0x000;
const CS: usize = 0x010;
const SS: usize = 0x020;
const DS: usize = 0x030;
const FS: usize = 0x040;
const GS: usize = 0x050;
const GDTR: usize = 0x060;
const LDTR: usize = 0x070;
const IDTR: usize = 0x080;
const TR: usize = 0x090;
const EFER: usize = 0x0d0;
const CR4: usize = 0x148;
const CR0: usize = 0x158;
const DR7: usize = 0x160;
const DR6: usize = 0x168;
const RFLAGS: usize = 0x170;
const RIP: usize = 0x178;
const G_PAT: usize = 0x268;
const RDX: usize = 0x310;
const SEV_FEATURES: usize = 0x3b0;
const XCR0: usize = 0x3e8;
const MXCSR: usize = 0x408;
const X87_FCW: usize = 0x410;

/// The initial register state every vCPU of one guest shares.
#[derive(Debug, Clone, Copy)]
pub struct VmsaConfig {
    /// The VMM that launches the guest.
    pub vmm: VmmType,
    /// The CPU signature KVM puts in RDX (used by QEMU only; EC2 and GCE put `0x600`).
    pub cpu_signature: u32,
    /// The VMSA's SEV_FEATURES (bit 0: SNP active; `sev-snp-measure --guest-features`).
    pub guest_features: u64,
}

/// The VMSA page of a vCPU starting at `eip`.
pub fn vmsa_page(cfg: &VmsaConfig, eip: u32) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    let (cs_attr, ss_attr, tr_attr) = match cfg.vmm {
        VmmType::Qemu | VmmType::Gce => (0x9b, 0x93, 0x8b),
        // EC2's BSP code segment is not marked accessed.
        VmmType::Ec2 if eip == BSP_EIP => (0x9a, 0x92, 0x83),
        VmmType::Ec2 => (0x9b, 0x92, 0x83),
    };
    let (rdx, mxcsr, fcw) = match cfg.vmm {
        VmmType::Qemu => (u64::from(cfg.cpu_signature), 0x1f80, 0x37f),
        VmmType::Ec2 | VmmType::Gce => (0x600, 0, 0),
    };
    // PAT's reset value (APM vol. 2, A.3); GCE's hypervisor writes its own.
    let g_pat = match cfg.vmm {
        VmmType::Gce => 0x0007_0106,
        VmmType::Qemu | VmmType::Ec2 => 0x0007_0406_0007_0406,
    };
    let mut seg = |at: usize, selector: u16, attr: u16, base: u64| {
        page[at..at + 2].copy_from_slice(&selector.to_le_bytes());
        page[at + 2..at + 4].copy_from_slice(&attr.to_le_bytes());
        page[at + 4..at + 8].copy_from_slice(&0xffffu32.to_le_bytes());
        page[at + 8..at + 16].copy_from_slice(&base.to_le_bytes());
    };
    seg(ES, 0, 0x93, 0);
    seg(CS, 0xf000, cs_attr, u64::from(eip & 0xffff_0000));
    seg(SS, 0, ss_attr, 0);
    seg(DS, 0, 0x93, 0);
    seg(FS, 0, 0x93, 0);
    seg(GS, 0, 0x93, 0);
    seg(GDTR, 0, 0, 0);
    seg(LDTR, 0, 0x82, 0);
    seg(IDTR, 0, 0, 0);
    seg(TR, 0, tr_attr, 0);
    let mut put = |at: usize, value: u64| page[at..at + 8].copy_from_slice(&value.to_le_bytes());
    put(EFER, 0x1000); // SVME, which KVM sets.
    put(CR4, 0x40); // MCE, which KVM sets.
    put(CR0, 0x10); // ET.
    put(DR7, 0x400);
    put(DR6, 0xffff_0ff0);
    put(RFLAGS, 0x2);
    put(RIP, u64::from(eip & 0xffff));
    put(G_PAT, g_pat);
    put(RDX, rdx);
    put(SEV_FEATURES, cfg.guest_features);
    put(XCR0, 0x1);
    page[MXCSR..MXCSR + 4].copy_from_slice(&(mxcsr as u32).to_le_bytes());
    page[X87_FCW..X87_FCW + 2].copy_from_slice(&(fcw as u16).to_le_bytes());
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_signatures() {
        fn check(name: &str, expect: u32) {
            assert_eq!(cpu_type_signature(name), Some(expect), "{name}");
        }
        check("EPYC", 0x0080_0f12);
        check("EPYC-v4", 0x0080_0f12);
        check("EPYC-Rome", 0x0083_0f10);
        check("EPYC-Milan", 0x00a0_0f11);
        check("EPYC-Genoa", 0x00a1_0f10);
        check("EPYC-Turin", 0x00b0_0f00);
        assert_eq!(cpu_type_signature("Skylake"), None);
        assert_eq!(cpu_signature(6, 0x55, 4), 0x0005_0654);
    }

    #[test]
    fn bsp_and_ap_differ_in_cs_and_rip() {
        let cfg = VmsaConfig {
            vmm: VmmType::Qemu,
            cpu_signature: 0x0080_0f12,
            guest_features: 1,
        };
        let bsp = vmsa_page(&cfg, BSP_EIP);
        let ap = vmsa_page(&cfg, 0x0080_b004);
        assert_eq!(&bsp[CS + 8..CS + 16], &0xffff_0000u64.to_le_bytes());
        assert_eq!(&bsp[RIP..RIP + 8], &0xfff0u64.to_le_bytes());
        assert_eq!(&ap[CS + 8..CS + 16], &0x0080_0000u64.to_le_bytes());
        assert_eq!(&ap[RIP..RIP + 8], &0xb004u64.to_le_bytes());
        let differing: Vec<usize> = (0..PAGE_SIZE).filter(|&i| bsp[i] != ap[i]).collect();
        assert!(differing
            .iter()
            .all(|&i| (CS + 8..CS + 16).contains(&i) || (RIP..RIP + 8).contains(&i)));
        assert_eq!(&bsp[RDX..RDX + 8], &0x0080_0f12u64.to_le_bytes());
        assert_eq!(&bsp[SEV_FEATURES..SEV_FEATURES + 8], &1u64.to_le_bytes());
    }

    #[test]
    fn vmm_names_round_trip() {
        for vmm in [VmmType::Qemu, VmmType::Ec2, VmmType::Gce] {
            assert_eq!(VmmType::from_name(vmm.name()), Some(vmm));
        }
        assert_eq!(VmmType::from_name("qemu"), None);
    }
}
