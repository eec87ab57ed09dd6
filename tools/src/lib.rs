//! Shared code for the overlaybd command-line tools.
//!
//! * [`oci`]: the OCI/Docker image model and the OCI image-layout store.
//! * [`registry`]: a client for the OCI distribution API.
//! * [`convert`]: the image convertor (OCI image → overlaybd image).

pub mod convert;
pub mod oci;
pub mod registry;
