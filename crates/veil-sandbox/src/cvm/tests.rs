//! The SNP launch measurement against independent values: the real `sev-snp-measure` (PyPI,
//! installed by scripts/install-deps.sh) run on the same inputs, and values it computed once,
//! recorded here.
//!
//! Firmware: Debian's own OVMF (`ovmf` package: OVMF_CODE.fd and the unified ovmf/OVMF.fd
//! have SEV metadata without the kernel-hashes section, OVMF_CODE_4M.fd has no SEV metadata
//! at all) for firmware-only boot, and the AmdSevX64 OVMF in testdata/ovmf-amdsev (a real build; see its README) for
//! measured direct boot. A missing tool or firmware fails these tests; nothing is skipped.

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::measure::{measure_files, MeasureFiles, DEFAULT_GUEST_FEATURES};
use super::vmsa::{cpu_type_signature, VmmType};
use super::{Measurement, OutputFormat};

const FIXTURE_SHA256: &str = "f56a60cf5f1ccf77fd3d214d7f4b1175d794178d7d3655b08d268dac7a4cd4e9";

/// The AmdSevX64 OVMF, unpacked into `dir`.
fn amdsev_ovmf(dir: &Path) -> PathBuf {
    let gz = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/ovmf-amdsev/OVMF.amdsev.fd.gz");
    let file = std::fs::File::open(&gz).expect("testdata/ovmf-amdsev/OVMF.amdsev.fd.gz");
    let mut data = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut data)
        .expect("gunzip fixture");
    let digest: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        digest, FIXTURE_SHA256,
        "the fixture is not the one its README describes"
    );
    let path = dir.join("OVMF.amdsev.fd");
    std::fs::write(&path, data).expect("write fixture");
    path
}

/// Deterministic stand-ins for a kernel and an initrd: the measurement hashes their bytes,
/// whatever they are.
fn boot_blobs(dir: &Path) -> (PathBuf, PathBuf) {
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    let mut x: u32 = 0x1234_5678;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    std::fs::write(&kernel, bytes(3 << 20)).expect("kernel");
    std::fs::write(&initrd, bytes(1 << 20)).expect("initrd");
    (kernel, initrd)
}

/// One set of inputs, in `sev-snp-measure`'s terms.
#[derive(Debug, Clone)]
struct Case<'a> {
    ovmf: &'a Path,
    kernel: Option<&'a Path>,
    initrd: Option<&'a Path>,
    append: Option<&'a str>,
    vcpus: u32,
    vcpu_type: Option<&'a str>,
    vmm: VmmType,
    guest_features: u64,
    format: OutputFormat,
}

impl<'a> Case<'a> {
    fn new(ovmf: &'a Path, vcpus: u32, vcpu_type: &'a str) -> Self {
        Case {
            ovmf,
            kernel: None,
            initrd: None,
            append: None,
            vcpus,
            vcpu_type: Some(vcpu_type),
            vmm: VmmType::Qemu,
            guest_features: DEFAULT_GUEST_FEATURES,
            format: OutputFormat::Hex,
        }
    }

    fn ours(&self) -> String {
        let digest = measure_files(&MeasureFiles {
            ovmf: self.ovmf,
            kernel: self.kernel,
            initrd: self.initrd,
            append: self.append,
            vcpus: self.vcpus,
            cpu_signature: self
                .vcpu_type
                .map(|t| cpu_type_signature(t).expect("known type")),
            guest_features: self.guest_features,
            vmm: self.vmm,
            ovmf_digest: None,
        })
        .unwrap_or_else(|e| panic!("{self:?}: {e}"));
        Measurement(digest).format(self.format)
    }

    fn theirs(&self, tool: &Path) -> String {
        let mut cmd = Command::new(tool);
        cmd.args(["--mode", "snp", "--vcpus", &self.vcpus.to_string()])
            .arg("--ovmf")
            .arg(self.ovmf)
            .args(["--vmm-type", self.vmm.name()])
            .args(["--guest-features", &format!("{:#x}", self.guest_features)])
            .args([
                "--output-format",
                match self.format {
                    OutputFormat::Hex => "hex",
                    OutputFormat::Base64 => "base64",
                },
            ]);
        if let Some(t) = self.vcpu_type {
            cmd.args(["--vcpu-type", t]);
        }
        if let Some(k) = self.kernel {
            cmd.arg("--kernel").arg(k);
        }
        if let Some(i) = self.initrd {
            cmd.arg("--initrd").arg(i);
        }
        if let Some(a) = self.append {
            cmd.args(["--append", a]);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
        assert!(
            out.status.success(),
            "sev-snp-measure failed on {self:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// The real `sev-snp-measure`: `$VEIL_SEV_SNP_MEASURE`, or on `PATH`. Missing is a failure.
fn tool() -> PathBuf {
    let tool = std::env::var_os("VEIL_SEV_SNP_MEASURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "sev-snp-measure".into());
    match Command::new(&tool).arg("--version").output() {
        Ok(out) if out.status.success() => tool,
        _ => panic!(
            "{} not found or not runnable: these tests compare against it. \
             Run scripts/install-deps.sh (installs sev-snp-measure from PyPI) or set \
             VEIL_SEV_SNP_MEASURE",
            tool.display()
        ),
    }
}

/// Compares every case, two at a time (the tool takes a fraction of a second each).
fn compare_all(cases: &[Case<'_>]) {
    let tool = tool();
    let results: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .chunks(cases.len().div_ceil(2))
            .map(|chunk| {
                let tool = &tool;
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|c| (c.ours(), c.theirs(tool)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("comparison thread"))
            .collect()
    });
    assert_eq!(results.len(), cases.len());
    for (case, (ours, theirs)) in cases.iter().zip(&results) {
        assert_eq!(ours, theirs, "veil and sev-snp-measure differ on {case:?}");
    }
}

const VCPUS: [u32; 4] = [1, 2, 4, 16];
const TYPES: [&str; 5] = ["EPYC", "EPYC-v4", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa"];

fn debian_ovmf(name: &str) -> PathBuf {
    let path = Path::new("/usr/share").join(name);
    assert!(
        path.exists(),
        "{} is missing: install Debian's ovmf package (scripts/install-deps.sh)",
        path.display()
    );
    path
}

#[test]
fn firmware_only_with_debian_ovmf_matches_sev_snp_measure() {
    let code = debian_ovmf("OVMF/OVMF_CODE.fd");
    let code_4m = debian_ovmf("OVMF/OVMF_CODE_4M.fd");
    let unified = debian_ovmf("ovmf/OVMF.fd");
    let mut cases = Vec::new();
    for vcpus in VCPUS {
        for t in TYPES {
            cases.push(Case::new(&code, vcpus, t));
        }
        cases.push(Case::new(&code_4m, vcpus, "EPYC-v4"));
        cases.push(Case::new(&code_4m, vcpus, "EPYC-Milan"));
        cases.push(Case::new(&unified, vcpus, "EPYC-Genoa"));
    }
    compare_all(&cases);
}

#[test]
fn measured_direct_boot_with_amdsev_ovmf_matches_sev_snp_measure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ovmf = amdsev_ovmf(dir.path());
    let (kernel, initrd) = boot_blobs(dir.path());
    let append = "console=hvc0 quiet panic=-1 veil.channel=virtio-serial";
    let mut cases = Vec::new();
    for vcpus in VCPUS {
        for t in TYPES {
            // Firmware only, then kernel + initrd + cmdline.
            cases.push(Case::new(&ovmf, vcpus, t));
            cases.push(Case {
                kernel: Some(&kernel),
                initrd: Some(&initrd),
                append: Some(append),
                ..Case::new(&ovmf, vcpus, t)
            });
        }
    }
    let base = Case {
        kernel: Some(&kernel),
        initrd: Some(&initrd),
        append: Some(append),
        ..Case::new(&ovmf, 4, "EPYC-Milan")
    };
    // Kernel alone, kernel with a command line only, other VMMs and features, base64.
    cases.extend([
        Case {
            initrd: None,
            append: None,
            ..base.clone()
        },
        Case {
            initrd: None,
            append: Some("root=/dev/vda"),
            ..base.clone()
        },
        Case {
            vmm: VmmType::Ec2,
            vcpu_type: None,
            ..base.clone()
        },
        Case {
            vmm: VmmType::Gce,
            vcpu_type: None,
            ..base.clone()
        },
        Case {
            guest_features: 0x21,
            ..base.clone()
        },
        Case {
            vcpus: 2,
            vcpu_type: Some("EPYC-Turin"),
            format: OutputFormat::Base64,
            ..base.clone()
        },
    ]);
    compare_all(&cases);
}

/// Values `sev-snp-measure` 0.0.13 printed for these inputs, recorded so that the measurement
/// stays pinned even where the tool is not at hand.
#[test]
fn recorded_measurements() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ovmf = amdsev_ovmf(dir.path());
    let (kernel, initrd) = boot_blobs(dir.path());
    fn check(case: Case<'_>, expect: &str) {
        assert_eq!(case.ours(), expect, "{case:?}");
    }
    check(Case::new(&ovmf, 1, "EPYC-v4"), "36ec6583c12c15cf12d22ab9a7d60834cd152fe4acce5b57a189c49760f282b97f174e09c5696df1e13f2e14b20371b8");
    check(
        Case {
            kernel: Some(&kernel),
            initrd: Some(&initrd),
            append: Some("console=hvc0"),
            ..Case::new(&ovmf, 4, "EPYC-Milan")
        },
        "2f6a9b4e4b2d68e87b449773943cd9b9d56880e4e98a2170aab20934ddbdc3a6549cccfb647e0c9cace0c664c483704e",
    );
    check(
        Case {
            kernel: Some(&kernel),
            vmm: VmmType::Ec2,
            vcpu_type: None,
            ..Case::new(&ovmf, 16, "EPYC")
        },
        "be739c1f6fbf6eab701165c7e126ef7410fd997ca3a6d8357e30cb3b61b994c3d3d4f2bbb8a9706ac7ebc940a5245a88",
    );
}

#[test]
fn kernel_with_firmware_lacking_the_hashes_section_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kernel, _) = boot_blobs(dir.path());
    let code = debian_ovmf("OVMF/OVMF_CODE.fd");
    let err = measure_files(&MeasureFiles {
        ovmf: &code,
        kernel: Some(&kernel),
        initrd: None,
        append: None,
        vcpus: 1,
        cpu_signature: cpu_type_signature("EPYC-v4"),
        guest_features: DEFAULT_GUEST_FEATURES,
        vmm: VmmType::Qemu,
        ovmf_digest: None,
    })
    .expect_err("Debian's OVMF cannot verify a kernel");
    assert!(err.to_string().contains("SNP_KERNEL_HASHES"), "{err}");
}
