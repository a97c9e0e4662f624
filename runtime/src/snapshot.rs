//! The bytes of a checkpoint: state files, their handles, and the `_metadata` commit record.
//!
//! A state file holds one operator subtask's state:
//!
//! ```text
//! "SLS1" | block(key group start) | ... | block(key group end) | block(operator state)?
//! block = len:u32le | crc32:u32le | payload
//! keyed payload = per state: name, entry count, entries (key, namespace, value), length-prefixed
//! ```
//!
//! Every block carries its own CRC32 and the handle records the file size and the offset of every
//! key-group block, so a truncated or corrupted file is detected and a restoring subtask reads only
//! the key groups it owns. The entries are the canonical, backend-independent form of keyed state:
//! (serialized key, namespace such as a map's user key, serialized value).

use crate::checkpoint::{CheckpointId, CheckpointKind};
use crate::error::{Error, Result};
use crate::keygroup::{KeyGroup, KeyGroupRange};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const FILE_MAGIC: &[u8; 4] = b"SLS1";
const METADATA_HEADER: &str = "sluice-checkpoint-metadata v1";
/// Version of the metadata and state file formats.
pub const FORMAT_VERSION: u32 = 1;

/// Where one operator subtask's state lives inside a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateHandle {
    /// Path relative to the checkpoint directory, so that a snapshot can be relocated.
    pub path: String,
    /// Exact size of the file: a shorter file is truncated.
    pub size: u64,
    /// Key-group blocks, when the operator has keyed state.
    pub key_groups: Option<KeyGroupIndex>,
    /// Offset of the operator-state block, when the operator has operator state.
    pub operator_state: Option<u64>,
    /// RocksDB native state, when the operator's keyed state lives in RocksDB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rocksdb: Option<RocksDbHandle>,
}

/// A RocksDB instance's native checkpoint: its SST files, and its small files (MANIFEST,
/// CURRENT, OPTIONS) in one block of the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RocksDbHandle {
    /// Key groups the instance holds.
    pub range: KeyGroupRange,
    /// Its SST files.
    pub sst_files: Vec<RocksFile>,
    /// Offset of the block with the small files, `postcard(Vec<(name, bytes)>)`.
    pub small_files_block: u64,
}

/// One SST file of a RocksDB checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RocksFile {
    /// File name inside the instance (e.g. `000012.sst`).
    pub name: String,
    /// Where it is stored: relative to the job directory when `shared`, else to the checkpoint
    /// directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// CRC32 of the content.
    pub crc32: u32,
    /// Under `<job>/shared/`, referenced by every checkpoint that still needs it.
    pub shared: bool,
}

/// Offsets of the key-group blocks in a state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGroupIndex {
    /// Key groups the file holds, in order.
    pub range: KeyGroupRange,
    /// `offsets[i]` is where the block of key group `range.start + i` begins.
    pub offsets: Vec<u64>,
}

/// How operator (non-keyed) list state is redistributed when parallelism changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Redistribution {
    /// Entries are spread round-robin over the new subtasks.
    Split,
    /// Every new subtask gets the union of all entries.
    Union,
}

/// One named operator list state of one subtask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorListState {
    /// Redistribution mode.
    pub mode: Redistribution,
    /// Serialized entries.
    pub entries: Vec<Vec<u8>>,
}

impl OperatorListState {
    /// A list state holding `entries`, each serialized with postcard.
    pub fn of<T: Serialize>(mode: Redistribution, entries: &[T]) -> Result<Self> {
        let entries = entries
            .iter()
            .map(postcard::to_allocvec)
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self { mode, entries })
    }

    /// The entries read back; an unreadable one is an error naming the state `name`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Vec<T>> {
        self.entries
            .iter()
            .map(|e| postcard::from_bytes(e).map_err(|e| Error::Serde(format!("operator state '{name}': {e}"))))
            .collect()
    }
}

/// All operator state of one subtask, by state name.
pub type OperatorState = BTreeMap<String, OperatorListState>;

/// Operator state holding one list state, `name`, with `entries`: what most operators and
/// sources checkpoint.
pub fn list_state<T: Serialize>(name: &str, mode: Redistribution, entries: &[T]) -> Result<OperatorState> {
    Ok(OperatorState::from([(
        name.to_string(),
        OperatorListState::of(mode, entries)?,
    )]))
}

/// The entries of list state `name` in `state`, if it holds one (see [`list_state`]).
pub fn read_list<T: serde::de::DeserializeOwned>(state: &OperatorState, name: &str) -> Result<Option<Vec<T>>> {
    state.get(name).map(|l| l.decode(name)).transpose()
}

/// The state of every subtask of one operator in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorSnapshotMeta {
    /// Stable operator id: the key that maps state onto a (changed) job.
    pub uid: String,
    /// Human-readable name.
    pub name: String,
    /// Parallelism the operator had when the snapshot was taken.
    pub parallelism: usize,
    /// One entry per subtask; `None` for a subtask without state.
    pub subtasks: Vec<Option<StateHandle>>,
}

/// The commit record of a checkpoint. Written last: a checkpoint without it does not exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    /// Format version.
    pub format: u32,
    /// The job that took it.
    pub job_id: String,
    /// The registered job name, so that `restore` can resubmit it.
    pub job_name: String,
    /// Job parameters (`--set`).
    pub params: BTreeMap<String, String>,
    /// Checkpoint id.
    pub checkpoint_id: CheckpointId,
    /// Checkpoint or savepoint.
    pub kind: CheckpointKind,
    /// Trigger time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Number of key groups; a restore must use the same.
    pub max_parallelism: u16,
    /// Per-operator state.
    pub operators: Vec<OperatorSnapshotMeta>,
}

impl CheckpointMetadata {
    /// Encodes with a checksummed header line followed by JSON, readable with `cat`.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("metadata serializes");
        let crc = crc32fast::hash(&body);
        let mut out = format!("{METADATA_HEADER} crc32={crc:08x} len={}\n", body.len()).into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Decodes and verifies; `location` names the file in errors.
    pub fn decode(bytes: &[u8], location: &str) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt {
            location: location.to_string(),
            reason,
        };
        let nl = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| corrupt("no header line".into()))?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| corrupt("header is not text".into()))?;
        let rest = header
            .strip_prefix(METADATA_HEADER)
            .ok_or_else(|| corrupt(format!("not a checkpoint metadata file (header '{header}')")))?;
        let mut crc = None;
        let mut len = None;
        for part in rest.split_whitespace() {
            if let Some(v) = part.strip_prefix("crc32=") {
                crc = u32::from_str_radix(v, 16).ok();
            } else if let Some(v) = part.strip_prefix("len=") {
                len = v.parse::<usize>().ok();
            }
        }
        let (crc, len) = crc.zip(len).ok_or_else(|| corrupt("malformed header".into()))?;
        let body = &bytes[nl + 1..];
        if body.len() != len {
            return Err(corrupt(format!(
                "expected {len} bytes after the header, found {}",
                body.len()
            )));
        }
        if crc32fast::hash(body) != crc {
            return Err(corrupt("checksum mismatch".into()));
        }
        let meta: CheckpointMetadata =
            serde_json::from_slice(body).map_err(|e| corrupt(format!("invalid metadata: {e}")))?;
        if meta.format != FORMAT_VERSION {
            return Err(corrupt(format!("unsupported format version {}", meta.format)));
        }
        Ok(meta)
    }

    /// Every file path (relative to the checkpoint directory) this checkpoint references.
    pub fn referenced_files(&self) -> impl Iterator<Item = &StateHandle> {
        self.operators.iter().flat_map(|o| o.subtasks.iter().flatten())
    }

    /// Every RocksDB SST file this checkpoint references.
    pub fn sst_files(&self) -> impl Iterator<Item = &RocksFile> {
        self.referenced_files()
            .filter_map(|h| h.rocksdb.as_ref())
            .flat_map(|r| r.sst_files.iter())
    }

    /// Paths (relative to the job directory) of the shared files this checkpoint references.
    pub fn shared_files(&self) -> impl Iterator<Item = &str> {
        self.sst_files().filter(|f| f.shared).map(|f| f.path.as_str())
    }

    /// The operator with this uid.
    pub fn operator(&self, uid: &str) -> Option<&OperatorSnapshotMeta> {
        self.operators.iter().find(|o| o.uid == uid)
    }
}

/// Builds a state file.
#[derive(Default)]
pub struct StateFileWriter {
    buf: Vec<u8>,
    block_start: Option<usize>,
}

impl StateFileWriter {
    /// A new file with its magic.
    pub fn new() -> Self {
        Self {
            buf: FILE_MAGIC.to_vec(),
            block_start: None,
        }
    }

    /// Starts a block; returns its offset.
    pub fn begin_block(&mut self) -> u64 {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0u8; 8]);
        self.block_start = Some(at);
        at as u64
    }

    /// The open block's payload buffer.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Closes the open block, writing its length and checksum.
    pub fn end_block(&mut self) {
        let at = self.block_start.take().expect("no open block");
        let payload = &self.buf[at + 8..];
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// The finished bytes.
    pub fn finish(self) -> Vec<u8> {
        debug_assert!(self.block_start.is_none());
        self.buf
    }
}

/// Reads and verifies the block at `offset` of a state file (whole file in `file`).
pub fn read_block<'a>(file: &'a [u8], offset: u64, location: &str) -> Result<&'a [u8]> {
    if file.len() < 4 || &file[..4] != FILE_MAGIC {
        return Err(Error::Corrupt {
            location: location.to_string(),
            reason: "not a sluice state file (bad magic)".into(),
        });
    }
    block_at(file, 0, offset, location)
}

/// Verifies and returns the block at file offset `offset` from `buf`, the part of a state file
/// that starts at file offset `base` (a rescaled restore reads only the byte range of the key
/// groups it owns).
pub fn block_at<'a>(buf: &'a [u8], base: u64, offset: u64, location: &str) -> Result<&'a [u8]> {
    let corrupt = |reason: String| Error::Corrupt {
        location: location.to_string(),
        reason,
    };
    let file = buf;
    let at = usize::try_from(offset.saturating_sub(base)).unwrap_or(usize::MAX);
    let header = file
        .get(at..at.saturating_add(8))
        .ok_or_else(|| corrupt(format!("block at offset {offset} lies past the end of the file")))?;
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
    let payload = file
        .get(at + 8..(at + 8).saturating_add(len))
        .ok_or_else(|| corrupt(format!("block at offset {offset} is truncated")))?;
    if crc32fast::hash(payload) != crc {
        return Err(corrupt(format!("checksum mismatch in block at offset {offset}")));
    }
    Ok(payload)
}

/// Appends a LEB128 varint.
pub fn put_varint(out: &mut impl Extend<u8>, mut v: u64) {
    while v >= 0x80 {
        out.extend([(v as u8) | 0x80]);
        v >>= 7;
    }
    out.extend([v as u8]);
}

/// Appends a length-prefixed byte string.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Cursor over a block payload.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Whether everything has been read.
    pub fn is_done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Reads a varint.
    pub fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| Error::Serde("varint runs past the block".into()))?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(Error::Serde("varint too long".into()));
            }
        }
    }

    /// Reads a length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = usize::try_from(self.varint()?).unwrap_or(usize::MAX);
        let b = self
            .buf
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or_else(|| Error::Serde("byte string runs past the block".into()))?;
        self.pos += n;
        Ok(b)
    }
}

/// One canonical keyed-state entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Serialized key.
    pub key: &'a [u8],
    /// Namespace: empty, or a map state's serialized user key.
    pub namespace: &'a [u8],
    /// Serialized value.
    pub value: &'a [u8],
}

/// Calls `f` for every entry of state `name` in a key-group block payload.
pub fn for_each_entry<'a>(payload: &'a [u8], name: &str, mut f: impl FnMut(Entry<'a>) -> Result<()>) -> Result<()> {
    let mut c = Cursor::new(payload);
    while !c.is_done() {
        let state = c.bytes()?;
        let count = c.varint()?;
        let wanted = state == name.as_bytes();
        for _ in 0..count {
            let e = Entry {
                key: c.bytes()?,
                namespace: c.bytes()?,
                value: c.bytes()?,
            };
            if wanted {
                f(e)?;
            }
        }
    }
    Ok(())
}

/// Names of the states present in a key-group block payload.
pub fn state_names(payload: &[u8]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let mut c = Cursor::new(payload);
    while !c.is_done() {
        names.push(String::from_utf8_lossy(c.bytes()?).into_owned());
        let count = c.varint()?;
        for _ in 0..count * 3 {
            c.bytes()?;
        }
    }
    Ok(names)
}

/// Writes one state's entries into a key-group block payload.
pub struct EntryWriter<'a> {
    out: &'a mut Vec<u8>,
    count_at: usize,
    count: u64,
    /// Reused for serializing namespaces and values: no allocation per entry.
    scratch: Vec<u8>,
}

impl<'a> EntryWriter<'a> {
    /// Starts the section of state `name`.
    pub fn begin(out: &'a mut Vec<u8>, name: &str) -> Self {
        put_bytes(out, name.as_bytes());
        let count_at = out.len();
        // Room for the count (a u64 varint takes at most 10 bytes), patched in `finish`.
        out.extend_from_slice(&[0u8; 10]);
        Self {
            out,
            count_at,
            count: 0,
            scratch: Vec::new(),
        }
    }

    /// Adds an entry, serializing its namespace and value (postcard) on the way.
    pub fn entry_of<N: serde::Serialize + 'static, V: serde::Serialize + 'static>(
        &mut self,
        key: &[u8],
        namespace: &N,
        value: &V,
    ) -> Result<()> {
        put_bytes(self.out, key);
        self.put_serialized(namespace)?;
        self.put_serialized(value)?;
        self.count += 1;
        Ok(())
    }

    /// Appends `value`'s postcard bytes, length first. Integers and `()` are written directly:
    /// serde's path took most of a memory snapshot's time.
    fn put_serialized<T: serde::Serialize + 'static>(&mut self, value: &T) -> Result<()> {
        let mut buf = [0u8; 10];
        if let Some(n) = crate::keygroup::int_bytes(value, &mut buf) {
            // At most 10 bytes: the length's varint is one byte.
            self.out.push(n as u8);
            self.out.extend_from_slice(&buf[..n]);
        } else if (value as &dyn std::any::Any).is::<()>() {
            self.out.push(0);
        } else {
            self.scratch.clear();
            self.scratch = postcard::to_extend(value, std::mem::take(&mut self.scratch))?;
            put_bytes(self.out, &self.scratch);
        }
        Ok(())
    }

    /// Adds an entry.
    pub fn entry(&mut self, key: &[u8], namespace: &[u8], value: &[u8]) {
        put_bytes(self.out, key);
        put_bytes(self.out, namespace);
        put_bytes(self.out, value);
        self.count += 1;
    }

    /// Patches the entry count; returns how many entries were written.
    pub fn finish(self) -> u64 {
        let mut v = Vec::with_capacity(10);
        put_varint(&mut v, self.count);
        self.out.splice(self.count_at..self.count_at + 10, v);
        self.count
    }
}

/// Keyed state read for one restoring subtask.
#[derive(Debug, Default, Clone)]
pub struct RestoredKeyGroups {
    /// Canonical block payloads `(key group, verified payload)`, in key-group order.
    pub blocks: Vec<(KeyGroup, Vec<u8>)>,
    /// RocksDB native instances downloaded to local directories.
    pub rocksdb: Vec<RestoredRocks>,
}

/// A RocksDB native checkpoint downloaded (and verified) into a local directory.
#[derive(Debug, Clone)]
pub struct RestoredRocks {
    /// The key groups it holds.
    pub range: KeyGroupRange,
    /// The instance directory.
    pub dir: std::path::PathBuf,
    /// Its SST files as stored.
    pub files: Vec<RocksFile>,
    /// Whether the snapshot is one of the restoring job's own checkpoints (its shared files may
    /// then be referenced again instead of uploaded).
    pub own_job: bool,
    /// Whether its SST files came from local storage: hard-linked, so clean (copied only across
    /// file systems), not downloaded and written.
    pub linked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_meta() -> CheckpointMetadata {
        CheckpointMetadata {
            format: FORMAT_VERSION,
            job_id: "j".into(),
            job_name: "transactions".into(),
            params: BTreeMap::from([("users".into(), "10".into())]),
            checkpoint_id: CheckpointId(4),
            kind: CheckpointKind::Checkpoint,
            timestamp_ms: 1,
            max_parallelism: 128,
            operators: vec![OperatorSnapshotMeta {
                uid: "op".into(),
                name: "op".into(),
                parallelism: 1,
                subtasks: vec![Some(StateHandle {
                    path: "op/0".into(),
                    size: 10,
                    key_groups: None,
                    operator_state: Some(4),
                    rocksdb: None,
                })],
            }],
        }
    }

    #[test]
    fn metadata_round_trip_and_corruption() {
        let m = sample_meta();
        let bytes = m.encode();
        assert_eq!(CheckpointMetadata::decode(&bytes, "x").unwrap(), m);
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 1;
        let e = CheckpointMetadata::decode(&flipped, "x").unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        let e = CheckpointMetadata::decode(&bytes[..bytes.len() - 5], "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected"), "{e}");
        assert!(CheckpointMetadata::decode(b"garbage", "x").is_err());
    }

    #[test]
    fn blocks_detect_truncation_and_flips() {
        let mut w = StateFileWriter::new();
        let off = w.begin_block();
        let mut ew = EntryWriter::begin(w.payload(), "s");
        ew.entry(b"k1", b"", b"v1");
        ew.entry(b"k2", b"n", b"v2");
        assert_eq!(ew.finish(), 2);
        w.end_block();
        let file = w.finish();
        let payload = read_block(&file, off, "f").unwrap();
        let mut got = Vec::new();
        for_each_entry(payload, "s", |e| {
            got.push((e.key.to_vec(), e.namespace.to_vec(), e.value.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], (b"k2".to_vec(), b"n".to_vec(), b"v2".to_vec()));
        assert_eq!(state_names(payload).unwrap(), vec!["s"]);
        assert!(read_block(&file[..file.len() - 1], off, "f").is_err());
        let mut bad = file.clone();
        let n = bad.len() - 1;
        bad[n] ^= 0xff;
        let e = read_block(&bad, off, "f").unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(Cursor::new(&b).varint().unwrap(), v);
        }
    }
}
