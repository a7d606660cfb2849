// The fused kernels: finalize + all-reduce + residual + RMSNorm + quant in one
// launch per GPU, one-shot or two-shot (see Algorithm in fused.h).
//
// Grid: one block per SM of the group's smallest GPU, for every call (see
// geometry_of), so every block of every rank is resident and the cross-rank
// waits cannot deadlock on scheduling. Every phase that waits depends only on
// phases that do not wait (pushes), so all waits end.
// Push (push_rows): the grid (with many rows, one-shot: a third of it, see
//       pusher_blocks) walks this rank's M x H/V 16-byte wire vectors,
//       one or two per thread at a time (their expert-row loads overlap), and stores
//       each into slot `rank` of the current exchange buffer of every rank
//       (one-shot) or of the row's owner (two-shot). Which block pushes what
//       never matters to the protocol: the data are their own flags (Lamport).
// Reduce (reduce_vectors): each thread reads all N slots of its columns at
//       once, waits for those still empty, sums them in rank order and adds
//       the residual. The row tail (row.cuh) stages residual_out, then norms
//       and quantizes.
// Gather (two-shot): the owner of a row stores its residual_out into a packet
//       in every peer's gather area and raises the row's flag to epoch+1
//       (release); each peer waits for the flag (acquire), reads the packet and
//       runs the same row tail itself, so only 2 bytes per element of T travel
//       back. When only quantized outputs are asked, the packet carries the
//       codes and scales instead.
// The math is common/ (the CPU path runs the same functions); this file only
// decides who computes what.
#include <algorithm>

#include "row.cuh"

#ifndef MAR_KCHUNK
#define MAR_KCHUNK 8
#endif
namespace mar {
namespace {

using namespace dev;

// ---- phase 1: this rank's wire values ---------------------------------------
// NV 16-byte vectors of row m (vector indices v[0..NV)): the token's expert
// slots, weights and indices are read once for all of them.
template <typename T, int NV>
__device__ __forceinline__ void wire_vectors(const LayerArgs& a, uint32_t m, const uint32_t (&v)[NV],
                                             uint4 (&out)[NV]) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  struct Raw { uint4 u[NV]; };
  const uint32_t H = uint32_t(a.H), K = uint32_t(a.K);
  if (a.cfg.has(kDense)) {
#pragma unroll
    for (int n = 0; n < NV; ++n) out[n] = ldg16(elem_ptr<T>(a.partial, m, H, v[n]));
    return;
  }
  float acc[NV * V];
  finalize_columns<NV * V, MAR_KCHUNK>(
      acc, a.idx + m * K, int(K), int32_t(a.P),
      [&](int k0, const bool (&ok)[MAR_KCHUNK], float (&w)[MAR_KCHUNK]) {
        load_weights<MAR_KCHUNK>(a.scales, a.scales_dtype, m * K + uint32_t(k0), ok, w);
      },
      [&](int32_t p) {
        Raw r;
#pragma unroll
        for (int n = 0; n < NV; ++n) r.u[n] = ldg16(elem_ptr<T>(a.partial, uint32_t(p), H, v[n]));
        return r;
      },
      [](const Raw& r, float (&x)[NV * V]) {
#pragma unroll
        for (int n = 0; n < NV; ++n) {
          float f[V];
          PK::unpack(r.u[n], f);
#pragma unroll
          for (int j = 0; j < V; ++j) x[n * V + j] = f[j];
        }
      });
  float sh[NV * V];
  if (a.shared) {
#pragma unroll
    for (int n = 0; n < NV; ++n) {
      float f[V];
      PK::unpack(ldg16(elem_ptr<T>(a.shared, m, H, v[n])), f);
#pragma unroll
      for (int j = 0; j < V; ++j) sh[n * V + j] = f[j];
    }
  }
  finalize_scale_and_shared<NV * V>(acc, a.cfg.routed_scaling_factor, a.shared ? sh : nullptr);
#pragma unroll
  for (int n = 0; n < NV; ++n) {
    float f[V];
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = acc[n * V + j];
    out[n] = avoid_sentinel<sizeof(T)>(PK::pack(f));
  }
}

// Pushes this rank's wire vectors of every row, spread over `blocks` blocks
// (this one is number `block` of them), in row order: item i is NV vectors of
// row m = i / (HV/NV), the j-th (j = i % (HV/NV)) of each of the row's NV equal
// parts. dest(m) is the first destination rank of row m; n_dst ranks from there
// get it. The wire values are computed before `poisoned` is looked at, so the
// counters' load is not on the inputs' path.
template <typename T, int NV, typename Dest>
__device__ __forceinline__ void push_items(const LayerArgs& a, const ExchangeView& x,
                                           const CallState& st, int n_dst, Dest dest,
                                           uint32_t block, uint32_t blocks) {
  constexpr int V = Pack<T>::V;
  const uint32_t HV = uint32_t(a.H) / V, part = HV / NV;  // HV is even: H is a multiple of 16
  const uint32_t total = uint32_t(a.M) * part, stride = blocks * blockDim.x;
  const uint64_t my_slot = (st.slot0 + uint64_t(x.rank)) * x.slot_bytes;
  for (uint32_t i = block * blockDim.x + threadIdx.x; i < total; i += stride) {
    const uint32_t m = i / part, j = i - m * part;
    uint32_t v[NV];
#pragma unroll
    for (int n = 0; n < NV; ++n) v[n] = j + n * part;
    uint4 w[NV];
    wire_vectors<T, NV>(a, m, v, w);
    if (st.poisoned) continue;
    const int d = dest(m);
    for (int s = d; s < d + n_dst; ++s) {
      char* slot = x.areas[s] + my_slot;
#pragma unroll
      for (int n = 0; n < NV; ++n) st_relaxed_sys(slot + uint64_t(m * HV + v[n]) * 16u, w[n]);
    }
  }
}

// One vector per thread when the grid has a thread for every vector (small M:
// the shortest dependency chain per thread), else two of the same row per
// item (large M: half the index and weight loads per vector).
template <typename T, typename Dest>
__device__ __forceinline__ void push_rows(const LayerArgs& a, const ExchangeView& x,
                                          const CallState& st, int n_dst, Dest dest,
                                          uint32_t block, uint32_t blocks) {
  const uint32_t vectors = uint32_t(a.M) * uint32_t(a.H / Pack<T>::V);
  if (vectors <= blocks * blockDim.x)
    push_items<T, 1>(a, x, st, n_dst, dest, block, blocks);
  else
    push_items<T, 2>(a, x, st, n_dst, dest, block, blocks);
}

// One-shot with many rows per block: the first pusher_blocks() blocks push
// every row and the others run the row tails as the rows land, so the pushes
// of later rows (at the NVLink's rate) overlap the tails of earlier ones (at
// HBM's). 0: every block pushes its share, then runs its rows' tails (small M,
// where the latency of one pass matters more than overlap). Pushers never
// wait, so the reducers' waits end; which block pushes what never matters to
// the protocol. The same M on every rank gives the same split.
#ifndef MAR_PUSH_DIV
#define MAR_PUSH_DIV 3
#endif
constexpr uint32_t kSplitMinRowsPerBlock = 4;
__device__ __forceinline__ uint32_t pusher_blocks(uint32_t M, uint32_t grid) {
  return M >= kSplitMinRowsPerBlock * grid && grid >= 2 * MAR_PUSH_DIV ? grid / MAR_PUSH_DIV : 0;
}

// residual_out vectors v0 and (if has1) v1 of row m, packed: reads the N slots
// of both from this rank's buffer at once (4 ranks at a time), waits for those
// still empty, clears them, sums in rank order and adds the residual.
template <typename T>
__device__ __forceinline__ void reduce_vectors(const LayerArgs& a, const ExchangeView& x,
                                               const CallState& st, uint32_t m, uint32_t v0,
                                               uint32_t v1, bool has1, uint4 (&out)[2]) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  const uint32_t H = uint32_t(a.H), HV = H / V;
  const uint4 rv[2] = {ldg16(elem_ptr<T>(a.residual, m, H, v0)),
                       has1 ? ldg16(elem_ptr<T>(a.residual, m, H, v1)) : kSentinel4};
  const uint64_t e[2] = {uint64_t(m * HV + v0) * 16u, uint64_t(m * HV + v1) * 16u};
  const char* mine = x.areas[x.rank] + st.slot0 * x.slot_bytes;
  const int nb = has1 ? 2 : 1;
  float y[2][V];
  for (int s0 = 0; s0 < x.nranks; s0 += 4) {
    uint4 d[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const bool live = s0 + i < x.nranks && b < nb && !st.poisoned;
        d[i][b] = live ? ld_relaxed_sys(mine + uint64_t(s0 + i) * x.slot_bytes + e[b])
                       : kSentinel4;
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int s = s0 + i;
      if (s >= x.nranks) break;
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        if (b >= nb) break;
        uint4 dv = d[i][b];
        if (!st.poisoned) {
          char* p = const_cast<char*>(mine) + uint64_t(s) * x.slot_bytes + e[b];
          dv = wait_slot<sizeof(T)>(dv, p, x, st, s);
          st_relaxed_sys(p, kSentinel4);
        }
        float f[V];
        PK::unpack(dv, f);
#pragma unroll
        for (int j = 0; j < V; ++j) y[b][j] = s == 0 ? f[j] : rank_sum_step(y[b][j], f[j]);
      }
    }
  }
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    float r[V];
    PK::unpack(rv[b], r);
#pragma unroll
    for (int j = 0; j < V; ++j) r[j] = to_f32(residual_value<T>(y[b][j], r[j]));
    out[b] = PK::pack(r);  // exact: the values are already T
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    oneshot_kernel(const __grid_constant__ LayerArgs a, const __grid_constant__ ExchangeView x) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double red_d[kMaxWarps];
  __shared__ float red_f[kMaxWarps];
  __shared__ uint64_t trace_words[8];
  T* row = reinterpret_cast<T*>(smem);
  const CallState st = begin_call(x);
  Tracer tr(x, trace_words);
  const uint32_t G = gridDim.x, pushers = pusher_blocks(uint32_t(a.M), G);
  const bool pusher = blockIdx.x < pushers;
  if (pushers == 0 || pusher)
    push_rows<T>(a, x, st, x.nranks, [](uint32_t) { return 0; }, blockIdx.x, pushers ? pushers : G);
  tr.lap(kTracePush);
  zero_swizzle_padding_rows(a);
  tr.lap(kTraceOther);
  const uint32_t first = pusher ? uint32_t(a.M) : blockIdx.x - pushers;
  for (uint32_t m = first; m < uint32_t(a.M); m += G - pushers) {
    const double sq = stage_row<T>(a, m, row, [&](uint32_t v0, uint32_t v1, bool has1, uint4(&out)[2]) {
      reduce_vectors<T>(a, x, st, m, v0, v1, has1, out);
    });
    tr.lap(kTraceStage);
    finish_row<T>(a, m, row, sq, red_d, red_f);
    tr.lap(kTraceFinish);
    tr.row();
  }
  finish_call(x, st.epoch);
  tr.lap(kTraceOther);
  tr.done(st.epoch);
}

// ---- two-shot gather packets ---------------------------------------------------------
// Row flags (uint32, value epoch+1 once the packet of that call landed) sit at
// the start of the gather area, packets after. A row's packet is its
// residual_out in T when residual or norm is asked (every rank then runs the
// row tail itself), else its quant codes and scales, each section padded to 16 bytes.
struct Packet {
  bool residual = false;
  uint64_t bytes = 0;                     // bytes of one row's packet
  uint64_t code_bytes = 0, scales = 0;    // codes mode: code bytes, offset of the scales
  int64_t n_scales = 0;
  int scale_bytes = 0;                    // bytes of one scale element
  uint64_t flags_bytes = 0;
};

__host__ __device__ inline Packet packet_of(const LayerArgs& a, int elem_bytes) {
  const OpConfig& c = a.cfg;
  Packet p;
  auto pad = [](uint64_t b) { return (b + 15) / 16 * 16; };
  p.flags_bytes = (uint64_t(a.M) * 4 + 255) / 256 * 256;
  if (a.residual_out || a.norm_out) {
    p.residual = true;
    p.bytes = pad(uint64_t(a.H) * uint64_t(elem_bytes));
  } else if (c.has(kOutQuant) && c.quant != QuantKind::kNone) {
    p.code_bytes = c.quant == QuantKind::kNvFp4 ? uint64_t(a.H) / 2 : uint64_t(a.H);
    if (c.quant == QuantKind::kFp8PerToken) { p.n_scales = 1; p.scale_bytes = 4; }
    if (c.quant == QuantKind::kFp8PerGroup) { p.n_scales = a.H / c.group_size; p.scale_bytes = 4; }
    if (c.quant == QuantKind::kNvFp4) { p.n_scales = a.H / kFp4Block; p.scale_bytes = 1; }
    p.scales = pad(p.code_bytes);
    p.bytes = p.scales + pad(uint64_t(p.n_scales) * uint64_t(p.scale_bytes));
  }
  return p;
}

__device__ __forceinline__ char* packet_at(const ExchangeView& x, int rank, const Packet& pk,
                                           int64_t m) {
  return x.gathers[rank] + pk.flags_bytes + uint64_t(m) * pk.bytes;
}

// Owner side, after every thread stored its part of row m's packet into every
// peer: raise the row's flag there once those stores are visible.
__device__ __forceinline__ void publish_row(const ExchangeView& x, int64_t m, uint32_t epoch) {
  __threadfence_system();  // each thread's packet stores before the flag
  __syncthreads();
  if (threadIdx.x < x.nranks && int(threadIdx.x) != x.rank)
    st_release_sys(reinterpret_cast<uint32_t*>(x.gathers[threadIdx.x]) + m, epoch + 1u);
}

// Receiver side: block-wide wait for row m's flag; false if the wait failed.
__device__ __forceinline__ bool await_row(const ExchangeView& x, int64_t m, int owner,
                                          const CallState& st, int* ok_flag) {
  if (threadIdx.x == 0) {
    const uint32_t* flag = reinterpret_cast<const uint32_t*>(x.gathers[x.rank]) + m;
    *ok_flag = !st.poisoned && wait_flag(flag, st.epoch + 1u, x, st, owner);
  }
  __syncthreads();
  return *ok_flag != 0;
}

// Copies `bytes` (a multiple of 8) from src to dst with 8-byte relaxed system-scope
// loads (the source is a peer-written buffer, or one about to be sent).
__device__ __forceinline__ void copy8(char* dst, const char* src, uint64_t bytes) {
  for (uint64_t i = uint64_t(threadIdx.x) * 8; i < bytes; i += uint64_t(blockDim.x) * 8)
    *reinterpret_cast<uint2*>(dst + i) = ld_relaxed_sys8(src + i);
}

// Codes mode, owner side: row m's codes and scales (just written by this block)
// into every peer's packet, then the flag.
__device__ void send_codes(const LayerArgs& a, const ExchangeView& x, const Packet& pk, int64_t m,
                           uint32_t epoch) {
  __syncthreads();  // the row's codes and scales were written by other threads
  for (int p = 0; p < x.nranks; ++p) {
    if (p == x.rank) continue;
    char* dst = packet_at(x, p, pk, m);
    copy8(dst, reinterpret_cast<const char*>(a.quant_out) + m * pk.code_bytes, pk.code_bytes);
    for (int64_t j = threadIdx.x; j < pk.n_scales; j += blockDim.x) {
      const uint32_t i = scale_index(a, uint32_t(m), uint32_t(j));
      if (pk.scale_bytes == 4)
        reinterpret_cast<float*>(dst + pk.scales)[j] = static_cast<const float*>(a.scale_out)[i];
      else
        reinterpret_cast<uint8_t*>(dst + pk.scales)[j] = static_cast<const uint8_t*>(a.scale_out)[i];
    }
  }
  publish_row(x, m, epoch);
}

// Codes mode, receiver side: row m's codes and scales out of the packet. On
// failure they are filled with 0xff bytes (NaN in every scale format).
__device__ void receive_codes(const LayerArgs& a, const ExchangeView& x, const Packet& pk,
                              int64_t m, int owner, const CallState& st, int* ok_flag) {
  const bool ok = await_row(x, m, owner, st, ok_flag);
  const char* src = packet_at(x, x.rank, pk, m);
  char* dst = reinterpret_cast<char*>(a.quant_out) + m * pk.code_bytes;
  if (ok) {
    copy8(dst, src, pk.code_bytes);
  } else {
    for (uint64_t i = uint64_t(threadIdx.x) * 8; i < pk.code_bytes; i += uint64_t(blockDim.x) * 8)
      *reinterpret_cast<uint2*>(dst + i) = make_uint2(~0u, ~0u);
  }
  for (int64_t j = threadIdx.x; j < pk.n_scales; j += blockDim.x) {
    const uint32_t i = scale_index(a, uint32_t(m), uint32_t(j));
    if (pk.scale_bytes == 4) {
      static_cast<uint32_t*>(a.scale_out)[i] =
          ok ? ld_volatile_u32(reinterpret_cast<const uint32_t*>(src + pk.scales) + j) : ~0u;
    } else {
      static_cast<uint8_t*>(a.scale_out)[i] =
          ok ? *reinterpret_cast<const volatile uint8_t*>(src + pk.scales + j) : uint8_t(0xff);
    }
  }
  const OpConfig& c = a.cfg;
  if (c.quant == QuantKind::kNvFp4 && c.has(kFp4Swizzled))
    zero_swizzle_padding_columns(static_cast<uint8_t*>(a.scale_out), m, a.H);
  __syncthreads();  // *ok_flag is reused by the next row
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    twoshot_kernel(const __grid_constant__ LayerArgs a, const __grid_constant__ ExchangeView x) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double red_d[kMaxWarps];
  __shared__ float red_f[kMaxWarps];
  __shared__ int ok_flag;
  __shared__ uint64_t trace_words[8];
  T* row = reinterpret_cast<T*>(smem);
  const CallState st = begin_call(x);
  // Rows are owned in contiguous chunks: rank r owns [r*chunk, min(M, (r+1)*chunk)).
  const uint32_t M = uint32_t(a.M), chunk = (M + x.nranks - 1) / x.nranks;
  const uint32_t lo = min(uint32_t(x.rank) * chunk, M), hi = min(lo + chunk, M);
  auto owner = [chunk](uint32_t m) { return int(m / chunk); };
  Tracer tr(x, trace_words);
  push_rows<T>(a, x, st, 1, owner, blockIdx.x, gridDim.x);
  tr.lap(kTracePush);
  zero_swizzle_padding_rows(a);
  const Packet pk = packet_of(a, int(sizeof(T)));
  const bool send = pk.residual && !st.poisoned;
  tr.lap(kTraceOther);
  // Owned rows first: their packets are what the other ranks' blocks wait for.
  for (uint32_t m = lo + blockIdx.x; m < hi; m += gridDim.x) {
    tr.row();
    const double sq = stage_row<T>(a, m, row, [&](uint32_t v0, uint32_t v1, bool has1, uint4(&out)[2]) {
      reduce_vectors<T>(a, x, st, m, v0, v1, has1, out);
      if (!send) return;
      for (int p = 0; p < x.nranks; ++p) {
        if (p == x.rank) continue;
        char* dst = packet_at(x, p, pk, m);
        *reinterpret_cast<uint4*>(dst + v0 * 16u) = out[0];
        if (has1) *reinterpret_cast<uint4*>(dst + v1 * 16u) = out[1];
      }
    });
    tr.lap(kTraceStage);
    if (send) publish_row(x, m, st.epoch);
    tr.lap(kTraceOther);
    finish_row<T>(a, m, row, sq, red_d, red_f);
    tr.lap(kTraceFinish);
    if (pk.code_bytes && !st.poisoned) send_codes(a, x, pk, m, st.epoch);
    tr.lap(kTraceOther);
  }
  const uint32_t others = M - (hi - lo);
  for (uint32_t i = blockIdx.x; i < others; i += gridDim.x) {
    const uint32_t m = i < lo ? i : i + (hi - lo);
    tr.row();
    if (!pk.residual) {
      receive_codes(a, x, pk, m, owner(m), st, &ok_flag);
      tr.lap(kTraceStage);
    } else {
      const bool ok = await_row(x, m, owner(m), st, &ok_flag);
      const char* src = packet_at(x, x.rank, pk, m);
      const double sq = stage_row<T>(a, m, row, [&](uint32_t v0, uint32_t v1, bool has1, uint4(&out)[2]) {
        out[0] = ok ? ld_relaxed_sys(src + v0 * 16u) : kSentinel4;
        out[1] = ok && has1 ? ld_relaxed_sys(src + v1 * 16u) : kSentinel4;
      });
      tr.lap(kTraceStage);
      finish_row<T>(a, m, row, sq, red_d, red_f);  // its barriers also protect ok_flag
      tr.lap(kTraceFinish);
    }
  }
  finish_call(x, st.epoch);
  tr.lap(kTraceOther);
  tr.done(st.epoch);
}

// Threads per block: enough that a row's H/V vectors take at most two per
// thread (one batch of stage_row). Grid: always one block per SM of the group's
// smallest GPU (every block resident, so the cross-rank waits cannot deadlock on
// scheduling; and the same grid for every call, which the per-block epochs of
// DeviceCounters rely on). Blocks without a row or a vector to push only
// advance their epoch.
struct Geometry {
  int threads, grid;
};

template <typename T>
Geometry geometry_of(const LayerArgs& a, const ExchangeView& x) {
  const int64_t vectors = a.H / Pack<T>::V;
  const int64_t threads =
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, round_up((vectors + 1) / 2, 32)));
  return {int(threads), x.group_sms};
}

template <typename T>
cudaError_t launch_typed(const LayerArgs& a, const ExchangeView& x, Algorithm algo,
                         cudaStream_t stream) {
  const Geometry g = geometry_of<T>(a, x);
  const size_t smem = size_t(a.H) * sizeof(T);
  if (smem > size_t(kMaxRowBytes)) return cudaErrorInvalidValue;
  if (algo == Algorithm::kTwoShot) {
    twoshot_kernel<T><<<g.grid, g.threads, smem, stream>>>(a, x);
  } else {
    oneshot_kernel<T><<<g.grid, g.threads, smem, stream>>>(a, x);
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
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    const cudaError_t e = with_float_type(t, [](auto tag) { return set_smem_limit<decltype(tag)>(); });
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

const char* fused_capacity_problem(DType t, const LayerArgs& a, const ExchangeView& x,
                                   Algorithm algorithm) {
  if (algorithm != Algorithm::kOneShot && algorithm != Algorithm::kTwoShot)
    return "unknown algorithm code";
  const uint64_t elem = t == DType::kF32 ? 4 : 2, row_bytes = uint64_t(a.H) * elem;
  // The kernels index elements with 32-bit math.
  const uint64_t limit = uint64_t(kMaxElements);
  if (uint64_t(a.M) * uint64_t(a.H) >= limit || uint64_t(a.P) * uint64_t(a.H) >= limit ||
      uint64_t(a.M) * uint64_t(a.K) >= limit)
    return "the call's arrays exceed 2^31 elements (the kernels index them with 32-bit math)";
  if (uint64_t(a.M) * row_bytes > x.slot_bytes)
    return "the call's rows exceed the workspace's exchange slots";
  if (row_bytes > uint64_t(kMaxRowBytes))
    return "rows are wider than the kernel's shared-memory staging";
  if (algorithm == Algorithm::kTwoShot) {
    const Packet pk = packet_of(a, int(elem));
    if (pk.flags_bytes + uint64_t(a.M) * pk.bytes > x.gather_bytes)
      return "the call's output packets exceed the workspace's gather area";
  }
  return nullptr;
}

cudaError_t launch_fused(DType t, const LayerArgs& a, const ExchangeView& x, Algorithm algorithm,
                         cudaStream_t stream) {
  if (a.M <= 0) return cudaSuccess;
  return with_float_type(t, [&](auto tag) {
    return launch_typed<decltype(tag)>(a, x, algorithm, stream);
  });
}

}  // namespace mar
