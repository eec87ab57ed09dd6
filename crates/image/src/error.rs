//! Error type of the crate.

use std::path::PathBuf;

/// An error with its causes on one line (for logs).
pub use obdoci::error::Chain;

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong finding and opening what to serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or reading a layer failed.
    #[error("{what}")]
    Stack {
        /// What was being opened or read.
        what: String,
        /// The format or I/O error.
        #[source]
        source: blockdev::Error,
    },
    /// An OCI layout, manifest or reference is unusable.
    #[error("{what}")]
    Oci {
        /// What was being read.
        what: String,
        /// The model or layout error.
        #[source]
        source: obdoci::Error,
    },
    /// The registry failed or refused.
    #[error("{what}")]
    Registry {
        /// What was being fetched.
        what: String,
        /// The client's error.
        #[source]
        source: obdregistry::Error,
    },
    /// A local file or directory (the chunk cache) failed.
    #[error("{}: {what}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A TurboOCI blob cannot be unpacked (a damaged gzip stream or tar).
    #[error("{what}")]
    Unpack {
        /// The blob and what in it could not be read.
        what: String,
        /// The decompressor's or tar reader's error.
        #[source]
        source: std::io::Error,
    },
    /// A fetch that a read waited for (another reader's) failed.
    #[error("{0}")]
    Fetch(String),
    /// Fetched bytes do not match their digest.
    #[error("{0}")]
    Integrity(String),
    /// The input is not something we can serve (bad argument, not a
    /// converted image, a TurboOCI blob without its metadata, ...).
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
