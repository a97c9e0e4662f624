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
use sluice_runtime::{DataStream, JobRegistry};

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

    pub(crate) fn new(at: u64) -> Self {
        Self { at, ..Self::default() }
    }

    /// From the job parameters `fail_at` and `fail_after_checkpoint`.
    pub(crate) fn from_params(p: &sluice_runtime::JobParams) -> sluice_runtime::Result<Self> {
        let at = p.get("fail_at")?;
        Ok(if p.get("fail_after_checkpoint")? {
            Self::after_a_checkpoint(at)
        } else {
            Self::new(at)
        })
    }

    /// Fails at record `at` or, if no checkpoint has completed by then, at the first record
    /// after one has: the restart then restores a checkpoint, however slowly the first one
    /// completes. The operator reports completions through [`Self::checkpoint_complete`].
    pub(crate) fn after_a_checkpoint(at: u64) -> Self {
        Self {
            after_checkpoint: true,
            ..Self::new(at)
        }
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
fn exactly_once_output<T: std::fmt::Display + Clone + Send + 'static>(
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
