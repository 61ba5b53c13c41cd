//! Every benchmark binary answers `--help` with its usage and runs nothing (issue 13, item 4:
//! `sync_sweep --help` used to start a sweep).

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn every_binary_answers_help_without_running() {
    for bin in [
        env!("CARGO_BIN_EXE_sync_sweep"),
        env!("CARGO_BIN_EXE_results"),
        env!("CARGO_BIN_EXE_relay_churn"),
        env!("CARGO_BIN_EXE_relay_load"),
        env!("CARGO_BIN_EXE_e2e_sync"),
    ] {
        let t0 = Instant::now();
        let out = Command::new(bin).arg("--help").output().unwrap();
        assert!(out.status.success(), "{bin} --help: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap().to_lowercase();
        assert!(text.contains("usage"), "{bin} --help prints its usage: {text}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{bin} --help ran something: {:?}", t0.elapsed());
    }
}
