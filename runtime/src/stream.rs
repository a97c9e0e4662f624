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
use crate::graph::{EdgeSpec, JobGraph, NodeKind, NodeSpec, OperatorNode, PartitionKind, SourceNode, TypedEdge};
use crate::keygroup::key_group_for_key;
use crate::operator::{
    Data, KeySelector, KeyedProcessFunction, Operator, SinkFunction, SourceFunction, StateRegistry, TaskInfo,
};
use crate::state::{Key, KeyedContext, ReduceFn, ReducingState, StateValue};
use crate::transform::{FilterOp, FlatMapOp, KeyedProcessOp, MapOp, SinkOp};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

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
    });
    b.nodes.len() - 1
}

/// A stream of records of type `T`.
pub struct DataStream<T> {
    inner: Rc<RefCell<Builder>>,
    node: usize,
    partition: Option<PartitionKind>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for DataStream<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            node: self.node,
            partition: self.partition,
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
        self.transform("filter", move || FilterOp { f: f.clone() })
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

impl<T: Data, K: Key> KeyedStream<T, K> {
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
