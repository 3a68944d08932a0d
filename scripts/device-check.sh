#!/usr/bin/env bash
# device-check.sh - on the GPU machine: build every backend for Hopper and
# run the shared suite on CUDA and on NVIDIA's OpenCL, logs under $OUT (or
# ./out). Usage: source .devdeps/env.sh; scripts/device-check.sh [build|cuda|
# opencl|huge|all]... Each step prints one summary line; the logs hold the rest.
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

for step in "${@:-all}"; do
  case $step in
  build) step_build || exit 1 ;;
  cuda) suite cuda-suite MOE_TEST_BACKEND=cuda ;;
  huge) suite cuda-huge MOE_TEST_BACKEND=cuda MOE_TEST_HUGE=1 ;;
  opencl)
    suite opencl-suite MOE_TEST_BACKEND=opencl
    suite opencl-suite-parallel-route MOE_TEST_BACKEND=opencl MOE_OPENCL_ROUTE=parallel
    ;;
  all)
    step_build || exit 1
    suite cuda-suite MOE_TEST_BACKEND=cuda
    suite opencl-suite MOE_TEST_BACKEND=opencl
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
