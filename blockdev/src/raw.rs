//! A plain file used as a device: byte `i` of the device is byte `i` of the file.

use std::path::Path;

use crate::device::{check_range, BlockDevice};
use crate::error::{Error, Result};
use crate::io::IoFile;

/// A raw disk image file exposed as a [`BlockDevice`].
#[derive(Debug)]
pub struct RawFileDevice {
    file: IoFile,
    size: u64,
    read_only: bool,
}

impl RawFileDevice {
    /// Open an existing image read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = IoFile::open(path)?;
        let size = file.len()?;
        Ok(RawFileDevice {
            file,
            size,
            read_only: true,
        })
    }

    /// Open an existing image for writing.
    pub fn open_rw(path: impl AsRef<Path>) -> Result<Self> {
        let file = IoFile::open_rw(path)?;
        let size = file.len()?;
        Ok(RawFileDevice {
            file,
            size,
            read_only: false,
        })
    }

    /// Create a new sparse image of `size` bytes (fails if it exists).
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Self> {
        let file = IoFile::create_new(path)?;
        file.set_len(size)?;
        Ok(RawFileDevice {
            file,
            size,
            read_only: false,
        })
    }
}

impl BlockDevice for RawFileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        self.file.punch_hole(offset, len)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
