//! Coverage-guided fuzzing of the FeedSync XML reader: no input panics, and whatever is
//! accepted holds the invariants and round-trips byte-stably through the writer.
#![no_main]

use engine::feedsync::xml;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(feed) = xml::read_feed(data) {
        feed.check_invariants().expect("accepted feeds hold the invariants");
        let written = xml::write_feed(&feed);
        let again = xml::read_feed(written.as_bytes()).expect("what we write we can read");
        assert_eq!(xml::write_feed(&again), written, "writing is stable");
    }
});
