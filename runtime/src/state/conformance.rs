//! One conformance suite for every keyed state backend: the same tests run unchanged against
//! the memory backend and RocksDB, plus property tests that apply the same random operations
//! to both and compare every read: with each other, and for TTL state with a model written
//! independently of the backends' shared TTL code.

use super::{
    processing_time_now, KeyedBackend, KeyedContext, KeyedSnapshot, ListState, MapState, ReducingState, StateTtlConfig,
    ValueState,
};
use crate::checkpoint::{CheckpointId, CheckpointKind};
use crate::config::StateBackendKind;
use crate::keygroup::{range_for_subtask, KeyGroupRange};
use crate::operator::{OperatorSnapshot, TaskInfo};
use crate::protocol::AckedState;
use crate::restore::RestoreSource;
use crate::snapshot::{CheckpointMetadata, OperatorSnapshotMeta, RestoredKeyGroups, FORMAT_VERSION};
use crate::storage::{CheckpointPaths, Storage};
use crate::task::chain::PendingSnapshot;
use crate::task::{persist, PersistTarget};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tempfile::TempDir;

const M: u16 = 16;

const BACKENDS: [StateBackendKind; 2] = [
    StateBackendKind::Memory,
    StateBackendKind::RocksDb { incremental: true },
];

fn full_range() -> KeyGroupRange {
    range_for_subtask(M, 1, 0)
}

fn open(kind: StateBackendKind, dir: &Path, range: KeyGroupRange, restored: RestoredKeyGroups) -> KeyedBackend {
    KeyedBackend::open(kind, range, dir, restored, Default::default()).unwrap()
}

/// One state of each kind.
struct States {
    values: ValueState<u64, String>,
    lists: ListState<u64, i32>,
    maps: MapState<u64, String, u64>,
    sums: ReducingState<u64, i64>,
}

/// Registers one state of each kind: all with `ttl` (named `ttl-...`) or all without.
fn states(b: &mut KeyedBackend, ttl: Option<StateTtlConfig>) -> States {
    let name = |n: &str| match ttl {
        Some(_) => format!("ttl-{n}"),
        None => n.to_string(),
    };
    States {
        values: ValueState::register(b, &name("values"), ttl).unwrap(),
        lists: ListState::register(b, &name("lists"), ttl).unwrap(),
        maps: MapState::register(b, &name("maps"), ttl).unwrap(),
        sums: ReducingState::register(b, &name("sums"), ttl, Arc::new(|a: &i64, b: &i64| a + b)).unwrap(),
    }
}

impl States {
    /// Applies keyed operation `op` to the current key; a map update's "existed".
    fn apply(&self, ctx: &mut KeyedContext<'_, u64>, op: &Op) -> Option<bool> {
        match op {
            Op::Put(_, v) => self.values.update(ctx, v.clone()).unwrap(),
            Op::Update(_, c) => self
                .values
                .update_with(ctx, String::new, |v| v.push(*c as char))
                .unwrap(),
            Op::Clear(_) => {
                self.values.clear(ctx).unwrap();
                self.lists.clear(ctx).unwrap();
                self.maps.clear(ctx).unwrap();
            }
            Op::ListAdd(_, v) => self.lists.add(ctx, *v).unwrap(),
            Op::MapPut(_, u, v) => self.maps.put(ctx, format!("u{u}"), *v).unwrap(),
            Op::MapRemove(_, u) => self.maps.remove(ctx, &format!("u{u}")).unwrap(),
            Op::MapUpdate(_, u, v) => {
                let existed = self
                    .maps
                    .update_with(ctx, format!("u{u}"), || 7, |x| *x = x.wrapping_mul(*v));
                return Some(existed.unwrap());
            }
            Op::Reduce(_, v) => self.sums.add(ctx, *v).unwrap(),
            Op::Snapshot | Op::Compact | Op::Drain => unreachable!("not a keyed operation: {op:?}"),
        }
        None
    }
}

/// Everything a backend holds, read through the public handles, in a comparable form.
#[derive(Debug, PartialEq, Default)]
struct Contents {
    values: BTreeMap<u64, String>,
    lists: BTreeMap<u64, Vec<i32>>,
    maps: BTreeMap<(u64, String), u64>,
    sums: BTreeMap<u64, i64>,
}

fn read_all(b: &mut KeyedBackend) -> Contents {
    let s = states(b, None);
    Contents {
        values: s.values.entries(b).unwrap().into_iter().collect(),
        lists: s.lists.entries(b).unwrap().into_iter().collect(),
        maps: s
            .maps
            .all_entries(b)
            .unwrap()
            .into_iter()
            .map(|(k, uk, v)| ((k, uk), v))
            .collect(),
        sums: s.sums.entries(b).unwrap().into_iter().collect(),
    }
}

/// Writes a known pattern of state for keys `0..n`.
fn fill(b: &mut KeyedBackend, n: u64) {
    fill_in(b, n, full_range());
}

/// Writes the pattern of [`fill`] for the keys of `0..n` in `range`.
fn fill_in(b: &mut KeyedBackend, n: u64, range: KeyGroupRange) {
    let s = states(b, None);
    for k in (0..n).filter(|k| range.contains(crate::keygroup::key_group_for_key(k, M))) {
        b.with_key(&k, M, |ctx| {
            s.values.update(ctx, format!("v{k}")).unwrap();
            for i in 0..(k % 4) as i32 {
                s.lists.add(ctx, i).unwrap();
            }
            s.maps.put(ctx, format!("a{}", k % 3), k).unwrap();
            s.maps.put(ctx, "b".into(), k * 2).unwrap();
            s.sums.add(ctx, k as i64).unwrap();
            s.sums.add(ctx, 1).unwrap();
        })
        .unwrap();
    }
}

fn expected(n: u64) -> Contents {
    let mut c = Contents::default();
    for k in 0..n {
        c.values.insert(k, format!("v{k}"));
        if k % 4 > 0 {
            c.lists.insert(k, (0..(k % 4) as i32).collect());
        }
        c.maps.insert((k, format!("a{}", k % 3)), k);
        c.maps.insert((k, "b".into()), k * 2);
        c.sums.insert(k, k as i64 + 1);
    }
    c
}

#[test]
fn value_list_map_and_reducing_state_behave_alike() {
    for kind in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(kind, dir.path(), full_range(), Default::default());
        let mut reg = b.registry::<u64>();
        let values = reg.value_state::<String>("values").unwrap();
        let lists = reg.list_state::<i32>("lists").unwrap();
        let maps = reg.map_state::<String, u64>("maps").unwrap();
        let sums = reg.reducing_state::<i64>("sums", |a, b| a + b).unwrap();
        b.with_key(&7u64, M, |ctx| {
            assert_eq!(values.get(ctx).unwrap(), None, "{kind:?}");
            values.update(ctx, "x".into()).unwrap();
            values.update_with(ctx, String::new, |v| v.push('y')).unwrap();
            assert_eq!(values.get(ctx).unwrap().as_deref(), Some("xy"));
            values.clear(ctx).unwrap();
            assert_eq!(values.get(ctx).unwrap(), None);

            assert!(lists.get(ctx).unwrap().is_empty());
            lists.add(ctx, 1).unwrap();
            lists.add(ctx, 2).unwrap();
            assert_eq!(lists.get(ctx).unwrap(), vec![1, 2]);
            lists.update(ctx, vec![5]).unwrap();
            assert_eq!(lists.get(ctx).unwrap(), vec![5]);
            lists.clear(ctx).unwrap();
            assert!(lists.get(ctx).unwrap().is_empty());

            maps.put(ctx, "a".into(), 1).unwrap();
            maps.put(ctx, "b".into(), 2).unwrap();
            maps.put(ctx, "a".into(), 3).unwrap();
            assert_eq!(maps.get(ctx, &"a".to_string()).unwrap(), Some(3));
            let mut e = maps.entries(ctx).unwrap();
            e.sort();
            assert_eq!(e, vec![("a".to_string(), 3), ("b".to_string(), 2)]);
            maps.remove(ctx, &"a".to_string()).unwrap();
            assert_eq!(maps.get(ctx, &"a".to_string()).unwrap(), None);
            maps.clear(ctx).unwrap();
            assert!(maps.entries(ctx).unwrap().is_empty());

            sums.add(ctx, 5).unwrap();
            sums.add(ctx, 6).unwrap();
            assert_eq!(sums.get(ctx).unwrap(), Some(11));
        })
        .unwrap();
        // Another key's map does not see this one's entries (keys are prefix-free).
        b.with_key(&70u64, M, |ctx| assert!(maps.entries(ctx).unwrap().is_empty()))
            .unwrap();
    }
}

#[test]
fn key_group_scans_see_every_key() {
    for kind in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(kind, dir.path(), full_range(), Default::default());
        fill(&mut b, 500);
        assert_eq!(read_all(&mut b), expected(500), "{kind:?}");
    }
}

#[test]
fn a_key_outside_the_range_is_refused() {
    for kind in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let range = range_for_subtask(M, 2, 0);
        let mut b = open(kind, dir.path(), range, Default::default());
        let outside = (0u64..)
            .find(|k| !range.contains(crate::keygroup::key_group_for_key(k, M)))
            .unwrap();
        assert!(b.with_key(&outside, M, |_| ()).is_err());
    }
}

/// A checkpoint store in memory, written and read exactly as checkpoints and recoveries do:
/// through the task uploader, `_metadata`, and `RestoreSource`.
struct TestStore {
    storage: Storage,
    paths: CheckpointPaths,
    rt: tokio::runtime::Runtime,
}

impl TestStore {
    fn new(dir: &Path) -> Self {
        Self::at(&format!(
            "memory://conformance-{}",
            dir.display().to_string().replace('/', "_")
        ))
    }

    /// Checkpoints in the local file system under `dir` (restores link their SST files).
    fn on_disk(dir: &Path) -> Self {
        Self::at(dir.to_str().unwrap())
    }

    fn at(url: &str) -> Self {
        Self {
            storage: Storage::open(url).unwrap(),
            paths: CheckpointPaths::new("job"),
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    /// Persists `snapshot` as subtask 0's part of checkpoint `id`; returns the ack and the bytes
    /// uploaded.
    fn persist(&self, id: u64, snapshot: KeyedSnapshot) -> (AckedState, u64) {
        self.persist_subtask(id, 0, snapshot)
    }

    fn persist_subtask(&self, id: u64, subtask: usize, snapshot: KeyedSnapshot) -> (AckedState, u64) {
        let target = PersistTarget {
            storage: self.storage.clone(),
            job_dir: self.paths.job_dir(),
            chk_dir: self.paths.checkpoint_dir(CheckpointId(id)),
            subtask,
            attempt: 0,
            timeout: std::time::Duration::from_secs(60),
            canonical: false,
            checkpoint: CheckpointId(id),
        };
        let pending = PendingSnapshot {
            sync: Default::default(),
            uid: "op".into(),
            snapshot: OperatorSnapshot {
                keyed: Some(snapshot),
                operator: Default::default(),
            },
        };
        self.rt.block_on(persist(pending, &target)).unwrap()
    }

    /// Commits `acked` as checkpoint `id`, then restores it into `into` for `range`.
    fn restore(
        &self,
        id: u64,
        acked: AckedState,
        into: StateBackendKind,
        range: KeyGroupRange,
        dir: &Path,
    ) -> crate::Result<KeyedBackend> {
        self.restore_subtasks(id, vec![acked], into, range, dir, Default::default())
    }

    /// Commits `acked` (one per old subtask) as checkpoint `id`, then restores it into `into`
    /// for `range`, merging RocksDB instances by `merge`.
    fn restore_subtasks(
        &self,
        id: u64,
        acked: Vec<AckedState>,
        into: StateBackendKind,
        range: KeyGroupRange,
        dir: &Path,
        merge: crate::config::RescaleMerge,
    ) -> crate::Result<KeyedBackend> {
        let id = CheckpointId(id);
        let meta = CheckpointMetadata {
            format: FORMAT_VERSION,
            job_id: "job".into(),
            job_name: "t".into(),
            params: Default::default(),
            checkpoint_id: id,
            kind: CheckpointKind::Checkpoint,
            timestamp_ms: 0,
            max_parallelism: M,
            operators: vec![OperatorSnapshotMeta {
                uid: "op".into(),
                name: "op".into(),
                parallelism: acked.len(),
                subtasks: acked.into_iter().map(|a| Some(a.handle)).collect(),
            }],
        };
        let rt = &self.rt;
        rt.block_on(self.storage.write(&self.paths.metadata(id), meta.encode()))
            .unwrap();
        let source = rt
            .block_on(RestoreSource::open(
                self.storage.at(&self.paths.checkpoint_dir(id)),
                Some(self.storage.at(&self.paths.job_dir())),
            ))
            .unwrap();
        rt.block_on(source.verify_files()).unwrap();
        let info = TaskInfo {
            job_id: "job".into(),
            name: "op".into(),
            uid: "op".into(),
            subtask: 0,
            parallelism: 1,
            max_parallelism: M,
            attempt: 1,
            state_backend: into,
            local_dir: dir.join("restored"),
            rocksdb: crate::config::RocksDbSettings {
                rescale_merge: merge,
                ..Default::default()
            },
            finish_hooks: Default::default(),
        };
        let restored = rt.block_on(source.load(&info)).unwrap().unwrap();
        KeyedBackend::open(into, range, &dir.join("restored"), restored.keyed, info.rocksdb)
    }
}

fn checkpoint_and_restore(
    snapshot: KeyedSnapshot,
    into: StateBackendKind,
    range: KeyGroupRange,
    dir: &Path,
) -> KeyedBackend {
    try_checkpoint_and_restore(snapshot, into, range, dir).unwrap()
}

fn try_checkpoint_and_restore(
    snapshot: KeyedSnapshot,
    into: StateBackendKind,
    range: KeyGroupRange,
    dir: &Path,
) -> crate::Result<KeyedBackend> {
    let store = TestStore::new(dir);
    let (acked, _) = store.persist(1, snapshot);
    store.restore(1, acked, into, range, dir)
}

#[test]
fn checkpoint_restore_round_trip_in_each_backend() {
    for kind in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(kind, &dir.path().join("a"), full_range(), Default::default());
        fill(&mut b, 300);
        let snapshot = b.snapshot(CheckpointId(1)).unwrap();
        // Writes after the snapshot are not in it (copy-on-write / native checkpoint).
        fill(&mut b, 310);
        let mut restored = checkpoint_and_restore(snapshot, kind, full_range(), dir.path());
        assert_eq!(read_all(&mut restored), expected(300), "{kind:?}");
    }
}

#[test]
fn a_rocksdb_checkpoint_holds_the_state_of_its_barrier_whatever_follows() {
    // Writes after the barrier stay out of the checkpoint, also when they overflow a tiny
    // write cache while the frozen one is being moved into RocksDB.
    for limit in [usize::MAX, 200] {
        let dir = tempfile::tempdir().unwrap();
        let kind = BACKENDS[1];
        let mut b = open(kind, &dir.path().join("a"), full_range(), Default::default());
        if let KeyedBackend::RocksDb(r) = &mut b {
            r.set_write_cache_limit(limit);
        }
        fill(&mut b, 300);
        let snapshot = b.snapshot(CheckpointId(1)).unwrap();
        let want = rewrite_values(&mut b, 300, 300);
        let mut restored = checkpoint_and_restore(snapshot, kind, full_range(), dir.path());
        assert_eq!(read_all(&mut restored), expected(300), "write cache limit {limit}");
        assert_eq!(read_all(&mut b), want, "write cache limit {limit}");
    }
}

fn canonical_blocks(snapshot: &KeyedSnapshot) -> RestoredKeyGroups {
    snapshot.canonical_blocks(None)
}

/// The canonical (savepoint) format: written by one backend, read by the other.
#[test]
fn canonical_snapshots_move_between_backends() {
    for (from, to) in [
        (BACKENDS[0], BACKENDS[1]),
        (BACKENDS[1], BACKENDS[0]),
        (BACKENDS[1], BACKENDS[1]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(from, &dir.path().join("a"), full_range(), Default::default());
        fill(&mut b, 200);
        let blocks = canonical_blocks(&b.snapshot(CheckpointId(3)).unwrap());
        let mut restored = open(to, &dir.path().join("b"), full_range(), blocks);
        assert_eq!(read_all(&mut restored), expected(200), "{from:?} -> {to:?}");
    }
}

#[test]
fn restore_keeps_only_the_owned_key_groups() {
    for kind in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(kind, &dir.path().join("a"), full_range(), Default::default());
        fill(&mut b, 300);
        let half = range_for_subtask(M, 2, 1);
        let snapshot = b.snapshot(CheckpointId(1)).unwrap();
        let mut restored = checkpoint_and_restore(snapshot, kind, half, dir.path());
        let got = read_all(&mut restored);
        let mut want = expected(300);
        let in_half = |k: &u64| half.contains(crate::keygroup::key_group_for_key(k, M));
        want.values.retain(|k, _| in_half(k));
        want.lists.retain(|k, _| in_half(k));
        want.maps.retain(|(k, _), _| in_half(k));
        want.sums.retain(|k, _| in_half(k));
        assert_eq!(got, want, "{kind:?}");
        assert!(!got.values.is_empty());
    }
}

/// A restore at a lower parallelism merges old RocksDB instances: by ingesting their SST
/// files where their key ranges are apart, by copying keys where an earlier rescale's range
/// deletes make them overlap. The state is exact either way, and writes after the merge win
/// over merged-in values, also in RocksDB itself and after a compaction (ingested files keep
/// their sequence numbers; RocksDB must move its own past them).
#[test]
fn rocksdb_merges_old_instances_by_their_files_or_by_their_keys() {
    use crate::config::RescaleMerge;
    let kind = BACKENDS[1];
    for merge in [RescaleMerge::Ingest, RescaleMerge::Iterate] {
        for clipped in [false, true] {
            let case = format!("{merge:?}, old instances clipped: {clipped}");
            let dir = tempfile::tempdir().unwrap();
            let store = TestStore::new(dir.path());
            // Old subtask i holds the keys of half i: written directly, or restored from one
            // full-range instance (its files then span both halves, half hidden by range deletes).
            let full = clipped.then(|| whole_range(&store, dir.path(), |_| {}));
            let acked = old_halves(&store, dir.path(), full.as_ref(), |_, _, _| {});
            let new_dir = dir.path().join("new");
            let mut merged = store
                .restore_subtasks(2, acked, kind, full_range(), &new_dir, merge)
                .unwrap();
            assert_eq!(read_all(&mut merged), expected(300), "{case}");
            // Four states; the default column family, touched only by range deletes, is copied
            // (an empty iteration) where it has files.
            let counts = rocks(&mut merged).merged();
            if merge == RescaleMerge::Ingest && !clipped {
                assert_eq!((counts.ingested, counts.copied), (4, 0), "{case}");
            } else {
                assert_eq!(counts.ingested, 0, "{case}");
                assert!(counts.copied >= 4, "{case}: {counts:?}");
            }

            let want = rewrite_values(&mut merged, 300, 300);
            rocks(&mut merged).drain_write_cache().unwrap();
            assert_eq!(read_all(&mut merged), want, "{case}");
            rocks(&mut merged).compact().unwrap();
            assert_eq!(read_all(&mut merged), want, "{case}, compacted");
        }
    }
}

/// Checkpoint 1 of a RocksDB instance of the whole range holding [`fill`]'s keys, after `then`
/// (which may change them and take checkpoints of its own).
fn whole_range(store: &TestStore, dir: &Path, then: impl FnOnce(&mut KeyedBackend)) -> AckedState {
    let mut b = open(BACKENDS[1], &dir.join("whole"), full_range(), Default::default());
    fill(&mut b, 300);
    then(&mut b);
    store.persist(1, b.snapshot(CheckpointId(1)).unwrap()).0
}

/// Checkpoint 2 of two old RocksDB subtasks, subtask `i` holding the keys of half `i`: written by
/// [`fill_in`] in `dir`, or restored from `whole` (a [`whole_range`] checkpoint: its files then
/// span both halves, the other half hidden by range deletes); `then` runs on each before its
/// checkpoint.
fn old_halves(
    store: &TestStore,
    dir: &Path,
    whole: Option<&AckedState>,
    mut then: impl FnMut(&mut KeyedBackend, usize, KeyGroupRange),
) -> Vec<AckedState> {
    (0..2)
        .map(|i| {
            let half = range_for_subtask(M, 2, i);
            let old_dir = dir.join(format!("old{i}"));
            let mut b = match whole {
                Some(acked) => store.restore(1, acked.clone(), BACKENDS[1], half, &old_dir).unwrap(),
                None => {
                    let mut b = open(BACKENDS[1], &old_dir, half, Default::default());
                    fill_in(&mut b, 300, half);
                    b
                }
            };
            then(&mut b, i, half);
            store.persist_subtask(2, i, b.snapshot(CheckpointId(2)).unwrap()).0
        })
        .collect()
}

/// Checkpoints ingest SST files written outside RocksDB; their sequence number lives only in
/// their instance's manifest. Merged into another instance after later checkpoints overwrote and
/// deleted keys, every newer value and deletion must still win: also when the old instances
/// were themselves restored from one of the whole range (their files then hold the other half's
/// keys too, hidden by range deletes, which must not come back over the newer values).
#[test]
fn a_merge_by_ingestion_keeps_the_newest_of_several_checkpoints() {
    let kind = BACKENDS[1];
    for from_whole in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = TestStore::new(dir.path());
        // Two checkpoints: the second's file is an ingested one holding both halves' keys.
        let mut want = expected(300);
        let whole = from_whole.then(|| {
            whole_range(&store, dir.path(), |b| {
                store.persist(0, b.snapshot(CheckpointId(0)).unwrap());
                want = rewrite_values(b, 300, 300);
            })
        });
        let from_halves = whole.is_none();
        let acked = old_halves(&store, dir.path(), whole.as_ref(), |b, i, half| {
            if from_halves {
                // A first checkpoint, so that the one below ingests a second file.
                store.persist_subtask(1, i, b.snapshot(CheckpointId(1)).unwrap());
            }
            let values = b.registry::<u64>().value_state::<String>("values").unwrap();
            for k in (0..300).filter(|k| half.contains(crate::keygroup::key_group_for_key(k, M))) {
                b.with_key(&k, M, |ctx| match k % 5 {
                    0 => values.clear(ctx).unwrap(),
                    _ if k % 2 == 0 => values.update(ctx, format!("later{k}")).unwrap(),
                    _ => {}
                })
                .unwrap();
                match k % 5 {
                    0 => drop(want.values.remove(&k)),
                    _ if k % 2 == 0 => drop(want.values.insert(k, format!("later{k}"))),
                    _ => {}
                }
            }
        });
        let mut merged = store
            .restore_subtasks(
                2,
                acked,
                kind,
                full_range(),
                &dir.path().join("new"),
                crate::config::RescaleMerge::Ingest,
            )
            .unwrap();
        let case = format!("restored from the whole range first: {from_whole}");
        assert_eq!(read_all(&mut merged), want, "{case}");
        let counts = rocks(&mut merged).merged();
        if !from_whole {
            assert_eq!((counts.ingested, counts.copied), (4, 0), "{case}: {counts:?}");
        }
        rocks(&mut merged).compact().unwrap();
        assert_eq!(read_all(&mut merged), want, "{case}, compacted");
    }
}

/// Of two old instances that a new subtask's range holds whole, the one cheaper to ingest is
/// ingested into the other: from local storage (files linked, clean) the one with fewer SST
/// files, from other storage (files downloaded) the one with fewer bytes.
#[test]
fn a_merge_ingests_the_old_instance_cheaper_to_ingest() {
    let kind = BACKENDS[1];
    let halves = [range_for_subtask(M, 2, 0), range_for_subtask(M, 2, 1)];
    for local in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = match local {
            true => TestStore::on_disk(&dir.path().join("checkpoints")),
            false => TestStore::new(dir.path()),
        };
        // Old instance 0 holds more bytes (a fifth state of 2 KiB values) in 5 files; old
        // instance 1 holds fewer in 6 (its values flushed three times, written again unchanged).
        let acked: Vec<AckedState> = (halves.iter().enumerate())
            .map(|(i, half)| {
                let mut b = open(kind, &dir.path().join(format!("old{i}")), *half, Default::default());
                fill_in(&mut b, 300, *half);
                let keys = (0..300u64).filter(|k| half.contains(crate::keygroup::key_group_for_key(k, M)));
                if i == 0 {
                    let ballast = b.registry::<u64>().value_state::<String>("ballast").unwrap();
                    for k in keys {
                        b.with_key(&k, M, |ctx| ballast.update(ctx, "x".repeat(2048)).unwrap())
                            .unwrap();
                    }
                } else {
                    let values = b.registry::<u64>().value_state::<String>("values").unwrap();
                    for round in 0..2 {
                        drop(b.snapshot(CheckpointId(round)).unwrap());
                        for k in keys.clone() {
                            b.with_key(&k, M, |ctx| values.update(ctx, format!("v{k}")).unwrap())
                                .unwrap();
                        }
                    }
                }
                store.persist_subtask(2, i, b.snapshot(CheckpointId(2)).unwrap()).0
            })
            .collect();
        let (files, bytes): (Vec<usize>, Vec<u64>) = (acked.iter())
            .map(|a| {
                let r = a.handle.rocksdb.as_ref().unwrap();
                (r.sst_files.len(), r.sst_files.iter().map(|f| f.size).sum::<u64>())
            })
            .unzip();
        assert!(
            files[1] > files[0] && bytes[0] > bytes[1],
            "instance 1 has more files, instance 0 more bytes: {files:?} {bytes:?}"
        );
        let mut merged = store
            .restore_subtasks(
                2,
                acked,
                kind,
                full_range(),
                &dir.path().join("new"),
                Default::default(),
            )
            .unwrap();
        assert_eq!(read_all(&mut merged), expected(300), "local: {local}");
        let counts = rocks(&mut merged).merged();
        // Ingested: instance 0 (5 column families) when local, else instance 1 (4).
        let want = if local { (5, files[0]) } else { (4, files[1]) };
        assert_eq!((counts.ingested, counts.files), want, "local: {local}, {counts:?}");
        assert_eq!(counts.copied, 0, "local: {local}, {counts:?}");
    }
}

/// From the local file system a restore hard-links the checkpoint's SST files instead of
/// copying them. Whatever the restored instance then does (ingest them into another instance,
/// rewrite every key, compact), the checkpoint's files stay as they were: it restores again,
/// checksums verified, to the same state.
#[test]
fn restores_from_local_storage_link_sst_files_and_leave_them_unchanged() {
    use std::os::unix::fs::MetadataExt;
    let kind = BACKENDS[1];
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::on_disk(&dir.path().join("checkpoints"));
    let halves = [range_for_subtask(M, 2, 0), range_for_subtask(M, 2, 1)];
    let acked: Vec<AckedState> = (halves.iter().enumerate())
        .map(|(i, half)| {
            let mut b = open(kind, &dir.path().join(format!("old{i}")), *half, Default::default());
            fill_in(&mut b, 300, *half);
            store.persist_subtask(1, i, b.snapshot(CheckpointId(1)).unwrap()).0
        })
        .collect();
    for round in 0..2 {
        let new_dir = dir.path().join(format!("new{round}"));
        let mut merged = store
            .restore_subtasks(1, acked.clone(), kind, full_range(), &new_dir, Default::default())
            .unwrap();
        assert_eq!(read_all(&mut merged), expected(300), "round {round}");
        assert_eq!(rocks(&mut merged).merged().ingested, 4, "round {round}");
        let restored = Storage::open(new_dir.to_str().unwrap()).unwrap();
        let linked = (store.rt.block_on(restored.list_files_recursive("")).unwrap())
            .into_iter()
            .filter(|f| f.ends_with(".sst"))
            .filter(|f| std::fs::metadata(new_dir.join(f)).unwrap().nlink() > 1)
            .count();
        assert!(
            linked >= 2,
            "round {round}: the restored SSTs are links of the checkpoint's"
        );
        rewrite_values(&mut merged, 300, 300);
        rocks(&mut merged).drain_write_cache().unwrap();
        rocks(&mut merged).compact().unwrap();
    }
}

/// Rewrites the value of keys `0..changed` of a backend that `fill` filled with `filled` keys;
/// the contents expected after.
fn rewrite_values(b: &mut KeyedBackend, filled: u64, changed: u64) -> Contents {
    let values = b.registry::<u64>().value_state::<String>("values").unwrap();
    let mut want = expected(filled);
    for k in 0..changed {
        b.with_key(&k, M, |ctx| values.update(ctx, format!("later{k}")).unwrap())
            .unwrap();
        want.values.insert(k, format!("later{k}"));
    }
    want
}

#[test]
fn memory_checkpoints_restore_into_rocksdb_but_not_the_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(BACKENDS[0], &dir.path().join("m"), full_range(), Default::default());
    fill(&mut m, 100);
    let mut r = checkpoint_and_restore(
        m.snapshot(CheckpointId(1)).unwrap(),
        BACKENDS[1],
        full_range(),
        &dir.path().join("x"),
    );
    assert_eq!(read_all(&mut r), expected(100));
    let native = r.snapshot(CheckpointId(2)).unwrap();
    match try_checkpoint_and_restore(native, BACKENDS[0], full_range(), &dir.path().join("y")) {
        Ok(_) => panic!("a RocksDB native checkpoint must not restore into the memory backend"),
        Err(e) => assert!(e.to_string().contains("RocksDB native state"), "{e}"),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put(u64, String),
    Update(u64, u8),
    Clear(u64),
    ListAdd(u64, i32),
    MapPut(u64, u8, u64),
    MapRemove(u64, u8),
    MapUpdate(u64, u8, u64),
    Reduce(u64, i64),
    Snapshot,
    /// RocksDB compacts (TTL filters included).
    Compact,
    /// RocksDB's write cache is written into it.
    Drain,
}

fn op() -> impl Strategy<Value = Op> {
    op_in(40, 1)
}

/// An operation on one of `keys` keys, or a snapshot, compaction or write-cache drain
/// (compactions with weight `compact` against 38 for the rest: each flushes and rewrites
/// every column family).
fn op_in(keys: u64, compact: u32) -> impl Strategy<Value = Op> {
    let key = 0..keys;
    prop_oneof![
        4 => (key.clone(), "[a-z]{0,6}").prop_map(|(k, v)| Op::Put(k, v)),
        4 => (key.clone(), any::<u8>()).prop_map(|(k, c)| Op::Update(k, c)),
        4 => key.clone().prop_map(Op::Clear),
        4 => (key.clone(), any::<i32>()).prop_map(|(k, v)| Op::ListAdd(k, v)),
        4 => (key.clone(), 0u8..4, any::<u64>()).prop_map(|(k, u, v)| Op::MapPut(k, u, v)),
        4 => (key.clone(), 0u8..4).prop_map(|(k, u)| Op::MapRemove(k, u)),
        4 => (key.clone(), 0u8..4, 0u64..1000).prop_map(|(k, u, v)| Op::MapUpdate(k, u, v)),
        4 => (key, -100i64..100).prop_map(|(k, v)| Op::Reduce(k, v)),
        4 => Just(Op::Snapshot),
        compact => Just(Op::Compact),
        2 => Just(Op::Drain),
    ]
}

fn apply(b: &mut KeyedBackend, ops: &[Op]) -> Vec<String> {
    let s = states(b, None);
    let mut reads = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Some(key) = op_key(op) else {
            // Taking (and dropping) a snapshot, compacting or draining the write cache must not
            // change what reads see.
            match op {
                Op::Snapshot => drop(b.snapshot(CheckpointId(i as u64 + 1)).unwrap()),
                _ => maintain(b, op, b.processing_time()),
            }
            continue;
        };
        b.with_key(&key, M, |ctx| {
            let existed = s.apply(ctx, op);
            let mut m = s.maps.entries(ctx).unwrap();
            m.sort();
            reads.push(format!(
                "{existed:?} {:?} {:?} {:?} {:?}",
                s.values.get(ctx).unwrap(),
                s.lists.get(ctx).unwrap(),
                m,
                s.sums.get(ctx).unwrap()
            ));
        })
        .unwrap();
    }
    reads
}

/// The backends the property tests compare, named: memory, RocksDB (reads from its complete
/// entry cache), RocksDB without an entry cache (reads from the write cache and RocksDB), and
/// RocksDB with a tiny write cache and a tiny entry cache (writes reach RocksDB while a frozen
/// cache may still be moving, and most before the next compaction; the entry cache evicts all
/// the time).
fn backends(dir: &Path) -> [(&'static str, KeyedBackend); 4] {
    let mut small = open(BACKENDS[1], &dir.join("s"), full_range(), Default::default());
    if let KeyedBackend::RocksDb(r) = &mut small {
        r.set_write_cache_limit(200);
        r.set_entry_cache_limit(400);
    }
    let mut uncached = open(BACKENDS[1], &dir.join("u"), full_range(), Default::default());
    if let KeyedBackend::RocksDb(r) = &mut uncached {
        r.set_entry_cache_limit(0);
    }
    [
        (
            "memory",
            open(BACKENDS[0], &dir.join("m"), full_range(), Default::default()),
        ),
        (
            "rocksdb",
            open(BACKENDS[1], &dir.join("r"), full_range(), Default::default()),
        ),
        ("rocksdb, no entry cache", uncached),
        ("rocksdb, small write and entry caches", small),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn both_backends_read_the_same_after_the_same_operations(ops in proptest::collection::vec(op(), 1..120)) {
        let dir = tempfile::tempdir().unwrap();
        let [(_, mut mem), others @ ..] = backends(dir.path());
        let reads = apply(&mut mem, &ops);
        let all = read_all(&mut mem);
        for (what, mut b) in others {
            prop_assert_eq!(&reads, &apply(&mut b, &ops), "{}", what);
            prop_assert_eq!(&all, &read_all(&mut b), "{}", what);
        }
    }
}

#[test]
fn an_incremental_checkpoint_uploads_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let kind = BACKENDS[1];
    let mut b = open(kind, &dir.path().join("a"), full_range(), Default::default());
    let store = TestStore::new(dir.path());
    let checkpoint = |b: &mut KeyedBackend, id: u64| {
        let (acked, uploaded) = store.persist(id, b.snapshot(CheckpointId(id)).unwrap());
        b.checkpoint_complete(CheckpointId(id));
        let total: u64 = acked
            .handle
            .rocksdb
            .as_ref()
            .unwrap()
            .sst_files
            .iter()
            .map(|f| f.size)
            .sum();
        (acked, uploaded, total)
    };
    fill(&mut b, 50_000);
    let (_, first_uploaded, first_total) = checkpoint(&mut b, 1);
    assert!(first_uploaded >= first_total, "the first checkpoint uploads everything");
    // Change a hundred keys out of fifty thousand.
    let want = rewrite_values(&mut b, 50_000, 100);
    let (acked, uploaded, total) = checkpoint(&mut b, 2);
    assert!(
        uploaded * 20 < total,
        "an incremental checkpoint after 100 changed keys uploaded {uploaded} of {total} bytes"
    );
    assert!(acked.new_shared.len() < acked.handle.rocksdb.as_ref().unwrap().sst_files.len());
    // Restoring from the incremental checkpoint is exact.
    let mut r = store.restore(2, acked, kind, full_range(), dir.path()).unwrap();
    assert_eq!(read_all(&mut r), want);
}

// --- State TTL -------------------------------------------------------------------------------

/// One hour: tests start near the wall clock and move time forward explicitly with
/// `with_key_at` (RocksDB's compactions judge expiry by the latest such time).
const TTL: i64 = 3_600_000;

fn ttl_config() -> StateTtlConfig {
    StateTtlConfig::new(std::time::Duration::from_millis(TTL as u64)).unwrap()
}

/// A fresh backend of `kind` with the TTL states registered, and the processing time to start
/// from.
fn ttl_backend(kind: StateBackendKind, cfg: StateTtlConfig) -> (TempDir, KeyedBackend, States, i64) {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(kind, dir.path(), full_range(), Default::default());
    let s = states(&mut b, Some(cfg));
    (dir, b, s, processing_time_now())
}

impl States {
    /// Writes every state of `key` at `now`.
    fn write(&self, b: &mut KeyedBackend, key: u64, now: i64) {
        b.with_key_at(&key, M, now, |ctx| {
            self.values.update(ctx, format!("v{key}")).unwrap();
            self.lists.add(ctx, key as i32).unwrap();
            self.maps.put(ctx, "a".into(), key).unwrap();
            self.sums.add(ctx, key as i64).unwrap();
        })
        .unwrap();
    }

    /// What a read of every state of `key` at `now` sees: (value, list, map entry "a", sum).
    fn read(&self, b: &mut KeyedBackend, key: u64, now: i64) -> (Option<String>, Vec<i32>, Option<u64>, Option<i64>) {
        b.with_key_at(&key, M, now, |ctx| {
            (
                self.values.get(ctx).unwrap(),
                self.lists.get(ctx).unwrap(),
                self.maps.get(ctx, &"a".to_string()).unwrap(),
                self.sums.get(ctx).unwrap(),
            )
        })
        .unwrap()
    }

    /// Entries stored per state, expired ones included.
    fn stored(&self, b: &KeyedBackend) -> [usize; 4] {
        [self.values.id, self.lists.id, self.maps.id, self.sums.value.id].map(|id| b.stored_entries(id).unwrap())
    }
}

fn present(key: u64) -> (Option<String>, Vec<i32>, Option<u64>, Option<i64>) {
    (Some(format!("v{key}")), vec![key as i32], Some(key), Some(key as i64))
}

const ABSENT: (Option<String>, Vec<i32>, Option<u64>, Option<i64>) = (None, Vec::new(), None, None);

#[test]
fn a_ttl_value_expires_at_exactly_its_ttl_and_an_expired_read_removes_it() {
    for kind in BACKENDS {
        let (_dir, mut b, s, t) = ttl_backend(kind, ttl_config());
        s.write(&mut b, 1, t);
        // A millisecond later: key 2's state is live when key 1's expires, whichever key groups
        // the memory backend's sweeps reach meanwhile.
        s.write(&mut b, 2, t + 1);
        // Reads do not extend life under OnCreateAndWrite.
        assert_eq!(s.read(&mut b, 1, t + TTL - 1), present(1), "{kind:?}");
        assert_eq!(s.read(&mut b, 1, t + TTL - 1), present(1), "{kind:?}");
        assert_eq!(s.stored(&b), [2; 4], "{kind:?}");
        assert_eq!(s.read(&mut b, 1, t + TTL), ABSENT, "{kind:?}");
        // The expired read removed key 1's state (lazy cleanup); key 2's is still stored.
        assert_eq!(s.stored(&b), [1; 4], "{kind:?}");
        // Whole-state scans judge expiry as of the backend's processing time, like reads: at
        // t + TTL key 2's state is there...
        // Every whole-state scan sees exactly the key `k` that `s.write` wrote.
        let scans_see_only = |b: &KeyedBackend, k: u64| {
            assert_eq!(s.values.entries(b).unwrap(), vec![(k, format!("v{k}"))], "{kind:?}");
            assert_eq!(s.lists.entries(b).unwrap(), vec![(k, vec![k as i32])], "{kind:?}");
            assert_eq!(
                s.maps.all_entries(b).unwrap(),
                vec![(k, "a".to_string(), k)],
                "{kind:?}"
            );
            assert_eq!(s.sums.entries(b).unwrap(), vec![(k, k as i64)], "{kind:?}");
        };
        scans_see_only(&b, 2);
        b.with_key_at(&2u64, M, t + TTL + 1, |ctx| {
            assert!(s.maps.entries(ctx).unwrap().is_empty());
        })
        .unwrap();
        assert_eq!(s.stored(&b)[2], 0, "{kind:?}: map entries() removed the expired entry");
        // ... and at t + TTL + 1, the latest time a read used, it is not.
        s.write(&mut b, 4, t + TTL + 1);
        scans_see_only(&b, 4);
    }
}

#[test]
fn on_read_and_write_extends_life_on_read() {
    for kind in BACKENDS {
        let (_dir, mut b, s, t) = ttl_backend(kind, ttl_config().update_on_read_and_write());
        s.write(&mut b, 1, t);
        s.write(&mut b, 2, t);
        s.write(&mut b, 3, t);
        // Read at t + TTL - 1: each read restarts the clock.
        assert_eq!(s.read(&mut b, 1, t + TTL - 1), present(1), "{kind:?}");
        assert_eq!(s.read(&mut b, 1, t + 2 * TTL - 2), present(1), "{kind:?}");
        assert_eq!(s.read(&mut b, 1, t + 3 * TTL - 3), present(1), "{kind:?}");
        assert_eq!(s.read(&mut b, 1, t + 4 * TTL - 3), ABSENT, "{kind:?}");
        // Map entries() refreshes the entries it returns.
        b.with_key_at(&2u64, M, t + TTL - 1, |ctx| {
            assert_eq!(s.maps.entries(ctx).unwrap(), vec![("a".to_string(), 2)]);
        })
        .unwrap();
        b.with_key_at(&2u64, M, t + 2 * TTL - 2, |ctx| {
            assert_eq!(s.maps.get(ctx, &"a".to_string()).unwrap(), Some(2));
        })
        .unwrap();
        // Never read: gone at t + TTL as under OnCreateAndWrite.
        assert_eq!(s.read(&mut b, 3, t + TTL), ABSENT, "{kind:?}");
    }
}

#[test]
fn writing_to_an_expired_value_starts_from_the_default() {
    for kind in BACKENDS {
        let (_dir, mut b, s, t) = ttl_backend(kind, ttl_config());
        let key = 5u64;
        let write = |b: &mut KeyedBackend, now: i64, c: char| {
            b.with_key_at(&key, M, now, |ctx| {
                s.values.update_with(ctx, || "d".to_string(), |v| v.push(c)).unwrap();
                let existed = s.maps.update_with(ctx, "a".to_string(), || 100, |v| *v += 1).unwrap();
                s.lists.add(ctx, c as i32).unwrap();
                s.sums.add(ctx, 10).unwrap();
                existed
            })
            .unwrap()
        };
        assert!(!write(&mut b, t, 'x'), "{kind:?}: a new map entry");
        // A write just before expiry extends the value's life and builds on it.
        assert!(write(&mut b, t + TTL - 1, 'y'), "{kind:?}");
        let (v, l, m, r) = s.read(&mut b, key, t + 2 * TTL - 2);
        assert_eq!(
            (v.as_deref(), l, m, r),
            (Some("dxy"), vec!['y' as i32], Some(102), Some(20)),
            "{kind:?}: the list's first element expired on its own"
        );
        // Expired: every state starts afresh, and the map entry did not exist.
        assert!(!write(&mut b, t + 3 * TTL, 'z'), "{kind:?}");
        let (v, l, m, r) = s.read(&mut b, key, t + 3 * TTL);
        assert_eq!(
            (v.as_deref(), l, m, r),
            (Some("dz"), vec!['z' as i32], Some(101), Some(10)),
            "{kind:?}"
        );
    }
}

#[test]
fn ttl_timestamps_survive_checkpoints_savepoints_and_rescaling() {
    // (snapshot from, restore into, through canonical blocks (a savepoint) or a checkpoint)
    let cases = [
        (BACKENDS[0], BACKENDS[0], false),
        (BACKENDS[1], BACKENDS[1], false),
        (BACKENDS[0], BACKENDS[1], true),
        (BACKENDS[1], BACKENDS[0], true),
        (BACKENDS[1], BACKENDS[1], true),
    ];
    for (from, to, canonical) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(from, &dir.path().join("a"), full_range(), Default::default());
        let s = states(&mut b, Some(ttl_config()));
        let t = processing_time_now();
        // Even keys written at t, odd ones at t + 1.
        for k in 0..40u64 {
            s.write(&mut b, k, t + (k % 2) as i64);
        }
        let half = range_for_subtask(M, 2, 1);
        let snapshots =
            [full_range(), half].map(|range| (range, b.snapshot(CheckpointId(range.start as u64 + 1)).unwrap()));
        // Later writes are not in the snapshots.
        for k in 0..40u64 {
            s.write(&mut b, k, t + TTL);
        }
        for (range, snapshot) in snapshots {
            let sub = dir.path().join(format!("r{}", range.start));
            let mut r = if canonical {
                open(to, &sub, range, canonical_blocks(&snapshot))
            } else {
                checkpoint_and_restore(snapshot, to, range, &sub)
            };
            let s = states(&mut r, Some(ttl_config()));
            let what = format!("{from:?} -> {to:?}, canonical {canonical}, range {range}");
            let mine: Vec<u64> = (0..40u64)
                .filter(|k| range.contains(crate::keygroup::key_group_for_key(k, M)))
                .collect();
            assert!(!mine.is_empty());
            assert_eq!(s.stored(&r), [mine.len(); 4], "{what}");
            // Time only moves forward (the memory backend's sweeps run as it reads).
            for at in [t + TTL - 1, t + TTL, t + TTL + 1] {
                for &k in &mine {
                    let written = t + (k % 2) as i64;
                    let want = if written + TTL <= at { ABSENT } else { present(k) };
                    assert_eq!(s.read(&mut r, k, at), want, "{what}: key {k} at t + {}", at - t);
                }
            }
        }
    }
}

#[test]
fn a_state_registered_twice_with_different_ttls_is_refused() {
    for kind in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(kind, dir.path(), full_range(), Default::default());
        let mut reg = b.registry::<u64>();
        reg.with_ttl(ttl_config()).value_state::<String>("x").unwrap();
        // The same TTL: the same state.
        reg.with_ttl(ttl_config()).value_state::<String>("x").unwrap();
        let longer = StateTtlConfig::new(std::time::Duration::from_millis(2 * TTL as u64)).unwrap();
        for e in [
            reg.with_ttl(longer).value_state::<String>("x").err(),
            reg.with_ttl(ttl_config().update_on_read_and_write())
                .value_state::<String>("x")
                .err(),
            reg.value_state::<String>("x").err(),
        ] {
            match e {
                Some(crate::Error::Config(msg)) => assert!(msg.contains("different TTLs"), "{kind:?}: {msg}"),
                other => panic!("{kind:?}: {other:?}"),
            }
        }
        // Without a TTL first, then with one.
        reg.value_state::<String>("y").unwrap();
        match reg.with_ttl(ttl_config()).value_state::<String>("y").err() {
            Some(crate::Error::Config(msg)) => assert!(msg.contains("state 'y'"), "{kind:?}: {msg}"),
            other => panic!("{kind:?}: {other:?}"),
        }
    }
}

fn rocks(b: &mut KeyedBackend) -> &mut super::RocksBackend {
    match b {
        KeyedBackend::RocksDb(r) => r,
        KeyedBackend::Memory(_) => unreachable!("a RocksDB backend"),
    }
}

/// Registers the value state `counts`, with a TTL or without.
fn counts_state(b: &mut KeyedBackend, ttl: bool) -> crate::Result<ValueState<u64, u64>> {
    let mut reg = b.registry::<u64>();
    if ttl {
        reg.with_ttl(ttl_config()).value_state("counts")
    } else {
        reg.value_state("counts")
    }
}

#[test]
fn adding_or_removing_a_ttl_across_a_restore_is_refused_naming_the_state() {
    for kind in BACKENDS {
        for canonical in [false, true] {
            for ttl_before in [false, true] {
                let what = format!("{kind:?}, canonical {canonical}, TTL before {ttl_before}");
                let dir = tempfile::tempdir().unwrap();
                let mut b = open(kind, &dir.path().join("a"), full_range(), Default::default());
                let counts = counts_state(&mut b, ttl_before).unwrap();
                b.with_key(&1u64, M, |ctx| counts.update(ctx, 7).unwrap()).unwrap();
                let snapshot = b.snapshot(CheckpointId(1)).unwrap();
                let sub = dir.path().join("r");
                let mut r = if canonical {
                    open(kind, &sub, full_range(), canonical_blocks(&snapshot))
                } else {
                    checkpoint_and_restore(snapshot, kind, full_range(), &sub)
                };
                // Read with the other stored form, the value would be the timestamp (or fail).
                match counts_state(&mut r, !ttl_before).map(|_| ()) {
                    Err(crate::Error::Incompatible(msg)) => {
                        assert!(msg.contains("state 'counts'"), "{what}: {msg}");
                        assert!(msg.contains("TTL is not a compatible change"), "{what}: {msg}");
                    }
                    other => panic!("{what}: {other:?}"),
                }
                // As it was: restored.
                let counts = counts_state(&mut r, ttl_before).unwrap();
                let got = r.with_key(&1u64, M, |ctx| counts.get(ctx).unwrap()).unwrap();
                assert_eq!(got, Some(7), "{what}");
            }
        }
    }
}

#[test]
fn rocksdb_compaction_never_drops_what_a_read_of_the_current_batch_returns() {
    let (_dir, mut b, s, now) = ttl_backend(BACKENDS[1], ttl_config());
    // The batch being processed read the clock a second ago: its reads use `t`, behind the
    // wall clock.
    let t = now - 1_000;
    // Expires at t + 1: live for the batch, expired by the wall clock.
    s.write(&mut b, 1, t + 1 - TTL);
    rocks(&mut b).drain_write_cache().unwrap();
    assert_eq!(s.read(&mut b, 1, t), present(1));
    // RocksDB compacts in the background while the batch runs.
    rocks(&mut b).compact().unwrap();
    assert_eq!(s.stored(&b), [1; 4]);
    assert_eq!(s.read(&mut b, 1, t), present(1));
    // Once processing time reaches the expiry, compaction drops it.
    rocks(&mut b).compact_at(t + 1).unwrap();
    assert_eq!(s.stored(&b), [0; 4]);
}

#[test]
fn a_ttl_list_that_only_receives_appends_stays_bounded() {
    for kind in BACKENDS {
        let (_dir, mut b, s, t) = ttl_backend(kind, ttl_config());
        let (key, step) = (3u64, TTL / 10);
        let stored_len = |b: &mut KeyedBackend, now: i64| {
            b.with_key_at(&key, M, now, |ctx| {
                let list = ctx
                    .backend
                    .value_get::<u64, super::ttl::TtlList<i32>>(s.lists.id, &ctx.cur);
                list.unwrap().map_or(0, |l| l.elements.len())
            })
            .unwrap()
        };
        let mut longest = 0;
        for i in 0..100 {
            b.with_key_at(&key, M, t + i * step, |ctx| s.lists.add(ctx, i as i32).unwrap())
                .unwrap();
            longest = longest.max(stored_len(&mut b, t + i * step));
        }
        // At most 10 elements are live at a time (added within the last TTL).
        assert!(
            longest <= 2 * 10 + 1,
            "{kind:?}: a list of 10 live elements held {longest}"
        );
        let live: Vec<i32> = (90..100).collect();
        let got = b
            .with_key_at(&key, M, t + 99 * step, |ctx| s.lists.get(ctx).unwrap())
            .unwrap();
        assert_eq!(got, live, "{kind:?}");
    }
}

#[test]
fn memory_cleanup_charges_every_element_it_checks() {
    let (dir, mut a, s, t) = ttl_backend(BACKENDS[0], ttl_config());
    // A big map in the first key group the sweeps visit, one key in each other key group.
    const ENTRIES: u64 = 4_000;
    let mut first_key = std::collections::BTreeMap::new();
    for k in 0u64.. {
        first_key.entry(crate::keygroup::key_group_for_key(&k, M)).or_insert(k);
        if first_key.len() == M as usize {
            break;
        }
    }
    let mut keys = first_key.into_values();
    let big = keys.next().unwrap();
    a.with_key_at(&big, M, t, |ctx| {
        for u in 0..ENTRIES {
            s.maps.put(ctx, format!("u{u}"), u).unwrap();
        }
    })
    .unwrap();
    for k in keys {
        a.with_key_at(&k, M, t, |ctx| s.maps.put(ctx, "a".into(), k).unwrap())
            .unwrap();
    }
    // Restored: the sweeps start afresh, at the big map's key group.
    let mut b = open(
        BACKENDS[0],
        dir.path(),
        full_range(),
        canonical_blocks(&a.snapshot(CheckpointId(1)).unwrap()),
    );
    let s = states(&mut b, Some(ttl_config()));
    assert_eq!(b.stored_entries(s.maps.id).unwrap(), M as usize);
    // Everything expired; another key keeps using the state. The first access sweeps the big
    // map, which costs 2 * ENTRIES checks (looked at to find something expired, then to drop
    // it): the other key groups wait for 2 * ENTRIES / CHECKS_PER_ACCESS accesses (charged by
    // keys, each would have been swept within M accesses).
    let user = 1_000_000u64;
    let access = |b: &mut KeyedBackend| {
        b.with_key_at(&user, M, t + TTL, |ctx| s.maps.put(ctx, "x".into(), 0).unwrap())
            .unwrap()
    };
    for _ in 0..2 * M {
        access(&mut b);
    }
    assert_eq!(
        b.stored_entries(s.maps.id).unwrap(),
        M as usize,
        "the other key groups' keys and the user's: the big map's sweep is not paid for yet"
    );
    for _ in 0..2 * ENTRIES as usize / super::memory::CHECKS_PER_ACCESS + M as usize {
        access(&mut b);
    }
    assert_eq!(b.stored_entries(s.maps.id).unwrap(), 1, "only the user's map is left");
}

#[test]
fn memory_cleanup_sweeps_keys_never_read_again_without_touching_snapshots() {
    let (dir, mut b, s, t) = ttl_backend(BACKENDS[0], ttl_config());
    const N: u64 = 1000;
    for k in 0..N {
        s.write(&mut b, k, t);
    }
    // A list with one expired and one live element keeps the live one.
    b.with_key_at(&0u64, M, t + 20, |ctx| s.lists.add(ctx, -1).unwrap())
        .unwrap();
    assert_eq!(s.stored(&b), [N as usize; 4]);
    let snapshot = b.snapshot(CheckpointId(1)).unwrap();
    // Only key N is used from now on; keys 0..N are never read again. Each access earns
    // CHECKS_PER_ACCESS checks, so N keys take about N / CHECKS_PER_ACCESS accesses (plus
    // one per key group) to sweep.
    let accesses = N as usize / super::memory::CHECKS_PER_ACCESS + 2 * M as usize;
    let mut before_all_swept = None;
    for i in 0..accesses {
        s.write(&mut b, N, t + TTL + 10);
        if i == accesses / 4 {
            before_all_swept = Some(s.stored(&b));
        }
    }
    let partly = before_all_swept.unwrap();
    assert!(
        partly.iter().all(|&n| n > 1 && n < N as usize),
        "sweeps go a key group at a time: {partly:?}"
    );
    // Key N and key 0's list (its live element) remain.
    assert_eq!(s.stored(&b), [1, 2, 1, 1]);
    assert_eq!(
        b.with_key_at(&0u64, M, t + TTL + 10, |ctx| s.lists.get(ctx).unwrap())
            .unwrap(),
        vec![-1]
    );
    // The snapshot taken before the sweeps still holds everything.
    let mut restored = open(BACKENDS[0], dir.path(), full_range(), canonical_blocks(&snapshot));
    let r = states(&mut restored, Some(ttl_config()));
    assert_eq!(r.stored(&restored), [N as usize; 4]);
}

#[test]
fn rocksdb_compaction_drops_expired_entries_and_the_write_cache_still_wins() {
    let (_dir, mut b, s, t) = ttl_backend(BACKENDS[1], ttl_config());
    let plain = b.registry::<u64>().value_state::<String>("plain").unwrap();
    const N: u64 = 500;
    for k in 0..N {
        s.write(&mut b, k, t);
        b.with_key_at(&k, M, t, |ctx| plain.update(ctx, "p".into()).unwrap())
            .unwrap();
    }
    // Key 0's list gets a live element too: compaction keeps a list with any live element.
    b.with_key_at(&0u64, M, t + 10, |ctx| s.lists.add(ctx, -1).unwrap())
        .unwrap();
    rocks(&mut b).drain_write_cache().unwrap();
    // Key 1 gets a newer value and key 2 a deletion, both only in the write cache.
    b.with_key_at(&1u64, M, t + 10, |ctx| s.values.update(ctx, "newer".into()).unwrap())
        .unwrap();
    b.with_key_at(&2u64, M, t + 10, |ctx| s.values.clear(ctx).unwrap())
        .unwrap();

    rocks(&mut b).compact_at(t + TTL - 1).unwrap();
    assert_eq!(
        s.stored(&b),
        [N as usize - 1, N as usize, N as usize, N as usize],
        "nothing expired yet"
    );
    rocks(&mut b).compact_at(t + TTL).unwrap();
    // Left: key 1's cached value, key 0's list.
    assert_eq!(s.stored(&b), [1, 1, 0, 0]);
    assert_eq!(
        b.stored_entries(plain.id).unwrap(),
        N as usize,
        "a state without TTL keeps everything"
    );
    for _ in 0..2 {
        let got = b
            .with_key_at(&1u64, M, t + TTL, |ctx| s.values.get(ctx).unwrap())
            .unwrap();
        assert_eq!(got.as_deref(), Some("newer"));
        let got = b
            .with_key_at(&2u64, M, t + TTL, |ctx| s.values.get(ctx).unwrap())
            .unwrap();
        assert_eq!(got, None);
        let got = b
            .with_key_at(&0u64, M, t + TTL, |ctx| s.lists.get(ctx).unwrap())
            .unwrap();
        assert_eq!(got, vec![-1]);
        // Once the cache is in RocksDB too, the same holds.
        rocks(&mut b).drain_write_cache().unwrap();
    }
}

/// Runs a maintenance step: a full compaction (its TTL filters judging at `now`) or a write
/// cache drain; RocksDB only, the memory backend has neither.
fn maintain(b: &mut KeyedBackend, op: &Op, now: i64) {
    if let KeyedBackend::RocksDb(r) = b {
        match op {
            Op::Compact => r.compact_at(now).unwrap(),
            Op::Drain => r.drain_write_cache().unwrap(),
            other => unreachable!("not a maintenance step: {other:?}"),
        }
    }
}

/// The key an operation works on; `None` for snapshots and maintenance.
fn op_key(op: &Op) -> Option<u64> {
    match op {
        Op::Put(k, _) | Op::Update(k, _) | Op::Clear(k) | Op::ListAdd(k, _) => Some(*k),
        Op::MapPut(k, _, _) | Op::MapRemove(k, _) | Op::MapUpdate(k, _, _) | Op::Reduce(k, _) => Some(*k),
        Op::Snapshot | Op::Compact | Op::Drain => None,
    }
}

/// Applies `ops` to TTL states from time `t0`, each after moving the clock on by its delta;
/// every read.
fn apply_ttl(b: &mut KeyedBackend, on_read: bool, ops: &[(i64, Op)], t0: i64) -> Vec<String> {
    let cfg = if on_read {
        ttl_config().update_on_read_and_write()
    } else {
        ttl_config()
    };
    let s = states(b, Some(cfg));
    let mut now = t0;
    let mut reads = Vec::new();
    for (i, (delta, op)) in ops.iter().enumerate() {
        now += delta;
        let Some(key) = op_key(op) else {
            match op {
                Op::Snapshot => drop(b.snapshot(CheckpointId(i as u64 + 1)).unwrap()),
                _ => maintain(b, op, now),
            }
            continue;
        };
        b.with_key_at(&key, M, now, |ctx| {
            let existed = s.apply(ctx, op);
            // Reads of one state only now and then, so that the others age unread.
            let mut m = s.maps.entries(ctx).unwrap();
            m.sort();
            let read = match key % 3 {
                0 => format!("{:?}", s.values.get(ctx).unwrap()),
                1 => format!("{:?}", s.lists.get(ctx).unwrap()),
                _ => format!("{:?}", s.sums.get(ctx).unwrap()),
            };
            reads.push(format!("{existed:?} {read} {m:?}"));
        })
        .unwrap();
    }
    // Everything at the end, as of the final time, after RocksDB compacted all of it then.
    maintain(b, &Op::Drain, now);
    maintain(b, &Op::Compact, now);
    for key in 0..40u64 {
        let all = b
            .with_key_at(&key, M, now, |ctx| {
                let mut m = s.maps.entries(ctx).unwrap();
                m.sort();
                format!(
                    "{:?} {:?} {m:?} {:?}",
                    s.values.get(ctx).unwrap(),
                    s.lists.get(ctx).unwrap(),
                    s.sums.get(ctx).unwrap()
                )
            })
            .unwrap();
        reads.push(all);
    }
    reads
}

/// TTL state written out directly, independently of `ttl.rs`: per state, timestamped values.
/// What a read must return follows from the timestamps alone.
struct TtlModel {
    on_read: bool,
    values: BTreeMap<u64, (i64, String)>,
    lists: BTreeMap<u64, Vec<(i64, i32)>>,
    maps: BTreeMap<u64, BTreeMap<String, (i64, u64)>>,
    sums: BTreeMap<u64, (i64, i64)>,
}

/// Whether a value last touched at `ts` is still there at `now`.
fn alive(ts: i64, now: i64) -> bool {
    ts + TTL > now
}

impl TtlModel {
    fn new(on_read: bool) -> Self {
        Self {
            on_read,
            values: BTreeMap::new(),
            lists: BTreeMap::new(),
            maps: BTreeMap::new(),
            sums: BTreeMap::new(),
        }
    }

    /// The live value of `key` before a write.
    fn live<V: Clone>(slot: &BTreeMap<u64, (i64, V)>, key: u64, now: i64) -> Option<V> {
        slot.get(&key).filter(|(ts, _)| alive(*ts, now)).map(|(_, v)| v.clone())
    }

    /// A read of `key`: refreshed when read with `OnReadAndWrite`.
    fn get<V: Clone>(on_read: bool, slot: &mut BTreeMap<u64, (i64, V)>, key: u64, now: i64) -> Option<V> {
        let (ts, v) = slot.get_mut(&key).filter(|(ts, _)| alive(*ts, now))?;
        if on_read {
            *ts = now;
        }
        Some(v.clone())
    }

    fn list(&mut self, key: u64, now: i64) -> Vec<i32> {
        let list = self.lists.entry(key).or_default();
        list.retain(|(ts, _)| alive(*ts, now));
        if self.on_read {
            list.iter_mut().for_each(|(ts, _)| *ts = now);
        }
        list.iter().map(|(_, v)| *v).collect()
    }

    fn map(&mut self, key: u64, now: i64) -> Vec<(String, u64)> {
        let map = self.maps.entry(key).or_default();
        map.retain(|_, (ts, _)| alive(*ts, now));
        if self.on_read {
            map.values_mut().for_each(|(ts, _)| *ts = now);
        }
        map.iter().map(|(u, (_, v))| (u.clone(), *v)).collect()
    }

    /// Applies `op` at `now`; a map update's "existed".
    fn apply(&mut self, op: &Op, now: i64) -> Option<bool> {
        match op {
            Op::Put(k, v) => {
                self.values.insert(*k, (now, v.clone()));
            }
            Op::Update(k, c) => {
                let mut v = Self::live(&self.values, *k, now).unwrap_or_default();
                v.push(*c as char);
                self.values.insert(*k, (now, v));
            }
            Op::Clear(k) => {
                self.values.remove(k);
                self.lists.remove(k);
                self.maps.remove(k);
            }
            Op::ListAdd(k, v) => self.lists.entry(*k).or_default().push((now, *v)),
            Op::MapPut(k, u, v) => {
                self.maps.entry(*k).or_default().insert(format!("u{u}"), (now, *v));
            }
            Op::MapRemove(k, u) => {
                self.maps.entry(*k).or_default().remove(&format!("u{u}"));
            }
            Op::MapUpdate(k, u, v) => {
                let map = self.maps.entry(*k).or_default();
                let old = map
                    .get(&format!("u{u}"))
                    .filter(|(ts, _)| alive(*ts, now))
                    .map(|(_, x)| *x);
                map.insert(format!("u{u}"), (now, old.unwrap_or(7).wrapping_mul(*v)));
                return Some(old.is_some());
            }
            Op::Reduce(k, v) => {
                let old = Self::live(&self.sums, *k, now);
                self.sums.insert(*k, (now, old.map_or(*v, |o| o + v)));
            }
            Op::Snapshot | Op::Compact | Op::Drain => {}
        }
        None
    }

    /// What `apply_ttl` reads.
    fn run(mut self, ops: &[(i64, Op)], t0: i64) -> Vec<String> {
        let mut now = t0;
        let mut reads = Vec::new();
        for (delta, op) in ops {
            now += delta;
            let Some(key) = op_key(op) else { continue };
            let existed = self.apply(op, now);
            let m = self.map(key, now);
            let read = match key % 3 {
                0 => format!("{:?}", Self::get(self.on_read, &mut self.values, key, now)),
                1 => format!("{:?}", self.list(key, now)),
                _ => format!("{:?}", Self::get(self.on_read, &mut self.sums, key, now)),
            };
            reads.push(format!("{existed:?} {read} {m:?}"));
        }
        for key in 0..40u64 {
            let m = self.map(key, now);
            let v = Self::get(self.on_read, &mut self.values, key, now);
            let l = self.list(key, now);
            let r = Self::get(self.on_read, &mut self.sums, key, now);
            reads.push(format!("{v:?} {l:?} {m:?} {r:?}"));
        }
        reads
    }
}

fn clock_step() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => Just(0i64),
        1 => Just(TTL - 1),
        1 => Just(TTL),
        2 => 1i64..TTL / 3,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn every_backend_expires_ttl_state_as_the_model_does(
        on_read in any::<bool>(),
        ops in proptest::collection::vec((clock_step(), op_in(12, 4)), 1..80),
    ) {
        let t0 = processing_time_now();
        let want = TtlModel::new(on_read).run(&ops, t0);
        let dir = tempfile::tempdir().unwrap();
        for (what, mut b) in backends(dir.path()) {
            prop_assert_eq!(&apply_ttl(&mut b, on_read, &ops, t0), &want, "{}", what);
        }
    }
}
