//! Adapters from the DataStream API's functions to [`Operator`]: map, filter, flat_map, keyed
//! process and sink.

use crate::checkpoint::CheckpointId;
use crate::element::Timestamp;
use crate::error::Result;
use crate::operator::{
    Data, KeySelector, KeyedProcessFunction, Operator, OperatorSnapshot, RestoredState, SinkFunction, StateRegistry,
    TaskInfo,
};
use crate::state::{CurrentKey, KeyedBackend, KeyedContext, TimeDomain, TimerService};
use std::marker::PhantomData;
use std::sync::Arc;

pub(crate) struct MapOp<T, U> {
    pub f: Arc<dyn Fn(T) -> U + Send + Sync>,
}

impl<T: Data, U: Data> Operator for MapOp<T, U> {
    type In = T;
    type Out = U;
    fn open(&mut self, _: &TaskInfo, _: Option<RestoredState>) -> Result<()> {
        Ok(())
    }
    fn process(&mut self, batch: Vec<T>, out: &mut Vec<U>) -> Result<()> {
        out.extend(batch.into_iter().map(|t| (self.f)(t)));
        Ok(())
    }
}

pub(crate) struct FilterOp<T> {
    pub f: Arc<dyn Fn(&T) -> bool + Send + Sync>,
}

impl<T: Data> Operator for FilterOp<T> {
    type In = T;
    type Out = T;
    fn open(&mut self, _: &TaskInfo, _: Option<RestoredState>) -> Result<()> {
        Ok(())
    }
    fn process(&mut self, batch: Vec<T>, out: &mut Vec<T>) -> Result<()> {
        out.extend(batch.into_iter().filter(|t| (self.f)(t)));
        Ok(())
    }
}

pub(crate) struct FlatMapOp<T, U, I> {
    pub f: Arc<dyn Fn(T) -> I + Send + Sync>,
    pub _u: PhantomData<fn() -> U>,
}

impl<T: Data, U: Data, I: IntoIterator<Item = U> + 'static> Operator for FlatMapOp<T, U, I> {
    type In = T;
    type Out = U;
    fn open(&mut self, _: &TaskInfo, _: Option<RestoredState>) -> Result<()> {
        Ok(())
    }
    fn process(&mut self, batch: Vec<T>, out: &mut Vec<U>) -> Result<()> {
        for t in batch {
            out.extend((self.f)(t));
        }
        Ok(())
    }
}

/// Runs a [`KeyedProcessFunction`] over the key groups its subtask owns.
pub(crate) struct KeyedProcessOp<P: KeyedProcessFunction> {
    pub f: P,
    pub key: KeySelector<P::In, P::Key>,
    pub backend: Option<KeyedBackend>,
    timers: Option<TimerService>,
    pub max_parallelism: u16,
    key_bytes: Vec<u8>,
}

/// Outputs of timers fired before the chain moves them on (a watermark at the end of input
/// fires every window at once).
const FIRE_ROUND: usize = 4096;

/// Whose state is prefetched: the key that fires this many timers after the next one (two
/// after the key firing), so that its loads from memory overlap two firings.
const PREFETCH_AHEAD: usize = 1;

impl<P: KeyedProcessFunction> KeyedProcessOp<P> {
    pub fn new(f: P, key: KeySelector<P::In, P::Key>) -> Self {
        Self {
            f,
            key,
            backend: None,
            timers: None,
            max_parallelism: 1,
            key_bytes: Vec::new(),
        }
    }

    fn backend(&mut self) -> &mut KeyedBackend {
        self.backend.as_mut().expect("opened before use")
    }

    /// Fires the due timers of `domain`, up to a round's worth of output; `now` is the wall
    /// clock, which becomes the round's processing time unless that would go back (the
    /// watermark decides event time).
    fn fire(&mut self, domain: TimeDomain, now: Timestamp, out: &mut Vec<P::Out>) -> Result<()> {
        let (Some(backend), Some(timers)) = (self.backend.as_mut(), self.timers.as_mut()) else {
            return Ok(());
        };
        let range = backend.range();
        let now = backend.advance_processing_time(now);
        let state = timers.stored_state(domain);
        while out.len() < FIRE_ROUND {
            let Some(due) = timers.pop_due(domain, now) else {
                break;
            };
            let (ts, bytes) = (due.time, due.key);
            // The key that fires a few timers from now: its state starts loading while these
            // fire (a sliding window's panes are rarely in a cache).
            if let Some((next, kg)) = timers.upcoming(domain, PREFETCH_AHEAD) {
                backend.prefetch::<P::Key>(next, kg);
            }
            let key: P::Key = postcard::from_bytes(&bytes)?;
            let mut ctx = KeyedContext {
                cur: CurrentKey::at(&key, &bytes, range, due.key_group_index),
                backend: &mut *backend,
                timers: Some(&mut *timers),
                now,
            };
            if let Some(state) = state {
                ctx.backend.map_remove::<P::Key, Timestamp, ()>(state, &ctx.cur, &ts)?;
            }
            match domain {
                TimeDomain::EventTime => self.f.on_timer(ts, &mut ctx, out)?,
                TimeDomain::ProcessingTime => self.f.on_processing_time_timer(ts, &mut ctx, out)?,
            }
        }
        Ok(())
    }
}

impl<P: KeyedProcessFunction> Operator for KeyedProcessOp<P> {
    type In = P::In;
    type Out = P::Out;

    fn open(&mut self, info: &TaskInfo, restored: Option<RestoredState>) -> Result<()> {
        self.max_parallelism = info.max_parallelism;
        let clock = crate::time::restored_watermark(restored.as_ref())?;
        let restored = restored.unwrap_or_default().keyed;
        let mut backend = KeyedBackend::open(
            info.state_backend,
            info.key_group_range(),
            &info.local_dir,
            restored,
            info.rocksdb,
        )?;
        let mut timers = TimerService::open::<P::Key>(&mut backend, info.max_parallelism)?;
        if let Some(w) = clock {
            timers.advance(w);
        }
        self.f.open(&mut StateRegistry::new(&mut backend), info)?;
        self.backend = Some(backend);
        self.timers = Some(timers);
        Ok(())
    }

    fn process(&mut self, batch: Vec<P::In>, out: &mut Vec<P::Out>) -> Result<()> {
        let backend = self.backend.as_mut().expect("opened before use");
        let range = backend.range();
        let now = backend.advance_processing_time(crate::state::processing_time_now());
        for record in batch {
            let key = (self.key)(&record);
            self.key_bytes.clear();
            crate::keygroup::extend_key_bytes(&key, &mut self.key_bytes)?;
            let mut ctx = KeyedContext {
                cur: CurrentKey::new(&key, &self.key_bytes, self.max_parallelism, range)?,
                backend,
                timers: self.timers.as_mut(),
                now,
            };
            self.f.process(record, &mut ctx, out)?;
        }
        Ok(())
    }

    fn watermark(&mut self, watermark: Timestamp, out: &mut Vec<P::Out>) -> Result<()> {
        let Some(timers) = self.timers.as_mut() else {
            return Ok(());
        };
        timers.advance(watermark);
        // Most watermarks fire nothing: no clock read for them. The backend's processing time
        // then stays put: nothing reads state here, and TTL compaction judging by an older
        // time only drops less.
        if !timers.has_due() {
            return Ok(());
        }
        self.fire(TimeDomain::EventTime, crate::state::processing_time_now(), out)
    }

    fn watermark_pending(&self) -> bool {
        self.timers.as_ref().is_some_and(TimerService::has_due)
    }

    fn next_processing_time(&self) -> Option<Timestamp> {
        self.timers.as_ref()?.next_processing_time()
    }

    fn on_processing_time(&mut self, now: Timestamp, out: &mut Vec<P::Out>) -> Result<()> {
        self.fire(TimeDomain::ProcessingTime, now, out)
    }

    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<OperatorSnapshot> {
        let backend = self.backend.as_mut().expect("opened before use");
        let keyed = if backend.is_empty() {
            None
        } else {
            let mut snapshot = backend.snapshot(checkpoint)?;
            // The memory backend's timers live in the index only (see `state/timers.rs`).
            if let (crate::state::KeyedSnapshot::Memory(m), Some(t)) = (&mut snapshot, self.timers.as_mut()) {
                m.add_tables(t.share());
            }
            Some(snapshot)
        };
        // Even at MIN: a restore takes the smallest clock of all old subtasks.
        // The event-time clock: every subtask had the same one at an aligned barrier, and a
        // restored one starts from it, so a record late before a failure is late after it.
        let operator = match self.timers.as_ref() {
            Some(t) => crate::time::watermark_state(t.watermark())?,
            None => crate::snapshot::OperatorState::new(),
        };
        Ok(OperatorSnapshot { keyed, operator })
    }

    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) -> Result<()> {
        self.backend().checkpoint_complete(checkpoint);
        self.f.checkpoint_complete(checkpoint)
    }

    fn end_of_input(&mut self, out: &mut Vec<P::Out>) -> Result<()> {
        let backend = self.backend.as_mut().expect("opened before use");
        // Whole-state scans of TTL state judge expiry as of now.
        backend.advance_processing_time(crate::state::processing_time_now());
        self.f.end_of_input(backend, out)
    }
}

pub(crate) struct SinkOp<S>(pub S);

impl<S: SinkFunction> Operator for SinkOp<S> {
    type In = S::In;
    type Out = ();
    fn open(&mut self, info: &TaskInfo, restored: Option<RestoredState>) -> Result<()> {
        self.0.open(info, restored.map(|r| r.operator))
    }
    fn process(&mut self, batch: Vec<S::In>, _: &mut Vec<()>) -> Result<()> {
        self.0.write(batch)
    }
    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot {
            keyed: None,
            operator: self.0.snapshot(checkpoint)?,
        })
    }
    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) -> Result<()> {
        self.0.checkpoint_complete(checkpoint)
    }
    fn end_of_input(&mut self, _: &mut Vec<()>) -> Result<()> {
        self.0.finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::StateBackendKind;
    use crate::keygroup::range_for_subtask;
    use crate::state::ValueState;

    /// Arms a processing-time timer an hour ahead for each key; a second record of a key moves
    /// it one ms later (delete + register). Fired timers emit `(key, timestamp)`.
    #[derive(Clone, Default)]
    struct Reminder {
        armed: Option<ValueState<u32, Timestamp>>,
    }

    const HOUR: Timestamp = 3_600_000;

    impl KeyedProcessFunction for Reminder {
        type Key = u32;
        type In = u32;
        type Out = (u32, Timestamp);
        fn open(&mut self, state: &mut StateRegistry<'_, u32>, _: &TaskInfo) -> Result<()> {
            self.armed = Some(state.value_state("armed")?);
            Ok(())
        }
        fn process(&mut self, _: u32, ctx: &mut KeyedContext<'_, u32>, _: &mut Vec<(u32, Timestamp)>) -> Result<()> {
            let armed = self.armed.as_ref().unwrap();
            let at = match armed.get(ctx)? {
                Some(t) => {
                    ctx.delete_processing_time_timer(t)?;
                    t + 1
                }
                None => ctx.current_processing_time() + HOUR,
            };
            armed.update(ctx, at)?;
            ctx.register_processing_time_timer(at)
        }
        fn on_processing_time_timer(
            &mut self,
            ts: Timestamp,
            ctx: &mut KeyedContext<'_, u32>,
            out: &mut Vec<(u32, Timestamp)>,
        ) -> Result<()> {
            self.armed.as_ref().unwrap().clear(ctx)?;
            out.push((*ctx.key(), ts));
            Ok(())
        }
    }

    fn info(backend: StateBackendKind, subtask: usize, parallelism: usize, dir: &std::path::Path) -> TaskInfo {
        TaskInfo {
            job_id: "j".into(),
            name: "reminder".into(),
            uid: "reminder".into(),
            subtask,
            parallelism,
            max_parallelism: 128,
            attempt: 0,
            state_backend: backend,
            local_dir: dir.join(format!("{subtask}-{parallelism}")),
            rocksdb: Default::default(),
            finish_hooks: Default::default(),
        }
    }

    /// The state backends of this build.
    pub(crate) fn backends() -> Vec<StateBackendKind> {
        let mut all = vec![StateBackendKind::Memory];
        if cfg!(feature = "rocksdb") {
            all.push(StateBackendKind::RocksDb { incremental: true });
        }
        all
    }

    fn reminder_op() -> KeyedProcessOp<Reminder> {
        KeyedProcessOp::new(Reminder::default(), Arc::new(|k: &u32| *k))
    }

    #[test]
    fn processing_time_timers_fire_when_due_and_are_restored_by_key_group_at_another_parallelism() {
        for backend in backends() {
            let dir = tempfile::tempdir().unwrap();
            let mut op = reminder_op();
            op.open(&info(backend, 0, 1, dir.path()), None).unwrap();
            let before = crate::state::processing_time_now();
            let mut out = Vec::new();
            op.process((0..200).collect(), &mut out).unwrap();
            // Keys below 50 are re-armed one ms later: the first timer must not fire.
            op.process((0..50).collect(), &mut out).unwrap();
            let after = crate::state::processing_time_now();
            let first = op.next_processing_time().expect("timers are armed");
            assert!((before + HOUR..=after + HOUR).contains(&first), "{first}");
            op.on_processing_time(before + HOUR - 1, &mut out).unwrap();
            assert!(
                out.is_empty(),
                "nothing is due an hour minus a ms after the first record"
            );
            let snapshot = op.snapshot(crate::CheckpointId(1)).unwrap();

            // Restored at parallelism 3: every key's timer is back, in the subtask owning it.
            let mut fired = Vec::new();
            for subtask in 0..3 {
                let range = range_for_subtask(128, 3, subtask);
                let mut op = reminder_op();
                let restored = crate::operator::RestoredState {
                    keyed: snapshot.keyed.as_ref().unwrap().canonical_blocks(Some(range)),
                    operator: Default::default(),
                };
                op.open(&info(backend, subtask, 3, dir.path()), Some(restored)).unwrap();
                let mut out = Vec::new();
                op.on_processing_time(Timestamp::MAX, &mut out).unwrap();
                assert!(op.next_processing_time().is_none(), "fired timers are gone");
                for (k, _) in &out {
                    let kg = crate::keygroup::key_group_for_bytes(&postcard::to_allocvec(k).unwrap(), 128);
                    assert!(range.contains(kg), "key {k} fired in subtask {subtask}");
                }
                fired.extend(out);
            }
            fired.sort();
            let armed: Vec<u32> = fired.iter().map(|(k, _)| *k).collect();
            assert_eq!(armed, (0..200).collect::<Vec<_>>(), "{backend:?}: each key fired once");
            for (k, ts) in fired {
                let moved = Timestamp::from(k < 50);
                assert!((before + HOUR + moved..=after + HOUR + moved).contains(&ts), "{k} {ts}");
            }
        }
    }

    /// Fires every timer as its time comes, a round at a time (the chain takes each round's
    /// output before the next).
    fn fire_all(op: &mut KeyedProcessOp<Reminder>) -> Vec<(u32, Timestamp)> {
        let mut all = Vec::new();
        while let Some(due) = op.next_processing_time() {
            let mut round = Vec::new();
            op.on_processing_time(due, &mut round).unwrap();
            all.extend(round);
        }
        all
    }

    /// A checkpoint between two rounds of one time's firing (more timers due at once than a
    /// round fires) holds exactly the timers not fired yet, as they were at the barrier: the
    /// firing that goes on after it changes nothing the snapshot holds.
    #[test]
    fn a_snapshot_between_firing_rounds_holds_the_timers_not_fired_yet() {
        for backend in backends() {
            let dir = tempfile::tempdir().unwrap();
            let keys = 3 * FIRE_ROUND as u32;
            let mut op = reminder_op();
            op.open(&info(backend, 0, 1, dir.path()), None).unwrap();
            let mut out = Vec::new();
            // One batch: every key's timer at the same time.
            op.process((0..keys).collect(), &mut out).unwrap();
            // Fired at their time, not later: records after it arm timers from that clock.
            let due = op.next_processing_time().unwrap();
            op.on_processing_time(due, &mut out).unwrap();
            let first_round: Vec<u32> = out.iter().map(|(k, _)| *k).collect();
            assert_eq!(first_round.len(), FIRE_ROUND, "one round of the due timers fired");
            // Between rounds: keys waiting to fire are moved a ms later (delete + register),
            // and a key already fired arms a new timer.
            let fired_key = first_round[0];
            let unfired: Vec<u32> = (0..keys).filter(|k| !first_round.contains(k)).take(100).collect();
            let mut batch = unfired.clone();
            batch.push(fired_key);
            op.process(batch, &mut Vec::new()).unwrap();
            let snapshot = op.snapshot(crate::CheckpointId(1)).unwrap();

            // What the running operator fires after the barrier...
            let mut rest = fire_all(&mut op);
            // ... a restore of the snapshot, written after that firing, fires the same.
            let restored = crate::operator::RestoredState {
                keyed: snapshot.keyed.as_ref().unwrap().canonical_blocks(None),
                operator: Default::default(),
            };
            let mut again = reminder_op();
            again
                .open(&info(backend, 0, 1, &dir.path().join("again")), Some(restored))
                .unwrap();
            let mut replayed = fire_all(&mut again);
            rest.sort();
            replayed.sort();
            assert_eq!(rest, replayed, "{backend:?}: the restore fires what the barrier left");
            // Every key fired once after the first round, the fired one once more.
            let mut left: Vec<u32> = rest.iter().map(|(k, _)| *k).collect();
            left.sort();
            let mut expected: Vec<u32> = (0..keys).filter(|k| !first_round.contains(k)).collect();
            expected.push(fired_key);
            expected.sort();
            assert_eq!(left, expected, "{backend:?}");
            // The moved ones fired a ms after the others.
            let at = |k: u32| rest.iter().find(|(key, _)| *key == k).unwrap().1;
            let base = out[0].1;
            assert!(unfired.iter().all(|k| at(*k) == base + 1), "{backend:?}: moved timers");
        }
    }
}
