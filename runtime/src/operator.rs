//! What user code implements: sources, one-input operators, keyed process functions and sinks.
//! Stateless map/filter/flat_map are closures on the DataStream API; they are adapted to
//! [`Operator`] in `stream.rs`.

use crate::checkpoint::CheckpointId;
use crate::element::Timestamp;
use crate::error::Result;
use crate::keygroup::KeyGroupRange;
use crate::snapshot::{OperatorState, RestoredKeyGroups};
use crate::state::{
    Key, KeyedBackend, KeyedContext, KeyedSnapshot, ListState, MapState, ReducingState, StateTtlConfig, StateValue,
    ValueState,
};
use std::sync::Arc;
use std::time::Duration;

/// What a record type must be to travel between subtasks: in cluster mode records cross
/// process boundaries, so they are serialized (serde, as Flink requires a type serializer).
pub trait Data: Clone + Send + serde::Serialize + serde::de::DeserializeOwned + 'static {}
impl<T: Clone + Send + serde::Serialize + serde::de::DeserializeOwned + 'static> Data for T {}

/// Extracts a record's key.
pub type KeySelector<T, K> = Arc<dyn Fn(&T) -> K + Send + Sync>;

/// Identity of the subtask an operator runs in.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    /// The job's id.
    pub job_id: String,
    /// Operator name.
    pub name: String,
    /// Operator uid.
    pub uid: String,
    /// This subtask's index.
    pub subtask: usize,
    /// Operator parallelism.
    pub parallelism: usize,
    /// Number of key groups.
    pub max_parallelism: u16,
    /// 0 on the first run, then one more per restart.
    pub attempt: u32,
    /// The job's keyed state backend.
    pub state_backend: crate::config::StateBackendKind,
    /// This operator subtask's local working directory (RocksDB instance, downloads).
    pub local_dir: std::path::PathBuf,
    /// Settings of the RocksDB state backend.
    pub rocksdb: crate::config::RocksDbSettings,
    /// Work to run once the whole job has finished (a sink's last commit).
    pub finish_hooks: FinishHooks,
}

/// A hook registered through [`FinishHooks`].
type FinishHook = Box<dyn FnOnce() -> Result<()> + Send>;

/// Work that runs once every task of the job has finished, and only then: a sink that reached
/// the end of its input commits its last output here, because until the whole job has finished
/// a failure elsewhere still restarts it from the last checkpoint, and output committed past
/// that checkpoint would then be written twice. The hooks of a failed attempt are dropped.
#[derive(Clone, Default)]
pub struct FinishHooks(Arc<std::sync::Mutex<Vec<FinishHook>>>);

impl FinishHooks {
    /// Adds work to run when the job has finished.
    pub fn register(&self, hook: impl FnOnce() -> Result<()> + Send + 'static) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(hook));
    }

    /// Runs every hook in registration order; the first error stops them.
    pub fn run(&self) -> Result<()> {
        let hooks = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        hooks.into_iter().try_for_each(|h| h())
    }
}

impl std::fmt::Debug for FinishHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|h| h.len()).unwrap_or_default();
        write!(f, "FinishHooks({n})")
    }
}

impl TaskInfo {
    /// Key groups this subtask owns.
    pub fn key_group_range(&self) -> KeyGroupRange {
        crate::keygroup::range_for_subtask(self.max_parallelism, self.parallelism, self.subtask)
    }
}

/// State handed to an operator subtask on restore.
#[derive(Debug, Default, Clone)]
pub struct RestoredState {
    /// Keyed-state blocks of the key groups this subtask owns.
    pub keyed: RestoredKeyGroups,
    /// This subtask's share of the operator state.
    pub operator: OperatorState,
}

/// What an operator's snapshot holds.
#[derive(Default)]
pub struct OperatorSnapshot {
    /// A copy-on-write view of keyed state, serialized off the task thread.
    pub keyed: Option<KeyedSnapshot>,
    /// Operator (non-keyed) list state.
    pub operator: OperatorState,
}

impl OperatorSnapshot {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.keyed.is_none() && self.operator.is_empty()
    }
}

/// What a source's poll produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePoll {
    /// Records were emitted (maybe none); poll again.
    Ready,
    /// Nothing to emit now: wait up to this long (or until a command arrives) and poll again.
    Idle(Duration),
    /// The source is exhausted.
    Finished,
}

/// A parallel source. Each subtask owns a clone; its position lives in operator state so that
/// a restore rewinds it.
pub trait SourceFunction: Send + Sync + Clone + 'static {
    /// Records it emits.
    type Out: Data;
    /// Prepares the subtask; `restored` holds its share of the source's operator state.
    fn open(&mut self, info: &TaskInfo, restored: Option<OperatorState>) -> Result<()>;
    /// Emits the next records into `out`.
    fn poll(&mut self, out: &mut Vec<Self::Out>) -> Result<SourcePoll>;
    /// The current position, taken between two polls when a checkpoint is triggered.
    fn snapshot(&mut self) -> Result<OperatorState>;
}

/// A one-input operator with full control of state and output; the building block every
/// transformation is adapted to.
pub trait Operator: Send + 'static {
    /// Input records.
    type In: Data;
    /// Output records.
    type Out: Data;
    /// Called on the task thread before any record, with restored state if any.
    fn open(&mut self, info: &TaskInfo, restored: Option<RestoredState>) -> Result<()>;
    /// Processes a batch.
    fn process(&mut self, batch: Vec<Self::In>, out: &mut Vec<Self::Out>) -> Result<()>;
    /// The event-time clock advanced.
    fn watermark(&mut self, _watermark: Timestamp, _out: &mut Vec<Self::Out>) -> Result<()> {
        Ok(())
    }
    /// Whether the last `watermark` call stopped early with more due (timers fire in bounded
    /// rounds, so that output moves on between them): the chain calls it again.
    fn watermark_pending(&self) -> bool {
        false
    }
    /// The earliest processing time (ms since the Unix epoch) at which this operator has work
    /// (a processing-time timer): the task wakes up then even if no input arrives.
    fn next_processing_time(&self) -> Option<Timestamp> {
        None
    }
    /// The wall clock reached `now`: run one bounded round of what is due (the task calls
    /// again, between inputs, while `next_processing_time` is at or before the clock).
    fn on_processing_time(&mut self, _now: Timestamp, _out: &mut Vec<Self::Out>) -> Result<()> {
        Ok(())
    }
    /// Asked after each `on_processing_time` round: whether this operator's output just went
    /// idle, left out of watermarks downstream until it emits again (a source's idleness
    /// timeout, which it arms as a processing-time wake-up).
    fn output_idle(&mut self) -> bool {
        false
    }
    /// Whether watermarks reaching this operator pass on downstream. A watermark generator
    /// says no: it decides event time for everything after it.
    fn forwards_watermarks(&self) -> bool {
        true
    }
    /// A watermark this operator generated, taken before and after each batch and at the end
    /// of input.
    fn take_watermark(&mut self) -> Option<Timestamp> {
        None
    }
    /// Snapshots state when the barrier of `checkpoint` has aligned.
    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot::default())
    }
    /// The checkpoint is complete (its `_metadata` is written).
    fn checkpoint_complete(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        Ok(())
    }
    /// Every input has ended: emit what remains.
    fn end_of_input(&mut self, _out: &mut Vec<Self::Out>) -> Result<()> {
        Ok(())
    }
}

/// Names beginning with `__` belong to the runtime (timers).
fn user_state_name(name: &str) -> Result<&str> {
    if name.starts_with("__") {
        return Err(crate::error::Error::Config(format!(
            "state name '{name}': names beginning with '__' are reserved for the runtime"
        )));
    }
    Ok(name)
}

/// Registers keyed state while a keyed function opens.
///
/// States registered through [`StateRegistry::with_ttl`] expire; the others live until cleared.
pub struct StateRegistry<'a, K> {
    backend: &'a mut KeyedBackend,
    ttl: Option<StateTtlConfig>,
    _k: std::marker::PhantomData<fn() -> K>,
}

impl<'a, K: Key> StateRegistry<'a, K> {
    pub(crate) fn new(backend: &'a mut KeyedBackend) -> Self {
        Self {
            backend,
            ttl: None,
            _k: std::marker::PhantomData,
        }
    }

    /// A registry whose states expire after `ttl` (value, list, map and reducing state alike):
    /// `state.with_ttl(cfg).value_state::<u64>("seen")?`. Adding or removing a TTL on an
    /// existing state is not a compatible change (its stored form differs): a restore refuses
    /// it with an error naming the state; rename the state instead. Changing the TTL is fine.
    pub fn with_ttl(&mut self, ttl: StateTtlConfig) -> StateRegistry<'_, K> {
        StateRegistry {
            backend: &mut *self.backend,
            ttl: Some(ttl),
            _k: std::marker::PhantomData,
        }
    }

    /// A value per key.
    pub fn value_state<V: StateValue>(&mut self, name: &str) -> Result<ValueState<K, V>> {
        ValueState::register(self.backend, user_state_name(name)?, self.ttl)
    }

    /// A list per key.
    pub fn list_state<V: StateValue>(&mut self, name: &str) -> Result<ListState<K, V>> {
        ListState::register(self.backend, user_state_name(name)?, self.ttl)
    }

    /// A map per key.
    pub fn map_state<UK: Key, UV: StateValue>(&mut self, name: &str) -> Result<MapState<K, UK, UV>> {
        MapState::register(self.backend, user_state_name(name)?, self.ttl)
    }

    /// A reduced value per key.
    pub fn reducing_state<V: StateValue>(
        &mut self,
        name: &str,
        reduce: impl Fn(&V, &V) -> V + Send + Sync + 'static,
    ) -> Result<ReducingState<K, V>> {
        ReducingState::register(self.backend, user_state_name(name)?, self.ttl, Arc::new(reduce))
    }
}

/// A function over a keyed stream with keyed state, like Flink's `KeyedProcessFunction`.
pub trait KeyedProcessFunction: Send + Sync + Clone + 'static {
    /// The key type.
    type Key: Key;
    /// Input records.
    type In: Data;
    /// Output records.
    type Out: Data;
    /// Registers state; `info` tells which subtask and attempt this is.
    fn open(&mut self, state: &mut StateRegistry<'_, Self::Key>, info: &TaskInfo) -> Result<()>;
    /// Processes one record of the key `ctx.key()`.
    fn process(
        &mut self,
        record: Self::In,
        ctx: &mut KeyedContext<'_, Self::Key>,
        out: &mut Vec<Self::Out>,
    ) -> Result<()>;
    /// An event-time timer of the key `ctx.key()` fired: the watermark reached `timestamp`.
    fn on_timer(
        &mut self,
        _timestamp: Timestamp,
        _ctx: &mut KeyedContext<'_, Self::Key>,
        _out: &mut Vec<Self::Out>,
    ) -> Result<()> {
        Ok(())
    }
    /// A processing-time timer of the key `ctx.key()` fired: the wall clock reached `timestamp`.
    fn on_processing_time_timer(
        &mut self,
        _timestamp: Timestamp,
        _ctx: &mut KeyedContext<'_, Self::Key>,
        _out: &mut Vec<Self::Out>,
    ) -> Result<()> {
        Ok(())
    }
    /// The checkpoint is complete (its `_metadata` is written), like Flink's
    /// `CheckpointListener`.
    fn checkpoint_complete(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        Ok(())
    }
    /// Every input has ended; `state` gives access to every key's state.
    fn end_of_input(&mut self, _state: &KeyedBackend, _out: &mut Vec<Self::Out>) -> Result<()> {
        Ok(())
    }
}

/// A sink. Its operator state is its pre-committed output; `checkpoint_complete` commits.
pub trait SinkFunction: Send + Sync + Clone + 'static {
    /// Records it consumes.
    type In: Data;
    /// Prepares the subtask with its restored operator state.
    fn open(&mut self, info: &TaskInfo, restored: Option<OperatorState>) -> Result<()>;
    /// Writes a batch.
    fn write(&mut self, batch: Vec<Self::In>) -> Result<()>;
    /// Snapshot (pre-commit) at a barrier.
    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<OperatorState> {
        Ok(OperatorState::new())
    }
    /// Commit what was pre-committed for `checkpoint`.
    fn checkpoint_complete(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        Ok(())
    }
    /// Every input has ended: flush and close.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
