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
use crate::source::BlobSink;
use crate::uuid::Uuid;
use crate::zfile::ZFileWriter;

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

/// Where [`compact`] writes the sealed blob.
pub trait CompactOut {
    /// Append bytes.
    fn append(&mut self, buf: &[u8]) -> Result<()>;
    /// Append `len` bytes that `fill(piece, offset)` writes in place, piece
    /// by piece (see [`BlobSink::put_filled`]).
    fn append_filled(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8], usize) -> Result<()>,
    ) -> Result<()>;
}

impl<T: BlobSink> CompactOut for T {
    fn append(&mut self, buf: &[u8]) -> Result<()> {
        self.put(buf)
    }
    fn append_filled(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8], usize) -> Result<()>,
    ) -> Result<()> {
        self.put_filled(len, fill)
    }
}

impl<S: BlobSink> CompactOut for ZFileWriter<S> {
    fn append(&mut self, buf: &[u8]) -> Result<()> {
        self.write(buf)
    }
    fn append_filled(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8], usize) -> Result<()>,
    ) -> Result<()> {
        self.write_filled(len, fill)
    }
}

/// Read `buf.len()` bytes of mapped data starting `off` bytes after sector
/// `moffset`; pieces that are not whole sectors go through a bounce buffer.
fn read_piece(
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    buf: &mut [u8],
    moffset: u64,
    off: usize,
) -> Result<()> {
    let s = SECTOR as usize;
    if off.is_multiple_of(s) && buf.len().is_multiple_of(s) {
        return read(buf, moffset + (off / s) as u64);
    }
    let first = off / s;
    let last = (off + buf.len()).div_ceil(s);
    let mut tmp = vec![0u8; (last - first) * s];
    read(&mut tmp, moffset + first as u64)?;
    let skip = off - first * s;
    buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
    Ok(())
}

/// Compact `entries` (sorted, non-overlapping) whose data `read(buf, moffset)`
/// provides, emitting the sealed blob into `out_blob`. Returns the blob size.
pub fn compact(
    entries: &[Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    out_blob: &mut dyn CompactOut,
) -> Result<u64> {
    compact_impl(entries, info, read, out_blob, false)
}

/// [`compact`] for a warp layer (see the module documentation); `read` is
/// only asked for tag-0 data.
pub fn compact_warp(
    entries: &[Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    out_blob: &mut dyn CompactOut,
) -> Result<u64> {
    compact_impl(entries, info, read, out_blob, true)
}

fn compact_impl(
    entries: &[Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    out_blob: &mut dyn CompactOut,
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
    out_blob.append(&ht.encode())?;
    let mut pos = HT_SPACE as u64 / SECTOR;
    let mut out: Vec<Mapping> = Vec::with_capacity(entries.len());
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
            let moffset = m.moffset + done;
            out_blob.append_filled((n * SECTOR) as usize, &mut |piece, off| {
                read_piece(read, piece, moffset, off)
            })?;
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
    out_blob.append(&encode_entries(&out))?;
    ht.flags = FLAG_DATA | FLAG_SEALED;
    ht.index_offset = index_offset;
    ht.index_size = out.len() as u64;
    out_blob.append(&ht.encode())?;
    Ok(index_offset + (out.len() * ENTRY_SIZE + HT_SPACE) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::VecSink;

    /// A sink that hands out pieces of odd sizes, to exercise the bounce path.
    struct Ragged(VecSink);

    impl BlobSink for Ragged {
        fn put(&mut self, buf: &[u8]) -> Result<()> {
            self.0.put(buf)
        }
        fn put_at(&mut self, buf: &[u8], pos: u64) -> Result<()> {
            self.0.put_at(buf, pos)
        }
        fn position(&self) -> u64 {
            self.0.position()
        }
        fn put_filled(
            &mut self,
            len: usize,
            fill: &mut dyn FnMut(&mut [u8], usize) -> Result<()>,
        ) -> Result<()> {
            let mut done = 0;
            let mut step = 333;
            while done < len {
                let n = step.min(len - done);
                let mut b = vec![0u8; n];
                fill(&mut b, done)?;
                self.0.put(&b)?;
                done += n;
                step = step * 7 % 5000 + 1;
            }
            Ok(())
        }
    }

    #[test]
    fn in_place_fills_of_any_piece_size_give_the_same_blob() {
        let data: Vec<u8> = (0..200 * 512u32).map(|i| (i * 13 % 251) as u8).collect();
        let entries = vec![
            Mapping::new(0, 70, 0),
            Mapping::zeroed(100, 8, 0),
            Mapping::new(300, 130, 70),
        ];
        let info = SealInfo {
            virtual_size: 1 << 20,
            ..Default::default()
        };
        let mut read = |buf: &mut [u8], moff: u64| -> Result<()> {
            let a = (moff * SECTOR) as usize;
            buf.copy_from_slice(&data[a..a + buf.len()]);
            Ok(())
        };
        let mut plain = VecSink::default();
        let n = compact(&entries, &info, &mut read, &mut plain).unwrap();
        let mut ragged = Ragged(VecSink::default());
        assert_eq!(compact(&entries, &info, &mut read, &mut ragged).unwrap(), n);
        assert_eq!(plain.0.len() as u64, n);
        assert!(plain.0 == ragged.0 .0);
        // the data really is the mapped data, in logical order
        assert!(plain.0[HT_SPACE..HT_SPACE + 70 * 512] == data[..70 * 512]);
        assert!(plain.0[HT_SPACE + 70 * 512..HT_SPACE + 200 * 512] == data[70 * 512..]);
    }
}
