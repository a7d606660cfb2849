// The tail of one token row — residual_out, RMSNorm and the quantizers — in
// registers. A row is spread over the C blocks of a cluster (or one block,
// C = 1); each thread holds VPT 16-byte vectors of it (Vectors). The row's sums
// (sum of squares, per-token amax) are reduced over the cluster in a fixed
// order that depends on the row width only (device.cuh, cluster_reduce), and
// every rank that produces a row runs this code, so norm_out and the quant
// outputs come out bit-identical on every rank and in every geometry. Scale
// groups that fall on 1..32 adjacent lanes are quantized with lane shuffles;
// other group sizes from the normed row staged in shared memory (read across
// the cluster).
#pragma once

#include "../common/layer_math.h"
#include "../common/quant.h"
#include "device.cuh"

namespace mar {
namespace dev {

// The vectors of a row one thread holds: v(i) = v0 + i * stride for i < VPT,
// `active` when inside the row (v < H/V).
template <int VPT>
struct Vectors {
  uint32_t v0, stride, HV;
  __device__ __forceinline__ uint32_t v(int i) const { return v0 + uint32_t(i) * stride; }
  __device__ __forceinline__ bool active(int i) const { return v(i) < HV; }
};

// Where a row's tail writes, and what the whole call shares.
struct TailPlace {
  uint32_t m;      // output row
  uint32_t M;      // output rows (the per-group "col" layout and swizzle padding use it)
};

// Per-block scratch of the tail: the cluster-wide reductions' slots.
struct TailShared {
  ReduceSlots<double> sum;
  ReduceSlots<float> max;
  uint32_t sink;  // warm_constants' store
};

// gamma[v*V .. v*V+V) as loaded: one 16-byte vector of T, or two of float32
// (gamma is T or float32, SPEC §2), to be unpacked where it is used.
struct GammaBits {
  uint4 u[2];
};

template <typename T>
__device__ __forceinline__ GammaBits load_gamma_bits(const LayerArgs& a, uint32_t v) {
  constexpr int V = Pack<T>::V;
  GammaBits b;
  b.u[1] = make_uint4(0u, 0u, 0u, 0u);
  if (a.gamma_dtype == DType::kF32) {
    const float* p = static_cast<const float*>(a.gamma) + v * V;
#pragma unroll
    for (int q = 0; q < V / 4; ++q) b.u[q] = ldg16(p + 4 * q);
  } else {
    b.u[0] = ldg16(static_cast<const T*>(a.gamma) + v * V);
  }
  return b;
}

template <typename T>
__device__ __forceinline__ void unpack_gamma(const LayerArgs& a, const GammaBits& b,
                                             float (&g)[Pack<T>::V]) {
  constexpr int V = Pack<T>::V;
  if (a.gamma_dtype == DType::kF32) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      float f[4];
      Pack<float>::unpack(b.u[q], f);
#pragma unroll
      for (int j = 0; j < 4; ++j) g[4 * q + j] = f[j];
    }
  } else {
    Pack<T>::unpack(b.u[0], g);
  }
}

// Per-thread state carried from row to row (parities of the cluster slots) and
// what is constant over the call.
struct TailState {
  ClusterEntry entry;  // armed at kernel entry: see ClusterEntry
  uint32_t reduced_d = 0, reduced_f = 0;  // reductions done on sh.sum, sh.max (cluster_reduce)
  // The quant_scale operand (FP8 static, NVFP4), loaded with gamma and used
  // only in the tail, for the same reason.
  float quant_scale = 0.0f;
  int lanes = 0;            // lanes per scale group (quantize_lanes), 0: staged
  bool os_table_filled = false;  // NVFP4, several vectors per thread: row_tail's table
  // One vector per thread (few rows, latency): this thread's gamma, the same for
  // every row, loaded once per call right after the wait for the predecessor
  // (fused.cu, tail_state), unpacked where the tail uses it. Loaded in the tail,
  // its first use came right after the load and held the warp for the load's
  // whole latency (ncu, 1xH200, M = 1; docs/perf.md v12).
  GammaBits gamma = {};
};

// Element index, in the scale output, of output row m's j-th scale (one place
// for the scale layouts of SPEC §3: per token, per group row/col, NVFP4
// linear/swizzled).
__device__ __forceinline__ uint32_t scale_index(const OpConfig& c, uint32_t H, TailPlace at,
                                                uint32_t j) {
  switch (c.quant) {
    case QuantKind::kFp8PerToken: return at.m;
    case QuantKind::kFp8PerGroup:
      return c.has(kScaleCol) ? j * at.M + at.m : at.m * (H / uint32_t(c.group_size)) + j;
    case QuantKind::kNvFp4:
      return c.has(kFp4Swizzled) ? uint32_t(swizzled_128x4_offset(at.m, j, H))
                                 : at.m * (H / kFp4Block) + j;
    default: return 0;
  }
}

// Lanes per scale group when the codes can be made from each lane's own V
// values with shuffles over n adjacent, aligned lanes (n a power of two <= 32;
// a block's slice starts at a multiple of 32 vectors): FP8 static (1), FP8 per
// group with V | group_size, NVFP4 (16 / V). 0: the staged path.
template <typename T>
__host__ __device__ inline int quantize_lanes(const OpConfig& c) {
  constexpr int V = 16 / int(sizeof(T));
  switch (c.quant) {
    case QuantKind::kFp8Static: return 1;
    case QuantKind::kFp8PerToken: return 32;  // unused: a cluster-wide amax
    case QuantKind::kNvFp4: return kFp4Block / V;
    case QuantKind::kFp8PerGroup: {
      const int n = c.group_size / V;
      return c.group_size % V == 0 && n <= 32 && (n & (n - 1)) == 0 ? n : 0;
    }
    default: return 0;
  }
}

// FP8 codes of V values, little-endian, into out (V bytes).
template <int V>
__device__ __forceinline__ void store_fp8_codes(uint8_t* out, const float (&q)[V], float inv) {
  uint32_t w[V / 4] = {};
#pragma unroll
  for (int j = 0; j < V; ++j) w[j / 4] += fp8_code(q[j], inv) << (8 * (j % 4));  // disjoint bytes
  if constexpr (V == 8) *reinterpret_cast<uint2*>(out) = make_uint2(w[0], w[1]);
  else *reinterpret_cast<uint32_t*>(out) = w[0];
}

// Quantizes the staged normed row: every scale group whose first element lies
// in this block's slice, a warp per group, reading elements of any block of
// the cluster. Ends with a cluster barrier: `stage` may be rewritten after it.
template <typename T>
__device__ void quantize_staged(const LayerArgs& a, TailPlace at, const T* stage, uint32_t slice,
                                int C, ClusterEntry& entry) {
  const OpConfig& c = a.cfg;
  const uint32_t H = uint32_t(a.H), gs = uint32_t(c.group_size);
  cg::cluster_group cluster = cg::this_cluster();
  const uint32_t rank = C > 1 ? cluster.block_rank() : 0u;
  entry.enter();
  if (C > 1) cluster.sync(); else __syncthreads();  // every block's stage is written
  const uint32_t lo = rank * slice, hi = min(lo + slice, H);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  auto element = [&](uint32_t e) {
    const uint32_t b = e / slice;
    const T* src = C > 1 ? cluster.map_shared_rank(const_cast<T*>(stage), b) : stage;
    return to_f32(src[e - b * slice]);
  };
  for (uint32_t g = (lo + gs - 1) / gs + warp; g * gs < hi; g += nwarps) {
    float amax = 0.0f;
    for (uint32_t e = g * gs + lane; e < (g + 1) * gs; e += 32) amax = nan_max(amax, abs_f32(element(e)));
    float s = fp8_scale(lanes_nan_max(amax, 32));
    if (c.has(kUe8m0)) s = ue8m0_round(s);
    const float inv = div_rn(1.0f, s);
    if (lane == 0) static_cast<float*>(a.scale_out)[scale_index(c, H, at, g)] = s;
    uint8_t* out = a.quant_out + uint64_t(at.m) * H;
    for (uint32_t e = g * gs + lane; e < (g + 1) * gs; e += 32) out[e] = fp8_code(element(e), inv);
  }
  if (C > 1) cluster.sync(); else __syncthreads();
}

// The row tail of one thread's vectors (r[i] = packed residual_out of vector
// i, valid when active). Every thread of every block of the cluster calls it
// (the reductions need them all). `slice` is the elements of a block's part
// of the row; `stage` (one slice of T, only for the staged quantizers) and
// `sh` are this block's shared memory. Only r and one vector's values are
// held at a time: each vector is normed and quantized on its own, except for
// the per-token scale, which needs the whole row's amax first (its vectors are
// normed twice; the arithmetic is the same both times). The tail is compiled
// for one quant kind Q, the call's (kNone when no codes are asked for): a
// kernel then holds one quantizer's code, not five, which is smaller and needs
// fewer registers (1xH200: 4.91 against 5.33 µs at M = 1; docs/perf.md v8).
template <typename T, int VPT, QuantKind Q>
__device__ void row_tail(const LayerArgs& a, TailPlace at, const Vectors<VPT>& vs,
                         const uint4 (&r)[VPT], uint32_t slice, int C, TailShared& sh,
                         TailState& ts, T* stage) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  // One vector per thread (few rows, latency): gamma came with the call's
  // first loads (TailState). Several: loaded where used (it stays in L1 from
  // row to row), which saves the registers.
  constexpr bool kGammaEarly = VPT == 1;
  // The call's configuration with its quant kind fixed at compile time: every
  // test of c.quant below folds, and c.quantizes() with it (the launcher picks
  // Q = kNone unless codes are asked for, so kOutQuant is set whenever Q is not).
  OpConfig c = a.cfg;
  c.quant = Q;
  const uint32_t H = uint32_t(a.H);
  double sum_sq[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    sum_sq[i] = 0.0;
    if (!vs.active(i)) continue;
    if (a.residual_out) *reinterpret_cast<uint4*>(elem_ptr<T>(a.residual_out, at.m, H, vs.v(i))) = r[i];
    float f[V];
    PK::unpack(r[i], f);
#pragma unroll
    for (int j = 0; j < V; ++j) sum_sq[i] = add_square(sum_sq[i], f[j]);
  }
  // NVFP4 with several vectors per thread (throughput): a block's out-scale
  // g / f32(sf) takes one of 256 values, one per scale code, so the block divides
  // once per code and call, into a table, instead of decoding and dividing per
  // vector (the same division: nvfp4_out_scale). Filled before the first row's
  // reduction, whose __syncthreads (C == 1) publishes it; written once per call.
  const float* os_table = nullptr;
  if constexpr (Q == QuantKind::kNvFp4 && VPT > 1) {
    __shared__ float table[256];
    if (C == 1) {
      if (!ts.os_table_filled) {
        for (uint32_t code = threadIdx.x; code < 256u; code += blockDim.x)
          table[code] = nvfp4_out_scale(code, ts.quant_scale);
        ts.os_table_filled = true;
      }
      os_table = table;
    }
  }
  const double total = cluster_reduce<VPT>(sum_sq, sh.sum, ts.reduced_d, C, Sum{}, ts.entry);
  const float inv = rms_inv(total, H, c.eps);
  // q = f32(norm_out) of vector i (an active one); returns its amax.
  auto normed = [&](int i, float (&q)[V]) {
    float f[V], g[V];
    PK::unpack(r[i], f);
    if constexpr (kGammaEarly) unpack_gamma<T>(a, ts.gamma, g);
    else unpack_gamma<T>(a, load_gamma_bits<T>(a, vs.v(i)), g);
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      q[j] = to_f32(norm_value<T>(f[j], inv, c.norm_weight_offset, g[j]));
      amax = nan_max(amax, abs_f32(q[j]));
    }
    return amax;
  };
  uint8_t* codes = a.quant_out;
  const bool per_token = c.quantizes() && c.quant == QuantKind::kFp8PerToken;
  float row_amax[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    row_amax[i] = 0.0f;
    float q[V] = {};
    const bool active = vs.active(i);
    const uint32_t v = vs.v(i);
    const float amax = active ? normed(i, q) : 0.0f;
    if (active && a.norm_out) *reinterpret_cast<uint4*>(elem_ptr<T>(a.norm_out, at.m, H, v)) = PK::pack(q);
    if (!c.quantizes()) continue;
    switch (c.quant) {
      case QuantKind::kFp8Static:
        if (active) store_fp8_codes<V>(codes + uint64_t(at.m) * H + v * V, q, div_rn(1.0f, ts.quant_scale));
        break;
      case QuantKind::kFp8PerToken:
        row_amax[i] = amax;  // the codes wait for the row's scale, below
        break;
      case QuantKind::kFp8PerGroup: {
        if (ts.lanes == 0) {
          // Element order: vector i of thread t sits at (i * stride + t) * V of the slice.
          if (active) *reinterpret_cast<uint4*>(stage + (i * vs.stride + threadIdx.x) * V) = PK::pack(q);
          break;
        }
        float s = fp8_scale(lanes_nan_max(amax, ts.lanes));
        if (c.has(kUe8m0)) s = ue8m0_round(s);
        if (!active) break;
        if ((v & uint32_t(ts.lanes - 1)) == 0)
          static_cast<float*>(a.scale_out)[scale_index(c, H, at, v / uint32_t(ts.lanes))] = s;
        store_fp8_codes<V>(codes + uint64_t(at.m) * H + v * V, q, div_rn(1.0f, s));
        break;
      }
      case QuantKind::kNvFp4: {
        constexpr int kLanes = kFp4Block / V;  // quantize_lanes, known here: no loop
        const float gsc = ts.quant_scale;
        const uint32_t sf = nvfp4_scale_code(lanes_nan_max(amax, kLanes), gsc);
        if (!active) break;
        const float os = os_table ? os_table[sf] : nvfp4_out_scale(sf, gsc);
        const uint32_t w = nvfp4_pack<V>(q, os);
        uint8_t* out = codes + uint64_t(at.m) * (H / 2) + v * (V / 2);
        if constexpr (V == 8) *reinterpret_cast<uint32_t*>(out) = w;
        else *reinterpret_cast<uint16_t*>(out) = uint16_t(w);
        uint8_t* sf_out = static_cast<uint8_t*>(a.scale_out);
        const uint32_t b = v * V / kFp4Block;  // this vector's 16-element block
        if ((v & uint32_t(kLanes - 1)) == 0) sf_out[scale_index(c, H, at, b)] = uint8_t(sf);
        // The swizzled layout pads each row to a multiple of 4 blocks with zeros:
        // the thread of the row's last block writes them.
        if (c.has(kFp4Swizzled) && (v + 1) * V == H) {
          for (uint32_t p = b + 1; p < uint32_t(round_up(H / kFp4Block, 4)); ++p)
            sf_out[swizzled_128x4_offset(at.m, p, H)] = 0;
        }
        break;
      }
      default:
        break;
    }
  }
  if (per_token) {
    const float s = fp8_scale(cluster_reduce<VPT>(row_amax, sh.max, ts.reduced_f, C, NanMax{}, ts.entry));
    if (threadIdx.x == 0 && (C == 1 || cg::this_cluster().block_rank() == 0))
      static_cast<float*>(a.scale_out)[at.m] = s;
    const float inv_s = div_rn(1.0f, s);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (!vs.active(i)) continue;
      float q[V];
      normed(i, q);
      store_fp8_codes<V>(codes + uint64_t(at.m) * H + vs.v(i) * V, q, inv_s);
    }
  }
  if (c.quantizes() && c.quant == QuantKind::kFp8PerGroup && ts.lanes == 0)
    quantize_staged<T>(a, at, stage, slice, C, ts.entry);
}

// Zero the swizzled NVFP4 scale rows [M, roundup(M, 128)), spread over the
// grid. They all lie in the last 128-row band; each of its 4-block column tiles
// is 512 bytes of 32 lines (row % 32) of 16 bytes, one 4-byte word per row
// quarter ((row % 128) / 32). A thread takes one line, so a warp's stores are
// contiguous, and writes the words of padding rows only (other words belong to
// real rows, which their tails write).
__device__ __forceinline__ void zero_swizzle_padding_rows(const LayerArgs& a, uint32_t M) {
  const OpConfig& c = a.cfg;
  if (!(c.quantizes() && c.quant == QuantKind::kNvFp4 && c.has(kFp4Swizzled))) return;
  const uint32_t band = M / 128, first = M % 128;  // first padding row in the band
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

}  // namespace dev
}  // namespace mar
