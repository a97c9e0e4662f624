//! Savepoints through the Rust API: taken from a running job, canonical and self-contained
//! (they survive being moved), and restorable into the other state backend with exact totals.

use sluice_coordinator::{run_job, spawn_job, JobOutcome, JobSubmission, RestoredFrom};
use sluice_integration_tests::expected_transactions_output;
use sluice_runtime::config::{JobConfig, StateBackendKind};
use sluice_runtime::snapshot::CheckpointMetadata;
use sluice_runtime::CheckpointKind;
use std::path::Path;
use std::time::Duration;

const EVENTS: u64 = 200_000;
const USERS: u64 = 4_000;
const SEED: u64 = 5;
const ROCKSDB: StateBackendKind = StateBackendKind::RocksDb { incremental: true };

fn submission(dir: &Path, backend: StateBackendKind, output: &Path, extra: &[String]) -> JobSubmission {
    let job = sluice_examples::transactions::definition();
    let mut settings = vec![
        format!("events={EVENTS}"),
        format!("users={USERS}"),
        format!("seed={SEED}"),
        format!("output={}", output.display()),
    ];
    settings.extend(extra.iter().cloned());
    let params = job.params_from_settings(&settings).unwrap();
    let mut config = JobConfig {
        parallelism: 2,
        state_backend: backend,
        checkpoint_dir: dir.join("ck").display().to_string(),
        data_dir: dir.join("data"),
        ..JobConfig::default()
    };
    config.checkpoint.interval = Some(Duration::from_millis(100));
    JobSubmission { job, params, config }
}

fn savepoint_moves_between_backends(from: StateBackendKind, to: StateBackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let first_out = dir.path().join("first.csv");
    // Rate-limited so that the savepoint is taken mid-run.
    let handle = spawn_job(submission(dir.path(), from, &first_out, &["rate=100000".into()])).unwrap();
    // Mid-run: after two checkpoints, records have flowed.
    assert!(handle.wait_for_checkpoints(2));
    let url = handle
        .savepoint(dir.path().join("savepoints").to_str().unwrap())
        .unwrap();
    let report = handle.wait().unwrap();
    assert_eq!(report.outcome, JobOutcome::Finished);
    assert_eq!(
        std::fs::read_to_string(&first_out).unwrap(),
        expected_transactions_output(EVENTS, USERS, SEED)
    );

    // Canonical and self-contained: no RocksDB native state, nothing outside its directory.
    let path = url.strip_prefix("file://").expect("a file URL");
    let meta = CheckpointMetadata::decode(&std::fs::read(format!("{path}/_metadata")).unwrap(), path).unwrap();
    assert_eq!(meta.kind, CheckpointKind::Savepoint);
    assert!(meta.referenced_files().all(|h| h.rocksdb.is_none()));
    assert!(meta
        .operator("running-totals")
        .unwrap()
        .subtasks
        .iter()
        .all(Option::is_some));
    let moved = dir.path().join("moved-savepoint");
    std::fs::rename(path, &moved).unwrap();

    let second_out = dir.path().join("second.csv");
    let mut sub = submission(dir.path(), to, &second_out, &[]);
    sub.config.from_savepoint = Some(moved.display().to_string());
    let report = run_job(sub).unwrap();
    assert_eq!(report.outcome, JobOutcome::Finished);
    assert!(matches!(report.initial_restore, RestoredFrom::Savepoint(_)));
    // The restored job did not start over: it read fewer records than the whole input.
    assert!(
        report.source_records < EVENTS,
        "{} records read after the restore",
        report.source_records
    );
    assert_eq!(
        std::fs::read_to_string(&second_out).unwrap(),
        expected_transactions_output(EVENTS, USERS, SEED)
    );
}

#[test]
fn a_memory_savepoint_restores_into_rocksdb() {
    savepoint_moves_between_backends(StateBackendKind::Memory, ROCKSDB);
}

#[test]
fn a_rocksdb_savepoint_restores_into_memory() {
    savepoint_moves_between_backends(ROCKSDB, StateBackendKind::Memory);
}
