// CPU implementation of the op's two local stages, built from common/ so CI
// runs the kernels' math. Raw pointers in (LayerArgs), nothing XLA.
#pragma once

#include "../common/args.h"

namespace mar {

// This rank's wire: a.wire [M, H] from expert_out, idx, scales, shared.
template <typename T> void cpu_finalize(const LayerArgs& a);

// Everything after the exchange: a.partial holds the N ranks' wires [N, M, H]
// in rank order (what all_gather returns); rank-ordered sum, residual, norm,
// quant into the asked results.
template <typename T> void cpu_tail(const LayerArgs& a);

}  // namespace mar
