//! Writing a sealed LSMT blob from a layer's index and data (commit).
//!
//! Output: header (flags header|data|sealed, index fields 0) | the mapped
//! data of every non-zeroed entry in logical order | the index | trailer.
//! The index is built exactly as upstream's compaction builds it, so the
//! bytes match: each entry is cut into 32 KiB (64-sector) pieces, zeroed
//! entries are kept whole with `moffset` = the current data position, then
//! adjacent pieces are merged ([`compress_entries`]) and the index is padded
//! to a multiple of 4 KiB with `offset = 2^50-1, length 0` entries.
//!
//! Warp (TurboOCI) layers are compacted as upstream's
//! `LSMTWarpFile::compact`: tag-1 (target) entries are copied into the index
//! unchanged and their data is not copied, tag-0 data is copied as above,
//! tags are kept, and the index is **not** padded.

use super::format::*;
use crate::error::Result;
use crate::uuid::Uuid;

/// Identity fields written into the sealed header and trailer.
#[derive(Debug, Clone, Default)]
pub struct SealInfo {
    pub virtual_size: u64,
    pub uuid: Uuid,
    pub parent_uuid: Uuid,
    pub user_tag: Vec<u8>,
}

/// Sectors copied per read while compacting.
const COPY_SECTORS: u64 = 8192;
/// Upstream's compaction piece size, in sectors.
const PIECE: u64 = 64;

/// Compact `entries` (sorted, non-overlapping) whose data `read(buf, moffset)`
/// provides, emitting the sealed blob through `put`. Returns the blob size.
pub fn compact(
    entries: &[Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    put: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    compact_impl(entries, info, read, put, false)
}

/// [`compact`] for a warp layer (see the module documentation); `read` is
/// only asked for tag-0 data.
pub fn compact_warp(
    entries: &[Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    put: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    compact_impl(entries, info, read, put, true)
}

fn compact_impl(
    entries: &[Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    put: &mut dyn FnMut(&[u8]) -> Result<()>,
    warp: bool,
) -> Result<u64> {
    let mut ht = HeaderTrailer {
        flags: FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
        virtual_size: info.virtual_size,
        uuid: info.uuid,
        parent_uuid: info.parent_uuid,
        user_tag: info.user_tag.clone(),
        ..Default::default()
    };
    put(&ht.encode())?;
    let mut pos = HT_SPACE as u64 / SECTOR;
    let mut out: Vec<Mapping> = Vec::with_capacity(entries.len());
    let mut buf = vec![0u8; (COPY_SECTORS * SECTOR) as usize];
    for m in entries {
        if warp && m.tag != 0 {
            out.push(*m);
            continue;
        }
        if m.zeroed {
            out.push(Mapping::zeroed(m.offset, m.length, pos));
            continue;
        }
        let mut done = 0u64;
        let len = m.length as u64;
        while done < len {
            let n = (len - done).min(COPY_SECTORS);
            let b = &mut buf[..(n * SECTOR) as usize];
            read(b, m.moffset + done)?;
            put(b)?;
            done += n;
        }
        let mut k = 0;
        while k < len {
            let n = (len - k).min(PIECE);
            out.push(Mapping::new(m.offset + k, n as u32, pos + k));
            k += n;
        }
        pos += len;
    }
    compress_entries(&mut out);
    let per_block = HT_SPACE / ENTRY_SIZE;
    if !warp && !out.len().is_multiple_of(per_block) {
        let padded = out.len().div_ceil(per_block) * per_block;
        out.resize(padded, Mapping::padding());
    }
    let index_offset = pos * SECTOR;
    put(&encode_entries(&out))?;
    ht.flags = FLAG_DATA | FLAG_SEALED;
    ht.index_offset = index_offset;
    ht.index_size = out.len() as u64;
    put(&ht.encode())?;
    Ok(index_offset + (out.len() * ENTRY_SIZE + HT_SPACE) as u64)
}
