// Launcher of the fused kernel: raw pointers (LayerArgs), a stream and a view
// of the exchange workspace in; cudaError_t out. No XLA types.
#pragma once

#include <cuda_runtime.h>

#include "../common/args.h"
#include "../common/exchange.h"

namespace mar {

// Sets each kernel's dynamic shared-memory limit (one row of T) on the current
// device; once per device, outside any captured region.
cudaError_t prepare_fused_kernels();

// Why a call of `args` cannot run on the workspace with `algorithm`; nullptr when it can.
const char* fused_capacity_problem(DType t, const LayerArgs& args, const ExchangeView& view,
                                   Algorithm algorithm);

cudaError_t launch_fused(DType t, const LayerArgs& args, const ExchangeView& view,
                         Algorithm algorithm, cudaStream_t stream);

}  // namespace mar
