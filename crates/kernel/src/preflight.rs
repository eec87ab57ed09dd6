//! What the kernel engine needs from the machine, checked before anything is
//! created: root, `/dev/fuse`, loop devices and the e2fsprogs/util-linux
//! tools, each refusal naming the fix.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The device nodes and tools the engine uses.
#[derive(Debug, Clone)]
pub struct Requirements {
    /// The FUSE device.
    pub fuse: PathBuf,
    /// The loop control device.
    pub loop_control: PathBuf,
    /// Tools that must be found in `PATH`.
    pub tools: Vec<&'static str>,
}

impl Default for Requirements {
    fn default() -> Self {
        Requirements {
            fuse: "/dev/fuse".into(),
            loop_control: "/dev/loop-control".into(),
            tools: vec!["mkfs.ext4", "losetup", "mount"],
        }
    }
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        reason: format!("{reason}; the libext2fs engine (--engine libext2fs) needs none of this"),
    }
}

/// Check everything in `req` for the current process.
pub fn check(req: &Requirements) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(unavailable(
            "it needs root (it mounts a FUSE file, attaches a loop device and mounts ext4)".into(),
        ));
    }
    for (dev, hint) in [
        (
            &req.fuse,
            "load the `fuse` module, or run the container with --device /dev/fuse",
        ),
        (
            &req.loop_control,
            "load the `loop` module, or run the container with the loop devices",
        ),
    ] {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
            if let Some(hint) = crate::error::fd_limit_hint(&e) {
                // There, but this process is out of file descriptors.
                return Err(Error::io(dev, format!("cannot open ({hint})"), e));
            }
            return Err(unavailable(format!(
                "cannot open {}: {e} ({hint})",
                dev.display()
            )));
        }
    }
    for t in &req.tools {
        if find_in_path(t).is_none() {
            return Err(unavailable(format!(
                "`{t}` is not installed (e2fsprogs / util-linux)"
            )));
        }
    }
    Ok(())
}

/// Where `name` is found in `PATH` (plus the sbin directories, which a
/// non-login root shell may lack).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
