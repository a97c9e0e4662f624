//! Reading a completed checkpoint or savepoint back: its metadata, whether it fits the job, and
//! the state each new subtask owns. Keyed state is selected by key-group range, operator state is
//! kept per subtask at unchanged parallelism and redistributed (split round-robin or union)
//! otherwise.

use crate::error::{Error, Result};
use crate::graph::JobGraph;
use crate::keygroup::KeyGroupRange;
use crate::operator::RestoredState;
use crate::snapshot::{
    read_block, CheckpointMetadata, OperatorState, Redistribution, RestoredKeyGroups, StateHandle,
};
use crate::storage::{Storage, METADATA_FILE};
use std::collections::HashMap;

/// A completed checkpoint or savepoint opened for restore.
#[derive(Debug, Clone)]
pub struct RestoreSource {
    storage: Storage,
    metadata: CheckpointMetadata,
}

impl RestoreSource {
    /// Opens the snapshot whose directory `storage` is rooted at, reading and verifying its
    /// `_metadata`.
    pub async fn open(storage: Storage) -> Result<Self> {
        let bytes = match storage.read(METADATA_FILE).await {
            Ok(b) => b,
            Err(e) if e.is_unusable_snapshot() => {
                return Err(Error::Config(format!(
                    "{} is not a completed checkpoint or savepoint: {} does not exist",
                    storage.url(),
                    storage.location(METADATA_FILE)
                )))
            }
            Err(e) => return Err(e),
        };
        let metadata = CheckpointMetadata::decode(&bytes, &storage.location(METADATA_FILE))?;
        Ok(Self { storage, metadata })
    }

    /// The snapshot's metadata.
    pub fn metadata(&self) -> &CheckpointMetadata {
        &self.metadata
    }

    /// Where the snapshot lives.
    pub fn url(&self) -> &str {
        self.storage.url()
    }

    /// Checks that every referenced file exists with its recorded size (cheap: no content read).
    pub async fn verify_files(&self) -> Result<()> {
        for h in self.metadata.referenced_files() {
            match self.storage.size(&h.path).await? {
                None => {
                    return Err(Error::Corrupt {
                        location: self.storage.location(&h.path),
                        reason: "file is missing".into(),
                    })
                }
                Some(size) if size != h.size => {
                    return Err(Error::Corrupt {
                        location: self.storage.location(&h.path),
                        reason: format!(
                            "file has {size} bytes, the checkpoint recorded {}",
                            h.size
                        ),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Refuses a snapshot that does not fit the job.
    pub fn check_fits(
        &self,
        job_name: &str,
        graph: &JobGraph,
        allow_non_restored_state: bool,
    ) -> Result<()> {
        let m = &self.metadata;
        if m.job_name != job_name {
            return Err(Error::Incompatible(format!(
                "{} is a snapshot of job '{}', not of '{job_name}'",
                self.url(),
                m.job_name
            )));
        }
        if m.max_parallelism != graph.max_parallelism() {
            return Err(Error::Incompatible(format!(
                "{} was taken with max parallelism {}, the job asks for {}; max parallelism cannot change",
                self.url(),
                m.max_parallelism,
                graph.max_parallelism()
            )));
        }
        if !allow_non_restored_state {
            for op in &m.operators {
                let has_state = op.subtasks.iter().any(Option::is_some);
                if has_state && !graph.vertices().iter().any(|v| v.uid == op.uid) {
                    return Err(Error::Incompatible(format!(
                        "{} has state for operator uid '{}', which the job does not have \
                         (pass --allow-non-restored-state to drop it)",
                        self.url(),
                        op.uid
                    )));
                }
            }
        }
        Ok(())
    }

    async fn read_file(&self, h: &StateHandle) -> Result<Vec<u8>> {
        let bytes = self.storage.read(&h.path).await?;
        if bytes.len() as u64 != h.size {
            return Err(Error::Corrupt {
                location: self.storage.location(&h.path),
                reason: format!(
                    "file has {} bytes, the checkpoint recorded {}",
                    bytes.len(),
                    h.size
                ),
            });
        }
        Ok(bytes)
    }

    /// The state of operator `uid` for subtask `subtask` of `parallelism`, owning `range`.
    pub async fn load(
        &self,
        uid: &str,
        subtask: usize,
        parallelism: usize,
        range: KeyGroupRange,
    ) -> Result<Option<RestoredState>> {
        let Some(op) = self.metadata.operator(uid) else {
            return Ok(None);
        };
        let mut files: HashMap<usize, Vec<u8>> = HashMap::new();
        let mut keyed = RestoredKeyGroups::default();
        for (old, h) in op.subtasks.iter().enumerate() {
            let Some(h) = h else { continue };
            let Some(index) = &h.key_groups else { continue };
            let wanted = index.range.intersect(&range);
            if wanted.is_empty() {
                continue;
            }
            let file = self.read_file(h).await?;
            let location = self.storage.location(&h.path);
            for kg in wanted.iter() {
                let offset =
                    *index
                        .offsets
                        .get(index.range.index_of(kg))
                        .ok_or_else(|| Error::Corrupt {
                            location: location.clone(),
                            reason: format!("no offset recorded for key group {}", kg.0),
                        })?;
                keyed
                    .blocks
                    .push((kg, read_block(&file, offset, &location)?.to_vec()));
            }
            files.insert(old, file);
        }
        let mut operator = OperatorState::new();
        let same = op.parallelism == parallelism;
        let mut position = HashMap::<String, usize>::new();
        for (old, h) in op.subtasks.iter().enumerate() {
            let Some(h) = h else { continue };
            let Some(offset) = h.operator_state else {
                continue;
            };
            if same && old != subtask {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = files.entry(old) {
                e.insert(self.read_file(h).await?);
            }
            let location = self.storage.location(&h.path);
            let block = read_block(&files[&old], offset, &location)?;
            let state: OperatorState = postcard::from_bytes(block).map_err(|e| Error::Corrupt {
                location: location.clone(),
                reason: format!("operator state does not decode: {e}"),
            })?;
            for (name, list) in state {
                let target = operator.entry(name.clone()).or_insert_with(|| {
                    crate::snapshot::OperatorListState {
                        mode: list.mode,
                        entries: Vec::new(),
                    }
                });
                match (same, list.mode) {
                    (true, _) | (false, Redistribution::Union) => {
                        target.entries.extend(list.entries)
                    }
                    (false, Redistribution::Split) => {
                        let pos = position.entry(name).or_default();
                        for e in list.entries {
                            if *pos % parallelism == subtask {
                                target.entries.push(e);
                            }
                            *pos += 1;
                        }
                    }
                }
            }
        }
        Ok(Some(RestoredState { keyed, operator }))
    }
}
