//! A bounded cache of what filesystem mode has read about inodes.
//!
//! Everything a [`crate::tree::FileTree`] caches can be read again from the
//! image at any time, so entries may be dropped whenever the budget is
//! exceeded (CLOCK: a "recently used" bit per entry, and a hand that sweeps
//! the insertion ring, giving used entries a second chance) and when the
//! kernel forgets an inode. Lookups take a shared lock only; inserts and
//! evictions take the exclusive one.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::tree::Xattrs;

/// Default metadata budget of a filesystem-mode mount.
pub const DEFAULT_BUDGET: usize = 64 << 20;
/// Weight of a cached inode (attributes and bookkeeping).
pub const NODE_WEIGHT: usize = 256;
/// Weight of the mark of a damaged inode.
pub const DAMAGED_WEIGHT: usize = 64;
/// Weight of a directory entry besides its name.
pub const DIRENT_WEIGHT: usize = 64;

/// Which piece of an inode a cache entry holds (the key is `(ino, Part)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// Attributes.
    Node,
    /// Directory entries.
    Dir,
    /// Where the file data lives.
    Data,
    /// A symlink target.
    Link,
    /// Extended attributes.
    Xattrs,
    /// The mark of a damaged inode. The kernel's forget does not drop it
    /// (it is not in [`Part::ALL`]): the kernel forgets the placeholder a
    /// listing gave it at each failed lookup, and the damage would be read
    /// (and logged) again each time.
    Damaged,
}

impl Part {
    /// Every part the kernel's forget drops.
    pub const ALL: [Part; 5] = [Part::Node, Part::Dir, Part::Data, Part::Link, Part::Xattrs];
}

/// The weight of a list of extended attributes.
pub fn xattrs_weight(x: &Xattrs) -> usize {
    64 + x.iter().map(|(k, v)| 48 + k.len() + v.len()).sum::<usize>()
}

struct Slot<V> {
    value: V,
    weight: usize,
    used: AtomicBool,
    generation: u64,
}

struct Inner<K, V> {
    map: HashMap<K, Slot<V>>,
    /// Keys in insertion order, each with the generation of its slot; an
    /// entry whose slot is gone or newer is skipped (and compacted away).
    ring: VecDeque<(K, u64)>,
    weight: usize,
    generation: u64,
}

/// Counters of a [`Cache`], for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries now.
    pub entries: u64,
    /// Weight now.
    pub weight: u64,
    /// Highest weight held after an insert (above the budget only when one
    /// entry alone is heavier).
    pub peak_weight: u64,
    /// Entries dropped to stay within the budget.
    pub evicted: u64,
    /// Entries dropped because the kernel forgot their inode.
    pub forgotten: u64,
    /// The budget.
    pub limit: u64,
}

/// A map with a total weight budget (bytes, roughly).
pub struct Cache<K, V> {
    inner: RwLock<Inner<K, V>>,
    limit: usize,
    peak: AtomicU64,
    evicted: AtomicU64,
    forgotten: AtomicU64,
}

impl<K: Hash + Eq + Copy, V: Clone> Cache<K, V> {
    /// An empty cache holding at most `limit` weight (at least one entry is
    /// always kept, however heavy).
    pub fn new(limit: usize) -> Self {
        Cache {
            inner: RwLock::new(Inner {
                map: HashMap::new(),
                ring: VecDeque::new(),
                weight: 0,
                generation: 0,
            }),
            limit,
            peak: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            forgotten: AtomicU64::new(0),
        }
    }

    /// The cached value of `key`, marking it used.
    pub fn get(&self, key: &K) -> Option<V> {
        let g = self.inner.read();
        let s = g.map.get(key)?;
        s.used.store(true, Ordering::Relaxed);
        Some(s.value.clone())
    }

    /// Cache `value` for `key` unless another thread was first; returns the
    /// value that is cached now. May evict other entries.
    pub fn insert(&self, key: K, value: V, weight: usize) -> V {
        let mut g = self.inner.write();
        if let Some(s) = g.map.get(&key) {
            s.used.store(true, Ordering::Relaxed);
            return s.value.clone();
        }
        g.generation += 1;
        let generation = g.generation;
        g.map.insert(
            key,
            Slot {
                value: value.clone(),
                weight,
                used: AtomicBool::new(false),
                generation,
            },
        );
        g.ring.push_back((key, generation));
        g.weight += weight;
        self.shrink(&mut g, &key);
        self.peak.fetch_max(g.weight as u64, Ordering::Relaxed);
        if g.ring.len() > 2 * g.map.len() + 64 {
            let Inner { map, ring, .. } = &mut *g;
            ring.retain(|(k, gen)| map.get(k).is_some_and(|s| s.generation == *gen));
        }
        value
    }

    /// Sweep until the weight fits the budget, never evicting `keep`.
    fn shrink(&self, g: &mut Inner<K, V>, keep: &K) {
        // Each live entry is passed at most twice (once to clear its bit).
        let mut budget = 2 * g.ring.len() + 1;
        while g.weight > self.limit && budget > 0 {
            budget -= 1;
            let Some((k, gen)) = g.ring.pop_front() else {
                break;
            };
            let verdict = match g.map.get(&k) {
                Some(s) if s.generation == gen => {
                    if &k == keep || s.used.swap(false, Ordering::Relaxed) {
                        Some(false)
                    } else {
                        Some(true)
                    }
                }
                _ => None,
            };
            match verdict {
                None => {}
                Some(false) => g.ring.push_back((k, gen)),
                Some(true) => {
                    let s = g.map.remove(&k).expect("checked above");
                    g.weight -= s.weight;
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Drop `key` (the kernel forgot the inode).
    pub fn remove(&self, key: &K) {
        let mut g = self.inner.write();
        if let Some(s) = g.map.remove(key) {
            g.weight -= s.weight;
            self.forgotten.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drop every key `keys` yields, under one lock.
    pub fn remove_all(&self, keys: impl IntoIterator<Item = K>) {
        let mut g = self.inner.write();
        for k in keys {
            if let Some(s) = g.map.remove(&k) {
                g.weight -= s.weight;
                self.forgotten.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        let g = self.inner.read();
        CacheStats {
            entries: g.map.len() as u64,
            weight: g.weight as u64,
            peak_weight: self.peak.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            forgotten: self.forgotten.load(Ordering::Relaxed),
            limit: self.limit as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_the_budget_and_keeps_used_entries() {
        let c: Cache<u64, u64> = Cache::new(100);
        for k in 0..10 {
            c.insert(k, k * 10, 10);
        }
        assert_eq!(c.stats().weight, 100);
        // Entry 0 is used, so the next insert passes it over.
        assert_eq!(c.get(&0), Some(0));
        c.insert(10, 100, 10);
        assert_eq!(c.get(&0), Some(0));
        assert_eq!(c.get(&1), None);
        for k in 11..1000 {
            c.insert(k, k, 10);
            assert!(c.stats().weight <= 100);
        }
        let s = c.stats();
        assert_eq!(s.entries, 10);
        assert_eq!(s.peak_weight, 100);
        assert_eq!(s.evicted, 990);
        assert_eq!(c.get(&999), Some(999));
    }

    #[test]
    fn an_entry_heavier_than_the_budget_is_kept_alone() {
        let c: Cache<u64, u64> = Cache::new(100);
        c.insert(1, 1, 10);
        c.insert(2, 2, 500);
        assert_eq!(c.get(&2), Some(2));
        assert_eq!(c.get(&1), None);
        assert_eq!(c.stats().entries, 1);
    }

    #[test]
    fn first_insert_wins_and_remove_forgets() {
        let c: Cache<u64, &str> = Cache::new(1000);
        assert_eq!(c.insert(7, "a", 1), "a");
        assert_eq!(c.insert(7, "b", 1), "a");
        c.remove(&7);
        assert_eq!(c.get(&7), None);
        assert_eq!(c.insert(7, "c", 1), "c");
        c.remove_all([7, 8]);
        let s = c.stats();
        assert_eq!((s.entries, s.weight, s.forgotten), (0, 0, 2));
        // Forget/insert cycles do not grow the ring without bound.
        for i in 0..10_000u64 {
            c.insert(i % 3, "x", 1);
            c.remove(&(i % 3));
        }
        assert!(c.inner.read().ring.len() <= 2 + 64 + 1);
    }
}
