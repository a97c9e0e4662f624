//! Deploys one attempt of a job graph in this process: groups operators into chains, creates the
//! bounded channels between chains, and starts one thread per chain subtask. The threads build
//! their operators (restoring state) themselves, so a slow restore never blocks the caller.

use crate::error::{Error, Result};
use crate::graph::{AnyBox, JobGraph, NodeContext, NodeKind, PartitionKind, WriterContext};
use crate::operator::TaskInfo;
use crate::protocol::{TaskCommand, TaskEvent, TaskId, TaskOutcome};
use crate::restore::RestoreSource;
use crate::storage::{CheckpointPaths, Storage};
use crate::task::{AttemptShared, TaskDriver, TaskRuntime};
use crossbeam_channel::{unbounded, Sender};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::mpsc::UnboundedSender;

/// A chain of operators that runs in one thread per subtask.
#[derive(Debug, Clone)]
pub struct ChainSpec {
    /// Vertex indices, upstream first.
    pub vertices: Vec<usize>,
    /// Parallelism shared by the chain.
    pub parallelism: usize,
    /// Display name.
    pub name: String,
}

/// Groups vertices into chains: a vertex joins its input's chain when the edge is forward, the
/// parallelism is equal and neither side fans in or out.
pub fn plan_chains(graph: &JobGraph, chaining: bool) -> Vec<ChainSpec> {
    let mut chains: Vec<ChainSpec> = Vec::new();
    let mut chain_of = vec![usize::MAX; graph.vertices.len()];
    for (i, v) in graph.vertices.iter().enumerate() {
        let join = v.inputs.first().map(|e| &graph.edges[*e]).filter(|e| {
            chaining
                && v.inputs.len() == 1
                && e.partition == PartitionKind::Forward
                && graph.vertices[e.from].outputs.len() == 1
                && graph.vertices[e.from].parallelism == v.parallelism
        });
        match join {
            Some(e) => {
                let c = chain_of[e.from];
                chains[c].vertices.push(i);
                chains[c].name = format!("{} -> {}", chains[c].name, v.name);
                chain_of[i] = c;
            }
            None => {
                chain_of[i] = chains.len();
                chains.push(ChainSpec {
                    vertices: vec![i],
                    parallelism: v.parallelism,
                    name: v.name.clone(),
                });
            }
        }
    }
    chains
}

/// What an attempt needs besides the graph.
#[derive(Clone)]
pub struct DeployConfig {
    /// The job's id (for paths and logs).
    pub job_id: String,
    /// Restart count.
    pub attempt: u32,
    /// Checkpoint storage.
    pub storage: Storage,
    /// State to start from.
    pub restore: Option<Arc<RestoreSource>>,
    /// Batches per channel.
    pub channel_capacity: usize,
    /// Records per batch.
    pub batch_size: usize,
    /// Whether to chain operators.
    pub chaining: bool,
    /// Keyed state backend.
    pub state_backend: crate::config::StateBackendKind,
    /// Local working directory of this process.
    pub data_dir: std::path::PathBuf,
    /// Longest a task's snapshot upload may take before it is given up (declined).
    pub upload_timeout: std::time::Duration,
    /// Where savepoints go.
    pub savepoints: SavepointTargets,
    /// How RocksDB merges old instances after a rescale.
    pub rescale_merge: crate::config::RescaleMerge,
    /// Run by the job master once this attempt has finished the job.
    pub finish_hooks: crate::operator::FinishHooks,
}

/// Where the files of a savepoint go: its storage and directory (ending in `/`).
#[derive(Clone, Debug)]
pub struct SavepointTarget {
    /// The savepoint's storage.
    pub storage: Storage,
    /// Its directory inside that storage.
    pub dir: String,
}

/// Savepoint targets by checkpoint id, registered by the coordinator before it triggers one.
pub type SavepointTargets = Arc<std::sync::Mutex<HashMap<crate::CheckpointId, SavepointTarget>>>;

/// Where a task's commands go.
pub type CommandSender = Sender<TaskCommand>;

/// A deployed task.
pub struct DeployedTask {
    /// Its id.
    pub id: TaskId,
    /// Whether it starts with a source (checkpoints are triggered there).
    pub is_source: bool,
    /// Where to send commands.
    pub control: CommandSender,
    thread: Option<JoinHandle<()>>,
}

/// A running attempt.
pub struct Deployment {
    /// Every task of the attempt.
    pub tasks: Vec<DeployedTask>,
    cancel: Arc<AtomicBool>,
    source_records: Arc<AtomicU64>,
}

impl Deployment {
    /// Tells every task to stop. They report `Terminated` when they have.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            let _ = t.control.send(TaskCommand::Cancel);
        }
    }

    /// Records emitted by the sources so far.
    pub fn source_records(&self) -> u64 {
        self.source_records.load(Ordering::Relaxed)
    }

    /// Waits for every task thread to exit.
    pub fn join(&mut self) {
        for t in &mut self.tasks {
            if let Some(h) = t.thread.take() {
                let _ = h.join();
            }
        }
    }
}

/// Starts every task of one attempt.
pub fn deploy(
    graph: &Arc<JobGraph>,
    cfg: &DeployConfig,
    events: UnboundedSender<TaskEvent>,
    handle: tokio::runtime::Handle,
) -> Result<Deployment> {
    let chains = plan_chains(graph, cfg.chaining);
    let chain_of: HashMap<usize, usize> = chains
        .iter()
        .enumerate()
        .flat_map(|(c, ch)| ch.vertices.iter().map(move |v| (*v, c)))
        .collect();
    // Channel ends for every edge between chains, per subtask.
    let mut senders: HashMap<(usize, usize), AnyBox> = HashMap::new();
    let mut receivers: HashMap<(usize, usize), AnyBox> = HashMap::new();
    for (e, edge) in graph.edges.iter().enumerate() {
        if chain_of[&edge.from] == chain_of[&edge.to] {
            continue;
        }
        let (up, down) = (
            graph.vertices[edge.from].parallelism,
            graph.vertices[edge.to].parallelism,
        );
        let forward = edge.partition == PartitionKind::Forward;
        let (s, r) = edge.factory.channels(forward, up, down, cfg.channel_capacity);
        senders.extend(s.into_iter().enumerate().map(|(i, b)| ((e, i), b)));
        receivers.extend(r.into_iter().enumerate().map(|(i, b)| ((e, i), b)));
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let source_records = Arc::new(AtomicU64::new(0));
    let shared = AttemptShared {
        events,
        storage: cfg.storage.clone(),
        paths: CheckpointPaths::new(cfg.job_id.clone()),
        handle,
        cancel: cancel.clone(),
        source_records: source_records.clone(),
        attempt: cfg.attempt,
        upload_timeout: cfg.upload_timeout,
        savepoints: cfg.savepoints.clone(),
    };
    let mut tasks = Vec::new();
    for (c, chain) in chains.iter().enumerate() {
        for subtask in 0..chain.parallelism {
            let id = TaskId { vertex: c, subtask };
            let tail = *chain.vertices.last().expect("a chain has a vertex");
            let outputs: Vec<(usize, AnyBox)> = graph.vertices[tail]
                .outputs
                .iter()
                .map(|e| {
                    (
                        *e,
                        senders.remove(&(*e, subtask)).expect("senders for every output edge"),
                    )
                })
                .collect();
            let head = chain.vertices[0];
            let input = graph.vertices[head].inputs.first().map(|e| {
                (
                    *e,
                    receivers
                        .remove(&(*e, subtask))
                        .expect("receivers for every input edge"),
                )
            });
            let (control_tx, control_rx) = unbounded();
            let mut rt = TaskRuntime::new(id, control_rx, shared.clone());
            let build = TaskBuild {
                graph: graph.clone(),
                chain: chain.clone(),
                subtask,
                outputs,
                input,
                cfg: cfg.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("{}#{subtask}", chain.name))
                .spawn(move || run_task(build, &mut rt))
                .map_err(|e| Error::Config(format!("cannot start a task thread: {e}")))?;
            tasks.push(DeployedTask {
                id,
                is_source: graph.vertices[head].is_source(),
                control: control_tx,
                thread: Some(thread),
            });
        }
    }
    Ok(Deployment {
        tasks,
        cancel,
        source_records,
    })
}

struct TaskBuild {
    graph: Arc<JobGraph>,
    chain: ChainSpec,
    subtask: usize,
    outputs: Vec<(usize, AnyBox)>,
    input: Option<(usize, AnyBox)>,
    cfg: DeployConfig,
}

impl TaskBuild {
    fn build(self, rt: &TaskRuntime) -> Result<Box<dyn TaskDriver>> {
        let g = &self.graph;
        let tail = *self.chain.vertices.last().expect("a chain has a vertex");
        let wctx = WriterContext {
            max_parallelism: g.max_parallelism(),
            batch_size: self.cfg.batch_size,
            cancel: rt.shared.cancel.clone(),
        };
        let mut writers: Vec<AnyBox> = self
            .outputs
            .into_iter()
            .map(|(e, s)| g.edges[e].factory.writer(g.edges[e].partition, s, &wctx))
            .collect();
        let mut next = match (writers.len(), &g.vertices[tail].kind) {
            (0, NodeKind::Operator(f)) => f.discard(),
            (0, NodeKind::Source(f)) => f.discard(),
            (1, _) => writers.pop().expect("one writer"),
            _ => g.edges[g.vertices[tail].outputs[0]].factory.fan_out(writers),
        };
        for &v in self.chain.vertices.iter().rev() {
            let vertex = &g.vertices[v];
            let info = TaskInfo {
                job_id: self.cfg.job_id.clone(),
                name: vertex.name.clone(),
                uid: vertex.uid.clone(),
                subtask: self.subtask,
                parallelism: vertex.parallelism,
                max_parallelism: g.max_parallelism(),
                attempt: self.cfg.attempt,
                state_backend: self.cfg.state_backend,
                rescale_merge: self.cfg.rescale_merge,
                finish_hooks: self.cfg.finish_hooks.clone(),
                local_dir: self
                    .cfg
                    .data_dir
                    .join(&self.cfg.job_id)
                    .join(format!("{}-{}-a{}", vertex.uid, self.subtask, self.cfg.attempt)),
            };
            let restored = match &self.cfg.restore {
                Some(r) => rt.shared.handle.block_on(r.load(&info))?,
                None => None,
            };
            let ctx = NodeContext { info, restored };
            match &vertex.kind {
                NodeKind::Operator(f) => next = f.create(ctx, next)?,
                NodeKind::Source(f) => return f.create(ctx, next),
            }
        }
        let (e, receivers) = self.input.expect("a chain without a source has an input");
        Ok(g.edges[e].factory.reader(receivers, next))
    }
}

fn run_task(build: TaskBuild, rt: &mut TaskRuntime) {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let driver = build.build(rt).map_err(|e| (e.is_unusable_snapshot(), e))?;
        rt.report_running();
        driver.run(rt).map_err(|e| (false, e))
    }));
    rt.wait_uploads();
    let outcome = match result {
        Ok(Ok(())) => TaskOutcome::Finished,
        Ok(Err((_, Error::Cancelled))) => TaskOutcome::Cancelled,
        // Failures caused by the teardown surface as `Cancelled` (sends) or `Disconnected`
        // (secondary); any other error is a cause, even if the cancel flag was set meanwhile.
        Ok(Err((unusable, e))) => TaskOutcome::Failed {
            secondary: matches!(e, Error::Disconnected(_)),
            cause: e.to_string(),
            unusable_snapshot: unusable,
        },
        Err(panic) => TaskOutcome::Failed {
            cause: format!("task panicked: {}", panic_message(panic.as_ref())),
            unusable_snapshot: false,
            secondary: false,
        },
    };
    let _ = rt.shared.events.send(TaskEvent::Terminated { task: rt.task, outcome });
}

/// The message a panic carried.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
