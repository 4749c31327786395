//! File system operations relative to a directory descriptor, on one path
//! component at a time, never following a symbolic link in that component.
//!
//! The unpacker reaches every directory by opening it from its parent with
//! `O_DIRECTORY | O_NOFOLLOW`, starting from the root, so no operation here
//! resolves a path through a link a layer planted.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, readlinkat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// What a directory entry is (`lstat`-style: a symlink is a symlink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Dir,
    Symlink,
    File,
    /// Devices, FIFOs, sockets.
    Other,
}

fn kind_of(st: &FileStat) -> Kind {
    let fmt = st.st_mode & SFlag::S_IFMT.bits();
    if fmt == SFlag::S_IFDIR.bits() {
        Kind::Dir
    } else if fmt == SFlag::S_IFLNK.bits() {
        Kind::Symlink
    } else if fmt == SFlag::S_IFREG.bits() {
        Kind::File
    } else {
        Kind::Other
    }
}

/// The kind of `name` in `dir`, `None` if it does not exist.
pub(super) fn kind_at(dir: impl AsFd, name: &OsStr) -> nix::Result<Option<Kind>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(kind_of(&st))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Device and inode of an open descriptor.
pub(super) fn identity(fd: impl AsFd) -> nix::Result<(u64, u64)> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Open the directory `name` in `dir`; `ELOOP` or `ENOTDIR` if it is a
/// symlink or not a directory.
pub(super) fn open_dir_at(dir: impl AsFd, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Open the directory at the relative `path` below `dir` in one call, if
/// no component of it is a symlink (`ELOOP` otherwise) and it stays below
/// `dir`: `openat2` with `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH` (Linux 5.6).
pub(super) fn open_dir_beneath(dir: impl AsFd, path: &OsStr) -> nix::Result<OwnedFd> {
    openat2(
        dir,
        path,
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH),
    )
}

/// Open `dir`'s parent. Only for a directory known not to be the root.
pub(super) fn open_parent(dir: impl AsFd) -> nix::Result<OwnedFd> {
    openat(
        dir,
        "..",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Create the regular file `name` in `dir`, which must not exist (so a
/// symlink there is never followed), mode 0600 until the entry's is set.
pub(super) fn create_file_at(dir: impl AsFd, name: &OsStr) -> nix::Result<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    Ok(File::from(fd))
}

/// Create the directory `name` in `dir`, mode 0755 until the entry's is set.
pub(super) fn mkdir_at(dir: impl AsFd, name: &OsStr) -> nix::Result<()> {
    mkdirat(dir, name, Mode::from_bits_truncate(0o755))
}

pub(super) fn symlink_at(target: &OsStr, dir: impl AsFd, name: &OsStr) -> nix::Result<()> {
    symlinkat(target, dir, name)
}

pub(super) fn readlink_at(dir: impl AsFd, name: &OsStr) -> nix::Result<OsString> {
    readlinkat(dir, name)
}

/// Change the owner of `name` in `dir` itself (a symlink is not followed).
pub(super) fn lchown_at(dir: impl AsFd, name: &OsStr, uid: u32, gid: u32) -> nix::Result<()> {
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

/// Hard-link `src_name` in `src_dir` (not following a symlink) as
/// `dst_name` in `dst_dir`.
pub(super) fn link_at(
    src_dir: impl AsFd,
    src_name: &OsStr,
    dst_dir: impl AsFd,
    dst_name: &OsStr,
) -> nix::Result<()> {
    linkat(src_dir, src_name, dst_dir, dst_name, AtFlags::empty())
}

/// Remove the non-directory `name` in `dir`.
pub(super) fn unlink_at(dir: impl AsFd, name: &OsStr) -> nix::Result<()> {
    unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
}

/// Names in the directory `dir` (without `.` and `..`), read through a
/// descriptor of its own so `dir`'s offset is untouched.
pub(super) fn list_dir(dir: impl AsFd) -> nix::Result<Vec<OsString>> {
    let mut d = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for e in d.iter() {
        let name = e?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(&name).to_os_string());
        }
    }
    Ok(names)
}

/// Deepest directory tree [`remove_tree_at`] descends (a bound on its
/// recursion; the unpacker itself never creates trees half as deep).
const MAX_REMOVE_DEPTH: usize = 4 * super::MAX_PATH_DEPTH;

/// Remove the directory `name` in `dir` with everything in it. Symlinks
/// inside are removed, never followed.
pub(super) fn remove_tree_at(dir: impl AsFd, name: &OsStr) -> nix::Result<()> {
    remove_tree(dir.as_fd(), name, 0)
}

fn remove_tree(dir: std::os::fd::BorrowedFd<'_>, name: &OsStr, depth: usize) -> nix::Result<()> {
    if depth > MAX_REMOVE_DEPTH {
        return Err(Errno::ENAMETOOLONG);
    }
    let child = open_dir_at(dir, name)?;
    for n in list_dir(&child)? {
        match unlink_at(&child, &n) {
            Ok(()) | Err(Errno::ENOENT) => {}
            // Linux refuses unlink(2) of a directory with EISDIR.
            Err(Errno::EISDIR) => remove_tree(child.as_fd(), &n, depth + 1)?,
            Err(e) => return Err(e),
        }
    }
    drop(child);
    unlinkat(dir, name, UnlinkatFlags::RemoveDir)
}
