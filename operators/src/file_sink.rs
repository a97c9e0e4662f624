//! An exactly-once file sink by two-phase commit, like Flink's `FileSink`.
//!
//! Each subtask writes its records, one line each, to a hidden in-progress part file in the
//! output directory. At a barrier it closes the file (flushed and synced): the file is
//! *pre-committed*, and its name goes into the checkpoint as operator state. When the checkpoint
//! completes, the file is committed: renamed to its visible name `part-<subtask>-<job>-c<n>`, an
//! atomic rename. After a failure, the restored subtasks commit the files pre-committed in the
//! checkpoint they restore (their checkpoint did complete) and delete every other in-progress
//! file, whose records the replay writes again. At the end of the input the last file is
//! committed only once the whole job has finished ([`FinishHooks`]): until then a failure
//! elsewhere still rolls the job back to its last checkpoint.
//!
//! So a visible file never holds a record that a later failure would replay, and a cleanly
//! finished job leaves no in-progress file. One job writes to an output directory at a time.

use serde::{Deserialize, Serialize};
use sluice_runtime::snapshot::{list_state, read_list, OperatorState, Redistribution};
use sluice_runtime::{CheckpointId, Error, FinishHooks, Result, SinkFunction, TaskInfo};
use std::fmt::Display;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

const STATE: &str = "pre-committed";
const IN_PROGRESS: &str = ".inprogress";

/// A pre-committed part file: its directory (a job restored elsewhere still commits it where
/// it was written), its in-progress name and the name it is committed under.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Pending {
    checkpoint: u64,
    dir: String,
    in_progress: String,
    committed: String,
}

/// See the module documentation.
pub struct ExactlyOnceFileSink<T> {
    dir: PathBuf,
    /// `<job id prefix>-a<attempt>`: in-progress names of this attempt.
    attempt_tag: String,
    subtask: usize,
    job: String,
    seq: u64,
    current: Option<(String, std::io::BufWriter<std::fs::File>)>,
    pending: Vec<Pending>,
    hooks: FinishHooks,
    _t: PhantomData<fn(T)>,
}

impl<T> Clone for ExactlyOnceFileSink<T> {
    fn clone(&self) -> Self {
        Self::new(self.dir.clone())
    }
}

impl<T> ExactlyOnceFileSink<T> {
    /// Writes committed part files into `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            attempt_tag: String::new(),
            subtask: 0,
            job: String::new(),
            seq: 0,
            current: None,
            pending: Vec::new(),
            hooks: FinishHooks::default(),
            _t: PhantomData,
        }
    }

    fn io(&self, what: &str, path: &Path, e: std::io::Error) -> Error {
        Error::User(format!("file sink: cannot {what} {}: {e}", path.display()))
    }

    /// Closes the open part file, flushed and synced; its name, if there was one.
    fn close_current(&mut self) -> Result<Option<String>> {
        let Some((name, mut w)) = self.current.take() else {
            return Ok(None);
        };
        let path = self.dir.join(&name);
        w.flush().map_err(|e| self.io("write", &path, e))?;
        w.get_ref().sync_all().map_err(|e| self.io("sync", &path, e))?;
        Ok(Some(name))
    }
}

/// Renames a pre-committed file to its committed name; done already if only the target exists.
fn commit(p: &Pending) -> Result<()> {
    let dir = Path::new(&p.dir);
    let (from, to) = (dir.join(&p.in_progress), dir.join(&p.committed));
    match std::fs::rename(&from, &to) {
        Ok(()) => Ok(()),
        Err(_) if to.exists() => Ok(()),
        Err(e) => Err(Error::User(format!(
            "file sink: cannot commit {} as {}: {e} (a pre-committed file of a completed checkpoint is missing)",
            from.display(),
            to.display()
        ))),
    }
}

impl<T: Display + sluice_runtime::operator::Data> SinkFunction for ExactlyOnceFileSink<T> {
    type In = T;

    fn open(&mut self, info: &TaskInfo, restored: Option<OperatorState>) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io("create", &self.dir, e))?;
        self.subtask = info.subtask;
        self.job = info.job_id.chars().take(8).collect();
        self.attempt_tag = format!("{}-a{}", self.job, info.attempt);
        self.hooks = info.finish_hooks.clone();
        // Union state: every subtask sees every file the checkpoint pre-committed.
        let mut restored_files: Vec<Pending> = match &restored {
            Some(s) => read_list(s, STATE)?.unwrap_or_default(),
            None => Vec::new(),
        };
        restored_files.sort();
        restored_files.dedup();
        // Each restored file is committed by one subtask.
        for (i, p) in restored_files.iter().enumerate() {
            if i % info.parallelism == info.subtask {
                commit(p)?;
            }
        }
        // Subtask 0 removes what earlier attempts left in progress: records the replay rewrites.
        if info.subtask == 0 {
            let keep: std::collections::BTreeSet<&str> =
                restored_files.iter().map(|p| p.in_progress.as_str()).collect();
            let entries = std::fs::read_dir(&self.dir).map_err(|e| self.io("list", &self.dir, e))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours = name.contains(&format!("-{}-", self.attempt_tag));
                if name.starts_with('.') && name.ends_with(IN_PROGRESS) && !ours && !keep.contains(name.as_str()) {
                    let path = entry.path();
                    std::fs::remove_file(&path).map_err(|e| self.io("remove", &path, e))?;
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, batch: Vec<T>) -> Result<()> {
        if self.current.is_none() {
            self.seq += 1;
            let name = format!(".part-{}-{}-{}{IN_PROGRESS}", self.subtask, self.attempt_tag, self.seq);
            let path = self.dir.join(&name);
            let file = std::fs::File::create(&path).map_err(|e| self.io("create", &path, e))?;
            self.current = Some((name, std::io::BufWriter::with_capacity(1 << 16, file)));
        }
        let Some((name, w)) = self.current.as_mut() else {
            return Ok(());
        };
        for r in batch {
            if let Err(e) = writeln!(w, "{r}") {
                let path = self.dir.join(name.as_str());
                return Err(Error::User(format!("file sink: cannot write {}: {e}", path.display())));
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<OperatorState> {
        if let Some(in_progress) = self.close_current()? {
            self.pending.push(Pending {
                checkpoint: checkpoint.0,
                dir: self.dir.display().to_string(),
                in_progress,
                committed: format!("part-{}-{}-c{}", self.subtask, self.job, checkpoint.0),
            });
        }
        list_state(STATE, Redistribution::Union, &self.pending)
    }

    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) -> Result<()> {
        let (due, later): (Vec<Pending>, Vec<Pending>) =
            self.pending.drain(..).partition(|p| p.checkpoint <= checkpoint.0);
        self.pending = later;
        due.iter().try_for_each(commit)
    }

    fn finish(&mut self) -> Result<()> {
        let mut last = std::mem::take(&mut self.pending);
        if let Some(in_progress) = self.close_current()? {
            last.push(Pending {
                checkpoint: u64::MAX,
                dir: self.dir.display().to_string(),
                in_progress,
                committed: format!("part-{}-{}-end", self.subtask, self.attempt_tag),
            });
        }
        self.hooks.register(move || last.iter().try_for_each(commit));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(subtask: usize, parallelism: usize, attempt: u32, hooks: &FinishHooks) -> TaskInfo {
        TaskInfo {
            job_id: "0123456789abcdef".into(),
            name: "sink".into(),
            uid: "sink".into(),
            subtask,
            parallelism,
            max_parallelism: 128,
            attempt,
            state_backend: sluice_runtime::config::StateBackendKind::Memory,
            local_dir: std::env::temp_dir(),
            rocksdb: Default::default(),
            finish_hooks: hooks.clone(),
        }
    }

    /// Visible (committed) lines, sorted, and whether any in-progress file is left.
    fn visible(dir: &Path) -> (Vec<String>, bool) {
        let mut lines = Vec::new();
        let mut in_progress = false;
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                in_progress = true;
            } else {
                lines.extend(std::fs::read_to_string(e.path()).unwrap().lines().map(String::from));
            }
        }
        lines.sort();
        (lines, in_progress)
    }

    #[test]
    fn files_become_visible_when_their_checkpoint_completes_and_at_the_job_end() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = FinishHooks::default();
        let mut s = ExactlyOnceFileSink::<u32>::new(dir.path());
        s.open(&info(0, 1, 0, &hooks), None).unwrap();
        s.write(vec![1, 2]).unwrap();
        s.snapshot(CheckpointId(1)).unwrap();
        s.write(vec![3]).unwrap();
        assert_eq!(visible(dir.path()).0, Vec::<String>::new(), "pre-committed only");
        s.checkpoint_complete(CheckpointId(1)).unwrap();
        assert_eq!(visible(dir.path()).0, ["1", "2"]);
        s.finish().unwrap();
        assert_eq!(visible(dir.path()).0, ["1", "2"], "not before the whole job finished");
        hooks.run().unwrap();
        assert_eq!(visible(dir.path()), (vec!["1".into(), "2".into(), "3".into()], false));
    }

    #[test]
    fn a_restore_commits_the_checkpoints_files_and_drops_everything_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = FinishHooks::default();
        let mut s = ExactlyOnceFileSink::<u32>::new(dir.path());
        s.open(&info(0, 1, 0, &hooks), None).unwrap();
        s.write(vec![1]).unwrap();
        let state = s.snapshot(CheckpointId(1)).unwrap();
        // Checkpoint 1 completed, but the notification never reached the sink; then records
        // after it, and a finished input whose job failed elsewhere.
        s.write(vec![2]).unwrap();
        s.finish().unwrap();
        drop(hooks);
        assert_eq!(visible(dir.path()).0, Vec::<String>::new());

        // Restored at parallelism 2 from checkpoint 1.
        let hooks = FinishHooks::default();
        for subtask in [1, 0] {
            let mut r = ExactlyOnceFileSink::<u32>::new(dir.path());
            r.open(&info(subtask, 2, 1, &hooks), Some(state.clone())).unwrap();
        }
        assert_eq!(visible(dir.path()), (vec!["1".to_string()], false));
    }
}
