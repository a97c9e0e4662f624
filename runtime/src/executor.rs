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
use std::sync::{Arc, Condvar, Mutex};
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
    pub rocksdb: crate::config::RocksDbSettings,
    /// Run by the job master once this attempt has finished the job.
    pub finish_hooks: crate::operator::FinishHooks,
    /// Cluster mode: which subtasks run in this process and how to reach the others; `None`
    /// runs every subtask here.
    pub placement: Option<Arc<crate::net::Placement>>,
}

impl DeployConfig {
    /// Attempt `attempt` of job `job_id` run with `config`, in this process's data directory
    /// (a worker sets its own, and its placement).
    pub fn for_job(
        job_id: String,
        attempt: u32,
        config: &crate::config::JobConfig,
        storage: Storage,
        restore: Option<Arc<RestoreSource>>,
        savepoints: SavepointTargets,
    ) -> Self {
        Self {
            job_id,
            attempt,
            storage,
            restore,
            channel_capacity: config.channel_capacity,
            batch_size: config.batch_size,
            chaining: config.chaining,
            state_backend: config.state_backend,
            data_dir: config.data_dir.clone(),
            upload_timeout: config.checkpoint.timeout,
            savepoints,
            rocksdb: config.rocksdb,
            finish_hooks: Default::default(),
            placement: None,
        }
    }
}

/// Where the files of a savepoint go: its storage and directory (ending in `/`).
#[derive(Clone, Debug)]
pub struct SavepointTarget {
    /// The savepoint's storage.
    pub storage: Storage,
    /// Its directory inside that storage.
    pub dir: String,
}

/// Savepoint targets by checkpoint id, registered by the coordinator before it triggers one (in
/// a cluster, a worker learns them over its control connection).
#[derive(Clone, Default)]
pub struct SavepointTargets(Arc<TargetRegistry>);

/// Told of each savepoint target as it is registered (a cluster forwards it to the workers).
pub type SavepointListener = Box<dyn Fn(crate::CheckpointId, &SavepointTarget) + Send + Sync>;

#[derive(Default)]
struct TargetRegistry {
    targets: Mutex<Targets>,
    /// Signalled when a target is registered or one is decided.
    changed: Condvar,
    listener: Mutex<Option<SavepointListener>>,
}

#[derive(Default)]
struct Targets {
    by_id: HashMap<crate::CheckpointId, SavepointTarget>,
    /// The newest checkpoint decided (completed or aborted): a barrier of it or an older one
    /// that arrives late gets no target, at once.
    decided: Option<crate::CheckpointId>,
}

impl SavepointTargets {
    fn map(&self) -> std::sync::MutexGuard<'_, Targets> {
        self.0.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers where savepoint `id` goes, and tells the listener.
    pub fn insert(&self, id: crate::CheckpointId, target: SavepointTarget) {
        if let Some(listener) = self.0.listener.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            listener(id, &target);
        }
        self.map().by_id.insert(id, target);
        self.0.changed.notify_all();
    }

    /// Replaces the listener told of every target registered from now on.
    pub fn listen(&self, listener: SavepointListener) {
        *self.0.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
    }

    /// Checkpoint `id` is decided: forgets its target, and a task still waiting for it stops.
    pub fn remove(&self, id: crate::CheckpointId) {
        let mut targets = self.map();
        targets.by_id.remove(&id);
        targets.decided = targets.decided.max(Some(id));
        self.0.changed.notify_all();
    }

    /// Where savepoint `id` goes, waiting up to `timeout` for it to be registered: in a cluster
    /// the barrier can overtake the control message that names the target. None at once when
    /// the checkpoint is already decided (an abort overtook the barrier).
    pub fn wait_for(&self, id: crate::CheckpointId, timeout: std::time::Duration) -> Option<SavepointTarget> {
        let deadline = std::time::Instant::now() + timeout;
        let mut map = self.map();
        loop {
            if let Some(t) = map.by_id.get(&id) {
                return Some(t.clone());
            }
            if map.decided >= Some(id) {
                return None;
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            map = self
                .0
                .changed
                .wait_timeout(map, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Sends one command to a task in another process.
pub type RemoteCommandFn = Arc<dyn Fn(TaskCommand) + Send + Sync>;

/// Where a task's commands go: its channel in this process, or the connection to its worker.
#[derive(Clone)]
pub enum CommandSender {
    /// A task thread of this process.
    Local(Sender<TaskCommand>),
    /// A task on a worker.
    Remote(RemoteCommandFn),
}

impl CommandSender {
    /// Sends `cmd`; false when a local task no longer listens (its termination event follows).
    pub fn send(&self, cmd: TaskCommand) -> bool {
        match self {
            Self::Local(s) => s.send(cmd).is_ok(),
            Self::Remote(f) => {
                f(cmd);
                true
            }
        }
    }
}

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

impl DeployedTask {
    /// A task running in another process.
    pub fn remote(id: TaskId, is_source: bool, control: RemoteCommandFn) -> Self {
        Self {
            id,
            is_source,
            control: CommandSender::Remote(control),
            thread: None,
        }
    }
}

/// A running attempt.
pub struct Deployment {
    /// Every task of the attempt.
    pub tasks: Vec<DeployedTask>,
    cancel: Arc<AtomicBool>,
    source_records: Arc<AtomicU64>,
    /// Run once by `join` (a cluster releases the attempt's slots).
    on_join: Option<Box<dyn FnOnce() + Send>>,
}

impl Deployment {
    /// Tells every task to stop, once (a worker hears the cancel of every task of its share).
    /// They report `Terminated` when they have.
    pub fn cancel(&self) {
        if self.cancel.swap(true, Ordering::SeqCst) {
            return;
        }
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
        if let Some(f) = self.on_join.take() {
            f();
        }
    }

    /// An attempt whose tasks run on workers: commands go over their connections, the source
    /// record count is `source_records` (reported by the workers), and `on_join` runs once the
    /// coordinator has seen every task end.
    pub fn remote(tasks: Vec<DeployedTask>, source_records: Arc<AtomicU64>, on_join: Box<dyn FnOnce() + Send>) -> Self {
        Self {
            tasks,
            cancel: Arc::new(AtomicBool::new(false)),
            source_records,
            on_join: Some(on_join),
        }
    }

    /// The count of records the sources emitted, as it grows.
    pub fn source_counter(&self) -> Arc<AtomicU64> {
        self.source_records.clone()
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
    let cancel = Arc::new(AtomicBool::new(false));
    let local = |subtask: usize| cfg.placement.as_ref().is_none_or(|p| p.is_local(subtask));
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
        let (mut s, mut r) = edge.factory.channels(forward, up, down, cfg.channel_capacity);
        if let Some(placement) = &cfg.placement {
            let links = crate::net::RemoteLinks {
                placement,
                job: &cfg.job_id,
                attempt: cfg.attempt,
                edge: e,
                cancel: cancel.clone(),
            };
            (s, r) = edge.factory.bridge(s, r, forward, &links);
        }
        senders.extend(s.into_iter().enumerate().map(|(i, b)| ((e, i), b)));
        receivers.extend(r.into_iter().enumerate().map(|(i, b)| ((e, i), b)));
    }
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
        for subtask in (0..chain.parallelism).filter(|s| local(*s)) {
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
                control: CommandSender::Local(control_tx),
                thread: Some(thread),
            });
        }
    }
    Ok(Deployment {
        tasks,
        cancel,
        source_records,
        on_join: None,
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
                rocksdb: self.cfg.rocksdb,
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
        Ok(g.edges[e].factory.reader(receivers, next, g.input_drift(e)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CheckpointId;

    /// A task waiting for a savepoint's target stops waiting once the savepoint is decided,
    /// and one whose barrier arrives after the decision does not wait at all (the long
    /// timeouts would hang the test otherwise).
    #[test]
    fn a_decided_savepoint_ends_the_wait_for_its_target() {
        let targets = SavepointTargets::default();
        let long = std::time::Duration::from_secs(3600);
        let waiting = {
            let targets = targets.clone();
            std::thread::spawn(move || targets.wait_for(CheckpointId(6), long).is_none())
        };
        targets.remove(CheckpointId(6));
        assert!(waiting.join().unwrap());
        assert!(targets.wait_for(CheckpointId(5), long).is_none());

        let target = SavepointTarget {
            storage: Storage::open("memory://targets").unwrap(),
            dir: "sp/".into(),
        };
        targets.insert(CheckpointId(7), target);
        assert_eq!(
            targets.wait_for(CheckpointId(7), long).map(|t| t.dir),
            Some("sp/".into())
        );
    }
}
