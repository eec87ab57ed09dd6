//! Directories as upstream's libext2fs fork grows them: hashed (htree)
//! directories from the second block on.
//!
//! Layout of an indexed directory (4 KiB blocks, no checksums):
//! * block 0, the root: `.` (12 bytes), `..` whose `rec_len` covers the rest
//!   of the block, then at byte 24 the root info (`reserved_zero: u32,
//!   hash_version: u8, info_length: u8 = 8, indirect_levels: u8, flags: u8`)
//!   and at byte 32 the index: a count/limit header (`limit: u16, count:
//!   u16`) sharing its 8 bytes with the first entry's block number, then
//!   `(hash: u32, block: u32)` entries sorted by hash;
//! * internal index blocks: an empty directory entry spanning the block,
//!   then the same count/limit header and entries at byte 8;
//! * leaf blocks: ordinary directory blocks; a leaf holds the names whose
//!   hash falls in its index entry's range.
//!
//! The fork changes stock libext2fs in two places reproduced here:
//! * `ext2fs_expand_dir` of a one-block directory on a `dir_index`
//!   filesystem converts it to a two-block indexed directory ([`expand_dir`]):
//!   stock expansion appends block 1, the entries after `..` move there, and
//!   block 0 becomes the root with one index entry (block 1);
//! * when a full leaf is split, the blocks the entries are moved into are
//!   cleared first (stock leaves stale bytes behind the last entry).
//!
//! Adding a name to an indexed directory ([`link`]) therefore follows stock
//! 1.47.0's `dx_link` (lookup by hash, insert into the leaf, split the leaf
//! or grow the tree when it is full) in Rust, with the fork's clearing; a
//! linear directory uses stock `ext2fs_link`, which the fork did not change.

use std::ffi::c_int;

use crate::dirent::{decode_rec_len, encode_rec_len};
use crate::error::{Error, Result};
use crate::ext2fs::inode::{Inode, INDEX_FL};
use crate::ext2fs::sys_ext;
use crate::ext2fs::{cstring, sys, Ext2Fs};

/// `rec_len` of an entry with a name of `n` bytes.
fn rec_len_for(n: usize) -> usize {
    (n + 8 + 3) & !3
}

fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn wr16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// Directory entry fields at `o` of the directory block `b`: inode,
/// rec_len, name_len (low byte). The stored rec_len is decoded for the
/// block's size (`b` is one whole block): 64 KiB blocks store 65536 as
/// 65535 (or 0).
fn de_inode(b: &[u8], o: usize) -> u32 {
    rd32(b, o)
}
fn de_rec_len(b: &[u8], o: usize) -> usize {
    decode_rec_len(rd16(b, o + 4), b.len())
}
/// Store `len` as the rec_len of the entry at `o` of the block `b`.
fn set_rec_len(b: &mut [u8], o: usize, len: usize) {
    let raw = encode_rec_len(len, b.len());
    wr16(b, o + 4, raw);
}
fn de_name_len(b: &[u8], o: usize) -> usize {
    b[o + 6] as usize
}

fn corrupted(dir: u32, what: &str) -> Error {
    Error::ext2fs(
        &format!("update directory inode {dir} ({what})"),
        sys::EXT2_ET_DIR_CORRUPTED as sys::errcode_t,
        None,
    )
}

/// Whether the directory `dir` is indexed.
pub fn is_indexed(fs: &mut Ext2Fs, dir: u32) -> Result<bool> {
    let i = read_small(fs, dir)?;
    Ok(i.flags() & INDEX_FL != 0)
}

/// `ext2fs_read_inode`: the first 128 bytes of the inode.
fn read_small(fs: &mut Ext2Fs, ino: u32) -> Result<Inode> {
    let mut i = Inode::zeroed(128);
    // SAFETY: the buffer holds 128 aligned bytes.
    let rc = unsafe { sys::ext2fs_read_inode_full(fs.raw(), ino, i.as_ext2_ptr(), 128) };
    fs.check_with(rc, || format!("read inode {ino}"))?;
    Ok(i)
}

/// `ext2fs_write_inode`: the first 128 bytes of the inode.
fn write_small(fs: &mut Ext2Fs, ino: u32, i: &mut Inode) -> Result<()> {
    // SAFETY: the buffer holds 128 aligned bytes.
    let rc = unsafe { sys::ext2fs_write_inode_full(fs.raw(), ino, i.as_ext2_ptr(), 128) };
    fs.check_with(rc, || format!("write inode {ino}"))
}

/// Load logical block `lblk` of directory `dir`: (physical block, bytes).
fn load_block(fs: &mut Ext2Fs, dir: u32, diri: &mut Inode, lblk: u64) -> Result<(u64, Vec<u8>)> {
    let pblk = fs.bmap(dir, diri, lblk)?;
    let buf = fs.read_dir_block(pblk, dir)?;
    Ok((pblk, buf))
}

/// The fork's `ext2fs_expand_dir`: a one-block linear directory on a
/// `dir_index` filesystem becomes indexed; any other directory gets one more
/// empty block (stock behaviour).
pub fn expand_dir(fs: &mut Ext2Fs, dir: u32) -> Result<()> {
    let i = read_small(fs, dir)?;
    let bs = fs.block_size();
    let blocks = (i.size() & 0xffff_ffff) / bs;
    let dir_index = fs.sb().s_feature_compat & sys::EXT2_FEATURE_COMPAT_DIR_INDEX as u32 != 0;
    fs.expand_dir(dir)?;
    if blocks == 1 && dir_index && i.flags() & INDEX_FL == 0 {
        make_indexed(fs, dir)?;
    }
    Ok(())
}

/// Turn a directory that stock expansion just grew to two blocks into an
/// indexed one (the fork's `make_indexed_dir`).
fn make_indexed(fs: &mut Ext2Fs, dir: u32) -> Result<()> {
    let bs = fs.block_size() as usize;
    let mut diri = read_small(fs, dir)?;
    let (p0, mut b0) = load_block(fs, dir, &mut diri, 0)?;
    let (p1, mut b1) = load_block(fs, dir, &mut diri, 1)?;
    // The entries after `..` move to block 1.
    let first = 12 + de_rec_len(&b0, 12);
    if first > bs {
        return Err(corrupted(dir, "'..' runs past the block"));
    }
    let len = bs - first;
    b1[..len].copy_from_slice(&b0[first..]);
    b0[first..].fill(0);
    let mut de = 0usize;
    loop {
        let rl = de_rec_len(&b1, de);
        if rl == 0 {
            return Err(corrupted(dir, "entry of length 0"));
        }
        let next = de + rl;
        if next >= len {
            break;
        }
        de = next;
    }
    set_rec_len(&mut b1, de, bs - de);
    // Block 0 becomes the root.
    diri.set_flags(diri.flags() | INDEX_FL);
    set_rec_len(&mut b0, 12, bs - 12);
    b0[24..32].fill(0);
    b0[24 + 4] = fs.sb().s_def_hash_version;
    b0[24 + 5] = 8;
    wr32(&mut b0, 36, 1);
    wr16(&mut b0, 34, 1);
    wr16(&mut b0, 32, ((bs - 32) / 8) as u16);
    fs.write_dir_block(p0, &mut b0, dir)?;
    fs.write_dir_block(p1, &mut b1, dir)?;
    write_small(fs, dir, &mut diri)
}

/// Add `name -> ino` (file type `ftype`) to directory `dir`. Returns the
/// libext2fs code: 0, `EXT2_ET_DIR_NO_SPACE` (the caller expands the
/// directory and tries again, as upstream does) or an error.
pub fn link(fs: &mut Ext2Fs, dir: u32, name: &[u8], ino: u32, ftype: u8) -> Result<sys::errcode_t> {
    let mut diri = read_small(fs, dir)?;
    if diri.flags() & INDEX_FL == 0 {
        let c = cstring(name)?;
        // SAFETY: fs is open; c is a valid C string.
        return Ok(unsafe { sys::ext2fs_link(fs.raw(), dir, c.as_ptr(), ino, ftype as c_int) });
    }
    dx_link(fs, dir, &mut diri, name, ino, ftype)
}

/// One level of an htree lookup.
struct Frame {
    pblk: u64,
    buf: Vec<u8>,
    /// Byte offset of the count/limit header (the entry array).
    head: usize,
    /// Index of the entry the lookup went through.
    at: usize,
}

impl Frame {
    fn count(&self) -> usize {
        rd16(&self.buf, self.head + 2) as usize
    }
    fn limit(&self) -> usize {
        rd16(&self.buf, self.head) as usize
    }
    fn hash(&self, i: usize) -> u32 {
        rd32(&self.buf, self.head + 8 * i)
    }
    fn block(&self, i: usize) -> u32 {
        rd32(&self.buf, self.head + 8 * i + 4)
    }
}

struct Lookup {
    frames: Vec<Frame>,
    hash_alg: c_int,
}

/// `ext2fs_get_dx_countlimit`: offset of the count/limit header of an index
/// block, or `None` when the block is not one.
fn countlimit_offset(buf: &[u8], bs: usize) -> Option<usize> {
    let rl = de_rec_len(buf, 0);
    let off = if rl == bs && rd16(buf, 6) == 0 {
        8
    } else if rl == 12 {
        if de_rec_len(buf, 12) != bs - 12 {
            return None;
        }
        if rd32(buf, 24) != 0 || buf[29] != 8 {
            return None;
        }
        32
    } else {
        return None;
    };
    let sane = (bs - off) / 8;
    if rd16(buf, off) as usize > sane || rd16(buf, off + 2) as usize > sane {
        return None;
    }
    Some(off)
}

fn dirhash(fs: &Ext2Fs, alg: c_int, name: &[u8], flags: c_int) -> Result<u32> {
    let (mut h, mut minor) = (0u32, 0u32);
    let seed = fs.sb().s_hash_seed;
    // SAFETY: fs is open (encoding read from the handle); name points to
    // name.len() bytes; seed holds 4 words; out-pointers are valid.
    let rc = unsafe {
        sys_ext::ext2fs_dirhash2(
            alg,
            name.as_ptr() as *const std::ffi::c_char,
            name.len() as c_int,
            (*fs.raw()).encoding as *const std::ffi::c_void,
            flags,
            seed.as_ptr(),
            &mut h,
            &mut minor,
        )
    };
    if rc != 0 {
        return Err(Error::ext2fs("hash a directory entry name", rc, None));
    }
    Ok(h)
}

/// Stock `dx_lookup`: walk the index from the root to the leaf whose range
/// holds `name`'s hash.
fn dx_lookup(fs: &mut Ext2Fs, dir: u32, diri: &mut Inode, name: &[u8]) -> Result<(Lookup, u32)> {
    let bs = fs.block_size() as usize;
    let (pblk, buf) = load_block(fs, dir, diri, 0)?;
    let mut alg = buf[28] as c_int;
    let levels_root = buf[30] as usize;
    let (tea, half_md4, legacy) = (
        sys::EXT2_HASH_TEA as c_int,
        sys::EXT2_HASH_HALF_MD4 as c_int,
        sys::EXT2_HASH_LEGACY as c_int,
    );
    if alg != tea && alg != half_md4 && alg != legacy {
        return Err(Error::ext2fs(
            &format!("look up a name in directory inode {dir}"),
            sys::EXT2_ET_DIRHASH_UNSUPP as sys::errcode_t,
            None,
        ));
    }
    if alg <= tea && fs.sb().s_flags & sys::EXT2_FLAGS_UNSIGNED_HASH as u32 != 0 {
        alg += 3;
    }
    let largedir = fs.sb().s_feature_incompat & sys::EXT4_FEATURE_INCOMPAT_LARGEDIR as u32 != 0;
    let max_levels = if largedir { 3 } else { 2 };
    if levels_root >= max_levels {
        return Err(corrupted(dir, "too many index levels"));
    }
    let hash_flags = (diri.flags() & sys::EXT4_CASEFOLD_FL as u32) as c_int;
    let hash = dirhash(fs, alg, name, hash_flags)?;
    let mut frames: Vec<Frame> = Vec::new();
    let mut next = (pblk, buf);
    for level in 0..=levels_root {
        if level > 0 {
            let prev = frames.last().expect("a frame per level");
            let lblk = (prev.block(prev.at) & 0x0fff_ffff) as u64;
            next = load_block(fs, dir, diri, lblk)?;
        }
        let (pblk, buf) = std::mem::take(&mut next);
        let head = countlimit_offset(&buf, bs).ok_or_else(|| corrupted(dir, "bad index block"))?;
        let mut f = Frame {
            pblk,
            buf,
            head,
            at: 0,
        };
        let count = f.count();
        if count == 0 || count > f.limit() {
            return Err(corrupted(dir, "bad index count"));
        }
        // Binary search for the last entry whose hash <= hash.
        let (mut p, mut q) = (1isize, count as isize - 1);
        while p <= q {
            let m = p + (q - p) / 2;
            if f.hash(m as usize) > hash {
                q = m - 1;
            } else {
                p = m + 1;
            }
        }
        f.at = (p - 1) as usize;
        frames.push(f);
    }
    Ok((
        Lookup {
            frames,
            hash_alg: alg,
        },
        hash_flags as u32,
    ))
}

/// Stock `add_dirent_to_buf`: `ext2fs_process_dir_block` with `link_proc`
/// over one block. Returns the code, the block's physical number and its
/// bytes as left by the attempt (written back when changed).
fn add_to_block(
    fs: &mut Ext2Fs,
    dir: u32,
    diri: &mut Inode,
    lblk: u64,
    name: &[u8],
    ino: u32,
    ftype: u8,
) -> Result<(sys::errcode_t, u64, Vec<u8>)> {
    let bs = fs.block_size() as usize;
    let (pblk, mut buf) = load_block(fs, dir, diri, lblk)?;
    let filetype = fs.sb().s_feature_incompat & sys::EXT2_FEATURE_INCOMPAT_FILETYPE as u32 != 0;
    let need = rec_len_for(name.len());
    let mut changed = false;
    let mut done = false;
    let mut off = 0usize;
    while off < bs - 8 {
        let mut rl = de_rec_len(&buf, off);
        if off + rl > bs || rl < 8 || !rl.is_multiple_of(4) || de_name_len(&buf, off) + 8 > rl {
            return Ok((sys::EXT2_ET_DIR_CORRUPTED as sys::errcode_t, pblk, buf));
        }
        // link_proc
        let mut ret_changed = false;
        let mut abort = false;
        let mut curr = rl;
        let nx = off + curr;
        if nx < bs - 8 && de_inode(&buf, nx) == 0 && nx + de_rec_len(&buf, nx) <= bs {
            curr += de_rec_len(&buf, nx);
            set_rec_len(&mut buf, off, curr);
            ret_changed = true;
        }
        if de_inode(&buf, off) != 0 {
            let min = rec_len_for(de_name_len(&buf, off));
            if curr >= min + need {
                let rest = curr - min;
                set_rec_len(&mut buf, off, min);
                let n = off + min;
                wr32(&mut buf, n, 0);
                wr16(&mut buf, n + 6, 0);
                set_rec_len(&mut buf, n, rest);
                ret_changed = true;
            }
        } else if curr >= need {
            wr32(&mut buf, off, ino);
            buf[off + 6] = name.len() as u8;
            buf[off + 8..off + 8 + name.len()].copy_from_slice(name);
            if filetype {
                buf[off + 7] = ftype & 7;
            }
            done = true;
            ret_changed = true;
            abort = true;
        }
        if ret_changed {
            rl = de_rec_len(&buf, off);
            changed = true;
        }
        if abort {
            break;
        }
        off += rl;
    }
    if changed {
        fs.write_dir_block(pblk, &mut buf, dir)?;
    }
    let rc = if done {
        0
    } else {
        sys::EXT2_ET_DIR_NO_SPACE as sys::errcode_t
    };
    Ok((rc, pblk, buf))
}

/// Stock `dx_link` (see the module documentation).
fn dx_link(
    fs: &mut Ext2Fs,
    dir: u32,
    diri: &mut Inode,
    name: &[u8],
    ino: u32,
    ftype: u8,
) -> Result<sys::errcode_t> {
    let mut restart = 0usize;
    loop {
        let (mut lk, hash_flags) = dx_lookup(fs, dir, diri, name)?;
        let leaf = {
            let f = lk.frames.last().expect("at least the root");
            (f.block(f.at) & 0x0fff_ffff) as u64
        };
        let (rc, leaf_pblk, mut buf) = add_to_block(fs, dir, diri, leaf, name, ino, ftype)?;
        if restart >= lk.frames.len() || rc != sys::EXT2_ET_DIR_NO_SPACE as sys::errcode_t {
            return Ok(rc);
        }
        let rc = dx_grow_tree(fs, dir, diri, &mut lk, hash_flags, &mut buf, leaf_pblk)?;
        if rc != 0 {
            return Ok(rc);
        }
        restart += 1;
    }
}

/// Stock `dx_insert_entry`: insert `(hash, lblk)` after the lookup position
/// of `frames[level]` and write that index block.
fn dx_insert_entry(
    fs: &mut Ext2Fs,
    dir: u32,
    lk: &mut Lookup,
    level: usize,
    hash: u32,
    lblk: u32,
) -> Result<()> {
    let f = &mut lk.frames[level];
    let count = f.count();
    let new = f.head + 8 * (f.at + 1);
    let top = f.head + 8 * count;
    f.buf.copy_within(new..top, new + 8);
    wr32(&mut f.buf, new, hash);
    wr32(&mut f.buf, new + 4, lblk);
    let h = f.head;
    wr16(&mut f.buf, h + 2, (count + 1) as u16);
    let pblk = f.pblk;
    let mut buf = std::mem::take(&mut f.buf);
    let r = fs.write_dir_block(pblk, &mut buf, dir);
    lk.frames[level].buf = buf;
    r
}

/// Stock `dx_move_dirents` with the fork's clearing of the target: pack
/// the entries at `offs` of `from` into a fresh block, the last one
/// stretched to the end.
fn move_dirents(from: &[u8], offs: &[usize], bs: usize) -> Vec<u8> {
    let mut to = vec![0u8; bs];
    let mut pos = 0usize;
    let mut rl = 0usize;
    for &o in offs {
        rl = rec_len_for(de_name_len(from, o));
        to[pos..pos + rl].copy_from_slice(&from[o..o + rl]);
        set_rec_len(&mut to, pos, rl);
        pos += rl;
    }
    let last = pos - rl;
    set_rec_len(&mut to, last, bs - last);
    to
}

/// Stock `dx_split_leaf` with the fork's clearing: move the upper half (by
/// hash) of the full leaf `buf` into the new block `new_pblk`.
#[allow(clippy::too_many_arguments)]
fn dx_split_leaf(
    fs: &mut Ext2Fs,
    dir: u32,
    lk: &mut Lookup,
    hash_flags: u32,
    buf: &[u8],
    leaf_pblk: u64,
    new_lblk: u64,
    new_pblk: u64,
) -> Result<()> {
    let bs = fs.block_size() as usize;
    // (hash, size, offset) of every live entry.
    let mut map: Vec<(u32, usize, usize)> = Vec::new();
    let mut off = 0usize;
    while off < bs {
        // The checks of add_to_block, whose walk stops 8 bytes before the end
        // of the block: a chain that stops short of the end is corrupt here.
        if off + 8 > bs {
            return Err(corrupted(dir, "entry crosses the end of the block"));
        }
        let rl = de_rec_len(buf, off);
        let nl = de_name_len(buf, off);
        if off + rl > bs || rl < 8 || !rl.is_multiple_of(4) || nl + 8 > rl {
            return Err(corrupted(dir, "bad entry length"));
        }
        if nl > 0 && de_inode(buf, off) != 0 {
            let h = dirhash(
                fs,
                lk.hash_alg,
                &buf[off + 8..off + 8 + nl],
                hash_flags as c_int,
            )?;
            map.push((h, rl, off));
        }
        off += rl;
    }
    // glibc's qsort of these small arrays is a stable merge sort.
    map.sort_by_key(|m| m.0);
    let mut move_size = 0usize;
    let mut i = map.len() as isize - 1;
    while i >= 0 {
        let m = map[i as usize];
        if move_size + m.1 / 2 > bs / 2 {
            break;
        }
        move_size += m.1;
        i -= 1;
    }
    let i = (i + 1) as usize;
    if i == 0 || i >= map.len() {
        return Err(corrupted(dir, "cannot split a leaf block"));
    }
    let offs: Vec<usize> = map.iter().map(|m| m.2).collect();
    let mut upper = move_dirents(buf, &offs[i..], bs);
    fs.write_dir_block(new_pblk, &mut upper, dir)?;
    let mut lower = move_dirents(buf, &offs[..i], bs);
    fs.write_dir_block(leaf_pblk, &mut lower, dir)?;
    let continued = (map[i].0 == map[i - 1].0) as u32;
    let level = lk.frames.len() - 1;
    dx_insert_entry(
        fs,
        dir,
        lk,
        level,
        map[i].0.wrapping_add(continued),
        new_lblk as u32,
    )
}

/// Stock `dx_grow_tree`: add a block to the directory and either split the
/// leaf into it, split an index node, or add an index level.
fn dx_grow_tree(
    fs: &mut Ext2Fs,
    dir: u32,
    diri: &mut Inode,
    lk: &mut Lookup,
    hash_flags: u32,
    buf: &mut [u8],
    leaf_pblk: u64,
) -> Result<sys::errcode_t> {
    let bs = fs.block_size();
    let levels = lk.frames.len();
    let mut i = levels as isize - 1;
    while i >= 0 {
        let f = &lk.frames[i as usize];
        if f.count() < f.limit() {
            break;
        }
        i -= 1;
    }
    let largedir = fs.sb().s_feature_incompat & sys::EXT4_FEATURE_INCOMPAT_LARGEDIR as u32 != 0;
    let max_levels = if largedir { 3 } else { 2 };
    if i < 0 && levels >= max_levels {
        return Ok(sys::EXT2_ET_DIR_NO_SPACE as sys::errcode_t);
    }
    let size = diri.size();
    let lblk = size / bs;
    diri.set_size(size + bs);
    let flags = (sys::EXT2_FALLOCATE_FORCE_INIT | sys::EXT2_FALLOCATE_ZERO_BLOCKS) as c_int;
    // SAFETY: fs is open; diri is a 128-byte inode buffer of `dir`.
    let rc = unsafe { sys::ext2fs_fallocate(fs.raw(), flags, dir, diri.as_ext2_ptr(), 0, lblk, 1) };
    if rc != 0 {
        return Ok(rc);
    }
    write_small(fs, dir, diri)?;
    let pblk = fs.bmap(dir, diri, lblk)?;
    if i == levels as isize - 1 {
        dx_split_leaf(fs, dir, lk, hash_flags, buf, leaf_pblk, lblk, pblk)?;
        return Ok(0);
    }
    let bsu = bs as usize;
    // The new index block: an empty entry spanning the block, then entries.
    wr32(buf, 0, 0);
    wr16(buf, 6, 0);
    set_rec_len(buf, 0, bsu);
    let head = 8usize;
    let child = (i + 1) as usize;
    let count = lk.frames[child].count();
    let limit = ((bsu - 8) / 8) as u16;
    if i < 0 {
        // A new level: the root's entries move to the new block.
        let f = &lk.frames[0];
        buf[head..head + 8 * count].copy_from_slice(&f.buf[f.head..f.head + 8 * count]);
        wr16(buf, head, limit);
        let f = &mut lk.frames[0];
        let h = f.head;
        wr16(&mut f.buf, h + 2, 1);
        wr32(&mut f.buf, h + 4, lblk as u32);
        f.buf[30] += 1;
    } else {
        let count1 = count / 2;
        let count2 = count - count1;
        let f = &lk.frames[child];
        let split_hash = f.hash(count1);
        let src = f.head + 8 * count1;
        buf[head..head + 8 * count2].copy_from_slice(&f.buf[src..src + 8 * count2]);
        wr16(buf, head + 2, count2 as u16);
        wr16(buf, head, limit);
        let f = &mut lk.frames[child];
        let h = f.head;
        wr16(&mut f.buf, h + 2, count1 as u16);
        dx_insert_entry(fs, dir, lk, i as usize, split_hash, lblk as u32)?;
    }
    let f = &mut lk.frames[child];
    let p = f.pblk;
    let mut b = std::mem::take(&mut f.buf);
    fs.write_dir_block(p, &mut b, dir)?;
    lk.frames[child].buf = b;
    fs.write_dir_block(pblk, buf, dir)?;
    Ok(0)
}
