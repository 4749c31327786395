//! The node's capacity: a memory and a CPU budget that every sandbox counts against with its
//! cgroup limits from the moment it is booted (pooled or assigned) until it is destroyed, so the
//! node never starts more sandboxes than the machine was said to hold.

use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// An amount of sandbox resources: a budget, a sandbox's limits, or what is committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    /// Bytes of memory limits.
    pub memory_bytes: u64,
    /// Thousandths of a core of CPU limits.
    pub cpu_millis: u64,
}

/// Memory the default budget leaves to the host: at least this much, and at least an eighth.
pub const HOST_MEMORY_RESERVE: u64 = 1 << 30;

/// Sandbox cores the default CPU budget allows per CPU the node may use. Sandboxes are mostly
/// idle between requests and each one's cgroup caps it at its own quota, so the budget
/// overcommits — by a fixed, documented factor, not without bound.
pub const CPU_OVERCOMMIT: u64 = 4;

impl Resources {
    /// The default budget on this machine: its total memory less [`HOST_MEMORY_RESERVE`] (or an
    /// eighth, whichever is more), and [`CPU_OVERCOMMIT`] cores per CPU available to this
    /// process (affinity and cgroup quota respected).
    pub fn of_this_machine() -> Self {
        let total = match std::fs::read_to_string("/proc/meminfo")
            .ok()
            .as_deref()
            .and_then(mem_total)
        {
            Some(t) => t,
            None => {
                tracing::warn!("cannot read MemTotal from /proc/meminfo; assuming 2 GiB");
                2 << 30
            }
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Self {
            memory_bytes: total.saturating_sub(HOST_MEMORY_RESERVE.max(total / 8)),
            cpu_millis: cpus * 1000 * CPU_OVERCOMMIT,
        }
    }

    /// How many sandboxes of `each` fit in this budget.
    pub fn fits(&self, each: &Resources) -> u64 {
        let by = |have: u64, need: u64| have.checked_div(need).unwrap_or(u64::MAX);
        by(self.memory_bytes, each.memory_bytes).min(by(self.cpu_millis, each.cpu_millis))
    }
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} memory and {} CPU",
            human_bytes(self.memory_bytes),
            self.cpu_millis as f64 / 1000.0
        )
    }
}

/// `MemTotal` of `/proc/meminfo` in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if b >= size {
            return format!("{:.1} {unit}", b as f64 / size as f64);
        }
    }
    format!("{b} B")
}

/// Parse a size: plain bytes, or a number with `K`, `M`, `G`, `T` (binary multiples, with or
/// without `iB`/`B`), e.g. `1536M`, `8GiB`, `1073741824`.
pub fn parse_size(s: &str) -> Result<u64, CapacityError> {
    let bad = || CapacityError::BadSize(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Errors of capacity accounting and configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CapacityError {
    /// The budget has no room for one more sandbox.
    #[error(
        "the node is at capacity: {sandboxes} sandboxes commit {used} of its {capacity} \
         (one sandbox needs {each})"
    )]
    Exhausted {
        /// Sandboxes counted against the budget.
        sandboxes: u64,
        /// What they commit.
        used: Resources,
        /// The budget.
        capacity: Resources,
        /// One sandbox's limits.
        each: Resources,
    },
    /// The budget does not hold even one sandbox.
    #[error("a node capacity of {capacity} holds no sandbox of {each}")]
    TooSmall {
        /// The budget.
        capacity: Resources,
        /// One sandbox's limits.
        each: Resources,
    },
    /// The pools' memory holds no sandbox, though pools were asked for.
    #[error(
        "a pool memory of {} holds no sandbox of {} memory: give at least that, or a pool size of 0",
        human_bytes(*pool_memory),
        human_bytes(*each_memory)
    )]
    PoolTooSmall {
        /// The pools' memory.
        pool_memory: u64,
        /// One sandbox's memory limit.
        each_memory: u64,
    },
    /// A size that does not parse.
    #[error("{0:?} is not a size (bytes, or a number with K, M, G or T)")]
    BadSize(String),
}

/// Capacity and what is committed against it, for status pages and metrics.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CapacityStatus {
    /// The budget.
    pub capacity: Resources,
    /// One sandbox's limits.
    pub per_sandbox: Resources,
    /// Sandboxes the budget holds.
    pub max_sandboxes: u64,
    /// Committed by the sandboxes that exist or are booting.
    pub used: Resources,
    /// Sandboxes counted (pooled, assigned and booting).
    pub sandboxes: u64,
}

#[derive(Default)]
struct Used {
    resources: Resources,
    sandboxes: u64,
}

/// The budget and what is committed against it. Reservations are taken before a sandbox is
/// booted and given back when it is destroyed (or its boot fails), by a guard.
pub(crate) struct Budget {
    capacity: Resources,
    each: Resources,
    used: Mutex<Used>,
    /// Bumped whenever room may have appeared (a reservation ended, a pooled sandbox is ready).
    changes: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Budget {
    pub(crate) fn new(capacity: Resources, each: Resources) -> Result<Arc<Self>, CapacityError> {
        if capacity.fits(&each) == 0 {
            return Err(CapacityError::TooSmall { capacity, each });
        }
        Ok(Arc::new(Self {
            capacity,
            each,
            used: Mutex::new(Used::default()),
            changes: watch::channel(0).0,
        }))
    }

    /// Reserve one sandbox's limits, or say why not.
    pub(crate) fn reserve(self: &Arc<Self>) -> Result<Reservation, CapacityError> {
        let mut used = lock(&self.used);
        let after = Resources {
            memory_bytes: used.resources.memory_bytes + self.each.memory_bytes,
            cpu_millis: used.resources.cpu_millis + self.each.cpu_millis,
        };
        if after.memory_bytes > self.capacity.memory_bytes
            || after.cpu_millis > self.capacity.cpu_millis
        {
            return Err(CapacityError::Exhausted {
                sandboxes: used.sandboxes,
                used: used.resources,
                capacity: self.capacity,
                each: self.each,
            });
        }
        used.resources = after;
        used.sandboxes += 1;
        Ok(Reservation {
            budget: self.clone(),
        })
    }

    pub(crate) fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(crate) fn status(&self) -> CapacityStatus {
        let used = lock(&self.used);
        CapacityStatus {
            capacity: self.capacity,
            per_sandbox: self.each,
            max_sandboxes: self.capacity.fits(&self.each),
            used: used.resources,
            sandboxes: used.sandboxes,
        }
    }
}

/// One sandbox's share of the budget, given back on drop.
pub(crate) struct Reservation {
    budget: Arc<Budget>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        {
            let mut used = lock(&self.budget.used);
            let each = self.budget.each;
            used.resources.memory_bytes = used
                .resources
                .memory_bytes
                .saturating_sub(each.memory_bytes);
            used.resources.cpu_millis = used.resources.cpu_millis.saturating_sub(each.cpu_millis);
            used.sandboxes = used.sandboxes.saturating_sub(1);
        }
        self.budget.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EACH: Resources = Resources {
        memory_bytes: 512 << 20,
        cpu_millis: 1000,
    };

    #[test]
    fn reservations_stop_at_the_budget_and_come_back_on_drop() {
        let budget = Budget::new(
            Resources {
                memory_bytes: 4 << 30,
                cpu_millis: 3000,
            },
            EACH,
        )
        .unwrap();
        assert_eq!(budget.status().max_sandboxes, 3);
        let held: Vec<Reservation> = (0..3).map(|_| budget.reserve().unwrap()).collect();
        let err = budget.reserve().err().unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("at capacity") && msg.contains("3 sandboxes"),
            "{msg}"
        );
        assert!(msg.contains("and 3 CPU"), "{msg}");
        let mut rx = budget.subscribe();
        drop(held);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert_eq!(budget.status().sandboxes, 0);
        assert_eq!(budget.status().used, Resources::default());
        let _again = budget.reserve().unwrap();
    }

    #[test]
    fn memory_binds_as_well_as_cpu() {
        let cap = Resources {
            memory_bytes: 1 << 30,
            cpu_millis: 100_000,
        };
        assert_eq!(cap.fits(&EACH), 2);
        let small = Resources {
            memory_bytes: 100 << 20,
            cpu_millis: 100_000,
        };
        let err = Budget::new(small, EACH).err().unwrap();
        assert!(err.to_string().contains("holds no sandbox"), "{err}");
    }

    #[test]
    fn sizes() {
        for (s, n) in [
            ("1073741824", 1u64 << 30),
            ("1536M", 1536 << 20),
            ("8GiB", 8 << 30),
            ("2 g", 2 << 30),
            ("64k", 64 << 10),
            ("1T", 1 << 40),
        ] {
            assert_eq!(parse_size(s).unwrap(), n, "{s}");
        }
        for bad in ["", "G", "1.5G", "-1", "12X", "99999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn machine_budget_reads_meminfo() {
        assert_eq!(
            mem_total("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            Some(16384 * 1024)
        );
        assert_eq!(mem_total("nothing"), None);
        let m = Resources::of_this_machine();
        assert!(m.cpu_millis >= 1000 * CPU_OVERCOMMIT);
    }
}
