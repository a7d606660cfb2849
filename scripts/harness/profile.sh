#!/usr/bin/env bash
# One device call: build the harness, time it (groups of one, virtual ranks), and profile single
# kernels with ncu (--ranks 1). Everything lands under $OUT.
# Usage (repo root, device machine): bash scripts/harness/profile.sh [M...]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PATH=/usr/local/cuda/bin:$PATH
OUT=${OUT:-/tmp/jax_moe_ar_out}
mkdir -p "$OUT"
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/times.sh" 2>&1 | tee "$OUT/harness_times.txt"
h=$(bash "$here/build.sh" | tail -1) || exit 1
Ms=${*:-1 128 8192}
for M in $Ms; do
  timeout 240 ncu --set full --import-source yes --warp-sampling-interval 0 -k regex:oneshot -s 10 -c 1 -f -o "$OUT/ncu_m$M" \
    "$h" --ranks 1 --M $M --iters 20 --warmup 2 --graph 0 > "$OUT/ncu_m$M.txt" 2>&1
  ncu -i "$OUT/ncu_m$M.ncu-rep" --page details >> "$OUT/ncu_m$M.txt" 2>&1
  ncu -i "$OUT/ncu_m$M.ncu-rep" --page source --csv --print-source sass > "$OUT/src_m$M.csv" 2>&1
  gzip -f "$OUT/src_m$M.csv"
  rm -f "$OUT/ncu_m$M.ncu-rep"
done
# dram__bytes: the HBM bytes the kernel really moves, against the harness's memory floor.
grep -E "Duration|Registers|Achieved Occupancy|Memory Throughput|DRAM Throughput|dram__bytes|Warp Cycles Per Issued|Block Limit Registers" "$OUT"/ncu_m*.txt
