//! Helpers shared by the end-to-end tests in `tests/`.

use sluice_runtime::snapshot::CheckpointMetadata;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The `sluice` binary built next to the test executable (`cargo build --bins` first).
pub fn sluice_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let bin = dir.join("sluice");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bins` before the tests (scripts/test does)",
        bin.display()
    );
    bin
}

/// The expected output of `transactions`, as the sink writes it.
pub fn expected_transactions_output(events: u64, users: u64, seed: u64) -> String {
    sluice_examples::transactions::expected_totals(events, users, seed)
        .iter()
        .map(|t| format!("{t}\n"))
        .collect()
}

/// Every file below `dir`, relative to it.
pub fn files_below(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(p).expect("readable dir") {
            let path = e.expect("dir entry").path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(
                    path.strip_prefix(base)
                        .expect("below base")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = BTreeSet::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// Asserts that a checkpoint base directory holds only completed checkpoints, each holding
/// exactly the files its `_metadata` references, and that every file under a job's `shared/`
/// is referenced by one of its retained checkpoints; returns the checkpoint ids per job.
pub fn assert_only_completed_checkpoints(base: &Path) -> BTreeMap<String, Vec<u64>> {
    let mut jobs = BTreeMap::new();
    for job in std::fs::read_dir(base).expect("checkpoint dir exists") {
        let job = job.expect("entry").path();
        let name = job.file_name().expect("name").to_string_lossy().into_owned();
        assert!(job.is_dir(), "unexpected file {} in the checkpoint dir", job.display());
        let mut ids = Vec::new();
        let mut shared_referenced = BTreeSet::new();
        for chk in std::fs::read_dir(&job).expect("job dir") {
            let chk = chk.expect("entry").path();
            let chk_name = chk.file_name().expect("name").to_string_lossy().into_owned();
            if chk_name == "shared" {
                continue;
            }
            let id: u64 = chk_name
                .strip_prefix("chk-")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("orphan entry {} in job dir", chk.display()));
            let meta_path = chk.join("_metadata");
            let bytes = std::fs::read(&meta_path)
                .unwrap_or_else(|_| panic!("partial checkpoint without _metadata: {}", chk.display()));
            let meta = CheckpointMetadata::decode(&bytes, &meta_path.display().to_string()).expect("valid metadata");
            let mut referenced: BTreeSet<String> = meta.referenced_files().map(|h| h.path.clone()).collect();
            referenced.extend(meta.sst_files().filter(|f| !f.shared).map(|f| f.path.clone()));
            referenced.insert("_metadata".into());
            assert_eq!(
                files_below(&chk),
                referenced,
                "files of {} vs its _metadata",
                chk.display()
            );
            shared_referenced.extend(
                meta.shared_files()
                    .map(|f| f.strip_prefix("shared/").unwrap_or(f).to_string()),
            );
            ids.push(id);
        }
        let shared = files_below(&job.join("shared"));
        assert_eq!(
            shared,
            shared_referenced,
            "files under {}/shared vs the retained checkpoints",
            job.display()
        );
        ids.sort();
        jobs.insert(name, ids);
    }
    jobs
}

/// The newest `chk-<n>` directory with a `_metadata` under a job directory.
pub fn latest_completed_checkpoint(job_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(job_dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("_metadata").exists())
        .filter_map(|p| {
            let id: u64 = p.file_name()?.to_str()?.strip_prefix("chk-")?.parse().ok()?;
            Some((id, p))
        })
        .max_by_key(|(id, _)| *id)
        .map(|(_, p)| p)
}

/// The only job directory under a checkpoint base directory.
pub fn single_job_dir(base: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(base)
        .expect("checkpoint dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "expected one job directory in {}: {dirs:?}",
        base.display()
    );
    dirs.into_iter().next().expect("one")
}
