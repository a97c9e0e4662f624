//! The `sluice` binary: the CLI with the example jobs registered.

fn main() -> std::process::ExitCode {
    sluice_coordinator::cli::main(sluice_examples::registry())
}
