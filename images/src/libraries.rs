//! The shared libraries a dynamically linked binary loads, as this machine's
//! loader resolves them (`ldd`): the program interpreter (ld-linux) and
//! every `DT_NEEDED` library, transitively, at the paths the loader finds
//! them. An image that holds these files at these paths runs the binary
//! without anything else from the build machine.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("running `ldd {binary}` (from Debian's libc-bin): {source}")]
    Ldd {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("`ldd {binary}` cannot resolve `{library}`: it is not installed on this machine")]
    NotFound { binary: PathBuf, library: String },
    #[error("`ldd {binary}` failed: {stderr}")]
    Failed { binary: PathBuf, stderr: String },
}

/// The absolute paths of the libraries `binary` loads (its interpreter
/// included), in `ldd`'s order; empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, LibraryError> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| LibraryError::Ldd {
            binary: binary.to_owned(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // ldd exits 1 on a static binary, saying so.
    if stdout.contains("statically linked") || stderr.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if !output.status.success() {
        return Err(LibraryError::Failed {
            binary: binary.to_owned(),
            stderr: stderr.trim().to_owned(),
        });
    }
    parse_ldd(&stdout).map_err(|library| LibraryError::NotFound {
        binary: binary.to_owned(),
        library,
    })
}

/// `ldd`'s lines: `libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x…)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x…)` (the interpreter) and
/// `linux-vdso.so.1 (0x…)` (the kernel's, no file). Err names a library
/// `ldd` reports as `not found`.
fn parse_ldd(stdout: &str) -> Result<Vec<PathBuf>, String> {
    let mut paths = Vec::new();
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (name, target) = match line.split_once("=>") {
            Some((name, target)) => (name.trim(), target.trim()),
            None => (line, line),
        };
        if target.starts_with("not found") {
            return Err(name.to_owned());
        }
        let path = target.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') && !paths.iter().any(|p: &PathBuf| p == Path::new(path)) {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_the_interpreter_and_libraries_not_the_vdso() {
        let stdout = "\tlinux-vdso.so.1 (0x00007ffd4c9d6000)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1c0a4c0000)\n\
            \tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f1c0a3e1000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1c0a200000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f1c0b5e0000)\n";
        assert_eq!(
            parse_ldd(stdout).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            parse_ldd("\tlibssl.so.3 => not found\n").unwrap_err(),
            "libssl.so.3"
        );
    }

    #[test]
    fn this_test_binary_needs_libc() {
        let libraries = shared_libraries(&std::env::current_exe().unwrap()).unwrap();
        assert!(
            libraries
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == "libc.so.6")),
            "{libraries:?}"
        );
    }
}
