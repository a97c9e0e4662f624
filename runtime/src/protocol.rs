//! Messages between tasks and the checkpoint coordinator. In one process they travel over
//! channels; the cluster issue puts the same types on the network.

use crate::checkpoint::{CheckpointBarrier, CheckpointId};
use crate::snapshot::StateHandle;
use std::fmt;

/// One subtask of one task (a chain of operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
#[derive(Debug, Clone)]
pub enum TaskCommand {
    /// Sources only: snapshot the position and emit this barrier.
    TriggerCheckpoint(CheckpointBarrier),
    /// The checkpoint's `_metadata` is written: commit side effects.
    CheckpointComplete(CheckpointId),
    /// The checkpoint will not complete: stop aligning it.
    AbortCheckpoint(CheckpointId),
    /// Stop now.
    Cancel,
}

/// The state one operator of a task wrote for a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone)]
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
