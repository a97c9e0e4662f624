//! Event time: where records get their timestamps and watermarks start.
//!
//! A [`WatermarkStrategy`] says how to read a record's event time and how far out of order
//! records may arrive. `DataStream::assign_timestamps_and_watermarks` chains a generator behind
//! the source that emits, in-band after each batch, the watermark `max timestamp seen - bound - 1`
//! (Flink's bounded out-of-orderness), and `Timestamp::MAX` when its input ends so that every
//! pending event-time timer fires. Its watermark is operator state (union): a restored or
//! rescaled generator starts from the smallest watermark any old subtask had reached, so a
//! restore never moves event time backwards past what a checkpointed result depended on.

use crate::checkpoint::CheckpointId;
use crate::element::Timestamp;
use crate::error::Result;
use crate::operator::{Data, Operator, OperatorSnapshot, RestoredState, TaskInfo};
use crate::snapshot::{list_state, read_list, OperatorState, Redistribution};
use std::sync::Arc;
use std::time::Duration;

/// Reads a record's event time (milliseconds).
pub type TimestampFn<T> = Arc<dyn Fn(&T) -> Timestamp + Send + Sync>;

/// How records get timestamps and how watermarks follow them.
pub struct WatermarkStrategy<T> {
    pub(crate) timestamp: TimestampFn<T>,
    pub(crate) out_of_orderness: Duration,
    pub(crate) idleness: Option<Duration>,
    pub(crate) max_drift: Option<Duration>,
}

impl<T> Clone for WatermarkStrategy<T> {
    fn clone(&self) -> Self {
        Self {
            timestamp: self.timestamp.clone(),
            out_of_orderness: self.out_of_orderness,
            idleness: self.idleness,
            max_drift: self.max_drift,
        }
    }
}

impl<T> WatermarkStrategy<T> {
    /// Records arrive at most `bound` later than a record with a larger timestamp.
    pub fn bounded_out_of_orderness(
        bound: Duration,
        timestamp: impl Fn(&T) -> Timestamp + Send + Sync + 'static,
    ) -> Self {
        Self {
            timestamp: Arc::new(timestamp),
            out_of_orderness: bound,
            idleness: None,
            max_drift: None,
        }
    }

    /// A source subtask that emits nothing for `timeout` is idle: downstream operators leave it
    /// out of their watermark until it emits again, so one quiet partition does not hold event
    /// time back for all.
    pub fn with_idleness(mut self, timeout: Duration) -> Self {
        self.idleness = Some(timeout);
        self
    }

    /// Keeps the source's subtasks within `max_drift` of each other in event time (Flink's
    /// watermark alignment): the tasks reading them leave a subtask's channel unread while its
    /// watermark is more than `max_drift` ahead of the slowest active one, so its bounded
    /// channel fills and it waits until the others catch up. Without it, a subtask that gets
    /// more CPU runs minutes of event time ahead, and every window downstream holds state for
    /// all the windows in between. An idle subtask (see [`Self::with_idleness`]) or one that
    /// ended holds nobody back. A subtask that emits nothing and never goes idle holds back the
    /// others' records, not only event time: give such sources an idleness timeout.
    pub fn with_alignment(mut self, max_drift: Duration) -> Self {
        self.max_drift = Some(max_drift);
        self
    }

    /// Timestamps never decrease.
    pub fn monotonous(timestamp: impl Fn(&T) -> Timestamp + Send + Sync + 'static) -> Self {
        Self::bounded_out_of_orderness(Duration::ZERO, timestamp)
    }

    /// The record's event time.
    pub fn timestamp_of(&self, record: &T) -> Timestamp {
        (self.timestamp)(record)
    }
}

const WATERMARK_STATE: &str = "watermark";

/// A watermark as union operator state: every restored subtask sees every old subtask's.
pub(crate) fn watermark_state(watermark: Timestamp) -> Result<OperatorState> {
    list_state(WATERMARK_STATE, Redistribution::Union, &[watermark])
}

/// The smallest watermark of the old subtasks, if any was restored: no record that was late
/// for one of them counts as on time after the restore.
pub(crate) fn restored_watermark(restored: Option<&RestoredState>) -> Result<Option<Timestamp>> {
    let Some(r) = restored else { return Ok(None) };
    let watermarks = read_list::<Timestamp>(&r.operator, WATERMARK_STATE)?;
    Ok(watermarks.and_then(|w| w.into_iter().min()))
}

/// The operator `assign_timestamps_and_watermarks` adds: records pass through unchanged.
pub(crate) struct WatermarkGenerator<T> {
    strategy: WatermarkStrategy<T>,
    bound: i64,
    max_timestamp: Timestamp,
    emitted: Timestamp,
    pending: Option<Timestamp>,
    /// The idleness timeout in ms, if any.
    idle_after: Option<i64>,
    /// The processing time at which the output goes idle unless a record passes first: the
    /// task wakes up for it like for a timer, whether or not its input is quiet. `None` without
    /// an idleness timeout, and once idle until the next record.
    idle_at: Option<Timestamp>,
    /// Whether downstream is yet to hear that the output went idle.
    went_idle: bool,
}

impl<T> WatermarkGenerator<T> {
    pub fn new(strategy: WatermarkStrategy<T>) -> Self {
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self {
            bound: millis(strategy.out_of_orderness),
            idle_after: strategy.idleness.map(millis),
            strategy,
            max_timestamp: Timestamp::MIN,
            emitted: Timestamp::MIN,
            pending: None,
            idle_at: None,
            went_idle: false,
        }
    }

    /// Not idle (again): idle `timeout` from now unless a record passes before.
    fn active(&mut self) {
        if let Some(timeout) = self.idle_after {
            self.idle_at = Some(crate::state::processing_time_now().saturating_add(timeout));
        }
    }

    fn advance_to(&mut self, w: Timestamp) {
        if w > self.emitted {
            self.emitted = w;
            self.pending = Some(w);
        }
    }
}

impl<T: Data> Operator for WatermarkGenerator<T> {
    type In = T;
    type Out = T;

    fn open(&mut self, _: &TaskInfo, restored: Option<RestoredState>) -> Result<()> {
        let restored_min = restored_watermark(restored.as_ref())?;
        if let Some(w) = restored_min.filter(|w| *w > Timestamp::MIN) {
            self.max_timestamp = w.saturating_add(self.bound).saturating_add(1);
            self.advance_to(w);
        }
        // A subtask that never emits goes idle too.
        self.active();
        Ok(())
    }

    fn process(&mut self, batch: Vec<T>, out: &mut Vec<T>) -> Result<()> {
        self.active();
        for r in &batch {
            self.max_timestamp = self.max_timestamp.max(self.strategy.timestamp_of(r));
        }
        crate::task::output::append(out, batch);
        if self.max_timestamp > Timestamp::MIN {
            let w = self.max_timestamp.saturating_sub(self.bound).saturating_sub(1);
            self.advance_to(w);
        }
        Ok(())
    }

    fn next_processing_time(&self) -> Option<Timestamp> {
        self.idle_at
    }

    fn on_processing_time(&mut self, now: Timestamp, _: &mut Vec<T>) -> Result<()> {
        if self.idle_at.is_some_and(|at| at <= now) {
            self.idle_at = None;
            self.went_idle = true;
        }
        Ok(())
    }

    fn output_idle(&mut self) -> bool {
        std::mem::take(&mut self.went_idle)
    }

    fn forwards_watermarks(&self) -> bool {
        // This operator decides event time for everything downstream of it.
        false
    }

    fn take_watermark(&mut self) -> Option<Timestamp> {
        self.pending.take()
    }

    fn snapshot(&mut self, _: CheckpointId) -> Result<OperatorSnapshot> {
        // Even at its start (MIN): a restore takes the smallest of all, so a generator that had
        // not advanced yet keeps the restored event time where it was.
        Ok(OperatorSnapshot {
            keyed: None,
            operator: watermark_state(self.emitted)?,
        })
    }

    fn end_of_input(&mut self, _: &mut Vec<T>) -> Result<()> {
        // A bounded input is complete: event time reaches its end and every window fires.
        self.advance_to(Timestamp::MAX);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TaskInfo {
        TaskInfo {
            job_id: "j".into(),
            name: "w".into(),
            uid: "w".into(),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 128,
            attempt: 0,
            state_backend: crate::config::StateBackendKind::Memory,
            local_dir: std::env::temp_dir(),
            rocksdb: Default::default(),
            finish_hooks: Default::default(),
        }
    }

    #[test]
    fn watermark_trails_the_largest_timestamp_by_the_bound_and_never_goes_back() {
        let mut g = WatermarkGenerator::new(WatermarkStrategy::bounded_out_of_orderness(
            Duration::from_millis(10),
            |t: &i64| *t,
        ));
        g.open(&info(), None).unwrap();
        let mut out = Vec::new();
        g.process(vec![100, 90], &mut out).unwrap();
        assert_eq!(out, vec![100, 90], "records pass through");
        assert_eq!(g.take_watermark(), Some(89));
        assert_eq!(g.take_watermark(), None, "emitted once");
        g.process(vec![95], &mut out).unwrap();
        assert_eq!(g.take_watermark(), None, "an older record does not move it");
        g.process(vec![150], &mut out).unwrap();
        assert_eq!(g.take_watermark(), Some(139));
        g.end_of_input(&mut out).unwrap();
        assert_eq!(g.take_watermark(), Some(Timestamp::MAX));
    }

    #[test]
    fn idleness_is_a_processing_time_wake_up_until_a_record_passes() {
        let strategy = WatermarkStrategy::monotonous(|t: &i64| *t);
        let mut g = WatermarkGenerator::new(strategy.clone());
        g.open(&info(), None).unwrap();
        assert_eq!(g.next_processing_time(), None, "no wake-up without idleness");

        let mut g = WatermarkGenerator::new(strategy.with_idleness(Duration::from_millis(50)));
        let opened = crate::state::processing_time_now();
        g.open(&info(), None).unwrap();
        // Armed at open: a subtask that never emits goes idle too.
        let at = g.next_processing_time().expect("armed");
        assert!(at >= opened + 50, "{at} {opened}");
        let mut out = Vec::new();
        g.on_processing_time(at - 1, &mut out).unwrap();
        assert!(!g.output_idle(), "not before the timeout");
        g.on_processing_time(at, &mut out).unwrap();
        assert!(g.output_idle());
        assert!(!g.output_idle(), "declared once");
        assert_eq!(g.next_processing_time(), None, "no wake-up while idle");
        g.process(vec![1], &mut out).unwrap();
        assert!(g.next_processing_time().is_some_and(|t| t >= at), "a record re-arms it");
    }

    #[test]
    fn a_restored_generator_starts_from_the_smallest_old_watermark() {
        let mut old = Vec::new();
        for max in [200i64, 120] {
            let mut g = WatermarkGenerator::new(WatermarkStrategy::monotonous(|t: &i64| *t));
            g.open(&info(), None).unwrap();
            g.process(vec![max], &mut Vec::new()).unwrap();
            old.push(g.snapshot(CheckpointId(1)).unwrap().operator);
        }
        // Union redistribution hands every new subtask every entry.
        let mut state = old[0].clone();
        let all = old.iter().flat_map(|o| o[WATERMARK_STATE].entries.clone()).collect();
        state.get_mut(WATERMARK_STATE).unwrap().entries = all;
        let mut g = WatermarkGenerator::new(WatermarkStrategy::monotonous(|t: &i64| *t));
        g.open(
            &info(),
            Some(RestoredState {
                keyed: Default::default(),
                operator: state,
            }),
        )
        .unwrap();
        assert_eq!(g.take_watermark(), Some(119));
        g.process(vec![100], &mut Vec::new()).unwrap();
        assert_eq!(g.take_watermark(), None);
        g.process(vec![130], &mut Vec::new()).unwrap();
        assert_eq!(g.take_watermark(), Some(129));
    }
}
