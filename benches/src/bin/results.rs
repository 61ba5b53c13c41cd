//! `results`: reads criterion's output and writes `papers/results/merge.json` and `xml.json`.
//!
//! Usage: `results [--criterion-dir DIR] [--out-dir DIR] [--conditions TEXT]`. `--conditions`
//! records how the run was made (machine load, priority) in the results. The criterion directory
//! defaults to `$CARGO_TARGET_DIR/criterion`, else the workspace's `target/criterion`; the output
//! directory to the workspace's `papers/results`. Exit code 1 on any error, 2 on a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use benches::report::{machine, merge_results, scan, to_json, workspace_dir, xml_results};

struct Args {
    criterion_dir: PathBuf,
    out_dir: PathBuf,
    conditions: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut criterion_dir = None;
    let mut out_dir = None;
    let mut conditions = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let slot = match arg.as_str() {
            "--criterion-dir" => &mut criterion_dir,
            "--out-dir" => &mut out_dir,
            "--conditions" => &mut conditions,
            _ => bail!(
                "unknown argument {arg:?}; usage: results [--criterion-dir DIR] [--out-dir DIR] \
                 [--conditions TEXT]"
            ),
        };
        *slot = Some(args.next().with_context(|| format!("{arg} needs a value"))?);
    }
    let criterion_dir = criterion_dir.map(PathBuf::from).unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_dir().join("target"));
        target.join("criterion")
    });
    let out_dir =
        out_dir.map(PathBuf::from).unwrap_or_else(|| workspace_dir().join("papers").join("results"));
    Ok(Args { criterion_dir, out_dir, conditions: conditions.unwrap_or_default() })
}

fn run(args: &Args) -> anyhow::Result<()> {
    // The error names the directory or file it could not read.
    let measured = scan(&args.criterion_dir)?;
    let machine = machine(&args.conditions);
    let merge = merge_results(&measured, machine.clone());
    let xml = xml_results(&measured, machine);
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating {}", args.out_dir.display()))?;
    let mut written = 0;
    if !merge.cells.is_empty() {
        let path = args.out_dir.join("merge.json");
        std::fs::write(&path, to_json(&merge)).with_context(|| format!("writing {}", path.display()))?;
        println!("{}: {} cells", path.display(), merge.cells.len());
        written += 1;
    }
    if !xml.cells.is_empty() {
        let path = args.out_dir.join("xml.json");
        std::fs::write(&path, to_json(&xml)).with_context(|| format!("writing {}", path.display()))?;
        println!("{}: {} cells", path.display(), xml.cells.len());
        written += 1;
    }
    if written == 0 {
        bail!("no merge/ or xml/ benchmarks in {}", args.criterion_dir.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    if benches::help_requested(
        "results: criterion's output to papers/results/merge.json and xml.json\n\n\
         usage: results [--criterion-dir DIR] [--out-dir DIR] [--conditions TEXT]\n  \
         --criterion-dir DIR  criterion's output (default target/criterion)\n  \
         --out-dir DIR        where the JSON goes (default papers/results)\n  \
         --conditions TEXT    the machine and conditions, recorded beside the figures",
    ) {
        return ExitCode::SUCCESS;
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("results: {err:#}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("results: {err:#}");
            ExitCode::FAILURE
        }
    }
}
