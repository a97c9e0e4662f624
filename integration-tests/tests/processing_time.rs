//! Processing-time timers in a running job: a keyed task whose input has gone quiet wakes up
//! for its timers (nothing else would wake it), and each key's timer fires exactly once.

use sluice_coordinator::{run_job, JobOutcome, JobSubmission};
use sluice_runtime::config::StateBackendKind;
use sluice_runtime::element::Timestamp;
use sluice_runtime::snapshot::OperatorState;
use sluice_runtime::{
    JobDefinition, JobParams, KeyedContext, KeyedProcessFunction, Result, SinkFunction, SourceFunction, SourcePoll,
    StateRegistry, StreamEnv, TaskInfo,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const KEYS: u64 = 500;
/// Timers fired so far: the source ends once all have.
static FIRED: AtomicU64 = AtomicU64::new(0);
static OUTPUT: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// Emits every key once, then stays quiet until every timer has fired (or a minute passed, so
/// that a broken wake-up fails the test rather than hanging it).
#[derive(Clone)]
struct KeysThenQuiet {
    emitted: bool,
    quiet_since: Option<Instant>,
}

impl SourceFunction for KeysThenQuiet {
    type Out = u64;
    fn open(&mut self, info: &TaskInfo, _: Option<OperatorState>) -> Result<()> {
        self.emitted = info.subtask != 0;
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<u64>) -> Result<SourcePoll> {
        if !self.emitted {
            self.emitted = true;
            out.extend(0..KEYS);
            return Ok(SourcePoll::Ready);
        }
        let since = *self.quiet_since.get_or_insert_with(Instant::now);
        if FIRED.load(Ordering::SeqCst) >= KEYS || since.elapsed() > Duration::from_secs(60) {
            return Ok(SourcePoll::Finished);
        }
        Ok(SourcePoll::Idle(Duration::from_millis(5)))
    }
    fn snapshot(&mut self) -> Result<OperatorState> {
        Ok(OperatorState::new())
    }
}

/// Arms a timer 20 ms after each key's record; emits the key when it fires.
#[derive(Clone)]
struct Remind;

impl KeyedProcessFunction for Remind {
    type Key = u64;
    type In = u64;
    type Out = u64;
    fn open(&mut self, _: &mut StateRegistry<'_, u64>, _: &TaskInfo) -> Result<()> {
        Ok(())
    }
    fn process(&mut self, _: u64, ctx: &mut KeyedContext<'_, u64>, _: &mut Vec<u64>) -> Result<()> {
        let at = ctx.current_processing_time() + 20;
        ctx.register_processing_time_timer(at)
    }
    fn on_processing_time_timer(
        &mut self,
        ts: Timestamp,
        ctx: &mut KeyedContext<'_, u64>,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        assert!(ctx.current_processing_time() >= ts, "a timer fired early");
        out.push(*ctx.key());
        FIRED.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(Clone)]
struct Collect;

impl SinkFunction for Collect {
    type In = u64;
    fn open(&mut self, _: &TaskInfo, _: Option<OperatorState>) -> Result<()> {
        Ok(())
    }
    fn write(&mut self, batch: Vec<u64>) -> Result<()> {
        OUTPUT.lock().unwrap().extend(batch);
        Ok(())
    }
}

fn build(_: &JobParams, env: &mut StreamEnv) -> Result<()> {
    env.source(
        "keys",
        KeysThenQuiet {
            emitted: false,
            quiet_since: None,
        },
    )
    .uid("keys")
    .key_by(|k: &u64| *k)
    .process("remind", Remind)
    .uid("remind")
    .sink("collect", Collect)
    .uid("collect");
    Ok(())
}

#[test]
fn a_quiet_task_wakes_for_its_processing_time_timers_and_each_fires_once() {
    let dir = tempfile::tempdir().unwrap();
    let job = JobDefinition {
        name: "processing-time-test",
        description: "",
        params: vec![],
        build,
    };
    let params = job.params_from_settings(&[]).unwrap();
    let mut config = sluice_integration_tests::test_config(dir.path(), StateBackendKind::Memory, 2, None);
    // No checkpoints: their notifications would wake the task too.
    config.checkpoint.interval = None;
    let report = run_job(JobSubmission { job, params, config }).unwrap();
    assert_eq!(report.outcome, JobOutcome::Finished);
    assert!(report.restarts.is_empty(), "{:?}", report.restarts);
    let mut got = OUTPUT.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(
        got,
        (0..KEYS).collect::<Vec<_>>(),
        "every key's timer fired exactly once"
    );
}
