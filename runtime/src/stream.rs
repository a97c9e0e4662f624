//! The DataStream API: how a job describes its dataflow.
//!
//! ```ignore
//! env.source("transactions", generator)
//!     .key_by(|t: &Txn| t.user)
//!     .process("running totals", RunningTotals::default())
//!     .uid("running-totals")
//!     .sink("output", sink)
//!     .parallelism(1);
//! ```

use crate::error::Result;
use crate::graph::{
    EdgeSpec, JobGraph, NodeKind, NodeSpec, OperatorNode, PartitionKind, SourceNode, TypedEdge, WatermarkOrigin,
};
use crate::keygroup::key_group_for_key;
use crate::operator::{
    Data, KeySelector, KeyedProcessFunction, Operator, SinkFunction, SourceFunction, StateRegistry, TaskInfo,
};
use crate::state::{Key, KeyedContext, ReduceFn, ReducingState, StateValue};
use crate::time::{TimestampFn, WatermarkGenerator, WatermarkStrategy};
use crate::transform::{FilterOp, FlatMapOp, KeyedProcessOp, MapOp, SinkOp};
use crate::window::{
    AggregateFunction, Collect, ProcessWindowFunction, ToWindowResult, WindowAssigner, WindowFunction, WindowOutput,
    WindowResult,
};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct Builder {
    nodes: Vec<NodeSpec>,
    edges: Vec<EdgeSpec>,
}

/// Where a job's dataflow is described. A job's build function receives one.
#[derive(Default)]
pub struct StreamEnv {
    inner: Rc<RefCell<Builder>>,
}

impl StreamEnv {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parallel source.
    pub fn source<S: SourceFunction>(&mut self, name: &str, source: S) -> DataStream<S::Out> {
        let node = push_node(&self.inner, name, NodeKind::Source(Arc::new(SourceNode(source))));
        DataStream::new(self.inner.clone(), node)
    }

    /// Resolves defaults (parallelism, uids) and validates the graph.
    pub fn build(self, parallelism: usize, max_parallelism: u16) -> Result<JobGraph> {
        let b = std::mem::take(&mut *self.inner.borrow_mut());
        JobGraph::resolve(b.nodes, b.edges, parallelism, max_parallelism)
    }
}

fn push_node(inner: &Rc<RefCell<Builder>>, name: &str, kind: NodeKind) -> usize {
    let mut b = inner.borrow_mut();
    b.nodes.push(NodeSpec {
        name: name.to_string(),
        uid: None,
        parallelism: None,
        kind,
        watermarks: WatermarkOrigin::Upstream,
    });
    b.nodes.len() - 1
}

/// A stream of records of type `T`.
pub struct DataStream<T> {
    inner: Rc<RefCell<Builder>>,
    node: usize,
    partition: Option<PartitionKind>,
    /// How to read a record's event time, once timestamps were assigned upstream (kept while
    /// the record type stays the same).
    timestamps: Option<TimestampFn<T>>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for DataStream<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            node: self.node,
            partition: self.partition,
            timestamps: self.timestamps.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: Data> DataStream<T> {
    fn new(inner: Rc<RefCell<Builder>>, node: usize) -> Self {
        Self {
            inner,
            node,
            partition: None,
            timestamps: None,
            _t: PhantomData,
        }
    }

    /// Sets the stable id of the operator that produces this stream (maps state across versions).
    pub fn uid(self, uid: &str) -> Self {
        self.inner.borrow_mut().nodes[self.node].uid = Some(uid.to_string());
        self
    }

    /// Renames the operator that produces this stream.
    pub fn name(self, name: &str) -> Self {
        self.inner.borrow_mut().nodes[self.node].name = name.to_string();
        self
    }

    /// Sets the parallelism of the operator that produces this stream.
    pub fn parallelism(self, parallelism: usize) -> Self {
        self.inner.borrow_mut().nodes[self.node].parallelism = Some(parallelism);
        self
    }

    /// The next operator reads this stream round-robin.
    pub fn rebalance(mut self) -> Self {
        self.partition = Some(PartitionKind::Rebalance);
        self
    }

    /// Every subtask of the next operator reads every record.
    pub fn broadcast(mut self) -> Self {
        self.partition = Some(PartitionKind::Broadcast);
        self
    }

    /// Subtask i of the next operator reads subtask i of this one (equal parallelism).
    pub fn forward(mut self) -> Self {
        self.partition = Some(PartitionKind::Forward);
        self
    }

    fn connect<U: Data>(
        self,
        name: &str,
        kind: NodeKind,
        partition: Option<PartitionKind>,
        edge: TypedEdge<T>,
    ) -> DataStream<U> {
        let node = push_node(&self.inner, name, kind);
        self.inner.borrow_mut().edges.push(EdgeSpec {
            from: self.node,
            to: node,
            partition,
            factory: Arc::new(edge),
        });
        DataStream::new(self.inner, node)
    }

    /// Applies a custom operator to this stream.
    pub fn transform<O: Operator<In = T>>(
        self,
        name: &str,
        make: impl Fn() -> O + Send + Sync + 'static,
    ) -> DataStream<O::Out> {
        let partition = self.partition;
        let kind = NodeKind::Operator(Arc::new(OperatorNode { make: Arc::new(make) }));
        self.connect(name, kind, partition, TypedEdge { key_group: None })
    }

    /// One output per record.
    pub fn map<U: Data>(self, f: impl Fn(T) -> U + Send + Sync + 'static) -> DataStream<U> {
        let f: Arc<dyn Fn(T) -> U + Send + Sync> = Arc::new(f);
        self.transform("map", move || MapOp { f: f.clone() })
    }

    /// Keeps the records for which `f` is true.
    pub fn filter(self, f: impl Fn(&T) -> bool + Send + Sync + 'static) -> DataStream<T> {
        let f: Arc<dyn Fn(&T) -> bool + Send + Sync> = Arc::new(f);
        let timestamps = self.timestamps.clone();
        let mut filtered = self.transform("filter", move || FilterOp { f: f.clone() });
        filtered.timestamps = timestamps;
        filtered
    }

    /// Gives records their event time and starts watermarks here (chained behind the source):
    /// windows and event-time timers downstream follow them.
    pub fn assign_timestamps_and_watermarks(self, strategy: WatermarkStrategy<T>) -> DataStream<T> {
        let timestamps = strategy.timestamp.clone();
        let max_drift = strategy
            .max_drift
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut stream = self.transform("watermarks", move || WatermarkGenerator::new(strategy.clone()));
        stream.inner.borrow_mut().nodes[stream.node].watermarks = WatermarkOrigin::Generated(max_drift);
        stream.timestamps = Some(timestamps);
        stream
    }

    /// Any number of outputs per record.
    pub fn flat_map<U: Data, I: IntoIterator<Item = U> + 'static>(
        self,
        f: impl Fn(T) -> I + Send + Sync + 'static,
    ) -> DataStream<U> {
        let f: Arc<dyn Fn(T) -> I + Send + Sync> = Arc::new(f);
        self.transform("flat_map", move || FlatMapOp {
            f: f.clone(),
            _u: PhantomData,
        })
    }

    /// Partitions the stream by key: every record of a key goes to the subtask that owns the
    /// key's key group.
    pub fn key_by<K: Key>(self, key: impl Fn(&T) -> K + Send + Sync + 'static) -> KeyedStream<T, K> {
        KeyedStream {
            stream: self,
            key: Arc::new(key),
        }
    }

    /// Writes the stream to a sink.
    pub fn sink<S: SinkFunction<In = T>>(self, name: &str, sink: S) -> DataStream<()> {
        self.transform(name, move || SinkOp(sink.clone()))
    }
}

/// A stream partitioned by key.
pub struct KeyedStream<T, K> {
    stream: DataStream<T>,
    key: KeySelector<T, K>,
}

/// A keyed stream cut into event-time windows (see [`crate::window`]).
pub struct WindowedStream<T, K> {
    keyed: KeyedStream<T, K>,
    assigner: WindowAssigner,
    lateness: Duration,
}

impl<T: Data, K: Key> WindowedStream<T, K> {
    /// Keeps each window's state this long after it fired: later records update and re-fire it.
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.lateness = lateness;
        self
    }

    /// Folds each window's records incrementally with `agg`: one [`WindowResult`] per firing.
    /// Fails when the stream has no timestamps (`assign_timestamps_and_watermarks` upstream).
    pub fn aggregate<A: AggregateFunction<In = T>>(
        self,
        name: &str,
        agg: A,
    ) -> Result<WindowedResults<WindowResult<K, A::Out>, T>> {
        self.aggregate_with(name, agg, ToWindowResult)
    }

    /// Folds each window's records incrementally with `agg`, then hands each fired window's
    /// aggregate to `window_fn` with the key and the window (Flink's `aggregate(agg, fn)`).
    pub fn aggregate_with<A, W>(self, name: &str, agg: A, window_fn: W) -> Result<WindowedResults<W::Out, T>>
    where
        A: AggregateFunction<In = T>,
        W: ProcessWindowFunction<K, A::Out>,
    {
        let Some(timestamps) = self.keyed.stream.timestamps.clone() else {
            return Err(crate::error::Error::Config(format!(
                "window '{name}': the stream has no event-time timestamps \
                 (call assign_timestamps_and_watermarks before key_by)"
            )));
        };
        let f = WindowFunction::new(self.assigner, agg, window_fn, timestamps, self.lateness);
        Ok(WindowedResults {
            stream: self.keyed.process(name, f),
        })
    }

    /// Folds each window's records pairwise with `reduce`, incrementally.
    pub fn reduce(
        self,
        name: &str,
        reduce: impl Fn(&T, &T) -> T + Send + Sync + 'static,
    ) -> Result<WindowedResults<WindowResult<K, T>, T>>
    where
        T: StateValue,
    {
        self.aggregate_with(name, crate::window::ReduceAggregate(Arc::new(reduce)), ToWindowResult)
    }

    /// Hands all of each fired window's records (in pane order, then arrival order) to
    /// `window_fn`. Every record is kept in state until its window is gone: prefer
    /// `aggregate_with` when an aggregate suffices.
    pub fn process<W: ProcessWindowFunction<K, Vec<T>>>(
        self,
        name: &str,
        window_fn: W,
    ) -> Result<WindowedResults<W::Out, T>>
    where
        T: StateValue,
    {
        self.aggregate_with(name, Collect(PhantomData), window_fn)
    }
}

/// What a window operator emits: window output and, apart, the records too late for it.
pub struct WindowedResults<R, T> {
    stream: DataStream<WindowOutput<R, T>>,
}

impl<R: Data, T: Data> WindowedResults<R, T> {
    /// Sets the stable id of the window operator.
    pub fn uid(mut self, uid: &str) -> Self {
        self.stream = self.stream.uid(uid);
        self
    }

    /// Sets the window operator's parallelism.
    pub fn parallelism(mut self, parallelism: usize) -> Self {
        self.stream = self.stream.parallelism(parallelism);
        self
    }

    /// The fired windows' output.
    pub fn results(&self) -> DataStream<R> {
        self.stream.clone().flat_map(WindowOutput::result)
    }

    /// The late side output: records that arrived after all their windows had closed.
    pub fn late(&self) -> DataStream<T> {
        self.stream.clone().flat_map(WindowOutput::late)
    }
}

impl<T: Data, K: Key> KeyedStream<T, K> {
    /// Cuts the stream into event-time windows per key.
    pub fn window(self, assigner: WindowAssigner) -> WindowedStream<T, K> {
        WindowedStream {
            keyed: self,
            assigner,
            lateness: Duration::ZERO,
        }
    }

    /// Runs a keyed process function with keyed state.
    pub fn process<P: KeyedProcessFunction<Key = K, In = T>>(self, name: &str, f: P) -> DataStream<P::Out> {
        let key = self.key.clone();
        let edge_key = self.key;
        let edge = TypedEdge {
            key_group: Some(Arc::new(move |t: &T, m| key_group_for_key(&edge_key(t), m))),
        };
        let make = move || KeyedProcessOp::new(f.clone(), key.clone());
        let kind = NodeKind::Operator(Arc::new(OperatorNode { make: Arc::new(make) }));
        self.stream.connect(name, kind, Some(PartitionKind::Hash), edge)
    }

    /// Emits, for every record, the reduction of all records of its key so far.
    pub fn reduce(self, name: &str, f: impl Fn(&T, &T) -> T + Send + Sync + 'static) -> DataStream<T>
    where
        T: StateValue,
    {
        self.process(
            name,
            Reduce {
                f: Arc::new(f),
                state: None,
            },
        )
    }
}

struct Reduce<K, T> {
    f: ReduceFn<T>,
    state: Option<ReducingState<K, T>>,
}

impl<K, T> Clone for Reduce<K, T> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            state: self.state.clone(),
        }
    }
}

impl<K: Key, T: StateValue> KeyedProcessFunction for Reduce<K, T> {
    type Key = K;
    type In = T;
    type Out = T;
    fn open(&mut self, state: &mut StateRegistry<'_, K>, _: &TaskInfo) -> Result<()> {
        let f = self.f.clone();
        self.state = Some(state.reducing_state("reduce", move |a: &T, b: &T| f(a, b))?);
        Ok(())
    }
    fn process(&mut self, record: T, ctx: &mut KeyedContext<'_, K>, out: &mut Vec<T>) -> Result<()> {
        let state = self.state.as_ref().expect("opened");
        state.add(ctx, record)?;
        out.extend(state.get(ctx)?);
        Ok(())
    }
}
