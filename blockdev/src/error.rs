//! Error type shared by every module of the crate.

use std::io;
use std::path::PathBuf;

/// Result alias used across `blockdev`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading or writing overlaybd formats.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    /// An I/O error where no file name is known (e.g. an in-memory device).
    #[error("{0}")]
    RawIo(#[from] io::Error),
    /// A file exists but its contents violate the format.
    #[error("{path}: corrupt {format}: {msg}")]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        msg: String,
    },
    /// A request that the device or format cannot serve.
    #[error("{0}")]
    Invalid(String),
    /// A write or trim on a read-only device.
    #[error("device is read-only")]
    ReadOnly,
    /// A request beyond the end of the device.
    #[error("range {offset}+{len} is beyond the device size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

impl Error {
    /// Wrap an `io::Error` with the file it happened on.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// A corruption error for `path` in `format` ("LSMT", "ZFile", ...).
    pub fn corrupt(path: impl Into<PathBuf>, format: &'static str, msg: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            format,
            msg: msg.into(),
        }
    }
}
