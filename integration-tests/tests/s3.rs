//! Checkpoints and savepoints on a real S3 server (s3s-fs over HTTP on 127.0.0.1, SigV4
//! signatures checked): exact totals through a failure and through a rescaled restore, no orphan
//! objects after retention, each object uploaded once (large ones in multipart parts), and bad storage configuration refused at start by the `sluice` CLI.

use sluice_coordinator::{run_job, spawn_job, JobOutcome, JobSubmission, RestoredFrom};
use sluice_integration_tests::{
    assert_no_orphan_objects, expected_transactions_output, objects_below, sluice_bin, S3Request, S3Server,
    S3_ACCESS_KEY, S3_SECRET_KEY,
};
use sluice_runtime::config::StateBackendKind;
use sluice_runtime::storage::{Storage, MULTIPART_CHUNK};
use std::collections::BTreeMap;
use std::path::Path;

const EVENTS: u64 = 200_000;
const USERS: u64 = 2_000;
const SEED: u64 = 11;
const ROCKSDB: StateBackendKind = StateBackendKind::RocksDb { incremental: true };

fn submission(dir: &Path, ck: &str, parallelism: usize, settings: &[String], from: Option<&str>) -> JobSubmission {
    let job = sluice_examples::transactions::definition();
    let mut all = vec![
        format!("events={EVENTS}"),
        format!("users={USERS}"),
        format!("seed={SEED}"),
        format!("output={}", dir.join("totals.csv").display()),
    ];
    all.extend_from_slice(settings);
    let params = job.params_from_settings(&all).unwrap();
    let mut config = sluice_integration_tests::test_config(dir, ROCKSDB, parallelism, from);
    config.checkpoint_dir = ck.to_string();
    JobSubmission { job, params, config }
}

fn assert_exact(dir: &Path) {
    let got = std::fs::read_to_string(dir.join("totals.csv")).unwrap();
    assert!(
        got == expected_transactions_output(EVENTS, USERS, SEED),
        "totals differ"
    );
}

#[test]
fn rocksdb_job_with_checkpoints_on_s3_recovers_from_a_failure_exactly_and_leaves_no_orphans() {
    let s3 = S3Server::with_buckets(&["failover"]);
    let dir = tempfile::tempdir().unwrap();
    let ck = "s3://failover/checkpoints";
    // Paced to about 5 s: the failure waits for a completed checkpoint, and the first one on S3
    // once took the whole input's 2 s at 100,000 records/s while the tests beside it uploaded.
    let settings = [
        "rate=40000".to_string(),
        "fail_at=35000".to_string(),
        "fail_after_checkpoint=true".to_string(),
    ];
    let report = run_job(submission(dir.path(), ck, 2, &settings, None)).unwrap();

    assert_eq!(report.outcome, JobOutcome::Finished);
    assert_eq!(report.restarts.len(), 1, "{:?}", report.restarts);
    assert!(matches!(report.restarts[0].restored_from, RestoredFrom::Checkpoint(_)));
    assert!(report.source_records > EVENTS, "records were replayed");
    assert_exact(dir.path());
    let jobs = assert_no_orphan_objects(ck);
    let retained: Vec<u64> = report.retained.iter().map(|id| id.0).collect();
    assert_eq!(jobs.values().next().unwrap(), &retained);
    assert_eq!(retained.len(), 3);
    assert!(
        objects_below(ck).iter().any(|o| o.contains("/shared/")),
        "incremental RocksDB checkpoints reference shared SSTs on S3"
    );
    assert_each_object_uploaded_once(&s3.requests(), "checkpoints/");
}

/// Requests, as the server saw them: every object written went up exactly once (one PUT, or
/// one multipart upload), and each is a shared SST, a subtask's state file (its RocksDB
/// MANIFEST, CURRENT and OPTIONS inside), a `_metadata`, or the start probe.
fn assert_each_object_uploaded_once(requests: &[S3Request], prefix: &str) {
    let mut uploads: BTreeMap<&str, usize> = BTreeMap::new();
    for r in requests {
        if r.op == "PutObject" || r.op == "CreateMultipartUpload" {
            *uploads.entry(r.key.as_str()).or_default() += 1;
        }
    }
    assert!(!uploads.is_empty(), "the server saw uploads");
    let (mut ssts, mut state_files, mut metadata) = (0, 0, 0);
    for (key, n) in &uploads {
        let rest = key
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("upload outside {prefix}: {key}"));
        let (_job, rest) = rest.split_once('/').expect("inside a job directory");
        if rest == ".sluice-probe" {
            continue;
        }
        assert_eq!(*n, 1, "{key} uploaded {n} times");
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["shared", _uid, f] if f.ends_with(".sst") => ssts += 1,
            [chk, "_metadata"] if chk.starts_with("chk-") => metadata += 1,
            [chk, _uid, subtask] if chk.starts_with("chk-") && subtask.parse::<usize>().is_ok() => state_files += 1,
            _ => panic!("unexpected upload {key}"),
        }
    }
    assert!(ssts > 0 && state_files > 0 && metadata > 0, "{uploads:?}");
}

#[test]
fn large_objects_go_up_in_parallel_multipart_parts() {
    let s3 = S3Server::with_buckets(&["multipart"]);
    let storage = Storage::open("s3://multipart/big").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data: Vec<u8> = (0..2 * MULTIPART_CHUNK as u32 + 12345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    rt.block_on(storage.write("obj.sst", data.clone())).unwrap();
    assert!(
        rt.block_on(storage.read("obj.sst")).unwrap() == data,
        "object read back differs"
    );
    let ops: Vec<String> = s3
        .requests()
        .into_iter()
        .filter(|r| r.key == "big/obj.sst")
        .map(|r| r.op)
        .collect();
    let count = |op: &str| ops.iter().filter(|o| *o == op).count();
    assert_eq!(count("CreateMultipartUpload"), 1, "{ops:?}");
    assert_eq!(count("UploadPart"), 3, "{ops:?}");
    assert_eq!(count("CompleteMultipartUpload"), 1, "{ops:?}");
    assert_eq!(count("PutObject"), 0, "{ops:?}");
}

#[test]
fn a_savepoint_on_s3_restores_at_a_new_parallelism_exactly() {
    let _s3 = S3Server::with_buckets(&["savepoints"]);
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let handle = spawn_job(submission(
        &first,
        "s3://savepoints/ck",
        2,
        &["rate=100000".to_string()],
        None,
    ))
    .unwrap();
    assert!(handle.wait_for_checkpoints(2));
    let savepoint = handle.savepoint("s3://savepoints/sp").unwrap();
    assert!(savepoint.starts_with("s3://savepoints/sp/"), "{savepoint}");
    assert_eq!(handle.wait().unwrap().outcome, JobOutcome::Finished);
    assert_exact(&first);

    let second = dir.path().join("second");
    let report = run_job(submission(&second, "s3://savepoints/ck2", 3, &[], Some(&savepoint))).unwrap();
    assert_eq!(report.outcome, JobOutcome::Finished);
    assert_eq!(report.restarts.len(), 0);
    assert!(report.source_records < EVENTS, "resumed mid-stream");
    assert_exact(&second);
}

/// `sluice run` with checkpoints on `url` and S3 settings from the environment; its stderr.
fn cli_refusal(url: &str, endpoint: &str, access_key: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(sluice_bin())
        .args([
            "run",
            "transactions",
            "--state-backend",
            "rocksdb",
            "--checkpoint-dir",
            url,
        ])
        .args(["--s3-max-attempts", "2", "--s3-request-timeout", "2s"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--set", "events=1000"])
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", access_key)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{url}: should fail");
    assert!(out.stdout.is_empty(), "no report printed: nothing ran");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_storage_configuration_fails_at_start_naming_the_url_and_the_cause() {
    let s3 = S3Server::with_buckets(&["exists"]);
    let endpoint = s3.endpoint();

    let e = cli_refusal("s3://no-such-bucket/ck", &endpoint, S3_ACCESS_KEY);
    assert!(e.contains("s3://no-such-bucket/ck"), "{e}");
    assert!(e.contains("NoSuchBucket") || e.contains("NotFound"), "{e}");

    let e = cli_refusal("s3://exists/ck", &endpoint, "wrong-key");
    assert!(e.contains("s3://exists/ck"), "{e}");
    assert!(e.contains("PermissionDenied") || e.contains("403"), "{e}");

    let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = cli_refusal("s3://exists/ck", &format!("http://{unreachable}"), S3_ACCESS_KEY);
    assert!(e.contains("s3://exists/ck"), "{e}");
    let last = e.lines().rev().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(last.to_lowercase().contains("connection refused"), "{e}");

    let e = cli_refusal("gcs://bucket/ck", &endpoint, S3_ACCESS_KEY);
    assert!(e.contains("unsupported storage scheme 'gcs'"), "{e}");

    let e = cli_refusal("s3:///ck", &endpoint, S3_ACCESS_KEY);
    assert!(e.contains("no bucket in storage URL 's3:///ck'"), "{e}");
}
