//! Job configuration: parallelism, checkpointing, restarts, and execution tuning.

use crate::error::{Error, Result};
use crate::keygroup::{DEFAULT_MAX_PARALLELISM, UPPER_BOUND_MAX_PARALLELISM};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Checkpointing settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// Trigger period; `None` disables periodic checkpoints.
    pub interval: Option<Duration>,
    /// Least time between the end of one checkpoint and the start of the next.
    pub min_pause: Duration,
    /// A checkpoint not complete after this is aborted.
    pub timeout: Duration,
    /// Consecutive failed checkpoints tolerated before the job fails over.
    pub tolerable_failures: u32,
    /// Completed checkpoints kept; older ones are deleted.
    pub retained: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            interval: Some(Duration::from_secs(1)),
            min_pause: Duration::ZERO,
            timeout: Duration::from_secs(60),
            tolerable_failures: 3,
            retained: 3,
        }
    }
}

/// Fixed-delay restart strategy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestartStrategy {
    /// Restarts allowed before the job fails.
    pub attempts: u32,
    /// Pause before each restart.
    pub delay: Duration,
}

impl Default for RestartStrategy {
    fn default() -> Self {
        Self {
            attempts: 3,
            delay: Duration::from_millis(100),
        }
    }
}

/// Which keyed state backend a job uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateBackendKind {
    /// Hash maps on the heap.
    Memory,
    /// RocksDB on local disk.
    RocksDb {
        /// Upload only new SST files per checkpoint (else every file, every time).
        incremental: bool,
    },
}

impl std::str::FromStr for StateBackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "memory" => Ok(Self::Memory),
            "rocksdb" => Ok(Self::RocksDb { incremental: true }),
            other => Err(Error::Config(format!(
                "unknown state backend '{other}' (expected memory or rocksdb)"
            ))),
        }
    }
}

/// How a RocksDB restore brings in the key groups of a second old instance (after a rescale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RescaleMerge {
    /// Ingest the old instance's own SST files as they are (RocksDB's ingestion of
    /// DB-generated files; no key is read or rewritten), then delete what lies outside the new
    /// range. A column family whose files overlap data already restored (an earlier rescale's
    /// range deletes, not compacted yet) is copied key by key instead.
    #[default]
    Ingest,
    /// Iterate the old instance's keys in range and write them in batches.
    Iterate,
}

impl std::str::FromStr for RescaleMerge {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "iterate" => Ok(Self::Iterate),
            "ingest" => Ok(Self::Ingest),
            other => Err(Error::Config(format!(
                "unknown rescale merge '{other}' (expected iterate or ingest)"
            ))),
        }
    }
}

/// Settings of the RocksDB state backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RocksDbSettings {
    /// How a restore merges old instances after a rescale.
    pub rescale_merge: RescaleMerge,
    /// Bound of each operator subtask's entry cache (the latest values of recently used keys,
    /// read before RocksDB), in bytes; 0 turns it off.
    pub entry_cache_bytes: usize,
}

impl Default for RocksDbSettings {
    fn default() -> Self {
        Self {
            rescale_merge: RescaleMerge::default(),
            entry_cache_bytes: 512 << 20,
        }
    }
}

/// Everything a job run needs besides the job itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobConfig {
    /// Default parallelism of every operator.
    pub parallelism: usize,
    /// Number of key groups; fixed for the life of the job's state.
    pub max_parallelism: u16,
    /// When restoring, take the max parallelism stored in the snapshot instead (it cannot change).
    pub max_parallelism_from_snapshot: bool,
    /// Keyed state backend.
    pub state_backend: StateBackendKind,
    /// Base URL of checkpoints.
    pub checkpoint_dir: String,
    /// Checkpointing.
    pub checkpoint: CheckpointConfig,
    /// Restarts.
    pub restart: RestartStrategy,
    /// Snapshot to start from.
    pub from_savepoint: Option<String>,
    /// Skip state of operators the job no longer has.
    pub allow_non_restored_state: bool,
    /// Batches each channel holds before its sender waits.
    pub channel_capacity: usize,
    /// Records per batch.
    pub batch_size: usize,
    /// Fuse forward-connected operators of equal parallelism into one thread.
    pub chaining: bool,
    /// Local working directory (RocksDB instances).
    pub data_dir: std::path::PathBuf,
    /// Settings of the RocksDB state backend.
    pub rocksdb: RocksDbSettings,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            parallelism: 1,
            max_parallelism: DEFAULT_MAX_PARALLELISM,
            max_parallelism_from_snapshot: false,
            state_backend: StateBackendKind::Memory,
            checkpoint_dir: "./checkpoints".into(),
            checkpoint: CheckpointConfig::default(),
            restart: RestartStrategy::default(),
            from_savepoint: None,
            allow_non_restored_state: false,
            channel_capacity: 8,
            batch_size: 1024,
            chaining: true,
            data_dir: std::env::temp_dir().join("sluice-data"),
            rocksdb: RocksDbSettings::default(),
        }
    }
}

impl JobConfig {
    /// Refuses settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        if self.max_parallelism == 0 || self.max_parallelism > UPPER_BOUND_MAX_PARALLELISM {
            return Err(Error::Config(format!(
                "max parallelism {} is out of range (1 to {UPPER_BOUND_MAX_PARALLELISM})",
                self.max_parallelism
            )));
        }
        if self.parallelism == 0 {
            return Err(Error::Config("parallelism must be at least 1".into()));
        }
        if self.parallelism > self.max_parallelism as usize {
            return Err(Error::Config(format!(
                "parallelism {} is above the max parallelism {}",
                self.parallelism, self.max_parallelism
            )));
        }
        if self.checkpoint.retained == 0 {
            return Err(Error::Config(
                "at least one completed checkpoint must be retained".into(),
            ));
        }
        if self.batch_size == 0 || self.channel_capacity == 0 {
            return Err(Error::Config(
                "batch size and channel capacity must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
