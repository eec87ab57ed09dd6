//! overlaybd block-device formats in Rust.
//!
//! * [`device`]: the [`BlockDevice`] trait every format implements.
//! * [`io`]: positional file I/O over pread or io_uring.
//! * [`pending`]: outputs written beside their destination, renamed into place when complete.
//! * [`uring`]: the io_uring engine (batches, requests matched by user_data).
//! * [`raw`]: a plain image file as a device.
//! * [`lsmt`]: LSMT layers (sealed and writable) and their indexes.
//! * [`zfile`]: ZFile random-access compression.
//! * [`compress`]: ZFile block compression on a thread pool, in order.
//! * [`gzindex`]: the `ddgzidx` gzip random-access index (TurboOCI `gzip.meta`).
//! * [`tarwrap`]: the tar wrapper around pushed layer blobs.
//! * [`layer`]: opening a lower layer whatever its wrapping.
//! * [`stack`]: lowers + optional upper read as one disk.
//! * [`warp`]: TurboOCI layers, whose file data stays in the layer tar.
//! * [`commit`]: sealing and compressing layers (overlaybd-commit).
//! * [`config`]: the overlaybd image config.json.
//! * [`nbd`]: a userspace NBD server over any device.

pub mod commit;
pub mod compress;
pub mod config;
pub mod device;
pub mod error;
pub mod gzindex;
pub mod io;
pub mod layer;
pub mod lsmt;
pub mod nbd;
pub mod pending;
pub mod raw;
pub mod source;
pub mod stack;
pub mod tarwrap;
pub mod uring;
pub mod uuid;
pub mod warp;
pub mod zfile;

pub use config::ImageConfig;
pub use device::{BlockDevice, Extent, MemDevice};
pub use error::{Error, Result};
pub use raw::RawFileDevice;
pub use stack::Stack;
pub use uuid::Uuid;
