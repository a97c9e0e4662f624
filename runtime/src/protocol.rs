//! Messages between tasks and the checkpoint coordinator, and between the coordinator process
//! and its workers. In one process task messages travel over channels; in a cluster the same
//! types go over each worker's control connection inside [`ToWorker`] and [`ToCoordinator`].

use crate::checkpoint::{CheckpointBarrier, CheckpointId};
use crate::snapshot::StateHandle;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One subtask of one task (a chain of operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId {
    /// Index of the task (chain) in the job's plan.
    pub vertex: usize,
    /// Subtask index.
    pub subtask: usize,
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.vertex, self.subtask)
    }
}

/// Coordinator to task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TaskCommand {
    /// Sources only: snapshot the position and emit this barrier.
    TriggerCheckpoint(CheckpointBarrier),
    /// Sources only: as `TriggerCheckpoint` (a savepoint), then emit nothing more: the job
    /// stops once it completes, so nothing after it is processed (stop with savepoint).
    TriggerStop(CheckpointBarrier),
    /// The checkpoint's `_metadata` is written: commit side effects.
    CheckpointComplete(CheckpointId),
    /// The checkpoint will not complete: stop aligning it.
    AbortCheckpoint(CheckpointId),
    /// Stop now.
    Cancel,
}

/// The state one operator of a task wrote for a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckedState {
    /// Operator uid.
    pub uid: String,
    /// The file written.
    pub handle: StateHandle,
    /// Shared files this checkpoint uploaded (relative to the job directory); the others it
    /// references were uploaded by earlier checkpoints.
    pub new_shared: Vec<String>,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskOutcome {
    /// All input processed and flushed.
    Finished,
    /// Cancelled by the coordinator.
    Cancelled,
    /// Failed.
    Failed {
        /// The error or panic message.
        cause: String,
        /// The failure was reading unusable snapshot data during restore.
        unusable_snapshot: bool,
        /// A consequence of another task's failure (a channel peer vanished), not a root cause.
        secondary: bool,
    },
}

/// Task to coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TaskEvent {
    /// Restored and running: ready for checkpoints.
    Running {
        /// Which task.
        task: TaskId,
    },
    /// The task's snapshot for a checkpoint is durable.
    Ack {
        /// Which task.
        task: TaskId,
        /// Which checkpoint.
        checkpoint: CheckpointId,
        /// One entry per operator with state.
        states: Vec<AckedState>,
        /// Bytes written.
        bytes: u64,
        /// Time on the task thread (alignment end to barrier forwarded), microseconds.
        sync_micros: u64,
        /// Time of the asynchronous upload, microseconds.
        async_micros: u64,
    },
    /// The task will not acknowledge this checkpoint.
    Decline {
        /// Which task.
        task: TaskId,
        /// Which checkpoint.
        checkpoint: CheckpointId,
        /// Why.
        reason: String,
    },
    /// The task's thread ended; it has no upload in flight.
    Terminated {
        /// Which task.
        task: TaskId,
        /// How.
        outcome: TaskOutcome,
    },
}

/// What a worker deploys: enough to build the job's graph itself (every process runs the same
/// binary) and to find the subtasks it does not run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploySpec {
    /// The job's id.
    pub job: String,
    /// The job's name in the registry.
    pub job_name: String,
    /// Its parameters.
    pub params: std::collections::BTreeMap<String, String>,
    /// Its configuration (the worker uses its own data directory).
    pub config: crate::config::JobConfig,
    /// The attempt.
    pub attempt: u32,
    /// The snapshot to restore: its directory and the job directory above it.
    pub restore: Option<(String, Option<String>)>,
    /// The worker of each slot: subtask `i` of every task runs on `slot_workers[i]`.
    pub slot_workers: Vec<u64>,
    /// Each worker's data address.
    pub peers: std::collections::HashMap<u64, std::net::SocketAddr>,
}

/// Coordinator to worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    /// Registration accepted.
    Registered {
        /// The worker's id in this cluster.
        worker: u64,
    },
    /// Registration refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// Run this worker's share of an attempt.
    Deploy(Box<DeploySpec>),
    /// A command for one of its tasks.
    Command {
        /// The job.
        job: String,
        /// The attempt.
        attempt: u32,
        /// The task.
        task: TaskId,
        /// The command.
        command: TaskCommand,
    },
    /// Where a savepoint's files go (sent before its barrier is triggered).
    SavepointTarget {
        /// The job.
        job: String,
        /// The savepoint's checkpoint id.
        id: crate::CheckpointId,
        /// The target storage's URL.
        url: String,
        /// The savepoint's directory inside it.
        dir: String,
    },
    /// The attempt finished the job: run its finish hooks (commit the sinks' last files).
    Finish {
        /// The job.
        job: String,
        /// The attempt.
        attempt: u32,
    },
    /// The job has ended, however: drop what is kept for it.
    Forget {
        /// The job.
        job: String,
    },
}

/// Worker to coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// The first message on a control connection.
    Register {
        /// The cluster's shared secret.
        secret: String,
        /// Slots offered (each runs one subtask of every task of a job).
        slots: usize,
        /// Where other workers connect for data.
        data_addr: std::net::SocketAddr,
    },
    /// Still alive.
    Heartbeat,
    /// A task event of an attempt.
    Event {
        /// The job.
        job: String,
        /// The attempt.
        attempt: u32,
        /// The event.
        event: TaskEvent,
        /// Records this worker's sources of the attempt have emitted so far.
        source_records: u64,
    },
    /// This worker could not deploy its share of an attempt.
    DeployFailed {
        /// The job.
        job: String,
        /// The attempt.
        attempt: u32,
        /// Why.
        cause: String,
        /// The snapshot to restore could not be used.
        unusable_snapshot: bool,
    },
    /// The finish hooks of an attempt ran.
    Finished {
        /// The job.
        job: String,
        /// The attempt.
        attempt: u32,
        /// Why they failed, if they did.
        error: Option<String>,
    },
}
