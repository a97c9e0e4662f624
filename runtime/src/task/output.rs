//! The end of a chain that writes to other subtasks: partitions records into per-channel
//! batches and sends them over bounded channels, or over TCP to a subtask on another worker
//! (a full channel or socket blocks: backpressure).

use super::chain::{ChainInput, PendingSnapshot};
use crate::checkpoint::{CheckpointBarrier, CheckpointId};
use crate::element::{StreamElement, Timestamp};
use crate::error::{Error, Result};
use crate::keygroup::{subtask_for_key_group, KeyGroup};
use crate::net::RemoteSender;
use crate::operator::Data;
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Computes a record's key group (the key extractor, hashing and max parallelism folded in).
pub(crate) type KeyGroupFn<T> = Arc<dyn Fn(&T) -> KeyGroup + Send + Sync>;

/// How records are spread over the downstream subtasks.
pub(crate) enum Partitioner<T> {
    /// One channel, to the subtask with the same index.
    Forward,
    /// Whole batches round-robin.
    Rebalance,
    /// Every record to every subtask.
    Broadcast,
    /// By key group: subtask `kg * p / M`.
    Hash {
        key_group: KeyGroupFn<T>,
        max_parallelism: u16,
    },
}

/// One channel out of a task.
pub(crate) enum Outlet<T> {
    /// To a subtask in this process.
    Local(Sender<StreamElement<T>>),
    /// To a subtask on another worker, written from this task's thread.
    Remote(RemoteSender),
}

impl<T: Data> Outlet<T> {
    /// Sends `element`; on failure, the network error (none when the receiver went away).
    fn send(&mut self, element: StreamElement<T>) -> std::result::Result<(), Option<std::io::Error>> {
        match self {
            Outlet::Local(tx) => tx.send(element).map_err(|_| None),
            Outlet::Remote(r) => r.send(&element).map_err(Some),
        }
    }

    /// Sends the records of `batch` and leaves it empty for the next ones.
    fn send_batch(&mut self, batch: &mut Vec<T>, capacity: usize) -> std::result::Result<(), Option<std::io::Error>> {
        match self {
            Outlet::Local(_) => self.send(StreamElement::Data(std::mem::replace(
                batch,
                Vec::with_capacity(capacity),
            ))),
            Outlet::Remote(r) => r.send_batch(batch).map_err(Some),
        }
    }
}

pub(crate) struct ChannelWriter<T> {
    senders: Vec<Outlet<T>>,
    buffers: Vec<Vec<T>>,
    partitioner: Partitioner<T>,
    batch_size: usize,
    next: usize,
    cancel: Arc<AtomicBool>,
}

impl<T: Data> ChannelWriter<T> {
    pub fn new(
        senders: Vec<Outlet<T>>,
        partitioner: Partitioner<T>,
        batch_size: usize,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        let buffers = senders.iter().map(|_| Vec::new()).collect();
        Self {
            senders,
            buffers,
            partitioner,
            batch_size,
            next: 0,
            cancel,
        }
    }

    fn fail(&self, ch: usize, why: Option<std::io::Error>) -> Error {
        if self.cancel.load(Ordering::Relaxed) {
            return Error::Cancelled;
        }
        match why {
            Some(e) => Error::Disconnected(format!("downstream subtask {ch} stopped: {e}")),
            None => Error::Disconnected(format!("downstream subtask {ch} stopped")),
        }
    }

    fn send(&mut self, ch: usize, element: StreamElement<T>) -> Result<()> {
        self.senders[ch].send(element).map_err(|why| self.fail(ch, why))
    }

    fn send_buffer(&mut self, ch: usize) -> Result<()> {
        if self.buffers[ch].is_empty() {
            return Ok(());
        }
        self.senders[ch]
            .send_batch(&mut self.buffers[ch], self.batch_size)
            .map_err(|why| self.fail(ch, why))
    }

    fn flush_all(&mut self) -> Result<()> {
        (0..self.senders.len()).try_for_each(|ch| self.send_buffer(ch))
    }

    fn send_to_all(&mut self, element: impl Fn() -> StreamElement<T>) -> Result<()> {
        self.flush_all()?;
        (0..self.senders.len()).try_for_each(|ch| self.send(ch, element()))
    }
}

/// Adds `batch` to `buffer`; an empty buffer takes it whole, with no copy of its records.
pub(crate) fn append<T>(buffer: &mut Vec<T>, batch: Vec<T>) {
    if buffer.is_empty() {
        *buffer = batch;
    } else {
        buffer.extend(batch);
    }
}

impl<T: Data> ChainInput<T> for ChannelWriter<T> {
    fn process(&mut self, batch: Vec<T>) -> Result<()> {
        match &self.partitioner {
            Partitioner::Forward => {
                append(&mut self.buffers[0], batch);
                if self.buffers[0].len() >= self.batch_size {
                    self.send_buffer(0)?;
                }
            }
            Partitioner::Rebalance => {
                let ch = self.next;
                self.next = (self.next + 1) % self.senders.len();
                append(&mut self.buffers[ch], batch);
                if self.buffers[ch].len() >= self.batch_size {
                    self.send_buffer(ch)?;
                }
            }
            Partitioner::Broadcast => {
                for ch in 0..self.senders.len() {
                    self.buffers[ch].extend(batch.iter().cloned());
                    if self.buffers[ch].len() >= self.batch_size {
                        self.send_buffer(ch)?;
                    }
                }
            }
            Partitioner::Hash {
                key_group,
                max_parallelism,
            } => {
                let (key_group, m) = (key_group.clone(), *max_parallelism);
                let p = self.senders.len();
                for record in batch {
                    let ch = subtask_for_key_group(m, p, key_group(&record));
                    self.buffers[ch].push(record);
                    if self.buffers[ch].len() >= self.batch_size {
                        self.send_buffer(ch)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn watermark(&mut self, w: Timestamp) -> Result<()> {
        self.send_to_all(|| StreamElement::Watermark(w))
    }

    fn barrier(&mut self, b: CheckpointBarrier, _: &mut Vec<PendingSnapshot>) -> Result<()> {
        self.send_to_all(|| StreamElement::Barrier(b))
    }

    fn checkpoint_complete(&mut self, _: CheckpointId) -> Result<()> {
        Ok(())
    }

    fn end_of_input(&mut self) -> Result<()> {
        self.send_to_all(|| StreamElement::EndOfInput)
    }

    fn flush(&mut self) -> Result<()> {
        self.flush_all()
    }

    fn idle(&mut self) -> Result<()> {
        self.send_to_all(|| StreamElement::Idle)
    }
}
