//! Which completed checkpoints and shared files to keep: pure functions of the completed
//! checkpoints and the shared files each references, unit-tested alone.

use sluice_runtime::CheckpointId;
use std::collections::{BTreeMap, BTreeSet};

/// What retention removes after a checkpoint completes (or is discarded).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Checkpoints to delete (their directories).
    pub checkpoints: Vec<CheckpointId>,
    /// Shared files (relative to the job directory) no retained checkpoint references any more.
    pub shared_files: Vec<String>,
}

/// The completed checkpoints of a job, oldest first, with the shared files each references.
#[derive(Debug, Clone)]
pub struct CompletedCheckpoints {
    checkpoints: BTreeMap<CheckpointId, Vec<String>>,
    refs: BTreeMap<String, usize>,
    retained: usize,
}

impl CompletedCheckpoints {
    /// Keeps the newest `retained` (at least one).
    pub fn new(retained: usize) -> Self {
        Self {
            checkpoints: BTreeMap::new(),
            refs: BTreeMap::new(),
            retained: retained.max(1),
        }
    }

    /// Records a newly completed checkpoint and the shared files it references; returns what it
    /// subsumes.
    #[must_use = "subsumed checkpoints and unreferenced shared files must be deleted"]
    pub fn add(&mut self, id: CheckpointId, shared: Vec<String>) -> Removed {
        debug_assert!(
            self.latest().is_none_or(|last| last < id),
            "checkpoint ids only increase"
        );
        let shared: Vec<String> = shared.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        for f in &shared {
            *self.refs.entry(f.clone()).or_default() += 1;
        }
        self.checkpoints.insert(id, shared);
        let mut removed = Removed::default();
        while self.checkpoints.len() > self.retained {
            let oldest = *self.checkpoints.keys().next().expect("not empty");
            let r = self.discard(oldest);
            removed.checkpoints.push(oldest);
            removed.shared_files.extend(r.shared_files);
        }
        removed
    }

    /// Forgets a checkpoint (subsumed, or unusable so that recovery falls back to the previous).
    pub fn discard(&mut self, id: CheckpointId) -> Removed {
        let mut removed = Removed::default();
        if let Some(shared) = self.checkpoints.remove(&id) {
            removed.checkpoints.push(id);
            for f in shared {
                let n = self.refs.get_mut(&f).expect("every reference is counted");
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&f);
                    removed.shared_files.push(f);
                }
            }
        }
        removed
    }

    /// Whether a retained checkpoint references the shared file.
    pub fn references(&self, shared_file: &str) -> bool {
        self.refs.contains_key(shared_file)
    }

    /// The newest completed checkpoint.
    pub fn latest(&self) -> Option<CheckpointId> {
        self.checkpoints.keys().next_back().copied()
    }

    /// All retained ids, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = CheckpointId> + '_ {
        self.checkpoints.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keeps_the_newest_and_deletes_shared_files_with_their_last_reference() {
        let mut c = CompletedCheckpoints::new(2);
        assert_eq!(c.add(CheckpointId(1), files(&["a", "b"])), Removed::default());
        assert_eq!(c.add(CheckpointId(2), files(&["b", "c"])), Removed::default());
        let r = c.add(CheckpointId(3), files(&["c", "d"]));
        assert_eq!(r.checkpoints, vec![CheckpointId(1)]);
        assert_eq!(r.shared_files, files(&["a"]));
        assert!(c.references("b") && c.references("d") && !c.references("a"));
        let r = c.discard(CheckpointId(3));
        assert_eq!(r.shared_files, files(&["d"]));
        assert_eq!(c.latest(), Some(CheckpointId(2)));
        assert_eq!(c.ids().collect::<Vec<_>>(), vec![CheckpointId(2)]);
    }

    proptest! {
        #[test]
        fn a_shared_file_is_deleted_exactly_when_no_retained_checkpoint_uses_it(
            refs in proptest::collection::vec(proptest::collection::vec(0u8..12, 0..6), 1..40),
            retained in 1usize..5,
        ) {
            let mut c = CompletedCheckpoints::new(retained);
            let mut deleted = BTreeSet::new();
            for (i, r) in refs.iter().enumerate() {
                let shared: Vec<String> = r.iter().map(|f| format!("f{f}")).collect();
                // A file deleted earlier is uploaded again under the same name.
                for f in &shared {
                    deleted.remove(f);
                }
                let removed = c.add(CheckpointId(i as u64 + 1), shared);
                for f in removed.shared_files {
                    prop_assert!(deleted.insert(f));
                }
                let kept: Vec<CheckpointId> = c.ids().collect();
                prop_assert_eq!(kept.len(), (i + 1).min(retained));
                let live: BTreeSet<String> = kept
                    .iter()
                    .flat_map(|id| refs[id.0 as usize - 1].iter().map(|f| format!("f{f}")))
                    .collect();
                for f in &live {
                    prop_assert!(c.references(f) && !deleted.contains(f));
                }
                for f in &deleted {
                    prop_assert!(!live.contains(f));
                }
            }
        }
    }
}
