//! Issue 11, defect 10: `relay.redb` and `node.redb` were created world-readable (0644) though
//! they hold content and password and token hashes. The store creates its file 0600 before
//! redb opens it, and tightens an existing one on open, as key files are.

#[cfg(unix)]
#[test]
fn a_database_is_created_private_and_an_existing_one_is_tightened() {
    use feedmesh_transport::store::Store;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let mode = || std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    drop(Store::open(&path, "node").unwrap());
    assert_eq!(mode(), 0o600, "a new database");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = Store::open(&path, "node").unwrap();
    assert_eq!(mode(), 0o600, "an existing one is tightened");
    assert!(store.schema_version().unwrap() > 0, "and it is still the same database");
}
