//! LSMT on-disk structures.
//!
//! A sealed layer blob is `header (4096 B) | data | index | trailer (4096 B)`.
//! A writable layer is a pair of files: a data file (`header | data...`) and
//! an index file (`header | 16-byte entries...`); the sparse variant keeps
//! data at `4096 + logical offset` in a sparse data file and has no index
//! file content (the index is rebuilt from the file's holes).
//!
//! Header/trailer (little endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic0 `"LSMT\0\1\2\0"` |
//! | 8 | 16 | magic1 `65 7E 63 D2 94 44 08 4C A2 D2 C8 EC 4F CF AE 8A` |
//! | 24 | 4 | size of the struct (390) |
//! | 28 | 4 | flags: bit0 header, bit1 data file, bit2 sealed, bit3 gc, bit4 sparse rw, bit5 info valid |
//! | 32 | 8 | index offset (bytes) |
//! | 40 | 8 | index size (entries) |
//! | 48 | 8 | virtual size (bytes) |
//! | 56 | 37 | uuid string |
//! | 93 | 37 | parent uuid string |
//! | 130 | 2 | reserved (deprecated from/to) |
//! | 132 | 1 | version (1) |
//! | 133 | 1 | sub version (1) |
//! | 134 | 256 | user tag |
//!
//! Index entry (128 bits, two little-endian u64 words):
//! word0 = offset:50 | length:14 (both in 512-byte sectors);
//! word1 = moffset:55 | zeroed:1 | tag:8. The index of a sealed blob is
//! padded to a multiple of 4 KiB with entries of offset 2^50-1, length 0.

use crate::uuid::{Uuid, UUID_STRING_LEN};

/// Size of a header or trailer.
pub const HT_SPACE: usize = 4096;
/// Sector size: every offset and length in an index is in these units.
pub const SECTOR: u64 = 512;
/// Size of one index entry.
pub const ENTRY_SIZE: usize = 16;
/// Value of the `size` field.
pub const HT_STRUCT_SIZE: u32 = 390;
/// Largest length of a single mapping, in sectors.
pub const MAX_LENGTH: u32 = (1 << 14) - 1;
/// Largest logical offset, in sectors; also the offset of padding entries.
pub const MAX_OFFSET: u64 = (1 << 50) - 1;
/// Largest mapped offset, in sectors.
pub const MAX_MOFFSET: u64 = (1 << 55) - 1;

/// `n` sectors in bytes, for messages: as a `u128`, so that no offset read
/// from an index (up to 2^55 sectors) overflows.
pub fn sector_bytes(n: u64) -> u128 {
    u128::from(n) * u128::from(SECTOR)
}
/// Upstream refuses sealed indexes larger than this many entries.
pub const MAX_RO_INDEX_ENTRIES: u64 = 1_000_000;
/// Upstream refuses writable indexes larger than this many entries.
pub const MAX_RW_INDEX_ENTRIES: u64 = 128_000_000;

pub const MAGIC0: [u8; 8] = *b"LSMT\0\x01\x02\0";
pub const MAGIC1: [u8; 16] = [
    0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C, 0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF, 0xAE, 0x8A,
];

pub const FLAG_HEADER: u32 = 1 << 0;
pub const FLAG_DATA: u32 = 1 << 1;
pub const FLAG_SEALED: u32 = 1 << 2;
pub const FLAG_GC: u32 = 1 << 3;
pub const FLAG_SPARSE_RW: u32 = 1 << 4;

/// A decoded LSMT header or trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTrailer {
    pub flags: u32,
    pub index_offset: u64,
    pub index_size: u64,
    pub virtual_size: u64,
    pub uuid: Uuid,
    pub parent_uuid: Uuid,
    pub version: u8,
    pub sub_version: u8,
    pub user_tag: Vec<u8>,
}

impl Default for HeaderTrailer {
    fn default() -> Self {
        HeaderTrailer {
            flags: 0,
            index_offset: 0,
            index_size: 0,
            virtual_size: 0,
            uuid: Uuid::NIL,
            parent_uuid: Uuid::NIL,
            version: 1,
            sub_version: 1,
            user_tag: Vec::new(),
        }
    }
}

impl HeaderTrailer {
    pub fn is_header(&self) -> bool {
        self.flags & FLAG_HEADER != 0
    }
    pub fn is_data_file(&self) -> bool {
        self.flags & FLAG_DATA != 0
    }
    pub fn is_sealed(&self) -> bool {
        self.flags & FLAG_SEALED != 0
    }
    pub fn is_sparse_rw(&self) -> bool {
        self.flags & FLAG_SPARSE_RW != 0
    }

    /// Whether `buf` starts with the LSMT magic.
    pub fn has_magic(buf: &[u8]) -> bool {
        buf.len() >= 24 && buf[..8] == MAGIC0 && buf[8..24] == MAGIC1
    }

    /// Decode a 4096-byte block; `None` if the magic does not match.
    pub fn decode(buf: &[u8]) -> Option<HeaderTrailer> {
        if buf.len() < HT_SPACE || !Self::has_magic(buf) {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
        let tag = &buf[134..390];
        let tag_len = tag.iter().position(|&c| c == 0).unwrap_or(tag.len());
        Some(HeaderTrailer {
            flags: u32_at(28),
            index_offset: u64_at(32),
            index_size: u64_at(40),
            virtual_size: u64_at(48),
            uuid: Uuid::from_field(&buf[56..56 + UUID_STRING_LEN]).unwrap_or(Uuid::NIL),
            parent_uuid: Uuid::from_field(&buf[93..93 + UUID_STRING_LEN]).unwrap_or(Uuid::NIL),
            version: buf[132],
            sub_version: buf[133],
            user_tag: tag[..tag_len].to_vec(),
        })
    }

    /// Encode as the 4096-byte on-disk block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HT_SPACE];
        b[..8].copy_from_slice(&MAGIC0);
        b[8..24].copy_from_slice(&MAGIC1);
        b[24..28].copy_from_slice(&HT_STRUCT_SIZE.to_le_bytes());
        b[28..32].copy_from_slice(&self.flags.to_le_bytes());
        b[32..40].copy_from_slice(&self.index_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[56..93].copy_from_slice(&self.uuid.to_field());
        b[93..130].copy_from_slice(&self.parent_uuid.to_field());
        b[132] = self.version;
        b[133] = self.sub_version;
        let n = self.user_tag.len().min(256);
        b[134..134 + n].copy_from_slice(&self.user_tag[..n]);
        b
    }
}

/// One index entry: `length` sectors at logical `offset` live at `moffset`
/// in the layer's data (or read as zeros when `zeroed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mapping {
    pub offset: u64,
    pub length: u32,
    pub moffset: u64,
    pub zeroed: bool,
    pub tag: u8,
}

impl Mapping {
    pub fn new(offset: u64, length: u32, moffset: u64) -> Mapping {
        Mapping {
            offset,
            length,
            moffset,
            zeroed: false,
            tag: 0,
        }
    }

    pub fn zeroed(offset: u64, length: u32, moffset: u64) -> Mapping {
        Mapping {
            offset,
            length,
            moffset,
            zeroed: true,
            tag: 0,
        }
    }

    /// Logical end (exclusive), in sectors.
    pub fn end(&self) -> u64 {
        self.offset + self.length as u64
    }

    /// Mapped end: `moffset` for zeroed mappings, `moffset + length` otherwise.
    pub fn mend(&self) -> u64 {
        if self.zeroed {
            self.moffset
        } else {
            self.moffset + self.length as u64
        }
    }

    /// The padding entry used to fill an index to 4 KiB.
    pub fn padding() -> Mapping {
        Mapping::new(MAX_OFFSET, 0, 0)
    }

    pub fn is_padding(&self) -> bool {
        self.offset == MAX_OFFSET
    }

    /// Drop the first `x - offset` sectors (x within the mapping).
    pub fn advance_to(&mut self, x: u64) {
        debug_assert!(x >= self.offset && x <= self.end());
        let d = x - self.offset;
        self.offset = x;
        self.length -= d as u32;
        if !self.zeroed {
            self.moffset += d;
        }
    }

    /// Cut the mapping to end at `x` (x within the mapping).
    pub fn truncate_to(&mut self, x: u64) {
        debug_assert!(x >= self.offset && x <= self.end());
        self.length = (x - self.offset) as u32;
    }

    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        let w0 = (self.offset & MAX_OFFSET) | ((self.length as u64 & 0x3FFF) << 50);
        let w1 =
            (self.moffset & MAX_MOFFSET) | ((self.zeroed as u64) << 55) | ((self.tag as u64) << 56);
        let mut b = [0u8; ENTRY_SIZE];
        b[..8].copy_from_slice(&w0.to_le_bytes());
        b[8..].copy_from_slice(&w1.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Mapping {
        let w0 = u64::from_le_bytes(b[..8].try_into().unwrap());
        let w1 = u64::from_le_bytes(b[8..16].try_into().unwrap());
        Mapping {
            offset: w0 & MAX_OFFSET,
            length: (w0 >> 50) as u32,
            moffset: w1 & MAX_MOFFSET,
            zeroed: (w1 >> 55) & 1 == 1,
            tag: (w1 >> 56) as u8,
        }
    }
}

/// Encode entries back to back.
pub fn encode_entries(entries: &[Mapping]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_SIZE);
    for e in entries {
        out.extend_from_slice(&e.encode());
    }
    out
}

/// Decode entries back to back (trailing partial entry ignored).
pub fn decode_entries(buf: &[u8]) -> Vec<Mapping> {
    buf.chunks_exact(ENTRY_SIZE).map(Mapping::decode).collect()
}

/// Merge adjacent entries the way upstream's `compress_raw_index` does:
/// contiguous in both logical and mapped space, same zeroed flag and tag,
/// and a combined length strictly below [`MAX_LENGTH`].
pub fn compress_entries(entries: &mut Vec<Mapping>) {
    if entries.len() < 2 {
        return;
    }
    let mut i = 0;
    for j in 1..entries.len() {
        let (a, b) = (entries[i], entries[j]);
        if a.end() == b.offset
            && a.mend() == b.moffset
            && a.zeroed == b.zeroed
            && a.tag == b.tag
            && (a.length as u64 + b.length as u64) < MAX_LENGTH as u64
        {
            entries[i].length += b.length;
        } else {
            i += 1;
            entries[i] = b;
        }
    }
    entries.truncate(i + 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_roundtrip_bits() {
        let m = Mapping {
            offset: MAX_OFFSET - 1,
            length: MAX_LENGTH,
            moffset: MAX_MOFFSET,
            zeroed: true,
            tag: 0xAB,
        };
        assert_eq!(Mapping::decode(&m.encode()), m);
        let p = Mapping::padding();
        let e = p.encode();
        assert_eq!(&e[..8], &((1u64 << 50) - 1).to_le_bytes());
        assert_eq!(&e[8..], &[0u8; 8]);
    }

    #[test]
    fn header_roundtrip() {
        let h = HeaderTrailer {
            flags: FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
            index_offset: 8192,
            index_size: 256,
            virtual_size: 64 << 30,
            uuid: Uuid::parse("6d5b0bd2-0000-4000-8000-000000000001").unwrap(),
            parent_uuid: Uuid::NIL,
            version: 1,
            sub_version: 1,
            user_tag: b"hello".to_vec(),
        };
        let b = h.encode();
        assert_eq!(b.len(), HT_SPACE);
        assert_eq!(HeaderTrailer::decode(&b), Some(h));
        let mut bad = b.clone();
        bad[3] ^= 1;
        assert_eq!(HeaderTrailer::decode(&bad), None);
    }

    #[test]
    fn compress_merges_like_upstream() {
        let mut v = vec![
            Mapping::new(0, 64, 8),
            Mapping::new(64, 8, 72),
            Mapping::new(80, 8, 80), // logical gap: not merged
            Mapping::zeroed(88, 8, 88),
            Mapping::zeroed(96, 8, 88),
        ];
        compress_entries(&mut v);
        assert_eq!(
            v,
            vec![
                Mapping::new(0, 72, 8),
                Mapping::new(80, 8, 80),
                Mapping::zeroed(88, 16, 88)
            ]
        );
        // never reaches MAX_LENGTH
        let mut w: Vec<Mapping> = (0..300).map(|i| Mapping::new(i * 64, 64, i * 64)).collect();
        compress_entries(&mut w);
        assert!(w.iter().all(|m| m.length < MAX_LENGTH));
        assert_eq!(w[0].length, 255 * 64);
    }
}
