// The fused one-shot kernel: finalize + all-reduce + residual + RMSNorm + quant
// in one launch per GPU.
//
// Grid: one block per token row (at most one block per SM, so every block of
// every rank is resident and the cross-rank waits cannot deadlock on
// scheduling); a block loops over rows m = blockIdx.x, +gridDim.x, ...
// Phase 1: each block finalizes its rows and pushes them, 16 bytes at a time,
//          into slot `rank` of every rank's current exchange buffer.
// Phase 2: per row, each thread polls the N slots of its own buffer for its
//          16-byte columns, sums them in rank order, adds the residual, and
//          stages residual_out in shared memory; a block reduction gives the
//          RMS, then norm_out is written and the quantizer reads the staged row.
// The math is common/ (the CPU path runs the same functions); this file only
// decides who computes what.
#include <algorithm>

#include "../common/exchange.h"
#include "../common/layer_math.h"
#include "../common/quant.h"
#include "fused.h"

namespace mar {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

// 16 bytes <-> V float32 values of T.
template <typename T> struct Pack;

template <> struct Pack<float> {
  static constexpr int V = 4;
  __device__ static void unpack(uint4 u, float (&f)[V]) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float (&f)[V]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};

template <typename T16> struct Pack16 {
  static constexpr int V = 8;
  __device__ static void unpack(uint4 u, float (&f)[V]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] = to_f32(T16{uint16_t(w[i / 2] >> (16 * (i % 2)))});
  }
  // Rounds each value to T (rT).
  __device__ static uint4 pack(const float (&f)[V]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = uint32_t(from_f32<T16>(f[2 * i]).bits) |
             (uint32_t(from_f32<T16>(f[2 * i + 1]).bits) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <> struct Pack<bf16_t> : Pack16<bf16_t> {};
template <> struct Pack<f16_t> : Pack16<f16_t> {};

__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// ---- reductions (fixed order, so every rank gets the same bits) -------------
__device__ __forceinline__ double block_sum(double v, double* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // `red` may still be read from the previous use
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double t = 0.0;
  for (int i = 0; i < int(blockDim.x >> 5); ++i) t += red[i];
  return t;
}

__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float block_nan_max(float v, float* red) {
  v = warp_nan_max(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.0f;
  for (int i = 0; i < int(blockDim.x >> 5); ++i) t = nan_max(t, red[i]);
  return t;
}

// ---- phase 1: this rank's wire values for 16 bytes of row m ------------------
template <typename T>
__device__ uint4 wire_vector(const FusedArgs& a, int64_t m, int64_t h0) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  const T* base = static_cast<const T*>(a.partial);
  if (a.cfg.has(kDense)) return ldg16(base + m * a.H + h0);
  float acc[V];
  finalize_columns<V>(
      acc, a.idx + m * a.K, int(a.K), a.P,
      [&](int k) { return a.scales ? load_f32(a.scales, a.scales_dtype, m * a.K + k) : 1.0f; },
      [&](int32_t p, float (&x)[V]) { PK::unpack(ldg16(base + int64_t(p) * a.H + h0), x); });
  float sh[V];
  if (a.shared) PK::unpack(ldg16(static_cast<const T*>(a.shared) + m * a.H + h0), sh);
  finalize_scale_and_shared<V>(acc, a.cfg.routed_scaling_factor, a.shared ? sh : nullptr);
  return PK::pack(acc);
}

// ---- phase 2: bounded poll of one slot ---------------------------------------
template <int kElemBytes>
__device__ uint4 poll_slot(const char* p, const ExchangeView& x, uint64_t t0, int peer,
                           uint32_t epoch) {
  uint4 d = ld_relaxed_sys(p);
  uint32_t spins = 0;
  while (holds_sentinel<kElemBytes>(d)) {
    if ((++spins & 255u) == 0u) {
      // Give up at once when any thread of this rank already timed out; the
      // sentinel (a NaN) then flows into the outputs, which become NaN.
      if (ld_volatile_u32(&x.counters->status) != 0u) return d;
      const uint64_t waited = global_timer_ns() - t0;
      if (waited > x.timeout_ns) {
        if (atomicCAS(&x.counters->status, 0u, 1u) == 0u) {
          x.error->rank = x.rank;
          x.error->peer = peer;
          x.error->epoch = epoch;
          x.error->waited_ns = waited;
          __threadfence_system();
          *reinterpret_cast<volatile int32_t*>(&x.error->flag) = 1;
        }
        return d;
      }
    }
    d = ld_relaxed_sys(p);
  }
  return d;
}

// ---- quantizers over the staged row ------------------------------------------
template <typename T>
__device__ void write_fp8_codes(uint8_t* out, const T* row, int64_t H, float inv_scale) {
  for (int64_t h = int64_t(threadIdx.x) * 8; h < H; h += int64_t(blockDim.x) * 8) {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      lo |= uint32_t(fp8_code(to_f32(row[h + j]), inv_scale)) << (8 * j);
      hi |= uint32_t(fp8_code(to_f32(row[h + 4 + j]), inv_scale)) << (8 * j);
    }
    *reinterpret_cast<uint2*>(out + h) = make_uint2(lo, hi);
  }
}

template <typename T>
__device__ void quantize_row(const FusedArgs& a, int64_t m, const T* row, float thread_amax,
                             float* red) {
  const OpConfig& c = a.cfg;
  const int64_t H = a.H;
  switch (c.quant) {
    case QuantKind::kFp8Static:
      write_fp8_codes(a.quant_out + m * H, row, H, div_rn(1.0f, a.quant_scale[0]));
      break;
    case QuantKind::kFp8PerToken: {
      const float s = fp8_scale(block_nan_max(thread_amax, red));
      if (threadIdx.x == 0) static_cast<float*>(a.scale_out)[m] = s;
      write_fp8_codes(a.quant_out + m * H, row, H, div_rn(1.0f, s));
      break;
    }
    case QuantKind::kFp8PerGroup: {
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
      const int64_t gs = c.group_size, G = H / gs;
      for (int64_t g = warp; g < G; g += nwarps) {
        const T* grp = row + g * gs;
        float amax = 0.0f;
        for (int64_t e = lane; e < gs; e += 32) amax = nan_max(amax, abs_f32(to_f32(grp[e])));
        float s = fp8_scale(warp_nan_max(amax));
        if (c.has(kUe8m0)) s = ue8m0_round(s);
        const float inv = div_rn(1.0f, s);
        if (lane == 0) static_cast<float*>(a.scale_out)[c.has(kScaleCol) ? g * a.M + m : m * G + g] = s;
        uint8_t* out = a.quant_out + m * H + g * gs;
        for (int64_t e = lane; e < gs; e += 32) out[e] = fp8_code(to_f32(grp[e]), inv);
      }
      break;
    }
    case QuantKind::kNvFp4: {
      const float gsc = a.quant_scale[0];
      const int64_t nb = H / kFp4Block;
      const bool swz = c.has(kFp4Swizzled);
      uint8_t* sf_out = static_cast<uint8_t*>(a.scale_out);
      for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) {
        float v[kFp4Block];
        float vmax = 0.0f;
#pragma unroll
        for (int j = 0; j < kFp4Block; ++j) {
          v[j] = to_f32(row[b * kFp4Block + j]);
          vmax = nan_max(vmax, abs_f32(v[j]));
        }
        const uint8_t sf = nvfp4_scale_code(vmax, gsc);
        const float os = nvfp4_out_scale(sf, gsc);
        uint32_t w[2] = {0u, 0u};
#pragma unroll
        for (int j = 0; j < kFp4Block; j += 2) {
          const uint32_t byte = nvfp4_code(v[j], os) | (nvfp4_code(v[j + 1], os) << 4);
          w[j / 8] |= byte << (8 * ((j / 2) % 4));
        }
        *reinterpret_cast<uint2*>(a.quant_out + m * (H / 2) + b * 8) = make_uint2(w[0], w[1]);
        sf_out[swz ? swizzled_128x4_offset(m, b, H) : m * nb + b] = sf;
      }
      if (swz) {  // padding blocks of this row
        for (int64_t b = nb + threadIdx.x; b < round_up(nb, 4); b += blockDim.x)
          sf_out[swizzled_128x4_offset(m, b, H)] = 0;
      }
      break;
    }
    case QuantKind::kNone:
      break;
  }
}

// ---- the kernel ----------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    fused_oneshot_kernel(const FusedArgs a, const ExchangeView x) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  extern __shared__ __align__(16) unsigned char smem[];
  T* row = reinterpret_cast<T*>(smem);  // one row: residual_out, then norm_out
  __shared__ double red_d[kMaxWarps];
  __shared__ float red_f[kMaxWarps];

  const OpConfig& c = a.cfg;
  const int64_t H = a.H, HV = H / V;
  const uint32_t epoch = ld_volatile_u32(&x.counters->epoch);
  // A poisoned workspace (an earlier wait timed out) exchanges nothing: every
  // received value reads as the sentinel NaN, so the outputs are NaN.
  const bool poisoned = ld_volatile_u32(&x.counters->status) != 0u;
  const uint64_t buffer_slot0 = uint64_t(epoch % kNumBuffers) * uint64_t(x.nranks);
  const uint64_t t0 = global_timer_ns();
  const bool want_quant = c.has(kOutQuant) && c.quant != QuantKind::kNone;

  if (!poisoned) {
    for (int64_t m = blockIdx.x; m < a.M; m += gridDim.x) {
      for (int64_t v = threadIdx.x; v < HV; v += blockDim.x) {
        const uint4 w = avoid_sentinel<sizeof(T)>(wire_vector<T>(a, m, v * V));
        const uint64_t off = (buffer_slot0 + uint64_t(x.rank)) * x.slot_bytes +
                             uint64_t(m * H + v * V) * sizeof(T);
        for (int s = 0; s < x.nranks; ++s) st_relaxed_sys(x.areas[s] + off, w);
      }
    }
  }

  for (int64_t m = blockIdx.x; m < a.M; m += gridDim.x) {
    double sum_sq = 0.0;
    for (int64_t v = threadIdx.x; v < HV; v += blockDim.x) {
      const uint64_t elem = uint64_t(m * H + v * V) * sizeof(T);
      float y[V];
      for (int s = 0; s < x.nranks; ++s) {
        char* p = x.areas[x.rank] + (buffer_slot0 + uint64_t(s)) * x.slot_bytes + elem;
        const uint4 d = poisoned ? kSentinel4 : poll_slot<sizeof(T)>(p, x, t0, s, epoch);
        if (!poisoned) st_relaxed_sys(p, kSentinel4);
        float f[V];
        PK::unpack(d, f);
#pragma unroll
        for (int j = 0; j < V; ++j) y[j] = s == 0 ? f[j] : rank_sum_step(y[j], f[j]);
      }
      float r[V];
      PK::unpack(ldg16(static_cast<const T*>(a.residual) + m * H + v * V), r);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        r[j] = to_f32(residual_value<T>(y[j], r[j]));
        sum_sq = add_square(sum_sq, r[j]);
      }
      const uint4 packed = PK::pack(r);  // exact: the values are already T
      if (a.residual_out)
        *reinterpret_cast<uint4*>(static_cast<T*>(a.residual_out) + m * H + v * V) = packed;
      *reinterpret_cast<uint4*>(row + v * V) = packed;
    }
    const float inv = rms_inv(block_sum(sum_sq, red_d), H, c.eps);
    float amax = 0.0f;
    for (int64_t v = threadIdx.x; v < HV; v += blockDim.x) {
      float r[V];
      PK::unpack(*reinterpret_cast<const uint4*>(row + v * V), r);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float g = load_f32(a.gamma, a.gamma_dtype, v * V + j);
        r[j] = to_f32(norm_value<T>(r[j], inv, c.norm_weight_offset, g));
        amax = nan_max(amax, abs_f32(r[j]));
      }
      const uint4 packed = PK::pack(r);
      if (a.norm_out)
        *reinterpret_cast<uint4*>(static_cast<T*>(a.norm_out) + m * H + v * V) = packed;
      *reinterpret_cast<uint4*>(row + v * V) = packed;
    }
    if (want_quant) {
      __syncthreads();  // the quantizers read columns other threads staged
      quantize_row<T>(a, m, row, amax, red_f);
    }
    __syncthreads();  // the next row overwrites `row`
  }

  if (want_quant && c.quant == QuantKind::kNvFp4 && c.has(kFp4Swizzled)) {
    // Padding rows [M, roundup(M, 128)) of the swizzled scale layout are zero.
    const int64_t nb_pad = round_up(H / kFp4Block, 4);
    uint8_t* sf_out = static_cast<uint8_t*>(a.scale_out);
    for (int64_t m = a.M + blockIdx.x; m < round_up(a.M, 128); m += gridDim.x)
      for (int64_t b = threadIdx.x; b < nb_pad; b += blockDim.x)
        sf_out[swizzled_128x4_offset(m, b, H)] = 0;
  }

  // The last block to finish advances the epoch: the next call on this
  // stream uses the next buffer. Every block read `epoch` before arriving.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&x.counters->arrived, 1u) == gridDim.x - 1) {
      x.counters->arrived = 0u;
      x.counters->epoch = epoch + 1u;
      __threadfence();
    }
  }
}

template <typename T>
cudaError_t launch_typed(const FusedArgs& a, const ExchangeView& x, cudaStream_t stream) {
  const int64_t vectors = a.H / Pack<T>::V;
  const int threads = int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, round_up(vectors, 32))));
  const int grid = int(std::min<int64_t>(a.M, x.num_sms));
  const size_t smem = size_t(a.H) * sizeof(T);
  if (smem > size_t(kMaxRowBytes)) return cudaErrorInvalidValue;
  fused_oneshot_kernel<T><<<grid, threads, smem, stream>>>(a, x);
  return cudaGetLastError();
}

}  // namespace

cudaError_t prepare_fused_kernels() {
  cudaError_t e = cudaFuncSetAttribute(fused_oneshot_kernel<float>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxRowBytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(fused_oneshot_kernel<bf16_t>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxRowBytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(fused_oneshot_kernel<f16_t>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxRowBytes);
  return e;
}

cudaError_t launch_fused(DType t, const FusedArgs& a, const ExchangeView& x,
                         cudaStream_t stream) {
  if (a.M <= 0) return cudaSuccess;
  switch (t) {
    case DType::kF32: return launch_typed<float>(a, x, stream);
    case DType::kBF16: return launch_typed<bf16_t>(a, x, stream);
    case DType::kF16: return launch_typed<f16_t>(a, x, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mar
