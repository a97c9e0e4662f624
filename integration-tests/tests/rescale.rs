//! Restoring at a new parallelism: every key's state lands on exactly one new subtask and every
//! part of the input is read exactly once, on both backends and across them.

use sluice_coordinator::{run_job, spawn_job, JobOutcome, JobSubmission, RestoredFrom};
use sluice_integration_tests::{completed_checkpoints, expected_transactions_output, files_below, single_job_dir};
use sluice_runtime::config::{JobConfig, RescaleMerge, StateBackendKind};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const EVENTS: u64 = 200_000;
const USERS: u64 = 3_000;
const SEED: u64 = 9;
const MEMORY: StateBackendKind = StateBackendKind::Memory;
const ROCKSDB: StateBackendKind = StateBackendKind::RocksDb { incremental: true };

fn submission(
    dir: &Path,
    name: &str,
    parallelism: usize,
    backend: StateBackendKind,
    rate: u64,
    from: Option<&str>,
) -> JobSubmission {
    let job = sluice_examples::transactions::definition();
    let settings = vec![
        format!("events={EVENTS}"),
        format!("users={USERS}"),
        format!("seed={SEED}"),
        format!("rate={rate}"),
        format!("output={}", dir.join(format!("{name}.csv")).display()),
    ];
    let params = job.params_from_settings(&settings).unwrap();
    let mut config = JobConfig {
        parallelism,
        state_backend: backend,
        checkpoint_dir: dir.join(format!("ck-{name}")).display().to_string(),
        data_dir: dir.join(format!("data-{name}")),
        from_savepoint: from.map(str::to_string),
        max_parallelism_from_snapshot: true,
        ..JobConfig::default()
    };
    config.checkpoint.interval = Some(Duration::from_millis(50));
    JobSubmission { job, params, config }
}

fn assert_exact(dir: &Path, name: &str) {
    let got = std::fs::read_to_string(dir.join(format!("{name}.csv"))).unwrap();
    assert!(
        got == expected_transactions_output(EVENTS, USERS, SEED),
        "{name}: totals differ"
    );
}

/// The earliest retained checkpoint of a finished run (the most input left after it).
fn earliest_checkpoint(ck: &Path) -> PathBuf {
    let chks = completed_checkpoints(&single_job_dir(ck));
    chks.into_iter().next().expect("a retained checkpoint").1
}

fn checkpoint_at_2_restores_at_1_3_and_5(backend: StateBackendKind, merge: RescaleMerge) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let report = run_job(submission(d, "first", 2, backend, 100_000, None)).unwrap();
    assert_eq!(report.outcome, JobOutcome::Finished);
    assert_exact(d, "first");
    let chk = earliest_checkpoint(&d.join("ck-first"));
    for p in [1, 3, 5] {
        let name = format!("at{p}");
        let mut sub = submission(d, &name, p, backend, 0, Some(chk.to_str().unwrap()));
        sub.config.rocksdb.rescale_merge = merge;
        let report = run_job(sub).unwrap();
        assert_eq!(report.outcome, JobOutcome::Finished, "at parallelism {p}");
        assert!(matches!(report.initial_restore, RestoredFrom::Savepoint(_)));
        assert!(report.source_records < EVENTS, "the restore at {p} resumed mid-stream");
        assert_exact(d, &name);
    }
}

#[test]
fn memory_checkpoint_at_2_restores_at_1_3_and_5() {
    checkpoint_at_2_restores_at_1_3_and_5(MEMORY, RescaleMerge::Iterate);
}

#[test]
fn rocksdb_checkpoint_at_2_restores_at_1_3_and_5() {
    checkpoint_at_2_restores_at_1_3_and_5(ROCKSDB, RescaleMerge::Iterate);
}

#[test]
fn rocksdb_checkpoint_at_2_restores_at_1_3_and_5_by_sst_ingestion() {
    checkpoint_at_2_restores_at_1_3_and_5(ROCKSDB, RescaleMerge::Ingest);
}

/// 1 -> 4 -> 3 -> 1 through savepoints taken from running jobs, with the given backends.
fn savepoint_chain(backends: [StateBackendKind; 4]) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut from: Option<String> = None;
    for (step, (p, backend)) in [1usize, 4, 3, 1].into_iter().zip(backends).enumerate() {
        let name = format!("step{step}");
        let last = step == 3;
        // 5 s of input in all: three savepoints, each after two checkpoints, leave input to the
        // next step even when checkpoints are slow on a loaded machine.
        let rate = if last { 0 } else { 40_000 };
        let handle = spawn_job(submission(d, &name, p, backend, rate, from.as_deref())).unwrap();
        let savepoint = (!last).then(|| {
            // Mid-run: after two checkpoints, records have flowed.
            assert!(handle.wait_for_checkpoints(2));
            handle.savepoint(d.join("savepoints").to_str().unwrap()).unwrap()
        });
        let report = handle.wait().unwrap();
        assert_eq!(report.outcome, JobOutcome::Finished, "step {step}");
        assert_exact(d, &name);
        if step > 0 {
            assert!(report.source_records < EVENTS, "step {step} resumed mid-stream");
        }
        from = savepoint;
    }
}

#[test]
fn a_chain_1_4_3_1_across_savepoints_memory_then_rocksdb() {
    savepoint_chain([MEMORY, ROCKSDB, MEMORY, ROCKSDB]);
}

#[test]
fn a_chain_1_4_3_1_across_savepoints_rocksdb_then_memory() {
    savepoint_chain([ROCKSDB, MEMORY, ROCKSDB, MEMORY]);
}

fn disk(path: &Path) -> BTreeMap<String, u64> {
    files_below(path)
        .into_iter()
        .map(|f| {
            let len = std::fs::metadata(path.join(&f)).unwrap().len();
            (f, len)
        })
        .collect()
}

#[test]
fn refused_rescales_say_why_and_change_nothing_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut first = submission(d, "first", 2, MEMORY, 200_000, None);
    first.config.max_parallelism = 16;
    assert_eq!(run_job(first).unwrap().outcome, JobOutcome::Finished);
    let chk = earliest_checkpoint(&d.join("ck-first"));
    let before = disk(&d.join("ck-first"));

    // Above the max parallelism stored in the snapshot.
    let e = spawn_job(submission(d, "too-wide", 20, MEMORY, 0, Some(chk.to_str().unwrap())))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("parallelism 20 is above the max parallelism 16"),
        "{e}"
    );

    // Another max parallelism asked for explicitly.
    let mut other = submission(d, "other-max", 2, MEMORY, 0, Some(chk.to_str().unwrap()));
    other.config.max_parallelism = 32;
    other.config.max_parallelism_from_snapshot = false;
    let e = run_job(other).err().unwrap();
    assert!(e.to_string().contains("max parallelism cannot change"), "{e}");

    // A path that holds no snapshot.
    let e = run_job(submission(
        d,
        "missing",
        2,
        MEMORY,
        0,
        Some(d.join("nope").to_str().unwrap()),
    ))
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("is not a completed checkpoint or savepoint"),
        "{e}"
    );

    assert_eq!(
        disk(&d.join("ck-first")),
        before,
        "a refused restore changed the snapshot's job directory"
    );
    assert!(
        !d.join("nope").exists(),
        "opening a missing snapshot created a directory"
    );
    for name in ["too-wide", "other-max", "missing"] {
        assert!(!d.join(format!("{name}.csv")).exists());
    }
}

/// `transactions` whose totals operator got a new uid: the old totals have no home.
fn renamed_totals(p: &sluice_runtime::JobParams, env: &mut sluice_runtime::StreamEnv) -> sluice_runtime::Result<()> {
    use sluice_examples::transactions::{transaction, RunningTotals, Transaction};
    let (events, users, seed) = (p.get::<u64>("events")?, p.get::<u64>("users")?, p.get::<u64>("seed")?);
    let generator = sluice_operators::generator::LaneGenerator::new(events, p.get("lanes")?, 0, move |i| {
        transaction(seed, users, i)
    });
    env.source("transactions", generator)
        .uid("transactions-source")
        .key_by(|t: &Transaction| t.user)
        .process("running-totals", RunningTotals::default())
        .uid("totals-v2")
        .sink(
            "totals-output",
            sluice_operators::sorted_sink::SortedFileSink::new(None),
        )
        .uid("totals-output")
        .parallelism(1);
    Ok(())
}

#[test]
fn state_of_a_removed_operator_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(
        run_job(submission(d, "first", 2, MEMORY, 200_000, None))
            .unwrap()
            .outcome,
        JobOutcome::Finished
    );
    let chk = earliest_checkpoint(&d.join("ck-first"));
    let renamed = |allow: bool| {
        let mut sub = submission(d, "renamed", 2, MEMORY, 0, Some(chk.to_str().unwrap()));
        sub.job.build = renamed_totals;
        sub.config.allow_non_restored_state = allow;
        sub
    };
    let e = run_job(renamed(false)).err().unwrap().to_string();
    assert!(
        e.contains("state for operator uid 'running-totals'") && e.contains("--allow-non-restored-state"),
        "{e}"
    );
    let report = run_job(renamed(true)).unwrap();
    assert_eq!(report.outcome, JobOutcome::Finished);
    // The source positions were restored (their uid is unchanged); the old totals were dropped.
    assert!(report.source_records < EVENTS);
}
