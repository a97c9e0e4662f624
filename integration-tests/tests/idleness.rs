//! Source idleness: a source subtask that emits nothing does not hold event time back once it
//! is declared idle, so windows fire while it stays quiet; without an idleness timeout they
//! wait for it.

use sluice_coordinator::{run_job, JobOutcome, JobSubmission};
use sluice_runtime::config::JobConfig;
use sluice_runtime::snapshot::OperatorState;
use sluice_runtime::{
    Count, JobDefinition, JobParams, ParamSpec, Result, SinkFunction, SourceFunction, SourcePoll, StreamEnv, TaskInfo,
    WatermarkStrategy, WindowAssigner, WindowResult,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Window results the sink has received so far.
static RESULTS: AtomicU64 = AtomicU64::new(0);
/// Whether results arrived while the quiet subtask was still running.
static FIRED_WHILE_QUIET: AtomicBool = AtomicBool::new(false);
/// Subtask 0 emitted everything and looked for results.
static BUSY_DONE: AtomicBool = AtomicBool::new(false);

/// Subtask 0 emits 2,000 events a second of event time apart, then waits up to `wait_ms` for
/// window results; subtask 1 emits nothing and ends after subtask 0.
#[derive(Clone)]
struct OneQuietSubtask {
    subtask: usize,
    next: i64,
    wait_ms: u64,
    waiting_since: Option<Instant>,
}

impl SourceFunction for OneQuietSubtask {
    type Out = i64;
    fn open(&mut self, info: &TaskInfo, _: Option<OperatorState>) -> Result<()> {
        self.subtask = info.subtask;
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<i64>) -> Result<SourcePoll> {
        if self.subtask == 1 {
            return Ok(if BUSY_DONE.load(Ordering::SeqCst) {
                SourcePoll::Finished
            } else {
                SourcePoll::Idle(Duration::from_millis(5))
            });
        }
        if self.next < 2000 {
            out.extend(self.next..self.next + 100);
            self.next += 100;
            return Ok(SourcePoll::Ready);
        }
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        if RESULTS.load(Ordering::SeqCst) > 0 {
            FIRED_WHILE_QUIET.store(true, Ordering::SeqCst);
        } else if since.elapsed() < Duration::from_millis(self.wait_ms) {
            return Ok(SourcePoll::Idle(Duration::from_millis(5)));
        }
        BUSY_DONE.store(true, Ordering::SeqCst);
        Ok(SourcePoll::Finished)
    }
    fn snapshot(&mut self) -> Result<OperatorState> {
        Ok(OperatorState::new())
    }
}

#[derive(Clone)]
struct CountingSink;

impl SinkFunction for CountingSink {
    type In = WindowResult<i64, u64>;
    fn open(&mut self, _: &TaskInfo, _: Option<OperatorState>) -> Result<()> {
        Ok(())
    }
    fn write(&mut self, batch: Vec<Self::In>) -> Result<()> {
        RESULTS.fetch_add(batch.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let wait_ms: u64 = p.get("wait_ms")?;
    let mut strategy = WatermarkStrategy::monotonous(|i: &i64| *i * 1000);
    if p.get::<bool>("idleness")? {
        strategy = strategy.with_idleness(Duration::from_millis(50));
    }
    env.source(
        "events",
        OneQuietSubtask {
            subtask: 0,
            next: 0,
            wait_ms,
            waiting_since: None,
        },
    )
    .assign_timestamps_and_watermarks(strategy)
    .key_by(|i: &i64| i % 10)
    .window(WindowAssigner::tumbling(Duration::from_secs(60))?)
    .aggregate("counts", Count::default())?
    .results()
    .sink("count", CountingSink)
    .parallelism(1);
    Ok(())
}

fn run(idleness: bool, wait_ms: u64) -> bool {
    RESULTS.store(0, Ordering::SeqCst);
    FIRED_WHILE_QUIET.store(false, Ordering::SeqCst);
    BUSY_DONE.store(false, Ordering::SeqCst);
    let job = JobDefinition {
        name: "idleness",
        description: "",
        params: vec![
            ParamSpec::new("idleness", "false", ""),
            ParamSpec::new("wait_ms", "0", ""),
        ],
        build,
    };
    let params = job
        .params_from_settings(&[format!("idleness={idleness}"), format!("wait_ms={wait_ms}")])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = JobConfig {
        parallelism: 2,
        checkpoint_dir: dir.path().join("ck").display().to_string(),
        data_dir: dir.path().join("data"),
        ..JobConfig::default()
    };
    let report = run_job(JobSubmission { job, params, config }).unwrap();
    assert_eq!(report.outcome, JobOutcome::Finished);
    // 2,000 events one second apart: 34 one-minute windows (of up to 10 keys) in the end.
    assert!(RESULTS.load(Ordering::SeqCst) > 0);
    FIRED_WHILE_QUIET.load(Ordering::SeqCst)
}

#[test]
fn an_idle_source_subtask_does_not_hold_windows_back() {
    assert!(
        run(true, 30_000),
        "with idleness, windows fire while one subtask is quiet"
    );
    assert!(
        !run(false, 300),
        "without idleness, the quiet subtask holds the watermark"
    );
}
