// The operands and results of one call as raw pointers, with its dimensions
// and configuration: filled once from the decoded custom call (ffi/attrs.h)
// and passed to the CPU stages and the CUDA launcher alike.
#pragma once

#include <cstdint>

#include "config.h"
#include "numerics.h"

namespace mar {

struct LayerArgs {
  // Operands (SPEC §2), in the order src/jax_moe_ar/primitives.py passes them.
  const void* partial = nullptr;      // expert_out [P, H]; dense: x [M, H]; CPU tail: wires [N, M, H]
  const int32_t* idx = nullptr;       // permuted_idx [M, K] (MoE only)
  const void* residual = nullptr;     // [M, H] T
  const void* gamma = nullptr;        // norm_weight [H], gamma_dtype
  DType gamma_dtype = DType::kF32;
  const void* scales = nullptr;       // expert_scales [M, K], scales_dtype, or nullptr (all 1)
  DType scales_dtype = DType::kF32;
  const void* shared = nullptr;       // shared_expert_out [M, H] T, or nullptr
  const float* quant_scale = nullptr; // scalar: FP8 static scale or NVFP4 global scale
  // Results; nullptr when not asked for.
  void* residual_out = nullptr;       // [M, H] T
  void* norm_out = nullptr;           // [M, H] T
  uint8_t* quant_out = nullptr;       // codes
  void* scale_out = nullptr;          // float32 or e4m3 scales
  void* wire = nullptr;               // CPU finalize stage: this rank's wire [M, H] T
  // N: ranks of the CPU tail's gathered wires; P: expert rows; K: experts per token.
  int64_t N = 1, P = 0, M = 0, H = 0, K = 0;
  OpConfig cfg;
};

}  // namespace mar
