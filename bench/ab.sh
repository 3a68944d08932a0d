#!/usr/bin/env bash
# ab.sh - on the GPU machine: A/B runs of the CUDA forward's paths in one
# call, each a moe_bench run over the same points with the option cuda.path
# forcing a path (or none: the default plan), then bench/compare.py tables.
# Usage: bench/ab.sh BUILD_DIR OUT_DIR "MODELS" "TOKENS" VARIANT...
#   VARIANT: default | decode | stream | wgmma | mma (cuda.path's values;
#            default = auto), or any NAME=VALUE context option
# The first variant is the one the others are compared against.
set -u
build=$1 out=$2 models=$3 tokens=$4
shift 4
first=""
for variant in "$@"; do
  case $variant in
    default) option=cuda.path=auto ;;
    *=*) option=$variant ;;
    *) option=cuda.path=$variant ;;
  esac
  timeout 200 "./$build/bench/moe_bench" --backend cuda --option "$option" \
    --model "$models" --tokens "$tokens" --json "$out/ab-${variant//=/-}.json" >"$out/ab-${variant//=/-}.log" 2>&1
  echo "ab $variant rc=$?"
  if [ -z "$first" ]; then
    first=$variant
  else
    python3 bench/compare.py "$out/ab-${first//=/-}.json" "$out/ab-${variant//=/-}.json" \
      --labels "$first,$variant" | cut -c1-100
  fi
done
