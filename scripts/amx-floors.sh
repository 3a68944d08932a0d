#!/usr/bin/env bash
# amx-floors.sh - one device call for issue 14's CPU figures on the GPU
# machine's AMX host, most important first (each step writes under $OUT, so
# a call cut short keeps what finished): build, the AMX check (the in-place
# tile entry on the hardware), moe_bench on all cores, the PyTorch CPU peer,
# the AMX suite entry, then a compile-time A/B (bench/cpu_ab.sh; AB_VARIANTS,
# the first the baseline; default: the L2 prefetch hint against the default).
# Usage on the GPU machine: source .devdeps/env.sh; bash scripts/amx-floors.sh
set -u
out=${OUT:-out} d=build-cpu n=$(nproc)
lscpu | grep -E 'Model name|^CPU\(s\)'
cat /sys/kernel/mm/transparent_hugepage/enabled
{ cmake -S . -B $d -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release && cmake --build $d; } \
  >"$out/cpu-build.log" 2>&1 || { tail -20 "$out/cpu-build.log"; exit 1; }
./$d/backends/cpu/moe_cpu_amx_check >"$out/amx-check.log" 2>&1
echo "amx check rc=$?"; tail -6 "$out/amx-check.log"
OMP_NUM_THREADS=$n timeout 150 ./$d/bench/moe_bench --backend cpu --model mixtral-8x7b,qwen3-30b-a3b \
  --tokens 1,16,128,512,4096 --json "$out/cpu-amx-$n.json" >"$out/cpu-amx-$n.log" 2>&1
echo "bench rc=$?"; tail -13 "$out/cpu-amx-$n.log"
OMP_NUM_THREADS=$n timeout 150 python3 bench/torch_cpu_peer.py --no-install \
  --model mixtral-8x7b,qwen3-30b-a3b --tokens 1,16,128,512 --json "$out/cpu-torch-peer.json" \
  >"$out/cpu-torch-peer.log" 2>&1
echo "torch peer rc=$?"; tail -10 "$out/cpu-torch-peer.log"
timeout 100 ctest --test-dir $d -R 'cpu-amx' --output-on-failure >"$out/ctest-amx.log" 2>&1
echo "ctest cpu-amx rc=$?"; tail -4 "$out/ctest-amx.log"
CPU_AB_TIMEOUT=${AB_TIMEOUT:-150} CPU_AB_ROUNDS=1 CPU_AB_TOKENS=512,4096 \
  CPU_AB_VARIANTS="${AB_VARIANTS:-base= t1=-DCPU_AMX_PREFETCH_HINT=_MM_HINT_T1}" \
  bash scripts/device-check.sh cpuab
