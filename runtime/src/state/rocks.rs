//! The RocksDB state backend: one instance per operator subtask, a column family per state.
//!
//! Every key is `key group (2 bytes, big-endian) | varint(len(key)) | key | namespace`, so a
//! key-group range is a contiguous key range and a stored entry converts to the canonical
//! `(key, namespace, value)` form without knowing its types. Values are the same postcard bytes
//! the memory backend writes, so canonical snapshots move between backends unchanged.
//!
//! A checkpoint flushes the memtables and takes a RocksDB native checkpoint (hard links) on the
//! task thread; the uploader then sends only the SST files that no completed checkpoint already
//! holds (incremental), or all of them (full mode).

use super::{CurrentKey, Key, StateId, StateValue};
use crate::checkpoint::CheckpointId;
use crate::error::{Error, Result};
use crate::keygroup::{KeyGroup, KeyGroupRange};
use crate::snapshot::{
    for_each_entry, put_varint, state_names, Cursor, EntryWriter, KeyGroupIndex, RestoredKeyGroups, RocksFile,
    StateFileWriter,
};
use rocksdb::checkpoint::Checkpoint;
use rocksdb::{ColumnFamily, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn db_err(what: &str, e: rocksdb::Error) -> Error {
    Error::User(format!("rocksdb {what} failed: {e}"))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::User(format!("{what} {}: {e}", path.display()))
}

/// Builds the stored key for (key group, serialized key, namespace).
pub(crate) fn rocks_key(kg: KeyGroup, key: &[u8], namespace: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + 2 + key.len() + namespace.len());
    k.extend_from_slice(&kg.to_be_bytes());
    put_varint(&mut k, key.len() as u64);
    k.extend_from_slice(key);
    k.extend_from_slice(namespace);
    k
}

/// Splits a stored key into (key group, serialized key, namespace).
pub(crate) fn split_rocks_key(k: &[u8]) -> Result<(KeyGroup, &[u8], &[u8])> {
    if k.len() < 3 {
        return Err(Error::Serde("stored key too short".into()));
    }
    let kg = KeyGroup(u16::from_be_bytes([k[0], k[1]]));
    let mut c = Cursor::new(&k[2..]);
    let key = c.bytes()?;
    let used = 2 + (k.len() - 2 - c.remaining());
    Ok((kg, key, &k[used..]))
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // State is read-modify-written per record: update memtable entries in place (one entry per
    // key instead of one per update) when the new value fits.
    o.set_inplace_update_support(true);
    o.set_allow_concurrent_memtable_write(false);
    o
}

fn open_db(path: &Path) -> Result<DB> {
    let opts = db_options();
    let cfs = DB::list_cf(&opts, path).unwrap_or_else(|_| vec!["default".to_string()]);
    DB::open_cf(&opts, path, cfs).map_err(|e| db_err("open", e))
}

/// Keyed state of one operator subtask in RocksDB.
pub struct RocksBackend {
    range: KeyGroupRange,
    db: DB,
    dir: PathBuf,
    names: Vec<String>,
    write: WriteOptions,
    incremental: bool,
    /// SST files held by the latest completed checkpoint: local name -> stored file.
    confirmed: HashMap<String, RocksFile>,
    /// SST files of checkpoints not yet confirmed, filled in by the uploader.
    pending: Arc<Mutex<BTreeMap<CheckpointId, Vec<RocksFile>>>>,
}

// The operations take the same type parameters as the memory backend's, so that `dispatch!`
// calls both alike; RocksDB works on bytes and needs only some of them.
#[allow(clippy::extra_unused_type_parameters)]
impl RocksBackend {
    /// Opens a fresh instance in `dir` (wiped first), loading restored state.
    pub fn open(
        range: KeyGroupRange,
        dir: &Path,
        restored: RestoredKeyGroups,
        incremental: bool,
        merge: crate::config::RescaleMerge,
    ) -> Result<Self> {
        let db_path = dir.join("db");
        if db_path.exists() {
            std::fs::remove_dir_all(&db_path).map_err(|e| io_err("cannot clear", &db_path, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
        let mut confirmed = HashMap::new();
        // Native instances: the one overlapping most becomes the base; the others' key groups
        // in range are copied in.
        let mut natives = restored.rocksdb;
        natives.sort_by_key(|r| std::cmp::Reverse(r.range.intersect(&range).len()));
        let mut others = Vec::new();
        if let Some(base) = natives.first() {
            std::fs::rename(&base.dir, &db_path).map_err(|e| io_err("cannot move restored instance", &base.dir, e))?;
            if base.own_job && base.range == range {
                confirmed = base
                    .files
                    .iter()
                    .filter(|f| f.shared)
                    .map(|f| (f.name.clone(), f.clone()))
                    .collect();
            }
            others = natives[1..].to_vec();
        }
        let db = open_db(&db_path)?;
        let mut backend = Self {
            range,
            db,
            dir: dir.to_path_buf(),
            names: Vec::new(),
            write: {
                let mut w = WriteOptions::default();
                // Checkpoints, not the WAL, make state durable.
                w.disable_wal(true);
                w
            },
            incremental,
            confirmed,
            pending: Default::default(),
        };
        if let Some(base) = natives.first() {
            if base.range != range {
                backend.clip_to_range()?;
            }
        }
        for other in &others {
            backend.merge_in(&other.dir, merge)?;
            let _ = std::fs::remove_dir_all(&other.dir);
        }
        if !restored.blocks.is_empty() {
            backend.load_canonical(&restored.blocks)?;
        }
        Ok(backend)
    }

    fn cf_names(&self) -> Vec<String> {
        DB::list_cf(&db_options(), self.dir.join("db")).unwrap_or_default()
    }

    fn ensure_cf(&mut self, name: &str) -> Result<()> {
        if self.db.cf_handle(name).is_none() {
            self.db
                .create_cf(name, &db_options())
                .map_err(|e| db_err("create column family", e))?;
        }
        Ok(())
    }

    /// Deletes every key group outside this backend's range (range deletes, no rewrite).
    fn clip_to_range(&mut self) -> Result<()> {
        let start = KeyGroup(self.range.start).to_be_bytes().to_vec();
        let end = (self.range.end as u32 + 1).to_be_bytes()[2..].to_vec();
        for name in self.cf_names() {
            let Some(cf) = self.db.cf_handle(&name) else { continue };
            self.db
                .delete_range_cf(cf, &[0u8, 0u8][..], &start[..])
                .map_err(|e| db_err("delete range", e))?;
            if self.range.end < u16::MAX {
                self.db
                    .delete_range_cf(cf, &end[..], &[0xffu8, 0xff, 0xff][..])
                    .map_err(|e| db_err("delete range", e))?;
            }
        }
        Ok(())
    }

    /// Brings in the keys of this range from another restored instance: written in batches
    /// (`Iterate`), or as one SST file per column family that RocksDB ingests (`Ingest`; the
    /// key-group ranges do not overlap, so it places them without rewriting).
    fn merge_in(&mut self, other: &Path, merge: crate::config::RescaleMerge) -> Result<()> {
        let opts = db_options();
        let cfs = DB::list_cf(&opts, other).map_err(|e| db_err("list column families", e))?;
        let src = DB::open_cf_for_read_only(&opts, other, &cfs, false).map_err(|e| db_err("open", e))?;
        let start = KeyGroup(self.range.start).to_be_bytes();
        let end = self.range.end;
        for (i, name) in cfs.iter().enumerate() {
            self.ensure_cf(name)?;
            let Some(from) = src.cf_handle(name) else { continue };
            let to = self.db.cf_handle(name).expect("ensured above");
            // The source's keys from the range start on, up to the range end.
            let rows = src
                .iterator_cf(from, IteratorMode::From(&start, rocksdb::Direction::Forward))
                .map(|item| item.map_err(|e| db_err("iterate", e)))
                .take_while(|item| match item {
                    Ok((k, _)) => split_rocks_key(k).is_ok_and(|(kg, _, _)| kg.0 <= end),
                    Err(_) => true,
                });
            match merge {
                crate::config::RescaleMerge::Iterate => {
                    let mut batch = WriteBatch::default();
                    for row in rows {
                        let (k, v) = row?;
                        batch.put_cf(to, &k, &v);
                    }
                    self.db.write_opt(batch, &self.write).map_err(|e| db_err("write", e))?;
                }
                crate::config::RescaleMerge::Ingest => {
                    let sst = self.dir.join(format!("ingest-{i}.sst"));
                    let mut writer = rocksdb::SstFileWriter::create(&opts);
                    writer.open(&sst).map_err(|e| db_err("create SST", e))?;
                    let mut any = false;
                    for row in rows {
                        let (k, v) = row?;
                        writer.put(&k, &v).map_err(|e| db_err("write SST", e))?;
                        any = true;
                    }
                    if any {
                        writer.finish().map_err(|e| db_err("finish SST", e))?;
                        self.db
                            .ingest_external_file_cf(to, vec![&sst])
                            .map_err(|e| db_err("ingest", e))?;
                    }
                    let _ = std::fs::remove_file(&sst);
                }
            }
        }
        Ok(())
    }

    /// Loads canonical key-group blocks (from a memory-backend snapshot or a savepoint).
    fn load_canonical(&mut self, blocks: &[(KeyGroup, Vec<u8>)]) -> Result<()> {
        for (kg, payload) in blocks {
            if !self.range.contains(*kg) {
                continue;
            }
            for name in state_names(payload)? {
                self.ensure_cf(&name)?;
                let cf = self.db.cf_handle(&name).expect("created above");
                let mut batch = WriteBatch::default();
                for_each_entry(payload, &name, |e| {
                    batch.put_cf(cf, rocks_key(*kg, e.key, e.namespace), e.value);
                    Ok(())
                })?;
                self.db.write_opt(batch, &self.write).map_err(|e| db_err("write", e))?;
            }
        }
        Ok(())
    }

    /// The key groups this backend owns.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    /// Whether no state has been registered.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn register(&mut self, name: &str) -> Result<StateId> {
        if let Some(id) = self.names.iter().position(|n| n == name) {
            return Ok(id);
        }
        self.ensure_cf(name)?;
        self.names.push(name.to_string());
        Ok(self.names.len() - 1)
    }

    pub(crate) fn register_value<K: Key, V: StateValue>(&mut self, name: &str) -> Result<StateId> {
        self.register(name)
    }

    pub(crate) fn register_map<K: Key, UK: Key, UV: StateValue>(&mut self, name: &str) -> Result<StateId> {
        self.register(name)
    }

    fn cf(&self, id: StateId) -> &ColumnFamily {
        self.db
            .cf_handle(&self.names[id])
            .expect("registered states have a column family")
    }

    fn get_raw(&self, id: StateId, key: &[u8]) -> Result<Option<rocksdb::DBPinnableSlice<'_>>> {
        self.db.get_pinned_cf(self.cf(id), key).map_err(|e| db_err("get", e))
    }

    fn put_raw(&self, id: StateId, key: &[u8], value: &[u8]) -> Result<()> {
        self.db
            .put_cf_opt(self.cf(id), key, value, &self.write)
            .map_err(|e| db_err("put", e))
    }

    fn delete_raw(&self, id: StateId, key: &[u8]) -> Result<()> {
        self.db
            .delete_cf_opt(self.cf(id), key, &self.write)
            .map_err(|e| db_err("delete", e))
    }

    pub(crate) fn value_get<K: Key, V: StateValue>(&self, id: StateId, c: &CurrentKey<'_, K>) -> Result<Option<V>> {
        match self.get_raw(id, &rocks_key(c.key_group, c.bytes, b""))? {
            Some(v) => Ok(Some(postcard::from_bytes(&v)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn value_put<K: Key, V: StateValue>(&mut self, id: StateId, c: &CurrentKey<'_, K>, v: V) -> Result<()> {
        self.put_raw(id, &rocks_key(c.key_group, c.bytes, b""), &postcard::to_allocvec(&v)?)
    }

    pub(crate) fn value_update<K: Key, V: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        default: impl FnOnce() -> V,
        f: impl FnOnce(&mut V),
    ) -> Result<()> {
        let key = rocks_key(c.key_group, c.bytes, b"");
        let mut v = match self.get_raw(id, &key)? {
            Some(raw) => postcard::from_bytes(&raw)?,
            None => default(),
        };
        f(&mut v);
        self.put_raw(id, &key, &postcard::to_allocvec(&v)?)
    }

    pub(crate) fn value_remove<K: Key, V: StateValue>(&mut self, id: StateId, c: &CurrentKey<'_, K>) -> Result<()> {
        self.delete_raw(id, &rocks_key(c.key_group, c.bytes, b""))
    }

    fn scan(&self, id: StateId, prefix: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        for item in self
            .db
            .iterator_cf(self.cf(id), IteratorMode::From(prefix, rocksdb::Direction::Forward))
        {
            let (k, v) = item.map_err(|e| db_err("iterate", e))?;
            if !k.starts_with(prefix) {
                break;
            }
            f(&k, &v)?;
        }
        Ok(())
    }

    pub(crate) fn value_entries<K: Key, V: StateValue>(&self, id: StateId) -> Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        self.scan(id, b"", |k, v| {
            let (_, key, _) = split_rocks_key(k)?;
            out.push((postcard::from_bytes(key)?, postcard::from_bytes(v)?));
            Ok(())
        })?;
        Ok(out)
    }

    pub(crate) fn map_get<K: Key, UK: Key, UV: StateValue>(
        &self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: &UK,
    ) -> Result<Option<UV>> {
        let key = rocks_key(c.key_group, c.bytes, &postcard::to_allocvec(uk)?);
        match self.get_raw(id, &key)? {
            Some(v) => Ok(Some(postcard::from_bytes(&v)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn map_put<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: UK,
        uv: UV,
    ) -> Result<()> {
        let key = rocks_key(c.key_group, c.bytes, &postcard::to_allocvec(&uk)?);
        self.put_raw(id, &key, &postcard::to_allocvec(&uv)?)
    }

    pub(crate) fn map_remove<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: &UK,
    ) -> Result<()> {
        self.delete_raw(id, &rocks_key(c.key_group, c.bytes, &postcard::to_allocvec(uk)?))
    }

    pub(crate) fn map_entries<K: Key, UK: Key, UV: StateValue>(
        &self,
        id: StateId,
        c: &CurrentKey<'_, K>,
    ) -> Result<Vec<(UK, UV)>> {
        let mut out = Vec::new();
        self.scan(id, &rocks_key(c.key_group, c.bytes, b""), |k, v| {
            let (_, _, ns) = split_rocks_key(k)?;
            out.push((postcard::from_bytes(ns)?, postcard::from_bytes(v)?));
            Ok(())
        })?;
        Ok(out)
    }

    pub(crate) fn map_clear<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
    ) -> Result<()> {
        let mut keys = Vec::new();
        self.scan(id, &rocks_key(c.key_group, c.bytes, b""), |k, _| {
            keys.push(k.to_vec());
            Ok(())
        })?;
        let mut batch = WriteBatch::default();
        for k in keys {
            batch.delete_cf(self.cf(id), k);
        }
        self.db.write_opt(batch, &self.write).map_err(|e| db_err("write", e))
    }

    pub(crate) fn map_all<K: Key, UK: Key, UV: StateValue>(&self, id: StateId) -> Result<Vec<(K, UK, UV)>> {
        let mut out = Vec::new();
        self.scan(id, b"", |k, v| {
            let (_, key, ns) = split_rocks_key(k)?;
            out.push((
                postcard::from_bytes(key)?,
                postcard::from_bytes(ns)?,
                postcard::from_bytes(v)?,
            ));
            Ok(())
        })?;
        Ok(out)
    }

    /// Flushes and takes a native checkpoint (hard links) on local disk.
    pub fn snapshot(&mut self, id: CheckpointId) -> Result<RocksSnapshot> {
        // `create_checkpoint` flushes every column family first (the WAL is off, so the memtables
        // must reach SST files to be in the checkpoint).
        let dir = self.dir.join(format!("chk-{}", id.0));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| io_err("cannot clear", &dir, e))?;
        }
        Checkpoint::new(&self.db)
            .and_then(|c| c.create_checkpoint(&dir))
            .map_err(|e| db_err("checkpoint", e))?;
        Ok(RocksSnapshot {
            id,
            dir,
            range: self.range,
            incremental: self.incremental,
            confirmed: self.confirmed.clone(),
            pending: self.pending.clone(),
        })
    }

    /// Checkpoint `id` completed: its SST files may be referenced from now on.
    pub fn checkpoint_complete(&mut self, id: CheckpointId) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(files) = pending.remove(&id) {
            self.confirmed = files
                .into_iter()
                .filter(|f| f.shared)
                .map(|f| (f.name.clone(), f))
                .collect();
        }
        pending.retain(|k, _| *k > id);
    }
}

impl Drop for RocksBackend {
    fn drop(&mut self) {
        // Remove the instance; a native checkpoint still being uploaded removes itself (its
        // `RocksSnapshot` drop), and whichever goes last removes the emptied directory.
        let _ = std::fs::remove_dir_all(self.dir.join("db"));
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("restore-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A native checkpoint of a [`RocksBackend`] on local disk, waiting to be persisted.
pub struct RocksSnapshot {
    id: CheckpointId,
    dir: PathBuf,
    range: KeyGroupRange,
    incremental: bool,
    confirmed: HashMap<String, RocksFile>,
    pending: Arc<Mutex<BTreeMap<CheckpointId, Vec<RocksFile>>>>,
}

/// The local files of a native checkpoint, split into SSTs and the small files.
pub struct RocksLocalFiles {
    /// SST files: (name, local path, size).
    pub ssts: Vec<(String, PathBuf, u64)>,
    /// Small files (MANIFEST, CURRENT, OPTIONS): (name, bytes).
    pub small: Vec<(String, Vec<u8>)>,
}

impl RocksSnapshot {
    /// The checkpoint's key groups.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    /// Whether SSTs go to the shared directory and are referenced by later checkpoints.
    pub fn incremental(&self) -> bool {
        self.incremental
    }

    /// The stored file that already holds SST `name` of `size` bytes, if a completed
    /// checkpoint uploaded it.
    pub fn already_stored(&self, name: &str, size: u64) -> Option<&RocksFile> {
        self.confirmed.get(name).filter(|f| f.size == size)
    }

    /// Lists the local files.
    pub fn local_files(&self) -> Result<RocksLocalFiles> {
        let mut files = RocksLocalFiles {
            ssts: Vec::new(),
            small: Vec::new(),
        };
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_err("cannot list", &self.dir, e))?;
        for e in entries {
            let e = e.map_err(|e| io_err("cannot list", &self.dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if name.ends_with(".sst") {
                let size = e.metadata().map_err(|err| io_err("cannot stat", &path, err))?.len();
                files.ssts.push((name, path, size));
            } else {
                let bytes = std::fs::read(&path).map_err(|err| io_err("cannot read", &path, err))?;
                files.small.push((name, bytes));
            }
        }
        files.ssts.sort();
        files.small.sort();
        Ok(files)
    }

    /// Records the files this checkpoint consists of, for `checkpoint_complete`.
    pub fn record(&self, files: Vec<RocksFile>) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id, files);
    }

    /// Writes canonical key-group blocks from the native checkpoint (for savepoints).
    pub fn write_canonical(&self, w: &mut StateFileWriter) -> Result<KeyGroupIndex> {
        let opts = db_options();
        let cfs = DB::list_cf(&opts, &self.dir).map_err(|e| db_err("list column families", e))?;
        let db = DB::open_cf_for_read_only(&opts, &self.dir, &cfs, false).map_err(|e| db_err("open", e))?;
        let mut offsets = Vec::with_capacity(self.range.len());
        for kg in self.range.iter() {
            offsets.push(w.begin_block());
            for name in cfs.iter().filter(|n| *n != "default") {
                let cf = db.cf_handle(name).expect("listed");
                let prefix = kg.to_be_bytes();
                let mut ew: Option<EntryWriter<'_>> = None;
                for item in db.iterator_cf(cf, IteratorMode::From(&prefix, rocksdb::Direction::Forward)) {
                    let (k, v) = item.map_err(|e| db_err("iterate", e))?;
                    if !k.starts_with(&prefix) {
                        break;
                    }
                    let (_, key, ns) = split_rocks_key(&k)?;
                    if ew.is_none() {
                        ew = Some(EntryWriter::begin(w.payload(), name));
                    }
                    if let Some(ew) = ew.as_mut() {
                        ew.entry(key, ns, &v);
                    }
                }
                if let Some(ew) = ew {
                    ew.finish();
                }
            }
            w.end_block();
        }
        Ok(KeyGroupIndex {
            range: self.range,
            offsets,
        })
    }
}

impl Drop for RocksSnapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(parent) = self.dir.parent() {
            // Succeeds only once the backend is gone and nothing else is left.
            let _ = std::fs::remove_dir(parent);
        }
    }
}
