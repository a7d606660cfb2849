// Launcher of the fused kernel: raw pointers, a stream and a view of the
// exchange workspace in; cudaError_t out. No XLA types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/config.h"
#include "../common/numerics.h"

namespace mar {

constexpr int kMaxRanks = 16;

// Algorithm codes (jax_moe_ar/workspace.py mirrors them).
//   kOneShot: every rank pushes its whole partial to every rank and reduces all rows.
//   kTwoShot: every rank pushes each row to the row's owner (reduce-scatter), owners
//             reduce + norm + quantize their rows and push the *outputs* to every rank
//             (all-gather of what was asked for: quantized bytes where only quant is).
enum class Algorithm : int32_t { kOneShot = 0, kTwoShot = 1 };

// Blocks of every launch: the grid is always ExchangeView::group_sms blocks
// (at most this many), so that each block can keep its own epoch.
constexpr int kMaxGrid = 1024;

// Per-rank counters in device memory.
struct DeviceCounters {
  uint32_t status;        // 0: healthy; 1: a wait timed out, the workspace is poisoned
  uint32_t pad[31];       // status alone on its 128-byte line
  // Calls block b of this rank has completed; selects the rotating buffer. Every
  // launch has the same grid, so all blocks' counts agree at the start of a call,
  // and each block advances its own at its end: no grid-wide atomic, no wait.
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

// What one rank's kernel needs of the workspace.
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
  int32_t group_sms = 1;        // SMs of the group's smallest GPU (sets the grid)
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

struct FusedArgs {
  const void* partial = nullptr;  // expert_out [P, H], or x [M, H] when dense
  const int32_t* idx = nullptr;   // [M, K]
  const void* scales = nullptr;   // [M, K] or nullptr
  DType scales_dtype = DType::kF32;
  const void* shared = nullptr;   // [M, H] or nullptr
  const void* residual = nullptr; // [M, H]
  const void* gamma = nullptr;    // [H]
  DType gamma_dtype = DType::kF32;
  const float* quant_scale = nullptr;
  void* residual_out = nullptr;
  void* norm_out = nullptr;
  uint8_t* quant_out = nullptr;
  void* scale_out = nullptr;
  int64_t P = 0, M = 0, H = 0, K = 0;
  OpConfig cfg;
};

// Dynamic shared memory the kernel may use (one row of T), set on each device
// once, outside any captured region.
constexpr int kMaxRowBytes = 96 * 1024;
cudaError_t prepare_fused_kernels();

// Bytes of the gather area for slots of `slot_bytes`: row flags plus packets of
// every output a row can carry (at most 3x the row's partial, see fused.cu).
inline uint64_t gather_area_bytes(uint64_t slot_bytes) { return 3 * slot_bytes + slot_bytes / 8 + 4096; }

// Checks that a call of `args` fits the workspace for `algorithm`; nullptr when it does.
const char* fused_capacity_problem(DType t, const FusedArgs& args, const ExchangeView& view,
                                   Algorithm algorithm);

cudaError_t launch_fused(DType t, const FusedArgs& args, const ExchangeView& view,
                         Algorithm algorithm, cudaStream_t stream);

}  // namespace mar
