#!/usr/bin/env bash
# Runs one fuzz target for a long session (not part of CI; see fuzz/README.md).
#   fuzz/run.sh TARGET [SECONDS] [RUNS]
# Builds with `cargo fuzz build` first if the binary is missing. New inputs go to
# fuzz/corpus/TARGET (ignored by git); the committed seeds and regressions are read too.
# Crashes, time-outs and memory-limit hits land in fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?target}
seconds=${2:-1800}
runs=${3:-10000000}
bin=target/x86_64-unknown-linux-gnu/release/$target
if [ ! -x "$bin" ]; then
    RUSTC_BOOTSTRAP=1 cargo fuzz build -s none "$target"
fi
mkdir -p "corpus/$target" "artifacts/$target"
dirs=("corpus/$target" "../fuzzing/corpus/$target")
if [ -d "../fuzzing/regressions/$target" ]; then
    dirs+=("../fuzzing/regressions/$target")
fi
exec "$bin" "${dirs[@]}" \
    -artifact_prefix="artifacts/$target/" \
    -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -max_total_time="$seconds" -runs="$runs" -print_final_stats=1
