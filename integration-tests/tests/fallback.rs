//! Automatic recovery falls back to the previous completed checkpoint when the latest ones are
//! corrupted (checksum) or truncated (size), and the totals stay exact.

use sluice_coordinator::{run_job, JobOutcome, JobSubmission, RestoredFrom};
use sluice_examples::transactions::{transaction, RunningTotals, Transaction, UserTotal};
use sluice_integration_tests::expected_transactions_output;
use sluice_operators::generator::LaneGenerator;
use sluice_operators::sorted_sink::SortedFileSink;
use sluice_runtime::config::{JobConfig, StateBackendKind};
use sluice_runtime::{
    JobDefinition, JobParams, KeyedBackend, KeyedContext, KeyedProcessFunction, ParamSpec, Result, StateRegistry,
    StreamEnv, TaskInfo,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const EVENTS: u64 = 200_000;
const USERS: u64 = 3_000;
const SEED: u64 = 3;

/// What the corrupting operator did: the checkpoint it spared and how many it damaged.
static SPARED: AtomicU64 = AtomicU64::new(0);
static DAMAGED: AtomicU64 = AtomicU64::new(0);
static ONE_TEST: Mutex<()> = Mutex::new(());

/// Running totals that, at record `at` of subtask 0 on the first attempt, damage this subtask's
/// state file in every checkpoint newer than the oldest completed one, then panic.
#[derive(Clone)]
struct DamageThenFail {
    inner: RunningTotals,
    at: u64,
    seen: u64,
    armed: bool,
    dir: PathBuf,
    job_id: String,
}

fn chk_id(p: &Path) -> Option<u64> {
    p.file_name()?.to_str()?.strip_prefix("chk-")?.parse().ok()
}

impl DamageThenFail {
    fn damage(&self) {
        let job_dir = self.dir.join(&self.job_id);
        let mut chks: Vec<(u64, PathBuf)> = std::fs::read_dir(&job_dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| chk_id(&p).map(|id| (id, p)))
            .collect();
        chks.sort();
        let spared = chks
            .iter()
            .find(|(_, p)| p.join("_metadata").exists())
            .expect("a completed checkpoint")
            .0;
        SPARED.store(spared, Ordering::SeqCst);
        let newer: Vec<&(u64, PathBuf)> = chks.iter().filter(|(id, _)| *id > spared).collect();
        for (i, (_, p)) in newer.iter().enumerate() {
            // Only this subtask's file is sure to exist; without it no newer checkpoint can be used.
            let f = p.join("running-totals/0");
            let Ok(mut bytes) = std::fs::read(&f) else {
                continue;
            };
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

impl KeyedProcessFunction for DamageThenFail {
    type Key = u64;
    type In = Transaction;
    type Out = UserTotal;

    fn open(&mut self, state: &mut StateRegistry<'_, u64>, info: &TaskInfo) -> Result<()> {
        self.armed = info.attempt == 0 && info.subtask == 0;
        self.job_id = info.job_id.clone();
        self.inner.open(state, info)
    }

    fn process(&mut self, t: Transaction, ctx: &mut KeyedContext<'_, u64>, out: &mut Vec<UserTotal>) -> Result<()> {
        self.seen += 1;
        if self.armed && self.seen == self.at {
            self.damage();
            panic!("failing after damaging checkpoints");
        }
        self.inner.process(t, ctx, out)
    }

    fn end_of_input(&mut self, state: &KeyedBackend, out: &mut Vec<UserTotal>) -> Result<()> {
        self.inner.end_of_input(state, out)
    }
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let generator = LaneGenerator::new(EVENTS, 16, 100_000, |i| transaction(SEED, USERS, i));
    let f = DamageThenFail {
        inner: RunningTotals::new(0),
        at: 50_000,
        seen: 0,
        armed: false,
        dir: PathBuf::from(p.raw("dir")),
        job_id: String::new(),
    };
    env.source("transactions", generator)
        .uid("transactions-source")
        .key_by(|t: &Transaction| t.user)
        .process("running-totals", f)
        .uid("running-totals")
        .sink("totals-output", SortedFileSink::new(Some(p.raw("output").into())))
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
