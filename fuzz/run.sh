#!/bin/bash
# Runs every cargo-fuzz target of docmail for a bounded time and fails if any of them finds a crash
# (a panic, a failed invariant, a stack overflow, a timeout or running out of memory).
#
#   fuzz/run.sh [SECONDS] [--update-corpus]
#
# SECONDS per target, default 60. Each target starts from its committed corpus (fuzz/corpus/TARGET) and
# its hand-written seeds (fuzz/seeds/TARGET: the example manifests and the hostile cases); new inputs go
# to a scratch directory under fuzz/target/, so a run leaves the tree as it was. With --update-corpus
# the new inputs are merged into fuzz/corpus/TARGET and the result minimised (cargo fuzz cmin), to be
# committed. A crash leaves its input in fuzz/artifacts/TARGET/ and a line to reproduce it.
#
# cargo-fuzz needs nightly flags; on a stable toolchain RUSTC_BOOTSTRAP=1 allows them.
set -euo pipefail
cd "$(dirname "$0")"

seconds=60
update=no
for arg in "$@"; do
    case "$arg" in
        --update-corpus) update=yes ;;
        ''|*[!0-9]*) echo "usage: fuzz/run.sh [SECONDS] [--update-corpus]" >&2; exit 64 ;;
        *) seconds=$arg ;;
    esac
done

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo fuzz build
targets=$(cargo fuzz list)
failed=()
summary=()
for t in $targets; do
    work=target/corpus-run/$t
    rm -rf "$work"
    mkdir -p "$work" "corpus/$t" "seeds/$t" "artifacts/$t"
    log=target/fuzz-$t.log
    echo "== fuzzing $t for ${seconds}s"
    set +e
    cargo fuzz run "$t" "$work" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    summary+=("$t: ${execs:-?} execs in ${seconds}s, ${cov:-cov: ?}, exit $status")
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        echo "!! $t failed (exit $status); the end of $log:" >&2
        tail -40 "$log" >&2
    elif [ "$update" = yes ]; then
        cp -n "$work"/* "corpus/$t/" 2>/dev/null || true
        # Minimise by edges only (not hit counts): keeps the committed corpus small.
        cargo fuzz cmin "$t" "corpus/$t" -- -use_counters=0 >>"$log" 2>&1
    fi
done

printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "no crashes"
