// Finalize, rank-ordered reduce and RMSNorm of SPEC §3, identical on host and
// device. The orchestration (threads, vectors, exchange) lives with each
// caller; the order of every rounding lives here.
#pragma once

#include <type_traits>

#include "numerics.h"

namespace mar {

// An index selects a row of expert_out only when 0 <= p < P; anything else
// (-1, out of range, negative) is skipped and never dereferenced.
// IntP is int64_t on the host; the device passes P as int32_t (a call's arrays
// stay under 2^31 elements there), which keeps the test to 32-bit compares.
// One unsigned compare: P >= 0, and a negative p wraps to above every P.
template <typename IntP> MAR_HD bool valid_expert_row(int32_t p, IntP P) {
  using U = std::make_unsigned_t<IntP>;
  return U(IntP(p)) < U(P);
}

// Finalize V adjacent columns of one token:
//   acc = sum_k (w_k * x[p_k]) in k order, skipping invalid p_k;
//   acc = acc * routed_scaling_factor; acc += shared (unscaled).
// The K slots go in chunks of kChunk: the indices, weights and rows of a chunk
// are all fetched before the first is accumulated, so on a GPU their loads are
// in flight together (the rounding order is still k order).
// load_row(p, ok) returns row p's raw data for these columns (any copyable
// type) where ok, and zeros without reading p where not (the device loads
// under a predicate instead of branching around each row);
// unpack(raw, x) fills x[0..V) with its float32 values; weights(k0, in, w)
// fills w[i] with the router weight of slot k0 + i as float32 where in[i]
// (the slot exists: k0 + i < K; load_weights below).
template <int V, int kChunk = 8, typename IntP, typename Weights, typename LoadRow,
          typename Unpack>
MAR_HD void finalize_columns(float (&acc)[V], const int32_t* idx_row, int K, IntP P,
                             Weights weights, LoadRow load_row, Unpack unpack) {
  using Raw = decltype(load_row(int32_t(0), false));
  MAR_UNROLL
  for (int j = 0; j < V; ++j) acc[j] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    bool in[kChunk], ok[kChunk];
    int32_t p[kChunk];
    MAR_UNROLL
    for (int i = 0; i < kChunk; ++i) {
      in[i] = k0 + i < K;
      p[i] = in[i] ? idx_row[k0 + i] : -1;
    }
    // The weights do not depend on the indices (a skipped slot's weight is
    // read and unused), so on a GPU their loads go out with the indices'.
    float w[kChunk];
    weights(k0, in, w);
    MAR_UNROLL
    for (int i = 0; i < kChunk; ++i) ok[i] = valid_expert_row(p[i], P);
    Raw raw[kChunk];
    MAR_UNROLL
    for (int i = 0; i < kChunk; ++i) raw[i] = load_row(p[i], ok[i]);
    MAR_UNROLL
    for (int i = 0; i < kChunk; ++i) {
      if (!ok[i]) continue;
      float x[V];
      unpack(raw[i], x);
      MAR_UNROLL
      for (int j = 0; j < V; ++j) acc[j] = add_rn(acc[j], mul_rn(w[i], x[j]));
    }
  }
}

// Router weights of one token's slots k0 .. k0+kChunk where in[i]: `scales`
// is the [M, K] array of dtype dt (nullptr: every weight is 1) and `first`
// the element index of slot k0. One dtype branch per chunk, not per slot.
template <int kChunk, typename Index>
MAR_HD void load_weights(const void* scales, DType dt, Index first, const bool (&in)[kChunk],
                         float (&w)[kChunk]) {
  MAR_UNROLL
  for (int i = 0; i < kChunk; ++i) w[i] = 1.0f;
  if (scales == nullptr) return;
  switch (dt) {
    case DType::kBF16:
      MAR_UNROLL
      for (int i = 0; i < kChunk; ++i)
        if (in[i]) w[i] = to_f32(static_cast<const bf16_t*>(scales)[first + i]);
      break;
    case DType::kF16:
      MAR_UNROLL
      for (int i = 0; i < kChunk; ++i)
        if (in[i]) w[i] = to_f32(static_cast<const f16_t*>(scales)[first + i]);
      break;
    default:
      MAR_UNROLL
      for (int i = 0; i < kChunk; ++i)
        if (in[i]) w[i] = static_cast<const float*>(scales)[first + i];
  }
}

// `shared` is read only when has_shared (an array and a flag, not a nullable
// pointer: a pointer to a register array sends it through local memory on the
// device).
template <int V>
MAR_HD void finalize_scale_and_shared(float (&acc)[V], float routed_scaling_factor,
                                      const float (&shared)[V], bool has_shared) {
  MAR_UNROLL
  for (int j = 0; j < V; ++j) {
    acc[j] = mul_rn(acc[j], routed_scaling_factor);
    if (has_shared) acc[j] = add_rn(acc[j], shared[j]);
  }
}

// y = f32(wire_0) + f32(wire_1) + ... in rank order; starts from wire_0 (not
// from 0), which keeps -0.0 exactly as SPEC §3 writes it.
MAR_HD float rank_sum_step(float y, float wire_s) { return add_rn(y, wire_s); }

// residual_out = rT(y + residual), as float32.
template <typename T> MAR_HD T residual_value(float y, float residual) {
  return from_f32<T>(add_rn(y, residual));
}

// Sum of squares of a row: each square rounded to float32, the sum carried in
// float64 and rounded once. SPEC §3 lets the order differ (norm within 1 ulp);
// a float64 carry makes the result independent of order in practice, so CPU,
// GPU and the oracle agree bit for bit almost always.
MAR_HD double add_square(double acc, float r) { return acc + double(mul_rn(r, r)); }

// inv = 1 / sqrt(sum_sq / H + eps).
MAR_HD float rms_inv(double sum_sq, int64_t H, float eps) {
  return div_rn(1.0f, sqrt_rn(add_rn(div_rn(float(sum_sq), float(H)), eps)));
}

// norm_out = rT((residual_out * inv) * (offset + gamma)).
template <typename T>
MAR_HD T norm_value(float residual_out, float inv, float norm_weight_offset, float gamma) {
  return from_f32<T>(mul_rn(mul_rn(residual_out, inv), add_rn(norm_weight_offset, gamma)));
}

}  // namespace mar
