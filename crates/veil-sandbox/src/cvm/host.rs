//! Can this host launch confidential guests? Inspects the devices, the KVM module parameter,
//! the QEMU version and the firmware, and names everything that is missing at once.
//!
//! Every path is injectable ([`HostProbe`]), so the check is tested against fake `/dev` and
//! `/sys/module` trees and a fake QEMU.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::ovmf::{Ovmf, SectionKind};

/// A trusted execution environment veil can launch guests in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tee {
    /// AMD SEV-SNP.
    Snp,
    /// Intel TDX.
    Tdx,
}

impl Tee {
    /// The oldest QEMU that can launch it: `sev-snp-guest` came with QEMU 9.1, `tdx-guest`
    /// with QEMU 10.1.
    pub fn min_qemu(self) -> QemuVersion {
        match self {
            Tee::Snp => QemuVersion(9, 1, 0),
            Tee::Tdx => QemuVersion(10, 1, 0),
        }
    }
}

impl std::str::FromStr for Tee {
    type Err = String;
    /// `snp` or `tdx`, as the command line spells them.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "snp" => Ok(Self::Snp),
            "tdx" => Ok(Self::Tdx),
            o => Err(format!("TEE {o:?} is not snp or tdx")),
        }
    }
}

impl fmt::Display for Tee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tee::Snp => "SEV-SNP",
            Tee::Tdx => "TDX",
        })
    }
}

/// A QEMU version (major, minor, micro).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion(pub u32, pub u32, pub u32);

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Parses the first line of `qemu-system-x86_64 --version` ("QEMU emulator version 7.2.15
/// (Debian 1:7.2+dfsg-7+deb12u18)").
pub fn parse_qemu_version(output: &str) -> Option<QemuVersion> {
    let rest = output.split("version ").nth(1)?;
    let token = rest.split_whitespace().next()?;
    let mut parts = token.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next()??;
    let micro = parts.next().flatten().unwrap_or(0);
    Some(QemuVersion(major, minor, micro))
}

/// Where to look.
#[derive(Debug, Clone)]
pub struct HostProbe {
    /// The device directory (`/dev`).
    pub dev: PathBuf,
    /// The kernel's module directory (`/sys/module`).
    pub sys_module: PathBuf,
    /// The QEMU binary (a name is looked up on `PATH`).
    pub qemu: PathBuf,
    /// The firmware the guest will boot (AmdSev OVMF for SNP, TDVF for TDX).
    pub firmware: PathBuf,
}

impl HostProbe {
    /// This machine's `/dev` and `/sys/module`.
    pub fn system(qemu: impl Into<PathBuf>, firmware: impl Into<PathBuf>) -> Self {
        HostProbe {
            dev: "/dev".into(),
            sys_module: "/sys/module".into(),
            qemu: qemu.into(),
            firmware: firmware.into(),
        }
    }
}

/// One thing the host lacks.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    /// A device node is absent.
    #[error("device {path} is missing ({hint})")]
    Device {
        /// The device.
        path: PathBuf,
        /// What provides it.
        hint: &'static str,
    },
    /// A KVM module parameter is absent or off.
    #[error("{path} is {found} ({hint})")]
    ModuleParameter {
        /// The parameter file.
        path: PathBuf,
        /// What it holds (or that it is absent).
        found: Found,
        /// How to turn it on.
        hint: &'static str,
    },
    /// QEMU could not be run.
    #[error("cannot run {qemu} --version: {source} (install QEMU {need} or newer)")]
    QemuNotRunnable {
        /// The binary.
        qemu: PathBuf,
        /// Why.
        source: std::io::Error,
        /// The version needed.
        need: QemuVersion,
    },
    /// QEMU's version output was not understood.
    #[error("cannot read a version from `{qemu} --version` (printed {output:?}; need QEMU {need} or newer)")]
    QemuVersionUnknown {
        /// The binary.
        qemu: PathBuf,
        /// Its first line of output.
        output: String,
        /// The version needed.
        need: QemuVersion,
    },
    /// QEMU is too old.
    #[error("{qemu} is QEMU {found}, need {need} or newer")]
    QemuTooOld {
        /// The binary.
        qemu: PathBuf,
        /// Its version.
        found: QemuVersion,
        /// The version needed.
        need: QemuVersion,
    },
    /// The firmware cannot be read.
    #[error("firmware {path}: {source}")]
    FirmwareUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The firmware is not one this TEE can boot.
    #[error("firmware {path} {problem}")]
    FirmwareUnsuitable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: FirmwareProblem,
    },
}

/// What a module parameter file held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The file does not exist (module not loaded, or a kernel without the parameter).
    Absent,
    /// Its (trimmed) contents.
    Value(String),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Absent => f.write_str("absent"),
            Found::Value(v) => write!(f, "{v:?}, not \"Y\""),
        }
    }
}

/// Why a firmware image does not fit.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareProblem {
    /// It is not an OVMF image.
    #[error("is not a usable OVMF image: {0}")]
    Malformed(#[from] super::ovmf::OvmfError),
    /// It has no SNP kernel-hashes section.
    #[error("has no SNP_KERNEL_HASHES section in its SEV metadata, so it cannot verify a directly booted kernel (build OvmfPkg/AmdSev/AmdSevX64.dsc, edk2 2023 or newer)")]
    NoKernelHashes,
    /// It has no TDX metadata.
    #[error("has no TDX metadata: it is not a TDVF (build OvmfPkg/IntelTdx/IntelTdxX64.dsc)")]
    NotTdvf,
}

/// Everything the host lacks for a TEE.
#[derive(Debug, thiserror::Error)]
#[error("this host cannot launch {tee} guests: {}", list(.missing))]
pub struct HostError {
    /// The TEE asked for.
    pub tee: Tee,
    /// What is missing, in the order checked.
    pub missing: Vec<Missing>,
}

fn list(missing: &[Missing]) -> String {
    missing
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What was found on a host that can launch the TEE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// QEMU's version.
    pub qemu: QemuVersion,
}

/// How long `qemu --version` may take.
const QEMU_VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks the host for `tee`; on failure the error lists everything missing.
pub fn check_host(tee: Tee, probe: &HostProbe) -> Result<HostReport, HostError> {
    let mut missing = Vec::new();
    let device = |name: &str, hint: &'static str, missing: &mut Vec<Missing>| {
        let path = probe.dev.join(name);
        if !path.exists() {
            missing.push(Missing::Device { path, hint });
        }
    };
    device(
        "kvm",
        "KVM: load kvm_amd or kvm_intel on a host with virtualization enabled",
        &mut missing,
    );
    match tee {
        Tee::Snp => {
            device(
                "sev",
                "the AMD secure processor driver ccp, with SEV-SNP enabled in the BIOS",
                &mut missing,
            );
            parameter(
                &probe.sys_module.join("kvm_amd/parameters/sev_snp"),
                "a host kernel with SEV-SNP host support (Linux 6.11+), loaded with kvm_amd sev_snp=1",
                &mut missing,
            );
        }
        Tee::Tdx => parameter(
            &probe.sys_module.join("kvm_intel/parameters/tdx"),
            "a host kernel with TDX host support (Linux 6.16+), loaded with kvm_intel tdx=1 and the TDX module initialized",
            &mut missing,
        ),
    }
    let need = tee.min_qemu();
    let qemu = match qemu_version(&probe.qemu) {
        Err(source) => {
            missing.push(Missing::QemuNotRunnable {
                qemu: probe.qemu.clone(),
                source,
                need,
            });
            None
        }
        Ok(output) => match parse_qemu_version(&output) {
            None => {
                missing.push(Missing::QemuVersionUnknown {
                    qemu: probe.qemu.clone(),
                    output: output
                        .lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(200)
                        .collect(),
                    need,
                });
                None
            }
            Some(found) if found < need => {
                missing.push(Missing::QemuTooOld {
                    qemu: probe.qemu.clone(),
                    found,
                    need,
                });
                None
            }
            Some(found) => Some(found),
        },
    };
    if let Some(m) = firmware(tee, &probe.firmware) {
        missing.push(m);
    }
    match qemu {
        Some(qemu) if missing.is_empty() => Ok(HostReport { qemu }),
        _ => Err(HostError { tee, missing }),
    }
}

fn parameter(path: &Path, hint: &'static str, missing: &mut Vec<Missing>) {
    let found = match std::fs::read_to_string(path) {
        Err(_) => Found::Absent,
        Ok(v) if matches!(v.trim(), "Y" | "y" | "1") => return,
        Ok(v) => Found::Value(v.trim().chars().take(40).collect()),
    };
    missing.push(Missing::ModuleParameter {
        path: path.to_owned(),
        found,
        hint,
    });
}

fn firmware(tee: Tee, path: &Path) -> Option<Missing> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(source) => {
            return Some(Missing::FirmwareUnreadable {
                path: path.to_owned(),
                source,
            })
        }
    };
    let problem = match Ovmf::parse(data) {
        Err(e) => FirmwareProblem::Malformed(e),
        Ok(ovmf) => match tee {
            Tee::Snp if ovmf.has_section(SectionKind::KernelHashes) => return None,
            Tee::Snp => FirmwareProblem::NoKernelHashes,
            Tee::Tdx if ovmf.has_tdx_metadata() => return None,
            Tee::Tdx => FirmwareProblem::NotTdvf,
        },
    };
    Some(Missing::FirmwareUnsuitable {
        path: path.to_owned(),
        problem,
    })
}

/// Runs `qemu --version`, bounded in time, and returns what it printed.
fn qemu_version(qemu: &Path) -> std::io::Result<String> {
    let mut child = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + QEMU_VERSION_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            // Best effort: it is being given up on either way.
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 10 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cvm::ovmf::synthetic_image;

    #[test]
    fn qemu_versions() {
        fn check(output: &str, expect: Option<QemuVersion>) {
            assert_eq!(parse_qemu_version(output), expect, "{output:?}");
        }
        check(
            "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022",
            Some(QemuVersion(7, 2, 15)),
        );
        check("QEMU emulator version 9.1.0\n", Some(QemuVersion(9, 1, 0)));
        check(
            "QEMU emulator version 10.1.50 (v10.1.0-1234-gdeadbeef)",
            Some(QemuVersion(10, 1, 50)),
        );
        check("QEMU emulator version 10.2", Some(QemuVersion(10, 2, 0)));
        check("QEMU emulator version x", None);
        check("bash: qemu: not found", None);
        assert!(QemuVersion(9, 0, 9) < Tee::Snp.min_qemu());
        assert!(QemuVersion(10, 0, 3) < Tee::Tdx.min_qemu());
        assert!(QemuVersion(10, 1, 0) >= Tee::Tdx.min_qemu());
    }

    /// A fake host: which devices exist, what the module parameter holds, what QEMU prints,
    /// which firmware.
    struct Fake {
        devices: &'static [&'static str],
        param: Option<(&'static str, &'static str)>,
        qemu: Option<&'static str>,
        firmware: Option<Vec<u8>>,
    }

    fn run(tee: Tee, fake: Fake) -> Result<HostReport, HostError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = dir.path().join("dev");
        let sys = dir.path().join("sys/module");
        std::fs::create_dir_all(&dev).expect("dev");
        std::fs::create_dir_all(&sys).expect("sys");
        for d in fake.devices {
            std::fs::write(dev.join(d), b"").expect("device");
        }
        if let Some((param, value)) = fake.param {
            let path = sys.join(param);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("module dir");
            std::fs::write(path, value).expect("param");
        }
        let qemu = dir.path().join("qemu-system-x86_64");
        if let Some(line) = fake.qemu {
            // Written by a child shell, so that no descriptor open for writing on the script
            // exists in this (multi-threaded) process for another test's fork to inherit
            // (which makes exec fail with ETXTBSY).
            let script = format!("#!/bin/sh\necho '{line}'\n");
            let status = Command::new("sh")
                .arg("-c")
                .arg("printf '%s' \"$1\" >\"$2\" && chmod 755 \"$2\"")
                .arg("sh")
                .arg(script)
                .arg(&qemu)
                .status()
                .expect("sh");
            assert!(status.success());
        }
        let firmware = dir.path().join("OVMF.fd");
        if let Some(data) = fake.firmware {
            std::fs::write(&firmware, data).expect("firmware");
        }
        check_host(
            tee,
            &HostProbe {
                dev,
                sys_module: sys,
                qemu,
                firmware,
            },
        )
    }

    fn snp_firmware() -> Vec<u8> {
        synthetic_image(4, &[], Some(&[(0x80_f000, 0x1000, 0x10)]))
    }

    fn tdvf() -> Vec<u8> {
        // The TDX metadata GUID with a dummy offset.
        let guid = crate::cvm::ovmf::guid(
            0xe47a_6535,
            0x984a,
            0x4798,
            [0x86, 0x5e, 0x46, 0x85, 0xa7, 0xbf, 0x8e, 0xc2],
        );
        synthetic_image(4, &[(guid, 0x40u32.to_le_bytes().to_vec())], None)
    }

    fn expect_missing(result: Result<HostReport, HostError>, expect: &[&str]) {
        let err = result.expect_err("must be refused");
        let message = err.to_string();
        assert_eq!(err.missing.len(), expect.len(), "{message}");
        for (m, e) in err.missing.iter().zip(expect) {
            assert!(m.to_string().contains(e), "{m} does not contain {e:?}");
        }
    }

    #[test]
    fn snp_host_with_everything() {
        let report = run(
            Tee::Snp,
            Fake {
                devices: &["kvm", "sev"],
                param: Some(("kvm_amd/parameters/sev_snp", "Y\n")),
                qemu: Some("QEMU emulator version 9.2.0"),
                firmware: Some(snp_firmware()),
            },
        )
        .expect("host is fine");
        assert_eq!(report.qemu, QemuVersion(9, 2, 0));
    }

    #[test]
    fn tdx_host_with_everything() {
        run(
            Tee::Tdx,
            Fake {
                devices: &["kvm"],
                param: Some(("kvm_intel/parameters/tdx", "Y")),
                qemu: Some("QEMU emulator version 10.1.0"),
                firmware: Some(tdvf()),
            },
        )
        .expect("host is fine");
    }

    #[test]
    fn this_machine_like_host_names_everything() {
        // No devices, no module, bookworm's QEMU, Debian's OVMF-like firmware without the
        // kernel-hashes section.
        let result = run(
            Tee::Snp,
            Fake {
                devices: &[],
                param: None,
                qemu: Some("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)"),
                firmware: Some(synthetic_image(4, &[], Some(&[(0x80_0000, 0x1000, 1)]))),
            },
        );
        let message = result
            .as_ref()
            .map(|_| ())
            .expect_err("refused")
            .to_string();
        assert!(
            message.starts_with("this host cannot launch SEV-SNP guests: "),
            "{message}"
        );
        expect_missing(
            result,
            &[
                "dev/kvm is missing",
                "dev/sev is missing (the AMD secure processor driver",
                "kvm_amd/parameters/sev_snp is absent",
                "is QEMU 7.2.15, need 9.1.0 or newer",
                "has no SNP_KERNEL_HASHES section",
            ],
        );
    }

    /// One thing missing at a time, and what the error must say.
    #[test]
    fn each_missing_piece() {
        let snp = || Fake {
            devices: &["kvm", "sev"],
            param: Some(("kvm_amd/parameters/sev_snp", "Y")),
            qemu: Some("QEMU emulator version 9.1.0"),
            firmware: Some(snp_firmware()),
        };
        let tdx = || Fake {
            devices: &["kvm"],
            param: Some(("kvm_intel/parameters/tdx", "Y")),
            qemu: Some("QEMU emulator version 10.1.2"),
            firmware: Some(tdvf()),
        };
        let cases: Vec<(Tee, Fake, &str)> = vec![
            (
                Tee::Snp,
                Fake {
                    devices: &["kvm"],
                    ..snp()
                },
                "dev/sev is missing",
            ),
            (
                Tee::Snp,
                Fake {
                    devices: &["sev"],
                    ..snp()
                },
                "dev/kvm is missing",
            ),
            (
                Tee::Snp,
                Fake {
                    param: Some(("kvm_amd/parameters/sev_snp", "N\n")),
                    ..snp()
                },
                "sev_snp is \"N\", not \"Y\" (a host kernel with SEV-SNP host support",
            ),
            (
                Tee::Snp,
                Fake {
                    param: Some(("kvm_amd/parameters/sev", "Y")),
                    ..snp()
                },
                "sev_snp is absent",
            ),
            (
                Tee::Snp,
                Fake {
                    qemu: Some("QEMU emulator version 9.0.2"),
                    ..snp()
                },
                "is QEMU 9.0.2, need 9.1.0 or newer",
            ),
            (
                Tee::Snp,
                Fake {
                    qemu: Some("something else"),
                    ..snp()
                },
                "cannot read a version",
            ),
            (
                Tee::Snp,
                Fake {
                    qemu: None,
                    ..snp()
                },
                "cannot run",
            ),
            (
                Tee::Snp,
                Fake {
                    firmware: None,
                    ..snp()
                },
                "OVMF.fd: No such file",
            ),
            (
                Tee::Snp,
                Fake {
                    firmware: Some(vec![0; 100]),
                    ..snp()
                },
                "is not a usable OVMF image",
            ),
            (
                Tee::Snp,
                Fake {
                    firmware: Some(tdvf()),
                    ..snp()
                },
                "no SNP_KERNEL_HASHES",
            ),
            (
                Tee::Tdx,
                Fake {
                    param: Some(("kvm_intel/parameters/tdx", "N")),
                    ..tdx()
                },
                "tdx is \"N\"",
            ),
            (
                Tee::Tdx,
                Fake {
                    qemu: Some("QEMU emulator version 10.0.0"),
                    ..tdx()
                },
                "need 10.1.0",
            ),
            (
                Tee::Tdx,
                Fake {
                    firmware: Some(snp_firmware()),
                    ..tdx()
                },
                "not a TDVF",
            ),
            (
                Tee::Tdx,
                Fake {
                    devices: &[],
                    ..tdx()
                },
                "dev/kvm is missing",
            ),
        ];
        for (tee, fake, expect) in cases {
            expect_missing(run(tee, fake), &[expect]);
        }
    }
}
