//! Durable storage by URL, through opendal, and the one place that formats checkpoint paths.
//!
//! `file:///abs/path` or a bare path opens the local file system, `memory://name` a process-wide
//! in-memory store (tests). Other schemes arrive with their issues and are refused by name until
//! then.

use crate::checkpoint::CheckpointId;
use crate::error::{Error, Result};
use opendal::{services, EntryMode, ErrorKind, Operator};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// An opened storage location: an opendal operator rooted at the URL.
#[derive(Clone, Debug)]
pub struct Storage {
    url: String,
    op: Operator,
    /// Prepended to every path: lets `at()` and `memory://store/sub` share one operator.
    prefix: String,
}

impl Storage {
    /// Opens the storage a URL names. Does no I/O: use [`Storage::check_writable`] to probe.
    pub fn open(url: &str) -> Result<Self> {
        let url = url.trim();
        if url.is_empty() {
            return Err(Error::Config("empty storage URL".into()));
        }
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r),
            None => ("file".to_string(), url),
        };
        let (op, prefix) = match scheme.as_str() {
            "file" => {
                let path = Path::new(rest);
                let abs = if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    std::env::current_dir()
                        .map_err(|e| Error::Config(format!("cannot resolve '{url}': {e}")))?
                        .join(path)
                };
                // Rooted at `/` with the path as prefix: opendal creates its root directory when
                // built, and opening storage (e.g. to restore) must not touch the disk.
                let op = Operator::new(services::Fs::default().root("/"))
                    .map_err(|e| Error::Config(format!("cannot open storage '{url}': {e}")))?;
                let path = abs.to_string_lossy();
                let path = path.trim_matches('/');
                (
                    op,
                    if path.is_empty() {
                        String::new()
                    } else {
                        format!("{path}/")
                    },
                )
            }
            "memory" => memory_operator(rest),
            other => {
                return Err(Error::Config(format!(
                    "unsupported storage scheme '{other}' in '{url}' (supported: file, memory)"
                )))
            }
        };
        let url = if url.contains("://") {
            url.trim_end_matches('/').to_string()
        } else {
            format!("file://{}", Path::new(rest).display())
        };
        Ok(Self { url, op, prefix })
    }

    /// A storage rooted at `dir` (a directory path inside this one).
    pub fn at(&self, dir: &str) -> Self {
        let dir = dir.trim_matches('/');
        Self {
            url: format!("{}/{}", self.url_for_join(), dir),
            op: self.op.clone(),
            prefix: format!("{}{}/", self.prefix, dir),
        }
    }

    fn full(&self, path: &str) -> String {
        format!("{}{}", self.prefix, path)
    }

    fn url_for_join(&self) -> String {
        self.url.trim_end_matches('/').to_string()
    }

    /// The URL this storage was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full location of `path`, for messages.
    pub fn location(&self, path: &str) -> String {
        format!("{}/{}", self.url_for_join(), path.trim_start_matches('/'))
    }

    fn err(&self, op: &'static str, path: &str, source: opendal::Error) -> Error {
        Error::Storage {
            url: self.url.clone(),
            op,
            path: path.to_string(),
            source: Box::new(source),
        }
    }

    /// Writes a whole object.
    pub async fn write(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        self.op
            .write(&self.full(path), bytes)
            .await
            .map(|_| ())
            .map_err(|e| self.err("write", path, e))
    }

    /// Writes a whole object so that readers see all of it or nothing: through a temporary
    /// name and a rename where the service renames (local disk), directly where a write is
    /// atomic already (object stores).
    pub async fn write_atomic(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        if !self.op.info().capability().rename {
            return self.write(path, bytes).await;
        }
        let tmp = format!("{path}.inprogress");
        self.write(&tmp, bytes).await?;
        self.op
            .rename(&self.full(&tmp), &self.full(path))
            .await
            .map_err(|e| self.err("rename", path, e))
    }

    /// Reads a whole object.
    pub async fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.op
            .read(&self.full(path))
            .await
            .map(|b| b.to_vec())
            .map_err(|e| self.err("read", path, e))
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.op
            .read_with(&self.full(path))
            .range(offset..offset + len)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| self.err("read", path, e))
    }

    /// The size of an object, or `None` if it does not exist.
    pub async fn size(&self, path: &str) -> Result<Option<u64>> {
        match self.op.stat(&self.full(path)).await {
            Ok(m) => Ok(Some(m.content_length())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("stat", path, e)),
        }
    }

    /// Deletes a directory (path ending in `/`) and everything below it.
    pub async fn delete_dir(&self, dir: &str) -> Result<()> {
        match self.op.delete_with(&self.full(dir)).recursive(true).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("delete", dir, e)),
        }
    }

    /// Deletes one object.
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.op.delete(&self.full(path)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("delete", path, e)),
        }
    }

    /// Names of the direct children of `dir` (directories end in `/`).
    pub async fn list_dir(&self, dir: &str) -> Result<Vec<String>> {
        let full = self.full(dir);
        match self.op.list(&full).await {
            Ok(entries) => Ok(entries
                .into_iter()
                .filter(|e| e.path() != full)
                .map(|e| e.name().to_string())
                .collect()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.err("list", dir, e)),
        }
    }

    /// Every file below `dir`, as paths relative to the storage root.
    pub async fn list_files_recursive(&self, dir: &str) -> Result<Vec<String>> {
        match self.op.list_with(&self.full(dir)).recursive(true).await {
            Ok(entries) => Ok(entries
                .into_iter()
                .filter(|e| e.metadata().mode() == EntryMode::FILE)
                .filter_map(|e| e.path().strip_prefix(&self.prefix).map(str::to_string))
                .collect()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.err("list", dir, e)),
        }
    }

    /// Proves that the location takes writes, before any record is processed.
    pub async fn check_writable(&self, dir: &str) -> Result<()> {
        let probe = format!("{}/.sluice-probe", dir.trim_end_matches('/'));
        self.write(&probe, b"probe".to_vec()).await.map_err(|e| {
            Error::Config(format!(
                "checkpoint directory {} is not writable: {}",
                self.url,
                source_message(&e)
            ))
        })?;
        self.delete(&probe).await
    }
}

fn source_message(e: &Error) -> String {
    match e {
        Error::Storage { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// One operator per `memory://name`, shared by every caller in the process, so that a restore
/// reads what a checkpoint wrote. Returns the operator and the prefix below it.
fn memory_operator(name: &str) -> (Operator, String) {
    static STORES: OnceLock<Mutex<HashMap<String, Operator>>> = OnceLock::new();
    let (store, sub) = match name.split_once('/') {
        Some((s, sub)) => (s.to_string(), sub.trim_matches('/').to_string()),
        None => (name.to_string(), String::new()),
    };
    let mut stores = STORES.get_or_init(Default::default).lock().unwrap();
    let op = stores
        .entry(store)
        .or_insert_with(|| {
            Operator::new(services::Memory::default()).expect("the memory service takes no configuration")
        })
        .clone();
    let prefix = if sub.is_empty() { sub } else { format!("{sub}/") };
    (op, prefix)
}

/// Formats every path of a job's checkpoint directory:
///
/// ```text
/// <job-id>/chk-<n>/_metadata
/// <job-id>/chk-<n>/<operator-uid>/<subtask>
/// <job-id>/shared/...
/// ```
#[derive(Debug, Clone)]
pub struct CheckpointPaths {
    job_id: String,
}

/// Name of the file whose presence makes a checkpoint exist.
pub const METADATA_FILE: &str = "_metadata";

impl CheckpointPaths {
    /// Paths for one job.
    pub fn new(job_id: impl Into<String>) -> Self {
        Self { job_id: job_id.into() }
    }

    /// `<job-id>/`
    pub fn job_dir(&self) -> String {
        format!("{}/", self.job_id)
    }

    /// `<job-id>/chk-<n>/`
    pub fn checkpoint_dir(&self, id: CheckpointId) -> String {
        format!("{}/chk-{}/", self.job_id, id.0)
    }

    /// `<job-id>/chk-<n>/_metadata`
    pub fn metadata(&self, id: CheckpointId) -> String {
        format!("{}{METADATA_FILE}", self.checkpoint_dir(id))
    }

    /// State file of one operator subtask, relative to the checkpoint directory.
    /// Uids are path segments as they are: the job graph admits only letters, digits, `-`, `_`
    /// and `.` (not leading), so every uid names a distinct directory inside the checkpoint.
    pub fn state_file_relative(uid: &str, subtask: usize) -> String {
        format!("{uid}/{subtask}")
    }

    /// `<job-id>/shared/`
    pub fn shared_dir(&self) -> String {
        format!("{}/shared/", self.job_id)
    }

    /// An SST uploaded for incremental checkpoints, relative to the job directory. Unique per
    /// upload: a restarted instance numbers its files anew (attempt), and a file uploaded again
    /// for a later checkpoint (after an abort) must not share a name with the first upload,
    /// which cleanup may delete (checkpoint).
    pub fn shared_sst_relative(
        uid: &str,
        subtask: usize,
        attempt: u32,
        checkpoint: CheckpointId,
        name: &str,
    ) -> String {
        format!("shared/{uid}/{subtask}-a{attempt}-c{}-{name}", checkpoint.0)
    }

    /// An SST of a full (non-incremental) checkpoint, relative to the checkpoint directory.
    pub fn exclusive_sst_relative(uid: &str, subtask: usize, name: &str) -> String {
        format!("{uid}/{subtask}-sst/{name}")
    }

    /// Parses `chk-<n>` (with or without a trailing slash).
    pub fn parse_checkpoint_dir(name: &str) -> Option<CheckpointId> {
        name.trim_end_matches('/')
            .strip_prefix("chk-")
            .and_then(|n| n.parse().ok())
            .map(CheckpointId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let p = CheckpointPaths::new("job1");
        assert_eq!(p.metadata(CheckpointId(3)), "job1/chk-3/_metadata");
        assert_eq!(CheckpointPaths::state_file_relative("totals-v2", 2), "totals-v2/2");
        assert_eq!(CheckpointPaths::parse_checkpoint_dir("chk-12/"), Some(CheckpointId(12)));
        assert_eq!(CheckpointPaths::parse_checkpoint_dir("shared/"), None);
    }

    #[test]
    fn unknown_scheme_is_refused_by_name() {
        let e = Storage::open("ftp://x/y").unwrap_err().to_string();
        assert!(e.contains("unsupported storage scheme 'ftp'"), "{e}");
    }

    #[tokio::test]
    async fn file_storage_round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path().to_str().unwrap()).unwrap();
        s.write("j/chk-1/op/0", vec![1, 2, 3]).await.unwrap();
        s.write("j/chk-1/_metadata", vec![4]).await.unwrap();
        assert_eq!(s.read("j/chk-1/op/0").await.unwrap(), vec![1, 2, 3]);
        assert_eq!(s.read_range("j/chk-1/op/0", 1, 2).await.unwrap(), vec![2, 3]);
        assert_eq!(s.size("j/chk-1/op/0").await.unwrap(), Some(3));
        assert_eq!(s.size("j/nope").await.unwrap(), None);
        let mut files = s.list_files_recursive("j/").await.unwrap();
        files.sort();
        assert_eq!(files, vec!["j/chk-1/_metadata", "j/chk-1/op/0"]);
        assert_eq!(s.list_dir("j/").await.unwrap(), vec!["chk-1/"]);
        s.delete_dir("j/chk-1/").await.unwrap();
        assert!(s.list_files_recursive("j/").await.unwrap().is_empty());
        let sub = s.at("j");
        sub.write("x", vec![9]).await.unwrap();
        assert_eq!(s.read("j/x").await.unwrap(), vec![9]);
    }

    #[tokio::test]
    async fn memory_stores_are_shared_by_name() {
        let a = Storage::open("memory://t1/base").unwrap();
        a.write("f", vec![1]).await.unwrap();
        let b = Storage::open("memory://t1").unwrap();
        assert_eq!(b.read("base/f").await.unwrap(), vec![1]);
        assert_eq!(b.at("base").read("f").await.unwrap(), vec![1]);
        assert_eq!(b.list_files_recursive("base/").await.unwrap(), vec!["base/f"]);
        assert_eq!(b.at("base").list_files_recursive("").await.unwrap(), vec!["f"]);
    }
}
