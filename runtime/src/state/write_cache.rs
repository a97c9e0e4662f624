//! The RocksDB backend's write-back cache: the writes since the last checkpoint, kept in memory
//! in front of RocksDB, and the background step that moves them into RocksDB.
//!
//! Why: with the cache, a checkpoint's synchronous part is only "freeze the cache" (a swap).
//! The frozen writes go into RocksDB as ingested SST files and are hard-linked into a native
//! checkpoint on a background thread, while the task goes on writing into a fresh cache. RocksDB therefore sees
//! no task writes between a barrier and its native checkpoint, so the checkpoint holds exactly
//! the state at the barrier. Hot keys are also read and rewritten in memory instead of RocksDB.
//!
//! Reads look in the live cache, then the frozen one, then RocksDB; `None` is a deletion that
//! shadows RocksDB. A map state's writes are kept in a tree, in key order, for scans of a key's
//! entries; the cache keeps the hashes of those keys too: with millions of keys most reads are
//! for keys it does not hold, and a hash probe answers those without descending the tree (a
//! key comparison per step). Other states' writes are hashed.
//!
//! The cache is bounded: past its limit it is frozen and moved into RocksDB as at a barrier, but
//! without a native checkpoint (after waiting for a frozen cache still being moved, to keep
//! writes in order).

use crate::error::{Error, Result};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// A stored value: up to 16 bytes in place (most states' values), no allocation.
pub(crate) type Value = smallvec::SmallVec<[u8; 16]>;

/// Cached writes of one state (column family): stored key -> value, or `None` for a deletion.
/// Kept in key order for map states, whose entries of one key are scanned; hashed for the others
/// (value, list and reducing state), which are read by key and scanned only whole (rarely): a
/// hash insert costs a fraction of an ordered one, and their entries are sorted only when they
/// move into RocksDB, off the task thread.
pub(crate) enum Entries {
    Sorted(BTreeMap<CacheKey, Option<Value>>),
    Hashed(FxHashMap<CacheKey, Option<Value>>),
}

impl Entries {
    fn new(sorted: bool) -> Self {
        if sorted {
            Self::Sorted(BTreeMap::new())
        } else {
            Self::Hashed(FxHashMap::default())
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn len(&self) -> usize {
        match self {
            Self::Sorted(m) => m.len(),
            Self::Hashed(m) => m.len(),
        }
    }

    fn get(&self, key: &CacheKey) -> Option<&Option<Value>> {
        match self {
            Self::Sorted(m) => m.get(key),
            Self::Hashed(m) => m.get(key),
        }
    }

    /// Stores `value` under `key`; the value it replaces, if the key was there.
    fn insert(&mut self, key: CacheKey, value: Option<Value>) -> Option<Option<Value>> {
        match self {
            Self::Sorted(m) => m.insert(key, value),
            Self::Hashed(m) => m.insert(key, value),
        }
    }

    /// Every entry in key order.
    pub(crate) fn in_order(&self) -> Vec<(&[u8], Option<&[u8]>)> {
        self.prefixed(b"")
    }

    /// The entries whose keys start with `prefix`, in key order.
    fn prefixed(&self, prefix: &[u8]) -> Vec<(&[u8], Option<&[u8]>)> {
        match self {
            Self::Sorted(m) => m
                .range((Bound::Included(CacheKey::from(prefix)), Bound::Unbounded))
                .take_while(|(k, _)| k.as_bytes().starts_with(prefix))
                .map(|(k, v)| (k.as_bytes(), v.as_deref()))
                .collect(),
            Self::Hashed(m) => {
                // Sorted with each key's head beside it: most comparisons read only this vector,
                // not two entries scattered over the table.
                let mut found: Vec<_> = (m.iter())
                    .filter(|(k, _)| k.as_bytes().starts_with(prefix))
                    .map(|(k, v)| (k.head(), k, v))
                    .collect();
                found.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
                found
                    .into_iter()
                    .map(|(_, k, v)| (k.as_bytes(), v.as_deref()))
                    .collect()
            }
        }
    }

    /// The same entries, kept in key order from now on.
    fn into_sorted(self) -> Self {
        match self {
            Self::Hashed(m) => Self::Sorted(m.into_iter().collect()),
            sorted => sorted,
        }
    }
}

/// A stored key in the cache, ordered as its bytes are. Its first 16 bytes are held in place,
/// and compared as one big-endian integer: most keys (key group, length, an 8-byte id) fit in
/// them whole, so two keys are told apart with one integer comparison, and a short key is read,
/// compared and hashed without a second memory access (it has no allocation).
#[derive(Debug, Clone, Eq)]
pub(crate) struct CacheKey {
    head: [u8; 16],
    len: usize,
    /// The whole key if it is longer than 16 bytes; empty (no allocation) otherwise.
    long: Box<[u8]>,
}

impl CacheKey {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self.len {
            n @ 0..=16 => &self.head[..n],
            _ => &self.long,
        }
    }

    fn head(&self) -> u128 {
        u128::from_be_bytes(self.head)
    }
}

/// Keys of up to 16 bytes are equal if their heads and lengths are.
impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.head == other.head && self.len == other.len && (self.len <= 16 || self.long == other.long)
    }
}

/// Consistent with equality: short keys hash by head and length, longer ones by their bytes.
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match self.len {
            0..=16 => (self.head(), self.len).hash(h),
            _ => self.long.hash(h),
        }
    }
}

impl From<&[u8]> for CacheKey {
    fn from(bytes: &[u8]) -> Self {
        let mut head = [0u8; 16];
        let n = bytes.len().min(16);
        head[..n].copy_from_slice(&bytes[..n]);
        let long = if bytes.len() > 16 { bytes.into() } else { Box::default() };
        Self {
            head,
            len: bytes.len(),
            long,
        }
    }
}

impl<A: smallvec::Array<Item = u8>> From<smallvec::SmallVec<A>> for CacheKey {
    fn from(bytes: smallvec::SmallVec<A>) -> Self {
        Self::from(&bytes[..])
    }
}

/// Byte order: heads that differ differ as the bytes do (zero padding sorts a key before its
/// extensions, which are either larger there or equal and then longer); equal heads fall back
/// to the bytes.
impl Ord for CacheKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.head()
            .cmp(&other.head())
            .then_with(|| self.as_bytes().cmp(other.as_bytes()))
    }
}

impl PartialOrd for CacheKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The hashes of the keys (with their state) of one cache's sorted entries (hashed ones are
/// looked up directly).
type KeyHashes = FxHashSet<u64>;

/// Bytes charged per cached entry: its slot (a 40-byte key and a 32-byte value, each holding up
/// to 16 bytes in place) in a table or tree about 2/3 full, and a sorted state's key hash.
/// Longer keys and values are charged their allocations on top.
const ENTRY_OVERHEAD: usize = 112;

/// The bytes of a key or value of `len` bytes allocated outside its slot.
fn spilled(len: usize) -> usize {
    if len > 16 {
        len
    } else {
        0
    }
}

/// Default bound of one subtask's live cache: about 2.4 million entries of small keys and
/// values. At 10 million keys and a checkpoint every second a subtask writes about a million
/// keys between barriers (more when a checkpoint is slow): a cache past its bound is moved into
/// RocksDB, and a barrier coming while that move runs waits for it.
pub(crate) const DEFAULT_LIMIT: usize = 256 << 20;

/// What a cache lookup found.
pub(crate) enum Cached<'a> {
    /// A value written since the last move into RocksDB.
    Value(&'a [u8]),
    /// A deletion since then: RocksDB's value does not count.
    Deleted,
    /// Not in the cache: ask RocksDB.
    Miss,
}

/// The live and frozen caches of one backend.
pub(crate) struct WriteCache {
    live: Vec<Entries>,
    /// Per state: whether its entries are kept in key order.
    sorted: Vec<bool>,
    /// Per state: how many keys the last interval wrote (growing a hashed table of hundreds of
    /// thousands step by step would rehash every key again at each step).
    expected: Vec<usize>,
    live_keys: KeyHashes,
    live_bytes: usize,
    limit: usize,
    frozen: Option<Frozen>,
    /// Frozen caches already in RocksDB, kept until a background thread can free them: freeing
    /// hundreds of thousands of entries takes milliseconds the task thread should not spend.
    retired: Vec<Frozen>,
}

/// Writes frozen at a barrier (or past the bound), readable until they are in RocksDB.
pub(crate) struct Frozen {
    entries: Arc<Vec<Entries>>,
    keys: KeyHashes,
    moved: Arc<Background>,
}

impl WriteCache {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            live: Vec::new(),
            sorted: Vec::new(),
            expected: Vec::new(),
            live_keys: KeyHashes::default(),
            live_bytes: 0,
            limit,
            frozen: None,
            retired: Vec::new(),
        }
    }

    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Makes room for state `id` (hashed until [`Self::keep_sorted`] is called).
    pub(crate) fn register(&mut self, id: usize) {
        if self.live.len() <= id {
            self.live.resize_with(id + 1, || Entries::new(false));
            self.sorted.resize(id + 1, false);
            self.expected.resize(id + 1, 0);
        }
    }

    /// Keeps state `id`'s entries in key order from now on (its entries of one key are about
    /// to be scanned). Called before its first write, normally: then nothing is converted.
    pub(crate) fn keep_sorted(&mut self, id: usize) {
        if !self.sorted[id] {
            self.sorted[id] = true;
            let entries = std::mem::replace(&mut self.live[id], Entries::new(true)).into_sorted();
            if let Entries::Sorted(m) = &entries {
                self.live_keys.extend(m.keys().map(|k| key_hash(id, k.as_bytes())));
            }
            self.live[id] = entries;
        }
    }

    pub(crate) fn get(&self, id: usize, key: &CacheKey) -> Cached<'_> {
        // Sorted entries are looked up only if the key's hash is among theirs (a tree descent
        // costs a key comparison per level); hashed ones directly.
        let h = self.sorted[id].then(|| key_hash(id, key.as_bytes()));
        let may_hold = |entries: &Entries, keys: &KeyHashes| match (entries, h) {
            (Entries::Sorted(_), Some(h)) => keys.contains(&h),
            (Entries::Sorted(_), None) => false,
            (Entries::Hashed(_), _) => true,
        };
        let live = may_hold(&self.live[id], &self.live_keys).then(|| self.live[id].get(key));
        let found = live.flatten().or_else(|| {
            let f = self.frozen.as_ref()?;
            let entries = f.entries.get(id)?;
            let h = h.unwrap_or_else(|| key_hash(id, key.as_bytes()));
            match entries {
                Entries::Sorted(_) if !f.keys.contains(&h) => None,
                _ => entries.get(key),
            }
        });
        match found {
            Some(Some(v)) => Cached::Value(v),
            Some(None) => Cached::Deleted,
            None => Cached::Miss,
        }
    }

    /// Records a write (`None`: a deletion). Returns whether the cache is now over its limit.
    pub(crate) fn put(&mut self, id: usize, key: CacheKey, value: Option<Value>) -> bool {
        let new_len = spilled(value.as_ref().map_or(0, |v| v.len()));
        let key_len = spilled(key.len);
        match &mut self.live[id] {
            Entries::Sorted(_) => drop(self.live_keys.insert(key_hash(id, key.as_bytes()))),
            Entries::Hashed(m) if m.capacity() == 0 => m.reserve(self.expected[id]),
            Entries::Hashed(_) => {}
        }
        match self.live[id].insert(key, value) {
            Some(old) => {
                let old_len = spilled(old.as_ref().map_or(0, |v| v.len()));
                self.live_bytes = (self.live_bytes + new_len).saturating_sub(old_len);
            }
            None => self.live_bytes += key_len + new_len + ENTRY_OVERHEAD,
        }
        self.live_bytes > self.limit
    }

    /// The cached entries of state `id` whose keys start with `prefix`, live over frozen, in
    /// key order (deletions included).
    pub(crate) fn scan(&self, id: usize, prefix: &[u8]) -> Vec<(&[u8], Option<&[u8]>)> {
        let live = self.live[id].prefixed(prefix);
        match self.frozen.as_ref().and_then(|f| f.entries.get(id)) {
            Some(frozen) => merge_sorted(live, frozen.prefixed(prefix)),
            None => live,
        }
    }

    /// Takes the live writes out, with their key hashes.
    fn take_live_with_keys(&mut self) -> (Vec<Entries>, KeyHashes) {
        self.live_bytes = 0;
        // The next interval most likely writes as many keys: room is made at its first write
        // (not here, at a barrier: sizing a table of a million slots takes a millisecond).
        self.expected = self.live.iter().map(Entries::len).collect();
        let fresh = self.sorted.iter().map(|&sorted| Entries::new(sorted)).collect();
        let entries = std::mem::replace(&mut self.live, fresh);
        (entries, std::mem::take(&mut self.live_keys))
    }

    /// Lets a frozen cache go once it is in RocksDB (without waiting), so reads stop looking
    /// into it; a failed move is reported.
    pub(crate) fn release_moved(&mut self) -> Result<()> {
        if self.frozen.as_ref().is_some_and(|f| f.moved.is_done()) {
            self.settle()?;
        }
        Ok(())
    }

    /// Freezes the live writes; `move_in` starts moving them into RocksDB and returns what
    /// reports when they are there, which is returned too.
    pub(crate) fn freeze(&mut self, move_in: impl FnOnce(Arc<Vec<Entries>>) -> Arc<Background>) -> Arc<Background> {
        debug_assert!(self.frozen.is_none());
        let (entries, keys) = self.take_live_with_keys();
        let entries = Arc::new(entries);
        let moved = move_in(entries.clone());
        self.frozen = Some(Frozen {
            entries,
            keys,
            moved: moved.clone(),
        });
        moved
    }

    /// Waits until the frozen cache is in RocksDB and lets it go; fails if moving it failed
    /// (then RocksDB lacks those writes and the task must fail rather than go on).
    pub(crate) fn settle(&mut self) -> Result<()> {
        let Some(f) = &self.frozen else { return Ok(()) };
        f.moved.wait()?;
        let f = self.frozen.take().expect("checked above");
        self.retired.push(f);
        Ok(())
    }

    /// Frozen caches no longer needed, for freeing off the task thread.
    pub(crate) fn take_retired(&mut self) -> Vec<Frozen> {
        std::mem::take(&mut self.retired)
    }
}

/// The hash of state `id`'s stored key `key`.
fn key_hash(id: usize, key: &[u8]) -> u64 {
    rustc_hash::FxBuildHasher.hash_one((id, key))
}

/// Merges two key-ordered runs; where both hold a key, `newer`'s entry wins.
pub(crate) fn merge_sorted<'a, V: Copy>(newer: Vec<(&'a [u8], V)>, older: Vec<(&'a [u8], V)>) -> Vec<(&'a [u8], V)> {
    let mut out = Vec::with_capacity(newer.len() + older.len());
    let mut o = older.into_iter().peekable();
    for (k, v) in newer {
        while let Some(&(ok, ov)) = o.peek() {
            if ok >= k {
                break;
            }
            out.push((ok, ov));
            o.next();
        }
        if o.peek().is_some_and(|&(ok, _)| ok == k) {
            o.next();
        }
        out.push((k, v));
    }
    out.extend(o);
    out
}

/// Completion of background work that the task thread may have to wait for, and the cleanup
/// owed by whichever of the worker and the abandoning owner comes last.
pub(crate) struct Background {
    state: Mutex<BackgroundState>,
    done: Condvar,
    /// Set with `state.result`, readable without the lock on every write.
    finished: AtomicBool,
}

/// Starts background work that reports to the given `Background`; an error means it could not
/// be started.
pub(crate) type Start = Box<dyn FnOnce(Arc<Background>) -> std::result::Result<(), String> + Send>;

#[derive(Default)]
struct BackgroundState {
    result: Option<std::result::Result<(), String>>,
    abandoned: Option<Box<dyn FnOnce() + Send>>,
    /// Work not started yet: the first to wait, abandon or call `start` starts it.
    start: Option<Start>,
}

impl Background {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(BackgroundState::default()),
            done: Condvar::new(),
            finished: AtomicBool::new(false),
        })
    }

    /// Work that `start` starts later, so that the task thread need not wake the worker (the
    /// wake-up is where the scheduler takes the core from it).
    pub(crate) fn deferred(start: Start) -> Arc<Self> {
        let b = Self::new();
        b.lock().start = Some(start);
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BackgroundState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts deferred work if nobody has yet.
    pub(crate) fn start(self: &Arc<Self>) {
        let start = self.lock().start.take();
        if let Some(Err(e)) = start.map(|start| start(self.clone())) {
            self.finish(Err(e));
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Called by the worker when it is done; runs the cleanup of an owner that already left.
    pub(crate) fn finish(&self, result: std::result::Result<(), String>) {
        let cleanup = {
            let mut s = self.lock();
            s.result = Some(result);
            self.finished.store(true, Ordering::Release);
            s.abandoned.take()
        };
        self.done.notify_all();
        if let Some(cleanup) = cleanup {
            cleanup();
        }
    }

    /// Blocks until the worker is done; its error, if any.
    pub(crate) fn wait(self: &Arc<Self>) -> Result<()> {
        self.start();
        let mut s = self.lock();
        while s.result.is_none() {
            s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        match s.result.as_ref().expect("checked") {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::User(e.clone())),
        }
    }

    /// The owner leaves: runs `cleanup` now if the worker is done, else when it finishes.
    pub(crate) fn abandon(self: &Arc<Self>, cleanup: impl FnOnce() + Send + 'static) {
        self.start();
        let mut s = self.lock();
        if s.result.is_some() {
            drop(s);
            cleanup();
        } else {
            s.abandoned = Some(Box::new(cleanup));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(bytes: &[u8]) -> CacheKey {
        bytes.into()
    }

    proptest! {
        /// Keys sort exactly as their bytes, whatever their lengths and zero bytes.
        #[test]
        fn cache_keys_sort_as_their_bytes(
            a in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..24),
            b in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..24),
        ) {
            prop_assert_eq!(key(&a).cmp(&key(&b)), a.cmp(&b));
        }

        /// A scan returns exactly the cached keys that start with the prefix, in byte order,
        /// and a lookup finds each key: hashed, sorted, or sorted after some writes.
        #[test]
        fn scans_return_exactly_the_prefixed_keys_in_order(
            keys in proptest::collection::btree_set(
                proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..20), 0..40),
            prefix in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8)], 0..4),
            sorted_after in proptest::option::of(0usize..40),
        ) {
            let mut c = WriteCache::new(usize::MAX);
            c.register(0);
            for (i, k) in keys.iter().enumerate() {
                if sorted_after == Some(i) {
                    c.keep_sorted(0);
                }
                c.put(0, key(k), Some(Value::from_slice(k)));
            }
            let got: Vec<&[u8]> = c.scan(0, &prefix).into_iter().map(|(k, _)| k).collect();
            let want: Vec<&[u8]> = keys.iter().filter(|k| k.starts_with(&prefix)).map(Vec::as_slice).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(c.live[0].in_order().len(), keys.len());
            for k in &keys {
                prop_assert!(matches!(c.get(0, &key(k)), Cached::Value(v) if v == &k[..]));
            }
        }
    }

    #[test]
    fn newer_entries_shadow_older_ones_in_key_order() {
        let newer = vec![(&b"b"[..], 1), (&b"d"[..], 2)];
        let older = vec![(&b"a"[..], 10), (&b"b"[..], 11), (&b"c"[..], 12), (&b"e"[..], 13)];
        let merged: Vec<_> = merge_sorted(newer, older);
        assert_eq!(
            merged,
            vec![
                (&b"a"[..], 10),
                (&b"b"[..], 1),
                (&b"c"[..], 12),
                (&b"d"[..], 2),
                (&b"e"[..], 13)
            ]
        );
    }

    #[test]
    fn keys_of_up_to_16_bytes_compare_by_head_and_length() {
        // Equal heads, other lengths (zero padding): not equal, and hashed apart.
        assert_ne!(key(b"ab"), key(b"ab\0"));
        assert_eq!(key(b"ab"), key(b"ab"));
        let long = |last: u8| key(&[[7u8; 16].as_slice(), &[last]].concat());
        assert_ne!(long(1), long(2), "past 16 bytes the bytes decide");
        assert_eq!(long(1), long(1));
        let h = |k: &CacheKey| rustc_hash::FxBuildHasher.hash_one(k);
        assert_eq!(h(&long(3)), h(&long(3)));
        assert_eq!(h(&key(b"ab")), h(&key(b"ab")));
    }

    #[test]
    fn the_live_cache_shadows_the_frozen_one_and_reports_its_limit() {
        for sorted in [false, true] {
            live_shadows_frozen(sorted);
        }
    }

    fn live_shadows_frozen(sorted: bool) {
        let mut c = WriteCache::new(200);
        c.register(0);
        if sorted {
            c.keep_sorted(0);
        }
        assert!(!c.put(0, key(b"k1"), Some(Value::from_slice(b"old"))));
        let moved = Background::new();
        assert!(Arc::ptr_eq(&c.freeze(|_| moved.clone()), &moved));
        assert!(c.frozen.is_some() && !moved.is_done(), "frozen and still moving");
        assert!(matches!(c.get(0, &key(b"k1")), Cached::Value(v) if v == b"old"));
        c.put(0, key(b"k1"), None);
        assert!(matches!(c.get(0, &key(b"k1")), Cached::Deleted));
        assert!(matches!(c.get(0, &key(b"k2")), Cached::Miss));
        c.register(1);
        assert!(
            matches!(c.get(1, &key(b"k1")), Cached::Miss),
            "the same key of another state"
        );
        assert_eq!(c.scan(0, b"k"), vec![(&b"k1"[..], None)]);
        moved.finish(Ok(()));
        c.settle().unwrap();
        assert!(c.frozen.is_none(), "settled: the frozen cache is let go");
        let mut over = false;
        for i in 0..10u8 {
            over |= c.put(0, key(&[b'x', i]), Some(Value::from_slice(&[0; 8])));
        }
        assert!(over, "ten entries of 112 bytes exceed 200 bytes");
    }

    #[test]
    fn a_failed_move_fails_the_owner_and_cleanup_runs_once() {
        let b = Background::new();
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = ran.clone();
        b.abandon(move || {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);
        b.finish(Err("disk full".into()));
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(b.wait().unwrap_err().to_string().contains("disk full"));
    }

    #[test]
    fn deferred_work_starts_once_when_first_awaited_or_abandoned_and_a_failed_start_is_an_error() {
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counting = |fail: bool| -> Start {
            let started = started.clone();
            Box::new(move |worker: Arc<Background>| {
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if fail {
                    return Err("no worker".into());
                }
                std::thread::spawn(move || worker.finish(Ok(())));
                Ok(())
            })
        };
        let b = Background::deferred(counting(false));
        assert_eq!(
            started.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "not started by creation"
        );
        b.wait().unwrap();
        b.start();
        b.wait().unwrap();
        assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 1);
        let b = Background::deferred(counting(false));
        let (tx, rx) = std::sync::mpsc::channel();
        b.abandon(move || tx.send(()).unwrap());
        rx.recv().unwrap();
        assert_eq!(
            started.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "abandoning starts it"
        );
        let b = Background::deferred(counting(true));
        assert!(b.wait().unwrap_err().to_string().contains("no worker"));
    }
}
