//! Sweeps: grid files resolve to cells in a fixed order, bad grids are refused naming the path,
//! and the CLI writes one CSV/JSON row per run in grid order, the same on every run.

use std::path::{Path, PathBuf};
use std::process::Command;

use netsim::sweep::{set_path, Grid, GridError};
use netsim::Scenario;

fn dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_feedmesh-sim")).args(args).output().expect("run feedmesh-sim")
}

const TINY: &str = "name = \"tiny\"\ndevices = 4\nlan_group = 2\nduration_ms = 3000\nquiet_ms = 8000\n\
    sync_interval_ms = 500\n[workload]\nwrites_per_min = 30.0\nitems = 5\n";

#[test]
fn cli_sweep_writes_rows_in_grid_order_deterministically() {
    let dir = dir("feedmesh-sim-sweep");
    std::fs::write(dir.join("tiny.toml"), TINY).unwrap();
    let grid = dir.join("grid.toml");
    std::fs::write(
        &grid,
        "base = \"tiny.toml\"\nseeds = [3, 1]\n[vary]\n\"network.loss_ppm\" = [0, 100000]\n",
    )
    .unwrap();
    let mut csvs = Vec::new();
    for (run, jobs) in [(1, "2"), (2, "1")] {
        let out_dir = dir.join(format!("out{run}"));
        let out = sim(&["sweep", grid.to_str().unwrap(), "--jobs", jobs, "--out", out_dir.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let csv = std::fs::read_to_string(out_dir.join("sweep.csv")).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 5, "{csv}");
        assert!(lines[0].starts_with("network.loss_ppm,seed,converged,convergence_ms_p50,"), "{csv}");
        for column in
            ["lost_writes", "messages", "bytes", "events", "virtual_ms", "wall_ms", "trace_hash", "failure"]
        {
            assert!(lines[0].split(',').any(|c| c == column), "no {column} in {}", lines[0]);
        }
        let keys: Vec<String> =
            lines[1..].iter().map(|l| l.split(',').take(3).collect::<Vec<_>>().join(",")).collect();
        assert_eq!(keys, ["0,3,true", "0,1,true", "100000,3,true", "100000,1,true"]);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join("sweep.json")).unwrap()).unwrap();
        let rows = json["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[2]["params"]["network.loss_ppm"], 100000);
        assert_eq!(rows[2]["seed"], 3);
        assert!(rows[0]["writes"].as_u64().unwrap() > 0);
        let cells = json["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 2);
        assert_eq!(cells[1]["runs"], 2);
        assert_eq!(cells[1]["failures"], 0);
        let messages = &cells[1]["figures"]["messages"];
        assert!(messages["min"].as_u64() <= messages["max"].as_u64());
        let mean = messages["mean"].as_f64().unwrap();
        assert!(
            messages["min"].as_u64().unwrap() as f64 <= mean
                && mean <= messages["max"].as_u64().unwrap() as f64
        );
        // Everything but wall_ms is the same whatever the threads did.
        let wall = lines[0].split(',').position(|c| c == "wall_ms").unwrap();
        let stable: Vec<String> = lines
            .iter()
            .map(|l| {
                l.split(',')
                    .enumerate()
                    .filter(|(i, _)| *i != wall)
                    .map(|(_, f)| f)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        csvs.push(stable);
    }
    assert_eq!(csvs[0], csvs[1]);
    // Another loss rate or seed is another run.
    let hash = |row: &str| row.split(',').find(|f| f.len() == 64).map(String::from);
    assert!(hash(&csvs[0][1]).is_some());
    assert_ne!(hash(&csvs[0][1]), hash(&csvs[0][2]));
    assert_ne!(hash(&csvs[0][1]), hash(&csvs[0][3]));
}

#[test]
fn cli_bad_grid_exits_2_naming_the_path() {
    let dir = dir("feedmesh-sim-sweep-bad");
    let grid = dir.join("bad.toml");
    std::fs::write(&grid, "base = \"default\"\nseeds = 2\n[vary]\n\"network.loss_pm\" = [0, 1]\n").unwrap();
    let out = sim(&["sweep", grid.to_str().unwrap(), "--out", dir.join("out").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("network.loss_pm") && stderr.contains("unknown field"), "{stderr}");
    assert!(!stderr.contains("line "), "no excerpt of TOML the user never wrote: {stderr}");
    assert!(!dir.join("out").join("sweep.csv").exists());
}

fn plan_error(text: &str) -> String {
    let grid = match Grid::parse(text, Path::new(".")) {
        Ok(grid) => grid,
        Err(e) => return e.to_string(),
    };
    match grid.plan() {
        Ok(_) => panic!("{text:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_grids_name_the_field_or_path() {
    let cases = [
        ("seeds = 1\n[vary]\n\"faults.crash_per_min\" = [1.0]\n", "faults.crash_per_min"),
        ("seeds = 1\n[vary]\n\"network.loss_ppm\" = [2000000]\n", "network.loss_ppm"),
        ("seeds = 1\n[vary]\n\"devices\" = [\"many\"]\n", "devices"),
        ("seeds = 1\n[vary]\n\"devices\" = []\n", "devices"),
        ("seeds = 1\n[vary]\n\"devices\" = 5\n", "devices"),
        ("seeds = 1\n[vary]\n\"partitions.3.share_ppm\" = [1]\n", "partitions.3.share_ppm"),
        ("seeds = 1\n[vary]\n\"devices.count\" = [1]\n", "devices.count"),
        ("seeds = 1\n[vary]\n\"seed\" = [1]\n", "seed"),
        ("seeds = 1\n[set]\n\"workload.itemz\" = 3\n", "workload.itemz"),
        ("seeds = 0\n", "seeds"),
        ("seeds = []\n", "seeds"),
        ("seeds = [-1]\n", "seeds"),
        ("[vary]\ndevices = [1]\n", "seeds"),
        ("seeds = 1\nvary_me = 2\n", "vary_me"),
        ("seeds = 1\nbase = \"no-such-base.toml\"\n", "no-such-base.toml"),
    ];
    for (text, name) in cases {
        let err = plan_error(text);
        assert!(err.contains(name), "{text:?}: {err}");
    }
}

#[test]
fn cells_are_the_cartesian_product_in_path_order() {
    let text = "seeds = 3\n[set]\ndevices = 9\n[vary]\n\"workload.items\" = [7, 8]\n\"faults.clock_skew_ms\" = [0, 10, 20]\n";
    let grid = Grid::parse(text, Path::new(".")).unwrap();
    assert_eq!(grid.seeds, [1, 2, 3]);
    let plan = grid.plan().unwrap();
    assert_eq!(plan.paths, ["faults.clock_skew_ms", "workload.items"]);
    assert_eq!(plan.runs(), 18);
    let got: Vec<(u64, u32, u32)> = plan
        .cells
        .iter()
        .map(|c| (c.scenario.faults.clock_skew_ms, c.scenario.workload.items, c.scenario.devices))
        .collect();
    assert_eq!(
        got,
        [(0, 7, 9), (0, 8, 9), (10, 7, 9), (10, 8, 9), (20, 7, 9), (20, 8, 9)],
        "first path slowest, [set] applied to every cell"
    );
}

#[test]
fn set_path_reaches_lists_tables_and_absent_sections() {
    let base = Scenario::default_scenario();
    let s = set_path(&base, "partitions.0.share_ppm", &toml::Value::Integer(1234)).unwrap();
    assert_eq!(s.partitions[0].share_ppm, 1234);
    let wan: toml::Value =
        toml::from_str::<toml::Table>("v = { dist = \"constant\", ms = 7 }").unwrap()["v"].clone();
    let s = set_path(&base, "network.wan", &wan).unwrap();
    assert!(matches!(s.network.wan, netsim::scenario::Latency::Constant { ms: 7 }));
    let s = set_path(&base, "workload.writes_per_min", &toml::Value::Integer(3)).unwrap();
    assert_eq!(s.workload.writes_per_min, 3.0);
    let err = set_path(&base, "network.burst.p_ppm", &toml::Value::Integer(5)).unwrap_err();
    assert!(matches!(&err, GridError::Path { path, .. } if path == "network.burst.p_ppm"), "{err}");
    let mut with_burst = base.clone();
    with_burst.network.burst = Some(netsim::scenario::Burst { p_ppm: 1, r_ppm: 2, bad_loss_ppm: 3 });
    let s = set_path(&with_burst, "network.burst.p_ppm", &toml::Value::Integer(5)).unwrap();
    assert_eq!(s.network.burst.map(|b| (b.p_ppm, b.r_ppm)), Some((5, 2)));
}

#[test]
fn the_readme_grid_plans() {
    let readme = include_str!("../README.md");
    let start = readme.find("```toml\nbase = ").expect("the README shows a grid") + "```toml\n".len();
    let text = &readme[start..][..readme[start..].find("```").unwrap()];
    let plan = Grid::parse(text, Path::new(".")).unwrap().plan().unwrap();
    assert_eq!(plan.cells.len(), 3 * 2 * 2 * 2);
    assert_eq!(plan.seeds, [1, 2, 3, 4]);
    assert!(plan.cells.iter().all(|c| c.scenario.devices == 100));
}

#[test]
fn the_example_grid_plans() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sweeps/loss.toml");
    let plan = Grid::load(&path).unwrap().plan().unwrap();
    assert_eq!(plan.runs(), 27);
}

#[test]
fn cli_sweep_with_failures_exits_1_and_writes_replayable_scenarios() {
    let dir = dir("feedmesh-sim-sweep-fail");
    // Writes until 0.3 s before the end, syncs every 2 s: without the quiet phase the last writes
    // cannot reach everyone; with 10 s of it they do.
    std::fs::write(
        dir.join("base.toml"),
        "devices = 4\nduration_ms = 6000\nsync_interval_ms = 2000\n[workload]\nwrites_per_min = 60.0\n",
    )
    .unwrap();
    let grid = dir.join("grid.toml");
    std::fs::write(&grid, "base = \"base.toml\"\nseeds = [2]\n[vary]\nquiet_ms = [300, 10000]\n").unwrap();
    let out_dir = dir.join("out");
    let out = sim(&["sweep", grid.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let file = out_dir.join("fail-cell0-seed2.toml");
    assert!(
        stderr.contains(&format!("replay with: feedmesh-sim run {} --seed 2", file.display())),
        "{stderr}"
    );
    assert!(!out_dir.join("fail-cell1-seed2.toml").exists(), "the second cell passed");
    let scenario = Scenario::parse(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!((scenario.quiet_ms, scenario.seed), (300, 2));
    let report = netsim::run(&scenario, 2, &mut |_, _| {});
    let csv = std::fs::read_to_string(out_dir.join("sweep.csv")).unwrap();
    let row = csv.lines().nth(1).unwrap();
    assert!(row.contains(&report.trace_hash), "the file replays the run: {row}");
    assert!(report.failure.is_some_and(|f| row.contains(&f)), "{row}");
    assert!(row.ends_with("fail-cell0-seed2.toml"), "{row}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(json["cells"][0]["failures"], 1);
    assert_eq!(json["cells"][1]["failures"], 0);
}
