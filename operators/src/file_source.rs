//! Lines of text files. Every file under the input path is a split; splits are dealt to
//! subtasks round-robin and each split's byte offset is one entry of split operator state, so a
//! restore re-reads nothing that a completed checkpoint already covers.

use serde::{Deserialize, Serialize};
use sluice_runtime::snapshot::{list_state, read_list, OperatorState, Redistribution};
use sluice_runtime::{Error, Result, SourceFunction, SourcePoll, TaskInfo};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const STATE: &str = "splits";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Split {
    path: String,
    offset: u64,
    done: bool,
}

/// See the module documentation.
pub struct TextFileSource {
    input: PathBuf,
    lines_per_batch: usize,
    splits: Vec<Split>,
    current: usize,
    reader: Option<BufReader<std::fs::File>>,
}

impl Clone for TextFileSource {
    /// A clone reopens its file at the recorded offset when it first polls.
    fn clone(&self) -> Self {
        Self {
            input: self.input.clone(),
            lines_per_batch: self.lines_per_batch,
            splits: self.splits.clone(),
            current: self.current,
            reader: None,
        }
    }
}

impl TextFileSource {
    /// Reads the file at `input`, or every file below it when it is a directory.
    pub fn new(input: impl Into<PathBuf>) -> Self {
        Self {
            input: input.into(),
            lines_per_batch: 1024,
            splits: Vec::new(),
            current: 0,
            reader: None,
        }
    }

    fn files(&self) -> Result<Vec<String>> {
        fn walk(p: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
            if p.is_dir() {
                for e in std::fs::read_dir(p)? {
                    walk(&e?.path(), out)?;
                }
            } else {
                out.push(p.to_string_lossy().into_owned());
            }
            Ok(())
        }
        let mut files = Vec::new();
        walk(&self.input, &mut files)
            .map_err(|e| Error::Config(format!("cannot read input '{}': {e}", self.input.display())))?;
        files.sort();
        Ok(files)
    }

    fn open_current(&mut self) -> Result<()> {
        let split = &self.splits[self.current];
        let mut file = std::fs::File::open(&split.path)
            .map_err(|e| Error::User(format!("cannot open input file '{}': {e}", split.path)))?;
        file.seek(SeekFrom::Start(split.offset))
            .map_err(|e| Error::User(format!("cannot seek in '{}': {e}", split.path)))?;
        self.reader = Some(BufReader::new(file));
        Ok(())
    }
}

impl SourceFunction for TextFileSource {
    type Out = String;

    fn open(&mut self, info: &TaskInfo, restored: Option<OperatorState>) -> Result<()> {
        self.splits = match restored
            .as_ref()
            .map(|s| read_list::<Split>(s, STATE))
            .transpose()?
            .flatten()
        {
            Some(splits) => splits,
            None => self
                .files()?
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % info.parallelism == info.subtask)
                .map(|(_, path)| Split {
                    path,
                    offset: 0,
                    done: false,
                })
                .collect(),
        };
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<String>) -> Result<SourcePoll> {
        while self.current < self.splits.len() {
            if self.splits[self.current].done {
                self.current += 1;
                continue;
            }
            if self.reader.is_none() {
                self.open_current()?;
            }
            let reader = self.reader.as_mut().expect("opened above");
            let split = &mut self.splits[self.current];
            let mut line = String::new();
            while out.len() < self.lines_per_batch {
                line.clear();
                let n = reader
                    .read_line(&mut line)
                    .map_err(|e| Error::User(format!("cannot read '{}': {e}", split.path)))?;
                if n == 0 {
                    split.done = true;
                    break;
                }
                split.offset += n as u64;
                out.push(line.trim_end_matches(['\n', '\r']).to_string());
            }
            if split.done {
                self.reader = None;
                self.current += 1;
            }
            return Ok(SourcePoll::Ready);
        }
        Ok(SourcePoll::Finished)
    }

    fn snapshot(&mut self) -> Result<OperatorState> {
        list_state(STATE, Redistribution::Split, &self.splits)
    }
}
