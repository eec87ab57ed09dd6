//! Errors of the EROFS reader and writer.

/// Result alias of the EROFS module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading or building an EROFS image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image violates the format (or uses it in a way that would make
    /// us read out of bounds).
    #[error("corrupt EROFS image: {}{msg}", .nid.map(|n| format!("nid {n}: ")).unwrap_or_default())]
    Corrupt {
        /// The inode involved, when there is one.
        nid: Option<u64>,
        /// What is wrong.
        msg: String,
    },
    /// A valid image that uses a feature this crate does not implement.
    #[error("unsupported EROFS feature: {0}")]
    Unsupported(String),
    /// The operation does not apply to this inode (e.g. readdir on a file).
    #[error("nid {nid}: {msg}")]
    WrongType {
        /// The inode.
        nid: u64,
        /// What was expected.
        msg: &'static str,
    },
    /// The block device failed.
    #[error("EROFS block device I/O failed")]
    Device(#[source] blockdev::Error),
    /// Reading or parsing the layer tar failed.
    #[error("layer tar")]
    Tar(#[source] crate::Error),
    /// A tar entry cannot be applied.
    #[error("tar entry '{path}': {msg}")]
    Entry {
        /// The entry's path as stored in the tar.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The image would exceed what EROFS can address.
    #[error("EROFS limit exceeded: {0}")]
    TooBig(String),
}

impl Error {
    pub(crate) fn corrupt(nid: impl Into<Option<u64>>, msg: impl Into<String>) -> Error {
        Error::Corrupt {
            nid: nid.into(),
            msg: msg.into(),
        }
    }

    /// The closest `errno` value, for filesystem front ends (FUSE).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Corrupt { .. } => libc::EUCLEAN,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::WrongType { msg, .. } if msg.contains("directory") => libc::ENOTDIR,
            Error::WrongType { .. } => libc::EINVAL,
            Error::TooBig(_) => libc::EFBIG,
            Error::Device(_) | Error::Tar(_) | Error::Entry { .. } => libc::EIO,
        }
    }
}

impl From<blockdev::Error> for Error {
    fn from(e: blockdev::Error) -> Error {
        Error::Device(e)
    }
}
