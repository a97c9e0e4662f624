//! Cluster mode: the coordinator's view of its workers and slots, and the deployment of job
//! attempts onto them. A worker registers over a control connection with the shared secret and
//! offers slots; an attempt takes one slot per subtask index (slot sharing: slot `i` runs subtask
//! `i` of every task), spread over the workers. Task commands and events travel over the same
//! connection; a worker whose connection breaks or falls silent is lost, and every task it ran
//! is reported failed, so the job master fails over onto the remaining slots, waiting for
//! workers to join when too few remain.
//!
//! `server` holds the REST API and the control listener, `worker` the worker process, `client`
//! the CLI's side of the REST API, `wire` the framing of control messages.

pub mod client;
pub mod commands;
pub mod server;
pub mod wire;
pub mod worker;

use crate::master::JobSubmission;
use sluice_runtime::executor::{plan_chains, DeployConfig, DeployedTask, Deployment};
use sluice_runtime::graph::JobGraph;
use sluice_runtime::protocol::{DeploySpec, TaskCommand, TaskEvent, TaskId, TaskOutcome, ToWorker};
use sluice_runtime::{Error, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

/// A worker silent this long is lost (it sends a heartbeat every second).
pub const HEARTBEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One registered worker.
struct WorkerEntry {
    to_worker: UnboundedSender<ToWorker>,
    data_addr: SocketAddr,
    slots: usize,
    used: usize,
}

/// Where one attempt's events go, and which of its tasks each worker still runs.
struct AttemptRoute {
    events: UnboundedSender<TaskEvent>,
    live: HashMap<u64, BTreeSet<TaskId>>,
    /// Per worker, the records its sources emitted.
    records: HashMap<u64, u64>,
    total_records: Arc<AtomicU64>,
}

pub(crate) type AttemptKey = (String, u32);

impl AttemptRoute {
    /// Reports every task `worker` still runs as failed.
    fn fail_live(&mut self, worker: u64, cause: &str, unusable_snapshot: bool) {
        for task in self.live.remove(&worker).unwrap_or_default() {
            let _ = self.events.send(TaskEvent::Terminated {
                task,
                outcome: TaskOutcome::Failed {
                    cause: cause.to_string(),
                    unusable_snapshot,
                    secondary: false,
                },
            });
        }
    }
}

#[derive(Default)]
struct Inner {
    next_worker: u64,
    workers: BTreeMap<u64, WorkerEntry>,
    routes: HashMap<AttemptKey, AttemptRoute>,
    /// The workers that ran each attempt, kept until its finish hooks ran.
    hosts: HashMap<AttemptKey, Vec<u64>>,
    finishing: HashMap<(String, u32, u64), tokio::sync::oneshot::Sender<std::result::Result<(), String>>>,
}

/// A worker as `GET /v1/cluster` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkerInfo {
    /// Its id.
    pub id: u64,
    /// Slots offered.
    pub slots: usize,
    /// Slots in use.
    pub used: usize,
    /// Its data address.
    pub data_addr: SocketAddr,
}

/// The coordinator's workers and slots.
pub struct Cluster {
    secret: String,
    inner: Mutex<Inner>,
    /// Woken when slots are freed or workers join.
    changed: tokio::sync::Notify,
}

impl Cluster {
    /// An empty cluster whose workers must present `secret`.
    pub fn new(secret: String) -> Arc<Self> {
        Arc::new(Self {
            secret,
            inner: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `given` is the cluster's secret.
    pub fn secret_matches(&self, given: &str) -> bool {
        // Length first, then every byte: no early exit on the first difference.
        let (a, b) = (self.secret.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The registered workers.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.lock()
            .workers
            .iter()
            .map(|(id, w)| WorkerInfo {
                id: *id,
                slots: w.slots,
                used: w.used,
                data_addr: w.data_addr,
            })
            .collect()
    }

    /// Adds a worker; returns its id.
    fn register(&self, to_worker: UnboundedSender<ToWorker>, slots: usize, data_addr: SocketAddr) -> u64 {
        let id = {
            let mut inner = self.lock();
            inner.next_worker += 1;
            let id = inner.next_worker;
            inner.workers.insert(
                id,
                WorkerEntry {
                    to_worker,
                    data_addr,
                    slots,
                    used: 0,
                },
            );
            id
        };
        info!(worker = id, slots, %data_addr, "worker registered");
        self.changed.notify_waiters();
        id
    }

    /// A worker is gone: each task it still ran is reported failed to its job.
    fn lose(&self, worker: u64, reason: &str) {
        let mut inner = self.lock();
        let Some(entry) = inner.workers.remove(&worker) else {
            return;
        };
        warn!(worker, data_addr = %entry.data_addr, reason, "worker lost");
        let cause = format!("worker {worker} ({}) was lost: {reason}", entry.data_addr);
        for route in inner.routes.values_mut() {
            route.fail_live(worker, &cause, false);
        }
        let waits: Vec<_> = inner.finishing.keys().filter(|k| k.2 == worker).cloned().collect();
        for k in waits {
            if let Some(w) = inner.finishing.remove(&k) {
                let _ = w.send(Err(format!("worker {worker} was lost: {reason}")));
            }
        }
    }

    /// Routes a task event from `worker` to its attempt.
    fn on_event(&self, worker: u64, key: AttemptKey, event: TaskEvent, source_records: u64) {
        let mut inner = self.lock();
        let Some(route) = inner.routes.get_mut(&key) else {
            return;
        };
        let previous = route.records.insert(worker, source_records).unwrap_or(0);
        route
            .total_records
            .fetch_add(source_records.saturating_sub(previous), Ordering::Relaxed);
        if let TaskEvent::Terminated { task, .. } = &event {
            if let Some(live) = route.live.get_mut(&worker) {
                live.remove(task);
            }
        }
        let _ = route.events.send(event);
    }

    /// A worker could not deploy its share of an attempt: its tasks there fail.
    fn on_deploy_failed(&self, worker: u64, key: &AttemptKey, cause: &str, unusable_snapshot: bool) {
        if let Some(route) = self.lock().routes.get_mut(key) {
            route.fail_live(worker, cause, unusable_snapshot);
        }
    }

    fn on_finished(&self, worker: u64, job: String, attempt: u32, error: Option<String>) {
        if let Some(w) = self.lock().finishing.remove(&(job, attempt, worker)) {
            let _ = w.send(error.map_or(Ok(()), Err));
        }
    }

    /// Deploys one attempt: waits for enough free slots, spreads the subtasks over the workers
    /// and sends each its share. The returned deployment's commands go to the workers.
    pub(crate) async fn deploy(
        self: &Arc<Self>,
        sub: &JobSubmission,
        graph: &JobGraph,
        cfg: &DeployConfig,
        events: UnboundedSender<TaskEvent>,
    ) -> Result<Deployment> {
        let needed = graph.vertices().iter().map(|v| v.parallelism).max().unwrap_or(1);
        let key: AttemptKey = (cfg.job_id.clone(), cfg.attempt);
        let total_records = Arc::new(AtomicU64::new(0));
        let chains = plan_chains(graph, cfg.chaining);
        let (slot_workers, senders, peers) = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(placed) = self.take_slots(needed) {
                break placed;
            }
            info!(job = %cfg.job_id, needed, "waiting for free slots");
            notified.await;
        };
        let mut live: HashMap<u64, BTreeSet<TaskId>> = HashMap::new();
        let mut tasks = Vec::new();
        let hosts: Vec<u64> = slot_workers
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let to_hosts: Vec<UnboundedSender<ToWorker>> = hosts.iter().map(|h| senders[h].clone()).collect();
        let job = cfg.job_id.clone();
        // Every worker learns a savepoint's target before its trigger leaves (a barrier may
        // still overtake it; tasks wait for the target briefly).
        cfg.savepoints.listen(Box::new(move |id, target| {
            for w in &to_hosts {
                let _ = w.send(ToWorker::SavepointTarget {
                    job: job.clone(),
                    id,
                    url: target.storage.url().to_string(),
                    dir: target.dir.clone(),
                });
            }
        }));
        for (c, chain) in chains.iter().enumerate() {
            let is_source = graph.vertices()[chain.vertices[0]].is_source();
            for (subtask, &worker) in slot_workers.iter().enumerate().take(chain.parallelism) {
                let task = TaskId { vertex: c, subtask };
                live.entry(worker).or_default().insert(task);
                let to_worker = senders[&worker].clone();
                let (job, attempt) = key.clone();
                let send = move |command: TaskCommand| {
                    let _ = to_worker.send(ToWorker::Command {
                        job: job.clone(),
                        attempt,
                        task,
                        command,
                    });
                };
                tasks.push(DeployedTask::remote(task, is_source, Arc::new(send)));
            }
        }
        let spec = DeploySpec {
            job: cfg.job_id.clone(),
            job_name: sub.job.name.to_string(),
            params: sub.params.to_map(),
            config: sub.config.clone(),
            attempt: cfg.attempt,
            restore: cfg
                .restore
                .as_ref()
                .map(|r| (r.url().to_string(), r.job_url().map(str::to_string))),
            slot_workers: slot_workers.clone(),
            peers,
        };
        {
            let mut inner = self.lock();
            inner.routes.insert(
                key.clone(),
                AttemptRoute {
                    events: events.clone(),
                    live,
                    records: HashMap::new(),
                    total_records: total_records.clone(),
                },
            );
            // Only the latest attempt of a job can still finish it.
            inner.hosts.retain(|k, _| k.0 != key.0);
            inner.hosts.insert(key.clone(), hosts.clone());
            // A worker lost between taking the slots and now: its tasks fail at once.
            let gone: Vec<u64> = hosts
                .iter()
                .filter(|h| !inner.workers.contains_key(h))
                .copied()
                .collect();
            let route = inner.routes.get_mut(&key).expect("inserted above");
            for h in gone {
                route.fail_live(h, &format!("worker {h} was lost before the deployment"), false);
            }
        }
        for h in &hosts {
            let _ = senders[h].send(ToWorker::Deploy(Box::new(spec.clone())));
        }
        info!(job = %cfg.job_id, attempt = cfg.attempt, ?slot_workers, "attempt deployed");
        let cluster = Arc::downgrade(self);
        let release = move || {
            if let Some(cluster) = cluster.upgrade() {
                cluster.release(&key, &slot_workers);
            }
        };
        Ok(Deployment::remote(tasks, total_records, Box::new(release)))
    }

    /// Takes `needed` slots, spread round-robin over the workers with free ones; with each
    /// worker's sender and every worker's data address.
    #[allow(clippy::type_complexity)]
    fn take_slots(
        &self,
        needed: usize,
    ) -> Option<(
        Vec<u64>,
        HashMap<u64, UnboundedSender<ToWorker>>,
        HashMap<u64, SocketAddr>,
    )> {
        let mut inner = self.lock();
        let free: usize = inner.workers.values().map(|w| w.slots - w.used).sum();
        if free < needed {
            return None;
        }
        let mut slot_workers = Vec::with_capacity(needed);
        while slot_workers.len() < needed {
            for (id, w) in inner.workers.iter_mut() {
                if slot_workers.len() < needed && w.used < w.slots {
                    w.used += 1;
                    slot_workers.push(*id);
                }
            }
        }
        let senders = inner.workers.iter().map(|(id, w)| (*id, w.to_worker.clone())).collect();
        let peers = inner.workers.iter().map(|(id, w)| (*id, w.data_addr)).collect();
        Some((slot_workers, senders, peers))
    }

    /// The attempt ended (every task reported its end): its slots are free again.
    fn release(&self, key: &AttemptKey, slot_workers: &[u64]) {
        {
            let mut inner = self.lock();
            inner.routes.remove(key);
            for w in slot_workers {
                if let Some(entry) = inner.workers.get_mut(w) {
                    entry.used = entry.used.saturating_sub(1);
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// The job has ended (finished, stopped, cancelled or failed): forget its hosts, and tell
    /// every worker to drop what it keeps for the job.
    pub(crate) fn end_job(&self, job: &str) {
        let mut inner = self.lock();
        inner.hosts.retain(|k, _| k.0 != job);
        for w in inner.workers.values() {
            let _ = w.to_worker.send(ToWorker::Forget { job: job.to_string() });
        }
    }

    /// Runs the finish hooks of the attempt that finished the job on every worker that ran it.
    pub(crate) async fn finish(&self, job: &str, attempt: u32) -> Result<()> {
        let key = (job.to_string(), attempt);
        let mut waits = Vec::new();
        {
            let mut inner = self.lock();
            let hosts = inner.hosts.remove(&key).unwrap_or_default();
            // Refused before any worker commits if one of them is gone already: a worker lost
            // later, while committing, still leaves the others' parts committed.
            if let Some(h) = hosts.iter().find(|h| !inner.workers.contains_key(h)) {
                return Err(Error::User(format!(
                    "worker {h} was lost before committing the job's last output"
                )));
            }
            for h in hosts {
                let w = &inner.workers[&h];
                let (tx, rx) = tokio::sync::oneshot::channel();
                let _ = w.to_worker.send(ToWorker::Finish {
                    job: job.to_string(),
                    attempt,
                });
                inner.finishing.insert((job.to_string(), attempt, h), tx);
                waits.push((h, rx));
            }
        }
        for (h, rx) in waits {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Error::User(format!("worker {h}: {e}"))),
                Err(_) => return Err(Error::User(format!("worker {h} went away while finishing the job"))),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_runtime::executor::SavepointTarget;
    use sluice_runtime::storage::Storage;
    use sluice_runtime::{CheckpointId, JobDefinition};

    fn submission() -> JobSubmission {
        let job = JobDefinition {
            name: "nothing",
            description: "",
            params: vec![],
            build: |_, env| {
                // No events: the source finishes at once.
                env.source(
                    "nothing",
                    sluice_operators::generator::LaneGenerator::new(0, 1, 0, |i| i),
                );
                Ok(())
            },
        };
        JobSubmission {
            params: job.params_from_settings(&[]).unwrap(),
            job,
            config: sluice_runtime::config::JobConfig {
                parallelism: 2,
                ..Default::default()
            },
        }
    }

    /// Slots are spread over the workers; savepoint targets reach every worker of the attempt;
    /// a worker that cannot deploy, or is lost, fails exactly the tasks it holds; ending the
    /// attempt frees its slots.
    #[tokio::test]
    async fn deploy_spreads_slots_and_fails_the_tasks_of_a_failed_worker() {
        let cluster = Cluster::new("secret".into());
        let (to_a, mut a_rx) = tokio::sync::mpsc::unbounded_channel();
        let (to_b, mut b_rx) = tokio::sync::mpsc::unbounded_channel();
        let a = cluster.register(to_a, 1, "127.0.0.1:1".parse().unwrap());
        let b = cluster.register(to_b, 1, "127.0.0.1:2".parse().unwrap());
        let sub = submission();
        let graph = crate::master::build_graph(&sub.job, &sub.params, &sub.config).unwrap();
        let storage = Storage::open("memory://cluster-test").unwrap();
        let cfg = DeployConfig::for_job("j".into(), 0, &sub.config, storage.clone(), None, Default::default());
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut deployment = cluster.deploy(&sub, &graph, &cfg, events).await.unwrap();
        for worker in [&mut a_rx, &mut b_rx] {
            let Some(ToWorker::Deploy(spec)) = worker.recv().await else {
                panic!("each worker gets the deployment")
            };
            assert_eq!(spec.slot_workers, vec![a, b]);
        }
        assert!(cluster.workers().iter().all(|w| w.used == 1));

        let dir = "savepoint-j-7/".to_string();
        cfg.savepoints.insert(CheckpointId(7), SavepointTarget { storage, dir });
        for worker in [&mut a_rx, &mut b_rx] {
            let announced = worker.recv().await;
            assert!(matches!(
                announced,
                Some(ToWorker::SavepointTarget {
                    id: CheckpointId(7),
                    ..
                })
            ));
        }

        let failed = |event: Option<TaskEvent>| match event {
            Some(TaskEvent::Terminated {
                task,
                outcome: TaskOutcome::Failed { cause, .. },
            }) => (task.subtask, cause),
            other => panic!("expected a failed task, got {other:?}"),
        };
        cluster.on_deploy_failed(b, &("j".into(), 0), "cannot open the snapshot", false);
        assert_eq!(failed(rx.recv().await), (1, "cannot open the snapshot".to_string()));
        cluster.lose(a, "its connection broke");
        let (subtask, cause) = failed(rx.recv().await);
        assert_eq!(subtask, 0);
        assert!(cause.contains("was lost: its connection broke"), "{cause}");
        assert!(rx.try_recv().is_err(), "each task fails once");

        deployment.join();
        assert_eq!(
            cluster.workers().iter().map(|w| (w.id, w.used)).collect::<Vec<_>>(),
            vec![(b, 0)]
        );
    }
}
