//! `wordcount`: counts the words of text files; at end of input `output=PATH` receives
//! `word,count` lines sorted by word.

use serde::{Deserialize, Serialize};
use sluice_operators::file_source::TextFileSource;
use sluice_operators::sorted_sink::SortedFileSink;
use sluice_runtime::{
    Error, JobDefinition, JobParams, KeyedBackend, KeyedContext, KeyedProcessFunction, ParamSpec, Result,
    StateRegistry, StreamEnv, TaskInfo, ValueState,
};
use std::fmt;

/// A word and how often it occurred.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WordCount {
    /// The word, lowercase.
    pub word: String,
    /// Occurrences.
    pub count: u64,
}

impl fmt::Display for WordCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.word, self.count)
    }
}

/// Splits a line into lowercase words (runs of alphanumeric characters).
pub fn words(line: &str) -> Vec<String> {
    line.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

#[derive(Clone, Default)]
struct CountWords {
    counts: Option<ValueState<String, u64>>,
}

impl KeyedProcessFunction for CountWords {
    type Key = String;
    type In = String;
    type Out = WordCount;

    fn open(&mut self, state: &mut StateRegistry<'_, String>, _: &TaskInfo) -> Result<()> {
        self.counts = Some(state.value_state("counts")?);
        Ok(())
    }

    fn process(&mut self, _: String, ctx: &mut KeyedContext<'_, String>, _: &mut Vec<WordCount>) -> Result<()> {
        self.counts
            .as_ref()
            .expect("opened")
            .update_with(ctx, || 0, |c| *c += 1)
    }

    fn end_of_input(&mut self, state: &KeyedBackend, out: &mut Vec<WordCount>) -> Result<()> {
        let counts = self.counts.as_ref().expect("opened");
        out.extend(
            counts
                .entries(state)?
                .into_iter()
                .map(|(word, count)| WordCount { word, count }),
        );
        Ok(())
    }
}

fn build(p: &JobParams, env: &mut StreamEnv) -> Result<()> {
    let input = p
        .optional("input")
        .ok_or_else(|| Error::Config("job 'wordcount' needs --set input=PATH (a text file or a directory)".into()))?;
    if !std::path::Path::new(input).exists() {
        return Err(Error::Config(format!("wordcount input '{input}' does not exist")));
    }
    env.source("text-files", TextFileSource::new(input))
        .uid("text-files")
        .flat_map(|line: String| words(&line))
        .name("split-words")
        .key_by(|w: &String| w.clone())
        .process("count-words", CountWords::default())
        .uid("count-words")
        .sink(
            "counts-output",
            SortedFileSink::new(p.optional("output").map(Into::into)),
        )
        .uid("counts-output")
        .parallelism(1);
    Ok(())
}

/// The job's registration.
pub fn definition() -> JobDefinition {
    JobDefinition {
        name: "wordcount",
        description: "word counts over text files",
        params: vec![
            ParamSpec {
                name: "input",
                default: "",
                help: "a text file or a directory of them",
            },
            ParamSpec {
                name: "output",
                default: "",
                help: "file receiving `word,count` lines sorted by word (- for stdout)",
            },
        ],
        build,
    }
}
