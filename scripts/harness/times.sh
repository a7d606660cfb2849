#!/usr/bin/env bash
# Builds the harness and prints µs per call with floors for the standard cases:
# groups of one and virtual ranks (one GPU), M from 1 to 8192, every quant
# format at small M and the quantized large-M cases.
# Usage (repo root, GPU machine): bash scripts/harness/times.sh [virtual-ranks...]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
h=$(bash "$here/build.sh" | tail -1) || exit 1
run() { "$h" --floors 1 "$@" | grep -v "^$"; }
for M in 1 32 128 2048 8192; do
  for q in none fp8_per_group nvfp4; do
    run --ranks 1 --M $M --quant $q --iters $((M > 1000 ? 100 : 1000))
  done
done
for q in fp8_static fp8_per_token; do run --ranks 1 --M 1 --quant $q; done
for r in ${*:-2 4}; do
  for M in 1 32 128 2048; do
    for algo in oneshot twoshot; do
      run --ranks $r --virtual 1 --M $M --algo $algo --iters $((M > 1000 ? 100 : 1000))
    done
  done
done
