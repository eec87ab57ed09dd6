//! OCI / Docker image model: digests, descriptors, manifests, indexes, image configs,
//! image references, chain ids, and the OCI image-layout directory format.
//!
//! Manifests and indexes are typed but keep every field they do not know in a flattened
//! map, so re-serialising a source document loses nothing. Image configs are handled as
//! plain JSON values for the same reason. Documents we push are serialised once and the
//! exact bytes are hashed and pushed.

pub mod digest;
pub mod error;
pub mod layout;
pub mod model;
pub mod reference;

pub use digest::{chain_ids, uuid_from_chain_id, Digest, Sha256Writer};
pub use model::*;
pub use reference::{ImageRef, Reference};

pub use error::{Error, ErrorKind, Result};
