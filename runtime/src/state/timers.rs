//! Timers per key in two time domains: an index in memory that finds the due ones, kept by key
//! group and time, and map states (key -> timestamp) through which they checkpoint, restore
//! and rescale like any keyed state. RocksDB writes the map states with every change (its
//! checkpoints are its own files). On the memory backend the index alone holds the timers: a
//! second copy in a hash table cost a fifth of a tumbling window's CPU (BENCHMARKS.md). Its key
//! groups are shared copy-on-write with snapshots, as the backend's maps are, so that a barrier
//! copies nothing, and a snapshot writes them as the map states' entries off the task thread.

use super::cow::Cow;
use super::memory::TableSnapshot;
use super::{CurrentKey, Key, KeyedBackend, StateId};
use crate::element::Timestamp;
use crate::error::Result;
use crate::snapshot::EntryWriter;
use rustc_hash::FxHashSet;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// The clock a timer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeDomain {
    /// The watermark.
    EventTime,
    /// The wall clock.
    ProcessingTime,
}

/// A timer's key, serialized: inline up to 16 bytes (an integer or a short string), so that a
/// timer costs no allocation and its set's lookups no pointer chase.
pub(crate) type TimerKey = smallvec::SmallVec<[u8; 16]>;

/// A timer that is due.
pub(crate) struct Due {
    pub time: Timestamp,
    pub key: TimerKey,
    /// The key's key group, by position in the backend's range (known: no hashing of the key).
    pub key_group_index: usize,
}

/// One key group's timers, keys grouped by time (windows put many keys' timers at one time).
type KgTimers = BTreeMap<Timestamp, FxHashSet<TimerKey>>;

/// The timers of one time domain. A time's keys fire in key group order and then in key order,
/// so that firing order does not depend on registration or restore order.
pub(crate) struct TimerQueue {
    name: &'static str,
    state: StateId,
    /// Whether the map state holds the timers too (RocksDB), or only the index (memory).
    stored: bool,
    /// By key group position in the backend's range.
    by_key_group: Vec<Cow<KgTimers>>,
    /// The key groups (positions) holding timers at each time.
    times: BTreeMap<Timestamp, Vec<u32>>,
    /// The time being fired, and its keys not fired yet, by key group and then key, with their
    /// key groups.
    /// They stay in `by_key_group` until they fire (so snapshots hold them); one deleted
    /// meanwhile is skipped.
    firing_time: Timestamp,
    firing: VecDeque<(TimerKey, u32)>,
}

impl TimerQueue {
    /// Registers the timer state `name` on `backend` and indexes the timers restored into it.
    fn open<K: Key>(backend: &mut KeyedBackend, name: &'static str, max_parallelism: u16) -> Result<Self> {
        let state = backend.register_map::<K, Timestamp, ()>(name)?;
        let stored = !matches!(backend, KeyedBackend::Memory(_));
        let range = backend.range();
        let mut queue = Self {
            name,
            state,
            stored,
            by_key_group: (0..range.len()).map(|_| Cow::default()).collect(),
            times: BTreeMap::new(),
            firing_time: Timestamp::MIN,
            firing: VecDeque::new(),
        };
        for (key, ts, ()) in backend.map_all::<K, Timestamp, ()>(state)? {
            let bytes = postcard::to_allocvec(&key)?;
            let cur = CurrentKey::new(&key, &bytes, max_parallelism, range)?;
            queue.insert(ts, &bytes, cur.index);
        }
        if let KeyedBackend::Memory(m) = backend {
            // The index holds them from now on; a snapshot writes them back under this name.
            m.clear_state(state);
        }
        Ok(queue)
    }

    /// The map state to write with each change, if the backend keeps one (RocksDB).
    pub(crate) fn stored_state(&self) -> Option<StateId> {
        self.stored.then_some(self.state)
    }

    /// Adds a timer of the key `key` (bytes) of key group position `kg`; false if it was there.
    pub(crate) fn insert(&mut self, ts: Timestamp, key: &[u8], kg: usize) -> bool {
        let held = |t: &KgTimers| t.get(&ts).is_some_and(|keys| keys.contains(key));
        let Some(timers) = self.by_key_group[kg].change_if(|t| !held(t)) else {
            return false;
        };
        match timers.entry(ts) {
            std::collections::btree_map::Entry::Occupied(mut keys) => keys.get_mut().insert(TimerKey::from_slice(key)),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(FxHashSet::from_iter([TimerKey::from_slice(key)]));
                self.times.entry(ts).or_default().push(kg as u32);
                true
            }
        }
    }

    /// Removes a timer from the index; false if it was not there.
    pub(crate) fn remove(&mut self, ts: Timestamp, key: &[u8], kg: usize) -> bool {
        let held = |t: &KgTimers| t.get(&ts).is_some_and(|keys| keys.contains(key));
        let Some(timers) = self.by_key_group[kg].change_if(held) else {
            return false;
        };
        let Some(keys) = timers.get_mut(&ts) else {
            return false;
        };
        if !keys.remove(key) {
            return false;
        }
        if keys.is_empty() {
            timers.remove(&ts);
            if let Some(kgs) = self.times.get_mut(&ts) {
                kgs.retain(|k| *k as usize != kg);
                if kgs.is_empty() {
                    self.times.remove(&ts);
                }
            }
        }
        true
    }

    /// The earliest timer's time.
    fn next(&self) -> Option<Timestamp> {
        self.times.first_key_value().map(|(ts, _)| *ts)
    }

    /// The earliest timer at or before `now`, removed from the index.
    fn pop_due(&mut self, now: Timestamp) -> Option<Due> {
        loop {
            if let Some((key, kg)) = self.firing.pop_front() {
                let ts = self.firing_time;
                if self.remove(ts, &key, kg as usize) {
                    return Some(Due {
                        time: ts,
                        key,
                        key_group_index: kg as usize,
                    });
                }
                // Deleted since its time began firing.
                continue;
            }
            // Keys registered at the fired time after their turn (or after it began) fire now.
            let (&ts, kgs) = self.times.first_key_value().filter(|(ts, _)| **ts <= now)?;
            // By key group, then by key within each: a window fires tens of thousands of keys
            // at once, and sorting each key group's few hundred apart costs less than sorting
            // them all together.
            let mut kgs = kgs.clone();
            kgs.sort_unstable();
            let mut keys: Vec<(u128, &TimerKey)> = Vec::new();
            for kg in kgs {
                keys.clear();
                let at = self.by_key_group[kg as usize].get(&ts).into_iter().flatten();
                keys.extend(at.map(|k| (order_prefix(k), k)));
                // By the prefix, a register compare, then (rarely) by the bytes.
                keys.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
                self.firing.extend(keys.iter().map(|(_, k)| ((*k).clone(), kg)));
            }
            self.firing_time = ts;
        }
    }

    /// The key (and its key group position) that fires `ahead` timers after the next one at the
    /// time being fired, if known yet.
    fn upcoming(&self, ahead: usize) -> Option<(&TimerKey, usize)> {
        self.firing.get(ahead).map(|(k, kg)| (k, *kg as usize))
    }

    /// The index for a snapshot, which writes it as the map state's entries (the memory
    /// backend's snapshots: RocksDB's hold the state itself). Copies nothing.
    fn share(&mut self) -> FrozenTimers {
        FrozenTimers {
            name: self.name,
            by_key_group: self.by_key_group.iter_mut().map(Cow::share).collect(),
        }
    }
}

/// The first 16 bytes of `key`, zero-padded, as a big-endian number: keys whose prefixes
/// differ compare as their bytes do.
fn order_prefix(key: &[u8]) -> u128 {
    let mut prefix = [0u8; 16];
    let n = key.len().min(16);
    prefix[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(prefix)
}

/// A snapshot's view of a [`TimerQueue`]'s index.
struct FrozenTimers {
    name: &'static str,
    by_key_group: Vec<Arc<KgTimers>>,
}

impl TableSnapshot for FrozenTimers {
    fn write_key_group(&self, index: usize, out: &mut Vec<u8>) -> Result<u64> {
        let timers = &self.by_key_group[index];
        if timers.is_empty() {
            return Ok(0);
        }
        // As the memory backend writes a map state `key -> timestamp -> ()`.
        let mut w = EntryWriter::begin(out, self.name);
        for (ts, keys) in timers.iter() {
            for key in keys {
                w.entry_of(key, ts, &())?;
            }
        }
        Ok(w.finish())
    }
}

/// The timers of one keyed operator subtask, in both time domains, and its event-time clock.
pub struct TimerService {
    event: TimerQueue,
    processing: TimerQueue,
    watermark: Timestamp,
}

/// The timers' state names: not names the state registry hands out to functions.
const EVENT_TIMER_STATE: &str = "__timers__";
const PROCESSING_TIMER_STATE: &str = "__processing_timers__";

impl TimerService {
    /// Registers the timer states on `backend` and indexes the timers restored into them (keys
    /// placed in key groups by `max_parallelism`).
    pub(crate) fn open<K: Key>(backend: &mut KeyedBackend, max_parallelism: u16) -> Result<Self> {
        Ok(Self {
            event: TimerQueue::open::<K>(backend, EVENT_TIMER_STATE, max_parallelism)?,
            processing: TimerQueue::open::<K>(backend, PROCESSING_TIMER_STATE, max_parallelism)?,
            watermark: Timestamp::MIN,
        })
    }

    pub(crate) fn queue(&mut self, domain: TimeDomain) -> &mut TimerQueue {
        match domain {
            TimeDomain::EventTime => &mut self.event,
            TimeDomain::ProcessingTime => &mut self.processing,
        }
    }

    /// The timer state of `domain` to write with each change, if the backend keeps one.
    pub(crate) fn stored_state(&self, domain: TimeDomain) -> Option<StateId> {
        match domain {
            TimeDomain::EventTime => self.event.stored_state(),
            TimeDomain::ProcessingTime => self.processing.stored_state(),
        }
    }

    /// The timer states a memory backend's snapshot writes from the index (none on RocksDB).
    pub(crate) fn share(&mut self) -> Vec<Box<dyn TableSnapshot>> {
        [&mut self.event, &mut self.processing]
            .into_iter()
            .filter(|q| !q.stored)
            .map(|q| Box::new(q.share()) as Box<dyn TableSnapshot>)
            .collect()
    }

    /// The clock; never moves back (a restored operator may see older watermarks first).
    pub(crate) fn advance(&mut self, watermark: Timestamp) {
        self.watermark = self.watermark.max(watermark);
    }

    pub(crate) fn watermark(&self) -> Timestamp {
        self.watermark
    }

    /// Whether an event-time timer is due.
    pub(crate) fn has_due(&self) -> bool {
        self.event.next().is_some_and(|ts| ts <= self.watermark)
    }

    /// The earliest processing-time timer's time.
    pub(crate) fn next_processing_time(&self) -> Option<Timestamp> {
        self.processing.next()
    }

    /// See [`TimerQueue::upcoming`].
    pub(crate) fn upcoming(&self, domain: TimeDomain, ahead: usize) -> Option<(&TimerKey, usize)> {
        match domain {
            TimeDomain::EventTime => self.event.upcoming(ahead),
            TimeDomain::ProcessingTime => self.processing.upcoming(ahead),
        }
    }

    /// The earliest timer of `domain` due at `now` (the watermark for event time), removed
    /// from the index.
    pub(crate) fn pop_due(&mut self, domain: TimeDomain, now: Timestamp) -> Option<Due> {
        match domain {
            TimeDomain::EventTime => self.event.pop_due(self.watermark),
            TimeDomain::ProcessingTime => self.processing.pop_due(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The lookahead through which firing prefetches names, in order, the keys that fire next.
    #[test]
    fn upcoming_names_the_keys_that_fire_next() {
        let range = crate::keygroup::KeyGroupRange::new(0, 127);
        let mut backend = KeyedBackend::Memory(super::super::MemoryBackend::new(range));
        let mut queue = TimerQueue::open::<u32>(&mut backend, "timers", 128).unwrap();
        for key in 0u32..20 {
            let bytes = postcard::to_allocvec(&key).unwrap();
            let index = CurrentKey::new(&key, &bytes, 128, range).unwrap().index;
            queue.insert(5, &bytes, index);
        }
        queue.pop_due(5).unwrap();
        let ahead: Vec<(TimerKey, usize)> = (0..19)
            .map(|n| queue.upcoming(n).map(|(k, kg)| (k.clone(), kg)).unwrap())
            .collect();
        assert!(queue.upcoming(19).is_none());
        let fired: Vec<(TimerKey, usize)> = std::iter::from_fn(|| queue.pop_due(5))
            .map(|d| (d.key, d.key_group_index))
            .collect();
        assert_eq!(ahead, fired);
    }

    proptest! {
        /// The firing order by prefix, then bytes, is the keys' byte order.
        #[test]
        fn prefix_order_is_byte_order(mut keys in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..20), 0..64)) {
            let mut by_prefix = keys.clone();
            by_prefix.sort_by(|a, b| order_prefix(a).cmp(&order_prefix(b)).then_with(|| a.cmp(b)));
            keys.sort();
            prop_assert_eq!(by_prefix, keys);
        }
    }
}
