//! A deterministic generator source. Event `i` (for `i` in `0..count`) is `make(i)`; the index
//! space is divided into `lanes` lanes (`i % lanes`), and each lane's position is one entry of
//! split operator state. A subtask owns some lanes and emits from them in turn, so after a
//! failure (or a rescale, which redistributes the entries) every event is emitted exactly once.

use serde::{Deserialize, Serialize};
use sluice_runtime::snapshot::{list_state, read_list, OperatorState, Redistribution};
use sluice_runtime::{Data, Error, Result, SourceFunction, SourcePoll, TaskInfo};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STATE: &str = "lanes";

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Lane {
    lane: u64,
    /// Events of this lane already emitted.
    done: u64,
}

/// See the module documentation.
pub struct LaneGenerator<T> {
    make: Arc<dyn Fn(u64) -> T + Send + Sync>,
    count: u64,
    lanes: u64,
    /// Events per second for the whole source; 0 = unlimited.
    rate: u64,
    batch: usize,
    owned: Vec<Lane>,
    current: usize,
    subtask_rate: f64,
    started: Option<Instant>,
    emitted: u64,
}

impl<T> Clone for LaneGenerator<T> {
    fn clone(&self) -> Self {
        Self {
            make: self.make.clone(),
            count: self.count,
            lanes: self.lanes,
            rate: self.rate,
            batch: self.batch,
            owned: self.owned.clone(),
            current: self.current,
            subtask_rate: self.subtask_rate,
            started: self.started,
            emitted: self.emitted,
        }
    }
}

impl<T> LaneGenerator<T> {
    /// `count` events over `lanes` lanes at `rate` events/s in total (0: unlimited).
    pub fn new(count: u64, lanes: u64, rate: u64, make: impl Fn(u64) -> T + Send + Sync + 'static) -> Self {
        Self {
            make: Arc::new(make),
            count,
            lanes: lanes.max(1),
            rate,
            batch: 1024,
            owned: Vec::new(),
            current: 0,
            subtask_rate: 0.0,
            started: None,
            emitted: 0,
        }
    }

    /// Events in lane `lane`.
    fn lane_len(&self, lane: u64) -> u64 {
        if lane >= self.count {
            0
        } else {
            (self.count - lane).div_ceil(self.lanes)
        }
    }
}

impl<T: Data> SourceFunction for LaneGenerator<T> {
    type Out = T;

    fn open(&mut self, info: &TaskInfo, restored: Option<OperatorState>) -> Result<()> {
        self.owned = match restored
            .as_ref()
            .map(|s| read_list::<Lane>(s, STATE))
            .transpose()?
            .flatten()
        {
            Some(lanes) => lanes,
            None => (0..self.lanes)
                .filter(|l| *l as usize % info.parallelism == info.subtask)
                .map(|lane| Lane { lane, done: 0 })
                .collect(),
        };
        if let Some(bad) = self.owned.iter().find(|l| l.lane >= self.lanes) {
            return Err(Error::Incompatible(format!(
                "restored generator lane {} does not exist with lanes={}",
                bad.lane, self.lanes
            )));
        }
        self.subtask_rate = self.rate as f64 * self.owned.len() as f64 / self.lanes as f64;
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<T>) -> Result<SourcePoll> {
        if self.owned.iter().all(|l| l.done >= self.lane_len(l.lane)) {
            return Ok(SourcePoll::Finished);
        }
        let mut budget = self.batch as u64;
        if self.rate > 0 {
            let started = *self.started.get_or_insert_with(Instant::now);
            let allowed = (started.elapsed().as_secs_f64() * self.subtask_rate) as u64;
            if allowed <= self.emitted {
                let wait = (self.emitted + 1) as f64 / self.subtask_rate.max(1e-9) - started.elapsed().as_secs_f64();
                return Ok(SourcePoll::Idle(Duration::from_secs_f64(wait.clamp(0.0, 0.1))));
            }
            budget = budget.min(allowed - self.emitted);
        }
        for _ in 0..self.owned.len() {
            let i = self.current % self.owned.len().max(1);
            let lane = self.owned[i];
            let len = self.lane_len(lane.lane);
            if lane.done < len {
                let n = budget.min(len - lane.done);
                out.extend((lane.done..lane.done + n).map(|k| (self.make)(lane.lane + k * self.lanes)));
                self.owned[i].done += n;
                self.emitted += n;
                self.current = i + 1;
                return Ok(SourcePoll::Ready);
            }
            self.current = i + 1;
        }
        Ok(SourcePoll::Finished)
    }

    fn snapshot(&mut self) -> Result<OperatorState> {
        list_state(STATE, Redistribution::Split, &self.owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(subtask: usize, parallelism: usize) -> TaskInfo {
        TaskInfo {
            job_id: "j".into(),
            name: "g".into(),
            uid: "g".into(),
            subtask,
            parallelism,
            max_parallelism: 128,
            attempt: 0,
            state_backend: sluice_runtime::config::StateBackendKind::Memory,
            local_dir: std::env::temp_dir(),
            rocksdb: Default::default(),
            finish_hooks: Default::default(),
        }
    }

    fn drain(g: &mut LaneGenerator<u64>, limit: usize) -> Vec<u64> {
        let mut all = Vec::new();
        while all.len() < limit {
            let mut out = Vec::new();
            if g.poll(&mut out).unwrap() == SourcePoll::Finished {
                break;
            }
            all.extend(out);
        }
        all
    }

    #[test]
    fn subtasks_together_emit_every_index_once() {
        let mut seen = Vec::new();
        for s in 0..3 {
            let mut g = LaneGenerator::new(10_007, 8, 0, |i| i);
            g.open(&info(s, 3), None).unwrap();
            seen.extend(drain(&mut g, usize::MAX));
        }
        seen.sort();
        assert_eq!(seen, (0..10_007).collect::<Vec<_>>());
    }

    #[test]
    fn restore_resumes_after_the_snapshot() {
        let mut g = LaneGenerator::new(5000, 4, 0, |i| i);
        g.open(&info(0, 1), None).unwrap();
        let first = drain(&mut g, 2100);
        let state = g.snapshot().unwrap();
        let mut h = LaneGenerator::new(5000, 4, 0, |i| i);
        h.open(&info(0, 1), Some(state)).unwrap();
        let mut all = first;
        all.extend(drain(&mut h, usize::MAX));
        all.sort();
        assert_eq!(all, (0..5000).collect::<Vec<_>>());
    }
}
