//! The RocksDB backend's write-back cache: the writes since the last checkpoint, kept sorted in
//! memory in front of RocksDB, and the background step that moves them into RocksDB.
//!
//! Why: with the cache, a checkpoint's synchronous part is only "freeze the cache" (a swap).
//! The frozen writes go into RocksDB, are flushed and hard-linked into a native checkpoint on a
//! background thread, while the task goes on writing into a fresh cache. RocksDB therefore sees
//! no task writes between a barrier and its native checkpoint, so the checkpoint holds exactly
//! the state at the barrier. Hot keys are also read and rewritten in memory instead of RocksDB.
//!
//! Reads look in the live cache, then the frozen one, then RocksDB; `None` is a deletion that
//! shadows RocksDB. Each cache also keeps the hashes of its keys: with millions of keys most
//! reads are for keys it does not hold, and a hash probe answers those without descending
//! the sorted tree (a key comparison per step). The tree stays for what needs key order:
//! scans of a key's map entries and moves into RocksDB.
//!
//! The cache is bounded: past its limit it is written to RocksDB on the task thread (after
//! waiting for a frozen cache still being moved, to keep writes in order).

use crate::error::{Error, Result};
use rustc_hash::FxHashSet;
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Cached writes of one state (column family): stored key -> value, or `None` for a deletion.
pub(crate) type Entries = BTreeMap<CacheKey, Option<Vec<u8>>>;

/// A stored key in the cache, ordered as its bytes are, with its first 16 bytes also held as
/// one big-endian integer. Most keys (key group, length, an 8-byte id) fit in it whole, so the
/// tree tells two keys apart with one integer comparison rather than a `memcmp` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheKey {
    head: u128,
    bytes: Vec<u8>,
}

impl CacheKey {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl From<Vec<u8>> for CacheKey {
    fn from(bytes: Vec<u8>) -> Self {
        let mut head = [0u8; 16];
        let n = bytes.len().min(16);
        head[..n].copy_from_slice(&bytes[..n]);
        Self {
            head: u128::from_be_bytes(head),
            bytes,
        }
    }
}

/// Byte order: heads that differ differ as the bytes do (zero padding sorts a key before its
/// extensions, which are either larger there or equal and then longer); equal heads fall back
/// to the bytes.
impl Ord for CacheKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.head.cmp(&other.head).then_with(|| self.bytes.cmp(&other.bytes))
    }
}

impl PartialOrd for CacheKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The hashes of the keys (with their state) of one cache's entries.
type KeyHashes = FxHashSet<u64>;

/// Bytes charged per cached entry on top of its key's and value's bytes: its tree slot (a
/// 48-byte key, a 24-byte value) in nodes about 3/4 full, its key hash's slot, and the
/// allocator's rounding of the two allocations.
const ENTRY_OVERHEAD: usize = 112;

/// Default bound of one subtask's live cache: about a million entries of small keys and values
/// (as many as 64 MiB held while entries were charged only part of their overhead).
pub(crate) const DEFAULT_LIMIT: usize = 128 << 20;

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
    live_keys: KeyHashes,
    live_bytes: usize,
    limit: usize,
    frozen: Option<Frozen>,
    /// Frozen caches already in RocksDB, kept until a background thread can free them: freeing
    /// hundreds of thousands of entries takes milliseconds the task thread should not spend.
    retired: Vec<Frozen>,
}

/// Writes frozen at a barrier, readable until they are in RocksDB.
pub(crate) struct Frozen {
    entries: Arc<Vec<Entries>>,
    keys: KeyHashes,
    moved: Arc<Background>,
}

impl WriteCache {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            live: Vec::new(),
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

    /// Makes room for state `id`.
    pub(crate) fn register(&mut self, id: usize) {
        if self.live.len() <= id {
            self.live.resize_with(id + 1, Entries::new);
        }
    }

    pub(crate) fn get(&self, id: usize, key: &CacheKey) -> Cached<'_> {
        let h = key_hash(id, key.as_bytes());
        let live = self.live_keys.contains(&h).then(|| self.live[id].get(key));
        let found = live.flatten().or_else(|| {
            let f = self.frozen.as_ref().filter(|f| f.keys.contains(&h))?;
            f.entries.get(id)?.get(key)
        });
        match found {
            Some(Some(v)) => Cached::Value(v),
            Some(None) => Cached::Deleted,
            None => Cached::Miss,
        }
    }

    /// Records a write (`None`: a deletion). Returns whether the cache is now over its limit.
    pub(crate) fn put(&mut self, id: usize, key: CacheKey, value: Option<Vec<u8>>) -> bool {
        let new_len = value.as_ref().map_or(0, Vec::len);
        match self.live[id].entry(key) {
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                let old_len = slot.get().as_ref().map_or(0, Vec::len);
                self.live_bytes = (self.live_bytes + new_len).saturating_sub(old_len);
                slot.insert(value);
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                self.live_bytes += slot.key().bytes.len() + new_len + ENTRY_OVERHEAD;
                self.live_keys.insert(key_hash(id, slot.key().as_bytes()));
                slot.insert(value);
            }
        }
        self.live_bytes > self.limit
    }

    /// The cached entries of state `id` whose keys start with `prefix`, live over frozen, in
    /// key order (deletions included).
    pub(crate) fn scan(&self, id: usize, prefix: &[u8]) -> Vec<(&[u8], Option<&[u8]>)> {
        let live = prefixed(&self.live[id], prefix);
        match self.frozen.as_ref().and_then(|f| f.entries.get(id)) {
            Some(frozen) => merge_sorted(live, prefixed(frozen, prefix)),
            None => live,
        }
    }

    /// Takes the live writes out (to write them to RocksDB); their key hashes go.
    pub(crate) fn take_live(&mut self) -> Vec<Entries> {
        self.take_live_with_keys().0
    }

    fn take_live_with_keys(&mut self) -> (Vec<Entries>, KeyHashes) {
        self.live_bytes = 0;
        let n = self.live.len();
        let entries = std::mem::replace(&mut self.live, (0..n).map(|_| Entries::new()).collect());
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

fn prefixed<'a>(map: &'a Entries, prefix: &[u8]) -> Vec<(&'a [u8], Option<&'a [u8]>)> {
    map.range((Bound::Included(CacheKey::from(prefix.to_vec())), Bound::Unbounded))
        .take_while(|(k, _)| k.bytes.starts_with(prefix))
        .map(|(k, v)| (k.as_bytes(), v.as_deref()))
        .collect()
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
        bytes.to_vec().into()
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

        /// A scan returns exactly the cached keys that start with the prefix, in byte order.
        #[test]
        fn scans_return_exactly_the_prefixed_keys_in_order(
            keys in proptest::collection::btree_set(
                proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..20), 0..40),
            prefix in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8)], 0..4),
        ) {
            let mut c = WriteCache::new(usize::MAX);
            c.register(0);
            for k in &keys {
                c.put(0, key(k), Some(vec![]));
            }
            let got: Vec<&[u8]> = c.scan(0, &prefix).into_iter().map(|(k, _)| k).collect();
            let want: Vec<&[u8]> = keys.iter().filter(|k| k.starts_with(&prefix)).map(Vec::as_slice).collect();
            prop_assert_eq!(got, want);
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
    fn the_live_cache_shadows_the_frozen_one_and_reports_its_limit() {
        let mut c = WriteCache::new(200);
        c.register(0);
        assert!(!c.put(0, key(b"k1"), Some(b"old".to_vec())));
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
            over |= c.put(0, vec![b'x', i].into(), Some(vec![0; 8]));
        }
        assert!(over, "ten entries of about 122 bytes exceed 200 bytes");
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
