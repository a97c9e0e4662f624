//! The input side of a task with channels: reads whichever open, unblocked channel has data,
//! feeds barriers and end-of-input markers to the [`BarrierAligner`], and combines watermarks
//! as the minimum over open channels. A blocked channel is simply not read: its bounded channel
//! fills and its sender waits, so nothing is buffered by hand.

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
    /// Every channel has ended.
    End,
}

pub(crate) struct InputGate<T> {
    inputs: Vec<Receiver<StreamElement<T>>>,
    aligner: BarrierAligner,
    watermarks: Vec<Timestamp>,
    emitted_watermark: Timestamp,
    next: usize,
    dirty: bool,
    pending: VecDeque<GateEvent<T>>,
}

impl<T> InputGate<T> {
    pub fn new(inputs: Vec<Receiver<StreamElement<T>>>) -> Self {
        let n = inputs.len();
        Self {
            inputs,
            aligner: BarrierAligner::new(n),
            watermarks: vec![Timestamp::MIN; n],
            emitted_watermark: Timestamp::MIN,
            next: 0,
            dirty: false,
            pending: VecDeque::new(),
        }
    }

    /// The checkpoint was aborted: stop waiting for its barriers.
    pub fn cancel_alignment(&mut self, id: CheckpointId) {
        self.aligner.on_cancel(id);
    }

    fn readable(&self, ch: usize) -> bool {
        !self.aligner.is_blocked(ch) && !self.aligner.is_ended(ch)
    }

    fn disconnected(ch: usize) -> Error {
        Error::Disconnected(format!("upstream channel {ch} closed without end of input"))
    }

    fn try_read(&mut self) -> Result<Option<(usize, StreamElement<T>)>> {
        let n = self.inputs.len();
        for k in 0..n {
            let ch = (self.next + k) % n;
            if !self.readable(ch) {
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

    fn block(&mut self, control: &Receiver<TaskCommand>) -> Result<Result<(usize, StreamElement<T>), TaskCommand>> {
        let mut sel = Select::new();
        sel.recv(control);
        let channels: Vec<usize> = (0..self.inputs.len()).filter(|c| self.readable(*c)).collect();
        for ch in &channels {
            sel.recv(&self.inputs[*ch]);
        }
        let op = sel.select();
        let i = op.index();
        if i == 0 {
            // The coordinator dropping its end means the job is being torn down.
            return Ok(Err(op.recv(control).unwrap_or(TaskCommand::Cancel)));
        }
        let ch = channels[i - 1];
        op.recv(&self.inputs[ch])
            .map(|el| Ok((ch, el)))
            .map_err(|_| Self::disconnected(ch))
    }

    fn combined_watermark(&self) -> Option<Timestamp> {
        (0..self.inputs.len())
            .filter(|c| !self.aligner.is_ended(*c))
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
    pub fn next(&mut self, control: &Receiver<TaskCommand>) -> Result<GateEvent<T>> {
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
                None => match self.block(control)? {
                    Ok(x) => x,
                    Err(cmd) => return Ok(GateEvent::Command(cmd)),
                },
            };
            match element {
                StreamElement::Data(batch) => {
                    self.dirty = true;
                    return Ok(GateEvent::Data(batch));
                }
                StreamElement::Watermark(w) => {
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
