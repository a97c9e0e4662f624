//! Time-to-live for keyed state, like Flink's `StateTtlConfig`: a state registered with a TTL
//! forgets a value once it has not been written (or, optionally, read) for that long.
//!
//! - **Time** is processing time: the `now` of the [`KeyedContext`], read once per batch or
//!   timer round and never going back (see [`KeyedBackend::advance_processing_time`]).
//! - **Expiry** is inclusive, as in Flink: a value last touched at `ts` is expired when
//!   `ts + ttl <= now`, so it is still there at `ts + ttl - 1` and gone at `ts + ttl`.
//! - **Visibility**: expired values are never returned (Flink's `NeverReturnExpired`). A read
//!   that finds one treats it as absent and removes it; `update_with` and `add` on an expired
//!   value start from the default (or the added value) as if nothing were stored.
//! - **Granularity**: one timestamp per value of value and reducing state, per entry of map
//!   state, per element of list state.
//! - **Stored form**: a value is the postcard bytes of `(timestamp, value)`; a list is
//!   `(newest element timestamp, [(timestamp, element)])`, its elements in time order. Both
//!   backends store these bytes, so checkpoints, savepoints, restores and rescaling carry the
//!   timestamps unchanged, and the leading timestamp lets RocksDB's compaction filter judge an
//!   entry without its types.
//! - **Names**: a TTL state is stored under its name behind a reserved prefix
//!   ([`stored_name`]). Restoring a snapshot whose state `x` had no TTL into a job that
//!   registers `x` with one (or the reverse) is therefore an error naming `x`, not a silent
//!   misreading of the bytes (like Flink, which refuses such a restore): give the state a new
//!   name. Changing the TTL's length or update type is compatible.
//! - **Cleanup** of values that are never read again: the memory backend sweeps one key group of
//!   a TTL state at a time as that state is used (see `memory.rs`); RocksDB drops expired
//!   entries in compaction (see `rocks.rs`). An append to a list drops its expired elements
//!   once they are half of it, so that a list that only receives appends stays bounded.
//!
//! The handles' TTL paths live here; without a TTL the handles call the backend directly, as
//! before, with no extra serialization or allocation.

use super::{Key, KeyedBackend, KeyedContext, StateId, StateValue};
use crate::element::Timestamp;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::time::Duration;

/// When a value's timestamp is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtlUpdateType {
    /// On creation and every write (the default).
    #[default]
    OnCreateAndWrite,
    /// On every read too: values that keep being read never expire.
    OnReadAndWrite,
}

/// A state's time-to-live; pass it to [`crate::StateRegistry::with_ttl`].
///
/// Expired values are never returned; time is processing time; a value last written at `ts`
/// is expired from `ts + ttl` on (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateTtlConfig {
    ttl_ms: i64,
    update: TtlUpdateType,
}

impl StateTtlConfig {
    /// Values expire `ttl` after their last write. The TTL must be at least 1 ms (state lives
    /// in whole milliseconds); longer than `i64::MAX` ms counts as forever.
    pub fn new(ttl: Duration) -> Result<Self> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        if ttl_ms == 0 {
            return Err(Error::Config(format!(
                "state TTL must be at least 1 ms (got {ttl:?}); to keep state forever, register it without a TTL"
            )));
        }
        Ok(Self {
            ttl_ms,
            update: TtlUpdateType::OnCreateAndWrite,
        })
    }

    /// Refreshes a value's timestamp when it is read, too.
    pub fn update_on_read_and_write(self) -> Self {
        self.with_update_type(TtlUpdateType::OnReadAndWrite)
    }

    /// Sets when timestamps are refreshed.
    pub fn with_update_type(mut self, update: TtlUpdateType) -> Self {
        self.update = update;
        self
    }

    /// The time-to-live.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms as u64)
    }

    /// When timestamps are refreshed.
    pub fn update_type(&self) -> TtlUpdateType {
        self.update
    }

    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn ttl_ms(&self) -> i64 {
        self.ttl_ms
    }

    /// Whether a value last touched at `ts` is expired at `now`.
    pub(crate) fn is_expired(&self, ts: Timestamp, now: Timestamp) -> bool {
        expired(ts, self.ttl_ms, now)
    }

    fn refresh_on_read(&self) -> bool {
        self.update == TtlUpdateType::OnReadAndWrite
    }
}

/// `ts + ttl <= now`, without overflow.
pub(crate) fn expired(ts: Timestamp, ttl_ms: i64, now: Timestamp) -> bool {
    ts.saturating_add(ttl_ms) <= now
}

/// A value with the time it was last written (or read, with `OnReadAndWrite`). Serialized as
/// the pair `(ts, value)`.
#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct TtlValue<V> {
    pub ts: Timestamp,
    pub value: V,
}

/// A list whose elements carry their own timestamps; `newest` leads, so that RocksDB's
/// compaction filter can drop a list whose every element expired without decoding it.
#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct TtlList<V> {
    pub newest: Timestamp,
    pub elements: Vec<TtlValue<V>>,
}

impl<V> TtlList<V> {
    /// Drops expired elements and recomputes `newest`; false when nothing is left.
    pub fn retain_unexpired(&mut self, cfg: &StateTtlConfig, now: Timestamp) -> bool {
        self.elements.retain(|e| !cfg.is_expired(e.ts, now));
        self.newest = self.elements.iter().map(|e| e.ts).max().unwrap_or(Timestamp::MIN);
        !self.elements.is_empty()
    }
}

/// The leading timestamp of a stored TTL value or list, read without knowing its types.
#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
pub(crate) fn stored_timestamp(bytes: &[u8]) -> Option<Timestamp> {
    postcard::take_from_bytes::<Timestamp>(bytes).ok().map(|(ts, _)| ts)
}

/// What the names of TTL states are stored under begin with: no function can register such a
/// name (names beginning with `__` are the runtime's).
const TTL_NAME_PREFIX: &str = "__ttl__/";

/// Whether stored name `name` is that of a TTL state ([`stored_name`]).
#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
pub(crate) fn is_ttl_name(name: &str) -> bool {
    name.starts_with(TTL_NAME_PREFIX)
}

/// The name state `name` is stored under, with or without a TTL: the two never meet, so a
/// snapshot's state cannot be read with the other stored form (see the module docs).
pub(crate) fn stored_name(name: &str, ttl: bool) -> Cow<'_, str> {
    if ttl {
        Cow::Owned(format!("{TTL_NAME_PREFIX}{name}"))
    } else {
        Cow::Borrowed(name)
    }
}

/// A read at `now` of a stored value: `None` when absent or expired. `store` removes an expired
/// value (`None`) or puts a live one back with its timestamp refreshed (`OnReadAndWrite`).
fn read<V: Clone>(
    cfg: &StateTtlConfig,
    now: Timestamp,
    found: Option<TtlValue<V>>,
    store: impl FnOnce(Option<TtlValue<V>>) -> Result<()>,
) -> Result<Option<V>> {
    let Some(t) = found else { return Ok(None) };
    if cfg.is_expired(t.ts, now) {
        store(None)?;
        return Ok(None);
    }
    if cfg.refresh_on_read() && t.ts != now {
        store(Some(TtlValue {
            ts: now,
            value: t.value.clone(),
        }))?;
    }
    Ok(Some(t.value))
}

/// The value of a stored one if it is unexpired at `now` (whole-state scans, which change
/// nothing).
fn live<V>(cfg: &StateTtlConfig, now: Timestamp) -> impl Fn(TtlValue<V>) -> Option<V> + '_ {
    move |t| (!cfg.is_expired(t.ts, now)).then_some(t.value)
}

// The TTL paths of the handles. Each tells the backend it was used (`ttl_accessed`), which
// drives the memory backend's incremental cleanup. Whole-state scans judge expiry as of the
// backend's processing time.

pub(super) fn value_get<K: Key, V: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    cfg: &StateTtlConfig,
) -> Result<Option<V>> {
    let (now, backend, cur) = (ctx.now, &mut *ctx.backend, &ctx.cur);
    let found = backend.value_get::<K, TtlValue<V>>(id, cur)?;
    let result = read(cfg, now, found, |t| match t {
        None => backend.value_remove::<K, TtlValue<V>>(id, cur),
        Some(t) => backend.value_put(id, cur, t),
    })?;
    backend.ttl_accessed(id, now);
    Ok(result)
}

pub(super) fn value_put<K: Key, V: StateValue>(ctx: &mut KeyedContext<'_, K>, id: StateId, value: V) -> Result<()> {
    let now = ctx.now;
    ctx.backend
        .value_put::<K, TtlValue<V>>(id, &ctx.cur, TtlValue { ts: now, value })?;
    ctx.backend.ttl_accessed(id, now);
    Ok(())
}

/// Read-modify-write of a TTL value: an expired value counts as absent, so `f` then sees the
/// default; the timestamp becomes `now`.
pub(super) fn value_update<K: Key, V: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    cfg: &StateTtlConfig,
    default: impl FnOnce() -> V,
    f: impl FnOnce(&mut V),
) -> Result<()> {
    let now = ctx.now;
    // The backend calls `default` only for an absent value; `f` needs it for an expired one.
    let default = std::cell::Cell::new(Some(default));
    let fresh = || (default.take().expect("the default is needed at most once"))();
    ctx.backend.value_update::<K, TtlValue<V>>(
        id,
        &ctx.cur,
        || TtlValue {
            ts: now,
            value: fresh(),
        },
        |t| {
            // A value created just now (by the default above) is not expired either.
            if cfg.is_expired(t.ts, now) {
                t.value = fresh();
            }
            f(&mut t.value);
            t.ts = now;
        },
    )?;
    ctx.backend.ttl_accessed(id, now);
    Ok(())
}

pub(super) fn value_remove<K: Key, V: StateValue>(ctx: &mut KeyedContext<'_, K>, id: StateId) -> Result<()> {
    ctx.backend.value_remove::<K, TtlValue<V>>(id, &ctx.cur)?;
    ctx.backend.ttl_accessed(id, ctx.now);
    Ok(())
}

/// Every unexpired (key, value).
pub(super) fn value_entries<K: Key, V: StateValue>(
    backend: &KeyedBackend,
    id: StateId,
    cfg: &StateTtlConfig,
) -> Result<Vec<(K, V)>> {
    let live = live(cfg, backend.processing_time());
    Ok(backend
        .value_entries::<K, TtlValue<V>>(id)?
        .into_iter()
        .filter_map(|(k, t)| live(t).map(|v| (k, v)))
        .collect())
}

pub(super) fn list_get<K: Key, V: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    cfg: &StateTtlConfig,
) -> Result<Vec<V>> {
    let now = ctx.now;
    let backend = &mut *ctx.backend;
    let mut out = Vec::new();
    if let Some(mut list) = backend.value_get::<K, TtlList<V>>(id, &ctx.cur)? {
        let len = list.elements.len();
        if !list.retain_unexpired(cfg, now) {
            backend.value_remove::<K, TtlList<V>>(id, &ctx.cur)?;
        } else {
            let refresh = cfg.refresh_on_read() && list.elements.iter().any(|e| e.ts != now);
            if refresh {
                list.elements.iter_mut().for_each(|e| e.ts = now);
                list.newest = now;
            }
            if refresh || list.elements.len() != len {
                backend.value_put::<K, TtlList<V>>(id, &ctx.cur, list.clone())?;
            }
            out = list.elements.into_iter().map(|e| e.value).collect();
        }
    }
    backend.ttl_accessed(id, now);
    Ok(out)
}

/// Appends at `now`. Elements are appended in time order, so once the middle one expired at
/// least half of them did: they are dropped then. A list that keeps receiving appends and is
/// never read so holds at most about twice its live elements (RocksDB's compaction filter drops
/// a list only once all of them expired), at an amortized O(1) per append in memory.
pub(super) fn list_add<K: Key, V: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    cfg: &StateTtlConfig,
    value: V,
) -> Result<()> {
    let now = ctx.now;
    ctx.backend.value_update::<K, TtlList<V>>(
        id,
        &ctx.cur,
        || TtlList {
            newest: now,
            elements: Vec::with_capacity(1),
        },
        |l| {
            // `retain` judges each element, so a list restored out of order loses nothing live.
            let middle = l.elements.get(l.elements.len() / 2);
            if middle.is_some_and(|e| cfg.is_expired(e.ts, now)) {
                l.retain_unexpired(cfg, now);
            }
            l.elements.push(TtlValue { ts: now, value });
            l.newest = l.newest.max(now);
        },
    )?;
    ctx.backend.ttl_accessed(id, now);
    Ok(())
}

pub(super) fn list_put<K: Key, V: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    values: Vec<V>,
) -> Result<()> {
    let now = ctx.now;
    let list = TtlList {
        newest: now,
        elements: values.into_iter().map(|value| TtlValue { ts: now, value }).collect(),
    };
    ctx.backend.value_put::<K, TtlList<V>>(id, &ctx.cur, list)?;
    ctx.backend.ttl_accessed(id, now);
    Ok(())
}

pub(super) fn list_remove<K: Key, V: StateValue>(ctx: &mut KeyedContext<'_, K>, id: StateId) -> Result<()> {
    ctx.backend.value_remove::<K, TtlList<V>>(id, &ctx.cur)?;
    ctx.backend.ttl_accessed(id, ctx.now);
    Ok(())
}

/// Every key's unexpired elements; keys with none are left out.
pub(super) fn list_entries<K: Key, V: StateValue>(
    backend: &KeyedBackend,
    id: StateId,
    cfg: &StateTtlConfig,
) -> Result<Vec<(K, Vec<V>)>> {
    let now = backend.processing_time();
    Ok(backend
        .value_entries::<K, TtlList<V>>(id)?
        .into_iter()
        .filter_map(|(k, mut l)| {
            l.retain_unexpired(cfg, now)
                .then(|| (k, l.elements.into_iter().map(|e| e.value).collect()))
        })
        .collect())
}

pub(super) fn map_get<K: Key, UK: Key, UV: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    cfg: &StateTtlConfig,
    uk: &UK,
) -> Result<Option<UV>> {
    let (now, backend, cur) = (ctx.now, &mut *ctx.backend, &ctx.cur);
    let found = backend.map_get::<K, UK, TtlValue<UV>>(id, cur, uk)?;
    let result = read(cfg, now, found, |t| match t {
        None => backend.map_remove::<K, UK, TtlValue<UV>>(id, cur, uk),
        Some(t) => backend.map_put(id, cur, uk.clone(), t),
    })?;
    backend.ttl_accessed(id, now);
    Ok(result)
}

pub(super) fn map_put<K: Key, UK: Key, UV: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    uk: UK,
    value: UV,
) -> Result<()> {
    let now = ctx.now;
    ctx.backend
        .map_put::<K, UK, TtlValue<UV>>(id, &ctx.cur, uk, TtlValue { ts: now, value })?;
    ctx.backend.ttl_accessed(id, now);
    Ok(())
}

/// Read-modify-write of one map entry; whether it existed unexpired.
pub(super) fn map_update<K: Key, UK: Key, UV: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    cfg: &StateTtlConfig,
    uk: UK,
    default: impl FnOnce() -> UV,
    f: impl FnOnce(&mut UV),
) -> Result<bool> {
    let now = ctx.now;
    let default = std::cell::Cell::new(Some(default));
    let fresh = || (default.take().expect("the default is needed at most once"))();
    let mut live = false;
    let existed = ctx.backend.map_update::<K, UK, TtlValue<UV>>(
        id,
        &ctx.cur,
        uk,
        || TtlValue {
            ts: now,
            value: fresh(),
        },
        |t| {
            // A value created just now (by the default above) is not expired either.
            if cfg.is_expired(t.ts, now) {
                t.value = fresh();
            } else {
                live = true;
            }
            f(&mut t.value);
            t.ts = now;
        },
    )?;
    ctx.backend.ttl_accessed(id, now);
    Ok(existed && live)
}

pub(super) fn map_remove<K: Key, UK: Key, UV: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    uk: &UK,
) -> Result<()> {
    ctx.backend.map_remove::<K, UK, TtlValue<UV>>(id, &ctx.cur, uk)?;
    ctx.backend.ttl_accessed(id, ctx.now);
    Ok(())
}

/// The current key's unexpired entries; expired ones are removed, and with `OnReadAndWrite`
/// the returned ones refreshed.
pub(super) fn map_entries<K: Key, UK: Key, UV: StateValue>(
    ctx: &mut KeyedContext<'_, K>,
    id: StateId,
    cfg: &StateTtlConfig,
) -> Result<Vec<(UK, UV)>> {
    let (now, backend, cur) = (ctx.now, &mut *ctx.backend, &ctx.cur);
    let mut out = Vec::new();
    for (uk, t) in backend.map_entries::<K, UK, TtlValue<UV>>(id, cur)? {
        let value = read(cfg, now, Some(t), |t| match t {
            None => backend.map_remove::<K, UK, TtlValue<UV>>(id, cur, &uk),
            Some(t) => backend.map_put(id, cur, uk.clone(), t),
        })?;
        if let Some(v) = value {
            out.push((uk, v));
        }
    }
    backend.ttl_accessed(id, now);
    Ok(out)
}

pub(super) fn map_clear<K: Key, UK: Key, UV: StateValue>(ctx: &mut KeyedContext<'_, K>, id: StateId) -> Result<()> {
    ctx.backend.map_clear::<K, UK, TtlValue<UV>>(id, &ctx.cur)?;
    ctx.backend.ttl_accessed(id, ctx.now);
    Ok(())
}

/// Every unexpired (key, user key, value).
pub(super) fn map_all<K: Key, UK: Key, UV: StateValue>(
    backend: &KeyedBackend,
    id: StateId,
    cfg: &StateTtlConfig,
) -> Result<Vec<(K, UK, UV)>> {
    let live = live(cfg, backend.processing_time());
    Ok(backend
        .map_all::<K, UK, TtlValue<UV>>(id)?
        .into_iter()
        .filter_map(|(k, uk, t)| live(t).map(|v| (k, uk, v)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_or_sub_millisecond_ttl_is_refused() {
        for ttl in [Duration::ZERO, Duration::from_micros(999)] {
            match StateTtlConfig::new(ttl) {
                Err(Error::Config(msg)) => assert!(msg.contains("at least 1 ms"), "{msg}"),
                other => panic!("{ttl:?}: {other:?}"),
            }
        }
        let cfg = StateTtlConfig::new(Duration::from_millis(1)).unwrap();
        assert_eq!(cfg.update_type(), TtlUpdateType::OnCreateAndWrite);
        assert_eq!(
            cfg.update_on_read_and_write().update_type(),
            TtlUpdateType::OnReadAndWrite
        );
        let forever = StateTtlConfig::new(Duration::MAX).unwrap();
        assert!(!forever.is_expired(Timestamp::MAX - 1, Timestamp::MAX - 1));
    }

    #[test]
    fn expiry_is_inclusive_and_the_stored_timestamp_leads() {
        let cfg = StateTtlConfig::new(Duration::from_millis(10)).unwrap();
        assert!(!cfg.is_expired(100, 109));
        assert!(cfg.is_expired(100, 110));
        let bytes = postcard::to_allocvec(&TtlValue {
            ts: -5_000_000_000i64,
            value: "x".to_string(),
        })
        .unwrap();
        assert_eq!(stored_timestamp(&bytes), Some(-5_000_000_000));
        let list = TtlList {
            newest: 42,
            elements: vec![TtlValue { ts: 42, value: 1u8 }],
        };
        assert_eq!(stored_timestamp(&postcard::to_allocvec(&list).unwrap()), Some(42));
        // The pair form: the same bytes as a tuple.
        assert_eq!(bytes, postcard::to_allocvec(&(-5_000_000_000i64, "x")).unwrap());
    }
}
