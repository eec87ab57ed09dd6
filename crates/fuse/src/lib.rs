//! `overlaybd-fuse`: overlaybd layer stacks and converted images through the
//! kernel's FUSE, without root (fusermount3), NBD or a loop device.
//!
//! * [`source`]: what to serve: layer files, a `config.json`, `oci:DIR[:TAG]`
//!   ([`oci`]), and the [`source::LayerBlob`] seam for other blob sources.
//! * [`block`]: block mode, the virtual disk as `MOUNTPOINT/disk` (read-only,
//!   or writable into an upper layer).
//! * [`tree`]: filesystem mode's seam, a read-only [`tree::FileTree`], and
//!   its FUSE server [`tree::TreeFs`].
//! * [`ext4`]: the ext4 inside the stack as a file tree.
//! * [`session`]: mounting, serving on several threads, clean shutdown.
//! * [`mount()`]: all of it for one request (what the binary calls).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod block;
pub mod error;
pub mod ext4;
pub mod oci;
pub mod session;
pub mod source;
pub mod tree;

use std::sync::Arc;

use blockdev::BlockDevice;

pub use error::{Error, Result};
pub use session::{Ended, MountConfig};
pub use source::{ImageSpec, LayerBlob};

/// What the mount shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The virtual disk as one file, `MOUNTPOINT/disk`.
    Block,
    /// The files of the ext4 filesystem on the disk (read-only).
    Fs,
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
}

/// Open the stack, mount it, call `ready` once it can be used, serve until it
/// is unmounted or a stop signal arrives, then flush a writable upper.
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
    let info = Ready {
        disk_size: dev.size(),
        writable: req.writable,
        description: req.spec.description.clone(),
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
            session::serve(fs, &mcfg, || ready(&info))?
        }
        Mode::Fs => {
            let fs = tree::TreeFs::new(ext4::Ext4Tree::open(dev.clone())?);
            mcfg.default_permissions = true;
            session::serve(fs, &mcfg, || ready(&info))?
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
