//! The `keel` binary: parse the command line, install logging, run.

use std::process::ExitCode;

use clap::Parser;

/// The servers allocate and free small buffers on every request; a profile of the
/// gateway under load spent about 12% of its time in glibc's malloc and free, and
/// mimalloc raised its throughput by about 20% (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = keel::cli::Cli::parse();
    keel::cli::init_tracing(&cli.log_level);
    keel::cli::run(cli)
}
