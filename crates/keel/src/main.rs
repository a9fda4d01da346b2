//! The `keel` binary: parse the command line, install logging, run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = keel::cli::Cli::parse();
    keel::cli::init_tracing(&cli.log_level);
    keel::cli::run(cli)
}
