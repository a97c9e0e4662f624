//! The runtime's error type. Every variant names what was wrong so that the CLI can print it as
//! one line.

use thiserror::Error;

/// Errors of the runtime.
#[derive(Debug, Error)]
pub enum Error {
    /// A storage operation failed.
    #[error("storage error at {url}: {op} '{path}' failed: {source}")]
    Storage {
        /// The storage's URL.
        url: String,
        /// The operation (read, write, ...).
        op: &'static str,
        /// The path inside the storage.
        path: String,
        /// The cause, from opendal.
        #[source]
        source: Box<opendal::Error>,
    },
    /// A snapshot file or metadata does not match its size or checksum.
    #[error("corrupt checkpoint data at {location}: {reason}")]
    Corrupt {
        /// Storage URL and path.
        location: String,
        /// What did not match.
        reason: String,
    },
    /// The location holds no completed checkpoint or savepoint.
    #[error("{0}")]
    NotASnapshot(String),
    /// A snapshot exists but does not fit the job (other job, parallelism, uids).
    #[error("{0}")]
    Incompatible(String),
    /// Bad job, flag or parameter.
    #[error("{0}")]
    Config(String),
    /// A record, key or state value could not be (de)serialized.
    #[error("serialization failed: {0}")]
    Serde(String),
    /// The task was cancelled.
    #[error("task cancelled")]
    Cancelled,
    /// A channel peer went away without an end-of-input marker.
    #[error("{0}")]
    Disconnected(String),
    /// A user function failed.
    #[error("{0}")]
    User(String),
}

impl Error {
    /// Whether this error means the state being restored is unusable (so that recovery may fall
    /// back to an older checkpoint).
    pub fn is_unusable_snapshot(&self) -> bool {
        match self {
            Error::Corrupt { .. } | Error::NotASnapshot(_) => true,
            Error::Storage { source, .. } => source.kind() == opendal::ErrorKind::NotFound,
            _ => false,
        }
    }
}

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        Error::Serde(e.to_string())
    }
}
