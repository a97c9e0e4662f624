//! Automatic recovery falls back to the previous completed checkpoint when the latest ones are
//! corrupted (checksum) or truncated (size), and the totals stay exact.

use sluice_coordinator::{run_job, JobOutcome, JobSubmission, RestoredFrom};
use sluice_examples::transactions::{transaction, RunningTotals, Transaction, UserTotal};
use sluice_integration_tests::{completed_checkpoints, expected_transactions_output};
use sluice_operators::generator::LaneGenerator;
use sluice_operators::sorted_sink::SortedFileSink;
use sluice_runtime::config::{JobConfig, StateBackendKind};
use sluice_runtime::snapshot::OperatorState;
use sluice_runtime::{CheckpointId, JobDefinition, JobParams, ParamSpec, Result, SinkFunction, StreamEnv, TaskInfo};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const EVENTS: u64 = 200_000;
const USERS: u64 = 3_000;
const SEED: u64 = 3;

/// What the damaging sink did: the checkpoint it spared and how many it damaged.
static SPARED: AtomicU64 = AtomicU64::new(0);
static DAMAGED: AtomicU64 = AtomicU64::new(0);
static ONE_TEST: Mutex<()> = Mutex::new(());

/// The totals sink that, on the first attempt, damages the running totals' state file (subtask 0)
/// in every completed checkpoint newer than the oldest one, then fails.
///
/// It strikes in `snapshot`, once `completions` checkpoints have completed and no checkpoint it
/// snapshotted is still pending: the checkpoint of this barrier can then never complete (the sink
/// never acknowledges it), and no older one can complete later, so the set of completed
/// checkpoints is fixed when it damages them.
#[derive(Clone)]
struct DamageThenFail {
    inner: SortedFileSink<UserTotal>,
    completions: u64,
    completed: u64,
    last_completed: u64,
    last_snapshot: u64,
    armed: bool,
    dir: PathBuf,
    job_id: String,
}

impl DamageThenFail {
    fn damage(&self) {
        let completed = completed_checkpoints(&self.dir.join(&self.job_id));
        SPARED.store(completed[0].0, Ordering::SeqCst);
        let newer = &completed[1..];
        for (i, (_, p)) in newer.iter().enumerate() {
            let f = p.join("running-totals/0");
            let mut bytes = std::fs::read(&f).unwrap();
            if i + 1 == newer.len() {
                bytes.truncate(bytes.len() - 3);
            } else {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0xff;
            }
            std::fs::write(&f, bytes).unwrap();
            DAMAGED.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl SinkFunction for DamageThenFail {
    type In = UserTotal;

    fn open(&mut self, info: &TaskInfo, restored: Option<OperatorState>) -> Result<()> {
        self.armed = info.attempt == 0;
        self.job_id = info.job_id.clone();
        self.inner.open(info, restored)
    }

    fn write(&mut self, batch: Vec<UserTotal>) -> Result<()> {
        self.inner.write(batch)
    }

    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<OperatorState> {
        if self.armed && self.completed >= self.completions && self.last_completed == self.last_snapshot {
            self.damage();
            panic!("failing after damaging checkpoints");
        }
        self.last_snapshot = checkpoint.0;
        self.inner.snapshot(checkpoint)
    }

    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) -> Result<()> {
        self.completed += 1;
        self.last_completed = self.last_completed.max(checkpoint.0);
        self.inner.checkpoint_complete(checkpoint)
    }

    fn finish(&mut self) -> Result<()> {
        self.inner.finish()
    }
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let generator = LaneGenerator::new(EVENTS, 16, 100_000, |i| transaction(SEED, USERS, i));
    let sink = DamageThenFail {
        inner: SortedFileSink::new(Some(p.raw("output").into())),
        completions: 4,
        completed: 0,
        last_completed: 0,
        last_snapshot: 0,
        armed: false,
        dir: PathBuf::from(p.raw("dir")),
        job_id: String::new(),
    };
    env.source("transactions", generator)
        .uid("transactions-source")
        .key_by(|t: &Transaction| t.user)
        .process("running-totals", RunningTotals::default())
        .uid("running-totals")
        .sink("totals-output", sink)
        .uid("totals-output")
        .parallelism(1);
    Ok(())
}

#[test]
fn memory_recovery_falls_back_past_corrupt_and_truncated_checkpoints() {
    falls_back(StateBackendKind::Memory);
}

#[test]
fn rocksdb_recovery_falls_back_past_corrupt_and_truncated_checkpoints() {
    falls_back(StateBackendKind::RocksDb { incremental: true });
}

fn falls_back(state_backend: StateBackendKind) {
    let _one = ONE_TEST.lock().unwrap_or_else(|p| p.into_inner());
    DAMAGED.store(0, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let out = dir.path().join("out.csv");
    let job = JobDefinition {
        name: "damaging-transactions",
        description: "test job",
        params: vec![
            ParamSpec {
                name: "dir",
                default: "",
                help: "",
            },
            ParamSpec {
                name: "output",
                default: "",
                help: "",
            },
        ],
        build,
    };
    let params = job
        .params_from_settings(&[format!("dir={}", ck.display()), format!("output={}", out.display())])
        .unwrap();
    let mut config = JobConfig {
        parallelism: 2,
        state_backend,
        checkpoint_dir: ck.display().to_string(),
        data_dir: dir.path().join("data"),
        ..JobConfig::default()
    };
    config.checkpoint.interval = Some(Duration::from_millis(50));
    // Keep every checkpoint so that retention cannot remove the spared one.
    config.checkpoint.retained = 1000;
    config.restart.delay = Duration::from_millis(10);
    let report = run_job(JobSubmission { job, params, config }).unwrap();

    assert_eq!(report.outcome, JobOutcome::Finished);
    assert!(
        DAMAGED.load(Ordering::SeqCst) >= 2,
        "at least one corrupted and one truncated checkpoint"
    );
    assert_eq!(report.restarts.len(), 1, "{:?}", report.restarts);
    assert_eq!(
        report.restarts[0].restored_from,
        RestoredFrom::Checkpoint(sluice_runtime::CheckpointId(SPARED.load(Ordering::SeqCst)))
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        expected_transactions_output(EVENTS, USERS, SEED)
    );
    // The unusable checkpoints were discarded; what remains is complete.
    sluice_integration_tests::assert_only_completed_checkpoints(&ck);
}
