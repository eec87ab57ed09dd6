//! OCI / Docker image model: digests, descriptors, manifests, indexes, image configs,
//! image references, chain ids, and the OCI image-layout directory format.
//!
//! Manifests and indexes are typed but keep every field they do not know in a flattened
//! map, so re-serialising a source document loses nothing. Image configs are handled as
//! plain JSON values for the same reason. Documents we push are serialised once and the
//! exact bytes are hashed and pushed.

pub mod digest;
pub mod layout;
pub mod model;
pub mod reference;

pub use digest::{chain_ids, uuid_from_chain_id, Digest, Sha256Writer};
pub use model::*;
pub use reference::{ImageRef, Reference};

use std::path::PathBuf;

/// Errors from the image model and the OCI layout store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("{what}: invalid JSON: {error}")]
    Json {
        what: String,
        error: serde_json::Error,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
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
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}
