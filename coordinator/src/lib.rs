//! # Sluice coordinator
//!
//! Runs jobs: the checkpoint coordinator ([`checkpoint`]) triggers, collects acknowledgements,
//! commits by writing `_metadata` last and applies retention ([`retention`]); the job master
//! ([`master`]) deploys attempts and fails over to the latest completed checkpoint; [`cli`] is the
//! `sluice` command line that any binary with a job registry can expose.

pub mod checkpoint;
pub mod cli;
pub mod cluster;
pub mod master;
pub mod retention;

pub use master::{
    run_job, spawn_job, JobControl, JobHandle, JobOutcome, JobReport, JobState, JobSubmission, RestartRecord,
    RestoredFrom,
};
