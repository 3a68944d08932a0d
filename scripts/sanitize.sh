#!/usr/bin/env bash
# sanitize.sh - builds the library and the test suite with gcc's
# AddressSanitizer and UndefinedBehaviorSanitizer in build-asan and runs
# CTest; any report (memory error, leak, undefined behaviour) fails a test.
#
#   scripts/sanitize.sh [BACKENDS]
#     BACKENDS  a MOE_BACKEND list, default "cpu;opencl" when the OpenCL
#               headers, loader and CLBlast are installed, else "cpu"
#   Environment: MOE_SANITIZE_BUILD_DIR (default <repo>/build-asan), CC
#                (default gcc), CTEST_ARGS (extra ctest arguments; e.g.
#                CTEST_ARGS="-LE huge" skips the multi-GB index tests, which
#                take about ten minutes under ASan)
#
# A missing sanitizer runtime is an error, never a quiet pass: a trivial
# program must compile, link and run with -fsanitize=address,undefined.
# Leaks inside third-party drivers (PoCL, the ICD loader, CLBlast) are
# suppressed by scripts/lsan.supp; the project's own code never is.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${MOE_SANITIZE_BUILD_DIR:-$root/build-asan}
cc=${CC:-gcc}

if [ $# -ge 1 ] && [ -n "$1" ]; then
  backends=$1
else
  backends=cpu
  if [ -e /usr/include/CL/cl.h ] && ldconfig -p 2>/dev/null | grep -q 'libOpenCL\.so' &&
     ldconfig -p 2>/dev/null | grep -q 'libclblast\.so'; then
    backends="cpu;opencl"
  fi
fi

# The runtime check: compile, link and run a program with a leak-free heap
# round trip and a signed addition UBSan instruments.
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
cat >"$probe/probe.c" <<'PROBE'
#include <stdlib.h>
int main(int argc, char **argv) {
  (void)argv;
  int *p = malloc(sizeof *p);
  if (!p) return 1;
  *p = argc;
  int v = *p + 1;
  free(p);
  return v == argc + 1 ? 0 : 1;
}
PROBE
major=$("$cc" -dumpversion 2>/dev/null | cut -d. -f1 || echo "?")
case "$major" in
  9) asan_pkg=libasan5 ;;
  10 | 11) asan_pkg=libasan6 ;;
  *) asan_pkg=libasan8 ;;
esac
if ! "$cc" -fsanitize=address,undefined -fno-omit-frame-pointer "$probe/probe.c" \
       -o "$probe/probe" 2>"$probe/err" || ! "$probe/probe" 2>>"$probe/err"; then
  echo "sanitize.sh: $cc cannot build or run a program with -fsanitize=address,undefined:" >&2
  sed 's/^/  /' "$probe/err" >&2
  echo "sanitize.sh: install the sanitizer runtimes of $cc $major (Debian/Ubuntu:" \
       "apt-get install $asan_pkg libubsan1) and retry" >&2
  exit 1
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
echo "sanitize.sh: backends '$backends', compiler $cc $major, build $build"
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_C_COMPILER="$cc" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_SANITIZE=address,undefined \
  -DMOE_BACKEND="$backends" -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCH=OFF -DMOE_BUILD_FUZZ=OFF \
  >/dev/null
cmake --build "$build" --parallel "$(nproc 2>/dev/null || echo 2)"

asan=detect_leaks=1:allocator_may_return_null=1:abort_on_error=1
# The CUDA runtime maps memory where ASan keeps its shadow gap.
case ";$backends;" in *";cuda;"* | *";all;"*) asan=$asan:protect_shadow_gap=0 ;; esac
export ASAN_OPTIONS=${ASAN_OPTIONS:-$asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$root/scripts/lsan.supp:print_suppressions=0}

# shellcheck disable=SC2086
ctest --test-dir "$build" --output-on-failure ${CTEST_ARGS:-}
echo "sanitize.sh: all tests passed under ASan + UBSan (backends '$backends')"
