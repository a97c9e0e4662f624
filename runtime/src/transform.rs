//! Adapters from the DataStream API's functions to [`Operator`]: map, filter, flat_map, keyed
//! process and sink.

use crate::checkpoint::CheckpointId;
use crate::error::{Error, Result};
use crate::keygroup::key_group_for_bytes;
use crate::operator::{
    Data, KeySelector, KeyedProcessFunction, Operator, OperatorSnapshot, RestoredState, SinkFunction, StateRegistry,
    TaskInfo,
};
use crate::state::{CurrentKey, KeyedBackend, KeyedContext};
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
    pub max_parallelism: u16,
    key_bytes: Vec<u8>,
}

impl<P: KeyedProcessFunction> KeyedProcessOp<P> {
    pub fn new(f: P, key: KeySelector<P::In, P::Key>) -> Self {
        Self {
            f,
            key,
            backend: None,
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
        let restored = restored.map(|r| r.keyed).unwrap_or_default();
        let mut backend = KeyedBackend::open(
            info.state_backend,
            info.key_group_range(),
            &info.local_dir,
            restored,
            info.rescale_merge,
        )?;
        self.f.open(&mut StateRegistry::new(&mut backend), info)?;
        self.backend = Some(backend);
        Ok(())
    }

    fn process(&mut self, batch: Vec<P::In>, out: &mut Vec<P::Out>) -> Result<()> {
        let backend = self.backend.as_mut().expect("opened before use");
        let range = backend.range();
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
            };
            self.f.process(record, &mut ctx, out)?;
        }
        Ok(())
    }

    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<OperatorSnapshot> {
        let backend = self.backend();
        let keyed = if backend.is_empty() {
            None
        } else {
            Some(backend.snapshot(checkpoint)?)
        };
        Ok(OperatorSnapshot {
            keyed,
            operator: Default::default(),
        })
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
