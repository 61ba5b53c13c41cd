//! libFuzzer entry for the `session_responder` target; the body is `fuzzing::TARGETS` (fuzzing/src), replayed
//! by `cargo test -p feedmesh-fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: { (fuzzing::target("session_responder").expect("a known target").prepare)() }, |data: &[u8]| {
    (fuzzing::target("session_responder").expect("a known target").run)(data);
});
