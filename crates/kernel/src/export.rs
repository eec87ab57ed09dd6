//! The layer stack as a mounted ext4: the device served as the file
//! `WORK/disk/disk` by our FUSE block mode, a loop device over that file and
//! the kernel's ext4 mounted at `WORK/root`.
//!
//! [`Export`] owns each piece as it is set up and takes them down in the
//! reverse order: by [`Export::close`] on success (every failure reported),
//! or when dropped on an error path (best effort: a busy mount is detached
//! lazily, a busy loop device is left to auto-clear, so nothing stays behind
//! once its last user is gone). The work directory is removed last. If the
//! process dies with them set up (SIGKILL), its [`crate::watchdog`] process
//! takes them down.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockdev::BlockDevice;
use nix::mount::{umount2, MntFlags};
use obdfuse::block::{DiskFs, IoFailures, DISK_NAME};
use obdfuse::session::{self, Background};
use obdfuse::MountConfig;

use crate::error::{Error, Result};
use crate::watchdog::Watchdog;

/// FUSE threads serving the disk file: the loop device's I/O and mkfs.
const FUSE_THREADS: usize = 4;

/// A device exposed as a file, and what is stacked on that file.
pub struct Export {
    work: Option<PathBuf>,
    fuse: Option<Background>,
    /// Device errors the FUSE side answered: the kernel may drop them.
    failures: Arc<IoFailures>,
    disk: PathBuf,
    /// The disk file's size in bytes.
    size: u64,
    loop_dev: Option<PathBuf>,
    mounted: Option<PathBuf>,
    /// Takes everything down if this process is killed; told "done" (by
    /// being dropped) once the export took it down itself.
    watchdog: Option<Watchdog>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("disk", &self.disk)
            .field("loop_dev", &self.loop_dev)
            .field("mounted", &self.mounted)
            .finish()
    }
}

/// Run a tool; its stdout on success, [`Error::Tool`] with its output otherwise.
pub fn run_tool(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}").replace('"', "");
    tracing::debug!("running {line}");
    let out = cmd
        .output()
        .map_err(|e| match crate::error::fd_limit_hint(&e) {
            // Out of file descriptors: the engine is there, the run is short.
            Some(hint) => Error::Spawn {
                command: line.clone(),
                hint: format!("; {hint}"),
                source: e,
            },
            None => Error::Unavailable {
                reason: format!("cannot run `{line}`: {e}"),
            },
        })?;
    if !out.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        return Err(Error::Tool {
            command: line,
            status: out.status.to_string(),
            output: text.trim().replace('\n', "; "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What [`remove_work_dirs`] did.
#[derive(Debug, Default)]
pub(crate) struct Removal {
    /// Whether any of them was there, and was removed.
    pub(crate) removed: bool,
    /// Those that could not be removed, and why.
    pub(crate) failed: Vec<(PathBuf, std::io::Error)>,
}

/// Remove the (empty) mountpoints `WORK/root` and `WORK/disk` and the work
/// directory `work` itself, never recursively: a mount that could not be
/// taken down keeps its contents. Each is tried, also after one failed; one
/// already gone is not a failure. For [`Export`] and the watchdog alike.
pub(crate) fn remove_work_dirs(work: &Path) -> Removal {
    let mut r = Removal::default();
    for p in [work.join("root"), work.join("disk"), work.to_path_buf()] {
        match std::fs::remove_dir(&p) {
            Ok(()) => r.removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => r.failed.push((p, e)),
        }
    }
    r
}

impl Export {
    /// Serve `dev` (writable) as a file in a new directory under `work_dir`.
    pub fn open(dev: Arc<dyn BlockDevice>, work_dir: &Path) -> Result<Export> {
        if dev.is_read_only() {
            return Err(Error::Usage(
                "the layer stack is read-only: the kernel engine needs a writable upper layer"
                    .into(),
            ));
        }
        let work = tempfile::Builder::new()
            .prefix("overlaybd-kernel-")
            .tempdir_in(work_dir)
            .map_err(|e| Error::io(work_dir, "cannot make a work directory", e))?
            .keep();
        // The path the kernel shows in mountinfo and in the loop device's
        // backing file, for the watchdog.
        let work = match work.canonicalize() {
            Ok(w) => w,
            Err(e) => {
                let err = Error::io(&work, "cannot resolve the work directory", e);
                let _ = std::fs::remove_dir(&work);
                return Err(err);
            }
        };
        let watchdog = Watchdog::start(&work);
        let fuse_dir = work.join("disk");
        let root = work.join("root");
        let cfg = MountConfig {
            mountpoint: fuse_dir.clone(),
            read_only: false,
            threads: FUSE_THREADS,
            allow_other: false,
            default_permissions: false,
            fsname: "overlaybd-kernel".into(),
        };
        let size = dev.size();
        let fs = DiskFs::new(dev, true, 0, 0);
        let mut export = Export {
            disk: fuse_dir.join(DISK_NAME),
            size,
            work: Some(work),
            fuse: None,
            failures: fs.failures(),
            loop_dev: None,
            mounted: None,
            watchdog,
        };
        // Made once `export` owns the work directory: its drop removes what was
        // made if one fails (out of inodes, say).
        for d in [&fuse_dir, &root] {
            std::fs::create_dir(d).map_err(|e| Error::io(d, "cannot create", e))?;
        }
        export.fuse = Some(session::spawn(fs, &cfg).map_err(Error::Fuse)?);
        if let Some(w) = export.watchdog.as_mut() {
            w.fuse_mounted(&fuse_dir);
        }
        Ok(export)
    }

    /// The file that holds the device's bytes.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// The work directory (all mounts are below it).
    pub fn work_dir(&self) -> &Path {
        self.work.as_deref().expect("open until closed")
    }

    /// `mkfs.ext4 ARGS DISK`.
    pub fn mkfs(&self, args: &[String]) -> Result<()> {
        match run_tool(Command::new("mkfs.ext4").args(args).arg(&self.disk)) {
            Ok(_) => Ok(()),
            // mkfs.ext4 writes the disk file with this process's file size
            // limit (it inherits it, and SIGXFSZ ignored): past it, the
            // kernel fails its write with EFBIG before FUSE sees it.
            Err(Error::Tool {
                command,
                status,
                mut output,
            }) => {
                match blockdev::io::file_size_limit() {
                    Some(limit) if limit < self.size && output.contains("File too large") => output
                        .push_str(&format!(
                            " (mkfs.ext4 runs with this process's file size limit (ulimit -f) \
                             of {limit} bytes, smaller than the {}-byte disk it writes: raise \
                             the limit)",
                            self.size
                        )),
                    _ => {}
                }
                Err(Error::Tool {
                    command,
                    status,
                    output,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Attach a loop device to the disk file and mount its ext4 at
    /// `WORK/root` with `options` (comma-separated, as `mount -o`).
    pub fn mount(&mut self, options: &str) -> Result<&Path> {
        let out = run_tool(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&self.disk),
        )?;
        let dev = PathBuf::from(out.trim());
        if !dev.starts_with("/dev") {
            return Err(Error::Tool {
                command: "losetup --find --show".into(),
                status: "success".into(),
                output: format!("unexpected output '{}'", out.trim()),
            });
        }
        self.loop_dev = Some(dev.clone());
        if let Some(w) = self.watchdog.as_mut() {
            w.loop_attached(&dev);
        }
        let root = self.work_dir().join("root");
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "ext4"]);
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        run_tool(cmd.arg(&dev).arg(&root))?;
        if let Some(w) = self.watchdog.as_mut() {
            w.root_mounted(&root);
        }
        tracing::debug!("ext4 on {} mounted at {}", dev.display(), root.display());
        self.mounted = Some(root);
        Ok(self.mounted.as_deref().expect("just set"))
    }

    /// The loop device, once attached.
    pub fn loop_device(&self) -> Option<&Path> {
        self.loop_dev.as_deref()
    }

    /// Take everything down in order, reporting the first failure (the
    /// rest is still taken down). Any read or write of the device that
    /// failed while it was exposed fails the close too, even if the kernel
    /// carried on (ext4 drops a failed writeback with a log line).
    pub fn close(mut self) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                tracing::warn!("tearing down: {e}");
                first.get_or_insert(e);
            }
        };
        note(self.unmount(false));
        note(self.detach_loop());
        note(self.sync_disk());
        if let Some(f) = self.fuse.take() {
            note(f.stop().map_err(Error::Fuse));
        }
        note(self.remove_work());
        // Everything is down (or left to auto-clear): the watchdog may go.
        self.watchdog.take();
        if let (None, Some(e)) = (&first, self.device_failures()) {
            first = Some(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// [`Error::Device`] when a request of the kernel to the device failed.
    fn device_failures(&self) -> Option<Error> {
        match self.failures.count() {
            0 => None,
            count => Some(Error::Device {
                count,
                first: self.failures.first().unwrap_or_default(),
            }),
        }
    }

    fn unmount(&mut self, lazy_on_busy: bool) -> Result<()> {
        let Some(root) = self.mounted.take() else {
            return Ok(());
        };
        match session::unmount_when_idle(&root, session::BUSY_RETRY) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = umount2(&root, MntFlags::MNT_DETACH);
                let e = Error::io(&root, "cannot unmount the ext4 (detached lazily)", e.into());
                if lazy_on_busy {
                    tracing::warn!("{e}");
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    fn detach_loop(&mut self) -> Result<()> {
        let Some(dev) = self.loop_dev.take() else {
            return Ok(());
        };
        // On a device still in use (a lazily detached mount, or udev still
        // probing it) the kernel sets auto-clear instead: it goes with its
        // last user, and the FUSE unmount after this waits for that.
        run_tool(Command::new("losetup").arg("-d").arg(&dev)).map(|_| ())
    }

    /// Remove the (empty) mountpoints and the work directory
    /// ([`remove_work_dirs`]); the first that could not be.
    fn remove_work(&mut self) -> Result<()> {
        let Some(w) = self.work.take() else {
            return Ok(());
        };
        match remove_work_dirs(&w).failed.into_iter().next() {
            Some((p, e)) => Err(Error::io(p, "cannot remove the work directory", e)),
            None => Ok(()),
        }
    }

    /// Push what the kernel still caches for the disk file to the device.
    fn sync_disk(&self) -> Result<()> {
        if self.fuse.is_none() {
            return Ok(());
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.disk)
            .map_err(|e| Error::io(&self.disk, "cannot open to sync", e))?;
        f.sync_all()
            .map_err(|e| Error::io(&self.disk, "cannot sync", e))
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        // Only reached with something still set up on an error path.
        if let Err(e) = self.unmount(true) {
            tracing::warn!("{e}");
        }
        if let Err(e) = self.detach_loop() {
            tracing::warn!("{e}");
        }
        // Background's own drop unmounts FUSE (lazily when busy).
        self.fuse.take();
        if let Err(e) = self.remove_work() {
            tracing::warn!("{e}");
        }
        self.watchdog.take();
    }
}
