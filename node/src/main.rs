//! `feedmesh`: the device binary. For now it carries the FeedSync command line (merge, update,
//! purge, validate), a thin layer over `engine::feedsync`.
//!
//! Exit status: 0 success; 1 invalid input (a one-line message on stderr naming the file and the
//! problem; `validate` prints its problems on stdout); 2 usage errors (clap's own).

mod feedsync_cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "feedmesh", version, about = "feedmesh device: FeedSync feeds, synced over a mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read, merge, change and check FeedSync feeds (RSS 2.0 or Atom).
    Feedsync {
        #[command(subcommand)]
        command: feedsync_cli::FeedsyncCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Feedsync { command } => feedsync_cli::run(command),
    }
}
