#!/usr/bin/env bash
# sass_summary.sh - on the GPU machine: the instruction mix of the Triton
# peer's compiled kernels (Triton's cache) next to ours, for the notes in
# bench/cuda_notes.md. Usage: bench/sass_summary.sh BUILD_DIR OUT_DIR
# Run bench/triton_peer.py first so that the cache holds its kernels.
# Prints, per kernel, its registers and the counts of the opcodes that tell
# a main loop apart: global loads (LDG), cp.async (LDGSTS), TMA (UTMALDG),
# ldmatrix (LDSM), shared loads (LDS), mma.sync (HMMA), wgmma (HGMMA),
# barriers (BAR), cp.async waits (DEPBAR), mbarrier ops (SYNCS).
set -u
build=${1:-build-gpu}
out=${2:-out}
mkdir -p "$out"
summarize() { # cubin-or-object label
  cuobjdump -sass "$1" 2>/dev/null | awk -v label="$2" '
    /Function :/ { if (fn != "") print_fn(); fn = $3; delete n; next }
    /\/\*[0-9a-f]+\*\// {
      for (i = 1; i <= NF; i++) if ($i ~ /^[A-Z][A-Z0-9_.]+$/ && $i !~ /^R[0-9]/) { op = $i; break }
      split(op, parts, "."); n[parts[1]]++; n["total"]++
    }
    function print_fn() {
      printf "%s %s total=%d LDG=%d LDGSTS=%d UTMALDG=%d LDSM=%d LDS=%d HMMA=%d HGMMA=%d BAR=%d DEPBAR=%d SYNCS=%d\n",
        label, fn, n["total"], n["LDG"], n["LDGSTS"], n["UTMALDG"], n["LDSM"], n["LDS"], n["HMMA"],
        n["HGMMA"], n["BAR"], n["DEPBAR"], n["SYNCS"]
    }
    END { if (fn != "") print_fn() }'
}
{
  for cubin in $(find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name '*.cubin' 2>/dev/null); do
    summarize "$cubin" peer
  done | sort -u
  for obj in $(find "$build" -name 'grouped_gemm.cu.o' -o -name 'gemm_stream.cu.o' -o -name 'gemm_wgmma.cu.o'); do
    summarize "$obj" ours
  done
} >"$out/sass-summary.txt"
# The peer's GEMM kernels' full SASS (the 16-row tiles at least) for reading.
for cubin in $(find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name '*gemm*.cubin' 2>/dev/null | head -4); do
  cuobjdump -sass "$cubin"
done >"$out/sass-peer-gemm.txt" 2>&1
wc -l "$out/sass-summary.txt"
