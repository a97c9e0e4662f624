//! Cluster mode end to end: a coordinator and workers as real `sluice` processes on 127.0.0.1,
//! driven through the CLI as an operator would. A SIGKILLed worker is replaced and the job
//! recovers exactly; a job stopped with a savepoint is restored at other parallelisms with exact
//! results; refused requests (secrets, unknown jobs, unreachable coordinators, missing
//! snapshots, finished jobs) get one clear error line.

use serde_json::Value;
use sluice_integration_tests::{
    assert_clear_error, assert_same_lines, expected_transactions_output, run, sluice_cmd, stderr, DEADLINE,
};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SECRET: &str = "cluster-test-secret";
const USERS: u64 = 20_000;
const SEED: u64 = 7;

fn field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no string '{key}' in {v}"))
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no number '{key}' in {v}"))
}

/// Asserts that a snapshot URL (a path or `file://` URL) is a directory holding `_metadata`.
fn assert_snapshot(url: &str) {
    let dir = Path::new(url.strip_prefix("file://").unwrap_or(url));
    assert!(dir.join("_metadata").exists(), "snapshot {url} has no _metadata");
}

fn finished(s: &Value) -> bool {
    s["state"] == "FINISHED"
}

/// Compares an output file with the totals of the whole input, showing the first difference
/// rather than two files of thousands of lines.
fn assert_exact_totals(out: &Path, events: u64) {
    let got = std::fs::read_to_string(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    let want = expected_transactions_output(events, USERS, SEED);
    let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
    assert_same_lines(&g, &w, &out.display().to_string());
}

/// A coordinator and its workers, each process's stderr in a file of `dir`; all killed when
/// dropped, also when a test panics.
struct Cluster {
    dir: PathBuf,
    /// The coordinator's bound address, `127.0.0.1:PORT`.
    addr: String,
    /// Long-running processes by name.
    procs: Vec<(String, Child)>,
}

impl Cluster {
    /// Starts a coordinator on a free port and waits until it accepts connections.
    fn start(dir: &Path) -> Self {
        let mut cluster = Self {
            dir: dir.to_path_buf(),
            addr: String::new(),
            procs: Vec::new(),
        };
        let mut c = sluice_cmd(dir);
        // The coordinator takes its secret from the environment, workers and clients from
        // --secret: both ways are exercised.
        c.args(["coordinator", "--listen", "127.0.0.1:0"])
            .env("SLUICE_SECRET", SECRET);
        let line = cluster.spawn("coordinator", c, |l| l.starts_with("coordinator listening on "));
        cluster.addr = line
            .strip_prefix("coordinator listening on ")
            .expect("the ready line")
            .trim()
            .to_string();
        assert!(cluster.addr.starts_with("127.0.0.1:"), "{line}");
        cluster
    }

    /// A coordinator and `n` workers of 2 slots each, `worker-1` to `worker-<n>`.
    fn with_workers(dir: &Path, n: usize) -> Self {
        let mut cluster = Self::start(dir);
        for i in 1..=n {
            cluster.add_worker(&format!("worker-{i}"), 2);
        }
        cluster
    }

    /// The command of a worker with `slots` slots, its own data directory and `secret`.
    fn worker_cmd(&self, name: &str, slots: usize, secret: &str) -> Command {
        let mut c = sluice_cmd(&self.dir);
        c.args(["worker", "--coordinator", &self.addr, "--slots", &slots.to_string()])
            .arg("--data-dir")
            .arg(self.dir.join(format!("{name}-data")))
            .args(["--secret", secret]);
        c
    }

    /// Starts a worker with `slots` slots and its own data directory, and waits until it is
    /// registered.
    fn add_worker(&mut self, name: &str, slots: usize) {
        let c = self.worker_cmd(name, slots, SECRET);
        let line = self.spawn(name, c, |l| l.starts_with("worker ") && l.contains(" registered with "));
        assert!(line.trim_end().ends_with(&self.addr), "{line}");
    }

    /// Spawns a long-running process and waits for the first stdout line that is `ready`.
    fn spawn(&mut self, name: &str, mut cmd: Command, ready: fn(&str) -> bool) -> String {
        let log = std::fs::File::create(self.dir.join(format!("{name}.stderr"))).expect("stderr file");
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("sluice starts");
        let stdout = child.stdout.take().expect("piped stdout");
        self.procs.push((name.to_string(), child));
        // Forwards stdout lines, and keeps the pipe drained while the process runs; the channel
        // disconnects when the process exits.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + DEADLINE;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if ready(&line) => return line,
                Ok(_) => {}
                Err(e) => {
                    let status = self.procs.last_mut().and_then(|(_, c)| c.try_wait().ok().flatten());
                    panic!(
                        "{name} did not get ready ({e}; exit status {status:?})\n{}",
                        self.logs()
                    )
                }
            }
        }
    }

    /// SIGKILLs a process started by this cluster.
    fn kill(&mut self, name: &str) {
        let (_, child) = self
            .procs
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("a started process");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// The end of every process's stderr, for failure messages.
    fn logs(&self) -> String {
        let mut all = String::new();
        for (name, _) in &self.procs {
            let text = std::fs::read_to_string(self.dir.join(format!("{name}.stderr"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            all.push_str(&format!("--- {name} stderr (end) ---\n{tail}\n"));
        }
        all
    }

    /// Runs a client command against this cluster, with the secret and JSON output.
    fn client(&self, args: &[&str]) -> Output {
        let mut c = sluice_cmd(&self.dir);
        c.args(args)
            .args(["--coordinator", &self.addr, "--secret", SECRET, "--output", "json"]);
        run(c)
    }

    /// A client command that must succeed: the one JSON object it prints.
    fn json(&self, args: &[&str]) -> Value {
        let o = self.client(args);
        assert!(
            o.status.success(),
            "sluice {args:?} failed:\n{}\n{}",
            stderr(&o),
            self.logs()
        );
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "sluice {args:?} printed no JSON object ({e}):\n{}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    /// Submits `transactions` (checkpoints every 100 ms under `dir/ck`); returns its job id.
    fn submit(&self, parallelism: u64, backend: &str, events: u64, rate: u64, out: &Path) -> String {
        let flags = format!(
            "--parallelism {parallelism} --state-backend {backend} --checkpoint-interval 100ms \
             --set events={events} --set users={USERS} --set seed={SEED} --set rate={rate}"
        );
        self.job_command(&["submit", "transactions"], &flags, out)
    }

    /// Restores a snapshot at `parallelism` with its output to `out`; returns the new job id.
    fn restore(&self, url: &str, parallelism: u64, out: &Path) -> String {
        // The rest of the input at full speed: the rate came with the snapshot's parameters.
        self.job_command(
            &["restore", url],
            &format!("--parallelism {parallelism} --set rate=0"),
            out,
        )
    }

    /// `submit` or `restore` with `flags` (split at spaces), checkpoints under `dir/ck` and the
    /// output to `out`; returns the job id.
    fn job_command(&self, command: &[&str], flags: &str, out: &Path) -> String {
        let (ck, output) = (self.dir.join("ck"), format!("output={}", out.display()));
        let mut args = command.to_vec();
        args.extend(flags.split_whitespace());
        args.extend(["--checkpoint-dir", ck.to_str().unwrap(), "--set", &output]);
        field(&self.json(&args), "job_id").to_string()
    }

    /// Polls a job's status (no signal crosses the processes) until `done`; fails if the job
    /// ends otherwise or the deadline passes. Returns the last status.
    fn wait_for(&self, job: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let s = self.json(&["status", job]);
            if done(&s) {
                return s;
            }
            let state = field(&s, "state");
            assert!(
                !matches!(state, "FINISHED" | "FAILED" | "CANCELED"),
                "job {job} ended {state} while waiting for {what}: {s}\n{}",
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "job {job}: no {what} within {DEADLINE:?}: {s}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in self.procs.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn kill_a_worker_mid_run_and_recover_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::with_workers(dir.path(), 2);
    let out = dir.path().join("totals.csv");
    // About 10 s at 200k events/s: still running when a worker is killed. Parallelism 4 fills
    // both workers' slots, so the killed one holds tasks.
    const EVENTS: u64 = 2_000_000;
    let job = cluster.submit(4, "rocksdb", EVENTS, 200_000, &out);
    let s = cluster.wait_for(&job, "RUNNING with 2 completed checkpoints", |s| {
        s["state"] == "RUNNING" && s["completed_checkpoints"].as_u64().unwrap_or(0) >= 2
    });
    assert_eq!(field(&s, "job_id"), job);
    assert_eq!(field(&s, "name"), "transactions");
    assert_eq!(count(&s, "parallelism"), 4);

    let chks = cluster.json(&["checkpoints", &job]);
    assert!(chks["completed"].as_array().is_some_and(|c| c.len() >= 2), "{chks}");
    assert!(chks["failed"].is_u64() && chks["retained"].is_array(), "{chks}");

    let target = dir.path().join("savepoints");
    let sp = cluster.json(&["savepoint", &job, "--target", target.to_str().unwrap()]);
    assert_snapshot(field(&sp, "url"));

    // Still running, so the kill below lands in the middle of the job.
    assert_eq!(cluster.json(&["status", &job])["state"], "RUNNING");
    // SIGKILL: the worker cannot say goodbye; the coordinator must notice that it is gone, and
    // the job can only run again once a replacement brings back the 2 slots.
    cluster.kill("worker-2");
    cluster.add_worker("worker-3", 2);
    let s = cluster.wait_for(&job, "FINISHED", finished);
    assert!(
        count(&s, "restarts") >= 1,
        "the lost worker must have caused a restart: {s}"
    );
    assert_exact_totals(&out, EVENTS);
}

#[test]
fn stop_with_savepoint_then_restore_at_2_and_3() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::with_workers(dir.path(), 2);
    let out = dir.path().join("stopped.csv");
    // About 10 s at 100k events/s: stopped long before its end of input.
    const EVENTS: u64 = 1_000_000;
    let job = cluster.submit(2, "memory", EVENTS, 100_000, &out);
    cluster.wait_for(&job, "a completed checkpoint", |s| {
        s["completed_checkpoints"].as_u64().unwrap_or(0) >= 1
    });

    let target = dir.path().join("savepoints");
    let stopped = cluster.json(&["stop", &job, "--savepoint", target.to_str().unwrap()]);
    assert_eq!(stopped["state"], "FINISHED", "{stopped}");
    let url = field(&stopped, "url").to_string();
    assert_snapshot(&url);
    assert!(finished(&cluster.json(&["status", &job])));
    assert!(!out.exists(), "a stopped job must not write its end-of-input output");
    let list = cluster.json(&["list"]);
    assert!(
        list["jobs"]
            .as_array()
            .is_some_and(|jobs| jobs.iter().any(|j| j["job_id"] == job.as_str() && finished(j))),
        "{list}"
    );

    // One after the other: 4 slots hold either restored job but not both.
    for parallelism in [2, 3] {
        let out = dir.path().join(format!("restored-{parallelism}.csv"));
        let restored = cluster.restore(&url, parallelism, &out);
        assert_ne!(restored, job);
        let s = cluster.wait_for(&restored, "FINISHED", finished);
        assert_eq!(field(&s, "name"), "transactions");
        assert_eq!(count(&s, "parallelism"), parallelism);
        // The savepoint's state plus the rest of the input: the totals of the whole input.
        assert_exact_totals(&out, EVENTS);
    }
}

#[test]
fn cluster_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path());

    // (a) A worker with the wrong secret is refused and exits.
    let c = cluster.worker_cmd("intruder", 1, "not-the-secret");
    assert_clear_error(&run(c), "worker with a wrong secret", &["secret"]);

    // (b) Submitting without a secret, or with a wrong one (the coordinator itself checks).
    for secret in [None, Some("not-the-secret")] {
        let mut c = sluice_cmd(dir.path());
        c.args(["submit", "transactions", "--set", "events=1000", "--output", "json"])
            .args(["--coordinator", &cluster.addr]);
        if let Some(secret) = secret {
            c.args(["--secret", secret]);
        }
        assert_clear_error(&run(c), &format!("submit with secret {secret:?}"), &["secret"]);
    }
    let list = cluster.json(&["list"]);
    assert!(
        list["jobs"].as_array().is_some_and(Vec::is_empty),
        "refused submissions ran: {list}"
    );

    // (c) An unknown job.
    let o = cluster.client(&["status", "no-such-job"]);
    assert_clear_error(&o, "status of an unknown job", &["no-such-job"]);

    // (d) An unreachable coordinator, by flag and by SLUICE_COORDINATOR.
    let mut c = sluice_cmd(dir.path());
    c.args(["list", "--coordinator", "127.0.0.1:1", "--output", "json"]);
    assert_clear_error(&run(c), "unreachable coordinator", &["127.0.0.1:1"]);
    let mut c = sluice_cmd(dir.path());
    c.args(["status", "some-job", "--output", "json"])
        .env("SLUICE_COORDINATOR", "127.0.0.1:1");
    assert_clear_error(&run(c), "unreachable coordinator from the env", &["127.0.0.1:1"]);

    // (e) Restoring a snapshot that does not exist.
    let missing = dir.path().join("no-such-savepoint");
    let missing = missing.to_str().unwrap();
    let o = cluster.client(&["restore", missing, "--parallelism", "1"]);
    assert_clear_error(&o, "restore of a missing snapshot", &[missing]);

    // (f) A savepoint of a finished job.
    cluster.add_worker("worker-1", 2);
    let tiny = dir.path().join("tiny.csv");
    let job = cluster.submit(1, "memory", 1_000, 0, &tiny);
    cluster.wait_for(&job, "FINISHED", finished);
    assert_exact_totals(&tiny, 1_000);
    let target = dir.path().join("savepoints");
    let target = target.to_str().unwrap();
    let o = cluster.client(&["savepoint", &job, "--target", target]);
    assert_clear_error(&o, "savepoint of a finished job", &["FINISHED", "not running"]);

    // (g) A canceled job is CANCELED, and takes no savepoint either.
    let never = dir.path().join("never.csv");
    let job = cluster.submit(1, "memory", 100_000_000, 1_000, &never);
    cluster.wait_for(&job, "RUNNING", |s| s["state"] == "RUNNING");
    let canceled = cluster.json(&["cancel", &job]);
    assert_eq!(canceled["state"], "CANCELED", "{canceled}");
    assert_eq!(field(&canceled, "job_id"), job);
    assert_eq!(cluster.json(&["status", &job])["state"], "CANCELED");
    let o = cluster.client(&["savepoint", &job, "--target", target]);
    assert_clear_error(&o, "savepoint of a canceled job", &["CANCELED", "not running"]);
    assert!(!never.exists(), "a canceled job must not write its end-of-input output");
}
