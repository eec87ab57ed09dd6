//! The apply-engine seam: how a layer's filesystem gets made and a layer tar
//! gets applied to it, on any [`BlockDevice`].
//!
//! * [`Libext2fs`] (this crate): mkfs and apply in userspace through
//!   libext2fs, no mount, no root.
//! * The kernel engine (crate `overlaybd-kernel`): the device exported
//!   through FUSE, `mkfs.ext4`, a loop mount and an unpacker over the mounted
//!   tree.
//!
//! Both follow the same OCI rules ([`crate::apply`]): the trees they produce
//! from the same layers are equal; the bytes are not.

use std::io::Read;
use std::sync::Arc;

use blockdev::BlockDevice;

use crate::apply::{apply_tar, ApplyOptions, ApplyStats};
use crate::error::Result;
use crate::mkfs::{mkfs, MkfsOptions};

/// One layer for an [`Engine`].
pub struct Job<'a> {
    /// Make the filesystem first (the bottom layer of an image).
    pub mkfs: bool,
    /// The decompressed layer tar.
    pub tar: &'a mut dyn Read,
    /// Called with the running counters about twice a second.
    pub progress: Option<&'a mut dyn FnMut(&ApplyStats)>,
}

impl std::fmt::Debug for Job<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("mkfs", &self.mkfs).finish()
    }
}

/// Makes filesystems and applies layer tars to them.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// Short name for messages (`libext2fs`, `kernel`).
    fn name(&self) -> &'static str;

    /// Make an empty filesystem on `dev`.
    fn mkfs(&self, dev: Arc<dyn BlockDevice>) -> Result<()>;

    /// Apply one layer (after a mkfs when `job.mkfs`). On error the device
    /// holds a partial layer that must be discarded.
    fn apply(&self, dev: Arc<dyn BlockDevice>, job: Job<'_>) -> Result<ApplyStats>;
}

/// The userspace engine: [`mkfs()`] and [`apply_tar()`] through libext2fs.
#[derive(Debug, Clone, Default)]
pub struct Libext2fs {
    /// Options of the mkfs.
    pub mkfs: MkfsOptions,
}

impl Engine for Libext2fs {
    fn name(&self) -> &'static str {
        "libext2fs"
    }

    fn mkfs(&self, dev: Arc<dyn BlockDevice>) -> Result<()> {
        mkfs(dev, &self.mkfs)
    }

    fn apply(&self, dev: Arc<dyn BlockDevice>, job: Job<'_>) -> Result<ApplyStats> {
        if job.mkfs {
            mkfs(dev.clone(), &self.mkfs)?;
        }
        apply_tar(
            dev,
            job.tar,
            ApplyOptions {
                progress: job.progress,
                ..Default::default()
            },
        )
    }
}
