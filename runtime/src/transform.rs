//! Adapters from the DataStream API's functions to [`Operator`]: map, filter, flat_map, keyed
//! process and sink.

use crate::checkpoint::CheckpointId;
use crate::element::Timestamp;
use crate::error::{Error, Result};
use crate::keygroup::key_group_for_bytes;
use crate::operator::{
    Data, KeySelector, KeyedProcessFunction, Operator, OperatorSnapshot, RestoredState, SinkFunction, StateRegistry,
    TaskInfo,
};
use crate::snapshot::{OperatorListState, Redistribution};
use crate::state::{CurrentKey, KeyedBackend, KeyedContext, TimerService};
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

/// The keyed operator's event-time clock, as operator state (union): every subtask had the
/// same clock at an aligned barrier, and a restored one starts from it, so a record that was
/// late before a failure is late after it too.
const WATERMARK_STATE: &str = "watermark";

/// Outputs of timers fired before the chain moves them on (a watermark at the end of input
/// fires every window at once).
const FIRE_ROUND: usize = 4096;

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
}

impl<P: KeyedProcessFunction> Operator for KeyedProcessOp<P> {
    type In = P::In;
    type Out = P::Out;

    fn open(&mut self, info: &TaskInfo, restored: Option<RestoredState>) -> Result<()> {
        self.max_parallelism = info.max_parallelism;
        let restored = restored.unwrap_or_default();
        let mut clock: Option<Timestamp> = None;
        for e in restored.operator.get(WATERMARK_STATE).map_or(&[][..], |s| &s.entries) {
            let w: Timestamp = postcard::from_bytes(e)
                .map_err(|err| Error::Incompatible(format!("restored watermark is not readable: {err}")))?;
            clock = Some(clock.map_or(w, |c| c.min(w)));
        }
        let restored = restored.keyed;
        let mut backend = KeyedBackend::open(
            info.state_backend,
            info.key_group_range(),
            &info.local_dir,
            restored,
            info.rescale_merge,
        )?;
        let mut timers = TimerService::open::<P::Key>(&mut backend)?;
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
        let now = crate::state::processing_time_now();
        for record in batch {
            let key = (self.key)(&record);
            self.key_bytes.clear();
            self.key_bytes = postcard::to_extend(&key, std::mem::take(&mut self.key_bytes))?;
            let kg = key_group_for_bytes(&self.key_bytes, self.max_parallelism);
            if !range.contains(kg) {
                return Err(Error::User(format!(
                    "a record of key group {} reached the subtask owning key groups {range}",
                    kg.0
                )));
            }
            let mut ctx = KeyedContext {
                cur: CurrentKey {
                    key: &key,
                    bytes: &self.key_bytes,
                    key_group: kg,
                    index: range.index_of(kg),
                },
                backend,
                timers: self.timers.as_mut(),
                now,
            };
            self.f.process(record, &mut ctx, out)?;
        }
        Ok(())
    }

    fn watermark(&mut self, watermark: Timestamp, out: &mut Vec<P::Out>) -> Result<()> {
        let (Some(backend), Some(timers)) = (self.backend.as_mut(), self.timers.as_mut()) else {
            return Ok(());
        };
        timers.advance(watermark);
        let range = backend.range();
        let now = crate::state::processing_time_now();
        while out.len() < FIRE_ROUND {
            let Some((ts, bytes)) = timers.pop_due() else {
                break;
            };
            let key: P::Key = postcard::from_bytes(&bytes)?;
            let kg = key_group_for_bytes(&bytes, self.max_parallelism);
            let state = timers.state();
            let mut ctx = KeyedContext {
                cur: CurrentKey {
                    key: &key,
                    bytes: &bytes,
                    key_group: kg,
                    index: range.index_of(kg),
                },
                backend: &mut *backend,
                timers: Some(&mut *timers),
                now,
            };
            ctx.backend.map_remove::<P::Key, Timestamp, ()>(state, &ctx.cur, &ts)?;
            self.f.on_timer(ts, &mut ctx, out)?;
        }
        Ok(())
    }

    fn watermark_pending(&self) -> bool {
        self.timers.as_ref().is_some_and(TimerService::has_due)
    }

    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<OperatorSnapshot> {
        let backend = self.backend();
        let keyed = if backend.is_empty() {
            None
        } else {
            Some(backend.snapshot(checkpoint)?)
        };
        let mut operator = crate::snapshot::OperatorState::new();
        // Even at MIN: a restore takes the smallest clock of all old subtasks.
        if let Some(t) = self.timers.as_ref() {
            operator.insert(
                WATERMARK_STATE.to_string(),
                OperatorListState {
                    mode: Redistribution::Union,
                    entries: vec![postcard::to_allocvec(&t.watermark())?],
                },
            );
        }
        Ok(OperatorSnapshot { keyed, operator })
    }

    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) -> Result<()> {
        self.backend().checkpoint_complete(checkpoint);
        Ok(())
    }

    fn end_of_input(&mut self, out: &mut Vec<P::Out>) -> Result<()> {
        let backend = self.backend.as_ref().expect("opened before use");
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
