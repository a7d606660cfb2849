// The floors the harness prints beside each case, each a kernel timed like the
// op: an empty kernel of the op's grid (launch floor), a kernel that reads the
// op's input bytes once and writes its output bytes once (memory floor), and
// for N ranks a flag-only exchange over a workspace of the same group
// (protocol floor: one 16-byte push per block to every peer, then the wait).
// The launch and memory floors are timed twice: launched the ordinary way, and
// launched like the op, with programmatic dependent launch (each kernel lets
// its successor launch at once and waits for its predecessor before its first
// load): the per-call cost that a chain of the op's calls cannot go under.
#pragma once

#include <cuda_runtime.h>

#include "kernels/device.cuh"
#include "kernels/fused.h"

namespace harness {

// kPdl: launched with programmatic dependent launch (see above).
template <bool kPdl>
__global__ void empty_kernel() {
  if constexpr (kPdl) {
    mar::dev::let_successor_launch();
    mar::dev::wait_for_predecessor();
  }
}

// Reads `in_vecs` 16-byte words once, writes `out_vecs` once, over the grid.
template <bool kPdl>
__global__ void memory_kernel(const uint4* __restrict__ in, size_t in_vecs, uint4* __restrict__ out,
                              size_t out_vecs) {
  if constexpr (kPdl) {
    mar::dev::let_successor_launch();
    mar::dev::wait_for_predecessor();
  }
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  uint32_t acc = 0;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < in_vecs; i += stride) {
    const uint4 v = __ldg(in + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < out_vecs; i += stride)
    out[i] = make_uint4(acc, uint32_t(i), 0u, 0u);
}

// Each block: its threads 0..N-1 other than `rank` push 16 bytes to that peer's
// slot at this block's offset, then wait for the peer's word in their own slot
// and clear it. Per-block epochs, as the op's kernels keep them.
__global__ void protocol_kernel(const __grid_constant__ mar::ExchangeView x) {
  const mar::dev::CallState st = mar::dev::begin_call(x);
  const int s = int(threadIdx.x);
  if (s < x.nranks && s != x.rank && !st.poisoned) {
    const uint64_t off = uint64_t(blockIdx.x) * 16u;
    mar::st_relaxed_sys(x.areas[s] + (st.slot0(x.nranks) + uint64_t(x.rank)) * x.slot_bytes + off,
                        make_uint4(st.epoch, 1u, 2u, 3u));
    char* mine = x.areas[x.rank] + (st.slot0(x.nranks) + uint64_t(s)) * x.slot_bytes + off;
    mar::dev::wait_slot<4>(mar::ld_relaxed_sys(mine), mine, x, st, s);
    mar::st_relaxed_sys(mine, mar::kSentinel4);
  }
  __syncthreads();
  mar::dev::finish_call(x, st.epoch);
}

// Launches of a kernel with the op's shape (grid, block, cluster, smem), or
// any grid and block (cluster 1: none asked), with programmatic dependent launch if `pdl`.
inline cudaError_t launch_floor(const void* kernel, const mar::LaunchShape& s, bool pdl,
                                cudaStream_t stream, void** args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(s.grid));
  cfg.blockDim = dim3(unsigned(s.block));
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2] = {};
  unsigned n = 0;
  if (s.cluster > 1) {  // the memory floor's grid has no cluster, launched as plain blocks
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = unsigned(s.cluster);
    attrs[n].val.clusterDim.y = attrs[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  cfg.attrs = attrs;
  cfg.numAttrs = n;
  return cudaLaunchKernelExC(&cfg, kernel, args);
}

}  // namespace harness
