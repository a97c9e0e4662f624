//! The S3 server goes down during checkpoints and comes back: the checkpoints that could not be
//! stored are declined with the storage error, none is left partial, later checkpoints
//! complete, and the totals are exact. (Its own test binary: it stops its server.)

use sluice_coordinator::{spawn_job, JobOutcome, JobSubmission};
use sluice_integration_tests::{assert_no_orphan_objects, expected_transactions_output, S3Server};
use sluice_runtime::config::{JobConfig, StateBackendKind};
use std::time::Duration;

#[test]
fn checkpoints_declined_while_s3_is_down_leave_nothing_partial_and_later_ones_complete() {
    let mut s3 = S3Server::with_buckets(&["outage"]);
    let ck = "s3://outage/ck";
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("totals.csv");
    let (events, users, seed) = (600_000u64, 2_000u64, 5u64);
    let job = sluice_examples::transactions::definition();
    let settings = vec![
        format!("events={events}"),
        format!("users={users}"),
        format!("seed={seed}"),
        "rate=100000".to_string(),
        format!("output={}", out.display()),
    ];
    let params = job.params_from_settings(&settings).unwrap();
    let mut config = JobConfig {
        parallelism: 2,
        state_backend: StateBackendKind::RocksDb { incremental: true },
        checkpoint_dir: ck.to_string(),
        data_dir: dir.path().join("data"),
        ..JobConfig::default()
    };
    config.checkpoint.interval = Some(Duration::from_millis(100));
    // Storage outages are not the tasks' fault: tolerate them rather than fail over.
    config.checkpoint.tolerable_failures = 1_000;
    let handle = spawn_job(JobSubmission { job, params, config }).unwrap();

    assert!(handle.wait_for_checkpoints(2));
    s3.stop();
    let reason = handle
        .wait_for_failed_checkpoints(1)
        .expect("a checkpoint fails while the server is down");
    assert!(reason.contains("storage error at s3://outage/ck"), "{reason}");
    s3.resume();
    // At most one checkpoint completed around the stop: two more complete after the outage.
    assert!(
        handle.wait_for_checkpoints(5),
        "checkpoints complete again once S3 is back"
    );
    let report = handle.wait().unwrap();

    assert_eq!(report.outcome, JobOutcome::Finished);
    assert!(report.restarts.is_empty(), "{:?}", report.restarts);
    assert!(report.failed_checkpoints >= 1);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        expected_transactions_output(events, users, seed)
    );
    assert_no_orphan_objects(ck);
}
