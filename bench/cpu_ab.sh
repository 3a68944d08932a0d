#!/usr/bin/env bash
# cpu_ab.sh - A/B runs of the CPU backend's compile-time blocking on the
# machine at hand: one Release build per variant (C definitions such as
# -DCPU_AMX_ITEM_ROWS=64, backends/cpu/cpu_kernels.h), then ROUNDS rounds
# that run every variant's moe_bench in turn (interleaved, so that a
# machine whose speed drifts during the call weighs on every variant
# alike; each round starts with the next variant), then bench/compare.py of each variant against the first over
# its rounds (median of the rounds' medians, and the paired range).
# Usage: bench/cpu_ab.sh OUT_DIR "MODELS" "TOKENS" ROUNDS NAME=DEFS...
# (DEFS: definitions separated by commas)
#   e.g. bench/cpu_ab.sh out mixtral-8x7b,qwen3-30b-a3b 128,512 3 \
#          base= rows64=-DCPU_AMX_ITEM_ROWS=64
# The first variant is the baseline. MOE_CPU_AB_OPTION (default
# cpu.kernels=auto) is passed to moe_bench as --option. Threads: all
# cores unless OMP_NUM_THREADS is set.
set -u
out=$1 models=$2 tokens=$3 rounds=$4
shift 4
mkdir -p "$out"
names=()
for variant in "$@"; do
  name=${variant%%=*} defs=${variant#*=}
  defs=${defs//,/ } # several definitions: -DA=1,-DB=2
  names+=("$name")
  { cmake -S . -B "build-cpu-ab-$name" -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release \
      "-DCMAKE_C_FLAGS=$defs" && cmake --build "build-cpu-ab-$name" --target moe_bench; } >"$out/build-$name.log" 2>&1
  echo "build $name ($defs) rc=$?"
done
for round in $(seq 1 "$rounds"); do
  # Each round starts one variant later than the last, so that no variant
  # always runs first (after the previous round's last) or last.
  order=()
  for i in "${!names[@]}"; do order+=("${names[$(((i + round - 1) % ${#names[@]}))]}"); done
  for name in "${order[@]}"; do
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} timeout 200 \
      "./build-cpu-ab-$name/bench/moe_bench" --backend cpu \
      --option "${MOE_CPU_AB_OPTION:-cpu.kernels=auto}" --model "$models" --tokens "$tokens" \
      --json "$out/cpu-$name-$round.json" >"$out/cpu-$name-$round.log" 2>&1
    echo "round $round $name rc=$?"
  done
done
files() { # name -> its rounds' JSON files, comma-separated
  local list="" round
  for round in $(seq 1 "$rounds"); do list+="${list:+,}$out/cpu-$1-$round.json"; done
  echo "$list"
}
for name in "${names[@]:1}"; do
  python3 bench/compare.py "$(files "${names[0]}")" "$(files "$name")" \
    --labels "${names[0]},$name" | tail -n +3
done
