//! overlaybd block-device formats in Rust.
//!
//! * [`device`]: the [`BlockDevice`] trait every format implements.
//! * [`io`]: positional file I/O over pread or io_uring.
//! * [`raw`]: a plain image file as a device.
//! * [`nbd`]: a userspace NBD server over any device.

pub mod device;
pub mod error;
pub mod io;
pub mod nbd;
pub mod raw;

pub use device::{BlockDevice, MemDevice};
pub use error::{Error, Result};
pub use raw::RawFileDevice;
