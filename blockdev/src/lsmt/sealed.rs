//! Sealed (read-only) LSMT layers: `header | data | index | trailer`.

use std::sync::Arc;

use super::format::*;
use super::index::RoIndex;
use crate::error::{Error, Result};
use crate::source::ReadAt;

/// An opened, validated sealed layer.
pub struct SealedLayer {
    src: Arc<dyn ReadAt>,
    header: HeaderTrailer,
    trailer: HeaderTrailer,
    index: RoIndex,
}

impl std::fmt::Debug for SealedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedLayer")
            .field("path", &self.src.path())
            .field("trailer", &self.trailer)
            .field("entries", &self.index.len())
            .finish()
    }
}

impl SealedLayer {
    /// Open the LSMT blob presented by `src` (already unwrapped from tar/ZFile).
    /// Every entry's tag is forced to 0, as upstream loads ordinary layers.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<SealedLayer> {
        Self::open_inner(src, false)
    }

    /// Open a sealed warp (TurboOCI) layer: tags are kept, shifted so the
    /// smallest is 0 (upstream's `open_warpfile_ro`); tag-1 entries point
    /// into the layer's target, so only tag-0 entries are checked against
    /// the data area here ([`crate::warp`] checks the others).
    pub fn open_warp(src: Arc<dyn ReadAt>) -> Result<SealedLayer> {
        Self::open_inner(src, true)
    }

    fn open_inner(src: Arc<dyn ReadAt>, keep_tags: bool) -> Result<SealedLayer> {
        let path = src.path().to_path_buf();
        let bad = |msg: String| Error::corrupt(&path, "LSMT", msg);
        let size = src.size();
        if size < 2 * HT_SPACE as u64 {
            return Err(bad(format!(
                "blob is {size} bytes, too small for a header and a trailer"
            )));
        }
        let mut buf = vec![0u8; HT_SPACE];
        src.read_exact_at(&mut buf, 0)?;
        let header = HeaderTrailer::decode(&buf).ok_or_else(|| bad("bad header magic".into()))?;
        if !header.is_header() {
            return Err(bad("first block is not marked as a header".into()));
        }
        let trailer_offset = size - HT_SPACE as u64;
        src.read_exact_at(&mut buf, trailer_offset)?;
        let trailer = HeaderTrailer::decode(&buf).ok_or_else(|| {
            bad(
                "bad trailer magic (not a sealed layer: writable layers need their index file)"
                    .into(),
            )
        })?;
        if trailer.is_header() || !trailer.is_data_file() || !trailer.is_sealed() {
            return Err(bad(format!(
                "trailer flags {:#x} are not those of a sealed data trailer",
                trailer.flags
            )));
        }
        // 0 is allowed: upper layers may leave the size to the layers below.
        let vsize = trailer.virtual_size;
        if vsize % SECTOR != 0 || vsize / SECTOR > MAX_OFFSET + 1 {
            return Err(bad(format!(
                "virtual size {vsize} is not a multiple of 512 up to {} bytes",
                (MAX_OFFSET + 1) * SECTOR
            )));
        }
        if trailer.index_size > MAX_RO_INDEX_ENTRIES {
            return Err(bad(format!(
                "index of {} entries exceeds the maximum {MAX_RO_INDEX_ENTRIES}",
                trailer.index_size
            )));
        }
        let index_bytes = trailer.index_size * ENTRY_SIZE as u64;
        if trailer.index_offset < HT_SPACE as u64
            || trailer.index_offset > trailer_offset
            || index_bytes > trailer_offset - trailer.index_offset
        {
            return Err(bad(format!(
                "index at {} (+{index_bytes} bytes) does not fit between header and trailer (blob size {size})",
                trailer.index_offset
            )));
        }
        let mut raw = vec![0u8; index_bytes as usize];
        src.read_exact_at(&mut raw, trailer.index_offset)?;
        let data_begin = HT_SPACE as u64 / SECTOR;
        let data_end = trailer.index_offset / SECTOR;
        let mut entries = Vec::with_capacity(trailer.index_size as usize);
        let decoded: Vec<(usize, Mapping)> = decode_entries(&raw)
            .into_iter()
            .enumerate()
            .filter(|(_, m)| !m.is_padding())
            .collect();
        let min_tag = decoded.iter().map(|(_, m)| m.tag).min().unwrap_or(0);
        for (i, mut m) in decoded {
            check_within_vsize(&m, i, vsize).map_err(bad)?;
            m.tag = if keep_tags { m.tag - min_tag } else { 0 };
            if m.tag > 1 {
                return Err(bad(format!(
                    "index entry {i} has tag {}; warp layers use 0 and 1",
                    m.tag + min_tag
                )));
            }
            if m.tag == 0 {
                check_entry(&m, i, data_begin, data_end, entries.last()).map_err(bad)?;
            } else {
                check_entry(&m, i, 0, MAX_MOFFSET, entries.last()).map_err(bad)?;
            }
            entries.push(m);
        }
        Ok(SealedLayer {
            src,
            header,
            trailer,
            index: RoIndex::from_sorted(entries),
        })
    }

    pub fn header(&self) -> &HeaderTrailer {
        &self.header
    }

    /// The trailer: authoritative uuid, parent uuid, virtual size, index location.
    pub fn info(&self) -> &HeaderTrailer {
        &self.trailer
    }

    pub fn index(&self) -> &RoIndex {
        &self.index
    }

    pub fn source(&self) -> &Arc<dyn ReadAt> {
        &self.src
    }

    /// Read mapped data: `buf.len()` bytes at sector `moffset`.
    pub fn read_mapped(&self, buf: &mut [u8], moffset: u64) -> Result<()> {
        self.src.read_exact_at(buf, moffset * SECTOR)
    }

    /// Several [`SealedLayer::read_mapped`] at once `(moffset, buf)`.
    pub fn read_mapped_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        for r in reqs.iter_mut() {
            r.0 *= SECTOR;
        }
        self.src.read_many_exact(reqs)
    }
}

/// Check that entry `i` lies within the virtual size `vsize` (bytes; 0: the
/// layer leaves its size to the layers below, so nothing to check). Data
/// mapped beyond the disk would be silently unreachable, or claim a disk
/// smaller than the filesystem it holds.
pub(crate) fn check_within_vsize(
    m: &Mapping,
    i: usize,
    vsize: u64,
) -> std::result::Result<(), String> {
    if vsize != 0 && m.end() > vsize / SECTOR {
        return Err(format!(
            "index entry {i} maps bytes {}..{} beyond the virtual size of {vsize} bytes",
            m.offset * SECTOR,
            m.end() * SECTOR
        ));
    }
    Ok(())
}

/// The message for an entry that ends past [`MAX_OFFSET`] (in bytes).
pub(crate) fn past_largest_offset(m: &Mapping, i: usize) -> String {
    format!(
        "index entry {i} ends at device byte {}, past the largest offset ({} bytes)",
        sector_bytes(m.end()),
        sector_bytes(MAX_OFFSET)
    )
}

/// Validate one decoded index entry against the data area and its predecessor.
pub(crate) fn check_entry(
    m: &Mapping,
    i: usize,
    data_begin: u64,
    data_end: u64,
    prev: Option<&Mapping>,
) -> std::result::Result<(), String> {
    if m.length == 0 {
        return Err(format!("index entry {i} has length 0"));
    }
    if m.end() > MAX_OFFSET {
        return Err(past_largest_offset(m, i));
    }
    if !m.zeroed && (m.moffset < data_begin || m.mend() > data_end) {
        return Err(format!(
            "index entry {i} maps layer bytes {}..{} outside the data area (bytes {}..{})",
            sector_bytes(m.moffset),
            sector_bytes(m.mend()),
            sector_bytes(data_begin),
            sector_bytes(data_end)
        ));
    }
    if let Some(p) = prev {
        if p.end() > m.offset {
            return Err(format!(
                "index entry {i} (device bytes {}..{}) overlaps or is out of order with the previous one (which ends at byte {})",
                sector_bytes(m.offset),
                sector_bytes(m.end()),
                sector_bytes(p.end())
            ));
        }
    }
    Ok(())
}
