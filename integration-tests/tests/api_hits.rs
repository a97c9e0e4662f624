//! `api-hits` end to end: over the generated log, the per-minute counts and the late requests
//! committed by the exactly-once file sinks equal a direct computation from the generator, with
//! and without a failure, on both backends; over handwritten log files, the exact counts
//! (query strings, ids, time zone offsets, a malformed line, out-of-order and late lines).

use sluice_coordinator::{run_job, JobOutcome, JobSubmission, RestartRecord};
use sluice_examples::api_hits::{definition, expected};
use sluice_runtime::config::StateBackendKind;
use std::path::Path;

const EVENTS: u64 = 20_000;
const SEED: u64 = 5;

/// Runs `api-hits` with `settings` (output to `dir/out`, late requests to `dir/late`) and
/// returns its restarts.
fn run(dir: &Path, settings: &[String], backend: StateBackendKind, parallelism: usize) -> Vec<RestartRecord> {
    let job = definition();
    let mut settings = settings.to_vec();
    settings.push(format!("output={}", dir.join("out").display()));
    settings.push(format!("late_output={}", dir.join("late").display()));
    let params = job.params_from_settings(&settings).unwrap();
    let config = sluice_integration_tests::test_config(dir, backend, parallelism, None);
    let report = run_job(JobSubmission { job, params, config }).unwrap();
    assert_eq!(report.outcome, JobOutcome::Finished);
    report.restarts
}

fn sorted(lines: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    v.sort();
    v
}

#[test]
fn generated_log_counts_equal_the_direct_computation_through_a_failure() {
    let want = expected(EVENTS, SEED);
    assert!(want.counts.len() > 200, "many minutes and paths");
    assert!(
        want.late.len() > 10 && want.malformed > 5,
        "the log has late and malformed lines"
    );
    let mut counts: Vec<String> = want.counts.iter().map(|c| c.to_string()).collect();
    counts.sort();
    let mut late: Vec<String> = want.late.iter().map(|h| h.to_string()).collect();
    late.sort();
    for backend in [
        StateBackendKind::Memory,
        StateBackendKind::RocksDb { incremental: true },
    ] {
        // The failure comes at line 5,000 or, if no checkpoint has completed by then, at the
        // first line after one has (`fail_after_checkpoint`, however loaded the machine): the
        // restart restores it. The rate leaves the job seconds to complete one.
        for extra in [
            &[][..],
            &["rate=10000", "fail_at=5000", "fail_after_checkpoint=true"][..],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut settings = vec![format!("events={EVENTS}"), format!("seed={SEED}")];
            settings.extend(extra.iter().map(|s| s.to_string()));
            let restarts = run(dir.path(), &settings, backend, 2);
            let what = format!("{backend:?} {extra:?}");
            sluice_integration_tests::assert_restored_checkpoints(&restarts, usize::from(!extra.is_empty()), &what);
            let got = sluice_integration_tests::committed_lines(&dir.path().join("out"));
            sluice_integration_tests::assert_same_lines(
                &got,
                &counts,
                &format!("{backend:?} {extra:?}: minute counts"),
            );
            let got_late = sluice_integration_tests::committed_lines(&dir.path().join("late"));
            sluice_integration_tests::assert_same_lines(
                &got_late,
                &late,
                &format!("{backend:?} {extra:?}: late requests"),
            );
        }
    }
}

/// Lines in one file: ids, query strings, offsets +0100, -0500 and +0530, a malformed line,
/// lines up to 4 s out of order (within the default 5 s delay).
const ACCESS_LOG: &str = r#"203.0.113.7 - - [14/Nov/2023:22:13:20 +0000] "GET /api/orders/1234?expand=items HTTP/1.1" 200 512 "-" "curl/8.4.0"
198.51.100.23 - alice [14/Nov/2023:23:13:41 +0100] "GET /api/orders/77 HTTP/1.1" 200 128 "-" "okhttp/4.12.0"
203.0.113.9 - - [14/Nov/2023:22:13:59 +0000] "POST /api/orders HTTP/1.1" 201 64 "-" "curl/8.4.0"
192.0.2.4 - - [14/Nov/2023:17:14:02 -0500] "GET /api/orders/5?page=2 HTTP/2.0" 304 0 "-" "Mozilla/5.0"
203.0.113.7 - - [14/Nov/2023:22:13:58 +0000] "GET /api/users/42/orders HTTP/1.1" 200 900 "-" "curl/8.4.0"
this is not an access log line
203.0.113.8 - - [14/Nov/2023:22:14:31 +0000] "GET /api/users/42/orders?status=open HTTP/1.1" 200 77 "-" "curl/8.4.0"
203.0.113.8 - - [14/Nov/2023:22:14:30 +0000] "DELETE /api/users/42 HTTP/1.1" 204 0 "-" "curl/8.4.0"
203.0.113.8 - - [15/Nov/2023:03:44:59 +0530] "GET /api/v2/carts/9 HTTP/1.1" 200 12 "-" "curl/8.4.0"
203.0.113.8 - - [14/Nov/2023:22:15:00 +0000] "GET /api/orders/1234 HTTP/1.1" 500 12 "-" "curl/8.4.0"
"#;

#[test]
fn a_handwritten_log_file_gives_the_exact_counts() {
    for backend in [
        StateBackendKind::Memory,
        StateBackendKind::RocksDb { incremental: true },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        std::fs::write(&log, ACCESS_LOG).unwrap();
        let restarts = run(dir.path(), &[format!("input={}", log.display())], backend, 2);
        assert!(restarts.is_empty());
        assert_eq!(
            sluice_integration_tests::committed_lines(&dir.path().join("out")),
            sorted(&[
                "2023-11-14T22:13:00Z,/api/orders/{id},2",
                "2023-11-14T22:13:00Z,/api/orders,1",
                "2023-11-14T22:13:00Z,/api/users/{id}/orders,1",
                "2023-11-14T22:14:00Z,/api/orders/{id},1",
                "2023-11-14T22:14:00Z,/api/users/{id}/orders,1",
                "2023-11-14T22:14:00Z,/api/users/{id},1",
                "2023-11-14T22:14:00Z,/api/v2/carts/{id},1",
                "2023-11-14T22:15:00Z,/api/orders/{id},1",
            ]),
            "{backend:?}"
        );
        assert_eq!(
            sluice_integration_tests::committed_lines(&dir.path().join("late")),
            Vec::<String>::new()
        );
    }
}

#[test]
fn a_directory_of_logs_sends_requests_behind_the_watermark_to_the_late_output() {
    // One subtask reads both files in name order: after the first, the watermark is at
    // 22:20:00 - 5 s, so the second file's 22:12 request comes after its minute was counted.
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let line =
        |time: &str, request: &str| format!("10.0.0.1 - - [{time}] \"{request} HTTP/1.1\" 200 1 \"-\" \"curl\"\n");
    std::fs::write(
        logs.join("access.log.1"),
        [
            line("14/Nov/2023:22:12:10 +0000", "GET /api/orders/1"),
            line("14/Nov/2023:22:20:00 +0000", "GET /api/orders/2"),
        ]
        .concat(),
    )
    .unwrap();
    std::fs::write(
        logs.join("access.log.2"),
        [
            line("14/Nov/2023:22:12:30 +0000", "PUT /api/orders/3"),
            line("14/Nov/2023:23:19:58 +0100", "GET /api/orders/4"),
            line("14/Nov/2023:22:20:01 +0000", "GET /api/orders/5"),
        ]
        .concat(),
    )
    .unwrap();
    let restarts = run(
        dir.path(),
        &[format!("input={}", logs.display())],
        StateBackendKind::Memory,
        1,
    );
    assert!(restarts.is_empty());
    assert_eq!(
        sluice_integration_tests::committed_lines(&dir.path().join("out")),
        sorted(&[
            "2023-11-14T22:12:00Z,/api/orders/{id},1",
            "2023-11-14T22:19:00Z,/api/orders/{id},1",
            "2023-11-14T22:20:00Z,/api/orders/{id},2",
        ])
    );
    assert_eq!(
        sluice_integration_tests::committed_lines(&dir.path().join("late")),
        ["2023-11-14T22:12:30Z,PUT,/api/orders/{id},200"]
    );
}
