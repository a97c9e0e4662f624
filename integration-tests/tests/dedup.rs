//! `dedup` end to end: the kept records, committed through the exactly-once file sink, equal a
//! direct computation, with and without a failure, on both backends.

use sluice_coordinator::{run_job, JobOutcome, JobSubmission};
use sluice_examples::dedup::{definition, expected};
use sluice_integration_tests::assert_same_lines;
use sluice_runtime::config::StateBackendKind;

const EVENTS: u64 = 20_000;
const SEED: u64 = 9;
const MAX_DISTANCE: u64 = 2_000;
/// 500 records of event time: copies closer than that are dropped, farther ones kept.
const TTL_MS: i64 = 5_000;

#[test]
fn dedup_keeps_exactly_the_first_copy_within_the_ttl_through_a_failure() {
    let kept = expected(EVENTS, SEED, MAX_DISTANCE, TTL_MS);
    assert!(
        kept.len() + 500 < EVENTS as usize,
        "the input has copies within the TTL"
    );
    assert!(
        kept.iter().filter(|r| r.id != r.index).count() > 500,
        "and copies farther apart, which are kept"
    );
    let mut want: Vec<String> = kept.iter().map(|r| r.to_string()).collect();
    want.sort();
    for backend in [
        StateBackendKind::Memory,
        StateBackendKind::RocksDb { incremental: true },
    ] {
        // The failure waits for a completed checkpoint, which the restart restores: the
        // copies' timers are restored in the middle.
        for extra in [
            &[][..],
            &["rate=10000", "fail_at=3000", "fail_after_checkpoint=true"][..],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let job = definition();
            let mut settings = vec![
                format!("events={EVENTS}"),
                format!("seed={SEED}"),
                format!("max_distance={MAX_DISTANCE}"),
                format!("ttl_ms={TTL_MS}"),
                format!("output={}", dir.path().join("out").display()),
            ];
            settings.extend(extra.iter().map(|s| s.to_string()));
            let params = job.params_from_settings(&settings).unwrap();
            let config = sluice_integration_tests::test_config(dir.path(), backend, 2, None);
            let report = run_job(JobSubmission { job, params, config }).unwrap();
            assert_eq!(report.outcome, JobOutcome::Finished);
            let what = format!("{backend:?} {extra:?}");
            sluice_integration_tests::assert_restored_checkpoints(
                &report.restarts,
                usize::from(!extra.is_empty()),
                &what,
            );
            let got = sluice_integration_tests::committed_lines(&dir.path().join("out"));
            assert_same_lines(&got, &want, &format!("{backend:?} {extra:?}: kept records"));
        }
    }
}
