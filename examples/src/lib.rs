//! # Sluice example jobs
//!
//! Real jobs, registered by name in the `sluice` binary ([`registry`]):
//!
//! - [`transactions`]: a running total and count per user over a deterministic stream of
//!   transactions, with an injectable failure; its exact expected output is computable directly.
//! - [`wordcount`]: word counts over text files.

pub mod transactions;
pub mod wordcount;

use sluice_runtime::JobRegistry;

/// Every example job.
pub fn registry() -> JobRegistry {
    let mut r = JobRegistry::new();
    r.register(transactions::definition());
    r.register(wordcount::definition());
    r
}
