//! veil-guest: builds what a veil microVM boots — the kernel, an initrd whose `/init` is
//! veil-agent, and the kernel command line.
//!
//! The kernel is Debian's cloud kernel (`linux-image-cloud-amd64`), which
//! `scripts/install-deps.sh` unpacks into [`DEFAULT_KERNEL_DIR`] without installing it. The
//! initrd holds the stripped agent as `/init`, the shared libraries it loads at the paths the
//! loader looks for them, and the kernel modules the guest needs that the kernel does not build
//! in (virtio-mmio and virtio-pci transports, the virtio console, configfs), listed in load order
//! in [`MODULES_LIST`] for the agent to load. Everything else the guest does at boot is the
//! agent's (`veil-agent`'s `guest` module).
//!
//! The contract with the host side: the agent's channel is the virtio-serial port named
//! [`PORT_NAME`] (`-device virtserialport,name=veil.0` on a `-chardev socket`), the kernel console
//! is the first serial port, and the guest powers off when its sandbox ends.

pub mod binary;
pub mod initrd;
pub mod kernel;

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where `scripts/install-deps.sh` unpacks the guest kernel package.
pub const DEFAULT_KERNEL_DIR: &str = "/var/cache/veil/guest-kernel";

/// Where `scripts/install-deps.sh` unpacks the kernel of confidential guests: Debian trixie's
/// cloud kernel (6.12), whose modules include the SEV-SNP and TDX guest drivers and
/// configfs-tsm (`sev_guest`, `tdx_guest`, `tsm`), which bookworm's 6.1 cloud kernel lacks (it
/// builds in SEV memory encryption but no attestation driver, and no TDX guest support).
pub const CVM_KERNEL_DIR: &str = "/var/cache/veil/guest-kernel-cvm";

/// The virtio-serial port the agent serves its channel on.
pub const PORT_NAME: &str = "veil.0";

/// The file in the initrd listing the modules to load, one absolute path a line, in order.
pub const MODULES_LIST: &str = "/etc/veil/modules";

/// The kernel command line:
/// - `console=ttyS0`: kernel and agent messages on the first serial port (microvm's
///   `isa-serial`, q35's COM1); `quiet` keeps the kernel to warnings;
/// - `panic=-1`: reboot at once on a panic, which `-no-reboot` turns into QEMU exiting;
/// - `8250.nr_uarts=1`: probe one serial port, not 32;
/// - `veil.port=veil.0`: the virtio-serial port name of the agent's channel (its default).
///
/// The agent also reads `veil.log=<filter>` (like `VEIL_LOG`) from the command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 veil.port=veil.0";

/// The kernel parameter a guest needs under TCG to know its TSC frequency: `tsc_early_khz=`
/// with this host's TSC rate, or `None` where it cannot be measured (not x86-64).
///
/// Under TCG the guest's TSC is the host's, but the guest has no kvmclock to learn its rate,
/// and a microvm has no HPET or ACPI PM timer to calibrate it against: when the PIT
/// calibration fails — it does whenever the host is busy — the kernel marks the TSC unstable
/// and hangs before `/init`. Append this to the command line for TCG guests (KVM guests get
/// the rate from kvmclock and must not be given it). It is host-specific, so it never belongs
/// in [`DEFAULT_CMDLINE`] or a measured command line.
pub fn tcg_clock_param() -> Option<String> {
    host_tsc_khz().map(|khz| format!("tsc_early_khz={khz}"))
}

/// This host's TSC rate in kHz, measured against the monotonic clock (median of three 20 ms
/// windows, so a preemption in one of them does not count).
#[cfg(target_arch = "x86_64")]
pub fn host_tsc_khz() -> Option<u64> {
    fn rdtsc() -> u64 {
        // SAFETY: RDTSC exists on every x86-64 CPU; it only reads the time-stamp counter and
        // touches no memory.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    let mut rates: Vec<u64> = (0..3)
        .filter_map(|_| {
            let t0 = std::time::Instant::now();
            let c0 = rdtsc();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let c1 = rdtsc();
            let us = t0.elapsed().as_micros() as u64;
            (us > 0 && c1 > c0).then(|| (c1 - c0) * 1000 / us)
        })
        .collect();
    rates.sort_unstable();
    rates.get(rates.len() / 2).copied().filter(|&k| k > 0)
}

/// This host's TSC rate in kHz (not measurable on this architecture).
#[cfg(not(target_arch = "x86_64"))]
pub fn host_tsc_khz() -> Option<u64> {
    None
}

/// Errors of building the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No kernel image was found.
    #[error(
        "no guest kernel at {0}: run scripts/install-deps.sh (it unpacks Debian's \
         linux-image-cloud-amd64 into /var/cache/veil/guest-kernel), or pass --kernel and \
         --modules-dir"
    )]
    NoKernel(PathBuf),
    /// The kernel's modules directory is missing.
    #[error("no kernel modules directory at {0} (pass --modules-dir lib/modules/<version>)")]
    NoModules(PathBuf),
    /// A feature the guest needs is neither built in nor a module.
    #[error("kernel {version} has no {module} module and does not build it in (CONFIG_{config})")]
    MissingModule {
        /// Module name.
        module: &'static str,
        /// Kconfig symbol.
        config: &'static str,
        /// Kernel release.
        version: String,
    },
    /// A module depends on one that is not there.
    #[error("kernel {version}: a needed module depends on {module}, which is missing")]
    MissingDependency {
        /// The missing module.
        module: String,
        /// Kernel release.
        version: String,
    },
    /// Module dependencies loop (a corrupt modules tree).
    #[error("kernel module dependencies loop through {0}")]
    DependencyLoop(String),
    /// A module compressed otherwise than with xz (not supported: the agent loads plain `.ko`
    /// and `.ko.xz` files).
    #[error("{0}: only plain .ko and xz-compressed .ko.xz kernel modules are supported")]
    CompressedModule(PathBuf),
    /// A module is not a readable ELF file.
    #[error("kernel module {path}: {source}")]
    ModuleElf {
        /// The module.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: object::Error,
    },
    /// A tool failed.
    #[error("{tool} {path}: {detail}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// Its argument.
        path: PathBuf,
        /// What it said.
        detail: String,
    },
    /// `ldd` could not find a library.
    #[error("{binary} needs {lib}, which the dynamic loader cannot find")]
    LibraryNotFound {
        /// The binary.
        binary: PathBuf,
        /// The library.
        lib: String,
    },
    /// The agent binary is missing.
    #[error("veil-agent binary not found at {0} (build it with `cargo build -p veil-agent`)")]
    NoAgent(PathBuf),
    /// A path not fit for the initrd.
    #[error("invalid initrd path {0:?}")]
    BadInitrdPath(String),
    /// A file too large for cpio's 32-bit sizes.
    #[error("{0}: too large for the initrd")]
    TooLarge(String),
    /// A file changed while it was archived.
    #[error("{0} changed while the initrd was written")]
    Changed(PathBuf),
}

impl Error {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What to build the guest from, and where to put it.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The veil-agent binary (becomes `/init`).
    pub agent: PathBuf,
    /// Where the kernel package was unpacked ([`DEFAULT_KERNEL_DIR`]).
    pub kernel_dir: PathBuf,
    /// A kernel image to use instead of the newest in `kernel_dir/boot`.
    pub kernel: Option<PathBuf>,
    /// Its modules directory (default: `kernel_dir/lib/modules/<version>`).
    pub modules_dir: Option<PathBuf>,
    /// The output directory.
    pub out_dir: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// Strip the agent's symbols and debug information (a debug build shrinks from ~190 MB to
    /// ~15 MB, which guest memory must hold).
    pub strip: bool,
}

impl GuestConfig {
    /// Defaults: the kernel from [`DEFAULT_KERNEL_DIR`], [`DEFAULT_CMDLINE`], stripped agent.
    pub fn new(agent: PathBuf, out_dir: PathBuf) -> Self {
        Self {
            agent,
            kernel_dir: PathBuf::from(DEFAULT_KERNEL_DIR),
            kernel: None,
            modules_dir: None,
            out_dir,
            cmdline: DEFAULT_CMDLINE.to_string(),
            strip: true,
        }
    }
}

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

/// The built guest.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    /// The kernel image (`<out>/vmlinuz`).
    pub kernel: Artifact,
    /// The initrd (`<out>/initrd.img`).
    pub initrd: Artifact,
    /// The kernel command line (also in `<out>/cmdline`, without a newline).
    pub cmdline: String,
    /// `<out>/cmdline`.
    pub cmdline_path: PathBuf,
    /// The kernel release.
    pub kernel_version: String,
    /// The modules in the initrd, in load order.
    pub modules: Vec<String>,
}

/// Build the guest artifacts into `cfg.out_dir`: each file is written beside its final name
/// and renamed into place, so a reader never sees a half-written one.
pub fn build(cfg: &GuestConfig) -> Result<GuestArtifacts, Error> {
    if !cfg.agent.is_file() {
        return Err(Error::NoAgent(cfg.agent.clone()));
    }
    let k = kernel::locate(
        &cfg.kernel_dir,
        cfg.kernel.as_deref(),
        cfg.modules_dir.as_deref(),
    )?;
    let modules = kernel::resolve(&k, kernel::GUEST_MODULES)?;
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| Error::io(&cfg.out_dir, e))?;

    let libs = binary::shared_libraries(&cfg.agent)?;
    let stripped = cfg.out_dir.join(".init.stripped");
    let agent = if cfg.strip {
        binary::strip(&cfg.agent, &stripped)?;
        stripped.clone()
    } else {
        cfg.agent.clone()
    };
    let tree = initrd_tree(&agent, &libs, &k, &modules);
    let initrd_path = cfg.out_dir.join("initrd.img");
    let written = tree.and_then(|t| {
        write_atomically(&initrd_path, |f| {
            t.write_gz(std::io::BufWriter::new(f))?
                .flush()
                .map_err(|e| Error::io(&initrd_path, e))
        })
    });
    if cfg.strip {
        let _ = std::fs::remove_file(&stripped);
    }
    written?;

    let kernel_path = cfg.out_dir.join("vmlinuz");
    write_atomically(&kernel_path, |f| {
        let mut src = std::fs::File::open(&k.image).map_err(|e| Error::io(&k.image, e))?;
        std::io::copy(&mut src, f).map_err(|e| Error::io(&k.image, e))?;
        Ok(())
    })?;
    let cmdline_path = cfg.out_dir.join("cmdline");
    write_atomically(&cmdline_path, |f| {
        f.write_all(cfg.cmdline.as_bytes())
            .map_err(|e| Error::io(&cmdline_path, e))
    })?;
    Ok(GuestArtifacts {
        kernel: artifact(&kernel_path)?,
        initrd: artifact(&initrd_path)?,
        cmdline: cfg.cmdline.clone(),
        cmdline_path,
        kernel_version: k.version,
        modules: modules.into_iter().map(|m| m.name).collect(),
    })
}

/// The initrd's tree: `/init`, its libraries, the modules with their load-order list, and the
/// mount points and console node the agent needs before it mounts anything.
fn initrd_tree(
    agent: &Path,
    libs: &[PathBuf],
    k: &kernel::Kernel,
    modules: &[kernel::Module],
) -> Result<initrd::Initrd, Error> {
    let mut t = initrd::Initrd::new();
    t.file("/init", agent, 0o755)?;
    for lib in libs {
        // The loader opens libraries by these paths; a symlink (such as /lib64's loader) is
        // stored as the file it names.
        let real = std::fs::canonicalize(lib).map_err(|e| Error::io(lib, e))?;
        let name = lib
            .to_str()
            .ok_or_else(|| Error::BadInitrdPath(lib.display().to_string()))?;
        t.file(name, &real, 0o755)?;
    }
    let mut list = String::new();
    for m in modules {
        let rel = m
            .relative
            .to_str()
            .ok_or_else(|| Error::BadInitrdPath(m.relative.display().to_string()))?;
        // An xz-compressed module goes in decompressed: the agent loads plain ELF files, and
        // no kernel feature (module decompression) is needed for it.
        match rel.strip_suffix(".xz") {
            Some(plain) => {
                let at = format!("/lib/modules/{}/{plain}", k.version);
                t.bytes(&at, kernel::decompressed(&m.path)?, 0o644)?;
                list.push_str(&at);
            }
            None => {
                let at = format!("/lib/modules/{}/{rel}", k.version);
                t.file(&at, &m.path, 0o644)?;
                list.push_str(&at);
            }
        }
        list.push('\n');
    }
    t.bytes(MODULES_LIST, list.into_bytes(), 0o644)?;
    for d in ["/proc", "/sys", "/dev", "/run", "/rootfs"] {
        t.dir(d, 0o755)?;
    }
    t.dir("/tmp", 0o1777)?;
    // The kernel opens /dev/console as init's stdin, stdout and stderr before /init runs.
    t.char_dev("/dev/console", 5, 1, 0o600)?;
    Ok(t)
}

fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        fill(&mut f)?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Size and SHA-256 of a file.
pub fn artifact(path: &Path) -> Result<Artifact, Error> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Artifact {
        path: path.to_path_buf(),
        size,
        sha256: hex::encode(h.finalize()),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn tsc_rate_is_plausible() {
        // Any x86-64 host of the last two decades: between 500 MHz and 10 GHz.
        let khz = super::host_tsc_khz().unwrap();
        assert!((500_000..10_000_000).contains(&khz), "{khz}");
        assert!(super::tcg_clock_param()
            .unwrap()
            .starts_with("tsc_early_khz="));
    }
}
