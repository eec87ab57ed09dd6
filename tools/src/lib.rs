//! Shared code for the overlaybd command-line tools.
//!
//! * [`cli`]: helpers shared by the thin binaries.
//! * [`oci`]: the OCI/Docker image model and the OCI image-layout store.
//! * [`registry`]: a client for the OCI distribution API.
//! * [`convert`]: the image convertor (OCI image → overlaybd image).
//! * [`dedup`]: the conversion database (MySQL, SQLite) for layer/manifest dedup.

pub mod cli;
pub mod convert;
pub mod dedup;
pub mod oci;
pub mod registry;
