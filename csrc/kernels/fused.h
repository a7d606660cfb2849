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

}  // namespace mar
