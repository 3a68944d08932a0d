#!/usr/bin/env bash
# device-check.sh - on the GPU machine: build every backend for Hopper and
# run the shared suite on CUDA and on NVIDIA's OpenCL, logs under $OUT (or
# ./out). Usage: source .devdeps/env.sh; scripts/device-check.sh [build|cuda|
# opencl|huge|sanitize|bench|profile|profile-detail|ab|abbase|tune|invariant|cpu|cpuab|cpufloors|probeab|cpupf|cpupair|cpuprobe|cpuphase|python|
# all]... Each step prints one summary
# line; the logs hold the rest. sanitize runs compute-sanitizer's tools over
# the CUDA suite side by side (memcheck and initcheck with the huge-index
# cases; SANITIZE_TOOLS picks tools, SANITIZE_FILTER a Criterion filter such
# as '@(route|reduce)/*', SANITIZE_TIMEOUT the limit per tool, default 450 s:
# the whole suite under racecheck needs more than 230 s on an H100; two
# halves by filter side by side finished in 240 s,
# bench/results/cuda-sanitizers-h100.log); bench times
# the CUDA layer and the Triton peer (bench/triton_peer.py) in the same run,
# then (BENCH_OPENCL=1) the OpenCL layer on NVIDIA's OpenCL; profile runs ncu over the
# kernels of one forward of ours and of the peer at each of PROFILE_POINTS
# (model:tokens ...), one CSV row per kernel.
set -u
out=${OUT:-out}
mkdir -p "$out"
build=${BUILD_DIR:-build-gpu}

summary() { # name logfile status
  printf '%-28s rc=%s  %s\n' "$1" "$3" "$(grep -E 'Synthesis|Tested' "$2" | tail -1)"
}

step_build() {
  local t0=$SECONDS
  { cmake -S . -B "$build" -G Ninja -DMOE_BACKEND="cpu;cuda;opencl" \
      -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_BUILD_TYPE=Release &&
      cmake --build "$build"; } >"$out/build.log" 2>&1
  local rc=$?
  printf '%-28s rc=%s  %ss\n' build "$rc" $((SECONDS - t0))
  [ "$rc" = 0 ] || tail -30 "$out/build.log"
  return "$rc"
}

suite() { # name env... (runs moe_tests with the environment given)
  local name=$1
  shift
  env "$@" "./$build/tests/moe_tests" --verbose=0 >"$out/$name.log" 2>&1
  summary "$name" "$out/$name.log" $?
}

# compute-sanitizer over the whole suite: one tool per process, all four at
# once (correctness only: never time anything while they run).
step_sanitize() {
  local tool pids=() tools=${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}
  local filter=()
  [ -n "${SANITIZE_FILTER:-}" ] && filter=(--filter "$SANITIZE_FILTER")
  for tool in $tools; do
    # The huge-index cases (4.4 GB each) under the memory tools only: the
    # race and sync tools check shared memory and barriers, which the huge
    # cases run the same way as the others.
    local huge=0
    [ "$tool" = memcheck ] || [ "$tool" = initcheck ] && huge=1
    ( MOE_TEST_BACKEND=cuda MOE_TEST_HUGE=$huge timeout "${SANITIZE_TIMEOUT:-450}" \
        compute-sanitizer --tool "$tool" --error-exitcode 3 \
        "./$build/tests/moe_tests" --verbose=0 --jobs 4 "${filter[@]}" >"$out/sanitize-$tool.log" 2>&1
      echo $? >"$out/sanitize-$tool.rc" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  for tool in $tools; do
    printf '%-28s rc=%s  %s | %s\n' "sanitize-$tool" "$(cat "$out/sanitize-$tool.rc")" \
      "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitize-$tool.log" | tail -1)" \
      "$(grep -E 'Synthesis' "$out/sanitize-$tool.log" | tail -1)"
  done
}

step_bench() {
  local tokens=1,4,16,64,256,1024,4096,16384
  timeout 150 "./$build/bench/moe_bench" --backend cuda --model all --tokens $tokens \
    --json "$out/bench-cuda.json" >"$out/bench-cuda.log" 2>&1
  echo "bench-cuda rc=$?"
  timeout 200 python3 bench/triton_peer.py --model all --tokens $tokens \
    --json "$out/bench-peer.json" >"$out/bench-peer.log" 2>&1
  echo "bench-peer rc=$?"
  # The issue-12 table: both times, the ratio, geomean, minimum, points won.
  python3 bench/compare.py "$out/bench-cuda.json" "$out/bench-peer.json" >"$out/compare.txt" &&
    tail -1 "$out/compare.txt"
  [ -n "${BENCH_OPENCL:-}" ] || return 0
  "./$build/bench/moe_bench" --backend opencl --model mixtral-8x7b,qwen3-30b-a3b \
    --tokens 1,16,64,256,1024,4096 --json "$out/bench-opencl.json" >"$out/bench-opencl.log" 2>&1
  echo "bench-opencl rc=$?"
}

# ncu over one forward per point: duration, DRAM bytes and throughput,
# grid, registers and occupancy of every kernel of ours and of the peer.
# PROFILE_NCU_FLAGS adds ncu flags (e.g. "--clock-control none
# --cache-control none": the clocks and caches of a timed run).
step_profile() {
  local metrics=gpu__time_duration.sum,dram__bytes_read.sum
  metrics+=,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size
  metrics+=,launch__block_size,launch__registers_per_thread
  metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active
  # The forward's kernels of ours (the streaming GEMMs, the permute and the
  # reduce included) and of the peer (its Triton kernels and torch's sum);
  # not the setup kernels that fill and repack the weights.
  local kernels='regex:^(route|align|gemm|topk|wgmma|stream|reduce_kernel|decode|activation)'
  local point model tokens
  for point in ${PROFILE_POINTS:-qwen3-30b-a3b:1 mixtral-8x7b:16}; do
    model=${point%:*} tokens=${point#*:}
    ncu --csv ${PROFILE_NCU_FLAGS:-} --metrics "$metrics" -k "$kernels" --launch-skip 40 --launch-count 12 \
      "./$build/bench/moe_bench" --backend cuda --model "$model" --tokens "$tokens" \
      --reps 10 --warmup 10 >"$out/profile-ours-$model-$tokens.csv" 2>&1
    echo "profile ours $point rc=$?"
    ncu --csv ${PROFILE_NCU_FLAGS:-} --metrics "$metrics" -k "$kernels" --launch-skip 40 --launch-count 12 \
      python3 bench/triton_peer.py --quick --model "$model" --tokens "$tokens" \
      >"$out/profile-peer-$model-$tokens.csv" 2>&1
    echo "profile peer $point rc=$?"
    python3 bench/profile_table.py "$out/profile-ours-$model-$tokens.csv" \
      "$out/profile-peer-$model-$tokens.csv"
  done
}

# ncu's sections on memory workload, scheduler and warp-state stalls and
# occupancy (speed of light for the DRAM share) for two GEMM launches of one
# forward at each of DETAIL_POINTS: why a GEMM that only streams weights
# reaches 80-84% of DRAM peak. DETAIL_KERNELS picks our kernels (default
# the streaming GEMM); DETAIL_PEER=1 profiles the peer's GEMMs beside them.
step_profile_detail() {
  local point model tokens
  local sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis
    --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats
    --section Occupancy --launch-count 2 --print-details all)
  for point in ${DETAIL_POINTS:-qwen3-30b-a3b:64}; do
    model=${point%:*} tokens=${point#*:}
    timeout "${DETAIL_TIMEOUT:-240}" ncu "${sections[@]}" -k "${DETAIL_KERNELS:-regex:stream_gemm}" \
      --launch-skip 20 "./$build/bench/moe_bench" --backend cuda --model "$model" \
      --tokens "$tokens" --reps 10 --warmup 10 >"$out/detail-$model-$tokens.txt" 2>&1
    echo "profile-detail $point rc=$?"
    [ "${DETAIL_PEER:-0}" = 1 ] || continue
    timeout "${DETAIL_TIMEOUT:-240}" ncu "${sections[@]}" -k 'regex:gemm[12]_kernel' \
      --launch-skip 4 python3 bench/triton_peer.py --quick --model "$model" --tokens "$tokens" \
      >"$out/detail-peer-$model-$tokens.txt" 2>&1
    echo "profile-detail peer $point rc=$?"
  done
}

# A/B of the CUDA forward's launch and path options over the points where
# the streaming GEMM runs (bench/ab.sh; AB_VARIANTS, AB_MODELS, AB_TOKENS).
step_ab() {
  timeout "${AB_TIMEOUT:-300}" bench/ab.sh "$build" "$out" \
    "${AB_MODELS:-qwen3-30b-a3b,ernie-4.5-21b-a3b,gpt-oss-20b,mixtral-8x7b,deepseek-v3}" \
    "${AB_TOKENS:-16,64,256,1024}" \
    ${AB_VARIANTS:-default cuda.stream_overlap=off cuda.stream_ctas=1 stream mma}
}

# The on-device tuner (issue 13): moe_tune sweeps cuda.path's values at
# TUNE_TOKENS for TUNE_MODEL, writes the table, loads it back and checks
# each point against the best candidate (3%).
step_tune() {
  timeout "${TUNE_TIMEOUT:-200}" "./$build/bench/moe_tune" --backend cuda \
    --model "${TUNE_MODEL:-qwen3-30b-a3b}" --tokens "${TUNE_TOKENS:-1,16,64,256,1024,4096}" \
    --out "$out/tune-table.txt" >"$out/tune.log" 2>&1
  echo "tune rc=$?"; tail -8 "$out/tune.log"
}

# A/B of this tree against another source tree (a kernel change with no
# option to switch it): BASE_SRC (default .base-src, e.g. `git archive
# BASE | tar -x -C .base-src`, carried) is built into build-base, then
# moe_bench runs from both builds in AB_ROUNDS interleaved rounds (and
# from this tree with each option of ABBASE_OPTIONS as a third side), and
# bench/compare.py prints the median of the rounds' medians per point.
step_abbase() {
  local src=${BASE_SRC:-.base-src} rounds=${AB_ROUNDS:-2}
  local models=${AB_MODELS:-qwen3-30b-a3b,ernie-4.5-21b-a3b,gpt-oss-20b,mixtral-8x7b,deepseek-v3}
  local tokens=${AB_TOKENS:-16,64,256,1024,4096,16384}
  [ -f "$src/CMakeLists.txt" ] || { echo "abbase: no source tree in $src"; return 1; }
  { cmake -S "$src" -B build-base -G Ninja -DMOE_BACKEND=cuda -DCMAKE_CUDA_ARCHITECTURES=90a \
      -DCMAKE_BUILD_TYPE=Release && cmake --build build-base --target moe_bench; } \
    >"$out/build-base.log" 2>&1 || { echo "abbase: base build failed"; tail -20 "$out/build-base.log"; return 1; }
  local r side option sides="base new"
  for option in ${ABBASE_OPTIONS:-}; do sides+=" $option"; done
  for r in $(seq "$rounds"); do
    for side in $sides; do
      local dir=$build args=()
      [ "$side" = base ] && dir=build-base
      [ "$side" != base ] && [ "$side" != new ] && args=(--option "$side")
      # File names without '=' (the device tool returns no such name).
      timeout 200 "./$dir/bench/moe_bench" --backend cuda "${args[@]}" --model "$models" \
        --tokens "$tokens" --json "$out/abbase-${side//=/-}-$r.json" \
        >"$out/abbase-${side//=/-}-$r.log" 2>&1
      echo "abbase $side round $r rc=$?"
    done
  done
  local first="" list
  for side in $sides; do
    list=$(for r in $(seq "$rounds"); do printf '%s,' "$out/abbase-${side//=/-}-$r.json"; done)
    list=${list%,}
    if [ -z "$first" ]; then
      first=$list
    else
      python3 bench/compare.py "$first" "$list" --labels "base,$side" | cut -c1-110
    fi
  done
}

# What a batch-invariant layer costs on CUDA: moe_bench with the layers
# built batch-invariant against the default plan, same points, same call.
step_invariant() {
  local models=${INV_MODELS:-qwen3-30b-a3b,mixtral-8x7b} tokens=${INV_TOKENS:-1,16,64,256,1024,4096}
  local v
  for v in default invariant; do
    local flag=()
    [ $v = invariant ] && flag=(--batch-invariant)
    timeout 200 "./$build/bench/moe_bench" --backend cuda "${flag[@]}" --model "$models" \
      --tokens "$tokens" --json "$out/inv-$v.json" >"$out/inv-$v.log" 2>&1
    echo "invariant $v rc=$?"
  done
  python3 bench/compare.py "$out/inv-default.json" "$out/inv-invariant.json" \
    --labels default,invariant >"$out/inv-compare.txt" && tail -1 "$out/inv-compare.txt"
}

cpu_build() { # the CPU-only Release build in build-cpu
  { cmake -S . -B build-cpu -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release &&
      cmake --build build-cpu; } >"$out/cpu-build.log" 2>&1 || { tail -20 "$out/cpu-build.log"; return 1; }
  lscpu | grep -E 'Model name|^CPU\(s\)' | tr -s ' '
}

# The CPU backend on the GPU machine's host (a Xeon with AMX): the CPU
# entries of the suite (each kernel path), the AMX layout check, then
# moe_bench per kernel path on 1, 2 and all cores, and the PyTorch CPU peer
# on all cores (bench/results.md, "CPU AMX path").
step_cpu() {
  local dir=build-cpu
  cpu_build || return 1
  timeout "${CPU_SUITE_TIMEOUT:-300}" ctest --test-dir $dir -R '^cpu' --output-on-failure \
    >"$out/cpu-ctest.log" 2>&1
  echo "cpu ctest rc=$?"; grep -E 'tests passed|Failed|Passed|Skipped|\*\*\*' "$out/cpu-ctest.log" | head -12
  local models=${CPU_MODELS:-mixtral-8x7b,qwen3-30b-a3b} tokens=${CPU_TOKENS:-1,16,128,512}
  local t k
  for t in ${CPU_THREADS:-1 2 $(nproc)}; do
    for k in ${CPU_PATHS:-amx avx512bf16}; do
      OMP_NUM_THREADS=$t timeout 200 "./$dir/bench/moe_bench" --backend cpu --option cpu.kernels=$k \
        --model "$models" --tokens "$tokens" --json "$out/cpu-$k-$t.json" >"$out/cpu-$k-$t.log" 2>&1
      echo "cpu bench $k threads=$t rc=$?"
    done
  done
  # qwen3 at 4096 tokens (about 256 rows per expert: compute-bound), all cores
  OMP_NUM_THREADS=$(nproc) timeout 200 "./$dir/bench/moe_bench" --backend cpu \
    --model qwen3-30b-a3b --tokens 4096 --json "$out/cpu-amx-4096.json" >"$out/cpu-amx-4096.log" 2>&1
  echo "cpu bench qwen3 4096 rc=$?"
  OMP_NUM_THREADS=$(nproc) timeout 300 python3 bench/torch_cpu_peer.py --no-install --model "$models" \
    --tokens "$tokens" --json "$out/cpu-torch-peer.json" >"$out/cpu-torch-peer.log" 2>&1
  echo "cpu torch peer rc=$?"
}

# Issue 14's CPU figures in one call, most important first, so that a call
# cut short keeps what finished: the AMX check (real tiles, both A modes),
# moe_bench on all cores at the floors' points, the PyTorch CPU peer, the
# AMX suite entry, then step_cpuab (CPU_AB_VARIANTS, default here: the
# shipped next-K-block stream against -DCPU_NEXT_BLOCK_STREAM=0, whose
# 16-thread A/B on these noisy hosts ranged 0.92-1.04; bench/results.md).
step_cpufloors() {
  local dir=build-cpu n
  n=$(nproc)
  cpu_build || return 1
  cat /sys/kernel/mm/transparent_hugepage/enabled
  ./$dir/backends/cpu/moe_cpu_amx_check >"$out/amx-check.log" 2>&1
  echo "amx check rc=$?"; tail -6 "$out/amx-check.log"
  OMP_NUM_THREADS=$n timeout 150 "./$dir/bench/moe_bench" --backend cpu \
    --model mixtral-8x7b,qwen3-30b-a3b --tokens 1,16,128,512,4096 --json "$out/cpu-amx-$n.json" \
    >"$out/cpu-amx-$n.log" 2>&1
  echo "cpu bench rc=$?"; tail -13 "$out/cpu-amx-$n.log"
  OMP_NUM_THREADS=$n timeout 150 python3 bench/torch_cpu_peer.py --no-install \
    --model mixtral-8x7b,qwen3-30b-a3b --tokens 1,16,128,512 --json "$out/cpu-torch-peer.json" \
    >"$out/cpu-torch-peer.log" 2>&1
  echo "cpu torch peer rc=$?"; tail -10 "$out/cpu-torch-peer.log"
  timeout 100 ctest --test-dir $dir -R 'cpu-amx' --output-on-failure >"$out/cpu-ctest-amx.log" 2>&1
  echo "cpu ctest amx rc=$?"; tail -4 "$out/cpu-ctest-amx.log"
  CPU_AB_TIMEOUT=${CPU_AB_TIMEOUT:-250} CPU_AB_ROUNDS=${CPU_AB_ROUNDS:-4} \
    CPU_AB_TOKENS=${CPU_AB_TOKENS:-16,128,512,4096} \
    CPU_AB_VARIANTS=${CPU_AB_VARIANTS:-"base= nostream=-DCPU_NEXT_BLOCK_STREAM=0"} step_cpuab
}

# Where the AMX forward's time goes (backends/cpu/cpu_phase_times.h: a
# build with -DCPU_PHASE_TIMES prints each stage's mean per forward), on
# all hardware threads, then on half of them pinned one per core
# (OMP_PLACES=cores: one per physical core on a host with SMT, half the
# cores on one without); CPU_PHASE_SETTINGS="2:cores 1:cores" picks others
# (threads:places). The host has no perf.
step_cpuphase() {
  local dir=build-cpu-phase n
  n=$(nproc)
  lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|L1d|L2|L3' | tr -s ' '
  { cmake -S . -B $dir -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_C_FLAGS=-DCPU_PHASE_TIMES && cmake --build $dir --target moe_bench; } \
    >"$out/cpu-phase-build.log" 2>&1 || { tail -20 "$out/cpu-phase-build.log"; return 1; }
  local setting
  for setting in ${CPU_PHASE_SETTINGS:-$n:threads $((n / 2)):cores}; do
    set -- ${setting/:/ }
    OMP_NUM_THREADS=$1 OMP_PLACES=$2 OMP_PROC_BIND=close timeout 150 "./$dir/bench/moe_bench" \
      --backend cpu --option cpu.kernels=amx --model mixtral-8x7b,qwen3-30b-a3b \
      --tokens "${CPU_PHASE_TOKENS:-512,4096}" --json "$out/cpu-phase-$1-$2.json" \
      >"$out/cpu-phase-$1-$2.log" 2>&1
    echo "cpu phase bench $1 $2 rc=$?"; grep -E 'roof|peak|^mixtral|^qwen|phases' "$out/cpu-phase-$1-$2.log"
  done
}

# Compile-time A/B of the AMX kernel body alone: bench/amx_stream_probe -l
# built once per PROBE_AB_VARIANTS "name=defs ..." (defs comma-separated,
# as cpu_ab.sh's), run in PROBE_AB_ROUNDS interleaved rounds on each of
# PROBE_AB_THREADS; prints each build's GB/s per core by rows, per round.
step_probeab() {
  local variants=${PROBE_AB_VARIANTS:-base= t1=-DCPU_AMX_PREFETCH_HINT=_MM_HINT_T1} names=() v name defs
  for v in $variants; do
    name=${v%%=*} defs=${v#*=}
    names+=("$name")
    { cmake -S . -B "build-probe-$name" -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release \
        "-DCMAKE_C_FLAGS=${defs//,/ }" && cmake --build "build-probe-$name" --target amx_stream_probe; } \
      >"$out/probe-build-$name.log" 2>&1
    echo "probe build $name (${defs//,/ }) rc=$?"
  done
  local round threads
  for round in $(seq 1 "${PROBE_AB_ROUNDS:-3}"); do
    for threads in ${PROBE_AB_THREADS:-2 16}; do
      for name in "${names[@]}"; do
        OMP_PLACES=cores OMP_PROC_BIND=close timeout 60 "./build-probe-$name/bench/amx_stream_probe" \
          -l "$threads" >"$out/probe-$name-$threads-$round.log" 2>&1
        printf 'round %s threads %-3s %-12s read %s | GB/s per core at 1 16 32 256 rows: %s\n' \
          "$round" "$threads" "$name" "$(grep -oE 'read [0-9.]+ GB/s' "$out/probe-$name-$threads-$round.log" | head -1 | cut -d' ' -f2)" \
          "$(awk '$1 == "library" { printf "%s ", $4 }' "$out/probe-$name-$threads-$round.log")"
      done
    done
  done
}

# Paired in-process A/B of the CPU backend's compile-time definitions
# (bench/pair_ab.c): one libmoe.so per PAIR_VARIANTS "name=defs ..." (defs
# comma-separated; the first is the baseline), then pair_ab of the
# baseline against each, PAIR_PAIRS pairs (default 15) at PAIR_TOKENS
# (default 128,512) of PAIR_MODELS, on each of PAIR_THREADS (default "2
# 16"; 2 pinned to 2 cores), once per entry of PAIR_OPTIONS ("default" or
# a context option such as cpu.kernels=avx512bf16; default: default).
# Forwards alternate within the process, so a shared host's drift weighs on
# both sides alike.
step_cpupair() {
  local variants=(${PAIR_VARIANTS:-base= nofollow=-DCPU_FOLLOW_NEXT_BLOCK=0}) v name defs base="" t pin
  for v in "${variants[@]}"; do
    name=${v%%=*} defs=${v#*=}
    { cmake -S . -B "build-pair-$name" -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release \
        -DMOE_BUILD_TESTS=OFF "-DCMAKE_C_FLAGS=${defs//,/ }" &&
        cmake --build "build-pair-$name" --target moe pair_ab; } >"$out/pair-build-$name.log" 2>&1
    echo "pair build $name (${defs//,/ }) rc=$?"
    base=${base:-$name}
  done
  local option extra
  for option in ${PAIR_OPTIONS:-default}; do
    extra=()
    [ "$option" = default ] || extra=(--option "$option")
    for t in ${PAIR_THREADS:-2 16}; do
      pin=()
      [ "$t" = 2 ] && pin=(OMP_PLACES=cores OMP_PROC_BIND=close)
      for v in "${variants[@]:1}"; do
        name=${v%%=*}
        echo "== $t threads, $option: $name against $base"
        env OMP_NUM_THREADS="$t" "${pin[@]}" timeout "${PAIR_TIMEOUT:-200}" \
          "./build-pair-$base/bench/pair_ab" "$PWD/build-pair-$base/libmoe.so" \
          "$PWD/build-pair-$name/libmoe.so" --model "${PAIR_MODELS:-mixtral-8x7b,qwen3-30b-a3b}" \
          --tokens "${PAIR_TOKENS:-128,512}" --pairs "${PAIR_PAIRS:-15}" "${extra[@]}" 2>&1 |
          tee "$out/pair-$name-$t-${option//[=.]/-}.log" | grep '^| [a-z]\|^host'
      done
    done
  done
}

# Every variant of the kernel probe (bench/amx_stream_probe.c) on
# PROBE_THREADS (default 2) pinned cores, built with K blocks of PROBE_KC
# k-pairs (default 128, what the driver sweeps on 1-2 threads): the
# library's kernel with near requests in a block's first row tile only,
# with the driver's next-K-block stream and with 64-row tiles, the
# accumulator diagnostics and requests, an item's weights as 2 or 4
# interleaved regions (*-2streams, *-4streams), at
# 1-256 rows; the console gets the request patterns' rates too.
step_cpuprobe() {
  { cmake -S . -B build-probe-kc -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release \
      -DMOE_BUILD_TESTS=OFF "-DCMAKE_C_FLAGS=-DCPU_KC_PAIRS=${PROBE_KC:-128}" &&
      cmake --build build-probe-kc --target amx_stream_probe; } >"$out/probe-kc-build.log" 2>&1
  echo "probe build rc=$?"
  OMP_PLACES=cores OMP_PROC_BIND=close timeout 90 ./build-probe-kc/bench/amx_stream_probe \
    "${PROBE_THREADS:-2}" >"$out/probe-kc.log" 2>&1
  echo "probe rc=$?"
  grep -E '^  (load, 4|prefetch T0)' "$out/probe-kc.log"
  grep -E '^(library|diag|pf4-parts8)' "$out/probe-kc.log" | awk '$2 >= 32'
}

# The AMX path on the host, most important first: the AMX check and the
# AMX suite entry (real tiles against the scalar model), then A/Bs with
# rounds interleaved of the kernel's near weight requests, which until
# 2026-12-07 the compiler deleted (cpu_amx_intrinsics.h): none
# (-DCPU_AMX_PREFETCH_STEPS=0, the code every earlier AMX figure measured),
# 4 steps ahead (the default) and 8, on 2 pinned cores and on all cores
# (CPU_PF_THREADS; CPU_PF_VARIANTS and CPU_PF_TOKENS replace the A/B's
# variants and tokens), each followed (unless CPU_PF_TORCH is empty) by the
# PyTorch CPU peer at those threads; then (unless CPU_PF_PROBE is empty)
# the same variants in the kernel probe at 2 threads (the probe runs no
# driver, so driver-only definitions build its base kernel). The A/B JSON
# goes to /tmp and back as one archive. CPU_PF_CHECK=0 skips the build with
# tests and the two checks (about a minute and a half, for a short call);
# CPU_PF_AB_TIMEOUT (default 260 s) bounds each A/B, CPU_PF_ROUNDS (default 2)
# sets its rounds.
step_cpupf() {
  local n t tokens pin
  local variants=(${CPU_PF_VARIANTS:-nopf=-DCPU_AMX_PREFETCH_STEPS=0 pf4= pf8=-DCPU_AMX_PREFETCH_STEPS=8})
  n=$(nproc)
  if [ "${CPU_PF_CHECK:-1}" != 0 ]; then
    { cmake -S . -B build-cpu-pf -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release &&
        cmake --build build-cpu-pf; } >"$out/build-cpu-pf.log" 2>&1
    echo "build rc=$?"
    timeout 60 ./build-cpu-pf/backends/cpu/moe_cpu_amx_check >"$out/amx-check.log" 2>&1
    echo "amx check rc=$?"; grep -E 'hardware|passed' "$out/amx-check.log" | head -3
    timeout 120 ctest --test-dir build-cpu-pf -R 'cpu-amx' -j4 >"$out/ctest-amx.log" 2>&1
    echo "ctest cpu-amx rc=$?"; tail -2 "$out/ctest-amx.log"
  fi
  for t in ${CPU_PF_THREADS:-2 $n}; do
    tokens=${CPU_PF_TOKENS:-128,512}
    pin=() # 2 threads pinned to 2 cores
    [ "$t" = 2 ] && pin=(OMP_PLACES=cores OMP_PROC_BIND=close)
    env OMP_NUM_THREADS="$t" "${pin[@]}" timeout "${CPU_PF_AB_TIMEOUT:-260}" bench/cpu_ab.sh "/tmp/ab$t" \
      mixtral-8x7b,qwen3-30b-a3b "$tokens" "${CPU_PF_ROUNDS:-2}" "${variants[@]}" | grep -v '^round\|^build'
    [ -n "${CPU_PF_TORCH-1}" ] || continue
    env OMP_NUM_THREADS="$t" "${pin[@]}" timeout 90 python3 bench/torch_cpu_peer.py \
      --no-install --reps 3 --model mixtral-8x7b,qwen3-30b-a3b --tokens 128,512 --json "$out/torch$t.json" \
      >"$out/torch$t.log" 2>&1
    echo "torch $t threads rc=$?"; tail -5 "$out/torch$t.log"
  done
  tar czf "$out/ab.tgz" /tmp/ab*/*.json 2>/dev/null
  [ -n "${CPU_PF_PROBE-1}" ] || return 0
  PROBE_AB_VARIANTS="${variants[*]}" PROBE_AB_THREADS=2 PROBE_AB_ROUNDS=2 step_probeab
}

# Compile-time A/B of the CPU blocking on the host (bench/cpu_ab.sh):
# CPU_AB_VARIANTS "name=defs ..." (the first is the baseline), rounds
# interleaved against the host's drift, on the AMX path by default.
step_cpuab() {
  MOE_CPU_AB_OPTION=${CPU_AB_OPTION:-cpu.kernels=amx} timeout "${CPU_AB_TIMEOUT:-400}" \
    bench/cpu_ab.sh "$out" "${CPU_AB_MODELS:-mixtral-8x7b,qwen3-30b-a3b}" \
    "${CPU_AB_TOKENS:-128,512,4096}" "${CPU_AB_ROUNDS:-3}" \
    ${CPU_AB_VARIANTS:-base= rows64=-DCPU_AMX_ITEM_ROWS=64}
}

# The Python package on CUDA, against the library built by step build:
# wheels carried in .pywheels (pytest, transformers and their dependencies,
# installed without an index), then pytest and the transformers blocks'
# table (bench/hf_blocks.py).
step_python() {
  [ -d .pywheels ] && pip install -q --no-index --no-deps .pywheels/*.whl >"$out/py-install.log" 2>&1
  export MOE_LIBRARY=$PWD/$build/libmoe.so PYTHONPATH=$PWD/python/src
  timeout 300 python3 -m pytest -q python/tests >"$out/py-tests.log" 2>&1
  echo "python tests rc=$?"; tail -3 "$out/py-tests.log"
  timeout 200 python3 bench/hf_blocks.py --device cuda --tokens 1 16 512 \
    --shapes qwen3-30b-a3b mixtral-8x7b >"$out/hf-blocks.log" 2>&1
  echo "hf blocks rc=$?"; tail -12 "$out/hf-blocks.log"
}

for step in "${@:-all}"; do
  case $step in
  build) step_build || exit 1 ;;
  cuda) suite cuda-suite MOE_TEST_BACKEND=cuda ;;
  huge) suite cuda-huge MOE_TEST_BACKEND=cuda MOE_TEST_HUGE=1 ;;
  sanitize) step_sanitize ;;
  bench) step_bench ;;
  profile) step_profile ;;
  profile-detail) step_profile_detail ;;
  ab) step_ab ;;
  abbase) step_abbase ;;
  tune) step_tune ;;
  invariant) step_invariant ;;
  cpu) step_cpu ;;
  cpuab) step_cpuab ;;
  cpufloors) step_cpufloors ;;
  probeab) step_probeab ;;
  cpupf) step_cpupf ;;
  cpupair) step_cpupair ;;
  cpuprobe) step_cpuprobe ;;
  cpuphase) step_cpuphase ;;
  python) step_python ;;
  opencl)
    suite opencl-suite MOE_TEST_BACKEND=opencl
    suite opencl-suite-parallel-route MOE_TEST_BACKEND=opencl MOE_TEST_OPTIONS=opencl.route=parallel
    ;;
  all)
    step_build || exit 1
    suite cuda-suite MOE_TEST_BACKEND=cuda
    suite opencl-suite MOE_TEST_BACKEND=opencl
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
