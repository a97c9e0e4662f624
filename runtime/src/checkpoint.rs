//! Checkpoint identity: the one `CheckpointId` newtype and the barrier that carries it in-band.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Identifies one checkpoint (or savepoint) of a job. Ids only increase within a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckpointId(pub u64);

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Whether a snapshot is a periodic checkpoint or a user-requested savepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// Periodic, owned and retained by the runtime.
    Checkpoint,
    /// Requested by a user, self-contained, owned by the user.
    Savepoint,
}

/// The marker that sources inject and every task aligns on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointBarrier {
    /// Which checkpoint this barrier belongs to.
    pub id: CheckpointId,
    /// When the coordinator triggered it, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Checkpoint or savepoint.
    pub kind: CheckpointKind,
}
