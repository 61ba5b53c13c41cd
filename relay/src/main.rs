//! `feedmesh-relay`: the cloud/relay binary. A placeholder until the directory, tickets and relay
//! land; it parses its command line and says what it cannot do yet.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "feedmesh-relay", version, about = "feedmesh cloud relay (not yet implemented)")]
struct Cli {}

fn main() -> std::process::ExitCode {
    let _cli = Cli::parse();
    eprintln!("feedmesh-relay: the relay is not implemented yet; see ARCHITECTURE.md");
    std::process::ExitCode::from(1)
}
