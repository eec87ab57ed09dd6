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
}
