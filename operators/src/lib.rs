//! # Sluice operators
//!
//! Ready-made sources and sinks for the DataStream API:
//!
//! - [`generator::LaneGenerator`]: a deterministic, rate-limited generator whose index space is
//!   split into lanes; lane positions are split operator state, so every event is emitted exactly
//!   once across failures and rescales.
//! - [`file_source::TextFileSource`]: lines of the files under a path, one split per file, with
//!   byte offsets as state.
//! - [`sorted_sink::SortedFileSink`]: collects results and writes them sorted, atomically, once
//!   every input has ended; its buffer is checkpointed so nothing is lost or doubled.
//! - [`discard_sink::DiscardSink`]: counts and drops records (benchmarks without output).
//! - [`file_sink::ExactlyOnceFileSink`]: part files committed by two-phase commit when their
//!   checkpoint completes; a failure never leaves a visible file whose records are replayed.

pub mod discard_sink;
pub mod file_sink;
pub mod file_source;
pub mod generator;
pub mod sorted_sink;
