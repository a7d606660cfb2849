// The op's static configuration and every number or name that Python and C++
// share: quant kinds, option flags, algorithm codes, limits and custom-call
// target names. Each is defined here once; module.cc exports the lists below
// to Python (src/jax_moe_ar/_contract.py reads them), so neither side copies the
// other. Plain data: no XLA or CUDA types.
#pragma once

#include <cstdint>

#include "numerics.h"  // MAR_HD

namespace mar {

// Each list is X(C++ name, Python name, value); module.cc turns every list
// into a {Python name: value} dict.
#define MAR_QUANT_KINDS(X)                                                  \
  X(kNone, none, 0)                                                         \
  X(kFp8Static, fp8_static, 1)       /* e4m3 codes, caller's dequant scale */ \
  X(kFp8PerToken, fp8_per_token, 2)  /* e4m3 codes, a float32 scale per row */ \
  X(kFp8PerGroup, fp8_per_group, 3)  /* e4m3 codes, a scale per group_size columns */ \
  X(kNvFp4, nvfp4, 4)                /* e2m1 codes, an e4m3 scale per 16 columns */

// Bits of OpConfig::flags.
#define MAR_OP_FLAGS(X)                                                     \
  X(kHasScales, has_scales, 1 << 0)     /* expert_scales operand present */ \
  X(kHasShared, has_shared, 1 << 1)     /* shared_expert_out operand present */ \
  X(kOutResidual, out_residual, 1 << 2) /* residual_out result present */  \
  X(kOutNorm, out_norm, 1 << 3)         /* norm_out result present */      \
  X(kOutQuant, out_quant, 1 << 4)       /* quant (+ scale where the kind has one) */ \
  X(kUe8m0, ue8m0, 1 << 5)              /* per-group scales rounded up to 2^k */ \
  X(kScaleCol, scale_col, 1 << 6)       /* per-group scales stored [H/gs, M] */ \
  X(kFp4Swizzled, fp4_swizzled, 1 << 7) /* NVFP4 scales in the 128x4 layout */ \
  X(kDense, dense, 1 << 8)              /* allreduce_rmsnorm: the partial is x */ \
  X(kScatter, scatter, 1 << 9)          /* reduce-scatter: residual, results: this rank's M/N rows */

// How the fused CUDA kernel exchanges partials (see kernels/fused.cu).
//   kOneShot: every rank sends its whole partial to every rank; each reduces every row.
//   kTwoShot: each row goes to its owner rank (reduce-scatter); the owner reduces
//             it and sends the row's residual_out (or, when only quant is asked,
//             its codes and scales) to every rank (all-gather).
#define MAR_ALGORITHMS(X) \
  X(kOneShot, oneshot, 0) \
  X(kTwoShot, twoshot, 1)

// Limits of the fused kernel; the Python planner checks them before lowering.
#define MAR_LIMITS(X)                                                     \
  X(kMaxRanks, max_ranks, 16)              /* ranks of one group */       \
  X(kMaxRowBytes, max_row_bytes, 96 * 1024) /* one row of T per block */  \
  X(kMaxElements, max_elements, int64_t(1) << 31) /* per array: 32-bit index math */

// Custom-call targets (prefixed and versioned: they end up in exported HLO).
#define MAR_TARGETS(X)                                       \
  X(kTargetFused, fused, "jax_moe_ar_fused_v1")              \
  X(kTargetCpuFinalize, cpu_finalize, "jax_moe_ar_cpu_finalize_v1") \
  X(kTargetCpuTail, cpu_tail, "jax_moe_ar_cpu_tail_v1")           \
  X(kTargetNoop, noop, "jax_moe_ar_noop_v1") /* the bench's no-op: XLA's own cost */

#define MAR_ENUMERATOR(name, py, value) name = value,
enum class QuantKind : int32_t { MAR_QUANT_KINDS(MAR_ENUMERATOR) };
enum OpFlag : int32_t { MAR_OP_FLAGS(MAR_ENUMERATOR) };
enum class Algorithm : int32_t { MAR_ALGORITHMS(MAR_ENUMERATOR) };
#undef MAR_ENUMERATOR

#define MAR_CONSTANT(name, py, value) constexpr int64_t name = value;
MAR_LIMITS(MAR_CONSTANT)
#undef MAR_CONSTANT

#define MAR_STRING(name, py, value) constexpr char name[] = value;
MAR_TARGETS(MAR_STRING)
#undef MAR_STRING

struct OpConfig {
  QuantKind quant = QuantKind::kNone;
  int32_t flags = 0;
  float routed_scaling_factor = 1.0f;
  float eps = 1e-6f;
  float norm_weight_offset = 0.0f;
  int32_t group_size = 128;

  MAR_HD bool has(OpFlag f) const { return (flags & f) != 0; }
  // Quant codes are produced (asked for, with a quant kind).
  MAR_HD bool quantizes() const { return has(kOutQuant) && quant != QuantKind::kNone; }
};

MAR_HD bool quant_has_scale_output(QuantKind q) {
  return q == QuantKind::kFp8PerToken || q == QuantKind::kFp8PerGroup || q == QuantKind::kNvFp4;
}

MAR_HD bool quant_takes_scale_input(QuantKind q) {
  return q == QuantKind::kFp8Static || q == QuantKind::kNvFp4;
}

}  // namespace mar
