//! `veil measure` against the real `sev-snp-measure` (PyPI; scripts/install-deps.sh): the
//! same flags (sev-snp-measure's `--mode snp` is `--tee snp`) must print the same line. A
//! missing tool or firmware is a failure, not a skip.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sev_snp_measure() -> PathBuf {
    let tool = std::env::var_os("VEIL_SEV_SNP_MEASURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "sev-snp-measure".into());
    let ok = Command::new(&tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} not found: run scripts/install-deps.sh or set VEIL_SEV_SNP_MEASURE",
        tool.display()
    );
    tool
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn veil(args: &[&str]) -> (bool, String, String) {
    run(Command::new(env!("CARGO_BIN_EXE_veil"))
        .args(["measure", "--tee", "snp"])
        .args(args))
}

/// The AmdSevX64 OVMF fixture of veil-sandbox, unpacked.
fn amdsev(dir: &Path) -> PathBuf {
    let gz = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../veil-sandbox/testdata/ovmf-amdsev/OVMF.amdsev.fd.gz");
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&gz).expect("fixture"))
        .read_to_end(&mut data)
        .expect("gunzip");
    let path = dir.join("OVMF.amdsev.fd");
    std::fs::write(&path, data).expect("write");
    path
}

#[test]
fn veil_measure_prints_what_sev_snp_measure_prints() {
    let tool = sev_snp_measure();
    let dir = tempfile::tempdir().expect("tempdir");
    let ovmf = amdsev(dir.path());
    let ovmf = ovmf.to_str().expect("utf-8 path");
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd");
    std::fs::write(
        &kernel,
        (0..500_000u32)
            .map(|i| (i * 13 + 7) as u8)
            .collect::<Vec<_>>(),
    )
    .expect("kernel");
    std::fs::write(&initrd, b"an initrd").expect("initrd");
    let (kernel, initrd) = (
        kernel.to_str().expect("utf-8"),
        initrd.to_str().expect("utf-8"),
    );
    let debian = "/usr/share/OVMF/OVMF_CODE.fd";
    assert!(
        Path::new(debian).exists(),
        "{debian} missing: install Debian's ovmf (scripts/install-deps.sh)"
    );
    let ovmf_hash = {
        let (ok, out, err) =
            run(Command::new(&tool).args(["--mode", "snp:ovmf-hash", "--ovmf", ovmf]));
        assert!(ok, "{err}");
        out.trim().to_owned()
    };
    let cases: Vec<Vec<&str>> = vec![
        vec!["--vcpus", "1", "--vcpu-type", "EPYC-v4", "--ovmf", debian],
        vec![
            "--vcpus",
            "16",
            "--vcpu-type",
            "EPYC-Genoa",
            "--ovmf",
            debian,
            "-v",
        ],
        vec![
            "--vcpus",
            "4",
            "--vcpu-type",
            "EPYC-Milan",
            "--ovmf",
            ovmf,
            "--kernel",
            kernel,
            "--initrd",
            initrd,
            "--append",
            "console=hvc0 quiet",
        ],
        vec![
            "--vcpus",
            "2",
            "--vcpu-sig",
            "0x830f10",
            "--ovmf",
            ovmf,
            "--kernel",
            kernel,
        ],
        vec![
            "--vcpus",
            "2",
            "--vcpu-family",
            "25",
            "--vcpu-model",
            "1",
            "--vcpu-stepping",
            "1",
            "--ovmf",
            ovmf,
            "--output-format",
            "base64",
        ],
        vec![
            "--vcpus",
            "8",
            "--vmm-type",
            "ec2",
            "--ovmf",
            ovmf,
            "--kernel",
            kernel,
        ],
        vec!["--vcpus", "3", "--vmm-type", "gce", "--ovmf", ovmf],
        vec![
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC-Rome",
            "--ovmf",
            ovmf,
            "--guest-features",
            "0x21",
        ],
        vec![
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC",
            "--ovmf",
            ovmf,
            "--snp-ovmf-hash",
            &ovmf_hash,
        ],
    ];
    for args in cases {
        let (ok, ours, err) = veil(&args);
        assert!(ok, "veil measure {args:?}: {err}");
        let (ok, theirs, err) = run(Command::new(&tool).args(["--mode", "snp"]).args(&args));
        assert!(ok, "sev-snp-measure {args:?}: {err}");
        assert_eq!(ours, theirs, "{args:?}");
    }
}

/// Inputs both tools refuse, and what veil must say.
#[test]
fn veil_measure_refuses_what_sev_snp_measure_refuses() {
    let tool = sev_snp_measure();
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"kernel").expect("kernel");
    let kernel = kernel.to_str().expect("utf-8");
    let debian = "/usr/share/OVMF/OVMF_CODE.fd";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--vcpus",
                "1",
                "--vcpu-type",
                "EPYC",
                "--ovmf",
                debian,
                "--kernel",
                kernel,
            ],
            "SNP_KERNEL_HASHES",
        ),
        (
            vec!["--vcpus", "1", "--ovmf", debian],
            "missing --vcpu-type",
        ),
        (
            vec![
                "--vcpus",
                "1",
                "--vcpu-type",
                "EPYC",
                "--ovmf",
                debian,
                "--initrd",
                kernel,
            ],
            "--kernel",
        ),
        (
            vec!["--vcpus", "1", "--vcpu-type", "Skylake", "--ovmf", debian],
            "EPYC-Milan",
        ),
    ];
    for (args, expect) in cases {
        let (ok, _, err) = veil(&args);
        assert!(!ok, "veil measure {args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
        let (ok, _, _) = run(Command::new(&tool).args(["--mode", "snp"]).args(&args));
        assert!(!ok, "sev-snp-measure {args:?} succeeded");
    }
}
