//! # Sluice example jobs
//!
//! Real jobs, registered by name in the `sluice` binary ([`registry`]):
//!
//! - [`api_hits`]: requests per API path per minute of event time from an nginx-style access
//!   log (a file, or generated), with malformed lines and late requests counted and logged.
//! - [`transactions`]: a running total and count per user over a deterministic stream of
//!   transactions, with an injectable failure; its exact expected output is computable directly.
//! - [`daily_totals`]: each user's 24-hour total on every event, from 24 hourly sub-totals.
//! - [`dedup`]: drops records whose id was kept less than a TTL of event time before.
//! - [`window_sums`]: each user's total per tumbling or sliding event-time window.
//! - [`wordcount`]: word counts over text files.

pub mod api_hits;
pub mod daily_totals;
pub mod dedup;
pub mod transactions;
pub mod window_sums;
pub mod wordcount;

use sluice_operators::discard_sink::DiscardSink;
use sluice_operators::file_sink::ExactlyOnceFileSink;
use sluice_runtime::element::Timestamp;
use sluice_runtime::{
    CheckpointId, DataStream, JobRegistry, KeyedBackend, KeyedContext, KeyedProcessFunction, Result, StateRegistry,
    TaskInfo,
};

/// The `fail_at` job parameter: a panic at the N-th record of subtask 0 on the first attempt
/// only (0: never), to exercise failover.
#[derive(Clone, Copy, Default)]
pub(crate) struct FailAt {
    at: u64,
    armed: bool,
    seen: u64,
    /// Whether the failure waits for a completed checkpoint.
    after_checkpoint: bool,
    checkpointed: bool,
}

impl FailAt {
    /// Its declaration, the same in every job that takes it.
    pub(crate) const PARAM: sluice_runtime::ParamSpec = sluice_runtime::ParamSpec::new(
        "fail_at",
        "0",
        "panic once at this record of subtask 0 (first attempt only), 0 = never",
    );

    /// Whether the failure waits for a completed checkpoint (`fail_after_checkpoint`).
    pub(crate) const AFTER_CHECKPOINT_PARAM: sluice_runtime::ParamSpec = sluice_runtime::ParamSpec::new(
        "fail_after_checkpoint",
        "false",
        "with fail_at: when no checkpoint has completed by that record, fail at the first record after one \
         has (the restart then restores a checkpoint, however slow the first one)",
    );

    /// From the job parameters `fail_at` and `fail_after_checkpoint`. Waiting for a checkpoint,
    /// the failure comes at record `at` or, if none has completed by then, at the first record
    /// after one has (reported through [`Self::checkpoint_complete`]).
    pub(crate) fn from_params(p: &sluice_runtime::JobParams) -> sluice_runtime::Result<Self> {
        Ok(Self {
            at: p.get("fail_at")?,
            after_checkpoint: p.get("fail_after_checkpoint")?,
            ..Self::default()
        })
    }

    /// Arms it in the subtask and attempt that fail.
    pub(crate) fn open(&mut self, info: &sluice_runtime::TaskInfo) {
        self.armed = self.at > 0 && info.attempt == 0 && info.subtask == 0;
    }

    /// A checkpoint completed.
    pub(crate) fn checkpoint_complete(&mut self) {
        self.checkpointed = true;
    }

    /// Counts a record; panics at the chosen one.
    pub(crate) fn record(&mut self) {
        self.seen += 1;
        if self.armed && self.seen >= self.at && (self.checkpointed || !self.after_checkpoint) {
            panic!("injected failure at record {} (fail_at={})", self.seen, self.at);
        }
    }
}

/// A keyed function with the job's `fail_at` injected before each of its records: the jobs'
/// functions stay free of failure plumbing.
#[derive(Clone)]
pub(crate) struct Failing<P> {
    fail_at: FailAt,
    inner: P,
}

impl<P> Failing<P> {
    /// `inner`, failing as the job parameters `fail_at` and `fail_after_checkpoint` say.
    pub(crate) fn new(p: &sluice_runtime::JobParams, inner: P) -> sluice_runtime::Result<Self> {
        Ok(Self {
            fail_at: FailAt::from_params(p)?,
            inner,
        })
    }
}

impl<P: KeyedProcessFunction> KeyedProcessFunction for Failing<P> {
    type Key = P::Key;
    type In = P::In;
    type Out = P::Out;

    fn open(&mut self, state: &mut StateRegistry<'_, P::Key>, info: &TaskInfo) -> Result<()> {
        self.fail_at.open(info);
        self.inner.open(state, info)
    }

    fn process(&mut self, record: P::In, ctx: &mut KeyedContext<'_, P::Key>, out: &mut Vec<P::Out>) -> Result<()> {
        self.fail_at.record();
        self.inner.process(record, ctx, out)
    }

    fn on_timer(&mut self, ts: Timestamp, ctx: &mut KeyedContext<'_, P::Key>, out: &mut Vec<P::Out>) -> Result<()> {
        self.inner.on_timer(ts, ctx, out)
    }

    fn on_processing_time_timer(
        &mut self,
        ts: Timestamp,
        ctx: &mut KeyedContext<'_, P::Key>,
        out: &mut Vec<P::Out>,
    ) -> Result<()> {
        self.inner.on_processing_time_timer(ts, ctx, out)
    }

    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) -> Result<()> {
        self.fail_at.checkpoint_complete();
        self.inner.checkpoint_complete(checkpoint)
    }

    fn end_of_input(&mut self, state: &KeyedBackend, out: &mut Vec<P::Out>) -> Result<()> {
        self.inner.end_of_input(state, out)
    }
}

/// Records `make(0..events)` from one source subtask with one lane, in index order, with
/// monotonous event time: every run and every restore feeds each key the same sequence, so
/// per-record outputs are reproducible.
fn ordered_source<T: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static>(
    env: &mut sluice_runtime::StreamEnv,
    name: &str,
    p: &sluice_runtime::JobParams,
    make: impl Fn(u64) -> T + Send + Sync + 'static,
    event_time: impl Fn(&T) -> i64 + Send + Sync + 'static,
) -> sluice_runtime::Result<DataStream<T>> {
    let generator = sluice_operators::generator::LaneGenerator::new(p.get("events")?, 1, p.get("rate")?, make);
    Ok(env
        .source(name, generator)
        .uid(&format!("{name}-source"))
        .parallelism(1)
        .assign_timestamps_and_watermarks(sluice_runtime::WatermarkStrategy::monotonous(event_time))
        .uid("watermarks")
        .parallelism(1))
}

/// Writes `stream` to the directory `output` through the exactly-once file sink, or counts it
/// when no output is given (benchmark runs); the sink's name and uid are `name`.
fn exactly_once_output<T: std::fmt::Display + sluice_runtime::operator::Data>(
    stream: DataStream<T>,
    name: &str,
    output: Option<&str>,
) {
    match output {
        Some(dir) => stream.sink(name, ExactlyOnceFileSink::<T>::new(dir)).uid(name),
        None => stream.sink(name, DiscardSink::<T>::default()).uid(name),
    };
}

/// Every example job.
pub fn registry() -> JobRegistry {
    let mut r = JobRegistry::new();
    r.register(api_hits::definition());
    r.register(daily_totals::definition());
    r.register(dedup::definition());
    r.register(transactions::definition());
    r.register(window_sums::definition());
    r.register(wordcount::definition());
    r
}
