//! `window-sums`: each user's total amount per event-time window over the `transactions`
//! stream, tumbling or sliding; the benchmark job of windowed aggregation. Event time advances
//! `events_per_ms` events per millisecond, so a 1-minute window holds
//! `60,000 * events_per_ms / users` events per user. `output=DIR` receives the results
//! (`user,start,end,total`) through the exactly-once file sink; without it they are counted.

use crate::transactions::{transaction, Transaction};
use sluice_operators::discard_sink::DiscardSink;
use sluice_operators::generator::LaneGenerator;
use sluice_runtime::{
    AggregateFunction, Error, JobDefinition, JobParams, ParamSpec, Result, StreamEnv, WatermarkStrategy, WindowAssigner,
};
use std::time::Duration;

/// Where event time starts.
pub const BASE_TIME: i64 = 1_700_000_000_000;

/// Sums amounts.
#[derive(Clone)]
pub struct SumAmounts;

impl AggregateFunction for SumAmounts {
    type In = Transaction;
    type Acc = i64;
    type Out = i64;
    fn create(&self) -> i64 {
        0
    }
    fn add(&self, acc: &mut i64, t: &Transaction) {
        *acc += t.amount;
    }
    fn merge(&self, acc: &mut i64, other: &i64) {
        *acc += other;
    }
    fn result(&self, acc: &i64) -> i64 {
        *acc
    }
}

/// Event `i`: the `transactions` event, with event time at `events_per_ms` per millisecond.
pub fn event(seed: u64, users: u64, events_per_ms: u64, i: u64) -> Transaction {
    Transaction {
        event_time: BASE_TIME + (i / events_per_ms.max(1)) as i64,
        ..transaction(seed, users, i)
    }
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let (events, users, seed) = (p.get::<u64>("events")?, p.get::<u64>("users")?, p.get::<u64>("seed")?);
    let per_ms: u64 = p.get("events_per_ms")?;
    if users == 0 || per_ms == 0 {
        return Err(Error::Config(
            "job parameters 'users' and 'events_per_ms' must be at least 1".into(),
        ));
    }
    let size = Duration::from_millis(p.get("size_ms")?);
    let assigner = match p.get::<String>("windows")?.as_str() {
        "tumbling" => WindowAssigner::tumbling(size)?,
        "sliding" => WindowAssigner::sliding(size, Duration::from_millis(p.get("slide_ms")?))?,
        other => {
            return Err(Error::Config(format!(
                "job parameter 'windows': unknown window kind '{other}' (tumbling, sliding)"
            )))
        }
    };
    let generator = LaneGenerator::new(events, p.get("lanes")?, p.get("rate")?, move |i| {
        event(seed, users, per_ms, i)
    });
    let bound = Duration::from_millis(p.get("out_of_orderness_ms")?);
    let mut watermarks = WatermarkStrategy::bounded_out_of_orderness(bound, |t: &Transaction| t.event_time);
    match p.get::<u64>("max_drift_ms")? {
        0 => {}
        drift => watermarks = watermarks.with_alignment(Duration::from_millis(drift)),
    }
    let windows = env
        .source("transactions", generator)
        .uid("transactions-source")
        .assign_timestamps_and_watermarks(watermarks)
        .uid("watermarks")
        .key_by(|t: &Transaction| t.user)
        .window(assigner)
        .aggregate("window-sums", SumAmounts)?
        .uid("window-sums");
    let results = windows.results();
    crate::exactly_once_output(results, "sums-output", p.optional("output"));
    windows
        .late()
        .sink("late", DiscardSink::<Transaction>::default())
        .uid("late");
    Ok(())
}

/// The job's registration.
pub fn definition() -> JobDefinition {
    let param = ParamSpec::new;
    JobDefinition {
        name: "window-sums",
        description: "each user's total per event-time window (tumbling or sliding) over generated transactions",
        params: vec![
            param("events", "10000000", "number of transactions"),
            param("users", "100000", "number of distinct users"),
            param("seed", "42", "generator seed"),
            param("rate", "0", "events per second in total, 0 = unlimited"),
            param(
                "lanes",
                "8",
                "generator lanes (units of source redistribution; fewer keep event time in order)",
            ),
            param("events_per_ms", "100", "events per millisecond of event time"),
            param("windows", "tumbling", "tumbling or sliding"),
            param("size_ms", "60000", "window size, ms"),
            param("slide_ms", "60000", "slide of sliding windows, ms"),
            param("out_of_orderness_ms", "2000", "watermark bound, ms"),
            param(
                "max_drift_ms",
                "10000",
                "watermark alignment: how far (ms of event time) a source subtask may run ahead of the slowest, 0 = not aligned",
            ),
            param(
                "output",
                "",
                "directory receiving `user,start,end,total` part files (exactly once)",
            ),
        ],
        build,
    }
}
