//! The mesh security model (issue 5) in the simulator: one CI scenario per adversary of the
//! threat model, each asserting its outcome (refusals by reason, no leak to a removed member, no
//! forged version in an honest replica, convergence of the honest devices).

use netsim::mesh::MeshReport;
use netsim::{run, Report, Scenario};

/// Runs a mesh scenario; the run must pass every check (the honest devices converge with no lost
/// write, no forged version in an honest replica, no leak to a removed member).
fn check(text: &str) -> (Report, MeshReport) {
    let scenario = Scenario::parse(text).expect("scenario parses");
    let report = run(&scenario, scenario.seed, &mut |_, _| {});
    let mesh = report.mesh.clone().expect("a mesh scenario reports the mesh section");
    println!(
        "scenario {}: {} writes, {} sessions ({} failed), {} expected devices, refusals {:?}, forged made {} \
         rejected {} present {}, removed leaks {}",
        report.scenario,
        report.writes,
        report.sessions_started,
        report.sessions_failed,
        mesh.expected_devices,
        mesh.refusals,
        mesh.forged_made,
        mesh.forged_rejected,
        mesh.forged_present,
        mesh.removed_leaks
    );
    assert!(report.failure.is_none(), "{}: {:?}", report.scenario, report.failure);
    assert!(report.converged);
    assert_eq!(report.lost_writes, 0);
    assert_eq!(report.unconverged_writes, 0);
    assert!(report.writes > 0, "the scenario made writes");
    assert_eq!(mesh.forged_present, 0);
    assert_eq!(mesh.removed_leaks, 0);
    assert!(mesh.sessions_done > 0, "authorized sessions completed");
    (report, mesh)
}

fn refused(mesh: &MeshReport, reason: &str) -> u64 {
    mesh.refusals.get(reason).copied().unwrap_or(0)
}

#[test]
fn a_removed_member_gets_nothing_new_and_the_rest_converge() {
    let (report, mesh) = check(include_str!("../scenarios/member-removed.toml"));
    // 16 devices and the cloud's replica; user 3's four devices are removed.
    assert_eq!(report.nodes, 17);
    assert_eq!(mesh.expected_devices, 13);
    assert_eq!(mesh.removed_leaks, 0);
    // The removed devices did sync (before the removal), so no leak is not for want of traffic.
    assert!(mesh.removed_received > 0);
    // The removal spread by directory catch-up to every device (the removed ones included)...
    assert_eq!(mesh.removal_known_by, 17);
    // ...so devices refused the removed member by their own directory, and then the cloud's
    // re-issued tickets no longer granted the folder.
    assert!(refused(&mesh, "not-member") > 0, "{:?}", mesh.refusals);
    assert!(refused(&mesh, "ticket-folder-not-granted") > 0, "{:?}", mesh.refusals);
    assert!(mesh.refusal_first_ms["not-member"] >= 20_000, "no refusal before the removal");
}

#[test]
fn expired_tickets_are_refused_after_the_skew_allowance() {
    let (_, mesh) = check(include_str!("../scenarios/expired-tickets.toml"));
    assert_eq!(mesh.expected_devices, 10);
    assert!(refused(&mesh, "ticket-expired") > 0, "{:?}", mesh.refusals);
    // The last ticket was issued at 10 s for 20 s; verifiers allow 120 s of skew.
    let first = mesh.refusal_first_ms["ticket-expired"];
    assert!((150_000..160_000).contains(&first), "first expiry refusal at {first} ms");
    assert_eq!(
        refused(&mesh, "ticket-expired") + refused(&mesh, "peer-refused"),
        mesh.refusals.values().sum::<u64>()
    );
}

#[test]
fn forged_versions_are_refused_by_every_honest_replica() {
    let (_, mesh) = check(include_str!("../scenarios/forged-signatures.toml"));
    assert!(mesh.forged_made > 10, "{}", mesh.forged_made);
    assert!(mesh.forged_rejected > 0);
    assert_eq!(refused(&mesh, "forged-version"), mesh.forged_rejected);
    assert_eq!(mesh.forged_present, 0);
}

#[test]
fn a_replayed_ticket_is_refused() {
    let (_, mesh) = check(include_str!("../scenarios/replayed-ticket.toml"));
    assert_eq!(mesh.expected_devices, 10);
    assert!(refused(&mesh, "ticket-wrong-channel") > 0, "{:?}", mesh.refusals);
    assert_eq!(
        refused(&mesh, "ticket-wrong-channel") + refused(&mesh, "peer-refused"),
        mesh.refusals.values().sum::<u64>(),
        "nothing else was refused"
    );
}

#[test]
fn skew_within_the_allowance_syncs_and_beyond_it_is_refused() {
    let (_, mesh) = check(include_str!("../scenarios/skewed-expiry.toml"));
    // The devices at -100 s and +100 s are among the ten that converged; +-200 s are not.
    assert_eq!(mesh.expected_devices, 10);
    assert!(refused(&mesh, "ticket-expired") > 0, "{:?}", mesh.refusals);
    assert!(refused(&mesh, "ticket-not-yet-valid") > 0, "{:?}", mesh.refusals);
}

#[test]
fn a_cloud_cannot_inject_a_device_or_a_version() {
    let (_, mesh) = check(include_str!("../scenarios/cloud-injection.toml"));
    assert_eq!(mesh.expected_devices, 10);
    // The cloud-signed AddDevice is refused when offered, and without it the device is unknown.
    assert!(refused(&mesh, "directory-change-refused") > 0, "{:?}", mesh.refusals);
    assert!(refused(&mesh, "device-not-active") > 0, "{:?}", mesh.refusals);
    // Versions altered in transit are refused whole.
    assert!(mesh.forged_made > 0 && mesh.forged_rejected > 0);
    assert_eq!(mesh.forged_present, 0);
}

#[test]
fn a_disabled_mesh_section_changes_nothing() {
    let base = include_str!("../scenarios/partition-heal.toml");
    let plain = Scenario::parse(base).unwrap();
    let off = Scenario::parse(&format!("{base}[mesh]\nenabled = false\nusers = 2\n")).unwrap();
    let (a, b) = (run(&plain, 3, &mut |_, _| {}), run(&off, 3, &mut |_, _| {}));
    assert_eq!(a.trace_hash, b.trace_hash);
    assert!(a.mesh.is_none() && b.mesh.is_none());
}

#[test]
fn one_mesh_seed_replays_bit_for_bit() {
    let scenario = Scenario::parse(include_str!("../scenarios/cloud-injection.toml")).unwrap();
    let (a, b) = (run(&scenario, 9, &mut |_, _| {}), run(&scenario, 9, &mut |_, _| {}));
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.mesh.unwrap().refusals, b.mesh.unwrap().refusals);
}

#[test]
fn bad_mesh_sections_name_the_field() {
    let head = "devices = 8\nduration_ms = 1000\n[mesh]\nenabled = true\n";
    let cases = [
        ("users = 0\n", "mesh.users"),
        ("users = 9\n", "mesh.users"),
        ("ticket_lifetime_ms = 7200000\n", "mesh.ticket_lifetime_ms"),
        ("remove_user = 1\n", "mesh.remove_at_ms"),
        ("remove_at_ms = 5\n", "mesh.remove_user"),
        ("users = 3\nremove_user = 3\nremove_at_ms = 5\n", "mesh.remove_user"),
        ("forgers = [1]\n", "mesh.forgers"),
        ("replayers = [9]\n", "mesh.replayers"),
        ("stale_tickets = [3]\ninjected = [3]\n", "mesh.injected"),
        ("forge_every_ms = 0\n", "mesh.forge_every_ms"),
        ("cloud_tamper_ppm = 2000000\n", "mesh.cloud_tamper_ppm"),
        ("skews_ms = [[0, 5]]\n", "mesh.skews_ms"),
        ("skews_ms = [[2, 90000000]]\n", "mesh.skews_ms"),
        ("frob = 1\n", "frob"),
    ];
    for (tail, field) in cases {
        let text = format!("{head}{tail}");
        let err = Scenario::parse(&text).expect_err(&text).to_string();
        assert!(err.contains(field), "{text:?}: {err}");
    }
    let noop = "devices = 8\nduration_ms = 1000\nmodel = \"noop\"\n[mesh]\nenabled = true\n";
    assert!(Scenario::parse(noop).unwrap_err().to_string().contains("mesh.enabled"));
}

#[test]
fn mesh_scenarios_round_trip_through_toml() {
    // Shrink and sweep re-read edited scenarios from their TOML.
    for text in [
        include_str!("../scenarios/member-removed.toml"),
        include_str!("../scenarios/skewed-expiry.toml"),
        include_str!("../scenarios/cloud-injection.toml"),
    ] {
        let scenario = Scenario::parse(text).unwrap();
        let again = Scenario::parse(&toml::to_string(&scenario).unwrap()).unwrap();
        assert_eq!(scenario.mesh, again.mesh);
    }
}

// ------------------------------------------------------------------ the control plane, per kind
// Each control message kind runs over the simulated network (loss, duplication, latency jitter
// that reorders) between the engine's Device and Cloud; ticket requests lost while the cloud is
// down and retried are in tests/scenarios.rs (`the_mesh_cloud_crashes_...`).

fn kind(report: &Report, kind: &str) -> u64 {
    report.message_kinds.get(kind).map_or(0, |k| k.0)
}

#[test]
fn a_pairing_completes_across_a_partition() {
    let (report, mesh) = check(include_str!("../scenarios/late-pairing.toml"));
    // Both late devices paired in, after the heal at 30 s, and converged with the rest.
    assert_eq!(mesh.pairings_completed, 2);
    assert!(mesh.last_pairing_ms > 30_000, "paired at {} ms", mesh.last_pairing_ms);
    assert_eq!(mesh.expected_devices, 13);
    // Pair requests were lost in the partition and retried; each step ran.
    assert!(kind(&report, "pair-request") > 2, "{:?}", report.message_kinds);
    assert_eq!(kind(&report, "pair-id answer"), 2);
    for step in ["pair-status answer", "pair-nonce", "pair-consent"] {
        assert!(kind(&report, step) >= 2, "{step}: {:?}", report.message_kinds);
    }
    // A device that is not active runs no session: it learns it was added only from the
    // directory pulled over the control plane.
    assert!(kind(&report, "directory answer") > 0);
}

#[test]
fn peers_come_from_the_clouds_address_book() {
    // Topology "mesh": devices sync only with the peers the cloud named in answer to Peers, from
    // the addresses devices announced.
    let (report, mesh) = check(include_str!("../scenarios/expired-tickets.toml"));
    assert!(kind(&report, "announce") > 0 && kind(&report, "peers answer") > 0);
    assert!(mesh.sessions_done > 0);
}

#[test]
fn notices_speed_things_up_and_lost_ones_cost_only_time() {
    let text = include_str!("../scenarios/member-removed.toml");
    let (with, mesh_with) = check(text);
    assert!(mesh_with.notices_sent > 0 && mesh_with.notices_dropped == 0);
    assert_eq!(kind(&with, "Notice"), mesh_with.notices_sent);
    // Every notice dropped: devices still catch up on their own schedule.
    let (_, mesh_without) = check(&format!("{text}notice_loss_ppm = 1000000\n"));
    assert!(mesh_without.notices_sent > 0);
    assert_eq!(mesh_without.notices_dropped, mesh_without.notices_sent);
    assert_eq!(mesh_without.expected_devices, 13);
}
