// The tail of one token row, run by one block: stage residual_out in shared
// memory (stage_row), then RMSNorm and the quantizers over the staged row
// (finish_row). Every rank that produces a row's outputs runs exactly this
// code with the same block shape, so the sum of squares — and so norm_out and
// the quant outputs — come out bit-identical on every rank.
#pragma once

#include "../common/layer_math.h"
#include "../common/quant.h"
#include "device.cuh"

namespace mar {
namespace dev {

// gamma[v*V .. v*V+V) as float32; gamma is T or float32 (SPEC §2).
template <typename T>
__device__ __forceinline__ void load_gamma(const LayerArgs& a, uint32_t v, float (&g)[Pack<T>::V]) {
  constexpr int V = Pack<T>::V;
  if (a.gamma_dtype == DType::kF32) {
    const float* p = static_cast<const float*>(a.gamma) + v * V;
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      float f[4];
      Pack<float>::unpack(ldg16(p + 4 * q), f);
#pragma unroll
      for (int j = 0; j < 4; ++j) g[4 * q + j] = f[j];
    }
  } else {
    Pack<T>::unpack(ldg16(static_cast<const T*>(a.gamma) + v * V), g);
  }
}

__device__ __forceinline__ void prefetch_gamma(const LayerArgs& a, uint32_t H) {
  const uint32_t bytes = H * (a.gamma_dtype == DType::kF32 ? 4u : 2u);
  for (uint32_t b = threadIdx.x * 128u; b < bytes; b += blockDim.x * 128u)
    prefetch_l1(static_cast<const char*>(a.gamma) + b);
}

// Element index, in the scale output, of row m's j-th scale (one place for the
// scale layouts of SPEC §3: per token, per group row/col, NVFP4 linear/swizzled).
__device__ __forceinline__ uint32_t scale_index(const LayerArgs& a, uint32_t m, uint32_t j) {
  const OpConfig& c = a.cfg;
  const uint32_t H = uint32_t(a.H);
  switch (c.quant) {
    case QuantKind::kFp8PerToken: return m;
    case QuantKind::kFp8PerGroup:
      return c.has(kScaleCol) ? j * uint32_t(a.M) + m : m * (H / uint32_t(c.group_size)) + j;
    case QuantKind::kNvFp4:
      return c.has(kFp4Swizzled) ? uint32_t(swizzled_128x4_offset(m, j, H)) : m * (H / kFp4Block) + j;
    default: return 0;
  }
}

// ---- quantizers over the staged row ------------------------------------------
// n float32 values of the staged row from p (16-byte aligned), 16 bytes per
// shared-memory read rather than one element (no bank conflicts between
// threads reading neighbouring blocks of the row).
template <typename T, int n>
__device__ __forceinline__ void load_staged(const T* p, float (&f)[n]) {
  constexpr int V = Pack<T>::V;
  static_assert(n % V == 0, "whole 16-byte vectors");
#pragma unroll
  for (int q = 0; q < n / V; ++q) {
    float g[V];
    Pack<T>::unpack(reinterpret_cast<const uint4*>(p)[q], g);
#pragma unroll
    for (int j = 0; j < V; ++j) f[q * V + j] = g[j];
  }
}

// 4 float32 values of the staged row from p (aligned to 4 elements): one
// 8-byte shared-memory read for 16-bit T, 16 bytes for float32.
template <typename T>
__device__ __forceinline__ void load_staged4(const T* p, float (&f)[4]) {
  if constexpr (sizeof(T) == 4) {
    Pack<float>::unpack(*reinterpret_cast<const uint4*>(p), f);
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const uint32_t w[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = to_f32(T{uint16_t(w[i / 2] >> (16 * (i % 2)))});
  }
}

template <typename T>
__device__ void write_fp8_codes(uint8_t* out, const T* row, uint32_t H, float inv_scale) {
  for (uint32_t h = threadIdx.x * 8u; h < H; h += blockDim.x * 8u) {
    float v[8];
    load_staged<T>(row + h, v);
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      lo |= uint32_t(fp8_code(v[j], inv_scale)) << (8 * j);
      hi |= uint32_t(fp8_code(v[4 + j], inv_scale)) << (8 * j);
    }
    *reinterpret_cast<uint2*>(out + h) = make_uint2(lo, hi);
  }
}

// Zero bytes of the swizzled NVFP4 scale layout in row m's padding columns
// [H/16, roundup(H/16, 4)).
__device__ __forceinline__ void zero_swizzle_padding_columns(uint8_t* sf_out, int64_t m,
                                                             int64_t H) {
  const int64_t nb = H / kFp4Block;
  for (int64_t b = nb + threadIdx.x; b < round_up(nb, 4); b += blockDim.x)
    sf_out[swizzled_128x4_offset(m, b, H)] = 0;
}

// The quantizers that read the staged row back after the norm loop: FP8 per
// token (a row-wide amax), NVFP4 (one thread per 16-element block), and FP8 per
// group when a group's vectors do not fall on 1-32 lanes (see inloop_lanes).
template <typename T>
__device__ void quantize_row(const LayerArgs& a, uint32_t m, const T* row, float thread_amax,
                             float* red) {
  const OpConfig& c = a.cfg;
  const uint32_t H = uint32_t(a.H);
  switch (c.quant) {
    case QuantKind::kFp8PerToken: {
      const float s = fp8_scale(block_nan_max(thread_amax, red));
      if (threadIdx.x == 0) static_cast<float*>(a.scale_out)[m] = s;
      write_fp8_codes(a.quant_out + m * H, row, H, div_rn(1.0f, s));
      break;
    }
    case QuantKind::kFp8PerGroup: {
      // A warp per group. With group sizes a multiple of 4 each lane takes 4
      // adjacent elements at a time (one shared-memory read, one 4-byte store of
      // codes); the amax is a max, so the order it is taken in does not matter.
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
      const uint32_t gs = uint32_t(c.group_size), G = H / gs;
      const bool by4 = gs % 4 == 0;
      for (uint32_t g = warp; g < G; g += nwarps) {
        const T* grp = row + g * gs;
        float amax = 0.0f;
        if (by4) {
          for (uint32_t e = 4 * lane; e < gs; e += 128) {
            float v[4];
            load_staged4<T>(grp + e, v);
#pragma unroll
            for (int j = 0; j < 4; ++j) amax = nan_max(amax, abs_f32(v[j]));
          }
        } else {
          for (uint32_t e = lane; e < gs; e += 32) amax = nan_max(amax, abs_f32(to_f32(grp[e])));
        }
        float s = fp8_scale(warp_nan_max(amax));
        if (c.has(kUe8m0)) s = ue8m0_round(s);
        const float inv = div_rn(1.0f, s);
        if (lane == 0)
          static_cast<float*>(a.scale_out)[scale_index(a, m, g)] = s;
        uint8_t* out = a.quant_out + m * H + g * gs;
        if (by4) {
          for (uint32_t e = 4 * lane; e < gs; e += 128) {
            float v[4];
            load_staged4<T>(grp + e, v);
            uint32_t w = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) w |= uint32_t(fp8_code(v[j], inv)) << (8 * j);
            *reinterpret_cast<uint32_t*>(out + e) = w;
          }
        } else {
          for (uint32_t e = lane; e < gs; e += 32) out[e] = fp8_code(to_f32(grp[e]), inv);
        }
      }
      break;
    }
    case QuantKind::kNvFp4: {
      const float gsc = a.quant_scale[0];
      const uint32_t nb = H / kFp4Block;
      const bool swz = c.has(kFp4Swizzled);
      uint8_t* sf_out = static_cast<uint8_t*>(a.scale_out);
      for (uint32_t b = threadIdx.x; b < nb; b += blockDim.x) {
        float v[kFp4Block];
        load_staged<T>(row + b * kFp4Block, v);
        float vmax = 0.0f;
#pragma unroll
        for (int j = 0; j < kFp4Block; ++j) vmax = nan_max(vmax, abs_f32(v[j]));
        const uint8_t sf = nvfp4_scale_code(vmax, gsc);
        const float os = nvfp4_out_scale(sf, gsc);
        uint32_t w[2] = {0u, 0u};
#pragma unroll
        for (int j = 0; j < kFp4Block; j += 2) {
          const uint32_t byte = nvfp4_code(v[j], os) | (nvfp4_code(v[j + 1], os) << 4);
          w[j / 8] |= byte << (8 * ((j / 2) % 4));
        }
        *reinterpret_cast<uint2*>(a.quant_out + m * (H / 2) + b * 8) = make_uint2(w[0], w[1]);
        sf_out[scale_index(a, m, b)] = sf;
      }
      if (swz) zero_swizzle_padding_columns(sf_out, m, H);
      break;
    }
    default:  // FP8 static and most per-group sizes: in the norm loop (quantize_vector)
      break;
  }
}

// Zero the swizzled NVFP4 scale rows [M, roundup(M, 128)), spread over the
// grid. They all lie in the last 128-row band; each of its 4-block column tiles
// is 512 bytes of 32 lines (row % 32) of 16 bytes, one 4-byte word per row
// quarter ((row % 128) / 32). A thread takes one line, so a warp's stores are
// contiguous, and writes the words of padding rows only (other words belong to
// real rows, which their blocks write).
__device__ __forceinline__ void zero_swizzle_padding_rows(const LayerArgs& a) {
  const OpConfig& c = a.cfg;
  if (!(c.has(kOutQuant) && c.quant == QuantKind::kNvFp4 && c.has(kFp4Swizzled))) return;
  const uint32_t M = uint32_t(a.M), band = M / 128, first = M % 128;  // first padding row in band
  if (first == 0) return;
  const uint32_t kt = uint32_t((a.H + 63) / 64);
  char* base = static_cast<char*>(a.scale_out) + uint64_t(band) * kt * 512;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < kt * 32; i += gridDim.x * blockDim.x) {
    const uint32_t line = i % 32;
    char* p = base + (i / 32) * 512 + line * 16;
    if (line >= first) {  // rows line, line+32, line+64, line+96 of the band: all padding
      *reinterpret_cast<uint4*>(p) = make_uint4(0u, 0u, 0u, 0u);
      continue;
    }
#pragma unroll
    for (uint32_t q = 0; q < 4; ++q)
      if (q * 32 + line >= first) reinterpret_cast<uint32_t*>(p)[q] = 0u;
  }
}

// ---- quantizers inside the norm loop --------------------------------------------
// Lanes per scale group when the FP8 codes can be made inside the norm loop
// from each lane's own V values: a warp takes 32 consecutive vectors, so a
// group's vectors lie on n adjacent, aligned lanes (n a power of two <= 32) and
// its amax is a reduction over those lanes. 0: quantize after the loop from the
// staged row (quantize_row). NVFP4 stays there: made in the loop, both lanes of
// a 16-element block compute its two scale divisions, which measured slower
// (2xH200, M = 8192: 724 vs 685 µs) than one thread per block after the loop.
template <typename T>
__device__ __forceinline__ int inloop_lanes(const OpConfig& c) {
  constexpr int V = Pack<T>::V;
  if (!c.has(kOutQuant)) return 0;
  switch (c.quant) {
    case QuantKind::kFp8Static: return 1;
    case QuantKind::kFp8PerGroup: {
      const int n = c.group_size / V;
      return c.group_size % V == 0 && n <= 32 && (n & (n - 1)) == 0 ? n : 0;
    }
    default: return 0;
  }
}

// NaN-propagating max over this lane's aligned group of n lanes.
__device__ __forceinline__ float lanes_nan_max(float v, int n) {
  for (int o = 1; o < n; o <<= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// FP8 codes (and the per-group scale) of vector v of row m from q = f32(norm_out)
// of its V values, with n lanes per scale group (inloop_lanes). Every lane of
// the warp calls it (the shuffles need them all); lanes with !active (past the
// row's end, whole groups of them) store nothing. static_inv: 1/s of FP8 static.
template <typename T>
__device__ __forceinline__ void quantize_vector(const LayerArgs& a, uint32_t m, uint32_t v,
                                                bool active, const float (&q)[Pack<T>::V], int n,
                                                float static_inv) {
  constexpr int V = Pack<T>::V;
  const OpConfig& c = a.cfg;
  const uint32_t H = uint32_t(a.H);
  const bool leader = active && (threadIdx.x & uint32_t(n - 1)) == 0;
  float inv = static_inv;
  if (c.quant == QuantKind::kFp8PerGroup) {
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) amax = nan_max(amax, abs_f32(q[j]));
    float s = fp8_scale(lanes_nan_max(amax, n));
    if (c.has(kUe8m0)) s = ue8m0_round(s);
    inv = div_rn(1.0f, s);
    if (leader) {
      static_cast<float*>(a.scale_out)[scale_index(a, m, v / uint32_t(n))] = s;
    }
  }
  uint32_t w[V / 4] = {};
#pragma unroll
  for (int j = 0; j < V; ++j) w[j / 4] |= uint32_t(fp8_code(q[j], inv)) << (8 * (j % 4));
  if (!active) return;
  uint8_t* out = a.quant_out + m * H + v * V;
  if constexpr (V == 8) *reinterpret_cast<uint2*>(out) = make_uint2(w[0], w[1]);
  else *reinterpret_cast<uint32_t*>(out) = w[0];
}

// ---- the row tail --------------------------------------------------------------
// Stage residual_out of row m: fetch(v0, v1, has1, out) returns the packed
// residual_out vectors v0 and (if has1) v1; they are written to residual_out
// (if asked) and to the shared staging row. Returns this thread's sum of
// squares, accumulated in a fixed order (v0, v1, v0 + 2*blockDim, ...).
template <typename T, typename Fetch>
__device__ __forceinline__ double stage_row(const LayerArgs& a, uint32_t m, T* row, Fetch fetch) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  const uint32_t H = uint32_t(a.H), HV = H / V, bd = blockDim.x;
  prefetch_gamma(a, H);
  double sum_sq = 0.0;
  for (uint32_t v0 = threadIdx.x; v0 < HV; v0 += 2 * bd) {
    const uint32_t v1 = v0 + bd;
    const bool has1 = v1 < HV;
    uint4 out[2];
    fetch(v0, v1, has1, out);
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      if (b == 1 && !has1) break;
      const uint32_t v = b == 0 ? v0 : v1;
      float r[V];
      PK::unpack(out[b], r);
#pragma unroll
      for (int j = 0; j < V; ++j) sum_sq = add_square(sum_sq, r[j]);
      if (a.residual_out)
        *reinterpret_cast<uint4*>(elem_ptr<T>(a.residual_out, m, H, v)) = out[b];
      *reinterpret_cast<uint4*>(row + v * V) = out[b];
    }
  }
  return sum_sq;
}

// RMSNorm and quantization of the staged row m (every thread passes its
// stage_row sum). Ends with a block barrier: `row` may be reused after it.
template <typename T>
__device__ void finish_row(const LayerArgs& a, uint32_t m, T* row, double sum_sq, double* red_d,
                           float* red_f) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  const OpConfig& c = a.cfg;
  const uint32_t H = uint32_t(a.H), HV = H / V, lane = threadIdx.x & 31u;
  const float inv = rms_inv(block_sum(sum_sq, red_d), H, c.eps);  // barrier: row is staged
  const bool quant = c.has(kOutQuant) && c.quant != QuantKind::kNone;
  const int lanes = quant ? inloop_lanes<T>(c) : 0;
  const bool after = quant && lanes == 0;  // quantize_row reads the normed row back
  const bool row_amax = after && c.quant == QuantKind::kFp8PerToken;
  const float static_inv =
      lanes && c.quant == QuantKind::kFp8Static ? div_rn(1.0f, a.quant_scale[0]) : 0.0f;
  // r = f32(norm_out) of vector v, stored to norm_out (if asked) and, for the
  // quantizers after the loop, to the staging row.
  float amax = 0.0f;
  auto norm_vector = [&](uint32_t v, float (&r)[V]) {
    float g[V];
    load_gamma<T>(a, v, g);
    PK::unpack(*reinterpret_cast<const uint4*>(row + v * V), r);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      r[j] = to_f32(norm_value<T>(r[j], inv, c.norm_weight_offset, g[j]));
      if (row_amax) amax = nan_max(amax, abs_f32(r[j]));
    }
    const uint4 packed = PK::pack(r);  // exact: the values are already T
    if (a.norm_out) *reinterpret_cast<uint4*>(elem_ptr<T>(a.norm_out, m, H, v)) = packed;
    if (after) *reinterpret_cast<uint4*>(row + v * V) = packed;
  };
  if (lanes) {
    // Warp-uniform steps (a warp takes 32 consecutive vectors), so that the
    // quantizer can reduce over lanes.
    for (uint32_t v0 = threadIdx.x - lane; v0 < HV; v0 += blockDim.x) {
      const uint32_t v = v0 + lane;
      const bool active = v < HV;
      float r[V] = {};
      if (active) norm_vector(v, r);
      quantize_vector<T>(a, m, v, active, r, lanes, static_inv);
    }
  } else {
    for (uint32_t v = threadIdx.x; v < HV; v += blockDim.x) {
      float r[V];
      norm_vector(v, r);
    }
  }
  if (after) {
    __syncthreads();  // the quantizers read columns other threads staged
    quantize_row<T>(a, m, row, amax, red_f);
  }
  __syncthreads();  // the next row overwrites `row`
}

}  // namespace dev
}  // namespace mar
