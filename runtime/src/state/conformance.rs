//! One conformance suite for every keyed state backend: the same tests run unchanged against
//! the memory backend and RocksDB, plus a property test that applies the same random operations
//! to both and compares every read.

use super::{KeyedBackend, KeyedSnapshot};
use crate::checkpoint::{CheckpointId, CheckpointKind};
use crate::config::StateBackendKind;
use crate::keygroup::{range_for_subtask, KeyGroupRange};
use crate::operator::{OperatorSnapshot, TaskInfo};
use crate::protocol::AckedState;
use crate::restore::RestoreSource;
use crate::snapshot::{
    read_block, CheckpointMetadata, OperatorSnapshotMeta, RestoredKeyGroups, StateFileWriter, FORMAT_VERSION,
};
use crate::storage::{CheckpointPaths, Storage};
use crate::task::chain::PendingSnapshot;
use crate::task::{persist, PersistTarget};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

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

/// Everything a backend holds, read through the public handles, in a comparable form.
#[derive(Debug, PartialEq, Default)]
struct Contents {
    values: BTreeMap<u64, String>,
    lists: BTreeMap<u64, Vec<i32>>,
    maps: BTreeMap<(u64, String), u64>,
    sums: BTreeMap<u64, i64>,
}

fn read_all(b: &mut KeyedBackend) -> Contents {
    let mut reg = b.registry::<u64>();
    let values = reg.value_state::<String>("values").unwrap();
    let lists = reg.list_state::<i32>("lists").unwrap();
    let maps = reg.map_state::<String, u64>("maps").unwrap();
    let sums = reg.reducing_state::<i64>("sums", |a, b| a + b).unwrap();
    Contents {
        values: values.entries(b).unwrap().into_iter().collect(),
        lists: lists.entries(b).unwrap().into_iter().collect(),
        maps: maps
            .all_entries(b)
            .unwrap()
            .into_iter()
            .map(|(k, uk, v)| ((k, uk), v))
            .collect(),
        sums: sums.entries(b).unwrap().into_iter().collect(),
    }
}

/// Writes a known pattern of state for keys `0..n`.
fn fill(b: &mut KeyedBackend, n: u64) {
    let mut reg = b.registry::<u64>();
    let values = reg.value_state::<String>("values").unwrap();
    let lists = reg.list_state::<i32>("lists").unwrap();
    let maps = reg.map_state::<String, u64>("maps").unwrap();
    let sums = reg.reducing_state::<i64>("sums", |a, b| a + b).unwrap();
    for k in 0..n {
        b.with_key(&k, M, |ctx| {
            values.update(ctx, format!("v{k}")).unwrap();
            for i in 0..(k % 4) as i32 {
                lists.add(ctx, i).unwrap();
            }
            maps.put(ctx, format!("a{}", k % 3), k).unwrap();
            maps.put(ctx, "b".into(), k * 2).unwrap();
            sums.add(ctx, k as i64).unwrap();
            sums.add(ctx, 1).unwrap();
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
        let store = format!("memory://conformance-{}", dir.display().to_string().replace('/', "_"));
        Self {
            storage: Storage::open(&store).unwrap(),
            paths: CheckpointPaths::new("job"),
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    /// Persists `snapshot` as checkpoint `id`; returns the ack and the bytes uploaded.
    fn persist(&self, id: u64, snapshot: KeyedSnapshot) -> (AckedState, u64) {
        let target = PersistTarget {
            storage: self.storage.clone(),
            job_dir: self.paths.job_dir(),
            chk_dir: self.paths.checkpoint_dir(CheckpointId(id)),
            subtask: 0,
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
                parallelism: 1,
                subtasks: vec![Some(acked.handle)],
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
            rescale_merge: Default::default(),
            finish_hooks: Default::default(),
        };
        let restored = rt.block_on(source.load(&info)).unwrap().unwrap();
        KeyedBackend::open(into, range, &dir.join("restored"), restored.keyed, Default::default())
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
        let values = b.registry::<u64>().value_state::<String>("values").unwrap();
        for k in 0..300u64 {
            b.with_key(&k, M, |ctx| values.update(ctx, format!("later{k}")).unwrap())
                .unwrap();
        }
        let mut restored = checkpoint_and_restore(snapshot, kind, full_range(), dir.path());
        assert_eq!(read_all(&mut restored), expected(300), "write cache limit {limit}");
        let mut want = expected(300);
        for k in 0..300u64 {
            want.values.insert(k, format!("later{k}"));
        }
        assert_eq!(read_all(&mut b), want, "write cache limit {limit}");
    }
}

fn canonical_blocks(snapshot: &KeyedSnapshot) -> RestoredKeyGroups {
    let mut w = StateFileWriter::new();
    let index = snapshot.write_canonical(&mut w).unwrap();
    let file = w.finish();
    let blocks = index
        .range
        .iter()
        .map(|kg| {
            let off = index.offsets[index.range.index_of(kg)];
            (kg, read_block(&file, off, "t").unwrap().to_vec())
        })
        .collect();
    RestoredKeyGroups {
        blocks,
        rocksdb: vec![],
    }
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
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0u64..40;
    prop_oneof![
        (key.clone(), "[a-z]{0,6}").prop_map(|(k, v)| Op::Put(k, v)),
        (key.clone(), any::<u8>()).prop_map(|(k, c)| Op::Update(k, c)),
        key.clone().prop_map(Op::Clear),
        (key.clone(), any::<i32>()).prop_map(|(k, v)| Op::ListAdd(k, v)),
        (key.clone(), 0u8..4, any::<u64>()).prop_map(|(k, u, v)| Op::MapPut(k, u, v)),
        (key.clone(), 0u8..4).prop_map(|(k, u)| Op::MapRemove(k, u)),
        (key.clone(), 0u8..4, 0u64..1000).prop_map(|(k, u, v)| Op::MapUpdate(k, u, v)),
        (key, -100i64..100).prop_map(|(k, v)| Op::Reduce(k, v)),
        Just(Op::Snapshot),
    ]
}

fn apply(b: &mut KeyedBackend, ops: &[Op]) -> Vec<String> {
    let mut reg = b.registry::<u64>();
    let values = reg.value_state::<String>("values").unwrap();
    let lists = reg.list_state::<i32>("lists").unwrap();
    let maps = reg.map_state::<String, u64>("maps").unwrap();
    let sums = reg.reducing_state::<i64>("sums", |a, b| a + b).unwrap();
    let mut reads = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let key = match op {
            Op::Put(k, _) | Op::Update(k, _) | Op::Clear(k) | Op::ListAdd(k, _) => *k,
            Op::MapPut(k, _, _) | Op::MapRemove(k, _) | Op::MapUpdate(k, _, _) | Op::Reduce(k, _) => *k,
            Op::Snapshot => {
                // Taking (and dropping) a snapshot must not change what reads see.
                drop(b.snapshot(CheckpointId(i as u64 + 1)).unwrap());
                continue;
            }
        };
        b.with_key(&key, M, |ctx| {
            let mut existed = None;
            match op {
                Op::Put(_, v) => values.update(ctx, v.clone()).unwrap(),
                Op::Update(_, c) => values.update_with(ctx, String::new, |v| v.push(*c as char)).unwrap(),
                Op::Clear(_) => {
                    values.clear(ctx).unwrap();
                    lists.clear(ctx).unwrap();
                    maps.clear(ctx).unwrap();
                }
                Op::ListAdd(_, v) => lists.add(ctx, *v).unwrap(),
                Op::MapPut(_, u, v) => maps.put(ctx, format!("u{u}"), *v).unwrap(),
                Op::MapRemove(_, u) => maps.remove(ctx, &format!("u{u}")).unwrap(),
                Op::MapUpdate(_, u, v) => {
                    existed = Some(
                        maps.update_with(ctx, format!("u{u}"), || 7, |x| *x = x.wrapping_mul(*v))
                            .unwrap(),
                    )
                }
                Op::Reduce(_, v) => sums.add(ctx, *v).unwrap(),
                Op::Snapshot => unreachable!(),
            }
            let mut m = maps.entries(ctx).unwrap();
            m.sort();
            reads.push(format!(
                "{existed:?} {:?} {:?} {:?} {:?}",
                values.get(ctx).unwrap(),
                lists.get(ctx).unwrap(),
                m,
                sums.get(ctx).unwrap()
            ));
        })
        .unwrap();
    }
    reads
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn both_backends_read_the_same_after_the_same_operations(ops in proptest::collection::vec(op(), 1..120)) {
        let dir = tempfile::tempdir().unwrap();
        let mut mem = open(BACKENDS[0], &dir.path().join("m"), full_range(), Default::default());
        let mut rocks = open(BACKENDS[1], &dir.path().join("r"), full_range(), Default::default());
        // A tiny write cache: writes reach RocksDB while a frozen cache may still be moving.
        let mut small = open(BACKENDS[1], &dir.path().join("s"), full_range(), Default::default());
        if let KeyedBackend::RocksDb(r) = &mut small {
            r.set_write_cache_limit(200);
        }
        let reads = apply(&mut mem, &ops);
        prop_assert_eq!(&reads, &apply(&mut rocks, &ops));
        prop_assert_eq!(&reads, &apply(&mut small, &ops));
        let all = read_all(&mut mem);
        prop_assert_eq!(&all, &read_all(&mut rocks));
        prop_assert_eq!(&all, &read_all(&mut small));
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
    let values = b.registry::<u64>().value_state::<String>("values").unwrap();
    for k in 0..100u64 {
        b.with_key(&k, M, |ctx| values.update(ctx, format!("changed{k}")).unwrap())
            .unwrap();
    }
    let (acked, uploaded, total) = checkpoint(&mut b, 2);
    assert!(
        uploaded * 20 < total,
        "an incremental checkpoint after 100 changed keys uploaded {uploaded} of {total} bytes"
    );
    assert!(acked.new_shared.len() < acked.handle.rocksdb.as_ref().unwrap().sst_files.len());
    // Restoring from the incremental checkpoint is exact.
    let mut r = store.restore(2, acked, kind, full_range(), dir.path()).unwrap();
    let mut want = expected(50_000);
    for k in 0..100u64 {
        want.values.insert(k, format!("changed{k}"));
    }
    assert_eq!(read_all(&mut r), want);
}
