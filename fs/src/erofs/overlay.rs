//! A 512-byte-sector write overlay over a block device.
//!
//! Upstream writes EROFS metadata through a sector cache (overlaybd's
//! `ErofsCache`): every write marks each 512-byte sector it touches dirty,
//! a partial sector is first filled from the device (the lower layers),
//! and every dirty sector is eventually written whole. So the set of
//! sectors a layer stores, and their bytes, are the union of the sectors
//! touched. The overlay reproduces that: writes land in memory, reads see
//! them, and [`Overlay::commit`] writes the dirty sectors to the device as
//! few, contiguous, sector-aligned `write_at` calls.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::BlockDevice;

/// Sector size of the overlay.
pub const SECTOR: u64 = 512;
const S: usize = SECTOR as usize;

/// Dirty sectors in memory over a device.
pub struct Overlay {
    dev: Arc<dyn BlockDevice>,
    sectors: Mutex<BTreeMap<u64, Box<[u8; S]>>>,
}

impl Overlay {
    pub fn new(dev: Arc<dyn BlockDevice>) -> Overlay {
        Overlay {
            dev,
            sectors: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Box<[u8; S]>>> {
        // A poisoned lock only means another thread panicked mid-copy of
        // plain bytes; the map itself is still consistent.
        self.sectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of dirty sectors.
    pub fn dirty_sectors(&self) -> u64 {
        self.lock().len() as u64
    }

    /// Write the dirty sectors to the device, coalescing runs (at most
    /// `max_run` bytes per call), and forget them. Returns the bytes
    /// written.
    pub fn commit(&self, max_run: usize) -> blockdev::Result<u64> {
        let map = std::mem::take(&mut *self.lock());
        let mut total = 0;
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        for (sec, data) in map {
            let off = sec * SECTOR;
            if !run.is_empty() && (run_start + run.len() as u64 != off || run.len() >= max_run) {
                self.dev.write_at(&run, run_start)?;
                total += run.len() as u64;
                run.clear();
            }
            if run.is_empty() {
                run_start = off;
            }
            run.extend_from_slice(&data[..]);
        }
        if !run.is_empty() {
            self.dev.write_at(&run, run_start)?;
            total += run.len() as u64;
        }
        Ok(total)
    }

    /// Offsets and lengths of the dirty runs (for inspection).
    pub fn dirty_runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &sec in self.lock().keys() {
            let off = sec * SECTOR;
            match out.last_mut() {
                Some((s, l)) if *s + *l == off => *l += SECTOR,
                _ => out.push((off, SECTOR)),
            }
        }
        out
    }
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        blockdev::device::check_range(offset, buf.len() as u64, self.size())?;
        let map = self.lock();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let sec = pos / SECTOR;
            let in_sec = (pos % SECTOR) as usize;
            if let Some(d) = map.get(&sec) {
                let n = (S - in_sec).min((end - pos) as usize);
                let b = (pos - offset) as usize;
                buf[b..b + n].copy_from_slice(&d[in_sec..in_sec + n]);
                pos += n as u64;
                continue;
            }
            // Read the run of clean sectors up to the next dirty one.
            let next_dirty = map
                .range(sec + 1..)
                .next()
                .map(|(&s, _)| s * SECTOR)
                .unwrap_or(u64::MAX);
            let stop = end.min(next_dirty);
            let b = (pos - offset) as usize;
            let n = (stop - pos) as usize;
            self.dev.read_at(&mut buf[b..b + n], pos)?;
            pos = stop;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        blockdev::device::check_range(offset, buf.len() as u64, self.size())?;
        let mut map = self.lock();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let sec = pos / SECTOR;
            let in_sec = (pos % SECTOR) as usize;
            let n = (S - in_sec).min((end - pos) as usize);
            let b = (pos - offset) as usize;
            if n == S {
                let mut d = Box::new([0u8; S]);
                d.copy_from_slice(&buf[b..b + S]);
                map.insert(sec, d);
            } else {
                let d = match map.get_mut(&sec) {
                    Some(d) => d,
                    None => {
                        let mut d = Box::new([0u8; S]);
                        self.dev.read_at(&mut d[..], sec * SECTOR)?;
                        map.entry(sec).or_insert(d)
                    }
                };
                d[in_sec..in_sec + n].copy_from_slice(&buf[b..b + n]);
            }
            pos += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}
