//! Keyed state as operators see it: typed handles (`ValueState`, `ListState`, `MapState`,
//! `ReducingState`) that read and write the state of the current record's key through a
//! [`KeyedContext`]. The handles know nothing of where state lives: [`KeyedBackend`] dispatches to
//! the memory backend or to RocksDB, and both speak the same canonical snapshot format. A state
//! may be registered with a time-to-live ([`StateTtlConfig`], see `ttl.rs`).

#[cfg(all(test, feature = "rocksdb"))]
mod conformance;
mod cow;
#[cfg(feature = "rocksdb")]
mod entry_cache;
mod memory;
mod prefetch;
#[cfg(feature = "rocksdb")]
mod rocks;
#[cfg(feature = "rocksdb")]
mod rocks_ffi;
mod small_map;
mod timers;
mod ttl;
#[cfg(feature = "rocksdb")]
mod write_cache;

pub use memory::MemoryBackend;
#[cfg(feature = "rocksdb")]
pub use rocks::{RocksBackend, RocksSnapshot};
pub use timers::TimeDomain;
pub(crate) use timers::{TimerQueue, TimerService};
pub use ttl::{StateTtlConfig, TtlUpdateType};

use crate::config::StateBackendKind;
use crate::element::Timestamp;
use crate::error::{Error, Result};
use crate::keygroup::{key_group_for_bytes, KeyGroup, KeyGroupRange};
use crate::snapshot::{KeyGroupIndex, RestoredKeyGroups, StateFileWriter};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

/// What a key must be: serializable (its bytes choose the key group), hashable, cloneable.
pub trait Key: Serialize + DeserializeOwned + Hash + Eq + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Hash + Eq + Clone + Send + Sync + 'static> Key for T {}

/// What a state value must be.
pub trait StateValue: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> StateValue for T {}

/// The current key: the value, its canonical bytes and its key group.
pub(crate) struct CurrentKey<'a, K> {
    pub key: &'a K,
    pub bytes: &'a [u8],
    pub key_group: KeyGroup,
    /// Position of the key group in the backend's range.
    pub index: usize,
}

impl<'a, K> CurrentKey<'a, K> {
    /// `key` (serialized: `bytes`) as the current key of a backend owning key groups `range`;
    /// an error if its key group is not among them.
    pub(crate) fn new(key: &'a K, bytes: &'a [u8], max_parallelism: u16, range: KeyGroupRange) -> Result<Self> {
        let key_group = key_group_for_bytes(bytes, max_parallelism);
        if !range.contains(key_group) {
            return Err(Error::User(format!(
                "a key of key group {} reached the subtask owning key groups {range}",
                key_group.0
            )));
        }
        Ok(Self {
            key,
            bytes,
            key_group,
            index: range.index_of(key_group),
        })
    }
}

impl<'a, K> CurrentKey<'a, K> {
    /// `key` of the key group at position `index` of `range` (known, as a timer's is).
    pub(crate) fn at(key: &'a K, bytes: &'a [u8], range: KeyGroupRange, index: usize) -> Self {
        Self {
            key,
            bytes,
            key_group: KeyGroup(range.start + index as u16),
            index,
        }
    }
}

/// The record's key and the backend, while a keyed function runs.
pub struct KeyedContext<'a, K> {
    pub(crate) cur: CurrentKey<'a, K>,
    pub(crate) backend: &'a mut KeyedBackend,
    /// The operator's timers; `None` outside a keyed operator (tools, tests).
    pub(crate) timers: Option<&'a mut TimerService>,
    /// Processing time (ms since the Unix epoch), read once per batch or timer round; never
    /// goes back (see [`KeyedBackend::advance_processing_time`]).
    pub(crate) now: Timestamp,
}

/// The wall clock in ms since the Unix epoch: processing time.
pub fn processing_time_now() -> Timestamp {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl<K> KeyedContext<'_, K> {
    /// The key of the record being processed.
    pub fn key(&self) -> &K {
        self.cur.key
    }

    /// Its key group.
    pub fn key_group(&self) -> KeyGroup {
        self.cur.key_group
    }

    /// The operator's event-time clock: the last watermark it received.
    pub fn current_watermark(&self) -> Timestamp {
        self.timers.as_ref().map_or(Timestamp::MIN, |t| t.watermark())
    }

    /// Processing time (ms since the Unix epoch) as of the batch being processed.
    pub fn current_processing_time(&self) -> Timestamp {
        self.now
    }
}

impl<K: Key> KeyedContext<'_, K> {
    fn timer_queue(&mut self, domain: TimeDomain) -> Result<(&mut TimerQueue, &mut KeyedBackend, &CurrentKey<'_, K>)> {
        match self.timers.as_deref_mut() {
            Some(t) => Ok((t.queue(domain), &mut *self.backend, &self.cur)),
            None => Err(Error::User("timers exist only inside a keyed process function".into())),
        }
    }

    fn register_timer(&mut self, domain: TimeDomain, timestamp: Timestamp) -> Result<()> {
        let (queue, backend, cur) = self.timer_queue(domain)?;
        if queue.insert(timestamp, cur.bytes, cur.index) {
            if let Some(state) = queue.stored_state() {
                backend.map_put::<K, Timestamp, ()>(state, cur, timestamp, ())?;
            }
        }
        Ok(())
    }

    fn delete_timer(&mut self, domain: TimeDomain, timestamp: Timestamp) -> Result<()> {
        let (queue, backend, cur) = self.timer_queue(domain)?;
        if queue.remove(timestamp, cur.bytes, cur.index) {
            if let Some(state) = queue.stored_state() {
                backend.map_remove::<K, Timestamp, ()>(state, cur, &timestamp)?;
            }
        }
        Ok(())
    }

    /// Calls `on_timer` for the current key once the watermark reaches `timestamp` (once per
    /// key and timestamp). Timers are keyed state: checkpointed, restored and rescaled with it.
    pub fn register_event_time_timer(&mut self, timestamp: Timestamp) -> Result<()> {
        self.register_timer(TimeDomain::EventTime, timestamp)
    }

    /// Removes the current key's event-time timer at `timestamp`, if any.
    pub fn delete_event_time_timer(&mut self, timestamp: Timestamp) -> Result<()> {
        self.delete_timer(TimeDomain::EventTime, timestamp)
    }

    /// Calls `on_processing_time_timer` for the current key once the wall clock reaches
    /// `timestamp` (ms since the Unix epoch). Checkpointed like event-time timers; one restored
    /// after its time fires at once. Timers still pending when the input ends are dropped, as
    /// in Flink: a finished job has no processing time left.
    pub fn register_processing_time_timer(&mut self, timestamp: Timestamp) -> Result<()> {
        self.register_timer(TimeDomain::ProcessingTime, timestamp)
    }

    /// Removes the current key's processing-time timer at `timestamp`, if any.
    pub fn delete_processing_time_timer(&mut self, timestamp: Timestamp) -> Result<()> {
        self.delete_timer(TimeDomain::ProcessingTime, timestamp)
    }
}

/// Keyed state of one operator subtask, in memory or in RocksDB.
pub enum KeyedBackend {
    /// Hash maps per key group, copy-on-write snapshots.
    Memory(MemoryBackend),
    /// One RocksDB instance, a column family per state, keys prefixed by key group.
    #[cfg(feature = "rocksdb")]
    RocksDb(Box<RocksBackend>),
}

/// A frozen view of a backend's state, persisted off the task thread.
pub enum KeyedSnapshot {
    /// The memory backend's copy-on-write view; written as canonical key-group blocks.
    Memory(memory::MemorySnapshot),
    /// A RocksDB native checkpoint on local disk.
    #[cfg(feature = "rocksdb")]
    RocksDb(RocksSnapshot),
}

impl KeyedSnapshot {
    /// The canonical key-group blocks of `range` (all when `None`), as a savepoint restore
    /// hands them to a backend (tests).
    #[cfg(test)]
    pub(crate) fn canonical_blocks(&self, range: Option<KeyGroupRange>) -> RestoredKeyGroups {
        let mut w = StateFileWriter::new();
        let index = self.write_canonical(&mut w).expect("canonical write");
        let file = w.finish();
        let blocks = range
            .unwrap_or(index.range)
            .iter()
            .map(|kg| {
                let off = index.offsets[index.range.index_of(kg)];
                let block = crate::snapshot::read_block(&file, off, "test").expect("a written block");
                (kg, block.to_vec())
            })
            .collect();
        RestoredKeyGroups {
            blocks,
            rocksdb: vec![],
        }
    }

    /// Writes canonical key-group blocks (savepoints; the memory backend's checkpoints too).
    pub fn write_canonical(&self, w: &mut StateFileWriter) -> Result<KeyGroupIndex> {
        match self {
            KeyedSnapshot::Memory(m) => m.write(w),
            #[cfg(feature = "rocksdb")]
            KeyedSnapshot::RocksDb(r) => r.write_canonical(w),
        }
    }
}

/// Identifies a registered state inside its backend.
pub(crate) type StateId = usize;

macro_rules! dispatch {
    ($self:expr, $b:ident => $e:expr) => {
        match $self {
            KeyedBackend::Memory($b) => $e,
            #[cfg(feature = "rocksdb")]
            KeyedBackend::RocksDb($b) => $e,
        }
    };
}

impl KeyedBackend {
    /// A memory backend for `range`.
    pub fn memory(range: KeyGroupRange) -> Self {
        KeyedBackend::Memory(MemoryBackend::new(range))
    }

    /// The backend of `kind` for `range`, working in `local_dir` (RocksDB only).
    pub fn open(
        kind: StateBackendKind,
        range: KeyGroupRange,
        local_dir: &std::path::Path,
        restored: RestoredKeyGroups,
        rocksdb: crate::config::RocksDbSettings,
    ) -> Result<Self> {
        match kind {
            StateBackendKind::Memory => {
                if !restored.rocksdb.is_empty() {
                    return Err(Error::Incompatible(
                        "the snapshot holds RocksDB native state, which only the rocksdb state backend reads \
                         (restore it with --state-backend rocksdb, or restore a canonical savepoint)"
                            .into(),
                    ));
                }
                let mut m = MemoryBackend::new(range);
                m.set_restored(restored);
                Ok(KeyedBackend::Memory(m))
            }
            #[cfg(feature = "rocksdb")]
            StateBackendKind::RocksDb { incremental } => Ok(KeyedBackend::RocksDb(Box::new(RocksBackend::open(
                range,
                local_dir,
                restored,
                incremental,
                rocksdb,
            )?))),
            #[cfg(not(feature = "rocksdb"))]
            StateBackendKind::RocksDb { .. } => {
                let _ = (local_dir, rocksdb);
                Err(Error::Config(
                    "this binary was built without the rocksdb feature".into(),
                ))
            }
        }
    }

    /// The key groups this backend owns.
    pub fn range(&self) -> KeyGroupRange {
        dispatch!(self, b => b.range())
    }

    /// Whether no state has been registered.
    pub fn is_empty(&self) -> bool {
        dispatch!(self, b => b.is_empty())
    }

    /// Takes a snapshot for checkpoint `id`; cheap on the task thread.
    pub fn snapshot(&mut self, id: crate::CheckpointId) -> Result<KeyedSnapshot> {
        let _ = id;
        match self {
            KeyedBackend::Memory(m) => Ok(KeyedSnapshot::Memory(m.snapshot())),
            #[cfg(feature = "rocksdb")]
            KeyedBackend::RocksDb(r) => Ok(KeyedSnapshot::RocksDb(r.snapshot(id)?)),
        }
    }

    /// Checkpoint `id` is complete: incremental backends may now reference its files.
    pub fn checkpoint_complete(&mut self, id: crate::CheckpointId) {
        #[cfg(feature = "rocksdb")]
        if let KeyedBackend::RocksDb(r) = self {
            r.checkpoint_complete(id);
        }
        let _ = id;
    }

    /// Registers states on this backend (operators get a registry in `open`).
    pub fn registry<K: Key>(&mut self) -> crate::operator::StateRegistry<'_, K> {
        crate::operator::StateRegistry::new(self)
    }

    /// The backend's processing time: the `now` of the latest batch or timer round (or
    /// `with_key`), `Timestamp::MIN` before the first. TTL states' whole-state scans (`entries`,
    /// `all_entries`) judge expiry by it, and RocksDB's TTL compaction filters never judge by a
    /// later time, so they drop only what every read from then on treats as absent.
    pub fn processing_time(&self) -> Timestamp {
        dispatch!(self, b => b.processing_time())
    }

    /// Moves the backend's processing time on to `wall` (the wall clock, read once per batch or
    /// timer round) and returns it: the `now` for that batch. Processing time never goes back,
    /// also when the wall clock does.
    pub fn advance_processing_time(&mut self, wall: Timestamp) -> Timestamp {
        dispatch!(self, b => b.advance_processing_time(wall))
    }

    /// Runs `f` with `key` as the current key (for tests and tools; operators get a context), at
    /// the processing time of the wall clock now.
    pub fn with_key<K: Key, R>(
        &mut self,
        key: &K,
        max_parallelism: u16,
        f: impl FnOnce(&mut KeyedContext<'_, K>) -> R,
    ) -> Result<R> {
        let now = self.advance_processing_time(processing_time_now());
        self.with_key_at(key, max_parallelism, now, f)
    }

    /// [`Self::with_key`] at the processing time `now` (tests of time-dependent state), which
    /// becomes the backend's processing time if later. Time must not go back from one call to
    /// the next: RocksDB's compaction may already have dropped what expired by the latest.
    pub fn with_key_at<K: Key, R>(
        &mut self,
        key: &K,
        max_parallelism: u16,
        now: Timestamp,
        f: impl FnOnce(&mut KeyedContext<'_, K>) -> R,
    ) -> Result<R> {
        let bytes = postcard::to_allocvec(key)?;
        let cur = CurrentKey::new(key, &bytes, max_parallelism, self.range())?;
        self.advance_processing_time(now);
        let mut ctx = KeyedContext {
            cur,
            backend: self,
            timers: None,
            now,
        };
        Ok(f(&mut ctx))
    }

    /// Registers state `name`, with `ttl` if any, under the name it is stored under
    /// ([`ttl::stored_name`]): on the memory backend through `memory` (which knows the stored
    /// types), on RocksDB by name alone (it stores bytes). The checks for both backends: a state
    /// registered again must have the same TTL, and a restored state must have been stored with
    /// a TTL exactly when it is registered with one.
    fn register_checked(
        &mut self,
        name: &str,
        ttl: Option<&StateTtlConfig>,
        memory: impl FnOnce(&mut MemoryBackend, &str) -> Result<StateId>,
    ) -> Result<StateId> {
        let stored = ttl::stored_name(name, ttl.is_some());
        let other = ttl::stored_name(name, ttl.is_none());
        let earlier = dispatch!(&*self, b => b.registered_ttl(&stored).or_else(|| b.registered_ttl(&other)));
        match earlier {
            Some(earlier) if earlier.as_ref() != ttl => {
                return Err(Error::Config(format!(
                    "state '{name}' is registered twice with different TTLs ({earlier:?} and {ttl:?})"
                )));
            }
            Some(_) => {}
            None if dispatch!(&*self, b => b.restored_state(&other)) => {
                let (then, now) = if ttl.is_some() {
                    ("without a TTL", "with one")
                } else {
                    ("with a TTL", "without one")
                };
                return Err(Error::Incompatible(format!(
                    "state '{name}' is restored from a snapshot holding it {then}, but registered {now}: \
                     adding or removing a state's TTL is not a compatible change (its values are stored \
                     differently); give the state a new name"
                )));
            }
            None => {}
        }
        match self {
            KeyedBackend::Memory(m) => memory(m, &stored),
            #[cfg(feature = "rocksdb")]
            KeyedBackend::RocksDb(r) => r.register(&stored, ttl),
        }
    }

    pub(crate) fn register_value<K: Key, V: StateValue>(&mut self, name: &str) -> Result<StateId> {
        self.register_checked(name, None, |m, name| m.register_value::<K, V>(name))
    }

    pub(crate) fn register_map<K: Key, UK: Key, UV: StateValue>(&mut self, name: &str) -> Result<StateId> {
        self.register_checked(name, None, |m, name| m.register_map::<K, UK, UV>(name))
    }

    /// Registers a value (or reducing) state whose values expire after `cfg`'s TTL.
    pub(crate) fn register_ttl_value<K: Key, V: StateValue>(
        &mut self,
        name: &str,
        cfg: &StateTtlConfig,
    ) -> Result<StateId> {
        self.register_checked(name, Some(cfg), |m, name| m.register_ttl_value::<K, V>(name, cfg))
    }

    /// Registers a list state whose elements expire after `cfg`'s TTL.
    pub(crate) fn register_ttl_list<K: Key, V: StateValue>(
        &mut self,
        name: &str,
        cfg: &StateTtlConfig,
    ) -> Result<StateId> {
        self.register_checked(name, Some(cfg), |m, name| m.register_ttl_list::<K, V>(name, cfg))
    }

    /// Registers a map state whose entries expire after `cfg`'s TTL.
    pub(crate) fn register_ttl_map<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        name: &str,
        cfg: &StateTtlConfig,
    ) -> Result<StateId> {
        self.register_checked(name, Some(cfg), |m, name| m.register_ttl_map::<K, UK, UV>(name, cfg))
    }

    /// A TTL state was used at `now`: the memory backend's incremental cleanup advances.
    pub(crate) fn ttl_accessed(&mut self, id: StateId, now: Timestamp) {
        match self {
            KeyedBackend::Memory(m) => m.ttl_accessed(id, now),
            // RocksDB drops expired entries in compaction instead.
            #[cfg(feature = "rocksdb")]
            KeyedBackend::RocksDb(_) => {}
        }
    }

    /// Test hook: how many entries state `id` holds, expired ones included (memory: keys;
    /// RocksDB: stored entries, the write cache merged over RocksDB).
    #[cfg(test)]
    pub(crate) fn stored_entries(&self, id: StateId) -> Result<usize> {
        dispatch!(self, b => b.stored_entries(id))
    }

    pub(crate) fn value_get<K: Key, V: StateValue>(&self, id: StateId, c: &CurrentKey<'_, K>) -> Result<Option<V>> {
        dispatch!(self, b => b.value_get::<K, V>(id, c))
    }

    pub(crate) fn value_put<K: Key, V: StateValue>(&mut self, id: StateId, c: &CurrentKey<'_, K>, v: V) -> Result<()> {
        dispatch!(self, b => b.value_put::<K, V>(id, c, v))
    }

    pub(crate) fn value_update<K: Key, V: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        default: impl FnOnce() -> V,
        f: impl FnOnce(&mut V),
    ) -> Result<()> {
        dispatch!(self, b => b.value_update::<K, V>(id, c, default, f))
    }

    pub(crate) fn value_remove<K: Key, V: StateValue>(&mut self, id: StateId, c: &CurrentKey<'_, K>) -> Result<()> {
        dispatch!(self, b => b.value_remove::<K, V>(id, c))
    }

    pub(crate) fn value_entries<K: Key, V: StateValue>(&self, id: StateId) -> Result<Vec<(K, V)>> {
        dispatch!(self, b => b.value_entries::<K, V>(id))
    }

    pub(crate) fn map_get<K: Key, UK: Key, UV: StateValue>(
        &self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: &UK,
    ) -> Result<Option<UV>> {
        dispatch!(self, b => b.map_get::<K, UK, UV>(id, c, uk))
    }

    pub(crate) fn map_put<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: UK,
        uv: UV,
    ) -> Result<()> {
        dispatch!(self, b => b.map_put::<K, UK, UV>(id, c, uk, uv))
    }

    pub(crate) fn map_remove<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: &UK,
    ) -> Result<()> {
        dispatch!(self, b => b.map_remove::<K, UK, UV>(id, c, uk))
    }

    pub(crate) fn map_update<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: UK,
        default: impl FnOnce() -> UV,
        f: impl FnOnce(&mut UV),
    ) -> Result<bool> {
        dispatch!(self, b => b.map_update::<K, UK, UV>(id, c, uk, default, f))
    }

    pub(crate) fn map_entries<K: Key, UK: Key, UV: StateValue>(
        &self,
        id: StateId,
        c: &CurrentKey<'_, K>,
    ) -> Result<Vec<(UK, UV)>> {
        dispatch!(self, b => b.map_entries::<K, UK, UV>(id, c))
    }

    /// Lends the current key's entries to `f`, borrowed in place where the backend can (no copy
    /// of the map's values in memory), in no particular order.
    pub(crate) fn map_with_entries<K: Key, UK: Key, UV: StateValue, R>(
        &self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        f: impl FnOnce(Entries<'_, UK, UV>) -> R,
    ) -> Result<R> {
        match self {
            KeyedBackend::Memory(b) => Ok(b.map_with_entries::<K, UK, UV, R>(id, c, f)),
            #[cfg(feature = "rocksdb")]
            KeyedBackend::RocksDb(b) => b.map_with_entries::<K, UK, UV, R>(id, c, f),
        }
    }

    /// Starts loading what the key (serialized as `key`, of the key group at position `index`)
    /// holds outside its slots into the caches, so that reading it soon after waits less for
    /// memory: the memory backend's map state vectors. A hint: nothing changes.
    pub(crate) fn prefetch<K: Key>(&self, key: &[u8], index: usize) {
        match self {
            KeyedBackend::Memory(b) => {
                if let Ok(key) = postcard::from_bytes::<K>(key) {
                    b.prefetch(index, &key);
                }
            }
            #[cfg(feature = "rocksdb")]
            KeyedBackend::RocksDb(_) => {}
        }
    }

    pub(crate) fn map_clear<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
    ) -> Result<()> {
        dispatch!(self, b => b.map_clear::<K, UK, UV>(id, c))
    }

    pub(crate) fn map_all<K: Key, UK: Key, UV: StateValue>(&self, id: StateId) -> Result<Vec<(K, UK, UV)>> {
        dispatch!(self, b => b.map_all::<K, UK, UV>(id))
    }
}

/// Zero-sized type marker for state handles (keeps handles `Send + Sync` whatever the types).
type Marker<T> = PhantomData<fn() -> T>;

/// Folds two values into one, for [`ReducingState`].
pub type ReduceFn<V> = Arc<dyn Fn(&V, &V) -> V + Send + Sync>;

/// A single value per key.
pub struct ValueState<K, V> {
    id: StateId,
    /// With a TTL, values are stored with their timestamps (see [`StateTtlConfig`]).
    ttl: Option<StateTtlConfig>,
    _t: Marker<(K, V)>,
}

/// A list of values per key.
pub struct ListState<K, V> {
    id: StateId,
    ttl: Option<StateTtlConfig>,
    _t: Marker<(K, V)>,
}

/// A key's map entries lent to a reader: most as runs of contiguous entries, so that a reader
/// loops over slices (and may search them) rather than calling an iterator per entry.
pub(crate) enum Entries<'a, K, V> {
    /// Runs of contiguous entries, read one after the other.
    Runs(&'a [&'a [(K, V)]]),
    /// Entries one at a time (a memory backend's map too large for a vector), not copied.
    Each(&'a mut dyn Iterator<Item = (&'a K, &'a V)>),
}

impl<'a, K, V> Entries<'a, K, V> {
    /// Calls `f` with every entry.
    pub fn for_each(self, mut f: impl FnMut(&'a K, &'a V)) {
        match self {
            Entries::Runs(runs) => runs.iter().flat_map(|run| run.iter()).for_each(|(k, v)| f(k, v)),
            Entries::Each(entries) => entries.for_each(|(k, v)| f(k, v)),
        }
    }
}

/// A map per key.
pub struct MapState<K, UK, UV> {
    id: StateId,
    ttl: Option<StateTtlConfig>,
    _t: Marker<(K, UK, UV)>,
}

/// A value per key that folds every added value with a reduce function.
pub struct ReducingState<K, V> {
    /// The reduced value: a value state.
    value: ValueState<K, V>,
    reduce: ReduceFn<V>,
}

macro_rules! handle_clone {
    ($t:ident < $($p:ident),* >) => {
        impl<$($p),*> Clone for $t<$($p),*> {
            fn clone(&self) -> Self {
                Self { id: self.id, ttl: self.ttl, _t: PhantomData }
            }
        }
    };
}
handle_clone!(ValueState<K, V>);
handle_clone!(ListState<K, V>);
handle_clone!(MapState<K, UK, UV>);

impl<K, V> Clone for ReducingState<K, V> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            reduce: self.reduce.clone(),
        }
    }
}

// Reads take the context mutably: with a TTL a read may remove an expired value or refresh
// the timestamp of a live one. Without a TTL every operation is the plain backend call.

impl<K: Key, V: StateValue> ValueState<K, V> {
    /// Registers the state `name` on `backend`, with its values' TTL if any.
    pub(crate) fn register(backend: &mut KeyedBackend, name: &str, ttl: Option<StateTtlConfig>) -> Result<Self> {
        let id = match &ttl {
            None => backend.register_value::<K, V>(name)?,
            Some(cfg) => backend.register_ttl_value::<K, V>(name, cfg)?,
        };
        Ok(Self {
            id,
            ttl,
            _t: PhantomData,
        })
    }

    /// The value of the current key.
    pub fn get(&self, ctx: &mut KeyedContext<'_, K>) -> Result<Option<V>> {
        match &self.ttl {
            None => ctx.backend.value_get::<K, V>(self.id, &ctx.cur),
            Some(cfg) => ttl::value_get(ctx, self.id, cfg),
        }
    }

    /// Sets the value of the current key.
    pub fn update(&self, ctx: &mut KeyedContext<'_, K>, value: V) -> Result<()> {
        match &self.ttl {
            None => ctx.backend.value_put::<K, V>(self.id, &ctx.cur, value),
            Some(_) => ttl::value_put(ctx, self.id, value),
        }
    }

    /// Changes the value of the current key, starting from `default` when absent (or expired).
    pub fn update_with(
        &self,
        ctx: &mut KeyedContext<'_, K>,
        default: impl FnOnce() -> V,
        f: impl FnOnce(&mut V),
    ) -> Result<()> {
        match &self.ttl {
            None => ctx.backend.value_update::<K, V>(self.id, &ctx.cur, default, f),
            Some(cfg) => ttl::value_update(ctx, self.id, cfg, default, f),
        }
    }

    /// Removes the value of the current key.
    pub fn clear(&self, ctx: &mut KeyedContext<'_, K>) -> Result<()> {
        match &self.ttl {
            None => ctx.backend.value_remove::<K, V>(self.id, &ctx.cur),
            Some(_) => ttl::value_remove::<K, V>(ctx, self.id),
        }
    }

    /// Every (key, value) of this subtask, e.g. to emit results at the end of input. With a TTL,
    /// the values unexpired as of the backend's processing time (at the end of input: the wall
    /// clock then; see [`KeyedBackend::processing_time`]).
    pub fn entries(&self, backend: &KeyedBackend) -> Result<Vec<(K, V)>> {
        match &self.ttl {
            None => backend.value_entries::<K, V>(self.id),
            Some(cfg) => ttl::value_entries(backend, self.id, cfg),
        }
    }
}

impl<K: Key, V: StateValue> ListState<K, V> {
    /// Registers the state `name` on `backend`, with its elements' TTL if any.
    pub(crate) fn register(backend: &mut KeyedBackend, name: &str, ttl: Option<StateTtlConfig>) -> Result<Self> {
        let id = match &ttl {
            None => backend.register_value::<K, Vec<V>>(name)?,
            Some(cfg) => backend.register_ttl_list::<K, V>(name, cfg)?,
        };
        Ok(Self {
            id,
            ttl,
            _t: PhantomData,
        })
    }

    /// The list of the current key (empty when absent).
    pub fn get(&self, ctx: &mut KeyedContext<'_, K>) -> Result<Vec<V>> {
        match &self.ttl {
            None => Ok(ctx
                .backend
                .value_get::<K, Vec<V>>(self.id, &ctx.cur)?
                .unwrap_or_default()),
            Some(cfg) => ttl::list_get(ctx, self.id, cfg),
        }
    }

    /// Appends to the list of the current key.
    pub fn add(&self, ctx: &mut KeyedContext<'_, K>, value: V) -> Result<()> {
        match &self.ttl {
            None => ctx
                .backend
                .value_update::<K, Vec<V>>(self.id, &ctx.cur, Vec::new, |l| l.push(value)),
            Some(cfg) => ttl::list_add(ctx, self.id, cfg, value),
        }
    }

    /// Replaces the list of the current key.
    pub fn update(&self, ctx: &mut KeyedContext<'_, K>, values: Vec<V>) -> Result<()> {
        if values.is_empty() {
            return self.clear(ctx);
        }
        match &self.ttl {
            None => ctx.backend.value_put::<K, Vec<V>>(self.id, &ctx.cur, values),
            Some(_) => ttl::list_put(ctx, self.id, values),
        }
    }

    /// Removes the list of the current key.
    pub fn clear(&self, ctx: &mut KeyedContext<'_, K>) -> Result<()> {
        match &self.ttl {
            None => ctx.backend.value_remove::<K, Vec<V>>(self.id, &ctx.cur),
            Some(_) => ttl::list_remove::<K, V>(ctx, self.id),
        }
    }

    /// Every (key, list) of this subtask. With a TTL, the elements unexpired as of the
    /// backend's processing time (keys with none are left out).
    pub fn entries(&self, backend: &KeyedBackend) -> Result<Vec<(K, Vec<V>)>> {
        match &self.ttl {
            None => backend.value_entries::<K, Vec<V>>(self.id),
            Some(cfg) => ttl::list_entries(backend, self.id, cfg),
        }
    }
}

impl<K: Key, UK: Key, UV: StateValue> MapState<K, UK, UV> {
    /// Registers the state `name` on `backend`, with its entries' TTL if any.
    pub(crate) fn register(backend: &mut KeyedBackend, name: &str, ttl: Option<StateTtlConfig>) -> Result<Self> {
        let id = match &ttl {
            None => backend.register_map::<K, UK, UV>(name)?,
            Some(cfg) => backend.register_ttl_map::<K, UK, UV>(name, cfg)?,
        };
        Ok(Self {
            id,
            ttl,
            _t: PhantomData,
        })
    }

    /// The value under `user_key` for the current key.
    pub fn get(&self, ctx: &mut KeyedContext<'_, K>, user_key: &UK) -> Result<Option<UV>> {
        match &self.ttl {
            None => ctx.backend.map_get::<K, UK, UV>(self.id, &ctx.cur, user_key),
            Some(cfg) => ttl::map_get(ctx, self.id, cfg, user_key),
        }
    }

    /// Puts `user_key -> value` for the current key.
    pub fn put(&self, ctx: &mut KeyedContext<'_, K>, user_key: UK, value: UV) -> Result<()> {
        match &self.ttl {
            None => ctx.backend.map_put::<K, UK, UV>(self.id, &ctx.cur, user_key, value),
            Some(_) => ttl::map_put(ctx, self.id, user_key, value),
        }
    }

    /// Changes the value under `user_key` in place, starting from `default` when absent (or
    /// expired); returns whether it was present.
    pub fn update_with(
        &self,
        ctx: &mut KeyedContext<'_, K>,
        user_key: UK,
        default: impl FnOnce() -> UV,
        f: impl FnOnce(&mut UV),
    ) -> Result<bool> {
        match &self.ttl {
            None => ctx
                .backend
                .map_update::<K, UK, UV>(self.id, &ctx.cur, user_key, default, f),
            Some(cfg) => ttl::map_update(ctx, self.id, cfg, user_key, default, f),
        }
    }

    /// Removes `user_key` for the current key.
    pub fn remove(&self, ctx: &mut KeyedContext<'_, K>, user_key: &UK) -> Result<()> {
        match &self.ttl {
            None => ctx.backend.map_remove::<K, UK, UV>(self.id, &ctx.cur, user_key),
            Some(_) => ttl::map_remove::<K, UK, UV>(ctx, self.id, user_key),
        }
    }

    /// Lends the current key's entries to `f`, borrowed in place where the backend can (windows
    /// merge their panes this way), in no particular order. With a TTL it reads through
    /// `entries`.
    pub(crate) fn with_entries<R>(
        &self,
        ctx: &mut KeyedContext<'_, K>,
        f: impl FnOnce(Entries<'_, UK, UV>) -> R,
    ) -> Result<R> {
        match &self.ttl {
            None => ctx.backend.map_with_entries::<K, UK, UV, R>(self.id, &ctx.cur, f),
            Some(_) => Ok(f(Entries::Runs(&[self.entries(ctx)?.as_slice()]))),
        }
    }

    /// The current key's entries, in no particular order.
    pub fn entries(&self, ctx: &mut KeyedContext<'_, K>) -> Result<Vec<(UK, UV)>> {
        match &self.ttl {
            None => ctx.backend.map_entries::<K, UK, UV>(self.id, &ctx.cur),
            Some(cfg) => ttl::map_entries(ctx, self.id, cfg),
        }
    }

    /// Removes the whole map of the current key.
    pub fn clear(&self, ctx: &mut KeyedContext<'_, K>) -> Result<()> {
        match &self.ttl {
            None => ctx.backend.map_clear::<K, UK, UV>(self.id, &ctx.cur),
            Some(_) => ttl::map_clear::<K, UK, UV>(ctx, self.id),
        }
    }

    /// Every (key, user key, value) of this subtask. With a TTL, the entries unexpired as of
    /// the backend's processing time.
    pub fn all_entries(&self, backend: &KeyedBackend) -> Result<Vec<(K, UK, UV)>> {
        match &self.ttl {
            None => backend.map_all::<K, UK, UV>(self.id),
            Some(cfg) => ttl::map_all(backend, self.id, cfg),
        }
    }
}

impl<K: Key, V: StateValue> ReducingState<K, V> {
    /// Registers the state `name` on `backend`, with its values' TTL if any.
    pub(crate) fn register(
        backend: &mut KeyedBackend,
        name: &str,
        ttl: Option<StateTtlConfig>,
        reduce: ReduceFn<V>,
    ) -> Result<Self> {
        Ok(Self {
            value: ValueState::register(backend, name, ttl)?,
            reduce,
        })
    }

    /// The reduced value of the current key.
    pub fn get(&self, ctx: &mut KeyedContext<'_, K>) -> Result<Option<V>> {
        self.value.get(ctx)
    }

    /// Folds `value` into the current key's value (an expired value is replaced, not folded).
    pub fn add(&self, ctx: &mut KeyedContext<'_, K>, value: V) -> Result<()> {
        // One lookup: the value itself when the key has none yet (or an expired one), else
        // folded into the old one. `first` takes the value, so `fold` then has nothing to fold.
        let value = std::cell::Cell::new(Some(value));
        let first = || value.take().expect("taken once");
        let fold = |old: &mut V| {
            if let Some(v) = value.take() {
                *old = (self.reduce)(old, &v);
            }
        };
        self.value.update_with(ctx, first, fold)
    }

    /// Removes the current key's value.
    pub fn clear(&self, ctx: &mut KeyedContext<'_, K>) -> Result<()> {
        self.value.clear(ctx)
    }

    /// Every (key, value) of this subtask. With a TTL, the values unexpired as of the backend's
    /// processing time.
    pub fn entries(&self, backend: &KeyedBackend) -> Result<Vec<(K, V)>> {
        self.value.entries(backend)
    }
}
