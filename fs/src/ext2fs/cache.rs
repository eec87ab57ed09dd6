//! A write-back page cache in front of a [`BlockDevice`].
//!
//! Layout: the device is cut into 4 KiB pages. Metadata I/O from libext2fs
//! (superblocks, group descriptors, bitmaps, inode tables, directory and
//! extent blocks) lands in `pages`; dirty pages are written back in sorted,
//! coalesced runs, and a dirty page whose bytes equal what the device already
//! holds is not written at all (so an unchanged bitmap block does not end up
//! in the new layer). File data bypasses the page map: it is gathered in one
//! contiguous staging buffer and written in large chunks.
//!
//! Two write modes ([`WriteMode`]):
//! * [`WriteMode::Pages`] (overlaybd layers): a dirty page is written back
//!   whole, and not at all when the device already holds the same bytes.
//! * [`WriteMode::Exact`] (TurboOCI layers, upstream-compatible): the cache
//!   remembers which 512-byte sectors of a page were written and writes back
//!   exactly those, even when unchanged. The layer then records the same
//!   byte ranges as upstream's extfs I/O manager, which writes every
//!   libext2fs write straight through (a superblock is 1 KiB, not a page).
//!   [`PageCache::discard`] drops pending sectors that a later target
//!   mapping replaces, so the device sees writes and mappings in the order
//!   upstream issues them.
//! * [`WriteMode::Buffered`] (upstream's `overlaybd-apply`): as `Exact`, but
//!   a single aligned 4 KiB write dirties its whole 128 KiB block, which is
//!   written back whole, as photon's `BufferFile` (in front of the image
//!   when overlaybd-apply runs) does.
//!
//! Coherence rules: the newest bytes for any offset are in the staging buffer
//! if it covers the offset, else in a cached page, else on the device. Every
//! metadata read or write that overlaps the staging range writes the staging
//! buffer out first, and writing the staging buffer out patches or drops the
//! cached pages it overlaps.

use std::collections::HashMap;
use std::sync::Arc;

use blockdev::BlockDevice;

/// Page size of the cache.
pub const PAGE: usize = 4096;
const PAGE_U64: u64 = PAGE as u64;

/// Largest run written back (or compared) in one device call.
const MAX_RUN_PAGES: usize = 1024;

/// Default size of the data staging buffer.
pub const STAGE_BYTES: usize = 8 << 20;

/// Sectors per page (the unit of [`WriteMode::Exact`] tracking).
const SECTOR: usize = 512;
const SECTORS_PER_PAGE: usize = PAGE / SECTOR;

/// How dirty pages are written back; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// Whole pages, skipping pages the device already holds.
    #[default]
    Pages,
    /// Exactly the sectors written, always.
    Exact,
    /// `Exact`, with aligned 4 KiB writes promoted to their 128 KiB block.
    Buffered,
}

/// The block of [`WriteMode::Buffered`].
const BUFFER_BLOCK: u64 = 128 << 10;

struct Page {
    data: Box<[u8]>,
    dirty: bool,
    /// Written sectors (bit i = bytes `[512 i, 512 i + 512)`), kept in
    /// [`WriteMode::Exact`].
    sectors: u8,
}

impl Page {
    fn clean(data: Box<[u8]>) -> Self {
        Page {
            data,
            dirty: false,
            sectors: 0,
        }
    }
}

/// The sectors of page `p` that `[off, end)` touches, as a mask.
fn sector_mask(p: u64, off: u64, end: u64) -> u8 {
    let pstart = p * PAGE_U64;
    if end <= pstart || off >= pstart + PAGE_U64 || off >= end {
        return 0;
    }
    let s = off.max(pstart) - pstart;
    let e = end.min(pstart + PAGE_U64) - pstart;
    let first = (s / SECTOR as u64) as u32;
    let last = ((e - 1) / SECTOR as u64) as u32;
    let bits = (1u16 << (last + 1)) - (1u16 << first);
    bits as u8
}

/// Counters for tests and progress output.
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStats {
    /// Device reads issued.
    pub dev_reads: u64,
    /// Device writes issued.
    pub dev_writes: u64,
    /// Bytes written to the device.
    pub bytes_written: u64,
    /// Dirty pages dropped because the device already held the same bytes.
    pub unchanged_pages: u64,
}

/// The cache; see the module documentation.
pub struct PageCache {
    dev: Arc<dyn BlockDevice>,
    size: u64,
    pages: HashMap<u64, Page>,
    max_pages: usize,
    stage: Vec<u8>,
    stage_off: u64,
    stage_len: usize,
    stats: CacheStats,
    mode: WriteMode,
    /// [`WriteMode::Buffered`]: 128 KiB blocks to write back whole.
    dirty_blocks: std::collections::BTreeSet<u64>,
}

type Result<T> = std::result::Result<T, blockdev::Error>;

impl PageCache {
    /// A cache holding at most `max_bytes` of metadata before it writes back.
    pub fn new(dev: Arc<dyn BlockDevice>, max_bytes: usize) -> Self {
        Self::with_mode(dev, max_bytes, WriteMode::Pages)
    }

    /// [`PageCache::new`] with a [`WriteMode`].
    pub fn with_mode(dev: Arc<dyn BlockDevice>, max_bytes: usize, mode: WriteMode) -> Self {
        let size = dev.size();
        PageCache {
            dev,
            size,
            pages: HashMap::new(),
            max_pages: (max_bytes / PAGE).max(64),
            stage: Vec::new(),
            stage_off: 0,
            stage_len: 0,
            stats: CacheStats::default(),
            mode,
            dirty_blocks: Default::default(),
        }
    }

    /// The write mode.
    pub fn mode(&self) -> WriteMode {
        self.mode
    }

    /// The device behind the cache.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// I/O counters so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    fn check(&self, off: u64, len: usize) -> Result<()> {
        blockdev::device::check_range(off, len as u64, self.size)
    }

    fn overlaps_stage(&self, off: u64, len: usize) -> bool {
        self.stage_len > 0
            && off < self.stage_off + self.stage_len as u64
            && self.stage_off < off + len as u64
    }

    /// Read whole pages `[first, first+n)` from the device (zero past its end).
    fn read_pages_from_dev(&mut self, first: u64, buf: &mut [u8]) -> Result<()> {
        let off = first * PAGE_U64;
        let avail = self.size.saturating_sub(off).min(buf.len() as u64) as usize;
        if avail > 0 {
            self.dev.read_at(&mut buf[..avail], off)?;
            self.stats.dev_reads += 1;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Make sure page `p` is cached, loading it from the device if needed.
    fn load_page(&mut self, p: u64) -> Result<&mut Page> {
        if !self.pages.contains_key(&p) {
            let mut data = vec![0u8; PAGE].into_boxed_slice();
            self.read_pages_from_dev(p, &mut data)?;
            self.pages.insert(p, Page::clean(data));
        }
        Ok(self.pages.get_mut(&p).expect("page inserted above"))
    }

    /// Read `buf.len()` bytes at `off` through the cache.
    pub fn read(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check(off, buf.len())?;
        if self.overlaps_stage(off, buf.len()) {
            self.flush_stage()?;
        }
        let end = off + buf.len() as u64;
        let mut p = off / PAGE_U64;
        while p * PAGE_U64 < end {
            // Find a run of uncached pages starting at p, or a cached page.
            if let Some(page) = self.pages.get(&p) {
                copy_out(&page.data, p, buf, off);
                p += 1;
                continue;
            }
            let mut q = p + 1;
            while q * PAGE_U64 < end && !self.pages.contains_key(&q) && q - p < MAX_RUN_PAGES as u64
            {
                q += 1;
            }
            let mut tmp = vec![0u8; ((q - p) as usize) * PAGE];
            self.read_pages_from_dev(p, &mut tmp)?;
            for (i, chunk) in tmp.chunks(PAGE).enumerate() {
                let pi = p + i as u64;
                copy_out(chunk, pi, buf, off);
                self.pages
                    .insert(pi, Page::clean(chunk.to_vec().into_boxed_slice()));
            }
            p = q;
        }
        self.maybe_shrink()
    }

    /// Write `buf` at `off` into the cache (written back later).
    pub fn write(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.check(off, buf.len())?;
        if self.overlaps_stage(off, buf.len()) {
            self.flush_stage()?;
        }
        let end = off + buf.len() as u64;
        if self.mode == WriteMode::Buffered && buf.len() == PAGE && off.is_multiple_of(PAGE_U64) {
            self.dirty_blocks.insert(off / BUFFER_BLOCK);
        }
        let mut p = off / PAGE_U64;
        while p * PAGE_U64 < end {
            let pstart = p * PAGE_U64;
            let full = off <= pstart && pstart + PAGE_U64 <= end;
            let mask = sector_mask(p, off, end);
            if full {
                let src = &buf[(pstart - off) as usize..(pstart - off) as usize + PAGE];
                match self.pages.get_mut(&p) {
                    Some(page) => {
                        page.data.copy_from_slice(src);
                        page.dirty = true;
                        page.sectors |= mask;
                    }
                    None => {
                        self.pages.insert(
                            p,
                            Page {
                                data: src.to_vec().into_boxed_slice(),
                                dirty: true,
                                sectors: mask,
                            },
                        );
                    }
                }
            } else {
                let page = self.load_page(p)?;
                copy_in(&mut page.data, p, buf, off);
                page.dirty = true;
                page.sectors |= mask;
            }
            p += 1;
        }
        self.maybe_shrink()
    }

    /// Make `[off, off+len)` read as zeros.
    pub fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        self.check(off, len as usize)?;
        if self.overlaps_stage(off, len as usize) {
            self.flush_stage()?;
        }
        let end = off + len;
        // Unaligned edges go through the cache; the aligned middle is zeroed
        // on the device and dropped from the cache.
        let a = off.div_ceil(PAGE_U64) * PAGE_U64;
        let b = (end / PAGE_U64) * PAGE_U64;
        if a >= b {
            let zeros = vec![0u8; len as usize];
            return self.write(&zeros, off);
        }
        if off < a {
            let zeros = vec![0u8; (a - off) as usize];
            self.write(&zeros, off)?;
        }
        if b < end {
            let zeros = vec![0u8; (end - b) as usize];
            self.write(&zeros, b)?;
        }
        for p in a / PAGE_U64..b / PAGE_U64 {
            self.pages.remove(&p);
        }
        self.dev.write_zeroes(a, b - a)?;
        self.stats.dev_writes += 1;
        Ok(())
    }

    /// A buffer of `len` bytes (at most [`STAGE_BYTES`]) that will be written
    /// to the device at `off`, bypassing the page cache. The caller fills all
    /// of it. Consecutive calls for adjacent ranges are merged into one write.
    pub fn data_buf(&mut self, off: u64, len: usize) -> Result<&mut [u8]> {
        self.check(off, len)?;
        assert!(
            len <= STAGE_BYTES,
            "data_buf larger than the staging buffer"
        );
        let contiguous = self.stage_len > 0 && self.stage_off + self.stage_len as u64 == off;
        if !contiguous || self.stage_len + len > STAGE_BYTES {
            self.flush_stage()?;
        }
        if self.stage.len() < STAGE_BYTES {
            self.stage.resize(STAGE_BYTES, 0);
        }
        if self.stage_len == 0 {
            self.stage_off = off;
        }
        let start = self.stage_len;
        self.stage_len += len;
        Ok(&mut self.stage[start..start + len])
    }

    /// Write the staging buffer to the device.
    pub fn flush_stage(&mut self) -> Result<()> {
        if self.stage_len == 0 {
            return Ok(());
        }
        let off = self.stage_off;
        let len = self.stage_len;
        let end = off + len as u64;
        // Keep cached pages coherent with the data about to be written.
        let first = off / PAGE_U64;
        let last = (end - 1) / PAGE_U64;
        if !self.pages.is_empty() {
            for p in first..=last {
                if let Some(page) = self.pages.get_mut(&p) {
                    let pstart = p * PAGE_U64;
                    if off <= pstart && pstart + PAGE_U64 <= end {
                        self.pages.remove(&p);
                    } else {
                        copy_in(&mut page.data, p, &self.stage[..len], off);
                    }
                }
            }
        }
        self.dev.write_at(&self.stage[..len], off)?;
        self.stats.dev_writes += 1;
        self.stats.bytes_written += len as u64;
        self.stage_len = 0;
        Ok(())
    }

    /// Write every dirty page back: in [`WriteMode::Pages`] whole pages,
    /// skipping those the device already holds; in [`WriteMode::Exact`] the
    /// written sectors.
    pub fn writeback(&mut self) -> Result<()> {
        self.flush_stage()?;
        if self.mode != WriteMode::Pages {
            self.promote_blocks()?;
            let mut dirty: Vec<u64> = self
                .pages
                .iter()
                .filter(|(_, pg)| pg.dirty)
                .map(|(&p, _)| p)
                .collect();
            dirty.sort_unstable();
            return self.write_sectors(&dirty, 0, 0);
        }
        let mut dirty: Vec<u64> = self
            .pages
            .iter()
            .filter(|(_, pg)| pg.dirty)
            .map(|(&p, _)| p)
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        dirty.sort_unstable();
        let mut i = 0;
        let mut cur = Vec::with_capacity(MAX_RUN_PAGES * PAGE);
        let mut old = vec![0u8; MAX_RUN_PAGES * PAGE];
        while i < dirty.len() {
            let start = dirty[i];
            let mut j = i + 1;
            while j < dirty.len() && dirty[j] == dirty[j - 1] + 1 && j - i < MAX_RUN_PAGES {
                j += 1;
            }
            let n = j - i;
            cur.clear();
            for p in &dirty[i..j] {
                cur.extend_from_slice(&self.pages[p].data);
            }
            self.read_pages_from_dev(start, &mut old[..n * PAGE])?;
            // Write only the sub-runs that differ from the device.
            let mut k = 0;
            while k < n {
                let same =
                    |k: usize| cur[k * PAGE..(k + 1) * PAGE] == old[k * PAGE..(k + 1) * PAGE];
                if same(k) {
                    self.stats.unchanged_pages += 1;
                    k += 1;
                    continue;
                }
                let mut l = k + 1;
                while l < n && !same(l) {
                    l += 1;
                }
                let off = (start + k as u64) * PAGE_U64;
                let bytes = &cur[k * PAGE..l * PAGE];
                // The last page may extend past a device whose size is not a
                // multiple of the page size.
                let avail = self.size.saturating_sub(off).min(bytes.len() as u64) as usize;
                self.dev.write_at(&bytes[..avail], off)?;
                self.stats.dev_writes += 1;
                self.stats.bytes_written += avail as u64;
                k = l;
            }
            for p in &dirty[i..j] {
                if let Some(pg) = self.pages.get_mut(p) {
                    pg.dirty = false;
                }
            }
            i = j;
        }
        Ok(())
    }

    /// [`WriteMode::Buffered`]: every sector of the dirty 128 KiB blocks
    /// becomes written (pages not cached are read first).
    fn promote_blocks(&mut self) -> Result<()> {
        let per = BUFFER_BLOCK / PAGE_U64;
        for b in std::mem::take(&mut self.dirty_blocks) {
            for p in b * per..(b + 1) * per {
                if p * PAGE_U64 >= self.size {
                    break;
                }
                let page = self.load_page(p)?;
                page.dirty = true;
                page.sectors = 0xff;
            }
        }
        Ok(())
    }

    /// [`WriteMode::Exact`]: write the written sectors of `pages` (sorted)
    /// that lie outside `[skip_off, skip_off + skip_len)`, in coalesced runs,
    /// and mark the pages clean.
    fn write_sectors(&mut self, pages: &[u64], skip_off: u64, skip_len: u64) -> Result<()> {
        let mut run: Vec<u8> = Vec::new();
        let mut run_off = 0u64;
        for &p in pages {
            let Some(pg) = self.pages.get_mut(&p) else {
                continue;
            };
            let keep = !sector_mask(p, skip_off, skip_off + skip_len);
            let mask = pg.sectors & keep;
            pg.dirty = false;
            pg.sectors = 0;
            for i in 0..SECTORS_PER_PAGE {
                if mask & (1 << i) == 0 {
                    continue;
                }
                let off = p * PAGE_U64 + (i * SECTOR) as u64;
                if run.is_empty()
                    || run_off + run.len() as u64 != off
                    || run.len() >= MAX_RUN_PAGES * PAGE
                {
                    if !run.is_empty() {
                        Self::write_run(&self.dev, self.size, &mut self.stats, &run, run_off)?;
                    }
                    run.clear();
                    run_off = off;
                }
                let pg = &self.pages[&p];
                run.extend_from_slice(&pg.data[i * SECTOR..(i + 1) * SECTOR]);
            }
        }
        if !run.is_empty() {
            Self::write_run(&self.dev, self.size, &mut self.stats, &run, run_off)?;
        }
        Ok(())
    }

    fn write_run(
        dev: &Arc<dyn BlockDevice>,
        size: u64,
        stats: &mut CacheStats,
        bytes: &[u8],
        off: u64,
    ) -> Result<()> {
        let avail = size.saturating_sub(off).min(bytes.len() as u64) as usize;
        if avail > 0 {
            dev.write_at(&bytes[..avail], off)?;
            stats.dev_writes += 1;
            stats.bytes_written += avail as u64;
        }
        Ok(())
    }

    /// Forget what the cache holds for `[off, off + len)` because the device
    /// range is about to be replaced by other means (a TurboOCI target
    /// mapping). Pending writes inside the range are dropped; pending
    /// sectors of the same pages outside it are written first (they came
    /// before the replacement, as upstream's write-through I/O would have
    /// issued them). Later reads of the range come from the device.
    pub fn discard(&mut self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check(off, len as usize)?;
        if self.overlaps_stage(off, len as usize) {
            self.flush_stage()?;
        }
        let first = off / PAGE_U64;
        let last = (off + len - 1) / PAGE_U64;
        let present: Vec<u64> = (first..=last)
            .filter(|p| self.pages.contains_key(p))
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        match self.mode {
            WriteMode::Exact => self.write_sectors(&present, off, len)?,
            WriteMode::Buffered => {
                self.promote_blocks()?;
                let present: Vec<u64> = (first..=last)
                    .filter(|p| self.pages.contains_key(p))
                    .collect();
                self.write_sectors(&present, off, len)?
            }
            WriteMode::Pages => {
                // No sector bookkeeping: write the dirty pages back whole;
                // the replacement that follows covers the range.
                for &p in &present {
                    let pg = &self.pages[&p];
                    if pg.dirty {
                        let data = pg.data.clone();
                        Self::write_run(
                            &self.dev,
                            self.size,
                            &mut self.stats,
                            &data,
                            p * PAGE_U64,
                        )?;
                    }
                }
            }
        }
        for p in present {
            self.pages.remove(&p);
        }
        Ok(())
    }

    fn maybe_shrink(&mut self) -> Result<()> {
        if self.pages.len() > self.max_pages {
            self.writeback()?;
            self.pages.clear();
        }
        Ok(())
    }

    /// Forget every pending change (used when an operation is abandoned).
    pub fn clear_dirty(&mut self) {
        self.pages.clear();
        self.stage_len = 0;
    }
}

/// Copy the part of page `p` (bytes `data`) that overlaps `[off, off+buf.len())` into `buf`.
fn copy_out(data: &[u8], p: u64, buf: &mut [u8], off: u64) {
    let pstart = p * PAGE_U64;
    let s = pstart.max(off);
    let e = (pstart + data.len() as u64).min(off + buf.len() as u64);
    if s < e {
        buf[(s - off) as usize..(e - off) as usize]
            .copy_from_slice(&data[(s - pstart) as usize..(e - pstart) as usize]);
    }
}

/// Copy the part of `buf` (at `off`) that overlaps page `p` into the page bytes.
fn copy_in(data: &mut [u8], p: u64, buf: &[u8], off: u64) {
    let pstart = p * PAGE_U64;
    let s = pstart.max(off);
    let e = (pstart + data.len() as u64).min(off + buf.len() as u64);
    if s < e {
        data[(s - pstart) as usize..(e - pstart) as usize]
            .copy_from_slice(&buf[(s - off) as usize..(e - off) as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemDevice;

    fn dev(n: usize) -> Arc<MemDevice> {
        Arc::new(MemDevice::new(n))
    }

    #[test]
    fn unaligned_write_read_roundtrip() {
        let d = dev(64 * 1024);
        d.write_at(&[7u8; 64 * 1024], 0).unwrap();
        let mut c = PageCache::new(d.clone(), 1 << 20);
        c.write(b"hello", 4094).unwrap();
        let mut b = [0u8; 9];
        c.read(&mut b, 4092).unwrap();
        assert_eq!(&b, b"\x07\x07hello\x07\x07");
        // Not on the device until written back.
        let raw = d.contents();
        assert_eq!(&raw[4094..4099], &[7u8; 5]);
        c.writeback().unwrap();
        let raw = d.contents();
        assert_eq!(&raw[4092..4101], b"\x07\x07hello\x07\x07");
    }

    #[test]
    fn unchanged_pages_are_not_written() {
        let d = dev(64 * 1024);
        let mut c = PageCache::new(d.clone(), 1 << 20);
        c.write(&[0u8; 8192], 8192).unwrap();
        c.write(&[1u8; 4096], 16384).unwrap();
        c.writeback().unwrap();
        let s = c.stats();
        assert_eq!(s.unchanged_pages, 2);
        assert_eq!(s.bytes_written, 4096);
        assert_eq!(&d.contents()[16384..20480], &[1u8; 4096]);
    }

    #[test]
    fn staged_data_stays_coherent_with_cached_pages() {
        let d = dev(1 << 20);
        let mut c = PageCache::new(d.clone(), 1 << 20);
        // A cached dirty page later overwritten by file data.
        c.write(&[9u8; 4096], 8192).unwrap();
        c.data_buf(8192, 4096).unwrap().fill(3);
        c.data_buf(12288, 2048).unwrap().fill(4);
        // Reading through the cache sees the staged data.
        let mut b = [0u8; 4];
        c.read(&mut b, 8192 + 4094).unwrap();
        assert_eq!(b, [3, 3, 4, 4]);
        c.writeback().unwrap();
        let raw = d.contents();
        assert!(raw[8192..12288].iter().all(|&x| x == 3));
        assert!(raw[12288..14336].iter().all(|&x| x == 4));
        assert!(raw[14336..16384].iter().all(|&x| x == 0));
    }

    #[test]
    fn partial_page_patched_by_stage() {
        let d = dev(1 << 20);
        let mut c = PageCache::new(d.clone(), 1 << 20);
        let mut b = [0u8; 8];
        c.read(&mut b, 0).unwrap(); // page 0 cached clean
        c.write(&[5u8; 100], 0).unwrap();
        c.data_buf(1024, 1024).unwrap().fill(6);
        c.flush_stage().unwrap();
        let mut all = vec![0u8; 4096];
        c.read(&mut all, 0).unwrap();
        assert!(all[..100].iter().all(|&x| x == 5));
        assert!(all[1024..2048].iter().all(|&x| x == 6));
        c.writeback().unwrap();
        assert_eq!(&d.contents()[..4096], &all[..]);
    }

    #[test]
    fn zero_range() {
        let d = dev(1 << 20);
        d.write_at(&vec![1u8; 1 << 20], 0).unwrap();
        let mut c = PageCache::new(d.clone(), 1 << 20);
        c.zero(100, 3 * 4096).unwrap();
        c.writeback().unwrap();
        let raw = d.contents();
        assert!(raw[100..100 + 3 * 4096].iter().all(|&x| x == 0));
        assert_eq!(raw[99], 1);
        assert_eq!(raw[100 + 3 * 4096], 1);
    }

    #[test]
    fn shrink_keeps_data() {
        let d = dev(4 << 20);
        let mut c = PageCache::new(d.clone(), 64 * PAGE);
        for i in 0..200u64 {
            c.write(&[i as u8; 16], i * PAGE_U64 + 8).unwrap();
        }
        for i in 0..200u64 {
            let mut b = [0u8; 16];
            c.read(&mut b, i * PAGE_U64 + 8).unwrap();
            assert_eq!(b, [i as u8; 16]);
        }
    }
}
#[cfg(test)]
mod exact_tests {
    use super::*;
    use blockdev::MemDevice;
    use std::sync::Mutex;

    /// A device that records the writes it receives.
    struct Rec {
        inner: MemDevice,
        log: Mutex<Vec<(u64, usize)>>,
    }
    impl BlockDevice for Rec {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> blockdev::Result<()> {
            self.inner.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> blockdev::Result<()> {
            self.log.lock().unwrap().push((off, buf.len()));
            self.inner.write_at(buf, off)
        }
        fn flush(&self) -> blockdev::Result<()> {
            Ok(())
        }
        fn trim(&self, off: u64, len: u64) -> blockdev::Result<()> {
            self.inner.trim(off, len)
        }
    }

    #[test]
    fn exact_writes_back_written_sectors() {
        let d = Arc::new(Rec {
            inner: MemDevice::new(1 << 20),
            log: Mutex::new(Vec::new()),
        });
        let mut c = PageCache::with_mode(d.clone(), 1 << 20, WriteMode::Exact);
        c.write(&[1u8; 1024], 1024).unwrap();
        c.write(&[2u8; 32768], 4096).unwrap();
        c.write(&[0u8; 4096], 65536).unwrap();
        c.writeback().unwrap();
        assert_eq!(
            *d.log.lock().unwrap(),
            vec![(1024, 1024), (4096, 32768), (65536, 4096)]
        );
    }
}
