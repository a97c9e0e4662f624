//! The `sluice` binary: the CLI with the example jobs registered.

// Windows allocate and free per key and window across threads, where mimalloc is faster than
// glibc's allocator (BENCHMARKS.md, event-time windows).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_coordinator::cli::main(sluice_examples::registry())
}
