//! The input side of a task with channels: reads whichever open, unblocked channel has data,
//! feeds barriers and end-of-input markers to the [`BarrierAligner`], and combines watermarks
//! as the minimum over open channels. A blocked channel is simply not read: its bounded channel
//! fills and its sender waits, so nothing is buffered by hand. Watermark alignment works the
//! same way: a channel whose watermark is more than the allowed drift ahead of the slowest
//! active channel is not read until that one catches up (or goes idle, blocks on a barrier, or
//! ends), which makes its sender wait.

use crate::alignment::{AlignOutcome, BarrierAligner};
use crate::checkpoint::{CheckpointBarrier, CheckpointId};
use crate::element::{StreamElement, Timestamp};
use crate::error::{Error, Result};
use crate::protocol::TaskCommand;
use crossbeam_channel::{Receiver, Select, TryRecvError};
use std::collections::VecDeque;

/// What the task loop must handle next.
pub(crate) enum GateEvent<T> {
    Data(Vec<T>),
    Watermark(Timestamp),
    /// Aligned on every open channel: snapshot and forward.
    Barrier(CheckpointBarrier),
    /// This task will not take part in the checkpoint.
    Declined(CheckpointId, &'static str),
    Command(TaskCommand),
    /// No input is ready: a good moment to flush partial output batches.
    Idle,
    /// Every open channel declared itself idle: so is this task's output.
    InputsIdle,
    /// The deadline given to `next_until` passed with nothing to read (a processing-time
    /// timer is due).
    Deadline,
    /// Every channel has ended.
    End,
}

/// What a blocking wait ended with.
enum Woken<T> {
    Element(usize, StreamElement<T>),
    Command(TaskCommand),
    Deadline,
}

pub(crate) struct InputGate<T> {
    inputs: Vec<Receiver<StreamElement<T>>>,
    aligner: BarrierAligner,
    watermarks: Vec<Timestamp>,
    /// Channels that declared themselves idle and have not sent since.
    idle: Vec<bool>,
    emitted_watermark: Timestamp,
    /// Watermark alignment: how far (ms) a channel may run ahead of the slowest active one.
    max_drift: Option<Timestamp>,
    next: usize,
    dirty: bool,
    pending: VecDeque<GateEvent<T>>,
}

impl<T> InputGate<T> {
    pub fn new(inputs: Vec<Receiver<StreamElement<T>>>, max_drift: Option<Timestamp>) -> Self {
        let n = inputs.len();
        Self {
            inputs,
            aligner: BarrierAligner::new(n),
            watermarks: vec![Timestamp::MIN; n],
            idle: vec![false; n],
            emitted_watermark: Timestamp::MIN,
            max_drift,
            next: 0,
            dirty: false,
            pending: VecDeque::new(),
        }
    }

    /// The checkpoint was aborted: stop waiting for its barriers.
    pub fn cancel_alignment(&mut self, id: CheckpointId) {
        self.aligner.on_cancel(id);
    }

    fn open(&self, ch: usize) -> bool {
        !self.aligner.is_blocked(ch) && !self.aligner.is_ended(ch)
    }

    /// With alignment, the watermark above which a channel is not read: the drift above the
    /// slowest channel that is open and active. That one is always read, so reading goes on.
    fn alignment_limit(&self) -> Option<Timestamp> {
        let drift = self.max_drift?;
        (0..self.inputs.len())
            .filter(|c| self.open(*c) && !self.idle[*c])
            .map(|c| self.watermarks[c])
            .min()
            .map(|slowest| slowest.saturating_add(drift))
    }

    fn readable(&self, ch: usize, limit: Option<Timestamp>) -> bool {
        self.open(ch) && limit.is_none_or(|l| self.watermarks[ch] <= l)
    }

    fn disconnected(ch: usize) -> Error {
        Error::Disconnected(format!("upstream channel {ch} closed without end of input"))
    }

    fn try_read(&mut self) -> Result<Option<(usize, StreamElement<T>)>> {
        let n = self.inputs.len();
        let limit = self.alignment_limit();
        for k in 0..n {
            let ch = (self.next + k) % n;
            if !self.readable(ch, limit) {
                continue;
            }
            match self.inputs[ch].try_recv() {
                Ok(el) => {
                    self.next = (ch + 1) % n;
                    return Ok(Some((ch, el)));
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return Err(Self::disconnected(ch)),
            }
        }
        Ok(None)
    }

    fn block(&mut self, control: &Receiver<TaskCommand>, deadline: Option<std::time::Instant>) -> Result<Woken<T>> {
        let mut sel = Select::new();
        sel.recv(control);
        let limit = self.alignment_limit();
        let channels: Vec<usize> = (0..self.inputs.len()).filter(|c| self.readable(*c, limit)).collect();
        for ch in &channels {
            sel.recv(&self.inputs[*ch]);
        }
        let op = match deadline {
            Some(d) => match sel.select_deadline(d) {
                Ok(op) => op,
                Err(_) => return Ok(Woken::Deadline),
            },
            None => sel.select(),
        };
        let i = op.index();
        if i == 0 {
            // The coordinator dropping its end means the job is being torn down.
            return Ok(Woken::Command(op.recv(control).unwrap_or(TaskCommand::Cancel)));
        }
        let ch = channels[i - 1];
        op.recv(&self.inputs[ch])
            .map(|el| Woken::Element(ch, el))
            .map_err(|_| Self::disconnected(ch))
    }

    /// The minimum over open channels, leaving idle ones out; `None` when none is active.
    fn combined_watermark(&self) -> Option<Timestamp> {
        (0..self.inputs.len())
            .filter(|c| !self.aligner.is_ended(*c) && !self.idle[*c])
            .map(|c| self.watermarks[c])
            .min()
    }

    fn advance_watermark(&mut self) -> Option<GateEvent<T>> {
        match self.combined_watermark() {
            Some(w) if w > self.emitted_watermark => {
                self.emitted_watermark = w;
                Some(GateEvent::Watermark(w))
            }
            _ => None,
        }
    }

    /// The next thing the task must handle; blocks until there is one.
    #[cfg(test)]
    pub fn next(&mut self, control: &Receiver<TaskCommand>) -> Result<GateEvent<T>> {
        self.next_until(control, None)
    }

    /// The next thing the task must handle; blocks until there is one or `deadline` passes.
    pub fn next_until(
        &mut self,
        control: &Receiver<TaskCommand>,
        deadline: Option<std::time::Instant>,
    ) -> Result<GateEvent<T>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            if let Ok(cmd) = control.try_recv() {
                return Ok(GateEvent::Command(cmd));
            }
            let (ch, element) = match self.try_read()? {
                Some(x) => x,
                None if self.dirty => {
                    self.dirty = false;
                    return Ok(GateEvent::Idle);
                }
                None => match self.block(control, deadline)? {
                    Woken::Element(ch, el) => (ch, el),
                    Woken::Command(cmd) => return Ok(GateEvent::Command(cmd)),
                    Woken::Deadline => return Ok(GateEvent::Deadline),
                },
            };
            match element {
                StreamElement::Data(batch) => {
                    self.dirty = true;
                    self.idle[ch] = false;
                    return Ok(GateEvent::Data(batch));
                }
                StreamElement::Idle => {
                    self.idle[ch] = true;
                    if let Some(e) = self.advance_watermark() {
                        return Ok(e);
                    }
                    let open = (0..self.inputs.len()).filter(|c| !self.aligner.is_ended(*c));
                    if open.clone().count() > 0 && open.clone().all(|c| self.idle[c]) {
                        return Ok(GateEvent::InputsIdle);
                    }
                }
                StreamElement::Watermark(w) => {
                    self.idle[ch] = false;
                    self.watermarks[ch] = self.watermarks[ch].max(w);
                    if let Some(e) = self.advance_watermark() {
                        return Ok(e);
                    }
                }
                StreamElement::Barrier(b) => match self.aligner.on_barrier(ch, b) {
                    AlignOutcome::Aligned(b) => return Ok(GateEvent::Barrier(b)),
                    AlignOutcome::Subsumed { abandoned, then } => {
                        if let AlignOutcome::Aligned(b) = *then {
                            self.pending.push_back(GateEvent::Barrier(b));
                        }
                        return Ok(GateEvent::Declined(abandoned, "subsumed by a newer checkpoint"));
                    }
                    _ => {}
                },
                StreamElement::EndOfInput => {
                    let outcome = self.aligner.on_end_of_input(ch);
                    if let Some(w) = self.advance_watermark() {
                        self.pending.push_back(w);
                    }
                    match outcome {
                        AlignOutcome::Aligned(b) => {
                            self.pending.push_front(GateEvent::Barrier(b));
                            if self.aligner.all_ended() {
                                self.pending.push_back(GateEvent::End);
                            }
                        }
                        AlignOutcome::AllEnded => self.pending.push_back(GateEvent::End),
                        _ => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::Sender;

    /// The gate's next event that is not `Idle` (nothing to read).
    fn next_event(gate: &mut InputGate<u32>, control: &Receiver<TaskCommand>) -> GateEvent<u32> {
        loop {
            match gate.next(control).unwrap() {
                GateEvent::Idle => continue,
                e => return e,
            }
        }
    }

    /// A gate over two channels (aligned within `drift` ms, if any), with their senders.
    fn two_channels(
        drift: Option<Timestamp>,
    ) -> (Sender<StreamElement<u32>>, Sender<StreamElement<u32>>, InputGate<u32>) {
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        (tx0, tx1, InputGate::new(vec![rx0, rx1], drift))
    }

    #[test]
    fn an_idle_channel_leaves_the_watermark_until_it_sends_again() {
        let (_control_tx, control) = crossbeam_channel::unbounded();
        let (tx0, tx1, mut gate) = two_channels(None);
        tx0.send(StreamElement::Watermark(100)).unwrap();
        tx1.send(StreamElement::Idle).unwrap();
        // Channel 1 has sent nothing: only its idleness lets channel 0's watermark through.
        assert!(matches!(next_event(&mut gate, &control), GateEvent::Watermark(100)));
        tx1.send(StreamElement::Data(vec![7])).unwrap();
        assert!(matches!(next_event(&mut gate, &control), GateEvent::Data(_)));
        // Active again (its watermark still the initial one): the watermark waits for it.
        tx0.send(StreamElement::Watermark(200)).unwrap();
        tx1.send(StreamElement::Watermark(50)).unwrap();
        tx1.send(StreamElement::Watermark(150)).unwrap();
        // 50 is below what was emitted: the watermark never goes back; 150 moves it.
        assert!(matches!(next_event(&mut gate, &control), GateEvent::Watermark(150)));
        // Channel 1 idle: channel 0's 200 counts alone. Both idle: the task's output is idle.
        tx1.send(StreamElement::Idle).unwrap();
        assert!(matches!(next_event(&mut gate, &control), GateEvent::Watermark(200)));
        tx0.send(StreamElement::Idle).unwrap();
        assert!(matches!(next_event(&mut gate, &control), GateEvent::InputsIdle));
    }

    /// What the gate holds now, without waiting: `None` when nothing it may read has data.
    fn ready(gate: &mut InputGate<u32>, control: &Receiver<TaskCommand>) -> Option<GateEvent<u32>> {
        let past = std::time::Instant::now();
        loop {
            match gate.next_until(control, Some(past)).unwrap() {
                GateEvent::Idle => continue,
                GateEvent::Deadline => return None,
                e => return Some(e),
            }
        }
    }

    fn data(e: Option<GateEvent<u32>>) -> Vec<u32> {
        match e {
            Some(GateEvent::Data(d)) => d,
            _ => panic!("expected data"),
        }
    }

    fn watermark(e: Option<GateEvent<u32>>) -> Timestamp {
        match e {
            Some(GateEvent::Watermark(w)) => w,
            _ => panic!("expected a watermark"),
        }
    }

    fn barrier(id: u64) -> StreamElement<u32> {
        StreamElement::Barrier(CheckpointBarrier {
            id: CheckpointId(id),
            timestamp_ms: 0,
            kind: crate::checkpoint::CheckpointKind::Checkpoint,
        })
    }

    #[test]
    fn a_channel_ahead_of_the_slowest_by_more_than_the_drift_waits_until_it_catches_up() {
        let (_control_tx, control) = crossbeam_channel::unbounded();
        let (tx0, tx1, mut gate) = two_channels(Some(100));
        tx0.send(StreamElement::Watermark(1000)).unwrap();
        tx0.send(StreamElement::Data(vec![7])).unwrap();
        tx1.send(StreamElement::Watermark(500)).unwrap();
        // Channel 0's watermark is read first (channel 1 had none yet), then only channel 1.
        assert_eq!(watermark(ready(&mut gate, &control)), 500);
        assert!(
            ready(&mut gate, &control).is_none(),
            "channel 0 is 500 ms ahead: not read"
        );
        tx1.send(StreamElement::Watermark(850)).unwrap();
        assert_eq!(watermark(ready(&mut gate, &control)), 850);
        assert!(ready(&mut gate, &control).is_none(), "still 150 ms ahead");
        tx1.send(StreamElement::Data(vec![8])).unwrap();
        assert_eq!(data(ready(&mut gate, &control)), vec![8], "the slowest is always read");
        tx1.send(StreamElement::Watermark(900)).unwrap();
        assert_eq!(watermark(ready(&mut gate, &control)), 900);
        // Within the drift now: channel 0's record comes through.
        assert_eq!(data(ready(&mut gate, &control)), vec![7]);

        // Without alignment, channel 0 would have been read at once.
        let (tx0, tx1, mut gate) = two_channels(None);
        tx0.send(StreamElement::Watermark(1000)).unwrap();
        tx0.send(StreamElement::Data(vec![7])).unwrap();
        tx1.send(StreamElement::Watermark(500)).unwrap();
        assert_eq!(watermark(ready(&mut gate, &control)), 500);
        assert_eq!(data(ready(&mut gate, &control)), vec![7]);
    }

    #[test]
    fn a_slow_channel_blocked_by_a_barrier_idle_or_ended_holds_nobody_back() {
        let (_control_tx, control) = crossbeam_channel::unbounded();
        // Blocked by a barrier: the channel ahead is read up to its own barrier.
        let (tx0, tx1, mut gate) = two_channels(Some(100));
        tx0.send(StreamElement::Watermark(1000)).unwrap();
        tx0.send(StreamElement::Data(vec![7])).unwrap();
        tx0.send(barrier(1)).unwrap();
        tx1.send(StreamElement::Watermark(0)).unwrap();
        tx1.send(barrier(1)).unwrap();
        assert_eq!(watermark(ready(&mut gate, &control)), 0);
        assert_eq!(data(ready(&mut gate, &control)), vec![7]);
        assert!(matches!(ready(&mut gate, &control), Some(GateEvent::Barrier(b)) if b.id == CheckpointId(1)));

        // Idle, then active again: its old watermark holds the others back until it moves.
        let (tx0, tx1, mut gate) = two_channels(Some(100));
        tx1.send(StreamElement::Watermark(0)).unwrap();
        tx1.send(StreamElement::Idle).unwrap();
        tx0.send(StreamElement::Watermark(1000)).unwrap();
        tx0.send(StreamElement::Data(vec![7])).unwrap();
        assert_eq!(watermark(ready(&mut gate, &control)), 0);
        assert_eq!(watermark(ready(&mut gate, &control)), 1000, "channel 1 is idle");
        assert_eq!(data(ready(&mut gate, &control)), vec![7]);
        tx1.send(StreamElement::Data(vec![8])).unwrap();
        tx0.send(StreamElement::Data(vec![9])).unwrap();
        assert_eq!(data(ready(&mut gate, &control)), vec![8]);
        assert!(
            ready(&mut gate, &control).is_none(),
            "channel 1 is active again, 1000 ms behind"
        );

        // Ended: the other channel is read.
        let (tx0, tx1, mut gate) = two_channels(Some(100));
        tx1.send(StreamElement::Watermark(0)).unwrap();
        tx0.send(StreamElement::Watermark(1000)).unwrap();
        tx0.send(StreamElement::Data(vec![7])).unwrap();
        assert_eq!(watermark(ready(&mut gate, &control)), 0);
        assert!(ready(&mut gate, &control).is_none());
        tx1.send(StreamElement::EndOfInput).unwrap();
        assert_eq!(watermark(ready(&mut gate, &control)), 1000);
        assert_eq!(data(ready(&mut gate, &control)), vec![7]);
    }
}
