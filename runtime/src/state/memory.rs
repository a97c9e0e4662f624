//! The memory state backend: per state, one hash map per key group.
//!
//! A snapshot moves each key group's map behind an `Arc` and keeps a clone of it (a
//! copy-on-write view costing O(key groups)); the first write to a key group after a snapshot
//! takes the map back, copying it only if the snapshot still holds it. Serialization into the
//! canonical entry format then runs off the task thread. Between snapshots a map is owned
//! outright: an access costs no atomic operation, which would wait for the cache misses of the
//! accesses before it.
//!
//! States with a TTL are cleaned incrementally, so that keys never read again do not stay
//! forever: every access to such a state earns it [`CHECKS_PER_ACCESS`] checks, and once they
//! cover the next key group's keys, that key group is swept (expired values dropped), cycling
//! through the key groups. A sweep is charged one check per element it looks at (a value, a list
//! element, a map entry), however many a key holds; one that costs more than the credit leaves
//! a debt that later accesses pay off before the next sweep. So cleanup costs at most that many
//! element checks per access on average, whatever the sizes of key groups, lists and maps. A
//! sweep copies a key group shared with a snapshot only if it finds something expired, so
//! snapshots in flight never see it.

use super::cow::Cow;
use super::small_map::SmallMap;
use super::ttl::{StateTtlConfig, TtlList, TtlValue};
use super::{CurrentKey, Entries, Key, StateId, StateValue};
use crate::element::Timestamp;
use crate::error::{Error, Result};
use crate::keygroup::KeyGroupRange;
use crate::snapshot::{for_each_entry, state_names, EntryWriter, KeyGroupIndex, RestoredKeyGroups, StateFileWriter};
use rustc_hash::{FxHashMap, FxHashSet};
use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// How a stored value turns into canonical entries and back.
trait Stored: Clone + Send + Sync + 'static {
    fn encode(&self, key: &[u8], w: &mut EntryWriter<'_>) -> Result<()>;
    /// Folds one entry in: into `existing`, or returns a new value.
    fn decode(existing: Option<&mut Self>, namespace: &[u8], value: &[u8]) -> Result<Option<Self>>;
    /// Starts loading what the value holds outside the key's slot into the caches.
    fn prefetch(&self) {}
}

/// Stored form of value state (and of list and reducing state, as values of a `Vec` / fold).
#[derive(Clone)]
struct Single<V>(V);

/// Stored form of map state: small maps inline, then their latest entry inline and the others
/// in a vector, large ones as hash maps (see `small_map.rs`).
#[derive(Clone)]
struct MapEntries<UK, UV>(SmallMap<UK, UV>);

impl<V: StateValue> Stored for Single<V> {
    fn encode(&self, key: &[u8], w: &mut EntryWriter<'_>) -> Result<()> {
        w.entry_of(key, &(), &self.0)
    }

    fn decode(_: Option<&mut Self>, _: &[u8], value: &[u8]) -> Result<Option<Self>> {
        Ok(Some(Single(postcard::from_bytes(value)?)))
    }
}

impl<UK: Key, UV: StateValue> Stored for MapEntries<UK, UV> {
    fn prefetch(&self) {
        // A 1-hour window sliding by the minute: 60 panes, 16 cache lines for `i64` sums.
        self.0.prefetch(PREFETCH_LINES);
    }

    fn encode(&self, key: &[u8], w: &mut EntryWriter<'_>) -> Result<()> {
        self.0.iter().try_for_each(|(uk, uv)| w.entry_of(key, uk, uv))
    }

    fn decode(existing: Option<&mut Self>, namespace: &[u8], value: &[u8]) -> Result<Option<Self>> {
        let (uk, uv) = (postcard::from_bytes(namespace)?, postcard::from_bytes(value)?);
        match existing {
            Some(m) => {
                m.0.insert(uk, uv);
                Ok(None)
            }
            None => Ok(Some(MapEntries(SmallMap::one(uk, uv)))),
        }
    }
}

/// A stored form whose values carry TTL timestamps.
trait Expiring {
    /// How many timestamped elements it holds: what checking it costs.
    fn checks(&self) -> usize;
    /// Whether any part of it is expired at `now`.
    fn any_expired(&self, cfg: &StateTtlConfig, now: Timestamp) -> bool;
    /// Drops the expired parts; false when nothing is left.
    fn retain_unexpired(&mut self, cfg: &StateTtlConfig, now: Timestamp) -> bool;
}

impl<V> Expiring for Single<TtlValue<V>> {
    fn checks(&self) -> usize {
        1
    }
    fn any_expired(&self, cfg: &StateTtlConfig, now: Timestamp) -> bool {
        cfg.is_expired(self.0.ts, now)
    }
    fn retain_unexpired(&mut self, cfg: &StateTtlConfig, now: Timestamp) -> bool {
        !cfg.is_expired(self.0.ts, now)
    }
}

impl<V> Expiring for Single<TtlList<V>> {
    fn checks(&self) -> usize {
        self.0.elements.len()
    }
    fn any_expired(&self, cfg: &StateTtlConfig, now: Timestamp) -> bool {
        self.0.elements.iter().any(|e| cfg.is_expired(e.ts, now))
    }
    fn retain_unexpired(&mut self, cfg: &StateTtlConfig, now: Timestamp) -> bool {
        self.0.retain_unexpired(cfg, now)
    }
}

impl<UK, UV> Expiring for MapEntries<UK, TtlValue<UV>> {
    fn checks(&self) -> usize {
        self.0.len()
    }
    fn any_expired(&self, cfg: &StateTtlConfig, now: Timestamp) -> bool {
        self.0.values().any(|v| cfg.is_expired(v.ts, now))
    }
    fn retain_unexpired(&mut self, cfg: &StateTtlConfig, now: Timestamp) -> bool {
        self.0.retain(|_, v| !cfg.is_expired(v.ts, now));
        !self.0.is_empty()
    }
}

/// Cache lines of a key's map state that a prefetch asks for at most.
const PREFETCH_LINES: usize = 32;

/// Element checks a TTL state earns per access for its incremental cleanup.
pub(crate) const CHECKS_PER_ACCESS: usize = 16;

/// Incremental cleanup of one TTL state: which key group is next and the checks earned (less
/// than zero: a debt).
struct Sweeper<S> {
    cfg: StateTtlConfig,
    next: usize,
    credit: i64,
    checks: fn(&S) -> usize,
    any_expired: fn(&S, &StateTtlConfig, Timestamp) -> bool,
    retain: fn(&mut S, &StateTtlConfig, Timestamp) -> bool,
}

impl<S: Expiring> Sweeper<S> {
    fn new(cfg: &StateTtlConfig) -> Self {
        Self {
            cfg: *cfg,
            next: 0,
            credit: 0,
            checks: S::checks,
            any_expired: S::any_expired,
            retain: S::retain_unexpired,
        }
    }
}

/// One key group's map, shared with the snapshots that hold it.
type KgMap<K, S> = Cow<FxHashMap<K, S>>;

struct Table<K, S> {
    name: String,
    maps: Vec<KgMap<K, S>>,
    /// Set for states with a TTL.
    sweeper: Option<Sweeper<S>>,
}

impl<K: Key, S: Stored> Table<K, S> {
    /// One access's worth of incremental cleanup (see the module docs).
    fn tick(&mut self, now: Timestamp) {
        let Some(s) = &mut self.sweeper else { return };
        if self.maps.is_empty() {
            return;
        }
        s.credit = s.credit.saturating_add(CHECKS_PER_ACCESS as i64);
        let i = s.next % self.maps.len();
        let map = &mut self.maps[i];
        // Every key holds at least one element: the sweep costs at least its keys.
        if s.credit < map.len() as i64 {
            return;
        }
        s.next = i + 1;
        let (cfg, checks) = (&s.cfg, s.checks);
        let mut checked = 0;
        // Look before copying: a key group shared with a snapshot is copied only to change it.
        let any_expired = map.values().any(|v| {
            checked += checks(v);
            (s.any_expired)(v, cfg, now)
        });
        if any_expired {
            map.to_mut().retain(|_, v| {
                checked += checks(v);
                (s.retain)(v, cfg, now)
            });
        }
        s.credit -= checked as i64;
    }
}

trait ErasedTable: Send {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn snapshot(&mut self) -> Box<dyn TableSnapshot>;
    fn ttl(&self) -> Option<StateTtlConfig>;
    fn tick(&mut self, now: Timestamp);
    /// Drops every key's value.
    fn clear(&mut self);
    /// Starts loading the value of `key` (a `K`) in the key group at position `index`.
    fn prefetch(&self, index: usize, key: &dyn Any);
    /// How many keys it holds.
    #[cfg(test)]
    fn len(&self) -> usize;
}

/// A frozen view of one state, serialized later off the task thread.
pub(crate) trait TableSnapshot: Send + Sync {
    /// Appends the state's entries of the key group at position `index` of the backend's
    /// range (nothing when it has none); returns how many it wrote.
    fn write_key_group(&self, index: usize, out: &mut Vec<u8>) -> Result<u64>;
}

impl<K: Key, S: Stored> ErasedTable for Table<K, S> {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn snapshot(&mut self) -> Box<dyn TableSnapshot> {
        Box::new(FrozenTable::<K, S> {
            name: self.name.clone(),
            maps: self.maps.iter_mut().map(KgMap::share).collect(),
        })
    }
    fn ttl(&self) -> Option<StateTtlConfig> {
        self.sweeper.as_ref().map(|s| s.cfg)
    }
    fn tick(&mut self, now: Timestamp) {
        Table::tick(self, now)
    }
    fn clear(&mut self) {
        self.maps.iter_mut().for_each(|m| *m = KgMap::default());
    }
    fn prefetch(&self, index: usize, key: &dyn Any) {
        if let Some(v) = key.downcast_ref::<K>().and_then(|k| self.maps[index].get(k)) {
            v.prefetch();
        }
    }
    #[cfg(test)]
    fn len(&self) -> usize {
        self.maps.iter().map(|m| m.len()).sum()
    }
}

/// One state as a snapshot holds it.
struct FrozenTable<K, S> {
    name: String,
    maps: Vec<Arc<FxHashMap<K, S>>>,
}

impl<K: Key, S: Stored> TableSnapshot for FrozenTable<K, S> {
    fn write_key_group(&self, index: usize, out: &mut Vec<u8>) -> Result<u64> {
        let map = &self.maps[index];
        if map.is_empty() {
            return Ok(0);
        }
        let mut w = EntryWriter::begin(out, &self.name);
        let mut key_buf = Vec::new();
        for (k, v) in map.iter() {
            key_buf.clear();
            crate::keygroup::extend_key_bytes(k, &mut key_buf)?;
            v.encode(&key_buf, &mut w)?;
        }
        Ok(w.finish())
    }
}

/// Keyed state of one operator subtask in hash maps, for the key groups it owns.
pub struct MemoryBackend {
    range: KeyGroupRange,
    tables: Vec<Box<dyn ErasedTable>>,
    names: Vec<String>,
    restored: RestoredKeyGroups,
    /// The names of the states in `restored`'s key groups of this range.
    restored_names: FxHashSet<String>,
    /// Processing time (see `KeyedBackend::processing_time`).
    clock: Timestamp,
    /// Bytes the latest snapshot serialized to, so that the next one's buffer starts about
    /// that large: doubling its way up would copy what was written at each step and fault in
    /// fresh pages, a few percent of a sliding window job's CPU.
    snapshot_bytes: Arc<AtomicUsize>,
}

impl MemoryBackend {
    /// An empty backend for the key groups in `range`.
    pub fn new(range: KeyGroupRange) -> Self {
        Self {
            range,
            tables: Vec::new(),
            names: Vec::new(),
            restored: RestoredKeyGroups::default(),
            restored_names: FxHashSet::default(),
            clock: Timestamp::MIN,
            snapshot_bytes: Arc::default(),
        }
    }

    /// Hands over restored canonical blocks; states pick their entries up when registered.
    pub fn set_restored(&mut self, restored: RestoredKeyGroups) {
        // A block that cannot be read fails the registration of its states instead.
        self.restored_names = (restored.blocks.iter())
            .filter(|(kg, _)| self.range.contains(*kg))
            .filter_map(|(_, payload)| state_names(payload).ok())
            .flatten()
            .collect();
        self.restored = restored;
    }

    pub(crate) fn processing_time(&self) -> Timestamp {
        self.clock
    }

    pub(crate) fn advance_processing_time(&mut self, wall: Timestamp) -> Timestamp {
        self.clock = self.clock.max(wall);
        self.clock
    }

    /// The TTL of state `name` (as stored) if it is registered.
    pub(crate) fn registered_ttl(&self, name: &str) -> Option<Option<StateTtlConfig>> {
        let id = self.names.iter().position(|n| n == name)?;
        Some(self.tables[id].ttl())
    }

    /// Whether the restored state holds entries of state `name` (as stored).
    pub(crate) fn restored_state(&self, name: &str) -> bool {
        self.restored_names.contains(name)
    }

    /// The key groups this backend owns.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    /// Whether no state has been registered.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    fn register<K: Key, S: Stored>(&mut self, name: &str, sweeper: Option<Sweeper<S>>) -> Result<StateId> {
        // `KeyedBackend` checked the TTL.
        if let Some(id) = self.names.iter().position(|n| n == name) {
            if self.tables[id].as_any().is::<Table<K, S>>() {
                return Ok(id);
            }
            return Err(Error::Config(format!(
                "state '{name}' is registered twice with different types"
            )));
        }
        let mut table = Table::<K, S> {
            name: name.to_string(),
            maps: (0..self.range.len()).map(|_| KgMap::default()).collect(),
            sweeper,
        };
        for (kg, payload) in &self.restored.blocks {
            if !self.range.contains(*kg) {
                continue;
            }
            let map = table.maps[self.range.index_of(*kg)].to_mut();
            for_each_entry(payload, name, |e| {
                let key: K = postcard::from_bytes(e.key)?;
                if let Some(new) = S::decode(map.get_mut(&key), e.namespace, e.value)? {
                    map.insert(key, new);
                }
                Ok(())
            })
            .map_err(|e| Error::Serde(format!("restoring state '{name}': {e}")))?;
        }
        self.tables.push(Box::new(table));
        self.names.push(name.to_string());
        Ok(self.tables.len() - 1)
    }

    pub(crate) fn register_value<K: Key, V: StateValue>(&mut self, name: &str) -> Result<StateId> {
        self.register::<K, Single<V>>(name, None)
    }

    pub(crate) fn register_map<K: Key, UK: Key, UV: StateValue>(&mut self, name: &str) -> Result<StateId> {
        self.register::<K, MapEntries<UK, UV>>(name, None)
    }

    pub(crate) fn register_ttl_value<K: Key, V: StateValue>(
        &mut self,
        name: &str,
        cfg: &StateTtlConfig,
    ) -> Result<StateId> {
        self.register::<K, Single<TtlValue<V>>>(name, Some(Sweeper::new(cfg)))
    }

    pub(crate) fn register_ttl_list<K: Key, V: StateValue>(
        &mut self,
        name: &str,
        cfg: &StateTtlConfig,
    ) -> Result<StateId> {
        self.register::<K, Single<TtlList<V>>>(name, Some(Sweeper::new(cfg)))
    }

    pub(crate) fn register_ttl_map<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        name: &str,
        cfg: &StateTtlConfig,
    ) -> Result<StateId> {
        self.register::<K, MapEntries<UK, TtlValue<UV>>>(name, Some(Sweeper::new(cfg)))
    }

    /// A TTL state was used at `now`: one access's worth of its incremental cleanup.
    pub(crate) fn ttl_accessed(&mut self, id: StateId, now: Timestamp) {
        self.tables[id].tick(now);
    }

    /// Test hook: the keys state `id` holds, expired ones included.
    #[cfg(test)]
    pub(crate) fn stored_entries(&self, id: StateId) -> Result<usize> {
        Ok(self.tables[id].len())
    }

    fn table<K: Key, S: Stored>(&self, id: StateId) -> &Table<K, S> {
        self.tables[id]
            .as_any()
            .downcast_ref()
            .expect("a state handle is only created by `register` with its own types")
    }

    fn map_mut<K: Key, S: Stored>(&mut self, id: StateId, index: usize) -> &mut KgMap<K, S> {
        let table: &mut Table<K, S> = self.tables[id]
            .as_any_mut()
            .downcast_mut()
            .expect("a state handle is only created by `register` with its own types");
        &mut table.maps[index]
    }

    fn slot<K: Key, S: Stored>(&self, id: StateId, c: &CurrentKey<'_, K>) -> Option<&S> {
        self.table::<K, S>(id).maps[c.index].get(c.key)
    }

    /// The stored value of the current key, copying a shared key-group map only when present.
    fn slot_mut<K: Key, S: Stored>(&mut self, id: StateId, c: &CurrentKey<'_, K>) -> Option<&mut S> {
        // Unshared (no snapshot holds it): one lookup. Shared: copy only if the key is there.
        self.map_mut::<K, S>(id, c.index)
            .change_if(|m| m.contains_key(c.key))?
            .get_mut(c.key)
    }

    /// Starts loading what `key` (of the key group at position `index`) holds outside its slots
    /// into the caches. The lookup of each slot itself waits for memory.
    pub(crate) fn prefetch<K: Key>(&self, index: usize, key: &K) {
        for t in &self.tables {
            t.prefetch(index, key);
        }
    }

    pub(crate) fn value_get<K: Key, V: StateValue>(&self, id: StateId, c: &CurrentKey<'_, K>) -> Result<Option<V>> {
        Ok(self.slot::<K, Single<V>>(id, c).map(|s| s.0.clone()))
    }

    pub(crate) fn value_put<K: Key, V: StateValue>(&mut self, id: StateId, c: &CurrentKey<'_, K>, v: V) -> Result<()> {
        match self.slot_mut::<K, Single<V>>(id, c) {
            Some(slot) => slot.0 = v,
            None => {
                self.map_mut::<K, Single<V>>(id, c.index)
                    .to_mut()
                    .insert(c.key.clone(), Single(v));
            }
        }
        Ok(())
    }

    pub(crate) fn value_update<K: Key, V: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        default: impl FnOnce() -> V,
        f: impl FnOnce(&mut V),
    ) -> Result<()> {
        match self.slot_mut::<K, Single<V>>(id, c) {
            Some(slot) => f(&mut slot.0),
            None => {
                let mut v = default();
                f(&mut v);
                self.map_mut::<K, Single<V>>(id, c.index)
                    .to_mut()
                    .insert(c.key.clone(), Single(v));
            }
        }
        Ok(())
    }

    fn remove<K: Key, S: Stored>(&mut self, id: StateId, c: &CurrentKey<'_, K>) {
        let map = self.map_mut::<K, S>(id, c.index);
        if map.contains_key(c.key) {
            map.to_mut().remove(c.key);
        }
    }

    pub(crate) fn value_remove<K: Key, V: StateValue>(&mut self, id: StateId, c: &CurrentKey<'_, K>) -> Result<()> {
        self.remove::<K, Single<V>>(id, c);
        Ok(())
    }

    pub(crate) fn value_entries<K: Key, V: StateValue>(&self, id: StateId) -> Result<Vec<(K, V)>> {
        Ok(self
            .table::<K, Single<V>>(id)
            .maps
            .iter()
            .flat_map(|m| m.iter().map(|(k, v)| (k.clone(), v.0.clone())))
            .collect())
    }

    pub(crate) fn map_get<K: Key, UK: Key, UV: StateValue>(
        &self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: &UK,
    ) -> Result<Option<UV>> {
        Ok(self
            .slot::<K, MapEntries<UK, UV>>(id, c)
            .and_then(|m| m.0.get(uk).cloned()))
    }

    /// Changes `uk`'s value in place, starting from `default`; whether it existed.
    pub(crate) fn map_update<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: UK,
        default: impl FnOnce() -> UV,
        f: impl FnOnce(&mut UV),
    ) -> Result<bool> {
        match self.slot_mut::<K, MapEntries<UK, UV>>(id, c) {
            Some(m) => Ok(m.0.update(uk, default, f)),
            None => {
                let mut v = default();
                f(&mut v);
                let m = MapEntries(SmallMap::one(uk, v));
                self.map_mut::<K, MapEntries<UK, UV>>(id, c.index)
                    .to_mut()
                    .insert(c.key.clone(), m);
                Ok(false)
            }
        }
    }

    pub(crate) fn map_put<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: UK,
        uv: UV,
    ) -> Result<()> {
        match self.slot_mut::<K, MapEntries<UK, UV>>(id, c) {
            Some(m) => {
                m.0.insert(uk, uv);
            }
            None => {
                let m = MapEntries(SmallMap::one(uk, uv));
                self.map_mut::<K, MapEntries<UK, UV>>(id, c.index)
                    .to_mut()
                    .insert(c.key.clone(), m);
            }
        }
        Ok(())
    }

    pub(crate) fn map_remove<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: &UK,
    ) -> Result<()> {
        let now_empty = match self.slot_mut::<K, MapEntries<UK, UV>>(id, c) {
            Some(m) => {
                m.0.remove(uk);
                m.0.is_empty()
            }
            None => false,
        };
        if now_empty {
            // Owned now (`slot_mut` took it back to change it): no lookup to check first.
            self.map_mut::<K, MapEntries<UK, UV>>(id, c.index)
                .to_mut()
                .remove(c.key);
        }
        Ok(())
    }

    pub(crate) fn map_entries<K: Key, UK: Key, UV: StateValue>(
        &self,
        id: StateId,
        c: &CurrentKey<'_, K>,
    ) -> Result<Vec<(UK, UV)>> {
        Ok(self
            .slot::<K, MapEntries<UK, UV>>(id, c)
            .map(|m| m.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    pub(crate) fn map_with_entries<K: Key, UK: Key, UV: StateValue, R>(
        &self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        f: impl FnOnce(Entries<'_, UK, UV>) -> R,
    ) -> R {
        match self.slot::<K, MapEntries<UK, UV>>(id, c) {
            Some(m) => m.0.with_entries(f),
            None => f(Entries::Runs(&[])),
        }
    }

    pub(crate) fn map_clear<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
    ) -> Result<()> {
        self.remove::<K, MapEntries<UK, UV>>(id, c);
        Ok(())
    }

    pub(crate) fn map_all<K: Key, UK: Key, UV: StateValue>(&self, id: StateId) -> Result<Vec<(K, UK, UV)>> {
        Ok(self
            .table::<K, MapEntries<UK, UV>>(id)
            .maps
            .iter()
            .flat_map(|m| m.iter())
            .flat_map(|(k, m)| m.0.iter().map(move |(uk, uv)| (k.clone(), uk.clone(), uv.clone())))
            .collect())
    }

    /// Empties state `id`, whose values now live elsewhere (restored timers: see
    /// [`MemorySnapshot::add_tables`]).
    pub(crate) fn clear_state(&mut self, id: StateId) {
        self.tables[id].clear();
    }

    /// A copy-on-write view of all state, cheap to take on the task thread.
    pub fn snapshot(&mut self) -> MemorySnapshot {
        MemorySnapshot {
            range: self.range,
            tables: self.tables.iter_mut().map(|t| t.snapshot()).collect(),
            bytes: self.snapshot_bytes.clone(),
        }
    }
}

/// A frozen view of a [`MemoryBackend`].
pub struct MemorySnapshot {
    range: KeyGroupRange,
    tables: Vec<Box<dyn TableSnapshot>>,
    /// The backend's size of its latest snapshot, read and then updated here.
    bytes: Arc<AtomicUsize>,
}

impl MemorySnapshot {
    /// Adds states held outside the backend's tables (the timer index), written with the
    /// tables' entries in each key group's block.
    pub(crate) fn add_tables(&mut self, tables: impl IntoIterator<Item = Box<dyn TableSnapshot>>) {
        self.tables.extend(tables);
    }

    /// Appends one canonical block per key group; returns the index of their offsets.
    pub fn write(&self, w: &mut StateFileWriter) -> Result<KeyGroupIndex> {
        let mut offsets = Vec::with_capacity(self.range.len());
        let start = w.payload().len();
        // An eighth more (and the operator state written after): state that grew a little
        // must not double the buffer, copying it whole, just before the end.
        let last = self.bytes.load(Ordering::Relaxed);
        w.payload().reserve(last + last / 8 + (64 << 10));
        for i in 0..self.range.len() {
            offsets.push(w.begin_block());
            for t in &self.tables {
                t.write_key_group(i, w.payload())?;
            }
            w.end_block();
        }
        self.bytes.store(w.payload().len() - start, Ordering::Relaxed);
        Ok(KeyGroupIndex {
            range: self.range,
            offsets,
        })
    }
}
