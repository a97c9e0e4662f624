//! Collects every result and, once all input has ended, writes them sorted to a file in one
//! atomic rename (or to standard output for `-`). The buffer is operator state, so results that
//! arrived before a checkpoint survive a failure and are not doubled by the replay.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_runtime::snapshot::{list_state, read_list, OperatorState, Redistribution};
use sluice_runtime::{CheckpointId, Error, Result, SinkFunction, TaskInfo};
use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;

const STATE: &str = "buffer";

/// See the module documentation.
#[derive(Clone)]
pub struct SortedFileSink<T> {
    output: Option<PathBuf>,
    buffer: Vec<T>,
}

impl<T> SortedFileSink<T> {
    /// Writes to `output` (`-` for standard output); `None` counts the results only.
    pub fn new(output: Option<PathBuf>) -> Self {
        Self {
            output,
            buffer: Vec::new(),
        }
    }
}

impl<T> SinkFunction for SortedFileSink<T>
where
    T: Ord + Display + Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    type In = T;

    fn open(&mut self, info: &TaskInfo, restored: Option<OperatorState>) -> Result<()> {
        if info.parallelism != 1 {
            return Err(Error::Config(format!(
                "sink '{}' writes one sorted file and needs parallelism 1, not {}",
                info.name, info.parallelism
            )));
        }
        self.buffer = restored
            .as_ref()
            .map(|s| read_list::<T>(s, STATE))
            .transpose()?
            .flatten()
            .unwrap_or_default();
        Ok(())
    }

    fn write(&mut self, batch: Vec<T>) -> Result<()> {
        self.buffer.extend(batch);
        Ok(())
    }

    fn snapshot(&mut self, _: CheckpointId) -> Result<OperatorState> {
        if self.buffer.is_empty() {
            return Ok(OperatorState::new());
        }
        list_state(STATE, Redistribution::Split, &self.buffer)
    }

    fn finish(&mut self) -> Result<()> {
        self.buffer.sort();
        let mut text = String::new();
        for r in &self.buffer {
            text.push_str(&r.to_string());
            text.push('\n');
        }
        let io = |e: std::io::Error, what: &str| Error::User(format!("cannot write {what}: {e}"));
        match &self.output {
            None => tracing::info!(results = self.buffer.len(), "results counted (no output file given)"),
            Some(p) if p.as_os_str() == "-" => std::io::stdout()
                .write_all(text.as_bytes())
                .map_err(|e| io(e, "to standard output"))?,
            Some(path) => {
                let tmp = PathBuf::from(format!("{}.inprogress", path.display()));
                std::fs::write(&tmp, text).map_err(|e| io(e, &tmp.display().to_string()))?;
                std::fs::rename(&tmp, path).map_err(|e| io(e, &path.display().to_string()))?;
            }
        }
        Ok(())
    }
}
