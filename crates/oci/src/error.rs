//! Errors of the image model and the OCI layout store, the [`ErrorKind`] vocabulary the
//! convertor's crates share for branching on failures, and [`Chain`], which shows an error
//! with its causes on one line.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;

/// What kind of failure an error is: what callers branch on (retry, hint, delete a stale
/// dedup row, stop quietly), instead of matching message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Worth retrying: connection failures, broken streams, 429 and 5xx answers.
    Transient,
    /// Credentials missing or refused (401, 403, a token server's refusal).
    Auth,
    /// TLS set-up or verification failed; retrying cannot help.
    Tls,
    /// The object does not exist (a 404, a missing tag, file or blob).
    NotFound,
    /// Content does not match its digest or size, or is malformed.
    Corrupt,
    /// Stopped on purpose (Ctrl-C, or a sibling's failure), not a failure of its own.
    Interrupted,
    /// The peer broke the protocol or answered something unexpected.
    Protocol,
    /// Bad input: a reference, media type, option or document we cannot use.
    Invalid,
    /// A local I/O failure.
    Io,
}

impl ErrorKind {
    /// The kind of an I/O error: interruptions and corrupt data keep their meaning,
    /// everything else is local I/O.
    pub fn of_io(e: &io::Error) -> ErrorKind {
        match e.kind() {
            io::ErrorKind::Interrupted => ErrorKind::Interrupted,
            io::ErrorKind::InvalidData => ErrorKind::Corrupt,
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Io,
        }
    }
}

/// Errors from the image model and the OCI layout store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("{what}: invalid JSON")]
    Json {
        what: String,
        #[source]
        error: serde_json::Error,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: more than the expected {expected} bytes")]
    TooLong { what: String, expected: u64 },
    #[error("{what}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { what: String, size: u64, limit: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// An I/O error on `path`; a content mismatch a [`VerifyReader`](crate::digest::VerifyReader)
    /// found is returned as itself (it names what was read).
    pub fn from_io(path: impl Into<PathBuf>, e: io::Error) -> Self {
        take_inner::<Error>(e).unwrap_or_else(|e| Error::io(path, e))
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::DigestMismatch { .. }
            | Error::SizeMismatch { .. }
            | Error::TooLong { .. }
            | Error::Json { .. } => ErrorKind::Corrupt,
            Error::Io { error, .. } => ErrorKind::of_io(error),
            Error::InvalidDigest(_)
            | Error::InvalidReference { .. }
            | Error::Invalid { .. }
            | Error::TooLarge { .. } => ErrorKind::Invalid,
        }
    }
}

/// The error of type `E` an `io::Error` carries (readers return typed errors inside
/// `io::Error`s, e.g. a [`VerifyReader`](crate::digest::VerifyReader)'s mismatches), or
/// the `io::Error` back.
pub fn take_inner<E: StdError + Send + Sync + 'static>(
    e: io::Error,
) -> std::result::Result<E, io::Error> {
    if !e.get_ref().is_some_and(|i| i.is::<E>()) {
        return Err(e);
    }
    let kind = e.kind();
    match e.into_inner().map(|i| i.downcast::<E>()) {
        Some(Ok(inner)) => Ok(*inner),
        // Not reached: checked above.
        Some(Err(other)) => Err(io::Error::new(kind, other)),
        None => Err(io::Error::from(kind)),
    }
}

/// An error and its causes on one line, `error: cause: cause`, leaving out a cause whose
/// text the line already holds (some libraries repeat their source in their own message).
///
/// ```
/// # use obdoci::error::Chain;
/// let e = std::io::Error::other("disk full");
/// assert_eq!(Chain(&e).to_string(), "disk full");
/// ```
pub struct Chain<'a>(pub &'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !text.is_empty() && !says(&line, &text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&line)
    }
}

/// Whether `line` already says `text`: it appears as a whole part, not inside a
/// longer word or path ("layer.lsmt" is not said by "cannot commit
/// layer.lsmt.orig", nor "o" by "cannot commit o + t").
fn says(line: &str, text: &str) -> bool {
    line.match_indices(text).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + text.len()..].chars().next();
        before.is_none_or(|c| matches!(c, ' ' | '(' | '\'' | '"' | '[' | ':'))
            && after.is_none_or(|c| matches!(c, ':' | ')' | '\'' | '"' | ']' | ','))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_shows_causes_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer ({inner})")]
        struct Repeats {
            #[source]
            inner: io::Error,
        }
        let e = Error::io("/x/y", io::Error::other("boom"));
        assert_eq!(Chain(&e).to_string(), "/x/y: boom");
        let r = Repeats {
            inner: io::Error::other("boom"),
        };
        assert_eq!(Chain(&r).to_string(), "outer (boom)");
        assert_eq!(e.kind(), ErrorKind::Io);
        // A cause inside a longer name is not the same thing: it is kept.
        #[derive(Debug, thiserror::Error)]
        #[error("cannot commit {0}")]
        struct Ctx(&'static str, #[source] Error);
        let exists = || Error::io("layer.lsmt", io::Error::other("File exists"));
        let c = Ctx("layer.lsmt.orig", exists());
        assert_eq!(
            Chain(&c).to_string(),
            "cannot commit layer.lsmt.orig: layer.lsmt: File exists"
        );
        let c = Ctx("'layer.lsmt'", exists());
        assert_eq!(
            Chain(&c).to_string(),
            "cannot commit 'layer.lsmt': File exists"
        );
        let c = Ctx("o + t", Error::io("o", io::Error::other("missing")));
        assert_eq!(Chain(&c).to_string(), "cannot commit o + t: o: missing");
    }
}
