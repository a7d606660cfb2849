#!/usr/bin/env bash
# One device-machine session: build, GPU tests, bench. Logs go under $OUT.
# Usage (from the repo root on the device machine):
#   bash scripts/device_check.sh [pytest args...]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jax_moe_ar_out}
mkdir -p "$OUT"
{ nvidia-smi; nvidia-smi topo -m; python3 -c "import jax; print(jax.__version__, jax.devices())"; } \
  > "$OUT/machine.txt" 2>&1
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
timeout -s INT ${PYTEST_LIMIT_S:-420} python3 -m pytest -m "gpu and not slow" -q -rfE -p no:cacheprovider "$@" 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -60
echo "tests done: $(( $(date +%s) - start )) s"
