//! Helpers shared by the end-to-end tests in `tests/`.

use sluice_runtime::snapshot::CheckpointMetadata;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Bound of every wait on a `sluice` process: generous, for a loaded machine.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The `sluice` binary built next to the test executable (`cargo build --bins` first).
pub fn sluice_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let bin = dir.join("sluice");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bins` before the tests (scripts/test does)",
        bin.display()
    );
    bin
}

/// A `sluice` command with a deterministic environment: no inherited cluster address, secret or
/// log filter, and run from `dir` so that no relative default lands in the source tree.
pub fn sluice_cmd(dir: &Path) -> Command {
    let mut c = Command::new(sluice_bin());
    c.current_dir(dir)
        .env_remove("SLUICE_COORDINATOR")
        .env_remove("SLUICE_SECRET")
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "0")
        .env("NO_COLOR", "1");
    c
}

/// Runs a command to its exit, bounded by [`DEADLINE`]; a command still running then is killed.
pub fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice starts");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(output) => output.expect("the command's output"),
        Err(_) => {
            // The child moved to the waiting thread: end it by its id.
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("{cmd:?} did not exit within {DEADLINE:?}");
        }
    }
}

/// The standard error of a finished command, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that a command failed with exactly one `error:` line naming one of `any_of`
/// (case-insensitively), and without a panic.
pub fn assert_clear_error(o: &Output, what: &str, any_of: &[&str]) {
    let e = stderr(o);
    assert!(
        !o.status.success(),
        "{what}: succeeded\nstdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let lower = e.to_lowercase();
    assert!(
        any_of.iter().any(|n| lower.contains(&n.to_lowercase())),
        "{what}: expected one of {any_of:?} in:\n{e}"
    );
    assert!(!e.contains("panicked"), "{what}: panicked:\n{e}");
    assert_eq!(e.lines().filter(|l| l.starts_with("error:")).count(), 1, "{what}:\n{e}");
}

/// The expected output of `transactions`, as the sink writes it.
pub fn expected_transactions_output(events: u64, users: u64, seed: u64) -> String {
    sluice_examples::transactions::expected_totals(events, users, seed)
        .iter()
        .map(|t| format!("{t}\n"))
        .collect()
}

/// A job configuration for in-process tests in `dir`: checkpoints every 100 ms to `dir/ck`,
/// local state under `dir/data`, restarts after 10 ms, and when restoring `from` a snapshot,
/// its max parallelism.
pub fn test_config(
    dir: &Path,
    state_backend: sluice_runtime::config::StateBackendKind,
    parallelism: usize,
    from: Option<&str>,
) -> sluice_runtime::config::JobConfig {
    let mut config = sluice_runtime::config::JobConfig {
        parallelism,
        state_backend,
        checkpoint_dir: dir.join("ck").display().to_string(),
        data_dir: dir.join("data"),
        from_savepoint: from.map(str::to_string),
        max_parallelism_from_snapshot: from.is_some(),
        ..Default::default()
    };
    config.checkpoint.interval = Some(std::time::Duration::from_millis(100));
    config.restart.delay = std::time::Duration::from_millis(10);
    config
}

/// Asserts that the job restarted `n` times, each restoring a checkpoint (not starting over):
/// state in the middle of windows and timers was restored.
pub fn assert_restored_checkpoints(restarts: &[sluice_coordinator::RestartRecord], n: usize, what: &str) {
    assert_eq!(
        restarts.len(),
        n,
        "{what}: {n} restart(s) from a checkpoint expected (none if the job ended before its \
         failure, which waits for a completed checkpoint), got {restarts:?}"
    );
    for r in restarts {
        assert!(
            matches!(r.restored_from, sluice_coordinator::RestoredFrom::Checkpoint(_)),
            "{what}: restored from {:?}",
            r.restored_from
        );
    }
}

/// Fails on the first line where `got` differs from `want` (both sorted), or on their counts:
/// a diff of thousands of lines would say less.
pub fn assert_same_lines<S: PartialEq + std::fmt::Debug>(got: &[S], want: &[S], what: &str) {
    if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: line {i} of {} is {:?}, the direct computation's is {:?}",
            got.len(),
            got[i],
            want[i]
        );
    }
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: line count (the first {} agree)",
        got.len().min(want.len())
    );
}

/// The lines of the committed part files of an exactly-once file sink's directory, sorted;
/// fails on any in-progress file (none may be left after a clean finish).
pub fn committed_lines(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for e in std::fs::read_dir(dir).expect("output dir") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.'),
            "in-progress file {name} left after a clean finish"
        );
        lines.extend(
            std::fs::read_to_string(e.path())
                .expect("part file")
                .lines()
                .map(String::from),
        );
    }
    lines.sort();
    lines
}

/// Every file below `dir`, relative to it.
pub fn files_below(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(p).expect("readable dir") {
            let path = e.expect("dir entry").path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(
                    path.strip_prefix(base)
                        .expect("below base")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = BTreeSet::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// Asserts that a checkpoint base directory holds only completed checkpoints, each holding
/// exactly the files its `_metadata` references, and that every file under a job's `shared/`
/// is referenced by one of its retained checkpoints; returns the checkpoint ids per job. On
/// the local disk it also sees what an object listing cannot: empty leftover directories.
pub fn assert_only_completed_checkpoints(base: &Path) -> BTreeMap<String, Vec<u64>> {
    for job in std::fs::read_dir(base).expect("checkpoint dir exists") {
        let job = job.expect("entry").path();
        assert!(job.is_dir(), "unexpected file {} in the checkpoint dir", job.display());
        for entry in std::fs::read_dir(&job).expect("job dir") {
            let entry = entry.expect("entry").path();
            let name = entry.file_name().expect("name").to_string_lossy().into_owned();
            assert!(
                name == "shared" || entry.join("_metadata").exists(),
                "partial checkpoint or orphan entry: {}",
                entry.display()
            );
        }
    }
    assert_no_orphan_objects(&base.display().to_string())
}

/// The completed `chk-<n>` directories (with a `_metadata`) of a job directory, by id.
pub fn completed_checkpoints(job_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut chks: Vec<(u64, PathBuf)> = std::fs::read_dir(job_dir)
        .expect("job dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("_metadata").exists())
        .filter_map(|p| {
            let id: u64 = p.file_name()?.to_str()?.strip_prefix("chk-")?.parse().ok()?;
            Some((id, p))
        })
        .collect();
    chks.sort();
    chks
}

/// The newest `chk-<n>` directory with a `_metadata` under a job directory.
pub fn latest_completed_checkpoint(job_dir: &Path) -> Option<PathBuf> {
    completed_checkpoints(job_dir).pop().map(|(_, p)| p)
}

/// The shared files (paths relative to the job directory, `shared/...`) that the completed
/// checkpoint in `chk_dir` references.
pub fn shared_files_of(chk_dir: &Path) -> Vec<String> {
    let meta_path = chk_dir.join("_metadata");
    let bytes = std::fs::read(&meta_path).expect("readable _metadata");
    CheckpointMetadata::decode(&bytes, &meta_path.display().to_string())
        .expect("valid metadata")
        .shared_files()
        .map(str::to_string)
        .collect()
}

/// The only job directory under a checkpoint base directory.
pub fn single_job_dir(base: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(base)
        .expect("checkpoint dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "expected one job directory in {}: {dirs:?}",
        base.display()
    );
    dirs.into_iter().next().expect("one")
}

/// A real S3-compatible server (`s3s-fs`: S3 over a local directory, SigV4 enforced) on
/// 127.0.0.1, started for a test and killed when dropped. `scripts/test` installs the binary;
/// `SLUICE_S3S_FS` names another one.
pub struct S3Server {
    bin: PathBuf,
    data: tempfile::TempDir,
    /// The server's request log (every request's S3 operation and object key).
    log: tempfile::NamedTempFile,
    port: u16,
    child: Option<std::process::Child>,
}

/// Credentials the test server accepts.
pub const S3_ACCESS_KEY: &str = "sluice-test";
/// Secret of [`S3_ACCESS_KEY`].
pub const S3_SECRET_KEY: &str = "sluice-test-secret";

impl S3Server {
    /// Starts a server on a free port, with no buckets yet.
    pub fn start() -> Self {
        let bin = std::env::var_os("SLUICE_S3S_FS")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sluice-tools/bin/s3s-fs")))
            .filter(|b| b.exists())
            .expect("s3s-fs not found: run scripts/test (it installs it) or set SLUICE_S3S_FS");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self {
            bin,
            data: tempfile::tempdir().expect("temp dir"),
            log: tempfile::NamedTempFile::new().expect("log file"),
            port,
            child: None,
        };
        server.resume();
        server
    }

    /// Starts a server with `buckets`, which this process then reaches on it.
    pub fn with_buckets(buckets: &[&str]) -> Self {
        let server = Self::start();
        for b in buckets {
            server.create_bucket(b);
            sluice_runtime::storage::set_s3_bucket_options(b, server.options());
        }
        server
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Options that reach this server, for [`sluice_runtime::storage::set_s3_options`].
    pub fn options(&self) -> sluice_runtime::storage::S3Options {
        sluice_runtime::storage::S3Options {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some(S3_ACCESS_KEY.into()),
            secret_access_key: Some(S3_SECRET_KEY.into()),
            max_attempts: Some(3),
            request_timeout: Some(std::time::Duration::from_secs(5)),
            ..Default::default()
        }
    }

    /// Creates a bucket (a directory of the server's data directory: the S3 service of opendal
    /// cannot create buckets).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.data.path().join(name)).expect("bucket directory");
    }

    /// Kills the server (as a crash would); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and data, and waits until it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = std::process::Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(self.data.path())
            // s3s logs each request's resolved operation at debug level.
            .env("RUST_LOG", "s3s::ops=debug")
            .env("NO_COLOR", "1")
            .stdout(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.log.path())
                    .expect("log file"),
            )
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "s3s-fs did not start listening");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// One request the S3 server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Request {
    /// The S3 operation, e.g. `PutObject`, `UploadPart`, `ListObjectsV2`.
    pub op: String,
    /// The object key, empty for bucket operations.
    pub key: String,
}

impl S3Server {
    /// Every request the server has received so far, in order (across restarts).
    pub fn requests(&self) -> Vec<S3Request> {
        let log = std::fs::read_to_string(self.log.path()).expect("server log");
        log.lines()
            .filter_map(|l| l.split_once("resolved route, op: ").map(|(_, r)| r))
            .map(|r| {
                let op = r.split(',').next().unwrap_or_default().trim().to_string();
                let key = r
                    .split_once("key: \"")
                    .and_then(|(_, k)| k.split_once('"'))
                    .map_or(String::new(), |(k, _)| k.to_string());
                S3Request { op, key }
            })
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens a storage URL with a runtime to drive it from a test thread.
fn open_storage(url: &str) -> (sluice_runtime::storage::Storage, tokio::runtime::Runtime) {
    let storage = sluice_runtime::storage::Storage::open(url).expect("storage URL");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (storage, rt)
}

/// Every object below `url` (a storage URL), relative to it, listed through the store itself.
pub fn objects_below(url: &str) -> BTreeSet<String> {
    let (storage, rt) = open_storage(url);
    list_objects(&storage, &rt)
}

fn list_objects(storage: &sluice_runtime::storage::Storage, rt: &tokio::runtime::Runtime) -> BTreeSet<String> {
    rt.block_on(storage.list_files_recursive(""))
        .expect("listing")
        .into_iter()
        .collect()
}

/// Asserts that a checkpoint location (any storage URL) holds only completed checkpoints, each
/// holding exactly the objects its `_metadata` references, and that every object under a job's
/// `shared/` is referenced by one of its retained checkpoints: no orphan objects. Returns the
/// retained checkpoint ids per job.
pub fn assert_no_orphan_objects(url: &str) -> BTreeMap<String, Vec<u64>> {
    let (storage, rt) = open_storage(url);
    let objects = list_objects(&storage, &rt);
    let mut per_job: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for o in &objects {
        let (job, rest) = o
            .split_once('/')
            .unwrap_or_else(|| panic!("object {o} outside a job directory"));
        per_job.entry(job.to_string()).or_default().insert(rest.to_string());
    }
    let mut jobs = BTreeMap::new();
    for (job, files) in per_job {
        let mut expected = BTreeSet::new();
        let mut ids = Vec::new();
        let chks: BTreeSet<&str> = files
            .iter()
            .filter(|f| !f.starts_with("shared/"))
            .map(|f| f.split_once('/').map_or(f.as_str(), |(c, _)| c))
            .collect();
        for chk in chks {
            let id: u64 = chk
                .strip_prefix("chk-")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("orphan object {job}/{chk}"));
            let meta_path = format!("{job}/{chk}/_metadata");
            let bytes = rt
                .block_on(storage.read(&meta_path))
                .unwrap_or_else(|_| panic!("partial checkpoint without _metadata: {url}/{job}/{chk}"));
            let meta = CheckpointMetadata::decode(&bytes, &meta_path).expect("valid metadata");
            expected.insert(format!("{chk}/_metadata"));
            expected.extend(meta.referenced_files().map(|h| format!("{chk}/{}", h.path)));
            expected.extend(
                meta.sst_files()
                    .filter(|f| !f.shared)
                    .map(|f| format!("{chk}/{}", f.path)),
            );
            expected.extend(meta.shared_files().map(str::to_string));
            ids.push(id);
        }
        assert_eq!(
            files, expected,
            "objects of job {job} under {url} vs its retained _metadata"
        );
        ids.sort();
        jobs.insert(job, ids);
    }
    jobs
}
