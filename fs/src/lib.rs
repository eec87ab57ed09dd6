//! ext4 inside overlaybd layers: mkfs and OCI layer-tar apply, written in
//! userspace through libext2fs onto any [`blockdev::BlockDevice`] (a layer
//! stack, a raw image, memory).
//!
//! * [`mkfs()`]: a deterministic ext4 with upstream overlaybd's feature set.
//! * [`engine`]: the apply-engine seam ([`Libext2fs`] here, the kernel
//!   engine in `overlaybd-kernel`).
//! * [`turbo`]: TurboOCI layers (file data mapped into the layer tar).
//! * [`apply_tar()`]: apply one OCI layer tar (whiteouts, opaque dirs, hard
//!   links, xattrs, devices, sparse files) to the ext4 on a device.
//!
//! Every block goes through the device: libext2fs runs with a custom I/O
//! manager ([`ext2fs::io`]) and file data is written straight to the device
//! in large contiguous chunks.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod apply;
pub mod dirent;
pub mod engine;
pub mod erofs;
pub mod error;
pub mod ext2fs;
pub mod filedata;
pub mod mkfs;
pub mod photon;
pub mod tar;
pub mod tarskel;
pub mod turbo;

pub use apply::{apply_tar, ApplyOptions, ApplyStats};
pub use engine::{Engine, Job, Libext2fs};
pub use error::{Error, Result};
pub use filedata::{CopyData, FileData, TargetData};
pub use mkfs::{mkfs, MkfsOptions};

/// What to check when a layer stack's disk holds no filesystem: every
/// image's stack starts with the layer holding the ext4 made by mkfs;
/// without it the layers above hold only the blocks they changed.
pub const NO_FS_HINT: &str = "is the stack missing its base layer, the one holding the ext4 \
made by mkfs (`overlaybd-create --mkfs`, a converted image's first layer, or upstream's \
baselayer)? It comes first among the layers given, or in config.json's lowers";
