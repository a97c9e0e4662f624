//! `transactions` with an injected failure at parallelism 1, 2 and 3: the job restarts from a
//! completed checkpoint and the final totals are exact.

use sluice_coordinator::{run_job, JobOutcome, JobSubmission, RestoredFrom};
use sluice_integration_tests::{assert_only_completed_checkpoints, expected_transactions_output};
use sluice_runtime::config::{JobConfig, StateBackendKind};
use std::time::Duration;

fn failover_at(parallelism: usize, state_backend: StateBackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("totals.csv");
    let (events, users, seed) = (200_000u64, 2_000u64, 7u64);
    let job = sluice_examples::transactions::definition();
    // Rate-limited to ~2 s so that the failure (about a third of the way in at subtask 0) comes
    // after many 50 ms checkpoints.
    let settings: Vec<String> = vec![
        format!("events={events}"),
        format!("users={users}"),
        format!("seed={seed}"),
        "rate=100000".into(),
        format!("fail_at={}", 70_000 / parallelism as u64),
        // The restart must restore a checkpoint, even when a loaded machine is slow to
        // complete the first one.
        "fail_after_checkpoint=true".into(),
        format!("output={}", out.display()),
    ];
    let params = job.params_from_settings(&settings).unwrap();
    let mut config = JobConfig {
        parallelism,
        state_backend,
        checkpoint_dir: dir.path().join("ck").display().to_string(),
        data_dir: dir.path().join("data"),
        ..JobConfig::default()
    };
    config.checkpoint.interval = Some(Duration::from_millis(50));
    config.restart.delay = Duration::from_millis(10);
    let report = run_job(JobSubmission { job, params, config }).unwrap();

    assert_eq!(report.outcome, JobOutcome::Finished);
    assert_eq!(report.restarts.len(), 1, "exactly one restart: {:?}", report.restarts);
    let restart = &report.restarts[0];
    assert!(restart.cause.contains("injected failure"), "cause: {}", restart.cause);
    match restart.restored_from {
        RestoredFrom::Checkpoint(id) => assert!(
            report.checkpoints.iter().any(|c| c.id == id),
            "{id:?} was never completed"
        ),
        ref other => panic!("expected a restore from a checkpoint, got {other:?}"),
    }
    // Records were replayed after the restore, yet every total is exact.
    assert!(report.source_records > events);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        expected_transactions_output(events, users, seed)
    );

    let jobs = assert_only_completed_checkpoints(&dir.path().join("ck"));
    let retained: Vec<u64> = report.retained.iter().map(|id| id.0).collect();
    assert_eq!(jobs.values().next().unwrap(), &retained);
    assert_eq!(retained.len(), 3);
}

const ROCKSDB: StateBackendKind = StateBackendKind::RocksDb { incremental: true };

#[test]
fn failover_parallelism_1() {
    failover_at(1, StateBackendKind::Memory);
}

#[test]
fn failover_parallelism_2() {
    failover_at(2, StateBackendKind::Memory);
}

#[test]
fn failover_parallelism_3() {
    failover_at(3, StateBackendKind::Memory);
}

#[test]
fn failover_rocksdb_parallelism_1() {
    failover_at(1, ROCKSDB);
}

#[test]
fn failover_rocksdb_parallelism_2() {
    failover_at(2, ROCKSDB);
}

#[test]
fn failover_rocksdb_parallelism_3() {
    failover_at(3, ROCKSDB);
}

#[test]
fn failover_rocksdb_full_checkpoints() {
    failover_at(2, StateBackendKind::RocksDb { incremental: false });
}

#[test]
fn restart_attempts_run_out_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let job = sluice_examples::transactions::definition();
    let params = job
        .params_from_settings(&["events=50000".into(), "users=10".into(), "fail_at=100".into()])
        .unwrap();
    let mut config = JobConfig {
        checkpoint_dir: dir.path().display().to_string(),
        ..JobConfig::default()
    };
    config.restart.attempts = 0;
    let report = run_job(JobSubmission { job, params, config }).unwrap();
    match report.outcome {
        JobOutcome::Failed(cause) => {
            assert!(cause.contains("injected failure at record 100"), "{cause}")
        }
        other => panic!("expected failure, got {other:?}"),
    }
    // Nothing partial is left behind by the failed attempt.
    assert_only_completed_checkpoints(dir.path());
}
