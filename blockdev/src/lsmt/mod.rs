//! LSMT layers: the log-structured block format of overlaybd.
//!
//! * [`format`](mod@format): header/trailer and index-entry encoding.
//! * [`index`]: in-memory indexes.
//! * [`sealed`]: read-only committed layers.
//! * [`writable`]: data+index writable layers (append or sparse).
//! * [`packed`]: a sparse writable layer's data kept as ZFile blocks (the convertor's scratch layers).
//! * [`compact`]: producing a sealed blob (commit).

pub mod compact;
pub mod format;
pub mod index;
pub mod packed;
pub mod sealed;
pub mod writable;

pub use format::{HeaderTrailer, Mapping};
pub use sealed::SealedLayer;
pub use writable::{
    claim_holder, create_writable, set_claim_notice, set_claim_wait, ClaimHolder, ClaimNotice,
    CreateOptions, WritableLayer, CLAIM_NOTICE_AFTER, TOOL_CLAIM_WAIT,
};
