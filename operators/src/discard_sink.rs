//! A sink that drops its records and counts them: for benchmark runs with no output to keep.

use sluice_runtime::snapshot::OperatorState;
use sluice_runtime::{Result, SinkFunction, TaskInfo};
use std::marker::PhantomData;

/// See the module documentation.
pub struct DiscardSink<T> {
    records: u64,
    _t: PhantomData<fn(T)>,
}

impl<T> Default for DiscardSink<T> {
    fn default() -> Self {
        Self {
            records: 0,
            _t: PhantomData,
        }
    }
}

impl<T> Clone for DiscardSink<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T: sluice_runtime::operator::Data> SinkFunction for DiscardSink<T> {
    type In = T;
    fn open(&mut self, _: &TaskInfo, _: Option<OperatorState>) -> Result<()> {
        Ok(())
    }
    fn write(&mut self, batch: Vec<T>) -> Result<()> {
        self.records += batch.len() as u64;
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        tracing::info!(records = self.records, "discard sink finished");
        Ok(())
    }
}
