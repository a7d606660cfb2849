// The op's static configuration, shared by the FFI handlers (which decode it
// from the custom call's attributes) and the kernels (which receive it by
// value). Plain data: no XLA or CUDA types.
#pragma once

#include <cstdint>

#include "numerics.h"  // MAR_HD

namespace mar {

enum class QuantKind : int32_t {
  kNone = 0,
  kFp8Static = 1,    // e4m3 codes with a caller-given dequant scale
  kFp8PerToken = 2,  // e4m3 codes, one float32 scale per row
  kFp8PerGroup = 3,  // e4m3 codes, one float32 scale per group_size columns
  kNvFp4 = 4,        // e2m1 codes, one e4m3 scale per 16 columns
};

// Bits of OpConfig::flags. Python (jax_moe_ar/primitives.py) mirrors these.
enum OpFlag : int32_t {
  kHasScales = 1 << 0,     // expert_scales operand present
  kHasShared = 1 << 1,     // shared_expert_out operand present
  kOutResidual = 1 << 2,   // residual_out result present
  kOutNorm = 1 << 3,       // norm_out result present
  kOutQuant = 1 << 4,      // quant (+ scale where the kind has one) present
  kUe8m0 = 1 << 5,         // per-group scales rounded up to powers of two
  kScaleCol = 1 << 6,      // per-group scales stored [H/gs, M]
  kFp4Swizzled = 1 << 7,   // NVFP4 scales in the 128x4 swizzled layout
  kDense = 1 << 8,         // allreduce_rmsnorm: the partial is x itself
  kScatter = 1 << 9,       // reduce-scatter variant: residual and results are this rank's M/N rows
};

struct OpConfig {
  QuantKind quant = QuantKind::kNone;
  int32_t flags = 0;
  float routed_scaling_factor = 1.0f;
  float eps = 1e-6f;
  float norm_weight_offset = 0.0f;
  int32_t group_size = 128;

  MAR_HD bool has(OpFlag f) const { return (flags & f) != 0; }
};

inline bool quant_has_scale_output(QuantKind q) {
  return q == QuantKind::kFp8PerToken || q == QuantKind::kFp8PerGroup || q == QuantKind::kNvFp4;
}

inline bool quant_takes_scale_input(QuantKind q) {
  return q == QuantKind::kFp8Static || q == QuantKind::kNvFp4;
}

}  // namespace mar
