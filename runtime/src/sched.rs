//! Scheduling of background threads: checkpoint work must not take the core from a task thread
//! the moment it is woken up, or the barrier that woke it pauses record processing.

/// Runs the calling thread under `SCHED_BATCH` at its current niceness: Linux then never lets it
/// preempt a running thread when it wakes up, while it keeps its fair share of the CPU. Where the
/// policy cannot be set, the thread runs as before; this is a latency refinement, not a
/// correctness matter. Elsewhere than on Linux it does nothing.
pub fn run_as_background() {
    #[cfg(target_os = "linux")]
    if let Err(e) = linux::batch_at_current_niceness() {
        tracing::debug!("background thread keeps its scheduling policy: {e}");
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy, ThreadSchedulePolicy,
    };
    use thread_priority::{ThreadPriority, ThreadPriorityValue};

    const BATCH: ThreadSchedulePolicy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);

    /// Field `n` (1-based, as in proc(5)) of /proc/thread-self/stat.
    pub(super) fn stat_field(n: usize) -> Result<i64, String> {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").map_err(|e| e.to_string())?;
        // The command name (field 2) is parenthesised and may hold spaces: count from its end.
        let rest = stat.rfind(')').map(|i| &stat[i + 2..]).ok_or("unreadable stat")?;
        rest.split(' ')
            .nth(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("no field {n} in stat"))
    }

    pub(super) fn batch_at_current_niceness() -> Result<(), String> {
        let nice = stat_field(19)?;
        // The crate sets niceness through its 0..=99 scale: take the value it maps to ours.
        let priority = (0..=*ThreadPriorityValue::MAX)
            .filter_map(|p| ThreadPriorityValue::try_from(p).ok().map(ThreadPriority::Crossplatform))
            .find(|p| p.to_posix(BATCH).is_ok_and(|v| i64::from(v) == nice))
            .ok_or_else(|| format!("niceness {nice} has no priority value"))?;
        set_thread_priority_and_policy(thread_native_id(), priority, BATCH).map_err(|e| format!("{e:?}"))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::stat_field;
    use super::*;

    #[test]
    fn a_background_thread_runs_batch_at_unchanged_niceness() {
        let (nice_before, policy, nice_after) = std::thread::spawn(|| {
            let before = stat_field(19).unwrap();
            run_as_background();
            (before, stat_field(41).unwrap(), stat_field(19).unwrap())
        })
        .join()
        .unwrap();
        const SCHED_BATCH: i64 = 3;
        assert_eq!((policy, nice_after), (SCHED_BATCH, nice_before));
    }
}
