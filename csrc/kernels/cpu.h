// CPU implementation of the op's two local stages, built from common/ so CI
// runs the kernels' math. Raw pointers in, nothing XLA.
#pragma once

#include <cstdint>

#include "../common/config.h"
#include "../common/numerics.h"

namespace mar {

struct FinalizeArgs {
  const void* expert_out = nullptr;  // [P, H] T
  const int32_t* idx = nullptr;      // [M, K]
  const void* scales = nullptr;      // [M, K] scales_dtype, or nullptr
  DType scales_dtype = DType::kF32;
  const void* shared = nullptr;      // [M, H] T, or nullptr
  int64_t P = 0, M = 0, H = 0, K = 0;
  float routed_scaling_factor = 1.0f;
  void* wire = nullptr;              // [M, H] T out
};

// Everything after the exchange: rank-ordered sum, residual, norm, quant.
struct TailArgs {
  const void* partials = nullptr;  // [N, M, H] T, rank-major (what all_gather returns)
  int64_t N = 1, M = 0, H = 0;
  const void* residual = nullptr;  // [M, H] T
  const void* gamma = nullptr;     // [H] gamma_dtype
  DType gamma_dtype = DType::kF32;
  const float* quant_scale = nullptr;  // scalar: Fp8Static scale or NvFp4 global scale
  OpConfig cfg;
  void* residual_out = nullptr;  // [M, H] T or nullptr
  void* norm_out = nullptr;      // [M, H] T or nullptr
  uint8_t* quant_out = nullptr;  // codes or nullptr
  void* scale_out = nullptr;     // float32 or e4m3 scales, or nullptr
};

template <typename T> void cpu_finalize(const FinalizeArgs& a);
template <typename T> void cpu_tail(const TailArgs& a);

}  // namespace mar
