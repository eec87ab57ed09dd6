//! `overlaybd-fuse`: overlaybd layer stacks and converted images through the
//! kernel's FUSE, without root (fusermount3), NBD or a loop device.
//!
//! * What to serve (layer files, a `config.json`, `oci:DIR[:TAG]`, a registry
//!   image read lazily) is [`obdimage::ImageSpec`], shared with `overlaybd-nbd`.
//! * [`block`]: block mode, the virtual disk as `MOUNTPOINT/disk` (read-only,
//!   or writable into an upper layer).
//! * [`tree`]: filesystem mode's seam, a read-only [`tree::FileTree`], and
//!   its FUSE server [`tree::TreeFs`].
//! * [`ext4`]: the ext4 inside the stack as a file tree.
//! * [`erofs`]: the EROFS inside the stack as a file tree.
//! * [`cache`]: the bounded metadata cache of both trees.
//! * [`session`]: mounting, serving on several threads, clean shutdown.
//! * [`mount()`]: all of it for one request (what the binary calls).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod block;
pub mod cache;
pub mod erofs;
pub mod error;
pub mod ext4;
pub mod session;
pub mod tree;

use std::sync::Arc;

use blockdev::BlockDevice;

pub use error::{Error, Result};
pub use obdimage::{ImageSpec, LayerBlob, LowerSpec, RemoteOptions, Target, UpperSpec};
pub use session::{Ended, MountConfig};

/// What the mount shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The virtual disk as one file, `MOUNTPOINT/disk`.
    Block,
    /// The files of the filesystem on the disk (ext4 or EROFS, read-only).
    Fs,
}

/// The filesystems filesystem mode serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Erofs,
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
        })
    }
}

/// ext2/3/4 superblock magic (le16 at byte 1080).
const EXT4_MAGIC: u16 = 0xef53;
/// EROFS superblock magic (le32 at byte 1024).
const EROFS_MAGIC: u32 = 0xe0f5_e1e2;

/// Which filesystem the disk holds, from its superblock (as overlaybd's
/// snapshotter does before mounting).
pub fn detect_fs(dev: &dyn BlockDevice) -> Result<FsType> {
    let mut b = [0u8; 2048];
    if dev.size() < b.len() as u64 {
        return Err(Error::Usage(format!(
            "the disk is {} bytes, too small for a filesystem",
            dev.size()
        )));
    }
    dev.read_at(&mut b, 0).map_err(|source| Error::Stack {
        what: "cannot read the filesystem superblock".into(),
        source,
    })?;
    if u32::from_le_bytes(b[1024..1028].try_into().expect("4 bytes")) == EROFS_MAGIC {
        return Ok(FsType::Erofs);
    }
    if u16::from_le_bytes([b[1080], b[1081]]) == EXT4_MAGIC {
        return Ok(FsType::Ext4);
    }
    let what = if b.iter().all(|&x| x == 0) {
        "it reads as zeros where the superblock would be"
    } else {
        "no superblock magic at byte 1024"
    };
    Err(Error::Usage(format!(
        "the disk holds neither ext4 nor EROFS ({what}): {}",
        obdfs::NO_FS_HINT
    )))
}

/// One mount to make.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// The layer stack.
    pub spec: ImageSpec,
    /// Block or filesystem mode.
    pub mode: Mode,
    /// Accept writes into the upper layer (block mode with an upper only).
    pub writable: bool,
    /// Mount options.
    pub mount: MountConfig,
    /// Filesystem mode: bytes of metadata to cache at most.
    pub cache_bytes: usize,
}

/// Facts about a mount that is ready, for the caller's message.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Size of the virtual disk in bytes.
    pub disk_size: u64,
    /// Whether writes are accepted.
    pub writable: bool,
    /// The stack's description.
    pub description: String,
    /// Filesystem mode: the filesystem served.
    pub fs: Option<FsType>,
}

/// Open the stack, mount it, call `ready` once it can be used, serve until it
/// is unmounted or a stop signal arrives, then flush a writable upper. A
/// second stop signal makes the upper's completed writes durable and exits
/// the process at once ([`session::serve_saving`]).
pub fn mount(req: &MountRequest, ready: impl FnOnce(&Ready)) -> Result<Ended> {
    if req.writable && req.spec.upper.is_none() {
        return Err(Error::Usage(
            "writes need an upper layer (--upper DATA INDEX)".into(),
        ));
    }
    if req.writable && req.mode == Mode::Fs {
        return Err(Error::Usage(
            "filesystem mode is read-only; use block mode for a writable session".into(),
        ));
    }
    let stack = req.spec.open(req.writable)?;
    let dev: Arc<dyn BlockDevice> = stack.clone();
    let fs = match req.mode {
        Mode::Fs => Some(detect_fs(dev.as_ref())?),
        Mode::Block => None,
    };
    let info = Ready {
        disk_size: dev.size(),
        writable: req.writable,
        description: req.spec.description.clone(),
        fs,
    };
    let mut mcfg = req.mount.clone();
    mcfg.read_only = !req.writable;
    let ended = match req.mode {
        Mode::Block => {
            let (uid, gid) = (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            );
            let fs = block::DiskFs::new(dev.clone(), req.writable, uid, gid)
                .with_allocation(stack.clone());
            // A second stop signal exits without returning here: the writes
            // the kernel was told are done must be saved first.
            let save: Option<session::Save> = req.writable.then(|| {
                let stack = stack.clone();
                Box::new(move || {
                    stack
                        .upper()
                        .map_or(Ok(()), |u| u.freeze())
                        .map_err(|source| Error::Stack {
                            what: "cannot save the upper layer".into(),
                            source,
                        })
                }) as session::Save
            });
            let served = session::serve_saving(fs, &mcfg, || ready(&info), save);
            if served.is_err() && req.writable {
                // The writes the kernel was told are done are saved all the
                // same, and a failure to is said (the drop would not).
                if let Err(e) = dev.flush() {
                    tracing::error!(
                        "cannot flush the upper layer: {}",
                        blockdev::error::Chain(&e)
                    );
                }
            }
            served?
        }
        Mode::Fs => {
            mcfg.default_permissions = true;
            match fs {
                Some(FsType::Erofs) => {
                    let t = erofs::ErofsTree::open(dev.clone(), req.cache_bytes)?;
                    session::serve(tree::TreeFs::new(t), &mcfg, || ready(&info))?
                }
                _ => {
                    let t = ext4::Ext4Tree::open_with_cache(dev.clone(), req.cache_bytes)?
                        .with_allocation(stack.clone());
                    session::serve(tree::TreeFs::new(t), &mcfg, || ready(&info))?
                }
            }
        }
    };
    if req.writable {
        dev.flush().map_err(|source| Error::Stack {
            what: "cannot flush the upper layer".into(),
            source,
        })?;
    }
    Ok(ended)
}
