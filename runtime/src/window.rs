//! Event-time windows over a keyed stream, built on keyed state and event-time timers.
//!
//! Tumbling and sliding windows keep one accumulator per key and *pane* (the greatest common
//! divisor of size and slide): a record updates exactly one pane, whatever size/slide is, and a
//! window's result merges its panes when the watermark passes its end (on RocksDB, sliding
//! windows merge partial merges kept in memory instead: see `Stacks`). Session windows keep the
//! key's open sessions and merge them as records bridge their gaps. Aggregation is incremental:
//! records are never buffered, only accumulators. A record that arrives after every window it
//! belongs to was fired and its allowed lateness passed goes to the late output; one within the
//! lateness updates the window and fires it again.

use crate::config::StateBackendKind;
use crate::element::Timestamp;
use crate::error::{Error, Result};
use crate::operator::{Data, KeyedProcessFunction, StateRegistry, TaskInfo};
use crate::state::{Entries, Key, KeyedContext, MapState, StateValue, ValueState};
use crate::time::TimestampFn;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Folds records into an accumulator, like Flink's `AggregateFunction`.
pub trait AggregateFunction: Send + Sync + Clone + 'static {
    /// Records folded in.
    type In: Data;
    /// The accumulator kept in state.
    type Acc: StateValue;
    /// The window's result.
    type Out: Data;
    /// An empty accumulator.
    fn create(&self) -> Self::Acc;
    /// Folds one record in.
    fn add(&self, acc: &mut Self::Acc, record: &Self::In);
    /// Folds another accumulator in (panes into windows, sessions into sessions). Windows merge
    /// in time order but group the merges as it suits them (pane by pane, or partial merges of
    /// several panes first), so `merge` must be associative for results not to depend on it.
    fn merge(&self, acc: &mut Self::Acc, other: &Self::Acc);
    /// The result of a window.
    fn result(&self, acc: &Self::Acc) -> Self::Out;
    /// Whether sliding windows may keep partial merges of their panes, so that a firing merges
    /// two accumulators instead of all `size/slide` panes of its window. True for accumulators
    /// of bounded size (sums, counts, extremes, a `reduce` to a record of bounded size); return
    /// false for ones that grow with their records (a list, a set of distinct values): a partial
    /// merge would then hold many panes' records again, and the memory bound of the partial
    /// merges, estimated from the accumulator's inline size, would not hold.
    fn keep_partial_merges(&self) -> bool {
        true
    }
    /// The result of a window whose accumulator is no longer needed (saves a copy when the
    /// result is the accumulator itself).
    #[allow(clippy::wrong_self_convention)] // `into` the accumulator, not `self`
    fn into_result(&self, acc: Self::Acc) -> Self::Out {
        self.result(&acc)
    }
}

/// Counts a window's records: `aggregate(name, Count::default())`.
pub struct Count<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Default for Count<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T> Clone for Count<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T: Data> AggregateFunction for Count<T> {
    type In = T;
    type Acc = u64;
    type Out = u64;
    fn create(&self) -> u64 {
        0
    }
    fn add(&self, acc: &mut u64, _: &T) {
        *acc += 1;
    }
    fn merge(&self, acc: &mut u64, other: &u64) {
        *acc += other;
    }
    fn result(&self, acc: &u64) -> u64 {
        *acc
    }
}

/// Folds a window's records pairwise (`WindowedStream::reduce`): the result is a record.
#[derive(Clone)]
pub(crate) struct ReduceAggregate<T>(pub crate::state::ReduceFn<T>);

impl<T: StateValue> AggregateFunction for ReduceAggregate<T> {
    type In = T;
    /// `None` only before the first record (panes and sessions always hold one).
    type Acc = Option<T>;
    type Out = T;
    fn create(&self) -> Option<T> {
        None
    }
    fn add(&self, acc: &mut Option<T>, record: &T) {
        *acc = Some(match acc.take() {
            Some(a) => (self.0)(&a, record),
            None => record.clone(),
        });
    }
    fn merge(&self, acc: &mut Option<T>, other: &Option<T>) {
        if let Some(o) = other {
            self.add(acc, o);
        }
    }
    fn result(&self, acc: &Option<T>) -> T {
        self.into_result(acc.clone())
    }
    fn into_result(&self, acc: Option<T>) -> T {
        acc.expect("a window holds at least one record")
    }
}

/// Keeps every record of a window (`WindowedStream::process`, whose function sees them all).
#[derive(Clone)]
pub(crate) struct Collect<T>(pub std::marker::PhantomData<fn() -> T>);

impl<T: StateValue> AggregateFunction for Collect<T> {
    type In = T;
    type Acc = Vec<T>;
    type Out = Vec<T>;
    fn create(&self) -> Vec<T> {
        Vec::new()
    }
    fn add(&self, acc: &mut Vec<T>, record: &T) {
        acc.push(record.clone());
    }
    fn merge(&self, acc: &mut Vec<T>, other: &Vec<T>) {
        acc.extend_from_slice(other);
    }
    fn keep_partial_merges(&self) -> bool {
        false
    }
    fn result(&self, acc: &Vec<T>) -> Vec<T> {
        acc.clone()
    }
    fn into_result(&self, acc: Vec<T>) -> Vec<T> {
        acc
    }
}

/// A window: `[start, end)` in event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimeWindow {
    /// First millisecond.
    pub start: Timestamp,
    /// End (exclusive).
    pub end: Timestamp,
}

/// Where a window function's output goes, like Flink's `Collector`.
pub struct WindowCollector<'a, O, T> {
    out: &'a mut Vec<WindowOutput<O, T>>,
}

impl<O, T> WindowCollector<'_, O, T> {
    /// Emits one output record.
    pub fn collect(&mut self, record: O) {
        self.out.push(WindowOutput::Result(record));
    }
}

/// Turns a fired window's contents into output, knowing the key and the window, like Flink's
/// `ProcessWindowFunction`. Its input `R` is the window's aggregate
/// (`WindowedStream::aggregate_with`) or all its records (`WindowedStream::process`).
pub trait ProcessWindowFunction<K, R>: Send + Sync + Clone + 'static {
    /// Output records.
    type Out: Data;
    /// Called once per firing of `window` for `key` (again for each late update).
    fn process<T>(
        &self,
        key: &K,
        window: TimeWindow,
        input: R,
        out: &mut WindowCollector<'_, Self::Out, T>,
    ) -> Result<()>;
}

/// The window function of `aggregate` and `reduce`: one [`WindowResult`] per firing.
#[derive(Clone, Copy, Default)]
pub struct ToWindowResult;

impl<K: Key, R: Data> ProcessWindowFunction<K, R> for ToWindowResult {
    type Out = WindowResult<K, R>;
    fn process<T>(&self, key: &K, w: TimeWindow, value: R, out: &mut WindowCollector<'_, Self::Out, T>) -> Result<()> {
        out.collect(WindowResult {
            key: key.clone(),
            start: w.start,
            end: w.end,
            value,
        });
        Ok(())
    }
}

/// Which windows a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowAssigner {
    /// Fixed-size windows that follow each other: `[n*size, (n+1)*size)`.
    Tumbling {
        /// Window length (ms).
        size: i64,
    },
    /// Fixed-size windows starting every `slide`: a record is in `size/slide` of them.
    Sliding {
        /// Window length (ms).
        size: i64,
        /// Distance between window starts (ms).
        slide: i64,
    },
    /// A key's records closer than `gap` to each other form one window.
    Session {
        /// Inactivity that closes a session (ms).
        gap: i64,
    },
}

/// The longest window size, slide, gap or lateness: a century, far from overflowing `i64`
/// milliseconds when added to a timestamp.
const MAX_SPAN: i64 = 100 * 365 * 24 * 3_600_000;

fn millis(d: Duration, what: &str) -> Result<i64> {
    match i64::try_from(d.as_millis()) {
        Ok(ms) if (1..=MAX_SPAN).contains(&ms) => Ok(ms),
        _ => Err(Error::Config(format!(
            "{what} must be between 1 ms and 100 years, got {d:?}"
        ))),
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl WindowAssigner {
    /// Tumbling windows of `size`.
    pub fn tumbling(size: Duration) -> Result<Self> {
        Ok(Self::Tumbling {
            size: millis(size, "window size")?,
        })
    }

    /// Windows of `size` starting every `slide` (`slide` at most `size`).
    pub fn sliding(size: Duration, slide: Duration) -> Result<Self> {
        let (size, slide) = (millis(size, "window size")?, millis(slide, "window slide")?);
        if slide > size {
            return Err(Error::Config(format!(
                "a sliding window's slide ({slide} ms) must not exceed its size ({size} ms)"
            )));
        }
        Ok(Self::Sliding { size, slide })
    }

    /// Session windows closed by `gap` of inactivity.
    pub fn session(gap: Duration) -> Result<Self> {
        Ok(Self::Session {
            gap: millis(gap, "session gap")?,
        })
    }

    /// (size, slide, pane) of an aligned assigner; `None` for sessions.
    fn aligned(&self) -> Option<(i64, i64, i64)> {
        match *self {
            Self::Tumbling { size } => Some((size, size, size)),
            Self::Sliding { size, slide } => Some((size, slide, gcd(size, slide))),
            Self::Session { .. } => None,
        }
    }
}

/// One window's result for one key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WindowResult<K, R> {
    /// The key.
    pub key: K,
    /// First millisecond of the window.
    pub start: Timestamp,
    /// End of the window (exclusive).
    pub end: Timestamp,
    /// The aggregate.
    pub value: R,
}

/// `key,start,end,value`: one CSV line.
impl<K: std::fmt::Display, R: std::fmt::Display> std::fmt::Display for WindowResult<K, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{},{}", self.key, self.start, self.end, self.value)
    }
}

/// What a window operator emits: results, and records too late for any window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowOutput<R, T> {
    /// A fired window's output.
    Result(R),
    /// A record whose windows had all closed (the late side output).
    Late(T),
}

impl<R, T> WindowOutput<R, T> {
    /// The result, if this is one.
    pub fn result(self) -> Option<R> {
        match self {
            Self::Result(r) => Some(r),
            Self::Late(_) => None,
        }
    }

    /// The late record, if this is one.
    pub fn late(self) -> Option<T> {
        match self {
            Self::Late(t) => Some(t),
            Self::Result(_) => None,
        }
    }
}

/// One open session of a key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session<A> {
    start: Timestamp,
    /// Exclusive: the last record's time plus the gap.
    end: Timestamp,
    acc: A,
}

/// A key's sliding windows as two stacks of partial merges (the "two-stacks" scheme of sliding
/// window aggregation), so that a firing merges two accumulators, not all `size/slide` panes of
/// its window. The front holds, for each later window start `b` up to `front_end`, the merge of
/// the panes in `[b, front_end)`; the back is the merge of the panes in `[front_end,
/// back_end)`. A window `[s, e)` with `s < front_end` is the front's merge at `s` merged with
/// the back, once the back has taken in the panes up to `e`, which records update here as well
/// as in state: such a firing reads no state. When the front is used up, a firing reads its
/// window's panes once and builds a new front from them ("flip").
///
/// Derived data, kept in the operator and never checkpointed: the panes stay the truth. After
/// a restore the cache starts empty, and a record that changes a pane already merged (behind
/// the watermark, so rare) drops its key's stacks; either way the key's next firing flips.
struct Stacks<A> {
    /// Window starts after the last firing with their merges, newest first (the next to fire is
    /// popped from the end). A start has one exactly when its part of the front holds data.
    front: Vec<(Timestamp, A)>,
    front_end: Timestamp,
    back_end: Timestamp,
    back: Option<A>,
    /// The key's panes from `back_end` on, as in its state (records update both), in time
    /// order: the back takes them in without reading state.
    pending: Vec<(Timestamp, A)>,
}

/// The stacks of an operator subtask's keys.
struct StackCache<K, A> {
    keys: FxHashMap<K, Stacks<A>>,
    /// How many keys may have stacks (from [`STACKS_BUDGET`]).
    room: usize,
}

/// Bytes the stacks of one operator subtask may take (estimated from the accumulator's size):
/// keys beyond it fire from their panes alone.
const STACKS_BUDGET: usize = 64 << 20;

/// The keyed function behind `KeyedStream::window(..)`: aggregates with `agg`, turns fired
/// windows into output with `window_fn`.
pub(crate) struct WindowFunction<K, A: AggregateFunction, W> {
    pub assigner: WindowAssigner,
    pub agg: A,
    pub window_fn: W,
    pub timestamp: TimestampFn<A::In>,
    pub lateness: i64,
    /// The assigner's (size, slide, pane), computed once: the pane is a gcd (a loop of
    /// divisions) that every record and firing would otherwise recompute.
    aligned: Option<(i64, i64, i64)>,
    panes: Option<MapState<K, Timestamp, A::Acc>>,
    /// Sliding windows whose aggregate keeps partial merges, on RocksDB: the keys' [`Stacks`],
    /// and how many keys may have them.
    stacks: Option<StackCache<K, A::Acc>>,
    /// Bytes the stacks may take ([`STACKS_BUDGET`]; tests lower it).
    stacks_budget: usize,
    sessions: Option<ValueState<K, Vec<Session<A::Acc>>>>,
}

impl<K, A: AggregateFunction, W: Clone> Clone for WindowFunction<K, A, W> {
    fn clone(&self) -> Self {
        Self {
            assigner: self.assigner,
            agg: self.agg.clone(),
            window_fn: self.window_fn.clone(),
            timestamp: self.timestamp.clone(),
            lateness: self.lateness,
            aligned: self.aligned,
            panes: self.panes.clone(),
            // Each subtask builds its own.
            stacks: None,
            stacks_budget: self.stacks_budget,
            sessions: self.sessions.clone(),
        }
    }
}

impl<K: Key, A: AggregateFunction, W: ProcessWindowFunction<K, A::Out>> WindowFunction<K, A, W> {
    pub fn new(
        assigner: WindowAssigner,
        agg: A,
        window_fn: W,
        timestamp: TimestampFn<A::In>,
        lateness: Duration,
    ) -> Self {
        Self {
            assigner,
            agg,
            window_fn,
            timestamp,
            // Capped so that window arithmetic on real timestamps cannot overflow.
            lateness: i64::try_from(lateness.as_millis()).unwrap_or(i64::MAX).min(MAX_SPAN),
            aligned: assigner.aligned(),
            panes: None,
            stacks: None,
            stacks_budget: STACKS_BUDGET,
            sessions: None,
        }
    }

    /// Emits the window `[start, end)` from its panes, if any holds data, read in place in one
    /// borrow of the key's panes (not a lookup per pane); returns the first pane at or after
    /// `later`.
    fn fire_aligned(
        &self,
        ctx: &mut KeyedContext<'_, K>,
        (start, end): (Timestamp, Timestamp),
        later: Timestamp,
        out: &mut Vec<WindowOutput<W::Out, A::In>>,
    ) -> Result<Option<Timestamp>> {
        let (acc, later_pane) = self.panes.as_ref().expect("opened").with_entries(ctx, |entries| {
            // Merged in time order: a merge need not be commutative.
            let mut acc: Option<A::Acc> = None;
            let mut merge = |a: &A::Acc| match &mut acc {
                Some(acc) => self.agg.merge(acc, a),
                None => acc = Some(a.clone()),
            };
            let mut later_pane: Option<Timestamp> = None;
            match entries {
                // As the memory backend mostly holds them: in time order, so the window is a
                // range of each run, the later pane the first at or after `later`.
                Entries::Runs(runs) if runs.iter().flat_map(|run| run.iter()).is_sorted_by(|a, b| a.0 < b.0) => {
                    for run in runs {
                        let at = |t: Timestamp| run.partition_point(|(p, _)| *p < t);
                        run[at(start)..at(end)].iter().for_each(|(_, a)| merge(a));
                        later_pane = later_pane.or(run.get(at(later)).map(|(p, _)| *p));
                    }
                }
                // Otherwise gathered (on the stack up to 64) and sorted.
                entries => {
                    let mut window: smallvec::SmallVec<[(Timestamp, &A::Acc); 64]> = smallvec::SmallVec::new();
                    entries.for_each(|&p, a| {
                        if p >= later {
                            later_pane = Some(later_pane.map_or(p, |l| l.min(p)));
                        }
                        if (start..end).contains(&p) {
                            window.push((p, a));
                        }
                    });
                    window.sort_unstable_by_key(|(p, _)| *p);
                    window.iter().for_each(|(_, a)| merge(a));
                }
            }
            (acc, later_pane)
        })?;
        if let Some(acc) = acc {
            self.emit(ctx, start, end, acc, out)?;
        }
        Ok(later_pane)
    }

    /// Fires the on-time window `[start, end)` from the key's stacks (flipping when the front is
    /// used up or the key has none); returns whether the next window holds data from panes
    /// before `end`. `None` when the key has no stacks and no room for them: the caller fires
    /// from the panes.
    fn fire_stacked(
        &mut self,
        ctx: &mut KeyedContext<'_, K>,
        (start, end): (Timestamp, Timestamp),
        slide: i64,
        out: &mut Vec<WindowOutput<W::Out, A::In>>,
    ) -> Result<Option<bool>> {
        let Some(cache) = &mut self.stacks else {
            return Ok(None);
        };
        let mut stacks = match cache.keys.remove(ctx.key()) {
            Some(s) if start < s.front_end => s,
            _ if cache.keys.len() >= cache.room => return Ok(None),
            _ => return self.flip(ctx, (start, end), slide, out).map(Some),
        };
        let done = stacks.pending.partition_point(|(p, _)| *p < end);
        for (_, p) in stacks.pending.drain(..done) {
            match &mut stacks.back {
                Some(b) => self.agg.merge(b, &p),
                None => stacks.back = Some(p),
            }
        }
        stacks.back_end = end;
        while stacks.front.last().is_some_and(|(b, _)| *b < start) {
            stacks.front.pop();
        }
        let first = match stacks.front.last() {
            Some((b, _)) if *b == start => stacks.front.pop().map(|(_, m)| m),
            _ => None,
        };
        let acc = match (first, &stacks.back) {
            (Some(mut f), Some(b)) => {
                self.agg.merge(&mut f, b);
                Some(f)
            }
            (f, b) => f.or_else(|| b.clone()),
        };
        self.keep_and_emit(ctx, stacks, (start, end), acc, out).map(Some)
    }

    /// Fires `[start, end)` from its panes, read once, and makes them the key's new front: the
    /// merge of the panes in `[b, end)` for each later window start `b` that has any; the back
    /// is empty. Returns whether the next window holds any of them.
    fn flip(
        &mut self,
        ctx: &mut KeyedContext<'_, K>,
        (start, end): (Timestamp, Timestamp),
        slide: i64,
        out: &mut Vec<WindowOutput<W::Out, A::In>>,
    ) -> Result<bool> {
        let (acc, front, pending) = self.panes.as_ref().expect("opened").with_entries(ctx, |entries| {
            let mut window: smallvec::SmallVec<[(Timestamp, &A::Acc); 64]> = smallvec::SmallVec::new();
            let mut pending = Vec::new();
            entries.for_each(|&p, a| {
                if (start..end).contains(&p) {
                    window.push((p, a));
                } else if p >= end {
                    pending.push((p, a.clone()));
                }
            });
            window.sort_unstable_by_key(|(p, _)| *p);
            pending.sort_unstable_by_key(|(p, _)| *p);
            // From the newest window start down: `run` merges the panes in `[b, end)`, each
            // merge in time order (a merge need not be commutative).
            let mut front: Vec<(Timestamp, A::Acc)> = Vec::new();
            let mut run: Option<A::Acc> = None;
            let mut rest = window.len();
            let mut b = start + (end - 1 - start) / slide * slide;
            loop {
                let from = window[..rest].partition_point(|(p, _)| *p < b);
                if let Some(((_, first), later)) = window[from..rest].split_first() {
                    let mut group = (*first).clone();
                    for (_, a) in later {
                        self.agg.merge(&mut group, a);
                    }
                    if let Some(r) = &run {
                        self.agg.merge(&mut group, r);
                    }
                    run = Some(group);
                }
                rest = from;
                if b == start {
                    break;
                }
                if let Some(r) = &run {
                    front.push((b, r.clone()));
                }
                b -= slide;
            }
            (run, front, pending)
        })?;
        let stacks = Stacks {
            front,
            front_end: end,
            back_end: end,
            back: None,
            pending,
        };
        self.keep_and_emit(ctx, stacks, (start, end), acc, out)
    }

    /// Keeps the key's stacks while a later window needs them or they hold panes not merged yet
    /// (an idle key's go), emits the window; returns whether the next window holds data from
    /// panes before `end`.
    fn keep_and_emit(
        &mut self,
        ctx: &mut KeyedContext<'_, K>,
        stacks: Stacks<A::Acc>,
        (start, end): (Timestamp, Timestamp),
        acc: Option<A::Acc>,
        out: &mut Vec<WindowOutput<W::Out, A::In>>,
    ) -> Result<bool> {
        let next = !stacks.front.is_empty() || stacks.back.is_some();
        if next || !stacks.pending.is_empty() {
            let cache = self.stacks.as_mut().expect("stacks are on");
            cache.keys.insert(ctx.key().clone(), stacks);
        }
        if let Some(acc) = acc {
            self.emit(ctx, start, end, acc, out)?;
        }
        Ok(next)
    }

    fn emit(
        &self,
        ctx: &KeyedContext<'_, K>,
        start: Timestamp,
        end: Timestamp,
        acc: A::Acc,
        out: &mut Vec<WindowOutput<W::Out, A::In>>,
    ) -> Result<()> {
        self.window_fn.process(
            ctx.key(),
            TimeWindow { start, end },
            self.agg.into_result(acc),
            &mut WindowCollector { out },
        )
    }

    fn process_aligned(
        &mut self,
        record: A::In,
        ts: Timestamp,
        (size, slide, pane): (i64, i64, i64),
        ctx: &mut KeyedContext<'_, K>,
        out: &mut Vec<WindowOutput<W::Out, A::In>>,
    ) -> Result<()> {
        let wm = ctx.current_watermark();
        let pane_start = ts.div_euclid(pane) * pane;
        // The last window holding `ts` starts at the last slide boundary at or before it (one
        // division per record for tumbling windows).
        let last_start = if slide == pane {
            pane_start
        } else {
            ts.div_euclid(slide) * slide
        };
        if last_start + size - 1 + self.lateness <= wm {
            out.push(WindowOutput::Late(record));
            return Ok(());
        }
        let new_pane = self.add_to_pane(ctx, pane_start, &record)?;
        if let Some(cache) = &mut self.stacks {
            if let Some(s) = cache.keys.get_mut(ctx.key()) {
                if pane_start < s.back_end {
                    // A pane the stacks merged changed (a record behind the watermark).
                    cache.keys.remove(ctx.key());
                } else {
                    let i = s.pending.partition_point(|(p, _)| *p < pane_start);
                    if s.pending.get(i).is_none_or(|(p, _)| *p != pane_start) {
                        s.pending.insert(i, (pane_start, self.agg.create()));
                    }
                    self.agg.add(&mut s.pending[i].1, &record);
                }
            }
        }
        // Windows holding `ts` that already fired (within the lateness) fire again, updated;
        // without a lateness none can (a sliding window would otherwise look at size/slide
        // windows per record).
        if self.lateness > 0 {
            let mut start = last_start;
            while start + size > ts {
                let end = start + size;
                if end - 1 <= wm && end - 1 + self.lateness > wm {
                    self.fire_aligned(ctx, (start, end), end, out)?;
                }
                start -= slide;
            }
        }
        if !new_pane {
            // The record that created the pane armed its timers: the first of its windows still
            // to fire (each firing arms the next window's while panes remain) and its cleanup.
            return Ok(());
        }
        // The earliest window holding `ts` that has not fired: the first slide boundary after
        // both `ts - size` and `wm + 1 - size` (a sliding window's record would otherwise step
        // back through size/slide windows).
        let first_open = ts.max(wm.saturating_add(1)).saturating_sub(size).div_euclid(slide) * slide + slide;
        let first_open = first_open.min(last_start);
        if first_open + size - 1 > wm {
            ctx.register_event_time_timer(first_open + size - 1)?;
        }
        if self.lateness > 0 {
            ctx.register_event_time_timer(last_start + size - 1 + self.lateness)?;
        }
        Ok(())
    }

    /// Folds `record` into its pane; whether the pane is new.
    fn add_to_pane(&self, ctx: &mut KeyedContext<'_, K>, pane_start: Timestamp, record: &A::In) -> Result<bool> {
        let panes = self.panes.as_ref().expect("opened");
        let existed = panes.update_with(ctx, pane_start, || self.agg.create(), |acc| self.agg.add(acc, record))?;
        Ok(!existed)
    }

    fn on_timer_aligned(
        &mut self,
        ts: Timestamp,
        (size, slide, pane): (i64, i64, i64),
        ctx: &mut KeyedContext<'_, K>,
        out: &mut Vec<WindowOutput<W::Out, A::In>>,
    ) -> Result<()> {
        let end = ts + 1;
        // A window ends here when its start is on a slide boundary (size need not be a multiple
        // of the slide).
        if (end - size).rem_euclid(slide) == 0 {
            let start = end - size;
            let next_start = match self.fire_stacked(ctx, (start, end), slide, out)? {
                // Panes from `end` on armed their own windows' timers when they were created.
                Some(next) => next.then_some(start + slide),
                // The next window with data: the first after this one that holds the first
                // pane after this window's start (skipping empty slides, however many).
                None => self
                    .fire_aligned(ctx, (start, end), start + slide, out)?
                    .map(|p| (start + slide).max((p - size).div_euclid(slide) * slide + slide)),
            };
            if let Some(next_start) = next_start {
                ctx.register_event_time_timer(next_start + size - 1)?;
            }
        }
        // The slide of panes whose last window ended `lateness` ago goes: every pane's group
        // gets this timer (its last window's, or its cleanup timer with a lateness).
        let group = end - self.lateness - size;
        if group.rem_euclid(slide) == 0 {
            let panes = self.panes.as_ref().expect("opened");
            let mut p = group;
            while p < group + slide {
                panes.remove(ctx, &p)?;
                p += pane;
            }
        }
        Ok(())
    }

    fn process_session(
        &self,
        record: A::In,
        ts: Timestamp,
        gap: i64,
        ctx: &mut KeyedContext<'_, K>,
        out: &mut Vec<WindowOutput<W::Out, A::In>>,
    ) -> Result<()> {
        let wm = ctx.current_watermark();
        let state = self.sessions.as_ref().expect("opened");
        let mut sessions = state.get(ctx)?.unwrap_or_default();
        let (mut start, mut end) = (ts, ts.saturating_add(gap));
        let mut acc = self.agg.create();
        self.agg.add(&mut acc, &record);
        // Merge every session the new one overlaps (it may bridge several).
        let mut kept = Vec::with_capacity(sessions.len());
        let mut absorbed_ends = Vec::new();
        for s in sessions.drain(..) {
            if s.start < end && start < s.end {
                start = start.min(s.start);
                end = end.max(s.end);
                let mut merged = s.acc;
                self.agg.merge(&mut merged, &acc);
                acc = merged;
                absorbed_ends.push(s.end);
            } else {
                kept.push(s);
            }
        }
        if end - 1 + self.lateness <= wm {
            // Its merged window closed for good: the record is late; state stays as it was.
            out.push(WindowOutput::Late(record));
            return Ok(());
        }
        // The absorbed sessions' timers go, unless a remaining session has one at that time.
        let timers_of = |e: Timestamp| [e - 1, e - 1 + self.lateness];
        for e in absorbed_ends.into_iter().filter(|e| *e != end) {
            for t in timers_of(e) {
                let needed = kept
                    .iter()
                    .map(|s| s.end)
                    .chain([end])
                    .any(|k| timers_of(k).contains(&t));
                if !needed {
                    ctx.delete_event_time_timer(t)?;
                }
            }
        }
        let session = Session { start, end, acc };
        if end - 1 <= wm {
            // Within the lateness of a closed session: fire the update now.
            self.emit(ctx, session.start, session.end, session.acc.clone(), out)?;
        } else {
            ctx.register_event_time_timer(end - 1)?;
        }
        if self.lateness > 0 {
            ctx.register_event_time_timer(end - 1 + self.lateness)?;
        }
        kept.push(session);
        kept.sort_by_key(|s| s.start);
        state.update(ctx, kept)
    }

    fn on_timer_session(
        &self,
        ts: Timestamp,
        ctx: &mut KeyedContext<'_, K>,
        out: &mut Vec<WindowOutput<W::Out, A::In>>,
    ) -> Result<()> {
        let state = self.sessions.as_ref().expect("opened");
        let Some(mut sessions) = state.get(ctx)? else {
            return Ok(());
        };
        for s in &sessions {
            // A session fires at its own end (merged ones too: an update within the lateness
            // fired at once, this is the on-time result).
            if s.end - 1 == ts {
                self.emit(ctx, s.start, s.end, s.acc.clone(), out)?;
            }
        }
        sessions.retain(|s| s.end - 1 + self.lateness > ts);
        if sessions.is_empty() {
            state.clear(ctx)
        } else {
            state.update(ctx, sessions)
        }
    }
}

impl<K: Key, A: AggregateFunction, W: ProcessWindowFunction<K, A::Out>> KeyedProcessFunction
    for WindowFunction<K, A, W>
{
    type Key = K;
    type In = A::In;
    type Out = WindowOutput<W::Out, A::In>;

    fn open(&mut self, state: &mut StateRegistry<'_, K>, info: &TaskInfo) -> Result<()> {
        match self.assigner {
            WindowAssigner::Session { .. } => self.sessions = Some(state.value_state("window-sessions")?),
            _ => {
                self.panes = Some(state.map_state("window-panes")?);
                let partial = self.agg.keep_partial_merges() && info.state_backend != StateBackendKind::Memory;
                if let Some((size, _, pane)) = self.aligned.filter(|&(size, slide, _)| size > slide && partial) {
                    let per_key = (size / pane) as usize * std::mem::size_of::<(Timestamp, A::Acc)>();
                    let room = self.stacks_budget / per_key.max(1);
                    self.stacks = Some(StackCache {
                        keys: FxHashMap::default(),
                        room,
                    });
                }
            }
        }
        Ok(())
    }

    fn process(&mut self, record: A::In, ctx: &mut KeyedContext<'_, K>, out: &mut Vec<Self::Out>) -> Result<()> {
        let ts = (self.timestamp)(&record);
        match (self.assigner, self.aligned) {
            (WindowAssigner::Session { gap }, _) => self.process_session(record, ts, gap, ctx, out),
            (_, Some(aligned)) => self.process_aligned(record, ts, aligned, ctx, out),
            (_, None) => Err(Error::Config(format!(
                "unsupported window assigner {:?}",
                self.assigner
            ))),
        }
    }

    fn on_timer(&mut self, ts: Timestamp, ctx: &mut KeyedContext<'_, K>, out: &mut Vec<Self::Out>) -> Result<()> {
        match self.aligned {
            Some(aligned) => self.on_timer_aligned(ts, aligned, ctx, out),
            None => self.on_timer_session(ts, ctx, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::Operator;
    use crate::transform::KeyedProcessOp;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// (key, time, id).
    type Rec = (u8, Timestamp, u32);
    /// A window result: (key, start, end, ids).
    type Fired = (u8, Timestamp, Timestamp, Vec<u32>);

    /// Keeps a window's record ids in merge order: a merge that is not commutative, so a
    /// partial merge taken out of time order shows.
    #[derive(Clone)]
    struct Ids;

    impl AggregateFunction for Ids {
        type In = Rec;
        type Acc = Vec<u32>;
        type Out = Vec<u32>;
        fn create(&self) -> Vec<u32> {
            Vec::new()
        }
        fn add(&self, acc: &mut Vec<u32>, r: &Rec) {
            acc.push(r.2);
        }
        fn merge(&self, acc: &mut Vec<u32>, other: &Vec<u32>) {
            acc.extend_from_slice(other);
        }
        fn result(&self, acc: &Vec<u32>) -> Vec<u32> {
            acc.clone()
        }
    }

    /// Every output of a sliding window operator fed `steps` (a batch, then a watermark) and
    /// then the end of time, sorted: `(key, start, end, ids)` results, then late records.
    fn outputs(
        backend: StateBackendKind,
        budget: usize,
        (size, slide, lateness): (u64, u64, u64),
        steps: &[(Vec<Rec>, Timestamp)],
    ) -> (Vec<Fired>, Vec<Rec>) {
        let dir = tempfile::tempdir().unwrap();
        let assigner = WindowAssigner::sliding(Duration::from_millis(size), Duration::from_millis(slide)).unwrap();
        let mut f = WindowFunction::new(
            assigner,
            Ids,
            ToWindowResult,
            Arc::new(|r: &Rec| r.1),
            Duration::from_millis(lateness),
        );
        f.stacks_budget = budget;
        let mut op = KeyedProcessOp::new(f, Arc::new(|r: &Rec| r.0));
        let info = TaskInfo {
            job_id: "j".into(),
            name: "windows".into(),
            uid: "windows".into(),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
            attempt: 0,
            state_backend: backend,
            local_dir: dir.path().join("windows"),
            rocksdb: Default::default(),
            finish_hooks: Default::default(),
        };
        op.open(&info, None).unwrap();
        let mut out = Vec::new();
        let advance = |op: &mut KeyedProcessOp<_>, wm: Timestamp, out: &mut Vec<_>| {
            op.watermark(wm, out).unwrap();
            while op.watermark_pending() {
                op.watermark(wm, out).unwrap();
            }
        };
        for (batch, wm) in steps {
            op.process(batch.clone(), &mut out).unwrap();
            advance(&mut op, *wm, &mut out);
        }
        advance(&mut op, Timestamp::MAX, &mut out);
        let (mut results, mut late) = (Vec::new(), Vec::new());
        for o in out {
            match o {
                WindowOutput::Result(r) => results.push((r.key, r.start, r.end, r.value)),
                WindowOutput::Late(r) => late.push(r),
            }
        }
        results.sort();
        late.sort();
        (results, late)
    }

    fn steps() -> impl Strategy<Value = Vec<(Vec<Rec>, Timestamp)>> {
        // Times wander up with the step; records reach up to 12 ms behind the watermark, so
        // some change panes the stacks already merged and some are late for good.
        // The watermark mostly creeps, sometimes jumps past several windows (keys then skip
        // windows with no data).
        let step = prop_oneof![4 => 0i64..6, 1 => 6i64..40];
        prop::collection::vec((prop::collection::vec((0u8..4, -12i64..8), 0..12), step), 1..40).prop_map(|raw| {
            let (mut wm, mut id) = (0, 0);
            raw.into_iter()
                .map(|(records, step)| {
                    let batch = records
                        .into_iter()
                        .map(|(k, dt)| {
                            id += 1;
                            (k, (wm + dt).max(0), id)
                        })
                        .collect();
                    wm += step;
                    (batch, wm)
                })
                .collect()
        })
    }

    /// The sliding windows (no allowed lateness) computed directly from `steps`: a record is late
    /// when the last window holding it has fired; a window fires once, at the first watermark
    /// at or past its end, with the records that came before that watermark, in pane order and
    /// within a pane in arrival order.
    fn direct_outputs((size, slide): (i64, i64), steps: &[(Vec<Rec>, Timestamp)]) -> (Vec<Fired>, Vec<Rec>) {
        let pane = gcd(size, slide);
        // (record, the step it came in).
        let mut accepted: Vec<(Rec, usize)> = Vec::new();
        let mut late = Vec::new();
        let mut wm = Timestamp::MIN;
        for (i, (batch, next_wm)) in steps.iter().enumerate() {
            for r in batch {
                let last_start = r.1.div_euclid(slide) * slide;
                if last_start + size - 1 <= wm {
                    late.push(*r);
                } else {
                    accepted.push((*r, i));
                }
            }
            wm = wm.max(*next_wm);
        }
        let fired_at = |end: Timestamp| steps.iter().position(|(_, w)| *w >= end - 1).unwrap_or(steps.len());
        let mut windows: Vec<(u8, Timestamp)> = accepted
            .iter()
            .flat_map(|((k, ts, _), _)| {
                let last_start = ts.div_euclid(slide) * slide;
                (0..)
                    .map(move |n| last_start - n * slide)
                    .take_while(move |s| s + size > *ts)
                    .map(move |s| (*k, s))
            })
            .collect();
        windows.sort();
        windows.dedup();
        let mut results = Vec::new();
        for (k, start) in windows {
            let end = start + size;
            let at = fired_at(end);
            let mut held: Vec<&Rec> = (accepted.iter())
                .filter(|((rk, ts, _), i)| *rk == k && (start..end).contains(ts) && *i <= at)
                .map(|(r, _)| r)
                .collect();
            held.sort_by_key(|(_, ts, id)| (ts.div_euclid(pane), *id));
            if !held.is_empty() {
                results.push((k, start, end, held.iter().map(|r| r.2).collect()));
            }
        }
        results.sort();
        late.sort();
        (results, late)
    }

    /// A key with more panes than the memory backend keeps in a vector (a hash map then, whose
    /// entries are lent one at a time) fires the same windows as a direct computation.
    #[test]
    fn sliding_windows_over_hundreds_of_panes_equal_a_direct_computation() {
        // 300 panes of 1 ms per window; records of two keys arrive newest first in each batch.
        let steps: Vec<(Vec<Rec>, Timestamp)> = (0..40)
            .map(|b: i64| {
                let batch = (0..10)
                    .rev()
                    .map(|j| ((j % 2) as u8, b * 10 + j, (b * 10 + j) as u32))
                    .collect();
                (batch, b * 10)
            })
            .collect();
        let expected = direct_outputs((300, 1), &steps);
        assert!(expected.0.len() > 600);
        for backend in crate::transform::tests::backends() {
            assert_eq!(
                outputs(backend, STACKS_BUDGET, (300, 1, 0), &steps),
                expected,
                "{backend:?}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Both backends' sliding windows (panes read in time order merged as ranges, others
        /// after sorting) equal a direct computation, in merge order.
        #[test]
        fn sliding_windows_equal_a_direct_computation(
            steps in steps(),
            (size, slide) in prop_oneof![Just((6u64, 2u64)), Just((10, 3)), Just((5, 1)), Just((7, 2))],
        ) {
            let expected = direct_outputs((size as i64, slide as i64), &steps);
            for backend in crate::transform::tests::backends() {
                prop_assert_eq!(&outputs(backend, STACKS_BUDGET, (size, slide, 0), &steps), &expected, "{:?}", backend);
            }
        }

        /// Stacks of partial merges (RocksDB; with room for every key, and for one key only)
        /// give exactly the windows, in merge order, that merging every pane gives (memory).
        #[cfg(feature = "rocksdb")]
        #[test]
        fn sliding_windows_from_stacks_equal_windows_from_all_panes(
            steps in steps(),
            (size, slide) in prop_oneof![Just((6u64, 2u64)), Just((10, 3)), Just((5, 1)), Just((7, 2))],
            lateness in prop_oneof![Just(0u64), Just(4)],
        ) {
            let shape = (size, slide, lateness);
            let expected = outputs(StateBackendKind::Memory, STACKS_BUDGET, shape, &steps);
            let one_key = (size / gcd(size as i64, slide as i64) as u64) as usize
                * std::mem::size_of::<(Timestamp, Vec<u32>)>();
            for budget in [STACKS_BUDGET, one_key] {
                let rocks = StateBackendKind::RocksDb { incremental: true };
                prop_assert_eq!(&outputs(rocks, budget, shape, &steps), &expected, "budget {}", budget);
            }
        }
    }
}
