//! A plain file used as a device: byte `i` of the device is byte `i` of the file.

use std::path::Path;

use crate::device::{check_range, push_extent, BlockDevice, Extent};
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

    /// Holes of the sparse file (`SEEK_DATA`/`SEEK_HOLE`) read as zeros.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        for (s, e) in self.file.data_ranges_in(offset, end)? {
            push_extent(&mut out, pos, s.saturating_sub(pos), true);
            push_extent(&mut out, s.max(pos), e - s.max(pos), false);
            pos = e;
        }
        push_extent(&mut out, pos, end - pos, true);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_follow_the_holes_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let dev = RawFileDevice::create(&p, 8 << 20).unwrap();
        assert_eq!(
            dev.extents(0, 8 << 20).unwrap(),
            vec![Extent {
                offset: 0,
                len: 8 << 20,
                zero: true
            }]
        );
        dev.write_at(&[7u8; 4096], 1 << 20).unwrap();
        dev.write_at(&[7u8; 8192], 7 << 20).unwrap();
        let e = dev.extents(100, (8 << 20) - 100).unwrap();
        let kinds: Vec<(u64, u64, bool)> = e.iter().map(|e| (e.offset, e.len, e.zero)).collect();
        // Filesystems may allocate more than was written, never less.
        assert_eq!(kinds.first().unwrap().0, 100);
        assert_eq!(e.last().unwrap().end(), 8 << 20);
        for x in &e {
            if x.zero {
                let mut b = vec![1u8; x.len as usize];
                dev.read_at(&mut b, x.offset).unwrap();
                assert!(b.iter().all(|&v| v == 0), "{x:?} in {kinds:?}");
            }
        }
        assert!(e
            .iter()
            .any(|x| !x.zero && x.offset <= 1 << 20 && x.end() >= (1 << 20) + 4096));
        assert!(dev.extents(1, 8 << 20).is_err());
    }
}
