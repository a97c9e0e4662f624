//! The worker process: registers its slots with the coordinator, deploys the subtasks it is
//! given (building the job's graph from the job's name and parameters, as every process runs
//! the same binary), relays commands to them and their events back, and carries data to and
//! from other workers through its [`Exchange`]. Losing the coordinator stops the worker: its
//! tasks cannot checkpoint any more, and a supervisor restarts it clean.

use super::{wire, AttemptKey};
use crate::master::build_graph;
use sluice_runtime::executor::{deploy, DeployConfig, Deployment, SavepointTarget, SavepointTargets};
use sluice_runtime::net::{Exchange, Placement};
use sluice_runtime::operator::FinishHooks;
use sluice_runtime::protocol::{DeploySpec, TaskCommand, TaskEvent, ToCoordinator, ToWorker};
use sluice_runtime::restore::RestoreSource;
use sluice_runtime::storage::Storage;
use sluice_runtime::{JobRegistry, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

/// How a worker is started.
pub struct WorkerOptions {
    /// The coordinator's REST address.
    pub coordinator: String,
    /// The cluster's secret.
    pub secret: String,
    /// Slots offered.
    pub slots: usize,
    /// Local working directory (RocksDB instances).
    pub data_dir: PathBuf,
    /// The address the data plane listens on (port 0: any free port).
    pub data_bind: String,
}

#[derive(Default)]
struct Local {
    deployments: HashMap<AttemptKey, Deployment>,
    hooks: HashMap<AttemptKey, FinishHooks>,
    /// Attempts being deployed, and whether a cancel came meanwhile.
    deploying: HashMap<AttemptKey, bool>,
    savepoints: HashMap<String, SavepointTargets>,
}

struct Worker {
    id: u64,
    registry: JobRegistry,
    exchange: Arc<Exchange>,
    data_dir: PathBuf,
    to_coordinator: UnboundedSender<ToCoordinator>,
    local: Mutex<Local>,
}

impl Worker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs a worker until its coordinator goes away (an error) or refuses it.
pub fn run(registry: JobRegistry, options: WorkerOptions) -> std::result::Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sluice-worker")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(serve(registry, options))
}

async fn serve(registry: JobRegistry, options: WorkerOptions) -> std::result::Result<(), String> {
    let coordinator = options.coordinator.clone();
    let client = super::client::Client::new(&coordinator, None)?;
    let info: super::server::ClusterInfo = client.get_typed("/v1/cluster").await?;
    let exchange = Exchange::bind(&options.data_bind)
        .map_err(|e| format!("cannot open the data port on {}: {e}", options.data_bind))?;
    let mut control = info.control_addr;
    if control.ip().is_unspecified() {
        // The coordinator listens on every interface: its control port is where its API answered.
        if let Some(addr) = tokio::net::lookup_host(client.host())
            .await
            .ok()
            .and_then(|mut a| a.next())
        {
            control.set_ip(addr.ip());
        }
    }
    let stream = TcpStream::connect(control)
        .await
        .map_err(|e| format!("cannot reach the coordinator's control port {control}: {e}"))?;
    let _ = stream.set_nodelay(true);
    // A coordinator whose host died or was cut off sends nothing, not even a reset: TCP
    // keepalive ends the connection (and so the worker's tasks) after about 10 s.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(5))
        .with_interval(std::time::Duration::from_secs(1))
        .with_retries(5);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    let (mut input, mut output) = stream.into_split();
    let register = ToCoordinator::Register {
        secret: options.secret.clone(),
        slots: options.slots,
        data_addr: exchange.addr(),
    };
    wire::write(&mut output, &register)
        .await
        .map_err(|e| format!("cannot register with {coordinator}: {e}"))?;
    let id = match wire::read::<_, ToWorker>(&mut input).await {
        Ok(ToWorker::Registered { worker }) => worker,
        Ok(ToWorker::Refused { reason }) => {
            return Err(format!(
                "the coordinator at {coordinator} refused this worker: {reason}"
            ))
        }
        Ok(other) => return Err(format!("unexpected answer from {coordinator}: {other:?}")),
        Err(e) => {
            return Err(format!(
                "the coordinator at {coordinator} closed the connection during registration: {e}"
            ))
        }
    };
    info!(worker = id, slots = options.slots, data_addr = %exchange.addr(), "registered");
    println!("worker {id} registered with {coordinator}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ToCoordinator>();
    tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if wire::write(&mut output, &message).await.is_err() {
                break;
            }
        }
    });
    let heartbeat = tx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            if heartbeat.send(ToCoordinator::Heartbeat).is_err() {
                break;
            }
        }
    });
    let worker = Arc::new(Worker {
        id,
        registry,
        exchange,
        data_dir: options.data_dir,
        to_coordinator: tx,
        local: Mutex::default(),
    });
    let error = loop {
        match wire::read::<_, ToWorker>(&mut input).await {
            Ok(message) => worker.clone().on_message(message),
            Err(e) => break e,
        }
    };
    for d in worker.lock().deployments.values() {
        d.cancel();
    }
    Err(format!(
        "lost the connection to the coordinator at {coordinator}: {error}"
    ))
}

impl Worker {
    fn on_message(self: Arc<Self>, message: ToWorker) {
        match message {
            ToWorker::Deploy(spec) => {
                self.lock().deploying.insert((spec.job.clone(), spec.attempt), false);
                tokio::spawn(async move { self.deploy(*spec).await });
            }
            ToWorker::Command {
                job,
                attempt,
                task,
                command,
            } => {
                let mut local = self.lock();
                if let TaskCommand::CheckpointComplete(id) | TaskCommand::AbortCheckpoint(id) = command {
                    // Its tasks are done with a savepoint's target once it is decided.
                    if let Some(targets) = local.savepoints.get(&job) {
                        targets.remove(id);
                    }
                }
                let key = (job, attempt);
                let Some(d) = local.deployments.get(&key) else {
                    if let (TaskCommand::Cancel, Some(cancelled)) = (&command, local.deploying.get_mut(&key)) {
                        *cancelled = true;
                    }
                    return;
                };
                if let TaskCommand::Cancel = command {
                    // The whole attempt stops; teardown errors then read as cancellation.
                    d.cancel();
                } else if let Some(t) = d.tasks.iter().find(|t| t.id == task) {
                    t.control.send(command);
                }
            }
            ToWorker::SavepointTarget { job, id, url, dir } => match Storage::open(&url) {
                Ok(storage) => self
                    .lock()
                    .savepoints
                    .entry(job)
                    .or_default()
                    .insert(id, SavepointTarget { storage, dir }),
                Err(e) => warn!(error = %e, "cannot open a savepoint target"),
            },
            ToWorker::Finish { job, attempt } => {
                let hooks = self.lock().hooks.remove(&(job.clone(), attempt));
                tokio::spawn(async move {
                    let result = match hooks {
                        Some(h) => tokio::task::spawn_blocking(move || h.run())
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|e| e.to_string())),
                        None => Ok(()),
                    };
                    let _ = self.to_coordinator.send(ToCoordinator::Finished {
                        job,
                        attempt,
                        error: result.err(),
                    });
                });
            }
            ToWorker::Forget { job } => {
                let mut local = self.lock();
                local.hooks.retain(|k, _| k.0 != job);
                local.savepoints.remove(&job);
            }
            ToWorker::Registered { .. } | ToWorker::Refused { .. } => {}
        }
    }

    /// Deploys this worker's share of an attempt; a failure to do so fails its tasks.
    async fn deploy(self: Arc<Self>, spec: DeploySpec) {
        let key: AttemptKey = (spec.job.clone(), spec.attempt);
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel::<TaskEvent>();
        let started = self.start(&spec, events).await;
        // Under one lock: a cancel arriving now finds the attempt either still deploying (and
        // is noted) or deployed (and reaches it), never in between.
        let started = {
            let mut local = self.lock();
            let cancelled = local.deploying.remove(&key).unwrap_or(false);
            started.map(|deployment| {
                if cancelled {
                    deployment.cancel();
                }
                let counted = (deployment.tasks.len(), deployment.source_counter());
                local.deployments.insert(key.clone(), deployment);
                counted
            })
        };
        match started {
            Ok((n, records)) => {
                info!(job = %spec.job, attempt = spec.attempt, tasks = n, "deployed");
                let mut ended = 0;
                while let Some(event) = rx.recv().await {
                    ended += usize::from(matches!(event, TaskEvent::Terminated { .. }));
                    let _ = self.to_coordinator.send(ToCoordinator::Event {
                        job: spec.job.clone(),
                        attempt: spec.attempt,
                        event,
                        source_records: records.load(Ordering::Relaxed),
                    });
                    if ended == n {
                        break;
                    }
                }
                let done = self.lock().deployments.remove(&key);
                if let Some(mut d) = done {
                    let _ = tokio::task::spawn_blocking(move || d.join()).await;
                }
                self.exchange.forget(&spec.job, spec.attempt);
            }
            Err(e) => {
                warn!(job = %spec.job, error = %e, "deployment failed");
                let _ = self.to_coordinator.send(ToCoordinator::DeployFailed {
                    job: spec.job.clone(),
                    attempt: spec.attempt,
                    cause: format!("worker {} cannot deploy the job: {e}", self.id),
                    unusable_snapshot: e.is_unusable_snapshot(),
                });
            }
        }
    }

    async fn start(&self, spec: &DeploySpec, events: UnboundedSender<TaskEvent>) -> Result<Deployment> {
        let job = self.registry.get(&spec.job_name)?.clone();
        let params = job.params_from_map(spec.params.clone())?;
        let graph = Arc::new(build_graph(&job, &params, &spec.config)?);
        let restore = match &spec.restore {
            Some((url, job_url)) => {
                let job_storage = job_url.as_deref().map(Storage::open).transpose()?;
                Some(Arc::new(RestoreSource::open(Storage::open(url)?, job_storage).await?))
            }
            None => None,
        };
        let config = &spec.config;
        let savepoints = self.lock().savepoints.entry(spec.job.clone()).or_default().clone();
        let storage = Storage::open(&config.checkpoint_dir)?;
        let mut cfg = DeployConfig::for_job(spec.job.clone(), spec.attempt, config, storage, restore, savepoints);
        cfg.data_dir = self.data_dir.clone();
        cfg.placement = Some(Arc::new(Placement {
            exchange: self.exchange.clone(),
            this_worker: self.id,
            slot_workers: spec.slot_workers.clone(),
            peers: spec.peers.clone(),
        }));
        {
            let mut local = self.lock();
            // Hooks of the job's earlier attempts will never run.
            local.hooks.retain(|k, _| k.0 != spec.job);
            local
                .hooks
                .insert((spec.job.clone(), spec.attempt), cfg.finish_hooks.clone());
        }
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || deploy(&graph, &cfg, events, handle))
            .await
            .map_err(|e| sluice_runtime::Error::User(format!("deploying panicked: {e}")))?
    }
}
