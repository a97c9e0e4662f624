//! # Sluice runtime
//!
//! Everything a subtask needs to run and to take part in exactly-once checkpoints. The layers,
//! bottom up:
//!
//! - [`checkpoint`], [`element`]: the `CheckpointId`, the barrier, and what flows in a channel.
//! - [`keygroup`]: keys hash (stably) to key groups; subtasks own contiguous key-group ranges.
//! - [`alignment`]: the I/O-free state machine that aligns barriers across input channels.
//! - [`state`]: keyed state handles (with optional TTL) and the memory backend (copy-on-write per
//!   key group).
//! - [`snapshot`], [`storage`]: the checksummed state-file and `_metadata` formats, and durable
//!   storage by URL through opendal, with the one path formatter [`storage::CheckpointPaths`].
//! - [`operator`], [`stream`]: what users write (sources, operators, keyed process functions,
//!   sinks) and the DataStream API that wires them into a [`graph::JobGraph`].
//! - [`executor`] with the task internals: chains of operators in one thread per subtask,
//!   bounded channels between them, and [`protocol`] messages to the coordinator.
//! - [`restore`]: reading a snapshot back for the key groups and operator state a subtask owns.
//!
//! ## One barrier's journey
//!
//! 1. The coordinator sends `TriggerCheckpoint(barrier n)` to every source subtask's command
//!    channel ([`protocol::TaskCommand`]).
//! 2. The source's driver takes the command between two polls, so the position it snapshots
//!    ([`operator::SourceFunction::snapshot`]) covers exactly the records already emitted. The
//!    barrier then runs down the source's chain: each chained operator snapshots, and the chain's
//!    channel writer flushes its partial batches and sends the barrier on every output channel.
//! 3. A downstream task's input gate feeds each arriving barrier to its
//!    [`alignment::BarrierAligner`]; a channel that delivered barrier n is no longer read, so its
//!    records after the barrier wait in the bounded channel (and its sender waits when it is
//!    full). End of input on a channel removes it from the alignment.
//! 4. When barrier n has arrived on every open channel, the task snapshots its chain: the memory
//!    backend's snapshot shares each key group's map behind an `Arc` (copy-on-write), operator
//!    state is copied.
//!    The barrier is forwarded on every output, and the task goes back to processing records.
//! 5. The snapshots are serialized and written on the async runtime (one file per operator
//!    subtask, one checksummed block per key group); then the task sends `Ack` with the file
//!    handles, or `Decline` with the storage error.
//! 6. With every task's ack in, the coordinator writes `chk-n/_metadata` last: only now does the
//!    checkpoint exist. It then sends `CheckpointComplete(n)` to every task (sinks commit) and
//!    deletes checkpoints beyond the retained number.

pub mod alignment;
pub mod checkpoint;
pub mod config;
pub mod element;
pub mod error;
pub mod executor;
pub mod graph;
pub mod job;
pub mod keygroup;
pub mod net;
pub mod operator;
pub mod protocol;
pub mod restore;
pub mod sched;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod stream;
mod task;
pub mod time;
mod transform;
pub mod window;

pub use checkpoint::{CheckpointBarrier, CheckpointId, CheckpointKind};
pub use error::{Error, Result};
pub use job::{JobDefinition, JobParams, JobRegistry, ParamSpec};
pub use operator::{
    Data, FinishHooks, KeyedProcessFunction, Operator, OperatorSnapshot, RestoredState, SinkFunction, SourceFunction,
    SourcePoll, StateRegistry, TaskInfo,
};
pub use state::{
    KeyedBackend, KeyedContext, KeyedSnapshot, ListState, MapState, ReducingState, StateTtlConfig, TimeDomain,
    TtlUpdateType, ValueState,
};
pub use stream::{DataStream, KeyedStream, StreamEnv, WindowedResults, WindowedStream};
pub use time::WatermarkStrategy;
pub use window::{
    AggregateFunction, Count, ProcessWindowFunction, TimeWindow, ToWindowResult, WindowAssigner, WindowCollector,
    WindowOutput, WindowResult,
};
