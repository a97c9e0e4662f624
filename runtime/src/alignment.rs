//! Barrier alignment as a small state machine with no I/O.
//!
//! A task with several input channels must see barrier `n` on every open channel before it
//! snapshots: after barrier `n` arrives on channel `i`, channel `i` is not read again until the
//! alignment ends. The task's input loop asks [`BarrierAligner::is_blocked`] which channels to
//! read and feeds it what arrives; everything else (buffering) is done by the bounded channels
//! themselves, whose senders simply wait.

use crate::checkpoint::{CheckpointBarrier, CheckpointId};

/// What the task must do after feeding the aligner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlignOutcome {
    /// Keep reading the channels that are not blocked.
    Blocked,
    /// The barrier has arrived on every open channel: snapshot, then forward it.
    Aligned(CheckpointBarrier),
    /// A barrier of a checkpoint that is already done, cancelled or superseded: ignore it.
    Obsolete(CheckpointId),
    /// A newer barrier arrived while aligning an older checkpoint: the older one is abandoned
    /// (decline it) and alignment continues for the newer one with the given outcome.
    Subsumed {
        /// The checkpoint that will never complete at this task.
        abandoned: CheckpointId,
        /// Where the newer alignment stands: `Blocked` or `Aligned`.
        then: Box<AlignOutcome>,
    },
    /// The alignment of this checkpoint was cancelled: all channels are readable again.
    Cancelled(CheckpointId),
    /// Nothing to do (e.g. a channel ended while no alignment was in progress).
    Idle,
    /// Every channel has ended: the task's input is exhausted.
    AllEnded,
}

/// Tracks one alignment at a time across `n` input channels.
#[derive(Debug, Clone)]
pub struct BarrierAligner {
    blocked: Vec<bool>,
    ended: Vec<bool>,
    current: Option<CheckpointBarrier>,
    /// Highest checkpoint id this task has started, finished or cancelled.
    latest: Option<CheckpointId>,
}

impl BarrierAligner {
    /// An aligner for `channels` input channels, all open.
    pub fn new(channels: usize) -> Self {
        Self {
            blocked: vec![false; channels],
            ended: vec![false; channels],
            current: None,
            latest: None,
        }
    }

    /// Whether the task must not read channel `ch` now.
    pub fn is_blocked(&self, ch: usize) -> bool {
        self.blocked[ch]
    }

    /// Whether channel `ch` has delivered its end of input.
    pub fn is_ended(&self, ch: usize) -> bool {
        self.ended[ch]
    }

    /// The checkpoint being aligned, if any.
    pub fn current(&self) -> Option<CheckpointId> {
        self.current.map(|b| b.id)
    }

    /// Number of input channels.
    pub fn channels(&self) -> usize {
        self.blocked.len()
    }

    /// Feeds a barrier that arrived on channel `ch`.
    pub fn on_barrier(&mut self, ch: usize, barrier: CheckpointBarrier) -> AlignOutcome {
        match self.current {
            Some(cur) if barrier.id == cur.id => {
                self.blocked[ch] = true;
                self.check_aligned()
            }
            Some(cur) if barrier.id > cur.id => {
                self.unblock_all();
                self.current = None;
                let then = self.start(ch, barrier);
                AlignOutcome::Subsumed {
                    abandoned: cur.id,
                    then: Box::new(then),
                }
            }
            Some(_) => AlignOutcome::Obsolete(barrier.id),
            _ if self.latest.is_some_and(|l| barrier.id <= l) => AlignOutcome::Obsolete(barrier.id),
            None => self.start(ch, barrier),
        }
    }

    /// Channel `ch` delivered its end of input: it no longer takes part in alignments.
    pub fn on_end_of_input(&mut self, ch: usize) -> AlignOutcome {
        self.ended[ch] = true;
        self.blocked[ch] = false;
        if self.ended.iter().all(|e| *e) {
            // With every channel ended, an alignment in progress can still complete: all
            // barriers that will ever come have come.
            if let Some(b) = self.current.take() {
                self.unblock_all();
                return AlignOutcome::Aligned(b);
            }
            return AlignOutcome::AllEnded;
        }
        if self.current.is_some() {
            self.check_aligned()
        } else {
            AlignOutcome::Idle
        }
    }

    /// The checkpoint `id` was aborted: stop aligning it, and treat its barriers as obsolete.
    pub fn on_cancel(&mut self, id: CheckpointId) -> AlignOutcome {
        if self.current.is_some_and(|b| b.id == id) {
            self.current = None;
            self.unblock_all();
            return AlignOutcome::Cancelled(id);
        }
        if self.latest.is_none_or(|l| id > l) {
            // Cancelling a newer checkpoint abandons an older alignment too (as Flink does).
            if self.current.take().is_some() {
                self.unblock_all();
            }
            self.latest = Some(id);
            return AlignOutcome::Cancelled(id);
        }
        AlignOutcome::Obsolete(id)
    }

    /// Whether all channels have ended.
    pub fn all_ended(&self) -> bool {
        self.ended.iter().all(|e| *e)
    }

    fn start(&mut self, ch: usize, barrier: CheckpointBarrier) -> AlignOutcome {
        self.current = Some(barrier);
        self.latest = Some(barrier.id);
        self.blocked[ch] = true;
        self.check_aligned()
    }

    fn check_aligned(&mut self) -> AlignOutcome {
        let done = self.blocked.iter().zip(&self.ended).all(|(b, e)| *b || *e);
        if done {
            let b = self.current.take().expect("aligning without a barrier");
            self.unblock_all();
            AlignOutcome::Aligned(b)
        } else {
            AlignOutcome::Blocked
        }
    }

    fn unblock_all(&mut self) {
        self.blocked.iter_mut().for_each(|b| *b = false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointKind;

    fn b(id: u64) -> CheckpointBarrier {
        CheckpointBarrier {
            id: CheckpointId(id),
            timestamp_ms: 0,
            kind: CheckpointKind::Checkpoint,
        }
    }

    #[test]
    fn single_channel_aligns_at_once() {
        let mut a = BarrierAligner::new(1);
        assert_eq!(a.on_barrier(0, b(1)), AlignOutcome::Aligned(b(1)));
        assert!(!a.is_blocked(0));
    }

    #[test]
    fn any_channel_order_aligns_after_the_last() {
        for order in [[0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]] {
            let mut a = BarrierAligner::new(3);
            assert_eq!(a.on_barrier(order[0], b(7)), AlignOutcome::Blocked);
            assert!(a.is_blocked(order[0]));
            assert!(!a.is_blocked(order[1]));
            assert_eq!(a.on_barrier(order[1], b(7)), AlignOutcome::Blocked);
            assert!(a.is_blocked(order[1]));
            assert_eq!(a.on_barrier(order[2], b(7)), AlignOutcome::Aligned(b(7)));
            assert!((0..3).all(|c| !a.is_blocked(c)));
            assert_eq!(a.current(), None);
        }
    }

    #[test]
    fn end_of_input_on_an_open_channel_completes_alignment() {
        let mut a = BarrierAligner::new(3);
        assert_eq!(a.on_barrier(0, b(1)), AlignOutcome::Blocked);
        assert_eq!(a.on_barrier(1, b(1)), AlignOutcome::Blocked);
        assert_eq!(a.on_end_of_input(2), AlignOutcome::Aligned(b(1)));
        // The ended channel takes no part in the next alignment.
        assert_eq!(a.on_barrier(1, b(2)), AlignOutcome::Blocked);
        assert_eq!(a.on_barrier(0, b(2)), AlignOutcome::Aligned(b(2)));
    }

    #[test]
    fn end_of_input_while_others_blocked_keeps_them_blocked() {
        let mut a = BarrierAligner::new(3);
        assert_eq!(a.on_barrier(0, b(1)), AlignOutcome::Blocked);
        assert_eq!(a.on_end_of_input(1), AlignOutcome::Blocked);
        assert!(a.is_blocked(0));
        assert_eq!(a.on_barrier(2, b(1)), AlignOutcome::Aligned(b(1)));
        assert_eq!(a.on_end_of_input(0), AlignOutcome::Idle);
        assert_eq!(a.on_end_of_input(2), AlignOutcome::AllEnded);
        assert!(a.all_ended());
    }

    #[test]
    fn obsolete_barrier_is_ignored_and_blocks_nothing() {
        let mut a = BarrierAligner::new(2);
        a.on_barrier(0, b(5));
        assert_eq!(a.on_barrier(1, b(5)), AlignOutcome::Aligned(b(5)));
        assert_eq!(a.on_barrier(0, b(4)), AlignOutcome::Obsolete(CheckpointId(4)));
        assert_eq!(a.on_barrier(0, b(5)), AlignOutcome::Obsolete(CheckpointId(5)));
        assert!(!a.is_blocked(0));
        // An older barrier during a newer alignment is obsolete as well.
        assert_eq!(a.on_barrier(0, b(6)), AlignOutcome::Blocked);
        assert_eq!(a.on_barrier(1, b(3)), AlignOutcome::Obsolete(CheckpointId(3)));
        assert!(!a.is_blocked(1));
    }

    #[test]
    fn newer_barrier_subsumes_the_alignment_in_progress() {
        let mut a = BarrierAligner::new(3);
        assert_eq!(a.on_barrier(0, b(1)), AlignOutcome::Blocked);
        assert_eq!(a.on_barrier(1, b(1)), AlignOutcome::Blocked);
        let out = a.on_barrier(2, b(2));
        assert_eq!(
            out,
            AlignOutcome::Subsumed {
                abandoned: CheckpointId(1),
                then: Box::new(AlignOutcome::Blocked)
            }
        );
        // Only the channel that delivered the newer barrier stays blocked.
        assert!(!a.is_blocked(0) && !a.is_blocked(1) && a.is_blocked(2));
        // Late barriers of the abandoned checkpoint are obsolete.
        assert_eq!(a.on_barrier(0, b(1)), AlignOutcome::Obsolete(CheckpointId(1)));
        assert_eq!(a.on_barrier(0, b(2)), AlignOutcome::Blocked);
        assert_eq!(a.on_barrier(1, b(2)), AlignOutcome::Aligned(b(2)));
    }

    #[test]
    fn cancellation_unblocks_and_makes_later_barriers_obsolete() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_barrier(0, b(3)), AlignOutcome::Blocked);
        assert_eq!(a.on_cancel(CheckpointId(3)), AlignOutcome::Cancelled(CheckpointId(3)));
        assert!(!a.is_blocked(0));
        assert_eq!(a.on_barrier(1, b(3)), AlignOutcome::Obsolete(CheckpointId(3)));
        // Cancelling a checkpoint before any of its barriers arrived.
        assert_eq!(a.on_cancel(CheckpointId(4)), AlignOutcome::Cancelled(CheckpointId(4)));
        assert_eq!(a.on_barrier(0, b(4)), AlignOutcome::Obsolete(CheckpointId(4)));
        assert_eq!(a.on_barrier(1, b(4)), AlignOutcome::Obsolete(CheckpointId(4)));
        // Cancelling a newer checkpoint while aligning an older one abandons both.
        assert_eq!(a.on_barrier(0, b(6)), AlignOutcome::Blocked);
        assert_eq!(a.on_cancel(CheckpointId(7)), AlignOutcome::Cancelled(CheckpointId(7)));
        assert!(!a.is_blocked(0));
        assert_eq!(a.on_barrier(1, b(7)), AlignOutcome::Obsolete(CheckpointId(7)));
        assert_eq!(a.on_barrier(1, b(6)), AlignOutcome::Obsolete(CheckpointId(6)));
        // Cancelling an old one is a no-op.
        assert_eq!(a.on_cancel(CheckpointId(2)), AlignOutcome::Obsolete(CheckpointId(2)));
        assert_eq!(a.on_barrier(0, b(8)), AlignOutcome::Blocked);
    }

    #[test]
    fn all_channels_ending_completes_a_pending_alignment() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_barrier(0, b(1)), AlignOutcome::Blocked);
        // Channel 0 is blocked so cannot end; channel 1 ends: alignment completes.
        assert_eq!(a.on_end_of_input(1), AlignOutcome::Aligned(b(1)));
        assert_eq!(a.on_end_of_input(0), AlignOutcome::AllEnded);
    }
}
