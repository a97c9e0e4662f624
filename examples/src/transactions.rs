//! `transactions`: a deterministic generator of (user, amount, event time), a keyed running total
//! and count per user, and at end of input one line per user, `user,total,count`, sorted by user.
//! `fail_at=N` makes subtask 0 of the totals operator panic at its N-th record on the first
//! attempt only, to exercise failover.

use serde::{Deserialize, Serialize};
use sluice_operators::generator::LaneGenerator;
use sluice_operators::sorted_sink::SortedFileSink;
use sluice_runtime::{
    JobDefinition, JobParams, KeyedBackend, KeyedContext, KeyedProcessFunction, ParamSpec, Result, StateRegistry,
    StreamEnv, TaskInfo, ValueState,
};
use std::collections::BTreeMap;
use std::fmt;

/// One generated transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// Who paid.
    pub user: u64,
    /// How much, in cents (may be negative: refunds).
    pub amount: i64,
    /// Event time, ms.
    pub event_time: i64,
}

/// A user's final total.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserTotal {
    /// The user.
    pub user: u64,
    /// Sum of amounts.
    pub total: i64,
    /// Number of transactions.
    pub count: u64,
}

impl fmt::Display for UserTotal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.user, self.total, self.count)
    }
}

/// A 64-bit mix (splitmix64's finalizer): the generators' pseudo-randomness.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Event `i` of the stream for `seed` over `users` users: a pure function, so any subset of the
/// stream can be produced independently (and the expected totals computed directly).
pub fn transaction(seed: u64, users: u64, i: u64) -> Transaction {
    let h = splitmix64(seed ^ splitmix64(i));
    Transaction {
        user: h % users.max(1),
        amount: (splitmix64(h) % 10_000) as i64 - 1_000,
        event_time: 1_700_000_000_000 + i as i64 * 10,
    }
}

/// The totals computed directly from the generator, sorted by user.
pub fn expected_totals(events: u64, users: u64, seed: u64) -> Vec<UserTotal> {
    let mut totals: BTreeMap<u64, (i64, u64)> = BTreeMap::new();
    for i in 0..events {
        let t = transaction(seed, users, i);
        let e = totals.entry(t.user).or_default();
        e.0 += t.amount;
        e.1 += 1;
    }
    totals
        .into_iter()
        .map(|(user, (total, count))| UserTotal { user, total, count })
        .collect()
}

/// Keyed running total and count per user; emits every user's final total at end of input.
#[derive(Clone, Default)]
pub struct RunningTotals {
    totals: Option<ValueState<u64, (i64, u64)>>,
}

impl KeyedProcessFunction for RunningTotals {
    type Key = u64;
    type In = Transaction;
    type Out = UserTotal;

    fn open(&mut self, state: &mut StateRegistry<'_, u64>, _: &TaskInfo) -> Result<()> {
        self.totals = Some(state.value_state("totals")?);
        Ok(())
    }

    fn process(&mut self, t: Transaction, ctx: &mut KeyedContext<'_, u64>, _: &mut Vec<UserTotal>) -> Result<()> {
        let totals = self.totals.as_ref().expect("opened");
        totals.update_with(
            ctx,
            || (0, 0),
            |v| {
                v.0 += t.amount;
                v.1 += 1;
            },
        )
    }

    fn end_of_input(&mut self, state: &KeyedBackend, out: &mut Vec<UserTotal>) -> Result<()> {
        let totals = self.totals.as_ref().expect("opened");
        out.extend(
            totals
                .entries(state)?
                .into_iter()
                .map(|(user, (total, count))| UserTotal { user, total, count }),
        );
        Ok(())
    }
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let (events, users, seed) = (p.get::<u64>("events")?, p.get::<u64>("users")?, p.get::<u64>("seed")?);
    if users == 0 {
        return Err(sluice_runtime::Error::Config(
            "job parameter 'users' must be at least 1".into(),
        ));
    }
    let generator = LaneGenerator::new(events, p.get("lanes")?, p.get("rate")?, move |i| {
        transaction(seed, users, i)
    });
    env.source("transactions", generator)
        .uid("transactions-source")
        .key_by(|t: &Transaction| t.user)
        .process("running-totals", crate::Failing::new(p, RunningTotals::default())?)
        .uid("running-totals")
        .sink(
            "totals-output",
            SortedFileSink::new(p.optional("output").map(Into::into)),
        )
        .uid("totals-output")
        .parallelism(1);
    Ok(())
}

/// The job's registration.
pub fn definition() -> JobDefinition {
    JobDefinition {
        name: "transactions",
        description: "running total and count per user over generated transactions",
        params: vec![
            ParamSpec {
                name: "events",
                default: "1000000",
                help: "number of transactions",
            },
            ParamSpec {
                name: "users",
                default: "100000",
                help: "number of distinct users",
            },
            ParamSpec {
                name: "seed",
                default: "42",
                help: "generator seed",
            },
            ParamSpec {
                name: "rate",
                default: "0",
                help: "events per second in total, 0 = unlimited",
            },
            ParamSpec {
                name: "lanes",
                default: "128",
                help: "generator lanes (units of source redistribution)",
            },
            crate::FailAt::PARAM,
            crate::FailAt::AFTER_CHECKPOINT_PARAM,
            ParamSpec {
                name: "output",
                default: "",
                help: "file receiving `user,total,count` lines sorted by user (- for stdout)",
            },
        ],
        build,
    }
}
