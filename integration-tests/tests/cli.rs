//! The `sluice` binary as a user runs it: killed with SIGKILL and resumed from its latest
//! retained checkpoint, refused snapshots, and clear errors for bad input.

use sluice_integration_tests::{
    assert_clear_error, assert_only_completed_checkpoints, completed_checkpoints, expected_transactions_output,
    latest_completed_checkpoint, run, single_job_dir, sluice_bin, sluice_cmd, stderr,
};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `sluice` with `args` from the current directory, bounded by the shared deadline.
fn sluice<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    let mut c = sluice_cmd(&std::env::current_dir().expect("a current directory"));
    c.args(args);
    run(c)
}

const EVENTS: u64 = 300_000;
const USERS: u64 = 5_000;
const SEED: u64 = 11;

fn job_args<'a>(ck: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "transactions".into(),
        "--parallelism".into(),
        "2".into(),
        "--checkpoint-dir".into(),
        ck.into(),
        "--checkpoint-interval".into(),
        "50ms".into(),
        "--set".into(),
        format!("events={EVENTS}"),
        "--set".into(),
        format!("users={USERS}"),
        "--set".into(),
        format!("seed={SEED}"),
        "--set".into(),
        format!("output={out}"),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Runs a complete job (with `extra` flags) and returns the checkpoint base dir's only job
/// directory.
fn completed_run(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
    completed_run_output(dir, extra).0
}

/// [`completed_run`], with the run's output.
fn completed_run_output(dir: &Path, extra: &[&str]) -> (std::path::PathBuf, Output) {
    let ck = dir.join("ck");
    let out = dir.join("first.csv");
    // About 3 s at 50 ms intervals: enough completed checkpoints to retain 3 even while other
    // tests load the machine (at 1 s, a loaded run completed only one).
    let mut args = job_args(ck.to_str().unwrap(), out.to_str().unwrap(), &["--set", "rate=100000"]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = sluice(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    (single_job_dir(&ck), o)
}

#[test]
fn sigkill_then_resume_from_latest_retained_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let out = dir.path().join("totals.csv");
    let (ck_s, out_s) = (ck.to_str().unwrap(), out.to_str().unwrap());
    // Rate-limited so that the process is still running when it is killed.
    let mut child = Command::new(sluice_bin())
        .args(job_args(ck_s, out_s, &["--set", "rate=50000"]))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut completed = 0;
    while completed < 5 {
        let line = lines.next().expect("the job logs before it ends").unwrap();
        if line.contains("checkpoint completed") {
            completed += 1;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.exists(), "the killed run must not have produced output");

    let job_dir = single_job_dir(&ck);
    let latest = latest_completed_checkpoint(&job_dir).expect("a retained checkpoint survives the process");
    let resumed = sluice(&job_args(ck_s, out_s, &["--from-savepoint", latest.to_str().unwrap()]));
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("started from"));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        expected_transactions_output(EVENTS, USERS, SEED)
    );

    // Both jobs' directories hold only their retained completed checkpoints: the killed run's
    // partial (or subsumed but not yet deleted) ones are gone. The resumed run may finish before
    // its first checkpoint, so its directory can be empty.
    let jobs = assert_only_completed_checkpoints(&ck);
    let killed = job_dir.file_name().unwrap().to_str().unwrap();
    assert!(jobs.contains_key(killed) && jobs.len() <= 2, "{jobs:?}");
    for ids in jobs.values() {
        assert!(!ids.is_empty() && ids.len() <= 3, "{ids:?}");
    }
}

fn flip_byte_in_middle(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn corrupt_truncated_or_partial_snapshots_are_refused_explicitly() {
    let dir = tempfile::tempdir().unwrap();
    let job_dir = completed_run(dir.path(), &[]);
    let ck = dir.path().join("ck2");
    let out = dir.path().join("out.csv");
    let (ck_s, out_s) = (ck.to_str().unwrap(), out.to_str().unwrap());
    let chks: Vec<_> = completed_checkpoints(&job_dir).into_iter().map(|(_, p)| p).collect();
    assert!(chks.len() >= 3, "{chks:?}");

    // A flipped byte: the block checksum catches it during restore.
    flip_byte_in_middle(&chks[0].join("running-totals/0"));
    let o = sluice(&job_args(ck_s, out_s, &["--from-savepoint", chks[0].to_str().unwrap()]));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("error: cannot restore from") && e.contains("checksum mismatch"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");

    // A truncated file: its size no longer matches the metadata.
    let f = chks[1].join("running-totals/1");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::write(&f, &std::fs::read(&f).unwrap()[..(len / 2) as usize]).unwrap();
    let o = sluice(&job_args(ck_s, out_s, &["--from-savepoint", chks[1].to_str().unwrap()]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("the checkpoint recorded {len}")),
        "{}",
        stderr(&o)
    );

    // No _metadata: not a completed checkpoint.
    std::fs::remove_file(chks[2].join("_metadata")).unwrap();
    let o = sluice(&job_args(ck_s, out_s, &["--from-savepoint", chks[2].to_str().unwrap()]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not a completed checkpoint or savepoint"),
        "{}",
        stderr(&o)
    );

    // A snapshot of another job.
    let o = sluice(&[
        "run",
        "wordcount",
        "--set",
        &format!("input={}", job_dir.display()),
        "--from-savepoint",
        chks[0].to_str().unwrap(),
        "--checkpoint-dir",
        ck_s,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is a snapshot of job 'transactions', not of 'wordcount'"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

#[test]
fn bad_input_gets_one_clear_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let ck_s = ck.to_str().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = format!("{}/sub", file.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "nosuchjob"], "unknown job 'nosuchjob'"),
        (
            vec!["run", "transactions", "--set", "nope=1"],
            "unknown parameter 'nope'",
        ),
        (
            vec!["run", "transactions", "--set", "events"],
            "malformed --set 'events'",
        ),
        (
            vec!["run", "transactions", "--set", "events=many"],
            "invalid value 'many' for job parameter 'events'",
        ),
        (
            vec!["run", "transactions", "--parallelism", "0"],
            "parallelism must be at least 1",
        ),
        (
            vec!["run", "transactions", "--parallelism", "200"],
            "parallelism 200 is above the max parallelism 128",
        ),
        (
            vec!["run", "transactions", "--parallelism", "20", "--max-parallelism", "16"],
            "parallelism 20 is above the max parallelism 16",
        ),
        (
            vec!["run", "transactions", "--state-backend", "disk"],
            "unknown state backend 'disk'",
        ),
        (
            vec!["run", "transactions", "--checkpoint-interval", "soon"],
            "invalid duration 'soon'",
        ),
        (
            vec!["run", "transactions", "--rocksdb-entry-cache", "12XB"],
            "--rocksdb-entry-cache '12XB'",
        ),
        (
            vec!["run", "transactions", "--checkpoint-dir", "ftp://host/x"],
            "unsupported storage scheme 'ftp'",
        ),
        (
            vec!["run", "transactions", "--checkpoint-dir", &under_file],
            "Not a directory",
        ),
        (
            vec!["run", "wordcount", "--checkpoint-dir", ck_s],
            "needs --set input=PATH",
        ),
        (
            vec!["coordinator", "--listen", "127.0.0.1:0", "--secret", ""],
            "needs a shared secret",
        ),
        (
            vec![
                "worker",
                "--coordinator",
                "127.0.0.1:1",
                "--slots",
                "0",
                "--secret",
                "s",
            ],
            "--slots must be at least 1",
        ),
        // Flags of this process's storage mean nothing to a cluster's job: the parser refuses
        // them by name before any request.
        (
            vec!["submit", "transactions", "--data-dir", "/tmp/x"],
            "unexpected argument '--data-dir'",
        ),
        (
            vec!["submit", "transactions", "--s3-region", "eu-west-1"],
            "unexpected argument '--s3-region'",
        ),
        (
            vec!["restore", "/tmp/chk-1", "--s3-endpoint", "http://127.0.0.1:9"],
            "unexpected argument '--s3-endpoint'",
        ),
        (
            vec!["restore", "/tmp/chk-1", "--from-savepoint", "/tmp/chk-2"],
            "unexpected argument '--from-savepoint'",
        ),
    ];
    for (args, expected) in cases {
        assert_clear_error(&sluice(&args), &format!("{args:?}"), &[expected]);
    }
    // An unknown flag is refused by the parser, naming it.
    let o = sluice(&["run", "transactions", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--bogus"));
    // Nothing was written for any refused run.
    assert!(!ck.exists() || std::fs::read_dir(&ck).unwrap().next().is_none());
}

#[test]
fn jobs_lists_jobs_and_parameters() {
    let o = sluice(&["jobs"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in ["transactions", "wordcount", "--set fail_at=", "--set input="] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[test]
fn wordcount_counts_words_of_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("a.txt"), "The quick fox\nthe lazy dog\n").unwrap();
    std::fs::write(input.join("b.txt"), "Dog eat dog\n\nfox").unwrap();
    let out = dir.path().join("counts.csv");
    let o = sluice(&[
        "run",
        "wordcount",
        "--parallelism",
        "2",
        "--set",
        &format!("input={}", input.display()),
        "--set",
        &format!("output={}", out.display()),
        "--checkpoint-dir",
        dir.path().join("ck").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "dog,3\neat,1\nfox,2\nlazy,1\nquick,1\nthe,2\n"
    );
}

/// A completed RocksDB run; returns its job directory. A clean finish logs no RocksDB warning
/// or error and leaves no local state behind; its summary says it started, not restored.
fn completed_rocksdb_run(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let (job_dir, o) = completed_run_output(
        dir,
        &["--state-backend", "rocksdb", "--data-dir", data.to_str().unwrap()],
    );
    assert_quiet_and_clean(&o, &data);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("start (deploy to running)") && !out.contains("restore ("),
        "{out}"
    );
    job_dir
}

/// No warning or error logged, and no file left under the data directory `data`, nor any
/// directory of a subtask (`<data>/<job>/<subtask>/`).
fn assert_quiet_and_clean(o: &Output, data: &Path) {
    let err = stderr(o);
    assert!(!err.contains(" WARN ") && !err.contains("ERROR"), "{err}");
    let left = sluice_integration_tests::files_below(data);
    assert!(left.is_empty(), "local state left behind: {left:?}");
    let subtask_dirs: Vec<_> = (std::fs::read_dir(data).into_iter().flatten().flatten())
        .flat_map(|job| std::fs::read_dir(job.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect();
    assert!(
        subtask_dirs.is_empty(),
        "subtask directories left behind: {subtask_dirs:?}"
    );
}

#[test]
fn missing_or_corrupt_sst_files_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let job_dir = completed_rocksdb_run(dir.path());
    let latest = latest_completed_checkpoint(&job_dir).unwrap();
    let ck = dir.path().join("ck2");
    let out = dir.path().join("out.csv");
    let (ck_s, out_s) = (ck.to_str().unwrap(), out.to_str().unwrap());
    // Only files the restored checkpoint references: older retained checkpoints may hold SSTs
    // that compaction has since replaced.
    let mut shared = sluice_integration_tests::shared_files_of(&latest);
    assert!(
        shared.len() >= 2,
        "the latest RocksDB checkpoint references shared SST files: {shared:?}"
    );
    let resume = |extra: &[&str]| {
        let mut a = job_args(
            ck_s,
            out_s,
            &[
                "--state-backend",
                "rocksdb",
                "--from-savepoint",
                latest.to_str().unwrap(),
            ],
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        sluice(&a)
    };
    // Intact, the checkpoint restores quietly (RocksDB's routine warnings are not warnings).
    let data = dir.path().join("data2");
    let o = resume(&["--data-dir", data.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_quiet_and_clean(&o, &data);
    assert!(String::from_utf8_lossy(&o.stdout).contains("restore (deploy to running)"));
    std::fs::remove_dir_all(&ck).unwrap();
    std::fs::remove_file(&out).unwrap();
    // A flipped byte in an SST: its CRC32 no longer matches.
    flip_byte_in_middle(&job_dir.join(&shared[0]));
    let o = resume(&[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("checksum mismatch") && stderr(&o).contains(".sst"),
        "{}",
        stderr(&o)
    );
    // A missing SST: found before any task starts.
    std::fs::remove_file(job_dir.join(shared.pop().unwrap())).unwrap();
    let o = resume(&[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("file is missing"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn memory_checkpoints_restore_into_rocksdb_and_native_rocksdb_state_is_refused_by_memory() {
    let dir = tempfile::tempdir().unwrap();
    // Every checkpoint retained: the earliest leaves most of the input to the restored run,
    // which then takes checkpoints of its own.
    let job_dir = completed_run(dir.path(), &["--retained-checkpoints", "1000"]);
    let earliest = completed_checkpoints(&job_dir).remove(0).1;
    let ck = dir.path().join("ck2");
    let out = dir.path().join("out.csv");
    let data = dir.path().join("data");
    let (ck_s, out_s) = (ck.to_str().unwrap(), out.to_str().unwrap());
    let o = sluice(&job_args(
        ck_s,
        out_s,
        &[
            "--state-backend",
            "rocksdb",
            "--data-dir",
            data.to_str().unwrap(),
            "--from-savepoint",
            earliest.to_str().unwrap(),
            // Slow enough for the rocksdb run to take checkpoints of its own.
            "--set",
            "rate=100000",
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        expected_transactions_output(EVENTS, USERS, SEED)
    );
    // That run's own checkpoints are RocksDB native: the memory backend refuses them clearly.
    let rocks_job = single_job_dir(&ck);
    let native = latest_completed_checkpoint(&rocks_job).expect("the rocksdb run retains its checkpoints");
    let o = sluice(&job_args(ck_s, out_s, &["--from-savepoint", native.to_str().unwrap()]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("RocksDB native state"), "{}", stderr(&o));
}
