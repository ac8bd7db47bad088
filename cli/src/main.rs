//! `capstan`: submit pipelines to a coordinator and watch them run.

use clap::Parser;

fn main() -> std::process::ExitCode {
    capstan_cli::main(capstan_cli::args::Cli::parse())
}
