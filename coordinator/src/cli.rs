//! The `sluice` command line. A binary passes its job registry to [`main`]; the shipped binary
//! registers the jobs in `examples/`.

use crate::master::{run_job, JobOutcome, JobReport, JobState, JobSubmission, RestoredFrom};
use clap::{Args, Parser, Subcommand};
use sluice_runtime::config::{JobConfig, StateBackendKind};
use sluice_runtime::storage::{set_s3_options, S3Options};
use sluice_runtime::JobRegistry;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Exactly-once stream processing",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job in this process (the embedded default)
    Run {
        /// The job's name (see `sluice jobs`)
        job: String,
        #[command(flatten)]
        start: StartFlags,
        #[command(flatten)]
        flags: Box<JobFlags>,
        #[command(flatten)]
        local: LocalFlags,
    },
    /// List the built-in jobs and their parameters
    Jobs,
    /// Start a coordinator: the REST API and the workers' control port
    Coordinator {
        /// Address of the REST API (port 0: any free port; printed once listening)
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: String,
        /// Shared secret workers and mutating calls must present
        #[arg(long, env = "SLUICE_SECRET", hide_env_values = true)]
        secret: Option<String>,
        #[command(flatten)]
        s3: S3Flags,
    },
    /// Start a worker that runs subtasks for a coordinator
    Worker {
        /// The coordinator's REST address
        #[arg(long, env = "SLUICE_COORDINATOR")]
        coordinator: String,
        /// Slots offered: each runs one subtask of every task of a job
        #[arg(long, default_value_t = 1)]
        slots: usize,
        /// Local working directory (RocksDB instances); default: under the system temp dir
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
        /// The cluster's shared secret
        #[arg(long, env = "SLUICE_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Address the data port listens on (port 0: any free port)
        #[arg(long, default_value = "127.0.0.1:0")]
        data_bind: String,
        #[command(flatten)]
        s3: S3Flags,
    },
    /// Submit a job to a coordinator; prints its id
    Submit {
        /// The job's name (see `sluice jobs`)
        job: String,
        #[command(flatten)]
        start: StartFlags,
        #[command(flatten)]
        flags: Box<JobFlags>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List a cluster's jobs
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a job's status
    Status {
        /// The job's id
        job_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List a job's completed and retained checkpoints
    Checkpoints {
        /// The job's id
        job_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Take a savepoint of a running job; prints its URL once complete
    Savepoint {
        /// The job's id
        job_id: String,
        /// Where the savepoint goes (default: `savepoints` under the job's checkpoint dir)
        #[arg(long)]
        target: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop a job after a final savepoint; prints the savepoint's URL
    Stop {
        /// The job's id
        job_id: String,
        /// Where the savepoint goes (default: `savepoints` under the job's checkpoint dir)
        #[arg(long)]
        savepoint: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job
    Cancel {
        /// The job's id
        job_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resubmit the job of a savepoint or retained checkpoint, e.g. at a new parallelism
    Restore {
        /// The savepoint or `chk-<n>` directory
        url: String,
        #[command(flatten)]
        flags: Box<JobFlags>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// How a command reaches a cluster.
#[derive(Args)]
struct ClientArgs {
    /// The coordinator's REST address
    #[arg(long, env = "SLUICE_COORDINATOR", default_value = "127.0.0.1:8081")]
    coordinator: String,
    /// The cluster's shared secret (needed by submit, savepoint, stop, cancel, restore)
    #[arg(long, env = "SLUICE_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// text, or json (one JSON object on stdout)
    #[arg(long, default_value = "text")]
    output: String,
}

/// Flags every job takes, run here or on a cluster.
#[derive(Args)]
struct JobFlags {
    /// Default parallelism of every operator
    #[arg(long, default_value_t = 1)]
    parallelism: usize,
    /// Number of key groups, the upper bound of any future parallelism (default 128, or the
    /// snapshot's when restoring)
    #[arg(long)]
    max_parallelism: Option<u16>,
    /// Keyed state backend: memory or rocksdb
    #[arg(long, default_value = "memory")]
    state_backend: String,
    /// RocksDB: upload every SST file at every checkpoint instead of only new ones
    #[arg(long)]
    full_checkpoints: bool,
    /// RocksDB restore at a new parallelism: bring in other old instances by `ingest`ing their
    /// own SST files, or by `iterate`-and-write of their keys
    #[arg(long, default_value = "ingest")]
    rocksdb_rescale: String,
    /// RocksDB: memory of each operator subtask's cache of recently used entries, read before
    /// RocksDB (e.g. 512MiB, 2GiB; 0 turns it off)
    #[arg(long, default_value = "512MiB")]
    rocksdb_entry_cache: String,
    /// Where checkpoints go: a path, file:///abs/path, s3://bucket/prefix or memory://name
    #[arg(long, default_value = "./checkpoints")]
    checkpoint_dir: String,
    /// Checkpoint period (e.g. 1s, 200ms), or "off"
    #[arg(long, default_value = "1s")]
    checkpoint_interval: String,
    /// Drop snapshot state of operators the job no longer has
    #[arg(long)]
    allow_non_restored_state: bool,
    /// Job parameter key=value (repeatable; see `sluice jobs`)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Completed checkpoints to keep
    #[arg(long, default_value_t = 3)]
    retained_checkpoints: usize,
    /// Restarts after task failures before the job fails
    #[arg(long, default_value_t = 3)]
    restart_attempts: u32,
    /// Pause before each restart
    #[arg(long, default_value = "100ms")]
    restart_delay: String,
    /// Abort a checkpoint that takes longer than this
    #[arg(long, default_value = "60s")]
    checkpoint_timeout: String,
    /// Least pause between the end of one checkpoint and the start of the next
    #[arg(long, default_value = "0ms")]
    min_pause: String,
    /// Consecutive failed checkpoints tolerated before the job fails over
    #[arg(long, default_value_t = 3)]
    tolerable_failed_checkpoints: u32,
    /// Records per batch between tasks
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    /// Run every operator in its own thread
    #[arg(long)]
    no_chaining: bool,
}

/// Where a new job starts from (`restore` takes its snapshot as its argument instead).
#[derive(Args)]
struct StartFlags {
    /// Start from this savepoint or retained checkpoint (a chk-<n> directory)
    #[arg(long)]
    from_savepoint: Option<String>,
}

/// Flags of the process a job runs in: on a cluster, its coordinator and workers have their own.
#[derive(Args)]
struct LocalFlags {
    /// Local working directory (RocksDB instances); default: a directory under the system temp dir
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    s3: S3Flags,
}

/// Settings of `s3://` storage; each one not given falls back to the standard AWS variable.
#[derive(Args)]
struct S3Flags {
    /// S3 endpoint, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL, else AWS)
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// S3 signing region (default: AWS_REGION, else us-east-1)
    #[arg(long)]
    s3_region: Option<String>,
    /// S3 access key id (default: AWS_ACCESS_KEY_ID)
    #[arg(long)]
    s3_access_key_id: Option<String>,
    /// S3 secret access key (default: AWS_SECRET_ACCESS_KEY; prefer the variable: flags show in ps)
    #[arg(long)]
    s3_secret_access_key: Option<String>,
    /// S3 virtual-hosted-style addressing (bucket.endpoint) instead of path style
    #[arg(long)]
    s3_virtual_host_style: bool,
    /// Attempts per S3 request on transient errors [default: 4]
    #[arg(long)]
    s3_max_attempts: Option<usize>,
    /// Timeout of one S3 request [default: 30s]
    #[arg(long)]
    s3_request_timeout: Option<String>,
}

impl S3Flags {
    fn to_options(&self) -> Result<S3Options, String> {
        if self.s3_max_attempts == Some(0) {
            return Err("--s3-max-attempts must be at least 1".into());
        }
        Ok(S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
            virtual_host_style: self.s3_virtual_host_style,
            max_attempts: self.s3_max_attempts,
            request_timeout: self
                .s3_request_timeout
                .as_deref()
                .map(|t| duration("s3-request-timeout", t))
                .transpose()?,
        })
    }
}

fn duration(flag: &str, value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("invalid duration '{value}' for --{flag}: {e}"))
}

impl JobFlags {
    fn to_config(&self, from_savepoint: Option<String>) -> Result<JobConfig, String> {
        let interval = match self.checkpoint_interval.as_str() {
            "off" | "0" | "none" => None,
            v => Some(duration("checkpoint-interval", v)?).filter(|d| !d.is_zero()),
        };
        let mut state_backend = self
            .state_backend
            .parse::<StateBackendKind>()
            .map_err(|e| e.to_string())?;
        if self.full_checkpoints {
            match &mut state_backend {
                StateBackendKind::RocksDb { incremental } => *incremental = false,
                StateBackendKind::Memory => {
                    return Err(
                        "--full-checkpoints applies to --state-backend rocksdb (memory checkpoints are always full)"
                            .into(),
                    )
                }
            }
        }
        let mut c = JobConfig {
            parallelism: self.parallelism,
            max_parallelism: self
                .max_parallelism
                .unwrap_or(sluice_runtime::keygroup::DEFAULT_MAX_PARALLELISM),
            max_parallelism_from_snapshot: self.max_parallelism.is_none(),
            state_backend,
            checkpoint_dir: self.checkpoint_dir.clone(),
            from_savepoint,
            allow_non_restored_state: self.allow_non_restored_state,
            batch_size: self.batch_size,
            chaining: !self.no_chaining,
            ..JobConfig::default()
        };
        c.checkpoint.interval = interval;
        c.rocksdb.rescale_merge = self
            .rocksdb_rescale
            .parse()
            .map_err(|e: sluice_runtime::Error| e.to_string())?;
        c.rocksdb.entry_cache_bytes = self
            .rocksdb_entry_cache
            .parse::<bytesize::ByteSize>()
            .map_err(|e| {
                format!(
                    "--rocksdb-entry-cache '{}' is not a size like 512MiB or 2GiB ({e})",
                    self.rocksdb_entry_cache
                )
            })?
            .as_u64()
            .try_into()
            .map_err(|_| format!("--rocksdb-entry-cache '{}' is too large", self.rocksdb_entry_cache))?;
        c.checkpoint.retained = self.retained_checkpoints;
        c.checkpoint.timeout = duration("checkpoint-timeout", &self.checkpoint_timeout)?;
        c.checkpoint.min_pause = duration("min-pause", &self.min_pause)?;
        c.checkpoint.tolerable_failures = self.tolerable_failed_checkpoints;
        c.restart.attempts = self.restart_attempts;
        c.restart.delay = duration("restart-delay", &self.restart_delay)?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

/// Parses the command line and runs it; the process exit code is the result.
pub fn main(registry: JobRegistry) -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match dispatch(cli, &registry) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn dispatch(cli: Cli, registry: &JobRegistry) -> Result<ExitCode, String> {
    match cli.command {
        Command::Run {
            job,
            start,
            flags,
            local,
        } => {
            let definition = registry.get(&job).map_err(|e| e.to_string())?.clone();
            let params = definition.params_from_settings(&flags.set).map_err(|e| e.to_string())?;
            let mut config = flags.to_config(start.from_savepoint)?;
            if let Some(dir) = local.data_dir {
                config.data_dir = dir;
            }
            set_s3_options(local.s3.to_options()?);
            let report = run_job(JobSubmission {
                job: definition,
                params,
                config,
            })
            .map_err(|e| e.to_string())?;
            print_report(&report);
            Ok(match report.outcome {
                JobOutcome::Finished | JobOutcome::Stopped => ExitCode::SUCCESS,
                JobOutcome::Failed(_) | JobOutcome::Canceled => ExitCode::FAILURE,
            })
        }
        Command::Jobs => {
            for job in registry.iter() {
                println!("{}\n    {}", job.name, job.description);
                for p in &job.params {
                    let default = if p.default.is_empty() { "none" } else { p.default };
                    println!("    --set {}=...  {} (default: {default})", p.name, p.help);
                }
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Coordinator { listen, secret, s3 } => {
            set_s3_options(s3.to_options()?);
            let secret = require_secret(secret)?;
            crate::cluster::server::run(registry.clone(), &listen, secret).map(|_| ExitCode::SUCCESS)
        }
        Command::Worker {
            coordinator,
            slots,
            data_dir,
            secret,
            data_bind,
            s3,
        } => {
            set_s3_options(s3.to_options()?);
            if slots == 0 {
                return Err("--slots must be at least 1".into());
            }
            let options = crate::cluster::worker::WorkerOptions {
                coordinator,
                secret: require_secret(secret)?,
                slots,
                data_dir: data_dir.unwrap_or_else(|| JobConfig::default().data_dir),
                data_bind,
            };
            crate::cluster::worker::run(registry.clone(), options).map(|_| ExitCode::SUCCESS)
        }
        command => crate::cluster::commands::run(command_request(command, registry)?),
    }
}

fn require_secret(secret: Option<String>) -> Result<String, String> {
    secret
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "a cluster needs a shared secret: pass --secret or set SLUICE_SECRET".to_string())
}

/// A bare path is taken relative to this process's directory: the cluster runs elsewhere.
fn absolute(location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    match std::path::absolute(location) {
        Ok(p) => p.display().to_string(),
        Err(_) => location.to_string(),
    }
}

/// Turns a client command into the request the cluster module sends.
fn command_request(command: Command, registry: &JobRegistry) -> Result<crate::cluster::commands::Request, String> {
    use crate::cluster::commands::{Call, Request};
    use crate::cluster::server::{RestoreRequest, SubmitRequest};
    let job_config = |flags: &JobFlags, from_savepoint: Option<String>| -> Result<JobConfig, String> {
        let mut config = flags.to_config(from_savepoint.as_deref().map(absolute))?;
        config.checkpoint_dir = absolute(&config.checkpoint_dir);
        Ok(config)
    };
    let (client, call) = match command {
        Command::Submit {
            job,
            start,
            flags,
            client,
        } => {
            // Checked here too: a typo is reported without a round trip.
            registry.get(&job).map_err(|e| e.to_string())?;
            let config = job_config(&flags, start.from_savepoint)?;
            let settings = flags.set.clone();
            (client, Call::Submit(SubmitRequest { job, settings, config }))
        }
        Command::Restore { url, flags, client } => {
            let config = job_config(&flags, None)?;
            let url = absolute(&url);
            let settings = flags.set.clone();
            (client, Call::Restore(RestoreRequest { url, settings, config }))
        }
        Command::List { client } => (client, Call::List),
        Command::Status { job_id, client } => (client, Call::Status(job_id)),
        Command::Checkpoints { job_id, client } => (client, Call::Checkpoints(job_id)),
        Command::Savepoint { job_id, target, client } => {
            (client, Call::Savepoint(job_id, target.as_deref().map(absolute)))
        }
        Command::Stop {
            job_id,
            savepoint,
            client,
        } => (client, Call::Stop(job_id, savepoint.as_deref().map(absolute))),
        Command::Cancel { job_id, client } => (client, Call::Cancel(job_id)),
        Command::Run { .. } | Command::Jobs | Command::Coordinator { .. } | Command::Worker { .. } => {
            unreachable!("handled by dispatch")
        }
    };
    let json = match client.output.as_str() {
        "json" => true,
        "text" => false,
        other => return Err(format!("unknown --output '{other}' (expected text or json)")),
    };
    Ok(Request {
        coordinator: client.coordinator,
        secret: client.secret.filter(|s| !s.is_empty()),
        json,
        call,
    })
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Peak resident set size of this process, from /proc (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn print_report(r: &JobReport) {
    let state = JobState::of(&r.outcome);
    let state = match &r.outcome {
        JobOutcome::Stopped => format!("{state} (stopped with a savepoint)"),
        JobOutcome::Failed(cause) => format!("{state}: {cause}"),
        JobOutcome::Finished | JobOutcome::Canceled => state.to_string(),
    };
    let secs = r.elapsed.as_secs_f64();
    println!("job {} ({}) {state} in {secs:.3} s", r.job_id, r.job_name);
    println!(
        "  source records: {} ({:.0} records/s)",
        r.source_records,
        r.source_records as f64 / secs.max(1e-9)
    );
    let mut durations: Vec<f64> = r.checkpoints.iter().map(|c| c.duration.as_secs_f64() * 1e3).collect();
    durations.sort_by(f64::total_cmp);
    let mut sizes: Vec<f64> = r.checkpoints.iter().map(|c| c.bytes as f64).collect();
    sizes.sort_by(f64::total_cmp);
    let mut state: Vec<f64> = r.checkpoints.iter().map(|c| c.state_bytes as f64).collect();
    state.sort_by(f64::total_cmp);
    // Per checkpoint, its longest synchronous part at any task.
    let mut syncs: Vec<f64> = r.checkpoints.iter().map(|c| c.max_sync_micros as f64 / 1e3).collect();
    syncs.sort_by(f64::total_cmp);
    println!(
        "  checkpoints: {} completed, {} failed; duration p50 {:.1} ms, max {:.1} ms; \
         synchronous part p50 {:.2} ms, longest synchronous part {:.2} ms",
        r.checkpoints.len(),
        r.failed_checkpoints,
        percentile(&durations, 0.5),
        durations.last().copied().unwrap_or(0.0),
        percentile(&syncs, 0.5),
        syncs.last().copied().unwrap_or(0.0)
    );
    if !r.checkpoints.is_empty() {
        println!(
            "  uploaded per checkpoint: p50 {:.0} bytes, max {:.0} bytes; state referenced p50 {:.0} bytes",
            percentile(&sizes, 0.5),
            sizes.last().copied().unwrap_or(0.0),
            percentile(&state, 0.5)
        );
    }
    if let Some(first) = r.restore_times.first() {
        // The first attempt restored state only if the job started from a snapshot.
        let what = match r.initial_restore {
            RestoredFrom::Nothing => "start",
            _ => "restore",
        };
        println!("  {what} (deploy to running): {:.1} ms", first.as_secs_f64() * 1e3);
    }
    let retained: Vec<String> = r.retained.iter().map(|id| format!("chk-{id}")).collect();
    println!(
        "  retained: {}",
        if retained.is_empty() {
            "none".into()
        } else {
            retained.join(", ")
        }
    );
    if let RestoredFrom::Savepoint(url) = &r.initial_restore {
        println!("  started from {url}");
    }
    for restart in &r.restarts {
        let from = match &restart.restored_from {
            RestoredFrom::Nothing => "the beginning".to_string(),
            RestoredFrom::Checkpoint(id) => format!("chk-{id}"),
            RestoredFrom::Savepoint(url) => url.clone(),
        };
        println!("  restart {} from {from} after: {}", restart.attempt, restart.cause);
    }
    if let Some(mib) = peak_rss_mib() {
        println!("  peak RSS: {mib:.1} MiB");
    }
}
