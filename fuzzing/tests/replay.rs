//! Replays every committed fuzz corpus (`fuzzing/corpus/<target>/`) and crash regression
//! (`fuzzing/regressions/<target>/`) through the same target bodies libFuzzer runs, and holds
//! each input to its target's memory [`Budget`]: a counting global allocator measures, on the
//! thread that runs the input, the most bytes live at once above what was live before it, and
//! all bytes allocated during it. An input that loops is caught by a deadline per input (a
//! watchdog thread), one that allocates without bound by a hard cap in the allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use fuzzing::{Budget, Target, TARGETS};

/// Counts what the current thread allocates while [`ARMED`] is set for it.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
    static TOTAL: Cell<u64> = const { Cell::new(0) };
    static CAP: Cell<i64> = const { Cell::new(i64::MAX) };
}

/// Inputs over their hard cap (the allocation then fails, which aborts the process; this is what
/// the abort message is preceded by).
static OVER_CAP: AtomicU64 = AtomicU64::new(0);

fn counted(size: usize) -> bool {
    let Ok(armed) = ARMED.try_with(Cell::get) else { return true };
    if !armed {
        return true;
    }
    let size = size as i64;
    let live = LIVE.with(|l| {
        let v = l.get() + size;
        l.set(v);
        v
    });
    PEAK.with(|p| p.set(p.get().max(live)));
    TOTAL.with(|t| t.set(t.get() + size as u64));
    // A panicking input's message and backtrace are the harness's, not the input's: capping them
    // turned a clean test failure into an abort inside the panic hook (which then hung).
    if live > CAP.with(Cell::get) && !std::thread::panicking() {
        OVER_CAP.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    true
}

fn uncounted(size: usize) {
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        LIVE.with(|l| l.set(l.get() - size as i64));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counters
// are thread-local `Cell`s with const initialisers and no destructors, so touching them neither
// allocates nor re-enters the allocator. This is the crate's one `unsafe` (see Cargo.toml).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !counted(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `System::alloc`; the layout is the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !counted(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `System::alloc_zeroed`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        uncounted(layout.size());
        // SAFETY: `ptr` came from this allocator, which is `System`, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            if !counted(new_size - layout.size()) {
                return std::ptr::null_mut();
            }
        } else {
            uncounted(layout.size() - new_size);
        }
        // SAFETY: as for `System::realloc`, with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What one input cost.
#[derive(Clone, Copy, Debug)]
struct Cost {
    peak: u64,
    total: u64,
}

/// Disarms the counters when dropped, also when the measured code panics.
struct Armed;

impl Drop for Armed {
    fn drop(&mut self) {
        ARMED.with(|a| a.set(false));
    }
}

/// Runs `f` with the counters armed on this thread and a hard cap of `cap` live bytes.
fn measure(cap: u64, f: impl FnOnce()) -> Cost {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TOTAL.with(|t| t.set(0));
    CAP.with(|c| c.set(i64::try_from(cap).unwrap_or(i64::MAX)));
    ARMED.with(|a| a.set(true));
    let armed = Armed;
    f();
    drop(armed);
    Cost { peak: PEAK.with(Cell::get).max(0) as u64, total: TOTAL.with(Cell::get) }
}

/// Longest one input may run: far above any input's cost (milliseconds), far below a loop's.
const INPUT_DEADLINE: Duration = Duration::from_secs(120);

/// The hard cap on live bytes: what no budget comes near, so only a runaway input hits it.
const HARD_CAP_FACTOR: u64 = 8;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for folder in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(folder).join(target)) else { continue };
        for entry in entries {
            let path = entry.expect("a readable folder entry").path();
            if path.is_file() && !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Replays every input of `name` within its budget; returns how many ran.
fn replay(name: &str) -> usize {
    let target: &Target = fuzzing::target(name).expect("a known target");
    (target.prepare)();
    let files = inputs(name);
    // A watchdog: if an input does not finish in time, say which and fail the whole run.
    let (done, wait) = mpsc::channel::<()>();
    let (started, current) = mpsc::channel::<PathBuf>();
    let watchdog = std::thread::spawn(move || {
        while let Ok(path) = current.recv() {
            if wait.recv_timeout(INPUT_DEADLINE).is_err() {
                eprintln!("input {} ran over {INPUT_DEADLINE:?}", path.display());
                std::process::exit(101);
            }
        }
    });
    let mut failures = Vec::new();
    // FUZZ_REPLAY_REPORT=1 prints every input's cost (for setting budgets).
    let report = std::env::var_os("FUZZ_REPLAY_REPORT").is_some();
    for path in &files {
        let data = std::fs::read(path).expect("a readable input");
        let budget: Budget = target.budget;
        let cap = budget.peak_max(data.len()).saturating_mul(HARD_CAP_FACTOR);
        started.send(path.clone()).expect("the watchdog listens");
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| measure(cap, || (target.run)(&data))));
        done.send(()).expect("the watchdog listens");
        let Ok(cost) = ran else {
            // The panic message is above, in the test's output.
            failures.push(format!("{}: panicked", path.display()));
            continue;
        };
        if report {
            eprintln!(
                "{name} {} bytes: peak {} allocated {} ({})",
                data.len(),
                cost.peak,
                cost.total,
                path.display()
            );
        }
        if cost.peak > budget.peak_max(data.len()) || cost.total > budget.total_max(data.len()) {
            failures.push(format!(
                "{}: {} bytes in, peak {} (budget {}), allocated {} (budget {})",
                path.display(),
                data.len(),
                cost.peak,
                budget.peak_max(data.len()),
                cost.total,
                budget.total_max(data.len())
            ));
        }
    }
    drop(started);
    watchdog.join().expect("the watchdog ends");
    assert_eq!(OVER_CAP.load(Ordering::Relaxed), 0, "an input hit the hard memory cap");
    assert!(failures.is_empty(), "failed inputs:\n{}", failures.join("\n"));
    files.len()
}

/// Each committed target has a corpus: a target whose folder went missing would pass silently.
fn replay_some(name: &str) {
    let ran = replay(name);
    assert!(ran > 0, "no committed inputs for {name}");
}

#[test]
fn the_budget_catches_an_input_that_allocates_too_much() {
    let budget = Budget { peak_per_byte: 1, peak_base: 1024, total_per_byte: 1, total_base: 4096 };
    let cost = measure(u64::MAX, || {
        let v = vec![0u8; 10_000];
        std::hint::black_box(&v);
    });
    assert!(cost.peak >= 10_000 && cost.total >= 10_000, "{cost:?}");
    assert!(cost.peak > budget.peak_max(8));
    let small = measure(u64::MAX, || {
        std::hint::black_box(1 + 1);
    });
    assert_eq!(small.total, 0);
}

#[test]
fn every_target_is_replayed_here() {
    let here = include_str!("replay.rs");
    for target in TARGETS {
        assert!(
            here.contains(&format!("replay_some(\"{}\")", target.name)),
            "{} is not replayed",
            target.name
        );
    }
}

#[test]
fn wire_message() {
    replay_some("wire_message");
}

#[test]
fn wire_item() {
    replay_some("wire_item");
}

#[test]
fn directory() {
    replay_some("directory");
}

#[test]
fn ticket() {
    replay_some("ticket");
}

#[test]
fn read_feed() {
    replay_some("read_feed");
}

#[test]
fn folder_entry() {
    replay_some("folder_entry");
}

#[test]
fn blob_response() {
    replay_some("blob_response");
}

#[test]
fn session_responder() {
    replay_some("session_responder");
}

#[test]
fn session_initiator() {
    replay_some("session_initiator");
}

#[test]
fn auth_responder() {
    replay_some("auth_responder");
}

#[test]
fn auth_initiator() {
    replay_some("auth_initiator");
}

#[test]
fn cloud_control() {
    replay_some("cloud_control");
}

#[test]
fn control() {
    replay_some("control");
}

#[test]
fn roles() {
    replay_some("roles");
}

#[test]
fn frame() {
    replay_some("frame");
}

#[cfg(feature = "relay")]
#[test]
fn relay_http() {
    replay_some("relay_http");
}

#[cfg(feature = "relay")]
#[test]
fn relay_control() {
    replay_some("relay_control");
}
