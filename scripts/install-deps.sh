#!/usr/bin/env bash
# Installs, when missing, the Debian/Ubuntu packages that building and
# testing need: a C toolchain and CMake, Criterion (tests), the OpenCL ICD
# loader, headers and PoCL (the OpenCL backend on the CPU), and CLBlast.
#   scripts/install-deps.sh          build + test dependencies
#   scripts/install-deps.sh --ci     also clang and its sanitizer/fuzzer runtime
# Uses sudo when not run as root. Does nothing when everything is there.
set -euo pipefail
packages="build-essential cmake pkg-config libcriterion-dev ocl-icd-opencl-dev opencl-c-headers
          pocl-opencl-icd libclblast-dev"
if [ "${1:-}" = "--ci" ]; then
  packages="$packages clang libclang-rt-dev python3"
fi
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "install-deps: installing$missing"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends $missing
