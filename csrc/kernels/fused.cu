// The fused kernels: finalize + all-reduce + residual + RMSNorm + quant in one
// launch per GPU, one-shot or two-shot (common/config.h Algorithm).
//
// Shape. A row of H values is V-element 16-byte vectors; a cluster of C
// blocks holds one row at a time, each thread one vector of it, from the
// expert-row loads to the last quant store: its wire (this rank's partial)
// stays in registers, the peers' wires come from the exchange, and the row's
// sums are reduced over the cluster (tail.cuh). Clusters walk the rows
// (m = cluster, cluster + G, ...). The grid is sized to the work, M rows, and
// capped at the clusters that are co-resident on the SMs this rank may use, so
// every block that waits runs beside the blocks it waits for.
//
// Exchange. The block that handles an element of a row has the same index on
// every rank, so it meets the same block of its peers and their per-block
// epochs agree (device.cuh, begin_call) whatever the grid of each call.
// One-shot: each thread pushes its wire vector into slot `rank` of every
// peer's current buffer (Lamport: the data are their own flags,
// common/exchange.h), reads the peers' slots of its vector, waits for the
// empty ones, clears them and sums all wires in rank order, its own from
// registers. It pushes the next row before it waits for this one, so the
// pushes run ahead of the waits.
// Two-shot: rows are owned in contiguous chunks. Phase 1 pushes every row to
// its owner; phase 2 reduces the owned rows like one-shot, stores each
// residual_out slice into a packet in every peer's gather area and raises the
// slice's flag (value epoch + 1, release); phase 3 waits for the other rows'
// flags (acquire), clears them, and runs the same row tail on the packet.
// A reduce-scatter (kScatter) is phases 1 and 2, with the owned rows as its
// output. Every wait depends only on pushes that never wait, so every wait ends.
// The math is common/ (the CPU path runs the same functions); this file only
// decides who computes what. (Over 400 lines: both algorithms share the wire,
// exchange and launch code around them, which belongs with them.)
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "tail.cuh"

#ifndef MAR_KCHUNK
#define MAR_KCHUNK 8
#endif
// Rows at which a call takes the variant compiled for 3 blocks of up to 256
// threads per SM (80 registers, a few spilled) instead of the one with all
// the registers it wants (~128): more rows in flight per SM pay off once each
// cluster walks several rows. Measured on 1xH200, docs/perf.md v6: M <= 32
// faster with the unbounded variant (5.5 vs 6.3 µs at M = 1), M >= 2048 with
// the bounded one (178 vs 259 µs at M = 2048), M = 128 about even.
constexpr int64_t kManyRows = 128;

namespace mar {
namespace {

using namespace dev;

// Blocks per row (a cluster) and threads per block: about 128 vectors per
// block, so a row spreads over up to kMaxCluster SMs. It depends on T and H
// only, never on M or the algorithm: every call over the same row width sums
// its squares in the same order. G, the rows in flight, is set at launch.
struct Geometry {
  int32_t C;   // blocks per row
  int32_t TR;  // threads per block = vectors of its slice
  int32_t G;   // clusters in the grid
};

template <typename T>
Geometry geometry_of(int64_t H) {
  const int64_t HV = H / Pack<T>::V;
  const int64_t C = std::min<int64_t>(kMaxCluster, std::max<int64_t>(1, (HV + 127) / 128));
  const int64_t TR = round_up((HV + C - 1) / C, 32);
  return {int32_t(C), int32_t(TR), 0};
}

// ---- this rank's wire ---------------------------------------------------------------
// Vector v of row m of this rank's partial, rounded to T: the finalize of SPEC
// §3 (or the dense x itself). A value equal to the exchange's sentinel is sent
// as another NaN.
template <typename T>
__device__ __forceinline__ uint4 wire_vector(const LayerArgs& a, uint32_t m, uint32_t v) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  const uint32_t H = uint32_t(a.H), K = uint32_t(a.K);
  if (a.cfg.has(kDense)) return avoid_sentinel<sizeof(T)>(ldg16(elem_ptr<T>(a.partial, m, H, v)));
  float acc[V];
  finalize_columns<V, MAR_KCHUNK>(
      acc, a.idx + m * K, int(K), int32_t(a.P),
      [&](int k0, const bool (&ok)[MAR_KCHUNK], float (&w)[MAR_KCHUNK]) {
        load_weights<MAR_KCHUNK>(a.scales, a.scales_dtype, m * K + uint32_t(k0), ok, w);
      },
      [&](int32_t p) { return ldg16(elem_ptr<T>(a.partial, uint32_t(p), H, v)); },
      [](uint4 raw, float (&x)[V]) { PK::unpack(raw, x); });
  float sh[V];
  if (a.shared) PK::unpack(ldg16(elem_ptr<T>(a.shared, m, H, v)), sh);
  finalize_scale_and_shared<V>(acc, a.cfg.routed_scaling_factor, a.shared ? sh : nullptr);
  return avoid_sentinel<sizeof(T)>(PK::pack(acc));
}

// Byte offset of vector v of row m inside a slot.
__device__ __forceinline__ uint64_t slot_offset(uint32_t m, uint32_t HV, uint32_t v) {
  return uint64_t(m * HV + v) * 16u;
}

// Stores this rank's wire vector into slot `rank` of rank `dst`'s current buffer.
__device__ __forceinline__ void push_to(const ExchangeView& x, const CallState& st, int dst,
                                        uint64_t offset, uint4 w) {
  st_relaxed_sys(x.areas[dst] + (st.slot0 + uint64_t(x.rank)) * x.slot_bytes + offset, w);
}

// The rank-ordered sum of SPEC §3 of one vector: `own` is this rank's wire,
// from registers; every other rank's comes from slot s of this rank's current
// buffer (peers read 4 at a time, then waited for, cleared and added in rank
// order). A group of one reads no slot.
template <typename T>
__device__ __forceinline__ void rank_sum(const ExchangeView& x, const CallState& st,
                                         uint64_t offset, uint4 own, float (&y)[Pack<T>::V]) {
  using PK = Pack<T>;
  constexpr int V = PK::V;
  char* mine = x.areas[x.rank] + st.slot0 * x.slot_bytes + offset;
  for (int s0 = 0; s0 < x.nranks; s0 += 4) {
    uint4 d[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int s = s0 + i;
      const bool peer = s < x.nranks && s != x.rank && !st.poisoned;
      d[i] = peer ? ld_relaxed_sys(mine + uint64_t(s) * x.slot_bytes) : (s == x.rank ? own : kSentinel4);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int s = s0 + i;
      if (s >= x.nranks) break;
      uint4 dv = d[i];
      if (s != x.rank && !st.poisoned) {
        char* p = mine + uint64_t(s) * x.slot_bytes;
        dv = wait_slot<sizeof(T)>(dv, p, x, st, s);
        st_relaxed_sys(p, kSentinel4);
      }
      float f[V];
      PK::unpack(dv, f);
#pragma unroll
      for (int j = 0; j < V; ++j) y[j] = s == 0 ? f[j] : rank_sum_step(y[j], f[j]);
    }
  }
}

// residual_out = rT(y + residual), packed.
template <typename T>
__device__ __forceinline__ uint4 add_residual(const float (&y)[Pack<T>::V], uint4 residual) {
  using PK = Pack<T>;
  float r[PK::V];
  PK::unpack(residual, r);
#pragma unroll
  for (int j = 0; j < PK::V; ++j) r[j] = to_f32(residual_value<T>(y[j], r[j]));
  return PK::pack(r);  // exact: the values are already T
}

// Where this thread stands: its cluster, its vector of every row.
struct Place {
  uint32_t C, cluster, v, HV, M, G;
  bool active;
};

template <typename T>
__device__ __forceinline__ Place place_of(const LayerArgs& a, const Geometry& g) {
  Place p;
  p.C = uint32_t(g.C);
  p.cluster = blockIdx.x / p.C;
  p.v = (blockIdx.x % p.C) * uint32_t(g.TR) + threadIdx.x;
  p.HV = uint32_t(a.H) / Pack<T>::V;
  p.M = uint32_t(a.M);
  p.G = uint32_t(g.G);
  p.active = p.v < p.HV;
  return p;
}

template <typename T>
__device__ __forceinline__ TailState tail_state(const LayerArgs& a) {
  TailState ts;
  const OpConfig& c = a.cfg;
  if (c.quantizes()) {
    ts.lanes = quantize_lanes<T>(c);
    if (c.quant == QuantKind::kFp8Static) ts.static_inv = div_rn(1.0f, a.quant_scale[0]);
  }
  return ts;
}

// ---- one-shot ---------------------------------------------------------------------------
template <typename T, int kMaxTR, int kMinBlocks>
__global__ void __launch_bounds__(kMaxTR, kMinBlocks)
    oneshot_kernel(const __grid_constant__ LayerArgs a, const __grid_constant__ ExchangeView x,
                   const Geometry g) {
  extern __shared__ uint4 stage_raw[];  // one slice of T, for the staged quantizers
  __shared__ TailShared sh;
  __shared__ uint64_t trace_words[8];
  T* stage = reinterpret_cast<T*>(stage_raw);
  const CallState st = begin_call(x);
  const Place p = place_of<T>(a, g);
  Tracer tr(x, trace_words);
  TailState ts = tail_state<T>(a);
  ts.entry.arrive(int(p.C));
  zero_swizzle_padding_rows(a, p.M);
  uint32_t m = p.cluster;
  auto produce = [&](uint32_t row) {  // this rank's wire of `row`, pushed to every peer
    const uint4 w = wire_vector<T>(a, row, p.v);
    if (!st.poisoned) {
      const uint64_t off = slot_offset(row, p.HV, p.v);
      for (int s = 0; s < x.nranks; ++s)
        if (s != x.rank) push_to(x, st, s, off, w);
    }
    return w;
  };
  // The residual of a row is loaded before its wire, so its latency overlaps the finalize's.
  auto residual = [&](uint32_t row) {
    return row < p.M && p.active ? ldg16(elem_ptr<T>(a.residual, row, uint32_t(a.H), p.v))
                                 : kSentinel4;
  };
  uint4 res = residual(m);
  uint4 own = m < p.M && p.active ? produce(m) : kSentinel4;
  for (; m < p.M; m += p.G) {
    const uint32_t next = m + p.G;
    const uint4 res_next = residual(next);
    const uint4 own_next = next < p.M && p.active ? produce(next) : kSentinel4;
    tr.lap(kTracePush);
    uint4 r = kSentinel4;
    if (p.active) {
      float y[Pack<T>::V];
      rank_sum<T>(x, st, slot_offset(m, p.HV, p.v), own, y);
      r = add_residual<T>(y, res);
    }
    tr.lap(kTraceStage);
    row_tail<T>(a, TailPlace{m, p.M}, p.v, p.active, r, uint32_t(g.TR) * Pack<T>::V, int(p.C),
                sh, ts, stage);
    tr.lap(kTraceFinish);
    tr.row();
    own = own_next;
    res = res_next;
  }
  ts.entry.enter();  // a block without rows still completes the entry barrier
  finish_call(x, st.epoch);
  tr.lap(kTraceOther);
  tr.done(st.epoch);
}

// ---- two-shot ---------------------------------------------------------------------------
// The gather area: one flag (uint32) per (row, block of the row's cluster),
// then the rows' residual_out packets, each laid out like a slot row.
__host__ __device__ inline uint64_t flags_bytes(int64_t M, int C) {
  return (uint64_t(M) * uint64_t(C) * 4 + 255) / 256 * 256;
}

template <typename T, int kMaxTR, int kMinBlocks>
__global__ void __launch_bounds__(kMaxTR, kMinBlocks)
    twoshot_kernel(const __grid_constant__ LayerArgs a, const __grid_constant__ ExchangeView x,
                   const Geometry g) {
  extern __shared__ uint4 stage_raw[];
  __shared__ TailShared sh;
  __shared__ int ok_flag;
  __shared__ uint64_t trace_words[8];
  T* stage = reinterpret_cast<T*>(stage_raw);
  const CallState st = begin_call(x);
  const Place p = place_of<T>(a, g);
  Tracer tr(x, trace_words);
  TailState ts = tail_state<T>(a);
  ts.entry.arrive(int(p.C));
  const uint32_t chunk = (p.M + uint32_t(x.nranks) - 1) / uint32_t(x.nranks);
  auto owner = [chunk](uint32_t m) { return int(m / chunk); };
  // Reduce-scatter (SPEC §2.1): the owned rows are the whole output; residual
  // and results hold rows [lo, lo + chunk) as rows [0, chunk).
  const bool scatter = a.cfg.has(kScatter);
  const uint32_t lo = min(uint32_t(x.rank) * chunk, p.M);
  const uint32_t first_out = scatter ? lo : 0u, rows_out = scatter ? min(chunk, p.M - lo) : p.M;
  zero_swizzle_padding_rows(a, rows_out);
  const uint64_t fbytes = flags_bytes(p.M, int(p.C));
  const uint32_t slice_id = blockIdx.x % p.C;
  auto flag_at = [&](int r, uint32_t m) {
    return reinterpret_cast<uint32_t*>(x.gathers[r]) + (uint64_t(m) * p.C + slice_id);
  };
  auto packet_at = [&](int r, uint32_t m) {
    return x.gathers[r] + fbytes + slot_offset(m, p.HV, p.v);
  };
  // Phase 1: every row owned elsewhere, to its owner. Never waits.
  for (uint32_t m = p.cluster; m < p.M; m += p.G) {
    const int o = owner(m);
    if (o == x.rank || !p.active) continue;
    const uint4 w = wire_vector<T>(a, m, p.v);
    if (!st.poisoned) push_to(x, st, o, slot_offset(m, p.HV, p.v), w);
  }
  tr.lap(kTracePush);
  // Phase 2: the owned rows: reduce, send residual_out to every peer, tail.
  for (uint32_t m = p.cluster; m < p.M; m += p.G) {
    if (owner(m) != x.rank) continue;
    const uint32_t out = m - first_out;
    uint4 r = kSentinel4;
    if (p.active) {
      const uint4 res = ldg16(elem_ptr<T>(a.residual, out, uint32_t(a.H), p.v));
      float y[Pack<T>::V];
      rank_sum<T>(x, st, slot_offset(m, p.HV, p.v), wire_vector<T>(a, m, p.v), y);
      r = add_residual<T>(y, res);
      if (!st.poisoned && !scatter)
        for (int s = 0; s < x.nranks; ++s)
          if (s != x.rank) *reinterpret_cast<uint4*>(packet_at(s, m)) = r;
    }
    if (!scatter) {
      // Every thread's packet stores happen before the flags: the barrier orders
      // them before the release stores, which are cumulative.
      __syncthreads();
      if (!st.poisoned && threadIdx.x < uint32_t(x.nranks) && int(threadIdx.x) != x.rank)
        st_release_sys(flag_at(int(threadIdx.x), m), st.epoch + 1u);
    }
    tr.lap(kTraceStage);
    row_tail<T>(a, TailPlace{out, rows_out}, p.v, p.active, r, uint32_t(g.TR) * Pack<T>::V,
                int(p.C), sh, ts, stage);
    tr.lap(kTraceFinish);
    tr.row();
  }
  // Phase 3: the other rows, from their owners' packets (not for a reduce-scatter).
  for (uint32_t m = p.cluster; m < p.M && !scatter; m += p.G) {
    const int o = owner(m);
    if (o == x.rank) continue;
    if (threadIdx.x == 0) {
      uint32_t* flag = flag_at(x.rank, m);
      ok_flag = !st.poisoned && wait_flag(flag, st.epoch + 1u, x, st, o);
      if (ok_flag) *flag = 0u;  // read once; the owner raises it again next call only
    }
    __syncthreads();
    const bool ok = ok_flag != 0;
    uint4 r = kSentinel4;
    if (p.active && ok) r = ld_relaxed_sys(packet_at(x.rank, m));
    __syncthreads();  // ok_flag is rewritten for the next row
    tr.lap(kTraceStage);
    row_tail<T>(a, TailPlace{m, p.M}, p.v, p.active, r, uint32_t(g.TR) * Pack<T>::V, int(p.C),
                sh, ts, stage);
    tr.lap(kTraceFinish);
    tr.row();
  }
  ts.entry.enter();  // a block without rows still completes the entry barrier
  finish_call(x, st.epoch);
  tr.lap(kTraceOther);
  tr.done(st.epoch);
}

// ---- launch ---------------------------------------------------------------------------
template <typename T>
using Kernel = void (*)(LayerArgs, ExchangeView, Geometry);

// Blocks of up to 256 threads (rows up to 2048 vectors: H <= 16384 in bf16)
// get the registers of a small block, or (many rows) three such blocks per SM;
// wider rows a block of up to kMaxThreads.
template <typename T, int kMaxTR, int kMinBlocks>
Kernel<T> kernel_of(Algorithm algorithm) {
  return algorithm == Algorithm::kTwoShot ? twoshot_kernel<T, kMaxTR, kMinBlocks>
                                          : oneshot_kernel<T, kMaxTR, kMinBlocks>;
}

template <typename T>
Kernel<T> kernel_for(Algorithm algorithm, const Geometry& g, int64_t rows) {
  if (g.TR > 256) return kernel_of<T, kMaxThreads, 1>(algorithm);
  return rows >= kManyRows ? kernel_of<T, 256, 3>(algorithm) : kernel_of<T, 256, 1>(algorithm);
}

// Dynamic shared memory: one slice of T, for the staged quantizers only.
template <typename T>
size_t stage_bytes(const LayerArgs& a, const Geometry& g) {
  const bool staged = a.cfg.quantizes() && a.cfg.quant == QuantKind::kFp8PerGroup &&
                      quantize_lanes<T>(a.cfg) == 0;
  return staged ? size_t(g.TR) * 16 : 0;
}

cudaLaunchAttribute cluster_attribute(int C) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = unsigned(C);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  return attr;
}

// Clusters of this kernel and shape that are resident at once on the whole
// device (cached: the occupancy query runs once per kernel, shape and device).
int resident_clusters(const void* kernel, const Geometry& g, size_t smem, int device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t, int>, int> cache;
  const auto key = std::make_tuple(kernel, g.C, g.TR, smem, device);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(g.C));
  cfg.blockDim = dim3(unsigned(g.TR));
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr = cluster_attribute(g.C);
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  cache.emplace(key, n);
  return n;
}

int device_sms(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cache.emplace(device, sms);
  return sms;
}

// The launch of a call: geometry with G set, the kernel and its shared memory;
// G = 0 when not even one cluster fits.
template <typename T>
struct Launch {
  Geometry g;
  Kernel<T> kernel;
  size_t smem;
};

template <typename T>
cudaError_t plan_launch(const LayerArgs& a, const ExchangeView& x, Algorithm algo, Launch<T>* l) {
  l->g = geometry_of<T>(a.H);
  l->smem = stage_bytes<T>(a, l->g);
  // A reduce-scatter is two-shot's first half whatever the algorithm asked.
  l->kernel = kernel_for<T>(a.cfg.has(kScatter) ? Algorithm::kTwoShot : algo, l->g, a.M);
  int device = 0;
  const cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  // This rank may fill group_sms of the device's SMs (fewer when ranks of the
  // group share the device): its share of the resident clusters.
  const int sms = std::max(1, device_sms(device));
  const int64_t fit = int64_t(resident_clusters(reinterpret_cast<const void*>(l->kernel), l->g,
                                                l->smem, device)) *
                      std::min(sms, x.group_sms) / sms;
  l->g.G = int32_t(std::min<int64_t>(std::min<int64_t>(a.M, fit), kMaxGrid / l->g.C));
  return fit < 1 ? cudaErrorLaunchOutOfResources : cudaSuccess;
}

template <typename T>
cudaError_t launch_typed(const LayerArgs& a, const ExchangeView& x, Algorithm algo,
                         cudaStream_t stream) {
  Launch<T> l;
  const cudaError_t e = plan_launch<T>(a, x, algo, &l);
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(l.g.G * l.g.C));
  cfg.blockDim = dim3(unsigned(l.g.TR));
  cfg.dynamicSmemBytes = l.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr = cluster_attribute(l.g.C);
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, l.kernel, a, x, l.g);
}

template <typename T>
cudaError_t load_kernels() {
  for (Algorithm algo : {Algorithm::kOneShot, Algorithm::kTwoShot}) {
    for (Kernel<T> k : {kernel_of<T, 256, 1>(algo), kernel_of<T, 256, 3>(algo),
                        kernel_of<T, kMaxThreads, 1>(algo)}) {
      cudaFuncAttributes attr;
      const cudaError_t e = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(k));
      if (e != cudaSuccess) return e;
    }
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t prepare_fused_kernels() {
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    const cudaError_t e = with_float_type(t, [](auto tag) { return load_kernels<decltype(tag)>(); });
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
  if (row_bytes > uint64_t(kMaxRowBytes)) return "rows are wider than the kernel serves";
  if (uint64_t(a.M) * row_bytes > x.slot_bytes)
    return "the call's rows exceed the workspace's exchange slots";
  if (algorithm == Algorithm::kTwoShot && !a.cfg.has(kScatter)) {
    const int C = with_float_type(t, [&](auto tag) { return geometry_of<decltype(tag)>(a.H).C; });
    if (flags_bytes(a.M, C) + uint64_t(a.M) * row_bytes > x.gather_bytes)
      return "the call's rows exceed the workspace's gather area";
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

LaunchShape fused_launch_shape(DType t, const LayerArgs& a, const ExchangeView& x,
                               Algorithm algorithm) {
  return with_float_type(t, [&](auto tag) {
    Launch<decltype(tag)> l;
    LaunchShape shape;
    if (plan_launch<decltype(tag)>(a, x, algorithm, &l) != cudaSuccess) return shape;
    shape.grid = l.g.G * l.g.C;
    shape.block = l.g.TR;
    shape.cluster = l.g.C;
    shape.smem = l.smem;
    return shape;
  });
}

}  // namespace mar
