// Device building blocks of the fused kernels: 16-byte packs of T, loads and
// stores with the scopes the exchange needs, fixed-order reductions over a
// block and over a cluster of blocks, and the bounded waits. No op logic here
// (that is fused.cu and tail.cuh).
#pragma once

#include <cooperative_groups.h>

#include <type_traits>

#include "../common/exchange.h"
#include "../common/numerics.h"
#include "fused.h"  // LayerArgs, ExchangeView

namespace mar {
namespace dev {

namespace cg = cooperative_groups;

// Threads of a block at most: a block holds one 16-byte vector per thread of
// its slice of a row (see Geometry in fused.cu).
constexpr int kMaxThreads = 768;
constexpr int kMaxWarps = kMaxThreads / 32;
// Blocks of one row at most: a portable cluster.
constexpr int kMaxCluster = 8;

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
  // Rounds each value to T (rT), two per conversion instruction.
  __device__ static uint4 pack(const float (&f)[V]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = pack2(f[2 * i], f[2 * i + 1]);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
  // lo in bits 0..15, hi in 16..31 (the same rounding as from_f32<T16>).
  __device__ static uint32_t pack2(float lo, float hi) {
    uint32_t d;
    if constexpr (std::is_same<T16, bf16_t>::value) {
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    } else {
      asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    }
    return d;
  }
};
template <> struct Pack<bf16_t> : Pack16<bf16_t> {};
template <> struct Pack<f16_t> : Pack16<f16_t> {};

// Address of the 16-byte vector v of row `row` in a row-major [rows, H] array
// of T. 32-bit index math (fused_capacity_problem keeps every array of a call
// under 2^31 elements); the one widening is the pointer add.
template <typename T>
__device__ __forceinline__ const T* elem_ptr(const void* base, uint32_t row, uint32_t H,
                                             uint32_t v) {
  return static_cast<const T*>(base) + (row * H + v * uint32_t(Pack<T>::V));
}
template <typename T>
__device__ __forceinline__ T* elem_ptr(void* base, uint32_t row, uint32_t H, uint32_t v) {
  return static_cast<T*>(base) + (row * H + v * uint32_t(Pack<T>::V));
}

// Read-only input data (never written during the kernel).
__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// ldg16(p) where `load`, zeros where not, without a branch: one predicated load,
// so that a warp issues a run of them back to back (a branch around each cost
// ~16 instructions per expert row, docs/perf.md v15). p is not dereferenced
// where !load, so it may be out of bounds there. Volatile: it must stay after
// the wait for the predecessor, like every other load of the kernel's inputs.
__device__ __forceinline__ uint4 ldg16_if(bool load, const void* p) {
  uint4 v;
  asm volatile(
      "{\n"
      "  .reg .pred q;\n"
      "  setp.ne.b32 q, %5, 0;\n"
      "  mov.b32 %0, 0;\n  mov.b32 %1, 0;\n  mov.b32 %2, 0;\n  mov.b32 %3, 0;\n"
      "  @q ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(int(load)));
  return v;
}

__device__ __forceinline__ void prefetch_l1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

__device__ __forceinline__ uint2 ld_relaxed_sys8(const void* p) {
  uint2 v;
  asm volatile("ld.relaxed.sys.global.v2.b32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// ---- reductions (fixed order, so every rank gets the same bits) -------------
// Over a row's blocks (a cluster of C blocks, C = 1 for a row in one block).
// A thread holds VPT vectors of the row, vector i of block c's slice being
// [c*TR*VPT + i*TR, +TR) (Place in fused.cu), so the row falls into groups of
// 32 consecutive vectors, one per (block, i, warp). Each group's value is a
// shuffle tree over its warp (every lane ends with it), stored into slot
// (c, i, warp) of EVERY block of the cluster; once a block holds every slot,
// each of its warps folds them as one fixed tree over (c, i, warp) order,
// which is the order of the vectors (fold_slots). The result therefore
// depends on the row width only, never on C, TR or VPT: a row gives the same
// bits in every geometry (groups past the row's end hold zeros, which change
// no sum). Only local shared-memory reads.
// In a cluster the slots travel as asynchronous stores into the peers' shared
// memory (st.async), each counted on the receiving block's transaction
// barrier (mbarrier), which completes once all C x VPT x warps slots have
// landed: a block waits for its own slots only, with no cluster-wide barrier
// and no fence (the cluster barrier it replaces cost ~1,400 of ~8,700 cycles
// at M = 1 on 1xH200, docs/perf.md v10). In one block: a block barrier.
// Reductions alternate between two sets of slots, each with its barrier: a
// block writes set n % 2 for its n-th reduction, which its peers have stopped
// reading once it could complete reduction n + 1 (that needed every peer's
// slots of n + 1, sent after the peer's fold of n), so no second barrier is
// needed, and none before a block exits (a block waits for every slot it is
// sent, so nobody writes to a block that may have left).
struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct NanMax {
  __device__ float operator()(float a, float b) const { return nan_max(a, b); }
};

// Slots of one set: C x VPT x warps groups at most (Geometry keeps to it).
constexpr int kReduceSlots = kMaxCluster * kMaxWarps;

template <typename R>
struct ReduceSlots {
  uint64_t bar[2];  // set n's transaction barrier (clusters only)
  R v[2][kReduceSlots];
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}
// The address `local` of this block's shared memory in block `rank` of the cluster.
__device__ __forceinline__ uint32_t cluster_addr(uint32_t local, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(rank));
  return r;
}
__device__ __forceinline__ uint32_t cluster_index() {  // blockIdx.x / cluster size
  uint32_t r;
  asm("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t rank_in_cluster() {  // blockIdx.x % cluster size
  uint32_t r;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void barrier_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}
// This block's one arrival on the barrier's current phase, which then also
// waits for `bytes` of asynchronous stores.
__device__ __forceinline__ void barrier_arrive_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ bool barrier_phase_done(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0u;
}
// Stores v at the cluster address `dst`, counted on the barrier at cluster address `bar`.
__device__ __forceinline__ void store_counted(uint32_t dst, double v, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b64 [%0], %1, [%2];" ::"r"(dst),
               "l"(__double_as_longlong(v)), "r"(bar)
               : "memory");
}
__device__ __forceinline__ void store_counted(uint32_t dst, float v, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(dst),
               "r"(__float_as_uint(v)), "r"(bar)
               : "memory");
}

// A block may write into another block's shared memory only once that block
// has started and initialized its barriers: every thread arrives on the
// cluster barrier at entry (ClusterEntry::arrive, after thread 0 initialized
// the barriers of `slots`) and waits on it before its first remote store
// (ClusterEntry::enter), which by then costs nothing.
struct ClusterEntry {
  bool pending = false;
  template <typename... Slots>
  __device__ void arrive(int C, Slots&... slots) {
    if (C == 1) return;
    if (threadIdx.x == 0) {
      (barrier_init(&slots.bar[0]), ...);
      (barrier_init(&slots.bar[1]), ...);
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    pending = true;
  }
  __device__ void enter() {
    if (!pending) return;
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    pending = false;
  }
};

// The fold of a reduction's n slots (n <= kReduceSlots), by every warp alike:
// lane j folds slots j, j + 32, j + 64, ... in that order (none past n), and
// the lanes are combined by a butterfly (aligned neighbours first). Slots past
// the row's groups hold zeros, which change no sum of squares and no amax, so
// the result depends on the row's groups only, never on how many slots a
// geometry pads them to. Its chain is n / 32 + 5 operations long where a left
// fold's is n (28 slots of a 7168-wide row: ~540 cycles at M = 1 on 1xH200
// folded left; docs/perf.md v12).
template <typename R, typename Op>
__device__ __forceinline__ R fold_slots(const R* set, int n, Op op) {
  const int lane = threadIdx.x & 31;
  R t = lane < n ? set[lane] : R(0);
  for (int j = lane + 32; j < n; j += 32) t = op(t, set[j]);
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) t = op(t, __shfl_xor_sync(0xffffffffu, t, o));
  return t;
}

// `count`: the reductions this block did on these slots so far.
template <int VPT, typename R, typename Op>
__device__ __forceinline__ R cluster_reduce(R (&v)[VPT], ReduceSlots<R>& slots, uint32_t& count,
                                            int C, Op op, ClusterEntry& entry) {
#pragma unroll
  for (int i = 0; i < VPT; ++i)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], o));
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, per_block = VPT * warps;
  const uint32_t n = count++;
  R* set = slots.v[n & 1u];
  if (C == 1) {
    if ((threadIdx.x & 31) == 0)
#pragma unroll
      for (int i = 0; i < VPT; ++i) set[i * warps + warp] = v[i];
    __syncthreads();
  } else {
    uint64_t* bar = &slots.bar[n & 1u];
    // After the entry barrier, so that thread 0's first arrival is ordered after
    // the barriers' initialization by a barrier too (racecheck warned without
    // it, docs/perf.md v10 §3).
    entry.enter();
    if (threadIdx.x == 0) barrier_arrive_expect(bar, uint32_t(C * per_block) * uint32_t(sizeof(R)));
    // Lane c sends the warp's slots to block c (every lane holds the warp's
    // values after the shuffles): the C blocks' stores go out side by side.
    const uint32_t c = threadIdx.x & 31;
    if (c < uint32_t(C)) {
      const uint32_t mine = smem_addr(set + rank_in_cluster() * per_block + warp);
      const uint32_t dst = cluster_addr(mine, c), cbar = cluster_addr(smem_addr(bar), c);
#pragma unroll
      for (int i = 0; i < VPT; ++i) store_counted(dst + uint32_t(i * warps) * uint32_t(sizeof(R)), v[i], cbar);
    }
    // Every block of the cluster runs the same rows and reductions, so the
    // slots always come (a wait here ends like the cluster barrier it replaces).
    while (!barrier_phase_done(bar, (n >> 1) & 1u)) {
    }
  }
  return fold_slots(set, C * per_block, op);
}

// NaN-propagating max over this lane's aligned group of n lanes (n a power of two <= 32).
__device__ __forceinline__ float lanes_nan_max(float v, int n) {
  for (int o = 1; o < n; o <<= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- programmatic dependent launch ----------------------------------------------
// The kernels are launched so that a kernel may be scheduled while its
// predecessor on the stream still runs (fused.cu, launch_typed): its launch
// latency then hides behind the predecessor's end. Before its first global
// access a kernel waits for the predecessor to complete and its writes to be
// visible (griddepcontrol.wait; a no-op when launched the ordinary way).
// (-DMAR_SKIP_PREDECESSOR_WAIT removes the wait: a test build only, which shows
// that the harness's --chain check catches a kernel that reads early.)
__device__ __forceinline__ void wait_for_predecessor() {
#ifndef MAR_SKIP_PREDECESSOR_WAIT
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Lets the next kernel on the stream be scheduled once every block of this one
// has called it (or exited). That kernel still waits for this one to complete
// before it reads anything (wait_for_predecessor), so it only occupies SM
// slots early: a block calls it once it waits for no peer any more, so that
// those slots can never keep a peer's grid, on a shared GPU, from starting.
__device__ __forceinline__ void let_successor_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Reads one word of every 32 bytes of a kernel parameter, so that its
// constant-cache lines (one cache per SM) are fetched now (start_call in
// fused.cu). Thread 0 combines the words into a store to `sink` (shared
// memory), so that the reads can be neither dropped nor moved past the wait
// that follows; one thread's reads warm the cache for the whole block.
template <typename P>
__device__ __forceinline__ void warm_constants(const P& param, uint32_t* sink) {
  if (threadIdx.x != 0) return;
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&param);
  uint32_t acc = 0;
#pragma unroll
  for (int i = 0; i < int(sizeof(P) / 4); i += 8) acc ^= w[i];
  *reinterpret_cast<volatile uint32_t*>(sink) = acc;
}

// ---- per-call state ------------------------------------------------------------
struct CallState {
  uint32_t epoch;
  bool poisoned;   // an earlier wait timed out: exchange nothing, outputs become NaN
  uint64_t t0;     // start of the call, for the wait bound
  // Slot index of (current buffer, rank 0). Computed where a slot is addressed,
  // not in begin_call: a warp issues in order, so a use of the epoch right after
  // its load held every later instruction, the first input loads with them, for
  // the load's whole latency (ncu, 1xH200, M = 1: the most stalled instruction
  // before the expert rows; docs/perf.md v12). That holds in the one-vector
  // kernels; the 128-register many-rows kernels keep the counters in uniform
  // registers, moved there right after their load whatever the source does
  // (docs/perf.md v13 §3).
  __device__ __forceinline__ uint64_t slot0(int nranks) const {
    return uint64_t(epoch % kNumBuffers) * uint64_t(nranks);
  }
};

// Block b keeps its own count of calls (DeviceCounters::epoch[b]). Every rank
// launches the same grids in the same order, and the block that exchanges an
// element of a row has the same index on every rank, so the counts of the
// blocks that meet always agree, whatever the grid of each call.
// Nothing here gates the first loads of the inputs: callers branch on
// `poisoned` only where they store or wait, so the counters' load latency
// overlaps the loads of indices and expert rows.
__device__ __forceinline__ CallState begin_call(const ExchangeView& x) {
  CallState s;
  s.epoch = ld_volatile_u32(&x.counters->epoch[blockIdx.x]);
  s.poisoned = ld_volatile_u32(&x.counters->status) != 0u;
  s.t0 = global_timer_ns();
  return s;
}

// This block is done with call `epoch`: the next call on this stream uses the
// next buffer. A plain store, no fence: nothing in this call reads it, and the
// next kernel on the stream sees every write of this one.
__device__ __forceinline__ void finish_call(const ExchangeView& x, uint32_t epoch) {
  if (threadIdx.x == 0) x.counters->epoch[blockIdx.x] = epoch + 1u;
}

// Phase times of block 0 (thread 0) into the workspace's host-mapped trace,
// when tracing is on ($JAX_MOE_AR_TRACE at workspace creation); no-ops
// otherwise. The running sums live in shared memory so that the kernels' other
// threads pay no registers for them.
struct Tracer {
  uint64_t* out;   // the trace record, or nullptr when not tracing / not thread 0 of block 0
  uint64_t* acc;   // shared: [0] entry time, [1] last lap, [2..5] sums, [6] rows
  __device__ Tracer(const ExchangeView& x, uint64_t* shared_words)
      : out(x.trace != nullptr && blockIdx.x == 0 && threadIdx.x == 0 ? x.trace : nullptr),
        acc(shared_words) {
    if (out == nullptr) return;
    acc[0] = acc[1] = global_timer_ns();
    for (int i = 2; i < 7; ++i) acc[i] = 0;
  }
  // Charges the time since the previous lap to `word` (kTracePush .. kTraceOther).
  __device__ __forceinline__ void lap(int word) {
    if (out == nullptr) return;
    const uint64_t now = global_timer_ns();
    acc[word] += now - acc[1];
    acc[1] = now;
  }
  __device__ __forceinline__ void row() {
    if (out != nullptr) ++acc[6];
  }
  __device__ void done(uint32_t epoch) {
    if (out == nullptr) return;
    out[kTraceStart] = acc[0];
    out[kTraceEnd] = global_timer_ns();
    for (int w = kTracePush; w <= kTraceOther; ++w) out[w] = acc[w];
    out[kTraceRows] = acc[6];
    out[kTraceEpoch] = epoch;
  }
};

// ---- bounded waits -------------------------------------------------------------
// Called every 256 spins of a wait: true when the wait must end — this rank
// already failed (the workspace is poisoned), or the bound passed, in which
// case the first thread to notice records the failure for the host.
static __device__ __noinline__ bool wait_expired(const ExchangeView& x, uint32_t epoch, uint64_t t0,
                                          int peer) {
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

// 16 bytes of a Lamport slot at p, given a first read d of it: re-reads until no
// element holds the sentinel. On failure the sentinel (a NaN) is returned and
// flows into the outputs, which become NaN.
template <int kElemBytes>
__device__ __forceinline__ uint4 wait_slot(uint4 d, const char* p, const ExchangeView& x,
                                           const CallState& st, int peer) {
  uint32_t spins = 0;
  while (holds_sentinel<kElemBytes>(d)) {
    if ((++spins & 255u) == 0u && wait_expired(x, st.epoch, st.t0, peer)) return kSentinel4;
    d = ld_relaxed_sys(p);
  }
  return d;
}

// Waits until *flag == want; false when the wait failed.
__device__ __forceinline__ bool wait_flag(const uint32_t* flag, uint32_t want,
                                          const ExchangeView& x, const CallState& st, int peer) {
  uint32_t spins = 0;
  while (ld_acquire_sys(flag) != want) {
    if ((++spins & 255u) == 0u && wait_expired(x, st.epoch, st.t0, peer)) return false;
  }
  return true;
}

}  // namespace dev
}  // namespace mar
