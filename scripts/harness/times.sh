#!/usr/bin/env bash
# Builds the harness and prints µs per call for the standard cases (1 and 2
# ranks, both algorithms, M from 1 to 8192, and the quantized large-M cases).
# Usage (repo root, GPU machine): bash scripts/harness/times.sh [ranks...]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
h=$(bash "$here/build.sh" | tail -1) || exit 1
for algo in oneshot twoshot; do
  for r in ${*:-1 2}; do
    for M in 1 32 128 2048 8192; do
      "$h" --ranks $r --M $M --algo $algo --iters $((M > 1000 ? 200 : 2000))
    done
  done
done
"$h" --ranks 2 --M 8192 --quant nvfp4 --iters 200
"$h" --ranks 2 --M 8192 --quant fp8_per_group --iters 200
"$h" --ranks 2 --M 1 --quant nvfp4 --iters 2000
