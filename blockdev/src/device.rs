//! The device abstraction every format implements.
//!
//! A [`BlockDevice`] is a fixed-size, byte-addressed virtual disk. Methods
//! take `&self` so one device can be shared between threads (the NBD server
//! serves several clients at once); implementations use interior locking.

use crate::error::{Error, Result};
use parking_lot::RwLock;
use std::sync::Arc;

/// A virtual disk of `size()` bytes.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` from `offset`. Reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Write `buf` at `offset`. Read-only devices return [`Error::ReadOnly`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Declare `len` bytes at `offset` unused; they read back as zeros.
    fn trim(&self, offset: u64, len: u64) -> Result<()>;

    /// Write zeros over a range. The default trims, which reads back as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.trim(offset, len)
    }

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool {
        false
    }

    /// Read several ranges `(offset, buf)`; each gets its own result, in
    /// order. Devices that can overlap the I/O of several reads override
    /// this; the default reads them one after the other.
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        reqs.iter_mut()
            .map(|(off, buf)| self.read_at(buf, *off))
            .collect()
    }

    /// Describe `[offset, offset+len)` from the device's own metadata,
    /// without reading data: consecutive [`Extent`]s, in order, covering
    /// exactly the range. An extent marked `zero` is known to read as zeros
    /// (nothing stored there: a hole, an unmapped or a zeroed range); any
    /// other may hold anything. Implementations must be cheap (index
    /// lookups, `SEEK_DATA`), as readers call this before reading. The
    /// default knows nothing and reports the whole range as data.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size())?;
        Ok(Extent::data(offset, len).into_iter().collect())
    }

    /// Map `len` bytes at device `offset` to `target_offset` in the layer's target (the
    /// uncompressed layer tar): a TurboOCI "remote data" mapping (LSMT tag 1). All three are
    /// multiples of 512. Devices without a target return an error (the default).
    fn map_target(&self, offset: u64, len: u64, target_offset: u64) -> Result<()> {
        let _ = (offset, len, target_offset);
        Err(Error::Invalid(
            "this device has no target: TurboOCI target mappings need a warp (TurboOCI) upper layer"
                .into(),
        ))
    }
}

/// A run of device bytes as [`BlockDevice::extents`] describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Device offset of the first byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Known to read as zeros without reading.
    pub zero: bool,
}

impl Extent {
    /// One data extent, or none for an empty range.
    pub fn data(offset: u64, len: u64) -> Option<Extent> {
        (len > 0).then_some(Extent {
            offset,
            len,
            zero: false,
        })
    }

    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Append `[offset, offset+len)` to `out`, merging with the last extent when
/// it continues it with the same kind. Empty runs are dropped.
pub fn push_extent(out: &mut Vec<Extent>, offset: u64, len: u64, zero: bool) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.zero == zero && last.end() == offset {
            last.len += len;
            return;
        }
    }
    out.push(Extent { offset, len, zero });
}

/// Check that `[offset, offset+len)` lies within a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// A device held in memory; handy for tests and as a model.
#[derive(Debug, Default)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: usize) -> Self {
        MemDevice {
            data: RwLock::new(vec![0; size]),
        }
    }

    /// A copy of the whole contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read();
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&data[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut data = self.data.write();
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let o = offset as usize;
        data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.data.write();
        check_range(offset, len, data.len() as u64)?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// Forwards every method of [`BlockDevice`] to the device behind a smart pointer, so an
/// `Arc<dyn BlockDevice>` or a `Box<T>` stands wherever a device does.
macro_rules! forward_block_device {
    ($($ptr:ident),+) => {$(
        impl<T: BlockDevice + ?Sized> BlockDevice for $ptr<T> {
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
                (**self).write_at(buf, offset)
            }
            fn flush(&self) -> Result<()> {
                (**self).flush()
            }
            fn trim(&self, offset: u64, len: u64) -> Result<()> {
                (**self).trim(offset, len)
            }
            fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
                (**self).write_zeroes(offset, len)
            }
            fn is_read_only(&self) -> bool {
                (**self).is_read_only()
            }
            fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
                (**self).extents(offset, len)
            }
            fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
                (**self).read_many(reqs)
            }
            fn map_target(&self, offset: u64, len: u64, target_offset: u64) -> Result<()> {
                (**self).map_target(offset, len, target_offset)
            }
        }
    )+};
}

forward_block_device!(Arc, Box);
