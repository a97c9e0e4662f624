//! Jobs by name: a registry of job definitions, each with declared parameters, so that every
//! process of a cluster can build the same graph from (job name, parameters).

use crate::error::{Error, Result};
use crate::stream::StreamEnv;
use std::collections::BTreeMap;
use std::str::FromStr;

/// One declared job parameter.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// Name, as given to `--set name=value`.
    pub name: &'static str,
    /// Default value ("" for none).
    pub default: &'static str,
    /// What it means.
    pub help: &'static str,
}

impl ParamSpec {
    /// A parameter `name` with its default and help.
    pub const fn new(name: &'static str, default: &'static str, help: &'static str) -> Self {
        Self { name, default, help }
    }
}

/// The parameters of one job run, validated against the job's declarations.
#[derive(Debug, Clone, Default)]
pub struct JobParams {
    values: BTreeMap<String, String>,
}

impl JobParams {
    /// The raw value of `name` (the declared default when not set).
    pub fn raw(&self, name: &str) -> &str {
        self.values.get(name).map(String::as_str).unwrap_or("")
    }

    /// The value of `name`, parsed; the error names the parameter and the value.
    pub fn get<T: FromStr>(&self, name: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.raw(name);
        raw.parse()
            .map_err(|e| Error::Config(format!("invalid value '{raw}' for job parameter '{name}': {e}")))
    }

    /// The value of `name`, or `None` when empty.
    pub fn optional(&self, name: &str) -> Option<&str> {
        Some(self.raw(name)).filter(|s| !s.is_empty())
    }

    /// All values (defaults included), for the checkpoint metadata.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.values.clone()
    }
}

/// Builds a job's dataflow from its parameters.
pub type BuildFn = fn(&JobParams, &mut StreamEnv) -> Result<()>;

/// A job the binary knows.
#[derive(Clone)]
pub struct JobDefinition {
    /// Name for `sluice run <name>`.
    pub name: &'static str,
    /// One line on what it does.
    pub description: &'static str,
    /// Its parameters.
    pub params: Vec<ParamSpec>,
    /// Builds the dataflow.
    pub build: BuildFn,
}

impl JobDefinition {
    /// Validates `key=value` settings against the declarations, filling in defaults.
    pub fn params_from_settings(&self, settings: &[String]) -> Result<JobParams> {
        self.params_over(BTreeMap::new(), settings)
    }

    /// `key=value` settings over `base` (e.g. a snapshot's parameters), validated.
    pub fn params_over(&self, mut base: BTreeMap<String, String>, settings: &[String]) -> Result<JobParams> {
        for s in settings {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("malformed --set '{s}': expected key=value")))?;
            base.insert(k.trim().to_string(), v.to_string());
        }
        self.params_from_map(base)
    }

    /// Validates a map of values (e.g. from a snapshot's metadata).
    pub fn params_from_map(&self, pairs: impl IntoIterator<Item = (String, String)>) -> Result<JobParams> {
        let mut values: BTreeMap<String, String> = self
            .params
            .iter()
            .map(|p| (p.name.to_string(), p.default.to_string()))
            .collect();
        for (k, v) in pairs {
            if !values.contains_key(&k) {
                let known: Vec<&str> = self.params.iter().map(|p| p.name).collect();
                return Err(Error::Config(format!(
                    "unknown parameter '{k}' for job '{}' (known: {})",
                    self.name,
                    known.join(", ")
                )));
            }
            values.insert(k, v);
        }
        Ok(JobParams { values })
    }
}

/// The jobs a binary can run, by name.
#[derive(Clone, Default)]
pub struct JobRegistry {
    jobs: BTreeMap<&'static str, JobDefinition>,
}

impl JobRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a job.
    pub fn register(&mut self, job: JobDefinition) -> &mut Self {
        self.jobs.insert(job.name, job);
        self
    }

    /// The job called `name`; the error lists the known ones.
    pub fn get(&self, name: &str) -> Result<&JobDefinition> {
        self.jobs.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.jobs.keys().copied().collect();
            Error::Config(format!("unknown job '{name}' (known jobs: {})", known.join(", ")))
        })
    }

    /// Every job, by name.
    pub fn iter(&self) -> impl Iterator<Item = &JobDefinition> {
        self.jobs.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobDefinition {
        JobDefinition {
            name: "j",
            description: "",
            params: vec![ParamSpec {
                name: "events",
                default: "10",
                help: "",
            }],
            build: |_, _| Ok(()),
        }
    }

    #[test]
    fn settings_are_validated() {
        let j = job();
        assert_eq!(j.params_from_settings(&[]).unwrap().get::<u64>("events").unwrap(), 10);
        assert_eq!(j.params_from_settings(&["events=5".into()]).unwrap().raw("events"), "5");
        let e = j.params_from_settings(&["nope=1".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown parameter 'nope'") && e.contains("events"), "{e}");
        let e = j.params_from_settings(&["events".into()]).unwrap_err().to_string();
        assert!(e.contains("malformed --set 'events'"), "{e}");
        let p = j.params_from_settings(&["events=x".into()]).unwrap();
        let e = p.get::<u64>("events").unwrap_err().to_string();
        assert!(e.contains("'x'") && e.contains("'events'"), "{e}");
    }

    #[test]
    fn unknown_job_lists_known() {
        let mut r = JobRegistry::new();
        r.register(job());
        let e = r.get("x").err().unwrap().to_string();
        assert!(e.contains("unknown job 'x'") && e.contains("j"), "{e}");
    }
}
