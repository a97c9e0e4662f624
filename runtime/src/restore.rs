//! Reading a completed checkpoint or savepoint back: its metadata, whether it fits the job, and
//! the state each new subtask owns. Keyed state is selected by key-group range, operator state is
//! kept per subtask at unchanged parallelism and redistributed (split round-robin or union)
//! otherwise.

use crate::error::{Error, Result};
use crate::graph::JobGraph;
use crate::keygroup::KeyGroupRange;
use crate::operator::RestoredState;
use crate::operator::TaskInfo;
use crate::snapshot::{
    block_at, read_block, CheckpointMetadata, OperatorSnapshotMeta, OperatorState, Redistribution, RestoredKeyGroups,
    RestoredRocks, RocksDbHandle, RocksFile, StateHandle,
};
use crate::storage::{Storage, METADATA_FILE};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// SST files downloaded at once per old instance a subtask restores from.
const DOWNLOAD_CONCURRENCY: usize = 4;

/// The old subtasks whose key-group range overlaps `range`: the only state a new subtask owning
/// `range` reads. Old subtasks without keyed state are never read for keyed state.
pub fn overlapping_subtasks(old: &[Option<KeyGroupRange>], range: KeyGroupRange) -> Vec<usize> {
    old.iter()
        .enumerate()
        .filter(|(_, r)| r.is_some_and(|r| !r.intersect(&range).is_empty()))
        .map(|(i, _)| i)
        .collect()
}

/// SST files already downloaded by a subtask of this process for the latest attempt, by stored
/// location: where the first download put it, once complete.
type Downloads = std::sync::Mutex<(u32, HashMap<String, Arc<tokio::sync::OnceCell<PathBuf>>>)>;

/// What a new subtask takes from one old subtask's keyed state.
#[derive(Default)]
struct OldKeyed {
    blocks: Vec<(crate::keygroup::KeyGroup, Vec<u8>)>,
    rocksdb: Option<RestoredRocks>,
    /// The old subtask's state file, when it was read whole.
    file: Option<Vec<u8>>,
}

/// A completed checkpoint or savepoint opened for restore.
#[derive(Debug, Clone)]
pub struct RestoreSource {
    storage: Storage,
    /// The job directory above the checkpoint, where shared files live.
    job_storage: Option<Storage>,
    metadata: CheckpointMetadata,
    /// Shared by the subtasks restoring from this source in one process: several new subtasks
    /// overlapping one old RocksDB instance (a rescale to a higher parallelism) download each
    /// of its SST files once and hard-link it.
    downloads: Arc<Downloads>,
}

impl RestoreSource {
    /// Opens the snapshot at `url` (a `chk-<n>` or savepoint directory).
    pub async fn open_url(url: &str) -> Result<Self> {
        let storage = Storage::open(url)?;
        let trimmed = url.trim_end_matches('/');
        let job_storage = match trimmed.rsplit_once('/') {
            Some((parent, _)) if !parent.is_empty() && !parent.ends_with(':') && !parent.ends_with("//") => {
                Storage::open(parent).ok()
            }
            _ => None,
        };
        Self::open(storage, job_storage).await
    }

    /// Opens the snapshot whose directory `storage` is rooted at, reading and verifying its
    /// `_metadata`; `job_storage` is the directory above it, where shared files live.
    pub async fn open(storage: Storage, job_storage: Option<Storage>) -> Result<Self> {
        let bytes = match storage.read(METADATA_FILE).await {
            Ok(b) => b,
            Err(e) if e.is_unusable_snapshot() => {
                return Err(Error::NotASnapshot(format!(
                    "{} is not a completed checkpoint or savepoint: {} does not exist",
                    storage.url(),
                    storage.location(METADATA_FILE)
                )))
            }
            Err(e) => return Err(e),
        };
        let metadata = CheckpointMetadata::decode(&bytes, &storage.location(METADATA_FILE))?;
        Ok(Self {
            storage,
            job_storage,
            metadata,
            downloads: Default::default(),
        })
    }

    /// The snapshot's metadata.
    pub fn metadata(&self) -> &CheckpointMetadata {
        &self.metadata
    }

    /// Where the snapshot lives.
    pub fn url(&self) -> &str {
        self.storage.url()
    }

    /// The directory above the snapshot, where its shared files live.
    pub fn job_url(&self) -> Option<&str> {
        self.job_storage.as_ref().map(Storage::url)
    }

    fn sst_storage(&self, f: &RocksFile) -> Result<&Storage> {
        if !f.shared {
            return Ok(&self.storage);
        }
        self.job_storage.as_ref().ok_or_else(|| Error::Corrupt {
            location: self.storage.url().to_string(),
            reason: format!("shared file '{}' lies outside the snapshot's directory", f.path),
        })
    }

    /// Checks that every referenced file exists with its recorded size (cheap: no content read).
    pub async fn verify_files(&self) -> Result<()> {
        let state_files = self
            .metadata
            .referenced_files()
            .map(|h| (&self.storage, h.path.as_str(), h.size));
        let mut files: Vec<(&Storage, &str, u64)> = state_files.collect();
        for f in self.metadata.sst_files() {
            files.push((self.sst_storage(f)?, f.path.as_str(), f.size));
        }
        for (storage, path, expected) in files {
            let reason = match storage.size(path).await? {
                None => Some("file is missing".to_string()),
                Some(size) => size_mismatch(size, expected),
            };
            if let Some(reason) = reason {
                return Err(Error::Corrupt {
                    location: storage.location(path),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Refuses a snapshot that does not fit the job.
    pub fn check_fits(
        &self,
        job_name: &str,
        graph: &JobGraph,
        state_backend: crate::config::StateBackendKind,
        allow_non_restored_state: bool,
    ) -> Result<()> {
        let m = &self.metadata;
        let native = m.referenced_files().any(|h| h.rocksdb.is_some());
        if native && state_backend == crate::config::StateBackendKind::Memory {
            return Err(Error::Incompatible(format!(
                "{} holds RocksDB native state, which only the rocksdb state backend reads \
                 (restore it with --state-backend rocksdb, or restore a canonical savepoint)",
                self.url()
            )));
        }
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
        if let Some(reason) = size_mismatch(bytes.len() as u64, h.size) {
            return Err(Error::Corrupt {
                location: self.storage.location(&h.path),
                reason,
            });
        }
        Ok(bytes)
    }

    /// Puts one SST into `dir`, linked to the verified file another subtask of this attempt
    /// already used, else fetched. A downloaded copy may have moved since (its instance opened
    /// under another name): then it is fetched again.
    async fn download_sst(&self, f: &RocksFile, dir: &Path, attempt: u32) -> Result<()> {
        let target = dir.join(&f.name);
        let location = self.sst_storage(f)?.location(&f.path);
        let cell = {
            let mut downloads = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
            if downloads.0 != attempt {
                *downloads = (attempt, HashMap::new());
            }
            downloads.1.entry(location).or_default().clone()
        };
        let verified = cell.get_or_try_init(|| self.fetch_sst(f, &target)).await?;
        if *verified == target || link_or_copy(verified, &target).await.is_ok() {
            return Ok(());
        }
        let again = self.fetch_sst(f, &target).await?;
        if again != target {
            link_or_copy(&again, &target).await?;
        }
        Ok(())
    }

    /// Verifies one SST's size and CRC32; the verified file. From local storage that is the
    /// checkpoint's own file, verified where it is and linked (or copied) from there: an SST
    /// never changes once written, and RocksDB removes a file by unlinking its own name only.
    /// From other stores it is downloaded to `target`.
    async fn fetch_sst(&self, f: &RocksFile, target: &Path) -> Result<PathBuf> {
        let storage = self.sst_storage(f)?;
        let verify = |len: u64, crc: u32| {
            let reason = size_mismatch(len, f.size).or_else(|| (crc != f.crc32).then(|| "checksum mismatch".into()));
            match reason {
                Some(reason) => Err(Error::Corrupt {
                    location: storage.location(&f.path),
                    reason,
                }),
                None => Ok(()),
            }
        };
        if let Some((file, len, crc)) = storage.local_checksum(&f.path).await? {
            verify(len, crc)?;
            return Ok(file);
        }
        let data = storage.read(&f.path).await?;
        verify(data.len() as u64, crc32fast::hash(&data))?;
        tokio::fs::write(target, data)
            .await
            .map_err(|e| cannot_write(target, e))?;
        Ok(target.to_path_buf())
    }

    /// Downloads one RocksDB native checkpoint into `dir`, verifying every SST's size and CRC32.
    async fn download_rocksdb(
        &self,
        h: &RocksDbHandle,
        file: &[u8],
        state_file: &str,
        dir: &Path,
        info: &TaskInfo,
    ) -> Result<()> {
        let io = |e: std::io::Error| Error::User(format!("cannot write restored state under {}: {e}", dir.display()));
        if dir.exists() {
            tokio::fs::remove_dir_all(dir).await.map_err(io)?;
        }
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
        let safe = |name: &str| !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != "..";
        if let Some(f) = h.sst_files.iter().find(|f| !safe(&f.name)) {
            return Err(Error::Corrupt {
                location: state_file.to_string(),
                reason: format!("invalid RocksDB file name '{}'", f.name),
            });
        }
        // New subtasks sharing this instance start at different files, so that they fetch and
        // verify in parallel, then link each other's.
        let n = h.sst_files.len();
        let first = (info.subtask * n) / info.parallelism.max(1);
        let files = h.sst_files.iter().cycle().skip(first).take(n);
        // Several at a time: on remote stores each download is mostly waiting.
        futures::stream::iter(files.map(|f| self.download_sst(f, dir, info.attempt)))
            .buffer_unordered(DOWNLOAD_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        let block = read_block(file, h.small_files_block, state_file)?;
        let small: Vec<(String, Vec<u8>)> = postcard::from_bytes(block).map_err(|e| Error::Corrupt {
            location: state_file.to_string(),
            reason: format!("RocksDB file list does not decode: {e}"),
        })?;
        for (name, data) in small {
            if !safe(&name) {
                return Err(Error::Corrupt {
                    location: state_file.to_string(),
                    reason: format!("invalid RocksDB file name '{name}'"),
                });
            }
            tokio::fs::write(dir.join(name), data).await.map_err(io)?;
        }
        Ok(())
    }

    /// What new subtask `info` takes from old subtask `old`'s keyed state: the key-group blocks
    /// in its range (the state file, or only their byte range), or the downloaded RocksDB
    /// instance; and the state file when read whole (its operator state is then at hand).
    async fn load_keyed(&self, op: &OperatorSnapshotMeta, old: usize, info: &TaskInfo) -> Result<(usize, OldKeyed)> {
        let range = info.key_group_range();
        let h = op.subtasks[old].as_ref().expect("only subtasks with state overlap");
        let location = self.storage.location(&h.path);
        let mut part = OldKeyed::default();
        if let Some(index) = &h.key_groups {
            let wanted = index.range.intersect(&range);
            let offset_of = |kg: crate::keygroup::KeyGroup| {
                index
                    .offsets
                    .get(index.range.index_of(kg))
                    .copied()
                    .ok_or_else(|| Error::Corrupt {
                        location: location.clone(),
                        reason: format!("no offset recorded for key group {}", kg.0),
                    })
            };
            if wanted == index.range {
                let file = self.read_file(h).await?;
                for kg in wanted.iter() {
                    part.blocks
                        .push((kg, read_block(&file, offset_of(kg)?, &location)?.to_vec()));
                }
                part.file = Some(file);
            } else {
                // Only the byte range of the key groups this subtask owns (sizes were
                // verified before the restore, every block carries its CRC32).
                let start = offset_of(crate::keygroup::KeyGroup(wanted.start))?;
                let last = index.range.index_of(crate::keygroup::KeyGroup(wanted.end));
                let end = index
                    .offsets
                    .get(last + 1)
                    .copied()
                    .or(h.operator_state)
                    .unwrap_or(h.size);
                let bytes = self
                    .storage
                    .read_range(&h.path, start, end.saturating_sub(start))
                    .await?;
                for kg in wanted.iter() {
                    part.blocks
                        .push((kg, block_at(&bytes, start, offset_of(kg)?, &location)?.to_vec()));
                }
            }
        }
        if let Some(r) = &h.rocksdb {
            let file = self.read_file(h).await?;
            let dir = info.local_dir.join(format!("restore-{old}"));
            let started = std::time::Instant::now();
            self.download_rocksdb(r, &file, &location, &dir, info).await?;
            tracing::debug!(old, files = r.sst_files.len(), download = ?started.elapsed(), "rocksdb instance downloaded");
            part.rocksdb = Some(RestoredRocks {
                range: r.range,
                dir,
                files: r.sst_files.clone(),
                own_job: self.metadata.job_id == info.job_id,
                linked: (r.sst_files.iter())
                    .all(|f| self.sst_storage(f).is_ok_and(|s| s.local_path(&f.path).is_some())),
            });
            part.file = Some(file);
        }
        Ok((old, part))
    }

    /// The state of the operator subtask `info` describes; RocksDB native state is downloaded
    /// below `info.local_dir`.
    pub async fn load(&self, info: &TaskInfo) -> Result<Option<RestoredState>> {
        let (uid, subtask, parallelism, range) = (&info.uid, info.subtask, info.parallelism, info.key_group_range());
        let Some(op) = self.metadata.operator(uid) else {
            return Ok(None);
        };
        let mut files: HashMap<usize, Vec<u8>> = HashMap::new();
        let mut keyed = RestoredKeyGroups::default();
        let keyed_ranges: Vec<Option<KeyGroupRange>> = op
            .subtasks
            .iter()
            .map(|h| {
                let h = h.as_ref()?;
                h.key_groups
                    .as_ref()
                    .map(|i| i.range)
                    .or(h.rocksdb.as_ref().map(|r| r.range))
            })
            .collect();
        // The old subtasks' keyed state at once: each is mostly waiting on storage.
        let parts = futures::future::try_join_all(
            overlapping_subtasks(&keyed_ranges, range)
                .into_iter()
                .map(|old| self.load_keyed(op, old, info)),
        )
        .await?;
        for (old, part) in parts {
            keyed.blocks.extend(part.blocks);
            keyed.rocksdb.extend(part.rocksdb);
            if let Some(file) = part.file {
                files.insert(old, file);
            }
        }
        let mut operator = OperatorState::new();
        let same = op.parallelism == parallelism;
        let mut position = HashMap::<String, usize>::new();
        for (old, h) in op.subtasks.iter().enumerate() {
            let Some(h) = h else { continue };
            let Some(offset) = h.operator_state else {
                continue;
            };
            let location = self.storage.location(&h.path);
            // The trailing operator-state block only, unless the whole file is here already.
            let part;
            let block = match files.get(&old) {
                Some(file) => read_block(file, offset, &location)?,
                None => {
                    part = self
                        .storage
                        .read_range(&h.path, offset, h.size.saturating_sub(offset))
                        .await?;
                    block_at(&part, offset, offset, &location)?
                }
            };
            let state: OperatorState = postcard::from_bytes(block).map_err(|e| Error::Corrupt {
                location: location.clone(),
                reason: format!("operator state does not decode: {e}"),
            })?;
            for (name, list) in state {
                let target = operator
                    .entry(name.clone())
                    .or_insert_with(|| crate::snapshot::OperatorListState {
                        mode: list.mode,
                        entries: Vec::new(),
                    });
                match (same, list.mode) {
                    // Union state goes whole to every subtask, whatever the parallelism.
                    (_, Redistribution::Union) => target.entries.extend(list.entries),
                    (true, Redistribution::Split) if old == subtask => target.entries.extend(list.entries),
                    (true, Redistribution::Split) => {}
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

/// Hard-links `from` to `to`, or copies it where a link cannot cross file systems.
async fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if tokio::fs::hard_link(from, to).await.is_ok() {
        return Ok(());
    }
    tokio::fs::copy(from, to)
        .await
        .map(drop)
        .map_err(|e| cannot_write(to, e))
}

fn cannot_write(path: &Path, e: std::io::Error) -> Error {
    Error::User(format!("cannot write restored state {}: {e}", path.display()))
}

/// Why a file of `len` bytes is not the one a checkpoint recorded with `recorded` bytes.
fn size_mismatch(len: u64, recorded: u64) -> Option<String> {
    (len != recorded).then(|| format!("file has {len} bytes, the checkpoint recorded {recorded}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygroup::{range_for_subtask, subtask_for_key_group, KeyGroup};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn each_new_subtask_reads_exactly_the_old_state_overlapping_its_range(
            m in 1u16..=1024, p_seed in 1usize..=1024, q_seed in 1usize..=1024,
        ) {
            let (p, q) = (1 + p_seed % m as usize, 1 + q_seed % m as usize);
            let old: Vec<Option<KeyGroupRange>> = (0..p).map(|i| Some(range_for_subtask(m, p, i))).collect();
            let mut owner = vec![usize::MAX; m as usize];
            for j in 0..q {
                let range = range_for_subtask(m, q, j);
                for kg in range.iter() {
                    prop_assert_eq!(owner[kg.0 as usize], usize::MAX, "key group owned twice");
                    owner[kg.0 as usize] = j;
                }
                let read = overlapping_subtasks(&old, range);
                // Every key group of the new range is found in what is read...
                for kg in range.iter() {
                    prop_assert!(read.contains(&subtask_for_key_group(m, p, kg)));
                }
                // ...and nothing is read that does not overlap it.
                for i in &read {
                    prop_assert!(!old[*i].unwrap().intersect(&range).is_empty());
                }
                prop_assert!(read.len() <= p);
            }
            prop_assert!(owner.iter().all(|o| *o != usize::MAX), "every key group has an owner");
            let _ = KeyGroup(0);
        }
    }
}
