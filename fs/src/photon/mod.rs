//! An ext4 engine that writes the bytes upstream overlaybd's TurboOCI tools
//! write (`overlaybd-create --turboOCI --mkfs`, `turboOCI-apply`).
//!
//! Upstream makes and fills the ext4 of a TurboOCI layer with PhotonLibOS's
//! extfs over a fork of libext2fs 1.47.0 (data-accelerator/e2fsprogs),
//! writing through an I/O manager that passes every libext2fs write straight
//! to the layer. The layer records the byte ranges written, so reproducing
//! its `ext4.fs.meta` needs the same writes, not just the same filesystem.
//! This engine runs Debian's stock libext2fs 1.47.0 and adds what differs:
//!
//! * [`crate::ext2fs::cache::WriteMode::Exact`] channels: the sectors
//!   written, no partial-superblock writes, `zeroout` does nothing;
//! * [`alloc`]: the fork's allocation cursors (blocks and inodes are
//!   searched from the last one allocated), through libext2fs's allocator
//!   callbacks;
//! * [`htree`]: the fork's `expand_dir`, which indexes a directory when it
//!   grows past one block, and adding names to indexed directories;
//! * [`extfs`]: photon's operations (the libext2fs calls per `mkdir`,
//!   `open(O_CREAT)`, `fallocate`, `chown`, ...), without timestamps as the
//!   fork's `NO_TIMESTAMP` build;
//! * [`untar`]: overlaybd's `UnTar` (libtar) sequence per tar entry.
//!
//! [`mkfs`] is overlaybd's mkfs with this engine's flavour ([`Fork`]).
//! Overlaybd layers keep the native engine ([`crate::apply`]); this one is
//! used for TurboOCI layers ([`crate::turbo`]).

pub mod alloc;
pub mod extfs;
pub mod htree;
pub mod untar;

use std::sync::Arc;

use blockdev::BlockDevice;

use crate::error::Result;
use crate::ext2fs::cache::WriteMode;
use crate::ext2fs::Ext2Fs;
use crate::mkfs::{Flavor, MkfsOptions};

pub use untar::apply_tar;

/// The libext2fs flavour of upstream's fork (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fork;

impl Flavor for Fork {
    fn write_mode(&self) -> WriteMode {
        WriteMode::Exact
    }

    fn prepare(&self, fs: &mut Ext2Fs) -> Result<()> {
        alloc::install(fs)
    }

    fn expand_dir(&self, fs: &mut Ext2Fs, dir: u32) -> Result<()> {
        htree::expand_dir(fs, dir)
    }
}

/// overlaybd's mkfs as upstream's fork runs it.
pub fn mkfs(dev: Arc<dyn BlockDevice>, opts: &MkfsOptions) -> Result<()> {
    crate::mkfs::mkfs_with(dev, opts, &Fork)
}
