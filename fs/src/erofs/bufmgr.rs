//! Block allocation as erofs-utils' buffer manager does it (`lib/cache.c`
//! at eec6f7a2), so that inodes, directory blocks and file data land at
//! the same addresses as upstream's.
//!
//! The device address space is handed out in *buffer blocks*: runs of
//! blocks that are either DATA (file data, always block aligned) or META
//! (inodes, inline data, directory blocks, the superblock). A buffer block
//! holds *buffer heads*, the individual allocations. Buffer blocks sit on
//! one list; they get a block address ("are mapped") lazily, in list order,
//! when something needs an address, at the current tail. New META blocks
//! go to the end of the list, new DATA blocks right after the last mapped
//! block. A new allocation is packed into the fullest suitable partially
//! used META block first: a mapped one found through per-fill-level
//! buckets, else the last mapped or any later one of the same type.
//! Flushing walks the list, maps what is left, runs each head's flush
//! action and pads each block's unused tail with zeros; a block holding a
//! head that must not be written yet is kept instead.

use super::error::{Error, Result};

/// Buffer block index; 0 is the list head.
pub type BbId = usize;
/// Buffer head index.
pub type BhId = usize;

const HEAD: BbId = 0;
const NONE: usize = usize::MAX;
/// "Not mapped yet".
pub const NULL_ADDR: u32 = u32::MAX;

/// Buffer block types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BType {
    Data = 0,
    Meta = 1,
}

/// What an allocation is for; sets the alignment and the block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// File data: block aligned, DATA.
    Data,
    /// Byte aligned metadata.
    Meta,
    /// Inodes with inline xattrs and extents: 32-byte aligned.
    Inode,
    /// Directory blocks: block aligned, META.
    Dira,
    /// Shared xattrs: 4-byte aligned.
    Xattr,
}

/// What flushing a buffer head does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Not set yet.
    None,
    /// Keep the whole buffer block (and do not write it) for now.
    SkipWrite,
    /// Write the inode with this writer-side id.
    WriteInode(usize),
    /// Write the inline tail data of this inode.
    WriteInline(usize),
}

/// An event of [`BufMgr::flush`], to be carried out in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushEvent {
    /// Run `op` for a head at byte `pos`.
    Write { op: Op, pos: u64 },
    /// Write `len` zero bytes at `pos` (block padding).
    Pad { pos: u64, len: u64 },
}

#[derive(Debug, Clone)]
struct Bb {
    prev: BbId,
    next: BbId,
    blkaddr: u32,
    ty: BType,
    off: u64,
    bhs: Vec<BhId>,
    bprev: usize,
    bnext: usize,
    bucket: usize,
}

#[derive(Debug, Clone)]
struct Bh {
    block: BbId,
    off: u64,
    op: Op,
}

/// The buffer manager.
#[derive(Debug)]
pub struct BufMgr {
    blkszbits: u32,
    bbs: Vec<Bb>,
    free_bbs: Vec<BbId>,
    bhs: Vec<Bh>,
    /// (head, tail) per bucket: `type * blksz + (off % blksz)`.
    buckets: Vec<(usize, usize)>,
    /// Bit set of the non-empty buckets (same numbering).
    nonempty: Vec<u64>,
    /// Scan every fill level like erofs-utils (tests compare both ways).
    naive: bool,
    tail_blkaddr: u32,
    last_mapped: BbId,
    metablkcnt: u64,
}

impl BufMgr {
    /// A manager whose first allocation starts at block `start`.
    pub fn new(blkszbits: u32, start: u32) -> BufMgr {
        let blksz = 1usize << blkszbits;
        BufMgr {
            blkszbits,
            bbs: vec![Bb {
                prev: HEAD,
                next: HEAD,
                blkaddr: NULL_ADDR,
                ty: BType::Meta,
                off: 0,
                bhs: Vec::new(),
                bprev: NONE,
                bnext: NONE,
                bucket: NONE,
            }],
            free_bbs: Vec::new(),
            bhs: Vec::new(),
            buckets: vec![(NONE, NONE); 2 * blksz],
            nonempty: vec![0; (2 * blksz).div_ceil(64)],
            naive: false,
            tail_blkaddr: start,
            last_mapped: HEAD,
            metablkcnt: 0,
        }
    }

    fn blksz(&self) -> u64 {
        1 << self.blkszbits
    }

    fn round_blocks(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.blksz())
    }

    /// The next block to hand out.
    pub fn tail_blkaddr(&self) -> u32 {
        self.tail_blkaddr
    }

    /// Metadata blocks flushed or dropped so far.
    pub fn meta_blocks(&self) -> u64 {
        self.metablkcnt
    }

    fn add_blocks(&self, blkaddr: u32, n: u64) -> Result<u32> {
        let v = blkaddr as u64 + n;
        if v >= NULL_ADDR as u64 {
            return Err(Error::TooBig(
                "the image needs more than 2^32 blocks".into(),
            ));
        }
        Ok(v as u32)
    }

    // ---- list helpers -------------------------------------------------

    fn list_insert_after(&mut self, at: BbId, bb: BbId) {
        let next = self.bbs[at].next;
        self.bbs[bb].prev = at;
        self.bbs[bb].next = next;
        self.bbs[at].next = bb;
        self.bbs[next].prev = bb;
    }

    fn list_del(&mut self, bb: BbId) {
        let (p, n) = (self.bbs[bb].prev, self.bbs[bb].next);
        self.bbs[p].next = n;
        self.bbs[n].prev = p;
    }

    fn bucket_del(&mut self, bb: BbId) {
        let k = self.bbs[bb].bucket;
        if k == NONE {
            return;
        }
        let (p, n) = (self.bbs[bb].bprev, self.bbs[bb].bnext);
        if p == NONE {
            self.buckets[k].0 = n;
        } else {
            self.bbs[p].bnext = n;
        }
        if n == NONE {
            self.buckets[k].1 = p;
        } else {
            self.bbs[n].bprev = p;
        }
        if self.buckets[k].0 == NONE {
            self.nonempty[k / 64] &= !(1u64 << (k % 64));
        }
        self.bbs[bb].bucket = NONE;
        self.bbs[bb].bprev = NONE;
        self.bbs[bb].bnext = NONE;
    }

    fn bucket_add_tail(&mut self, bb: BbId, k: usize) {
        let t = self.buckets[k].1;
        self.bbs[bb].bprev = t;
        self.bbs[bb].bnext = NONE;
        self.bbs[bb].bucket = k;
        if t == NONE {
            self.buckets[k].0 = bb;
        } else {
            self.bbs[t].bnext = bb;
        }
        self.buckets[k].1 = bb;
        self.nonempty[k / 64] |= 1u64 << (k % 64);
    }

    /// The highest non-empty bucket in `lo..=hi`.
    fn highest_nonempty(&self, lo: usize, hi: usize) -> Option<usize> {
        let mut k = hi;
        loop {
            let w = self.nonempty[k / 64] & (u64::MAX >> (63 - k % 64));
            if w != 0 {
                let top = (k / 64) * 64 + 63 - w.leading_zeros() as usize;
                return (top >= lo).then_some(top);
            }
            if k / 64 * 64 <= lo {
                return None;
            }
            k = k / 64 * 64 - 1;
        }
    }

    /// `erofs_bupdate_mapped`: refile a mapped block under its fill level.
    fn update_mapped(&mut self, bb: BbId) {
        if self.bbs[bb].blkaddr == NULL_ADDR {
            return;
        }
        let k = self.bbs[bb].ty as usize * self.blksz() as usize
            + (self.bbs[bb].off & (self.blksz() - 1)) as usize;
        self.bucket_del(bb);
        self.bucket_add_tail(bb, k);
    }

    fn new_bb(&mut self, ty: BType) -> BbId {
        let bb = Bb {
            prev: HEAD,
            next: HEAD,
            blkaddr: NULL_ADDR,
            ty,
            off: 0,
            bhs: Vec::new(),
            bprev: NONE,
            bnext: NONE,
            bucket: NONE,
        };
        match self.free_bbs.pop() {
            Some(i) => {
                self.bbs[i] = bb;
                i
            }
            None => {
                self.bbs.push(bb);
                self.bbs.len() - 1
            }
        }
    }

    fn new_bh(&mut self) -> BhId {
        self.bhs.push(Bh {
            block: HEAD,
            off: 0,
            op: Op::None,
        });
        self.bhs.len() - 1
    }

    // ---- allocation ---------------------------------------------------

    fn align_of(&self, kind: Kind) -> (u64, BType) {
        match kind {
            Kind::Data => (self.blksz(), BType::Data),
            Kind::Inode => (32, BType::Meta),
            Kind::Dira => (self.blksz(), BType::Meta),
            Kind::Xattr => (4, BType::Meta),
            Kind::Meta => (1, BType::Meta),
        }
    }

    /// `__erofs_battach`: returns the bytes used in the last block after
    /// attaching, or `None` if the block cannot take it (-EINVAL).
    fn attach(
        &mut self,
        bb: BbId,
        bh: Option<BhId>,
        incr: u64,
        alignsize: u64,
        extrasize: u64,
        dryrun: bool,
    ) -> Option<u64> {
        let blksz = self.blksz();
        let mask = blksz - 1;
        let boff = self.bbs[bb].off;
        let aligned = boff.div_ceil(alignsize) * alignsize;
        let first = ((boff.wrapping_sub(1)) & mask) + 1;
        let need = first.div_ceil(alignsize) * alignsize + incr + extrasize;
        let oob = need.cmp(&blksz);
        let mut tailupdate = false;
        let blkaddr = self.bbs[bb].blkaddr;
        if oob != std::cmp::Ordering::Less {
            let oob_pos = oob == std::cmp::Ordering::Greater;
            let next = self.bbs[bb].next;
            if oob_pos && self.bbs[next].blkaddr != NULL_ADDR {
                return None;
            }
            if blkaddr != NULL_ADDR {
                tailupdate = self.tail_blkaddr as u64 == blkaddr as u64 + self.round_blocks(boff);
                if oob_pos && !tailupdate {
                    return None;
                }
            }
        }
        if !dryrun {
            if let Some(bh) = bh {
                self.bhs[bh].off = aligned;
                self.bhs[bh].block = bb;
                self.bbs[bb].bhs.push(bh);
            }
            let nboff = aligned + incr;
            self.bbs[bb].off = nboff;
            if tailupdate {
                self.tail_blkaddr = (blkaddr as u64 + self.round_blocks(nboff)) as u32;
            }
            self.update_mapped(bb);
        }
        Some(((aligned + incr).wrapping_sub(1) & mask) + 1)
    }

    /// `erofs_bfind_for_attach`: the block to pack an allocation into, if
    /// any; `Err` for -ENOSPC (inline data would not fit one block).
    fn find_for_attach(
        &mut self,
        ty: BType,
        size: u64,
        required_ext: u64,
        inline_ext: u64,
        alignsize: u64,
    ) -> std::result::Result<Option<BbId>, ()> {
        let blksz = self.blksz();
        let mask = blksz - 1;
        let used0 = ((size + required_ext) & mask) + inline_ext;
        if used0 > blksz {
            return Err(());
        }
        if used0 == 0 || alignsize == blksz {
            return Ok(None);
        }
        let mut usedmax = 0;
        let mut found = None;
        if size + required_ext + inline_ext < blksz {
            let used_before = (blksz - (size + required_ext + inline_ext)) / alignsize * alignsize;
            // Fill levels from `used_before` down to 1, skipping empty
            // buckets (erofs-utils looks at each level in turn).
            let base = ty as usize * blksz as usize;
            let mut hi = base + used_before as usize;
            while hi > base {
                let k = if self.naive {
                    if self.buckets[hi].0 == NONE {
                        hi -= 1;
                        continue;
                    }
                    hi
                } else {
                    match self.highest_nonempty(base + 1, hi) {
                        Some(k) => k,
                        None => break,
                    }
                };
                let cur = self.buckets[k].0;
                let next = self.bbs[cur].next;
                // The last mapped block can grow; it is handled below.
                if self.bbs[next].blkaddr != NULL_ADDR {
                    if let Some(ret) =
                        self.attach(cur, None, size, alignsize, required_ext + inline_ext, true)
                    {
                        found = Some(cur);
                        usedmax = ret + required_ext + inline_ext;
                        break;
                    }
                }
                hi = k - 1;
            }
        }
        let mut cur = self.last_mapped;
        if cur == HEAD {
            cur = self.bbs[cur].next;
        }
        while cur != HEAD {
            let used_before = self.bbs[cur].off & mask;
            let next = self.bbs[cur].next;
            if used_before == 0 || self.bbs[cur].ty != ty {
                cur = next;
                continue;
            }
            if let Some(ret) =
                self.attach(cur, None, size, alignsize, required_ext + inline_ext, true)
            {
                let used = ((ret + required_ext) & mask) + inline_ext;
                if used <= blksz && !(used < used_before && used < used0) && usedmax < used {
                    found = Some(cur);
                    usedmax = used;
                }
            }
            cur = next;
        }
        Ok(found)
    }

    /// `erofs_balloc`: allocate `size` bytes of `kind`, keeping room for
    /// `required_ext + inline_ext` more in the same block. `Ok(None)` is
    /// -ENOSPC.
    pub fn alloc(
        &mut self,
        kind: Kind,
        size: u64,
        required_ext: u64,
        inline_ext: u64,
    ) -> Result<Option<BhId>> {
        let (alignsize, ty) = self.align_of(kind);
        let bb = match self.find_for_attach(ty, size, required_ext, inline_ext, alignsize) {
            Err(()) => return Ok(None),
            Ok(Some(bb)) => bb,
            Ok(None) => {
                let bb = self.new_bb(ty);
                if ty == BType::Data {
                    let at = self.last_mapped;
                    self.list_insert_after(at, bb);
                } else {
                    let at = self.bbs[HEAD].prev;
                    self.list_insert_after(at, bb);
                }
                bb
            }
        };
        let bh = self.new_bh();
        match self.attach(
            bb,
            Some(bh),
            size,
            alignsize,
            required_ext + inline_ext,
            false,
        ) {
            Some(_) => Ok(Some(bh)),
            None => Err(Error::TooBig(
                "buffer manager: allocation does not fit its block".into(),
            )),
        }
    }

    fn is_tail_bh(&self, bh: BhId) -> bool {
        let bb = self.bhs[bh].block;
        self.bbs[bb].bhs.last() == Some(&bh)
    }

    /// `erofs_battach`: attach `size` bytes of `kind` right after `bh`
    /// (which must be its block's last head).
    pub fn attach_after(&mut self, bh: BhId, kind: Kind, size: u64) -> Result<BhId> {
        if !self.is_tail_bh(bh) {
            return Err(Error::TooBig(
                "buffer manager: attach after a non-tail head".into(),
            ));
        }
        let (alignsize, _) = self.align_of(kind);
        let bb = self.bhs[bh].block;
        let nbh = self.new_bh();
        self.attach(bb, Some(nbh), size, alignsize, 0, false)
            .ok_or_else(|| Error::TooBig("buffer manager: attached data does not fit".into()))?;
        Ok(nbh)
    }

    /// `erofs_bh_balloon`: grow the block of `bh` (its last head) by
    /// `incr` bytes; returns the bytes used in the last block.
    pub fn balloon(&mut self, bh: BhId, incr: u64) -> Option<u64> {
        if !self.is_tail_bh(bh) {
            return None;
        }
        let bb = self.bhs[bh].block;
        self.attach(bb, None, incr, 1, 0, false)
    }

    /// Set the flush action of a head.
    pub fn set_op(&mut self, bh: BhId, op: Op) {
        self.bhs[bh].op = op;
    }

    /// `__erofs_mapbh`: give `bb` an address if it has none; returns the
    /// block after its end.
    fn map_one(&mut self, bb: BbId) -> Result<u32> {
        if self.bbs[bb].blkaddr == NULL_ADDR {
            self.bbs[bb].blkaddr = self.tail_blkaddr;
            self.last_mapped = bb;
            self.update_mapped(bb);
        }
        let end = self.add_blocks(self.bbs[bb].blkaddr, self.round_blocks(self.bbs[bb].off))?;
        if end > self.tail_blkaddr {
            self.tail_blkaddr = end;
        }
        Ok(end)
    }

    /// `erofs_mapbh`: map every block up to and including the block of
    /// `bh` (all blocks when `None`); returns the block address of `bh`'s
    /// block, or the new tail.
    pub fn map(&mut self, bh: Option<BhId>) -> Result<u32> {
        let target = bh.map(|h| self.bhs[h].block);
        if let Some(bb) = target {
            if self.bbs[bb].blkaddr != NULL_ADDR {
                return Ok(self.bbs[bb].blkaddr);
            }
        }
        let mut t = self.last_mapped;
        loop {
            t = self.bbs[t].next;
            if t == HEAD {
                break;
            }
            self.map_one(t)?;
            if Some(t) == target {
                break;
            }
        }
        Ok(match target {
            Some(bb) => self.bbs[bb].blkaddr,
            None => self.tail_blkaddr,
        })
    }

    /// `erofs_btell`: byte position of `bh` (or of its end), `None` while
    /// its block is unmapped.
    pub fn tell(&self, bh: BhId, end: bool) -> Option<u64> {
        let bb = self.bhs[bh].block;
        let b = &self.bbs[bb];
        if b.blkaddr == NULL_ADDR {
            return None;
        }
        let off = if end {
            let i = b.bhs.iter().position(|&h| h == bh)?;
            match b.bhs.get(i + 1) {
                Some(&n) => self.bhs[n].off,
                None => b.off,
            }
        } else {
            self.bhs[bh].off
        };
        Some(((b.blkaddr as u64) << self.blkszbits) + off)
    }

    /// The block address of `bh`'s buffer block (`NULL_ADDR` if unmapped).
    pub fn blkaddr(&self, bh: BhId) -> u32 {
        self.bbs[self.bhs[bh].block].blkaddr
    }

    fn free_bb(&mut self, bb: BbId) {
        if bb == self.last_mapped {
            self.last_mapped = self.bbs[bb].prev;
        }
        self.bucket_del(bb);
        self.list_del(bb);
        self.free_bbs.push(bb);
    }

    /// `erofs_bdrop`: forget `bh`; free its block when it was the last.
    pub fn drop_bh(&mut self, bh: BhId, tryrevoke: bool) {
        let bb = self.bhs[bh].block;
        let blkaddr = self.bbs[bb].blkaddr;
        let rollback = tryrevoke
            && blkaddr != NULL_ADDR
            && self.tail_blkaddr as u64 == blkaddr as u64 + self.round_blocks(self.bbs[bb].off);
        self.bbs[bb].bhs.retain(|&h| h != bh);
        if !self.bbs[bb].bhs.is_empty() {
            return;
        }
        if !rollback && self.bbs[bb].ty != BType::Data {
            self.metablkcnt += self.round_blocks(self.bbs[bb].off);
        }
        self.free_bb(bb);
        if rollback {
            self.tail_blkaddr = blkaddr;
        }
    }

    /// `erofs_bflush(bmgr, NULL)`: map and flush every block. Returns the
    /// writes to perform, in order.
    pub fn flush(&mut self) -> Result<Vec<FlushEvent>> {
        let mut ev = Vec::new();
        let mask = self.blksz() - 1;
        let mut p = self.bbs[HEAD].next;
        while p != HEAD {
            let n = self.bbs[p].next;
            let end = self.map_one(p)?;
            let mut skip = false;
            let heads = std::mem::take(&mut self.bbs[p].bhs);
            let mut kept = Vec::new();
            for bh in heads {
                if self.bhs[bh].op == Op::SkipWrite {
                    skip = true;
                    kept.push(bh);
                    continue;
                }
                let pos = ((self.bbs[p].blkaddr as u64) << self.blkszbits) + self.bhs[bh].off;
                ev.push(FlushEvent::Write {
                    op: self.bhs[bh].op,
                    pos,
                });
            }
            self.bbs[p].bhs = kept;
            if !skip {
                let padding = self.blksz() - (self.bbs[p].off & mask);
                if padding != self.blksz() {
                    ev.push(FlushEvent::Pad {
                        pos: ((end as u64) << self.blkszbits) - padding,
                        len: padding,
                    });
                }
                if self.bbs[p].ty != BType::Data {
                    self.metablkcnt += self.round_blocks(self.bbs[p].off);
                }
                self.free_bb(p);
            }
            p = n;
        }
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_then_root_share_block_zero() {
        let mut m = BufMgr::new(12, 0);
        let sb = m.alloc(Kind::Meta, 0, 0, 0).unwrap().unwrap();
        m.set_op(sb, Op::SkipWrite);
        assert_eq!(m.balloon(sb, 1152), Some(1152));
        assert_eq!(m.map(Some(sb)).unwrap(), 0);
        assert_eq!(m.tell(sb, false), Some(0));
        // A 16 KiB-xattr root inode with 42 bytes of inline dir data.
        let root = m.alloc(Kind::Inode, 32 + 16384, 0, 42).unwrap().unwrap();
        let inl = m.attach_after(root, Kind::Meta, 42).unwrap();
        assert_eq!(m.tell(root, false), Some(1152));
        assert_eq!(m.tell(inl, false), Some(1152 + 16416));
        assert_eq!(m.tail_blkaddr(), 5);
        // Data goes to the tail.
        let d = m.alloc(Kind::Data, 8192, 0, 0).unwrap().unwrap();
        assert_eq!(m.map(Some(d)).unwrap(), 5);
        m.drop_bh(d, false);
        assert_eq!(m.tail_blkaddr(), 7);
        // A small inode is packed into block 4 after the root's data.
        let i = m.alloc(Kind::Inode, 64, 0, 0).unwrap().unwrap();
        assert_eq!(m.tell(i, false), Some(17632));
    }

    /// The bucket bit set finds the same blocks as erofs-utils' scan of
    /// every fill level, over random allocation sequences.
    #[test]
    fn bucket_index_matches_the_level_scan() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..40 {
            let mut a = BufMgr::new(12, round);
            let mut b = BufMgr::new(12, round);
            b.naive = true;
            let mut heads = Vec::new();
            for _ in 0..3000 {
                let (kind, size, inline) = match rnd(10) {
                    0 => (Kind::Data, 4096 * (1 + rnd(4)), 0),
                    1 => (Kind::Dira, 4096 * rnd(3), 0),
                    2 => (Kind::Meta, rnd(300), 0),
                    _ => (Kind::Inode, 32 * (1 + rnd(3)) + 4 * rnd(100), rnd(1500)),
                };
                let ha = a.alloc(kind, size, 0, inline).unwrap();
                let hb = b.alloc(kind, size, 0, inline).unwrap();
                assert_eq!(ha.is_some(), hb.is_some());
                let (Some(ha), Some(hb)) = (ha, hb) else {
                    continue;
                };
                if rnd(3) == 0 {
                    a.map(Some(ha)).unwrap();
                    b.map(Some(hb)).unwrap();
                }
                if kind == Kind::Data || rnd(8) == 0 {
                    a.map(Some(ha)).unwrap();
                    b.map(Some(hb)).unwrap();
                    a.drop_bh(ha, false);
                    b.drop_bh(hb, false);
                } else {
                    a.set_op(ha, Op::WriteInode(0));
                    b.set_op(hb, Op::WriteInode(0));
                    heads.push((ha, hb));
                }
            }
            a.map(None).unwrap();
            b.map(None).unwrap();
            for (ha, hb) in heads {
                assert_eq!(a.tell(ha, false), b.tell(hb, false));
            }
            assert_eq!(a.flush().unwrap(), b.flush().unwrap());
        }
    }

    #[test]
    fn enospc_when_inline_does_not_fit() {
        let mut m = BufMgr::new(12, 0);
        assert!(m.alloc(Kind::Inode, 64, 0, 4090).unwrap().is_none());
    }
}
