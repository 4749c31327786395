//! cgroup setup for sandboxes, on pure cgroup v2 hosts and on hybrid/v1 hosts.
//!
//! On v2 every sandbox gets `/sys/fs/cgroup/<parent>/<id>` with `memory.max`, `cpu.max` and
//! `pids.max`. On v1 (or hybrid, where cgroup2 is mounted without these controllers) it gets one
//! directory per controller hierarchy: `memory`, `cpu` and `pids`. The process joins every
//! directory by writing `0` to `cgroup.procs` before it execs, so nothing it starts escapes.

use crate::Error;
use std::fs;
use std::path::{Path, PathBuf};

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Unified hierarchy at the given mount point with memory, cpu and pids available.
    V2(PathBuf),
    /// Per-controller hierarchies under the given mount point (usually /sys/fs/cgroup).
    V1(PathBuf),
}

/// Limits written to a sandbox's cgroup.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// CPU limit in thousandths of a core.
    pub cpu_millis: u32,
    /// Maximum tasks.
    pub pids_max: u32,
}

const CPU_PERIOD_US: u64 = 100_000;

/// Detect the host's cgroup layout under `root` (normally `/sys/fs/cgroup`).
pub fn detect(root: &Path) -> Result<Layout, Error> {
    let controllers = root.join("cgroup.controllers");
    if let Ok(list) = fs::read_to_string(&controllers) {
        let has = |c: &str| list.split_whitespace().any(|x| x == c);
        if has("memory") && has("pids") {
            return Ok(Layout::V2(root.to_path_buf()));
        }
        return Err(Error::NoCgroups(format!(
            "cgroup v2 at {} lacks the memory or pids controller (has: {})",
            root.display(),
            list.trim()
        )));
    }
    if root.join("memory").join("cgroup.procs").exists() {
        return Ok(Layout::V1(root.to_path_buf()));
    }
    Err(Error::NoCgroups(format!(
        "neither a cgroup v2 hierarchy nor a v1 memory hierarchy under {}",
        root.display()
    )))
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    fs::write(path, value).map_err(|source| Error::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|source| Error::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

/// Remove empty sandbox cgroups left under `parent` by a node that died without cleaning up.
/// Only empty directories are removed (`rmdir` refuses others), so sandboxes of another live
/// node sharing the parent are never touched. The cgroups of sandboxes named in `ours` (the
/// sandboxes an earlier run of this very node left behind) go whatever their age; any other
/// directory younger than a minute is left alone (another node may have just created it and
/// not yet moved its sandbox in). Returns how many were removed.
pub fn remove_stale(
    layout: &Layout,
    parent: &str,
    ours: &std::collections::HashSet<String>,
) -> usize {
    let parents: Vec<PathBuf> = match layout {
        Layout::V2(root) => vec![root.join(parent)],
        Layout::V1(root) => ["memory", "cpu", "pids"]
            .iter()
            .map(|c| root.join(c).join(parent))
            .collect(),
    };
    let mut removed = 0;
    for p in parents {
        let Ok(entries) = fs::read_dir(&p) else {
            continue;
        };
        for e in entries.flatten() {
            let mine = e.file_name().to_str().is_some_and(|n| ours.contains(n));
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(60));
            if (mine || old) && e.path().is_dir() && fs::remove_dir(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// One sandbox's cgroup (one directory on v2, several on v1).
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl Cgroup {
    /// Create the cgroup `<parent>/<id>` and write its limits. On failure nothing is left behind.
    pub fn create(layout: &Layout, parent: &str, id: &str, limits: Limits) -> Result<Self, Error> {
        let mut made = Vec::new();
        let res = Self::create_inner(layout, parent, id, limits, &mut made);
        if res.is_err() {
            for d in made.iter().rev() {
                let _ = fs::remove_dir(d);
            }
        }
        res
    }

    fn create_inner(
        layout: &Layout,
        parent: &str,
        id: &str,
        limits: Limits,
        made: &mut Vec<PathBuf>,
    ) -> Result<Self, Error> {
        let quota = (u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000).max(1000);
        match layout {
            Layout::V2(root) => {
                // Controllers must be enabled in every ancestor's subtree_control.
                let parent_dir = root.join(parent);
                mkdir(&parent_dir)?;
                for dir in [root.as_path(), parent_dir.as_path()] {
                    let ctl = dir.join("cgroup.subtree_control");
                    for c in ["+memory", "+pids", "+cpu"] {
                        if let Err(e) = write(&ctl, c) {
                            // cpu may be missing on some hosts; memory and pids are required.
                            if c != "+cpu" {
                                return Err(e);
                            }
                            tracing::warn!(error = %e, "cpu controller unavailable; no CPU limit");
                        }
                    }
                }
                let dir = parent_dir.join(id);
                mkdir(&dir)?;
                made.push(dir.clone());
                let cg = Cgroup {
                    dirs: vec![dir.clone()],
                    v2: true,
                };
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                if dir.join("memory.swap.max").exists() {
                    write(&dir.join("memory.swap.max"), "0")?;
                }
                write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
                if dir.join("cpu.max").exists() {
                    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
                Ok(cg)
            }
            Layout::V1(root) => {
                let mut cg = Cgroup {
                    dirs: Vec::new(),
                    v2: false,
                };
                let mem = root.join("memory").join(parent).join(id);
                mkdir(&mem)?;
                made.push(mem.clone());
                cg.dirs.push(mem.clone());
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                let cpu_root = root.join("cpu");
                if cpu_root.join("cgroup.procs").exists() {
                    let cpu = cpu_root.join(parent).join(id);
                    mkdir(&cpu)?;
                    made.push(cpu.clone());
                    cg.dirs.push(cpu.clone());
                    write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                let pids_root = root.join("pids");
                if pids_root.join("cgroup.procs").exists() {
                    let pids = pids_root.join(parent).join(id);
                    mkdir(&pids)?;
                    made.push(pids.clone());
                    cg.dirs.push(pids.clone());
                    write(&pids.join("pids.max"), &limits.pids_max.to_string())?;
                }
                Ok(cg)
            }
        }
    }

    /// The `cgroup.procs` files a process writes `0` to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The cgroup directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Pids currently in the cgroup (union over hierarchies).
    pub fn pids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for d in &self.dirs {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// SIGKILL everything in the cgroup (cgroup.kill on v2 where the kernel has it).
    pub fn kill_all(&self) {
        if self.v2 {
            if let Some(d) = self.dirs.first() {
                let kill = d.join("cgroup.kill");
                if kill.exists() && fs::write(&kill, "1").is_ok() {
                    return;
                }
            }
        }
        for pid in self.pids() {
            let Ok(pid) = i32::try_from(pid) else {
                continue;
            };
            // SAFETY: kill(2) with a pid read from the sandbox's own cgroup and a constant
            // signal; it touches no memory of ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Remove the cgroup directories (they must be empty of processes).
    pub fn remove(&self) -> Result<(), Error> {
        for d in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Cgroup {
                        path: d.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v2_with_controllers() {
        let t = tempfile_dir();
        fs::write(t.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        assert_eq!(detect(&t).unwrap(), Layout::V2(t.clone()));
        fs::remove_dir_all(t).unwrap();
    }

    #[test]
    fn v2_without_memory_is_an_error() {
        let t = tempfile_dir();
        fs::write(t.join("cgroup.controllers"), "hugetlb\n").unwrap();
        let e = detect(&t).unwrap_err().to_string();
        assert!(e.contains("lacks the memory"), "{e}");
        fs::remove_dir_all(t).unwrap();
    }

    #[test]
    fn detects_v1() {
        let t = tempfile_dir();
        fs::create_dir_all(t.join("memory")).unwrap();
        fs::write(t.join("memory/cgroup.procs"), "").unwrap();
        assert_eq!(detect(&t).unwrap(), Layout::V1(t.clone()));
        fs::remove_dir_all(t).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "veil-cg-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

#[cfg(test)]
mod stale_tests {
    use super::*;

    /// After a kill -9 and a quick restart, the node's own leftover cgroups go at once, however
    /// young; a young one it does not know (another node's) stays; non-empty ones stay.
    #[test]
    fn own_leftovers_go_whatever_their_age() {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join("veil");
        for d in ["mine", "theirs", "busy/child"] {
            fs::create_dir_all(parent.join(d)).unwrap();
        }
        let ours: std::collections::HashSet<String> =
            ["mine".to_string(), "busy".to_string()].into();
        let n = remove_stale(&Layout::V2(root.path().to_path_buf()), "veil", &ours);
        assert_eq!(n, 1);
        assert!(!parent.join("mine").exists());
        assert!(parent.join("theirs").exists());
        assert!(parent.join("busy").exists());
    }
}
