#!/usr/bin/env bash
# One device call: build + GPU tests (scripts/device_check.sh), then the bench.
# Usage: bash scripts/device_run.sh "<pytest args>" "<bench args>"
set -uo pipefail
export JAX_MOE_AR_TIMEOUT_S=${JAX_MOE_AR_TIMEOUT_S:-5}
OUT=${OUT:-/tmp/jax_moe_ar_out}
bash scripts/device_check.sh $1
if [ -n "${2:-}" ]; then
  start=$(date +%s)
  timeout -s INT ${BENCH_LIMIT_S:-300} python3 -m jax_moe_ar bench $2 --out "$OUT/bench" \
    > "$OUT/bench.log" 2>&1
  echo "bench rc=$? in $(( $(date +%s) - start )) s"
  grep -v "^\[" "$OUT/bench.log" | tail -45
fi
