//! Error type shared by every module of the crate.

use std::io;
use std::path::PathBuf;

/// Result alias used across `blockdev`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading or writing overlaybd formats.
///
/// Display never repeats the cause that `source()` returns; print errors
/// with their chain ([`Chain`], `anyhow`'s `{:#}`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An I/O error where no file name is known (e.g. an in-memory device).
    #[error(transparent)]
    RawIo(#[from] io::Error),
    /// A file exists but its contents violate the format.
    #[error("{path}: corrupt {format}: {msg}")]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        msg: String,
    },
    /// A JSON file (an image config.json) does not parse: corrupt like
    /// [`Error::Corrupt`], with the parser's error (which says where and
    /// why) as the source.
    #[error("{path}: corrupt {format}")]
    Json {
        path: PathBuf,
        format: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A request that the device or format cannot serve.
    #[error("{0}")]
    Invalid(String),
    /// A write or trim on a read-only device.
    #[error("device is read-only")]
    ReadOnly,
    /// Compressing a block failed (the compression library's error).
    #[error("{what}")]
    Compress {
        /// What failed ("lz4 compression failed", ...).
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A request beyond the end of the device.
    #[error("range {offset}+{len} is beyond the device size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

impl Error {
    /// Wrap an `io::Error` with the file it happened on.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
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

/// Displays an error followed by each of its causes, joined with ": " (the
/// way `anyhow` prints `{:#}`), for logs and for wrapping a library error
/// into a message. Errors of this crate never repeat their cause, so each
/// part appears once.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(c) = cur {
            write!(f, ": {c}")?;
            cur = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each cause is printed once: by the error that owns it or by whoever
    /// walks source(), never both.
    #[test]
    fn causes_are_not_repeated() {
        let e = Error::io("/a/b", io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            testutil::assert_clean_chain(&e),
            "/a/b: No such file or directory (os error 2)"
        );
        let e = Error::from(io::Error::other("boom"));
        assert_eq!(testutil::assert_clean_chain(&e), "boom");
        let e = crate::nbd::handshake::ConnError::from(crate::nbd::proto::ProtoError::BadMagic(7));
        assert_eq!(
            testutil::assert_clean_chain(&e),
            "protocol violation: bad magic 0x7"
        );
        let e = crate::nbd::handshake::ConnError::from(io::Error::other("reset"));
        assert_eq!(Chain(&e).to_string(), "reset");
    }

    /// A compression library's error is the source of a compression
    /// failure (printed once, after what failed).
    #[test]
    fn compression_failures_keep_their_cause() {
        let e = Error::Compress {
            what: "lz4 compression failed",
            source: io::Error::other("buffer too small"),
        };
        assert_eq!(
            testutil::assert_clean_chain(&e),
            "lz4 compression failed: buffer too small"
        );
        let io = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .expect("the library's error is the source");
        assert_eq!(io.to_string(), "buffer too small");
        assert_eq!(
            crate::nbd::proto::errno_of(&e),
            crate::nbd::proto::Errno::Io
        );
    }
}
