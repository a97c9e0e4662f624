//! The memory backend's map for one key's map state: entries inline while few, then the entry
//! inserted last inline and the others in a vector, a hash map beyond.
//!
//! Most keys' maps are small, and many are written where they were last written: a window's
//! panes (the newest pane takes nearly every record, the oldest goes when its last window
//! closes), timers, a few counters. Up to [`INLINE`] entries live inside the map itself, so in
//! the key's own slot of the key group's hash table: reading a tumbling window's pane or a
//! key's timer costs one cache miss, not two, and creating one allocates nothing. Beyond that
//! the newest entry stays inline and the older ones go to a vector: a sliding window's record
//! updates its newest pane without touching the vector (one cache miss, not two), and a firing
//! reads the vector's few contiguous cache lines without a hash table's empty buckets. Past
//! [`SPILL`] entries a lookup would cost more than hashing, so the map turns into a hash map for
//! good.
//!
//! Maps keyed by time (`i64`: a window's panes) are mostly filled in time order. While a split
//! map's keys have only ever grown, it knows they are sorted: a key above the newest is absent
//! without a search through the vector (a sliding window's new pane, once a minute per key, no
//! longer reads all its 60 panes first), and other keys are found by binary search (the pane
//! that leaves the window is the oldest, the last one a search from the end would reach).

use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::any::Any;
use std::cmp::Ordering;
use std::hash::Hash;

/// Entries kept inline: two, as a tumbling window's key holds its pane and, while the watermark
/// lags behind, the next window's.
const INLINE: usize = 2;

/// Entries at which the vector becomes a hash map: a 1-hour window sliding by the minute keeps
/// 61 panes per key, which still fit.
const SPILL: usize = 128;

/// A map that is inline up to [`INLINE`] entries, then its newest entry inline and the others
/// in a vector up to [`SPILL`] entries, then a hash map.
#[derive(Debug)]
pub(crate) enum SmallMap<K, V> {
    /// At most [`INLINE`] entries (never on the heap), in insertion order, newest last.
    Small(SmallVec<[(K, V); INLINE]>),
    /// More (or, after removals, fewer: the vector stays): the entry inserted last, and the
    /// others in insertion order, newest last. `sorted`: the keys are times that only ever
    /// grew, so they are in ascending order.
    Split {
        newest: (K, V),
        older: Vec<(K, V)>,
        sorted: bool,
    },
    /// Many entries.
    Large(FxHashMap<K, V>),
}

/// A copy keeps the vector's capacity: the copy-on-write copy of a key group after a snapshot
/// goes on growing like the original, without reallocating at its next insert.
impl<K: Clone, V: Clone> Clone for SmallMap<K, V> {
    fn clone(&self) -> Self {
        match self {
            Self::Small(v) => Self::Small(v.clone()),
            Self::Split { newest, older, sorted } => {
                let mut copy = Vec::with_capacity(older.capacity());
                copy.extend(older.iter().cloned());
                Self::Split {
                    newest: newest.clone(),
                    older: copy,
                    sorted: *sorted,
                }
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

/// The order of two keys if they are times (`i64`), the one key type whose order this map
/// uses; `None` for other types. (The type test is decided at compile time.)
fn time_order<K: 'static>(a: &K, b: &K) -> Option<Ordering> {
    let a = (a as &dyn Any).downcast_ref::<i64>()?;
    let b = (b as &dyn Any).downcast_ref::<i64>()?;
    Some(a.cmp(b))
}

/// Whether `entries` followed by `next` have ascending time keys.
fn ascending<K: 'static, V>(entries: &[(K, V)], next: &K) -> bool {
    let mut keys = entries.iter().map(|(k, _)| k).chain([next]);
    let mut prev = keys.next();
    keys.all(|k| {
        let up = prev.is_some_and(|p| time_order(p, k) == Some(Ordering::Less));
        prev = Some(k);
        up
    })
}

impl<K: Hash + Eq + 'static, V> SmallMap<K, V> {
    /// A map of one entry.
    pub fn one(k: K, v: V) -> Self {
        let mut entries = SmallVec::new();
        entries.push((k, v));
        Self::Small(entries)
    }

    fn position(entries: &[(K, V)], k: &K) -> Option<usize> {
        entries.iter().rposition(|(e, _)| e == k)
    }

    /// Where `k` is in a split map's vector: by binary search when sorted.
    fn position_in(older: &[(K, V)], sorted: bool, k: &K) -> Option<usize> {
        if sorted {
            older
                .binary_search_by(|(e, _)| time_order(e, k).unwrap_or(Ordering::Equal))
                .ok()
        } else {
            Self::position(older, k)
        }
    }

    /// Whether `k` is known to be absent without a search: above the newest key of a sorted
    /// map.
    fn above_all(&self, k: &K) -> bool {
        match self {
            Self::Split {
                newest, sorted: true, ..
            } => time_order(k, &newest.0) == Some(Ordering::Greater),
            _ => false,
        }
    }

    /// The value under `k`, looked for newest first.
    fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        match self {
            Self::Small(v) => Self::position(v, k).map(|i| &mut v[i].1),
            Self::Split { newest, .. } if newest.0 == *k => Some(&mut newest.1),
            Self::Split { older, sorted, .. } => Self::position_in(older, *sorted, k).map(|i| &mut older[i].1),
            Self::Large(m) => m.get_mut(k),
        }
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        match self {
            Self::Small(v) => Self::position(v, k).map(|i| &v[i].1),
            Self::Split { newest, .. } if newest.0 == *k => Some(&newest.1),
            Self::Split { older, sorted, .. } => Self::position_in(older, *sorted, k).map(|i| &older[i].1),
            Self::Large(m) => m.get(k),
        }
    }

    /// Inserts or replaces; the old value if any.
    pub fn insert(&mut self, k: K, value: V) -> Option<V> {
        if self.above_all(&k) {
            self.push(k, value);
            return None;
        }
        match self.get_mut(&k) {
            Some(v) => Some(std::mem::replace(v, value)),
            None => {
                self.push(k, value);
                None
            }
        }
    }

    /// Changes the value under `k` in place, inserting `default()` first when absent; whether
    /// it was present.
    pub fn update(&mut self, k: K, default: impl FnOnce() -> V, f: impl FnOnce(&mut V)) -> bool {
        let found = if self.above_all(&k) { None } else { self.get_mut(&k) };
        match found {
            Some(v) => {
                f(v);
                true
            }
            None => {
                let mut value = default();
                f(&mut value);
                self.push(k, value);
                false
            }
        }
    }

    /// Appends a key not in the map: inline while there is room, then as the newest entry
    /// (the one before it joins the vector), then into a hash map when the vector is full.
    fn push(&mut self, k: K, value: V) {
        match self {
            Self::Small(v) if v.len() < INLINE => v.push((k, value)),
            Self::Small(v) => {
                let sorted = ascending(v, &k);
                let mut older = Vec::with_capacity(2 * INLINE);
                older.extend(std::mem::take(v));
                *self = Self::Split {
                    newest: (k, value),
                    older,
                    sorted,
                };
            }
            Self::Split { newest, older, sorted } if older.len() + 1 < SPILL => {
                *sorted = *sorted && time_order(&newest.0, &k) == Some(Ordering::Less);
                older.push(std::mem::replace(newest, (k, value)));
            }
            Self::Split { .. } => {
                if let Some(entries) = self.take_split() {
                    let mut m: FxHashMap<K, V> = entries.into_iter().collect();
                    m.insert(k, value);
                    *self = Self::Large(m);
                }
            }
            Self::Large(m) => {
                m.insert(k, value);
            }
        }
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        match self {
            // `remove`, not `swap_remove`: the order keeps the newest entries at the end.
            Self::Small(v) => Self::position(v, k).map(|i| v.remove(i).1),
            Self::Split { newest, older, .. } if newest.0 == *k => match older.pop() {
                // The vector's newest entry takes the removed one's place. The vector stays
                // (as a spilled vector did): a map that shrank is likely to grow again.
                Some(next) => Some(std::mem::replace(newest, next).1),
                // It was the only entry.
                None => self.take_split().and_then(|mut entries| entries.pop()).map(|(_, v)| v),
            },
            // Removal keeps the others' order, sorted or not.
            Self::Split { older, sorted, .. } => Self::position_in(older, *sorted, k).map(|i| older.remove(i).1),
            Self::Large(m) => m.remove(k),
        }
    }
}

impl<K, V> SmallMap<K, V> {
    pub fn len(&self) -> usize {
        match self {
            Self::Small(v) => v.len(),
            Self::Split { older, .. } => older.len() + 1,
            Self::Large(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts loading the entries that are not inline into the caches (at most `max_lines` cache
    /// lines of them), so that reading them soon after does not wait for memory.
    pub fn prefetch(&self, max_lines: usize) {
        if let Self::Split { older, .. } = self {
            super::prefetch::prefetch_slice(older, max_lines);
        }
    }

    /// Every entry, borrowed: insertion order while not a hash map.
    pub fn iter(&self) -> Iter<'_, K, V> {
        match self {
            Self::Small(v) => Iter::Small(v.iter(), None),
            Self::Split { newest, older, .. } => Iter::Small(older.iter(), Some(newest)),
            Self::Large(m) => Iter::Large(m.iter()),
        }
    }

    /// Lends every entry to `f`: as runs of contiguous entries in insertion order while not a
    /// hash map, one at a time from a hash map.
    pub fn with_entries<R>(&self, f: impl FnOnce(super::Entries<'_, K, V>) -> R) -> R {
        match self {
            Self::Small(v) => f(super::Entries::Runs(&[v.as_slice()])),
            Self::Split { newest, older, .. } => {
                f(super::Entries::Runs(&[older.as_slice(), std::slice::from_ref(newest)]))
            }
            Self::Large(m) => f(super::Entries::Each(&mut m.iter())),
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        match self {
            Self::Small(v) => v.retain(|(k, v)| keep(k, v)),
            Self::Split { newest, older, .. } => {
                let keep_newest = keep(&newest.0, &mut newest.1);
                older.retain_mut(|(k, v)| keep(k, v));
                if !keep_newest {
                    match older.pop() {
                        Some(next) => *newest = next,
                        None => *self = Self::default(),
                    }
                }
            }
            Self::Large(m) => m.retain(|k, v| keep(k, v)),
        }
    }

    /// A split map's entries in insertion order, leaving it empty; `None`, and the map as it
    /// was, for the others.
    fn take_split(&mut self) -> Option<Vec<(K, V)>> {
        match std::mem::take(self) {
            Self::Split { newest, mut older, .. } => {
                older.push(newest);
                Some(older)
            }
            other => {
                *self = other;
                None
            }
        }
    }
}

/// The entries of a [`SmallMap`].
pub(crate) enum Iter<'a, K, V> {
    /// A vector's entries, then the newest entry of a split map.
    Small(std::slice::Iter<'a, (K, V)>, Option<&'a (K, V)>),
    Large(std::collections::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Small(i, last) => i.next().or_else(|| last.take()).map(|(k, v)| (k, v)),
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
    enum Op<K> {
        Insert(K, u32),
        Update(K, u32),
        Remove(K),
        /// Keeps the keys not divisible by it.
        Retain(u16),
    }

    /// Keys below `keys`: few keys keep maps inline or split (and remove their newest entry
    /// often); up to 300 cross the spill point.
    fn op(keys: u16) -> impl Strategy<Value = Op<u16>> {
        prop_oneof![
            4 => (0..keys, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => (0..keys, any::<u32>()).prop_map(|(k, v)| Op::Update(k, v)),
            2 => (0..keys).prop_map(Op::Remove),
            1 => (1..7u16).prop_map(Op::Retain),
        ]
    }

    /// Times as a window's panes come: mostly a new time above all, with updates and removals
    /// of earlier ones and now and then a time below the newest (a late pane).
    fn time_ops() -> impl Strategy<Value = Vec<Op<i64>>> {
        proptest::collection::vec((0u8..12, 0i64..40, any::<u32>()), 1..400).prop_map(|raw| {
            let mut next = 0i64;
            raw.into_iter()
                .map(|(kind, back, v)| match kind {
                    0..=4 => {
                        next += 1 + back % 3;
                        Op::Insert(next, v)
                    }
                    5 => Op::Update(next + 1 + back % 2, v),
                    6 | 7 => Op::Update(next - back, v),
                    8 | 9 => Op::Remove(next - back),
                    10 => Op::Insert(next - back, v),
                    _ => Op::Retain(1 + (back % 6) as u16),
                })
                .collect()
        })
    }

    /// Applies `ops` to a [`SmallMap`] and to a hash map and compares every answer, the entries
    /// and (before spilling) their insertion order.
    fn behaves_like_a_hash_map<K>(ops: Vec<Op<K>>, keep: fn(&K, u16) -> bool) -> Result<(), TestCaseError>
    where
        K: Copy + Hash + Eq + Ord + std::fmt::Debug + 'static,
    {
        let mut small = SmallMap::default();
        let mut model: HashMap<K, u32> = HashMap::new();
        // The model's keys in insertion order, which a map that is not a hash map keeps.
        let mut order: Vec<K> = Vec::new();
        for op in ops {
            if let Op::Insert(k, _) | Op::Update(k, _) = op {
                if !model.contains_key(&k) {
                    order.push(k);
                }
            }
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
                    small.retain(|k, _| keep(k, m));
                    model.retain(|k, _| keep(k, m));
                }
            }
            order.retain(|k| model.contains_key(k));
            prop_assert_eq!(small.len(), model.len());
            if !matches!(small, SmallMap::Large(_)) {
                prop_assert!(small.iter().map(|(k, _)| *k).eq(order.iter().copied()));
            }
            if let SmallMap::Split { sorted: true, .. } = small {
                prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "a sorted map's keys ascend");
            }
            for (k, v) in &model {
                prop_assert_eq!(small.get(k), Some(v));
            }
            let mut seen: Vec<(K, u32)> = small.iter().map(|(k, v)| (*k, *v)).collect();
            seen.sort_unstable();
            let mut want: Vec<(K, u32)> = model.iter().map(|(k, v)| (*k, *v)).collect();
            want.sort_unstable();
            prop_assert_eq!(seen, want);
        }
        Ok(())
    }

    proptest! {
        /// Every operation answers as a hash map does, before and after spilling.
        #[test]
        fn answers_like_a_hash_map(
            ops in prop_oneof![
                proptest::collection::vec(op(300), 1..600),
                proptest::collection::vec(op(6), 1..100),
            ]
        ) {
            behaves_like_a_hash_map(ops, |k, m| k % m != 0)?;
        }

        /// Time keys, sorted while they only grow: the same answers.
        #[test]
        fn time_keys_answer_like_a_hash_map(ops in time_ops()) {
            behaves_like_a_hash_map(ops, |k, m| k % i64::from(m) != 0)?;
        }
    }

    #[test]
    fn time_keys_inserted_in_order_are_kept_sorted_until_one_comes_late() {
        let mut m = SmallMap::default();
        for t in 0..10i64 {
            m.insert(t * 60, t);
        }
        assert!(matches!(m, SmallMap::Split { sorted: true, .. }));
        assert_eq!(m.remove(&0), Some(0));
        assert_eq!(m.get(&300), Some(&5));
        assert!(
            matches!(m, SmallMap::Split { sorted: true, .. }),
            "removal keeps the order"
        );
        m.insert(30, 99);
        assert!(matches!(m, SmallMap::Split { sorted: false, .. }));
        assert_eq!(m.get(&30), Some(&99));
        assert_eq!(m.get(&300), Some(&5));
        // Other key types are never taken as sorted.
        let mut n = SmallMap::default();
        for k in 0..10u64 {
            n.insert(k, k);
        }
        assert!(matches!(n, SmallMap::Split { sorted: false, .. }));
    }

    #[test]
    fn keeps_the_newest_entry_inline_then_spills_into_a_hash_map_past_the_limit() {
        let mut m = SmallMap::default();
        for k in 0..INLINE as u32 {
            m.insert(k, k);
        }
        assert!(matches!(m, SmallMap::Small(_)));
        for k in INLINE as u32..SPILL as u32 {
            m.insert(k, k);
            assert!(matches!(&m, SmallMap::Split { newest, .. } if newest.0 == k));
        }
        // Insertion order, newest last.
        assert!(m.iter().map(|(k, _)| *k).eq(0..SPILL as u32));
        // Removing the newest brings the one before it inline.
        assert_eq!(m.remove(&(SPILL as u32 - 1)), Some(SPILL as u32 - 1));
        assert!(matches!(&m, SmallMap::Split { newest, .. } if newest.0 == SPILL as u32 - 2));
        m.insert(SPILL as u32 - 1, 0);
        m.insert(SPILL as u32, 0);
        assert!(matches!(m, SmallMap::Large(_)));
        assert_eq!(m.len(), SPILL + 1);
        assert_eq!(m.get(&7), Some(&7));
    }
}
