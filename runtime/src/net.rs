//! Data exchange between worker processes. A channel between two subtasks on different workers
//! is one TCP connection: the sending task encodes each element and writes it to the socket
//! itself ([`RemoteSender`]; no thread or queue in between), the receiving worker moves elements
//! from the socket into the bounded channel its input gate reads. Nothing in between grows: a
//! full receiving channel stops the reader, the socket's window fills, and the sending task's
//! write blocks, so backpressure crosses the network. Barriers travel in-band, and one connection
//! per channel means a channel blocked by alignment never holds up another. Frames are a
//! little-endian `u32` length and the element's bitcode bytes (through serde: measured faster
//! to encode and decode than postcard); a connection opens with its `ChannelKey` in postcard.

use crate::element::StreamElement;
use crate::operator::Data;
use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tracing::{debug, warn};

/// Frames above this are refused as corrupt (a batch is far smaller).
const MAX_FRAME: usize = 1 << 30;
/// The receiving thread's read buffer.
const READ_BUFFER: usize = 256 * 1024;
/// The kernel's send and receive buffers of a data connection. Bounded, like an in-process
/// channel, rather than autotuned to megabytes: data queued in a socket is data a barrier waits
/// behind, so it lengthens alignment without adding throughput on a local network.
const KERNEL_BUFFER: usize = 128 * 1024;

/// Which channel a connection carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelKey {
    /// The job.
    pub job: String,
    /// The attempt (a connection of an old attempt never feeds a new one).
    pub attempt: u32,
    /// The edge of the job graph.
    pub edge: usize,
    /// Sending subtask.
    pub from: usize,
    /// Receiving subtask.
    pub to: usize,
}

/// This worker's end of the data plane: a listener whose accepted connections wait, by channel,
/// for the receiving side to pick them up (a sender may connect before the receiver deployed).
pub struct Exchange {
    addr: SocketAddr,
    arrived: Mutex<HashMap<ChannelKey, TcpStream>>,
    signal: Condvar,
}

impl Exchange {
    /// Listens on `addr` (port 0 picks a free one) and accepts on a thread of its own.
    pub fn bind(addr: &str) -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind(addr)?;
        // Accepted connections inherit it.
        socket2::SockRef::from(&listener).set_recv_buffer_size(KERNEL_BUFFER)?;
        let exchange = Arc::new(Self {
            addr: listener.local_addr()?,
            arrived: Mutex::new(HashMap::new()),
            signal: Condvar::new(),
        });
        let accepting = exchange.clone();
        std::thread::Builder::new()
            .name("sluice-exchange".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let ex = accepting.clone();
                    // The header is read off the accept loop: a slow peer delays only itself.
                    let _ = std::thread::Builder::new()
                        .name("sluice-exchange-in".into())
                        .spawn(move || ex.admit(stream));
                }
            })?;
        Ok(exchange)
    }

    /// Where peers connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn admit(&self, mut stream: TcpStream) {
        let mut frame = Vec::new();
        let key = read_frame(&mut stream, &mut frame)
            .and_then(|()| postcard::from_bytes::<ChannelKey>(&frame).map_err(std::io::Error::other));
        match key {
            Ok(key) => {
                self.lock().insert(key, stream);
                self.signal.notify_all();
            }
            Err(e) => warn!(error = %e, "refused a data connection without a valid channel header"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelKey, TcpStream>> {
        self.arrived.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the connection of `key`; `None` once `cancel` is set.
    fn take(&self, key: &ChannelKey, cancel: &AtomicBool) -> Option<TcpStream> {
        let mut arrived = self.lock();
        loop {
            if let Some(s) = arrived.remove(key) {
                return Some(s);
            }
            if cancel.load(Ordering::Relaxed) {
                return None;
            }
            // Woken by arrivals; the timeout only bounds how late a cancel is noticed.
            arrived = self
                .signal
                .wait_timeout(arrived, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Drops connections of `job`'s attempts that no receiver will pick up any more.
    pub fn forget(&self, job: &str, attempt: u32) {
        self.lock().retain(|k, _| k.job != job || k.attempt > attempt);
    }
}

/// Where the subtasks of one attempt run, for a worker deploying its share of them.
pub struct Placement {
    /// This worker's data plane.
    pub exchange: Arc<Exchange>,
    /// This worker's id.
    pub this_worker: u64,
    /// The worker running subtask `i` of every task (slot sharing: slot `i` holds subtask `i`
    /// of each chain).
    pub slot_workers: Vec<u64>,
    /// Each worker's data address.
    pub peers: HashMap<u64, SocketAddr>,
}

impl Placement {
    /// Whether subtask `subtask` runs here.
    pub fn is_local(&self, subtask: usize) -> bool {
        self.slot_workers.get(subtask) == Some(&self.this_worker)
    }
}

/// One edge's network ends: spawns the threads that carry its cross-worker channels.
pub(crate) struct RemoteLinks<'a> {
    pub placement: &'a Placement,
    pub job: &'a str,
    pub attempt: u32,
    pub edge: usize,
    pub cancel: Arc<AtomicBool>,
}

impl RemoteLinks<'_> {
    fn key(&self, from: usize, to: usize) -> ChannelKey {
        ChannelKey {
            job: self.job.to_string(),
            attempt: self.attempt,
            edge: self.edge,
            from,
            to,
        }
    }

    /// The sending end of the channel from local subtask `from` to remote subtask `to`.
    pub fn send_remote(&self, from: usize, to: usize) -> RemoteSender {
        let worker = self.placement.slot_workers[to];
        RemoteSender {
            peer: self.placement.peers.get(&worker).copied(),
            key: self.key(from, to),
            stream: None,
            cancel: self.cancel.clone(),
        }
    }

    /// Feeds local subtask `to` with what remote subtask `from` sends.
    pub fn receive_remote<T: Data>(&self, from: usize, to: usize, tx: Sender<StreamElement<T>>) {
        let key = self.key(from, to);
        let (exchange, cancel) = (self.placement.exchange.clone(), self.cancel.clone());
        let _ = std::thread::Builder::new()
            .name(format!("sluice-net-in-{}-{from}-{to}", self.edge))
            .spawn(move || {
                let Some(stream) = exchange.take(&key, &cancel) else {
                    return;
                };
                if let Err(e) = receive_loop(stream, &tx) {
                    // Dropping the sender without end of input fails the receiving task.
                    debug!(error = %e, ?key, "incoming data connection ended");
                }
            });
    }
}

/// The sending end of a cross-worker channel, written by the sending task's own thread: it
/// connects on first use, and each element is one frame and one write. A write blocked by
/// backpressure gives up once the attempt is cancelled.
pub(crate) struct RemoteSender {
    peer: Option<SocketAddr>,
    key: ChannelKey,
    stream: Option<TcpStream>,
    cancel: Arc<AtomicBool>,
}

impl RemoteSender {
    /// Encodes and writes `element`.
    pub fn send<T: Data>(&mut self, element: &StreamElement<T>) -> std::io::Result<()> {
        if self.stream.is_none() {
            self.stream = Some(self.connect()?);
            // The connection's first frame names its channel.
            let key = postcard::to_stdvec(&self.key).map_err(std::io::Error::other)?;
            if let Err(e) = self.write_frame(&key) {
                self.stream = None;
                return Err(e);
            }
        }
        let payload = bitcode::serialize(element).map_err(std::io::Error::other)?;
        self.write_frame(&payload)
    }

    /// Writes one frame: length and payload in one write, without copying the payload behind
    /// the length. A payload the receiver would refuse is refused here, naming its size.
    fn write_frame(&mut self, payload: &[u8]) -> std::io::Result<()> {
        if payload.len() > MAX_FRAME {
            return Err(std::io::Error::other(format!(
                "a data frame of {} bytes exceeds the limit of {MAX_FRAME} bytes (use smaller batches)",
                payload.len()
            )));
        }
        let len = (payload.len() as u32).to_le_bytes();
        self.write_all(&mut [IoSlice::new(&len), IoSlice::new(payload)])
    }

    /// Sends `batch` as one data element and leaves it empty, its allocation kept for the
    /// next batch (it is only encoded, never handed over).
    pub fn send_batch<T: Data>(&mut self, batch: &mut Vec<T>) -> std::io::Result<()> {
        let element = StreamElement::Data(std::mem::take(batch));
        let sent = self.send(&element);
        if let StreamElement::Data(mut records) = element {
            records.clear();
            *batch = records;
        }
        sent
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let addr = self.peer.ok_or_else(|| {
            std::io::Error::other(format!("no data address for the worker of subtask {}", self.key.to))
        })?;
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        socket2::SockRef::from(&stream).set_send_buffer_size(KERNEL_BUFFER)?;
        // Bounds how late a cancel is noticed while the receiver applies backpressure.
        stream.set_write_timeout(Some(Duration::from_millis(200)))?;
        Ok(stream)
    }

    fn write_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        let stream = self.stream.as_mut().expect("connected before writing");
        while bufs.iter().any(|b| !b.is_empty()) {
            match stream.write_vectored(bufs) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err(std::io::Error::other("cancelled"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn receive_loop<T: Data>(stream: TcpStream, tx: &Sender<StreamElement<T>>) -> std::io::Result<()> {
    let mut input = BufReader::with_capacity(READ_BUFFER, stream);
    let mut frame = Vec::new();
    loop {
        let element: StreamElement<T> = match buffered_frame(&mut input)? {
            // Decoded where it lies: a frame in the read buffer is not copied out first.
            Some(len) => {
                let decoded = bitcode::deserialize(&input.buffer()[4..4 + len]);
                input.consume(4 + len);
                decoded
            }
            None => {
                read_frame(&mut input, &mut frame)?;
                bitcode::deserialize(&frame)
            }
        }
        .map_err(std::io::Error::other)?;
        let end = matches!(element, StreamElement::EndOfInput);
        if tx.send(element).is_err() || end {
            return Ok(());
        }
    }
}

/// The payload length of the next frame if all of it is already in `input`'s buffer (reading
/// more only when the buffer is empty).
fn buffered_frame(input: &mut BufReader<TcpStream>) -> std::io::Result<Option<usize>> {
    let buf = input.fill_buf()?;
    if buf.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let Some(len) = buf
        .get(..4)
        .map(|l| u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize)
    else {
        return Ok(None);
    };
    Ok((buf.len() >= 4 + len).then_some(len))
}

/// Reads one frame into `frame`, reusing its allocation.
fn read_frame(input: &mut impl Read, frame: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("a data frame of {len} bytes is corrupt")));
    }
    frame.resize(len, 0);
    input.read_exact(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;

    fn placement(exchange: Arc<Exchange>, this: u64, peers: HashMap<u64, SocketAddr>) -> Placement {
        Placement {
            exchange,
            this_worker: this,
            slot_workers: vec![1, 2],
            peers,
        }
    }

    /// The network ends of edge `edge` of attempt 0 of job `j`.
    fn links(placement: &Placement, edge: usize, cancel: Arc<AtomicBool>) -> RemoteLinks<'_> {
        RemoteLinks {
            placement,
            job: "j",
            attempt: 0,
            edge,
            cancel,
        }
    }

    /// Worker 1 runs subtask 0, worker 2 subtask 1, each with its own exchange.
    fn two_workers() -> (Placement, Placement) {
        let (a, b) = (
            Exchange::bind("127.0.0.1:0").unwrap(),
            Exchange::bind("127.0.0.1:0").unwrap(),
        );
        let peers: HashMap<u64, SocketAddr> = [(1, a.addr()), (2, b.addr())].into();
        (placement(a, 1, peers.clone()), placement(b, 2, peers))
    }

    /// Elements cross in order (large batches, partial socket writes) and end of input closes
    /// the channel.
    #[test]
    fn elements_cross_in_order() {
        let (pa, pb) = two_workers();
        let cancel = Arc::new(AtomicBool::new(false));
        let out = links(&pa, 0, cancel.clone());
        let inp = links(&pb, 0, cancel);
        let mut tx = out.send_remote(0, 1);
        let (tx2, rx2) = bounded::<StreamElement<(u64, String)>>(1);
        inp.receive_remote(0, 1, tx2);
        let batch: Vec<(u64, String)> = (0..20_000).map(|i| (i, "x".repeat(64))).collect();
        let sender = std::thread::spawn(move || {
            for _ in 0..50 {
                tx.send(&StreamElement::Data(batch.clone())).unwrap();
            }
            tx.send::<(u64, String)>(&StreamElement::Watermark(7)).unwrap();
            tx.send::<(u64, String)>(&StreamElement::EndOfInput).unwrap();
        });
        let first = rx2.recv().unwrap();
        assert!(matches!(first, StreamElement::Data(ref b) if b.len() == 20_000 && b[0].0 == 0));
        let mut batches = 1;
        loop {
            match rx2.recv().unwrap() {
                StreamElement::Data(b) => {
                    assert_eq!(b[19_999].0, 19_999);
                    batches += 1;
                }
                StreamElement::Watermark(w) => {
                    assert_eq!((w, batches), (7, 50));
                }
                StreamElement::EndOfInput => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        sender.join().unwrap();
    }

    /// A sender that goes away without end of input disconnects the receiving channel.
    #[test]
    fn a_vanished_sender_disconnects_the_receiver() {
        let (pa, pb) = two_workers();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut tx = links(&pa, 3, cancel.clone()).send_remote(0, 1);
        let (tx2, rx2) = bounded::<StreamElement<u64>>(4);
        links(&pb, 3, cancel).receive_remote(0, 1, tx2);
        tx.send(&StreamElement::Data(vec![5u64])).unwrap();
        drop(tx);
        assert!(matches!(rx2.recv().unwrap(), StreamElement::Data(v) if v == vec![5]));
        assert!(rx2.recv().is_err(), "the channel disconnects without end of input");
    }

    /// A sending task blocked by backpressure (the receiver never reads) gives up once its
    /// attempt is cancelled, instead of hanging in the write.
    #[test]
    fn a_write_blocked_by_backpressure_ends_on_cancel() {
        let (pa, _pb) = two_workers();
        let cancel = Arc::new(AtomicBool::new(true));
        let mut tx = links(&pa, 5, cancel).send_remote(0, 1);
        let batch = StreamElement::Data(vec![0u64; 64 * 1024]);
        let err = loop {
            if let Err(e) = tx.send(&batch) {
                break e;
            }
        };
        assert_eq!(err.to_string(), "cancelled");
    }
}
