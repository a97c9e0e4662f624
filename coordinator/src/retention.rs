//! Which completed checkpoints to keep: pure functions of the completed ids, unit-tested alone.

use sluice_runtime::CheckpointId;
use std::collections::VecDeque;

/// The completed checkpoints of a job, oldest first, and how many to keep.
#[derive(Debug, Clone)]
pub struct CompletedCheckpoints {
    ids: VecDeque<CheckpointId>,
    retained: usize,
}

impl CompletedCheckpoints {
    /// Keeps the newest `retained` (at least one).
    pub fn new(retained: usize) -> Self {
        Self {
            ids: VecDeque::new(),
            retained: retained.max(1),
        }
    }

    /// Records a newly completed checkpoint; returns the ones it subsumes (to delete).
    #[must_use = "subsumed checkpoints must be deleted"]
    pub fn add(&mut self, id: CheckpointId) -> Vec<CheckpointId> {
        debug_assert!(
            self.ids.back().is_none_or(|last| *last < id),
            "checkpoint ids only increase"
        );
        self.ids.push_back(id);
        let excess = self.ids.len().saturating_sub(self.retained);
        self.ids.drain(..excess).collect()
    }

    /// The newest completed checkpoint.
    pub fn latest(&self) -> Option<CheckpointId> {
        self.ids.back().copied()
    }

    /// Forgets a checkpoint that turned out unusable (so recovery falls back to the previous).
    pub fn discard(&mut self, id: CheckpointId) {
        self.ids.retain(|i| *i != id);
    }

    /// All retained ids, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = CheckpointId> + '_ {
        self.ids.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_the_newest() {
        let mut c = CompletedCheckpoints::new(3);
        assert!(c.add(CheckpointId(1)).is_empty());
        assert!(c.add(CheckpointId(2)).is_empty());
        assert!(c.add(CheckpointId(4)).is_empty());
        assert_eq!(c.add(CheckpointId(5)), vec![CheckpointId(1)]);
        assert_eq!(c.latest(), Some(CheckpointId(5)));
        c.discard(CheckpointId(5));
        assert_eq!(c.latest(), Some(CheckpointId(4)));
        assert_eq!(
            c.ids().collect::<Vec<_>>(),
            vec![CheckpointId(2), CheckpointId(4)]
        );
    }

    proptest! {
        #[test]
        fn every_id_is_retained_or_subsumed_once(n in 1usize..60, retained in 1usize..6) {
            let mut c = CompletedCheckpoints::new(retained);
            let mut deleted = Vec::new();
            for i in 1..=n as u64 {
                deleted.extend(c.add(CheckpointId(i)));
            }
            let kept: Vec<_> = c.ids().collect();
            prop_assert_eq!(kept.len(), n.min(retained));
            prop_assert_eq!(deleted.len() + kept.len(), n);
            prop_assert!(deleted.iter().all(|d| kept.iter().all(|k| d < k)));
        }
    }
}
