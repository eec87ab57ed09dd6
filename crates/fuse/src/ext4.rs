//! Filesystem mode (placeholder until the ext4 reader lands).
use crate::error::{Error, Result};
use blockdev::BlockDevice;
use std::sync::Arc;
/// The filesystem-mode server.
pub struct Ext4Fs;
impl Ext4Fs {
    /// Open the ext4 on `dev`.
    pub fn open(_dev: Arc<dyn BlockDevice>) -> Result<Self> {
        Err(Error::Usage("--fs is not implemented yet".into()))
    }
}
impl fuser::Filesystem for Ext4Fs {}
