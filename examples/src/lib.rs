//! # Sluice example jobs
//!
//! Real jobs, registered by name in the `sluice` binary ([`registry`]):
//!
//! - [`transactions`]: a running total and count per user over a deterministic stream of
//!   transactions, with an injectable failure; its exact expected output is computable directly.
//! - [`daily_totals`]: each user's 24-hour total on every event, from 24 hourly sub-totals.
//! - [`dedup`]: drops records whose id was kept less than a TTL of event time before.
//! - [`window_sums`]: each user's total per tumbling or sliding event-time window.
//! - [`wordcount`]: word counts over text files.

pub mod daily_totals;
pub mod dedup;
pub mod transactions;
pub mod window_sums;
pub mod wordcount;

use sluice_operators::discard_sink::DiscardSink;
use sluice_operators::file_sink::ExactlyOnceFileSink;
use sluice_runtime::{DataStream, JobRegistry};

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
    r.register(daily_totals::definition());
    r.register(dedup::definition());
    r.register(transactions::definition());
    r.register(window_sums::definition());
    r.register(wordcount::definition());
    r
}
