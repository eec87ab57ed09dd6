//! OCI / Docker image model: digests, descriptors, manifests, indexes, image configs,
//! image references, chain ids, and the OCI image-layout directory format.
//!
//! Manifests and indexes are typed but keep every field they do not know in a flattened
//! map, so re-serialising a source document loses nothing. Image configs are handled as
//! plain JSON values for the same reason. Documents we push are serialised once and the
//! exact bytes are hashed and pushed.
//!
//! Also the pieces every image tool needs around blobs: layer decompression
//! ([`decompress`]), the chunked copy loop ([`stream::copy`]), and the error vocabulary
//! the convertor's crates share ([`error`]).

pub mod archive;
pub mod decompress;
pub mod digest;
pub mod docker_archive;
pub mod error;
#[cfg(isal)]
pub mod isal;
pub mod journal;
pub mod layout;
pub mod model;
pub mod reference;
pub mod stream;
pub mod tempfiles;

pub use digest::{chain_ids, Digest, Sha256Writer};
pub use model::*;
pub use reference::{ArchiveImage, DockerName, ImageName, ImageRef, Reference};

pub use error::{Error, ErrorKind, Result};
