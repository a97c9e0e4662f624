//! `dedup`: drops every record whose id was already emitted less than `ttl_ms` of event time
//! before, like a deduplication with state TTL in Flink. Per id, the time of the last emitted
//! record is keyed state; an event-time timer drops it once `ttl_ms` has passed, so state holds
//! only the ids of the last `ttl_ms`. `output=DIR` receives `id,index,event_time` lines of the
//! kept records through the exactly-once file sink.
//!
//! One source subtask and one lane: records reach the operator in index (and time) order, so
//! which copy of an id is kept is the same on every run and after every restore.

use crate::transactions::splitmix64;
use serde::{Deserialize, Serialize};
use sluice_runtime::element::Timestamp;
use sluice_runtime::{
    Error, JobDefinition, JobParams, KeyedContext, KeyedProcessFunction, ParamSpec, Result, StateRegistry, StreamEnv,
    TaskInfo, ValueState,
};
use std::fmt;

/// Where event time starts.
pub const BASE_TIME: i64 = 1_700_000_000_000;
/// Event time between two records, ms.
pub const MS_PER_RECORD: i64 = 10;

/// A record with an id that may repeat.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Record {
    /// Its id; copies share it.
    pub id: u64,
    /// Its position in the input.
    pub index: u64,
    /// Event time, ms.
    pub event_time: i64,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.id, self.index, self.event_time)
    }
}

/// Record `i`: a quarter of the records repeat the id of a record up to `max_distance` before.
pub fn record(seed: u64, max_distance: u64, i: u64) -> Record {
    let h = splitmix64(seed ^ splitmix64(i));
    let distance = 1 + splitmix64(h) % max_distance.max(1);
    let id = if h.is_multiple_of(4) && i >= distance {
        record(seed, max_distance, i - distance).id
    } else {
        i
    };
    Record {
        id,
        index: i,
        event_time: BASE_TIME + i as i64 * MS_PER_RECORD,
    }
}

/// The records `dedup` keeps, computed directly.
pub fn expected(events: u64, seed: u64, max_distance: u64, ttl_ms: i64) -> Vec<Record> {
    let mut last_kept: std::collections::HashMap<u64, i64> = Default::default();
    let mut kept = Vec::new();
    for i in 0..events {
        let r = record(seed, max_distance, i);
        if last_kept.get(&r.id).is_none_or(|t| r.event_time - t >= ttl_ms) {
            last_kept.insert(r.id, r.event_time);
            kept.push(r);
        }
    }
    kept
}

#[derive(Clone)]
struct Dedup {
    ttl_ms: i64,
    last_kept: Option<ValueState<u64, i64>>,
}

impl KeyedProcessFunction for Dedup {
    type Key = u64;
    type In = Record;
    type Out = Record;

    fn open(&mut self, state: &mut StateRegistry<'_, u64>, _: &TaskInfo) -> Result<()> {
        self.last_kept = Some(state.value_state("last-kept")?);
        Ok(())
    }

    fn process(&mut self, r: Record, ctx: &mut KeyedContext<'_, u64>, out: &mut Vec<Record>) -> Result<()> {
        let last_kept = self.last_kept.as_ref().expect("opened");
        if last_kept.get(ctx)?.is_some_and(|t| r.event_time - t < self.ttl_ms) {
            return Ok(());
        }
        last_kept.update(ctx, r.event_time)?;
        // The id's state expires `ttl_ms` after the copy kept.
        ctx.register_event_time_timer(r.event_time + self.ttl_ms - 1)?;
        out.push(r);
        Ok(())
    }

    fn on_timer(&mut self, ts: Timestamp, ctx: &mut KeyedContext<'_, u64>, _: &mut Vec<Record>) -> Result<()> {
        let last_kept = self.last_kept.as_ref().expect("opened");
        if last_kept.get(ctx)?.is_some_and(|t| t + self.ttl_ms - 1 <= ts) {
            last_kept.clear(ctx)?;
        }
        Ok(())
    }
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let (seed, max_distance) = (p.get::<u64>("seed")?, p.get::<u64>("max_distance")?);
    let ttl_ms: i64 = p.get("ttl_ms")?;
    if ttl_ms < 1 {
        return Err(Error::Config("job parameter 'ttl_ms' must be at least 1".into()));
    }
    let kept = crate::ordered_source(
        env,
        "records",
        p,
        move |i| record(seed, max_distance, i),
        |r: &Record| r.event_time,
    )?
    .key_by(|r: &Record| r.id)
    .process(
        "dedup",
        crate::Failing::new(
            p,
            Dedup {
                ttl_ms,
                last_kept: None,
            },
        )?,
    )
    .uid("dedup");
    crate::exactly_once_output(kept, "kept-output", p.optional("output"));
    Ok(())
}

/// The job's registration.
pub fn definition() -> JobDefinition {
    let param = ParamSpec::new;
    JobDefinition {
        name: "dedup",
        description: "drops records whose id was kept less than ttl_ms of event time before",
        params: vec![
            param("events", "10000000", "number of records"),
            param("seed", "42", "generator seed"),
            param("rate", "0", "records per second, 0 = unlimited"),
            param(
                "max_distance",
                "2000",
                "a repeated id repeats one of this many records before",
            ),
            param(
                "ttl_ms",
                "10000",
                "how long a kept id suppresses its copies, ms of event time",
            ),
            crate::FailAt::PARAM,
            crate::FailAt::AFTER_CHECKPOINT_PARAM,
            param(
                "output",
                "",
                "directory receiving `id,index,event_time` part files (exactly once)",
            ),
        ],
        build,
    }
}
