//! In-memory LSMT indexes.
//!
//! [`IndexMap`] is the writable level-0 index: inserting a mapping replaces
//! whatever it overlaps (newest wins), splitting older entries. [`RoIndex`]
//! is an immutable sorted array used for sealed layers and for the merged
//! index of a whole stack of lower layers.

use std::collections::BTreeMap;

use super::format::Mapping;

/// A piece of a lookup result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` sectors with no mapping (read as zeros, or from a lower index).
    Hole { offset: u64, len: u64 },
    /// A mapping clipped to the looked-up range.
    Mapped(Mapping),
}

/// Writable index keyed by logical offset; entries never overlap.
#[derive(Debug, Default, Clone)]
pub struct IndexMap {
    map: BTreeMap<u64, Mapping>,
}

impl IndexMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Insert `m`, replacing the parts of older entries it overlaps.
    pub fn insert(&mut self, m: Mapping) {
        if m.length == 0 {
            return;
        }
        let (start, end) = (m.offset, m.end());
        // An entry starting before `start` may reach into the range.
        if let Some((&k, prev)) = self.map.range(..start).next_back() {
            if prev.end() > start {
                let mut head = *prev;
                if prev.end() > end {
                    let mut tail = *prev;
                    tail.advance_to(end);
                    self.map.insert(end, tail);
                }
                head.truncate_to(start);
                self.map.insert(k, head);
            }
        }
        // Entries starting inside the range are removed; the last may leave a tail.
        let inside: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            let old = self.map.remove(&k).expect("key just listed");
            if old.end() > end {
                let mut tail = old;
                tail.advance_to(end);
                self.map.insert(end, tail);
            }
        }
        self.map.insert(start, m);
    }

    /// Entries overlapping `[offset, offset+len)` (sectors), clipped to it.
    pub fn lookup(&self, offset: u64, len: u64) -> Vec<Mapping> {
        let end = offset + len;
        let mut out = Vec::new();
        if let Some((_, prev)) = self.map.range(..offset).next_back() {
            if prev.end() > offset {
                let mut m = *prev;
                m.advance_to(offset);
                if m.end() > end {
                    m.truncate_to(end);
                }
                out.push(m);
            }
        }
        for (_, m) in self.map.range(offset..end) {
            let mut m = *m;
            if m.end() > end {
                m.truncate_to(end);
            }
            out.push(m);
        }
        out
    }

    /// All entries in logical order.
    pub fn entries(&self) -> impl Iterator<Item = &Mapping> {
        self.map.values()
    }

    /// All entries as a vector.
    pub fn to_vec(&self) -> Vec<Mapping> {
        self.map.values().copied().collect()
    }

    /// Number of mapped, non-zeroed sectors.
    pub fn data_sectors(&self) -> u64 {
        self.map
            .values()
            .filter(|m| !m.zeroed)
            .map(|m| m.length as u64)
            .sum()
    }
}

/// An immutable index: sorted, non-overlapping entries.
#[derive(Debug, Default, Clone)]
pub struct RoIndex {
    entries: Vec<Mapping>,
}

impl RoIndex {
    /// Build from entries that are already sorted and non-overlapping.
    pub fn from_sorted(entries: Vec<Mapping>) -> Self {
        debug_assert!(entries.windows(2).all(|w| w[0].end() <= w[1].offset));
        RoIndex { entries }
    }

    /// Merge layer indexes, `layers[0]` being the bottom. Every entry's tag
    /// becomes the index of the layer it came from; upper layers win.
    pub fn merge(layers: &[&[Mapping]]) -> Self {
        if layers.len() == 1 {
            let entries = layers[0].iter().map(|m| Mapping { tag: 0, ..*m }).collect();
            return RoIndex { entries };
        }
        let mut map = IndexMap::new();
        for (i, layer) in layers.iter().enumerate() {
            for m in layer.iter() {
                map.insert(Mapping { tag: i as u8, ..*m });
            }
        }
        RoIndex {
            entries: map.to_vec(),
        }
    }

    pub fn entries(&self) -> &[Mapping] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries overlapping `[offset, offset+len)`, clipped to it.
    pub fn lookup(&self, offset: u64, len: u64) -> Vec<Mapping> {
        let end = offset + len;
        let first = self.entries.partition_point(|m| m.end() <= offset);
        let mut out = Vec::new();
        for m in &self.entries[first..] {
            if m.offset >= end {
                break;
            }
            let mut m = *m;
            if m.offset < offset {
                m.advance_to(offset);
            }
            if m.end() > end {
                m.truncate_to(end);
            }
            out.push(m);
        }
        out
    }
}

/// Split `[offset, offset+len)` into holes and the given clipped mappings
/// (which must be sorted and inside the range).
pub fn pieces(offset: u64, len: u64, mappings: &[Mapping]) -> Vec<Piece> {
    let mut out = Vec::with_capacity(mappings.len() * 2 + 1);
    let mut pos = offset;
    for m in mappings {
        if m.offset > pos {
            out.push(Piece::Hole {
                offset: pos,
                len: m.offset - pos,
            });
        }
        out.push(Piece::Mapped(*m));
        pos = m.end();
    }
    let end = offset + len;
    if pos < end {
        out.push(Piece::Hole {
            offset: pos,
            len: end - pos,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Model: one owner per sector.
    fn model_apply(model: &mut [Option<(u64, bool)>], m: &Mapping) {
        for s in m.offset..m.end() {
            let mo = if m.zeroed {
                m.moffset
            } else {
                m.moffset + (s - m.offset)
            };
            model[s as usize] = Some((mo, m.zeroed));
        }
    }

    fn index_owner(idx: &IndexMap, s: u64) -> Option<(u64, bool)> {
        let v = idx.lookup(s, 1);
        v.first().map(|m| (m.moffset, m.zeroed))
    }

    proptest! {
        #[test]
        fn insert_matches_sector_model(ops in prop::collection::vec((0u64..200, 1u32..40, 0u64..10_000, any::<bool>()), 1..60)) {
            let mut idx = IndexMap::new();
            let mut model = vec![None; 260];
            for (off, len, mo, z) in ops {
                let m = Mapping { offset: off, length: len, moffset: mo, zeroed: z, tag: 0 };
                idx.insert(m);
                model_apply(&mut model, &m);
            }
            let v = idx.to_vec();
            for w in v.windows(2) {
                prop_assert!(w[0].end() <= w[1].offset);
            }
            for s in 0..260u64 {
                prop_assert_eq!(index_owner(&idx, s), model[s as usize]);
            }
            let ro = RoIndex::from_sorted(v);
            for s in 0..260u64 {
                let got = ro.lookup(s, 1).first().map(|m| (m.moffset, m.zeroed));
                prop_assert_eq!(got, model[s as usize]);
            }
        }
    }

    #[test]
    fn merge_upper_wins() {
        let bottom = [Mapping::new(0, 100, 8)];
        let top = [Mapping::new(10, 10, 500), Mapping::zeroed(50, 5, 0)];
        let r = RoIndex::merge(&[&bottom, &top]);
        let v = r.lookup(0, 100);
        assert_eq!(v.len(), 5);
        assert_eq!((v[0].offset, v[0].length, v[0].tag), (0, 10, 0));
        assert_eq!((v[1].offset, v[1].moffset, v[1].tag), (10, 500, 1));
        assert_eq!((v[2].offset, v[2].moffset, v[2].tag), (20, 28, 0));
        assert!(v[3].zeroed && v[3].tag == 1);
        assert_eq!((v[4].offset, v[4].moffset), (55, 63));
        let p = pieces(0, 200, &v);
        assert_eq!(
            p.last(),
            Some(&Piece::Hole {
                offset: 100,
                len: 100
            })
        );
    }
}
