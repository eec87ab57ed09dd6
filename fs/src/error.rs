//! Error type of the crate.

/// " past byte N" for a position in a stream, nothing for its start.
fn past_byte(offset: u64) -> String {
    if offset == 0 {
        String::new()
    } else {
        format!(" past byte {offset}")
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in mkfs or apply.
///
/// Display never repeats the cause that `source()` returns: print the whole
/// chain (`anyhow`'s `{:#}`, [`blockdev::error::Chain`]) to see everything.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A libext2fs call failed.
    #[error("cannot {op}: {msg}")]
    Ext2fs {
        /// What we were doing.
        op: String,
        /// The libext2fs/com_err code.
        code: i64,
        /// com_err's text for the code.
        msg: String,
        /// The block device's error, when it caused the failure.
        #[source]
        device: Option<blockdev::Error>,
    },
    /// The block device failed outside a libext2fs call.
    #[error("block device")]
    Device(#[source] blockdev::Error),
    /// Reading, inflating or indexing a layer blob failed (the error names
    /// the blob).
    #[error("layer blob")]
    Blob(#[source] blockdev::Error),
    /// Reading the tar stream failed. The offset is how far the tar reader got, not
    /// where the fault is (a decompressor reads ahead), hence "past byte", and
    /// nothing for 0 (a small gzip layer's CRC fails before any byte reaches it).
    #[error("cannot read the tar stream{}", past_byte(*offset))]
    Read {
        /// Bytes of the (decompressed) tar stream read before the failure.
        offset: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The tar stream is malformed.
    #[error("malformed tar stream at byte {offset}: {msg}")]
    Tar {
        /// Offset of the offending header in the stream.
        offset: u64,
        /// What is wrong.
        msg: String,
    },
    /// A tar entry cannot be applied.
    #[error("tar entry '{path}': {msg}")]
    Entry {
        /// The entry's path as stored in the tar.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A libext2fs or device failure while applying one entry.
    #[error("tar entry '{path}'")]
    AtEntry {
        /// The entry's path as stored in the tar.
        path: String,
        /// The underlying failure.
        #[source]
        source: Box<Error>,
    },
    /// The filesystem found on the device cannot be used.
    #[error("{0}")]
    Unsupported(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// Another apply engine (the kernel engine) failed.
    #[error("{engine} engine: {source}")]
    Engine {
        /// The engine's name.
        engine: &'static str,
        /// Its error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Building or reading an EROFS layer failed.
    #[error(transparent)]
    Erofs(Box<crate::erofs::Error>),
}

impl Error {
    /// A libext2fs failure.
    pub fn ext2fs(op: &str, code: i64, device: Option<blockdev::Error>) -> Self {
        Error::Ext2fs {
            op: op.to_string(),
            code,
            msg: crate::ext2fs::error_text(code),
            device,
        }
    }
}

/// Longest quoted path or name in a message, in characters.
const QUOTE_MAX: usize = 200;

/// Bytes from a tar (a path, a name, a link target) as text for a message:
/// lossy UTF-8, and at most `QUOTE_MAX` characters (the head and the tail
/// around a `...[N bytes]...` marker), so a hostile 100k-component path
/// cannot make a 200 KB error line.
pub fn quote(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let n = s.chars().count();
    if n <= QUOTE_MAX {
        return s.into_owned();
    }
    let keep = QUOTE_MAX / 2;
    let head: String = s.chars().take(keep).collect();
    let tail: String = s.chars().skip(n - keep).collect();
    let cut = b.len() - head.len().min(b.len()) - tail.len().min(b.len());
    format!("{head}...[{cut} bytes]...{tail}")
}

impl From<crate::erofs::Error> for Error {
    fn from(e: crate::erofs::Error) -> Error {
        Error::Erofs(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_errors_say_how_far_the_reader_got() {
        let e = |offset| Error::Read {
            offset,
            source: std::io::Error::other("gzip checksum mismatch"),
        };
        assert_eq!(e(0).to_string(), "cannot read the tar stream");
        assert_eq!(
            e(1 << 20).to_string(),
            "cannot read the tar stream past byte 1048576"
        );
    }
}
