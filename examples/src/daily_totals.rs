//! `daily-totals`: each user's total amount over the last 24 hours of event time, emitted on
//! every event. The classic design for time-dimension aggregates: per user, 24 hourly sub-window
//! totals in one value; an event adds to its hour's total and the job emits the sum of the 24.
//! An event-time timer drops a user's state a day after their last hour. `output=DIR` receives
//! `user,event_time,total` lines through the exactly-once file sink.
//!
//! One source subtask and one lane: a user's events then reach the totals in the same order on
//! every run and after every restore, so the per-event totals are exactly reproducible.

use crate::transactions::{transaction, Transaction};
use serde::{Deserialize, Serialize};
use sluice_runtime::element::Timestamp;
use sluice_runtime::{
    Error, JobDefinition, JobParams, KeyedContext, KeyedProcessFunction, ParamSpec, Result, StateRegistry, StreamEnv,
    TaskInfo, ValueState,
};
use std::fmt;

const HOUR: i64 = 3_600_000;
/// Where event time starts.
pub const BASE_TIME: i64 = 1_700_000_000_000;

/// A user's total over the 24 hours up to an event.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DailyTotal {
    /// The user.
    pub user: u64,
    /// The event's time.
    pub event_time: i64,
    /// Sum of the user's amounts in the event's hour and the 23 before it.
    pub total: i64,
}

impl fmt::Display for DailyTotal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.user, self.event_time, self.total)
    }
}

/// 24 hourly totals, indexed by hour modulo 24, the newest hour first known.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hourly {
    newest_hour: i64,
    sums: [i64; 24],
}

impl Hourly {
    /// Adds `amount` in `hour`; the 24-hour total up to that hour, or `None` for an hour more
    /// than a day older than the newest one.
    fn add(&mut self, hour: i64, amount: i64) -> Option<i64> {
        if hour > self.newest_hour {
            // Hours that fell out of the day are zeroed as the newest hour moves on.
            let steps = (hour - self.newest_hour).min(24);
            for k in 0..steps {
                self.sums[(hour - k).rem_euclid(24) as usize] = 0;
            }
            self.newest_hour = hour;
        }
        if hour <= self.newest_hour - 24 {
            return None;
        }
        self.sums[hour.rem_euclid(24) as usize] += amount;
        let oldest_kept = self.newest_hour - 23;
        Some(
            (hour - 23..=hour)
                .filter(|h| *h >= oldest_kept)
                .map(|h| self.sums[h.rem_euclid(24) as usize])
                .sum(),
        )
    }
}

/// Event `i`: a `transactions` event, `ms_per_event` apart in event time.
pub fn event(seed: u64, users: u64, ms_per_event: u64, i: u64) -> Transaction {
    Transaction {
        event_time: BASE_TIME + (i * ms_per_event) as i64,
        ..transaction(seed, users, i)
    }
}

/// When a user whose newest event is in `hour` has nothing left that counts: a day after that
/// hour ends.
fn expiry(hour: i64) -> Timestamp {
    (hour + 25) * HOUR - 1
}

#[derive(Clone)]
struct DailyTotals {
    hourly: Option<ValueState<u64, Hourly>>,
}

impl KeyedProcessFunction for DailyTotals {
    type Key = u64;
    type In = Transaction;
    type Out = DailyTotal;

    fn open(&mut self, state: &mut StateRegistry<'_, u64>, _: &TaskInfo) -> Result<()> {
        self.hourly = Some(state.value_state("hourly")?);
        Ok(())
    }

    fn process(&mut self, t: Transaction, ctx: &mut KeyedContext<'_, u64>, out: &mut Vec<DailyTotal>) -> Result<()> {
        let hour = t.event_time.div_euclid(HOUR);
        let (mut total, mut created, mut newer_hour) = (None, false, false);
        self.hourly.as_ref().expect("opened").update_with(
            ctx,
            || {
                created = true;
                Hourly {
                    newest_hour: hour,
                    sums: [0; 24],
                }
            },
            |h| {
                newer_hour = hour > h.newest_hour;
                total = h.add(hour, t.amount);
            },
        )?;
        if created || newer_hour {
            // A day after the newest hour ends, nothing of this user counts any more.
            ctx.register_event_time_timer(expiry(hour))?;
        }
        if let Some(total) = total {
            out.push(DailyTotal {
                user: t.user,
                event_time: t.event_time,
                total,
            });
        }
        Ok(())
    }

    fn on_timer(&mut self, ts: Timestamp, ctx: &mut KeyedContext<'_, u64>, _: &mut Vec<DailyTotal>) -> Result<()> {
        let hourly = self.hourly.as_ref().expect("opened");
        if hourly.get(ctx)?.is_some_and(|h| expiry(h.newest_hour) <= ts) {
            hourly.clear(ctx)?;
        }
        Ok(())
    }
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let (users, seed) = (p.get::<u64>("users")?, p.get::<u64>("seed")?);
    let ms_per_event: u64 = p.get("ms_per_event")?;
    if users == 0 {
        return Err(Error::Config("job parameter 'users' must be at least 1".into()));
    }
    let totals = crate::ordered_source(
        env,
        "transactions",
        p,
        move |i| event(seed, users, ms_per_event, i),
        |t: &Transaction| t.event_time,
    )?
    .key_by(|t: &Transaction| t.user)
    .process("daily-totals", crate::Failing::new(p, DailyTotals { hourly: None })?)
    .uid("daily-totals");
    crate::exactly_once_output(totals, "totals-output", p.optional("output"));
    Ok(())
}

/// The job's registration.
pub fn definition() -> JobDefinition {
    let param = ParamSpec::new;
    JobDefinition {
        name: "daily-totals",
        description: "each user's total over the last 24 hours of event time, on every event",
        params: vec![
            param("events", "10000000", "number of transactions"),
            param("users", "100000", "number of distinct users"),
            param("seed", "42", "generator seed"),
            param("rate", "0", "events per second in total, 0 = unlimited"),
            param("ms_per_event", "100", "event time between two events, ms"),
            crate::FailAt::PARAM,
            crate::FailAt::AFTER_CHECKPOINT_PARAM,
            param(
                "output",
                "",
                "directory receiving `user,event_time,total` part files (exactly once)",
            ),
        ],
        build,
    }
}
