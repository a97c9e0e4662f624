//! The RocksDB state backend: one instance per operator subtask, a column family per state.
//!
//! Every key is `key group (2 bytes, big-endian) | varint(len(key)) | key | namespace`, so a
//! key-group range is a contiguous key range and a stored entry converts to the canonical
//! `(key, namespace, value)` form without knowing its types. Values are the same postcard bytes
//! the memory backend writes, so canonical snapshots move between backends unchanged.
//!
//! Writes go to a bounded write-back cache first (`write_cache`), and through the entry cache
//! (`entry_cache`), which reads look in first. At a barrier the task thread only freezes the
//! write cache; a background thread writes it as SST files, ingests them into RocksDB and takes
//! a RocksDB native checkpoint (hard links), and the uploader then sends only the SST files that
//! no completed checkpoint already holds (incremental), or all of them (full mode).
//!
//! The column family of a state with a TTL drops expired entries when RocksDB compacts it (a
//! compaction filter reading each value's leading timestamp, see `ttl.rs`), so keys never read
//! again do not stay forever. The filter judges expiry by the backend's processing time (an
//! atomic the task thread advances at every batch and timer round, before their reads), never
//! by the wall clock: reads use that time or a later one, so an entry the filter drops is one
//! every read from then on treats as absent. This is safe with the caches in front too: a
//! newer value or deletion of the key still in the write cache shadows whatever RocksDB holds,
//! and the entry cache may still hold an expired value, which reads judge by its timestamp as
//! they would RocksDB's. A list
//! is dropped once its newest element expired; expired elements of a list that still has live
//! ones go at its next read or append (see `ttl::list_add`).

use super::entry_cache::EntryCache;
use super::rocks_ffi;
use super::ttl::{is_ttl_name, stored_timestamp, StateTtlConfig};
use super::write_cache::{self, Background, CacheKey, Cached, Entries, Value, WriteCache};
use super::{CurrentKey, Key, StateId, StateValue};
use crate::checkpoint::CheckpointId;
use crate::element::Timestamp;
use crate::error::{Error, Result};
use crate::keygroup::{KeyGroup, KeyGroupRange};
use crate::snapshot::{
    for_each_entry, put_varint, state_names, Cursor, EntryWriter, KeyGroupIndex, RestoredKeyGroups, RestoredRocks,
    RocksFile, StateFileWriter,
};
use rocksdb::checkpoint::Checkpoint;
use rocksdb::compaction_filter::CompactionFilter;
use rocksdb::compaction_filter_factory::{CompactionFilterContext, CompactionFilterFactory};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, CompactionDecision, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteOptions, DB,
};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

fn db_err(what: &str, e: rocksdb::Error) -> Error {
    Error::User(format!("rocksdb {what} failed: {e}"))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::User(format!("{what} {}: {e}", path.display()))
}

/// A stored key being built: most fit in place (no allocation).
pub(crate) type StoredKey = smallvec::SmallVec<[u8; 24]>;

/// Builds the stored key for (key group, serialized key, namespace).
pub(crate) fn rocks_key(kg: KeyGroup, key: &[u8], namespace: &[u8]) -> StoredKey {
    let mut k = StoredKey::new();
    k.extend_from_slice(&kg.to_be_bytes());
    put_varint(&mut k, key.len() as u64);
    k.extend_from_slice(key);
    k.extend_from_slice(namespace);
    k
}

/// The stored key of map entry `uk` of the current key: the user key serialized in place.
fn map_key<K: Key, UK: Key>(c: &CurrentKey<'_, K>, uk: &UK) -> Result<StoredKey> {
    Ok(postcard::to_extend(uk, rocks_key(c.key_group, c.bytes, b""))?)
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

/// The options of every instance and column family: a copy of one built once, because each
/// `Options::default()` creates a default table factory (with a block cache of its own) only
/// to have it replaced.
fn db_options() -> Options {
    static OPTIONS: std::sync::OnceLock<Options> = std::sync::OnceLock::new();
    OPTIONS.get_or_init(build_db_options).clone()
}

/// Warnings RocksDB logs on every restore, though nothing is wrong: the tail prefetch size
/// it learned, and SSTs restored from a checkpoint whose manifest does not list their unique
/// ids (checkpoint files are verified by their CRC32 instead).
fn routine_warning(msg: &str) -> bool {
    msg.contains("Tail prefetch size") || msg.contains("opened without unique ID to verify")
}

fn build_db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // State is read-modify-written per record: update memtable entries in place (one entry per
    // key instead of one per update) when the new value fits.
    o.set_inplace_update_support(true);
    // Lock stripes of in-place updates, allocated per column family at every open: at most two
    // threads use an instance, RocksDB's default of 10,000 cost a restore about 1.3 ms.
    o.set_inplace_update_locks(1024);
    o.set_allow_concurrent_memtable_write(false);
    // Threads that open an instance's SST files at start: the default of 16 costs more to
    // start than small restores take to open their files.
    o.set_max_file_opening_threads(2);
    // RocksDB's warnings and errors go to the process's log; no LOG file per instance, whose
    // creation and options dump cost every open time (its header lines are dropped).
    o.set_info_logger(rocksdb::InfoLogger::new_callback_logger(
        rocksdb::LogLevel::Warn,
        |level, msg| match level {
            rocksdb::LogLevel::Warn if routine_warning(msg) => tracing::debug!(target: "rocksdb", "{}", msg.trim_end()),
            rocksdb::LogLevel::Warn => tracing::warn!(target: "rocksdb", "{}", msg.trim_end()),
            rocksdb::LogLevel::Error | rocksdb::LogLevel::Fatal => {
                tracing::error!(target: "rocksdb", "{}", msg.trim_end())
            }
            _ => {}
        },
    ));
    // Compaction statistics are not loaded from every table's properties at open.
    o.set_skip_stats_update_on_db_open(true);
    // Each checkpoint ingests one level-0 file per changed state. Compact 16 of them at a time
    // rather than RocksDB's 4: with keys spread over the whole key space each compaction into
    // level 1 rewrites all of it, so fewer, larger ones rewrite it less often (measured: 10
    // million keys, 1 s checkpoints, +20 % events/s). Reads pay for the extra files only when
    // the entry cache misses. Writes slow down and stop later in proportion.
    o.set_level_zero_file_num_compaction_trigger(16);
    o.set_level_zero_slowdown_writes_trigger(40);
    o.set_level_zero_stop_writes_trigger(64);
    rocks_ffi::skip_identity_file(&mut o);
    let mut table = rocksdb::BlockBasedOptions::default();
    // Most reads are point lookups, many of keys not stored yet: bloom filters spare reading
    // every level's blocks for them. One block cache serves all instances of the process.
    table.set_bloom_filter(10.0, false);
    // A hash index in each data block: a point lookup finds its key in the block without a
    // binary search of key comparisons (files written before are read as they are).
    table.set_data_block_index_type(rocksdb::DataBlockIndexType::BinaryAndHash);
    table.set_block_cache(block_cache());
    // Index and filter blocks of L1 and deeper load into the block cache at their first read,
    // not when a table opens: opening an instance (or ingesting its files at a rescale) reads
    // only each file's footer and properties, not its megabytes of filter. L0's (small, and
    // probed by every read) load at open and stay pinned.
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    o.set_block_based_table_factory(&table);
    o
}

/// The process-wide RocksDB block cache.
fn block_cache() -> &'static rocksdb::Cache {
    const BLOCK_CACHE_BYTES: usize = 256 << 20;
    static CACHE: std::sync::OnceLock<rocksdb::Cache> = std::sync::OnceLock::new();
    // HyperClockCache: lookups without the LRU cache's shard mutex and list updates.
    CACHE.get_or_init(|| rocksdb::Cache::new_hyper_clock_cache(BLOCK_CACHE_BYTES, 0))
}

/// The TTL compaction filters of one instance: per TTL state's column family its TTL in ms (0
/// until the state registers), and the clock the filters judge expiry by. Only TTL states get
/// a filter: timers, window panes and states without TTL would pay a callback per entry per
/// compaction just to keep it.
struct TtlFilters {
    ttls: HashMap<String, Arc<AtomicI64>>,
    /// The backend's processing time: the `now` of the batch or timer round being processed
    /// (`Timestamp::MIN` before the first, so that nothing is dropped before any read), which
    /// no later read goes below. Only the task thread writes it.
    clock: Arc<AtomicI64>,
}

impl TtlFilters {
    fn new() -> Self {
        Self {
            ttls: HashMap::new(),
            clock: Arc::new(AtomicI64::new(Timestamp::MIN)),
        }
    }

    /// The TTL slot of a TTL state's column family.
    fn slot(&mut self, cf: &str) -> Arc<AtomicI64> {
        self.ttls.entry(cf.to_string()).or_default().clone()
    }

    /// The options of column family `cf`: the instance's, with the TTL compaction filter when
    /// it holds a TTL state.
    fn cf_options(&mut self, cf: &str) -> Options {
        let mut o = db_options();
        if is_ttl_name(cf) {
            o.set_compaction_filter_factory(TtlFilterFactory {
                ttl_ms: self.slot(cf),
                clock: self.clock.clone(),
            });
        }
        o
    }
}

/// Makes a [`TtlFilter`] per compaction, with the column family's TTL and the backend's
/// processing time then. It only reads atomics: RocksDB may call it from several compaction
/// threads at once.
struct TtlFilterFactory {
    ttl_ms: Arc<AtomicI64>,
    clock: Arc<AtomicI64>,
}

impl CompactionFilterFactory for TtlFilterFactory {
    type Filter = TtlFilter;

    fn create(&mut self, _: CompactionFilterContext) -> TtlFilter {
        TtlFilter {
            ttl_ms: self.ttl_ms.load(Ordering::Acquire),
            now: self.clock.load(Ordering::Acquire),
        }
    }

    fn name(&self) -> &CStr {
        c"sluice-ttl"
    }
}

/// Drops entries whose leading timestamp is expired; keeps everything while the state has not
/// registered its TTL yet, and any value it cannot read a timestamp from.
struct TtlFilter {
    ttl_ms: i64,
    now: Timestamp,
}

impl CompactionFilter for TtlFilter {
    fn filter(&mut self, _level: u32, _key: &[u8], value: &[u8]) -> CompactionDecision {
        if self.ttl_ms > 0 && stored_timestamp(value).is_some_and(|ts| super::ttl::expired(ts, self.ttl_ms, self.now)) {
            CompactionDecision::Remove
        } else {
            CompactionDecision::Keep
        }
    }

    fn name(&self) -> &CStr {
        c"sluice-ttl"
    }
}

/// Options of a read through all of an instance's keys (a savepoint, a merge by copying):
/// its blocks stay out of the block cache, which would otherwise evict every instance's hot
/// blocks and index and filter blocks for data read once.
fn bulk_read() -> ReadOptions {
    let mut r = ReadOptions::default();
    r.fill_cache(false);
    r
}

fn write_options() -> WriteOptions {
    let mut w = WriteOptions::default();
    // Checkpoints, not the WAL, make state durable.
    w.disable_wal(true);
    w
}

/// Writes into RocksDB in batches of bounded size (a restore may bring in millions
/// of entries).
struct BatchWriter<'a> {
    db: &'a DB,
    write: &'a WriteOptions,
    batch: WriteBatch,
}

impl<'a> BatchWriter<'a> {
    const BATCH_BYTES: usize = 4 << 20;

    fn new(db: &'a DB, write: &'a WriteOptions) -> Self {
        Self {
            db,
            write,
            batch: WriteBatch::default(),
        }
    }

    /// Puts `value` under `key` (`None`: deletes it).
    fn put(&mut self, cf: &ColumnFamily, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        match value {
            Some(v) => self.batch.put_cf(cf, key, v),
            None => self.batch.delete_cf(cf, key),
        }
        if self.batch.size_in_bytes() >= Self::BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.batch.is_empty() {
            self.db
                .write_opt(std::mem::take(&mut self.batch), self.write)
                .map_err(|e| db_err("write", e))?;
        }
        Ok(())
    }
}

/// Where, under a backend's working directory, SST files are written before they are ingested.
const INGEST_DIR: &str = "ingest";

/// How many entries ahead [`ingest_entries`] prefetches.
const MOVE_PREFETCH_AHEAD: usize = 8;

/// Writes cached entries into RocksDB as one new SST file per state (written in `staging`,
/// then moved in). Why not through the memtable: inserting there (each key looked up first, as
/// in-place updates need) and flushing it again cost three times as much as writing the sorted
/// entries straight into a file.
fn ingest_entries(db: &DB, names: &[String], entries: &[Entries], staging: &Path) -> Result<()> {
    let mut ingest = rocksdb::IngestExternalFileOptions::default();
    ingest.set_move_files(true);
    let options = db_options();
    for (id, map) in entries.iter().enumerate() {
        if map.is_empty() {
            continue;
        }
        let cf = db
            .cf_handle(&names[id])
            .ok_or_else(|| Error::User(format!("rocksdb column family {} is missing", names[id])))?;
        std::fs::create_dir_all(staging).map_err(|e| io_err("cannot create", staging, e))?;
        let path = staging.join(format!("{id}.sst"));
        let mut w = rocksdb::SstFileWriter::create(&options);
        w.open(&path).map_err(|e| db_err("create an SST file", e))?;
        let entries = map.in_order();
        for (i, (k, v)) in entries.iter().enumerate() {
            // In key order the entries lie scattered over the cache's table: the ones a few
            // places on are loaded while these are written.
            if let Some((k, v)) = entries.get(i + MOVE_PREFETCH_AHEAD) {
                super::prefetch::prefetch_slice(k, 1);
                super::prefetch::prefetch_slice(v.unwrap_or_default(), 1);
            }
            match *v {
                Some(v) => w.put(k, v),
                None => w.delete(k),
            }
            .map_err(|e| db_err("write an SST file", e))?;
        }
        w.finish().map_err(|e| db_err("finish an SST file", e))?;
        db.ingest_external_file_cf_opts(cf, &ingest, vec![&path])
            .map_err(|e| db_err("ingest", e))?;
    }
    Ok(())
}

/// Ingests another instance's files of one column family, in order: those it wrote itself up to
/// its first external one in one call, keeping their sequence numbers; then each file after it
/// on its own, as the newest. Refused before anything goes in where that would be wrong: a file
/// it wrote itself after an external one (it cannot be placed there), or an external file with
/// keys outside the instance's key groups `own` (keys an earlier restore's range deletes hid
/// there; as the newest they would shadow other instances' values; files it wrote itself that
/// overlap data already here RocksDB refuses). Whether any file went in, and the first refusal.
fn ingest_in_order(
    db: &DB,
    cf: &ColumnFamily,
    files: &[rocks_ffi::LiveFile],
    own: KeyGroupRange,
) -> (bool, Result<()>) {
    let first_external = files.iter().position(|f| f.external).unwrap_or(files.len());
    let (generated, rest) = files.split_at(first_external);
    let refusal = |why: &str| (false, Err(Error::User(format!("rocksdb: {why}"))));
    if rest.iter().any(|f| !f.external) {
        return refusal("a file the instance wrote itself follows an ingested one");
    }
    if rest
        .iter()
        .any(|f| !f.key_groups.is_some_and(|kgs| own.contains_range(&kgs)))
    {
        return refusal("an ingested file holds keys of other key groups");
    }
    if !generated.is_empty() {
        let paths: Vec<&Path> = generated.iter().map(|f| f.path.as_path()).collect();
        if let Err(e) = rocks_ffi::ingest_files(db, &cf, &paths, true) {
            return (false, Err(e));
        }
    }
    let mut partly = !generated.is_empty();
    for f in rest {
        let result = rocks_ffi::ingest_files(db, &cf, &[&f.path], false);
        if result.is_err() {
            return (partly, result);
        }
        partly = true;
    }
    (partly, Ok(()))
}

/// Work for a backend's checkpoint thread: move a frozen cache in, take a native checkpoint.
type MoveJob = Box<dyn FnOnce() + Send>;

/// A stored value: from the write cache or pinned in RocksDB.
enum Raw<'a> {
    Cached(&'a [u8]),
    Stored(rocksdb::DBPinnableSlice<'a>),
}

impl std::ops::Deref for Raw<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Raw::Cached(v) => v,
            Raw::Stored(v) => v,
        }
    }
}

/// Opens the instance at `path` with all its column families (those of TTL states with their
/// TTL filter); their names.
fn open_db(path: &Path, ttl: &mut TtlFilters) -> Result<(DB, Vec<String>)> {
    let opts = db_options();
    let cfs = DB::list_cf(&opts, path).unwrap_or_else(|_| vec!["default".to_string()]);
    let descriptors: Vec<_> = cfs
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(name, ttl.cf_options(name)))
        .collect();
    let db = DB::open_cf_descriptors(&opts, path, descriptors).map_err(|e| db_err("open", e))?;
    Ok((db, cfs))
}

/// The shared SST files of a checkpoint by local name: what later checkpoints may reference.
fn shared_by_name(files: impl IntoIterator<Item = RocksFile>) -> Arc<HashMap<String, RocksFile>> {
    Arc::new(
        files
            .into_iter()
            .filter(|f| f.shared)
            .map(|f| (f.name.clone(), f))
            .collect(),
    )
}

/// Another old instance to merge into a restored one, opened read only.
struct OldInstance {
    src: DB,
    names: Vec<String>,
    /// Its SST files per column family, in ingestion order; `None` to copy keys instead.
    files: Option<BTreeMap<String, Vec<rocks_ffi::LiveFile>>>,
}

impl OldInstance {
    fn open(dir: &Path, merge: crate::config::RescaleMerge) -> Result<Self> {
        let mut opts = db_options();
        // Not every table opened up front (RocksDB's default): ingestion opens the files itself,
        // and copying keys opens what it reads.
        opts.set_max_open_files(64);
        let names = DB::list_cf(&opts, dir).map_err(|e| db_err("list column families", e))?;
        // Column families opened with the instance's options: with default ones each would
        // create (and at close destroy) a block cache of its own.
        let descriptors = names.iter().map(|name| ColumnFamilyDescriptor::new(name, opts.clone()));
        let src = DB::open_cf_descriptors_read_only(&opts, dir, descriptors, false).map_err(|e| db_err("open", e))?;
        let files = match merge {
            crate::config::RescaleMerge::Ingest => Some(rocks_ffi::files_for_ingestion(&src, dir)?),
            crate::config::RescaleMerge::Iterate => None,
        };
        Ok(Self { src, names, files })
    }
}

/// Keyed state of one operator subtask in RocksDB.
pub struct RocksBackend {
    range: KeyGroupRange,
    /// Shared with the background thread that moves a frozen cache into it.
    db: Arc<DB>,
    names: Vec<String>,
    /// The TTL of each registered state.
    ttls: Vec<Option<StateTtlConfig>>,
    filters: TtlFilters,
    write: WriteOptions,
    cache: WriteCache,
    /// The latest values of recently used keys, read first (`&self` reads fill it too).
    entries: RefCell<EntryCache>,
    /// Feeds the checkpoint thread; dropping it ends the thread.
    mover: Option<crossbeam_channel::Sender<MoveJob>>,
    incremental: bool,
    /// SST files held by the latest completed checkpoint: local name -> stored file (shared
    /// with every snapshot taken since, not copied at each barrier).
    confirmed: Arc<HashMap<String, RocksFile>>,
    /// SST files of checkpoints not yet confirmed, filled in by the uploader.
    pending: Arc<Mutex<BTreeMap<CheckpointId, Vec<RocksFile>>>>,
    /// How the restore merged other old instances' column families in.
    merged: MergeCounts,
    /// The working directory; last, so that it is removed after the instance has closed.
    dir: WorkDir,
}

/// Column families a restore merged in from other old instances, by path, and the SST files
/// ingested.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MergeCounts {
    /// Brought in as the old instance's own SST files.
    pub ingested: usize,
    /// SST files ingested, over all those column families.
    pub files: usize,
    /// Brought in key by key.
    pub copied: usize,
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
        settings: crate::config::RocksDbSettings,
    ) -> Result<Self> {
        let merge = settings.rescale_merge;
        // Step times go to the debug log: where a restore's time goes.
        let started = std::time::Instant::now();
        let db_path = dir.join("db");
        if db_path.exists() {
            std::fs::remove_dir_all(&db_path).map_err(|e| io_err("cannot clear", &db_path, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
        let mut confirmed = Arc::default();
        // Native instances: the one overlapping most becomes the base; the others' key groups
        // are brought in, then whatever lies outside the range is deleted. Of those overlapping
        // alike: one inside the range (copying keys from the other then needs no clip), then
        // the one costliest to bring in. Ingestion syncs each file: files linked from local
        // storage are clean, so the cost is per file (the open reads the base's tables on
        // parallel threads); downloaded files are written back whole, as copied keys are.
        let over_empty = restored.rocksdb.is_empty() && restored.blocks.is_empty();
        let mut natives = restored.rocksdb;
        let cost = |r: &RestoredRocks| match merge {
            crate::config::RescaleMerge::Ingest if r.linked => r.files.len() as u64,
            _ => r.files.iter().map(|f| f.size).sum(),
        };
        natives.sort_by_key(|r| {
            let overlap = r.range.intersect(&range).len();
            std::cmp::Reverse((overlap, range.contains_range(&r.range), cost(r)))
        });
        let mut others = natives.into_iter();
        let base = others.next();
        if let Some(base) = &base {
            std::fs::rename(&base.dir, &db_path).map_err(|e| io_err("cannot move restored instance", &base.dir, e))?;
            if base.own_job && base.range == range {
                confirmed = shared_by_name(base.files.iter().cloned());
            }
        }
        let mut filters = TtlFilters::new();
        // The other old instances open (read only) while the base does: opening costs
        // milliseconds of reading and syncing each, on otherwise idle cores.
        let others: Vec<_> = others.collect();
        let (opened, others_opened) = std::thread::scope(|s| {
            let opening: Vec<_> = (others.iter())
                .map(|o| s.spawn(|| OldInstance::open(&o.dir, merge)))
                .collect();
            let base = open_db(&db_path, &mut filters);
            let others: Vec<Result<OldInstance>> = (opening.into_iter())
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::User("rocksdb: opening an old instance panicked".into())))
                })
                .collect();
            (base, others)
        });
        let (db, mut cfs) = opened?;
        // The base's open, and waiting for the other instances' (opened at the same time).
        let opening = started.elapsed();
        let mut backend = Self {
            range,
            db: Arc::new(db),
            names: Vec::new(),
            ttls: Vec::new(),
            filters,
            write: write_options(),
            cache: WriteCache::new(write_cache::DEFAULT_LIMIT),
            entries: RefCell::new(EntryCache::new(settings.entry_cache_bytes, over_empty)),
            mover: None,
            incremental,
            confirmed,
            pending: Default::default(),
            merged: MergeCounts::default(),
            dir: WorkDir(dir.to_path_buf()),
        };
        // Clipped after the merges: range deletes in the base would overlap the files ingested.
        let mut clip = base.is_some_and(|b| !range.contains_range(&b.range));
        for (other, opened) in others.iter().zip(others_opened) {
            clip |= backend.merge_in(opened?, other.range, &mut cfs)? && !range.contains_range(&other.range);
            let _ = std::fs::remove_dir_all(&other.dir);
        }
        if backend.merged != MergeCounts::default() {
            let MergeCounts {
                ingested,
                files,
                copied,
            } = backend.merged;
            tracing::debug!(%range, ingested, files, copied, "merged old instances' column families");
        }
        let merging = started.elapsed() - opening;
        if clip {
            backend.clip_to_range(&cfs)?;
        }
        if !restored.blocks.is_empty() {
            backend.load_canonical(&restored.blocks)?;
        }
        let clip_and_load = started.elapsed() - opening - merging;
        tracing::debug!(%range, ?opening, ?merging, ?clip_and_load, "rocksdb instance restored");
        Ok(backend)
    }

    fn ensure_cf(&mut self, name: &str) -> Result<()> {
        if self.db.cf_handle(name).is_none() {
            // Creating a column family needs the instance to itself: no move in progress.
            self.cache.settle()?;
            let opts = self.filters.cf_options(name);
            Arc::get_mut(&mut self.db)
                .ok_or_else(|| Error::User(format!("cannot create rocksdb column family {name} now")))?
                .create_cf(name, &opts)
                .map_err(|e| db_err("create column family", e))?;
        }
        Ok(())
    }

    /// Deletes every key group outside this backend's range (range deletes, no rewrite).
    fn clip_to_range(&mut self, cfs: &[String]) -> Result<()> {
        let start = KeyGroup(self.range.start).to_be_bytes().to_vec();
        let end = (self.range.end as u32 + 1).to_be_bytes()[2..].to_vec();
        for name in cfs {
            let Some(cf) = self.db.cf_handle(name) else { continue };
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

    /// Brings in another restored instance, per column family: its SST files as they are
    /// (`Ingest`: key-group ranges of old subtasks do not overlap, so RocksDB places them
    /// without rewriting; keys outside this range are clipped afterwards), or its keys in this
    /// range written in batches (`Iterate`, and where RocksDB refuses the files because they
    /// overlap data already here, e.g. an earlier rescale's range deletes not yet compacted, or
    /// that [`ingest_in_order`] refuses; files that went in before a refusal are first deleted
    /// again, by a range delete of the other instance's key groups).
    /// Column families new to this instance are added to `cfs`. Returns whether any files were
    /// ingested (whose keys outside the range then need clipping).
    fn merge_in(&mut self, other: OldInstance, other_range: KeyGroupRange, cfs: &mut Vec<String>) -> Result<bool> {
        let OldInstance { src, names, mut files } = other;
        let start = KeyGroup(self.range.start).to_be_bytes();
        let end = KeyGroup(self.range.end).to_be_bytes();
        let mut ingested = false;
        for name in &names {
            self.ensure_cf(name)?;
            if !cfs.contains(name) {
                cfs.push(name.clone());
            }
            let Some(from) = src.cf_handle(name) else { continue };
            let to = self.db.cf_handle(name).expect("ensured above");
            // A restored instance holds all its data in SST files (checkpoints flush, the WAL
            // is off): a column family without files is empty.
            if let Some(files) = &mut files {
                let Some(files) = files.remove(name) else { continue };
                match ingest_in_order(&self.db, to, &files, other_range) {
                    (_, Ok(())) => {
                        self.merged.ingested += 1;
                        self.merged.files += files.len();
                        ingested = true;
                        continue;
                    }
                    (partly, Err(e)) => {
                        tracing::debug!(cf = %name, "copying keys instead of ingesting files: {e}");
                        if partly {
                            // What went in is taken out again: only the other instance held
                            // these key groups, and the ingested files hold no others.
                            let from = KeyGroup(other_range.start).to_be_bytes().to_vec();
                            let until = match other_range.end {
                                u16::MAX => vec![0xff; 3],
                                end => (end as u32 + 1).to_be_bytes()[2..].to_vec(),
                            };
                            self.db
                                .delete_range_cf(to, &from[..], &until[..])
                                .map_err(|e| db_err("delete range", e))?;
                        }
                    }
                }
            }
            // The source's keys from the range start on, up to the range end (every key starts
            // with its key group, big-endian).
            let rows = src
                .iterator_cf_opt(
                    from,
                    bulk_read(),
                    IteratorMode::From(&start, rocksdb::Direction::Forward),
                )
                .map(|item| item.map_err(|e| db_err("iterate", e)))
                .take_while(|item| match item {
                    Ok((k, _)) => k.get(..2).is_some_and(|kg| kg <= &end[..]),
                    Err(_) => true,
                });
            let mut w = BatchWriter::new(&self.db, &self.write);
            for row in rows {
                let (k, v) = row?;
                w.put(to, &k, Some(&v))?;
            }
            w.flush()?;
            self.merged.copied += 1;
        }
        Ok(ingested)
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
                let mut w = BatchWriter::new(&self.db, &self.write);
                for_each_entry(payload, &name, |e| {
                    w.put(cf, &rocks_key(*kg, e.key, e.namespace), Some(e.value))
                })?;
                w.flush()?;
            }
        }
        Ok(())
    }

    /// The key groups this backend owns.
    pub fn range(&self) -> KeyGroupRange {
        self.range
    }

    /// How the restore merged other old instances in.
    #[cfg(test)]
    pub(crate) fn merged(&self) -> MergeCounts {
        self.merged
    }

    /// Whether no state has been registered.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub(crate) fn processing_time(&self) -> Timestamp {
        self.filters.clock.load(Ordering::Relaxed)
    }

    pub(crate) fn advance_processing_time(&mut self, wall: Timestamp) -> Timestamp {
        let now = self.processing_time().max(wall);
        self.filters.clock.store(now, Ordering::Release);
        now
    }

    /// The TTL of state `name` (as stored) if it is registered.
    pub(crate) fn registered_ttl(&self, name: &str) -> Option<Option<StateTtlConfig>> {
        let id = self.names.iter().position(|n| n == name)?;
        Some(self.ttls[id])
    }

    /// Whether the restored state holds state `name` (as stored): it has a column family.
    pub(crate) fn restored_state(&self, name: &str) -> bool {
        self.db.cf_handle(name).is_some()
    }

    /// Registers state `name` (as stored; `KeyedBackend` checked its TTL). Every kind of state
    /// is the same to RocksDB: bytes in a column family.
    pub(crate) fn register(&mut self, name: &str, ttl: Option<&StateTtlConfig>) -> Result<StateId> {
        let ttl = ttl.copied();
        if let Some(id) = self.names.iter().position(|n| n == name) {
            return Ok(id);
        }
        self.ensure_cf(name)?;
        if let Some(cfg) = ttl {
            // From now on compactions of its column family drop expired entries.
            self.filters.slot(name).store(cfg.ttl_ms(), Ordering::Release);
        }
        self.names.push(name.to_string());
        self.ttls.push(ttl);
        self.cache.register(self.names.len() - 1);
        Ok(self.names.len() - 1)
    }

    /// Test hook: the entries state `id` holds, expired ones included (the write cache merged
    /// over RocksDB).
    #[cfg(test)]
    pub(crate) fn stored_entries(&self, id: StateId) -> Result<usize> {
        let mut n = 0;
        self.scan_stored(id, b"", |_, _| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }

    /// Test hook: writes the write cache into RocksDB (as an overflowing cache does).
    #[cfg(test)]
    pub(crate) fn drain_write_cache(&mut self) -> Result<()> {
        self.drain()
    }

    /// Test hook: compacts every state's column family fully, the TTL filters judging expiry
    /// as they always do, by the backend's processing time.
    #[cfg(test)]
    pub(crate) fn compact(&mut self) -> Result<()> {
        self.cache.settle()?;
        for id in 0..self.names.len() {
            self.db.compact_range_cf(self.cf(id), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Test hook: [`Self::compact`] once processing time has come to `now`.
    #[cfg(test)]
    pub(crate) fn compact_at(&mut self, now: Timestamp) -> Result<()> {
        self.advance_processing_time(now);
        self.compact()
    }

    fn cf(&self, id: StateId) -> &ColumnFamily {
        self.db
            .cf_handle(&self.names[id])
            .expect("registered states have a column family")
    }

    fn get_raw(&self, id: StateId, key: &CacheKey) -> Result<Option<Raw<'_>>> {
        match self.cache.get(id, key) {
            Cached::Value(v) => Ok(Some(Raw::Cached(v))),
            Cached::Deleted => Ok(None),
            Cached::Miss => Ok(self
                .db
                .get_pinned_cf(self.cf(id), key.as_bytes())
                .map_err(|e| db_err("get", e))?
                .map(Raw::Stored)),
        }
    }

    fn put_raw(&mut self, id: StateId, key: impl Into<CacheKey>, value: Option<Value>) -> Result<()> {
        self.cache.release_moved()?;
        let key = key.into();
        self.entries.get_mut().put(id, key.as_bytes(), value.as_deref());
        if self.cache.put(id, key, value) {
            self.drain()?;
        }
        Ok(())
    }

    fn delete_raw(&mut self, id: StateId, key: impl Into<CacheKey>) -> Result<()> {
        self.put_raw(id, key, None)
    }

    /// Has the live cache (it outgrew its limit) moved into RocksDB on the checkpoint thread,
    /// after any frozen one (waiting for that, so a task writing faster than RocksDB takes it
    /// is held back).
    fn drain(&mut self) -> Result<()> {
        self.freeze_and_move(None)?.start();
        Ok(())
    }

    /// Test hook: bounds the write cache (a tiny limit makes every write reach RocksDB soon).
    pub fn set_write_cache_limit(&mut self, bytes: usize) {
        self.cache.set_limit(bytes);
    }

    /// Test hook: bounds the entry cache (0: every read goes to the write cache and RocksDB).
    pub fn set_entry_cache_limit(&mut self, bytes: usize) {
        self.entries.get_mut().set_limit(bytes);
    }

    /// The value stored under `key`, decoded: from the entry cache, or else read and cached.
    fn get_decoded<V: StateValue>(&self, id: StateId, key: &CacheKey) -> Result<Option<V>> {
        if let Some(hit) = self.entries.borrow().get(id, key.as_bytes()) {
            return Ok(match hit {
                Some(v) => Some(postcard::from_bytes(v)?),
                None => None,
            });
        }
        let raw = self.get_raw(id, key)?;
        self.entries.borrow_mut().put(id, key.as_bytes(), raw.as_deref());
        match raw {
            Some(v) => Ok(Some(postcard::from_bytes(&v)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn value_get<K: Key, V: StateValue>(&self, id: StateId, c: &CurrentKey<'_, K>) -> Result<Option<V>> {
        self.get_decoded(id, &rocks_key(c.key_group, c.bytes, b"").into())
    }

    pub(crate) fn value_put<K: Key, V: StateValue>(&mut self, id: StateId, c: &CurrentKey<'_, K>, v: V) -> Result<()> {
        self.put_raw(
            id,
            rocks_key(c.key_group, c.bytes, b""),
            Some(postcard::to_extend(&v, Value::new())?),
        )
    }

    pub(crate) fn value_update<K: Key, V: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        default: impl FnOnce() -> V,
        f: impl FnOnce(&mut V),
    ) -> Result<()> {
        self.update_at(id, rocks_key(c.key_group, c.bytes, b""), default, f)
            .map(|_| ())
    }

    /// Read-modify-write of the value under `key`, starting from `default`; whether it existed.
    fn update_at<V: StateValue>(
        &mut self,
        id: StateId,
        key: StoredKey,
        default: impl FnOnce() -> V,
        f: impl FnOnce(&mut V),
    ) -> Result<bool> {
        let key = CacheKey::from(key);
        let old = self.get_decoded(id, &key)?;
        let existed = old.is_some();
        let mut v = old.unwrap_or_else(default);
        f(&mut v);
        self.put_raw(id, key, Some(postcard::to_extend(&v, Value::new())?))?;
        Ok(existed)
    }

    pub(crate) fn value_remove<K: Key, V: StateValue>(&mut self, id: StateId, c: &CurrentKey<'_, K>) -> Result<()> {
        self.delete_raw(id, rocks_key(c.key_group, c.bytes, b""))
    }

    /// Calls `f` on every entry whose key starts with `prefix`, in key order; but a whole
    /// state comes from the entry cache if it holds every key, in no particular order (as from
    /// the memory backend): merging RocksDB's levels, or sorting millions of entries scattered
    /// in memory, costs several times as much. See [`Self::scan_stored`].
    fn scan(&self, id: StateId, prefix: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        if prefix.is_empty() {
            // `f` only decodes and collects: it never reaches back into this backend, whose
            // entry cache is borrowed meanwhile.
            if let Some(mut all) = self.entries.borrow().all_of(id) {
                return all.try_for_each(|(k, v)| f(k, v));
            }
        }
        self.scan_stored(id, prefix, f)
    }

    /// [`Self::scan`] of what is stored: the write cache's entries merged over RocksDB's.
    fn scan_stored(&self, id: StateId, prefix: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        let mut cached = self.cache.scan(id, prefix).into_iter().peekable();
        for item in self
            .db
            .iterator_cf(self.cf(id), IteratorMode::From(prefix, rocksdb::Direction::Forward))
        {
            let (k, v) = item.map_err(|e| db_err("iterate", e))?;
            if !k.starts_with(prefix) {
                break;
            }
            let mut shadowed = false;
            while let Some((ck, cv)) = cached.next_if(|(ck, _)| *ck <= &k[..]) {
                shadowed = ck == &k[..];
                if let Some(cv) = cv {
                    f(ck, cv)?;
                }
            }
            if !shadowed {
                f(&k, &v)?;
            }
        }
        for (ck, cv) in cached {
            if let Some(cv) = cv {
                f(ck, cv)?;
            }
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
        self.get_decoded(id, &map_key(c, uk)?.into())
    }

    /// Changes `uk`'s value, starting from `default`; whether it existed.
    pub(crate) fn map_update<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: UK,
        default: impl FnOnce() -> UV,
        f: impl FnOnce(&mut UV),
    ) -> Result<bool> {
        self.cache.keep_sorted(id);
        self.update_at(id, map_key(c, &uk)?, default, f)
    }

    pub(crate) fn map_put<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: UK,
        uv: UV,
    ) -> Result<()> {
        self.cache.keep_sorted(id);
        self.put_raw(id, map_key(c, &uk)?, Some(postcard::to_extend(&uv, Value::new())?))
    }

    pub(crate) fn map_remove<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        uk: &UK,
    ) -> Result<()> {
        self.cache.keep_sorted(id);
        self.delete_raw(id, map_key(c, uk)?)
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

    /// Entries are decoded from RocksDB, then lent to `f`.
    pub(crate) fn map_with_entries<K: Key, UK: Key, UV: StateValue, R>(
        &self,
        id: StateId,
        c: &CurrentKey<'_, K>,
        f: impl FnOnce(super::Entries<'_, UK, UV>) -> R,
    ) -> Result<R> {
        let owned = self.map_entries::<K, UK, UV>(id, c)?;
        Ok(f(super::Entries::Runs(&[owned.as_slice()])))
    }

    pub(crate) fn map_clear<K: Key, UK: Key, UV: StateValue>(
        &mut self,
        id: StateId,
        c: &CurrentKey<'_, K>,
    ) -> Result<()> {
        self.cache.keep_sorted(id);
        let mut keys = Vec::new();
        self.scan(id, &rocks_key(c.key_group, c.bytes, b""), |k, _| {
            keys.push(CacheKey::from(k));
            Ok(())
        })?;
        for k in keys {
            self.delete_raw(id, k)?;
        }
        Ok(())
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

    /// Freezes the write cache; a background thread writes it into RocksDB and takes a native
    /// checkpoint (hard links) on local disk. The task thread writes only to the new
    /// cache meanwhile, so the checkpoint holds exactly the state of this moment.
    pub fn snapshot(&mut self, id: CheckpointId) -> Result<RocksSnapshot> {
        let dir = self.dir.join(format!("chk-{}", id.0));
        // Started by the upload (or whoever waits first), not here: waking the checkpoint thread
        // from the task thread hands the scheduler a moment to take the task's core.
        let moved = self.freeze_and_move(Some(dir.clone()))?;
        Ok(RocksSnapshot {
            id,
            dir,
            range: self.range,
            incremental: self.incremental,
            confirmed: self.confirmed.clone(),
            pending: self.pending.clone(),
            moved,
        })
    }

    /// Freezes the write cache and has the checkpoint thread ingest it into RocksDB, then take a
    /// native checkpoint into `checkpoint` if given. Waits first for a move still running (one
    /// at a time, so writes reach RocksDB in order; normally long done). Returns what reports
    /// when the move is done; it starts when first waited for, or [`Background::start`]ed.
    fn freeze_and_move(&mut self, checkpoint: Option<PathBuf>) -> Result<Arc<Background>> {
        self.cache.settle()?;
        let retired = self.cache.take_retired();
        let (db, names) = (self.db.clone(), self.names.clone());
        let staging = self.dir.join(INGEST_DIR);
        let mover = self.mover()?.clone();
        Ok(self.cache.freeze(|entries| {
            Background::deferred(Box::new(move |worker| {
                let job: MoveJob = Box::new(move || {
                    let result = ingest_entries(&db, &names, &entries, &staging)
                        .and_then(|()| checkpoint.map_or(Ok(()), |dir| native_checkpoint(&db, &dir)));
                    // Let go of the instance before reporting, so the task may own it again.
                    drop((db, entries));
                    worker.finish(result.map_err(|e| e.to_string()));
                    drop(retired);
                });
                mover
                    .send(job)
                    .map_err(|_| "the rocksdb checkpoint thread is gone".to_string())
            }))
        }))
    }

    /// The backend's checkpoint thread, started on first use and living with the backend (no
    /// thread created per checkpoint).
    fn mover(&mut self) -> Result<&crossbeam_channel::Sender<MoveJob>> {
        if self.mover.is_none() {
            let (tx, rx) = crossbeam_channel::unbounded::<MoveJob>();
            std::thread::Builder::new()
                .name("rocksdb-checkpoint".into())
                .spawn(move || {
                    crate::sched::run_as_background();
                    for job in rx {
                        job();
                    }
                })
                .map_err(|e| Error::User(format!("cannot start the rocksdb checkpoint thread: {e}")))?;
            self.mover = Some(tx);
        }
        Ok(self.mover.as_ref().expect("set above"))
    }

    /// Checkpoint `id` completed: its SST files may be referenced from now on.
    pub fn checkpoint_complete(&mut self, id: CheckpointId) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(files) = pending.remove(&id) {
            self.confirmed = shared_by_name(files);
        }
        pending.retain(|k, _| *k > id);
    }
}

/// Takes a native checkpoint of `db` in `dir`.
fn native_checkpoint(db: &DB, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io_err("cannot clear", dir, e))?;
    }
    // `create_checkpoint` flushes every column family first (the WAL is off, so the memtables
    // must reach SST files to be in the checkpoint).
    Checkpoint::new(db)
        .and_then(|c| c.create_checkpoint(dir))
        .map_err(|e| db_err("checkpoint", e))
}

impl Drop for RocksBackend {
    fn drop(&mut self) {
        // A checkpoint thread may still use the instance; once it is done, the fields drop in
        // order: the instance closes, then `WorkDir` removes its directory.
        let _ = self.cache.settle();
    }
}

/// A backend's working directory, removed when dropped. The last field of [`RocksBackend`]:
/// removed before the instance closed, RocksDB's close would fail on its vanished MANIFEST and
/// log errors at every clean finish.
struct WorkDir(PathBuf);

impl std::ops::Deref for WorkDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // A native checkpoint still being uploaded removes itself (its `RocksSnapshot` drop),
        // and whichever goes last removes the emptied directory.
        let _ = std::fs::remove_dir_all(self.0.join("db"));
        let _ = std::fs::remove_dir_all(self.0.join(INGEST_DIR));
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("restore-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A native checkpoint of a [`RocksBackend`] on local disk, waiting to be persisted.
pub struct RocksSnapshot {
    id: CheckpointId,
    dir: PathBuf,
    range: KeyGroupRange,
    incremental: bool,
    confirmed: Arc<HashMap<String, RocksFile>>,
    pending: Arc<Mutex<BTreeMap<CheckpointId, Vec<RocksFile>>>>,
    /// Done once the native checkpoint exists in `dir`.
    moved: Arc<Background>,
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

    /// Lists the local files (waiting for the native checkpoint first).
    pub fn local_files(&self) -> Result<RocksLocalFiles> {
        self.moved.wait()?;
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
        self.moved.wait()?;
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
                for item in db.iterator_cf_opt(
                    cf,
                    bulk_read(),
                    IteratorMode::From(&prefix, rocksdb::Direction::Forward),
                ) {
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
        // The checkpoint thread may still be creating the directory: whichever ends last
        // removes it.
        let dir = self.dir.clone();
        self.moved.abandon(move || {
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(parent) = dir.parent() {
                // Succeeds only once the backend is gone and nothing else is left.
                let _ = std::fs::remove_dir(parent);
            }
        });
    }
}
