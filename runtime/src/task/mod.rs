//! Task execution: one OS thread per subtask of a chain. The thread runs a driver (a source loop
//! or an input-gate loop) that pushes records through the chain, reacts to coordinator commands,
//! and on an aligned barrier snapshots synchronously, forwards the barrier, and hands the upload
//! to the async runtime.

pub(crate) mod chain;
pub(crate) mod input;
pub(crate) mod output;

use crate::checkpoint::{CheckpointBarrier, CheckpointId};
use crate::error::{Error, Result};
use crate::operator::{OperatorSnapshot, SourceFunction, SourcePoll};
use crate::protocol::{AckedState, TaskCommand, TaskEvent, TaskId};
use crate::snapshot::{StateFileWriter, StateHandle};
use crate::state::{processing_time_now, KeyedSnapshot};
use crate::storage::{CheckpointPaths, Storage};
use chain::{Chain, PendingSnapshot};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use input::{GateEvent, InputGate};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What a task thread runs.
pub(crate) trait TaskDriver: Send {
    fn run(self: Box<Self>, rt: &mut TaskRuntime) -> Result<()>;
}

/// What every task of one attempt shares: where events go, where snapshots go, the async
/// runtime, the cancel flag and the record counter.
#[derive(Clone)]
pub(crate) struct AttemptShared {
    pub events: UnboundedSender<TaskEvent>,
    pub storage: Storage,
    pub paths: CheckpointPaths,
    pub handle: tokio::runtime::Handle,
    pub cancel: Arc<AtomicBool>,
    /// Records emitted by sources, for throughput figures.
    pub source_records: Arc<AtomicU64>,
    /// Restart count of this attempt.
    pub attempt: u32,
    /// Longest an upload may take; then it fails (and the checkpoint is declined).
    pub upload_timeout: std::time::Duration,
    /// Where savepoints go.
    pub savepoints: crate::executor::SavepointTargets,
}

/// Everything a task needs besides its operators: its identity, its command channel, the
/// attempt's shared pieces, and its uploads in flight.
pub(crate) struct TaskRuntime {
    pub task: TaskId,
    pub control: Receiver<TaskCommand>,
    pub shared: AttemptShared,
    uploads: Vec<tokio::task::JoinHandle<()>>,
    /// Highest checkpoint this task has acknowledged, declined or seen aborted.
    decided: Option<CheckpointId>,
}

impl TaskRuntime {
    pub fn new(task: TaskId, control: Receiver<TaskCommand>, shared: AttemptShared) -> Self {
        Self {
            task,
            control,
            shared,
            uploads: Vec::new(),
            decided: None,
        }
    }

    fn emit(&self, event: TaskEvent) {
        // The coordinator going away means the job is over; nothing to tell.
        let _ = self.shared.events.send(event);
    }

    pub fn cancelled(&self) -> bool {
        self.shared.cancel.load(Ordering::Relaxed)
    }

    fn undecided(&self, id: CheckpointId) -> bool {
        self.decided.is_none_or(|d| id > d)
    }

    /// Declines `id` unless this task already acknowledged or declined it.
    pub fn decline(&mut self, id: CheckpointId, reason: &str) {
        if self.undecided(id) {
            self.decided = Some(id);
            self.emit(TaskEvent::Decline {
                task: self.task,
                checkpoint: id,
                reason: reason.to_string(),
            });
        }
    }

    /// Uploads the snapshots taken for `barrier` asynchronously, then acknowledges (or declines
    /// with the storage error).
    pub fn upload(&mut self, barrier: CheckpointBarrier, snapshots: Vec<PendingSnapshot>) {
        let id = barrier.id;
        if !self.undecided(id) {
            return;
        }
        self.decided = Some(id);
        let sync_micros = snapshots.iter().map(|s| s.sync.as_micros() as u64).sum();
        let (events, task) = (self.shared.events.clone(), self.task);
        let mut target = PersistTarget {
            storage: self.shared.storage.clone(),
            job_dir: self.shared.paths.job_dir(),
            chk_dir: self.shared.paths.checkpoint_dir(id),
            subtask: task.subtask,
            attempt: self.shared.attempt,
            timeout: self.shared.upload_timeout,
            canonical: false,
            checkpoint: id,
        };
        if barrier.kind == crate::CheckpointKind::Savepoint {
            // Savepoints are self-contained and canonical, in the directory the user chose.
            let registered = self.shared.savepoints.wait_for(id, Duration::from_secs(10));
            let Some(sp) = registered else {
                self.emit(TaskEvent::Decline {
                    task,
                    checkpoint: id,
                    reason: "no target is registered for this savepoint".into(),
                });
                return;
            };
            target.storage = sp.storage;
            target.chk_dir = sp.dir;
            target.canonical = true;
        }
        let job = async move {
            let started = Instant::now();
            let mut states = Vec::with_capacity(snapshots.len());
            let mut bytes = 0u64;
            for s in snapshots {
                match persist(s, &target).await {
                    Ok((state, n)) => {
                        bytes += n;
                        states.push(state);
                    }
                    Err(e) => {
                        // The checkpoint is declined without handles: remove what the chain's
                        // earlier operators uploaded to the shared directory.
                        for f in states.iter().flat_map(|s: &AckedState| s.new_shared.iter()) {
                            let _ = target.storage.delete(&format!("{}{f}", target.job_dir)).await;
                        }
                        return Err(e);
                    }
                }
            }
            Ok::<_, Error>((states, bytes, started.elapsed().as_micros() as u64))
        };
        let handle = self.shared.handle.spawn(async move {
            // A panic in an upload (ours or a library's) declines the checkpoint at once instead
            // of leaving the coordinator to wait for its timeout.
            let job = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(job));
            let result = job.await.unwrap_or_else(|panic| {
                let what = crate::executor::panic_message(panic.as_ref());
                Err(Error::User(format!("the snapshot upload panicked: {what}")))
            });
            let event = match result {
                Ok((states, bytes, async_micros)) => TaskEvent::Ack {
                    task,
                    checkpoint: id,
                    states,
                    bytes,
                    sync_micros,
                    async_micros,
                },
                Err(e) => TaskEvent::Decline {
                    task,
                    checkpoint: id,
                    reason: e.to_string(),
                },
            };
            let _ = events.send(event);
        });
        self.uploads.retain(|h| !h.is_finished());
        self.uploads.push(handle);
    }

    /// Blocks until every upload this task started has finished, so that nothing is written for
    /// it after it reports termination.
    pub fn wait_uploads(&mut self) {
        let uploads = std::mem::take(&mut self.uploads);
        self.shared.handle.block_on(async {
            for u in uploads {
                let _ = u.await;
            }
        });
    }

    pub fn report_running(&self) {
        self.emit(TaskEvent::Running { task: self.task });
    }

    /// Handles a coordinator command common to every driver. Returns an error to stop the task.
    fn command<T>(
        &mut self,
        cmd: TaskCommand,
        chain: &mut Chain<T>,
        on_abort: impl FnOnce(CheckpointId),
    ) -> Result<()> {
        match cmd {
            TaskCommand::CheckpointComplete(id) => chain.checkpoint_complete(id),
            TaskCommand::AbortCheckpoint(id) => {
                on_abort(id);
                self.decline(id, "aborted by the coordinator");
                Ok(())
            }
            TaskCommand::Cancel => Err(Error::Cancelled),
            TaskCommand::TriggerCheckpoint(b) | TaskCommand::TriggerStop(b) => Err(Error::User(format!(
                "checkpoint {} was triggered at a task that is not a source",
                b.id
            ))),
        }
    }
}

/// Where one task's snapshot files go.
#[derive(Clone)]
pub(crate) struct PersistTarget {
    pub storage: Storage,
    pub job_dir: String,
    pub chk_dir: String,
    pub subtask: usize,
    pub attempt: u32,
    pub timeout: std::time::Duration,
    /// Write keyed state as canonical key-group blocks (savepoints), whatever the backend.
    pub canonical: bool,
    /// The checkpoint being persisted.
    pub checkpoint: CheckpointId,
}

/// New SST files of one subtask uploaded at once.
#[cfg(feature = "rocksdb")]
const PARALLEL_SST_UPLOADS: usize = 4;

/// Persists one operator's snapshot: its state file and, for RocksDB, the SST files no
/// completed checkpoint holds yet. On failure the files it wrote are deleted again.
pub(crate) async fn persist(s: PendingSnapshot, t: &PersistTarget) -> Result<(AckedState, u64)> {
    let mut written: Vec<String> = Vec::new();
    // Bounded, so that a hung store cannot hold a task's termination (and a failover) forever.
    let result = match tokio::time::timeout(t.timeout, persist_inner(s, t, &mut written)).await {
        Ok(r) => r,
        Err(_) => Err(Error::User(format!("snapshot upload took longer than {:?}", t.timeout))),
    };
    if result.is_err() {
        for path in written {
            let _ = t.storage.delete(&path).await;
        }
    }
    result
}

async fn persist_inner(s: PendingSnapshot, t: &PersistTarget, written: &mut Vec<String>) -> Result<(AckedState, u64)> {
    let rel = CheckpointPaths::state_file_relative(&s.uid, t.subtask);
    let mut w = StateFileWriter::new();
    let mut key_groups = None;
    let mut rocksdb = None;
    let mut new_shared = Vec::new();
    let mut bytes = 0u64;
    match s.snapshot.keyed {
        None => {}
        #[cfg(feature = "rocksdb")]
        Some(KeyedSnapshot::RocksDb(r)) if !t.canonical => {
            let (r, files) = blocking(move || {
                let files = r.local_files()?;
                Ok((r, files))
            })
            .await?;
            // Already stored SSTs are referenced; new ones go up several at a time (each large
            // one in parallel multipart parts), in a stable order for the metadata.
            let incremental = r.incremental();
            let mut uploads = Vec::new();
            for (name, path, size) in files.ssts {
                let stored = if incremental {
                    r.already_stored(&name, size).cloned()
                } else {
                    None
                };
                let (stored_path, full) = if incremental {
                    let p = CheckpointPaths::shared_sst_relative(&s.uid, t.subtask, t.attempt, t.checkpoint, &name);
                    (p.clone(), format!("{}{p}", t.job_dir))
                } else {
                    let p = CheckpointPaths::exclusive_sst_relative(&s.uid, t.subtask, &name);
                    (p.clone(), format!("{}{p}", t.chk_dir))
                };
                if stored.is_none() {
                    written.push(full.clone());
                    if incremental {
                        new_shared.push(stored_path.clone());
                    }
                }
                uploads.push(async move {
                    if let Some(stored) = stored {
                        return Ok((stored, 0));
                    }
                    let data = tokio::fs::read(&path)
                        .await
                        .map_err(|e| Error::User(format!("cannot read {}: {e}", path.display())))?;
                    let crc32 = crc32fast::hash(&data);
                    let n = data.len() as u64;
                    t.storage.write(&full, data).await?;
                    let file = crate::snapshot::RocksFile {
                        name,
                        path: stored_path,
                        size,
                        crc32,
                        shared: incremental,
                    };
                    Ok::<_, Error>((file, n))
                });
            }
            use futures::StreamExt;
            let mut ssts = Vec::with_capacity(uploads.len());
            let mut done = futures::stream::iter(uploads).buffered(PARALLEL_SST_UPLOADS);
            while let Some(uploaded) = done.next().await {
                let (file, n) = uploaded?;
                bytes += n;
                ssts.push(file);
            }
            r.record(ssts.clone());
            let small_files_block = w.begin_block();
            w.payload().extend_from_slice(&postcard::to_allocvec(&files.small)?);
            w.end_block();
            rocksdb = Some(crate::snapshot::RocksDbHandle {
                range: r.range(),
                sst_files: ssts,
                small_files_block,
            });
            // Dropping the snapshot removes its local hard links.
            blocking(move || {
                drop(r);
                Ok(())
            })
            .await?;
        }
        // Memory checkpoints and every savepoint: canonical key-group blocks.
        Some(keyed) => {
            let (back, index) = blocking(move || {
                let index = keyed.write_canonical(&mut w)?;
                Ok((w, index))
            })
            .await?;
            w = back;
            key_groups = Some(index);
        }
    }
    let operator_state = if s.snapshot.operator.is_empty() {
        None
    } else {
        let at = w.begin_block();
        w.payload()
            .extend_from_slice(&postcard::to_allocvec(&s.snapshot.operator)?);
        w.end_block();
        Some(at)
    };
    let data = w.finish();
    let handle = StateHandle {
        path: rel.clone(),
        size: data.len() as u64,
        key_groups,
        operator_state,
        rocksdb,
    };
    bytes += data.len() as u64;
    let full = format!("{}{rel}", t.chk_dir);
    written.push(full.clone());
    t.storage.write(&full, data).await?;
    Ok((
        AckedState {
            uid: s.uid,
            handle,
            new_shared,
        },
        bytes,
    ))
}

/// Runs CPU-bound or blocking work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::User(format!("snapshot work panicked: {e}")))?
}

/// Runs a source: polls it, and between two polls takes commands (a trigger snapshots the
/// position and emits the barrier after the records already emitted).
pub(crate) struct SourceDriver<S: SourceFunction> {
    pub source: S,
    pub uid: String,
    pub chain: Chain<S::Out>,
    /// The stop-with-savepoint barrier emitted: nothing more is emitted unless it is aborted.
    pub stopped_at: Option<CheckpointId>,
}

impl<S: SourceFunction> SourceDriver<S> {
    fn handle(&mut self, rt: &mut TaskRuntime, cmd: TaskCommand) -> Result<()> {
        match cmd {
            TaskCommand::TriggerStop(barrier) => {
                self.handle(rt, TaskCommand::TriggerCheckpoint(barrier))?;
                self.chain.flush()?;
                self.stopped_at = Some(barrier.id);
                Ok(())
            }
            TaskCommand::TriggerCheckpoint(barrier) => {
                let started = Instant::now();
                let operator = self.source.snapshot()?;
                let mut snapshots = Vec::new();
                if !operator.is_empty() {
                    snapshots.push(PendingSnapshot {
                        uid: self.uid.clone(),
                        snapshot: OperatorSnapshot { keyed: None, operator },
                        sync: started.elapsed(),
                    });
                }
                self.chain.barrier(barrier, &mut snapshots)?;
                rt.upload(barrier, snapshots);
                Ok(())
            }
            other => {
                let stopped_at = &mut self.stopped_at;
                rt.command(other, &mut self.chain, |id| {
                    // A failed stop leaves the job running, as in Flink.
                    if *stopped_at == Some(id) {
                        *stopped_at = None;
                    }
                })
            }
        }
    }
}

impl<S: SourceFunction> TaskDriver for SourceDriver<S> {
    fn run(mut self: Box<Self>, rt: &mut TaskRuntime) -> Result<()> {
        let mut buf = Vec::new();
        loop {
            while let Ok(cmd) = rt.control.try_recv() {
                self.handle(rt, cmd)?;
            }
            if rt.cancelled() {
                return Err(Error::Cancelled);
            }
            if self.stopped_at.is_some() {
                // Stopped: only commands until the coordinator ends the job.
                match rt.control.recv() {
                    Ok(cmd) => self.handle(rt, cmd)?,
                    Err(_) => return Err(Error::Cancelled),
                }
                continue;
            }
            let timer = processing_timers(&mut self.chain)?;
            let poll = self.source.poll(&mut buf)?;
            if !buf.is_empty() {
                let capacity = buf.capacity();
                let batch = std::mem::replace(&mut buf, Vec::with_capacity(capacity));
                rt.shared
                    .source_records
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.chain.process(batch)?;
            }
            match poll {
                SourcePoll::Ready => {}
                SourcePoll::Idle(wait) => {
                    self.chain.flush()?;
                    // Wake up for a processing-time timer down the chain, too.
                    let wait = timer.map_or(wait, |due| wait.min(due));
                    match rt.control.recv_timeout(wait) {
                        Ok(cmd) => self.handle(rt, cmd)?,
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return Err(Error::Cancelled),
                    }
                }
                SourcePoll::Finished => return self.chain.end_of_input(),
            }
        }
    }
}

/// Runs one round of the processing-time timers due down `chain` (one clock read); how long
/// until the next round (zero right after one), `None` when the chain has no timers.
fn processing_timers<T>(chain: &mut Chain<T>) -> Result<Option<Duration>> {
    let Some(t) = chain.next_processing_time() else {
        return Ok(None);
    };
    let now = processing_time_now();
    if t > now {
        return Ok(Some(Duration::from_millis(u64::try_from(t - now).unwrap_or(u64::MAX))));
    }
    chain.processing_time(now)?;
    Ok(Some(Duration::ZERO))
}

/// Runs a task fed by channels.
pub(crate) struct InputDriver<T> {
    pub gate: InputGate<T>,
    pub chain: Chain<T>,
}

impl<T: Send + 'static> TaskDriver for InputDriver<T> {
    fn run(mut self: Box<Self>, rt: &mut TaskRuntime) -> Result<()> {
        loop {
            // After a round of due timers the deadline is now: the gate reads what is ready
            // (input, commands) without blocking before the next round.
            let deadline = processing_timers(&mut self.chain)?.map(|wait| Instant::now() + wait);
            match self.gate.next_until(&rt.control, deadline)? {
                GateEvent::Data(batch) => self.chain.process(batch)?,
                GateEvent::Deadline => {}
                GateEvent::Watermark(w) => self.chain.watermark(w)?,
                GateEvent::Barrier(barrier) => {
                    let mut snapshots = Vec::new();
                    self.chain.barrier(barrier, &mut snapshots)?;
                    rt.upload(barrier, snapshots);
                }
                GateEvent::Declined(id, reason) => rt.decline(id, reason),
                GateEvent::Command(cmd) => {
                    let gate = &mut self.gate;
                    rt.command(cmd, &mut self.chain, |id| gate.cancel_alignment(id))?
                }
                GateEvent::Idle => self.chain.flush()?,
                GateEvent::InputsIdle => self.chain.idle()?,
                GateEvent::End => return self.chain.end_of_input(),
            }
        }
    }
}
