//! Runs one job in this process: builds its graph, deploys attempts, coordinates checkpoints and
//! fails over. The checkpoint coordinator lives in [`crate::checkpoint`]; this module owns the
//! attempt lifecycle and the restart strategy.

use crate::checkpoint::{AttemptEnd, CheckpointCoordinator, CheckpointStats, MasterCommand, Progress};
use crate::retention::CompletedCheckpoints;
use sluice_runtime::config::JobConfig;
use sluice_runtime::executor::{deploy, DeployConfig};
use sluice_runtime::graph::JobGraph;
use sluice_runtime::restore::RestoreSource;
use sluice_runtime::snapshot::CheckpointMetadata;
use sluice_runtime::storage::{CheckpointPaths, Storage, METADATA_FILE};
use sluice_runtime::{CheckpointId, Error, JobDefinition, JobParams, Result, StreamEnv};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What to run.
pub struct JobSubmission {
    /// The job definition (from a registry).
    pub job: JobDefinition,
    /// Its validated parameters.
    pub params: JobParams,
    /// Runtime settings.
    pub config: JobConfig,
}

/// Where an attempt's state came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoredFrom {
    /// Nothing: the job started empty.
    Nothing,
    /// One of this job's checkpoints.
    Checkpoint(CheckpointId),
    /// A savepoint or retained checkpoint given by the user.
    Savepoint(String),
}

/// One restart.
#[derive(Debug, Clone)]
pub struct RestartRecord {
    /// The attempt that starts (1 for the first restart).
    pub attempt: u32,
    /// Why the previous attempt failed.
    pub cause: String,
    /// What the new attempt restored.
    pub restored_from: RestoredFrom,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// Every source exhausted, every sink flushed.
    Finished,
    /// Stopped after a final savepoint (reported as FINISHED, as Flink does).
    Stopped,
    /// Cancelled by the user.
    Canceled,
    /// Restarts ran out.
    Failed(String),
}

/// A job's state, as `sluice status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum JobState {
    /// Accepted, not deployed yet.
    #[default]
    Created,
    /// Deployed.
    Running,
    /// Failing over: the next attempt is not deployed yet (it may wait for slots).
    Restarting,
    /// Ended: input exhausted, or stopped with a savepoint.
    Finished,
    /// Ended: restarts ran out.
    Failed,
    /// Ended: cancelled.
    Canceled,
}

impl JobState {
    /// The final state of a job that ended with `outcome`.
    pub fn of(outcome: &JobOutcome) -> Self {
        match outcome {
            JobOutcome::Finished | JobOutcome::Stopped => Self::Finished,
            JobOutcome::Canceled => Self::Canceled,
            JobOutcome::Failed(_) => Self::Failed,
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// Where a job's tasks run.
#[derive(Clone, Default)]
pub enum Placement {
    /// Threads of this process (`sluice run`).
    #[default]
    Local,
    /// Slots of a cluster's workers.
    Cluster(Arc<crate::cluster::Cluster>),
}

/// What happened during a run.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The job's id (its directory under the checkpoint dir).
    pub job_id: String,
    /// The job's name.
    pub job_name: String,
    /// How it ended.
    pub outcome: JobOutcome,
    /// Every restart, in order.
    pub restarts: Vec<RestartRecord>,
    /// What the first attempt restored.
    pub initial_restore: RestoredFrom,
    /// Completed checkpoints' statistics, in order.
    pub checkpoints: Vec<CheckpointStats>,
    /// Checkpoints that were declined, timed out or failed.
    pub failed_checkpoints: u64,
    /// Checkpoints retained at the end.
    pub retained: Vec<CheckpointId>,
    /// Records the sources emitted (replays included).
    pub source_records: u64,
    /// Per attempt, deployment until every task had restored its state and was running.
    pub restore_times: Vec<Duration>,
    /// From the first deployment to the end.
    pub elapsed: Duration,
}

/// A fresh job id: 32 hex digits from the clock, the process and a counter.
pub fn new_job_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!(
        "{nanos}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(seed.as_bytes()))
}

/// Builds and validates the job's graph.
pub fn build_graph(job: &JobDefinition, params: &JobParams, config: &JobConfig) -> Result<JobGraph> {
    config.validate()?;
    let mut env = StreamEnv::new();
    (job.build)(params, &mut env)?;
    env.build(config.parallelism, config.max_parallelism)
}

/// Checks that a user-given snapshot fits the job and that its files are all there.
async fn check_savepoint(source: &RestoreSource, job: &str, graph: &JobGraph, config: &JobConfig) -> Result<()> {
    // The local check first: a snapshot of another job is refused without a request per file.
    source.check_fits(job, graph, config.state_backend, config.allow_non_restored_state)?;
    source.verify_files().await
}

/// Runs a job to its end in this process. Errors are problems found before any record was
/// processed (bad configuration, storage, snapshot); a job that runs and fails returns a report
/// with [`JobOutcome::Failed`].
pub fn run_job(sub: JobSubmission) -> Result<JobReport> {
    spawn_job(sub)?.wait()
}

/// Checks that a savepoint fits `max_parallelism_from_snapshot` and takes the snapshot's max
/// parallelism when asked to.
fn adopt_snapshot_max_parallelism(sub: &mut JobSubmission, snapshot: &RestoreSource) -> Result<()> {
    if sub.config.max_parallelism_from_snapshot {
        // Max parallelism is fixed for the life of the state: take the snapshot's.
        let (m, url) = (snapshot.metadata().max_parallelism, snapshot.url());
        if sub.config.parallelism > m as usize {
            return Err(Error::Config(format!(
                "parallelism {} is above the max parallelism {m} of {url}; max parallelism cannot change",
                sub.config.parallelism
            )));
        }
        sub.config.max_parallelism = m;
    }
    Ok(())
}

/// A job running in this process, on its own threads.
pub struct JobHandle {
    control: JobControl,
    thread: std::thread::JoinHandle<Result<JobReport>>,
}

/// What controls and watches a running job; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct JobControl {
    job_id: String,
    commands: tokio::sync::mpsc::UnboundedSender<MasterCommand>,
    progress: tokio::sync::watch::Receiver<Progress>,
}

impl std::ops::Deref for JobHandle {
    type Target = JobControl;
    fn deref(&self) -> &JobControl {
        &self.control
    }
}

impl JobHandle {
    /// A controller of the job that can outlive this borrow.
    pub fn control(&self) -> JobControl {
        self.control.clone()
    }

    /// Whether the job has ended (its report is ready).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the job to end.
    pub fn wait(self) -> Result<JobReport> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(Error::User("the job master panicked".into())))
    }
}

impl JobControl {
    /// The job's id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Takes a savepoint under `target` (a storage URL) and returns its URL once its
    /// `_metadata` is written. The savepoint is canonical and self-contained: it restores into
    /// either state backend. Blocks: call it from a plain thread, not from async code.
    pub fn savepoint(&self, target: &str) -> Result<String> {
        self.request_savepoint(target, false)
    }

    /// Stops the job after a final savepoint under `target` and returns its URL; the job ends
    /// FINISHED without processing anything after the savepoint. Blocks, like `savepoint`.
    pub fn stop(&self, target: &str) -> Result<String> {
        self.request_savepoint(target, true)
    }

    fn request_savepoint(&self, target: &str, stop: bool) -> Result<String> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let command = MasterCommand::Savepoint {
            target: target.to_string(),
            reply,
            stop,
        };
        self.commands
            .send(command)
            .map_err(|_| Error::Config(format!("job {} is no longer running", self.job_id)))?;
        match outcome.blocking_recv() {
            Ok(Ok(url)) => Ok(url),
            Ok(Err(e)) => Err(Error::Config(e)),
            Err(_) => Err(Error::Config(format!(
                "job {} ended before the savepoint completed",
                self.job_id
            ))),
        }
    }

    /// Cancels the job (returns at once; `wait` for its end).
    pub fn cancel(&self) {
        let _ = self.commands.send(MasterCommand::Cancel);
    }

    /// Reads the job's state and checkpoint figures now, without copying them.
    pub fn with_progress<T>(&self, read: impl FnOnce(&Progress) -> T) -> T {
        read(&self.progress.borrow())
    }

    /// Blocks until the job has ended (its report is ready to collect).
    pub fn wait_ended(&self) {
        // The master drops the sending side when it returns.
        let _ = self.wait_progress(|_| false);
    }

    /// Blocks until `n` checkpoints have completed; false if the job ended first. Call it from a
    /// plain thread, not from async code.
    pub fn wait_for_checkpoints(&self, n: u64) -> bool {
        self.wait_progress(|p| p.checkpoints.len() as u64 >= n).is_some()
    }

    /// Blocks until `n` checkpoints have failed; the reason of the latest, or `None` if the job
    /// ended first. Call it from a plain thread, not from async code.
    pub fn wait_for_failed_checkpoints(&self, n: u64) -> Option<String> {
        self.wait_progress(|p| p.failed >= n)?.last_failure
    }

    /// Blocks until the job's checkpoint progress satisfies `reached`; `None` if the job ended
    /// first.
    fn wait_progress(&self, reached: impl FnMut(&Progress) -> bool) -> Option<Progress> {
        let mut progress = self.progress.clone();
        let rt = tokio::runtime::Builder::new_current_thread().build().ok()?;
        let result = rt.block_on(progress.wait_for(reached)).ok().map(|p| p.clone());
        result
    }
}

/// Starts a job in this process; configuration and snapshot problems are reported before any
/// thread starts.
pub fn spawn_job(sub: JobSubmission) -> Result<JobHandle> {
    spawn_job_on(sub, Placement::Local, None)
}

/// Starts a job whose tasks run where `placement` says; `opened` is the snapshot named by
/// `from_savepoint` if the caller has opened it already. Storage, configuration and snapshot
/// problems are reported before any task is deployed.
pub fn spawn_job_on(mut sub: JobSubmission, placement: Placement, opened: Option<RestoreSource>) -> Result<JobHandle> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sluice-io")
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("cannot start the async runtime: {e}")))?;
    let initial = match (opened, &sub.config.from_savepoint) {
        (Some(opened), _) => Some(opened),
        (None, Some(url)) => Some(runtime.block_on(RestoreSource::open_url(url))?),
        (None, None) => None,
    };
    if let Some(snapshot) = &initial {
        adopt_snapshot_max_parallelism(&mut sub, snapshot)?;
    }
    let mut master = JobMaster::start(sub, runtime.handle().clone(), placement.clone())?;
    runtime.block_on(master.storage.check_writable(&master.paths.job_dir()))?;
    if let Some(source) = &initial {
        let (job, graph, config) = (master.sub.job.name, &master.graph, &master.sub.config);
        runtime.block_on(check_savepoint(source, job, graph, config))?;
    }
    master.initial = initial.map(Arc::new);
    let job_id = master.job_id.clone();
    let (commands, receiver) = tokio::sync::mpsc::unbounded_channel();
    let (progress_tx, progress) = tokio::sync::watch::channel(Progress::default());
    let thread = std::thread::Builder::new()
        .name("sluice-master".into())
        .spawn(move || {
            let job = master.job_id.clone();
            let report = runtime.block_on(master.run(receiver, progress_tx));
            // However the job ended, the cluster and its workers forget it.
            if let Placement::Cluster(cluster) = placement {
                cluster.end_job(&job);
            }
            report
        })
        .map_err(|e| Error::Config(format!("cannot start the job master: {e}")))?;
    Ok(JobHandle {
        control: JobControl {
            job_id,
            commands,
            progress,
        },
        thread,
    })
}

struct JobMaster {
    sub: JobSubmission,
    graph: Arc<JobGraph>,
    job_id: String,
    storage: Storage,
    paths: CheckpointPaths,
    /// The snapshot the job starts from, opened and checked once, by `spawn_job_on`.
    initial: Option<Arc<RestoreSource>>,
    handle: tokio::runtime::Handle,
    placement: Placement,
}

impl JobMaster {
    fn start(sub: JobSubmission, handle: tokio::runtime::Handle, placement: Placement) -> Result<Self> {
        let graph = Arc::new(build_graph(&sub.job, &sub.params, &sub.config)?);
        let job_id = new_job_id();
        let storage = Storage::open(&sub.config.checkpoint_dir)?;
        Ok(Self {
            paths: CheckpointPaths::new(job_id.clone()),
            sub,
            graph,
            job_id,
            storage,
            initial: None,
            handle,
            placement,
        })
    }

    async fn run(
        mut self,
        mut commands: tokio::sync::mpsc::UnboundedReceiver<MasterCommand>,
        progress: tokio::sync::watch::Sender<Progress>,
    ) -> Result<JobReport> {
        let initial = self.initial.take();
        let cfg = &self.sub.config;
        let initial_restore = match &initial {
            Some(s) => RestoredFrom::Savepoint(s.url().to_string()),
            None => RestoredFrom::Nothing,
        };
        info!(job = %self.job_id, name = self.sub.job.name, parallelism = cfg.parallelism, "job started");
        let started = Instant::now();
        let mut completed = CompletedCheckpoints::new(cfg.checkpoint.retained);
        let mut coordinator = CheckpointCoordinator::new(
            self.graph.clone(),
            self.storage.clone(),
            self.paths.clone(),
            cfg.checkpoint.clone(),
            self.sub.job.name,
            self.sub.params.to_map(),
        );
        coordinator.report_progress(progress);
        if let Some(url) = &cfg.from_savepoint {
            // Only once the restore has worked: a refused snapshot changes nothing on disk.
            coordinator.claim_after_restore(url.clone());
        }
        let mut restarts: Vec<RestartRecord> = Vec::new();
        let mut attempt = 0u32;
        let mut next_restore = RestoreChoice::Initial;
        // The pause before the next attempt: none before the first.
        let mut delay = None;
        let outcome = loop {
            // Everything before an attempt runs (the restart delay, choosing the snapshot,
            // deploying, waiting for slots) gives way to a cancel; savepoints are refused then.
            let prepare = async {
                if let Some(delay) = delay.take() {
                    tokio::time::sleep(delay).await;
                }
                let (restore, restored_from) = self
                    .choose_restore(&coordinator, &mut completed, &initial, &next_restore)
                    .await?
                    .unwrap_or((None, RestoredFrom::Nothing));
                if attempt > 0 {
                    if let Some(r) = restarts.last_mut() {
                        r.restored_from = restored_from.clone();
                    }
                    info!(job = %self.job_id, attempt, from = ?restored_from, "restarting");
                }
                let dcfg = DeployConfig::for_job(
                    self.job_id.clone(),
                    attempt,
                    cfg,
                    self.storage.clone(),
                    restore,
                    coordinator.savepoint_targets(),
                );
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let deployment = match &self.placement {
                    Placement::Local => deploy(&self.graph, &dcfg, tx, self.handle.clone())?,
                    Placement::Cluster(cluster) => cluster.deploy(&self.sub, &self.graph, &dcfg, tx).await?,
                };
                Ok::<_, Error>((deployment, rx, dcfg.finish_hooks, restored_from))
            };
            let (deployment, rx, finish_hooks, restored_from) = tokio::select! {
                biased;
                outcome = wait_for_cancel(&mut commands) => break outcome,
                prepared = prepare => prepared?,
            };
            coordinator.report_state(JobState::Running, restarts.len() as u32);
            let end = coordinator
                .run_attempt(deployment, rx, &mut commands, &mut completed)
                .await;
            match end {
                AttemptEnd::Finished => {
                    // Every task ended with its input: no restart can come any more.
                    match &self.placement {
                        Placement::Local => finish_hooks.run()?,
                        Placement::Cluster(cluster) => cluster.finish(&self.job_id, attempt).await?,
                    }
                    break JobOutcome::Finished;
                }
                AttemptEnd::Canceled => {
                    info!(job = %self.job_id, "job cancelled");
                    break JobOutcome::Canceled;
                }
                AttemptEnd::Stopped => {
                    info!(job = %self.job_id, "job stopped with a savepoint");
                    break JobOutcome::Stopped;
                }
                AttemptEnd::Failed {
                    cause,
                    unusable_snapshot,
                    ..
                } => {
                    if unusable_snapshot {
                        match &restored_from {
                            RestoredFrom::Checkpoint(id) => {
                                warn!(job = %self.job_id, checkpoint = id.0, %cause,
                                    "checkpoint is unusable; falling back to the previous completed checkpoint");
                                coordinator.delete_removed(completed.discard(*id)).await;
                                next_restore = RestoreChoice::Latest;
                                continue;
                            }
                            RestoredFrom::Savepoint(url) => {
                                return Err(Error::Incompatible(format!("cannot restore from {url}: {cause}")))
                            }
                            RestoredFrom::Nothing => {}
                        }
                    }
                    if restarts.len() as u32 >= cfg.restart.attempts {
                        warn!(job = %self.job_id, %cause, "no restart attempts left; the job failed");
                        break JobOutcome::Failed(cause);
                    }
                    warn!(job = %self.job_id, %cause, "task failure; the job fails over");
                    attempt += 1;
                    restarts.push(RestartRecord {
                        attempt,
                        cause,
                        restored_from: RestoredFrom::Nothing,
                    });
                    next_restore = RestoreChoice::Latest;
                    coordinator.report_state(JobState::Restarting, restarts.len() as u32);
                    delay = Some(cfg.restart.delay);
                }
            }
        };
        Ok(self.report(outcome, restarts, initial_restore, &coordinator, &completed, started))
    }

    /// Picks what the next attempt restores: the newest usable completed checkpoint, else the
    /// initial savepoint. A checkpoint whose files are missing or the wrong size is dropped with
    /// a warning and the previous one is tried.
    async fn choose_restore(
        &self,
        coordinator: &CheckpointCoordinator,
        completed: &mut CompletedCheckpoints,
        initial: &Option<Arc<RestoreSource>>,
        choice: &RestoreChoice,
    ) -> Result<Option<(Option<Arc<RestoreSource>>, RestoredFrom)>> {
        if let RestoreChoice::Latest = choice {
            while let Some(id) = completed.latest() {
                let dir = self.storage.at(&self.paths.checkpoint_dir(id));
                let job_dir = self.storage.at(&self.paths.job_dir());
                let opened = match RestoreSource::open(dir, Some(job_dir)).await {
                    Ok(s) => s.verify_files().await.map(|_| s),
                    Err(e) => Err(e),
                };
                match opened {
                    Ok(s) => return Ok(Some((Some(Arc::new(s)), RestoredFrom::Checkpoint(id)))),
                    // A storage outage is not a broken checkpoint: keep it, fail with the cause.
                    Err(e) if !e.is_unusable_snapshot() => return Err(e),
                    Err(e) => {
                        warn!(job = %self.job_id, checkpoint = id.0, error = %e,
                            "checkpoint is unusable; falling back to the previous completed checkpoint");
                        coordinator.delete_removed(completed.discard(id)).await;
                    }
                }
            }
        }
        Ok(initial
            .as_ref()
            .map(|s| (Some(s.clone()), RestoredFrom::Savepoint(s.url().to_string()))))
    }

    fn report(
        &self,
        outcome: JobOutcome,
        restarts: Vec<RestartRecord>,
        initial_restore: RestoredFrom,
        coordinator: &CheckpointCoordinator,
        completed: &CompletedCheckpoints,
        started: Instant,
    ) -> JobReport {
        JobReport {
            job_id: self.job_id.clone(),
            job_name: self.sub.job.name.to_string(),
            outcome,
            restarts,
            initial_restore,
            checkpoints: coordinator.stats().to_vec(),
            failed_checkpoints: coordinator.failed_total(),
            retained: completed.ids().collect(),
            source_records: coordinator.source_records(),
            restore_times: coordinator.restore_times().to_vec(),
            elapsed: started.elapsed(),
        }
    }
}

/// Serves the job's commands while no attempt runs: a cancel ends the job, savepoints are refused.
/// Polled first, so that a queued cancel wins over an attempt ready to start.
async fn wait_for_cancel(commands: &mut tokio::sync::mpsc::UnboundedReceiver<MasterCommand>) -> JobOutcome {
    loop {
        match commands.recv().await {
            Some(MasterCommand::Cancel) => return JobOutcome::Canceled,
            // Nobody can cancel any more: wait for the slots.
            None => std::future::pending::<()>().await,
            Some(MasterCommand::Savepoint { reply, .. }) => {
                let _ = reply.send(Err(
                    "the job is not running (it is restarting or waits for free slots)".into()
                ));
            }
        }
    }
}

enum RestoreChoice {
    Initial,
    Latest,
}

/// Restoring from `<dir>/<job>/chk-<n>` claims that job's directory, as Flink's CLAIM restore
/// mode does: the job is over, so its checkpoints without `_metadata` can never complete, and
/// completed ones beyond the newest `retained` were subsumed (a crash can land between a commit
/// and retention's delete). Both are deleted; the retained ones and the one being restored stay.
pub(crate) async fn claim_restored_job_dir(url: &str, retained: usize) {
    let trimmed = url.trim_end_matches('/');
    let Some((parent, last)) = trimmed.rsplit_once('/') else {
        return;
    };
    let Some(restored) = CheckpointPaths::parse_checkpoint_dir(last) else {
        return;
    };
    let Ok(parent) = Storage::open(parent) else { return };
    let Ok(children) = parent.list_dir("").await else {
        return;
    };
    let mut completed = Vec::new();
    let mut doomed = Vec::new();
    for child in children {
        let Some(id) = CheckpointPaths::parse_checkpoint_dir(&child) else {
            continue;
        };
        let metadata = parent.read(&format!("{child}{METADATA_FILE}")).await;
        if metadata.is_ok_and(|m| CheckpointMetadata::decode(&m, &child).is_ok()) {
            completed.push((id, child));
        } else {
            doomed.push(child);
        }
    }
    completed.sort();
    let keep_from = completed.len().saturating_sub(retained);
    doomed.extend(
        completed
            .into_iter()
            .enumerate()
            .filter(|(i, (id, _))| *i < keep_from && *id != restored)
            .map(|(_, (_, child))| child),
    );
    for child in doomed {
        info!(dir = %parent.location(&child), "deleting an incomplete or subsumed checkpoint of the restored job");
        if let Err(e) = parent.delete_dir(&child).await {
            warn!(error = %e, "cannot delete a checkpoint of the restored job");
        }
    }
}
