// The fused kernels: finalize + all-reduce + residual + RMSNorm + quant in one
// launch per GPU, one-shot or two-shot (common/config.h Algorithm).
//
// Shape. A row of H values is V-element 16-byte vectors; a cluster of C
// blocks holds one row at a time, each thread VPT vectors of it, from the
// expert-row loads to the last quant store: its wire (this rank's partial)
// stays in registers, the peers' wires come from the exchange, and the row's
// sums are reduced over the cluster (tail.cuh). Few rows: a row spreads over
// up to 8 SMs, one vector per thread (latency). Many rows: a row is one block,
// several vectors per thread, no cluster barrier, and the blocks of an SM
// work on independent rows (throughput: their loads overlap each other's
// reductions). Clusters walk the rows (m = cluster, cluster + G, ...). The
// grid is sized to the work, M rows, and capped at the clusters that are
// co-resident on the SMs this rank may use, so every block that waits runs
// beside the blocks it waits for.
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
#ifndef MAR_ELEMENT_TYPE
#error "fused.cu is compiled through fused_f32.cu, fused_bf16.cu and fused_f16.cu, one element type each"
#endif

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "tail.cuh"

#ifndef MAR_KCHUNK
#define MAR_KCHUNK 8
#endif
// Rows from which a call takes a many-rows geometry (a row per block, VPT
// vectors per thread; below, the few-rows one unless a many-rows one walks
// fewer rounds of rows: plan_launch). Measured on 1xH200, docs/perf.md v7 and
// v9 (MAR_MANY_ROWS moves it, for timing the geometries side by side).
#ifndef MAR_MANY_ROWS
#define MAR_MANY_ROWS 128
#endif
constexpr int64_t kManyRows = MAR_MANY_ROWS;
// The many-rows geometry: vectors per thread (a power of two, at most
// kMaxVpt: more spill registers), about kManyRowsThreads threads per block and
// at most twice that.
#ifndef MAR_MAX_VPT
#define MAR_MAX_VPT 4
#endif
// Launch bound of the many-rows kernels: the most threads a block of them
// has, and with it the registers a thread may use (65536 / bound).
#ifndef MAR_MANY_ROWS_BOUND
#define MAR_MANY_ROWS_BOUND 512
#endif
constexpr int64_t kMaxVpt = MAR_MAX_VPT, kManyRowsThreads = 256;

namespace mar {
namespace {

using namespace dev;

// Blocks per row (a cluster), threads per block and vectors per thread.
// Few rows: about 128 vectors per block, one per thread, so a row spreads over
// up to kMaxCluster SMs (4 or 5 blocks of a 7168-wide row instead of 7 were
// slower at M = 1, 1xH200, docs/perf.md v11). Many rows: the row in one block
// of up to 2 * kManyRowsThreads threads with VPT vectors each, when it fits; wider
// rows keep the cluster. Every geometry sums a row's squares in
// the same order (device.cuh, cluster_reduce), so the choice never changes a
// bit. G, the rows in flight, is set at launch (plan_launch, which also
// chooses among the geometries below).
struct Geometry {
  int32_t C;    // blocks per row
  int32_t TR;   // threads per block
  int32_t VPT;  // vectors per thread
  int32_t G;    // clusters in the grid
};

template <typename T>
Geometry few_rows_geometry(int64_t H) {
  const int64_t HV = H / Pack<T>::V;
  const int64_t C = std::min<int64_t>(kMaxCluster, std::max<int64_t>(1, (HV + 127) / 128));
  const int64_t TR = round_up((HV + C - 1) / C, 32);
  return {int32_t(C), int32_t(TR), 1, 0};
}

// The geometries a call of `rows` rows may take, in order of preference (the
// shorter chain per row first): below kManyRows rows the few-rows geometry,
// then the many-rows ones; from kManyRows the many-rows ones only. Many rows:
// the fewest vectors per thread that give about kManyRowsThreads threads
// (v), and v / 2 down to 2 where a row still fits in 2 * kManyRowsThreads
// threads (more threads per row: its loads in fewer rounds, but fewer blocks
// per SM). Rows wider than the many-rows geometry serves keep the few-rows one.
struct Candidates {
  Geometry g[4];
  int n = 0;
};

template <typename T>
Candidates candidate_geometries(int64_t H, int64_t rows) {
  const int64_t HV = H / Pack<T>::V;
  Candidates out;
  const bool many = HV <= 2 * kMaxVpt * kManyRowsThreads;
  if (rows < kManyRows || !many) out.g[out.n++] = few_rows_geometry<T>(H);
  if (!many) return out;
  int64_t v = 1;
  while (v * kManyRowsThreads < HV && v < kMaxVpt) v *= 2;
  for (int64_t vpt = v > 1 ? 2 : 1; vpt <= v; vpt *= 2) {
    const int64_t TR = round_up((HV + vpt - 1) / vpt, 32);
    if (TR <= 2 * kManyRowsThreads) out.g[out.n++] = {1, int32_t(TR), int32_t(vpt), 0};
  }
  return out;
}

// ---- this rank's wire ---------------------------------------------------------------
// This thread's vectors of row m of this rank's partial, rounded to T: the
// finalize of SPEC §3 (or the dense x itself); inactive vectors are left
// unread. The row's indices and weights are read once for all VPT vectors, and
// the K slots go in chunks that keep kLoads 16-byte row loads in flight. A
// value equal to the exchange's sentinel is sent as another NaN.
template <typename T, int VPT>
struct RowVectors {
  uint4 u[VPT];
};

template <typename T, int VPT, int kLoads = MAR_KCHUNK>
__device__ __forceinline__ void wire_vectors(const LayerArgs& a, uint32_t m, const Vectors<VPT>& vs,
                                             uint4 (&w)[VPT]) {
  using PK = Pack<T>;
  using Raw = RowVectors<T, VPT>;
  constexpr int V = PK::V;
  constexpr int kChunk = kLoads / VPT > 0 ? kLoads / VPT : 1;
  const uint32_t H = uint32_t(a.H), K = uint32_t(a.K);
  if (a.cfg.has(kDense)) {
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      w[i] = vs.active(i) ? avoid_sentinel<sizeof(T)>(ldg16(elem_ptr<T>(a.partial, m, H, vs.v(i))))
                          : kSentinel4;
    return;
  }
  // The shared expert's vectors: one vector per thread (latency) loads them
  // before the expert rows, so that their latency is not added to the chain;
  // several load them after, which saves the registers.
  constexpr bool kSharedEarly = VPT == 1;
  auto load_shared = [&](int i) {
    return a.shared != nullptr && vs.active(i) ? ldg16(elem_ptr<T>(a.shared, m, H, vs.v(i)))
                                               : make_uint4(0u, 0u, 0u, 0u);
  };
  uint4 shared_early = kSharedEarly ? load_shared(0) : make_uint4(0u, 0u, 0u, 0u);
  float acc[VPT * V];
  finalize_columns<VPT * V, kChunk>(
      acc, a.idx + m * K, int(K), int32_t(a.P),
      [&](int k0, const bool (&in)[kChunk], float (&wt)[kChunk]) {
        load_weights<kChunk>(a.scales, a.scales_dtype, m * K + uint32_t(k0), in, wt);
      },
      [&](int32_t p, bool ok) {
        // Several vectors per thread: the 16 row loads under predicates, issued
        // back to back (1xH200, µs: M = 256 11.18 -> 10.54, M = 2048 98.6 -> 96.6,
        // but M = 128 7.08 -> 7.22). One vector: a branch around each row, which
        // measured faster at M = 32 and 64 (3.79 / 4.73 against 3.92 / 4.84 µs
        // with predicates). docs/perf.md v15.
        Raw raw{};
        if (VPT == 1 && !ok) return raw;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          const T* row = elem_ptr<T>(a.partial, uint32_t(p), H, vs.v(i));
          if constexpr (VPT > 1) raw.u[i] = ldg16_if(ok && vs.active(i), row);
          else raw.u[i] = vs.active(i) ? ldg16(row) : make_uint4(0u, 0u, 0u, 0u);
        }
        return raw;
      },
      [](const Raw& raw, float (&x)[VPT * V]) {
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          float f[V];
          PK::unpack(raw.u[i], f);
#pragma unroll
          for (int j = 0; j < V; ++j) x[i * V + j] = f[j];
        }
      });
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    float y[V], sh[V];
#pragma unroll
    for (int j = 0; j < V; ++j) y[j] = acc[i * V + j];
    const bool shared = a.shared != nullptr && vs.active(i);
    PK::unpack(shared ? (kSharedEarly ? shared_early : load_shared(i)) : make_uint4(0u, 0u, 0u, 0u), sh);
    finalize_scale_and_shared<V>(y, a.cfg.routed_scaling_factor, sh, shared);
    w[i] = avoid_sentinel<sizeof(T)>(PK::pack(y));
  }
}

// Byte offset of vector v of row m inside a slot.
__device__ __forceinline__ uint64_t slot_offset(uint32_t m, uint32_t HV, uint32_t v) {
  return uint64_t(m * HV + v) * 16u;
}

// Stores this rank's wire vector into slot `rank` of rank `dst`'s current buffer.
__device__ __forceinline__ void push_to(const ExchangeView& x, const CallState& st, int dst,
                                        uint64_t offset, uint4 w) {
  st_relaxed_sys(x.areas[dst] + (st.slot0(x.nranks) + uint64_t(x.rank)) * x.slot_bytes + offset, w);
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
  if (x.nranks == 1) {  // no peer: the sum is this rank's wire (the loop below, for one rank)
    PK::unpack(own, y);
    return;
  }
  char* mine = x.areas[x.rank] + st.slot0(x.nranks) * x.slot_bytes + offset;
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

// Where this thread stands: its cluster, its vectors of every row.
template <int VPT>
struct Place {
  uint32_t C, cluster, M, G;
  Vectors<VPT> vs;
};

template <typename T, int VPT>
__device__ __forceinline__ Place<VPT> place_of(const LayerArgs& a, const Geometry& g) {
  Place<VPT> p;
  p.C = uint32_t(g.C);
  p.cluster = cluster_index();
  p.M = uint32_t(a.M);
  p.G = uint32_t(g.G);
  p.vs.v0 = rank_in_cluster() * uint32_t(g.TR * VPT) + threadIdx.x;
  p.vs.stride = uint32_t(g.TR);
  p.vs.HV = uint32_t(a.H) / Pack<T>::V;
  return p;
}

// Elements of a block's part of a row (the staged quantizer's slice).
__device__ __forceinline__ uint32_t slice_elems(const Geometry& g, int V) {
  return uint32_t(g.TR) * uint32_t(g.VPT) * uint32_t(V);
}

// What the tail keeps over the call. Its loads (gamma, quant_scale) are issued right after
// the wait for the predecessor, ahead of the rows', and used only in the tail.
template <typename T, int VPT>
__device__ __forceinline__ TailState tail_state(const LayerArgs& a, const ClusterEntry& entry,
                                                const Vectors<VPT>& vs) {
  TailState ts;
  ts.entry = entry;
  if constexpr (VPT == 1) {
    if (vs.active(0)) ts.gamma = load_gamma_bits<T>(a, vs.v(0));
  }
  const OpConfig& c = a.cfg;
  if (c.quantizes()) {
    ts.lanes = quantize_lanes<T>(c);
    if (c.quant == QuantKind::kFp8Static || c.quant == QuantKind::kNvFp4) ts.quant_scale = a.quant_scale[0];
  }
  return ts;
}

// This thread's vectors of row `row` of the residual (rows < M). One vector
// per thread (latency) loads it before the wire, so that its latency overlaps
// the finalize's; several load it after, which saves the registers.
template <typename T, int VPT>
__device__ __forceinline__ void load_residual(const LayerArgs& a, uint32_t row, uint32_t M,
                                              const Vectors<VPT>& vs, uint4 (&res)[VPT]) {
#pragma unroll
  for (int i = 0; i < VPT; ++i)
    res[i] = row < M && vs.active(i) ? ldg16(elem_ptr<T>(a.residual, row, uint32_t(a.H), vs.v(i)))
                                     : kSentinel4;
}

// residual_out of this thread's vectors of a row: the rank-ordered sum of the
// wires (own from registers) plus the residual, each vector as rank_sum: its
// peers' slots waited for, cleared and added in rank order.
// kAllSlotsFirst, for two-shot's owned rows (whose peers pushed them in phase 1,
// before their own reductions): with several vectors per thread and at most
// 8 / VPT ranks, the peers' slots of every vector are read before the first wait,
// one round trip per row instead of one per vector (1xH200, 2 virtual ranks:
// reduce-scatter M = 1024 84.1 -> 74.4 µs, two-shot 108.3 -> 100.0). Not for
// one-shot, which reduces a row right after its own push, when the peers' slots
// are likely still empty: there 4 virtual ranks at M = 32 went from 8.6 to 12.0 µs
// (two vectors per thread, no spills), and at four vectors per thread the kernel
// spilled (docs/perf.md v16). The steps after the reads are rank_sum's, kept apart:
// written as one function, the one-shot kernels compiled to other, longer code.
template <typename T, int VPT, bool kAllSlotsFirst = false>
__device__ __forceinline__ void reduce_row(const ExchangeView& x, const CallState& st, uint32_t m,
                                           const Vectors<VPT>& vs, const uint4 (&own)[VPT],
                                           const uint4 (&res)[VPT], uint4 (&r)[VPT]) {
  using PK = Pack<T>;
  constexpr int kRanks = kAllSlotsFirst && VPT > 1 ? 8 / VPT : 0;
  if (kRanks > 1 && x.nranks > 1 && x.nranks <= kRanks) {
    constexpr int R = kRanks > 1 ? kRanks : 1;
    char* mine = x.areas[x.rank] + st.slot0(x.nranks) * x.slot_bytes;
    auto slot = [&](int i, int s) {
      return mine + slot_offset(m, vs.HV, vs.v(i)) + uint64_t(s) * x.slot_bytes;
    };
    auto peer = [&](int i, int s) {
      return s < x.nranks && s != x.rank && !st.poisoned && vs.active(i);
    };
    uint4 d[VPT][R];
#pragma unroll
    for (int i = 0; i < VPT; ++i)
#pragma unroll
      for (int s = 0; s < R; ++s)
        d[i][s] = peer(i, s) ? ld_relaxed_sys(slot(i, s)) : (s == x.rank ? own[i] : kSentinel4);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      float y[PK::V];
#pragma unroll
      for (int s = 0; s < R; ++s) {
        if (s >= x.nranks) break;
        uint4 dv = d[i][s];
        if (peer(i, s)) {
          dv = wait_slot<sizeof(T)>(dv, slot(i, s), x, st, s);
          st_relaxed_sys(slot(i, s), kSentinel4);
        }
        float f[PK::V];
        PK::unpack(dv, f);
#pragma unroll
        for (int j = 0; j < PK::V; ++j) y[j] = s == 0 ? f[j] : rank_sum_step(y[j], f[j]);
      }
      r[i] = vs.active(i) ? add_residual<T>(y, res[i]) : kSentinel4;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    r[i] = kSentinel4;
    if (!vs.active(i)) continue;
    float y[PK::V];
    rank_sum<T>(x, st, slot_offset(m, vs.HV, vs.v(i)), own[i], y);
    r[i] = add_residual<T>(y, res[i]);
  }
}

// A call's start, up to the wait for its predecessor: what reads no global
// memory. The entry barrier's arrival (thread 0 initializes the reduction
// barriers), and the parameters' constant-cache lines, which the first loads
// after the wait would otherwise fetch one after another (with the kernel
// launched early, programmatic dependent launch, this runs while the
// predecessor finishes: a group of one at M = 1, 4.13 -> 3.74 µs on 1xH200,
// docs/perf.md v11).
__device__ __forceinline__ ClusterEntry start_call(const LayerArgs& a, const ExchangeView& x, int C,
                                                  TailShared& sh) {
  ClusterEntry entry;
  entry.arrive(C, sh.sum, sh.max);
  warm_constants(a, &sh.sink);
  warm_constants(x, &sh.sink);
  wait_for_predecessor();
  return entry;
}

// ---- one-shot ---------------------------------------------------------------------------
template <typename T, int kMaxTR, int kMinBlocks, int VPT, QuantKind Q>
__global__ void __launch_bounds__(kMaxTR, kMinBlocks)
    oneshot_kernel(const __grid_constant__ LayerArgs a, const __grid_constant__ ExchangeView x,
                   const Geometry g) {
  extern __shared__ uint4 stage_raw[];  // one slice of T, for the staged quantizers
  __shared__ TailShared sh;
  __shared__ uint64_t trace_words[8];
  T* stage = reinterpret_cast<T*>(stage_raw);
  const Place<VPT> p = place_of<T, VPT>(a, g);
  const ClusterEntry entry = start_call(a, x, int(p.C), sh);
  const CallState st = begin_call(x);
  Tracer tr(x, trace_words);
  TailState ts = tail_state<T, VPT>(a, entry, p.vs);
  // A block waits for peers only in reduce_row: none in a group of one, or
  // without rows; otherwise its last row's reduce_row is its last wait.
  if (x.nranks == 1 || p.cluster >= p.M) let_successor_launch();
  if constexpr (Q == QuantKind::kNvFp4) zero_swizzle_padding_rows(a, p.M);
  // Loads row `row`'s residual and this rank's wire of it, which it pushes to
  // every peer. With several vectors per thread, 16 row loads in flight (8 in
  // two-shot, whose kernel has no registers to spare for them): measured
  // 125 vs 130 µs at M = 2048 on 1xH200 (docs/perf.md v7).
  constexpr int kOneShotLoads = VPT > 1 ? 2 * MAR_KCHUNK : MAR_KCHUNK;
  auto load_row = [&](uint32_t row, uint4 (&res)[VPT], uint4 (&own)[VPT]) {
    if (row >= p.M) {  // past the last row (the lookahead of a cluster's last one)
#pragma unroll
      for (int i = 0; i < VPT; ++i) res[i] = own[i] = kSentinel4;
      return;
    }
    if constexpr (VPT == 1) load_residual<T, VPT>(a, row, p.M, p.vs, res);
    wire_vectors<T, VPT, kOneShotLoads>(a, row, p.vs, own);
    if constexpr (VPT > 1) load_residual<T, VPT>(a, row, p.M, p.vs, res);
    if (st.poisoned || x.nranks == 1) return;  // nothing to push
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (!p.vs.active(i)) continue;
      const uint64_t off = slot_offset(row, p.vs.HV, p.vs.v(i));
      for (int s = 0; s < x.nranks; ++s)
        if (s != x.rank) push_to(x, st, s, off, own[i]);
    }
  };
  // One vector per thread: the next row is pushed before this one is waited
  // for, so the pushes run ahead of the waits. Several: the blocks of an SM
  // overlap each other's rows instead (and the registers are needed).
  constexpr bool kLookahead = VPT == 1;
  uint4 res[VPT], own[VPT];
  uint32_t m = p.cluster;
  if constexpr (kLookahead) load_row(m, res, own);
  for (; m < p.M; m += p.G) {
    uint4 res_next[VPT], own_next[VPT];
    if constexpr (kLookahead) load_row(m + p.G, res_next, own_next);
    else load_row(m, res, own);
    tr.lap(kTracePush);
    uint4 r[VPT];
    reduce_row<T, VPT>(x, st, m, p.vs, own, res, r);
    if (x.nranks > 1 && m + p.G >= p.M) let_successor_launch();
    tr.lap(kTraceStage);
    row_tail<T, VPT, Q>(a, TailPlace{m, p.M}, p.vs, r, slice_elems(g, Pack<T>::V), int(p.C), sh, ts,
                     stage);
    tr.lap(kTraceFinish);
    tr.row();
    if constexpr (kLookahead) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        own[i] = own_next[i];
        res[i] = res_next[i];
      }
    }
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

template <typename T, int kMaxTR, int kMinBlocks, int VPT, QuantKind Q>
__global__ void __launch_bounds__(kMaxTR, kMinBlocks)
    twoshot_kernel(const __grid_constant__ LayerArgs a, const __grid_constant__ ExchangeView x,
                   const Geometry g) {
  extern __shared__ uint4 stage_raw[];
  __shared__ TailShared sh;
  __shared__ int ok_flag;
  __shared__ uint64_t trace_words[8];
  T* stage = reinterpret_cast<T*>(stage_raw);
  const Place<VPT> p = place_of<T, VPT>(a, g);
  const Vectors<VPT>& vs = p.vs;
  const ClusterEntry entry = start_call(a, x, int(p.C), sh);
  const CallState st = begin_call(x);
  Tracer tr(x, trace_words);
  TailState ts = tail_state<T, VPT>(a, entry, p.vs);
  // Waits are spread over phases 2 and 3: the successor may launch once this
  // block is past them all (at once in a group of one).
  if (x.nranks == 1) let_successor_launch();
  const uint32_t chunk = (p.M + uint32_t(x.nranks) - 1) / uint32_t(x.nranks);
  auto owner = [chunk](uint32_t m) { return int(m / chunk); };
  // Reduce-scatter (SPEC §2.1): the owned rows are the whole output; residual
  // and results hold rows [lo, lo + chunk) as rows [0, chunk).
  const bool scatter = a.cfg.has(kScatter);
  const uint32_t lo = min(uint32_t(x.rank) * chunk, p.M);
  const uint32_t first_out = scatter ? lo : 0u, rows_out = scatter ? min(chunk, p.M - lo) : p.M;
  if constexpr (Q == QuantKind::kNvFp4) zero_swizzle_padding_rows(a, rows_out);
  const uint64_t fbytes = flags_bytes(p.M, int(p.C));
  const uint32_t slice_id = rank_in_cluster();
  const uint32_t slice = slice_elems(g, Pack<T>::V);
  auto flag_at = [&](int r, uint32_t m) {
    return reinterpret_cast<uint32_t*>(x.gathers[r]) + (uint64_t(m) * p.C + slice_id);
  };
  auto packet_at = [&](int r, uint32_t m, int i) {
    return x.gathers[r] + fbytes + slot_offset(m, vs.HV, vs.v(i));
  };
  // Phase 1: every row owned elsewhere, to its owner. Never waits.
  for (uint32_t m = p.cluster; m < p.M; m += p.G) {
    const int o = owner(m);
    if (o == x.rank) continue;
    uint4 w[VPT];
    wire_vectors<T, VPT>(a, m, vs, w);
    if (st.poisoned) continue;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (vs.active(i)) push_to(x, st, o, slot_offset(m, vs.HV, vs.v(i)), w[i]);
  }
  tr.lap(kTracePush);
  // Phase 2: the owned rows: reduce, send residual_out to every peer, tail.
  for (uint32_t m = p.cluster; m < p.M; m += p.G) {
    if (owner(m) != x.rank) continue;
    const uint32_t out = m - first_out;
    uint4 res[VPT], own[VPT], r[VPT];
    if constexpr (VPT == 1) load_residual<T, VPT>(a, out, rows_out, vs, res);
    wire_vectors<T, VPT>(a, m, vs, own);
    if constexpr (VPT > 1) load_residual<T, VPT>(a, out, rows_out, vs, res);
    reduce_row<T, VPT, true>(x, st, m, vs, own, res, r);
    if (!st.poisoned && !scatter) {
#pragma unroll
      for (int i = 0; i < VPT; ++i)
        if (vs.active(i))
          for (int s = 0; s < x.nranks; ++s)
            if (s != x.rank) *reinterpret_cast<uint4*>(packet_at(s, m, i)) = r[i];
    }
    if (!scatter) {
      // Every thread's packet stores happen before the flags: the barrier orders
      // them before the release stores, which are cumulative.
      __syncthreads();
      if (!st.poisoned && threadIdx.x < uint32_t(x.nranks) && int(threadIdx.x) != x.rank)
        st_release_sys(flag_at(int(threadIdx.x), m), st.epoch + 1u);
    }
    tr.lap(kTraceStage);
    row_tail<T, VPT, Q>(a, TailPlace{out, rows_out}, vs, r, slice, int(p.C), sh, ts, stage);
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
    uint4 r[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) r[i] = vs.active(i) && ok ? ld_relaxed_sys(packet_at(x.rank, m, i)) : kSentinel4;
    __syncthreads();  // ok_flag is rewritten for the next row
    tr.lap(kTraceStage);
    row_tail<T, VPT, Q>(a, TailPlace{m, p.M}, vs, r, slice, int(p.C), sh, ts, stage);
    tr.lap(kTraceFinish);
    tr.row();
  }
  if (x.nranks > 1) let_successor_launch();
  ts.entry.enter();  // a block without rows still completes the entry barrier
  finish_call(x, st.epoch);
  tr.lap(kTraceOther);
  tr.done(st.epoch);
}

// ---- launch ---------------------------------------------------------------------------
template <typename T>
using Kernel = void (*)(LayerArgs, ExchangeView, Geometry);

// One-vector geometries: blocks of up to 256 threads (rows up to 2048
// vectors: H <= 16384 in bf16), wider rows a block of up to kMaxThreads.
// The small blocks are bounded to two blocks of 256 threads per SM (at most
// 128 registers, no spills), for every group: so that the clusters of ranks
// sharing a GPU fit beside each other (1xH200, 2 virtual ranks at M = 32: 7.49
// against 11.19 µs; docs/perf.md v8), and so that a rank with its GPU to itself
// keeps 4 blocks of 128 threads per SM, 64 clusters of a 7168-wide row in
// one round. Unbounded (~135-165 registers) they were no faster at M = 1 and
// slower from M = 32 (1xH200, docs/perf.md v12).
// Every shape comes compiled once per quant kind (row_tail): `quant` is the
// call's kind, or kNone when it asks for no codes (quant_of).
template <typename T, int kMaxTR, int kMinBlocks, int VPT, QuantKind Q>
Kernel<T> kernel_of(Algorithm algorithm) {
  return algorithm == Algorithm::kTwoShot ? twoshot_kernel<T, kMaxTR, kMinBlocks, VPT, Q>
                                          : oneshot_kernel<T, kMaxTR, kMinBlocks, VPT, Q>;
}

template <typename T, int kMaxTR, int kMinBlocks, int VPT>
Kernel<T> kernel_of(Algorithm algorithm, QuantKind quant) {
  switch (quant) {
    case QuantKind::kFp8Static:
      return kernel_of<T, kMaxTR, kMinBlocks, VPT, QuantKind::kFp8Static>(algorithm);
    case QuantKind::kFp8PerToken:
      return kernel_of<T, kMaxTR, kMinBlocks, VPT, QuantKind::kFp8PerToken>(algorithm);
    case QuantKind::kFp8PerGroup:
      return kernel_of<T, kMaxTR, kMinBlocks, VPT, QuantKind::kFp8PerGroup>(algorithm);
    case QuantKind::kNvFp4:
      return kernel_of<T, kMaxTR, kMinBlocks, VPT, QuantKind::kNvFp4>(algorithm);
    default:
      return kernel_of<T, kMaxTR, kMinBlocks, VPT, QuantKind::kNone>(algorithm);
  }
}

QuantKind quant_of(const OpConfig& c) { return c.quantizes() ? c.quant : QuantKind::kNone; }

// Many rows: blocks of up to 2 * kManyRowsThreads threads, 128 registers each.
template <typename T, int VPT>
Kernel<T> many_rows_kernel(Algorithm algorithm, QuantKind quant) {
  static_assert(MAR_MANY_ROWS_BOUND >= 2 * kManyRowsThreads, "a many-rows block must fit");
  return kernel_of<T, MAR_MANY_ROWS_BOUND, 1, VPT>(algorithm, quant);
}

template <typename T>
Kernel<T> kernel_for(Algorithm algorithm, QuantKind quant, const Geometry& g) {
  switch (g.VPT) {
    case 2: return many_rows_kernel<T, 2>(algorithm, quant);
    case 4: return many_rows_kernel<T, 4>(algorithm, quant);
    default: break;
  }
  if (g.TR > 256) return kernel_of<T, kMaxThreads, 1, 1>(algorithm, quant);
  return kernel_of<T, 256, 2, 1>(algorithm, quant);
}

// Every kernel kernel_for can return.
template <typename T>
std::vector<Kernel<T>> all_kernels() {
  std::vector<Kernel<T>> out;
  for (Algorithm algo : {Algorithm::kOneShot, Algorithm::kTwoShot})
    for (QuantKind q : {QuantKind::kNone, QuantKind::kFp8Static, QuantKind::kFp8PerToken,
                        QuantKind::kFp8PerGroup, QuantKind::kNvFp4})
      for (Kernel<T> k : {kernel_of<T, 256, 2, 1>(algo, q),
                          kernel_of<T, kMaxThreads, 1, 1>(algo, q),
                          many_rows_kernel<T, 2>(algo, q), many_rows_kernel<T, 4>(algo, q)})
        out.push_back(k);
  return out;
}

// Dynamic shared memory: one slice of T, for the staged quantizers only.
template <typename T>
size_t stage_bytes(const LayerArgs& a, const Geometry& g) {
  const bool staged = a.cfg.quantizes() && a.cfg.quant == QuantKind::kFp8PerGroup &&
                      quantize_lanes<T>(a.cfg) == 0;
  return staged ? size_t(g.TR) * size_t(g.VPT) * 16 : 0;
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

// The launch of a call: geometry with G set, the kernel and its shared memory.
template <typename T>
struct Launch {
  Geometry g;
  Kernel<T> kernel;
  size_t smem;
};

// Of the candidate geometries, the one whose clusters walk the fewest rounds
// of rows (ceil(M / G)), the earlier on a tie: a second round costs a whole
// row's chain again. 1xH200 (docs/perf.md v9): a group of one at M = 128 takes
// 2 vectors per thread (one block per SM, one round: 9.9 against 10.3 µs with
// 4, NVFP4 10.8 against 13.2), at M = 192 4 vectors (two blocks per SM, still
// one round: 12.8 against 16.2); 4 ranks sharing the GPU at M = 32 take many
// rows (10.75 against 12.2 µs for two rounds of few-rows clusters).
template <typename T>
cudaError_t plan_launch(const LayerArgs& a, const ExchangeView& x, Algorithm algo, Launch<T>* l) {
  int device = 0;
  const cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  // This rank may fill group_sms of the device's SMs (fewer when ranks of the
  // group share the device).
  const int sms = std::max(1, device_sms(device));
  // A reduce-scatter is two-shot's first half whatever the algorithm asked.
  const Algorithm kernel_algo = a.cfg.has(kScatter) ? Algorithm::kTwoShot : algo;
  const Candidates cands = candidate_geometries<T>(a.H, a.M);
  int64_t best_rounds = 0;
  for (int i = 0; i < cands.n; ++i) {
    Launch<T> c;
    c.g = cands.g[i];
    c.smem = stage_bytes<T>(a, c.g);
    c.kernel = kernel_for<T>(kernel_algo, quant_of(a.cfg), c.g);
    // Its share of the resident clusters.
    const int64_t fit = int64_t(resident_clusters(reinterpret_cast<const void*>(c.kernel), c.g,
                                                  c.smem, device)) *
                        std::min(sms, x.group_sms) / sms;
    const int64_t in_flight = std::min<int64_t>(fit, kMaxGrid / c.g.C);
    if (in_flight < 1) continue;
    c.g.G = int32_t(std::min<int64_t>(a.M, in_flight));
    const int64_t rounds = (std::max<int64_t>(a.M, 1) + in_flight - 1) / in_flight;
    if (best_rounds == 0 || rounds < best_rounds) {
      *l = c;
      best_rounds = rounds;
    }
  }
  return best_rounds == 0 ? cudaErrorLaunchOutOfResources : cudaSuccess;
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
  // Programmatic dependent launch (device.cuh, wait_for_predecessor): the
  // kernel may be scheduled while its predecessor on the stream finishes.
  cudaLaunchAttribute attrs[2] = {cluster_attribute(l.g.C), {}};
  attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attrs;
  cfg.numAttrs = programmatic_launch() ? 2 : 1;
  return cudaLaunchKernelEx(&cfg, l.kernel, a, x, l.g);
}

template <typename T>
cudaError_t load_kernels() {
  for (Kernel<T> k : all_kernels<T>()) {
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(k));
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// Why a call cannot run (fused_capacity_problem); nullptr when it can.
template <typename T>
const char* capacity_problem(const LayerArgs& a, const ExchangeView& x, Algorithm algorithm) {
  const uint64_t row_bytes = uint64_t(a.H) * sizeof(T);
  // The kernels index elements with 32-bit math.
  const uint64_t limit = uint64_t(kMaxElements);
  if (uint64_t(a.M) * uint64_t(a.H) >= limit || uint64_t(a.P) * uint64_t(a.H) >= limit ||
      uint64_t(a.M) * uint64_t(a.K) >= limit)
    return "the call's arrays exceed 2^31 elements (the kernels index them with 32-bit math)";
  if (row_bytes > uint64_t(kMaxRowBytes)) return "rows are wider than the kernel serves";
  if (uint64_t(a.M) * row_bytes > x.slot_bytes)
    return "the call's rows exceed the workspace's exchange slots";
  if (algorithm == Algorithm::kTwoShot && !a.cfg.has(kScatter)) {
    // The most flags a row may need: the few-rows geometry's cluster.
    const int C = few_rows_geometry<T>(a.H).C;
    if (flags_bytes(a.M, C) + uint64_t(a.M) * row_bytes > x.gather_bytes)
      return "the call's rows exceed the workspace's gather area";
  }
  return nullptr;
}

template <typename T>
LaunchShape launch_shape(const LayerArgs& a, const ExchangeView& x, Algorithm algorithm) {
  Launch<T> l;
  LaunchShape shape;
  if (plan_launch<T>(a, x, algorithm, &l) != cudaSuccess) return shape;
  shape.grid = l.g.G * l.g.C;
  shape.block = l.g.TR;
  shape.cluster = l.g.C;
  shape.smem = l.smem;
  return shape;
}

}  // namespace

// The entry points of this translation unit's element type (fused_<type>.cu).
template <>
FusedOps fused_ops<MAR_ELEMENT_TYPE>() {
  using T = MAR_ELEMENT_TYPE;
  FusedOps ops;
  ops.prepare = &load_kernels<T>;
  ops.capacity_problem = &capacity_problem<T>;
  ops.launch = &launch_typed<T>;
  ops.shape = &launch_shape<T>;
  return ops;
}

}  // namespace mar
