//! libFuzzer entry for the `folder_entry` target; the body is `fuzzing::TARGETS` (fuzzing/src), replayed
//! by `cargo test -p feedmesh-fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: { (fuzzing::target("folder_entry").expect("a known target").prepare)() }, |data: &[u8]| {
    (fuzzing::target("folder_entry").expect("a known target").run)(data);
});
