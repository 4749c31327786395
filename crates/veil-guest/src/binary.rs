//! The agent binary as the initrd carries it: stripped of debug information, with the shared
//! libraries it loads (this toolchain links glibc dynamically).

use crate::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The files the dynamic loader maps for `binary`, the loader itself included, as `ldd` (the
/// loader's own answer, honouring its search path and cache) lists them. Empty for a static
/// binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = Command::new("ldd")
        .arg(binary)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| Error::Tool {
            tool: "ldd",
            path: binary.to_path_buf(),
            detail: e.to_string(),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.contains("statically linked") || stderr.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(Error::Tool {
            tool: "ldd",
            path: binary.to_path_buf(),
            detail: stderr.trim().to_string(),
        });
    }
    parse_ldd(&stdout).map_err(|lib| Error::LibraryNotFound {
        binary: binary.to_path_buf(),
        lib,
    })
}

/// The absolute paths in `ldd` output; `Err(name)` for a library it could not find.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(name.trim().to_string());
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        // `linux-vdso.so.1 (0x…)` is the kernel's, not a file.
        if path.starts_with('/') && !libs.iter().any(|l: &PathBuf| l.as_os_str() == path) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Write `binary` without its symbols and debug information to `out` (binutils' `strip`,
/// present wherever rustc can link).
pub fn strip(binary: &Path, out: &Path) -> Result<(), Error> {
    let res = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(out)
        .arg(binary)
        .output()
        .map_err(|e| Error::Tool {
            tool: "strip",
            path: binary.to_path_buf(),
            detail: format!("{e} (install binutils, or build without stripping)"),
        })?;
    if !res.status.success() {
        return Err(Error::Tool {
            tool: "strip",
            path: binary.to_path_buf(),
            detail: String::from_utf8_lossy(&res.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x00007f3c)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3b)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f3d)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libssl.so.3"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert_eq!(
            parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err(),
            "libfoo.so.1"
        );
    }

    #[test]
    fn this_test_binary_has_libc() {
        let exe = std::env::current_exe().unwrap();
        let libs = shared_libraries(&exe).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }
}
