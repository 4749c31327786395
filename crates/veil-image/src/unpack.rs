//! Hardened unpacking of image layers onto a root directory.
//!
//! Layers are hostile input:
//!
//! * entry names are normalised and must stay inside the root: absolute
//!   paths and `..` are errors, and a name has at most [`MAX_PATH_DEPTH`]
//!   components of at most [`MAX_NAME_BYTES`] bytes;
//! * every file system operation works on one name in a directory opened by
//!   descriptor, and every directory is opened from its parent with
//!   `O_NOFOLLOW`, starting from the root; parent directories resolve like a
//!   chroot (symlinks followed in user space, clamped to the root; at most
//!   [`MAX_SYMLINK_HOPS`] of them); the final component is never followed;
//! * directory owners, modes and modification times are applied when the
//!   whole layer is written, through descriptors opened the same way, so a
//!   directory a later entry replaced (with a symlink, say) is never reached
//!   by path;
//! * hard links must name a regular file inside the root; devices and FIFOs
//!   are skipped; OCI whiteouts are applied;
//! * the GNU long names and links and PAX headers of one entry hold at most
//!   [`MAX_EXTENSION_HEADER_BYTES`], checked before the tar parser reads them;
//! * anything from the layer that reaches an error message or a log line is
//!   quoted, with unprintable characters escaped, and shortened.
//!
//! Cost: the previous entry's parent stays open, and a run of directories
//! opened before is reopened with one `openat2(RESOLVE_NO_SYMLINKS |
//! RESOLVE_BENEATH)` (which refuses any symlink, so that shortcut never
//! matters for containment), so an entry costs a few system calls and work
//! linear in its name, in any order. Without `openat2` (Linux before 5.6)
//! a parent costs one `openat` per component. Resolving one parent walks at
//! most [`MAX_RESOLVE_STEPS`] components, symlink targets included.

mod entry;
mod finish;
mod fsat;
mod headers;
mod names;
mod resolve;
mod tree;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;

use std::fs;
use std::io::{self, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::manifest::Compression;
use crate::Error;
use entry::Unpacker;
use headers::{Framing, HeaderGuard};
use names::corrupt;

/// Prefix of whiteout file names.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the opaque-directory marker.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// Maximum number of symlinks followed while resolving one path.
pub const MAX_SYMLINK_HOPS: u32 = 40;
/// Maximum number of components of an entry's path, both as named in the
/// layer and once its parent is resolved through symlinks. Deeper entries
/// are refused ([`Error::PathTooLong`]). Real images stay far below it; it
/// also bounds the directory descriptors the unpacker holds at a time.
pub const MAX_PATH_DEPTH: usize = 256;
/// Maximum length of one path component (Linux's `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;
/// Maximum number of path components walked to resolve one entry's parent,
/// symlink targets included ([`Error::PathTooLong`] beyond).
pub const MAX_RESOLVE_STEPS: usize = 4 * MAX_PATH_DEPTH;
/// Maximum bytes of the tar extension headers (GNU long name and long link
/// name, PAX extended and global headers) of one entry; more is refused
/// ([`Error::ExtensionHeaderTooLarge`]) before any of it is read. Names are
/// at most a few KiB, and the unpacker ignores every other PAX record.
pub const MAX_EXTENSION_HEADER_BYTES: u64 = 1024 * 1024;

/// Limits and behaviour of [`unpack_layer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Refuse layers expanding beyond this many bytes of file data.
    pub max_bytes: u64,
    /// Refuse layers with more than this many tar entries.
    pub max_entries: u64,
    /// Chown entries to their tar uid/gid (true inside a sandbox running as
    /// root; false in unprivileged tests).
    pub preserve_owner: bool,
}

impl Default for UnpackOptions {
    /// 8 GiB of file data, 1 000 000 entries, owners not preserved.
    fn default() -> Self {
        UnpackOptions {
            max_bytes: 8 * 1024 * 1024 * 1024,
            max_entries: 1_000_000,
            preserve_owner: false,
        }
    }
}

/// What [`unpack_layer`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries processed (including whiteouts and skipped ones).
    pub entries: u64,
    /// Bytes of regular-file data written.
    pub bytes: u64,
    /// Whiteouts (including opaque markers) applied.
    pub whiteouts: u64,
    /// Character/block devices and FIFOs skipped.
    pub skipped_devices: u64,
}

/// Unpack one layer blob (compressed bytes as stored in a registry) onto
/// `root`, an existing directory, applying OCI whiteouts against the lower
/// layers already there.
///
/// On success the reader has been consumed to EOF, even past the tar end
/// marker, so a [`crate::digest::VerifyingReader`] wrapped around the blob
/// has seen every byte. Integrity of the blob itself is the caller's job
/// (verify the digest after this returns).
pub fn unpack_layer<R: Read>(
    blob: R,
    compression: Compression,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, Error> {
    let meta =
        fs::symlink_metadata(root).map_err(|e| Error::io(root, "inspecting the unpack root", e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            root,
            "using the unpack root",
            io::Error::new(
                io::ErrorKind::NotADirectory,
                "the unpack root is not a directory",
            ),
        ));
    }
    let stats = match compression {
        Compression::None => {
            let mut r = blob;
            let stats = apply_tar(&mut r, root, opts)?;
            drain(&mut r)?;
            stats
        }
        Compression::Gzip => {
            let mut d = MultiGzDecoder::new(blob);
            let stats = apply_tar(&mut d, root, opts)?;
            drain(&mut d.into_inner())?;
            stats
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(blob).map_err(corrupt)?;
            let stats = apply_tar(&mut d, root, opts)?;
            drain(&mut d.finish())?;
            stats
        }
    };
    tracing::debug!(
        root = %root.display(),
        entries = stats.entries,
        bytes = stats.bytes,
        whiteouts = stats.whiteouts,
        skipped_devices = stats.skipped_devices,
        "unpacked layer"
    );
    Ok(stats)
}

/// Read the raw blob to EOF without interpreting it.
fn drain<R: Read>(r: &mut R) -> Result<(), Error> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(corrupt(e)),
        }
    }
}

fn apply_tar<R: Read>(
    reader: &mut R,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, Error> {
    apply(reader, Unpacker::new(root, opts)?)
}

fn apply<R: Read>(reader: &mut R, mut st: Unpacker<'_>) -> Result<UnpackStats, Error> {
    let opts = st.opts;
    let framing = Framing::new();
    let mut archive = tar::Archive::new(HeaderGuard::new(reader, framing.clone()));
    let entries = archive.entries().map_err(|e| framing.error(e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| framing.error(e))?;
        framing.entry_started(&mut entry)?;
        st.stats.entries += 1;
        if st.stats.entries > opts.max_entries {
            return Err(Error::LimitExceeded {
                what: "entry count",
                limit: opts.max_entries,
            });
        }
        st.apply_entry(&mut entry)?;
    }
    st.finish()?;
    Ok(st.stats)
}
