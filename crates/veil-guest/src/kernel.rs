//! The guest kernel: where it is, and which of its modules the guest needs, in load order.
//!
//! Debian's cloud kernel builds the virtio transports, the virtio console and configfs as
//! modules, and its package ships neither `modules.dep` nor `depmod`'s other indexes (they are
//! generated when the package is installed, which veil never does). So the module closure is
//! computed here from each module's own `.modinfo` section (`depends=`, written by the kernel's
//! build), and `modules.builtin` says what needs no module at all.

use crate::Error;
use object::{Object, ObjectSection};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A kernel image with its modules directory.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The release string (`6.1.0-57-cloud-amd64`): the name of the modules directory.
    pub version: String,
    /// The bzImage (`vmlinuz-<version>`).
    pub image: PathBuf,
    /// `lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

/// A kernel feature the guest needs, and the module that provides it when it is not built in.
#[derive(Debug, Clone, Copy)]
pub struct Needed {
    /// Module name (as `modules.builtin` and `depends=` spell it, with `_`).
    pub module: &'static str,
    /// The Kconfig symbol, for error messages.
    pub config: &'static str,
    /// Whether the guest cannot work without it.
    pub required: bool,
}

/// What the guest needs from its kernel beyond what a cloud kernel builds in.
pub const GUEST_MODULES: &[Needed] = &[
    // The transport of `-M microvm` (virtio-mmio devices described by its ACPI tables).
    Needed {
        module: "virtio_mmio",
        config: "VIRTIO_MMIO",
        required: true,
    },
    // The transport of q35 (and of the confidential machines, which are q35-based).
    Needed {
        module: "virtio_pci",
        config: "VIRTIO_PCI",
        required: true,
    },
    // virtio-serial: the agent's channel to the node (`/dev/vportNpM`).
    Needed {
        module: "virtio_console",
        config: "VIRTIO_CONSOLE",
        required: true,
    },
    // configfs, for configfs-tsm attestation reports under /sys/kernel/config/tsm.
    Needed {
        module: "configfs",
        config: "CONFIGFS_FS",
        required: true,
    },
    // Confidential guests' report interfaces, where this kernel has them.
    Needed {
        module: "tsm",
        config: "TSM_REPORTS",
        required: false,
    },
    Needed {
        module: "sev_guest",
        config: "SEV_GUEST",
        required: false,
    },
    Needed {
        module: "tdx_guest",
        config: "TDX_GUEST_DRIVER",
        required: false,
    },
];

/// A module file to put into the initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Module name.
    pub name: String,
    /// The `.ko` file on this machine.
    pub path: PathBuf,
    /// Its path relative to the modules directory (`kernel/drivers/…/x.ko`).
    pub relative: PathBuf,
}

/// Find the kernel: `image` and `modules_dir` when given, else the newest
/// `boot/vmlinuz-<version>` under `kernel_dir` with its `lib/modules/<version>`.
pub fn locate(
    kernel_dir: &Path,
    image: Option<&Path>,
    modules_dir: Option<&Path>,
) -> Result<Kernel, Error> {
    let image = match image {
        Some(p) => p.to_path_buf(),
        None => newest_image(&kernel_dir.join("boot"))?
            .ok_or_else(|| Error::NoKernel(kernel_dir.to_path_buf()))?,
    };
    if !image.is_file() {
        return Err(Error::NoKernel(image));
    }
    let from_name = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_string);
    let (version, modules_dir) = match (modules_dir, from_name) {
        (Some(m), _) => {
            let v = m
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::NoModules(m.to_path_buf()))?
                .to_string();
            (v, m.to_path_buf())
        }
        (None, Some(v)) => {
            // Packages of merged-/usr releases (Debian trixie on) ship usr/lib/modules.
            let m = kernel_dir.join("lib/modules").join(&v);
            let usr = kernel_dir.join("usr/lib/modules").join(&v);
            (v, if !m.is_dir() && usr.is_dir() { usr } else { m })
        }
        (None, None) => return Err(Error::NoModules(kernel_dir.join("lib/modules"))),
    };
    if !modules_dir.is_dir() {
        return Err(Error::NoModules(modules_dir));
    }
    Ok(Kernel {
        version,
        image,
        modules_dir,
    })
}

fn newest_image(boot: &Path) -> Result<Option<PathBuf>, Error> {
    let entries = match std::fs::read_dir(boot) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(boot, e)),
    };
    let mut images: Vec<(Vec<u64>, PathBuf)> = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Error::io(boot, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(v) = name.strip_prefix("vmlinuz-") {
            images.push((version_key(v), e.path()));
        }
    }
    images.sort();
    Ok(images.pop().map(|(_, p)| p))
}

/// The numbers of a kernel release in order, so `6.1.0-57` sorts after `6.1.0-9`.
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect()
}

/// `foo-bar.ko` → `foo_bar` (the kernel treats `-` and `_` in module names alike).
fn module_name(file_name: &str) -> Option<(String, bool)> {
    let (stem, compressed) = match file_name.split_once(".ko") {
        Some((stem, "")) => (stem, false),
        Some((stem, ".xz" | ".zst" | ".gz")) => (stem, true),
        _ => return None,
    };
    Some((stem.replace('-', "_"), compressed))
}

struct Index {
    files: BTreeMap<String, (PathBuf, bool)>,
    builtin: BTreeSet<String>,
}

fn index(modules_dir: &Path) -> Result<Index, Error> {
    let mut files = BTreeMap::new();
    let mut stack = vec![modules_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let ty = e.file_type().map_err(|err| Error::io(&e.path(), err))?;
            if ty.is_dir() {
                stack.push(e.path());
            } else if let Some((name, compressed)) = module_name(&e.file_name().to_string_lossy()) {
                files.entry(name).or_insert((e.path(), compressed));
            }
        }
    }
    let builtin_list = modules_dir.join("modules.builtin");
    let builtin = match std::fs::read_to_string(&builtin_list) {
        Ok(text) => text
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .filter_map(|f| module_name(f.trim()))
            .map(|(n, _)| n)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => return Err(Error::io(&builtin_list, e)),
    };
    Ok(Index { files, builtin })
}

/// A module file's ELF bytes: read, and decompressed if it is a `.ko.xz`.
pub fn decompressed(ko: &Path) -> Result<Vec<u8>, Error> {
    let raw = std::fs::read(ko).map_err(|e| Error::io(ko, e))?;
    if ko.extension().is_none_or(|e| e != "xz") {
        return Ok(raw);
    }
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut raw.as_slice(), &mut out)
        .map_err(|e| Error::io(ko, std::io::Error::other(format!("xz: {e}"))))?;
    Ok(out)
}

/// The names a module's `.modinfo` lists in `depends=` (of a `.ko`, or an xz-compressed
/// `.ko.xz`).
pub fn depends(ko: &Path) -> Result<Vec<String>, Error> {
    let data = decompressed(ko)?;
    let file = object::File::parse(&*data).map_err(|source| Error::ModuleElf {
        path: ko.to_path_buf(),
        source,
    })?;
    let Some(section) = file.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let info = section.data().map_err(|source| Error::ModuleElf {
        path: ko.to_path_buf(),
        source,
    })?;
    Ok(parse_depends(info))
}

fn parse_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).replace('-', "_"))
        .collect()
}

/// The modules (with their dependencies, each before its users) that provide what `needed`
/// names and the kernel does not build in. A required feature that is neither built in nor a
/// module is an error; an optional one is left out.
pub fn resolve(kernel: &Kernel, needed: &[Needed]) -> Result<Vec<Module>, Error> {
    let idx = index(&kernel.modules_dir)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for n in needed {
        if idx.builtin.contains(n.module) {
            continue;
        }
        if !idx.files.contains_key(n.module) {
            if n.required {
                return Err(Error::MissingModule {
                    module: n.module,
                    config: n.config,
                    version: kernel.version.clone(),
                });
            }
            continue;
        }
        visit(kernel, &idx, n.module, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    kernel: &Kernel,
    idx: &Index,
    name: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<Module>,
    depth: usize,
) -> Result<(), Error> {
    if idx.builtin.contains(name) || !seen.insert(name.to_string()) {
        return Ok(());
    }
    let Some((path, compressed)) = idx.files.get(name) else {
        return Err(Error::MissingDependency {
            module: name.to_string(),
            version: kernel.version.clone(),
        });
    };
    // xz-compressed modules go into the initrd decompressed.
    if *compressed && path.extension().is_none_or(|e| e != "xz") {
        return Err(Error::CompressedModule(path.clone()));
    }
    // Real dependency chains are a few modules deep; this only bounds a corrupt tree.
    if depth > 64 {
        return Err(Error::DependencyLoop(name.to_string()));
    }
    for dep in depends(path)? {
        visit(kernel, idx, &dep, seen, order, depth + 1)?;
    }
    let relative = path
        .strip_prefix(&kernel.modules_dir)
        .unwrap_or(path)
        .to_path_buf();
    order.push(Module {
        name: name.to_string(),
        path: path.clone(),
        relative,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions() {
        assert_eq!(
            module_name("virtio_mmio.ko"),
            Some(("virtio_mmio".into(), false))
        );
        assert_eq!(
            module_name("virtio-rng.ko.xz"),
            Some(("virtio_rng".into(), true))
        );
        assert_eq!(module_name("modules.order"), None);
        assert_eq!(module_name("x.kobj"), None);
        assert!(version_key("6.1.0-57-cloud-amd64") > version_key("6.1.0-9-cloud-amd64"));
    }

    #[test]
    fn modinfo_depends() {
        let info = b"license=GPL\0depends=virtio,virtio_ring\0intree=Y\0name=virtio_mmio\0";
        assert_eq!(parse_depends(info), ["virtio", "virtio_ring"]);
        assert!(parse_depends(b"depends=\0name=virtio\0").is_empty());
    }

    #[test]
    fn locate_errors_name_the_fix() {
        let d = std::env::temp_dir().join(format!("veil-guest-kernel-{}", std::process::id()));
        let err = locate(&d, None, None).unwrap_err().to_string();
        assert!(err.contains("install-deps.sh"), "{err}");
        std::fs::create_dir_all(d.join("boot")).unwrap();
        std::fs::write(d.join("boot/vmlinuz-6.1.0-9-x"), "").unwrap();
        std::fs::write(d.join("boot/vmlinuz-6.1.0-57-x"), "").unwrap();
        let err = locate(&d, None, None).unwrap_err().to_string();
        assert!(err.contains("6.1.0-57-x"), "{err}");
        std::fs::create_dir_all(d.join("lib/modules/6.1.0-57-x")).unwrap();
        let k = locate(&d, None, None).unwrap();
        assert_eq!(k.version, "6.1.0-57-x");
        assert!(k.image.ends_with("boot/vmlinuz-6.1.0-57-x"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
