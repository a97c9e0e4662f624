//! The memory backend's map for one key's map state: entries inline while few, a vector while
//! small, a hash map beyond.
//!
//! Most keys' maps are small, and many are written where they were last written: a window's
//! panes (the newest pane takes nearly every record, the oldest goes when its last window
//! closes), timers, a few counters. Up to [`INLINE`] entries live inside the map itself, so in
//! the key's own slot of the key group's hash table: reading a tumbling window's pane or a
//! key's timer costs one cache miss, not two, and creating one allocates nothing. Beyond that
//! a vector keeps the map in a few contiguous cache lines, finds the newest entry first
//! (searched from the end), and is read whole without a hash table's empty buckets. Past
//! [`SPILL`] entries a lookup would cost more than hashing, so the map turns into a hash map for
//! good.

use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::hash::Hash;

/// Entries kept inline: two, as a tumbling window's key holds its pane and, while the watermark
/// lags behind, the next window's.
const INLINE: usize = 2;

/// Entries at which the vector becomes a hash map: a 1-hour window sliding by the minute keeps
/// 61 panes per key, which still fit.
const SPILL: usize = 128;

/// A map that is a vector of entries up to [`SPILL`] entries, then a hash map.
#[derive(Debug)]
pub(crate) enum SmallMap<K, V> {
    /// Insertion order, newest last; searched from the end.
    Small(SmallVec<[(K, V); INLINE]>),
    /// Many entries.
    Large(FxHashMap<K, V>),
}

/// A copy keeps the vector's capacity: the copy-on-write copy of a key group after a snapshot
/// goes on growing like the original, without reallocating at its next insert.
impl<K: Clone, V: Clone> Clone for SmallMap<K, V> {
    fn clone(&self) -> Self {
        match self {
            Self::Small(v) => {
                let mut copy = SmallVec::with_capacity(v.capacity());
                copy.extend(v.iter().cloned());
                Self::Small(copy)
            }
            Self::Large(m) => Self::Large(m.clone()),
        }
    }
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self::Small(SmallVec::new())
    }
}

impl<K: Hash + Eq, V> SmallMap<K, V> {
    /// A map of one entry.
    pub fn one(k: K, v: V) -> Self {
        let mut entries = SmallVec::new();
        entries.push((k, v));
        Self::Small(entries)
    }

    fn position(entries: &[(K, V)], k: &K) -> Option<usize> {
        entries.iter().rposition(|(e, _)| e == k)
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        match self {
            Self::Small(v) => Self::position(v, k).map(|i| &v[i].1),
            Self::Large(m) => m.get(k),
        }
    }

    /// Inserts or replaces; the old value if any.
    pub fn insert(&mut self, k: K, value: V) -> Option<V> {
        match self {
            Self::Small(v) => match Self::position(v, &k) {
                Some(i) => Some(std::mem::replace(&mut v[i].1, value)),
                None => {
                    self.push(k, value);
                    None
                }
            },
            Self::Large(m) => m.insert(k, value),
        }
    }

    /// Changes the value under `k` in place, inserting `default()` first when absent; whether
    /// it was present.
    pub fn update(&mut self, k: K, default: impl FnOnce() -> V, f: impl FnOnce(&mut V)) -> bool {
        match self {
            Self::Small(v) => match Self::position(v, &k) {
                Some(i) => {
                    f(&mut v[i].1);
                    true
                }
                None => {
                    let mut value = default();
                    f(&mut value);
                    self.push(k, value);
                    false
                }
            },
            Self::Large(m) => {
                let mut existed = true;
                f(m.entry(k).or_insert_with(|| {
                    existed = false;
                    default()
                }));
                existed
            }
        }
    }

    /// Appends a new key, spilling into a hash map when the vector is full.
    fn push(&mut self, k: K, value: V) {
        if let Self::Small(v) = self {
            if v.len() < SPILL {
                v.push((k, value));
                return;
            }
            let mut m: FxHashMap<K, V> = std::mem::take(v).into_iter().collect();
            m.insert(k, value);
            *self = Self::Large(m);
        }
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        match self {
            // `remove`, not `swap_remove`: the order keeps the newest entries at the end.
            Self::Small(v) => Self::position(v, k).map(|i| v.remove(i).1),
            Self::Large(m) => m.remove(k),
        }
    }
}

impl<K, V> SmallMap<K, V> {
    pub fn len(&self) -> usize {
        match self {
            Self::Small(v) => v.len(),
            Self::Large(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, borrowed: vector order while small.
    pub fn iter(&self) -> Iter<'_, K, V> {
        match self {
            Self::Small(v) => Iter::Small(v.iter()),
            Self::Large(m) => Iter::Large(m.iter()),
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        match self {
            Self::Small(v) => v.retain(|(k, v)| keep(k, v)),
            Self::Large(m) => m.retain(|k, v| keep(k, v)),
        }
    }
}

/// The entries of a [`SmallMap`].
pub(crate) enum Iter<'a, K, V> {
    Small(std::slice::Iter<'a, (K, V)>),
    Large(std::collections::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Small(i) => i.next().map(|(k, v)| (k, v)),
            Self::Large(i) => i.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u32),
        Update(u16, u32),
        Remove(u16),
        Retain(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Keys up to 300: maps cross the spill point.
        prop_oneof![
            4 => (0..300u16, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => (0..300u16, any::<u32>()).prop_map(|(k, v)| Op::Update(k, v)),
            2 => (0..300u16).prop_map(Op::Remove),
            1 => (1..7u16).prop_map(Op::Retain),
        ]
    }

    proptest! {
        /// Every operation answers as a hash map does, before and after spilling.
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec(op(), 1..600)) {
            let mut small = SmallMap::default();
            let mut model: HashMap<u16, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(small.insert(k, v), model.insert(k, v)),
                    Op::Update(k, v) => {
                        let existed = small.update(k, || v, |x| *x = x.wrapping_add(1));
                        prop_assert_eq!(existed, model.contains_key(&k));
                        let e = model.entry(k).or_insert(v);
                        *e = e.wrapping_add(1);
                    }
                    Op::Remove(k) => prop_assert_eq!(small.remove(&k), model.remove(&k)),
                    Op::Retain(m) => {
                        small.retain(|k, _| k % m != 0);
                        model.retain(|k, _| k % m != 0);
                    }
                }
                prop_assert_eq!(small.len(), model.len());
                for (k, v) in &model {
                    prop_assert_eq!(small.get(k), Some(v));
                }
                let mut seen: Vec<(u16, u32)> = small.iter().map(|(k, v)| (*k, *v)).collect();
                seen.sort_unstable();
                let mut want: Vec<(u16, u32)> = model.iter().map(|(k, v)| (*k, *v)).collect();
                want.sort_unstable();
                prop_assert_eq!(seen, want);
            }
        }
    }

    #[test]
    fn spills_into_a_hash_map_past_the_limit() {
        let mut m = SmallMap::default();
        for k in 0..SPILL as u32 {
            m.insert(k, k);
        }
        assert!(matches!(m, SmallMap::Small(_)));
        m.insert(SPILL as u32, 0);
        assert!(matches!(m, SmallMap::Large(_)));
        assert_eq!(m.len(), SPILL + 1);
        assert_eq!(m.get(&7), Some(&7));
    }
}
