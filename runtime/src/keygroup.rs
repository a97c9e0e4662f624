//! Key-group arithmetic: keys hash to one of `max_parallelism` key groups, and each subtask owns
//! a contiguous range of them. All functions here are pure and total; rescaling, partitioning
//! and state layout depend on them agreeing everywhere.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Default number of key groups, as in Flink for small parallelism.
pub const DEFAULT_MAX_PARALLELISM: u16 = 128;
/// Largest supported max parallelism (Flink's limit too): key groups fit in two bytes.
pub const UPPER_BOUND_MAX_PARALLELISM: u16 = 32768;

/// The unit of keyed state redistribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyGroup(pub u16);

impl KeyGroup {
    /// Big-endian bytes: the prefix of every key in an ordered store, so a range of key groups
    /// is a contiguous key range.
    pub fn to_be_bytes(self) -> [u8; 2] {
        self.0.to_be_bytes()
    }
}

/// An inclusive range of key groups; empty when `start > end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGroupRange {
    /// First key group in the range.
    pub start: u16,
    /// Last key group in the range (inclusive).
    pub end: u16,
}

impl KeyGroupRange {
    /// The range `[start, end]`.
    pub fn new(start: u16, end: u16) -> Self {
        Self { start, end }
    }

    /// A range with no key groups.
    pub fn empty() -> Self {
        Self { start: 1, end: 0 }
    }

    /// Number of key groups in the range.
    pub fn len(&self) -> usize {
        if self.start > self.end {
            0
        } else {
            (self.end - self.start) as usize + 1
        }
    }

    /// True when the range holds no key group.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `kg` lies in the range.
    pub fn contains(&self, kg: KeyGroup) -> bool {
        self.start <= kg.0 && kg.0 <= self.end
    }

    /// Whether every key group of `other` lies in the range.
    pub fn contains_range(&self, other: &KeyGroupRange) -> bool {
        other.is_empty() || (self.start <= other.start && other.end <= self.end)
    }

    /// The key groups both ranges hold.
    pub fn intersect(&self, other: &KeyGroupRange) -> KeyGroupRange {
        let r = KeyGroupRange::new(self.start.max(other.start), self.end.min(other.end));
        if r.is_empty() {
            KeyGroupRange::empty()
        } else {
            r
        }
    }

    /// Iterates the key groups in order.
    pub fn iter(&self) -> impl Iterator<Item = KeyGroup> {
        let (s, e) = (self.start as u32, self.end as u32);
        (s..=e).filter(move |_| s <= e).map(|g| KeyGroup(g as u16))
    }

    /// Position of `kg` inside the range, for dense per-key-group arrays.
    pub fn index_of(&self, kg: KeyGroup) -> usize {
        debug_assert!(self.contains(kg));
        (kg.0 - self.start) as usize
    }
}

impl fmt::Display for KeyGroupRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            write!(f, "[]")
        } else {
            write!(f, "[{}, {}]", self.start, self.end)
        }
    }
}

/// Stable hash of a serialized key. Never Rust's randomized `DefaultHasher`: the value must be
/// the same in every process and every version.
pub fn hash_key_bytes(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// The key group of a serialized key.
pub fn key_group_for_bytes(bytes: &[u8], max_parallelism: u16) -> KeyGroup {
    KeyGroup((hash_key_bytes(bytes) % max_parallelism as u64) as u16)
}

/// The key group of a key, through its canonical serialization.
pub fn key_group_for_key<K: serde::Serialize + 'static>(key: &K, max_parallelism: u16) -> KeyGroup {
    with_key_bytes(key, |b| key_group_for_bytes(b, max_parallelism))
}

/// Serializes `key` canonically (postcard) and hands the bytes to `f`, without allocating for
/// small keys.
pub fn with_key_bytes<K: serde::Serialize + 'static, R>(key: &K, f: impl FnOnce(&[u8]) -> R) -> R {
    let mut int = [0u8; 10];
    if let Some(n) = int_bytes(key, &mut int) {
        return f(&int[..n]);
    }
    let mut buf = [0u8; 64];
    match postcard::to_slice(key, &mut buf) {
        Ok(bytes) => f(bytes),
        Err(_) => {
            let v = postcard::to_allocvec(key).unwrap_or_default();
            f(&v)
        }
    }
}

/// Appends `key`'s canonical bytes (postcard's) to `out`.
pub fn extend_key_bytes<K: serde::Serialize + 'static>(key: &K, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    let mut buf = [0u8; 10];
    match int_bytes(key, &mut buf) {
        Some(n) => out.extend_from_slice(&buf[..n]),
        None => *out = postcard::to_extend(key, std::mem::take(out))?,
    }
    Ok(())
}

/// Postcard's bytes of an integer (a varint, zigzag for signed ones) written straight into
/// `buf`, not through serde: a record's key is serialized at its exchange and again at its keyed
/// operator (serde's path cost about a twentieth of a window's CPU), and a memory snapshot
/// writes millions of integer keys, namespaces and values a second. `None` for other types.
pub(crate) fn int_bytes<T: 'static>(value: &T, buf: &mut [u8; 10]) -> Option<usize> {
    let any: &dyn std::any::Any = value;
    let mut v = if let Some(v) = any.downcast_ref::<u64>() {
        *v
    } else if let Some(v) = any.downcast_ref::<u32>() {
        u64::from(*v)
    } else if let Some(v) = any.downcast_ref::<i64>() {
        ((*v << 1) ^ (*v >> 63)) as u64
    } else if let Some(v) = any.downcast_ref::<i32>() {
        u64::from(((*v << 1) ^ (*v >> 31)) as u32)
    } else {
        return None;
    };
    let mut n = 0;
    while v >= 0x80 {
        buf[n] = v as u8 | 0x80;
        v >>= 7;
        n += 1;
    }
    buf[n] = v as u8;
    Some(n + 1)
}

/// The key-group range owned by `subtask` of `parallelism`: `[ceil(i*M/p), floor(((i+1)*M-1)/p)]`.
pub fn range_for_subtask(max_parallelism: u16, parallelism: usize, subtask: usize) -> KeyGroupRange {
    let m = max_parallelism as usize;
    let p = parallelism;
    let start = (subtask * m).div_ceil(p);
    let end = ((subtask + 1) * m - 1) / p;
    KeyGroupRange::new(start as u16, end as u16)
}

/// The subtask of `parallelism` that owns key group `kg`: `kg * p / M`.
pub fn subtask_for_key_group(max_parallelism: u16, parallelism: usize, kg: KeyGroup) -> usize {
    kg.0 as usize * parallelism / max_parallelism as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_ranges() {
        assert_eq!(range_for_subtask(128, 2, 0), KeyGroupRange::new(0, 63));
        assert_eq!(range_for_subtask(128, 2, 1), KeyGroupRange::new(64, 127));
        assert_eq!(range_for_subtask(10, 3, 0), KeyGroupRange::new(0, 3));
        assert_eq!(range_for_subtask(10, 3, 1), KeyGroupRange::new(4, 6));
        assert_eq!(range_for_subtask(10, 3, 2), KeyGroupRange::new(7, 9));
    }

    #[test]
    fn hash_is_stable_across_runs() {
        // A fixed value: if this changes, every existing checkpoint would map keys elsewhere.
        const PINNED_HASH: u64 = 9_084_615_177_324_226_845;
        assert_eq!(hash_key_bytes(b"sluice"), PINNED_HASH);
    }

    #[test]
    fn intersect_and_iter() {
        let a = KeyGroupRange::new(0, 10);
        let b = KeyGroupRange::new(5, 20);
        assert_eq!(a.intersect(&b), KeyGroupRange::new(5, 10));
        assert!(a.intersect(&KeyGroupRange::new(11, 12)).is_empty());
        assert_eq!(KeyGroupRange::empty().iter().count(), 0);
        assert_eq!(a.iter().count(), 11);
    }

    proptest! {
        #[test]
        fn ranges_partition_all_key_groups(m in 1u16..=2048, p_seed in 1usize..=2048) {
            let p = 1 + p_seed % m as usize;
            let mut next = 0u32;
            for i in 0..p {
                let r = range_for_subtask(m, p, i);
                prop_assert!(!r.is_empty(), "subtask {} of {} got no key group (M={})", i, p, m);
                prop_assert_eq!(r.start as u32, next);
                next = r.end as u32 + 1;
                for kg in r.iter() {
                    prop_assert_eq!(subtask_for_key_group(m, p, kg), i);
                }
            }
            prop_assert_eq!(next, m as u32);
        }

        #[test]
        fn key_group_in_bounds(key in any::<u64>(), m in 1u16..=UPPER_BOUND_MAX_PARALLELISM) {
            let kg = key_group_for_key(&key, m);
            prop_assert!(kg.0 < m);
        }

        #[test]
        fn integer_keys_have_postcards_bytes(u in any::<u64>(), v in any::<u32>(), i in any::<i64>(), j in any::<i32>()) {
            fn check<K: serde::Serialize + 'static>(key: K) -> Result<(), TestCaseError> {
                let canonical = postcard::to_allocvec(&key).unwrap();
                let mut extended = vec![7];
                extend_key_bytes(&key, &mut extended).unwrap();
                prop_assert_eq!(&extended[1..], &canonical[..]);
                with_key_bytes(&key, |b| assert_eq!(b, &canonical[..]));
                Ok(())
            }
            for k in [u, u >> 7, u >> 35, u >> 57, 0, 127, 128] {
                check(k)?;
            }
            check(v)?;
            check(v >> 25)?;
            for k in [i, i >> 7, i >> 40, -1, 0, i64::MIN, i64::MAX] {
                check(k)?;
            }
            for k in [j, j >> 20, -1, i32::MIN, i32::MAX] {
                check(k)?;
            }
        }

        #[test]
        fn long_keys_hash_like_short_path(key in ".{0,200}") {
            let direct = key_group_for_bytes(&postcard::to_allocvec(&key).unwrap(), 128);
            prop_assert_eq!(key_group_for_key(&key, 128), direct);
        }
    }
}
