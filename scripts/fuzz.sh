#!/usr/bin/env bash
# fuzz.sh - builds the libFuzzer targets (clang, ASan + UBSan, CPU backend)
# in build-fuzz and runs each for a bounded time over a copy of its seed
# corpus (tests/fuzz/corpus/<target>/); fails on any crash, leak, timeout or
# out-of-memory, and prints how many inputs each target executed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#     SECONDS  time per target (libFuzzer -max_total_time), default 30
#     TARGET   moe_fuzz_api, moe_fuzz_align, moe_fuzz_stages (default: all three)
#   Environment: MOE_FUZZ_BUILD_DIR (default <repo>/build-fuzz),
#                MOE_FUZZ_JOBS (parallel fuzzing processes per target, default 1)
#
# Crash reproducers land in <build>/fuzz-run/<target>/ (crash-*, leak-*,
# timeout-*, oom-*); replay one with <build>/tests/fuzz/<target> FILE, and
# commit its minimized form (-minimize_crash=1) to the seed corpus.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(moe_fuzz_api moe_fuzz_align moe_fuzz_stages)
build=${MOE_FUZZ_BUILD_DIR:-$root/build-fuzz}
jobs=${MOE_FUZZ_JOBS:-1}

if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
  echo "fuzz.sh: SECONDS must be a positive integer, got '$seconds'" >&2
  exit 2
fi
if ! command -v clang >/dev/null; then
  echo "fuzz.sh: clang not found; libFuzzer needs it (Debian/Ubuntu: apt-get install clang" \
       "libclang-rt-dev, or scripts/install-deps.sh --ci)" >&2
  exit 1
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_C_COMPILER=clang \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_BACKEND=cpu -DMOE_BUILD_FUZZ=ON \
  -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" --parallel "$(nproc 2>/dev/null || echo 2)" --target "${targets[@]}"

# Leaks are errors; deep stacks and quarantine as libFuzzer's defaults.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
# libomp spins 200 ms after each parallel region; with inputs that take
# microseconds that spinning, not the library, would fill the cores.
export KMP_BLOCKTIME=${KMP_BLOCKTIME:-0}

status=0
for target in "${targets[@]}"; do
  binary=$build/tests/fuzz/$target
  seeds=$root/tests/fuzz/corpus/$target
  work=$build/fuzz-run/$target
  rm -rf "$work"
  mkdir -p "$work/corpus"
  [ -d "$seeds" ] && cp "$seeds"/* "$work/corpus/" 2>/dev/null || true
  log=$work/fuzz.log
  echo "fuzz.sh: $target for ${seconds}s ($(ls "$work/corpus" | wc -l) seed inputs)"
  args=(-max_total_time="$seconds" -print_final_stats=1 -timeout=20 -rss_limit_mb=4096
        -artifact_prefix="$work/")
  rc=0
  if [ "$jobs" -gt 1 ]; then
    # Parallel workers share the corpus; each writes fuzz-<n>.log.
    (cd "$work" && "$binary" "${args[@]}" -jobs="$jobs" -workers="$jobs" corpus) >"$log" 2>&1 || rc=$?
    cat "$work"/fuzz-*.log >>"$log" 2>/dev/null || true
  else
    "$binary" "${args[@]}" "$work/corpus" >"$log" 2>&1 || rc=$?
  fi
  executions=$(grep -h 'stat::number_of_executed_units' "$log" | awk '{s += $2} END {print s + 0}')
  artifacts=$(find "$work" -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
                -o -name 'oom-*' \) | sort)
  if [ "$rc" -ne 0 ] || [ -n "$artifacts" ]; then
    echo "fuzz.sh: $target FAILED (exit $rc) after $executions executions; log: $log" >&2
    grep -E 'moe fuzz:|ERROR:|runtime error|SUMMARY' "$log" | head -20 >&2 || true
    for a in $artifacts; do echo "fuzz.sh:   reproducer: $a" >&2; done
    status=1
  else
    echo "fuzz.sh: $target ok: $executions executions, no crash" \
         "(corpus $(ls "$work/corpus" | wc -l) inputs)"
  fi
done
exit $status
