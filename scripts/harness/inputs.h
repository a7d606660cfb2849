// The harness's cases: options, random bf16 inputs per rank (kept on the host
// too, for the CPU reference), the op's configuration and its output buffers.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/args.h"
#include "common/quant.h"

namespace harness {

struct Options {
  int ranks = 2, M = 1, H = 7168, K = 8, iters = 1000, warmup = 50, group_size = 128;
  bool virtual_ranks = false, check = false, verify = false, floors = false, graph = true, host = false;
  bool scatter = false;  // time the reduce-scatter variant; check it against the all-reduce
  int prefix = 0;        // > 0: check the first `prefix` rows against a call of only those rows
  int chain = 0;         // > 0: check a graph of `chain` calls, each on its predecessor's residual_out
  double timeout_s = 10.0;
  std::string algo = "oneshot", quant = "none";
};

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// bf16 bits of a float (round to nearest even; inputs here are finite).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
T* upload(const std::vector<T>& host) {
  T* d = nullptr;
  check(cudaMalloc(&d, std::max<size_t>(1, host.size()) * sizeof(T)), "cudaMalloc");
  check(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return d;
}

inline void* zeros(size_t bytes) {
  void* d = nullptr;
  check(cudaMalloc(&d, std::max<size_t>(1, bytes)), "cudaMalloc");
  check(cudaMemset(d, 0, bytes), "cudaMemset");
  return d;
}

// Bytes of each output of a call (0: not asked): no quant asks for residual
// and norm, a quant format for residual, codes and scales.
struct OutputBytes {
  size_t residual, norm, quant, scale;
  size_t total() const { return residual + norm + quant + scale; }
};

inline OutputBytes output_bytes(const Options& o) {
  const size_t M = size_t(o.M), H = size_t(o.H), rows = M * H * 2;
  if (o.quant == "none") return {rows, rows, 0, 0};
  if (o.quant == "fp8_static") return {rows, 0, M * H, 0};
  if (o.quant == "fp8_per_token") return {rows, 0, M * H, M * 4};
  if (o.quant == "fp8_per_group") return {rows, 0, M * H, M * (H / size_t(o.group_size)) * 4};
  if (o.quant == "nvfp4") return {rows, 0, M * H / 2, (M + 127) / 128 * 128 * ((H / 16 + 3) / 4 * 4)};
  std::fprintf(stderr, "unknown --quant %s\n", o.quant.c_str());
  std::exit(2);
}

// A fast uniform value in [-2, 2) (inputs run to hundreds of millions of
// values; their distribution does not matter here).
inline float fast_value(uint64_t& state) {
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return float(uint32_t(state >> 40)) * (4.0f / 16777216.0f) - 2.0f;
}

// One rank's inputs, on the host (for the CPU reference) and on its device.
struct RankInputs {
  std::vector<uint16_t> expert_out, shared, residual, gamma;
  std::vector<int32_t> idx;
  std::vector<float> scales;
  float quant_scale = 0.0f;
  int64_t P = 0;
  size_t valid_rows = 0;  // entries of idx inside [0, P): expert rows the finalize reads
  mar::LayerArgs args;    // device inputs and the configuration; outputs unset
};

inline mar::OpConfig config_of(const Options& o) {
  mar::OpConfig c;
  c.routed_scaling_factor = 2.5f;
  c.group_size = o.group_size;
  c.flags = mar::kHasScales | mar::kHasShared | mar::kOutResidual;
  if (o.quant == "none") {
    c.flags |= mar::kOutNorm;
    return c;
  }
  c.flags |= mar::kOutQuant;
  if (o.quant == "fp8_static") c.quant = mar::QuantKind::kFp8Static;
  if (o.quant == "fp8_per_token") c.quant = mar::QuantKind::kFp8PerToken;
  if (o.quant == "fp8_per_group") c.quant = mar::QuantKind::kFp8PerGroup;
  if (o.quant == "nvfp4") {
    c.quant = mar::QuantKind::kNvFp4;
    c.flags |= mar::kFp4Swizzled;
  }
  return c;
}

// Rank inputs: expert rows, routing and shared-expert partials from `rng`
// (they differ by rank); residual and gamma from `shared_seed`, alike for every
// rank (SPEC §2: the residual is the same on every rank of a group).
inline RankInputs make_inputs(const Options& o, std::mt19937& rng, uint64_t shared_seed) {
  RankInputs in;
  uint64_t state = rng(), common = shared_seed;
  const int64_t M = o.M, H = o.H, K = o.K;
  in.P = std::max<int64_t>(1, M * K / o.ranks + 1);
  in.expert_out.resize(size_t(in.P * H));
  in.shared.resize(size_t(M * H));
  in.residual.resize(size_t(M * H));
  in.gamma.resize(size_t(H));
  for (auto& v : in.expert_out) v = bf16_bits(fast_value(state));
  for (auto& v : in.shared) v = bf16_bits(0.25f * fast_value(state));
  for (auto& v : in.residual) v = bf16_bits(fast_value(common));
  for (auto& v : in.gamma) v = bf16_bits(1.0f + 0.05f * fast_value(common));
  // About 1/ranks of a token's experts live on this rank; the rest are -1.
  std::uniform_int_distribution<int32_t> row(0, int32_t(in.P - 1));
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  in.idx.resize(size_t(M * K));
  in.scales.resize(size_t(M * K));
  for (size_t i = 0; i < in.idx.size(); ++i) {
    in.idx[i] = u(rng) * float(o.ranks) < 1.0f ? row(rng) : -1;
    in.valid_rows += in.idx[i] >= 0;
    in.scales[i] = 0.05f + 0.9f * u(rng);
  }
  mar::LayerArgs& a = in.args;
  a.partial = upload(in.expert_out);
  a.idx = upload(in.idx);
  a.scales = upload(in.scales);
  a.scales_dtype = mar::DType::kF32;
  a.shared = upload(in.shared);
  a.residual = upload(in.residual);
  a.gamma = upload(in.gamma);
  a.gamma_dtype = mar::DType::kBF16;
  a.P = in.P;
  a.M = M;
  a.H = H;
  a.K = K;
  a.cfg = config_of(o);
  if (a.cfg.quant == mar::QuantKind::kFp8Static) in.quant_scale = 0.02f;
  if (a.cfg.quant == mar::QuantKind::kNvFp4) in.quant_scale = 448.0f * 6.0f / 8.0f;
  if (mar::quant_takes_scale_input(a.cfg.quant))
    a.quant_scale = upload(std::vector<float>{in.quant_scale});
  return in;
}

// `a` with fresh zeroed output buffers of the sizes of output_bytes.
inline mar::LayerArgs with_outputs(mar::LayerArgs a, const Options& o) {
  const OutputBytes b = output_bytes(o);
  a.residual_out = zeros(b.residual);
  a.norm_out = b.norm ? zeros(b.norm) : nullptr;
  a.quant_out = b.quant ? static_cast<uint8_t*>(zeros(b.quant)) : nullptr;
  a.scale_out = b.scale ? zeros(b.scale) : nullptr;
  return a;
}

// Every output byte of a call, in a fixed order (residual, norm, quant, scale).
inline std::vector<uint8_t> outputs_of(const mar::LayerArgs& a, const Options& o) {
  const OutputBytes b = output_bytes(o);
  const std::pair<const void*, size_t> parts[] = {
      {a.residual_out, b.residual}, {a.norm_out, b.norm}, {a.quant_out, b.quant}, {a.scale_out, b.scale}};
  std::vector<uint8_t> out;
  for (const auto& p : parts) {
    if (p.second == 0) continue;
    const size_t at = out.size();
    out.resize(at + p.second);
    check(cudaMemcpy(out.data() + at, p.first, p.second, cudaMemcpyDeviceToHost), "download");
  }
  return out;
}

// HBM bytes a rank's call must read at least: every input once (the expert
// rows its indices select, idx, scales, shared, residual, gamma). A
// reduce-scatter reads only its M/N rows of the residual.
inline size_t min_input_bytes(const Options& o, const RankInputs& in) {
  const size_t M = size_t(o.M), H = size_t(o.H), K = size_t(o.K);
  const size_t residual_rows = o.scatter ? M / size_t(o.ranks) : M;
  return in.valid_rows * H * 2 + M * K * 8 + (M + residual_rows) * H * 2 + H * 2;
}

}  // namespace harness
