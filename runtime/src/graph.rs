//! The job graph: operators (vertices) and the streams between them (edges), with types erased
//! behind factories. A vertex's factory builds its chain link for one subtask; an edge's factory
//! creates the typed channels, the writer that partitions into them and the reader that drains
//! them. Wiring only ever connects factories built for the same record type, so the `Any`
//! downcasts in here cannot fail.

use crate::element::StreamElement;
use crate::error::{Error, Result};
use crate::keygroup::KeyGroup;
use crate::net::RemoteLinks;
use crate::operator::{Data, Operator, RestoredState, SourceFunction, TaskInfo};
use crate::task::chain::{Chain, Discard, FanOut, OperatorLink};
use crate::task::input::InputGate;
use crate::task::output::{ChannelWriter, Outlet, Partitioner};
use crate::task::{InputDriver, SourceDriver, TaskDriver};
use crossbeam_channel::{bounded, Receiver};
use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub(crate) type AnyBox = Box<dyn Any + Send>;

fn unbox<T: 'static>(b: AnyBox) -> T {
    *b.downcast::<T>()
        .expect("graph wiring connects factories of the same record type")
}

/// How an edge spreads records over the downstream subtasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionKind {
    /// Subtask i to subtask i (equal parallelism); chainable.
    Forward,
    /// Round-robin.
    Rebalance,
    /// To every subtask.
    Broadcast,
    /// By key group.
    Hash,
}

/// What building one operator of one subtask needs.
pub(crate) struct NodeContext {
    pub info: TaskInfo,
    pub restored: Option<RestoredState>,
}

pub(crate) trait SourceFactory: Send + Sync {
    fn create(&self, ctx: NodeContext, next: AnyBox) -> Result<Box<dyn TaskDriver>>;
    fn discard(&self) -> AnyBox;
}

pub(crate) trait OperatorFactory: Send + Sync {
    fn create(&self, ctx: NodeContext, next: AnyBox) -> Result<AnyBox>;
    fn discard(&self) -> AnyBox;
}

pub(crate) struct WriterContext {
    pub max_parallelism: u16,
    pub batch_size: usize,
    pub cancel: Arc<AtomicBool>,
}

pub(crate) trait EdgeFactory: Send + Sync {
    /// Per upstream subtask its senders, per downstream subtask its receivers.
    fn channels(&self, forward: bool, up: usize, down: usize, capacity: usize) -> (Vec<AnyBox>, Vec<AnyBox>);
    fn writer(&self, partition: PartitionKind, senders: AnyBox, ctx: &WriterContext) -> AnyBox;
    /// The task reading the edge's channels, aligned by `max_drift` (ms) if given.
    fn reader(&self, receivers: AnyBox, head: AnyBox, max_drift: Option<i64>) -> Box<dyn TaskDriver>;
    fn fan_out(&self, outputs: Vec<AnyBox>) -> AnyBox;
    /// Cluster mode: carries the channels between a local and a remote subtask over the
    /// network, given the output of [`EdgeFactory::channels`]; the local subtasks' ends are
    /// returned in the same shape.
    fn bridge(
        &self,
        senders: Vec<AnyBox>,
        receivers: Vec<AnyBox>,
        forward: bool,
        links: &RemoteLinks<'_>,
    ) -> (Vec<AnyBox>, Vec<AnyBox>);
}

pub(crate) struct SourceNode<S>(pub S);

impl<S: SourceFunction> SourceFactory for SourceNode<S> {
    fn create(&self, ctx: NodeContext, next: AnyBox) -> Result<Box<dyn TaskDriver>> {
        let mut source = self.0.clone();
        source.open(&ctx.info, ctx.restored.map(|r| r.operator))?;
        Ok(Box::new(SourceDriver {
            source,
            uid: ctx.info.uid,
            chain: unbox::<Chain<S::Out>>(next),
            stopped_at: None,
        }))
    }
    fn discard(&self) -> AnyBox {
        Box::new(Box::new(Discard) as Chain<S::Out>)
    }
}

pub(crate) struct OperatorNode<O> {
    pub make: Arc<dyn Fn() -> O + Send + Sync>,
}

impl<O: Operator> OperatorFactory for OperatorNode<O> {
    fn create(&self, ctx: NodeContext, next: AnyBox) -> Result<AnyBox> {
        let mut op = (self.make)();
        op.open(&ctx.info, ctx.restored)?;
        let link = OperatorLink {
            op,
            uid: ctx.info.uid,
            out: Vec::new(),
            next: unbox::<Chain<O::Out>>(next),
        };
        Ok(Box::new(Box::new(link) as Chain<O::In>))
    }
    fn discard(&self) -> AnyBox {
        Box::new(Box::new(Discard) as Chain<O::Out>)
    }
}

/// Maps a record to its key group for a given max parallelism.
pub(crate) type KeyFn<T> = Arc<dyn Fn(&T, u16) -> KeyGroup + Send + Sync>;

pub(crate) struct TypedEdge<T> {
    pub key_group: Option<KeyFn<T>>,
}

impl<T: Data> EdgeFactory for TypedEdge<T> {
    fn channels(&self, forward: bool, up: usize, down: usize, capacity: usize) -> (Vec<AnyBox>, Vec<AnyBox>) {
        let mut senders: Vec<Vec<Outlet<T>>> = (0..up).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<Receiver<StreamElement<T>>>> = (0..down).map(|_| Vec::new()).collect();
        for (i, s) in senders.iter_mut().enumerate() {
            for (j, r) in receivers.iter_mut().enumerate() {
                if forward && i != j {
                    continue;
                }
                let (tx, rx) = bounded(capacity);
                s.push(Outlet::Local(tx));
                r.push(rx);
            }
        }
        (
            senders.into_iter().map(|s| Box::new(s) as AnyBox).collect(),
            receivers.into_iter().map(|r| Box::new(r) as AnyBox).collect(),
        )
    }

    fn writer(&self, partition: PartitionKind, senders: AnyBox, ctx: &WriterContext) -> AnyBox {
        let partitioner = match partition {
            PartitionKind::Forward => Partitioner::Forward,
            PartitionKind::Rebalance => Partitioner::Rebalance,
            PartitionKind::Broadcast => Partitioner::Broadcast,
            PartitionKind::Hash => {
                let f = self.key_group.clone().expect("a hash edge carries its key selector");
                let m = ctx.max_parallelism;
                Partitioner::Hash {
                    key_group: Arc::new(move |t| f(t, m)),
                    max_parallelism: m,
                }
            }
        };
        let writer = ChannelWriter::new(unbox(senders), partitioner, ctx.batch_size, ctx.cancel.clone());
        Box::new(Box::new(writer) as Chain<T>)
    }

    fn reader(&self, receivers: AnyBox, head: AnyBox, max_drift: Option<i64>) -> Box<dyn TaskDriver> {
        Box::new(InputDriver {
            gate: InputGate::<T>::new(unbox(receivers), max_drift),
            chain: unbox::<Chain<T>>(head),
        })
    }

    fn fan_out(&self, outputs: Vec<AnyBox>) -> AnyBox {
        let outputs = outputs.into_iter().map(unbox::<Chain<T>>).collect();
        Box::new(Box::new(FanOut { outputs }) as Chain<T>)
    }

    fn bridge(
        &self,
        senders: Vec<AnyBox>,
        receivers: Vec<AnyBox>,
        forward: bool,
        links: &RemoteLinks<'_>,
    ) -> (Vec<AnyBox>, Vec<AnyBox>) {
        let down = receivers.len();
        let local = |i: usize| links.placement.is_local(i);
        let senders = senders
            .into_iter()
            .enumerate()
            .map(|(i, outlets)| {
                // Sender i's channels are ordered by receiver (one, its own, when forward).
                let outlets = unbox::<Vec<Outlet<T>>>(outlets);
                let targets = if forward { i..i + 1 } else { 0..down };
                let kept: Vec<Outlet<T>> = targets
                    .zip(outlets)
                    .filter_map(|(j, outlet)| match (local(i), local(j), outlet) {
                        (true, false, _) => Some(Outlet::Remote(links.send_remote(i, j))),
                        (false, true, Outlet::Local(tx)) => {
                            links.receive_remote(i, j, tx);
                            None
                        }
                        (_, _, outlet) => Some(outlet),
                    })
                    .collect();
                // A remote subtask's leftover ends are never used.
                Box::new(kept) as AnyBox
            })
            .collect();
        (senders, receivers)
    }
}

pub(crate) enum NodeKind {
    Source(Arc<dyn SourceFactory>),
    Operator(Arc<dyn OperatorFactory>),
}

/// A vertex as the API records it, before defaults are resolved.
pub(crate) struct NodeSpec {
    pub name: String,
    pub uid: Option<String>,
    pub parallelism: Option<usize>,
    pub kind: NodeKind,
    pub watermarks: WatermarkOrigin,
}

/// Where a vertex's output watermarks come from, as the API records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatermarkOrigin {
    /// Passed on from its input.
    Upstream,
    /// Generated here (`assign_timestamps_and_watermarks`), aligned within this drift (ms;
    /// `WatermarkStrategy::with_alignment`) if any.
    Generated(Option<i64>),
}

/// An edge as the API records it; `partition: None` means forward when parallelisms match,
/// rebalance otherwise (as in Flink).
pub(crate) struct EdgeSpec {
    pub from: usize,
    pub to: usize,
    pub partition: Option<PartitionKind>,
    pub factory: Arc<dyn EdgeFactory>,
}

/// A resolved operator of the job.
pub struct Vertex {
    /// Display name.
    pub name: String,
    /// Stable id that maps state onto the job.
    pub uid: String,
    /// Number of subtasks.
    pub parallelism: usize,
    pub(crate) kind: NodeKind,
    pub(crate) inputs: Vec<usize>,
    pub(crate) outputs: Vec<usize>,
    /// The watermark alignment of its output: its own generator's, or that of a generator
    /// forward upstream (the same subtasks' watermarks). A task reading its output over a
    /// shuffle aligns its channels by it.
    pub(crate) max_drift: Option<i64>,
}

impl Vertex {
    /// Whether this vertex is a source.
    pub fn is_source(&self) -> bool {
        matches!(self.kind, NodeKind::Source(_))
    }
}

pub(crate) struct Edge {
    pub from: usize,
    pub to: usize,
    pub partition: PartitionKind,
    pub factory: Arc<dyn EdgeFactory>,
}

/// A validated dataflow graph, ready to deploy any number of times.
pub struct JobGraph {
    pub(crate) vertices: Vec<Vertex>,
    pub(crate) edges: Vec<Edge>,
    max_parallelism: u16,
}

impl JobGraph {
    pub(crate) fn resolve(
        nodes: Vec<NodeSpec>,
        edges: Vec<EdgeSpec>,
        parallelism: usize,
        max_parallelism: u16,
    ) -> Result<Self> {
        let origins: Vec<WatermarkOrigin> = nodes.iter().map(|n| n.watermarks).collect();
        let mut vertices: Vec<Vertex> = nodes
            .into_iter()
            .enumerate()
            .map(|(i, n)| Vertex {
                uid: n.uid.unwrap_or_else(|| format!("{}-{i}", slug(&n.name))),
                name: n.name,
                parallelism: n.parallelism.unwrap_or(parallelism),
                kind: n.kind,
                inputs: Vec::new(),
                outputs: Vec::new(),
                max_drift: match n.watermarks {
                    WatermarkOrigin::Generated(drift) => drift,
                    WatermarkOrigin::Upstream => None,
                },
            })
            .collect();
        let mut seen = HashSet::new();
        for v in &vertices {
            if v.parallelism == 0 {
                return Err(Error::Config(format!(
                    "parallelism of operator '{}' must be at least 1",
                    v.name
                )));
            }
            if v.parallelism > max_parallelism as usize {
                return Err(Error::Config(format!(
                    "parallelism {} of operator '{}' is above the max parallelism {max_parallelism}",
                    v.parallelism, v.name
                )));
            }
            let safe = v
                .uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if v.uid.is_empty() || !safe || v.uid.starts_with('.') {
                return Err(Error::Config(format!(
                    "operator uid '{}' must be non-empty, use only letters, digits, '-', '_' and '.', \
                     and not start with '.' (it names a directory in every checkpoint)",
                    v.uid
                )));
            }
            if !seen.insert(v.uid.clone()) {
                return Err(Error::Config(format!("operator uid '{}' is used twice", v.uid)));
            }
        }
        let mut resolved = Vec::with_capacity(edges.len());
        for (i, e) in edges.into_iter().enumerate() {
            let (pf, pt) = (vertices[e.from].parallelism, vertices[e.to].parallelism);
            let partition = match e.partition {
                None if pf == pt => PartitionKind::Forward,
                None => PartitionKind::Rebalance,
                Some(PartitionKind::Forward) if pf != pt => {
                    return Err(Error::Config(format!(
                        "forward partitioning from '{}' (parallelism {pf}) to '{}' (parallelism {pt}) needs equal parallelism",
                        vertices[e.from].name, vertices[e.to].name
                    )))
                }
                Some(p) => p,
            };
            if !vertices[e.to].inputs.is_empty() {
                return Err(Error::Config(format!(
                    "operator '{}' has more than one input; unions and joins are not built yet",
                    vertices[e.to].name
                )));
            }
            vertices[e.from].outputs.push(i);
            vertices[e.to].inputs.push(i);
            // The edge into `from` was recorded (and resolved) before any edge out of it. A
            // generator's own watermarks replace those it receives, and their alignment too.
            if partition == PartitionKind::Forward && origins[e.to] == WatermarkOrigin::Upstream {
                vertices[e.to].max_drift = vertices[e.from].max_drift;
            }
            resolved.push(Edge {
                from: e.from,
                to: e.to,
                partition,
                factory: e.factory,
            });
        }
        if !vertices.iter().any(|v| v.is_source()) {
            return Err(Error::Config("the job has no source".into()));
        }
        Ok(Self {
            vertices,
            edges: resolved,
            max_parallelism,
        })
    }

    /// The operators, in topological order.
    pub fn vertices(&self) -> &[Vertex] {
        &self.vertices
    }

    /// The number of key groups.
    pub fn max_parallelism(&self) -> u16 {
        self.max_parallelism
    }

    /// The watermark alignment (ms) of the task reading edge `e`: that of the watermarks it
    /// carries.
    pub(crate) fn input_drift(&self, e: usize) -> Option<i64> {
        self.vertices[self.edges[e].from].max_drift
    }
}

fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::operator::{SourceFunction, SourcePoll, TaskInfo};
    use crate::snapshot::OperatorState;
    use crate::{Result, StreamEnv, WatermarkStrategy};
    use std::time::Duration;

    #[derive(Clone)]
    struct Nothing;

    impl SourceFunction for Nothing {
        type Out = u64;
        fn open(&mut self, _: &TaskInfo, _: Option<OperatorState>) -> Result<()> {
            Ok(())
        }
        fn poll(&mut self, _: &mut Vec<u64>) -> Result<SourcePoll> {
            Ok(SourcePoll::Finished)
        }
        fn snapshot(&mut self) -> Result<OperatorState> {
            Ok(OperatorState::default())
        }
    }

    /// The drift reaches the first shuffle after the generator (forward operators carry the
    /// same subtasks' watermarks), not beyond: later tasks read channels whose watermarks are
    /// already combined. A generator after it starts its own watermarks, unaligned.
    #[test]
    fn watermark_alignment_reaches_the_first_shuffle_after_its_generator() {
        let aligned = || WatermarkStrategy::monotonous(|t: &u64| *t as i64).with_alignment(Duration::from_secs(5));
        let mut env = StreamEnv::new();
        env.source("numbers", Nothing)
            .assign_timestamps_and_watermarks(aligned())
            .map(|t| t + 1)
            .rebalance()
            .map(|t| t * 2)
            .rebalance()
            .map(|t| t * 3);
        let graph = env.build(2, 128).unwrap();
        let drift: Vec<Option<i64>> = (0..graph.edges.len()).map(|e| graph.input_drift(e)).collect();
        // Into the generator, into the map after it (forward), the first shuffle, the second.
        assert_eq!(drift, [None, Some(5000), Some(5000), None]);

        let mut env = StreamEnv::new();
        env.source("numbers", Nothing)
            .assign_timestamps_and_watermarks(aligned())
            .assign_timestamps_and_watermarks(WatermarkStrategy::monotonous(|t: &u64| *t as i64))
            .rebalance()
            .map(|t| t * 2);
        let graph = env.build(2, 128).unwrap();
        let drift: Vec<Option<i64>> = (0..graph.edges.len()).map(|e| graph.input_drift(e)).collect();
        assert_eq!(
            drift,
            [None, Some(5000), None],
            "the second generator's watermarks are not aligned"
        );
    }
}
