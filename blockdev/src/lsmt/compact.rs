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
use crate::zfile::{StoredSource, ZFileWriter};

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
    /// Append `sectors` of mapped data starting at sector `moffset`, read
    /// with `read`. A ZFile writer copies the blocks `stored` already holds
    /// compressed in its own format instead of compressing them again.
    fn append_mapped(
        &mut self,
        sectors: u64,
        moffset: u64,
        read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
        stored: Option<&dyn StoredSource>,
    ) -> Result<()> {
        let _ = stored;
        append_read(self, sectors, moffset, read)
    }
}

/// Append `sectors` of mapped data starting at sector `moffset`, read with `read`
/// into `out`'s own buffers.
fn append_read<O: CompactOut + ?Sized>(
    out: &mut O,
    sectors: u64,
    moffset: u64,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
) -> Result<()> {
    out.append_filled((sectors * SECTOR) as usize, &mut |piece, off| {
        read_piece(read, piece, moffset, off)
    })
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
    fn append_mapped(
        &mut self,
        sectors: u64,
        moffset: u64,
        read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
        stored: Option<&dyn StoredSource>,
    ) -> Result<()> {
        const BS: u64 = crate::lsmt::packed::BLOCK;
        let o = self.options();
        let usable = stored.filter(|st| {
            o.block_size as u64 == BS && st.stored_format() == (o.algorithm, o.verify)
        });
        let Some(st) = usable else {
            return append_read(self, sectors, moffset, read);
        };
        // Entries are cut at 16383 sectors, so a piece may start or end inside
        // a block: such parts are read and compressed (the writer completes the
        // block across pieces), whole blocks are copied.
        let (start, end) = (moffset * SECTOR, (moffset + sectors) * SECTOR);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        let mut pos = start;
        while pos < end {
            let mut n = 0;
            if pos.is_multiple_of(BS) && end - pos >= BS && self.at_block_boundary() {
                out.clear();
                lens.clear();
                n = st.stored_blocks(pos, (end - pos) / BS, &mut out, &mut lens)?;
            }
            if n > 0 {
                self.write_stored(&out, &lens)?;
                pos += n * BS;
                continue;
            }
            // Up to the next block boundary (or the end), read.
            let step = ((pos / BS + 1) * BS).min(end) - pos;
            let at = pos;
            self.write_filled(step as usize, &mut |piece, off| {
                read_piece(read, piece, moffset, (at - start) as usize + off)
            })?;
            pos += step;
        }
        Ok(())
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
    compact_impl(entries, info, read, None, out_blob, false)
}

/// [`compact`] of data some of whose blocks are already compressed
/// (`stored`, addressed by data offset = `moffset` × 512): a ZFile output
/// copies them; the blob is the same as [`compact`]'s.
pub fn compact_stored(
    entries: &[Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    stored: &dyn StoredSource,
    out_blob: &mut dyn CompactOut,
) -> Result<u64> {
    compact_impl(entries, info, read, Some(stored), out_blob, false)
}

/// [`compact`] for a warp layer (see the module documentation); `read` is
/// only asked for tag-0 data.
pub fn compact_warp(
    entries: &[Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    out_blob: &mut dyn CompactOut,
) -> Result<u64> {
    compact_impl(entries, info, read, None, out_blob, true)
}

fn compact_impl(
    entries: &[Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    stored: Option<&dyn StoredSource>,
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
            out_blob.append_mapped(n, m.moffset + done, read, stored)?;
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

    /// Blocks a [`StoredSource`] holds are copied into a ZFile output whatever
    /// the cuts of the entries (a long run is cut every 16383 sectors, inside
    /// a block, and so are the pieces copied from such entries): only the
    /// blocks cut in two are read, and the blob is the one plain compaction
    /// makes.
    #[test]
    fn stored_blocks_are_copied_and_only_cut_blocks_read() {
        use crate::compress::Codec;
        use crate::zfile::{Algorithm, ZFileWriter, ZfileOptions};
        const BS: usize = 4096;
        let data: Vec<u8> = (0..(20usize << 20))
            .map(|i| ((i / 3) % 251) as u8 ^ (i >> 16) as u8)
            .collect();
        // The sparse data file: header, then the data at its logical offset.
        let mut file = vec![0u8; HT_SPACE];
        file.extend_from_slice(&data);
        let base = HT_SPACE as u64 / SECTOR;
        let total = data.len() as u64 / SECTOR;
        let mut entries = Vec::new();
        let mut off = 0;
        while off < total {
            let n = (total - off).min(MAX_LENGTH as u64);
            entries.push(Mapping::new(off, n as u32, off + base));
            off += n;
        }
        // Pieces are copied COPY_SECTORS at a time from each entry's start.
        let cuts = entries
            .iter()
            .flat_map(|m| (m.offset..m.offset + m.length as u64).step_by(COPY_SECTORS as usize))
            .filter(|&s| s % (BS as u64 / SECTOR) != 0)
            .count();
        assert!(cuts > 0);
        struct Blocks {
            stored: Vec<Vec<u8>>,
        }
        impl StoredSource for Blocks {
            fn stored_format(&self) -> (Algorithm, bool) {
                (Algorithm::Lz4, true)
            }
            fn stored_blocks(
                &self,
                offset: u64,
                max: u64,
                out: &mut Vec<u8>,
                lens: &mut Vec<u32>,
            ) -> Result<u64> {
                let first = (offset as usize - HT_SPACE) / BS;
                // a few at a time, as a store hands out its runs
                let n = (max as usize).min(37).min(self.stored.len() - first);
                for b in &self.stored[first..first + n] {
                    out.extend_from_slice(b);
                    lens.push(b.len() as u32);
                }
                Ok(n as u64)
            }
        }
        let mut codec = Codec::new(Algorithm::Lz4, true).unwrap();
        let stored = Blocks {
            stored: data
                .chunks(BS)
                .map(|c| {
                    let mut v = Vec::new();
                    codec.compress_block(c, &mut v).unwrap();
                    v
                })
                .collect(),
        };
        let info = SealInfo {
            virtual_size: 1 << 30,
            ..Default::default()
        };
        let opts = ZfileOptions {
            threads: 2,
            ..Default::default()
        };
        let read_bytes = std::cell::Cell::new(0usize);
        let mut read = |buf: &mut [u8], moff: u64| -> Result<()> {
            let a = (moff * SECTOR) as usize;
            buf.copy_from_slice(&file[a..a + buf.len()]);
            read_bytes.set(read_bytes.get() + buf.len());
            Ok(())
        };
        let mut plain = ZFileWriter::new(VecSink::default(), opts.clone()).unwrap();
        compact(&entries, &info, &mut read, &mut plain).unwrap();
        let plain = plain.finish().unwrap().0;
        read_bytes.set(0);
        let mut copied = ZFileWriter::new(VecSink::default(), opts).unwrap();
        compact_stored(&entries, &info, &mut read, &stored, &mut copied).unwrap();
        let copied = copied.finish().unwrap().0;
        assert_eq!(read_bytes.get(), cuts * BS, "only the cut blocks are read");
        assert!(plain == copied, "the blob differs");
    }
}
