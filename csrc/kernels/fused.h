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
enum class Algorithm : int32_t { kOneShot = 0 };

// Per-rank counters in device memory.
struct DeviceCounters {
  uint32_t epoch;    // calls completed on this rank; selects the rotating buffer
  uint32_t arrived;  // blocks of the running call that have finished
  uint32_t status;   // 0: healthy; 1: a wait timed out, the workspace is poisoned
  uint32_t pad;
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
  DeviceCounters* counters = nullptr;
  ErrorRecord* error = nullptr;  // device alias of the host-mapped record
  uint64_t timeout_ns = 0;
  int32_t num_sms = 1;
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

cudaError_t launch_fused(DType t, const FusedArgs& args, const ExchangeView& view,
                         cudaStream_t stream);

}  // namespace mar
