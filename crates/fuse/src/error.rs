//! Error type of the crate.

use std::path::PathBuf;

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong before or while serving a mount.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or reading the layer stack failed.
    #[error("{what}")]
    Stack {
        /// What was being opened or read.
        what: String,
        /// The format or I/O error.
        #[source]
        source: blockdev::Error,
    },
    /// The ext4 filesystem inside the stack cannot be read.
    #[error("{what}")]
    Ext4 {
        /// What was being read.
        what: String,
        /// The libext2fs error (boxed: it is large and rare).
        #[source]
        source: Box<obdfs::Error>,
    },
    /// The EROFS image inside the stack cannot be read.
    #[error("{what}")]
    Erofs {
        /// What was being read.
        what: String,
        /// The reader's error (boxed: it is large and rare).
        #[source]
        source: Box<obdfs::erofs::Error>,
    },
    /// What to serve cannot be found or opened.
    #[error(transparent)]
    Image(#[from] obdimage::Error),
    /// An operating-system error on a named file or mountpoint.
    #[error("{path}: {what}")]
    Io {
        /// The file or mountpoint.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// An I/O error on `path` while doing `what`.
    pub fn io(path: impl Into<PathBuf>, what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            what: what.into(),
            source,
        }
    }
}

/// The errno a FUSE client sees for a device error: the OS error when there
/// is one, `EROFS` for writes to a read-only device, `EINVAL` for requests
/// out of range, `EIO` for everything else (corrupt layers included).
pub fn errno_of(e: &blockdev::Error) -> i32 {
    match e {
        blockdev::Error::Io { source: error, .. } | blockdev::Error::RawIo(error) => {
            error.raw_os_error().unwrap_or(libc::EIO)
        }
        blockdev::Error::ReadOnly => libc::EROFS,
        blockdev::Error::OutOfRange { .. } | blockdev::Error::Invalid(_) => libc::EINVAL,
        blockdev::Error::Corrupt { .. }
        | blockdev::Error::Json { .. }
        | blockdev::Error::Compress { .. } => libc::EIO,
    }
}
