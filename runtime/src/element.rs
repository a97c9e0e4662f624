//! What flows through a data channel: batches of records interleaved with control markers.

use crate::checkpoint::CheckpointBarrier;
use serde::{Deserialize, Serialize};

/// Event time in milliseconds.
pub type Timestamp = i64;

/// One element of a channel between two subtasks. Records travel in batches so that the
/// per-element cost of the bounded channel is paid once per batch.
#[derive(Debug, Serialize, Deserialize)]
pub enum StreamElement<T> {
    /// A batch of records, never empty.
    Data(Vec<T>),
    /// No record with an event time at or below this will follow on this channel.
    Watermark(Timestamp),
    /// Everything before it belongs to the checkpoint, everything after to the next one.
    Barrier(CheckpointBarrier),
    /// The sender emits nothing for now: leave it out of the watermark until it sends again.
    Idle,
    /// The sender is finished: the channel closes after this.
    EndOfInput,
}
