//! Event-time windows end to end: tumbling, sliding and session windows over out-of-order
//! input, with very late records in the side output, on both state backends; the results equal
//! a direct computation over the same input, also through a failure in the middle of open
//! windows and timers and through a savepoint restored at another parallelism.

use serde::{Deserialize, Serialize};
use sluice_coordinator::{run_job, spawn_job, JobOutcome, JobSubmission};
use sluice_operators::file_sink::ExactlyOnceFileSink;
use sluice_operators::generator::LaneGenerator;
use sluice_operators::sorted_sink::SortedFileSink;
use sluice_runtime::config::StateBackendKind;
use sluice_runtime::{
    AggregateFunction, JobDefinition, JobParams, Operator, ParamSpec, ProcessWindowFunction, RestoredState, Result,
    StreamEnv, TaskInfo, TimeWindow, ToWindowResult, WatermarkStrategy, WindowAssigner, WindowCollector, WindowResult,
};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

const EVENTS: u64 = 40_000;
const USERS: u64 = 50;
const BASE: i64 = 1_700_000_000_000;
/// Records arrive up to this much out of order (the watermark's bound); never late.
const JITTER_MS: u64 = 300;
/// Designated late records lag this far behind: late for any window, whatever the batching.
const LATE_BY_MS: i64 = 600_000;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Event {
    i: u64,
    user: u64,
    ts: i64,
    amount: i64,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.i, self.user, self.ts)
    }
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Lags this far behind in runs with allowed lateness: after its window fired (whatever the
/// batching), within the lateness.
const LATE_WITHIN_LATENESS_MS: i64 = 30_000;
/// The allowed lateness of those runs.
const LATENESS: Duration = Duration::from_secs(120);

fn is_late(i: u64) -> bool {
    i >= EVENTS / 2 && i % 1000 == 7
}

fn is_late_within_lateness(i: u64, lateness: bool) -> bool {
    lateness && i >= EVENTS / 2 && i % 1000 == 507
}

fn event(i: u64, lateness: bool) -> Event {
    let h = mix(i);
    let mut ts = BASE + i as i64 * 10 - (mix(h) % JITTER_MS) as i64;
    if is_late(i) {
        ts -= LATE_BY_MS;
    }
    if is_late_within_lateness(i, lateness) {
        ts -= LATE_WITHIN_LATENESS_MS;
    }
    Event {
        i,
        user: h % USERS,
        ts,
        amount: (mix(h ^ 1) % 100) as i64,
    }
}

#[derive(Clone)]
struct Sum;

impl AggregateFunction for Sum {
    type In = Event;
    type Acc = i64;
    type Out = i64;
    fn create(&self) -> i64 {
        0
    }
    fn add(&self, acc: &mut i64, e: &Event) {
        *acc += e.amount;
    }
    fn merge(&self, acc: &mut i64, other: &i64) {
        *acc += other;
    }
    fn result(&self, acc: &i64) -> i64 {
        *acc
    }
}

/// A window function emitting the window's sum: from the aggregate, or from all its records
/// (which must all be the key's, in the window, none repeated).
#[derive(Clone)]
struct SumWindow;

impl ProcessWindowFunction<u64, i64> for SumWindow {
    type Out = WindowResult<u64, i64>;
    fn process<T>(
        &self,
        key: &u64,
        w: TimeWindow,
        sum: i64,
        out: &mut WindowCollector<'_, Self::Out, T>,
    ) -> Result<()> {
        ToWindowResult.process(key, w, sum, out)
    }
}

impl ProcessWindowFunction<u64, Vec<Event>> for SumWindow {
    type Out = WindowResult<u64, i64>;
    fn process<T>(
        &self,
        key: &u64,
        w: TimeWindow,
        events: Vec<Event>,
        out: &mut WindowCollector<'_, Self::Out, T>,
    ) -> Result<()> {
        let distinct: std::collections::BTreeSet<u64> = events.iter().map(|e| e.i).collect();
        assert_eq!(distinct.len(), events.len(), "a record twice in window {w:?}");
        assert!(
            events
                .iter()
                .all(|e| e.user == *key && (w.start..w.end).contains(&e.ts)),
            "a record outside key {key}'s window {w:?}"
        );
        let sum = events.iter().map(|e| e.amount).sum();
        ToWindowResult.process(key, w, sum, out)
    }
}

/// Panics at its `fail_at`-th record on subtask 0 of the first attempt, or, if no checkpoint
/// has completed by then, at the first record after one has: the restart restores a checkpoint
/// however loaded the machine, so windows and timers are restored in the middle.
struct FailOnce<T> {
    fail_at: u64,
    armed: bool,
    checkpointed: bool,
    seen: u64,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: sluice_runtime::operator::Data> Operator for FailOnce<T> {
    type In = T;
    type Out = T;
    fn open(&mut self, info: &TaskInfo, _: Option<RestoredState>) -> Result<()> {
        self.armed = self.fail_at > 0 && info.attempt == 0 && info.subtask == 0;
        Ok(())
    }
    fn process(&mut self, batch: Vec<T>, out: &mut Vec<T>) -> Result<()> {
        self.seen += batch.len() as u64;
        if self.armed && self.checkpointed && self.seen >= self.fail_at {
            panic!("injected failure after {} window results", self.seen);
        }
        out.extend(batch);
        Ok(())
    }
    fn checkpoint_complete(&mut self, _: sluice_runtime::CheckpointId) -> Result<()> {
        self.checkpointed = true;
        Ok(())
    }
}

fn assigner(kind: &str) -> Result<WindowAssigner> {
    match kind {
        "tumbling" => WindowAssigner::tumbling(Duration::from_secs(1)),
        "sliding" => WindowAssigner::sliding(Duration::from_secs(3), Duration::from_secs(1)),
        // A size that is not a multiple of the slide: panes of 500 ms.
        "sliding-odd" => WindowAssigner::sliding(Duration::from_millis(2500), Duration::from_secs(1)),
        _ => WindowAssigner::session(Duration::from_millis(700)),
    }
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let kind: String = p.get("windows")?;
    let fail_at: u64 = p.get("fail_at")?;
    let lateness: bool = p.get("lateness")?;
    // One lane: records leave the source in index order, out of order only by their jitter.
    let generator = LaneGenerator::new(p.get("events")?, 1, p.get("rate")?, move |i| event(i, lateness));
    let windowed = env
        .source("events", generator)
        .uid("events")
        .parallelism(1)
        .assign_timestamps_and_watermarks(WatermarkStrategy::bounded_out_of_orderness(
            Duration::from_millis(JITTER_MS),
            |e: &Event| e.ts,
        ))
        // Chained to the source: one watermark, so a record's lateness does not depend on how
        // two generators' watermarks interleave.
        .parallelism(1)
        .key_by(|e: &Event| e.user)
        .window(assigner(&kind)?);
    let windowed = if lateness {
        windowed.allowed_lateness(LATENESS)
    } else {
        windowed
    };
    // Four ways to the same sums: an aggregate, a reduce, an aggregate with a window function,
    // and a process-window function over all of a window's records.
    let (results, late) = match p.get::<String>("function")?.as_str() {
        "aggregate" => {
            let w = windowed.aggregate("windows", Sum)?.uid("windows");
            (w.results(), w.late())
        }
        "reduce" => {
            let w = windowed
                .reduce("windows", |a: &Event, b: &Event| Event {
                    amount: a.amount + b.amount,
                    ..a.clone()
                })?
                .uid("windows");
            let sums = w.results().map(|r| WindowResult {
                key: r.key,
                start: r.start,
                end: r.end,
                value: r.value.amount,
            });
            (sums, w.late())
        }
        "aggregate_with" => {
            let w = windowed.aggregate_with("windows", Sum, SumWindow)?.uid("windows");
            (w.results(), w.late())
        }
        _ => {
            let w = windowed.process("windows", SumWindow)?.uid("windows");
            (w.results(), w.late())
        }
    };
    let results = results.transform("fail-once", move || FailOnce {
        fail_at,
        armed: false,
        checkpointed: false,
        seen: 0,
        _t: std::marker::PhantomData,
    });
    let output: String = p.get("output")?;
    if p.get::<String>("sink")? == "files" {
        results.sink("results", ExactlyOnceFileSink::new(output)).uid("results");
    } else {
        results
            .sink("results", SortedFileSink::new(Some(output.into())))
            .uid("results")
            .parallelism(1);
    }
    late.sink(
        "late",
        SortedFileSink::new(Some(p.get::<String>("late_output")?.into())),
    )
    .uid("late")
    .parallelism(1);
    Ok(())
}

fn definition() -> JobDefinition {
    let param = |name, default| ParamSpec::new(name, default, "");
    JobDefinition {
        name: "windows-test",
        description: "window sums per user",
        params: vec![
            param("events", "40000"),
            param("rate", "0"),
            param("windows", "tumbling"),
            param("fail_at", "0"),
            param("output", ""),
            param("late_output", ""),
            param("lateness", "false"),
            param("sink", "sorted"),
            param("function", "aggregate"),
        ],
        build,
    }
}

/// The expected `user,start,end,sum` lines and late records, computed directly.
fn expected(kind: &str) -> (String, String) {
    let events: Vec<Event> = (0..EVENTS).map(|i| event(i, false)).collect();
    let mut sums: BTreeMap<(u64, i64, i64), i64> = BTreeMap::new();
    match assigner(kind).unwrap() {
        WindowAssigner::Tumbling { size } | WindowAssigner::Sliding { size, slide: _ } => {
            let slide = match assigner(kind).unwrap() {
                WindowAssigner::Sliding { slide, .. } => slide,
                _ => size,
            };
            for e in events.iter().filter(|e| !is_late(e.i)) {
                let mut start = e.ts.div_euclid(slide) * slide;
                while start + size > e.ts {
                    *sums.entry((e.user, start, start + size)).or_default() += e.amount;
                    start -= slide;
                }
            }
        }
        WindowAssigner::Session { gap } => {
            let mut per_user: BTreeMap<u64, Vec<&Event>> = BTreeMap::new();
            for e in events.iter().filter(|e| !is_late(e.i)) {
                per_user.entry(e.user).or_default().push(e);
            }
            for (user, mut es) in per_user {
                es.sort_by_key(|e| e.ts);
                let (mut start, mut last, mut sum) = (es[0].ts, es[0].ts, 0);
                for e in es {
                    if e.ts >= last + gap {
                        sums.insert((user, start, last + gap), sum);
                        (start, sum) = (e.ts, 0);
                    }
                    last = e.ts;
                    sum += e.amount;
                }
                sums.insert((user, start, last + gap), sum);
            }
        }
    }
    // In the sinks' order: by user, start, end (numbers), late records by index.
    let results: Vec<String> = sums
        .into_iter()
        .map(|((user, start, end), sum)| format!("{user},{start},{end},{sum}"))
        .collect();
    let late: Vec<String> = events.iter().filter(|e| is_late(e.i)).map(|e| e.to_string()).collect();
    (lines(results), lines(late))
}

fn lines(v: Vec<String>) -> String {
    v.into_iter().map(|l| l + "\n").collect()
}

fn submission(
    dir: &Path,
    kind: &str,
    backend: StateBackendKind,
    p: usize,
    extra: &[&str],
    from: Option<&str>,
) -> JobSubmission {
    let job = definition();
    let mut settings = vec![
        format!("windows={kind}"),
        format!("output={}", dir.join("results.csv").display()),
        format!("late_output={}", dir.join("late.csv").display()),
    ];
    settings.extend(extra.iter().map(|s| s.to_string()));
    let params = job.params_from_settings(&settings).unwrap();
    let config = sluice_integration_tests::test_config(dir, backend, p, from);
    JobSubmission { job, params, config }
}

fn assert_matches_direct_computation(dir: &Path, kind: &str) {
    let (results, late) = expected(kind);
    let got = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let first_difference = got.lines().zip(results.lines()).find(|(g, w)| g != w);
    assert!(
        got == results,
        "{kind}: window results differ from the direct computation ({} lines, {} expected; \
         first difference (got, expected): {first_difference:?})",
        got.lines().count(),
        results.lines().count()
    );
    assert!(!late.is_empty());
    assert_eq!(
        std::fs::read_to_string(dir.join("late.csv")).unwrap(),
        late,
        "{kind}: late records"
    );
}

const MEMORY: StateBackendKind = StateBackendKind::Memory;
const ROCKSDB: StateBackendKind = StateBackendKind::RocksDb { incremental: true };

#[test]
fn windows_equal_a_direct_computation_on_both_backends() {
    for kind in ["tumbling", "sliding", "sliding-odd", "session"] {
        for backend in [MEMORY, ROCKSDB] {
            let dir = tempfile::tempdir().unwrap();
            let report = run_job(submission(dir.path(), kind, backend, 2, &[], None)).unwrap();
            assert_eq!(report.outcome, JobOutcome::Finished);
            assert_matches_direct_computation(dir.path(), kind);
        }
    }
}

#[test]
fn reduce_aggregate_with_and_process_window_functions_equal_a_direct_computation() {
    // On RocksDB, sliding windows of `reduce` and `aggregate_with` fire from stacks of partial
    // merges, `process` windows (which keep every record) from their panes.
    let cases = [
        ("sliding-odd", MEMORY),
        ("sliding", ROCKSDB),
        ("session", ROCKSDB),
        ("tumbling", MEMORY),
    ];
    for (kind, backend) in cases {
        for function in ["reduce", "aggregate_with", "process"] {
            let dir = tempfile::tempdir().unwrap();
            let extra = [format!("function={function}")];
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let report = run_job(submission(dir.path(), kind, backend, 2, &extra, None)).unwrap();
            assert_eq!(report.outcome, JobOutcome::Finished);
            assert_matches_direct_computation(dir.path(), kind);
        }
    }
}

#[test]
fn a_failure_in_the_middle_of_open_windows_and_timers_changes_no_result() {
    // Through the sorted sink (its buffer restored) and the exactly-once file sink (each result
    // committed once). Sliding windows on RocksDB fire from stacks of partial merges that the
    // restore rebuilds.
    let cases = [
        ("tumbling", ROCKSDB, "sorted"),
        ("sliding", MEMORY, "sorted"),
        ("sliding", ROCKSDB, "sorted"),
        ("session", ROCKSDB, "sorted"),
        ("tumbling", MEMORY, "files"),
        ("sliding", MEMORY, "files"),
        ("sliding", ROCKSDB, "files"),
        ("session", ROCKSDB, "files"),
    ];
    for (kind, backend, sink) in cases {
        let dir = tempfile::tempdir().unwrap();
        let extra = [
            "rate=20000".to_string(),
            "fail_at=3000".to_string(),
            format!("sink={sink}"),
        ];
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let report = run_job(submission(dir.path(), kind, backend, 2, &extra, None)).unwrap();
        assert_eq!(report.outcome, JobOutcome::Finished);
        sluice_integration_tests::assert_restored_checkpoints(&report.restarts, 1, kind);
        if sink == "files" {
            assert_committed_once(dir.path(), kind);
        } else {
            assert_matches_direct_computation(dir.path(), kind);
        }
    }
}

#[test]
fn a_savepoint_mid_windows_restores_at_another_parallelism_and_backend_with_the_same_results() {
    // Each restores into the other backend: the memory backend writes its timers from their
    // index, RocksDB from its column family, and each reads the other's.
    for (kind, backend, other) in [("sliding", ROCKSDB, MEMORY), ("session", MEMORY, ROCKSDB)] {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        let handle = spawn_job(submission(&first, kind, backend, 2, &["rate=20000"], None)).unwrap();
        assert!(handle.wait_for_checkpoints(3));
        let savepoint = handle.savepoint(&dir.path().join("sp").display().to_string()).unwrap();
        assert_eq!(handle.wait().unwrap().outcome, JobOutcome::Finished);
        assert_matches_direct_computation(&first, kind);

        let second = dir.path().join("second");
        let report = run_job(submission(&second, kind, other, 3, &[], Some(&savepoint))).unwrap();
        assert_eq!(report.outcome, JobOutcome::Finished);
        assert!(report.source_records < EVENTS, "{kind}: resumed mid-stream");
        assert_matches_direct_computation(&second, kind);
    }
}

#[test]
fn records_within_the_allowed_lateness_fire_their_window_again_updated() {
    let dir = tempfile::tempdir().unwrap();
    let report = run_job(submission(dir.path(), "tumbling", ROCKSDB, 2, &["lateness=true"], None)).unwrap();
    assert_eq!(report.outcome, JobOutcome::Finished);
    // Each window fires once with its on-time records; every record late within the lateness
    // (each in a window of its own) fires its window again with the updated sum.
    let size = 1000;
    let mut fired: BTreeMap<(u64, i64), Vec<i64>> = BTreeMap::new();
    let mut on_time: BTreeMap<(u64, i64), i64> = BTreeMap::new();
    let events: Vec<Event> = (0..EVENTS).map(|i| event(i, true)).collect();
    for e in events
        .iter()
        .filter(|e| !is_late(e.i) && !is_late_within_lateness(e.i, true))
    {
        *on_time.entry((e.user, e.ts.div_euclid(size) * size)).or_default() += e.amount;
    }
    for (w, sum) in &on_time {
        fired.entry(*w).or_default().push(*sum);
    }
    let mut updated = on_time.clone();
    for e in events.iter().filter(|e| is_late_within_lateness(e.i, true)) {
        let w = (e.user, e.ts.div_euclid(size) * size);
        let sum = updated.entry(w).or_default();
        *sum += e.amount;
        fired.entry(w).or_default().push(*sum);
    }
    let mut want: Vec<(u64, i64, i64, i64)> = fired
        .into_iter()
        .flat_map(|((user, start), sums)| sums.into_iter().map(move |s| (user, start, start + size, s)))
        .collect();
    want.sort();
    let want: String = want.iter().map(|(u, s, e, v)| format!("{u},{s},{e},{v}\n")).collect();
    let got = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    assert!(
        got == want,
        "results with allowed lateness differ ({} lines, {} expected)",
        got.lines().count(),
        want.lines().count()
    );
    let refired = events.iter().filter(|e| is_late_within_lateness(e.i, true)).count();
    assert!(refired > 0 && got.lines().count() == on_time.len() + refired);
    // Records past the lateness still go to the late output.
    let late: String = events
        .iter()
        .filter(|e| is_late(e.i))
        .map(|e| format!("{e}\n"))
        .collect();
    assert_eq!(std::fs::read_to_string(dir.path().join("late.csv")).unwrap(), late);
}

#[test]
fn a_job_stopped_with_a_savepoint_mid_windows_resumes_at_another_parallelism_and_commits_each_result_once() {
    // The exactly-once file sink's output over both runs (stopped with a savepoint at
    // parallelism 2, resumed from it into the other backend at parallelism 3, into the same
    // directory) holds every window result exactly once.
    for (kind, backend, other) in [
        ("sliding", ROCKSDB, MEMORY),
        ("session", MEMORY, ROCKSDB),
        ("tumbling", MEMORY, ROCKSDB),
    ] {
        let dir = tempfile::tempdir().unwrap();
        // Paced to run about 4 s: the stop must land while the source still reads, even when a
        // checkpoint takes a second on a loaded machine.
        let extra = ["rate=10000", "sink=files"];
        let handle = spawn_job(submission(dir.path(), kind, backend, 2, &extra, None)).unwrap();
        assert!(handle.wait_for_checkpoints(1));
        let savepoint = handle.stop(&dir.path().join("sp").display().to_string()).unwrap();
        let first = handle.wait().unwrap();
        assert_eq!(first.outcome, JobOutcome::Stopped);
        assert!(first.source_records < EVENTS, "{kind}: stopped mid-stream");
        let committed_first = sluice_integration_tests::committed_lines(&dir.path().join("results.csv")).len();
        assert!(committed_first > 0, "{kind}: the first run committed results");
        let second = run_job(submission(
            dir.path(),
            kind,
            other,
            3,
            &["sink=files"],
            Some(&savepoint),
        ))
        .unwrap();
        assert_eq!(second.outcome, JobOutcome::Finished);
        assert_committed_once(dir.path(), kind);
        // The late records' sink keeps them in operator state: the resumed run writes them all.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("late.csv")).unwrap(),
            expected(kind).1,
            "{kind}: late records"
        );
    }
}

/// The exactly-once file sink's committed output (in `results.csv`, its directory here) is the
/// direct computation's, each result once.
fn assert_committed_once(dir: &Path, kind: &str) {
    let got = sluice_integration_tests::committed_lines(&dir.join("results.csv"));
    let mut want: Vec<String> = expected(kind).0.lines().map(String::from).collect();
    want.sort();
    sluice_integration_tests::assert_same_lines(&got, &want, &format!("{kind}: committed results"));
}
