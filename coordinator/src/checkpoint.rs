//! The checkpoint coordinator: triggers checkpoints at the sources, collects acknowledgements,
//! writes `_metadata` last, notifies tasks, applies retention, and cleans up after aborted
//! checkpoints once no task can still write to them.
//!
//! One checkpoint is in flight at a time. A checkpoint that is declined or times out is aborted:
//! its directory is deleted once every task that could still upload into it has acknowledged,
//! declined or terminated (a task reports termination only after its uploads have finished).

use crate::retention::{CompletedCheckpoints, Removed};
use sluice_runtime::config::CheckpointConfig;
use sluice_runtime::executor::{CommandSender, Deployment, SavepointTarget, SavepointTargets};
use sluice_runtime::graph::JobGraph;
use sluice_runtime::protocol::{AckedState, TaskCommand, TaskEvent, TaskId, TaskOutcome};
use sluice_runtime::snapshot::{CheckpointMetadata, OperatorSnapshotMeta, FORMAT_VERSION};
use sluice_runtime::storage::{CheckpointPaths, Storage};
use sluice_runtime::{CheckpointBarrier, CheckpointId, CheckpointKind};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, info, warn};

/// Figures of one completed checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointStats {
    /// Its id.
    pub id: CheckpointId,
    /// Trigger to `_metadata` written.
    pub duration: Duration,
    /// Bytes uploaded for this checkpoint.
    pub bytes: u64,
    /// Bytes of all the state the checkpoint references (uploaded now or earlier).
    pub state_bytes: u64,
    /// Longest synchronous part at any task, microseconds.
    pub max_sync_micros: u64,
    /// Longest asynchronous upload at any task, microseconds.
    pub max_async_micros: u64,
}

/// How an attempt ended.
pub(crate) enum AttemptEnd {
    Finished,
    /// Cancelled by the user.
    Canceled,
    /// A stop-with-savepoint completed: the job ends without processing anything after it.
    Stopped,
    Failed {
        cause: String,
        unusable_snapshot: bool,
        /// Caused by another failure (e.g. a vanished channel peer): a later root cause wins.
        secondary: bool,
    },
}

/// A request to the job master, from a [`crate::master::JobHandle`].
pub enum MasterCommand {
    /// Take a savepoint under `target`; the reply carries its URL or why it failed. With `stop`
    /// the job stops after it: the sources emit nothing after its barrier, and the job ends
    /// (FINISHED) once it is complete.
    Savepoint {
        /// Base URL; the savepoint goes to `<target>/savepoint-<job>-<n>/`.
        target: String,
        /// Where the outcome goes.
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
        /// Stop the job after the savepoint.
        stop: bool,
    },
    /// Cancel the job: its tasks stop now, nothing more is checkpointed.
    Cancel,
}

/// A savepoint asked for and not yet triggered.
struct SavepointRequest {
    storage: Storage,
    reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    /// Stop the job after it.
    stop: bool,
}

/// A savepoint in flight: where its files go, and who waits for it.
struct SavepointInFlight {
    target: SavepointTarget,
    reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    stop: bool,
}

struct Pending {
    barrier: CheckpointBarrier,
    started: Instant,
    awaiting: BTreeSet<TaskId>,
    acks: Vec<(TaskId, Vec<AckedState>)>,
    bytes: u64,
    max_sync: u64,
    max_async: u64,
    savepoint: Option<SavepointInFlight>,
}

impl Pending {
    /// Shared files the tasks uploaded for this checkpoint.
    fn new_shared(&self) -> impl Iterator<Item = &String> {
        self.acks
            .iter()
            .flat_map(|(_, s)| s.iter().flat_map(|s| s.new_shared.iter()))
    }
}

/// An aborted checkpoint whose directory is deleted when no task can write to it any more.
struct Draining {
    id: CheckpointId,
    awaiting: BTreeSet<TaskId>,
    /// A savepoint's directory; `None` for the checkpoint's own.
    location: Option<SavepointTarget>,
}

/// What a running job's checkpoints have come to so far.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Where the job is in its life (while it runs: created, running or restarting).
    pub state: crate::master::JobState,
    /// Restarts so far.
    pub restarts: u32,
    /// Completed checkpoints' figures, in order.
    pub checkpoints: Vec<CheckpointStats>,
    /// Checkpoints retained now.
    pub retained: Vec<CheckpointId>,
    /// Checkpoints declined, timed out or failed (savepoints excluded).
    pub failed: u64,
    /// Why the latest of those failed.
    pub last_failure: Option<String>,
}

pub(crate) struct CheckpointCoordinator {
    graph: Arc<JobGraph>,
    storage: Storage,
    paths: CheckpointPaths,
    config: CheckpointConfig,
    job_name: String,
    params: BTreeMap<String, String>,
    next_id: u64,
    stats: Vec<CheckpointStats>,
    failed_total: u64,
    consecutive_failures: u32,
    source_records: u64,
    savepoints: SavepointTargets,
    savepoint_queue: std::collections::VecDeque<SavepointRequest>,
    restore_times: Vec<Duration>,
    /// The URL of a restored checkpoint whose job directory to claim once every task has
    /// restored (keeping `config.retained` checkpoints).
    claim: Option<String>,
    /// The number of checkpoints completed so far, for whoever watches the job.
    progress: Option<tokio::sync::watch::Sender<Progress>>,
    /// Files and directories whose deletion failed, retried after the next completion.
    undeleted: std::sync::Mutex<Vec<String>>,
}

/// State of one attempt's event loop.
struct Attempt {
    all: BTreeSet<TaskId>,
    controls: HashMap<TaskId, CommandSender>,
    sources: Vec<TaskId>,
    running: BTreeSet<TaskId>,
    terminated: BTreeSet<TaskId>,
    any_finished: bool,
    pending: Option<Pending>,
    draining: Vec<Draining>,
    next_trigger: Option<Instant>,
    deployed: Instant,
}

impl Attempt {
    fn send(&self, task: TaskId, cmd: TaskCommand) {
        if !self.terminated.contains(&task) {
            // A task that has just exited no longer listens; its termination event follows.
            let _ = self.controls[&task].send(cmd);
        }
    }

    fn broadcast(&self, cmd: TaskCommand) {
        for t in &self.all {
            self.send(*t, cmd.clone());
        }
    }
}

impl CheckpointCoordinator {
    pub(crate) fn new(
        graph: Arc<JobGraph>,
        storage: Storage,
        paths: CheckpointPaths,
        config: CheckpointConfig,
        job_name: &str,
        params: BTreeMap<String, String>,
    ) -> Self {
        Self {
            graph,
            storage,
            paths,
            config,
            job_name: job_name.to_string(),
            params,
            next_id: 1,
            stats: Vec::new(),
            failed_total: 0,
            consecutive_failures: 0,
            source_records: 0,
            savepoints: Default::default(),
            savepoint_queue: Default::default(),
            restore_times: Vec::new(),
            claim: None,
            progress: None,
            undeleted: Default::default(),
        }
    }

    /// Where tasks look up savepoint targets (shared with every deployment).
    pub(crate) fn savepoint_targets(&self) -> SavepointTargets {
        self.savepoints.clone()
    }

    /// Publishes completed and failed checkpoints on `progress`.
    pub(crate) fn report_progress(&mut self, progress: tokio::sync::watch::Sender<Progress>) {
        self.progress = Some(progress);
    }

    /// Publishes the job's state and restart count to whoever watches the job.
    pub(crate) fn report_state(&self, state: crate::master::JobState, restarts: u32) {
        if let Some(p) = &self.progress {
            p.send_modify(|p| {
                p.state = state;
                p.restarts = restarts;
            });
        }
    }

    /// Claims the directory of the job `url` belongs to, once the first restore has succeeded.
    pub(crate) fn claim_after_restore(&mut self, url: String) {
        self.claim = Some(url);
    }

    /// Per attempt, the time from deployment until every task had restored and was running.
    pub(crate) fn restore_times(&self) -> &[Duration] {
        &self.restore_times
    }

    pub(crate) fn stats(&self) -> &[CheckpointStats] {
        &self.stats
    }

    pub(crate) fn failed_total(&self) -> u64 {
        self.failed_total
    }

    pub(crate) fn source_records(&self) -> u64 {
        self.source_records
    }

    /// Drives one attempt until it finishes or fails; on failure every task is cancelled and
    /// has terminated before this returns, and no partial checkpoint is left behind.
    pub(crate) async fn run_attempt(
        &mut self,
        mut deployment: Deployment,
        mut events: UnboundedReceiver<TaskEvent>,
        commands: &mut UnboundedReceiver<MasterCommand>,
        completed: &mut CompletedCheckpoints,
    ) -> AttemptEnd {
        let mut a = Attempt {
            all: deployment.tasks.iter().map(|t| t.id).collect(),
            controls: deployment.tasks.iter().map(|t| (t.id, t.control.clone())).collect(),
            sources: deployment.tasks.iter().filter(|t| t.is_source).map(|t| t.id).collect(),
            running: BTreeSet::new(),
            terminated: BTreeSet::new(),
            any_finished: false,
            pending: None,
            draining: Vec::new(),
            next_trigger: None,
            deployed: Instant::now(),
        };
        let mut end = loop {
            let deadline = match &a.pending {
                Some(p) => Some(p.started + self.config.timeout),
                None if !a.any_finished => a.next_trigger,
                None => None,
            };
            let far = Instant::now() + Duration::from_secs(3600);
            let event = tokio::select! {
                e = events.recv() => e,
                Some(cmd) = commands.recv() => {
                    if let Some(end) = self.on_command(&mut a, cmd) {
                        break end;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far).into()), if deadline.is_some() => {
                    if let Some(end) = self.on_timer(&mut a, completed).await {
                        break end;
                    }
                    continue;
                }
            };
            let Some(event) = event else {
                break AttemptEnd::Failed {
                    cause: "every task went away without reporting".into(),
                    unusable_snapshot: false,
                    secondary: false,
                };
            };
            if let Some(end) = self.on_event(&mut a, event, completed).await {
                break end;
            }
        };
        // Shared files uploaded for checkpoints that will not complete now.
        let mut orphans: Vec<String> = Vec::new();
        if !matches!(end, AttemptEnd::Finished) {
            let mut root_found = !matches!(end, AttemptEnd::Failed { secondary: true, .. });
            deployment.cancel();
            while a.terminated.len() < a.all.len() {
                match events.recv().await {
                    Some(TaskEvent::Ack { states, .. }) => {
                        orphans.extend(states.into_iter().flat_map(|s| s.new_shared));
                    }
                    Some(TaskEvent::Terminated { task, outcome }) => {
                        a.terminated.insert(task);
                        if let TaskOutcome::Failed {
                            cause,
                            unusable_snapshot,
                            secondary: false,
                        } = outcome
                        {
                            if !root_found {
                                root_found = true;
                                end = AttemptEnd::Failed {
                                    cause: format!("task {task} failed: {cause}"),
                                    unusable_snapshot,
                                    secondary: false,
                                };
                            }
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
        self.source_records += deployment.source_records();
        let _ = tokio::task::spawn_blocking(move || deployment.join()).await;
        // No task can write any more: remove every checkpoint that did not complete.
        if let Some(p) = a.pending.take() {
            orphans.extend(p.new_shared().cloned());
            let location = p.savepoint.map(|sp| {
                let _ = sp
                    .reply
                    .send(Err("the job stopped before the savepoint completed".into()));
                sp.target
            });
            self.delete_location(p.barrier.id, location.as_ref()).await;
        }
        for d in std::mem::take(&mut a.draining) {
            self.delete_location(d.id, d.location.as_ref()).await;
        }
        self.delete_unreferenced_shared(orphans, completed).await;
        if !matches!(end, AttemptEnd::Failed { .. }) {
            for r in self.savepoint_queue.drain(..) {
                let _ = r
                    .reply
                    .send(Err("the job ended before the savepoint could be taken".into()));
            }
        }
        end
    }

    async fn on_timer(&mut self, a: &mut Attempt, completed: &mut CompletedCheckpoints) -> Option<AttemptEnd> {
        if let Some(p) = &a.pending {
            if p.started.elapsed() >= self.config.timeout {
                let reason = format!("timed out after {:?}", self.config.timeout);
                return self.abort(a, reason, true, completed).await;
            }
            return None;
        }
        if a.next_trigger.is_some_and(|t| Instant::now() >= t) {
            self.trigger(a, None);
        }
        None
    }

    fn on_command(&mut self, a: &mut Attempt, cmd: MasterCommand) -> Option<AttemptEnd> {
        let (target, reply, stop) = match cmd {
            MasterCommand::Savepoint { target, reply, stop } => (target, reply, stop),
            MasterCommand::Cancel => return Some(AttemptEnd::Canceled),
        };
        match Storage::open(&target) {
            Ok(storage) => {
                self.savepoint_queue
                    .push_back(SavepointRequest { storage, reply, stop });
                self.maybe_trigger_savepoint(a);
            }
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
            }
        }
        None
    }

    /// A requested savepoint goes next, as soon as no checkpoint is in flight.
    fn maybe_trigger_savepoint(&mut self, a: &mut Attempt) {
        if a.any_finished {
            // No barrier can pass a finished source any more.
            for r in self.savepoint_queue.drain(..) {
                let _ = r
                    .reply
                    .send(Err("the job is finishing; no savepoint can be taken any more".into()));
            }
            return;
        }
        let ready = a.pending.is_none() && a.running.len() == a.all.len();
        if ready {
            if let Some(request) = self.savepoint_queue.pop_front() {
                self.trigger(a, Some(request));
            }
        }
    }

    fn trigger(&mut self, a: &mut Attempt, savepoint: Option<SavepointRequest>) {
        let id = CheckpointId(self.next_id);
        let kind = match savepoint {
            Some(_) => CheckpointKind::Savepoint,
            None => CheckpointKind::Checkpoint,
        };
        let barrier = CheckpointBarrier {
            id,
            timestamp_ms: u64::try_from(sluice_runtime::state::processing_time_now()).unwrap_or(0),
            kind,
        };
        self.next_id += 1;
        let stop = savepoint.as_ref().is_some_and(|r| r.stop);
        let savepoint = savepoint.map(|r| {
            let short: String = self.paths.job_id().chars().take(8).collect();
            let target = SavepointTarget {
                storage: r.storage,
                dir: format!("savepoint-{short}-{}/", id.0),
            };
            self.savepoints.insert(id, target.clone());
            SavepointInFlight {
                target,
                reply: r.reply,
                stop: r.stop,
            }
        });
        debug!(checkpoint = barrier.id.0, "triggering checkpoint");
        let cmd = if stop {
            TaskCommand::TriggerStop(barrier)
        } else {
            TaskCommand::TriggerCheckpoint(barrier)
        };
        for s in &a.sources {
            a.send(*s, cmd.clone());
        }
        a.pending = Some(Pending {
            barrier,
            started: Instant::now(),
            awaiting: a.all.difference(&a.terminated).copied().collect(),
            acks: Vec::new(),
            bytes: 0,
            max_sync: 0,
            max_async: 0,
            savepoint,
        });
        a.next_trigger = None;
    }

    fn schedule_next(&self, a: &mut Attempt, started: Instant) {
        a.next_trigger = self
            .config
            .interval
            .map(|i| (started + i).max(Instant::now() + self.config.min_pause));
    }

    async fn on_event(
        &mut self,
        a: &mut Attempt,
        event: TaskEvent,
        completed: &mut CompletedCheckpoints,
    ) -> Option<AttemptEnd> {
        match event {
            TaskEvent::Running { task } => {
                a.running.insert(task);
                if a.running.len() == a.all.len() {
                    self.restore_times.push(a.deployed.elapsed());
                    if let Some(url) = self.claim.take() {
                        crate::master::claim_restored_job_dir(&url, self.config.retained).await;
                    }
                    self.schedule_next(a, Instant::now());
                    self.maybe_trigger_savepoint(a);
                }
                None
            }
            TaskEvent::Ack {
                task,
                checkpoint,
                states,
                bytes,
                sync_micros,
                async_micros,
            } => {
                if let Some(p) = a.pending.as_mut().filter(|p| p.barrier.id == checkpoint) {
                    if p.awaiting.remove(&task) {
                        p.acks.push((task, states));
                        p.bytes += bytes;
                        p.max_sync = p.max_sync.max(sync_micros);
                        p.max_async = p.max_async.max(async_micros);
                    }
                    if p.awaiting.is_empty() {
                        let p = a.pending.take().expect("checked above");
                        return self.complete(a, p, completed).await;
                    }
                } else {
                    // A late ack of an aborted checkpoint: what it uploaded is garbage.
                    let new_shared: Vec<String> = states.into_iter().flat_map(|s| s.new_shared).collect();
                    self.delete_unreferenced_shared(new_shared, completed).await;
                    self.drained(a, task, Some(checkpoint)).await;
                }
                None
            }
            TaskEvent::Decline {
                task,
                checkpoint,
                reason,
            } => {
                if a.pending.as_ref().is_some_and(|p| p.barrier.id == checkpoint) {
                    if let Some(p) = a.pending.as_mut() {
                        p.awaiting.remove(&task);
                    }
                    return self
                        .abort(a, format!("declined by task {task}: {reason}"), true, completed)
                        .await;
                }
                self.drained(a, task, Some(checkpoint)).await;
                None
            }
            TaskEvent::Terminated { task, outcome } => {
                a.terminated.insert(task);
                self.drained(a, task, None).await;
                match outcome {
                    TaskOutcome::Finished => {
                        a.any_finished = true;
                        self.maybe_trigger_savepoint(a);
                        if a.pending.as_ref().is_some_and(|p| p.awaiting.contains(&task)) {
                            if let Some(p) = a.pending.as_mut() {
                                p.awaiting.remove(&task);
                            }
                            // Not a failure: the job is ending.
                            let end = self
                                .abort(a, "a task finished before acknowledging".into(), false, completed)
                                .await;
                            if end.is_some() {
                                return end;
                            }
                        }
                        (a.terminated.len() == a.all.len()).then_some(AttemptEnd::Finished)
                    }
                    TaskOutcome::Failed {
                        cause,
                        unusable_snapshot,
                        secondary,
                    } => Some(AttemptEnd::Failed {
                        cause: format!("task {task} failed: {cause}"),
                        unusable_snapshot,
                        secondary,
                    }),
                    TaskOutcome::Cancelled => Some(AttemptEnd::Failed {
                        cause: format!("task {task} was cancelled"),
                        unusable_snapshot: false,
                        secondary: true,
                    }),
                }
            }
        }
    }

    /// A task can no longer write into an aborted checkpoint (it reported on `checkpoint`, or
    /// terminated when `None`): delete the checkpoint's directory once no task can.
    async fn drained(&mut self, a: &mut Attempt, task: TaskId, checkpoint: Option<CheckpointId>) {
        for d in &mut a.draining {
            if checkpoint.is_none_or(|c| c == d.id) {
                d.awaiting.remove(&task);
            }
        }
        let (done, still): (Vec<Draining>, Vec<Draining>) = std::mem::take(&mut a.draining)
            .into_iter()
            .partition(|d| d.awaiting.is_empty());
        a.draining = still;
        for d in done {
            self.delete_location(d.id, d.location.as_ref()).await;
        }
    }

    async fn abort(
        &mut self,
        a: &mut Attempt,
        reason: String,
        counts: bool,
        completed: &CompletedCheckpoints,
    ) -> Option<AttemptEnd> {
        let p = a.pending.take()?;
        let id = p.barrier.id;
        let new_shared: Vec<String> = p.new_shared().cloned().collect();
        self.delete_unreferenced_shared(new_shared, completed).await;
        let is_savepoint = p.savepoint.is_some();
        // A checkpoint cut short by the job's own end is routine; a failure or a lost savepoint
        // is worth a warning.
        if counts || is_savepoint {
            warn!(checkpoint = id.0, %reason, "checkpoint aborted");
        } else {
            info!(checkpoint = id.0, %reason, "checkpoint aborted");
        }
        a.broadcast(TaskCommand::AbortCheckpoint(id));
        let location = p.savepoint.map(|sp| {
            let _ = sp.reply.send(Err(format!("savepoint {} failed: {reason}", id.0)));
            sp.target
        });
        let awaiting: BTreeSet<TaskId> = p.awaiting.difference(&a.terminated).copied().collect();
        if awaiting.is_empty() {
            self.delete_location(id, location.as_ref()).await;
        } else {
            a.draining.push(Draining { id, awaiting, location });
        }
        self.schedule_next(a, p.started);
        self.maybe_trigger_savepoint(a);
        // A failed savepoint is the user's to retry; it does not fail the job over.
        if !counts || is_savepoint {
            return None;
        }
        self.failed_total += 1;
        self.consecutive_failures += 1;
        if let Some(p) = &self.progress {
            p.send_modify(|p| {
                p.failed = self.failed_total;
                p.last_failure = Some(reason.to_string());
            });
        }
        (self.consecutive_failures > self.config.tolerable_failures).then(|| AttemptEnd::Failed {
            cause: format!(
                "{} consecutive checkpoints failed (tolerable: {}); last: {reason}",
                self.consecutive_failures, self.config.tolerable_failures
            ),
            unusable_snapshot: false,
            secondary: false,
        })
    }

    async fn complete(
        &mut self,
        a: &mut Attempt,
        mut p: Pending,
        completed: &mut CompletedCheckpoints,
    ) -> Option<AttemptEnd> {
        let id = p.barrier.id;
        let mut operators: Vec<OperatorSnapshotMeta> = self
            .graph
            .vertices()
            .iter()
            .map(|v| OperatorSnapshotMeta {
                uid: v.uid.clone(),
                name: v.name.clone(),
                parallelism: v.parallelism,
                subtasks: vec![None; v.parallelism],
            })
            .collect();
        let new_shared: std::collections::HashSet<String> = p.new_shared().cloned().collect();
        for (task, states) in &p.acks {
            for s in states {
                if let Some(op) = operators.iter_mut().find(|o| o.uid == s.uid) {
                    op.subtasks[task.subtask] = Some(s.handle.clone());
                }
            }
        }
        let metadata = CheckpointMetadata {
            format: FORMAT_VERSION,
            job_id: self.paths.job_id().to_string(),
            job_name: self.job_name.clone(),
            params: self.params.clone(),
            checkpoint_id: id,
            kind: p.barrier.kind,
            timestamp_ms: p.barrier.timestamp_ms,
            max_parallelism: self.graph.max_parallelism(),
            operators,
        };
        if let Some(sp) = p.savepoint.take() {
            return self.complete_savepoint(a, p, sp, metadata).await;
        }
        // Never commit a reference to a shared file that retention may already have deleted
        // (a task that had not yet seen the previous completion may reference stale files).
        let shared: Vec<String> = metadata.shared_files().map(str::to_string).collect();
        if let Some(stale) = shared
            .iter()
            .find(|f| !new_shared.contains(*f) && !completed.references(f))
        {
            let reason = format!("it references shared file '{stale}', which no retained checkpoint holds");
            a.pending = Some(p);
            return self.abort(a, reason, true, completed).await;
        }
        // The commit point: only with this file does the checkpoint exist.
        if let Err(e) = self
            .storage
            .write_atomic(&self.paths.metadata(id), metadata.encode())
            .await
        {
            a.pending = Some(p);
            return self
                .abort(a, format!("writing _metadata failed: {e}"), true, completed)
                .await;
        }
        let duration = p.started.elapsed();
        info!(
            checkpoint = id.0,
            duration_ms = tenths_of_ms(duration),
            bytes = p.bytes,
            "checkpoint completed"
        );
        let state_bytes = metadata.referenced_files().map(|h| h.size).sum::<u64>()
            + metadata.sst_files().map(|f| f.size).sum::<u64>();
        self.stats.push(CheckpointStats {
            id,
            duration,
            bytes: p.bytes,
            state_bytes,
            max_sync_micros: p.max_sync,
            max_async_micros: p.max_async,
        });
        self.consecutive_failures = 0;
        a.broadcast(TaskCommand::CheckpointComplete(id));
        let removed = completed.add(id, shared);
        if let Some(p) = &self.progress {
            p.send_modify(|p| {
                p.checkpoints.extend(self.stats.last().cloned());
                p.retained = completed.ids().collect();
            });
        }
        self.delete_removed(removed).await;
        self.retry_deletions().await;
        self.schedule_next(a, p.started);
        self.maybe_trigger_savepoint(a);
        None
    }

    /// Commits a savepoint: its `_metadata` goes into its own directory; it does not join the
    /// retained checkpoints.
    async fn complete_savepoint(
        &mut self,
        a: &mut Attempt,
        p: Pending,
        sp: SavepointInFlight,
        metadata: CheckpointMetadata,
    ) -> Option<AttemptEnd> {
        let id = p.barrier.id;
        let path = format!("{}{}", sp.target.dir, sluice_runtime::storage::METADATA_FILE);
        let written = sp.target.storage.write_atomic(&path, metadata.encode()).await;
        // Decided either way: no task needs the target any more.
        self.savepoints.remove(id);
        if let Err(e) = written {
            let _ = sp
                .reply
                .send(Err(format!("writing the savepoint's _metadata failed: {e}")));
            // Stopped sources resume.
            a.broadcast(TaskCommand::AbortCheckpoint(id));
            self.delete_location(id, Some(&sp.target)).await;
        } else {
            let url = sp.target.storage.location(sp.target.dir.trim_end_matches('/'));
            info!(savepoint = id.0, %url, duration_ms = tenths_of_ms(p.started.elapsed()), "savepoint completed");
            let _ = sp.reply.send(Ok(url));
            a.broadcast(TaskCommand::CheckpointComplete(id));
            if sp.stop {
                return Some(AttemptEnd::Stopped);
            }
        }
        self.schedule_next(a, p.started);
        self.maybe_trigger_savepoint(a);
        None
    }

    /// Deletes the directory of checkpoint `id`, or of a savepoint at `location`.
    async fn delete_location(&self, id: CheckpointId, location: Option<&SavepointTarget>) {
        match location {
            None => self.delete_checkpoint(id).await,
            Some(t) => {
                self.savepoints.remove(id);
                if let Err(e) = t.storage.delete_dir(&t.dir).await {
                    warn!(savepoint = id.0, error = %e, "cannot delete a failed savepoint");
                }
            }
        }
    }

    /// Deletes subsumed checkpoints and the shared files only they referenced.
    pub(crate) async fn delete_removed(&self, removed: Removed) {
        for id in removed.checkpoints {
            self.delete_checkpoint(id).await;
        }
        self.delete_shared(removed.shared_files).await;
    }

    /// Deletes shared files uploaded for a checkpoint that will not complete, unless a retained
    /// checkpoint references them.
    async fn delete_unreferenced_shared(&self, files: Vec<String>, completed: &CompletedCheckpoints) {
        let garbage: Vec<String> = files.into_iter().filter(|f| !completed.references(f)).collect();
        self.delete_shared(garbage).await;
    }

    async fn delete_shared(&self, files: Vec<String>) {
        for f in files {
            self.delete_or_remember(self.paths.in_job_dir(&f)).await;
        }
    }

    async fn delete_checkpoint(&self, id: CheckpointId) {
        self.delete_or_remember(self.paths.checkpoint_dir(id)).await;
    }

    /// Deletes a file or a directory (path ending in `/`); one that cannot be deleted now (the
    /// store is down) is deleted after the next completed checkpoint, so that an outage leaves
    /// no orphans. Nothing deleted here can become referenced again: aborted checkpoints never
    /// complete and shared names are unique per upload.
    async fn delete_or_remember(&self, path: String) {
        let result = if path.ends_with('/') {
            self.storage.delete_dir(&path).await
        } else {
            self.storage.delete(&path).await
        };
        if let Err(e) = result {
            warn!(%path, error = %e, "cannot delete now; retrying after the next completed checkpoint");
            self.undeleted.lock().unwrap_or_else(|p| p.into_inner()).push(path);
        }
    }

    /// Retries the deletions that failed before (storage has just proven to work).
    async fn retry_deletions(&self) {
        let paths = std::mem::take(&mut *self.undeleted.lock().unwrap_or_else(|p| p.into_inner()));
        for path in paths {
            self.delete_or_remember(path).await;
        }
    }
}

/// A duration in milliseconds rounded to a tenth, for logs: `150.1`, not `150.10139999999998`.
pub(crate) fn tenths_of_ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}
