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
use crate::storage::{CheckpointPaths, Storage};
use chain::{Chain, PendingSnapshot};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use input::{GateEvent, InputGate};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
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
    pub fn upload(
        &mut self,
        barrier: CheckpointBarrier,
        snapshots: Vec<PendingSnapshot>,
        sync_started: Instant,
    ) {
        let id = barrier.id;
        if !self.undecided(id) {
            return;
        }
        self.decided = Some(id);
        let sync_micros = sync_started.elapsed().as_micros() as u64;
        let (storage, events, task) = (
            self.shared.storage.clone(),
            self.shared.events.clone(),
            self.task,
        );
        let dir = self.shared.paths.checkpoint_dir(id);
        let job = async move {
            let started = Instant::now();
            let mut states = Vec::with_capacity(snapshots.len());
            let mut bytes = 0u64;
            for s in snapshots {
                let rel = CheckpointPaths::state_file_relative(&s.uid, task.subtask);
                let path = format!("{dir}{rel}");
                let (data, mut handle) =
                    tokio::task::spawn_blocking(move || encode_state_file(&s.snapshot))
                        .await
                        .map_err(|e| Error::User(format!("snapshot encoding panicked: {e}")))??;
                handle.path = rel;
                bytes += data.len() as u64;
                storage.write(&path, data).await?;
                states.push(AckedState { uid: s.uid, handle });
            }
            Ok::<_, Error>((states, bytes, started.elapsed().as_micros() as u64))
        };
        let handle = self.shared.handle.spawn(async move {
            let event = match job.await {
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
            TaskCommand::TriggerCheckpoint(b) => Err(Error::User(format!(
                "checkpoint {} was triggered at a task that is not a source",
                b.id
            ))),
        }
    }
}

/// Serializes one operator's snapshot into a state file.
fn encode_state_file(s: &OperatorSnapshot) -> Result<(Vec<u8>, StateHandle)> {
    let mut w = StateFileWriter::new();
    let key_groups = s.keyed.as_ref().map(|k| k.write(&mut w)).transpose()?;
    let operator_state = if s.operator.is_empty() {
        None
    } else {
        let at = w.begin_block();
        let bytes = postcard::to_allocvec(&s.operator)?;
        w.payload().extend_from_slice(&bytes);
        w.end_block();
        Some(at)
    };
    let data = w.finish();
    let handle = StateHandle {
        path: String::new(),
        size: data.len() as u64,
        key_groups,
        operator_state,
    };
    Ok((data, handle))
}

/// Runs a source: polls it, and between two polls takes commands (a trigger snapshots the
/// position and emits the barrier after the records already emitted).
pub(crate) struct SourceDriver<S: SourceFunction> {
    pub source: S,
    pub uid: String,
    pub chain: Chain<S::Out>,
}

impl<S: SourceFunction> SourceDriver<S> {
    fn handle(&mut self, rt: &mut TaskRuntime, cmd: TaskCommand) -> Result<()> {
        match cmd {
            TaskCommand::TriggerCheckpoint(barrier) => {
                let started = Instant::now();
                let operator = self.source.snapshot()?;
                let mut snapshots = Vec::new();
                if !operator.is_empty() {
                    snapshots.push(PendingSnapshot {
                        uid: self.uid.clone(),
                        snapshot: OperatorSnapshot {
                            keyed: None,
                            operator,
                        },
                    });
                }
                self.chain.barrier(barrier, &mut snapshots)?;
                rt.upload(barrier, snapshots, started);
                Ok(())
            }
            other => rt.command(other, &mut self.chain, |_| {}),
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

/// Runs a task fed by channels.
pub(crate) struct InputDriver<T> {
    pub gate: InputGate<T>,
    pub chain: Chain<T>,
}

impl<T: Send + 'static> TaskDriver for InputDriver<T> {
    fn run(mut self: Box<Self>, rt: &mut TaskRuntime) -> Result<()> {
        loop {
            match self.gate.next(&rt.control)? {
                GateEvent::Data(batch) => self.chain.process(batch)?,
                GateEvent::Watermark(w) => self.chain.watermark(w)?,
                GateEvent::Barrier(barrier) => {
                    let started = Instant::now();
                    let mut snapshots = Vec::new();
                    self.chain.barrier(barrier, &mut snapshots)?;
                    rt.upload(barrier, snapshots, started);
                }
                GateEvent::Declined(id, reason) => rt.decline(id, reason),
                GateEvent::Command(cmd) => {
                    let gate = &mut self.gate;
                    rt.command(cmd, &mut self.chain, |id| gate.cancel_alignment(id))?
                }
                GateEvent::Idle => self.chain.flush()?,
                GateEvent::End => return self.chain.end_of_input(),
            }
        }
    }
}
