//! Linear ext4 directory blocks.
//!
//! Layout: a directory block is a chain of entries `inode u32, rec_len u16,
//! name_len u8, file_type u8, name[name_len]`, each padded to 4 bytes and
//! `rec_len` long; the last entry's `rec_len` reaches the end of the block
//! (or the 12-byte checksum tail when `metadata_csum` is on). `inode == 0`
//! marks an unused entry. An entry occupies `8 + name_len` rounded up to 4;
//! the rest of its `rec_len` is free space a new entry can take. Deleting an
//! entry gives its `rec_len` to the previous entry (or zeroes its inode if it
//! is first in the block), so the offsets of the other entries never change:
//! the apply code relies on that to remember where each name lives.

/// Size of the fixed part of an entry.
pub const HEADER: usize = 8;

/// Space an entry with a name of `len` bytes needs.
pub fn rec_len_for(len: usize) -> usize {
    (HEADER + len + 3) & !3
}

/// A parsed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirent<'a> {
    /// Offset in the block.
    pub off: usize,
    /// Inode number (0 = unused).
    pub ino: u32,
    /// Record length.
    pub rec_len: usize,
    /// File type byte (0 without the `filetype` feature).
    pub ftype: u8,
    /// The name.
    pub name: &'a [u8],
}

fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Decode a stored `rec_len` of a block of `bs` bytes (64 KiB blocks store
/// 65536 as 0 or 65535, and bits 16-17 of larger lengths in the low bits).
pub(crate) fn decode_rec_len(raw: u16, bs: usize) -> usize {
    if bs < 65536 {
        raw as usize
    } else if raw == 65535 || raw == 0 {
        bs
    } else {
        ((raw as usize) & 65532) | (((raw as usize) & 3) << 16)
    }
}

/// Encode `len` as stored in a block of `bs` bytes (a whole 64 KiB block is
/// 65535, as libext2fs and the kernel write it).
pub(crate) fn encode_rec_len(len: usize, bs: usize) -> u16 {
    if bs < 65536 || len < 65536 {
        len as u16
    } else if len == bs {
        if bs == 65536 {
            65535
        } else {
            0
        }
    } else {
        ((len & 65532) | ((len >> 16) & 3)) as u16
    }
}

/// Every entry of a block, used or not, up to `limit` (block size minus the
/// checksum tail). Fails on a malformed chain.
pub fn parse(block: &[u8], limit: usize) -> Result<Vec<Dirent<'_>>, String> {
    let bs = block.len();
    let mut v = Vec::new();
    let mut off = 0;
    while off < limit {
        if off + HEADER > limit {
            return Err(format!(
                "entry header at {off} crosses the end of the block"
            ));
        }
        let ino = rd32(block, off);
        let rec_len = decode_rec_len(rd16(block, off + 4), bs);
        let name_len = block[off + 6] as usize;
        let ftype = block[off + 7];
        if rec_len < HEADER || !rec_len.is_multiple_of(4) || off + rec_len > limit {
            return Err(format!("bad rec_len {rec_len} at offset {off}"));
        }
        if ino != 0 && HEADER + name_len > rec_len {
            return Err(format!(
                "name of {name_len} bytes does not fit rec_len {rec_len} at {off}"
            ));
        }
        let name = if ino != 0 {
            &block[off + HEADER..off + HEADER + name_len]
        } else {
            &block[0..0]
        };
        v.push(Dirent {
            off,
            ino,
            rec_len,
            ftype,
            name,
        });
        off += rec_len;
    }
    Ok(v)
}

fn write_entry(block: &mut [u8], off: usize, ino: u32, rec_len: usize, name: &[u8], ftype: u8) {
    let bs = block.len();
    block[off..off + 4].copy_from_slice(&ino.to_le_bytes());
    block[off + 4..off + 6].copy_from_slice(&encode_rec_len(rec_len, bs).to_le_bytes());
    block[off + 6] = name.len() as u8;
    block[off + 7] = ftype;
    block[off + HEADER..off + HEADER + name.len()].copy_from_slice(name);
    // Zero the padding so the block is deterministic.
    let used = rec_len_for(name.len()).min(rec_len);
    block[off + HEADER + name.len()..off + used].fill(0);
}

/// Insert `name` into the block if there is room; returns its offset.
pub fn insert(
    block: &mut [u8],
    limit: usize,
    name: &[u8],
    ino: u32,
    ftype: u8,
) -> Result<Option<usize>, String> {
    let need = rec_len_for(name.len());
    let entries: Vec<(usize, u32, usize, usize)> = parse(block, limit)?
        .iter()
        .map(|e| (e.off, e.ino, e.rec_len, e.name.len()))
        .collect();
    for (off, eino, rec_len, name_len) in entries {
        if eino == 0 {
            if rec_len >= need {
                write_entry(block, off, ino, rec_len, name, ftype);
                return Ok(Some(off));
            }
            continue;
        }
        let used = rec_len_for(name_len);
        if rec_len >= used + need {
            let bs = block.len();
            block[off + 4..off + 6].copy_from_slice(&encode_rec_len(used, bs).to_le_bytes());
            write_entry(block, off + used, ino, rec_len - used, name, ftype);
            return Ok(Some(off + used));
        }
    }
    Ok(None)
}

/// Remove the entry at `off` if it holds `ino` and `name`; returns whether
/// it was found there.
pub fn remove_at(
    block: &mut [u8],
    limit: usize,
    off: usize,
    name: &[u8],
    ino: u32,
) -> Result<bool, String> {
    let entries: Vec<(usize, u32, usize, bool)> = parse(block, limit)?
        .iter()
        .map(|e| (e.off, e.ino, e.rec_len, e.name == name))
        .collect();
    let Some(i) = entries.iter().position(|e| e.0 == off) else {
        return Ok(false);
    };
    let (_, eino, rec_len, same) = entries[i];
    if eino != ino || !same {
        return Ok(false);
    }
    if i == 0 {
        block[off..off + 4].copy_from_slice(&0u32.to_le_bytes());
    } else {
        let (poff, _, prec, _) = entries[i - 1];
        let bs = block.len();
        block[poff + 4..poff + 6]
            .copy_from_slice(&encode_rec_len(prec + rec_len, bs).to_le_bytes());
    }
    Ok(true)
}

/// A new directory's first block: `.`, `..` and, with checksums, the tail.
pub fn new_dir_block(bs: usize, csum_tail: usize, ino: u32, parent: u32, ftype_dir: u8) -> Vec<u8> {
    let mut b = vec![0u8; bs];
    write_entry(&mut b, 0, ino, 12, b".", ftype_dir);
    write_entry(&mut b, 12, parent, bs - 12 - csum_tail, b"..", ftype_dir);
    if csum_tail > 0 {
        init_tail(&mut b, csum_tail);
    }
    b
}

/// An empty directory block (one unused entry spanning it).
pub fn empty_dir_block(bs: usize, csum_tail: usize) -> Vec<u8> {
    let mut b = vec![0u8; bs];
    let len = bs - csum_tail;
    b[4..6].copy_from_slice(&encode_rec_len(len, bs).to_le_bytes());
    if csum_tail > 0 {
        init_tail(&mut b, csum_tail);
    }
    b
}

/// The `metadata_csum` tail: a fake entry (inode 0, rec_len 12, name_len 0,
/// type 0xDE); libext2fs fills in the checksum when writing the block.
fn init_tail(b: &mut [u8], csum_tail: usize) {
    let off = b.len() - csum_tail;
    b[off..off + 4].fill(0);
    b[off + 4..off + 6].copy_from_slice(&12u16.to_le_bytes());
    b[off + 6] = 0;
    b[off + 7] = 0xDE;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_fill_and_remove_keep_offsets() {
        let bs = 4096;
        let mut b = new_dir_block(bs, 0, 12, 2, 2);
        let mut offs = Vec::new();
        let mut i = 0u32;
        loop {
            let name = format!("file-{i:04}");
            match insert(&mut b, bs, name.as_bytes(), 100 + i, 1).unwrap() {
                Some(o) => offs.push((name, o, 100 + i)),
                None => break,
            }
            i += 1;
        }
        // 4096 - 24 bytes of dot entries, 20 bytes per entry.
        assert_eq!(offs.len(), (4096 - 24) / 20);
        // Remove every other entry; the rest keep their offsets.
        for (n, o, ino) in offs.iter().step_by(2) {
            assert!(remove_at(&mut b, bs, *o, n.as_bytes(), *ino).unwrap());
        }
        let left: Vec<_> = parse(&b, bs)
            .unwrap()
            .into_iter()
            .filter(|e| e.ino >= 100)
            .collect();
        assert_eq!(left.len(), offs.len() / 2);
        for (e, (n, o, ino)) in left.iter().zip(offs.iter().skip(1).step_by(2)) {
            assert_eq!((e.off, e.ino, e.name), (*o, *ino, n.as_bytes()));
        }
        // Freed space is reused.
        assert!(insert(&mut b, bs, b"again", 999, 1).unwrap().is_some());
        // Wrong name or inode at an offset is not removed.
        let (n, o, ino) = &offs[1];
        assert!(!remove_at(&mut b, bs, *o, b"other", *ino).unwrap());
        assert!(!remove_at(&mut b, bs, *o, n.as_bytes(), ino + 1).unwrap());
    }

    #[test]
    fn first_entry_removal_zeroes_inode() {
        let bs = 1024;
        let mut b = empty_dir_block(bs, 12);
        let o = insert(&mut b, bs - 12, b"a", 5, 1).unwrap().unwrap();
        assert_eq!(o, 0);
        assert!(remove_at(&mut b, bs - 12, 0, b"a", 5).unwrap());
        let e = parse(&b, bs - 12).unwrap();
        assert_eq!((e.len(), e[0].ino, e[0].rec_len), (1, 0, bs - 12));
        assert_eq!(&b[bs - 12 + 4..bs - 12 + 8], &[12, 0, 0, 0xDE]);
    }

    #[test]
    fn corrupt_chain_is_an_error() {
        let mut b = vec![0u8; 1024];
        b[4..6].copy_from_slice(&3u16.to_le_bytes());
        assert!(parse(&b, 1024).is_err());
    }
}
