// The fused kernels: finalize + all-reduce + residual + RMSNorm + quant in one
// launch per GPU, one-shot or two-shot (see Algorithm in fused.h).
//
// Grid: at most one block per SM, so every block of every rank is resident and
// the cross-rank waits cannot deadlock on scheduling; a block loops over rows
// m = blockIdx.x, +gridDim.x, ... Every phase that waits depends only on
// phases that do not wait (pushes), so all waits end.
// Push: a block finalizes rows and stores them, 16 bytes at a time, into slot
//       `rank` of the current exchange buffer of every rank (one-shot) or of
//       the row's owner (two-shot).
// Reduce (reduce_row): per row, each thread polls the N slots of its own
//       buffer for its 16-byte columns, sums them in rank order, adds the
//       residual, and stages residual_out in shared memory; a block reduction
//       gives the RMS, then norm_out is written and the quantizer reads the
//       staged row.
// Gather (two-shot): the owner copies its rows' outputs into a packet in every
//       rank's gather area and raises the row's flag to epoch+1 (release);
//       the others wait for the flag (acquire) and copy the packet out.
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

// ---- bounded waits -------------------------------------------------------------
// Called every 256 spins of a wait: true when the wait must end — this rank
// already failed (the workspace is poisoned), or the bound passed, in which
// case the first thread to notice records the failure for the host.
__device__ bool wait_expired(const ExchangeView& x, uint64_t t0, int peer, uint32_t epoch) {
  if (ld_volatile_u32(&x.counters->status) != 0u) return true;
  const uint64_t waited = global_timer_ns() - t0;
  if (waited <= x.timeout_ns) return false;
  if (atomicCAS(&x.counters->status, 0u, 1u) == 0u) {
    x.error->rank = x.rank;
    x.error->peer = peer;
    x.error->epoch = epoch;
    x.error->waited_ns = waited;
    __threadfence_system();
    *reinterpret_cast<volatile int32_t*>(&x.error->flag) = 1;
  }
  return true;
}

// 16 bytes of a Lamport slot once no element holds the sentinel. On failure
// the sentinel (a NaN) is returned and flows into the outputs, which become NaN.
template <int kElemBytes>
__device__ uint4 poll_slot(const char* p, const ExchangeView& x, uint64_t t0, int peer,
                           uint32_t epoch) {
  uint4 d = ld_relaxed_sys(p);
  uint32_t spins = 0;
  while (holds_sentinel<kElemBytes>(d)) {
    if ((++spins & 255u) == 0u && wait_expired(x, t0, peer, epoch)) return d;
    d = ld_relaxed_sys(p);
  }
  return d;
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Waits until *flag == want; false when the wait failed.
__device__ bool wait_flag(const uint32_t* flag, uint32_t want, const ExchangeView& x,
                          uint64_t t0, int peer, uint32_t epoch) {
  uint32_t spins = 0;
  while (ld_acquire_sys(flag) != want) {
    if ((++spins & 255u) == 0u && wait_expired(x, t0, peer, epoch)) return false;
  }
  return true;
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

// ---- one row's reduce + tail -------------------------------------------------------
// Polls the N slots of row m in this rank's buffer, sums in rank order, adds
// the residual, normalizes and quantizes; writes every asked output of row m.
// `row` is the block's shared staging row. Ends with a block barrier.
template <typename T>
__device__ void reduce_row(const FusedArgs& a, const ExchangeView& x, int64_t m,
                           uint64_t slot0, uint64_t t0, uint32_t epoch, bool poisoned, T* row,
                           double* red_d, float* red_f) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  const OpConfig& c = a.cfg;
  const int64_t H = a.H, HV = H / V;
  double sum_sq = 0.0;
  for (int64_t v = threadIdx.x; v < HV; v += blockDim.x) {
    const uint64_t elem = uint64_t(m * H + v * V) * sizeof(T);
    float y[V];
    for (int s = 0; s < x.nranks; ++s) {
      char* p = x.areas[x.rank] + (slot0 + uint64_t(s)) * x.slot_bytes + elem;
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
  if (c.has(kOutQuant) && c.quant != QuantKind::kNone) {
    __syncthreads();  // the quantizers read columns other threads staged
    quantize_row<T>(a, m, row, amax, red_f);
  }
  __syncthreads();  // the next row overwrites `row`
}

// Zero scale padding of the swizzled NVFP4 layout: rows [M, roundup(M,128)).
__device__ void zero_swizzle_padding_rows(const FusedArgs& a) {
  const OpConfig& c = a.cfg;
  if (!(c.has(kOutQuant) && c.quant == QuantKind::kNvFp4 && c.has(kFp4Swizzled))) return;
  const int64_t nb_pad = round_up(a.H / kFp4Block, 4);
  uint8_t* sf_out = static_cast<uint8_t*>(a.scale_out);
  for (int64_t m = a.M + blockIdx.x; m < round_up(a.M, 128); m += gridDim.x)
    for (int64_t b = threadIdx.x; b < nb_pad; b += blockDim.x)
      sf_out[swizzled_128x4_offset(m, b, a.H)] = 0;
}

// The last block to finish advances the epoch: the next call on this stream
// uses the next buffer. Every block read `epoch` before arriving.
__device__ void finish_call(const ExchangeView& x, uint32_t epoch) {
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
__device__ __forceinline__ void push_row(const FusedArgs& a, const ExchangeView& x, int64_t m,
                                         uint64_t slot0, int first_dst, int n_dst) {
  constexpr int V = Pack<T>::V;
  const int64_t HV = a.H / V;
  for (int64_t v = threadIdx.x; v < HV; v += blockDim.x) {
    const uint4 w = avoid_sentinel<sizeof(T)>(wire_vector<T>(a, m, v * V));
    const uint64_t off = (slot0 + uint64_t(x.rank)) * x.slot_bytes +
                         uint64_t(m * a.H + v * V) * sizeof(T);
    for (int s = first_dst; s < first_dst + n_dst; ++s) st_relaxed_sys(x.areas[s] + off, w);
  }
}

// Shared state every kernel reads at entry.
struct CallState {
  uint32_t epoch;
  bool poisoned;  // an earlier wait timed out: exchange nothing, outputs become NaN
  uint64_t slot0; // slot index of (current buffer, rank 0)
  uint64_t t0;
};

__device__ CallState begin_call(const ExchangeView& x) {
  CallState s;
  s.epoch = ld_volatile_u32(&x.counters->epoch);
  s.poisoned = ld_volatile_u32(&x.counters->status) != 0u;
  s.slot0 = uint64_t(s.epoch % kNumBuffers) * uint64_t(x.nranks);
  s.t0 = global_timer_ns();
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    oneshot_kernel(const FusedArgs a, const ExchangeView x) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double red_d[kMaxWarps];
  __shared__ float red_f[kMaxWarps];
  const CallState st = begin_call(x);
  if (!st.poisoned)
    for (int64_t m = blockIdx.x; m < a.M; m += gridDim.x) push_row<T>(a, x, m, st.slot0, 0, x.nranks);
  for (int64_t m = blockIdx.x; m < a.M; m += gridDim.x)
    reduce_row<T>(a, x, m, st.slot0, st.t0, st.epoch, st.poisoned, reinterpret_cast<T*>(smem),
                  red_d, red_f);
  zero_swizzle_padding_rows(a);
  finish_call(x, st.epoch);
}

// ---- two-shot gather packets ---------------------------------------------------------
// A row's packet: [residual | norm | codes | scales] of what was asked for, each
// section padded to 16 bytes. Row flags (uint32, value epoch+1 once the packet
// of that call landed) sit at the start of the gather area, packets after.
struct Packet {
  uint64_t res = 0, norm = 0, codes = 0, scales = 0, bytes = 0;  // section offsets, size
  uint64_t res_bytes = 0, code_bytes = 0;
  int64_t n_scales = 0;
  int scale_bytes = 0;  // bytes of one scale element
  uint64_t flags_bytes = 0;
};

__host__ __device__ inline Packet packet_of(const FusedArgs& a, int elem_bytes) {
  const OpConfig& c = a.cfg;
  Packet p;
  auto pad = [](uint64_t b) { return (b + 15) / 16 * 16; };
  uint64_t at = 0;
  p.res_bytes = uint64_t(a.H) * uint64_t(elem_bytes);
  if (a.residual_out) { p.res = at; at += pad(p.res_bytes); }
  if (a.norm_out) { p.norm = at; at += pad(p.res_bytes); }
  if (c.has(kOutQuant) && c.quant != QuantKind::kNone) {
    p.code_bytes = c.quant == QuantKind::kNvFp4 ? uint64_t(a.H) / 2 : uint64_t(a.H);
    p.codes = at;
    at += pad(p.code_bytes);
    if (c.quant == QuantKind::kFp8PerToken) { p.n_scales = 1; p.scale_bytes = 4; }
    if (c.quant == QuantKind::kFp8PerGroup) { p.n_scales = a.H / c.group_size; p.scale_bytes = 4; }
    if (c.quant == QuantKind::kNvFp4) { p.n_scales = a.H / kFp4Block; p.scale_bytes = 1; }
    p.scales = at;
    at += pad(uint64_t(p.n_scales) * uint64_t(p.scale_bytes));
  }
  p.bytes = at;
  p.flags_bytes = (uint64_t(a.M) * 4 + 255) / 256 * 256;
  return p;
}

// Element index, in the scale output, of row m's j-th scale.
__device__ __forceinline__ int64_t scale_index(const FusedArgs& a, int64_t m, int64_t j) {
  const OpConfig& c = a.cfg;
  switch (c.quant) {
    case QuantKind::kFp8PerToken: return m;
    case QuantKind::kFp8PerGroup: {
      const int64_t G = a.H / c.group_size;
      return c.has(kScaleCol) ? j * a.M + m : m * G + j;
    }
    case QuantKind::kNvFp4:
      return c.has(kFp4Swizzled) ? swizzled_128x4_offset(m, j, a.H) : m * (a.H / kFp4Block) + j;
    default: return 0;
  }
}

__device__ __forceinline__ uint2 ld_relaxed_sys8(const void* p) {
  uint2 v;
  asm volatile("ld.relaxed.sys.global.v2.b32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p)
               : "memory");
  return v;
}

// Copies `bytes` (a multiple of 8) from src to dst with 8-byte relaxed system-scope
// accesses (one side is a peer's or a peer-written buffer).
__device__ __forceinline__ void copy8(char* dst, const char* src, uint64_t bytes) {
  for (uint64_t i = uint64_t(threadIdx.x) * 8; i < bytes; i += uint64_t(blockDim.x) * 8)
    *reinterpret_cast<uint2*>(dst + i) = ld_relaxed_sys8(src + i);
}

// Owner side: row m's outputs (just written by this block) into every peer's packet.
template <typename T>
__device__ void send_packet(const FusedArgs& a, const ExchangeView& x, const Packet& pk,
                            int64_t m, uint32_t epoch) {
  const uint64_t at = pk.flags_bytes + uint64_t(m) * pk.bytes;
  for (int p = 0; p < x.nranks; ++p) {
    if (p == x.rank) continue;
    char* dst = x.gathers[p] + at;
    if (a.residual_out)
      copy8(dst + pk.res, static_cast<const char*>(a.residual_out) + m * pk.res_bytes, pk.res_bytes);
    if (a.norm_out)
      copy8(dst + pk.norm, static_cast<const char*>(a.norm_out) + m * pk.res_bytes, pk.res_bytes);
    if (pk.code_bytes)
      copy8(dst + pk.codes, reinterpret_cast<const char*>(a.quant_out) + m * pk.code_bytes,
            pk.code_bytes);
    for (int64_t j = threadIdx.x; j < pk.n_scales; j += blockDim.x) {
      const int64_t i = scale_index(a, m, j);
      if (pk.scale_bytes == 4)
        reinterpret_cast<float*>(dst + pk.scales)[j] = static_cast<const float*>(a.scale_out)[i];
      else
        reinterpret_cast<uint8_t*>(dst + pk.scales)[j] = static_cast<const uint8_t*>(a.scale_out)[i];
    }
  }
  __threadfence_system();  // each thread's packet stores before the flag
  __syncthreads();
  if (threadIdx.x < x.nranks && int(threadIdx.x) != x.rank)
    st_release_sys(reinterpret_cast<uint32_t*>(x.gathers[threadIdx.x]) + m, epoch + 1u);
}

// Receiver side: waits for row m's packet from its owner and copies it out. On
// failure the row's outputs are filled with 0xff bytes (NaN in every float format).
template <typename T>
__device__ void receive_packet(const FusedArgs& a, const ExchangeView& x, const Packet& pk,
                               int64_t m, int owner, const CallState& st, int* ok_flag) {
  if (threadIdx.x == 0) {
    const uint32_t* flag = reinterpret_cast<const uint32_t*>(x.gathers[x.rank]) + m;
    *ok_flag = !st.poisoned && wait_flag(flag, st.epoch + 1u, x, st.t0, owner, st.epoch);
  }
  __syncthreads();
  const bool ok = *ok_flag != 0;
  const char* src = x.gathers[x.rank] + pk.flags_bytes + uint64_t(m) * pk.bytes;
  auto take = [&](void* out, uint64_t section, uint64_t bytes, int64_t row) {
    char* dst = static_cast<char*>(out) + row * bytes;
    if (ok) {
      copy8(dst, src + section, bytes);
    } else {
      for (uint64_t i = uint64_t(threadIdx.x) * 8; i < bytes; i += uint64_t(blockDim.x) * 8)
        *reinterpret_cast<uint2*>(dst + i) = make_uint2(~0u, ~0u);
    }
  };
  if (a.residual_out) take(a.residual_out, pk.res, pk.res_bytes, m);
  if (a.norm_out) take(a.norm_out, pk.norm, pk.res_bytes, m);
  if (pk.code_bytes) take(a.quant_out, pk.codes, pk.code_bytes, m);
  for (int64_t j = threadIdx.x; j < pk.n_scales; j += blockDim.x) {
    const int64_t i = scale_index(a, m, j);
    if (pk.scale_bytes == 4) {
      static_cast<uint32_t*>(a.scale_out)[i] =
          ok ? ld_volatile_u32(reinterpret_cast<const uint32_t*>(src + pk.scales) + j) : ~0u;
    } else {
      static_cast<uint8_t*>(a.scale_out)[i] =
          ok ? *reinterpret_cast<const volatile uint8_t*>(src + pk.scales + j) : uint8_t(0xff);
    }
  }
  const OpConfig& c = a.cfg;
  if (pk.code_bytes && c.quant == QuantKind::kNvFp4 && c.has(kFp4Swizzled)) {
    const int64_t nb = a.H / kFp4Block;
    for (int64_t b = nb + threadIdx.x; b < round_up(nb, 4); b += blockDim.x)
      static_cast<uint8_t*>(a.scale_out)[swizzled_128x4_offset(m, b, a.H)] = 0;
  }
  __syncthreads();  // *ok_flag is reused by the next row
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    twoshot_kernel(const FusedArgs a, const ExchangeView x) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double red_d[kMaxWarps];
  __shared__ float red_f[kMaxWarps];
  __shared__ int ok_flag;
  const CallState st = begin_call(x);
  // Rows are owned in contiguous chunks: rank r owns [r*chunk, min(M, (r+1)*chunk)).
  const int64_t chunk = (a.M + x.nranks - 1) / x.nranks;
  const int64_t lo = int64_t(x.rank) * chunk < a.M ? int64_t(x.rank) * chunk : a.M;
  const int64_t hi = lo + chunk < a.M ? lo + chunk : a.M;
  if (!st.poisoned)
    for (int64_t m = blockIdx.x; m < a.M; m += gridDim.x)
      push_row<T>(a, x, m, st.slot0, int(m / chunk), 1);
  const Packet pk = packet_of(a, int(sizeof(T)));
  for (int64_t m = lo + blockIdx.x; m < hi; m += gridDim.x) {
    reduce_row<T>(a, x, m, st.slot0, st.t0, st.epoch, st.poisoned, reinterpret_cast<T*>(smem),
                  red_d, red_f);
    if (!st.poisoned) send_packet<T>(a, x, pk, m, st.epoch);
  }
  const int64_t others = a.M - (hi - lo);
  for (int64_t i = blockIdx.x; i < others; i += gridDim.x) {
    const int64_t m = i < lo ? i : i + (hi - lo);
    receive_packet<T>(a, x, pk, m, int(m / chunk), st, &ok_flag);
  }
  zero_swizzle_padding_rows(a);
  finish_call(x, st.epoch);
}

template <typename T>
cudaError_t launch_typed(const FusedArgs& a, const ExchangeView& x, Algorithm algo,
                         cudaStream_t stream) {
  const int64_t vectors = a.H / Pack<T>::V;
  const int threads =
      int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, round_up(vectors, 32))));
  const int grid = int(std::min<int64_t>(a.M, x.num_sms));
  const size_t smem = size_t(a.H) * sizeof(T);
  if (smem > size_t(kMaxRowBytes)) return cudaErrorInvalidValue;
  if (algo == Algorithm::kTwoShot) {
    twoshot_kernel<T><<<grid, threads, smem, stream>>>(a, x);
  } else {
    oneshot_kernel<T><<<grid, threads, smem, stream>>>(a, x);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t set_smem_limit() {
  cudaError_t e = cudaFuncSetAttribute(oneshot_kernel<T>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxRowBytes);
  if (e != cudaSuccess) return e;
  return cudaFuncSetAttribute(twoshot_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              kMaxRowBytes);
}

}  // namespace

cudaError_t prepare_fused_kernels() {
  cudaError_t e = set_smem_limit<float>();
  if (e == cudaSuccess) e = set_smem_limit<bf16_t>();
  if (e == cudaSuccess) e = set_smem_limit<f16_t>();
  return e;
}

static int elem_bytes(DType t) { return t == DType::kF32 ? 4 : 2; }

const char* fused_capacity_problem(DType t, const FusedArgs& a, const ExchangeView& x,
                                   Algorithm algorithm) {
  if (uint64_t(a.M) * uint64_t(a.H) * uint64_t(elem_bytes(t)) > x.slot_bytes)
    return "the call's rows exceed the workspace's exchange slots";
  if (uint64_t(a.H) * uint64_t(elem_bytes(t)) > uint64_t(kMaxRowBytes))
    return "rows are wider than the kernel's shared-memory staging";
  if (algorithm == Algorithm::kTwoShot) {
    const Packet pk = packet_of(a, elem_bytes(t));
    if (pk.flags_bytes + uint64_t(a.M) * pk.bytes > x.gather_bytes)
      return "the call's output packets exceed the workspace's gather area";
  }
  return nullptr;
}

cudaError_t launch_fused(DType t, const FusedArgs& a, const ExchangeView& x, Algorithm algorithm,
                         cudaStream_t stream) {
  if (a.M <= 0) return cudaSuccess;
  switch (t) {
    case DType::kF32: return launch_typed<float>(a, x, algorithm, stream);
    case DType::kBF16: return launch_typed<bf16_t>(a, x, algorithm, stream);
    case DType::kF16: return launch_typed<f16_t>(a, x, algorithm, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mar
