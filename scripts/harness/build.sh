#!/usr/bin/env bash
# Builds scripts/harness/build/harness from the package's own kernel and workspace
# sources (no JAX, no XLA). Run from anywhere; needs nvcc and an sm_90 target.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$here/build"
nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -fmad=false -lineinfo \
  -I"$root/csrc" "$here/harness.cu" "$root/csrc/kernels/fused.cu" \
  "$root/csrc/runtime/workspace.cc" -o "$here/build/harness"
echo "built $here/build/harness"
