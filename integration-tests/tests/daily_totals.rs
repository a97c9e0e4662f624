//! `daily-totals` end to end: every event's 24-hour total per user, committed through the
//! exactly-once file sink, equals a direct computation, with and without a failure, on both
//! backends and after a restore at another parallelism.

use sluice_coordinator::{run_job, spawn_job, JobOutcome, JobSubmission};
use sluice_examples::daily_totals::{definition, event};
use sluice_integration_tests::assert_same_lines;
use sluice_runtime::config::StateBackendKind;
use std::collections::BTreeMap;
use std::path::Path;

const EVENTS: u64 = 20_000;
const USERS: u64 = 50;
const SEED: u64 = 5;
/// One event a minute: about 29 events of a user in any 24 hours, 14 days in all.
const MS_PER_EVENT: u64 = 60_000;

fn submission(dir: &Path, backend: StateBackendKind, p: usize, extra: &[&str], from: Option<&str>) -> JobSubmission {
    let job = definition();
    let mut settings = vec![
        format!("events={EVENTS}"),
        format!("users={USERS}"),
        format!("seed={SEED}"),
        format!("ms_per_event={MS_PER_EVENT}"),
        format!("output={}", dir.join("out").display()),
    ];
    settings.extend(extra.iter().map(|s| s.to_string()));
    let params = job.params_from_settings(&settings).unwrap();
    let config = sluice_integration_tests::test_config(dir, backend, p, from);
    JobSubmission { job, params, config }
}

/// `user,event_time,total` for every event, computed directly: the sum of the user's amounts
/// up to this event whose hour is one of the 24 ending with the event's hour.
fn expected() -> Vec<String> {
    let hour = |t: i64| t.div_euclid(3_600_000);
    let mut seen: BTreeMap<u64, Vec<(i64, i64)>> = BTreeMap::new();
    let mut lines = Vec::new();
    for i in 0..EVENTS {
        let e = event(SEED, USERS, MS_PER_EVENT, i);
        let mine = seen.entry(e.user).or_default();
        mine.push((e.event_time, e.amount));
        let h = hour(e.event_time);
        let total: i64 = mine.iter().filter(|(t, _)| hour(*t) > h - 24).map(|(_, a)| a).sum();
        lines.push(format!("{},{},{}", e.user, e.event_time, total));
    }
    lines.sort();
    lines
}

fn committed(dir: &Path) -> Vec<String> {
    sluice_integration_tests::committed_lines(&dir.join("out"))
}

#[test]
fn daily_totals_are_exact_through_a_failure_on_both_backends() {
    let want = expected();
    for backend in [
        StateBackendKind::Memory,
        StateBackendKind::RocksDb { incremental: true },
    ] {
        // The failure waits for a completed checkpoint, which the restart restores: the
        // users' hourly totals and timers are restored in the middle.
        for extra in [
            &[][..],
            &["rate=10000", "fail_at=4000", "fail_after_checkpoint=true"][..],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let report = run_job(submission(dir.path(), backend, 2, extra, None)).unwrap();
            assert_eq!(report.outcome, JobOutcome::Finished);
            let what = format!("{backend:?} {extra:?}");
            sluice_integration_tests::assert_restored_checkpoints(
                &report.restarts,
                usize::from(!extra.is_empty()),
                &what,
            );
            let got = committed(dir.path());
            assert_same_lines(&got, &want, &format!("{backend:?} {extra:?}: totals"));
        }
    }
}

#[test]
fn daily_totals_stopped_with_a_savepoint_resume_at_another_parallelism_and_backend_exactly() {
    let want = expected();
    let memory = StateBackendKind::Memory;
    let rocks = StateBackendKind::RocksDb { incremental: true };
    for (backend, other) in [(memory, rocks), (rocks, memory)] {
        let dir = tempfile::tempdir().unwrap();
        // Paced to run about 4 s, long after its first checkpoint: a checkpoint here can take a
        // second when the test beside it fsyncs RocksDB files (3 checkpoints in 2 s were once
        // missed).
        let handle = spawn_job(submission(dir.path(), backend, 2, &["rate=5000"], None)).unwrap();
        assert!(handle.wait_for_checkpoints(1));
        let savepoint = handle.stop(&dir.path().join("sp").display().to_string()).unwrap();
        let first = handle.wait().unwrap();
        assert_eq!(first.outcome, JobOutcome::Stopped);
        assert!(first.source_records < EVENTS, "{backend:?}: stopped mid-stream");
        assert!(
            !committed(dir.path()).is_empty(),
            "{backend:?}: the first run committed totals"
        );
        // The resumed run writes into the same directory what follows the savepoint: with what
        // the first run committed up to it, every total exactly once.
        let report = run_job(submission(dir.path(), other, 3, &[], Some(&savepoint))).unwrap();
        assert_eq!(report.outcome, JobOutcome::Finished);
        let what = format!("{backend:?} at parallelism 2, then {other:?} at 3: totals");
        assert_same_lines(&committed(dir.path()), &want, &what);
    }
}
