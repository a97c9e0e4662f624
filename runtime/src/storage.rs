//! Durable storage by URL, through opendal, and the one place that formats checkpoint paths.
//!
//! `file:///abs/path` or a bare path opens the local file system, `memory://name` a process-wide
//! in-memory store (tests), `s3://bucket/prefix` any S3-compatible store, `hdfs://` HDFS (with
//! the `hdfs` feature). Remote stores get opendal's retry (backoff with jitter on transient
//! errors), timeout, concurrency-limit and tracing layers; large objects go up in parallel
//! multipart uploads. Other schemes are refused by name.

use crate::checkpoint::CheckpointId;
use crate::error::{Error, Result};
use opendal::layers::{ConcurrentLimitLayer, RetryLayer, TimeoutLayer, TracingLayer};
use opendal::{services, EntryMode, ErrorKind, Operator};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::Duration;

/// Attempts per S3 request unless configured.
pub const DEFAULT_S3_MAX_ATTEMPTS: usize = 4;
/// Timeout of one S3 request unless configured.
pub const DEFAULT_S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Objects above this size are uploaded in parts of this size, several at a time.
pub const MULTIPART_CHUNK: usize = 8 * 1024 * 1024;
/// Parts of one object in flight at once.
const MULTIPART_CONCURRENCY: usize = 4;
/// Requests in flight at once per remote store (many small uploads at a barrier).
const MAX_CONCURRENT_REQUESTS: usize = 64;
/// The buffer a local file is checksummed through: reused, and small enough to stay in cache.
const CHECKSUM_BUFFER: usize = 256 * 1024;
/// The least bytes of a local file checksummed on a thread of their own.
const CHECKSUM_PART: u64 = 16 * 1024 * 1024;

/// Settings of S3-compatible storage, for every `s3://` URL the process opens. Each one not
/// given falls back to the standard AWS environment variable.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` (`AWS_ENDPOINT_URL`; AWS itself when unset).
    pub endpoint: Option<String>,
    /// Signing region (`AWS_REGION`, then `AWS_DEFAULT_REGION`; `us-east-1` when unset).
    pub region: Option<String>,
    /// Access key id (`AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// Secret access key (`AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// Virtual-hosted-style addressing (`bucket.endpoint/key`) instead of path style
    /// (`endpoint/bucket/key`, what most self-hosted stores expect).
    pub virtual_host_style: bool,
    /// Attempts per request on transient errors (503 SlowDown, timeouts, resets), at least 1.
    pub max_attempts: Option<usize>,
    /// Timeout of one request.
    pub request_timeout: Option<Duration>,
}

impl S3Options {
    /// These options with every unset one taken from the environment.
    pub fn with_env(mut self) -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        self.endpoint = self.endpoint.or_else(|| env("AWS_ENDPOINT_URL"));
        self.region = self
            .region
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"));
        self.access_key_id = self.access_key_id.or_else(|| env("AWS_ACCESS_KEY_ID"));
        self.secret_access_key = self.secret_access_key.or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        self
    }
}

/// The process's S3 settings: the default, and per-bucket ones that replace it for their bucket.
static S3_OPTIONS: RwLock<Option<(S3Options, HashMap<String, S3Options>)>> = RwLock::new(None);

fn with_s3_options(f: impl FnOnce(&mut (S3Options, HashMap<String, S3Options>))) {
    f(S3_OPTIONS
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(Default::default));
}

/// Sets the S3 settings of this process (from the command line or configuration), as Flink
/// configures its file systems once per process. Unset ones still fall back to the environment.
pub fn set_s3_options(options: S3Options) {
    with_s3_options(|o| o.0 = options);
}

/// Sets the S3 settings of one bucket, in place of the process's (as Hadoop's per-bucket S3A
/// configuration does): buckets on different stores or with different credentials.
pub fn set_s3_bucket_options(bucket: &str, options: S3Options) {
    with_s3_options(|o| {
        o.1.insert(bucket.to_string(), options);
    });
}

fn s3_options(bucket: &str) -> S3Options {
    let all = S3_OPTIONS.read().unwrap_or_else(|p| p.into_inner());
    let options = all
        .as_ref()
        .map(|(default, buckets)| buckets.get(bucket).unwrap_or(default));
    options.cloned().unwrap_or_default().with_env()
}

/// An operator for `s3://<rest>` rooted at the bucket, and the path below it.
fn s3_operator(url: &str, rest: &str) -> Result<(Operator, String)> {
    let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::Config(format!("no bucket in storage URL '{url}'")));
    }
    // The HTTP transport is installed once per process (idempotent; no constructor does it).
    opendal::install_default();
    let o = s3_options(bucket);
    let mut b = services::S3::default()
        .bucket(bucket)
        .root("/")
        .region(o.region.as_deref().unwrap_or("us-east-1"));
    if let Some(endpoint) = &o.endpoint {
        b = b.endpoint(endpoint);
    }
    if let (Some(id), Some(secret)) = (&o.access_key_id, &o.secret_access_key) {
        b = b.access_key_id(id).secret_access_key(secret);
    }
    if o.virtual_host_style {
        b = b.enable_virtual_host_style();
    }
    let timeout = o.request_timeout.unwrap_or(DEFAULT_S3_REQUEST_TIMEOUT);
    let op = Operator::new(b)
        .map_err(|e| Error::Config(format!("cannot open storage '{url}': {e}")))?
        .layer(TimeoutLayer::new().with_timeout(timeout).with_io_timeout(timeout))
        .layer(
            RetryLayer::new()
                .with_jitter()
                .with_max_times(o.max_attempts.unwrap_or(DEFAULT_S3_MAX_ATTEMPTS).max(1) - 1)
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2)),
        )
        .layer(ConcurrentLimitLayer::new(MAX_CONCURRENT_REQUESTS))
        // A span per storage operation (path, operation), under the task's own.
        .layer(TracingLayer::new());
    Ok((op, path.to_string()))
}

/// An operator for `hdfs://<namenode:port>/<path>` rooted at `/` of that file system, and the
/// path below it. HDFS is a file system: no retry layer (the client retries its NameNode and
/// DataNode connections itself), but the same timeout as S3 requests.
#[cfg(feature = "hdfs")]
fn hdfs_operator(url: &str, rest: &str) -> Result<(Operator, String)> {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() {
        return Err(Error::Config(format!(
            "no NameNode in storage URL '{url}' (expected hdfs://host:port/path)"
        )));
    }
    // The HDFS client binds its NameNode connection to the runtime it is built in (or builds a
    // runtime of its own, which panics when dropped inside async code): build it in one
    // process-wide runtime that outlives every job.
    // Built once inside the lock: a runtime built by a losing thread would be dropped here,
    // which panics inside async code.
    static HDFS_RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    let rt = HDFS_RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("sluice-hdfs")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Config(format!("cannot start the HDFS client runtime: {e}")))?;
    let _in_runtime = rt.enter();
    let op = Operator::new(
        services::HdfsNative::default()
            .name_node(&format!("hdfs://{authority}"))
            .root("/"),
    )
    .map_err(|e| Error::Config(format!("cannot open storage '{url}': {e}")))?
    .layer(TimeoutLayer::new().with_timeout(DEFAULT_S3_REQUEST_TIMEOUT))
    .layer(TracingLayer::new());
    Ok((op, path.to_string()))
}

/// Without the `hdfs` feature an `hdfs://` URL is refused with what to build instead.
#[cfg(not(feature = "hdfs"))]
fn hdfs_operator(url: &str, _rest: &str) -> Result<(Operator, String)> {
    Err(Error::Config(format!(
        "storage '{url}': this build has no HDFS support (build with `--features hdfs`)"
    )))
}

/// `path/` (without outer slashes), or nothing for the root: the prefix of a storage's paths.
fn dir_prefix(path: &str) -> String {
    let path = path.trim_matches('/');
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    }
}

/// An opened storage location: an opendal operator rooted at the URL.
#[derive(Clone, Debug)]
pub struct Storage {
    url: String,
    op: Operator,
    /// Prepended to every path: lets `at()` and `memory://store/sub` share one operator.
    prefix: String,
    /// An object store that creates a missing bucket on the first write (some do): the start
    /// check lists it first, so that a wrong bucket name is an error, not a new bucket.
    list_before_writing: bool,
    /// The local file system (`file://` or a bare path): read without opendal.
    local: bool,
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
        let (op, path) = match scheme.as_str() {
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
                (op, abs.to_string_lossy().into_owned())
            }
            "memory" => memory_operator(rest),
            "s3" => s3_operator(url, rest)?,
            "hdfs" => hdfs_operator(url, rest)?,
            other => {
                return Err(Error::Config(format!(
                    "unsupported storage scheme '{other}' in '{url}' (supported: file, s3, hdfs, memory)"
                )))
            }
        };
        let url = if url.contains("://") {
            url.trim_end_matches('/').to_string()
        } else {
            format!("file://{}", Path::new(rest).display())
        };
        Ok(Self {
            url,
            op,
            prefix: dir_prefix(&path),
            list_before_writing: scheme == "s3",
            local: scheme == "file",
        })
    }

    /// A storage rooted at `dir` (a directory path inside this one).
    pub fn at(&self, dir: &str) -> Self {
        let dir = dir.trim_matches('/');
        Self {
            url: format!("{}/{}", self.url_for_join(), dir),
            op: self.op.clone(),
            prefix: format!("{}{}/", self.prefix, dir),
            list_before_writing: self.list_before_writing,
            local: self.local,
        }
    }

    fn full(&self, path: &str) -> String {
        format!("{}{}", self.prefix, path)
    }

    /// Where `path` lies on the local file system, for storage that is the local file system.
    pub(crate) fn local_path(&self, path: &str) -> Option<std::path::PathBuf> {
        // The operator is rooted at `/` (see `open`).
        self.local.then(|| Path::new("/").join(self.full(path)))
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

    /// Writes a whole object: in one request, or above [`MULTIPART_CHUNK`] where the store has
    /// multipart uploads, in parts uploaded several at a time.
    pub async fn write(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        let written = if bytes.len() > MULTIPART_CHUNK && self.op.info().capability().write_can_multi {
            self.op
                .write_with(&self.full(path), bytes)
                .chunk(MULTIPART_CHUNK)
                .concurrent(MULTIPART_CONCURRENCY)
                .await
        } else {
            self.op.write(&self.full(path), bytes).await
        };
        written.map(|_| ()).map_err(|e| self.err("write", path, e))
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
        if let Some(file) = self.local_path(path) {
            return self.read_local(path, move || std::fs::read(file)).await;
        }
        self.op
            .read(&self.full(path))
            .await
            .map(|b| b.to_vec())
            .map_err(|e| self.err("read", path, e))
    }

    /// For storage on the local file system, the file behind `path`, its length and its CRC32
    /// (see [`crc32_of_file`]); `None` for other stores, whose objects must be read to be checked.
    pub(crate) async fn local_checksum(&self, path: &str) -> Result<Option<(PathBuf, u64, u32)>> {
        let Some(file) = self.local_path(path) else {
            return Ok(None);
        };
        let at = file.clone();
        let (len, crc) = self.read_local(path, move || crc32_of_file(&at)).await?;
        Ok(Some((file, len, crc)))
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        if let Some(file) = self.local_path(path) {
            return self
                .read_local(path, move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
                    std::fs::File::open(file)?.read_exact_at(&mut buf, offset)?;
                    Ok(buf)
                })
                .await;
        }
        self.op
            .read_with(&self.full(path))
            .range(offset..offset + len)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| self.err("read", path, e))
    }

    /// A read of a local file in one hop to the blocking pool. Why not opendal's fs service:
    /// it takes several hops per read (stat, open, read), and restores measured 1-15 ms per
    /// SST file through it against well under 1 ms this way.
    async fn read_local<T: Send + 'static>(
        &self,
        path: &str,
        read: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let io_err = |e| self.err("read", path, opendal::raw::new_std_io_error(e));
        match tokio::task::spawn_blocking(read).await {
            Ok(read) => read.map_err(io_err),
            Err(e) => Err(io_err(std::io::Error::other(e))),
        }
    }

    /// The size of an object, or `None` if it does not exist.
    pub async fn size(&self, path: &str) -> Result<Option<u64>> {
        if let Some(file) = self.local_path(path) {
            return self
                .read_local(path, move || match std::fs::metadata(file) {
                    Ok(m) => Ok(Some(m.len())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                })
                .await;
        }
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
        if self.list_before_writing {
            self.op.list_with(&self.full("")).limit(1).await.map_err(|e| {
                Error::Config(format!(
                    "checkpoint directory {} cannot be listed: {}",
                    self.url,
                    with_causes(&e)
                ))
            })?;
        }
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
        Error::Storage { source, .. } => with_causes(source.as_ref()),
        other => other.to_string(),
    }
}

/// An error and its chain of causes (e.g. "connection refused" below "send http request").
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

/// One operator per `memory://name`, shared by every caller in the process, so that a restore
/// reads what a checkpoint wrote. Returns the operator and the path below it.
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
    (op, sub)
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

/// The length and CRC32 of a local file, read through small reused buffers: reading it whole
/// would fault in fresh memory for every page, which costs more than the read. A file over
/// [`CHECKSUM_PART`] bytes twice or more is read in parts of at least that size, one per
/// core at most, on threads of their own, and their CRCs combined.
fn crc32_of_file(path: &Path) -> std::io::Result<(u64, u32)> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    static CORES: OnceLock<u64> = OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64));
    let parts = (len / CHECKSUM_PART).clamp(1, cores);
    let bounds = |i: u64| len * i / parts;
    let crcs = std::thread::scope(|s| {
        let others: Vec<_> = (1..parts)
            .map(|i| {
                let file = &file;
                s.spawn(move || crc32_of_part(file, bounds(i), bounds(i + 1)))
            })
            .collect();
        let mut crcs = vec![crc32_of_part(&file, 0, bounds(1))];
        for part in others {
            crcs.push(
                part.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("checksum thread panicked"))),
            );
        }
        crcs
    });
    let mut crc = crc32fast::Hasher::new();
    for part in crcs {
        crc.combine(&part?);
    }
    Ok((len, crc.finalize()))
}

/// The CRC32 state of bytes `start..end` of `file`; an error if the file ends before `end`.
fn crc32_of_part(file: &std::fs::File, start: u64, end: u64) -> std::io::Result<crc32fast::Hasher> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; CHECKSUM_BUFFER.min(usize::try_from(end - start).unwrap_or(usize::MAX))];
    let mut crc = crc32fast::Hasher::new();
    let mut at = start;
    while at < end {
        let want = usize::try_from(end - at).unwrap_or(usize::MAX).min(buf.len());
        match file.read_at(&mut buf[..want], at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                crc.update(&buf[..n]);
                at += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(crc)
}

/// Name of the file whose presence makes a checkpoint exist.
pub const METADATA_FILE: &str = "_metadata";

impl CheckpointPaths {
    /// Paths for one job.
    pub fn new(job_id: impl Into<String>) -> Self {
        Self { job_id: job_id.into() }
    }

    /// The job's id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// `<job-id>/`
    pub fn job_dir(&self) -> String {
        format!("{}/", self.job_id)
    }

    /// `<job-id>/<relative>`: a file the job directory holds (e.g. a shared SST).
    pub fn in_job_dir(&self, relative: &str) -> String {
        format!("{}/{relative}", self.job_id)
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
    fn the_local_file_system_is_known_by_scheme_and_kept_by_sub_storages() {
        for url in ["/data/ck", "file:///data/ck", "FILE:///data/ck"] {
            let s = Storage::open(url).unwrap();
            let expected = Some(std::path::PathBuf::from("/data/ck/j/f"));
            assert_eq!(s.local_path("j/f"), expected, "{url}");
            assert_eq!(s.at("j").local_path("f"), expected, "{url}");
        }
        assert_eq!(Storage::open("memory://x").unwrap().local_path("f"), None);
    }

    #[test]
    fn unknown_scheme_is_refused_by_name() {
        let e = Storage::open("ftp://x/y").unwrap_err().to_string();
        assert!(e.contains("unsupported storage scheme 'ftp'"), "{e}");
    }

    #[cfg(not(feature = "hdfs"))]
    #[test]
    fn hdfs_without_the_feature_says_how_to_build_it() {
        let e = Storage::open("hdfs://127.0.0.1:9000/ck").unwrap_err().to_string();
        assert!(
            e.contains("hdfs://127.0.0.1:9000/ck") && e.contains("--features hdfs"),
            "{e}"
        );
    }

    /// No NameNode can be had here (see ENVIRONMENT.md): what is checked is that an unreachable
    /// one fails the start check with the URL, inside async code and after it (no runtime of the
    /// client's own is dropped there).
    #[cfg(feature = "hdfs")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hdfs_with_an_unreachable_namenode_fails_the_start_check_naming_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let url = format!("hdfs://127.0.0.1:{port}/ck");
        assert!(Storage::open("hdfs:///ck").is_err(), "no NameNode");
        let s = Storage::open(&url).unwrap();
        let e = s.check_writable("job").await.unwrap_err().to_string();
        assert!(e.contains(&url), "{e}");
        drop(s);
    }

    #[tokio::test]
    async fn file_storage_round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path().to_str().unwrap()).unwrap();
        s.write("j/chk-1/op/0", vec![1, 2, 3]).await.unwrap();
        s.write("j/chk-1/_metadata", vec![4]).await.unwrap();
        assert_eq!(s.read("j/chk-1/op/0").await.unwrap(), vec![1, 2, 3]);
        assert_eq!(s.read_range("j/chk-1/op/0", 1, 2).await.unwrap(), vec![2, 3]);
        let missing = s.read("j/nope").await.unwrap_err().to_string();
        assert!(missing.contains("j/nope") && missing.contains("read"), "{missing}");
        let past_end = s.read_range("j/chk-1/op/0", 2, 5).await.unwrap_err().to_string();
        assert!(past_end.contains("j/chk-1/op/0"), "{past_end}");
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
    async fn checksums_of_local_files_in_parts_equal_the_whole_files_and_name_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let local = Storage::open(dir.path().to_str().unwrap()).unwrap();
        // Empty, under one buffer, one part exactly, and parts with a short last one.
        let part = CHECKSUM_PART as usize;
        for len in [0, 1000, part, 2 * part + CHECKSUM_BUFFER + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let expected = (len as u64, crc32fast::hash(&data));
            local.write("f", data).await.unwrap();
            let (file, len, crc) = local.local_checksum("f").await.unwrap().expect("a local file");
            assert_eq!((len, crc), expected, "{len} bytes");
            assert_eq!(file, dir.path().join("f"));
        }
        let missing = local.local_checksum("nope").await.unwrap_err().to_string();
        assert!(missing.contains("nope"), "{missing}");
        let remote = Storage::open("memory://checksums").unwrap();
        remote.write("f", vec![1]).await.unwrap();
        assert!(remote.local_checksum("f").await.unwrap().is_none());
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
