//! The model-checked protocol (issue 15, item 4) at the bound the default suite runs: every
//! configuration of `proofs::model::configurations(false)`, each property holding; and the planted
//! cursor bug of the swarm test found by the same model. See `proofs/src/model.rs` and
//! `proofs/README.md` (larger bounds: `cargo run --release -p feedmesh-proofs --bin feedmesh-model`).

use engine::sync::PlantedBug;
use proofs::model::{check, check_model, configurations, Variant};

#[test]
fn every_property_holds_at_the_small_bound() {
    for config in configurations(false) {
        let report = check(&config, 2);
        println!(
            "{}: {} distinct states ({} generated), depth {}, {:.1} s",
            report.name, report.distinct_states, report.generated_states, report.max_depth, report.seconds
        );
        assert!(report.counterexample.is_none(), "{}", report.counterexample.unwrap());
        assert!(report.distinct_states > 100, "{} explored too little", report.name);
    }
}

#[test]
fn the_model_finds_the_planted_cursor_bug() {
    let config = configurations(false).into_iter().find(|c| c.variant == Variant::Members).unwrap();
    let mut model = config.model();
    model.cfg.planted_bug = Some(PlantedBug::CursorSkipsOneChange);
    let report = check_model("planted cursor bug", model, 2, None);
    let failed: Vec<_> = report.properties.iter().filter(|(_, holds)| !holds).map(|(p, _)| *p).collect();
    println!("{:?}\n{}", failed, report.counterexample.as_deref().unwrap_or(""));
    assert!(failed.contains(&"no cursor skips a change"), "the planted bug was not found: {failed:?}");
}
