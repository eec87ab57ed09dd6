//! The kernel apply engine: layers made by the kernel's own ext4, the way
//! upstream's embedded convertor (`ctr obdconv`) makes them, without TCMU
//! or containerd.
//!
//! For one writable layer stack, [`Kernel`] (an [`obdfs::Engine`]):
//! 1. exposes the stack as the file `WORK/disk/disk` through our FUSE block
//!    mode ([`export`]; the `nbd` module is not needed);
//! 2. for the bottom layer, runs `mkfs.ext4` on that file with upstream's
//!    embedded-convertor options ([`DEFAULT_MKFS_ARGS`]) and the user's;
//! 3. attaches a loop device and mounts the ext4 at `WORK/root` (mount
//!    options: upstream's `discard`, or the user's);
//! 4. applies the layer tar to the mounted tree with the OCI rules of the
//!    libext2fs engine ([`unpack`]);
//! 5. unmounts, detaches the loop device, syncs and stops FUSE, flushes the
//!    upper layer; on any error (or [`KernelOptions::cancel`]) the same
//!    teardown runs, so no mount, loop device or FUSE session stays behind.
//!
//! It needs root, `/dev/fuse`, loop devices, `mkfs.ext4`, `losetup` and
//! `mount` ([`preflight`]), and says which one is missing.
//!
//! What is not deterministic: the kernel stamps the superblock (mount and
//! write times, write counters) and inode change times with the clock, and
//! its block allocator is not bound to match libext2fs. The trees are equal
//! to the libext2fs engine's; the bytes are not.

pub mod error;
pub mod export;
pub mod preflight;
pub mod unpack;
pub mod watchdog;

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use blockdev::BlockDevice;
use obdfs::{ApplyStats, Job};

pub use error::{Error, Result};
pub use export::Export;
pub use preflight::Requirements;
pub use unpack::{UnpackOptions, Unpacker};

/// The engine's name (`--engine kernel`).
pub const NAME: &str = "kernel";

/// `mkfs.ext4` arguments that come before the user's: upstream's ext4
/// defaults for the embedded convertor (`-O ^has_journal,sparse_super,flex_bg
/// -G 1 -E discard -F`), without `metadata_csum` (as upstream overlaybd's
/// own mkfs: the layers above may be applied by the libext2fs engine, which
/// makes the same feature set), plus a fixed UUID and directory hash seed so
/// that the filesystem does not depend on randomness. A user `-E` replaces
/// this one (mke2fs keeps the last), a user `-U` this UUID.
pub const DEFAULT_MKFS_ARGS: &[&str] = &[
    "-q",
    "-F",
    "-O",
    "^has_journal,^metadata_csum,sparse_super,flex_bg",
    "-G",
    "1",
    "-U",
    "clear",
    "-E",
    "discard,hash_seed=6f626464-6b65-726e-656c-000000000000",
];

/// Mount options when none are given: upstream's for ext4.
pub const DEFAULT_MOUNT_OPTIONS: &str = "discard";

/// Options of the kernel engine.
#[derive(Debug, Clone, Default)]
pub struct KernelOptions {
    /// More `mkfs.ext4` arguments (after [`DEFAULT_MKFS_ARGS`]).
    pub mkfs_options: Vec<String>,
    /// `mount -o` options; [`DEFAULT_MOUNT_OPTIONS`] when `None`.
    pub mount_options: Option<String>,
    /// Where the work directory with the mountpoints goes (the system's
    /// temporary directory when `None`).
    pub work_dir: Option<PathBuf>,
    /// Set to stop (Ctrl-C): checked between tar entries and data chunks,
    /// and after mkfs; the teardown runs as for an error.
    pub cancel: Option<Arc<AtomicBool>>,
    /// What to check before starting.
    pub requirements: Requirements,
}

impl KernelOptions {
    /// Mount and mkfs options from the `ctr obdconv --fstype` form
    /// `ext4[;MOUNT_OPTS(comma-separated)[;MKFS_OPTS(space-separated)]]`.
    /// Empty parts keep the defaults.
    pub fn with_fstype(mut self, fstype: &str) -> Result<KernelOptions> {
        let mut parts = fstype.splitn(3, ';');
        let fs = parts.next().unwrap_or_default().trim();
        if fs != "ext4" {
            return Err(Error::Usage(format!(
                "--fstype '{fstype}': the kernel engine makes ext4 only (the form is 'ext4;MOUNT_OPTS;MKFS_OPTS')"
            )));
        }
        if let Some(m) = parts.next().map(str::trim).filter(|m| !m.is_empty()) {
            self.mount_options = Some(m.to_string());
        }
        if let Some(m) = parts.next() {
            self.mkfs_options.extend(split_words(m));
        }
        Ok(self)
    }

    /// The full `mkfs.ext4` argument list.
    pub fn mkfs_args(&self) -> Vec<String> {
        DEFAULT_MKFS_ARGS
            .iter()
            .map(|s| s.to_string())
            .chain(self.mkfs_options.iter().cloned())
            .collect()
    }

    fn mount_opts(&self) -> &str {
        self.mount_options
            .as_deref()
            .unwrap_or(DEFAULT_MOUNT_OPTIONS)
    }

    fn cancelled(&self) -> Result<()> {
        match &self.cancel {
            Some(c) if c.load(std::sync::atomic::Ordering::Relaxed) => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }
}

/// Split `--mkfs-options` text into arguments (whitespace-separated, as
/// upstream's `MKFS_OPTS`).
pub fn split_words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// The kernel engine.
#[derive(Debug, Clone)]
pub struct Kernel {
    opts: KernelOptions,
}

impl Kernel {
    /// The engine, once [`preflight::check`] found everything it needs.
    pub fn new(opts: KernelOptions) -> Result<Kernel> {
        preflight::check(&opts.requirements)?;
        if opts.mount_opts().contains(char::is_whitespace) {
            return Err(Error::Usage(format!(
                "mount options '{}': use commas, not spaces",
                opts.mount_opts()
            )));
        }
        Ok(Kernel { opts })
    }

    /// Its options.
    pub fn options(&self) -> &KernelOptions {
        &self.opts
    }

    fn export(&self, dev: Arc<dyn BlockDevice>) -> Result<Export> {
        let work = self
            .opts
            .work_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        Export::open(dev, &work)
    }

    /// Make the ext4 on `dev` with `mkfs.ext4`.
    pub fn make_fs(&self, dev: Arc<dyn BlockDevice>) -> Result<()> {
        let mut x = self.export(dev.clone())?;
        x.mkfs(&self.opts.mkfs_args())?;
        self.opts.cancelled()?;
        let root = x.mount(self.opts.mount_opts())?.to_path_buf();
        zero_mkfs_times(&root)?;
        x.close()?;
        dev.flush().map_err(Error::Flush)
    }

    /// Apply one layer tar to `dev` (after a mkfs when `mkfs`).
    pub fn apply_layer(
        &self,
        dev: Arc<dyn BlockDevice>,
        mkfs: bool,
        tar: &mut dyn Read,
        progress: Option<&mut dyn FnMut(&ApplyStats)>,
    ) -> Result<ApplyStats> {
        let mut x = self.export(dev.clone())?;
        if mkfs {
            x.mkfs(&self.opts.mkfs_args())?;
            self.opts.cancelled()?;
        }
        let root = x.mount(self.opts.mount_opts())?.to_path_buf();
        if mkfs {
            zero_mkfs_times(&root)?;
        }
        let stats = Unpacker::new(&root)?.apply(
            tar,
            UnpackOptions {
                progress,
                cancel: self.opts.cancel.clone(),
            },
        )?;
        x.close()?;
        dev.flush().map_err(Error::Flush)?;
        Ok(stats)
    }
}

/// Give the directories mkfs.ext4 made (the root and `lost+found`) time 0,
/// as the libext2fs engine's mkfs makes every time: mkfs.ext4 stamps them
/// with the clock, so the root of every image would carry the date of its
/// conversion (a layer's root entry still sets the root's time).
fn zero_mkfs_times(root: &std::path::Path) -> Result<()> {
    let zero = nix::sys::time::TimeSpec::new(0, 0);
    for p in [root.to_path_buf(), root.join("lost+found")] {
        match nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &p,
            &zero,
            &zero,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        ) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(Error::io(&p, "cannot set the time of", e.into())),
        }
    }
    Ok(())
}

impl obdfs::Engine for Kernel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn mkfs(&self, dev: Arc<dyn BlockDevice>) -> obdfs::Result<()> {
        Ok(self.make_fs(dev)?)
    }

    fn apply(&self, dev: Arc<dyn BlockDevice>, job: Job<'_>) -> obdfs::Result<ApplyStats> {
        Ok(self.apply_layer(dev, job.mkfs, job.tar, job.progress)?)
    }
}
