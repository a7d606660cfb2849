// The exchange: its data layout (plain structs the runtime allocates and the
// kernels read) and, for device code, the one-shot protocol.
//
// Every rank owns an exchange area in its own memory, split into kNumBuffers
// rotating buffers of one slot per source rank. A call pushes its wire rows
// into slot `rank` of every rank's current buffer (remote stores over NVLink)
// and polls the slots of its own buffer. The data are their own flags
// (Lamport): a slot element holds the sentinel — all bits set, a NaN — until
// the peer's value lands. The sender replaces a wire value that happens to be
// the sentinel by another NaN, so a real value never looks empty, and the
// test is on bits: flushed subnormals, -0.0 and NaN payloads cannot stall it.
// After reading, the reader writes the sentinel back; a peer can write the same
// slot again only kNumBuffers calls later, after it has seen this rank's
// pushes of the calls in between, which are ordered after that clear.
#pragma once

#include <cstdint>

#include "config.h"

namespace mar {

constexpr int kNumBuffers = 3;

// Bytes of one rank's exchange area: kNumBuffers x nranks slots.
inline uint64_t exchange_area_bytes(uint64_t nranks, uint64_t slot_bytes) {
  return uint64_t(kNumBuffers) * nranks * slot_bytes;
}

// Bytes of a rank's two-shot gather area for slots of `slot_bytes`: the rows'
// residual_out packets (a slot's worth) and their flags (one per row and
// block of the row: at most a quarter of the packets' bytes, as rows are at
// least 16 values wide and spread over at most 8 blocks).
inline uint64_t gather_area_bytes(uint64_t slot_bytes) {
  return slot_bytes + slot_bytes / 4 + 4096;
}

// Blocks of one launch at most: each block keeps its own epoch.
constexpr int kMaxGrid = 4096;

// Per-rank counters in device memory.
struct DeviceCounters {
  uint32_t status;        // 0: healthy; 1: a wait timed out, the workspace is poisoned
  uint32_t pad[31];       // status alone on its 128-byte line
  // Calls block b of this rank has taken part in; selects the rotating buffer
  // and the two-shot flag value. Each block advances its own at its end: no
  // grid-wide atomic, no wait (kernels/device.cuh, begin_call).
  uint32_t epoch[kMaxGrid];
};

// Host-mapped record of the first failure a rank saw, for the host to report.
struct ErrorRecord {
  int32_t flag;  // set last, after the fields below
  int32_t rank;
  int32_t peer;
  uint32_t epoch;
  uint64_t waited_ns;
};

// What one rank's kernel needs of the workspace (runtime/ fills it).
struct ExchangeView {
  int32_t rank = 0;
  int32_t nranks = 1;
  char* areas[kMaxRanks] = {};   // every rank's exchange area, as seen from this device
  uint64_t slot_bytes = 0;       // bytes of one (buffer, source rank) slot
  char* gathers[kMaxRanks] = {}; // every rank's two-shot gather area (row flags, packets)
  uint64_t gather_bytes = 0;
  DeviceCounters* counters = nullptr;
  ErrorRecord* error = nullptr;  // device alias of the host-mapped record
  uint64_t timeout_ns = 0;
  int32_t group_sms = 1;         // SMs this rank may fill: the group's smallest GPU's,
                                 // divided among the group's ranks on one device
  uint64_t* trace = nullptr;     // host-mapped phase times of block 0, or nullptr (off)
};

// Words of the phase trace ($JAX_MOE_AR_TRACE): what block 0 of the last call did.
enum TraceWord : int {
  kTraceStart = 0,   // globaltimer ns at entry
  kTraceEnd = 1,     // ... after the call's last barrier
  kTracePush = 2,    // ns pushing rows (finalize + stores)
  kTraceStage = 3,   // ns staging rows: waiting for slots or packets, reducing
  kTraceFinish = 4,  // ns in the row tail (norm, quant)
  kTraceOther = 5,   // ns elsewhere (padding, sending packets, ...)
  kTraceRows = 6,    // rows block 0 handled
  kTraceEpoch = 7,
  kTraceWords = 8,
};

}  // namespace mar

#if defined(__CUDACC__)

namespace mar {

__device__ __forceinline__ uint4 ld_relaxed_sys(const void* p) {
  uint4 v;
  asm volatile("ld.relaxed.sys.global.v4.b32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ void st_relaxed_sys(void* p, uint4 v) {
  asm volatile("st.relaxed.sys.global.v4.b32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ uint32_t ld_volatile_u32(const uint32_t* p) {
  return *reinterpret_cast<const volatile uint32_t*>(p);
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

constexpr uint4 kSentinel4 = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu};

// True while any element of the 16 bytes still holds the sentinel.
template <int kElemBytes>
__device__ __forceinline__ bool holds_sentinel(uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  bool any = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (kElemBytes == 4) {
      any |= w[i] == 0xffffffffu;
    } else {
      any |= (w[i] & 0xffffu) == 0xffffu || (w[i] >> 16) == 0xffffu;
    }
  }
  return any;
}

// Replaces any element equal to the sentinel by a positive quiet NaN.
template <int kElemBytes>
__device__ __forceinline__ uint4 avoid_sentinel(uint4 v) {
  uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (kElemBytes == 4) {
      if (w[i] == 0xffffffffu) w[i] = 0x7fffffffu;
    } else {
      if ((w[i] & 0xffffu) == 0xffffu) w[i] = (w[i] & 0xffff0000u) | 0x7fffu;
      if ((w[i] >> 16) == 0xffffu) w[i] = (w[i] & 0x0000ffffu) | 0x7fff0000u;
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace mar

#endif  // __CUDACC__
