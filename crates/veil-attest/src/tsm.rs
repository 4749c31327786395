//! The Linux configfs-tsm report interface (`/sys/kernel/config/tsm/report`), shared by the
//! SNP and TDX attesters. Only file operations: no ioctl, no unsafe.

use crate::{Error, TeeKind, REPORT_DATA_LEN};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a configfs-tsm report produced.
pub(crate) struct TsmReport {
    /// The report (SNP) or quote (TDX).
    pub outblob: Vec<u8>,
    /// Auxiliary data (SNP: the certificate table), if any.
    pub auxblob: Option<Vec<u8>>,
}

/// Removes the report entry when dropped.
struct Entry(PathBuf);

impl Drop for Entry {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            tracing::warn!("removing {}: {e}", self.0.display());
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

fn read_trimmed(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| io(path, e))
}

/// Make one report through configfs-tsm at `root`, requiring the kernel provider `provider`
/// (`sev_guest` or `tdx_guest`).
pub(crate) fn report(
    root: &Path,
    report_data: &[u8; REPORT_DATA_LEN],
    privlevel: Option<u32>,
    provider: &str,
    tee: TeeKind,
) -> Result<TsmReport, Error> {
    if !root.is_dir() {
        return Err(Error::Unavailable(
            tee,
            format!(
                "{} does not exist (configfs-tsm not mounted or no TEE guest driver)",
                root.display()
            ),
        ));
    }
    let name = format!(
        "veil-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let dir = root.join(name);
    std::fs::create_dir(&dir).map_err(|e| io(&dir, e))?;
    let entry = Entry(dir);
    let dir = &entry.0;

    let actual = read_trimmed(&dir.join("provider"))?;
    if actual != provider {
        return Err(Error::Unavailable(
            tee,
            format!("configfs-tsm provider is {actual:?}, not {provider:?}"),
        ));
    }
    if let Some(level) = privlevel {
        let p = dir.join("privlevel");
        std::fs::write(&p, level.to_string()).map_err(|e| io(&p, e))?;
    }
    let p = dir.join("inblob");
    std::fs::write(&p, report_data).map_err(|e| io(&p, e))?;
    let generation = read_trimmed(&dir.join("generation"))?;

    let p = dir.join("outblob");
    let outblob = std::fs::read(&p).map_err(|e| io(&p, e))?;
    let p = dir.join("auxblob");
    let auxblob = match std::fs::read(&p) {
        Ok(b) if !b.is_empty() => Some(b),
        _ => None,
    };
    // Someone else writing to the same entry would change the generation: refuse the result.
    if read_trimmed(&dir.join("generation"))? != generation {
        return Err(Error::Io(
            "configfs-tsm report entry was modified concurrently".into(),
        ));
    }
    if outblob.is_empty() {
        return Err(Error::Io("configfs-tsm returned an empty report".into()));
    }
    Ok(TsmReport { outblob, auxblob })
}
