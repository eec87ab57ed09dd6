//! What an overlaybd front end (`overlaybd-fuse`, `overlaybd-nbd serve`)
//! serves, and where its bytes come from.
//!
//! * [`source`]: the command line's sources as an [`ImageSpec`]: layer
//!   files, an overlaybd `config.json` (TurboOCI lowers included), a
//!   converted image in an OCI layout (`oci:DIR[:TAG]`), or an image in a
//!   registry (`host/repo:tag`, `host/repo@sha256:...`), read lazily.
//! * [`layers`]: the lower layers of a converted image (overlaybd or
//!   TurboOCI) from its manifest and a [`layers::BlobStore`].
//! * [`layout`]: OCI image layouts as a blob store.
//! * [`remote`]: registry blobs read on demand with HTTP range requests
//!   ([`remote::RemoteBlob`]), with read-ahead, retries and digest checks.
//! * [`chunkcache`]: the bounded local cache of fetched chunks.
//! * [`reference`](mod@reference): image references.
//! * [`cli`]: the registry and cache options both binaries take.

pub mod chunkcache;
pub mod cli;
pub mod error;
pub mod layers;
pub mod layout;
pub mod reference;
pub mod remote;
pub mod source;

pub use error::{Error, Result};
pub use source::{ImageSpec, LayerBlob, LowerSpec, RemoteOptions, Target, UpperSpec};
