//! The RocksDB backend's entry cache: the latest value of recently used keys, in memory, read
//! before the write cache and RocksDB.
//!
//! Why: a read that reaches RocksDB costs about a microsecond and a half even when its blocks
//! are in the block cache (a bloom probe per level-0 file and level, an index seek, a data block
//! seek); with millions of keys most reads did, and they were a third of the job's CPU. Here a
//! hit is one hash probe.
//!
//! The cache never holds the only copy of anything: every write goes to the write cache (and from
//! there to RocksDB) as before, and is written through to this cache too. So an entry here is
//! always the key's latest value, and evicting it at any time loses nothing. A key known to be
//! absent is cached as `None`, so a new key's first read does not probe RocksDB either.
//!
//! Bounded by bytes (each entry charged its key, its value and its slot), evicting by S3-FIFO
//! (`quick_cache`): keys read once are dropped before keys read again.
//!
//! A cache that started over an empty instance and has never evicted anything holds every key
//! there is: it is *complete*, and a key it lacks is absent without asking RocksDB. A job whose
//! state fits within the bound so reads RocksDB not at all until its first restore.

use quick_cache::{Equivalent, Lifecycle, Weighter};
use rustc_hash::FxBuildHasher;
use smallvec::SmallVec;
use std::hash::{Hash, Hasher};

/// Bytes charged per entry on top of its key and value: its slot (key and value of up to 16
/// bytes inline, eviction state), its index entry, and the slots grown but not yet used.
const ENTRY_OVERHEAD: usize = 88;

/// Bytes of a key or value kept inside its slot: with most keys and values this small, a lookup
/// touches one slot, not also an allocation for each.
type Inline = SmallVec<[u8; 16]>;

/// A cached key: its state, then its stored key bytes.
#[derive(Clone, PartialEq, Eq)]
struct Owned {
    id: u32,
    key: Inline,
}

/// A key looked up without building an [`Owned`] one; hashes as it does.
#[derive(Hash)]
struct Borrowed<'a> {
    id: u32,
    key: &'a [u8],
}

impl Hash for Owned {
    fn hash<H: Hasher>(&self, h: &mut H) {
        Borrowed {
            id: self.id,
            key: &self.key,
        }
        .hash(h)
    }
}

impl Equivalent<Owned> for Borrowed<'_> {
    fn equivalent(&self, k: &Owned) -> bool {
        self.id == k.id && *self.key == *k.key
    }
}

/// A value, or `None`: the key is known to be absent.
type Value = Option<Inline>;

#[derive(Clone)]
struct Weigh;

impl Weighter<Owned, Value> for Weigh {
    fn weight(&self, k: &Owned, v: &Value) -> u64 {
        (k.key.len() + v.as_ref().map_or(0, |v| v.len()) + ENTRY_OVERHEAD) as u64
    }
}

/// Tells an insert whether it evicted (or refused) anything.
#[derive(Clone, Default)]
struct Evictions;

impl Lifecycle<Owned, Value> for Evictions {
    type RequestState = bool;

    fn begin_request(&self) -> bool {
        false
    }

    fn on_evict(&self, evicted: &mut bool, _: Owned, _: Value) {
        *evicted = true;
    }
}

/// The latest values of recently used keys of one subtask's states.
pub(crate) struct EntryCache {
    cache: quick_cache::unsync::Cache<Owned, Value, Weigh, FxBuildHasher, Evictions>,
    /// Holds every key there is: nothing was restored and nothing evicted.
    complete: bool,
}

impl EntryCache {
    /// A cache holding at most `limit` bytes (0: holds nothing), over an instance that is empty
    /// if `over_empty`.
    pub(crate) fn new(limit: usize, over_empty: bool) -> Self {
        let estimated = (limit / (ENTRY_OVERHEAD + 32)).max(1);
        Self {
            cache: quick_cache::unsync::Cache::with(estimated, limit as u64, Weigh, FxBuildHasher, Evictions),
            complete: over_empty && limit > 0,
        }
    }

    /// `None`: not known here; `Some(None)`: absent; `Some(Some(v))`: the value.
    pub(crate) fn get(&self, id: usize, key: &[u8]) -> Option<Option<&[u8]>> {
        let k = Borrowed { id: id as u32, key };
        match self.cache.get(&k) {
            Some(v) => Some(v.as_deref()),
            None if self.complete => Some(None),
            None => None,
        }
    }

    /// Every key of state `id` with its value, in the cache's order (its slots in memory
    /// order), if the cache holds every key.
    pub(crate) fn all_of(&self, id: usize) -> Option<impl Iterator<Item = (&[u8], &[u8])>> {
        self.complete.then(|| {
            (self.cache.iter())
                .filter(move |(k, _)| k.id == id as u32)
                .filter_map(|(k, v)| Some((&k.key[..], &v.as_ref()?[..])))
        })
    }

    /// Records `value` (or absence) as `key`'s latest; a cached value of the same length is
    /// overwritten in place.
    pub(crate) fn put(&mut self, id: usize, key: &[u8], value: Option<&[u8]>) {
        let k = Borrowed { id: id as u32, key };
        if let Some(mut cached) = self.cache.peek_mut(&k) {
            match (cached.as_mut(), value) {
                (Some(old), Some(new)) if old.len() == new.len() => old.copy_from_slice(new),
                _ => *cached = value.map(Inline::from_slice),
            }
            return;
        }
        let owned = Owned {
            id: id as u32,
            key: Inline::from_slice(key),
        };
        if self.cache.insert_with_lifecycle(owned, value.map(Inline::from_slice)) {
            self.complete = false;
        }
    }

    /// Bounds the cache anew, evicting what no longer fits.
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.complete &= limit as u64 >= self.cache.capacity();
        self.cache.set_capacity(limit as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_latest_values_and_absence_per_state() {
        let mut c = EntryCache::new(1 << 20, false);
        assert_eq!(c.get(0, b"k"), None);
        c.put(0, b"k", Some(b"one"));
        c.put(1, b"k", None);
        assert_eq!(c.get(0, b"k"), Some(Some(&b"one"[..])));
        assert_eq!(c.get(1, b"k"), Some(None));
        // Same length: in place; another length: replaced.
        c.put(0, b"k", Some(b"two"));
        assert_eq!(c.get(0, b"k"), Some(Some(&b"two"[..])));
        c.put(0, b"k", Some(b"three"));
        assert_eq!(c.get(0, b"k"), Some(Some(&b"three"[..])));
        c.put(0, b"k", None);
        assert_eq!(c.get(0, b"k"), Some(None));
        assert_eq!(c.get(0, b"other"), None, "not complete: unknown keys are not absent");
    }

    #[test]
    fn stays_within_its_bound_and_is_complete_until_it_evicts() {
        let mut c = EntryCache::new(64 << 10, true);
        assert_eq!(c.get(0, b"k"), Some(None), "over an empty instance: absent");
        let mut first_eviction = None;
        for i in 0u32..10_000 {
            c.put(0, &i.to_be_bytes(), Some(&[7; 20]));
            if first_eviction.is_none() && !c.complete {
                first_eviction = Some(i);
            }
        }
        let first = first_eviction.expect("10,000 entries do not fit in 64 KiB");
        assert!(first > 100, "evicted at {first}");
        assert!(c.cache.weight() <= 64 << 10, "{}", c.cache.weight());
        assert_eq!(c.get(0, b"k"), None, "after an eviction a miss is unknown");
        c.set_limit(0);
        assert_eq!(c.cache.len(), 0);
        assert!(
            !EntryCache::new(0, true).complete,
            "a cache holding nothing is never complete"
        );
    }
}
