//! Error type of the crate.

use std::path::PathBuf;

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the kernel engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine cannot run on this machine (no root, no `/dev/fuse`, no
    /// loop devices, a tool missing).
    #[error("the kernel engine is not available: {reason}")]
    Unavailable {
        /// Why, and what to do about it.
        reason: String,
    },
    /// A bad option (`--mkfs-options`, `--mount-options`, `--fstype`).
    #[error("{0}")]
    Usage(String),
    /// An operating-system error on a named path.
    #[error("{}: {what}", .path.display())]
    Io {
        /// The file, directory or device.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An external tool could not be started although it is there (this
    /// process is out of file descriptors, say): `hint` says what to do.
    #[error("cannot run `{command}`{hint}")]
    Spawn {
        /// The command line.
        command: String,
        /// What to do about it (empty, or starting with "; ").
        hint: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An external tool (`mkfs.ext4`, `losetup`, `mount`) failed.
    #[error("`{command}` failed ({status}): {output}")]
    Tool {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// What it printed on stderr (and stdout), trimmed.
        output: String,
    },
    /// A tar entry cannot be applied (a rule of the OCI layer format).
    #[error("tar entry '{path}': {msg}")]
    Entry {
        /// The entry's path as stored in the tar.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The kernel refused an operation for a tar entry.
    #[error("tar entry '{path}': cannot {what}")]
    EntryIo {
        /// The entry's path as stored in the tar.
        path: String,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the tar stream failed, or it is malformed.
    #[error(transparent)]
    Tar(obdfs::Error),
    /// Exposing the device through FUSE failed.
    #[error("cannot expose the layer through FUSE")]
    Fuse(#[source] obdfuse::Error),
    /// Reads or writes of the layer stack failed while the kernel used it
    /// (a full disk under the upper layer, say): the filesystem may miss
    /// data even where every call the engine made succeeded.
    #[error("{count} read(s) or write(s) of the layer stack failed; the first: {first}")]
    Device {
        /// How many requests failed.
        count: u64,
        /// The first: the request and the device's error.
        first: String,
    },
    /// Flushing the layer stack failed.
    #[error("cannot flush the layer")]
    Flush(#[source] blockdev::Error),
    /// Stopped by a signal (Ctrl-C) or by the caller.
    #[error("interrupted")]
    Interrupted,
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

/// For an error that says that file descriptors ran out: this process's
/// limit (`ulimit -n`) and how to raise it, or the system's.
pub fn fd_limit_hint(e: &std::io::Error) -> Option<String> {
    use nix::sys::resource::{getrlimit, Resource};
    match e.raw_os_error()? {
        libc::EMFILE => Some(match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) => out_of_fds(soft, hard),
            Err(_) => {
                "this process ran out of file descriptors: raise its limit (ulimit -n)".into()
            }
        }),
        libc::ENFILE => Some(
            "the system ran out of file descriptors (fs.file-max): close files or raise it".into(),
        ),
        _ => None,
    }
}

/// The hint for EMFILE under a file descriptor limit of `soft` (`hard`): a
/// limit to raise it to that is larger (1024, the usual default, or four
/// times the limit when it is already that high).
fn out_of_fds(soft: u64, hard: u64) -> String {
    let more = if soft < 1024 {
        1024
    } else {
        soft.saturating_mul(4)
    };
    format!(
        "this process ran out of file descriptors: its limit (ulimit -n, RLIMIT_NOFILE) \
         is {soft} (at most {hard}); raise it, e.g. `ulimit -n {more}`"
    )
}

impl From<Error> for obdfs::Error {
    fn from(e: Error) -> obdfs::Error {
        match e {
            // A tar problem is the same problem whichever engine met it.
            Error::Tar(e) => e,
            e => obdfs::Error::Engine {
                engine: crate::NAME,
                source: Box::new(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limit suggested is larger than the one run out of: 1024 below it,
    /// else four times the limit (it said `ulimit -n 1024` also to a run
    /// that had 1024).
    #[test]
    fn the_fd_limit_suggested_is_larger_than_the_limit() {
        let hint = out_of_fds(8, 8);
        assert!(hint.contains("is 8 (at most 8)"), "{hint}");
        assert!(hint.ends_with("`ulimit -n 1024`"), "{hint}");
        assert!(out_of_fds(1024, 524288).ends_with("`ulimit -n 4096`"));
        assert!(out_of_fds(4096, 4096).ends_with("`ulimit -n 16384`"));
    }
}
