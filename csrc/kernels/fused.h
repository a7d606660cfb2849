// Launcher of the fused kernel: raw pointers (LayerArgs), a stream and a view
// of the exchange workspace in; cudaError_t out. No XLA types.
#pragma once

#include <cuda_runtime.h>

#include "../common/args.h"
#include "../common/exchange.h"

namespace mar {

// Loads every kernel on the current device. Call once per device before the
// first launch and outside any captured region: with CUDA's lazy module
// loading, the first launch of a kernel would otherwise load it then, and a
// load can wait for the kernels already running — such as a peer rank's
// kernel sharing the device, waiting for this one (a deadlock until the bound).
cudaError_t prepare_fused_kernels();

// Why a call of `args` cannot run on the workspace with `algorithm`; nullptr when it can.
const char* fused_capacity_problem(DType t, const LayerArgs& args, const ExchangeView& view,
                                   Algorithm algorithm);

cudaError_t launch_fused(DType t, const LayerArgs& args, const ExchangeView& view,
                         Algorithm algorithm, cudaStream_t stream);

// The grid launch_fused uses for a call (blocks, threads per block, blocks per
// cluster, dynamic shared memory): for timing floors of the same shape.
struct LaunchShape {
  int grid = 0, block = 0, cluster = 1;
  size_t smem = 0;
};
LaunchShape fused_launch_shape(DType t, const LayerArgs& args, const ExchangeView& view,
                               Algorithm algorithm);

// Whether the kernels are launched with programmatic dependent launch (on
// unless $JAX_MOE_AR_PDL is "0" when the first call is launched; the switch is
// there for measuring with and without).
bool programmatic_launch();

// ---- internal: the per-element-type halves of the functions above -------------------
// The kernels of each element type are compiled in a translation unit of their own
// (fused_f32.cu, fused_bf16.cu, fused_f16.cu, each including fused.cu), so that the
// three compile in parallel; fused_entry.cc dispatches on DType to them.
struct FusedOps {
  cudaError_t (*prepare)();
  const char* (*capacity_problem)(const LayerArgs&, const ExchangeView&, Algorithm);
  cudaError_t (*launch)(const LayerArgs&, const ExchangeView&, Algorithm, cudaStream_t);
  LaunchShape (*shape)(const LayerArgs&, const ExchangeView&, Algorithm);
};
template <typename T> FusedOps fused_ops();
template <> FusedOps fused_ops<float>();
template <> FusedOps fused_ops<bf16_t>();
template <> FusedOps fused_ops<f16_t>();

}  // namespace mar
