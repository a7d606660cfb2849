#!/usr/bin/env bash
# Builds the harness (the CMake target `harness`: the package's own kernel and
# workspace objects, no JAX, no XLA) and prints the executable's path last.
# Usage: scripts/harness/build.sh [BUILD_DIR]   (default: build/harness in the repo)
# $HARNESS_CUDA_FLAGS adds nvcc flags, e.g. -DMAR_KCHUNK=4 for a variant.
# Needs nvcc, CMake >= 3.24 and an sm_90 target GPU to run it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$root/build/harness}
mkdir -p "$dir"
cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DJAX_MOE_AR_PYTHON=OFF \
  -DJAX_MOE_AR_HARNESS=ON -DJAX_MOE_AR_CUDA=ON -DCMAKE_CUDA_FLAGS="${HARNESS_CUDA_FLAGS:-}" \
  > "$dir.cmake.log" 2>&1 \
  || { cat "$dir.cmake.log" >&2; exit 1; }
cmake --build "$dir" --target harness -j 4 > "$dir.build.log" 2>&1 \
  || { tail -50 "$dir.build.log" >&2; exit 1; }
echo "$dir/harness"
