//! The coordinator process: the REST API (JSON over HTTP, what the CLI uses and anyone can
//! curl) and the control listener workers connect to. Mutating calls need the shared secret as
//! `Authorization: Bearer <secret>`; reads are open.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/cluster` | the control address and the workers |
//! | `GET /v1/jobs` | every job with its state |
//! | `POST /v1/jobs` | submits a job (`job`, `settings`, `config`) |
//! | `GET /v1/jobs/{id}` | a job's status |
//! | `GET /v1/jobs/{id}/checkpoints` | its completed and retained checkpoints |
//! | `POST /v1/jobs/{id}/savepoints` | takes a savepoint under `target`; answers when complete |
//! | `POST /v1/jobs/{id}/stop` | stops it after a final savepoint under `target` |
//! | `POST /v1/jobs/{id}/cancel` | cancels it |
//! | `POST /v1/restore` | resubmits the job of a snapshot (`url`, `config`, `settings`) |

use super::{wire, Cluster, WorkerInfo, HEARTBEAT_TIMEOUT};
use crate::checkpoint::CheckpointStats;
use crate::master::{spawn_job_on, JobControl, JobHandle, JobReport, JobState, JobSubmission, Placement};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sluice_runtime::config::JobConfig;
use sluice_runtime::protocol::{ToCoordinator, ToWorker};
use sluice_runtime::restore::RestoreSource;
use sluice_runtime::JobRegistry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

/// A job the coordinator runs.
struct JobEntry {
    name: String,
    parallelism: usize,
    checkpoint_dir: String,
    /// The running job, or how it ended: its report, or why its master failed.
    run: Run,
}

enum Run {
    Running(JobHandle),
    Ended(Result<JobReport, String>),
}

impl JobEntry {
    /// Collects the report of a job whose master has returned (joining it does not block).
    fn settle(&mut self) {
        if let Run::Running(h) = &self.run {
            if h.is_finished() {
                let Run::Running(h) = std::mem::replace(&mut self.run, Run::Ended(Err(String::new()))) else {
                    unreachable!("checked above")
                };
                self.run = Run::Ended(h.wait().map_err(|e| e.to_string()));
            }
        }
    }

    fn state(&self) -> JobState {
        match &self.run {
            Run::Running(h) => h.with_progress(|p| p.state),
            Run::Ended(Ok(r)) => JobState::of(&r.outcome),
            Run::Ended(Err(_)) => JobState::Failed,
        }
    }
}

struct AppState {
    cluster: Arc<Cluster>,
    registry: JobRegistry,
    jobs: Mutex<BTreeMap<String, JobEntry>>,
    control_addr: SocketAddr,
}

type Shared = Arc<AppState>;

/// An error answer: a status and `{"error": message}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn bad(message: impl ToString) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.to_string())
}

fn conflict(message: impl ToString) -> ApiError {
    ApiError(StatusCode::CONFLICT, message.to_string())
}

type ApiResult<T> = std::result::Result<Json<T>, ApiError>;

/// `GET /v1/cluster`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Where workers open their control connection.
    pub control_addr: SocketAddr,
    /// The registered workers.
    pub workers: Vec<WorkerInfo>,
}

/// `POST /v1/jobs`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// The job's name.
    pub job: String,
    /// `key=value` parameters.
    pub settings: Vec<String>,
    /// Its configuration.
    pub config: JobConfig,
}

/// `POST /v1/restore`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The savepoint or retained checkpoint.
    pub url: String,
    /// `key=value` parameters overriding the snapshot's.
    pub settings: Vec<String>,
    /// The new run's configuration (`from_savepoint` is set to `url`).
    pub config: JobConfig,
}

/// `POST /v1/jobs/{id}/savepoints` and `/stop`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavepointRequest {
    /// Base URL of the savepoint (default: `savepoints` under the job's checkpoint dir).
    pub target: Option<String>,
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobStatus {
    /// Its id.
    pub job_id: String,
    /// Its name.
    pub name: String,
    /// CREATED, RUNNING, RESTARTING, FINISHED, FAILED or CANCELED.
    pub state: JobState,
    /// Its default parallelism.
    pub parallelism: usize,
    /// Restarts so far.
    pub restarts: u32,
    /// Completed checkpoints.
    pub completed_checkpoints: u64,
    /// Failed checkpoints.
    pub failed_checkpoints: u64,
    /// Why it failed, or why its latest checkpoint failed.
    pub failure: Option<String>,
    /// Records its sources emitted (known once it ended).
    pub source_records: Option<u64>,
    /// First deployment to its end, milliseconds (known once it ended).
    pub elapsed_ms: Option<f64>,
}

/// One completed checkpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Its id.
    pub id: u64,
    /// Trigger to `_metadata`, milliseconds.
    pub duration_ms: f64,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Bytes of state referenced.
    pub state_bytes: u64,
}

impl From<&CheckpointStats> for CheckpointInfo {
    fn from(c: &CheckpointStats) -> Self {
        Self {
            id: c.id.0,
            duration_ms: crate::checkpoint::tenths_of_ms(c.duration),
            bytes: c.bytes,
            state_bytes: c.state_bytes,
        }
    }
}

/// `GET /v1/jobs/{id}/checkpoints`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckpointsInfo {
    /// The job.
    pub job_id: String,
    /// Completed checkpoints, in order.
    pub completed: Vec<CheckpointInfo>,
    /// Failed checkpoints.
    pub failed: u64,
    /// The ids retained.
    pub retained: Vec<u64>,
}

fn authorize(state: &AppState, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(s) if state.cluster.secret_matches(s) => Ok(()),
        Some(_) => Err(ApiError(StatusCode::UNAUTHORIZED, "the secret is wrong".into())),
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "this call needs the cluster's secret (--secret or SLUICE_SECRET)".into(),
        )),
    }
}

/// Runs the coordinator on `listen` until the process ends; prints
/// `coordinator listening on ADDR` once it accepts.
pub fn run(registry: JobRegistry, listen: &str, secret: String) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        let api = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let api_addr = api.local_addr().map_err(|e| e.to_string())?;
        let control = TcpListener::bind((api_addr.ip(), 0))
            .await
            .map_err(|e| format!("cannot open the control port on {}: {e}", api_addr.ip()))?;
        let control_addr = control.local_addr().map_err(|e| e.to_string())?;
        let cluster = Cluster::new(secret);
        tokio::spawn(accept_workers(control, cluster.clone()));
        let state = Arc::new(AppState {
            cluster,
            registry,
            jobs: Mutex::new(BTreeMap::new()),
            control_addr,
        });
        let app = Router::new()
            .route("/v1/cluster", get(cluster_info))
            .route("/v1/jobs", get(list_jobs).post(submit))
            .route("/v1/jobs/{id}", get(job_status))
            .route("/v1/jobs/{id}/checkpoints", get(job_checkpoints))
            .route("/v1/jobs/{id}/savepoints", post(take_savepoint::<false>))
            .route("/v1/jobs/{id}/stop", post(take_savepoint::<true>))
            .route("/v1/jobs/{id}/cancel", post(cancel))
            .route("/v1/restore", post(restore))
            .with_state(state);
        info!(%api_addr, %control_addr, "coordinator started");
        println!("coordinator listening on {api_addr}");
        axum::serve(api, app)
            .await
            .map_err(|e| format!("the REST server failed: {e}"))
    })
}

async fn accept_workers(listener: TcpListener, cluster: Arc<Cluster>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve_worker(stream, peer, cluster.clone()));
            }
            Err(e) => warn!(error = %e, "accepting a worker connection failed"),
        }
    }
}

/// One worker's control connection: registration, then its messages until it breaks or falls
/// silent, when the worker is lost.
async fn serve_worker(stream: TcpStream, peer: SocketAddr, cluster: Arc<Cluster>) {
    let _ = stream.set_nodelay(true);
    let (mut input, mut output) = stream.into_split();
    let first = tokio::time::timeout(HEARTBEAT_TIMEOUT, wire::read::<_, ToCoordinator>(&mut input)).await;
    let (slots, data_addr) = match first {
        Ok(Ok(ToCoordinator::Register {
            secret,
            slots,
            data_addr,
        })) => {
            if !cluster.secret_matches(&secret) {
                warn!(%peer, "refused a worker with a wrong secret");
                let reason = "the worker's secret does not match the coordinator's (--secret or SLUICE_SECRET)";
                let _ = wire::write(&mut output, &ToWorker::Refused { reason: reason.into() }).await;
                return;
            }
            // A worker whose data port listens on every interface is reached where it connected from.
            let mut data_addr = data_addr;
            if data_addr.ip().is_unspecified() {
                data_addr.set_ip(peer.ip());
            }
            (slots, data_addr)
        }
        _ => {
            warn!(%peer, "a control connection did not register");
            return;
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ToWorker>();
    let worker = cluster.register(tx, slots, data_addr);
    if wire::write(&mut output, &ToWorker::Registered { worker })
        .await
        .is_err()
    {
        cluster.lose(worker, "the connection broke during registration");
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if wire::write(&mut output, &message).await.is_err() {
                break;
            }
        }
    });
    let reason = loop {
        match tokio::time::timeout(HEARTBEAT_TIMEOUT, wire::read::<_, ToCoordinator>(&mut input)).await {
            Err(_) => break format!("no heartbeat for {HEARTBEAT_TIMEOUT:?}"),
            Ok(Err(e)) => break format!("its connection broke: {e}"),
            Ok(Ok(message)) => match message {
                ToCoordinator::Heartbeat | ToCoordinator::Register { .. } => {}
                ToCoordinator::Event {
                    job,
                    attempt,
                    event,
                    source_records,
                } => cluster.on_event(worker, (job, attempt), event, source_records),
                ToCoordinator::Finished { job, attempt, error } => cluster.on_finished(worker, job, attempt, error),
                ToCoordinator::DeployFailed {
                    job,
                    attempt,
                    cause,
                    unusable_snapshot,
                } => cluster.on_deploy_failed(worker, &(job, attempt), &cause, unusable_snapshot),
            },
        }
    };
    writer.abort();
    cluster.lose(worker, &reason);
}

async fn cluster_info(State(state): State<Shared>) -> Json<ClusterInfo> {
    Json(ClusterInfo {
        control_addr: state.control_addr,
        workers: state.cluster.workers(),
    })
}

fn status_of(id: &str, entry: &mut JobEntry) -> JobStatus {
    entry.settle();
    let mut status = JobStatus {
        job_id: id.to_string(),
        name: entry.name.clone(),
        state: entry.state(),
        parallelism: entry.parallelism,
        restarts: 0,
        completed_checkpoints: 0,
        failed_checkpoints: 0,
        failure: None,
        source_records: None,
        elapsed_ms: None,
    };
    match &entry.run {
        Run::Running(h) => h.with_progress(|p| {
            status.restarts = p.restarts;
            status.completed_checkpoints = p.checkpoints.len() as u64;
            status.failed_checkpoints = p.failed;
            status.failure = p.last_failure.clone();
        }),
        Run::Ended(Ok(r)) => {
            status.restarts = r.restarts.len() as u32;
            status.completed_checkpoints = r.checkpoints.len() as u64;
            status.failed_checkpoints = r.failed_checkpoints;
            if let crate::master::JobOutcome::Failed(cause) = &r.outcome {
                status.failure = Some(cause.clone());
            }
            status.source_records = Some(r.source_records);
            status.elapsed_ms = Some(r.elapsed.as_secs_f64() * 1e3);
        }
        Run::Ended(Err(e)) => status.failure = Some(e.clone()),
    }
    status
}

async fn list_jobs(State(state): State<Shared>) -> Json<serde_json::Value> {
    let mut jobs = state.jobs.lock().unwrap_or_else(|p| p.into_inner());
    let list: Vec<JobStatus> = jobs.iter_mut().map(|(id, e)| status_of(id, e)).collect();
    Json(serde_json::json!({ "jobs": list }))
}

fn unknown_job(id: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no job with id '{id}' on this coordinator"),
    )
}

async fn job_status(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult<JobStatus> {
    let mut jobs = state.jobs.lock().unwrap_or_else(|p| p.into_inner());
    let entry = jobs.get_mut(&id).ok_or_else(|| unknown_job(&id))?;
    Ok(Json(status_of(&id, entry)))
}

async fn job_checkpoints(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult<CheckpointsInfo> {
    let mut jobs = state.jobs.lock().unwrap_or_else(|p| p.into_inner());
    let entry = jobs.get_mut(&id).ok_or_else(|| unknown_job(&id))?;
    entry.settle();
    let listed = |stats: &[CheckpointStats], failed: u64, retained: &[sluice_runtime::CheckpointId]| {
        (
            stats.iter().map(CheckpointInfo::from).collect(),
            failed,
            retained.iter().map(|c| c.0).collect(),
        )
    };
    let (completed, failed, retained) = match &entry.run {
        Run::Running(h) => h.with_progress(|p| listed(&p.checkpoints, p.failed, &p.retained)),
        Run::Ended(Ok(r)) => listed(&r.checkpoints, r.failed_checkpoints, &r.retained),
        Run::Ended(Err(_)) => (Vec::new(), 0, Vec::new()),
    };
    Ok(Json(CheckpointsInfo {
        job_id: id,
        completed,
        failed,
        retained,
    }))
}

/// Starts a job on the cluster (off the async workers: opening a snapshot blocks); `opened` is
/// its snapshot if already opened.
async fn start(
    state: &Shared,
    sub: JobSubmission,
    opened: Option<RestoreSource>,
) -> std::result::Result<String, ApiError> {
    let (name, parallelism) = (sub.job.name.to_string(), sub.config.parallelism);
    let checkpoint_dir = sub.config.checkpoint_dir.clone();
    let placement = Placement::Cluster(state.cluster.clone());
    let handle = tokio::task::spawn_blocking(move || spawn_job_on(sub, placement, opened))
        .await
        .map_err(|e| bad(format!("the submission panicked: {e}")))?
        .map_err(bad)?;
    let id = handle.job_id().to_string();
    info!(job = %id, name, parallelism, "job submitted");
    state.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(
        id.clone(),
        JobEntry {
            name,
            parallelism,
            checkpoint_dir,
            run: Run::Running(handle),
        },
    );
    Ok(id)
}

async fn submit(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<SubmitRequest>,
) -> ApiResult<serde_json::Value> {
    authorize(&state, &headers)?;
    let job = state.registry.get(&req.job).map_err(bad)?.clone();
    let params = job.params_from_settings(&req.settings).map_err(bad)?;
    let config = req.config;
    let id = start(&state, JobSubmission { job, params, config }, None).await?;
    Ok(Json(serde_json::json!({ "job_id": id })))
}

async fn restore(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<RestoreRequest>,
) -> ApiResult<serde_json::Value> {
    authorize(&state, &headers)?;
    let snapshot = RestoreSource::open_url(&req.url).await.map_err(bad)?;
    let meta = snapshot.metadata();
    let job = state.registry.get(&meta.job_name).map_err(bad)?.clone();
    let params = job.params_over(meta.params.clone(), &req.settings).map_err(bad)?;
    let mut config = req.config;
    config.from_savepoint = Some(req.url.clone());
    let name = job.name;
    let id = start(&state, JobSubmission { job, params, config }, Some(snapshot)).await?;
    Ok(Json(
        serde_json::json!({ "job_id": id, "job": name, "restored_from": req.url }),
    ))
}

/// Runs a blocking call on a running job's handle.
async fn with_running<T: Send + 'static>(
    state: &Shared,
    id: &str,
    call: impl FnOnce(&JobControl, String) -> T + Send + 'static,
) -> std::result::Result<T, ApiError> {
    let (control, savepoints) = {
        let mut jobs = state.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let entry = jobs.get_mut(id).ok_or_else(|| unknown_job(id))?;
        entry.settle();
        match &entry.run {
            Run::Running(h) => (
                h.control(),
                format!("{}/savepoints", entry.checkpoint_dir.trim_end_matches('/')),
            ),
            Run::Ended(_) => return Err(conflict(format!("job {id} is {}, not running", entry.state()))),
        }
    };
    // Off the async workers, without the lock: the call blocks until the job answers.
    tokio::task::spawn_blocking(move || call(&control, savepoints))
        .await
        .map_err(|e| bad(format!("the call panicked: {e}")))
}

/// A savepoint, and with `STOP` the job's end after it (answered once the job has ended).
async fn take_savepoint<const STOP: bool>(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(req): Json<SavepointRequest>,
) -> ApiResult<serde_json::Value> {
    let stop = STOP;
    authorize(&state, &headers)?;
    let url = with_running(&state, &id, move |h, default| {
        let target = req.target.as_deref().unwrap_or(&default);
        if !stop {
            return h.savepoint(target);
        }
        let url = h.stop(target)?;
        h.wait_ended();
        Ok(url)
    })
    .await?
    .map_err(conflict)?;
    if !stop {
        return Ok(Json(serde_json::json!({ "job_id": id, "url": url })));
    }
    let final_state = settle_ended(&state, &id).await;
    Ok(Json(
        serde_json::json!({ "job_id": id, "url": url, "state": final_state }),
    ))
}

async fn cancel(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<serde_json::Value> {
    authorize(&state, &headers)?;
    with_running(&state, &id, |h, _| {
        h.cancel();
        h.wait_ended();
    })
    .await?;
    let final_state = settle_ended(&state, &id).await;
    Ok(Json(serde_json::json!({ "job_id": id, "state": final_state })))
}

/// The final state of a job whose master has returned, once its report is collected.
async fn settle_ended(state: &Shared, id: &str) -> JobState {
    loop {
        {
            let mut jobs = state.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = jobs.get_mut(id) else {
                return JobState::Failed;
            };
            entry.settle();
            if let Run::Ended(_) = entry.run {
                return entry.state();
            }
        }
        // The master has returned; its thread ends right after (a join has no async signal).
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
