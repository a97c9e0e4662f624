//! A task runs a chain of operators in one thread: each link calls the next directly, and the
//! last link writes to the output channels. Barriers pass down the chain after each link has
//! snapshotted, so the order snapshot -> forward -> upload holds by construction.

use crate::checkpoint::{CheckpointBarrier, CheckpointId};
use crate::element::Timestamp;
use crate::error::Result;
use crate::operator::{Data, Operator, OperatorSnapshot};

/// One link's snapshot, tagged with its operator uid.
pub(crate) struct PendingSnapshot {
    pub uid: String,
    pub snapshot: OperatorSnapshot,
    /// How long taking it held the task thread (the checkpoint's synchronous part; forwarding
    /// the barrier, which waits on downstream like any record, is not counted).
    pub sync: std::time::Duration,
}

/// The input side of a chain link (or of the output writer at the chain's end).
pub(crate) trait ChainInput<T>: Send {
    fn process(&mut self, batch: Vec<T>) -> Result<()>;
    fn watermark(&mut self, watermark: Timestamp) -> Result<()>;
    /// Snapshot this link, then pass the barrier on.
    fn barrier(&mut self, barrier: CheckpointBarrier, snapshots: &mut Vec<PendingSnapshot>) -> Result<()>;
    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()>;
    fn end_of_input(&mut self) -> Result<()>;
    /// Push partially filled output batches downstream (the input went idle).
    fn flush(&mut self) -> Result<()>;
    /// The output emits nothing for now: downstream leaves it out of the watermark.
    fn idle(&mut self) -> Result<()>;
    /// The earliest processing time at which a link has work (see
    /// `Operator::next_processing_time`).
    fn next_processing_time(&self) -> Option<Timestamp> {
        None
    }
    /// The wall clock reached `now`: every link runs one round of what is due.
    fn processing_time(&mut self, _now: Timestamp) -> Result<()> {
        Ok(())
    }
}

/// Boxed chain input, the shape every link holds its successor in.
pub(crate) type Chain<T> = Box<dyn ChainInput<T>>;

/// An operator and the rest of the chain.
pub(crate) struct OperatorLink<O: Operator> {
    pub op: O,
    pub uid: String,
    pub out: Vec<O::Out>,
    pub next: Chain<O::Out>,
}

impl<O: Operator> OperatorLink<O> {
    fn push_out(&mut self) -> Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let capacity = self.out.capacity();
        let batch = std::mem::replace(&mut self.out, Vec::with_capacity(capacity));
        self.next.process(batch)
    }

    /// Passes on a watermark the operator generated.
    fn forward_generated(&mut self) -> Result<()> {
        match self.op.take_watermark() {
            Some(w) => self.next.watermark(w),
            None => Ok(()),
        }
    }
}

impl<O: Operator> ChainInput<O::In> for OperatorLink<O> {
    fn process(&mut self, batch: Vec<O::In>) -> Result<()> {
        // A watermark set while opening (restored) goes out before any record.
        self.forward_generated()?;
        self.op.process(batch, &mut self.out)?;
        self.push_out()?;
        self.forward_generated()
    }

    fn watermark(&mut self, watermark: Timestamp) -> Result<()> {
        self.op.watermark(watermark, &mut self.out)?;
        self.push_out()?;
        while self.op.watermark_pending() {
            self.op.watermark(watermark, &mut self.out)?;
            self.push_out()?;
        }
        if self.op.forwards_watermarks() {
            self.next.watermark(watermark)
        } else {
            self.forward_generated()
        }
    }

    fn barrier(&mut self, barrier: CheckpointBarrier, snapshots: &mut Vec<PendingSnapshot>) -> Result<()> {
        let started = std::time::Instant::now();
        let snapshot = self.op.snapshot(barrier.id)?;
        if !snapshot.is_empty() {
            snapshots.push(PendingSnapshot {
                uid: self.uid.clone(),
                snapshot,
                sync: started.elapsed(),
            });
        }
        self.next.barrier(barrier, snapshots)
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()> {
        self.op.checkpoint_complete(id)?;
        self.next.checkpoint_complete(id)
    }

    fn end_of_input(&mut self) -> Result<()> {
        self.op.end_of_input(&mut self.out)?;
        self.push_out()?;
        self.forward_generated()?;
        self.next.end_of_input()
    }

    fn flush(&mut self) -> Result<()> {
        self.next.flush()
    }

    fn idle(&mut self) -> Result<()> {
        self.next.idle()
    }

    fn next_processing_time(&self) -> Option<Timestamp> {
        match (self.op.next_processing_time(), self.next.next_processing_time()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn processing_time(&mut self, now: Timestamp) -> Result<()> {
        // One round: the driver calls again while timers are due, reading input in between,
        // so a timer that re-arms itself at `now` cannot starve the input.
        if self.op.next_processing_time().is_some_and(|t| t <= now) {
            self.op.on_processing_time(now, &mut self.out)?;
            self.push_out()?;
            if self.op.output_idle() {
                self.next.idle()?;
            }
        }
        self.next.processing_time(now)
    }
}

/// The end of a chain whose operator emits nothing downstream (a sink), or whose output nobody
/// consumes.
pub(crate) struct Discard;

impl<T: Data> ChainInput<T> for Discard {
    fn process(&mut self, _: Vec<T>) -> Result<()> {
        Ok(())
    }
    fn watermark(&mut self, _: Timestamp) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self, _: CheckpointBarrier, _: &mut Vec<PendingSnapshot>) -> Result<()> {
        Ok(())
    }
    fn checkpoint_complete(&mut self, _: CheckpointId) -> Result<()> {
        Ok(())
    }
    fn end_of_input(&mut self) -> Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    fn idle(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A stream consumed by several downstream operators: every output gets every element.
pub(crate) struct FanOut<T> {
    pub outputs: Vec<Chain<T>>,
}

impl<T: Data> ChainInput<T> for FanOut<T> {
    fn process(&mut self, batch: Vec<T>) -> Result<()> {
        let (last, rest) = self.outputs.split_last_mut().expect("fan-out has outputs");
        for o in rest {
            o.process(batch.clone())?;
        }
        last.process(batch)
    }
    fn watermark(&mut self, w: Timestamp) -> Result<()> {
        self.outputs.iter_mut().try_for_each(|o| o.watermark(w))
    }
    fn barrier(&mut self, b: CheckpointBarrier, s: &mut Vec<PendingSnapshot>) -> Result<()> {
        self.outputs.iter_mut().try_for_each(|o| o.barrier(b, s))
    }
    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()> {
        self.outputs.iter_mut().try_for_each(|o| o.checkpoint_complete(id))
    }
    fn end_of_input(&mut self) -> Result<()> {
        self.outputs.iter_mut().try_for_each(|o| o.end_of_input())
    }
    fn flush(&mut self) -> Result<()> {
        self.outputs.iter_mut().try_for_each(|o| o.flush())
    }
    fn idle(&mut self) -> Result<()> {
        self.outputs.iter_mut().try_for_each(|o| o.idle())
    }
    fn next_processing_time(&self) -> Option<Timestamp> {
        self.outputs.iter().filter_map(|o| o.next_processing_time()).min()
    }
    fn processing_time(&mut self, now: Timestamp) -> Result<()> {
        self.outputs.iter_mut().try_for_each(|o| o.processing_time(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{WatermarkGenerator, WatermarkStrategy};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// The end of a chain: what reached it, in order.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<&'static str>>>);

    impl Seen {
        fn push(&self, what: &'static str) -> Result<()> {
            self.0.lock().unwrap().push(what);
            Ok(())
        }
        fn take(&self) -> Vec<&'static str> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    impl ChainInput<i64> for Seen {
        fn process(&mut self, _: Vec<i64>) -> Result<()> {
            self.push("records")
        }
        fn watermark(&mut self, _: Timestamp) -> Result<()> {
            self.push("watermark")
        }
        fn barrier(&mut self, _: CheckpointBarrier, _: &mut Vec<PendingSnapshot>) -> Result<()> {
            Ok(())
        }
        fn checkpoint_complete(&mut self, _: CheckpointId) -> Result<()> {
            Ok(())
        }
        fn end_of_input(&mut self) -> Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> Result<()> {
            self.push("flush")
        }
        fn idle(&mut self) -> Result<()> {
            self.push("idle")
        }
    }

    #[test]
    fn a_generator_goes_idle_at_its_processing_time_wake_up_without_a_flush() {
        // As in a task fed by channels, whose input may block with no flush to come.
        let seen = Seen::default();
        let strategy = WatermarkStrategy::monotonous(|t: &i64| *t).with_idleness(Duration::from_millis(50));
        let mut link = OperatorLink {
            op: WatermarkGenerator::new(strategy),
            uid: "w".into(),
            out: Vec::new(),
            next: Box::new(seen.clone()),
        };
        link.process(vec![1]).unwrap();
        assert_eq!(seen.take(), ["records", "watermark"]);
        let at = link.next_processing_time().expect("the idleness timeout is a wake-up");
        link.processing_time(at - 1).unwrap();
        link.flush().unwrap();
        assert_eq!(seen.take(), ["flush"], "not idle before the timeout, nor on a flush");
        link.processing_time(at).unwrap();
        assert_eq!(seen.take(), ["idle"]);
        assert_eq!(link.next_processing_time(), None, "idle until a record passes");
        link.process(vec![2]).unwrap();
        assert!(link.next_processing_time().is_some());
    }
}
